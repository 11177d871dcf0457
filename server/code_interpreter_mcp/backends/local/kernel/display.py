"""Rich display outputs, INSIDE the sandbox: what a run shows, in the order it shows it.

Loaded by worker.py by file path; stdlib only at load. `display()` (a builtin, and `IPython.display.display` once
IPython is imported), the last expression's value when it has more to show than its repr, `plt.show()`, PIL's
`Image.show()` and the code's own `savefig` each add an output: a MIME bundle made by IPython's `DisplayFormatter`
when IPython is importable (imported at the first rich output, never at start-up), else by calling the object's
`_repr_*_` methods the same way. Images become files in the data folder (harvested like any file); a text part
too big to travel inline becomes one too. A DataFrame also gets markdown (its first and last rows, within a fixed
size whatever its length) and its first rows as data. Each output records how much stdout came before it, so the
host can put prints and displays back in order.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import types

MAX_OUTPUTS = 50  # per run; more are counted in one warning
PLAIN_CHARS = 4000  # text/plain of one output
INLINE_CHARS = 100_000  # one text part inline; larger ones are files
INLINE_TOTAL = 400_000  # all inline parts of a run
TABLE_CHARS = 150_000  # one table's rows as JSON (the host takes at most 200,000)

_IMAGES = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/webp": "webp"}
_TEXTS = {
    "text/html": "html",
    "text/markdown": "md",
    "text/latex": "tex",
    "image/svg+xml": "svg",
    "application/json": "json",
}
# Asked in this order when IPython is absent (IPython's formatter asks the same methods).
_METHODS = (
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"),
    ("image/jpeg", "_repr_jpeg_"),
    ("text/latex", "_repr_latex_"),
    ("application/json", "_repr_json_"),
)
_RICH = frozenset({"_repr_mimebundle_", *(m for _, m in _METHODS)})
_PLAIN = frozenset({int, float, complex, bool, str, bytes, list, tuple, dict, set, frozenset, type(None), range})


def _safe_repr(obj: object) -> str:
    try:
        return repr(obj)
    except Exception as exc:
        return f"<repr() failed: {type(exc).__name__}>"


def is_rich(value: object) -> bool:
    """Has the value more to show than its repr? Plain types answer at once: a warm `1+1` pays nothing."""
    kind = type(value)
    if kind in _PLAIN:
        return False
    if _is_figure(value) or _is_frame(value):
        return True
    return any(hasattr(kind, name) for name in _RICH)


def _is_figure(obj: object) -> bool:
    kind = type(obj)
    return kind.__module__.startswith("matplotlib.") and hasattr(obj, "savefig") and hasattr(obj, "axes")


def _is_frame(obj: object) -> bool:
    kind = type(obj)
    return kind.__module__.split(".")[0] == "pandas" and kind.__name__ in ("DataFrame", "Series")


class Displays:
    """This run's outputs, in order. `stdout_at()` flushes and tells how many stdout bytes are written so far;
    `save_figure(fig)` saves a matplotlib figure as a file now and answers its output item."""

    def __init__(self, workdir: str, stdout_at: object, save_figure: object, load_frames: object = None) -> None:
        self.workdir = workdir
        self._load_frames = load_frames  # loads frames.py at the first DataFrame shown; None: no table data
        self._frames: types.ModuleType | None = None
        self._stdout_at = stdout_at
        self._save_figure = save_figure
        self._formatter: object = None  # IPython's DisplayFormatter; False when IPython cannot be imported
        self.items: list[dict[str, object]] = []
        self.warnings: list[str] = []
        self.saved_figures: list = []  # figures this run saved or showed: not saved again at its end
        self.run = 0
        self.own_save = False  # the runner is saving a figure: not the code's savefig
        self._files = 0
        self._inline = 0
        self._dropped = 0

    def reset(self, run: int) -> None:
        self.items, self.warnings, self.saved_figures = [], [], []
        self.run, self._files, self._inline, self._dropped = run, 0, 0, 0

    def finish(self) -> None:
        self.saved_figures = []  # the figures themselves are not kept alive past the run
        if self._dropped:
            self.warnings.append(f"{self._dropped} more outputs were not kept (at most {MAX_OUTPUTS} a run)")

    # --- what user code calls

    def display(self, *objs: object, **kwargs: object) -> None:
        """`display(*objs)` as IPython's: `raw=True` takes bundles (or one mime's data with `include=[mime]`)."""
        raw = bool(kwargs.get("raw"))
        include = kwargs.get("include")
        for obj in objs:
            if raw and isinstance(obj, dict):
                self._add("display", None, bundle={str(k): v for k, v in obj.items()})
            elif raw and isinstance(include, (list, tuple)) and len(include) == 1:
                self._add("display", None, bundle={str(include[0]): obj})
            else:
                self._add("display", obj)

    def result(self, value: object) -> None:
        self._add("result", value)

    def show(self) -> None:
        """`plt.show()` as the inline backend's: every open figure shown now, in order, then closed."""
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        for num in list(plt.get_fignums()):
            fig = plt.figure(num)
            if not self.was_saved(fig):
                self._add("display", fig)
        plt.close("all")

    def saved(self, fig: object, rel: str | None) -> None:
        """The code saved `fig` itself, to `rel` in the data folder (None: elsewhere): the output is that file,
        placed where its last save happened, described at the run's end (`pending_figures`)."""
        if self.own_save:
            return
        if not self.was_saved(fig):
            self.saved_figures.append(fig)
        if rel is None:
            return
        self.items = [i for i in self.items if i.get("path") != rel or "_fig" not in i]
        self._append({"kind": "display", "stdout_at": self._at(), "path": rel, "_fig": fig, "data": {}})

    def was_saved(self, fig: object) -> bool:
        """By identity: pyplot hands a closed figure's number to the next one."""
        return any(f is fig for f in self.saved_figures)

    def figure_item(self, item: dict[str, object]) -> None:
        """A figure saved at the run's end (left open): it goes after everything shown."""
        self._append({"kind": "display", "stdout_at": None, **item})

    # --- building one output

    def _at(self) -> int | None:
        try:
            return int(self._stdout_at())  # type: ignore[operator]
        except Exception:
            return None

    def _append(self, item: dict[str, object]) -> bool:
        if len(self.items) >= MAX_OUTPUTS:
            self._dropped += 1
            return False
        self.items.append(item)
        return True

    def _add(self, kind: str, obj: object, bundle: dict[str, object] | None = None) -> None:
        """One output; a failure to show it (a broken repr, a full disk) is a warning, never the run's error,
        as in a notebook."""
        try:
            self._add_one(kind, obj, bundle)
        except Exception as exc:
            self.warnings.append(f"could not show an output: {type(exc).__name__}: {exc}"[:500])

    def _add_one(self, kind: str, obj: object, bundle: dict[str, object] | None) -> None:
        figure = bundle is None and _is_figure(obj)
        if len(self.items) >= MAX_OUTPUTS and not figure:  # counted, not formatted: a display() loop stays cheap
            self._dropped += 1
            return
        at = self._at()
        if figure:
            self.saved_figures.append(obj)
            item = self._save_figure(obj)  # type: ignore[operator]
            if isinstance(item, dict):
                self._append({"kind": kind, "stdout_at": at, **item})
            return
        if bundle is None:
            bundle = self._bundle(obj)
        item: dict[str, object] = {"kind": kind, "stdout_at": at, "data": {}}
        if bundle is not None and obj is not None and _is_frame(obj) and self._load_frames is not None:
            try:
                frame = obj.to_frame() if type(obj).__name__ == "Series" else obj  # type: ignore[attr-defined]
                if self._frames is None:
                    self._frames = self._load_frames()  # type: ignore[operator]
                frames = self._frames
                item["table"] = self._bounded(frames.table(frame))
                bundle.setdefault("text/markdown", frames.markdown(frame))
            except Exception as exc:
                self.warnings.append(f"could not read the table: {type(exc).__name__}: {exc}")
        self._parts(item, bundle)
        self._append(item)

    def _bounded(self, table: dict[str, object]) -> dict[str, object] | None:
        """The table within TABLE_CHARS and what is left of the run's inline room: fewer rows, or none."""
        rows: list = table["rows"]  # type: ignore[assignment]
        while True:
            size = len(json.dumps(table, ensure_ascii=False, default=str))
            if size <= TABLE_CHARS and self._inline + size <= INLINE_TOTAL:
                self._inline += size
                return table
            if not rows:
                return None
            keep = len(rows) // 2
            rows = rows[:keep]
            table = {**table, "rows": rows, "index": (table.get("index") or [])[:keep], "truncated": True}

    def _bundle(self, obj: object) -> dict[str, object]:
        fmt = self._ipython()
        if fmt:
            try:
                data, _ = fmt.format(obj)  # type: ignore[attr-defined]
                if isinstance(data, dict) and data:
                    return data
            except Exception:
                pass
        return plain_bundle(obj)

    def _ipython(self) -> object:
        if self._formatter is None:
            try:
                from IPython.core.formatters import DisplayFormatter

                self._formatter = DisplayFormatter()
            except Exception:  # not installed, or broken: the plain way
                self._formatter = False
        return self._formatter

    def _parts(self, item: dict[str, object], bundle: dict[str, object]) -> None:
        """Each MIME part inline, as a file, or left out: images are always files, the first only."""
        data: dict[str, object] = item["data"]  # type: ignore[assignment]
        plain = bundle.get("text/plain")
        data["text/plain"] = _clip(plain if isinstance(plain, str) else "", PLAIN_CHARS)
        for mime, value in bundle.items():
            if mime in _IMAGES:
                if "path" not in item:
                    raw = _image_bytes(value)
                    if raw is not None:
                        item["path"] = self._file(raw, _IMAGES[mime])
                continue
            if mime not in _TEXTS:
                continue  # javascript, pdf, widgets: nothing here can show them
            text = _text_of(mime, value)
            if text is None:
                continue
            if len(text) <= INLINE_CHARS and self._inline + len(text) <= INLINE_TOTAL:
                self._inline += len(text)
                data[mime] = value if mime == "application/json" else text
            elif "path" not in item:
                item["path"] = self._file(text.encode("utf-8", "replace"), _TEXTS[mime])

    def _file(self, raw: bytes, ext: str) -> str:
        self._files += 1
        name = f"output_{self.run}_{self._files}.{ext}"
        with open(os.path.join(self.workdir, name), "wb") as f:
            f.write(raw)
        return name


