// A minimal MCP Apps host for the browser tests: a real MCP client (streamable HTTP to /mcp on this page's
// origin) that declares the MCP Apps extension, lists the tools, reads run_code's ui:// view, and shows each
// call in its own sandboxed iframe through the ext-apps AppBridge (which forwards the view's tools/call and
// resources/read to the server). The tests drive it through window.runCode / window.showResult.
//
// Query options: ?theme=dark, ?hostDownload=0 (no ui/download-file: the view saves through a Blob, so the frame
// gets allow-downloads), ?fallback=1 (when run_code carries no _meta.ui, load /view.html from this origin).
import {
  AppBridge,
  getToolUiResourceUri,
  type McpUiHostContext,
  PostMessageTransport,
  RESOURCE_MIME_TYPE,
} from "@modelcontextprotocol/ext-apps/app-bridge";
import { type CallToolResult, Client, StreamableHTTPClientTransport, type Tool } from "@modelcontextprotocol/client";

const params = new URLSearchParams(location.search);
let theme: "light" | "dark" = params.get("theme") === "dark" ? "dark" : "light";
const hostDownload = params.get("hostDownload") !== "0";
const allowFallback = params.get("fallback") === "1";

const log: string[] = [];
function note(...parts: unknown[]) {
  const line = parts.map((p) => (typeof p === "string" ? p : JSON.stringify(p))).join(" ");
  log.push(line);
  const el = document.getElementById("log");
  if (el) el.textContent += `${line}\n`;
}

interface HostInfo {
  tools: string[];
  viewUri: string | null;
  viewSource: "resource" | "fallback";
  viewMimeType: string | null;
  viewMeta: unknown;
  runCodeMeta: unknown;
  getRunMeta: unknown;
  serverCapabilities: unknown;
}

interface View {
  index: number;
  iframe: HTMLIFrameElement;
  bridge: AppBridge;
  initialized: Promise<void>;
}

const client = new Client(
  { name: "ci-test-host", version: "0.1.0" },
  { capabilities: { extensions: { "io.modelcontextprotocol/ui": { mimeTypes: [RESOURCE_MIME_TYPE] } } } },
);
const tools = new Map<string, Tool>();
let viewHtml = "";
const views: View[] = [];
const downloads: { name: string; bytes: number }[] = [];

function hostContext(tool: Tool | undefined): McpUiHostContext {
  return {
    theme,
    displayMode: "inline",
    availableDisplayModes: ["inline"],
    platform: "web",
    locale: "en-US",
    containerDimensions: { maxHeight: 4000 },
    ...(tool ? { toolInfo: { tool } } : {}),
  };
}

