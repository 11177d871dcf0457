"""The shared store of harvested bytes and snapshots (`STORE_URL`): one contract, `ObjectStore`, and its two
implementations, a folder (`file:///shared/path`, such as a volume every replica mounts) and S3 (`s3://bucket/prefix`
through obstore, configured by the usual `AWS_*` variables and `AWS_ENDPOINT_URL` for MinIO, SeaweedFS or R2).

Keys are paths relative to the data folder's `files/` (`<owner>/blobs/ab/cdef...`, `<owner>/snapshots/<session>/
run-3/manifest.json`), so the store mirrors that folder and a file comes back to the same place on any machine.
Bytes always travel between a local file and the store in chunks (obstore does the multipart upload itself, its
parts in parallel): a file is never held whole in memory. Every method blocks: call it from a worker thread.

Why obstore (over aiobotocore): one wheel with no pinned botocore, multipart and streaming built in, and its whole
configuration from the `AWS_*` variables (tests/test_infra.py has the comparison). Failures of either engine are
`StoreUnavailable`, retryable; a missing object is `None`/`False`, never an error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from ..errors import StoreUnavailable

CHUNK = 8 * 1024 * 1024
"""Bytes read or written at once; S3's multipart parts are this size too (its minimum part is 5 MiB)."""


class ObjectStore(Protocol):
    url: str

    def put_file(self, key: str, path: str) -> None:
        """The local file at `path` stored at `key` (replacing any object there)."""

    def get_file(self, key: str, dest: str) -> bool:
        """The object at `key` written to the new file `dest` (its folder made); False when there is none."""

    def size(self, key: str) -> int | None:
        """The object's size, None when there is none."""

    def list(self, prefix: str) -> list[str]:
        """The keys under `prefix` (a folder: it ends with '/')."""

    def delete(self, keys: list[str]) -> None:
        """Remove these objects; a missing one is not an error."""

    def check(self) -> None:
        """StoreUnavailable unless the store answers."""


def open_store(url: str | None) -> ObjectStore | None:
    """The store `STORE_URL` names; None (the data folder alone, as a single process needs) when unset."""
    if not url:
        return None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FolderStore(Path(unquote(parsed.path)), url)
    if parsed.scheme == "s3":
        return S3ObjectStore(parsed.netloc, parsed.path.strip("/"), url)
    raise ValueError(f"STORE_URL {url!r}: use s3://bucket/prefix or file:///absolute/folder")


class FolderStore:
    """Objects as files under a folder (a shared volume): written beside and renamed, so never seen half-made."""

    def __init__(self, root: Path, url: str = "") -> None:
        self.root, self.url = root, url or root.as_uri()

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"not a store key: {key!r}")
        return self.root / key

    def _unavailable(self, what: str, exc: OSError) -> StoreUnavailable:
        return StoreUnavailable(f"The file store at {self.url} could not {what}: {exc.strerror or exc}.")

    def put_file(self, key: str, path: str) -> None:
        dest = self._path(key)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
        if not self.root.is_dir():  # an unmounted volume: never made again here, where nobody else sees it
            raise self._unavailable("store " + key, FileNotFoundError("the store's folder is gone"))
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not os.path.exists(path):
                raise
            raise self._unavailable("store " + key, FileNotFoundError("the store's folder is gone")) from None
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise self._unavailable("store " + key, exc) from None

    def get_file(self, key: str, dest: str) -> bool:
        src = self._path(key)
        if not src.is_file():
            if not self.root.is_dir():
                raise self._unavailable("be read", FileNotFoundError("the store's folder is gone"))
            return False
        try:
            with _new_local(dest) as out, open(src, "rb") as fh:
                shutil.copyfileobj(fh, out, CHUNK)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._unavailable("read " + key, exc) from None
        return True

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def list(self, prefix: str) -> list[str]:
        self.check()
        base = self._path(prefix.rstrip("/"))
        out = []
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            out.extend(f"{rel}/{f}" for f in files if not f.endswith(".part"))
        return sorted(out)

    def delete(self, keys: list[str]) -> None:
        if keys:
            self.check()
        for key in keys:
            path = self._path(key)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # an empty folder left by the last object in it

    def check(self) -> None:
        if not self.root.is_dir():
            raise StoreUnavailable(f"The file store's folder {self.root} is missing.", "Create it, or fix STORE_URL.")


class S3ObjectStore:
    """Objects in an S3 bucket under a prefix, through obstore's blocking calls (made from worker threads)."""

    def __init__(self, bucket: str, prefix: str, url: str) -> None:
        try:
            from obstore.store import S3Store
        except ImportError:  # pragma: no cover - the `s3` extra is missing
            raise StoreUnavailable(
                "STORE_URL names S3, but obstore is not installed.", 'pip install "code-interpreter-mcp[s3]"'
            ) from None
        self.url, self.prefix = url, prefix
        # A few quick retries: a result waits on its upload, and a store that is down is reported (and the
        # upload retried later by the mirror), not waited on for obstore's default of ten.
        retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=5)}
        allow_http = os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true", "yes")
        client = {"allow_http": allow_http, "timeout": timedelta(seconds=60), "connect_timeout": timedelta(seconds=5)}
        self._store = S3Store(bucket, prefix=prefix or None, retry_config=retry, client_options=client)  # type: ignore[arg-type]

    def _fail(self, what: str, exc: Exception) -> StoreUnavailable:
        text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        return StoreUnavailable(f"The S3 store at {self.url} could not {what}: {text}")

    def put_file(self, key: str, path: str) -> None:
        import obstore

        try:
            with open(path, "rb") as fh:
                obstore.put(self._store, key, _chunks(fh), chunk_size=CHUNK)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise self._fail("store " + key, exc) from None

    def get_file(self, key: str, dest: str) -> bool:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            got = obstore.get(self._store, key)
            with _new_local(dest) as out:
                for chunk in got.stream(min_chunk_size=CHUNK):
                    out.write(chunk)
        except (NotFoundError, FileNotFoundError):  # obstore raises the latter for a 404 as well
            return False
        except Exception as exc:
            raise self._fail("read " + key, exc) from None
        return True

    def size(self, key: str) -> int | None:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            return int(obstore.head(self._store, key)["size"])
        except (NotFoundError, FileNotFoundError):  # obstore raises the latter for a 404 as well
            return None
        except Exception as exc:
            raise self._fail("look up " + key, exc) from None

    def list(self, prefix: str) -> list[str]:
        import obstore

        try:
            return sorted(str(m["path"]) for batch in obstore.list(self._store, prefix=prefix) for m in batch)
        except Exception as exc:
            raise self._fail("list " + prefix, exc) from None

    def delete(self, keys: list[str]) -> None:
        import obstore

        if not keys:
            return
        try:
            obstore.delete(self._store, keys)
        except Exception as exc:
            raise self._fail(f"delete {len(keys)} objects", exc) from None

    def check(self) -> None:
        self.list("_health/")


def _chunks(fh: object) -> Iterator[bytes]:
    read = fh.read  # type: ignore[attr-defined]
    while chunk := read(CHUNK):
        yield chunk


@contextlib.contextmanager
def _new_local(dest: str) -> Iterator[object]:
    """A new local file at `dest`, written beside it and renamed only once complete."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.{threading.get_ident()}.fetch"
    try:
        with open(tmp, "wb") as out:
            yield out
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
