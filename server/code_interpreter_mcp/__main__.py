"""`python -m code_interpreter_mcp` is the same as the `code-interpreter-mcp` command."""

from .cli import main

if __name__ == "__main__":
    main()
