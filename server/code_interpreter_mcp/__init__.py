"""code-interpreter-mcp: an MCP server that runs Python in a stateful sandbox and gives every file back.

Layout (each subpackage's `__init__` says what each of its modules owns and where a new feature goes):
- `app/`: the MCP face (tools, content, resources, auth) and `cli`: the command line. Both are thin faces over
- `engine/`: the core (containers, runs, harvest, JSON, result budgets, files), which knows no MCP types, over
- `backends/`: where code runs (`base` is the protocol; `local/` bubblewrap workers, `openai/` hosted containers),
  which know neither MCP nor the registry.
- Beside them: `sessions` (the SQLite registry), `artifacts` (harvested files on disk), `structured/` (JSON
  markers, extraction, schema validation), `packages/` (package sets on demand), `models` (the tool contract),
  `config` (settings), `errors` (the error taxonomy).
"""

__version__ = "0.1.0"
