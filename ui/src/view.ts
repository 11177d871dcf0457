// The run's page: a fixed list of slots, each rebuilt only when what it shows changed (so polling does not
// reset a table's sort, a JSON tree's open nodes, an image already loaded, or the focus on a button).
import { asText, h, humanBytes, humanDuration, relativeTime, stripAnsi } from "./dom";
import { highlightPython } from "./highlight";
import { jsonTree } from "./json-tree";
import { type OutputContext, renderOutput } from "./outputs";
import { type FileInfo, LIVE_STATUSES, type Output, type RunResult } from "./types";

export interface ViewState {
  code?: string;
  codePartial?: boolean;
  toolName?: string;
  result?: RunResult;
  /** The call failed without a RunResult (a tool error's text, or the host's cancel of the call). */
  callError?: string;
  pollError?: string;
  actionError?: string;
  cancelling?: boolean;
  polling?: boolean;
}

export interface ViewActions {
  cancel(): void;
  download(file: FileInfo, button: HTMLButtonElement, status: HTMLElement): void;
  outputContext(): OutputContext;
}

const SLOTS = ["header", "actions", "code", "stream", "stderr", "error", "json", "files", "container", "notes"] as const;
type Slot = (typeof SLOTS)[number];

const STATUS_LABEL: Record<string, string> = {
  ok: "completed",
  error: "failed",
  timeout: "timed out",
  timed_out: "timed out",
  running: "running",
  queued: "queued",
  cancelled: "cancelled",
  lost: "lost",
};

function statusClass(status: string): string {
  if (status === "ok" || status === "completed") return "ok";
  if (LIVE_STATUSES.has(status)) return "live";
  if (status === "cancelled") return "muted";
  return "bad";
}

export class RunView {
  private readonly slots = new Map<Slot, { el: HTMLElement; key: string | null }>();
  private readonly outputCache = new Map<string, HTMLElement>();
  private readonly root: HTMLElement;
  private readonly actions: ViewActions;

  constructor(root: HTMLElement, actions: ViewActions) {
    this.root = root;
    this.actions = actions;
    root.replaceChildren();
    for (const name of SLOTS) {
      const el = h("div", { class: `slot slot-${name}` });
      el.hidden = true;
      this.slots.set(name, { el, key: null });
      root.append(el);
    }
  }

  private put(name: Slot, key: string, build: () => (Node | null)[] | Node | null) {
    const slot = this.slots.get(name)!;
    if (slot.key === key) return;
    slot.key = key;
    const built = build();
    const nodes = (Array.isArray(built) ? built : [built]).filter((n): n is Node => !!n);
    slot.el.replaceChildren(...nodes);
    slot.el.hidden = nodes.length === 0;
  }

  update(state: ViewState) {
    const r = state.result;
    this.root.dataset.status = r?.status ?? (state.callError ? "error" : "pending");
    this.put("header", JSON.stringify([r?.status, r?.execution_count, r?.duration_ms, r?.elapsed_s, r?.position, r?.waits_for, r?.run_id, r?.backend, state.callError, state.pollError, state.polling, state.toolName]), () =>
      this.header(state),
    );
    const live = !!r && LIVE_STATUSES.has(r.status ?? "") && !!r.run_id;
    this.put("actions", JSON.stringify([live, r?.run_id, state.cancelling, state.actionError]), () => {
      const nodes: Node[] = [];
      if (live) {
        const b = h("button", { type: "button", class: "btn danger", testid: "cancel-button" }, state.cancelling ? "Cancelling…" : "Cancel run");
        b.disabled = !!state.cancelling;
        b.addEventListener("click", () => this.actions.cancel());
        nodes.push(b);
      }
      if (state.actionError) nodes.push(h("span", { class: "warn", role: "alert" }, state.actionError));
      return nodes.length ? h("div", { class: "actions" }, nodes) : null;
    });
    this.put("code", JSON.stringify([state.code, r?.execution_count, state.codePartial]), () => {
      if (state.code === undefined) return null;
      const label = r?.execution_count ? `In [${r.execution_count}]` : "In [ ]";
      return h(
        "section",
        { class: "code-cell", "aria-label": "Code" },
        h("div", { class: "cell-label", "aria-hidden": "true" }, label),
        h("pre", { class: "code", testid: "code", tabindex: 0 }, h("code", { class: "language-python" }, highlightPython(state.code))),
      );
    });
    this.put("stream", JSON.stringify([r?.stdout, r?.outputs, r?.files?.map((f) => f.file_id), r?.result]), () => this.stream(r));
    this.put("stderr", JSON.stringify([r?.stderr]), () =>
      r?.stderr ? h("section", { class: "stderr-box", "aria-label": "Standard error" }, h("div", { class: "section-title" }, "stderr"), h("pre", { class: "stderr", testid: "stderr", tabindex: 0 }, stripAnsi(r.stderr))) : null,
    );
    this.put("error", JSON.stringify([r?.error, state.callError]), () => this.error(state));
    this.put("json", JSON.stringify([r?.json, r?.json_error]), () => this.json(r));
    this.put("files", JSON.stringify([r?.files, r?.more_files, r?.session_id]), () => this.files(r));
    const expires = r?.container?.expires_at ? relativeTime(r.container.expires_at) : "";
    this.put("container", JSON.stringify([r?.container, expires]), () => this.container(r, expires));
    this.put("notes", JSON.stringify([r?.warnings, r?.truncated, r?.packages, r?.text, r?.status]), () => this.notes(r));
    // Keep the newest output in view while a run prints.
    if (live) {
      const pres = this.slots.get("stream")!.el.querySelectorAll<HTMLElement>("pre.stdout");
      const last = pres[pres.length - 1];
      if (last) last.scrollTop = last.scrollHeight;
    }
  }

