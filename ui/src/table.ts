// A DataFrame's first rows (`Output.table`): sortable by a click (or Enter/Space) on a column header, numbers
// compared as numbers, and paged.
import { h } from "./dom";
import type { TableData } from "./types";

export const PAGE_SIZE = 25;

type Dir = "asc" | "desc" | null;

function cellText(v: unknown): string {
  if (v === null || v === undefined) return "";
  if (typeof v === "object") {
    try {
      return JSON.stringify(v);
    } catch {
      return String(v);
    }
  }
  return String(v);
}

function asNumber(v: unknown): number | null {
  if (typeof v === "number") return Number.isNaN(v) ? null : v;
  if (typeof v === "bigint") return Number(v);
  if (typeof v === "string" && v.trim() !== "" && /^[-+]?(\d[\d_,]*\.?\d*|\.\d+)([eE][-+]?\d+)?%?$/.test(v.trim())) {
    const n = Number(v.trim().replace(/[_,%]/g, ""));
    return Number.isNaN(n) ? null : n;
  }
  return null;
}

const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

/** Numbers before text, missing values (null, NaN, "") last whatever the direction. */
export function compareCells(a: unknown, b: unknown): number {
  const na = asNumber(a);
  const nb = asNumber(b);
  if (na !== null && nb !== null) return na - nb;
  const ea = a === null || a === undefined || a === "" || (typeof a === "number" && Number.isNaN(a));
  const eb = b === null || b === undefined || b === "" || (typeof b === "number" && Number.isNaN(b));
  if (ea || eb) return ea === eb ? 0 : ea ? 1 : -1;
  if (na !== null) return -1;
  if (nb !== null) return 1;
  return collator.compare(cellText(a), cellText(b));
}

export function renderTable(table: TableData): HTMLElement {
  const columns = Array.isArray(table.columns) ? table.columns : [];
  const rows = (Array.isArray(table.rows) ? table.rows : []).map((r, i) => ({
    cells: Array.isArray(r) ? r : [r],
    index: Array.isArray(table.index) ? table.index[i] : undefined,
    order: i,
  }));
  const hasIndex = Array.isArray(table.index) && table.index.length > 0;
  let sortCol: number | null = null; // -1 = the index
  let dir: Dir = null;
  let page = 0;

  const wrap = h("div", { class: "table-wrap", testid: "table" });
  const scroller = h("div", { class: "table-scroll", tabindex: 0, role: "region", "aria-label": "Table" });
  const tableEl = h("table", { class: "data-table" });
  const thead = h("thead");
  const tbody = h("tbody");
  tableEl.append(thead, tbody);
  scroller.append(tableEl);

  const info = h("span", { class: "table-info", testid: "table-info" });
  const prev = h("button", { type: "button", class: "btn small", testid: "table-prev" }, "‹ Prev");
  const next = h("button", { type: "button", class: "btn small", testid: "table-next" }, "Next ›");
  const pager = h("div", { class: "table-pager" }, prev, info, next);
  prev.addEventListener("click", () => {
    page = Math.max(0, page - 1);
    draw();
  });
  next.addEventListener("click", () => {
    page = Math.min(pages() - 1, page + 1);
    draw();
  });

  const shape = Array.isArray(table.shape) && table.shape.length >= 2 ? table.shape : [rows.length, columns.length];
  const caption = h(
    "div",
    { class: "table-shape", testid: "table-shape" },
    `${Number(shape[0]).toLocaleString()} rows × ${Number(shape[1]).toLocaleString()} columns`,
    table.truncated || Number(shape[0]) > rows.length ? ` · first ${rows.length.toLocaleString()} shown` : "",
  );

  const pages = () => Math.max(1, Math.ceil(rows.length / PAGE_SIZE));

  const headerCell = (label: string, col: number) => {
    const th = h("th", { scope: "col", testid: "sort-header", "data-col": col });
    const button = h("button", { type: "button", class: "sort-btn" }, h("span", {}, label), h("span", { class: "sort-mark", "aria-hidden": "true" }));
    button.addEventListener("click", () => {
      if (sortCol !== col) {
        sortCol = col;
        dir = "asc";
      } else {
        dir = dir === "asc" ? "desc" : dir === "desc" ? null : "asc";
        if (dir === null) sortCol = null;
      }
      page = 0;
      draw();
    });
    th.append(button);
    return th;
  };

  const headRow = h("tr");
  if (hasIndex) headRow.append(headerCell("", -1));
  columns.forEach((c, i) => headRow.append(headerCell(cellText(c), i)));
  thead.append(headRow);

  function sorted() {
    if (sortCol === null || dir === null) return rows;
    const col = sortCol;
    const sign = dir === "asc" ? 1 : -1;
    return [...rows].sort((a, b) => {
      const va = col === -1 ? a.index : a.cells[col];
      const vb = col === -1 ? b.index : b.cells[col];
      const c = compareCells(va, vb);
      // Missing values stay last in both directions.
      const missing = (v: unknown) => v === null || v === undefined || v === "" || (typeof v === "number" && Number.isNaN(v));
      if (missing(va) || missing(vb)) return c;
      return c * sign || a.order - b.order;
    });
  }

  function draw() {
    for (const th of thead.querySelectorAll<HTMLElement>("th")) {
      const col = Number(th.dataset.col);
      const state = col === sortCol && dir ? dir : null;
      th.setAttribute("aria-sort", state === "asc" ? "ascending" : state === "desc" ? "descending" : "none");
      th.querySelector(".sort-mark")!.textContent = state === "asc" ? " ▲" : state === "desc" ? " ▼" : "";
    }
    const all = sorted();
    const start = page * PAGE_SIZE;
    const slice = all.slice(start, start + PAGE_SIZE);
    tbody.replaceChildren(
      ...slice.map((r) => {
        const tr = h("tr", { testid: "table-row" });
        if (hasIndex) tr.append(h("th", { scope: "row", class: "idx" }, cellText(r.index)));
        for (let i = 0; i < Math.max(columns.length, r.cells.length); i++) {
          const v = r.cells[i];
          tr.append(h("td", { class: asNumber(v) !== null ? "num" : undefined }, cellText(v)));
        }
        return tr;
      }),
    );
    info.textContent = rows.length
      ? `${(start + 1).toLocaleString()}–${(start + slice.length).toLocaleString()} of ${rows.length.toLocaleString()}`
      : "no rows";
    prev.disabled = page === 0;
    next.disabled = page >= pages() - 1;
    pager.hidden = rows.length <= PAGE_SIZE;
  }

  draw();
  wrap.append(caption, scroller, pager);
  return wrap;
}
