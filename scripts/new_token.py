#!/usr/bin/env python3
"""Print a new random publisher token and the hub.toml lines that enable it.

    python scripts/new_token.py [--name EA-desk-1] [--keys EA1,EA2]

Add the lines next to the old token, move the EAs to the new one, then remove the old lines:
several tokens may be valid at once, so tokens rotate without downtime.
"""

from __future__ import annotations

import argparse
import json
import secrets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="", help="shown in the hub's log lines, never the token")
    parser.add_argument("--keys", default="*", help="comma-separated table keys it may publish")
    args = parser.parse_args()
    token = secrets.token_urlsafe(32)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] or ["*"]
    print(token)
    print("\n# hub.toml:")
    print("[[mt5hub.tokens]]")
    print(f"token = {json.dumps(token)}")
    print(f"keys = {json.dumps(keys)}")
    print(f"name = {json.dumps(args.name)}")
    print(
        f"\n# or in the environment: MT5HUB_TOKENS={token}"
        + (f":{'|'.join(keys)}" if keys != ["*"] else "")
    )


if __name__ == "__main__":
    main()