  private header(state: ViewState): Node {
    const r = state.result;
    const status = r?.status ?? (state.callError ? "error" : "waiting");
    const parts: (Node | string)[] = [];
    const badge = h("span", { class: `status status-${statusClass(status)}`, testid: "status", "data-status": status, role: "status" }, STATUS_LABEL[status] ?? status);
    parts.push(badge);
    const meta: string[] = [];
    if (r?.execution_count) meta.push(`cell [${r.execution_count}]`);
    if (r && LIVE_STATUSES.has(r.status ?? "")) {
      if (typeof r.elapsed_s === "number") meta.push(`${humanDuration(r.elapsed_s)} so far`);
      if (r.status === "queued" && typeof r.position === "number") meta.push(`position ${r.position} in the queue`);
      if (r.status === "queued" && r.waits_for) meta.push(`waits for ${r.waits_for}`);
    } else if (r && typeof r.duration_ms === "number" && r.duration_ms > 0) {
      meta.push(humanDuration(r.duration_ms / 1000));
    }
    if (r?.run_id) meta.push(r.run_id);
    if (r?.backend && r.backend !== "local") meta.push(r.backend);
    parts.push(h("span", { class: "meta", testid: "run-meta" }, meta.join(" · ")));
    if (state.polling) parts.push(h("span", { class: "spinner", "aria-hidden": "true" }));
    const header = h("header", { class: "run-header" }, parts);
    if (state.pollError) {
      return h("div", {}, header, h("p", { class: "warn", role: "alert", testid: "poll-error" }, `Could not refresh the run: ${state.pollError}`));
    }
    return header;
  }

  private outputNode(out: Output, index: number): HTMLElement {
    const key = `${index}:${JSON.stringify(out)}`;
    let el = this.outputCache.get(key);
    if (!el) {
      el = renderOutput(out, index, this.actions.outputContext());
      this.outputCache.set(key, el);
    }
    return el;
  }

  private stream(r: RunResult | undefined): Node | null {
    if (!r) return null;
    const stdout = r.stdout ?? "";
    const outputs = Array.isArray(r.outputs) ? r.outputs : [];
    const nodes: Node[] = [];
    const text = (s: string) => {
      if (s) nodes.push(h("pre", { class: "stdout", testid: "stdout", tabindex: 0 }, stripAnsi(s)));
    };
    let cursor = 0;
    const after: [Output, number][] = [];
    outputs.forEach((out, i) => {
      const at = out.stdout_at;
      if (typeof at === "number" && at >= 0 && at <= stdout.length) {
        if (at > cursor) {
          text(stdout.slice(cursor, at));
          cursor = at;
        }
        nodes.push(this.outputNode(out, i));
      } else after.push([out, i]);
    });
    text(stdout.slice(cursor));
    for (const [out, i] of after) nodes.push(this.outputNode(out, i));
    const hasResultOutput = outputs.some((o) => o.kind === "result");
    if (r.result !== null && r.result !== undefined && r.result !== "" && !hasResultOutput) {
      nodes.push(h("figure", { class: "output output-result", testid: "result" }, h("span", { class: "out-label", "aria-hidden": "true" }, "Out"), h("pre", { class: "plain" }, stripAnsi(r.result))));
    }
    // Drop cached nodes no longer shown (a new result replaced them).
    const shown = new Set(nodes);
    for (const [k, el] of this.outputCache) if (!shown.has(el)) this.outputCache.delete(k);
    if (!nodes.length) return null;
    return h("section", { class: "stream", testid: "outputs", "aria-label": "Output" }, nodes);
  }

  private error(state: ViewState): Node | null {
    const e = state.result?.error;
    if (!e && !state.callError) return null;
    const box = h("section", { class: "error-box", testid: "error", role: "alert" });
    if (e) {
      box.append(h("div", { class: "error-title", testid: "error-title" }, h("strong", {}, e.type || "Error"), e.message ? `: ${stripAnsi(e.message)}` : ""));
      if (e.traceback) box.append(h("pre", { class: "traceback", testid: "traceback", tabindex: 0 }, stripAnsi(e.traceback)));
    } else if (state.callError) {
      box.append(h("pre", { class: "traceback", testid: "call-error", tabindex: 0 }, state.callError));
    }
    return box;
  }

