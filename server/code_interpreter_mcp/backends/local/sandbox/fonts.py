"""matplotlib's font list, built once per host and interpreter and mounted read-only into every sandbox.

A fresh MPLCONFIGDIR costs about 0.5 s on the first `import matplotlib.pyplot` in every new sandbox; the worker
copies this prebuilt list instead (worker.py). This module owns building and naming that cache; it knows nothing of
how the cache is mounted (bubblewrap.py) or which workers use it (pool.py).
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio

from ....config import Settings
from . import profile as sandbox

logger = logging.getLogger(__name__)


async def prepare(settings: Settings) -> Path | None:
    """The cache folder for this server's workers, or None when it is switched off or cannot be built."""
    if not settings.local_font_cache:
        return None
    cache_root = Path(settings.local_cache_dir if settings.local_cache_dir is not None else _default_cache_dir())
    try:
        return await anyio.to_thread.run_sync(prebuild_font_cache, cache_root)
    except Exception as exc:  # an optimisation only
        logger.warning("matplotlib font cache not prebuilt: %s", exc)
        return None


def font_cache_key() -> str | None:
    """Identifies the interpreter + matplotlib whose font list we cache; None when matplotlib is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        mpl_version = version("matplotlib")
    except PackageNotFoundError:
        return None
    except Exception:
        return None
    raw = f"{sandbox.interpreter()}|{sys.prefix}|{mpl_version}".encode()
    return f"mpl-{mpl_version}-{hashlib.sha256(raw).hexdigest()[:12]}"


def prebuild_font_cache(cache_root: Path, timeout_s: float = 120.0) -> Path | None:
    """Build matplotlib's font list once on the host (blocking: call from a thread) and return its directory.

    Font paths are the same inside the sandbox (same-path binds), and HOME is a scratch folder so no per-user fonts
    get listed."""
    key = font_cache_key()
    if key is None:
        return None
    final = cache_root / key
    if any(final.glob("fontlist-*.json")):
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root, prefix=".build-") as scratch:
        build = Path(scratch) / "out"
        build.mkdir()
        env = sandbox.sandbox_env(home=scratch, tmp=scratch, mplconfigdir=str(build))
        proc = subprocess.run(
            [sandbox.interpreter(), "-I", "-B", "-c", "import matplotlib.font_manager"],
            env=env,
            cwd=scratch,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
        )
        if proc.returncode != 0 or not any(build.glob("fontlist-*.json")):
            err = proc.stderr.decode(errors="replace")[-500:]
            logger.warning("could not prebuild matplotlib's font cache: %s", err)
            return None
        for p in build.iterdir():
            if not p.name.endswith(".json"):
                p.unlink()
        build.chmod(0o755)
        for p in build.iterdir():
            p.chmod(0o644)
        try:
            build.rename(final)
        except OSError:
            if not any(final.glob("fontlist-*.json")):  # another server won the race: fine
                raise
    return final


def _default_cache_dir() -> str:
    import platformdirs

    return platformdirs.user_cache_dir("code-interpreter-mcp", appauthor=False)
