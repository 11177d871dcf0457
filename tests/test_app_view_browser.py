"""The MCP App view in a real browser: Debian's Chromium (through Playwright, no browser download) opens a small
host page that is a real MCP client of the real server over streamable HTTP (same origin, through a reverse proxy
in this test), reads run_code's `ui://` view and shows each call in a sandboxed iframe through the ext-apps
AppBridge. The view's own calls (get_run while a run goes, cancel_run, resources/read, download_file) go through
that bridge to the server.

Needs Node.js (the host page is built from ui/test-host on the fly), Chromium at /usr/bin/chromium (or $CHROMIUM)
and the `playwright` package; each missing one skips the module, naming it. Screenshots go to tests/artifacts/,
and the analysis one to docs/app-view.png.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_e2e_http import free_port, http_server

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "ui"
VIEW = ROOT / "server" / "code_interpreter_mcp" / "app" / "static" / "run_view.html"
HOST_DIR = ROOT / "tests" / "browser" / "host" / "dist"
ARTIFACTS = ROOT / "tests" / "artifacts"
DOCS_SHOT = ROOT / "docs" / "app-view.png"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
APP_MIME = "text/html;profile=mcp-app"


def _missing() -> str | None:
    if not shutil.which("node") or not shutil.which("npm"):
        return "Node.js (node and npm) is not installed: the test host page is built from ui/test-host"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright; no browser download needed)"
    return None


if (_reason := _missing()) is not None:
    pytest.skip(_reason, allow_module_level=True)

import httpx2  # noqa: E402
import uvicorn  # noqa: E402
from playwright.sync_api import Browser, Frame, FrameLocator, Page, expect, sync_playwright  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import FileResponse, Response, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

pytestmark = [pytest.mark.slow]

# --- the host page, the server, the same-origin proxy, the browser ------------------------------------------------


@pytest.fixture(scope="module")
def host_page() -> Path:
    """The host page, built now from ui/test-host (npm ci first when ui/node_modules is missing)."""
    if not (UI / "node_modules").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=UI, check=True, timeout=600)
    subprocess.run(
        ["npm", "run", "--silent", "build:host"],
        cwd=UI,
        check=True,
        timeout=300,
        env={**os.environ, "HOST_OUT_DIR": str(HOST_DIR)},
    )
    page = HOST_DIR / "host.html"
    assert page.is_file()
    return page


@pytest.fixture(scope="module")
def mcp_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with http_server(tmp_path_factory.mktemp("app-view") / "d") as url:
        yield url


# Hop-by-hop headers and what the proxy's own HTTP layers set.
_DROP_REQUEST = {"host", "connection", "keep-alive", "transfer-encoding", "te", "upgrade", "content-length"}
_DROP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


def proxy_app(upstream: str, host_page: Path) -> Starlette:
    """Serves the host page and passes /mcp through to the server: every header (mcp-session-id,
    mcp-protocol-version, accept, last-event-id, ...) both ways, bodies and SSE streams as they come."""
    client: httpx2.AsyncClient | None = None

    async def mcp(request: Request) -> Response:
        assert client is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST]
        body = await request.body()
        url = upstream + (f"?{request.url.query}" if request.url.query else "")
        upstream_request = client.build_request(request.method, url, headers=headers, content=body)
        answer = await client.send(upstream_request, stream=True)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.aiter_raw():
                    yield chunk
            finally:
                await answer.aclose()

        out = {k: v for k, v in answer.headers.items() if k.lower() not in _DROP_RESPONSE}
        return StreamingResponse(relay(), status_code=answer.status_code, headers=out)

    async def index(request: Request) -> Response:
        return FileResponse(host_page, media_type="text/html")

    async def view(request: Request) -> Response:  # only for the host's ?fallback=1 (a server without the view)
        return FileResponse(VIEW, media_type="text/html")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal client
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0, read=None)) as client:
            yield

    return Starlette(
        routes=[
            Route("/", index),
            Route("/view.html", view),
            Route("/favicon.ico", lambda request: Response(status_code=204)),
            Route("/mcp", mcp, methods=["GET", "POST", "DELETE"]),
        ],
        lifespan=lifespan,
    )


@pytest.fixture(scope="module")
def base_url(mcp_url: str, host_page: Path) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        proxy_app(mcp_url, host_page),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=1,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the proxy did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


class Host:
    """The host page in a fresh browser context, and helpers to drive it."""

    def __init__(self, page: Page, console: list[str]) -> None:
        self.page = page
        self.console = console

    def info(self) -> dict[str, Any]:
        return self.page.evaluate("() => window.hostReady")  # type: ignore[no-any-return]

    def run(self, args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """run_code with a view; returns the view's number and the tool result (when run_code answered)."""
        got = self.page.evaluate("args => window.runCode(args)", args)
        return got["view"], got["result"]

    def show(self, args: dict[str, Any], result: dict[str, Any]) -> int:
        return self.page.evaluate("([a, r]) => window.showResult(a, r)", [args, result])  # type: ignore[no-any-return]

    def view(self, index: int) -> FrameLocator:
        return self.page.frame_locator(f"#view-{index}")

    def frame(self, index: int) -> Frame:
        handle = self.page.locator(f"#view-{index}").element_handle()
        assert handle is not None
        frame = handle.content_frame()
        assert frame is not None
        return frame

    def fit(self) -> None:
        """A viewport as tall as the page: Chromium paints a sandboxed frame's parts outside it blank."""
        self.page.wait_for_timeout(400)  # the frames' heights follow the views' size-changed notifications
        height = self.page.evaluate("() => document.documentElement.scrollHeight")
        width = self.page.viewport_size["width"] if self.page.viewport_size else 900
        self.page.set_viewport_size({"width": width, "height": min(max(height, 200), 8000)})
        self.page.wait_for_timeout(200)

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.fit()
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_host(browser: Browser, base_url: str, query: str = "", width: int = 900) -> Host:
    context = browser.new_context(accept_downloads=True, viewport={"width": width, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.goto(f"{base_url}/{query}")
    host = Host(page, console)
    host.info()  # connected, tools listed, the view read
    return host


@pytest.fixture
def host(browser: Browser, base_url: str) -> Iterator[Host]:
    h = open_host(browser, base_url)
    yield h
    h.page.context.close()
    errors = [line for line in h.console if line.startswith("pageerror")]
    assert not errors, "\n".join(h.console)


def status(view: FrameLocator) -> Any:
    return view.locator("[data-testid=status]")


# --- the tests ------------------------------------------------------------------------------------------------------


def test_the_committed_view_is_a_fresh_build() -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_ui.sh"), "--check", "--no-host"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_host_gets_the_view_through_mcp_apps(host: Host) -> None:
    info = host.info()
    assert info["viewSource"] == "resource"
    assert info["viewUri"] == "ui://code-interpreter/run"
    assert info["viewMimeType"] == APP_MIME
    assert info["runCodeMeta"]["ui"]["resourceUri"] == info["viewUri"]
    assert info["getRunMeta"]["ui"]["resourceUri"] == info["viewUri"]
    assert {"run_code", "get_run", "cancel_run", "download_file"} <= set(info["tools"])


ANALYSIS = """\
import numpy as np, pandas as pd, matplotlib.pyplot as plt
rng = np.random.default_rng(7)
cities = ["Lyon", "Oslo", "Kyoto", "Lima", "Accra", "Perth", "Quito", "Turku", "Izmir", "Cork",
          "Davao", "Malmo", "Brno", "Leeds", "Pune", "Graz", "Bari", "Fez", "Hue", "Nice",
          "Split", "Tartu", "Cusco", "Sapporo", "Bergen", "Aarhus", "Porto", "Ghent", "Basel", "Lund"]
n = len(cities)
df = pd.DataFrame({"city": cities, "sales": rng.integers(5, 500, n), "growth": rng.normal(0.03, 0.1, n).round(3)})
df.to_csv("sales.csv", index=False)
print("cities:", len(df))
top = df.nlargest(8, "sales")
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(top.city, top.sales, color="#4c78a8")
ax.set_title("Top cities by sales")
ax.set_ylabel("sales")
fig.tight_layout()
plt.show()
print("total sales:", int(df.sales.sum()))
display(df)
df.describe().to_json("summary.json")
"""


def test_a_real_analysis_chart_table_and_files(host: Host) -> None:
    index, result = host.run({"code": ANALYSIS})
    sc = result["structuredContent"]
    assert sc["status"] == "ok", sc.get("error")
    view = host.view(index)
    expect(status(view)).to_have_attribute("data-status", "ok")
    # the code, highlighted
    expect(view.locator("[data-testid=code] .tok-keyword").first).to_be_visible()
    # the chart: loaded from its PNG file through resources/read, really decoded
    img = view.locator("[data-testid=output] img[data-testid=image]").first
    expect(img).to_be_visible()
    host.frame(index).wait_for_function(
        "() => { const i = document.querySelector('[data-testid=output] img[data-testid=image]');"
        " return i && i.complete && i.naturalWidth > 0 }"
    )
    assert img.evaluate("i => i.naturalWidth") > 100
    expect(view.locator("[data-testid=chart-caption]").first).to_contain_text("Top cities by sales")
    # prints and displays interleave: "cities" before the chart, "total" between the chart and the table
    order = view.locator("[data-testid=outputs] > *").evaluate_all(
        "els => els.map(e => e.dataset.testid === 'stdout' ? 'stdout:' + e.textContent.trim() : e.dataset.testid)"
    )
    assert order[:4] == ["stdout:cities: 30", "output", "stdout:total sales: " + str(_total(sc)), "output"], order
    # the DataFrame's table: 30 rows paged by 25, shape shown
    table = view.locator("[data-testid=table]")
    expect(table.locator("[data-testid=table-shape]")).to_contain_text("30 rows × 3 columns")
    rows = table.locator("[data-testid=table-row]")
    expect(rows).to_have_count(25)
    # sort by sales (numbers as numbers): ascending, then descending
    sales_header = table.locator("[data-testid=sort-header]", has_text="sales")
    sales_header.click()
    expect(sales_header).to_have_attribute("aria-sort", "ascending")
    values = _column(table, 2)
    assert values == sorted(values) and len(values) == 25
    sales_header.click()
    expect(sales_header).to_have_attribute("aria-sort", "descending")
    values = _column(table, 2)
    assert values == sorted(values, reverse=True)
    assert values[0] == max(r[1] for r in sc["outputs"][1]["table"]["rows"])
    # the second page has the rest
    table.locator("[data-testid=table-next]").click()
    expect(rows).to_have_count(5)
    expect(table.locator("[data-testid=table-info]")).to_have_text("26–30 of 30")
    table.locator("[data-testid=table-prev]").click()
    # the files, each with a download button
    files = view.locator("[data-testid=file]")
    names = files.locator(".file-name").all_inner_texts()
    assert {"sales.csv", "summary.json"} <= set(names), names
    expect(view.locator("[data-testid=download-button]")).to_have_count(len(names))
    expect(view.locator("[data-testid=container]")).to_contain_text("expires in")
    host.shot("analysis")
    # The README's picture: the view alone. docs/ gets it when it has none, or when asked (UPDATE_DOCS_SHOT=1),
    # so that every test run does not rewrite a committed image.
    host.page.locator(f"#view-{index}").screenshot(path=str(ARTIFACTS / "app-view.png"))
    if not DOCS_SHOT.exists() or os.environ.get("UPDATE_DOCS_SHOT") == "1":
        DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ARTIFACTS / "app-view.png", DOCS_SHOT)


def _total(sc: dict[str, Any]) -> int:
    return sum(r[1] for r in sc["outputs"][1]["table"]["rows"])


def _column(table: Any, col: int) -> list[float]:
    texts = table.locator(f"[data-testid=table-row] > :nth-child({col + 1})").all_inner_texts()
    return [float(t) for t in texts]


def test_sorting_by_keyboard_and_zoom(host: Host) -> None:
    code = "import pandas as pd\ndf = pd.DataFrame({'n': [10, 9, 100, 2], 'name': ['b', 'a', 'd', 'c']})\ndisplay(df)\n"
    index, _ = host.run({"code": code})
    view = host.view(index)
    header = view.locator("[data-testid=sort-header][data-col='0']")
    expect(header).to_have_text("n")
    header.locator("button").focus()
    host.page.keyboard.press("Enter")
    expect(header).to_have_attribute("aria-sort", "ascending")
    assert _column(view.locator("[data-testid=table]"), 1) == [2, 9, 10, 100]  # numeric, not 10 < 100 < 2 < 9
    # a figure zooms on click and Escape closes it
    index, _ = host.run({"code": "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"})
    view = host.view(index)
    img = view.locator("img[data-testid=image]")
    expect(img).to_be_visible()
    img.click()
    expect(view.locator("[data-testid=zoom-overlay]")).to_be_visible()
    host.page.keyboard.press("Escape")
    expect(view.locator("[data-testid=zoom-overlay]")).to_have_count(0)


def test_an_error_shows_its_traceback(host: Host) -> None:
    index, result = host.run({"code": "def ratio(a, b):\n    return a / b\n\nratio(1, 0)\n"})
    assert result["structuredContent"]["status"] == "error"
    view = host.view(index)
    expect(status(view)).to_have_attribute("data-status", "error")
    expect(view.locator("[data-testid=error-title]")).to_contain_text("ZeroDivisionError")
    tb = view.locator("[data-testid=traceback]")
    expect(tb).to_be_visible()
    expect(tb).to_contain_text("ratio")
    color = tb.evaluate("e => getComputedStyle(e).color")
    r, g, b = (int(x) for x in color[color.index("(") + 1 : color.index(")")].split(",")[:3])
    assert r > g and r > b, color  # red-ish
    host.shot("traceback")


def test_live_output_appears_before_the_run_ends(host: Host) -> None:
    code = "import time\nfor i in range(5):\n    print(i, flush=True)\n    time.sleep(1)\n"
    started = time.monotonic()
    index, result = host.run({"code": code, "wait_s": 1})
    assert result["structuredContent"]["status"] == "running"
    frame = host.frame(index)
    # The view polls get_run: output grows while the status is still running.
    frame.wait_for_function(
        "() => document.querySelector('[data-testid=status]')?.dataset.status === 'running'"
        " && [...document.querySelectorAll('[data-testid=stdout]')].map(e => e.textContent).join('').includes('1\\n')",
        timeout=6000,
    )
    seen_live_at = time.monotonic() - started
    host.shot("live-running")
    view = host.view(index)
    expect(status(view)).to_have_attribute("data-status", "ok", timeout=15_000)
    stdout = "".join(view.locator("[data-testid=stdout]").all_text_contents())
    assert stdout == "0\n1\n2\n3\n4\n"
    assert seen_live_at < 4.8, seen_live_at
    expect(view.locator("[data-testid=cancel-button]")).to_have_count(0)


def test_cancel_stops_a_run(host: Host) -> None:
    index, result = host.run({"code": "while True:\n    pass\n", "wait_s": 1})
    assert result["structuredContent"]["status"] == "running"
    view = host.view(index)
    cancel = view.locator("[data-testid=cancel-button]")
    expect(cancel).to_be_visible()
    cancel.click()
    expect(status(view)).to_have_attribute("data-status", "cancelled", timeout=20_000)
    expect(cancel).to_have_count(0)
    # the server agrees
    run_id = result["structuredContent"]["run_id"]
    again = host.page.evaluate("id => window.callTool('get_run', {run_id: id, wait_s: 0})", run_id)
    assert again["structuredContent"]["status"] == "cancelled"
    host.shot("cancelled")


def test_a_queued_run_waits_its_turn_then_shows_its_output(host: Host) -> None:
    first, r1 = host.run({"code": "import time\ntime.sleep(3)\n'first'", "wait_s": 0})
    second, r2 = host.run({"code": "print('second')", "wait_s": 0, "session_id": r1["structuredContent"]["session_id"]})
    assert r2["structuredContent"]["status"] == "queued", r2["structuredContent"]
    view = host.view(second)
    expect(status(view)).to_have_attribute("data-status", "queued")
    expect(view.locator("[data-testid=run-meta]")).to_contain_text("position 1 in the queue")
    expect(view.locator("[data-testid=run-meta]")).to_contain_text(r1["structuredContent"]["run_id"])
    expect(view.locator("[data-testid=cancel-button]")).to_be_visible()
    expect(status(view)).to_have_attribute("data-status", "ok", timeout=20_000)
    expect(view.locator("[data-testid=stdout]")).to_have_text("second\n")
    expect(status(host.view(first))).to_have_attribute("data-status", "ok")
    expect(host.view(first).locator("[data-testid=result]")).to_have_text("Out'first'")


DOWNLOADS = """\
import random
random.seed(11)
open("data.bin", "wb").write(bytes(range(256)) * 40 + b"\\x00\\xff\\r\\n")
open("notes.txt", "w", encoding="utf-8").write("héllo, wörld ✓\\r\\nline 2\\n")
open("big.bin", "wb").write(random.randbytes(4 * 1024 * 1024 + 123_457))
"""


def _expected_downloads() -> dict[str, bytes]:
    import random

    rnd = random.Random(11)
    return {
        "data.bin": bytes(range(256)) * 40 + b"\x00\xff\r\n",
        "notes.txt": "héllo, wörld ✓\r\nline 2\n".encode(),
        "big.bin": rnd.randbytes(4 * 1024 * 1024 + 123_457),
    }


def _download_all(host: Host, index: int, names: list[str]) -> dict[str, bytes]:
    view = host.view(index)
    got: dict[str, bytes] = {}
    for name in names:
        button = view.locator("[data-testid=file]", has_text=name).locator("[data-testid=download-button]")
        with host.page.expect_download(timeout=120_000) as info:
            button.click()
        download = info.value
        assert download.suggested_filename == name
        got[name] = Path(download.path()).read_bytes()
    return got


@pytest.mark.parametrize("mode", ["host", "blob"])
def test_downloads_give_the_exact_bytes(browser: Browser, base_url: str, mode: str) -> None:
    """Through the host's ui/download-file, and (a host without it) through a Blob and <a download>; big.bin is
    over the 4 MB of one resources/read, so it comes in parts through download_file."""
    host = open_host(browser, base_url, "" if mode == "host" else "?hostDownload=0")
    try:
        index, result = host.run({"code": DOWNLOADS})
        assert result["structuredContent"]["status"] == "ok"
        expected = _expected_downloads()
        got = _download_all(host, index, list(expected))
        for name, data in expected.items():
            assert hashlib.sha256(got[name]).hexdigest() == hashlib.sha256(data).hexdigest(), name
        assert got == expected
        expect(host.view(index).locator("[data-testid=download-done]")).to_have_count(3)
        if mode == "host":
            assert [d["name"] for d in host.page.evaluate("() => window.hostDownloads")] == list(expected)
    finally:
        host.page.context.close()


def test_the_views_csp_blocks_the_network(host: Host) -> None:
    index, _ = host.run({"code": "1 + 1"})
    frame = host.frame(index)
    expect(status(host.view(index))).to_have_attribute("data-status", "ok")
    csp = frame.evaluate("() => document.querySelector('meta[http-equiv=Content-Security-Policy]').content")
    assert "connect-src 'none'" in csp and "default-src 'none'" in csp
    outcome = frame.evaluate(
        """async () => {
            const violations = [];
            document.addEventListener('securitypolicyviolation', e => violations.push(e.effectiveDirective));
            let fetched;
            try { await fetch('https://example.com/'); fetched = 'fetched'; }
            catch (e) { fetched = 'rejected: ' + e; }
            const img = new Image();
            const loaded = await new Promise(r => { img.onload = () => r('loaded'); img.onerror = () => r('blocked');
                                                     img.src = 'https://example.com/x.png'; });
            await new Promise(r => setTimeout(r, 100));
            return { fetched, loaded, violations };
        }"""
    )
    assert outcome["fetched"].startswith("rejected"), outcome
    assert outcome["loaded"] == "blocked", outcome
    assert "connect-src" in outcome["violations"] and "img-src" in outcome["violations"], outcome


def test_dark_theme_and_a_narrow_screen(browser: Browser, base_url: str) -> None:
    host = open_host(browser, base_url, "?theme=dark", width=360)
    try:
        index, _ = host.run({"code": ANALYSIS})
        view = host.view(index)
        expect(status(view)).to_have_attribute("data-status", "ok")
        frame = host.frame(index)
        frame.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
        assert frame.evaluate("() => document.documentElement.dataset.theme") == "dark"
        bg = frame.evaluate("() => getComputedStyle(document.body).backgroundColor")
        assert _luma(bg) < 60, bg
        # 360 px: no horizontal page scroll, in the view or the host; wide things scroll inside their boxes
        assert frame.evaluate("() => document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        assert host.page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
        host.shot("dark-360")
        host.page.evaluate("() => window.setTheme('light')")
        frame.wait_for_function("() => document.documentElement.dataset.theme === 'light'")
        assert _luma(frame.evaluate("() => getComputedStyle(document.body).backgroundColor")) > 200
    finally:
        host.page.context.close()


def _luma(css: str) -> float:
    r, g, b = (float(x) for x in css[css.index("(") + 1 : css.index(")")].replace(" ", "").split(",")[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


PIXEL_PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c63f8cfc0f01f0005000201a5f6e9e40000000049454e44ae426082"
    )
).decode()


SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20"><rect width="40" height="20" fill="red"/></svg>'


def _synthetic() -> dict[str, Any]:
    rows = [[f"r{i}", (i * 7) % 60, None if i == 3 else i / 2] for i in range(60)]
    stdout = "one\ntwo\nthree\n"
    return {
        "session_id": "s_synthetic",
        "container_id": "c1",
        "backend": "local",
        "status": "error",
        "stdout": stdout,
        "stderr": "a warning on stderr\n",
        "result": None,
        "error": {"type": "ValueError", "message": "bad", "traceback": "Traceback\n  \x1b[31mValueError\x1b[0m: bad"},
        "json": {"total": 3, "items": [{"a": 1}, {"a": "x"}]},
        "json_error": {"message": "1 violation", "violations": [{"path": "$.items[1].a", "message": "not a number"}]},
        "files": [],
        "outputs": [
            {
                "kind": "display",
                "data": {"text/markdown": "**bold** <script>alert(1)</script> [x](javascript:alert(1))"},
                "stdout_at": 4,
            },
            {"kind": "display", "data": {"image/png": PIXEL_PNG, "text/plain": "<pixel>"}, "stdout_at": 8},
            {
                "kind": "display",
                "data": {"text/html": "<b>hi</b><script>parent.postMessage('x','*')</script>", "text/plain": "hi"},
                "stdout_at": None,
            },
            {"kind": "display", "data": {"image/svg+xml": SVG, "text/plain": "svg"}, "stdout_at": 999},
            {"kind": "display", "data": {"application/json": {"k": [1, 2, {"deep": True}]}, "text/plain": "{}"}},
            {"kind": "display", "data": {"text/latex": "$x^2$", "text/plain": "x**2"}},
            {
                "kind": "result",
                "data": {"text/plain": "frame"},
                "table": {
                    "columns": ["name", "v", "half"],
                    "rows": rows,
                    "index": list(range(60)),
                    "shape": [1000, 3],
                    "truncated": True,
                },
            },
        ],
        "container": {
            "id": "c1",
            "expires_at": "2099-01-01T00:00:00Z",
            "state_lost": True,
            "state_restored": {
                "from_run": 4,
                "restored": ["df", "model"],
                "skipped": [{"name": "fh", "reason": "open file"}],
                "seconds": 0.2,
            },
            "isolation": "bubblewrap",
        },
        "truncated": True,
        "warnings": ["something to know"],
        "duration_ms": 1234.0,
        "execution_count": 5,
    }


def test_every_part_of_a_result_renders(host: Host) -> None:
    """A hand-made RunResult with every kind of part (the contract), fed to the view as a tool result."""
    sc = _synthetic()
    index = host.show(
        {"code": "print('one')"}, {"content": [{"type": "text", "text": "x"}], "structuredContent": sc, "isError": True}
    )
    view = host.view(index)
    expect(status(view)).to_have_text("failed")
    expect(view.locator("[data-testid=run-meta]")).to_contain_text("cell [5]")
    # stdout split at stdout_at: one | markdown | two | png | three | then the rest
    # (html with no stdout_at, svg past the end, json, latex, table with none)
    order = view.locator("[data-testid=outputs] > *").evaluate_all(
        "els => els.map(e => e.dataset.testid === 'stdout'"
        " ? e.textContent : e.querySelector('[data-testid]')?.dataset.testid)"
    )
    assert order == [
        "one\n",
        "markdown",
        "two\n",
        "image",
        "three\n",
        "html-output",
        "image",
        "json-tree",
        "latex",
        "table",
    ], order
    md = view.locator("[data-testid=markdown]")
    expect(md.locator("strong")).to_have_text("bold")
    assert md.locator("script").count() == 0 and md.locator("a").count() == 0  # text, and no javascript: link
    expect(md).to_contain_text("<script>alert(1)</script>")
    frame_el = view.locator("[data-testid=html-output]")
    assert frame_el.get_attribute("sandbox") == ""  # no scripts, no same origin
    html_frame = frame_el.element_handle().content_frame()
    assert html_frame is not None
    expect(html_frame.locator("b")).to_have_text("hi")
    assert html_frame.evaluate("() => document.scripts.length") == 1  # there, but never run (sandbox="")
    frame = host.frame(index)
    frame.wait_for_function(
        "() => [...document.querySelectorAll('img[data-testid=image]')].every(i => i.naturalWidth > 0)"
    )
    expect(view.locator("[data-testid=traceback]")).to_have_text("Traceback\n  ValueError: bad")  # ANSI dropped
    expect(view.locator("[data-testid=stderr]")).to_contain_text("a warning on stderr")
    expect(view.locator("[data-testid=json-status]")).to_contain_text("does not match")
    expect(view.locator("[data-testid=json-violations]")).to_contain_text("$.items[1].a")
    expect(view.locator("[data-testid=json] [data-testid=json-tree]")).to_contain_text("total")
    expect(view.locator("[data-testid=state-lost]")).to_be_visible()
    expect(view.locator("[data-testid=state-restored]")).to_contain_text("from run [4]")
    expect(view.locator("[data-testid=state-restored]")).to_contain_text("fh — open file")
    expect(view.locator("[data-testid=warnings]")).to_contain_text("something to know")
    expect(view.locator("[data-testid=truncated]")).to_be_visible()
    table = view.locator("[data-testid=table]")
    expect(table.locator("[data-testid=table-shape]")).to_contain_text("1,000 rows × 3 columns · first 60 shown")
    table.locator("[data-testid=sort-header]", has_text="half").click()
    # missing values stay last; numbers ascend
    halves = table.locator("[data-testid=table-row] > :nth-child(4)").all_inner_texts()
    assert halves[:3] == ["0", "0.5", "1"], halves
    table.locator("[data-testid=table-next]").click()
    table.locator("[data-testid=table-next]").click()
    last = table.locator("[data-testid=table-row] > :nth-child(4)").all_inner_texts()
    assert last[-1] == "" and len(last) == 10
    host.shot("synthetic")
