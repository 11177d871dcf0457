// A small Python highlighter: one regular expression tokenises the source; every token becomes a text node or a
// <span class="tok-…"> (DOM built with textContent, so the code can never become markup).

const KEYWORDS = new Set(
  (
    "False None True and as assert async await break class continue def del elif else except finally for from " +
    "global if import in is lambda nonlocal not or pass raise return try while with yield match case type"
  ).split(" "),
);

const BUILTINS = new Set(
  (
    "abs all any ascii bin bool breakpoint bytearray bytes callable chr classmethod compile complex delattr dict " +
    "dir divmod enumerate eval exec filter float format frozenset getattr globals hasattr hash help hex id input " +
    "int isinstance issubclass iter len list locals map max memoryview min next object oct open ord pow print " +
    "property range repr reversed round set setattr slice sorted staticmethod str sum super tuple type vars zip " +
    "self cls __name__ __file__ Exception ValueError TypeError KeyError IndexError RuntimeError"
  ).split(" "),
);

// Order matters: strings and comments first so that keywords inside them are not matched.
const TOKEN = new RegExp(
  [
    String.raw`(?<comment>#[^\n]*)`,
    String.raw`(?<string>(?:[rRbBuUfF]{0,2})(?:"""[\s\S]*?(?:"""|$)|'''[\s\S]*?(?:'''|$)|"(?:\\.|[^"\\\n])*"?|'(?:\\.|[^'\\\n])*'?))`,
    String.raw`(?<decorator>^[ \t]*@[\w.]+)`,
    String.raw`(?<number>\b(?:0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+|(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?[jJ]?)\b)`,
    String.raw`(?<magic>^[ \t]*[!%][^\n]*)`,
    String.raw`(?<word>[A-Za-z_][A-Za-z0-9_]*)`,
    String.raw`(?<op>[-+*/%=<>!&|^~:@]+)`,
  ].join("|"),
  "gm",
);

export function highlightPython(code: string): DocumentFragment {
  const frag = document.createDocumentFragment();
  let last = 0;
  let afterDef = false;
  const push = (text: string, cls?: string) => {
    if (!text) return;
    if (!cls) {
      frag.append(text);
      return;
    }
    const span = document.createElement("span");
    span.className = `tok-${cls}`;
    span.textContent = text;
    frag.append(span);
  };
  for (const m of code.matchAll(TOKEN)) {
    const index = m.index ?? 0;
    const between = code.slice(last, index);
    push(between);
    if (between.trim()) afterDef = false;
    const g = m.groups ?? {};
    const text = m[0];
    let cls: string | undefined;
    if (g.comment !== undefined) cls = "comment";
    else if (g.string !== undefined) cls = "string";
    else if (g.decorator !== undefined) cls = "decorator";
    else if (g.number !== undefined) cls = "number";
    else if (g.magic !== undefined) cls = "magic";
    else if (g.word !== undefined) {
      if (afterDef) cls = "def";
      else if (KEYWORDS.has(text)) cls = "keyword";
      else if (BUILTINS.has(text)) cls = "builtin";
    } else if (g.op !== undefined) cls = "op";
    push(text, cls);
    afterDef = g.word !== undefined && (text === "def" || text === "class");
    last = index + text.length;
  }
  push(code.slice(last));
  return frag;
}
