#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian 12 machine, then run all of it:
# Debian's Chromium (dashboard tests), mingw-w64 and Wine (the DLL, built from source and run),
# Redis, and the Python packages in .venv. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t packages < scripts/system-packages.txt  # the Debian packages the tests use
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "installing ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# Exactly the tree the hub is tested on (requirements.lock, with hashes; see its header to
# regenerate it), then the hub itself.
.venv/bin/pip install -q --require-hashes -r requirements.lock
.venv/bin/pip install -q --no-deps -e .

.venv/bin/ruff check mt5hub scripts tests bench
.venv/bin/mypy
exec .venv/bin/pytest "$@"
