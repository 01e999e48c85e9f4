#!/usr/bin/env bash
# Make the self-signed development certificate (local.key, local.crt) that hub.toml points at,
# unless it exists, and print its SHA-256 fingerprint: an EA pins it (Mt5HubOpenPinned, the
# "Certificate SHA-256" input) to trust exactly this certificate. Production: use a real
# certificate (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -f local.crt || ! -f local.key ]]; then
  openssl req -x509 -newkey rsa:2048 -sha256 -days 365 -nodes \
    -keyout local.key -out local.crt -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" 2>/dev/null
  echo "made local.crt and local.key (self-signed, for localhost)"
fi
openssl x509 -in local.crt -noout -fingerprint -sha256 | sed 's/^.*=/local.crt SHA-256 fingerprint: /'
