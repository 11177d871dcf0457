"""One Settings object for the whole server, read from (lowest to highest priority): defaults, an optional TOML
file (`CODE_INTERPRETER_CONFIG` or `--config`), environment variables `CODE_INTERPRETER_<FIELD>`, and CLI flags.

Secrets (`OPENAI_API_KEY`, Azure keys) are read from their usual variables and never printed: `public_view`
masks them.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

ENV_PREFIX = "CODE_INTERPRETER_"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("code-interpreter-mcp", appauthor=False))


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backend: Literal["local", "openai"] = "local"
    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = Field(
        default=None,
        description="postgresql://... keeps the registry in PostgreSQL; unset: SQLite in the data folder",
        pattern=r"^(postgresql|postgres)://",
    )
    store_url: str | None = Field(
        default=None,
        description="s3://bucket/prefix (or file:///shared/folder) mirrors harvested files and snapshots there; "
        "unset: the data folder alone",
        pattern=r"^(s3://[^/]+|file:///)",
    )
    replica_url: str | None = Field(
        default=None,
        description="this server's own address among replicas sharing DATABASE_URL and STORE_URL: sessions get a "
        "home here, held by a lease; unset: one process, no leases",
        pattern=r"^https?://",
    )
    cluster_secret: SecretStr | None = Field(
        default=None, description="shared by replicas: signs the calls they forward to each other's sessions"
    )
    lease_s: float = Field(default=10.0, ge=1, description="a replica silent this long loses its sessions' leases")
    transport: Literal["stdio", "http"] = "stdio"
    host: str = "127.0.0.1"
    port: int = 8765
    log_level: str = "WARNING"
    auth_token: SecretStr | None = Field(default=None, description="Bearer token required on HTTP, if set.")
    allow_host_paths: bool | None = Field(
        default=None,
        description="May callers name host paths (files=, upload_file path, save_to)? Default: yes on stdio, "
        "no on HTTP, where the caller is not the host's user.",
    )

    # Sessions and containers
    expiry_minutes: float = Field(default=20.0, gt=0)
    reaper_interval_s: float = Field(default=30.0, gt=0)
    delete_containers_on_shutdown: bool = True

    # Runs
    default_timeout_s: float = Field(default=60.0, gt=0)
    max_timeout_s: float = Field(default=3600.0, gt=0)
    default_wait_s: float = Field(default=45.0, ge=0, description="how long run_code waits before 'running'")
    max_wait_s: float = Field(default=300.0, ge=0, description="the longest wait_s a call may ask for")
    interrupt_grace_s: float = Field(default=2.0, ge=0)
    max_queued_runs: int = Field(default=32, ge=0, description="runs that may wait behind a session's running one")
    client_cancel: Literal["auto", "interrupt", "keep"] = Field(
        default="auto", description="what a client's cancel of a run's call does ('auto': keep it on a timeout)"
    )
    output_cap_chars: int = Field(default=40_000, ge=1000, description="stdout+stderr kept per run")
    result_budget_tokens: int = Field(default=20_000, ge=1000)
    inline_image_max_bytes: int = Field(default=256 * 1024, ge=0)
    inline_file_max_bytes: int = Field(default=1024 * 1024, ge=0, description="download_file inline cap")
    resource_max_bytes: int = Field(default=32 * 1024 * 1024, ge=0, description="largest file resources/read serves")
    max_inline_images: int = Field(default=4, ge=0)
    max_file_bytes: int = Field(default=100 * 1024 * 1024, gt=0, description="largest file harvested or uploaded")
    max_message_mb: float | None = Field(
        default=None,
        gt=0,
        description="largest JSON-RPC message: a stdio line, an HTTP body (default 256 on stdio, 4 on HTTP)",
    )
    structured_strategy: Literal["two_pass_sentinel", "single_pass"] = "two_pass_sentinel"
    schema_time_limit_s: float = Field(
        default=5.0, gt=0, description="longest a schema check or JSON validation may take before it is stopped"
    )
    file_history_mb: float = Field(
        default=64, ge=0, description="per session: earlier versions of rewritten files kept, newest first"
    )
    max_stored_mb: float = Field(default=10240, gt=0, description="harvested files kept on the host, all sessions")
    inline_images_total_bytes: int = Field(default=1024 * 1024, ge=0, description="image bytes inlined per result")
    inline_binary_max_bytes: int = Field(default=64 * 1024, ge=0, description="largest non-image binary inlined")
    max_result_files: int = Field(default=50, ge=1, description="files a run result lists in full")
    result_shape: Literal["auto", "both", "content_only"] = Field(
        default="auto", description="auto: content_only for clients known to drop `content` (see app/clients.py)"
    )
    resource_links: Literal["all", "non_inline", "none"] = Field(
        default="non_inline", description="which files get resource_link blocks (none: LangChain's adapters)"
    )
    app_view: Literal["auto", "off"] = Field(
        default="auto", description="auto: the MCP App view of runs for clients that negotiate MCP Apps"
    )

    # Local sandbox
    unsafe_no_sandbox: bool = False
    snapshots: Literal["auto", "off"] = Field(
        default="auto",
        description="keep each session's variables across expiry, eviction, crashes and restarts (auto: on for the "
        "local backend)",
    )
    snapshot_max_mb: float = Field(
        default=256, gt=0, description="per session: the largest namespace snapshot (bigger names left out first)"
    )
    memory_mb: int = Field(default=2048, ge=128)
    cpu_seconds: int = Field(default=3600, ge=1, description="CPU-time budget of one worker's life")
    max_processes: int = Field(default=64, ge=4)
    max_open_files: int = Field(default=256, ge=32)
    box_size_mb: int = Field(default=1024, ge=16, description="disk quota of a container's data folder")
    tmp_size_mb: int | None = Field(
        default=None, ge=8, description="size of the sandbox's /tmp (default: min(box_size_mb, 512))"
    )
    quota_check_interval_s: float | None = Field(
        default=None, gt=0, description="rescan period of folders inotify cannot watch (default 2 s)"
    )
    bwrap_path: str | None = Field(default=None, description="bubblewrap binary (default: found on PATH)")
    local_font_cache: bool = Field(default=True, description="prebuild matplotlib's font cache once per host")
    local_cache_dir: Path | None = Field(
        default=None, description="where that cache lives (default: the user cache dir)"
    )
    local_containers_dir: Path | None = Field(
        default=None, description="live containers' folders, each one's /mnt/data (default: <data_dir>/containers)"
    )

    # Capacity of the local backend (live workers, warm spares, threads)
    max_live_containers: int | None = Field(
        default=None, ge=1, description="live sandbox workers at most (default: from available memory)"
    )
    max_live_containers_per_owner: int | None = Field(
        default=None, ge=1, description="live workers of one owner (auth subject) at most (default: no own cap)"
    )
    warm_workers: int = Field(default=1, ge=0, le=64, description="spare workers started ahead of need")
    blas_threads: int | None = Field(
        default=None, ge=1, description="BLAS/OpenMP threads in the sandbox (default: the CPUs it may use)"
    )

    # Packages (run_code packages=..., PEP 723 blocks)
    packages: Literal["any", "allowlist", "off"] | None = Field(
        default=None, description="package policy (default: any on stdio, off on HTTP)"
    )
    package_allowlist: list[str] = Field(
        default_factory=list, description="packages allowed under the allowlist policy (comma-separated in env)"
    )
    package_index_url: str | None = Field(
        default=None, description="package index (default: the user's own uv/pip configuration)"
    )
    package_find_links: str | None = Field(
        default=None, description="a local folder (or page) of wheels; alone, installs use no index (offline)"
    )
    package_allow_builds: bool = Field(default=False, description="build sdists (inside the installer sandbox)")
    package_installer: Literal["auto", "uv", "pip"] = "auto"
    package_install_timeout_s: float = Field(default=300.0, gt=0)
    package_set_max_mb: int = Field(default=1024, ge=1, description="largest installed package set")
    package_cache_quota_mb: int = Field(default=5120, ge=1, description="all package sets and the installer cache")
    package_cache_dir: Path | None = Field(default=None, description="default: <data_dir>/packages")

    # OpenAI backend
    openai_model: str = "gpt-5.5"
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_memory_limit: Literal["1g", "4g", "16g", "64g"] = "1g"
    openai_max_retries: int = Field(default=4, ge=0, le=10)
    openai_timeout_s: float = Field(default=600.0, gt=0)
    azure_endpoint: str | None = None
    azure_api_version: str | None = None
    azure_deployment: str | None = None
    download_concurrency: int = Field(default=8, ge=1, le=64)

    @model_validator(mode="after")
    def _replicas_share_a_registry(self) -> Settings:
        if self.replica_url and not self.database_url:
            raise ValueError("REPLICA_URL needs DATABASE_URL: replicas share one PostgreSQL registry")
        return self

    @field_validator("data_dir", mode="before")
    @classmethod
    def _expand(cls, v: Any) -> Any:
        return Path(v).expanduser() if isinstance(v, str | Path) else v

    @field_validator("package_cache_dir", "local_containers_dir", mode="before")
    @classmethod
    def _expand_optional(cls, v: Any) -> Any:
        return Path(v).expanduser() if isinstance(v, str | Path) else v

    @field_validator("package_allowlist", mode="before")
    @classmethod
    def _split_list(cls, v: Any) -> Any:
        # Environment variables arrive as one string: "numpy, pandas tabulate".
        return [part for part in re.split(r"[,\s]+", v) if part] if isinstance(v, str) else v

    @property
    def host_paths_allowed(self) -> bool:
        return self.allow_host_paths if self.allow_host_paths is not None else self.transport == "stdio"

    @property
    def packages_policy(self) -> Literal["any", "allowlist", "off"]:
        """The package policy in force: over HTTP the caller is not the host's user, so off unless set."""
        if self.packages is not None:
            return self.packages
        return "any" if self.transport == "stdio" else "off"

    def max_message_bytes(self, transport: Literal["stdio", "http"]) -> int:
        """The message size limit of `transport`. stdio: a 100 MiB upload's base64 fits (the one client of the
        process sends it). HTTP: the SDK's own 4 MiB, as many callers may post at once and a body is held."""
        if self.max_message_mb is not None:
            return int(self.max_message_mb * 1024 * 1024)
        return 256 * 1024 * 1024 if transport == "stdio" else 4 * 1024 * 1024

    @property
    def package_cache_path(self) -> Path:
        return self.package_cache_dir if self.package_cache_dir is not None else self.data_dir / "packages"

    @property
    def package_sets_path(self) -> Path:
        """The store's folder of installed sets (packages/cache.py lays it out): public code, bound read-only
        into every run's sandbox, so a set installed later is importable in a live worker."""
        return self.package_cache_path / "sets"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "registry.sqlite3"

    @property
    def containers_dir(self) -> Path:
        """Live containers' folders. Scratch: each run's files are harvested into `files_dir`, and local
        containers are retired at shutdown, so a tmpfs here (small files at memory speed, only the tmpfs's own
        path in the sandbox's mount table) loses nothing; its pages count as the writing container's memory."""
        return self.local_containers_dir if self.local_containers_dir is not None else self.data_dir / "containers"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    def public_view(self) -> dict[str, Any]:
        """Settings as printed by `doctor`: secrets masked."""
        out = self.model_dump(mode="json")
        for key in ("openai_api_key", "auth_token", "cluster_secret"):
            out[key] = "set" if getattr(self, key) else None
        if self.database_url:  # postgresql://user:password@host/db
            out["database_url"] = re.sub(r"//[^/@]*@", "//***@", self.database_url)
        if self.package_index_url:
            # An index URL may carry credentials (https://user:token@host/simple).
            out["package_index_url"] = re.sub(r"//[^/@]*@", "//***@", self.package_index_url)
        return out


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = raw
    # Conventional variables of the OpenAI SDK and Azure.
    for field, var in (
        ("openai_api_key", "OPENAI_API_KEY"),
        ("openai_base_url", "OPENAI_BASE_URL"),
        ("azure_endpoint", "AZURE_OPENAI_ENDPOINT"),
        ("azure_api_version", "OPENAI_API_VERSION"),
        ("database_url", "DATABASE_URL"),
        ("store_url", "STORE_URL"),
        ("replica_url", "REPLICA_URL"),
        ("cluster_secret", "CLUSTER_SECRET"),
    ):
        if field not in values and environ.get(var):
            values[field] = environ[var]
    if "openai_api_key" not in values and environ.get("AZURE_OPENAI_API_KEY"):
        values["openai_api_key"] = environ["AZURE_OPENAI_API_KEY"]
    return values


def load_settings(
    overrides: dict[str, Any] | None = None,
    config_file: str | Path | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build the Settings: TOML file < environment < explicit overrides (CLI flags)."""
    env = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    if path:
        with open(path, "rb") as fh:
            values.update(tomllib.load(fh))
    values.update(_env_overrides(env))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return Settings.model_validate(values)
