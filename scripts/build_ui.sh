#!/usr/bin/env bash
# Builds the MCP App view (ui/) into the one self-contained HTML file the server serves as its ui:// resource,
# server/code_interpreter_mcp/app/static/run_view.html, and the browser tests' host page
# (tests/browser/host/dist/host.html, not committed).
#   bash scripts/build_ui.sh            # npm ci (npm install without a lock), build, copy into place
#   bash scripts/build_ui.sh --check    # build into a temp dir; exit 1 when the committed run_view.html differs
#   bash scripts/build_ui.sh --no-host  # the view only
# The build is deterministic: the same sources and lock give the same bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
TARGET="$ROOT/server/code_interpreter_mcp/app/static/run_view.html"
HOST_DIR="$ROOT/tests/browser/host/dist"

check=0
host=1
for arg in "$@"; do
  case "$arg" in
    --check) check=1 ;;
    --no-host) host=0 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "build_ui: unknown option $arg (try --check, --no-host)" >&2; exit 2 ;;
  esac
done

if ! command -v npm >/dev/null 2>&1; then
  echo "build_ui: npm (Node.js 20+) is needed to build ui/; install Node.js first" >&2
  exit 2
fi

cd "$ROOT/ui"
# Dependencies: exactly the lock's (npm ci), skipped when node_modules was installed from this very lock already
# (UI_NPM_CI=1 forces it); npm install when there is no lock yet (it writes one).
if [ -f package-lock.json ]; then
  if [ "${UI_NPM_CI:-0}" = 1 ] || [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
  fi
else
  npm install --no-audit --no-fund --loglevel=error
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
UI_OUT_DIR="$tmp/view" npm run --silent build
built="$tmp/view/run_view.html"
[ -s "$built" ] || { echo "build_ui: the build wrote no run_view.html" >&2; exit 1; }

if [ "$check" = 1 ]; then
  if [ ! -f "$TARGET" ]; then
    echo "build_ui --check: ${TARGET#"$ROOT"/} is missing; run: bash scripts/build_ui.sh" >&2
    exit 1
  fi
  if ! cmp -s "$built" "$TARGET"; then
    echo "build_ui --check: ${TARGET#"$ROOT"/} differs from a fresh build of ui/ ($(wc -c <"$TARGET") vs $(wc -c <"$built") bytes); run: bash scripts/build_ui.sh" >&2
    exit 1
  fi
  echo "build_ui --check: ${TARGET#"$ROOT"/} is up to date ($(wc -c <"$built") bytes)"
  exit 0
fi

mkdir -p "$(dirname "$TARGET")"
cp "$built" "$TARGET"
echo "build_ui: wrote ${TARGET#"$ROOT"/} ($(wc -c <"$TARGET") bytes)"
if [ "$host" = 1 ]; then
  HOST_OUT_DIR="$HOST_DIR" npm run --silent build:host
  echo "build_ui: wrote ${HOST_DIR#"$ROOT"/}/host.html"
fi
