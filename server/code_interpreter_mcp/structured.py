"""Structured output: the JSON-result markers, extracting the JSON they carry, and validating it against a schema.

This module owns everything about `output_schema` that needs no backend and no model:
- the per-run nonce and the marker lines (`===BEGIN_JSON <nonce>===` … `===END_JSON <nonce>===`), and the text that
  tells the model to use them;
- extraction of the last complete marker block with a real JSON decoder (any depth; braces and even marker strings
  inside JSON strings cannot confuse it, unlike a regex);
- schema checking (any draft jsonschema knows, never touching the network) and validation into `Violation`s with JSON
  paths such as `$.items[2].price`;
- whether a schema fits OpenAI's strict structured outputs.

Everything here is synchronous and CPU-bound. Texts and values can be large (megabytes), so async callers should run
`extract_*`, `parse_json_text` and `validate` through `anyio.to_thread.run_sync`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import referencing
import referencing.exceptions
import referencing.jsonschema
from jsonschema import exceptions as js_exceptions
from jsonschema import validators as js_validators
from jsonschema.protocols import Validator
from jsonschema_specifications import REGISTRY as METASCHEMAS

from code_interpreter_mcp.errors import InvalidSchema
from code_interpreter_mcp.models import JsonError, Violation

logger = logging.getLogger(__name__)

__all__ = [
    "Extracted",
    "check_schema",
    "extract_from_sources",
    "extract_last_block",
    "is_strict_compatible",
    "json_error_from",
    "json_path",
    "markers",
    "new_nonce",
    "parse_json_text",
    "sentinel_instructions",
    "validate",
]

# Violation messages quote the offending instance; a 1 MB value must not end up in a tool result.
_MAX_MESSAGE_CHARS = 300
# Enough to fix a result; beyond this the list is cut and a last entry says how many more there were.
MAX_VIOLATIONS = 50

_WS_RE = re.compile(r"\s*")
# An opening code fence right after the BEGIN marker (models like to wrap JSON in ```json even when told not to).
_FENCE_OPEN_RE = re.compile(r"```[ \t]*(?:json)?[ \t]*", re.IGNORECASE)
_FENCE_CLOSE = "```"
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# --------------------------------------------------------------------------------------------------------------------
# Nonce and markers


def new_nonce() -> str:
    """A fresh per-run nonce: 128 random bits as 32 hex digits."""
    return secrets.token_hex(16)


def markers(nonce: str | None) -> tuple[str, str]:
    """The BEGIN and END marker strings for `nonce`, or the plain ones (local backend) when `nonce` is None."""
    if nonce is None:
        return "===BEGIN_JSON===", "===END_JSON==="
    if not nonce or any(ch.isspace() for ch in nonce) or "=" in nonce:
        raise ValueError("a marker nonce must be a non-empty string without whitespace or '='")
    return f"===BEGIN_JSON {nonce}===", f"===END_JSON {nonce}==="


def code_prints_block(code: str) -> bool:
    """Whether the code prints its own plain marker block (the documented way on both backends): then the model
    need not be asked for one, and the JSON comes from the code's output at no extra model tokens."""
    return markers(None)[0] in code