function saveInHost(name: string, bytes: Uint8Array<ArrayBuffer>, mime: string) {
  const url = URL.createObjectURL(new Blob([bytes], { type: mime }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  downloads.push({ name, bytes: bytes.length });
}

function decode(b64: string): Uint8Array<ArrayBuffer> {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

async function newView(toolName: string): Promise<View> {
  const tool = tools.get(toolName);
  const index = views.length;
  const iframe = document.createElement("iframe");
  iframe.className = "view";
  iframe.id = `view-${index}`;
  iframe.dataset.testid = "view-frame";
  iframe.title = `${toolName} view ${index}`;
  // Opaque origin, scripts only: as a chat host would (plus downloads when the host does not do them itself).
  iframe.setAttribute("sandbox", hostDownload ? "allow-scripts" : "allow-scripts allow-downloads");
  document.getElementById("views")!.append(iframe);

  const caps = client.getServerCapabilities();
  const bridge = new AppBridge(
    client,
    { name: "ci-test-host", version: "0.1.0" },
    {
      openLinks: {},
      serverTools: caps?.tools ?? {},
      serverResources: caps?.resources ?? {},
      logging: {},
      ...(hostDownload ? { downloadFile: {} } : {}),
    },
    { hostContext: hostContext(tool) },
  );
  bridge.onsizechange = ({ height }) => {
    if (height !== undefined) iframe.style.height = `${Math.ceil(height) + 2}px`;
  };
  bridge.onopenlink = async ({ url }) => {
    note("open-link", url);
    return {};
  };
  bridge.onloggingmessage = (p) => note("view-log", p);
  if (hostDownload) {
    bridge.ondownloadfile = async ({ contents }) => {
      for (const c of contents) {
        if (c.type !== "resource") return { isError: true };
        const r = c.resource as { uri: string; mimeType?: string; blob?: string; text?: string };
        const name = decodeURIComponent(r.uri.split("/").pop() || "download");
        const bytes = r.blob !== undefined ? decode(r.blob) : new TextEncoder().encode(r.text ?? "");
        saveInHost(name, bytes, r.mimeType ?? "application/octet-stream");
        note("download", name, bytes.length);
      }
      return {};
    };
  }
  const initialized = new Promise<void>((resolve) => {
    bridge.oninitialized = () => resolve();
  });
  await bridge.connect(new PostMessageTransport(iframe.contentWindow!, iframe.contentWindow!));
  iframe.srcdoc = viewHtml;
  const view = { index, iframe, bridge, initialized };
  views.push(view);
  return view;
}

async function setup(): Promise<HostInfo> {
  await client.connect(new StreamableHTTPClientTransport(new URL("/mcp", location.href)));
  note("connected", client.getServerVersion());
  const listed = await client.listTools();
  for (const t of listed.tools) tools.set(t.name, t);
  const runCode = tools.get("run_code");
  let uri: string | null = null;
  try {
    uri = runCode ? (getToolUiResourceUri(runCode) ?? null) : null;
  } catch (err) {
    note("bad resourceUri", String(err));
  }
  const info: HostInfo = {
    tools: [...tools.keys()],
    viewUri: uri,
    viewSource: "resource",
    viewMimeType: null,
    viewMeta: null,
    runCodeMeta: runCode?._meta ?? null,
    getRunMeta: tools.get("get_run")?._meta ?? null,
    serverCapabilities: client.getServerCapabilities() ?? null,
  };
  if (uri) {
    const res = await client.readResource({ uri });
    const c = res.contents[0] as { mimeType?: string; text?: string; blob?: string; _meta?: unknown };
    info.viewMimeType = c.mimeType ?? null;
    info.viewMeta = c._meta ?? null;
    viewHtml = c.text ?? new TextDecoder().decode(decode(c.blob ?? ""));
  } else if (allowFallback) {
    info.viewSource = "fallback";
    viewHtml = await (await fetch("/view.html")).text();
    note("run_code has no _meta.ui: using /view.html");
  } else {
    throw new Error("run_code carries no _meta.ui.resourceUri");
  }
  return info;
}

const ready = setup();

/** Call a tool as the model would, with a view for it: input first, the result when it comes. */
async function callWithView(name: string, args: Record<string, unknown>): Promise<{ view: number; result: CallToolResult }> {
  await ready;
  const view = await newView(name);
  await view.initialized;
  await view.bridge.sendToolInput({ arguments: args });
  let result: CallToolResult;
  try {
    result = (await client.callTool({ name, arguments: args })) as CallToolResult;
  } catch (err) {
    await view.bridge.sendToolCancelled({ reason: err instanceof Error ? err.message : String(err) });
    throw err;
  }
  await view.bridge.sendToolResult(result);
  return { view: view.index, result };
}

/** A view fed a given input and result (no tool call of ours; the view's own calls still reach the server). */
async function showResult(args: Record<string, unknown>, result: CallToolResult, toolName = "run_code"): Promise<number> {
  await ready;
  const view = await newView(toolName);
  await view.initialized;
  await view.bridge.sendToolInput({ arguments: args });
  await view.bridge.sendToolResult(result);
  return view.index;
}

async function setTheme(next: "light" | "dark") {
  theme = next;
  document.body.classList.toggle("dark", next === "dark");
  for (const v of views) await v.bridge.sendHostContextChange({ theme: next });
}

document.body.classList.toggle("dark", theme === "dark");

Object.assign(window, {
  hostReady: ready,
  hostLog: log,
  hostDownloads: downloads,
  runCode: (args: Record<string, unknown>) => callWithView("run_code", args),
  callWithView,
  showResult,
  setTheme,
  callTool: async (name: string, args: Record<string, unknown>) => {
    await ready;
    return client.callTool({ name, arguments: args });
  },
});
