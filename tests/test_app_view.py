"""The MCP App view's protocol: the `ui://` resource (mime type, CSP, one self-contained file), `_meta.ui` on the run
tools only for clients that negotiated MCP Apps (both protocol eras), today's `tools/list` for everyone else, and
`APP_VIEW=off`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.extension import ClientExtension

from code_interpreter_mcp.app import build_server
from code_interpreter_mcp.app.view import VIEW_URI, view_html
from code_interpreter_mcp.config import Settings

pytestmark = pytest.mark.anyio
APP_MIME = "text/html;profile=mcp-app"
ERAS = ["legacy", "2026-07-28"]


class AppsClient(ClientExtension):
    identifier = "io.modelcontextprotocol/ui"

    def __init__(self, mime_types: list[str] | None = None) -> None:
        self._mime = [APP_MIME] if mime_types is None else mime_types

    def settings(self) -> dict[str, Any]:
        return {"mimeTypes": self._mime}


def _dumped_tools(listed: Any) -> list[dict[str, Any]]:
    return [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in listed.tools]


@pytest.mark.parametrize("mode", ERAS)
async def test_meta_ui_only_for_clients_that_negotiate(tmp_path: Path, mode: str) -> None:
    server = build_server(Settings(data_dir=tmp_path / "d"))
    async with Client(server, mode=mode, extensions=[AppsClient()]) as client:
        with_apps = {t["name"]: t for t in _dumped_tools(await client.list_tools())}
    for name in ("run_code", "get_run"):
        assert with_apps[name]["_meta"]["ui"] == {"resourceUri": VIEW_URI, "visibility": ["model", "app"]}
    assert "ui" not in with_apps["list_container_files"].get("_meta", {})

    async with Client(server, mode=mode) as plain_client:
        plain = _dumped_tools(await plain_client.list_tools())
    async with Client(server, mode=mode, extensions=[AppsClient(mime_types=["text/html"])]) as other:
        without_mime = _dumped_tools(await other.list_tools())
    off = build_server(Settings(data_dir=tmp_path / "o", app_view="off"))
    async with Client(off, mode=mode, extensions=[AppsClient()]) as client:
        turned_off = _dumped_tools(await client.list_tools())
    assert all("ui" not in t.get("_meta", {}) for t in plain)
    assert plain == without_mime == turned_off  # exactly as without the view


@pytest.mark.parametrize("mode", ERAS)
async def test_the_view_resource(tmp_path: Path, mode: str) -> None:
    async with Client(build_server(Settings(data_dir=tmp_path / "d")), mode=mode) as client:
        listed = await client.list_resources()
        [entry] = [r for r in listed.resources if str(r.uri) == VIEW_URI]
        assert entry.mime_type == APP_MIME
        read = await client.read_resource(VIEW_URI)
    [content] = read.contents
    assert content.mime_type == APP_MIME
    meta = content.model_dump(by_alias=True).get("_meta") or entry.model_dump(by_alias=True).get("_meta") or {}
    csp = meta["ui"]["csp"]
    assert csp == {"connectDomains": [], "resourceDomains": [], "frameDomains": [], "baseUriDomains": []}
    html = content.text  # type: ignore[union-attr]
    assert html == view_html() and html.lstrip().lower().startswith("<!doctype html>")
    # One self-contained file: nothing loaded from anywhere, and a CSP of its own that allows no connection.
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=[\"']?(https?:)?//", html, re.I)
    policy = re.search(r'http-equiv="Content-Security-Policy"\s+content="([^"]+)"', html)
    assert policy is not None and "connect-src 'none'" in policy.group(1) and "default-src 'none'" in policy.group(1)


async def test_app_view_off_serves_no_resource(tmp_path: Path) -> None:
    async with Client(build_server(Settings(data_dir=tmp_path / "d", app_view="off"))) as client:
        listed = await client.list_resources()
    assert all(str(r.uri) != VIEW_URI for r in listed.resources)
