"""Charts as data: every matplotlib figure a run shows comes back in `outputs` with its image's file and what it
plots, read from its artists (type, title, labels, the exact values), and the model's text gets a line per chart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from code_interpreter_mcp.app import build_server
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine import Engine
from tests.helpers import structured, text_of

pytestmark = pytest.mark.anyio

PLT = "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    eng = Engine(Settings(data_dir=tmp_path / "d"))
    async with eng.running():
        yield eng


async def charts_of(engine: Engine, code: str) -> list[dict[str, Any]]:
    session = await engine.session_for(None)
    out = await engine.run_code(session, PLT + code)
    assert out.result.status == "ok", out.result.error
    for o in out.result.outputs:
        assert o.kind == "display" and o.file_id and o.path and o.path.endswith(".png")
        assert o.file_id in {f.file_id for f in out.result.files}
    return [o.chart for o in out.result.outputs if o.chart is not None]


async def test_a_line_chart_with_two_series(engine: Engine) -> None:
    code = (
        "fig, ax = plt.subplots()\nax.plot([1, 2, 3], [10, 20, 15], label='north')\n"
        "ax.plot([1, 2, 3], [5, 7, 9], label='south')\nax.set_title('Sales')\nax.set_xlabel('month')\n"
        "ax.set_ylabel('units')\nax.set_yscale('log')\nax.legend()"
    )
    [chart] = await charts_of(engine, code)
    assert chart["type"] == "line" and chart["title"] == "Sales"
    [axes] = chart["axes"]
    assert (axes["xlabel"], axes["ylabel"], axes["yscale"]) == ("month", "units", "log")
    assert axes["series"] == [
        {"label": "north", "x": [1, 2, 3], "y": [10, 20, 15]},
        {"label": "south", "x": [1, 2, 3], "y": [5, 7, 9]},
    ]


async def test_a_scatter_and_a_long_series_sampled(engine: Engine) -> None:
    code = "plt.scatter([0.5, 1.5, 2.5], [3, 1, 2])\nplt.title('Dots')\nplt.figure()\nplt.plot(range(10_000))"
    dots, long = await charts_of(engine, code)
    assert dots["type"] == "scatter" and dots["axes"][0]["scatter"] == [
        {"label": None, "x": [0.5, 1.5, 2.5], "y": [3, 1, 2]}
    ]
    [series] = long["axes"][0]["series"]
    assert (
        series["sampled_from"] == 10_000 and len(series["x"]) == 200 and series["x"][0] == 0 and series["x"][-1] == 9999
    )


async def test_a_bar_chart_with_labels(engine: Engine) -> None:
    [chart] = await charts_of(engine, "plt.bar(['apples', 'pears', 'plums'], [3, 7, 5])\nplt.title('Fruit')")
    assert chart["type"] == "bar"
    bars = chart["axes"][0]["bars"]
    assert [(b["label"], b["height"]) for b in bars] == [("apples", 3), ("pears", 7), ("plums", 5)]


async def test_a_pie(engine: Engine) -> None:
    [chart] = await charts_of(engine, "plt.pie([1, 1, 2], labels=['a', 'b', 'c'])")
    assert chart["type"] == "pie"
    wedges = chart["axes"][0]["wedges"]
    assert [(w["label"], w["degrees"], w["fraction"]) for w in wedges] == [
        ("a", 90, 0.25),
        ("b", 90, 0.25),
        ("c", 180, 0.5),
    ]


async def test_a_box_plot_and_a_histogram(engine: Engine) -> None:
    code = (
        "plt.boxplot([[1, 2, 3, 4, 5, 20], [2, 3, 4]], tick_labels=['left', 'right'])\n"
        "plt.figure()\nplt.hist([1, 2, 2, 3, 3, 3], bins=[0.5, 1.5, 2.5, 3.5])"
    )
    box, hist = await charts_of(engine, code)
    assert box["type"] == "box"
    left, right = box["axes"][0]["boxes"]
    assert left == {"label": "left", "q1": 2.25, "median": 3.5, "q3": 4.75, "whisker_low": 1, "whisker_high": 5,
                    "outliers": [20]}  # fmt: skip
    assert (right["median"], right["q1"], right["q3"]) == (3, 2.5, 3.5)
    assert hist["type"] == "histogram"
    assert hist["axes"][0]["bins"] == [0.5, 1.5, 2.5, 3.5] and hist["axes"][0]["counts"] == [1, 2, 3]


async def test_two_subplots_of_different_kinds(engine: Engine) -> None:
    code = (
        "fig, (a, b) = plt.subplots(1, 2)\nfig.suptitle('Overview')\na.plot([0, 1], [1, 0])\na.set_title('trend')\n"
        "b.bar(['x', 'y'], [4, 2])\nb.set_title('share')"
    )
    [chart] = await charts_of(engine, code)
    assert chart["type"] == "subplots" and chart["title"] == "Overview"
    left, right = chart["axes"]
    assert (left["type"], left["title"], left["series"][0]["y"]) == ("line", "trend", [1, 0])
    assert (right["type"], right["title"], [b["height"] for b in right["bars"]]) == ("bar", "share", [4, 2])


async def test_the_model_text_gets_a_line_per_chart(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d")
    async with Client(build_server(settings, Engine(settings))) as client:
        r = await client.call_tool("run_code", {"code": PLT + "plt.plot([1, 2], [3, 4])\nplt.title('Up')"})
        s = structured(r)
        [output] = s["outputs"]
        assert output["data"]["text/plain"] == 'line chart "Up" (1 series)'
        assert output["chart"]["axes"][0]["series"][0]["y"] == [3, 4]
        assert f'chart {output["path"]}: line chart "Up" (1 series)' in text_of(r)


async def test_a_figure_the_code_saved_itself_carries_its_data_under_its_own_name(engine: Engine) -> None:
    code = "fig, ax = plt.subplots()\nax.bar(['a', 'b'], [2, 4])\nfig.savefig('sub/own.png')\nplt.close(fig)"
    session = await engine.session_for(None)
    out = await engine.run_code(session, PLT + "import os\nos.makedirs('sub', exist_ok=True)\n" + code)
    [output] = out.result.outputs
    assert output.path == "sub/own.png" and output.file_id in {f.file_id for f in out.result.files}
    assert [b["height"] for b in output.chart["axes"][0]["bars"]] == [2, 4]  # type: ignore[index]
