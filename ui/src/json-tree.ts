// A collapsible JSON tree from native <details>/<summary> (keyboard accessible as they are).
import { h } from "./dom";

const MAX_CHILDREN = 200;

export function jsonTree(value: unknown, openDepth = 2): HTMLElement {
  return h("div", { class: "json-tree", testid: "json-tree" }, node(value, openDepth, 0));
}

function scalar(value: unknown): HTMLElement {
  if (value === null) return h("span", { class: "j-null" }, "null");
  switch (typeof value) {
    case "string":
      return h("span", { class: "j-string" }, JSON.stringify(value));
    case "number":
    case "bigint":
      return h("span", { class: "j-number" }, String(value));
    case "boolean":
      return h("span", { class: "j-bool" }, String(value));
    default:
      return h("span", { class: "j-other" }, String(value));
  }
}

function node(value: unknown, openDepth: number, depth: number, label?: string): HTMLElement {
  const key = label !== undefined ? h("span", { class: "j-key" }, `${label}: `) : null;
  if (value === null || typeof value !== "object") {
    return h("div", { class: "j-leaf" }, key, scalar(value));
  }
  const isArray = Array.isArray(value);
  const entries: [string, unknown][] = isArray
    ? (value as unknown[]).map((v, i) => [String(i), v])
    : Object.entries(value as Record<string, unknown>);
  const brief = isArray ? `[…] ${entries.length} items` : `{…} ${entries.length} keys`;
  if (entries.length === 0) return h("div", { class: "j-leaf" }, key, h("span", { class: "j-other" }, isArray ? "[]" : "{}"));
  const details = h("details", { class: "j-node", open: depth < openDepth });
  details.append(h("summary", {}, key, h("span", { class: "j-brief" }, brief)));
  const body = h("div", { class: "j-children" });
  // Children are built on first open: a big JSON costs nothing until looked at.
  let built = false;
  const build = () => {
    if (built) return;
    built = true;
    for (const [k, v] of entries.slice(0, MAX_CHILDREN)) body.append(node(v, openDepth, depth + 1, k));
    if (entries.length > MAX_CHILDREN) body.append(h("div", { class: "j-more" }, `… ${entries.length - MAX_CHILDREN} more`));
  };
  if (details.open) build();
  details.addEventListener("toggle", () => details.open && build());
  details.append(body);
  return details;
}
