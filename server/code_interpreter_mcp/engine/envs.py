"""Environment variables a caller gives a run (`env`) or keeps for its session (`persist_env`): checked here.

A run's variables are set in the worker's `os.environ` for that run only (the subprocesses it starts inherit them)
and put back afterwards; a session's kept variables apply to every later run of the session, in any of its
containers. The sandbox's environment is otherwise built from scratch (sandbox.profile), so the one way a secret
of the server could reach it is a caller naming it: names of the server's own secrets (`OPENAI_API_KEY`, every
`CODE_INTERPRETER_*` setting) and values that are, or contain, a secret the server holds (its API key, its bearer
tokens) are refused, never passed on. Names and values are checked for what `execve` and a shell can carry.

Knows the settings; nothing of backends, sessions' storage or MCP.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..config import ENV_PREFIX, Settings
from ..errors import BadInput

MAX_VARS = 64  # per call, and kept per session
MAX_NAME_CHARS = 128
MAX_VALUE_CHARS = 32 * 1024
MAX_TOTAL_CHARS = 256 * 1024
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The server's own secrets by the names it reads them from (config._env_overrides), whatever their value.
SECRET_NAMES = frozenset({"OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "OPENAI_ADMIN_KEY"})
_MIN_SECRET_CHARS = 8  # shorter "secrets" would match ordinary text by chance


def server_secrets(settings: Settings) -> list[str]:
    """The secret values this server holds: its API key and each bearer token."""
    out: list[str] = []
    if settings.openai_api_key is not None:
        out.append(settings.openai_api_key.get_secret_value())
    if settings.auth_token is not None:
        out.extend(t.strip() for t in settings.auth_token.get_secret_value().split(","))
    return [s for s in out if len(s) >= _MIN_SECRET_CHARS]


def check_env(settings: Settings, env: object, what: str = "env") -> dict[str, str]:
    """`env` as given, checked: a dict of at most MAX_VARS names to strings, none of them a server secret."""
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise BadInput(f'{what} must be an object of variable names to strings, e.g. {{"FOO": "bar"}}.')
    if len(env) > MAX_VARS:
        raise BadInput(f"{what} has {len(env)} variables; at most {MAX_VARS} are accepted.")
    secrets = server_secrets(settings)
    total = 0
    out: dict[str, str] = {}
    for name, value in env.items():
        if not isinstance(name, str) or not _NAME.match(name) or len(name) > MAX_NAME_CHARS:
            shown = repr(name)[:80]
            raise BadInput(
                f"{what}: {shown} is not a variable name.",
                f"Use letters, digits and underscores, not starting with a digit, at most {MAX_NAME_CHARS} characters.",
            )
        if not isinstance(value, str):
            raise BadInput(f"{what}: the value of {name} must be a string, not {type(value).__name__}.")
        if "\0" in value:
            raise BadInput(f"{what}: the value of {name} holds a NUL character, which no environment can carry.")
        if len(value) > MAX_VALUE_CHARS:
            raise BadInput(f"{what}: the value of {name} is {len(value)} characters; the limit is {MAX_VALUE_CHARS}.")
        upper = name.upper()
        if upper in SECRET_NAMES or upper.startswith(ENV_PREFIX):
            raise BadInput(
                f"{what}: {name} names a secret or a setting of the server, which never reaches the sandbox.",
                "Pass the code the values it needs under names of its own; the server's keys stay with the server.",
            )
        if any(secret in value for secret in secrets):
            raise BadInput(
                f"{what}: the value of {name} is a secret of this server (its API key or a bearer token), which "
                "never reaches the sandbox.",
                "Pass the code only values of its own.",
            )
        total += len(name) + len(value)
        out[name] = value
    if total > MAX_TOTAL_CHARS:
        raise BadInput(f"{what} holds {total} characters in all; the limit is {MAX_TOTAL_CHARS}.")
    return out


def kept_env(settings: Settings, kept: Mapping[str, str], added: Mapping[str, str]) -> dict[str, str]:
    """A session's kept variables after `added` is kept too (a name given again takes its new value)."""
    return check_env(settings, {**kept, **added}, "the session's kept env")
