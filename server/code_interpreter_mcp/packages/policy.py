"""The operator's package policy: `any` (whatever the index has), `allowlist` (only the named projects, compared
by canonical name) or `off` (no packages at all).

The policy judges the requirements the caller named, before anything is resolved: what they depend on comes from
the index the operator chose. It knows nothing of installers, indexes or the cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ..errors import PackageRefused

PolicyName = Literal["any", "allowlist", "off"]


@dataclass(frozen=True)
class PackagePolicy:
    mode: PolicyName
    allowlist: frozenset[str] = frozenset()

    @classmethod
    def build(cls, mode: PolicyName, allowlist: Iterable[str] = ()) -> PackagePolicy:
        return cls(mode, frozenset(canonicalize_name(name) for name in allowlist))

    def check(self, requirements: Iterable[str]) -> None:
        """Raise PackageRefused unless every (normalised) requirement is allowed."""
        names = sorted({canonicalize_name(Requirement(r).name) for r in requirements})
        if not names or self.mode == "any":
            return
        if self.mode == "off":
            raise PackageRefused(
                "Installing packages is turned off on this server.",
                hint="Run without packages (and without a `# /// script` dependencies block), or the operator can "
                "set CODE_INTERPRETER_PACKAGES=any or allowlist.",
            )
        refused = [n for n in names if n not in self.allowlist]
        if refused:
            allowed = ", ".join(sorted(self.allowlist)) or "none"
            raise PackageRefused(
                f"Not on this server's package allowlist: {', '.join(refused)}.",
                hint=f"Allowed packages: {allowed}. The operator sets them with CODE_INTERPRETER_PACKAGE_ALLOWLIST.",
            )

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"policy": self.mode}
        if self.mode == "allowlist":
            out["allowlist"] = sorted(self.allowlist)
        return out
