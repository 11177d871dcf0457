"""code-interpreter-mcp: an MCP server that runs Python in a stateful sandbox and gives every file back."""

__version__ = "0.1.0"
