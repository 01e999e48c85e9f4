"""`mt5hub`: what operators do by hand, as one command.

    mt5hub token new [--name desk-1] [--keys EA1,EA2]   # a publisher token
    mt5hub token new --viewer [--keys EA1,EA*] [--url https://host:8443/]  # a dashboard token
    mt5hub token hash < token.txt                       # the hash of a token you have
    mt5hub check-config [hub.toml]                      # what the hub would refuse, and why
    mt5hub load -p 10 -r 10 -v 200                      # the load tester (scripts/fake_dll.py)
    mt5hub ea-bundle                                    # the DLL, include and EA in one zip

Serving stays `hypercorn --config hub.toml mt5hub:app`: this command never starts a hub.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import secrets
import ssl
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

from .config import (
    HASHED,
    ViewerGrant,
    check_safe_to_serve,
    load_config,
    status_access,
    token_digest,
)
from .errors import ConfigError

REPO = Path(__file__).resolve().parent.parent  # a source checkout (pip install -e .)
FAKE_DLL = REPO / "scripts" / "fake_dll.py"
MT5_DLL = REPO / "mt5_dll"


def hashed(token: str) -> str:
    """How hub.toml holds a token: `sha256:<hex>`, never the token itself."""
    return HASHED + token_digest(token).hex()


def token_new(args: argparse.Namespace) -> int:
    """Print a new random token once, then the hub.toml lines that enable it by its hash only.

    The token goes to the EA (or the dashboard URL) and nowhere else; a leaked hub.toml or backup
    grants nothing. Several tokens may be valid at once, so tokens rotate without downtime.
    """
    token = secrets.token_urlsafe(32)  # 256 random bits
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] or ["*"]
    if args.viewer and (problem := ViewerGrant(token=token, keys=tuple(keys)).problem()):
        print(f"mt5hub token new: --{problem}", file=sys.stderr)
        return 2
    print(token)
    env_keys = f":{'|'.join(keys)}" if keys != ["*"] else ""
    if args.viewer:
        print("\n# hub.toml, [mt5hub] (keep any other viewer tokens in the list):")
        if keys == ["*"] and not args.name:
            print(f"viewer_tokens = [{json.dumps(hashed(token))}]")
        else:
            entry = f"token = {json.dumps(hashed(token))}, keys = {json.dumps(keys)}"
            print(f"viewer_tokens = [{{{entry}, name = {json.dumps(args.name)}}}]")
        print(f"\n# or in the environment: MT5HUB_VIEWER_TOKENS={hashed(token)}{env_keys}")
        print("\n# the dashboard link to hand out (it holds the token):")
        print(dashboard_link(args.url, token, keys))
        return 0
    print("\n# hub.toml:")
    print("[[mt5hub.tokens]]")
    print(f"token = {json.dumps(hashed(token))}")
    print(f"keys = {json.dumps(keys)}")
    print(f"name = {json.dumps(args.name)}")
    print(f"\n# or in the environment: MT5HUB_TOKENS={hashed(token)}{env_keys}")
    return 0


def dashboard_link(url: str, token: str, keys: Sequence[str]) -> str:
    """The dashboard's URL with `?token=` (and `&keys=` when the token is limited to keys)."""
    parts = urlsplit(url)
    query = {"token": token, **({"keys": ",".join(keys)} if list(keys) != ["*"] else {})}
    joined = "&".join(filter(None, (parts.query, urlencode(query, safe=",*"))))
    return urlunsplit(parts._replace(path=parts.path or "/", query=joined))


def token_hash(args: argparse.Namespace) -> int:
    token = sys.stdin.readline().strip()
    if not token:
        print("mt5hub token hash: reads the token from stdin, and got none", file=sys.stderr)
        return 2
    print(hashed(token))
    return 0


