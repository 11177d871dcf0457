"""The MCP face: a thin layer over the engine that speaks MCP.

Modules, one responsibility each:
- `server`: the MCPServer subclass and `build_server` (lifespan, auth options, assembly of the parts below);
- `tools`: one short function per tool (argument shapes, descriptions, the engine call);
- `content`: results and errors onto MCP content per client (summaries or the whole result as text, images,
  embedded files, links, ToolError), within the result budget;
- `clients`: which client asks (negotiated protocol version, the name it gives) and the `ClientProfile` that
  `content` and the tool listing follow (clients that drop `content`, `RESULT_SHAPE`, `RESOURCE_LINKS`);
- `resources`: the file resource template and reading a file with its own mime type;
- `context`: the engine and the session a call uses, from the MCP connection;
- `auth`: the static bearer-token verifier and the owner each token stands for;
- `schemas`: the flat output schemas every tool publishes (none to clients that read only `content`).
- `tasks`: MCP tasks (the 2025-11-25 capability, the 2026-07-28 extension) over the engine's runs.

Where coming features go: a new tool (`get_run`, `cancel_run`) is one `@tool` function in `tools`, returning
`content.<x>_result(out, client_profile(ctx, settings))`; another client quirk is an entry in `clients`; MCP
tasks are an `Extension` in a module of their own, handed to the server in `server`. Everything else is the
engine's: nothing here decides how code runs or where files live.
"""

from __future__ import annotations

from .auth import StaticTokenVerifier
from .server import INSTRUCTIONS, CodeInterpreterServer, build_server
from .tools import RUN_CODE_DESCRIPTION

__all__ = ["INSTRUCTIONS", "RUN_CODE_DESCRIPTION", "CodeInterpreterServer", "StaticTokenVerifier", "build_server"]
