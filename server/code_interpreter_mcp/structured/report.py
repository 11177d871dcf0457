"""The report a caller sees when the JSON result fails: a `JsonError` from an extraction problem or from the
violations found, and how many violations are listed at most.

Light on purpose (no jsonschema): the server builds reports from what the guard's processes found, and must not
pay for importing jsonschema on its event loop. Knows nothing of extraction or validation themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..models import JsonError, Violation

# Enough to fix a result; beyond this the list is cut and a last entry says how many more there were.
MAX_VIOLATIONS = 50


def json_error_from(problem_or_violations: str | Sequence[Violation]) -> JsonError:
    """A JsonError from an extraction problem (a message) or from validation violations."""
    if isinstance(problem_or_violations, str):
        return JsonError(message=problem_or_violations, violations=[])
    violations = list(problem_or_violations)
    count = len(violations)
    noun = "violation" if count == 1 else "violations"
    return JsonError(message=f"the JSON result does not match output_schema ({count} {noun})", violations=violations)
