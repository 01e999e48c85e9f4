#!/usr/bin/env python3
"""Print a new random token, and the hub.toml lines that enable it by its hash only.

    python scripts/new_token.py [--name EA-desk-1] [--keys EA1,EA2]   # a publisher token
    python scripts/new_token.py --viewer                             # a dashboard token
    python scripts/new_token.py --hash < token.txt                   # hash a token you have

The token itself is printed once, on the first line: give it to the EA (or the dashboard URL)
and keep it nowhere else. hub.toml gets only "sha256:<hex>", so a leaked hub.toml or backup
grants nothing. Add the lines next to the old token, move the EAs to the new one, then remove the
old lines: several tokens may be valid at once, so tokens rotate without downtime.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mt5hub.config import HASHED, token_digest


def hashed(token: str) -> str:
    return HASHED + token_digest(token).hex()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="", help="shown in the hub's log lines, never the token")
    parser.add_argument("--keys", default="*", help="comma-separated table keys it may publish")
    parser.add_argument("--viewer", action="store_true", help="a token for dashboards (?token=)")
    parser.add_argument("--hash", action="store_true", help="hash the token read from stdin")
    args = parser.parse_args()
    if args.hash:
        token = sys.stdin.readline().strip()
        if not token:
            parser.error("--hash reads the token from stdin, and got none")
        print(hashed(token))
        return
    token = secrets.token_urlsafe(32)  # 256 random bits
    print(token)
    if args.viewer:
        print("\n# hub.toml, [mt5hub] (keep any other viewer tokens in the list):")
        print(f"viewer_tokens = [{json.dumps(hashed(token))}]")
        print(f"\n# or in the environment: MT5HUB_VIEWER_TOKENS={hashed(token)}")
        return
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] or ["*"]
    print("\n# hub.toml:")
    print("[[mt5hub.tokens]]")
    print(f"token = {json.dumps(hashed(token))}")
    print(f"keys = {json.dumps(keys)}")
    print(f"name = {json.dumps(args.name)}")
    print(
        f"\n# or in the environment: MT5HUB_TOKENS={hashed(token)}"
        + (f":{'|'.join(keys)}" if keys != ["*"] else "")
    )


if __name__ == "__main__":
    main()
