// The MCP App view of one code-interpreter run: takes run_code's (or get_run's) input and result from the host,
// polls get_run while the run is going, cancels it on request, and fetches files through the host bridge.
import {
  App,
  applyDocumentTheme,
  applyHostStyleVariables,
  type McpUiHostContext,
  PostMessageTransport,
} from "@modelcontextprotocol/ext-apps";
import "./style.css";
import { fileBytes, saveBytes, textOf } from "./bridge";
import { humanBytes } from "./dom";
import type { OutputContext } from "./outputs";
import { type FileInfo, LIVE_STATUSES, type RunResult } from "./types";
import { RunView, type ViewState } from "./view";

/** get_run's wait per poll: the call returns at the run's end or after this many seconds. */
const POLL_WAIT_S = 2;
const MIN_POLL_GAP_MS = 750;
const MAX_POLL_FAILURES = 5;

const app = new App({ name: "code-interpreter-run-view", version: "0.1.0" }, {}, { autoResize: true });
const state: ViewState = {};
const root = document.getElementById("app")!;

const outputContext = (): OutputContext => ({
  app,
  files: new Map((state.result?.files ?? []).map((f) => [f.file_id, f])),
  sessionId: state.result?.session_id,
  openLink: (url) => {
    app.openLink({ url }).catch((err: unknown) => console.warn("openLink failed", err));
  },
});

const view = new RunView(root, { cancel, download, outputContext });
const render = () => view.update(state);

function isRunResult(value: unknown): value is RunResult {
  return !!value && typeof value === "object" && typeof (value as RunResult).status === "string";
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A tool result from the host or from our own calls. Returns false when it was not a RunResult. */
function accept(result: { structuredContent?: unknown; isError?: boolean; content?: unknown }): boolean {
  const sc = result.structuredContent;
  if (!isRunResult(sc)) {
    if (result.isError || !state.result) state.callError = textOf(result) || "The call returned no run result.";
    render();
    return false;
  }
  const current = state.result;
  // A late "running" for a run already final (a poll answered after the cancel's result) changes nothing.
  if (current && current.run_id && current.run_id === sc.run_id && !LIVE_STATUSES.has(current.status ?? "") && LIVE_STATUSES.has(sc.status ?? "")) {
    return true;
  }
  state.result = sc;
  state.callError = undefined;
  render();
  if (LIVE_STATUSES.has(sc.status ?? "") && sc.run_id) void pollLoop();
  return true;
}

let polling = false;
let stopped = false;

async function pollLoop() {
  if (polling) return;
  polling = true;
  state.polling = true;
  render();
  let failures = 0;
  try {
    while (!stopped) {
      const cur = state.result;
      if (!cur || !cur.run_id || !LIVE_STATUSES.has(cur.status ?? "")) break;
      const started = Date.now();
      const args: Record<string, unknown> = { run_id: cur.run_id, wait_s: POLL_WAIT_S };
      if (cur.session_id) args.session_id = cur.session_id;
      try {
        const res = await app.callServerTool({ name: "get_run", arguments: args });
        if (state.result?.run_id !== cur.run_id) continue;
        if (!isRunResult(res.structuredContent)) throw new Error(textOf(res) || "get_run returned no run result");
        failures = 0;
        state.pollError = undefined;
        accept(res);
      } catch (err) {
        failures++;
        state.pollError = err instanceof Error ? err.message : String(err);
        render();
        if (failures >= MAX_POLL_FAILURES) break;
        await sleep(1000 * failures);
      }
      const gap = Date.now() - started;
      if (gap < MIN_POLL_GAP_MS) await sleep(MIN_POLL_GAP_MS - gap);
    }
  } finally {
    polling = false;
    state.polling = false;
    render();
  }
}

async function cancel() {
  const cur = state.result;
  if (!cur?.run_id || state.cancelling) return;
  state.cancelling = true;
  state.actionError = undefined;
  render();
  try {
    const args: Record<string, unknown> = { run_id: cur.run_id };
    if (cur.session_id) args.session_id = cur.session_id;
    const res = await app.callServerTool({ name: "cancel_run", arguments: args });
    if (!isRunResult(res.structuredContent)) state.actionError = textOf(res) || "cancel_run returned no run result";
    else accept(res);
  } catch (err) {
    state.actionError = `Cancel failed: ${err instanceof Error ? err.message : String(err)}`;
  } finally {
    state.cancelling = false;
    render();
  }
}

const downloading = new Set<string>();

async function download(file: FileInfo, button: HTMLButtonElement, status: HTMLElement) {
  if (downloading.has(file.file_id)) return;
  downloading.add(file.file_id);
  button.disabled = true;
  status.textContent = "Reading…";
  status.className = "file-status";
  try {
    const data = await fileBytes(app, file, state.result?.session_id, (f) => {
      status.textContent = `Reading… ${Math.round(f * 100)}%`;
    });
    const how = await saveBytes(app, file, data);
    status.textContent = `Saved ${humanBytes(data.bytes.length)}${how === "host" ? " (through the host)" : ""}`;
    status.dataset.testid = "download-done";
  } catch (err) {
    status.textContent = `Download failed: ${err instanceof Error ? err.message : String(err)}`;
    status.className = "file-status warn";
    status.dataset.testid = "download-error";
  } finally {
    downloading.delete(file.file_id);
    button.disabled = false;
  }
}

function applyContext(ctx: McpUiHostContext | undefined) {
  if (!ctx) return;
  if (ctx.theme === "light" || ctx.theme === "dark") applyDocumentTheme(ctx.theme);
  const vars = ctx.styles?.variables;
  if (vars) applyHostStyleVariables(vars);
  const name = ctx.toolInfo?.tool?.name;
  if (name && name !== state.toolName) {
    state.toolName = name;
    render();
  }
}

app.ontoolinput = (params) => {
  const args = (params.arguments ?? {}) as Record<string, unknown>;
  if (typeof args.code === "string") {
    state.code = args.code;
    state.codePartial = false;
  }
  render();
};
app.ontoolinputpartial = (params) => {
  const args = (params.arguments ?? {}) as Record<string, unknown>;
  if (typeof args.code === "string" && !state.result) {
    state.code = args.code;
    state.codePartial = true;
    render();
  }
};
app.ontoolresult = (params) => {
  accept(params);
};
app.ontoolcancelled = (params) => {
  if (!state.result) {
    state.callError = `The call was cancelled${params.reason ? `: ${params.reason}` : "."}`;
    render();
  }
};
app.onhostcontextchanged = (ctx) => applyContext(ctx);
app.onteardown = async () => {
  stopped = true;
  return {};
};

// The relative expiry time ("in 19 min") moves on by itself.
setInterval(render, 30_000);

render();
app
  .connect(new PostMessageTransport(window.parent, window.parent))
  .then(() => applyContext(app.getHostContext()))
  .catch((err: unknown) => {
    state.callError = `Could not connect to the host: ${err instanceof Error ? err.message : String(err)}`;
    render();
  });