def plain_bundle(obj: object) -> dict[str, object]:
    """The bundle without IPython: `_repr_mimebundle_` first, then each `_repr_*_` method, then the repr."""
    data: dict[str, object] = {}
    if not isinstance(obj, type):  # a class's methods are unbound: nothing to ask
        method = getattr(obj, "_repr_mimebundle_", None)
        if callable(method):
            try:
                got = method(include=None, exclude=None)
                got = got[0] if isinstance(got, tuple) else got
                if isinstance(got, dict):
                    data.update({str(k): v for k, v in got.items()})
            except Exception:
                pass
        for mime, name in _METHODS:
            method = getattr(obj, name, None)
            if mime in data or not callable(method):
                continue
            try:
                value = method()
            except Exception:
                continue
            value = value[0] if isinstance(value, tuple) else value
            if value is not None:
                data[mime] = value
    if not isinstance(data.get("text/plain"), str):
        data["text/plain"] = _safe_repr(obj)
    return data


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 40] + f"... [{len(text)} characters]"


def _image_bytes(value: object) -> bytes | None:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except ValueError:
            return None
    return None


def _text_of(mime: str, value: object) -> str | None:
    """The part as text, to size it (JSON as its encoding); None when it is not what the mime type says."""
    if mime == "application/json":
        try:
            return json.dumps(value, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


# --- hooks on import: the modules are patched as they load, so nothing is imported ahead of need


class ImportHooks:
    """A meta-path finder that patches `Figure.savefig`, `pyplot.show`, PIL's `Image.show` and IPython's
    `display` as each module is first imported (importing them at start-up would cost every worker)."""

    def __init__(self, displays: Displays, data_path: object) -> None:
        self.displays = displays
        self._data_path = data_path  # a savefig target -> its path in the data folder, or None
        self._busy: set[str] = set()
        self._patches = {
            "matplotlib.figure": self._figure,
            "matplotlib.pyplot": self._pyplot,
            "PIL.Image": self._pil,
            "IPython.core.display_functions": self._ipython,
        }

    def find_spec(self, name: str, path: object, target: object = None) -> object:
        patch = self._patches.get(name)
        if patch is None or name in self._busy:
            return None
        import importlib.util

        self._busy.add(name)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy.discard(name)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module: types.ModuleType) -> None:
                load(module)
                try:
                    patch(module)
                except Exception:  # a version we do not know: the module works as it is
                    pass

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec

    def _figure(self, module: types.ModuleType) -> None:
        save, displays, where_of = module.Figure.savefig, self.displays, self._data_path

        def savefig(fig: object, *args: object, **kwargs: object) -> object:
            done = save(fig, *args, **kwargs)
            displays.saved(fig, where_of(args[0] if args else kwargs.get("fname")))  # type: ignore[operator]
            return done

        module.Figure.savefig = savefig

    def _pyplot(self, module: types.ModuleType) -> None:
        displays = self.displays

        def show(*args: object, **kwargs: object) -> None:
            displays.show()

        module.show = show

    def _pil(self, module: types.ModuleType) -> None:
        displays = self.displays

        def show(image: object, title: object = None, **kwargs: object) -> None:
            displays.display(image)

        module.Image.show = show

    def _ipython(self, module: types.ModuleType) -> None:
        module.display = self.displays.display
