#!/usr/bin/env bash
# Installs what code-interpreter-mcp needs on a fresh Debian/Ubuntu machine: bubblewrap (the local sandbox)
# when missing, then this package with the given extras into the active Python (a venv if one is active).
#   bash scripts/bootstrap.sh                  # the server + the sandbox's analysis libraries
#   bash scripts/bootstrap.sh analysis,test    # ... and the test tools
set -euo pipefail
extras="${1:-analysis}"
cd "$(dirname "$0")/.."
if ! command -v bwrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq bubblewrap
  else
    echo "bootstrap: install bubblewrap with your package manager (no apt-get here)" >&2
  fi
fi
PY="${PYTHON:-python3}"
"$PY" -m pip install -q -e ".[${extras}]"
