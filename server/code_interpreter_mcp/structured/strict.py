"""Whether a schema fits OpenAI's strict structured outputs as it is (else the backend sends strict: false).

Owns the documented strict-mode subset (keywords, types, formats, size limits) and a conservative check against it.
Pure Python, no jsonschema: the openai backend imports it at start-up. Knows nothing of validation or extraction.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

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
