"""Harvested files on the host: where they live, their mime types, resource URIs, and safe path handling.

Layout of uploaded inputs (and of harvested copies made before the blob store, still read where they lie):
`<data_dir>/files/<session_id>/<file_id>/<name>`. Harvested copies live in `storage.blobs`. A copy is written once
and never changed; a later change of the same container path becomes a new file id.
"""

from __future__ import annotations

import mimetypes
import os
import posixpath
import stat
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, unquote

from . import removal
from .errors import FileTooLarge, NotFound, PathRefused
from .models import FileInfo
from .sessions import FileRecord
from .storage.copying import copy_to_new

URI_SCHEME = "ci"
URI_TEMPLATE = URI_SCHEME + "://sessions/{session_id}/files/{file_id}/{name}"
CONTAINER_ROOT = "/mnt/data"
CHUNK = 1024 * 1024

_EXTRA_TYPES = {
    ".md": "text/markdown",
    ".csv": "text/csv",
    ".tsv": "text/tab-separated-values",
    ".json": "application/json",
    ".jsonl": "application/jsonl",
    ".parquet": "application/vnd.apache.parquet",
    ".ipynb": "application/x-ipynb+json",
    ".py": "text/x-python",
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
    ".svg": "image/svg+xml",
    ".webp": "image/webp",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
}
TEXT_LIKE = {
    "application/json",
    "application/jsonl",
    "application/yaml",
    "application/x-ipynb+json",
    "application/xml",
    "application/javascript",
    "image/svg+xml",
}
INLINE_IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp"}


def guess_mime(name: str) -> str:
    ext = os.path.splitext(name)[1].lower()
    return _EXTRA_TYPES.get(ext) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def is_text_mime(mime: str) -> bool:
    return mime.startswith("text/") or mime in TEXT_LIKE


def file_uri(session_id: str, file_id: str, name: str) -> str:
    return URI_TEMPLATE.format(session_id=session_id, file_id=file_id, name=quote(name, safe=""))


def parse_file_uri(uri: str) -> tuple[str, str] | None:
    """(session_id, file_id) of one of our resource URIs, else None."""
    prefix = f"{URI_SCHEME}://sessions/"
    if not uri.startswith(prefix):
        return None
    parts = uri[len(prefix) :].split("/")
    if len(parts) < 3 or parts[1] != "files":
        return None
    return unquote(parts[0]), unquote(parts[2])


def normalize_container_path(path: str) -> str:
    """A caller's path inside the container -> the normalised path relative to /mnt/data.

    Accepts 'out/a.png', './out/a.png', '/mnt/data/out/a.png', 'sandbox:/mnt/data/a.png'. Refuses '..' escapes,
    other absolute paths, NUL bytes and empty names.
    """
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise PathRefused(f"Invalid file path {path!r}.")
    p = path.strip()
    if p.startswith("sandbox:"):
        p = p[len("sandbox:") :]
    if p.startswith(CONTAINER_ROOT + "/"):
        p = p[len(CONTAINER_ROOT) + 1 :]
    elif p.startswith("/"):
        raise PathRefused(f"{path!r} is outside the container's data folder {CONTAINER_ROOT}.")
    norm = posixpath.normpath(p)
    if norm in (".", "") or norm == ".." or norm.startswith("../"):
        raise PathRefused(f"{path!r} escapes the container's data folder.")
    return norm


def store_dir(files_dir: Path, session_id: str, file_id: str) -> Path:
    return files_dir / session_id / file_id


def safe_name(name: str) -> str:
    base = os.path.basename(name.replace("\\", "/")) or "file"
    return base.replace("\x00", "")[:200] or "file"


def record_to_info(rec: FileRecord) -> FileInfo:
    return FileInfo(
        file_id=rec.file_id,
        path=rec.path,
        name=rec.name,
        bytes=rec.bytes,
        mime_type=rec.mime_type,
        sha256=rec.sha256,
        source="user" if rec.source == "user" else "generated",
        created_at=datetime.fromtimestamp(rec.created_at, UTC),
        uri=file_uri(rec.session_id, rec.file_id, rec.name),
        local_path=rec.local_path,
    )


def copy_with_hash(src: Path, dest: Path, max_bytes: int) -> tuple[int, str]:
    """Copy a host file (no symlink following for the final component) in the kernel, computing its sha256 in
    the same pass. Blocking."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(src, flags)
    except FileNotFoundError:
        raise NotFound(f"No file at {str(src)!r} on the server's host.", "Pass an absolute path that exists.") from None
    except OSError as exc:
        raise PathRefused(f"Cannot read {str(src)!r}: {exc.strerror or exc}.") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PathRefused(f"{str(src)!r} is not a regular file.")
        if st.st_size > max_bytes:
            raise FileTooLarge(
                f"{src.name} is {st.st_size} bytes; the limit is {max_bytes}.",
                "Raise CODE_INTERPRETER_MAX_FILE_BYTES or use a smaller file.",
            )
        return copy_to_new(fh.fileno(), dest, max_bytes, src.name)


def image_preview(path: Path, max_bytes: int) -> tuple[bytes, str] | None:
    """A downscaled copy of an image that fits in `max_bytes` (PNG when that fits, which keeps charts sharp, else
    JPEG), or None when it cannot be read or made that small. Blocking: Pillow decodes the whole image."""
    import io

    from PIL import Image

    try:
        with Image.open(path) as src:
            src.load()
            image = src.convert("RGBA" if "A" in src.getbands() else "RGB")
    except Exception:  # not an image Pillow reads, a decompression bomb, a truncated file...
        return None
    side = min(max(image.size), 1568)  # larger than most clients show an image anyway
    while side >= 64:
        thumb = image.copy()
        thumb.thumbnail((side, side))
        for fmt, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
            buf = io.BytesIO()
            (thumb.convert("RGB") if fmt == "JPEG" else thumb).save(buf, fmt, optimize=True, quality=80)
            if buf.tell() <= max_bytes:
                return buf.getvalue(), mime
        side = side * 2 // 3
    return None


def remove_tree(path: Path) -> None:
    removal.remove_tree(path)  # iterative: a 1,000-level tree made by user code is removed too
