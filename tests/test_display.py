"""Rich display outputs: display(), the last value's MIME bundle, plt.show() and PIL's show() come back in the
result's `outputs` in the order they happened, interleaved with prints; a DataFrame as markdown and rows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from code_interpreter_mcp.app import build_server
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine import Engine
from code_interpreter_mcp.models import RunResult
from tests.helpers import kernel_module, structured, text_of

pytestmark = pytest.mark.anyio


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    eng = Engine(Settings(data_dir=tmp_path / "d"))
    async with eng.running():
        yield eng


async def run(engine: Engine, code: str, session_id: str | None = None) -> RunResult:
    session = await engine.session_for(session_id)
    out = await engine.run_code(session, code)
    assert out.result.status == "ok", out.result.error
    return out.result


RICH = """
class Html:
    def _repr_html_(self): return "<b>bold</b>"
class Bundle:
    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/plain": "a bundle", "application/json": {"k": [1, 2]}}
"""


async def test_bundles_of_every_kind_interleave_with_prints(engine: Engine) -> None:
    code = RICH + (
        "import pandas as pd\n"
        "from IPython.display import Markdown, Latex, SVG, display as show\n"
        "print('one')\n"
        "display(Html(), Bundle())\n"
        "print('two')\n"
        "show(Markdown('# Title'), Latex(r'$x^2$'))\n"
        'show(SVG(\'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>\'))\n'
        "print('three')\n"
        "display(pd.DataFrame({'n': [3, 1, 2], 's': ['c', 'a', 'b']}))\n"
        "print('four')\n"
    )
    r = await run(engine, code)
    assert r.stdout == "one\ntwo\nthree\nfour\n"
    html, bundle, md, latex, svg, frame = r.outputs
    assert html.data == {"text/plain": html.data["text/plain"], "text/html": "<b>bold</b>"}
    assert bundle.data == {"text/plain": "a bundle", "application/json": {"k": [1, 2]}}
    assert md.data["text/markdown"] == "# Title" and latex.data["text/latex"] == "$x^2$"
    assert svg.data["image/svg+xml"].startswith("<svg")
    assert frame.table is not None and frame.table.columns == ["n", "s"] and frame.table.shape == [3, 2]
    assert frame.table.rows == [[3, "c"], [1, "a"], [2, "b"]] and frame.table.index == [0, 1, 2]
    assert "| 0 | 3 | c |" in frame.data["text/markdown"] and "text/html" in frame.data
    # Each output knows how much stdout came before it.
    at = [o.stdout_at for o in r.outputs]
    assert at == [4, 4, 8, 8, 8, 14]
    assert all(o.kind == "display" for o in r.outputs)


async def test_the_model_text_interleaves_and_reads_a_frame_as_markdown(engine: Engine, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "m", result_shape="content_only")
    code = "import pandas as pd\nprint('before')\ndisplay(pd.DataFrame({'x': [1, 2]}))\nprint('after')\n"
    async with Client(build_server(settings)) as client:
        res = await client.call_tool("run_code", {"code": code})
    text = text_of(res)
    assert text.index("before") < text.index("| 0 | 1 |") < text.index("after")


async def test_the_last_value_is_a_result_output_only_when_it_is_rich(engine: Engine) -> None:
    r = await run(engine, "1 + 1")
    assert r.result == "2" and r.outputs == []
    r = await run(engine, "import pandas as pd\npd.Series([1.5, 2.5], name='v')")
    [out] = r.outputs
    assert out.kind == "result" and out.table is not None and out.table.columns == ["v"]
    assert out.data["text/markdown"].startswith("|  | v |")


async def test_a_million_row_frame_stays_within_its_budget(engine: Engine) -> None:
    r = await run(engine, "import pandas as pd\ndf = pd.DataFrame({'a': range(1_000_000), 'b': 0.5})\ndf")
    [out] = r.outputs
    md = out.data["text/markdown"]
    assert len(md) <= 6000 and md.endswith("1000000 rows × 2 columns") and "| 999999 | 999999 | 0.5 |" in md
    assert out.table is not None and len(out.table.rows) == 50 and out.table.truncated
    assert out.table.shape == [1_000_000, 2]


async def test_images_become_files_in_order_with_figures(engine: Engine) -> None:
    code = (
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nfrom PIL import Image\n"
        "Image.new('RGB', (8, 4), 'red').show()\n"
        "plt.plot([1, 2], [3, 4])\nplt.title('first')\nplt.show()\n"
        "print('between')\n"
        "plt.bar(['a'], [1])\nplt.title('left open')\n"
        "Image.new('L', (3, 3))\n"
    )
    r = await run(engine, code)
    by_id = {f.file_id: f for f in r.files}
    pil, shown, last, left_open = r.outputs
    assert pil.path == "output_1_1.png" and by_id[pil.file_id or ""].mime_type == "image/png"
    assert shown.chart is not None and shown.chart["title"] == "first" and shown.stdout_at == 0
    assert last.kind == "result" and last.path == "output_1_2.png" and last.stdout_at == len("between\n")
    assert left_open.chart is not None and left_open.chart["title"] == "left open" and left_open.stdout_at is None


async def test_without_ipython_the_repr_methods_are_asked(engine: Engine) -> None:
    code = RICH + "import sys\nsys.modules['IPython'] = None\ndisplay(Html(), Bundle())\n"
    r = await run(engine, code)
    html, bundle = r.outputs
    assert html.data["text/html"] == "<b>bold</b>" and html.data["text/plain"].startswith("<__main__.Html")
    assert bundle.data == {"text/plain": "a bundle", "application/json": {"k": [1, 2]}}


async def test_hostile_reprs_and_too_many_outputs_are_contained(engine: Engine) -> None:
    code = (
        "class Bad:\n"
        "    def _repr_html_(self): raise ValueError('no')\n"
        "    def _repr_markdown_(self): return 42\n"
        "    def __repr__(self): raise RuntimeError('nor this')\n"
        "display(Bad())\n"
        "class Huge:\n"
        "    def _repr_html_(self): return '<p>' + 'x' * 300_000 + '</p>'\n"
        "display(Huge())\n"
        "for i in range(60): display(i)\n"
    )
    r = await run(engine, code)
    assert len(r.outputs) == 50
    bad, huge = r.outputs[:2]
    assert "text/html" not in bad.data and "text/markdown" not in bad.data
    assert huge.path == "output_1_1.html" and "text/html" not in huge.data
    assert any(f.path == "output_1_1.html" and f.bytes > 300_000 for f in r.files)
    assert any("12 more outputs were not kept" in w for w in r.warnings)


async def test_outputs_left_out_for_the_budget_say_so(tmp_path: Path) -> None:
    eng = Engine(Settings(data_dir=tmp_path / "b", result_budget_tokens=2000))
    async with eng.running():
        code = "class H:\n    def _repr_html_(self): return '<i>' + 'y' * 50_000 + '</i>'\ndisplay(H())\n"
        r = await run(eng, code)
    [out] = r.outputs
    assert "text/html" not in out.data and "left out for the result budget: text/html" in out.data["text/plain"]


async def test_structured_content_carries_outputs_over_mcp(tmp_path: Path) -> None:
    async with Client(build_server(Settings(data_dir=tmp_path / "s"))) as client:
        res = await client.call_tool("run_code", {"code": RICH + "display(Html())"})
    data: dict[str, Any] = structured(res)
    assert data["outputs"][0]["data"]["text/html"] == "<b>bold</b>"


def test_plain_bundle_and_markdown_units() -> None:
    display = kernel_module("display")
    frames = kernel_module("frames")

    class Both:
        def _repr_mimebundle_(self, include: object = None, exclude: object = None) -> tuple[dict[str, str], dict]:
            return {"text/html": "<p>x</p>"}, {}

        def _repr_latex_(self) -> str:
            return "$y$"

    bundle = display.plain_bundle(Both())
    assert bundle["text/html"] == "<p>x</p>" and bundle["text/latex"] == "$y$" and "text/plain" in bundle
    assert display.plain_bundle(Both)["text/plain"].startswith("<class")  # a class: its methods are not asked
    assert not display.is_rich(3) and not display.is_rich("s") and display.is_rich(Both())

    pd = pytest.importorskip("pandas")
    wide = pd.DataFrame({f"c{i}": ["v" * 100] for i in range(30)})
    md = frames.markdown(wide)
    assert len(md) <= frames.MARKDOWN_CHARS and "| … |" in md and md.endswith("1 rows × 30 columns")
    assert frames.table(pd.DataFrame({"f": [float("nan"), 1.0]}))["rows"] == [[None], [1.0]]


async def test_an_output_that_cannot_be_saved_is_a_warning_not_an_error(engine: Engine) -> None:
    code = (
        "import os\nos.mkdir('output_1_1.png')\n"  # where the image would be written
        "class P:\n    def _repr_png_(self): return b'\\x89PNG fake'\n"
        "display(P())\nprint('went on')\n"
    )
    r = await run(engine, code)
    assert r.stdout == "went on\n" and r.outputs == []
    assert any(w.startswith("could not show an output: IsADirectoryError") for w in r.warnings)


async def test_a_huge_table_and_a_display_loop_stay_bounded(engine: Engine) -> None:
    code = (
        "import pandas as pd, time\n"
        "wide = pd.DataFrame({f'c{i}': ['v' * 300] * 80 for i in range(60)})\n"
        "display(wide)\n"
        "t = time.monotonic()\nfor i in range(100_000): display(i)\nprint(round(time.monotonic() - t, 1))\n"
    )
    r = await run(engine, code)
    table = r.outputs[0].table
    # Rows too wide for the budget: fewer of them (here none), the columns and the shape stay.
    assert table is not None and table.truncated and len(table.rows) < 50 and table.shape == [80, 60]
    assert table.columns[:2] == ["c0", "c1"]
    assert len(table.model_dump_json()) <= 200_000
    assert float(r.stdout) < 5.0  # past the 50 kept, a display is counted, not formatted
    assert any("99951 more outputs were not kept" in w for w in r.warnings)


async def test_ipythons_raw_and_helper_displays(engine: Engine) -> None:
    code = (
        "from IPython.display import display_html, display, JSON\n"
        "display_html('<p>raw</p>', raw=True)\n"
        "display({'text/plain': 'b', 'text/markdown': '**b**'}, raw=True)\n"
        "display(JSON({'a': [1]}))\n"
    )
    r = await run(engine, code)
    raw_html, bundle, as_json = r.outputs
    assert raw_html.data["text/html"] == "<p>raw</p>"
    assert bundle.data == {"text/plain": "b", "text/markdown": "**b**"}
    assert as_json.data["application/json"] == {"a": [1]}
