"""Clean-up and reporting under hostile code: trees of any depth are removed, running out of file descriptors names
its cause, odd file names are harvested, host paths stay with callers allowed to name them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from code_interpreter_mcp.app import content
from code_interpreter_mcp.app.clients import ClientProfile
from code_interpreter_mcp.backends.local.sandbox.profile import mount_table_path
from code_interpreter_mcp.engine import RunOutput
from code_interpreter_mcp.models import ContainerInfo, RunResult
from code_interpreter_mcp.removal import remove_tree, remove_tree_strict
from tests.helpers import structured, text_of
from tests.hostile import LATENCY_BOUND_S, hostile_server

pytestmark = pytest.mark.anyio

DEEP_TREE = """
import os
for i in range(1000):
    os.mkdir(f'level_{i:04d}')
    os.chdir(f'level_{i:04d}')
    open('f', 'w').write('x')
os.chmod('.', 0o500)
os.chdir('/mnt/data')
"""


def make_deep_tree(root: Path, levels: int) -> None:
    fd = os.open(root, os.O_RDONLY)
    try:
        for i in range(levels):
            name = f"level_directory_{i:04d}"
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
            with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "w") as f:
                f.write("x")
        os.symlink("/etc", "link", dir_fd=fd)
        os.mkdir("locked", dir_fd=fd)
        os.chmod("locked", 0, dir_fd=fd)
    finally:
        os.close(fd)


def test_a_1000_level_tree_is_removed(tmp_path: Path) -> None:
    root = tmp_path / "deep"
    root.mkdir()
    make_deep_tree(root, 1000)
    (tmp_path / "outside").write_text("kept")
    remove_tree_strict(root)
    assert not root.exists() and (tmp_path / "outside").read_text() == "kept"  # the symlink was not followed
    remove_tree(root)  # gone already: nothing to do, nothing raised
    single = tmp_path / "file"
    single.write_text("x")
    remove_tree(single)
    assert not single.exists()


async def test_closing_a_session_reclaims_a_1000_level_tree(tmp_path: Path) -> None:
    async with hostile_server(tmp_path) as h:
        s = structured(await h.call("run_code", {"code": DEEP_TREE, "wait_s": 300}))
        assert s["status"] == "ok", s
        containers = h.engine.settings.data_dir / "containers"
        assert (containers / s["container_id"]).exists()
        closed = await h.call("close_session", {"session_id": s["session_id"], "delete_files": True})
        assert not closed.is_error, text_of(closed)
        assert not (containers / s["container_id"]).exists()
        assert not (h.engine.settings.files_dir / s["session_id"]).exists()


async def test_making_a_1000_level_tree_does_not_hold_other_sessions(tmp_path: Path) -> None:
    async with hostile_server(tmp_path) as h:
        r, worst = await h.during(lambda: h.call("run_code", {"code": DEEP_TREE, "wait_s": 300}))
        s = structured(r)
        assert s["status"] == "ok", s
        assert worst < LATENCY_BOUND_S, worst
        await h.alive()


async def test_running_out_of_file_descriptors_names_the_cause(tmp_path: Path) -> None:
    code = "held = []\nwhile True:\n    held.append(open('/dev/null'))"
    async with hostile_server(tmp_path) as h:
        r, worst = await h.during(lambda: h.call("run_code", {"code": code}))
        s = structured(r)
        assert s["status"] == "error" and s["error"]["type"] == "OSError", s
        assert "Too many open files" in s["error"]["message"] and "close the ones" in s["error"]["message"]
        assert worst < LATENCY_BOUND_S, worst
        # The worker survived with its state: the files are still held, and freeing them recovers.
        again = structured(await h.call("run_code", {"code": "len(held) > 10"}))
        assert again["result"] == "True" and not again["container"]["state_lost"]
        freed = structured(await h.call("run_code", {"code": "for f in held: f.close()\nimport decimal\n'ok'"}))
        assert freed["result"] == "'ok'"


async def test_odd_file_names_are_harvested(tmp_path: Path) -> None:
    code = (
        "import os\n"
        "open(b'bad\\xff\\xfename.txt', 'w').write('latin')\n"
        "open('back\\\\slash.txt', 'w').write('back')\n"
        "os.makedirs(b'dir\\xff', exist_ok=True)\n"
        "open(b'dir\\xff/inner.txt', 'w').write('inner')\n"
        "open('new\\nline.txt', 'w').write('nl')\n"
    )
    async with hostile_server(tmp_path) as h:
        r, worst = await h.during(lambda: h.call("run_code", {"code": code}))
        s = structured(r)
        paths = {f["path"]: f for f in s["files"]}
        assert set(paths) == {"bad\\xff\\xfename.txt", "back\\slash.txt", "dir\\xff/inner.txt", "new\nline.txt"}
        assert worst < LATENCY_BOUND_S, worst
        bodies = {"bad\\xff\\xfename.txt": "latin", "back\\slash.txt": "back", "dir\\xff/inner.txt": "inner"}
        for path, body in bodies.items():
            d = await h.call("download_file", {"file": paths[path]["file_id"]})
            assert not d.is_error and body in text_of(d) + str(d.content), (path, text_of(d))


@pytest.mark.parametrize(
    ("transport", "allowed", "shown"), [("http", None, False), ("http", True, True), ("stdio", None, True)]
)
async def test_host_paths_reach_only_callers_allowed_to_name_them(
    tmp_path: Path, transport: str, allowed: bool | None, shown: bool
) -> None:
    async with hostile_server(tmp_path, transport=transport, allow_host_paths=allowed) as h:
        run = structured(await h.call("run_code", {"code": "open('f.txt', 'w').write('x')"}))
        listed = structured(await h.call("list_container_files", {}))
        uploaded = structured(await h.call("upload_file", {"name": "u.txt", "content_base64": "aGk="}))
        downloaded = structured(await h.call("download_file", {"file": "f.txt"}))
        infos = [run["files"][0], listed["files"][0], uploaded["file"], downloaded["file"]]
        assert all((info.get("local_path") is not None) == shown for info in infos), infos


def test_a_result_that_cannot_be_serialised_keeps_stdout_and_files() -> None:
    deep: list[object] = []
    for _ in range(400):
        deep = [deep]
    result = RunResult(
        session_id="s",
        container_id="c",
        backend="local",
        status="ok",
        stdout="kept\n",
        container=ContainerInfo(id="c", expires_at=None),
        json=deep,
    )
    profile = ClientProfile(
        name=None,
        protocol_version="2025-11-25",
        content_only=False,
        links=True,
        link_mode="non_inline",
        budget=80_000,
        summary_room=4000,
        stdio=True,
    )
    out = content.run_result(RunOutput(result=result), profile)
    assert out.structured_content is not None
    assert out.structured_content["stdout"] == "kept\n" and out.structured_content["json"] is None
    assert any("could not be serialised" in w for w in out.structured_content["warnings"])


def test_the_mount_table_shows_a_path_within_its_filesystem(tmp_path: Path) -> None:
    """The kernel prints a bind mount's source relative to its filesystem: with the data folder on a filesystem
    of its own, the sandbox sees `/containers/...`, not the host's full path (what `doctor` reports)."""
    table = tmp_path / "mountinfo"
    table.write_text(
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "40 27 254:1 / /srv/ci\\040data rw,relatime - ext4 /dev/vdb rw\n"
        "41 27 254:0 /exported /home/alice/share rw,relatime - ext4 /dev/vda rw\n"
    )
    assert mount_table_path(Path("/srv/ci data/containers"), str(table)) == "/containers"
    assert mount_table_path(Path("/home/alice/share/x/containers"), str(table)) == "/exported/x/containers"
    assert mount_table_path(Path("/home/bob/containers"), str(table)) == "/home/bob/containers"


async def test_the_sandbox_mount_table_shows_what_doctor_reports(tmp_path: Path) -> None:
    code = "print([l.split()[3] for l in open('/proc/self/mountinfo') if l.split()[4] == '/mnt/data'][0])"
    async with hostile_server(tmp_path) as h:
        s = structured(await h.call("run_code", {"code": code}))
        reported = h.engine.backend.describe()["data_folder_in_mount_table"]
        assert s["stdout"].strip() == reported.replace("<container>", s["container_id"]), (s["stdout"], reported)
