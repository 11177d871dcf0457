// One item of `outputs`: the richest of its mime types, a DataFrame's table, a figure's image (inline or from
// its file) with the chart's caption.
import type { App } from "@modelcontextprotocol/ext-apps";
import { imageUrl } from "./bridge";
import { asText, h, stripAnsi } from "./dom";
import { jsonTree } from "./json-tree";
import { renderMarkdown } from "./markdown";
import { renderTable } from "./table";
import type { FileInfo, Output } from "./types";

export interface OutputContext {
  app: App;
  files: Map<string, FileInfo>;
  sessionId?: string;
  openLink: (url: string) => void;
}

const RASTER = ["image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"];

function chartCaption(chart: Record<string, unknown> | null | undefined): HTMLElement | null {
  if (!chart || typeof chart !== "object") return null;
  const title = typeof chart.title === "string" && chart.title ? chart.title : "";
  let type = typeof chart.type === "string" ? chart.type : "";
  if (!title && Array.isArray(chart.axes)) {
    const first = chart.axes.find((a) => a && typeof a === "object" && (a as Record<string, unknown>).title) as
      | Record<string, unknown>
      | undefined;
    if (first) return h("figcaption", { class: "chart-caption", testid: "chart-caption" }, String(first.title), type ? ` · ${type}` : "");
  }
  if (!title && !type) return null;
  if (!type && Array.isArray(chart.axes)) type = `${chart.axes.length} axes`;
  return h("figcaption", { class: "chart-caption", testid: "chart-caption" }, title, title && type ? " · " : "", type);
}

export function zoomable(img: HTMLImageElement, alt: string): HTMLElement {
  img.alt = alt;
  img.dataset.testid = "image";
  const button = h("button", { type: "button", class: "zoom-btn", title: "Show full size", "aria-label": `Show full size: ${alt}` }, img);
  button.addEventListener("click", () => openZoom(img.src, alt, button));
  return button;
}

function openZoom(src: string, alt: string, opener: HTMLElement) {
  const big = h("img", { src, alt, class: "zoom-img", testid: "zoom-image" });
  const close = h("button", { type: "button", class: "btn zoom-close", testid: "zoom-close", "aria-label": "Close" }, "✕");
  const overlay = h("div", { class: "zoom-overlay", role: "dialog", "aria-modal": "true", "aria-label": alt, testid: "zoom-overlay" }, close, big);
  const done = () => {
    overlay.remove();
    document.removeEventListener("keydown", onKey, true);
    opener.focus();
  };
  const onKey = (ev: KeyboardEvent) => {
    if (ev.key === "Escape") {
      ev.preventDefault();
      done();
    } else if (ev.key === "Tab") {
      ev.preventDefault(); // one control in the dialog: focus stays on it
      close.focus();
    }
  };
  overlay.addEventListener("click", (ev) => {
    if (ev.target === overlay || ev.target === big) done();
  });
  close.addEventListener("click", done);
  document.addEventListener("keydown", onKey, true);
  document.body.append(overlay);
  close.focus();
}

function svgUrl(svg: string): string {
  return `data:image/svg+xml;charset=utf-8,${encodeURIComponent(svg)}`;
}

function rasterUrl(mime: string, value: unknown): string {
  const s = asText(value).replace(/\s+/g, "");
  return s.startsWith("data:") ? s : `data:${mime};base64,${s}`;
}

function htmlFrame(html: string): HTMLElement {
  // No scripts, no same origin: the markup can only draw. Its height is a guess the user can drag.
  const frame = h("iframe", {
    sandbox: "",
    class: "html-frame",
    title: "HTML output",
    testid: "html-output",
    referrerpolicy: "no-referrer",
    loading: "lazy",
  });
  const lines = (html.match(/<tr|<br|<p|<li|<h\d|\n/gi) ?? []).length;
  frame.style.height = `${Math.min(480, Math.max(80, 24 * lines + 40))}px`;
  frame.srcdoc = `<!doctype html><meta charset="utf-8"><style>body{font:13px/1.45 system-ui,sans-serif;margin:8px;color-scheme:light dark}table{border-collapse:collapse}td,th{border:1px solid #8884;padding:2px 6px;text-align:right}</style>${html}`;
  return frame;
}

/** The element for one output. */
export function renderOutput(out: Output, index: number, ctx: OutputContext): HTMLElement {
  const data = (out.data && typeof out.data === "object" ? out.data : {}) as Record<string, unknown>;
  const kind = out.kind === "result" ? "result" : "display";
  const item = h("figure", { class: `output output-${kind}`, testid: "output", "data-index": index, "data-kind": kind });
  if (kind === "result") item.append(h("span", { class: "out-label", "aria-hidden": "true" }, "Out"));
  const plain = stripAnsi(asText(data["text/plain"]));
  const alt = plain && plain.length < 200 ? plain : `output ${index + 1}`;
  const caption = chartCaption(out.chart);

  if (out.table && typeof out.table === "object" && Array.isArray(out.table.rows)) {
    item.append(renderTable(out.table));
    return item;
  }
  const mimes = Object.keys(data);
  const raster = RASTER.find((m) => m in data);
  if ("text/html" in data) {
    item.append(htmlFrame(asText(data["text/html"])));
  } else if ("image/svg+xml" in data) {
    item.append(zoomable(h("img", { src: svgUrl(asText(data["image/svg+xml"])), class: "output-img" }), alt));
  } else if (raster) {
    item.append(zoomable(h("img", { src: rasterUrl(raster, data[raster]), class: "output-img" }), alt));
  } else if (out.file_id && isImageFile(ctx.files.get(out.file_id), out)) {
    const file = ctx.files.get(out.file_id);
    const img = h("img", { class: "output-img loading" });
    const holder = h("div", { class: "img-holder", testid: "image-loading" }, "Loading image…");
    item.append(holder);
    imageUrl(ctx.app, out.file_id, file, ctx.sessionId).then(
      (url) => {
        img.src = url;
        img.classList.remove("loading");
        holder.replaceWith(zoomable(img, alt));
      },
      (err: unknown) => {
        holder.textContent = `Could not load the image ${file?.name ?? out.path ?? out.file_id}: ${err instanceof Error ? err.message : String(err)}`;
        holder.classList.add("warn");
        holder.dataset.testid = "image-error";
      },
    );
  } else if ("text/markdown" in data) {
    item.append(renderMarkdown(asText(data["text/markdown"]), ctx.openLink));
  } else if ("application/json" in data) {
    item.append(jsonTree(data["application/json"]));
  } else if ("text/latex" in data) {
    item.append(h("pre", { class: "latex", testid: "latex" }, asText(data["text/latex"])));
  } else if ("text/plain" in data || mimes.length === 0) {
    item.append(h("pre", { class: "plain" }, plain));
  } else {
    const mime = mimes[0];
    item.append(h("pre", { class: "plain" }, `[${mime}] ${asText(data[mime]).slice(0, 2000)}`));
  }
  if (caption) item.append(caption);
  return item;
}

function isImageFile(file: FileInfo | undefined, out: Output): boolean {
  if (file) return file.mime_type.startsWith("image/");
  return /\.(png|jpe?g|gif|webp|svg|bmp)$/i.test(out.path ?? "") || !!out.chart;
}