  private json(r: RunResult | undefined): Node | null {
    if (!r || ((r.json === null || r.json === undefined) && !r.json_error)) return null;
    const box = h("section", { class: "json-box", testid: "json", "aria-label": "JSON result" });
    const ok = !r.json_error;
    box.append(
      h("div", { class: "section-title" }, "JSON ", h("span", { class: `schema ${ok ? "schema-ok" : "schema-bad"}`, testid: "json-status" }, ok ? "✓ matches the schema" : "✗ does not match the schema")),
    );
    if (r.json_error) {
      box.append(h("p", { class: "warn" }, r.json_error.message));
      const v = r.json_error.violations ?? [];
      if (v.length) box.append(h("ul", { class: "violations", testid: "json-violations" }, v.map((x) => h("li", {}, h("code", {}, x.path), " ", x.message))));
    }
    if (r.json !== null && r.json !== undefined) box.append(jsonTree(r.json));
    return box;
  }

  private files(r: RunResult | undefined): Node | null {
    const files = r?.files ?? [];
    if (!files.length && !r?.more_files) return null;
    const list = h("ul", { class: "files", testid: "files" });
    for (const f of files) {
      const status = h("span", { class: "file-status", "aria-live": "polite" });
      const button = h("button", { type: "button", class: "btn small", testid: "download-button", "data-file-id": f.file_id, "aria-label": `Download ${f.name}` }, "Download");
      button.addEventListener("click", () => this.actions.download(f, button, status));
      list.append(
        h(
          "li",
          { class: "file", testid: "file", "data-file-id": f.file_id },
          h("span", { class: "file-name", title: f.path ?? f.name }, f.path ?? f.name),
          h("span", { class: "file-meta" }, `${humanBytes(f.bytes)} · ${f.mime_type}`),
          button,
          status,
        ),
      );
    }
    const box = h("section", { class: "files-box", "aria-label": "Files" }, h("div", { class: "section-title" }, `Files (${files.length})`), list);
    if (r?.more_files) {
      box.append(h("p", { class: "muted", testid: "more-files" }, `${r.more_files.count} more (${humanBytes(r.more_files.bytes)}) not listed. ${r.more_files.hint ?? ""}`));
    }
    return box;
  }

  private container(r: RunResult | undefined, expires: string): Node | null {
    const c = r?.container;
    if (!c) return null;
    const nodes: Node[] = [];
    if (c.state_lost) {
      nodes.push(h("p", { class: "warn", testid: "state-lost", role: "note" }, "⚠ The session's variables were lost: this run started in a new container (files made earlier are still downloadable)."));
    }
    const sr = c.state_restored;
    if (sr) {
      const restored = sr.restored ?? [];
      const skipped = sr.skipped ?? [];
      const box = h("div", { class: "restored", testid: "state-restored" });
      box.append(
        h("p", {}, `Variables restored${typeof sr.from_run === "number" ? ` from run [${sr.from_run}]` : ""}: `, restored.length ? h("code", {}, restored.join(", ")) : "none", typeof sr.seconds === "number" && sr.seconds > 0 ? ` (${humanDuration(sr.seconds)})` : ""),
      );
      if (skipped.length) {
        box.append(h("p", {}, "Not restored:"), h("ul", { class: "skipped" }, skipped.map((s) => h("li", {}, h("code", {}, s.name), ` — ${s.reason}`))));
      }
      nodes.push(box);
    }
    const line: string[] = [];
    if (c.id) line.push(`container ${c.id}`);
    if (expires) line.push(`expires ${expires}`);
    if (c.isolation && c.isolation !== "bubblewrap") line.push(`isolation: ${c.isolation}`);
    if (line.length) nodes.push(h("p", { class: "muted container-line", testid: "container", title: c.expires_at ?? "" }, line.join(" · ")));
    return nodes.length ? h("section", { class: "container-box", "aria-label": "Container" }, nodes) : null;
  }

  private notes(r: RunResult | undefined): Node | null {
    if (!r) return null;
    const nodes: Node[] = [];
    if (r.text) nodes.push(h("section", { class: "model-text" }, h("div", { class: "section-title" }, "Model text"), h("pre", { class: "plain" }, r.text)));
    if (r.packages && (r.packages.distributions?.length || r.packages.requirements?.length)) {
      const d = r.packages.distributions ?? [];
      nodes.push(h("p", { class: "muted", testid: "packages" }, `Packages: ${d.length ? d.map((x) => `${x.name} ${x.version}`).join(", ") : (r.packages.requirements ?? []).join(", ")}${r.packages.reused ? " (reused)" : typeof r.packages.seconds === "number" ? ` (installed in ${humanDuration(r.packages.seconds)})` : ""}`));
    }
    if (r.truncated) nodes.push(h("p", { class: "warn", testid: "truncated" }, "Output was truncated to fit the result budget."));
    // While the view polls by itself, the server's hints to call get_run again are not for the person.
    const live = LIVE_STATUSES.has(r.status ?? "") && !!r.run_id;
    const w = (r.warnings ?? []).filter((x) => !(live && /\bget_run\(/.test(asText(x))));
    if (w.length) nodes.push(h("ul", { class: "warnings", testid: "warnings" }, w.map((x) => h("li", { class: "warn" }, asText(x)))));
    return nodes.length ? h("section", { class: "notes" }, nodes) : null;
  }
}
