"""The floor: a minimal mcp 2.3 stdio server whose one tool evaluates `1+1` in-process (no sandbox, no files)."""

from mcp.server.mcpserver import MCPServer

mcp = MCPServer("minimal")


@mcp.tool()
def run_code(code: str) -> dict[str, str]:
    """Evaluate an expression."""
    return {"result": repr(eval(code))}  # the benchmark's floor only, never shipped


if __name__ == "__main__":
    mcp.run()
