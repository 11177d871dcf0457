"""Unit tests of the pieces around the engine: paths, URIs, settings, the registry, the CLI's config output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from code_interpreter_mcp.artifacts import file_uri, guess_mime, normalize_container_path, parse_file_uri
from code_interpreter_mcp.backends.base import ContainerState
from code_interpreter_mcp.cli import client_config
from code_interpreter_mcp.config import load_settings
from code_interpreter_mcp.errors import PathRefused, SessionNotFound, redact
from code_interpreter_mcp.sessions import FileRecord, Registry

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("a.png", "a.png"),
        ("./out/a.png", "out/a.png"),
        ("/mnt/data/x/y.csv", "x/y.csv"),
        ("sandbox:/mnt/data/c.txt", "c.txt"),
        ("out/../b.txt", "b.txt"),
    ],
)
def test_container_paths_normalise(given: str, expected: str) -> None:
    assert normalize_container_path(given) == expected


@pytest.mark.parametrize("bad", ["../etc/passwd", "/etc/passwd", "/mnt/data/../../etc", "", "a\x00b", ".", "x/../.."])
def test_container_paths_refused(bad: str) -> None:
    with pytest.raises(PathRefused):
        normalize_container_path(bad)


def test_uris_round_trip() -> None:
    uri = file_uri("s_abc", "f_123", "my chart #1.png")
    assert uri == "ci://sessions/s_abc/files/f_123/my%20chart%20%231.png"
    assert parse_file_uri(uri) == ("s_abc", "f_123")
    assert parse_file_uri("file:///etc/passwd") is None
    assert parse_file_uri("ci://sessions/x") is None


def test_mime_guesses() -> None:
    assert guess_mime("a.csv") == "text/csv"
    assert guess_mime("b.xlsx").endswith("spreadsheetml.sheet")
    assert guess_mime("noext") == "application/octet-stream"


def test_settings_layering(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("expiry_minutes = 5\nmemory_mb = 512\n")
    env = {"CODE_INTERPRETER_MEMORY_MB": "1024", "OPENAI_API_KEY": "sk-abcdefghijklmnop"}
    s = load_settings({"expiry_minutes": 7}, config_file=cfg, environ=env)
    assert s.expiry_minutes == 7 and s.memory_mb == 1024
    assert s.openai_api_key is not None and "sk-abc" not in repr(s)
    assert s.public_view()["openai_api_key"] == "set"
    assert s.host_paths_allowed is True
    assert load_settings({"transport": "http"}, environ={}).host_paths_allowed is False


def test_redact_hides_keys() -> None:
    assert "sk-" not in redact("bad key sk-proj-abcdefghijklmnopqrstuv here")
    assert "tok" not in redact("Authorization: Bearer tok.abcdefghijkl")


def test_client_configs_are_valid() -> None:
    desktop = json.loads(client_config("claude-desktop", "local"))
    server = desktop["mcpServers"]["code-interpreter"]
    assert Path(server["command"]).is_absolute() and server["args"][-1] == "serve"
    assert json.loads(client_config("vscode", "openai"))["servers"]["code-interpreter"]["type"] == "stdio"
    assert client_config("claude-code", "local").startswith("claude mcp add code-interpreter")


def test_example_config_parses() -> None:
    root = Path(__file__).resolve().parents[1]
    cfg = json.loads((root / "claude_desktop_config.example.json").read_text())
    assert cfg["mcpServers"]["code-interpreter"]["args"] == ["serve"]


async def test_registry_persists_and_enforces_owner(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.sqlite3")
    s = await reg.create_session(owner="alice")
    state = ContainerState(id="lc_1", backend="local", created_at=1.0, last_active_at=2.0, expires_after_s=60)
    await reg.add_container(s, state)
    await reg.add_files(
        s,
        [
            FileRecord(
                file_id="f_1",
                session_id=s.id,
                container_id="lc_1",
                path="a.txt",
                name="a.txt",
                bytes=3,
                mime_type="text/plain",
                sha256="x",
                source="generated",
                created_at=3.0,
                local_path=None,
                remote_id=None,
                version="v1",
            )
        ],
    )
    reg.close()
    again = Registry(tmp_path / "r.sqlite3")
    loaded = await again.get_session(s.id, "alice")
    assert loaded.current_container == "lc_1" and loaded.files[0].path == "a.txt"
    assert again.containers["lc_1"].verified is False
    with pytest.raises(SessionNotFound):
        await again.get_session(s.id, "mallory")
    with pytest.raises(SessionNotFound):
        await again.get_session("s_" + "0" * 32, "alice")
    await again.close_session(loaded)
    with pytest.raises(SessionNotFound):
        await again.get_session(s.id, "alice")
    again.close()


def test_published_schema_means_what_the_model_schema_means() -> None:
    """Type lists instead of `anyOf` change nothing a validator accepts or refuses, for every tool result model."""
    import jsonschema

    from code_interpreter_mcp import models

    sample = json.loads(
        '{"session_id": "s_1", "container_id": "c", "backend": "local", "status": "ok", "stdout": "", "stderr": "",'
        ' "result": "2", "error": null, "json": null, "json_error": null, "files": [], "outputs": [],'
        ' "more_files": null, "container": {"id": "c", "expires_at": "2026-12-07T16:45:26Z", "state_lost": false,'
        ' "state_restored": null, "isolation": "bubblewrap"}, "truncated": false, "warnings": [], "text": null,'
        ' "structured": null, "usage": null, "model_calls": 0, "duration_ms": 1.0, "run_id": "r_1",'
        ' "elapsed_s": null, "position": null, "waits_for": null, "packages": null, "execution_count": 1}'
    )
    published = models.published_schema(models.RunResult)
    original = models.RunResult.model_json_schema(by_alias=True)
    assert "anyOf" not in json.dumps(published["properties"]["result"])
    variants = [sample]
    for key in sample:
        for value in (None, 1, "x", 2.5, True, [], {}, {"id": 3}, [{"bad": 1}]):
            variants.append({**sample, key: value})
    variants.append({k: v for k, v in sample.items() if k != "status"})
    variants.append({**sample, "container": {**sample["container"], "state_restored": {"from_run": "x"}}})
    refused = 0
    for instance in variants:
        a = jsonschema.Draft202012Validator(original).is_valid(instance)
        b = jsonschema.Draft202012Validator(published).is_valid(instance)
        assert a == b, instance
        refused += not a
    assert 0 < refused < len(variants)
    for name in dir(models):
        model = getattr(models, name)
        if isinstance(model, type) and issubclass(model, models.BaseModel) and model.__module__ == models.__name__:
            jsonschema.Draft202012Validator.check_schema(models.published_schema(model))
