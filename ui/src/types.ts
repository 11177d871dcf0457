// The JSON the view renders: `RunResult` (server/code_interpreter_mcp/models.py) as the `structuredContent` of
// run_code / get_run / cancel_run results. Every field is optional here: the view renders what it gets.

export interface FileInfo {
  file_id: string;
  path?: string;
  name: string;
  bytes: number;
  mime_type: string;
  sha256?: string | null;
  source?: string;
  created_at?: string;
  uri: string;
  local_path?: string | null;
}

export interface ErrorInfo {
  type: string;
  message: string;
  traceback?: string | null;
}

export interface TableData {
  columns: unknown[];
  rows: unknown[][];
  shape?: [number, number] | number[];
  index?: unknown[] | null;
  truncated?: boolean;
}

export interface Output {
  kind?: "display" | "result" | string;
  data?: Record<string, unknown>;
  file_id?: string | null;
  path?: string | null;
  chart?: Record<string, unknown> | null;
  table?: TableData | null;
  stdout_at?: number | null;
}

export interface SkippedName {
  name: string;
  reason: string;
}

export interface StateRestored {
  from_run?: number | null;
  saved_at?: string | null;
  restored?: string[];
  skipped?: SkippedName[];
  seconds?: number;
}

export interface ContainerInfo {
  id?: string;
  expires_at?: string | null;
  state_lost?: boolean;
  state_restored?: StateRestored | null;
  isolation?: string;
}

export interface Violation {
  path: string;
  message: string;
}

export interface JsonError {
  message: string;
  violations?: Violation[];
}

export interface MoreFiles {
  count: number;
  bytes: number;
  hint?: string;
}

export interface PackagesInfo {
  requirements?: string[];
  distributions?: { name: string; version: string }[];
  reused?: boolean;
  seconds?: number;
}

export interface RunResult {
  session_id?: string;
  container_id?: string;
  backend?: string;
  status?: string;
  stdout?: string;
  stderr?: string;
  result?: string | null;
  error?: ErrorInfo | null;
  json?: unknown;
  json_error?: JsonError | null;
  files?: FileInfo[];
  outputs?: Output[];
  more_files?: MoreFiles | null;
  container?: ContainerInfo | null;
  truncated?: boolean;
  warnings?: string[];
  text?: string | null;
  packages?: PackagesInfo | null;
  duration_ms?: number;
  run_id?: string | null;
  elapsed_s?: number | null;
  position?: number | null;
  waits_for?: string | null;
  execution_count?: number | null;
}

/** Statuses after which nothing changes any more; `running` and `queued` are the only live ones. */
export const LIVE_STATUSES = new Set(["running", "queued"]);
