#!/usr/bin/env bash
# Run the hub as a developer or a first-time user would: install it into .venv if needed, make the
# self-signed development certificate, start a demo feed of four fake EAs, and serve
# `hypercorn --config hub.toml mt5hub:app` on ws://localhost:8000 and wss://localhost:8443.
# Open http://localhost:8000/ . Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/hypercorn || ! -x .venv/bin/mt5hub ]]; then  # the tested tree, then the hub
  python3 -m venv .venv
  .venv/bin/pip install -q --require-hashes -r requirements.lock
  .venv/bin/pip install -q --no-deps -e .
fi
bash scripts/make_dev_cert.sh
.venv/bin/python scripts/fake_dll.py demo --wait &
feed=$!
trap 'kill $feed 2>/dev/null || true' EXIT
.venv/bin/hypercorn --config hub.toml mt5hub:app
