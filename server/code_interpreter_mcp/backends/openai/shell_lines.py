"""`!cmd` lines of a cell, made plain Python for the hosted Code Interpreter.

The hosted tool runs the Python it is given; this server does not rely on it being an IPython kernel (and the model
is asked to run the code verbatim, so what it is given must be Python). A line `!cmd` becomes one line that runs
`cmd` in the container's shell and prints its output, stderr folded into stdout in order (as a notebook shows
both in the cell's output), and `x = !cmd` assigns its output's lines, like IPython's. A cell that is plain Python
already is sent unchanged, so a `!` inside a string is never touched; `%` magics are sent as written. Knows
nothing of the API.
"""

from __future__ import annotations

import ast
import re

_BANG = re.compile(r"^(?P<indent>[ \t]*)(?:(?P<target>[A-Za-z_][\w.]*)[ \t]*=[ \t]*)?!(?!=)(?P<cmd>.*)$")
_RUN = '__import__("subprocess").run({cmd!r}, shell=True, stdout=-1, stderr={stderr}, text=True).stdout'


def _is_python(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def translate(code: str) -> str:
    """The cell with its `!cmd` lines as Python (unchanged when it is Python already or has none)."""
    if "!" not in code or _is_python(code):
        return code
    lines = code.split("\n")
    changed = False
    for i, line in enumerate(lines):
        m = _BANG.match(line)
        if m is None or not m.group("cmd").strip():
            continue
        cmd, indent, target = m.group("cmd").strip(), m.group("indent"), m.group("target")
        if target:
            lines[i] = f"{indent}{target} = {_RUN.format(cmd=cmd, stderr=-3)}.splitlines()"
        else:
            lines[i] = f'{indent}print({_RUN.format(cmd=cmd, stderr=-2)}, end="")'
        changed = True
    return "\n".join(lines) if changed else code
