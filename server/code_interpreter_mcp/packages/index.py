"""Where packages come from: the index options and configuration the installer sandbox is given.

Either the operator's settings (`package_index_url`, `package_find_links`; find-links alone means no index, so a
local folder of wheels works offline) and nothing of the user's configuration, or by default the user's own
configuration, exactly as their uv and pip would read it: uv.toml and pip.conf files (bound read-only into the
sandbox, at the path each tool looks for them), and the UV_* / PIP_* variables. uv does not read pip's
configuration, so when the user has configured only pip, its index settings are handed to uv as flags.

Local folders and files that the configuration names (a wheel folder, a `file://` index, a CA bundle) are bound
read-only too, except any that would expose the whole host, the home folder or the data folder. This module knows
nothing of installing or the cache, and of the sandbox only where its home lies and which variable names it never
passes: it describes what the sandbox must see and what the tool is told.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .sandbox import SANDBOX_HOME, SECRET_NAME_RE

SANDBOX_CONFIG_HOME = SANDBOX_HOME + "/.config"
# The installer's own variables: ours to set, never the user's.
_OURS = re.compile(
    r"^(UV_(CACHE_DIR|PYTHON.*|NO_PROGRESS|LINK_MODE|NO_CONFIG|CONFIG_FILE|TOOL_.*|PROJECT.*|WORKING_DIR|SYSTEM_PYTHON"
    r"|BREAK_SYSTEM_PACKAGES|NO_CACHE|COMPILE_BYTECODE|NO_BUILD.*|ONLY_BINARY|NO_BINARY.*|TARGET|PREFIX)"
    r"|PIP_(CACHE_DIR|TARGET|PREFIX|ROOT|USER|REQUIRE_VIRTUALENV|CONFIG_FILE|NO_BUILD_ISOLATION|ONLY_BINARY|NO_BINARY"
    r"|COMPILE|NO_COMPILE|SRC|EDITABLE|NO_DEPS|DRY_RUN|REPORT|IGNORE_INSTALLED))$"
)
_UV_INDEX_VARS = ("UV_INDEX", "UV_DEFAULT_INDEX", "UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_FIND_LINKS", "UV_NO_INDEX")
# Transport settings honoured whichever index is used.
_NETWORK_VARS = (
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "UV_NATIVE_TLS", "UV_SYSTEM_CERTS", "UV_HTTP_TIMEOUT",
    "UV_HTTP_RETRIES", "UV_REQUEST_TIMEOUT", "UV_CONCURRENT_DOWNLOADS", "UV_INSECURE_HOST", "PIP_DEFAULT_TIMEOUT",
    "PIP_RETRIES", "PIP_CERT", "PIP_TRUSTED_HOST",
)  # fmt: skip


@dataclass
class IndexConfig:
    """The index part of an installer invocation."""

    source: str  # for doctor: "settings" | "uv configuration" | "pip configuration" | "installer defaults"
    uv_args: list[str] = field(default_factory=list)
    pip_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # inside the sandbox
    host_env: dict[str, str] = field(default_factory=dict)  # unsandboxed (the operator opted out of isolation)
    readonly: list[tuple[str, str]] = field(default_factory=list)  # (host path, path inside the sandbox)
    locations: list[str] = field(default_factory=list)  # index URLs / wheel folders, for doctor
    config_files: list[str] = field(default_factory=list)
    offline: bool = False

    def fingerprint(self) -> str:
        """Changes when anything that decides what a requirement resolves to changes."""
        stamps = []
        for host, _inside in self.readonly:
            try:
                st = os.stat(host)
                stamps.append([host, st.st_mtime_ns, st.st_size])
            except OSError:
                stamps.append([host, None, None])
        blob = json.dumps([self.uv_args, self.pip_args, sorted(self.env.items()), stamps], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def describe(self) -> dict[str, object]:
        return {
            "source": self.source,
            "locations": [mask_url(loc) for loc in self.locations],
            "config_files": self.config_files,
            "offline": self.offline,
        }


def mask_url(url: str) -> str:
    """An index URL without the credentials it may carry (https://user:token@host/simple)."""
    return re.sub(r"//[^/@\s]*@", "//***@", url)


def index_config(
    index_url: str | None,
    find_links: str | None,
    *,
    forbidden: list[Path],
    environ: Mapping[str, str] | None = None,
) -> IndexConfig:
    """The index options: the operator's settings when set, else the user's own uv/pip configuration.
    `forbidden` are folders that must stay invisible (the data folder); so does the home folder as a whole."""
    env = dict(os.environ if environ is None else environ)
    guard = _Guard(hidden=forbidden, private=[Path.home()])
    passed = {k: env[k] for k in _NETWORK_VARS if env.get(k) and not SECRET_NAME_RE.search(k)}
    if index_url or find_links:
        return _from_settings(index_url, find_links, passed, guard)
    return _from_user(env, passed, guard)


def _from_settings(index_url: str | None, find_links: str | None, passed: dict[str, str], guard: _Guard) -> IndexConfig:
    # The user's own configuration must not add indexes behind the operator's back.
    env = {**passed, "UV_NO_CONFIG": "1", "PIP_CONFIG_FILE": os.devnull}
    cfg = IndexConfig(source="settings", env=env, host_env=dict(env))
    if index_url:
        cfg.uv_args += ["--default-index", index_url]
        cfg.pip_args += ["--index-url", index_url]
        cfg.locations.append(index_url)
    if find_links:
        cfg.uv_args += ["--find-links", find_links]
        cfg.pip_args += ["--find-links", find_links]
        cfg.locations.append(find_links)
        if not index_url:
            cfg.uv_args.append("--no-index")
            cfg.pip_args.append("--no-index")
            cfg.offline = _local_path(find_links) is not None
    cfg.readonly += guard.binds([index_url or "", find_links or "", *passed.values()])
    return cfg


def _from_user(env: dict[str, str], passed: dict[str, str], guard: _Guard) -> IndexConfig:
    home = Path.home()
    xdg_home = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    xdg_dirs = [Path(p) for p in (env.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":") if p]
    cfg = IndexConfig(source="installer defaults")
    user_vars = {
        k: v
        for k, v in env.items()
        if k.startswith(("UV_", "PIP_")) and v and not SECRET_NAME_RE.search(k) and not _OURS.match(k)
    }
    cfg.env = {**passed, **user_vars, "XDG_CONFIG_HOME": SANDBOX_CONFIG_HOME}
    cfg.host_env = {**passed, **user_vars}
    for var in ("XDG_CONFIG_DIRS", "XDG_CONFIG_HOME", "PIP_CONFIG_FILE"):
        if env.get(var):
            cfg.host_env[var] = env[var]
    if env.get("XDG_CONFIG_DIRS"):
        cfg.env["XDG_CONFIG_DIRS"] = env["XDG_CONFIG_DIRS"]

    # System files are bound where they are; the user's are bound into the sandbox's own home.
    uv_files = [(d / "uv" / "uv.toml", str(d / "uv" / "uv.toml")) for d in xdg_dirs]
    uv_files += [
        (Path("/etc/uv/uv.toml"), "/etc/uv/uv.toml"),
        (xdg_home / "uv" / "uv.toml", SANDBOX_CONFIG_HOME + "/uv/uv.toml"),
    ]
    pip_files = [(d / "pip" / "pip.conf", str(d / "pip" / "pip.conf")) for d in xdg_dirs]
    pip_files += [
        (Path("/etc/pip.conf"), "/etc/pip.conf"),
        (home / ".pip" / "pip.conf", SANDBOX_HOME + "/.pip/pip.conf"),
        (xdg_home / "pip" / "pip.conf", SANDBOX_CONFIG_HOME + "/pip/pip.conf"),
        (Path(sys.prefix) / "pip.conf", str(Path(sys.prefix) / "pip.conf")),
    ]
    if env.get("PIP_CONFIG_FILE") and env["PIP_CONFIG_FILE"] != os.devnull:
        pip_files.append((Path(env["PIP_CONFIG_FILE"]), "/tmp/pip-config-file.conf"))
        cfg.env["PIP_CONFIG_FILE"] = "/tmp/pip-config-file.conf"
    found_uv = [(h, i) for h, i in uv_files if h.is_file()]
    found_pip = [(h, i) for h, i in pip_files if h.is_file()]
    values: list[str] = [*user_vars.values(), *passed.values()]
    for host, inside in found_uv + found_pip:
        cfg.readonly.append((str(host), inside))
        cfg.config_files.append(str(host))
        values += list(_config_values(host))

    uv_configured = bool(found_uv) or any(env.get(k) for k in _UV_INDEX_VARS)
    if uv_configured:
        cfg.source = "uv configuration"
    elif found_pip or any(
        env.get(k) for k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX")
    ):
        cfg.source = "pip configuration"
        pip = _pip_index_settings([h for h, _ in found_pip], env)
        cfg.uv_args = _uv_args_from_pip(pip)
        if pip.get("cert") and "SSL_CERT_FILE" not in cfg.env:
            cfg.env["SSL_CERT_FILE"] = cfg.host_env["SSL_CERT_FILE"] = pip["cert"]
    cfg.locations = _index_locations(env, [h for h, _ in found_uv + found_pip]) or ["https://pypi.org/simple"]
    cfg.readonly += guard.binds(values)
    return cfg


def _config_values(path: Path) -> Iterator[str]:
    """Every string value of a uv.toml or pip.conf (to find the local paths it names)."""
    try:
        if path.suffix == ".toml":
            yield from _toml_strings(tomllib.loads(path.read_text()))
        else:
            parser = configparser.ConfigParser(interpolation=None)
            parser.read(path)
            for section in parser.sections():
                yield from parser[section].values()
    except (OSError, ValueError, configparser.Error):
        return


def _toml_strings(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _toml_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _toml_strings(v)


def _pip_index_settings(files: list[Path], env: Mapping[str, str]) -> dict[str, str]:
    """pip's index-url, extra-index-url, find-links, no-index and cert, as pip would settle them: files in its
    load order ([global], then [install]), then PIP_* variables."""
    out: dict[str, str] = {}
    keys = ("index-url", "extra-index-url", "find-links", "no-index", "cert")
    for path in files:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path)
        except configparser.Error:
            continue
        for section in ("global", "install"):
            if parser.has_section(section):
                for key in keys:
                    for spelling in (key, key.replace("-", "_")):
                        if parser.has_option(section, spelling):
                            out[key] = parser.get(section, spelling)
    for key in keys:
        value = env.get("PIP_" + key.upper().replace("-", "_"))
        if value:
            out[key] = value
    return out


def _uv_args_from_pip(pip: dict[str, str]) -> list[str]:
    args: list[str] = []
    if pip.get("no-index", "").strip().lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    if pip.get("index-url"):
        args += ["--default-index", pip["index-url"].split()[0]]
    for url in pip.get("extra-index-url", "").split():
        args += ["--index", url]
    for link in pip.get("find-links", "").split():
        args += ["--find-links", link]
    if any(a in ("--default-index", "--index", "--find-links") for a in args):
        # pip takes the best version over all its indexes; uv's default stops at the first that has the name.
        args += ["--index-strategy", "unsafe-best-match"]
    return args


def _index_locations(env: Mapping[str, str], files: list[Path]) -> list[str]:
    out: list[str] = []
    for key in (*_UV_INDEX_VARS, "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        if env.get(key) and key != "UV_NO_INDEX":
            out += env[key].split()
    pattern = re.compile(r"^\s*(index-url|extra-index-url|find-links|url|default-index)\s*[=:]\s*(.+)$", re.M)
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for m in pattern.finditer(text):
            out += [v.strip("'\"[], ") for v in m.group(2).split() if v.strip("'\"[], ")]
    return list(dict.fromkeys(out))


def _local_path(value: str) -> Path | None:
    value = value.strip().strip("'\"")
    if value.startswith("file://"):
        return Path(unquote(urlsplit(value).path))
    if value.startswith("/"):
        return Path(value)
    return None


class _Guard:
    """Decides which local paths named by the configuration may be bound into the sandbox: nothing in, at or
    above a hidden folder (the data folder), and nothing at or above a private one (the home folder: a wheel
    folder inside it is fine, the whole of it is not)."""

    def __init__(self, hidden: list[Path], private: list[Path]) -> None:
        self.hidden = [Path(os.path.realpath(p)) for p in hidden]
        self.private = [Path(os.path.realpath(p)) for p in private]

    def allowed(self, path: Path) -> bool:
        real = Path(os.path.realpath(path))
        if any(real == h or h in real.parents or real in h.parents for h in self.hidden):
            return False
        return not any(real == p or real in p.parents for p in self.private)

    def binds(self, values: list[str]) -> list[tuple[str, str]]:
        out: dict[str, str] = {}
        for value in values:
            for token in re.split(r"[\s,]+", value):
                path = _local_path(token)
                if path is None or not path.exists():
                    continue
                if path.is_dir() and path.name == "simple" and token.startswith("file://"):
                    # A file:// index links to its files relative to the simple/ page (../../files/...).
                    path = path.parent
                if self.allowed(path):
                    out[str(path)] = str(path)
        return list(out.items())
