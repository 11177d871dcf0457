"""Every tool's result within the result budget (text plus structuredContent at about 4 characters a token; images
within their own caps), whatever the run did: 10,000 files, an 800 KB CSV, a 900 KB binary, a 2 MB PNG, 1 MB of
stdout; paging a 5 MB text file back byte for byte; one PNG for a figure saved without being closed. Through a
real in-memory MCP client on the real local backend."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.types import CallToolResult, EmbeddedResource, ImageContent, ResourceLink, TextContent

from code_interpreter_mcp.app import build_server
from code_interpreter_mcp.config import Settings
from tests.helpers import structured, text_of

pytestmark = pytest.mark.anyio

SETTINGS = Settings()
BUDGET = SETTINGS.result_budget_tokens * 4


def measure(r: CallToolResult) -> int:
    """Characters of the result as the budget counts them (independently of the server's own count)."""
    total = (
        len(json.dumps(r.structured_content, ensure_ascii=False, separators=(",", ":"))) if r.structured_content else 0
    )
    for c in r.content:
        if isinstance(c, TextContent):
            total += len(c.text)
        elif isinstance(c, EmbeddedResource):
            res = c.resource
            total += len(str(res.uri)) + len(getattr(res, "text", None) or getattr(res, "blob", ""))
        elif isinstance(c, ResourceLink):
            total += len(c.model_dump_json(by_alias=True, exclude_none=True))
    return total


def check_budget(r: CallToolResult, settings: Settings = SETTINGS) -> CallToolResult:
    assert measure(r) <= settings.result_budget_tokens * 4, measure(r)
    images = [base64.b64decode(c.data) for c in r.content if isinstance(c, ImageContent)]
    assert len(images) <= settings.max_inline_images
    assert sum(len(i) for i in images) <= settings.inline_images_total_bytes
    assert all(len(i) <= settings.inline_image_max_bytes for i in images)
    return r


@pytest.fixture
async def client(tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "data", default_timeout_s=120, box_size_mb=200)
    async with Client(build_server(settings), raise_exceptions=True) as c:
        yield c


async def call(client: Client, tool: str, **args: Any) -> CallToolResult:
    return check_budget(await client.call_tool(tool, args))


async def every_other_tool(client: Client, file_id: str) -> None:
    """list, download, upload and close, each within the budget."""
    await call(client, "list_container_files")
    await call(client, "list_container_files", all_containers=True)
    await call(client, "download_file", file=file_id)
    await call(client, "upload_file", name="up.bin", content_base64=base64.b64encode(b"u" * 300_000).decode())
    await call(client, "close_session")


async def test_ten_thousand_files(client: Client) -> None:
    code = "import os\nos.makedirs('many')\nfor i in range(10000):\n    open(f'many/f{i:05d}.txt', 'w').write(str(i))\n"
    code += "open('summary.csv', 'w').write('a,b\\n')\n"
    r = await call(client, "run_code", code=code)
    s = structured(r)
    assert s["status"] == "ok", s
    assert 0 < len(s["files"]) <= 50
    assert s["files"][0]["path"] == "summary.csv"  # named by the code, so listed first
    assert s["more_files"]["count"] == 10001 - len(s["files"])
    assert "list_container_files" in s["more_files"]["hint"]
    assert len(r.content) <= 1 + 50

    seen: list[str] = []
    cursor = None
    while True:
        args: dict[str, Any] = {"limit": 1000}
        if cursor:
            args["cursor"] = cursor
        page = structured(await call(client, "list_container_files", **args))
        assert page["total"] == 10001
        seen.extend(f["path"] for f in page["files"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 10001 and seen == sorted(seen)
    only = structured(await call(client, "list_container_files", pattern="f0999*"))
    assert [f["name"] for f in only["files"]] == [f"f0999{i}.txt" for i in range(10)] and only["total"] == 10
    await every_other_tool(client, s["files"][0]["file_id"])


async def test_big_csv_pages_within_the_budget(client: Client) -> None:
    code = "rows = ['id,name,value'] + [f'{i},name{i},{i * 1.5}' for i in range(40000)]\n"
    code += "open('data.csv', 'w').write('\\n'.join(rows))\nimport os; os.path.getsize('data.csv')"
    s = structured(await call(client, "run_code", code=code))
    size = int(s["result"])
    assert size > 800_000
    d = await call(client, "download_file", file="data.csv")
    out = structured(d)
    assert out["inline"] and out["truncated"] and 0 < out["next_offset"] < size
    assert "offset=" in out["hint"]
    body = [c for c in d.content if isinstance(c, EmbeddedResource)]
    assert body[0].resource.text.startswith("id,name,value\n0,name0,0.0")
    assert any(isinstance(c, ResourceLink) for c in d.content)  # the rest is behind the link
    await every_other_tool(client, s["files"][0]["file_id"])


async def test_five_megabyte_text_reassembles_byte_for_byte(client: Client) -> None:
    # Multi-byte characters everywhere, so parts must end on character boundaries.
    code = (
        "import hashlib\nline = 'é日本 data ' * 7 + '\\n'\ntext = ''.join(f'{i:07d} {line}' for i in range(60000))\n"
        "data = text.encode()\nopen('big.txt', 'wb').write(data)\n(len(data), hashlib.sha256(data).hexdigest())"
    )
    s = structured(await call(client, "run_code", code=code))
    size, digest = eval(s["result"])
    assert size > 5_000_000
    parts: list[bytes] = []
    offset: int | None = 0
    while offset is not None:
        d = await call(client, "download_file", file="big.txt", offset=offset)
        out = structured(d)
        assert out["offset"] == offset
        text = next(c.resource.text for c in d.content if isinstance(c, EmbeddedResource))
        parts.append(text.encode())
        offset = out["next_offset"]
    data = b"".join(parts)
    assert len(data) == size and hashlib.sha256(data).hexdigest() == digest
    small = structured(await call(client, "download_file", file="big.txt", offset=9, max_bytes=10))
    assert small["offset"] == 9 and 0 < small["next_offset"] - 9 <= 10


async def test_big_binary_is_linked_not_inlined(client: Client) -> None:
    s = structured(await call(client, "run_code", code="import os\nopen('blob.bin', 'wb').write(os.urandom(900_000))"))
    d = await call(client, "download_file", file="blob.bin")
    out = structured(d)
    assert out["inline"] is False and out["saved_to"] == s["files"][0]["local_path"]  # stdio: the host path
    assert not any(isinstance(c, EmbeddedResource) for c in d.content)
    assert any(isinstance(c, ResourceLink) and c.uri == s["files"][0]["uri"] for c in d.content)
    part = await call(client, "download_file", file="blob.bin", offset=1000, max_bytes=5000)
    blob = next(c.resource.blob for c in part.content if isinstance(c, EmbeddedResource))
    assert base64.b64decode(blob) == Path(s["files"][0]["local_path"]).read_bytes()[1000:6000]
    assert structured(part)["next_offset"] == 6000
    await every_other_tool(client, s["files"][0]["file_id"])


async def test_big_png_comes_back_as_a_preview(client: Client) -> None:
    pytest.importorskip("PIL")
    code = (
        "import os\nfrom PIL import Image\nimg = Image.frombytes('RGB', (900, 900), os.urandom(900 * 900 * 3))\n"
        "img.save('noise.png')\nos.path.getsize('noise.png')"
    )
    r = await call(client, "run_code", code=code)
    s = structured(r)
    assert int(s["result"]) > 2_000_000
    assert [c for c in r.content if isinstance(c, ImageContent)]  # a preview, within the image cap
    assert any(isinstance(c, ResourceLink) for c in r.content)  # and the full file linked
    d = await call(client, "download_file", file="noise.png")
    out = structured(d)
    assert out["inline"] and out["preview"]
    assert [c for c in d.content if isinstance(c, ImageContent)]
    assert any(isinstance(c, ResourceLink) for c in d.content)
    await every_other_tool(client, s["files"][0]["file_id"])


async def test_a_megabyte_of_stdout(client: Client) -> None:
    r = await call(client, "run_code", code="print('x' * 1_000_000)\nprint('THE END')")
    s = structured(r)
    assert s["truncated"] and s["stdout"].rstrip().endswith("THE END")
    assert "THE END" in text_of(r)
    await call(client, "list_container_files")
    await call(client, "close_session")


async def test_a_small_budget_holds_too(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", result_budget_tokens=2000)
    async with Client(build_server(settings), raise_exceptions=True) as c:
        code = "import os\nfor i in range(300):\n    open(f'file_{i:03d}.txt', 'w').write('x')\nprint('y' * 50000)"
        r = check_budget(await c.call_tool("run_code", {"code": code}), settings)
        assert structured(r)["more_files"]["count"] > 0
        check_budget(await c.call_tool("list_container_files", {}), settings)
        check_budget(await c.call_tool("download_file", {"file": "file_000.txt"}), settings)


async def test_savefig_without_close_gives_one_png(client: Client) -> None:
    pytest.importorskip("matplotlib")
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.savefig('revenue.png')\n"
    s = structured(await call(client, "run_code", code=code))
    assert [f["path"] for f in s["files"]] == ["revenue.png"]
    # The figure was closed after the run: a later run does not save it again.
    again = structured(await call(client, "run_code", code="1 + 1"))
    assert again["files"] == []
    # A figure left open and never saved is still auto-saved, once.
    s = structured(await call(client, "run_code", code="import matplotlib.pyplot as plt\nplt.plot([3, 2, 1])"))
    assert len([f for f in s["files"] if f["path"].endswith(".png")]) == 1