def tls_problems(path: Path) -> list[str]:
    """What Hypercorn would refuse of the TLS keys: a certificate or key it cannot load.
    Paths are relative to the working directory, as they are for Hypercorn."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return []  # load_config has said so already
    certfile, keyfile = raw.get("certfile"), raw.get("keyfile")
    if not certfile and not keyfile:
        return []
    if not (certfile and keyfile):
        return ["certfile and keyfile go together: set both, or neither for plain WS only"]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except FileNotFoundError as exc:
        return [f"cannot read {exc.filename or certfile} (relative to {Path.cwd()})"]
    except (OSError, ssl.SSLError) as exc:
        return [f"certfile {certfile} / keyfile {keyfile}: {exc}"]
    return []


def check_config(args: argparse.Namespace) -> int:
    """Load hub.toml as the hub would (environment overrides included) and apply the checks it
    applies before serving. Exit 0 and a summary if it would start, 1 and the reasons if not."""
    path = Path(args.path or os.environ.get("MT5HUB_CONFIG", "hub.toml"))
    if not path.exists():
        print(f"{path}: no such file", file=sys.stderr)
        return 1
    problems: list[str] = []
    try:
        config = load_config(path)
        check_safe_to_serve(config)
    except ConfigError as exc:
        problems.append(str(exc))
        config = None
    problems += [f"{path}: {p}" for p in tls_problems(path)]
    if problems:
        for problem in problems:
            print(f"refused: {problem}", file=sys.stderr)
        return 1
    assert config is not None
    s = config.settings
    print(f"{path}: the hub would start")
    print(f"  binds: {', '.join(config.binds)}; workers: {config.workers}")
    scoped = sum(g.keys != ("*",) for g in s.viewer_tokens)
    print(
        f"  publisher tokens: {len(s.tokens)}; viewer tokens: {len(s.viewer_tokens)} "
        f"({scoped} limited to keys)"
    )
    status_token = " (or with the status token)" if s.status_token else ""
    print(f"  /healthz and /metrics answer: {status_access(config)}{status_token}")
    print(f"  backplane: {s.backplane or 'in-process'}; state_file: {s.state_file or 'none'}")
    return 0


def load(args: argparse.Namespace) -> int:
    """scripts/fake_dll.py's load mode, with these arguments (`mt5hub load --help`)."""
    if not FAKE_DLL.exists():
        print(f"the load tester is part of the source tree ({FAKE_DLL}): run this from a checkout")
        return 1
    sys.path.insert(0, str(FAKE_DLL.parent))
    fake_dll = importlib.import_module("fake_dll")  # scripts/ is not a package
    fake_dll.main(["load", *args.rest])
    return 0


def ea_bundle(args: argparse.Namespace) -> int:
    """`make -C mt5_dll bundle`: the DLL, the MQL5 include and the example EA in one zip, in
    mt5_dll/build/."""
    if not (MT5_DLL / "Makefile").exists():
        print(f"the DLL's sources are part of the source tree ({MT5_DLL}): run from a checkout")
        return 1
    done = subprocess.run(["make", "-C", str(MT5_DLL), "bundle"], check=False)
    if done.returncode != 0:
        print(f"mt5hub ea-bundle: make -C {MT5_DLL} bundle failed", file=sys.stderr)
        return done.returncode
    for bundle in sorted((MT5_DLL / "build").glob("mt5hub-ea-*.zip")):
        print(bundle)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="mt5hub",
        description="Tools for running mt5hub (serve it with: hypercorn --config hub.toml "
        "mt5hub:app).",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    token = commands.add_parser("token", help="make a token, or hash one you have")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    new = token_commands.add_parser(
        "new",
        help="a new random token, and the hub.toml lines that enable it by its hash",
        description=token_new.__doc__,
    )
    new.add_argument("--name", default="", help="shown in the hub's log lines, never the token")
    new.add_argument(
        "--keys",
        default="*",
        help="comma-separated table keys it may publish (or, with --viewer, see: EA1, EA*, *)",
    )
    new.add_argument("--viewer", action="store_true", help="a token for dashboards (?token=)")
    new.add_argument(
        "--url",
        default="https://localhost:8443/",
        help="with --viewer: the dashboard's address, for the link printed",
    )
    new.set_defaults(run=token_new)
    hash_ = token_commands.add_parser("hash", help="the sha256: form of the token on stdin")
    hash_.set_defaults(run=token_hash)

    check = commands.add_parser(
        "check-config",
        help="what the hub would refuse in hub.toml, and why, without starting it",
        description=check_config.__doc__,
    )
    check.add_argument("path", nargs="?", help="default: $MT5HUB_CONFIG, else ./hub.toml")
    check.set_defaults(run=check_config)

    load_ = commands.add_parser(
        "load",
        help="the load tester: publishers and viewers against a hub on loopback",
        add_help=False,  # --help is the load tester's own
    )
    load_.add_argument("rest", nargs=argparse.REMAINDER)
    load_.set_defaults(run=load)

    bundle = commands.add_parser(
        "ea-bundle",
        help="the DLL, include and example EA in one zip",
        description=ea_bundle.__doc__,
    )
    bundle.set_defaults(run=ea_bundle)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    top = parser()
    args, unknown = top.parse_known_args(argv)
    if args.command == "load":  # everything after `load` is the load tester's
        args.rest = [*unknown, *args.rest]
    elif unknown:
        top.error(f"unrecognized arguments: {' '.join(unknown)}")
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
