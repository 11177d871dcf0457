"""The emulator's per-container Python kernel: a persistent namespace that runs cells, like Code Interpreter.

Run as a script (never imported by the server): `python _worker.py <reply_fd>`. Reads one JSON request per line
on stdin ({"code": str, "cell": int}) and writes one JSON reply per line on reply_fd:
{"logs": str, "error": bool, "value_json": str | null}. The code's stdout and stderr are captured together, a
traceback is appended on error, and the repr of the last expression is appended like a notebook's Out[] line.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import linecache
import os
import sys
import traceback


def _format_error(exc: BaseException, filename: str) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    lines = ["Traceback (most recent call last):\n"]
    lines.extend(traceback.format_list(frames))
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return "".join(lines)


def run_cell(code: str, cell: int, namespace: dict[str, object]) -> dict[str, object]:
    filename = f"<cell-{cell}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    buffer = io.StringIO()
    value: object = None
    failed = False
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            tree = ast.parse(code, filename, "exec")
            last: ast.Expression | None = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, filename, "exec"), namespace)
            if last is not None:
                value = eval(compile(last, filename, "eval"), namespace)
        except BaseException as exc:  # a cell never kills the kernel, not even SystemExit
            failed = True
            buffer.write(_format_error(exc, filename))
    logs = buffer.getvalue()
    value_json = None
    if not failed and value is not None:
        logs += repr(value) + "\n"
        try:
            value_json = json.dumps(value)
        except (TypeError, ValueError):
            value_json = None
    return {"logs": logs, "error": failed, "value_json": value_json}


def main() -> None:
    reply = os.fdopen(int(sys.argv[1]), "w", encoding="utf-8")
    namespace: dict[str, object] = {"__name__": "__main__"}
    for line in sys.stdin:
        request = json.loads(line)
        result = run_cell(request["code"], request["cell"], namespace)
        reply.write(json.dumps(result) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
