"""Schema checking and validation: is `output_schema` a valid JSON Schema, and does a value satisfy it.

Owns the compiled validators (any draft jsonschema knows, cached per distinct schema), the offline reference policy
(a remote `$ref` is refused, never fetched), and the report of violations by JSON path (`$.items[2].price`), clipped
and capped so a huge value cannot flood a tool result. Knows nothing of markers, extraction or any backend.

This is the only module that imports jsonschema; `structured` loads it on first use, so start-up does not pay for
it. Both are CPU-bound on caller input (a backtracking `pattern`, an `allOf` that doubles per level): async
callers run them through `guard`, in a process that is killed on a time limit, never on the event loop.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

import referencing
import referencing.exceptions
import referencing.jsonschema
from jsonschema import exceptions as js_exceptions
from jsonschema import validators as js_validators
from jsonschema.protocols import Validator
from jsonschema_specifications import REGISTRY as METASCHEMAS

from ..errors import InvalidSchema
from ..models import Violation
from .report import MAX_VIOLATIONS, json_error_from  # noqa: F401  (json_error_from: the public name here too)

# Violation messages quote the offending instance; a 1 MB value must not end up in a tool result.
_MAX_MESSAGE_CHARS = 300
# Collecting stops here: 300,000 bad items must not cost 300,000 best-match searches and a sort of them all.
MAX_COLLECTED = 1000

_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


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
        errors = list(itertools.islice(validator.iter_errors(value), MAX_COLLECTED + 1))
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
    if len(errors) > MAX_COLLECTED:
        violations.append(Violation(path="$", message=f"… and more violations (counting stopped at {MAX_COLLECTED})"))
    elif len(found) > max_violations:
        violations.append(
            Violation(path="$", message=f"… and {len(found) - max_violations} more violations not listed")
        )
    return violations