def sentinel_instructions(nonce: str, schema: dict[str, Any]) -> str:
    """Appended to the model's instructions: answer with the JSON result between the nonce markers.

    Kept short on purpose: it is paid for on every structured run, and the block replaces the usual prose
    answer rather than adding to it.
    """
    begin, end = markers(nonce)
    compact = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    return (
        "Then, instead of prose, write the code's result as JSON matching this schema, every value taken from "
        f"the tool output (never invented): {compact}\n"
        f"Put it alone between these two lines, copied exactly:\n{begin}\n{end}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Extraction


@dataclass
class Extracted:
    """What extraction found.

    `found` is True only for a complete block (or a fully decoded text); then `value` is the decoded JSON (any JSON
    type; `None` may be a legitimate JSON null) and `raw` its source text. When nothing complete was found, `problem`
    says why (a truncated block, invalid JSON, a missing END marker) and `raw` holds the text after the last BEGIN
    marker, for a repair pass; `problem` is None when there was no marker at all.
    """

    value: Any = None
    raw: str | None = None
    found: bool = False
    problem: str | None = None


class _NonStandardNumber(ValueError):
    """NaN/Infinity: Python's json accepts them, JSON (and every client downstream) does not."""


def _reject_constant(name: str) -> Any:
    raise _NonStandardNumber(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _skip_ws(text: str, pos: int) -> int:
    match = _WS_RE.match(text, pos)
    return match.end() if match else pos


def _line_col(text: str, start: int, pos: int) -> tuple[int, int]:
    """1-based line and column of `pos`, counted from `start` (the beginning of the block)."""
    line = text.count("\n", start, pos) + 1
    last_nl = text.rfind("\n", start, pos)
    col = pos - (last_nl + 1 if last_nl >= 0 else start) + 1
    return line, col


@dataclass
class _DecodeFailure:
    problem: str
    cut_off: bool = False  # the text ends inside the value: everything after `pos` belongs to it


def _decode_at(text: str, pos: int, origin: int) -> tuple[Any, int] | _DecodeFailure:
    """Decode one JSON value starting at `pos`; the value and its end, or why not (positions relative to origin)."""
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        # An unterminated string runs to the end of the text (a raw newline would have failed earlier as a
        # control character), so like an error at the very end it means the text stops inside the value.
        if exc.pos >= len(text) or exc.msg.startswith("Unterminated string"):
            line, col = _line_col(text, origin, len(text))
            return _DecodeFailure(f"the JSON is cut off (the text ends at line {line}, column {col})", cut_off=True)
        line, col = _line_col(text, origin, exc.pos)
        return _DecodeFailure(f"invalid JSON at line {line}, column {col}: {exc.msg}")
    except _NonStandardNumber as exc:
        return _DecodeFailure(f"invalid JSON: {exc}")
    except RecursionError:
        return _DecodeFailure("the JSON is nested too deeply to decode")


@dataclass
class _Attempt:
    """One BEGIN marker's block: either decoded (value, raw, end) or failed (problem, resume)."""

    ok: bool
    value: Any = None
    raw: str | None = None
    problem: str | None = None
    resume: int = 0  # where to look for the next BEGIN marker


def _try_block(text: str, body: int, end_marker: str) -> _Attempt:
    """Decode the block whose content starts at `body` (just after a BEGIN marker)."""
    pos = _skip_ws(text, body)
    fence = _FENCE_OPEN_RE.match(text, pos)
    if fence is not None:
        pos = _skip_ws(text, fence.end())
    if pos >= len(text):
        return _Attempt(ok=False, problem="the block is empty: the text ends right after the BEGIN marker", resume=pos)
    if text.startswith(end_marker, pos):
        return _Attempt(ok=False, problem="the block is empty: no JSON between the markers", resume=pos)

    decoded = _decode_at(text, pos, pos)
    if isinstance(decoded, _DecodeFailure):
        # Cut off: any later BEGIN lies inside this value's strings, so stop. Otherwise nothing decoded and a later
        # BEGIN (even inside this broken text) may start the real block.
        return _Attempt(ok=False, problem=decoded.problem, resume=len(text) if decoded.cut_off else pos)
    value, value_end = decoded

    after = _skip_ws(text, value_end)
    if fence is not None:
        if not text.startswith(_FENCE_CLOSE, after):
            return _Attempt(ok=False, problem="the ``` fence around the JSON is not closed", resume=value_end)
        after = _skip_ws(text, after + len(_FENCE_CLOSE))
    if not text.startswith(end_marker, after):
        what = "the text ends" if after >= len(text) else "other text follows"
        # Markers inside the decoded value lie within JSON strings: they are data, so resume after the value.
        return _Attempt(
            ok=False,
            problem=f"the JSON value is not followed by the END marker ({what} after it)",
            resume=value_end,
        )
    return _Attempt(ok=True, value=value, raw=text[pos:value_end], resume=after + len(end_marker))


def extract_last_block(text: str, nonce: str | None) -> Extracted:
    """The last complete marker block of `text`, decoded.

    Scans BEGIN markers left to right. A block is complete when one JSON value (optionally inside a ```json fence)
    follows its BEGIN marker and the END marker follows the value, modulo whitespace. The END marker is never
    searched for as a plain string: the value is decoded first, so braces and marker strings inside JSON strings are
    just data. After a complete block the scan resumes past its END marker, so a block quoted inside another block's
    strings never counts. With a nonce only that nonce's markers count; with None only the plain ones.
    """
    begin, end = markers(nonce)
    best: _Attempt | None = None
    last_failure: _Attempt | None = None
    last_failure_body = 0
    pos = 0
    while True:
        start = text.find(begin, pos)
        if start < 0:
            break
        body = start + len(begin)
        attempt = _try_block(text, body, end)
        if attempt.ok:
            best = attempt
        else:
            last_failure, last_failure_body = attempt, body
        pos = max(attempt.resume, body)

    if best is not None:
        return Extracted(value=best.value, raw=best.raw, found=True, problem=None)
    if last_failure is not None:
        raw = text[last_failure_body:]
        end_at = raw.rfind(end)
        if end_at >= 0:
            raw = raw[:end_at]
        return Extracted(
            value=None,
            raw=raw.strip() or None,
            found=False,
            problem=f"no complete JSON block: after the last BEGIN_JSON marker, {last_failure.problem}",
        )
    if end in text:
        return Extracted(problem="an END_JSON marker was found without a BEGIN_JSON marker before it")
    return Extracted()


def extract_from_sources(sources: Sequence[str], nonce: str | None) -> Extracted:
    """Search `sources` in the caller's priority order: the first one holding a complete block wins.

    Within a source the last complete block wins (see `extract_last_block`). When no source has a complete block,
    the first source with a problem reports it (its index is named in the message); when none has any marker, the
    result is empty (`found` False, `problem` None).
    """
    first_problem: tuple[int, Extracted] | None = None
    for index, source in enumerate(sources):
        if not source:
            continue
        got = extract_last_block(source, nonce)
        if got.found:
            return got
        if got.problem is not None and first_problem is None:
            first_problem = (index, got)
    if first_problem is None:
        return Extracted()
    index, got = first_problem
    prefix = f"source {index + 1} of {len(sources)}: " if len(sources) > 1 else ""
    return Extracted(value=None, raw=got.raw, found=False, problem=prefix + (got.problem or ""))


def parse_json_text(text: str) -> Extracted:
    """Decode a whole text as one JSON value (single_pass and repair outputs); a ```json fence is allowed."""
    body = text.strip().lstrip("\ufeff").strip()
    if body.startswith(_FENCE_CLOSE):
        fence = _FENCE_OPEN_RE.match(body)
        if fence is not None and body.endswith(_FENCE_CLOSE) and len(body) >= fence.end() + len(_FENCE_CLOSE):
            body = body[fence.end() : len(body) - len(_FENCE_CLOSE)].strip()
    if not body:
        return Extracted(problem="the output is empty: expected a JSON value")
    decoded = _decode_at(body, 0, 0)
    if isinstance(decoded, _DecodeFailure):
        return Extracted(raw=body, problem=decoded.problem)
    value, value_end = decoded
    rest = _skip_ws(body, value_end)
    if rest < len(body):
        line, col = _line_col(body, 0, rest)
        return Extracted(raw=body, problem=f"extra text after the JSON value at line {line}, column {col}")
    return Extracted(value=value, raw=body[:value_end], found=True)


# --------------------------------------------------------------------------------------------------------------------
# Schemas: checking (no network) and validation


class _RemoteRefRefused(Exception):
    """Raised by the registry's retrieve hook: validation must never fetch a $ref over the network."""


def _refuse_retrieval(uri: str) -> referencing.Resource[Any]:
    raise _RemoteRefRefused(uri)


# jsonschema combines this with its bundled metaschemas, so refs to the standard drafts still resolve offline.
_NO_NETWORK_REGISTRY: referencing.Registry[Any] = referencing.Registry(retrieve=_refuse_retrieval)

_DRAFT_NAMES: dict[str, str] = {
    "Draft3Validator": "draft-03",
    "Draft4Validator": "draft-04",
    "Draft6Validator": "draft-06",
    "Draft7Validator": "draft-07",
    "Draft201909Validator": "draft 2019-09",
    "Draft202012Validator": "draft 2020-12",
}
_REF_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")


def _clip(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE_CHARS else message[: _MAX_MESSAGE_CHARS - 1] + "…"


def json_path(parts: Iterable[str | int]) -> str:
    """`$` for the root, `.name` for identifier keys, `["odd key"]` for others, `[3]` for array indices."""
    out = ["$"]
    for part in parts:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _IDENT_RE.match(part):
            out.append(f".{part}")
        else:
            out.append(f"[{json.dumps(part, ensure_ascii=False)}]")
    return "".join(out)


def _draft_name(cls: type[Validator]) -> str:
    return _DRAFT_NAMES.get(cls.__name__, cls.__name__)


def _validator_class(schema: dict[str, Any] | bool) -> type[Validator]:
    if isinstance(schema, dict) and "$schema" in schema:
        declared = schema["$schema"]
        if not isinstance(declared, str):
            raise InvalidSchema("output_schema's $schema must be a string naming a JSON Schema draft")
        # An explicit default of None turns jsonschema's "unknown $schema" deprecation warning into a clear error.
        found = js_validators.validator_for(schema, default=None)  # type: ignore[arg-type]
        if found is None:
            known = ", ".join(sorted(_DRAFT_NAMES.values()))
            raise InvalidSchema(f"output_schema declares an unknown $schema {declared!r}; supported drafts: {known}")
        return found
    return js_validators.validator_for(schema, default=js_validators.Draft202012Validator)


def _walk_refs(
    resource: referencing.Resource[Any], resolver: referencing.Resolver[Any]
) -> Iterator[tuple[referencing.Resolver[Any], str, str]]:
    """Every reference in the schema, with the resolver scoped to where it appears (its base URI)."""
    contents = resource.contents
    if isinstance(contents, dict):
        for keyword in _REF_KEYWORDS:
            ref = contents.get(keyword)
            if isinstance(ref, str):
                yield resolver, keyword, ref
    for sub in resource.subresources():
        yield from _walk_refs(sub, resolver.in_subresource(sub))


def _check_refs(schema: dict[str, Any], cls: type[Validator]) -> None:
    """Resolve every $ref offline: a remote one is refused (no network), a dangling pointer is reported."""
    resource = referencing.Resource.from_contents(schema, default_specification=referencing.jsonschema.DRAFT202012)
    root = METASCHEMAS.combine(_NO_NETWORK_REGISTRY).resolver_with_root(resource)
    for resolver, keyword, ref in _walk_refs(resource, root):
        try:
            resolver.lookup(ref)
        except referencing.exceptions.Unresolvable as exc:
            if _caused_by_refusal(exc):
                raise InvalidSchema(
                    f"output_schema's {keyword} {ref!r} points outside the schema; remote references are not "
                    "fetched (no network). Inline the referenced schema under $defs and use '#/$defs/...'.",
                ) from None
            raise InvalidSchema(
                _clip(f"output_schema's {keyword} {ref!r} does not resolve within the {_draft_name(cls)} schema: {exc}")
            ) from None


def _caused_by_refusal(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _RemoteRefRefused):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _canonical(schema: Any) -> str:
    if not isinstance(schema, dict | bool):
        raise InvalidSchema(f"output_schema must be a JSON object (or true/false), not {type(schema).__name__}")
    try:
        return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidSchema(f"output_schema is not plain JSON: {exc}") from None


@functools.lru_cache(maxsize=64)
def _compiled(canonical: str) -> Validator:
    """Check and compile a schema once per distinct schema (keyed by canonical JSON); errors are not cached."""
    schema = json.loads(canonical)
    cls = _validator_class(schema)
    meta_cls = js_validators.validator_for(cls.META_SCHEMA, default=cls)
    meta = meta_cls(cls.META_SCHEMA, registry=_NO_NETWORK_REGISTRY, format_checker=meta_cls.FORMAT_CHECKER)
    try:
        error = js_exceptions.best_match(meta.iter_errors(schema))
    except RecursionError:
        raise InvalidSchema("output_schema is nested too deeply") from None
    if error is not None:
        where = json_path(error.absolute_path)
        raise InvalidSchema(
            f"output_schema is not a valid {_draft_name(cls)} schema at {where}: {_clip(error.message)}"
        )
    if isinstance(schema, dict):
        _check_refs(schema, cls)
    # Formats are asserted where jsonschema has a checker (e.g. email, ipv4, date): a schema that names a format
    # expects it to hold, even though 2020-12 makes format an annotation by default.
    return cls(schema, registry=_NO_NETWORK_REGISTRY, format_checker=cls.FORMAT_CHECKER)


def check_schema(schema: Any) -> None:
    """Raise InvalidSchema unless `schema` is a valid JSON Schema (dict or bool) for its $schema draft.

    Any draft jsonschema supports; 2020-12 when $schema is absent. References are resolved offline: a $ref to a
    remote URL (or any resource outside the schema other than the standard metaschemas) is refused, never fetched.
    """
    _compiled(_canonical(schema))


def _path_key(parts: Iterable[str | int]) -> tuple[tuple[int, int | str], ...]:
    # Keys and indices cannot be compared with each other; tag them so sorting never raises.
    return tuple((0, p) if isinstance(p, int) else (1, str(p)) for p in parts)


def validate(value: Any, schema: dict[str, Any] | bool, *, max_violations: int = MAX_VIOLATIONS) -> list[Violation]:
    """Every violation of `schema` by `value`, sorted by JSON path; an empty list means valid.

    Each violation carries the best-matching message (for anyOf/oneOf failures, the most relevant branch's error
    and its deeper path). More than `max_violations` are cut, with a last entry saying how many were left out.
    Raises InvalidSchema when the schema itself is invalid.
    """
    validator = _compiled(_canonical(schema))
    try:
        errors = list(validator.iter_errors(value))
    except RecursionError:
        return [Violation(path="$", message="the value is nested too deeply to validate")]
    except referencing.exceptions.Unresolvable as exc:  # cannot happen after _check_refs; kept as a clear error
        raise InvalidSchema(f"output_schema has an unresolvable reference: {exc}") from None

    found: list[tuple[tuple[tuple[int, int | str], ...], str, str]] = []
    seen: set[tuple[str, str]] = set()
    for error in errors:
        best = js_exceptions.best_match([error]) or error
        parts = list(best.absolute_path)
        path, message = json_path(parts), _clip(best.message)
        if (path, message) in seen:
            continue
        seen.add((path, message))
        found.append((_path_key(parts), path, message))
    found.sort(key=lambda item: (item[0], item[2]))

    violations = [Violation(path=path, message=message) for _, path, message in found[:max_violations]]
    if len(found) > max_violations:
        violations.append(
            Violation(path="$", message=f"… and {len(found) - max_violations} more violations not listed")
        )
    return violations


def json_error_from(problem_or_violations: str | Sequence[Violation]) -> JsonError:
    """A JsonError from an extraction problem (a message) or from validation violations."""
    if isinstance(problem_or_violations, str):
        return JsonError(message=problem_or_violations, violations=[])
    violations = list(problem_or_violations)
    count = len(violations)
    noun = "violation" if count == 1 else "violations"
    return JsonError(message=f"the JSON result does not match output_schema ({count} {noun})", violations=violations)


# --------------------------------------------------------------------------------------------------------------------
# OpenAI strict structured outputs

# The subset OpenAI documents for strict mode. Anything else (allOf, oneOf, not, if/then/else, minLength,
# patternProperties, uniqueItems, default, $schema, ...) makes us send strict: false instead of risking a 400.
_STRICT_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "anyOf",
        "enum",
        "const",
        "$ref",
        "$defs",
        "definitions",
        "description",
        "title",
        "pattern",
        "format",
        "multipleOf",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minItems",
        "maxItems",
    }
)
_STRICT_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
_STRICT_FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"})
_STRICT_MAX_DEPTH = 10
_STRICT_MAX_PROPERTIES = 5000
_STRICT_MAX_ENUM_VALUES = 1000


class _NotStrict(Exception):
    pass


def _resolve_local(root: dict[str, Any], ref: str) -> Any:
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        raise _NotStrict(f"non-local $ref {ref!r}")
    node: Any = root
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise _NotStrict(f"dangling $ref {ref!r}")
    return node


class _StrictChecker:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.properties = 0
        self.enum_values = 0

    def check(self, node: Any, depth: int) -> None:
        if not isinstance(node, dict):
            raise _NotStrict("boolean or non-object subschema")
        unknown = set(node) - _STRICT_KEYWORDS
        if unknown:
            raise _NotStrict(f"unsupported keywords {sorted(unknown)}")
        for defs_key in ("$defs", "definitions"):
            defs = node.get(defs_key)
            if defs is not None:
                if not isinstance(defs, dict):
                    raise _NotStrict(f"{defs_key} is not an object")
                for sub in defs.values():
                    self.check(sub, depth)
        if "$ref" in node:
            if set(node) - {"$ref", "$defs", "definitions"}:
                raise _NotStrict("$ref with sibling keywords")
            target = _resolve_local(self.root, node["$ref"])
            if not isinstance(target, dict):
                raise _NotStrict("$ref to a non-object")
            return
        if "anyOf" in node:
            branches = node["anyOf"]
            if not isinstance(branches, list) or not branches:
                raise _NotStrict("anyOf is not a non-empty list")
            for branch in branches:
                self.check(branch, depth)
            return
        if "enum" in node:
            if not isinstance(node["enum"], list):
                raise _NotStrict("enum is not a list")
            self.enum_values += len(node["enum"])
        if "format" in node and node["format"] not in _STRICT_FORMATS:
            raise _NotStrict(f"unsupported format {node['format']!r}")
        if "type" not in node:
            raise _NotStrict("a subschema without type")
        types = node["type"] if isinstance(node["type"], list) else [node["type"]]
        if not types or any(t not in _STRICT_TYPES for t in types):
            raise _NotStrict(f"unsupported type {node['type']!r}")
        if "object" in types or "properties" in node:
            self._check_object(node, depth)
        if "array" in types or "items" in node:
            items = node.get("items")
            if items is None:
                raise _NotStrict("array without items")
            self.check(items, depth + 1)

    def _check_object(self, node: dict[str, Any], depth: int) -> None:
        if depth + 1 > _STRICT_MAX_DEPTH:
            raise _NotStrict("objects nested deeper than 10 levels")
        if node.get("additionalProperties") is not False:
            raise _NotStrict("an object without additionalProperties: false")
        properties = node.get("properties", {})
        if not isinstance(properties, dict):
            raise _NotStrict("properties is not an object")
        required = node.get("required", [])
        if not isinstance(required, list) or set(required) != set(properties) or len(required) != len(properties):
            raise _NotStrict("an object whose properties are not all required")
        self.properties += len(properties)
        for sub in properties.values():
            self.check(sub, depth + 1)


def is_strict_compatible(schema: Any) -> bool:
    """Whether OpenAI structured outputs' strict mode accepts `schema` as it is.

    True when the root is an object schema; every object has `additionalProperties: false` and lists all its
    properties in `required`; every subschema has a `type` (or is a lone local `$ref` or an `anyOf`); only keywords
    and formats OpenAI documents for strict mode appear; and the documented size limits hold (10 object levels,
    5000 properties, 1000 enum values). Conservative: when in doubt the answer is False (send strict: false).
    """
    if not isinstance(schema, dict) or schema.get("type") != "object" or "anyOf" in schema:
        return False
    checker = _StrictChecker(schema)
    try:
        checker.check(schema, 0)
    except _NotStrict as exc:
        logger.debug("schema not strict-compatible: %s", exc)
        return False
    except RecursionError:
        return False
    return checker.properties <= _STRICT_MAX_PROPERTIES and checker.enum_values <= _STRICT_MAX_ENUM_VALUES
