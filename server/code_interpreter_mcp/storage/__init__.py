"""The host store of harvested files (content-addressed blobs, the copy that fills it, the history policy, the
snapshots of sessions' variables) and the registry's database.

- `copying`: a file copied in the kernel (`copy_file_range`) and hashed in the same pass, holes kept; a leaf
  that both the engine and a backend may use (it knows only errors).
- `blobs`: the `BlobStore`: blobs keyed by sha256 per owner under the data folder, reference counts rebuilt
  from the registry, real-block accounting, the server-wide quota, release and sweep.
- `catalog`: what the registry's records say about stored copies (reference counts, the upgrade's sizes).
- `history`: which superseded versions of a session's paths to drop once its history quota is exceeded.
- `snapshots`: the newest snapshot of each session's variables, as files in the data folder.
- `objects`: the shared store's contract (`ObjectStore`) and its two engines, a folder and S3 (`STORE_URL`).
- `mirror`: the data folder kept in step with the shared store: uploads before results, snapshots in the
  background, missing copies fetched back, a journal of what waits for a store that did not answer.
- `leases`: which replica is a session's home (`REPLICA_URL`): beats, claims, adoption by compare-and-set.
- `database`: the registry's `Database` contract and its two engines, SQLite (the default) and PostgreSQL
  (`DATABASE_URL`): schema creation and migration at start, every write one transaction.

Nothing here knows MCP, runs or backends; `blobs` and `history` know the registry's `FileRecord`.
"""
