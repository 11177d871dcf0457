"""Where a file record's host copy is on this machine, brought back from the shared store (`STORE_URL`) when it
is missing here: made on another replica, adopted from a dead one, or this data folder lost.

Without a shared store a record's copy is where the record says, as in a single process. With one, the place is
worked out from the record (its blob, or the last three parts of an input's path) under this machine's own data
folder, since replicas need not share a data folder's path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anyio

from ..errors import StoreUnavailable
from ..records import FileRecord, Session
from ..storage.blobs import owner_key
from .context import EngineContext

logger = logging.getLogger(__name__)


async def local_copy(ctx: EngineContext, rec: FileRecord, owner: str | None) -> Path | None:
    """The record's copy here, or None when there is none (here or in the store). StoreUnavailable when it is
    missing here and the store does not answer."""
    mirror = ctx.mirror
    if mirror is None:
        return Path(rec.local_path) if rec.local_path else None
    if rec.blob is not None:
        path = ctx.blobs.blob_file(owner_key(owner), rec.blob)
    elif rec.local_path:
        parts = Path(rec.local_path).parts[-3:]  # <session>/<file id>/<name>: see artifacts.store_dir
        path = os.fspath(ctx.settings.files_dir.joinpath(*parts)) if len(parts) == 3 else rec.local_path
    else:
        return None
    key = mirror.key_of(path)
    if key is not None and not await mirror.fetch_async(key):  # one stat when it is here
        return None
    return Path(path)


async def snapshot_from_store(ctx: EngineContext, session: Session) -> None:
    """Before a new container of the session: its newest snapshot in the shared store brought here when it is
    newer than the one here (it was written on another replica), so the new worker restores the variables."""
    mirror, snapshots = ctx.mirror, ctx.snapshots
    if mirror is None or snapshots is None:
        return
    key = owner_key(session.owner)
    here = await anyio.to_thread.run_sync(snapshots.newest_seq, key, session.id)
    try:
        seq = await anyio.to_thread.run_sync(mirror.fetch_snapshot, key, session.id, here)
    except StoreUnavailable as exc:  # the variables of the last snapshot here, if any; the run says what it got
        logger.warning("snapshot of session %s not fetched: %s", session.id, exc.message)
        return
    if seq is not None and seq > here:
        await anyio.to_thread.run_sync(snapshots.adopted, key, session.id, seq)


async def to_store(ctx: EngineContext, records: list[FileRecord]) -> str | None:
    """The records' new copies uploaded to the shared store before the result that names them is returned; a
    warning when the store did not answer (they wait here, in the journal, and are uploaded when it does)."""
    mirror = ctx.mirror
    if mirror is None or not records:
        return None
    keys = [k for r in records if r.local_path and (k := mirror.key_of(r.local_path)) is not None]
    waiting = await mirror.push_async(keys)
    if not waiting:
        return None
    return (
        f"{waiting} file(s) are kept on this server only for now: the shared store did not answer "
        f"({mirror.last_error}); they are uploaded when it does."
    )
