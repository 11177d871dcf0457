"""The MCP App view of a run (`io.modelcontextprotocol/ui`, SEP-1865): one self-contained HTML file, built from
`ui/` and shipped in the package, served as `ui://code-interpreter/run` through the SDK's own `Apps` extension.

`run_code` and `get_run` point at it with `_meta.ui` only for a client that negotiated the extension (and listed
the app MIME type): every other client gets today's `tools/list`, byte for byte. The view talks to the server
only through the host's bridge (get_run, cancel_run, resources/read, download_file); its CSP names no domain.
`APP_VIEW=off` takes the resource, the capability and the `_meta.ui` keys away.
"""

from __future__ import annotations

import logging
from functools import cache
from importlib import resources
from typing import Any

from mcp.server.apps import Apps, ResourceCsp, client_supports_apps
from mcp.types import ListToolsResult

from ..config import Settings

logger = logging.getLogger(__name__)

VIEW_URI = "ui://code-interpreter/run"
VIEW_FILE = "run_view.html"
VIEW_TOOLS = frozenset({"run_code", "get_run"})
UI_META = {"resourceUri": VIEW_URI, "visibility": ["model", "app"]}
# No outside origin at all: the view's scripts and styles are inline, images are data:/blob: URLs.
CSP = ResourceCsp(connect_domains=[], resource_domains=[], frame_domains=[], base_uri_domains=[])


@cache
def view_html() -> str | None:
    """The built view, or None when this checkout has none (built by scripts/build_ui.sh)."""
    try:
        return resources.files("code_interpreter_mcp.app").joinpath("static", VIEW_FILE).read_text("utf-8")
    except (FileNotFoundError, OSError) as exc:
        logger.warning("the app view is off: %s is missing (%s); run scripts/build_ui.sh", VIEW_FILE, exc)
        return None


def view_extension(settings: Settings) -> Apps | None:
    """The Apps extension serving the view, or None when it is turned off or not built."""
    if settings.app_view == "off":
        return None
    html = view_html()
    if html is None:
        return None
    apps = Apps()
    apps.add_html_resource(
        VIEW_URI,
        html,
        name="run",
        title="Code Interpreter run",
        description="A run as a notebook cell: code, live output, charts, tables, errors, files, a Cancel button.",
        csp=CSP,
        prefers_border=True,
    )
    return apps


def negotiated(ctx: Any) -> bool:
    """Did this request's client negotiate MCP Apps (extension declared, app MIME type listed)?"""
    try:
        return client_supports_apps(ctx)
    except (AttributeError, TypeError):  # no session or capabilities on this request
        return False


def with_view(listed: ListToolsResult) -> ListToolsResult:
    """`tools/list` for a client that renders apps: the run tools point at the view."""
    tools = []
    for tool in listed.tools:
        if tool.name in VIEW_TOOLS:
            meta = dict(tool.meta or {})
            meta["ui"] = dict(UI_META)
            tool = tool.model_copy(update={"meta": meta})
        tools.append(tool)
    return listed.model_copy(update={"tools": tools})
