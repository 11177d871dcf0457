// A tiny markdown renderer that builds DOM nodes (text through textContent), so no input can become markup:
// headings, paragraphs, fenced and indented code, lists, block quotes, rules, tables of pipes; inline code,
// bold, italics, strike-through and links (http, https and mailto only, opened through the host).
import { h } from "./dom";

export type LinkOpener = (url: string) => void;

const SAFE_URL = /^(https?:|mailto:)/i;

export function renderMarkdown(src: string, openLink: LinkOpener): HTMLElement {
  const root = h("div", { class: "markdown", testid: "markdown" });
  const lines = src.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  const para: string[] = [];
  const flush = () => {
    if (para.length) root.append(h("p", {}, inline(para.join(" "), openLink)));
    para.length = 0;
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = /^\s*(```+|~~~+)\s*([\w+-]*)\s*$/.exec(line);
    if (fence) {
      flush();
      const body: string[] = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i++;
      root.append(h("pre", { class: "md-code" }, h("code", {}, body.join("\n"))));
      continue;
    }
    const heading = /^(#{1,6})\s+(.*?)\s*#*\s*$/.exec(line);
    if (heading) {
      flush();
      const level = Math.min(6, heading[1].length + 2) as 3 | 4 | 5 | 6; // h3.. inside the view
      root.append(h(`h${level}`, {}, inline(heading[2], openLink)));
      i++;
      continue;
    }
    if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flush();
      root.append(h("hr"));
      i++;
      continue;
    }
    if (/^\s*>/.test(line)) {
      flush();
      const body: string[] = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) body.push(lines[i++].replace(/^\s*>\s?/, ""));
      const quote = h("blockquote");
      quote.append(...renderMarkdown(body.join("\n"), openLink).childNodes);
      root.append(quote);
      continue;
    }
    const item = /^(\s*)([-*+]|\d+[.)])\s+(.*)$/.exec(line);
    if (item) {
      flush();
      const ordered = /\d/.test(item[2]);
      const list = h(ordered ? "ol" : "ul");
      while (i < lines.length) {
        const m = /^(\s*)([-*+]|\d+[.)])\s+(.*)$/.exec(lines[i]);
        if (!m || /\d/.test(m[2]) !== ordered) break;
        list.append(h("li", {}, inline(m[3], openLink)));
        i++;
      }
      root.append(list);
      continue;
    }
    if (/^\s*\|.*\|\s*$/.test(line) && i + 1 < lines.length && /^\s*\|?\s*:?-{2,}/.test(lines[i + 1])) {
      flush();
      const split = (l: string) => l.trim().replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
      const table = h("table", { class: "md-table" });
      table.append(h("thead", {}, h("tr", {}, split(line).map((c) => h("th", {}, inline(c, openLink))))));
      const tbody = h("tbody");
      i += 2;
      while (i < lines.length && /^\s*\|.*\|\s*$/.test(lines[i])) {
        tbody.append(h("tr", {}, split(lines[i++]).map((c) => h("td", {}, inline(c, openLink)))));
      }
      table.append(tbody);
      root.append(h("div", { class: "table-scroll" }, table));
      continue;
    }
    if (/^( {4}|\t)/.test(line) && para.length === 0) {
      const body: string[] = [];
      while (i < lines.length && (/^( {4}|\t)/.test(lines[i]) || lines[i].trim() === "")) {
        body.push(lines[i++].replace(/^( {4}|\t)/, ""));
      }
      root.append(h("pre", { class: "md-code" }, h("code", {}, body.join("\n").replace(/\n+$/, ""))));
      continue;
    }
    if (line.trim() === "") {
      flush();
      i++;
      continue;
    }
    para.push(line.trim());
    i++;
  }
  flush();
  return root;
}

const INLINE = /`([^`]+)`|\*\*([^*]+)\*\*|__([^_]+)__|\*([^*\s][^*]*)\*|_([^_\s][^_]*)_|~~([^~]+)~~|\[([^\]]+)\]\(([^)\s]+)(?:\s+"[^"]*")?\)/g;

function inline(text: string, openLink: LinkOpener): Node[] {
  const out: Node[] = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    const index = m.index ?? 0;
    if (index > last) out.push(document.createTextNode(text.slice(last, index)));
    if (m[1] !== undefined) out.push(h("code", {}, m[1]));
    else if (m[2] !== undefined || m[3] !== undefined) out.push(h("strong", {}, inline(m[2] ?? m[3], openLink)));
    else if (m[4] !== undefined || m[5] !== undefined) out.push(h("em", {}, inline(m[4] ?? m[5], openLink)));
    else if (m[6] !== undefined) out.push(h("del", {}, inline(m[6], openLink)));
    else if (m[7] !== undefined) {
      const url = m[8];
      if (SAFE_URL.test(url)) {
        const a = h("a", { href: url, rel: "noopener noreferrer", target: "_blank" }, inline(m[7], openLink));
        a.addEventListener("click", (ev) => {
          ev.preventDefault();
          openLink(url);
        });
        out.push(a);
      } else out.push(document.createTextNode(m[7]));
    }
    last = index + m[0].length;
  }
  if (last < text.length) out.push(document.createTextNode(text.slice(last)));
  return out;
}
