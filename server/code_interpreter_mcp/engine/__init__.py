"""The core both faces (MCP and CLI) call: sessions + backend + harvested files + structured output.

The engine picks the session's container (replacing an expired one and re-uploading the session's inputs), runs
code, harvests every new or changed file to the host right after the run, validates JSON against the caller's
schema, and shapes results to the result budget. It knows no MCP types. One module per responsibility:

- `facade`: the `Engine` the faces call; start, stop, the housekeeping loop, wiring.
- `context`: the state the parts share (settings, backend and its capabilities, registry, backend readiness).
- `session_choice`: which session a call uses.
- `containers`: container lifecycle: acquire, replace on expiry, retire, restore inputs, the reaper; capacity
  limits go here.
- `run`: one run: arguments, execute (one flow for every backend, stoppable), harvest, JSON, shaping.
- `runs`: runs in the background: the run registry (handles, `wait_s`, `get_run`, `cancel_run`, one run per
  session, ownership, results kept and persisted, lost runs after a restart). `live`: a run's output so far.
- `harvest`: one harvest of a container (listing diff, fetches in batches, blobs placed, records and the history
  quota in one transaction).
- `json_result`: the run's JSON: extraction, validation, repair, token usage.
- `budget`: the result budget in numbers (characters, the summary's share, measuring, clipping), for every tool.
- `shaping`: a run's result within the budget: the file-list cap, clipping, failure texts, link rewriting,
  inline images and previews.
- `files`: list (filter, pages), find, download (parts by offset, previews, the binary cap), save copies,
  resources. `inputs`: upload and a run's input files.
- `progress`: progress relays of runs.
- `packages`: a run's package set (the session's requirements, the one PackageManager, leases per container).
"""

from .facade import Engine
from .files import DownloadOutput
from .progress import ProgressSink
from .run import MAX_CODE_CHARS
from .shaping import InlineImage, RunOutput

__all__ = ["MAX_CODE_CHARS", "DownloadOutput", "Engine", "InlineImage", "ProgressSink", "RunOutput"]
