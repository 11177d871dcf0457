"""Tiny distributions the package tests build themselves, and a loopback PEP 503 index that serves them.

Wheels are zips written by hand (METADATA, WHEEL, RECORD), sdists are tarballs with a PKG-INFO: enough for uv and
pip to resolve and install them, and nothing that needs the internet.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import re
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(
    folder: Path,
    name: str,
    version: str,
    *,
    requires: list[str] | tuple[str, ...] = (),
    tag: str = "py3-none-any",
    extra_files: dict[str, bytes] | None = None,
    payload_bytes: int = 0,
) -> Path:
    """Write `{name}-{version}-{tag}.whl` into `folder`: a module `{name}` whose VERSION is `version`, plus
    `extra_files` (archive path -> content) and `payload_bytes` of incompressible data in `{name}/blob.bin`."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = _normal(name)
    info = f"{dist}-{version}.dist-info"
    files: dict[str, bytes] = {f"{dist}/__init__.py": f"VERSION = {version!r}\n".encode()}
    if payload_bytes:
        files[f"{dist}/blob.bin"] = hashlib.shake_256(name.encode()).digest(payload_bytes)
    files.update(extra_files or {})
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files[f"{info}/METADATA"] = metadata.encode()
    files[f"{info}/WHEEL"] = f"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: {tag}\n".encode()
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    record += f"{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = record.encode()
    path = folder / f"{dist}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for arc, data in files.items():
            zf.writestr(arc, data)
    return path


def _write_sdist(path: Path, members: dict[str, bytes]) -> Path:
    """A .tar.gz at `path` holding `members` (archive name -> bytes)."""
    with tarfile.open(path, "w:gz") as tf:
        for arc, data in members.items():
            ti = tarfile.TarInfo(arc)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def build_sdist(folder: Path, name: str, version: str) -> Path:
    """An sdist only (PKG-INFO and a pyproject.toml): what a package without a wheel looks like."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = _normal(name)
    root = f"{dist}-{version}"
    members = {
        f"{root}/PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{root}/pyproject.toml": (
            b'[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        ),
        f"{root}/{dist}/__init__.py": b"",
    }
    return _write_sdist(folder / f"{root}.tar.gz", members)


def write_simple_index(files: Path, root: Path) -> Path:
    """Lay out a PEP 503 simple index of every distribution in `files` under `root`/simple (files copied to
    `root`/files). Returns the `simple` folder."""
    simple = root / "simple"
    store = root / "files"
    store.mkdir(parents=True, exist_ok=True)
    by_project: dict[str, list[str]] = {}
    for f in sorted(files.iterdir()):
        if f.suffix == ".whl" or f.name.endswith(".tar.gz"):
            project = re.sub(r"[-_.]+", "-", f.name.split("-")[0]).lower()
            by_project.setdefault(project, []).append(f.name)
            (store / f.name).write_bytes(f.read_bytes())
    for project, names in by_project.items():
        d = simple / project
        d.mkdir(parents=True, exist_ok=True)
        links = "".join(
            f'<a href="../../files/{html.escape(n)}#sha256={hashlib.sha256((store / n).read_bytes()).hexdigest()}">'
            f"{html.escape(n)}</a>\n"
            for n in names
        )
        (d / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    links = "".join(f'<a href="{p}/">{p}</a>\n' for p in sorted(by_project))
    simple.mkdir(parents=True, exist_ok=True)
    (simple / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    return simple


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return None


@contextmanager
def serve_index(root: Path) -> Iterator[str]:
    """Serve `root` over HTTP on 127.0.0.1 (a free port) while the block runs; yields the simple index URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


_BACKEND = """\
import base64, hashlib, os, zipfile

NAME, VERSION, PROBE = {name!r}, {version!r}, {probe!r}


def _probe():
    lines = []
    try:
        open(PROBE).read()
        lines.append("read: yes")
    except OSError as exc:
        lines.append("read: no (%s)" % exc.__class__.__name__)
    lines.append("home: " + os.environ.get("HOME", ""))
    lines.append("secrets: " + ",".join(k for k in os.environ if "KEY" in k or "TOKEN" in k))
    return "\\n".join(lines) + "\\n"


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    info = "%s-%s.dist-info" % (NAME, VERSION)
    files = {{
        NAME + "/__init__.py": b"",
        NAME + "/probe.txt": _probe().encode(),
        info + "/METADATA": ("Metadata-Version: 2.1\\nName: %s\\nVersion: %s\\n" % (NAME, VERSION)).encode(),
        info + "/WHEEL": b"Wheel-Version: 1.0\\nGenerator: tests\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }}
    record = ""
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += "%s,sha256=%s,%d\\n" % (path, digest, len(data))
    files[info + "/RECORD"] = (record + info + "/RECORD,,\\n").encode()
    name = "%s-%s-py3-none-any.whl" % (NAME, VERSION)
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return name
"""


def build_probing_sdist(folder: Path, name: str, version: str, probe: Path) -> Path:
    """An sdist whose own in-tree build backend (no build dependencies) records, in the wheel it builds, whether
    it could read `probe`, its HOME and any secret-looking variable it saw: what a build script could reach."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = _normal(name)
    root = f"{dist}-{version}"
    members = {
        f"{root}/PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{root}/pyproject.toml": (b'[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'),
        f"{root}/backend.py": _BACKEND.format(name=dist, version=version, probe=str(probe)).encode(),
    }
    return _write_sdist(folder / f"{root}.tar.gz", members)
