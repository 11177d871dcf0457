// Everything the view asks the server for, through the host (the ext-apps App bridge): a file's bytes
// (resources/read, or download_file a part at a time for big files), an image file as a data: URL, and saving
// bytes as a download (the host's ui/download-file when it offers it, else a Blob and <a download>).
import type { App } from "@modelcontextprotocol/ext-apps";
import { base64ToBytes, bytesToBase64 } from "./dom";
import type { FileInfo } from "./types";

/** Files up to this size are read whole with resources/read; bigger ones page through download_file. */
export const DIRECT_READ_MAX = 4 * 1024 * 1024;
/** What each download_file call asks for (the server may give less: its result budget). */
export const CHUNK_BYTES = 64 * 1024;

type Block = { type: string; [k: string]: unknown };

export interface FileBytes {
  bytes: Uint8Array<ArrayBuffer>;
  base64: string;
}

function textOf(result: { content?: unknown }): string {
  const blocks = Array.isArray(result.content) ? (result.content as Block[]) : [];
  return blocks
    .filter((b) => b.type === "text")
    .map((b) => String(b.text ?? ""))
    .join("\n");
}

function fromContents(c: Record<string, unknown> | undefined): FileBytes | null {
  if (!c) return null;
  if (typeof c.blob === "string") return { bytes: base64ToBytes(c.blob), base64: c.blob };
  if (typeof c.text === "string") {
    const bytes = new TextEncoder().encode(c.text);
    return { bytes, base64: bytesToBase64(bytes) };
  }
  return null;
}

export async function readResource(app: App, uri: string): Promise<Record<string, unknown>> {
  const res = await app.readServerResource({ uri });
  const first = (res.contents ?? [])[0] as Record<string, unknown> | undefined;
  if (!first) throw new Error(`resources/read of ${uri} returned nothing`);
  return first;
}

/** The file's exact bytes. `onProgress` gets the fraction done while paging. */
export async function fileBytes(
  app: App,
  file: FileInfo,
  sessionId: string | undefined,
  onProgress?: (fraction: number) => void,
): Promise<FileBytes> {
  if (file.bytes <= DIRECT_READ_MAX) {
    try {
      const got = fromContents(await readResource(app, file.uri));
      if (got) return got;
    } catch (err) {
      console.warn("resources/read failed, paging through download_file instead", err);
    }
  }
  return pagedDownload(app, file, sessionId, onProgress);
}

async function pagedDownload(
  app: App,
  file: FileInfo,
  sessionId: string | undefined,
  onProgress?: (fraction: number) => void,
): Promise<FileBytes> {
  const parts: Uint8Array[] = [];
  let offset = 0;
  let total = 0;
  for (;;) {
    const args: Record<string, unknown> = { file: file.file_id, offset, max_bytes: CHUNK_BYTES };
    if (sessionId) args.session_id = sessionId;
    const res = await app.callServerTool({ name: "download_file", arguments: args });
    if (res.isError) throw new Error(textOf(res) || "download_file failed");
    const sc = (res.structuredContent ?? {}) as { inline?: boolean; next_offset?: number | null; preview?: boolean; hint?: string };
    const blocks = (res.content ?? []) as Block[];
    let part: Uint8Array | null = null;
    for (const b of blocks) {
      if (b.type === "resource") part = fromContents(b.resource as Record<string, unknown>)?.bytes ?? null;
      else if (b.type === "image" && typeof b.data === "string" && !sc.preview) part = base64ToBytes(b.data);
      if (part) break;
    }
    if (!sc.inline || !part) throw new Error(sc.hint || "download_file returned no bytes");
    parts.push(part);
    total += part.length;
    onProgress?.(file.bytes ? Math.min(1, total / file.bytes) : 1);
    const next = sc.next_offset;
    if (next === null || next === undefined) break;
    if (next <= offset) throw new Error(`download_file did not advance past byte ${offset}`);
    offset = next;
  }
  const bytes = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    bytes.set(p, at);
    at += p.length;
  }
  return { bytes, base64: bytesToBase64(bytes) };
}

const imageCache = new Map<string, Promise<string>>();

/** An image file (by its FileInfo, or only its file_id) as a data: URL for an <img>. */
export function imageUrl(app: App, fileId: string, file: FileInfo | undefined, sessionId: string | undefined): Promise<string> {
  const key = `${sessionId ?? ""}/${fileId}`;
  let p = imageCache.get(key);
  if (!p) {
    p = loadImage(app, fileId, file, sessionId);
    p.catch(() => imageCache.delete(key));
    imageCache.set(key, p);
  }
  return p;
}

function dataUrl(mime: string, c: Record<string, unknown>): string | null {
  if (typeof c.blob === "string") return `data:${mime};base64,${c.blob.replace(/\s+/g, "")}`;
  if (typeof c.text === "string") return `data:${mime};charset=utf-8,${encodeURIComponent(c.text)}`;
  return null;
}

async function loadImage(app: App, fileId: string, file: FileInfo | undefined, sessionId: string | undefined): Promise<string> {
  if (file) {
    try {
      const c = await readResource(app, file.uri);
      const url = dataUrl(String(c.mimeType ?? file.mime_type), c);
      if (url) return url;
    } catch (err) {
      console.warn("resources/read of an image failed, trying download_file", err);
    }
  }
  const args: Record<string, unknown> = { file: fileId };
  if (sessionId) args.session_id = sessionId;
  const res = await app.callServerTool({ name: "download_file", arguments: args });
  if (res.isError) throw new Error(textOf(res) || "download_file failed");
  for (const b of (res.content ?? []) as Block[]) {
    if (b.type === "image" && typeof b.data === "string") return `data:${String(b.mimeType)};base64,${b.data}`;
    if (b.type === "resource") {
      const r = b.resource as Record<string, unknown>;
      const url = dataUrl(String(r.mimeType ?? file?.mime_type ?? "image/png"), r);
      if (url) return url;
    }
  }
  throw new Error("the image's bytes did not come back");
}

/** Save bytes as a download: the host's download API when it has one, else a Blob and <a download>. */
export async function saveBytes(app: App, file: FileInfo, data: FileBytes): Promise<"host" | "browser"> {
  if (app.getHostCapabilities()?.downloadFile) {
    try {
      const res = await app.downloadFile({
        contents: [{ type: "resource", resource: { uri: file.uri, mimeType: file.mime_type, blob: data.base64 } }],
      });
      if (!res.isError) return "host";
      throw new Error("The host refused or cancelled the download.");
    } catch (err) {
      if (err instanceof Error && err.message.startsWith("The host refused")) throw err;
      console.warn("ui/download-file failed, saving through a Blob instead", err);
    }
  }
  const url = URL.createObjectURL(new Blob([data.bytes], { type: file.mime_type || "application/octet-stream" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = file.name;
  a.rel = "noopener";
  a.style.display = "none";
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return "browser";
}

export { textOf };
