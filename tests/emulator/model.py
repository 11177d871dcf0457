"""The emulator's "model": which code to run, and what to answer. Deterministic, no intelligence.

Convention (the openai backend follows it): the code to run is the first fenced block in the request's input
whose info string is `python` (else the first fenced block). A fence is a line of 3 or more backticks; the block
ends at the next line made of exactly the same fence, so code containing ``` is sent with a longer fence.
Instructions that contain `===BEGIN_JSON <nonce>===` ask for a JSON marker block in the answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_FENCE_RE = re.compile(r"(`{3,})[ \t]*([^\s`]*)[ \t]*")
_NONCE_RE = re.compile(r"===BEGIN_JSON ([^\s=]+)===")
_BLOCK_RE = re.compile(r"===BEGIN_JSON(?: [^\s=]+)?===(.*?)===END_JSON(?: [^\s=]+)?===", re.DOTALL)
_LINK_RE = re.compile(r"sandbox:/mnt/data/[^\s)\]]+")


def input_text(value: Any) -> str:
    """All the text of a Responses `input` (a string, or a list of messages with string or part contents)."""
    if isinstance(value, str):
        return value
    out: list[str] = []
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict):
                content = item.get("content", item.get("text"))
                if isinstance(content, str):
                    out.append(content)
                elif isinstance(content, list):
                    out.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return "\n".join(out)


def extract_code(text: str) -> str | None:
    lines = text.split("\n")
    blocks: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        m = _FENCE_RE.fullmatch(lines[i])
        if m:
            fence, info = m.group(1), m.group(2).lower()
            for j in range(i + 1, len(lines)):
                if lines[j].rstrip() == fence:
                    blocks.append((info, "\n".join(lines[i + 1 : j])))
                    i = j
                    break
        i += 1
    for info, code in blocks:
        if info in ("python", "py", "python3"):
            return code
    return blocks[0][1] if blocks else None


def sentinel_nonce(instructions: str | None) -> str | None:
    m = _NONCE_RE.search(instructions or "")
    return m.group(1) if m else None


def printed_json(logs: str) -> str | None:
    """The JSON of the last marker block (with or without a nonce) the code printed, if it parses."""
    blocks = _BLOCK_RE.findall(logs)
    if not blocks:
        return None
    raw = blocks[-1].strip()
    try:
        json.loads(raw)
    except ValueError:
        return None
    return raw


@dataclass
class Citation:
    file_id: str
    filename: str
    start: int
    end: int


def links_in(text: str) -> list[tuple[str, int, int]]:
    """(path, start, end) of every sandbox:/mnt/data link in a text."""
    return [(m.group(0)[len("sandbox:") :], m.start(), m.end()) for m in _LINK_RE.finditer(text)]


def summary_text(logs: str, error: bool, files: list[str], nonce: str | None, json_text: str | None) -> str:
    """The model's brief answer: one sentence (or, when a marker block is asked for, the block instead of the
    sentence, as the run's instructions say), and a link per new file."""
    parts = []
    if nonce is None or json_text is None:
        parts.append("The code raised an error; see the logs." if error else "I ran the code.")
        if logs.strip() and not error:
            last = logs.strip().splitlines()[-1][:200]
            parts[0] += f" Last output line: {last}"
    if files:
        parts.append("Files:\n" + "\n".join(f"- [{p.rsplit('/', 1)[-1]}](sandbox:{p})" for p in files))
    if nonce is not None and json_text is not None:
        parts.append(f"===BEGIN_JSON {nonce}===\n{json_text}\n===END_JSON {nonce}===")
    return "\n\n".join(parts)


def first_json_in(text: str) -> str | None:
    """The first JSON object or array embedded in a text (the default repair answer)."""
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                value, _ = decoder.raw_decode(text, i)
            except ValueError:
                continue
            return json.dumps(value)
    return None
