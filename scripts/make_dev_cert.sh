#!/usr/bin/env bash
# Make the self-signed development certificate (local.key, local.crt) that hub.toml points at,
# unless it exists. Production: use a real certificate (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -f local.crt && -f local.key ]]; then exit 0; fi
openssl req -x509 -newkey rsa:2048 -sha256 -days 365 -nodes \
  -keyout local.key -out local.crt -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" 2>/dev/null
echo "made local.crt and local.key (self-signed, for localhost)"
