"""Packages without running an installer: requirement checking, PEP 723 blocks, policy, settings, the index
configuration the sandbox is given, and the mapping of installer output onto errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from code_interpreter_mcp.config import Settings, load_settings
from code_interpreter_mcp.errors import (
    BadRequirement,
    PackageConflict,
    PackageIndexUnreachable,
    PackageNotFound,
    PackageNoWheel,
    PackageRefused,
)
from code_interpreter_mcp.packages import gather_requirements, normalize_requirements, script_dependencies
from code_interpreter_mcp.packages.failures import classify
from code_interpreter_mcp.packages.index import index_config, mask_url
from code_interpreter_mcp.packages.policy import PackagePolicy
from code_interpreter_mcp.packages.requirements import read_script_metadata

# ----------------------------------------------------------------------------------------------- requirements


def test_requirements_are_normalised_sorted_and_deduplicated() -> None:
    got = normalize_requirements(["Scikit_Learn >=1.5", "tabulate", "tabulate", "Pandas[Excel,Performance]<3"])
    assert got == ["pandas[excel,performance]<3", "scikit-learn>=1.5", "tabulate"]
    assert normalize_requirements(['numpy; python_version >= "3.8"']) == ['numpy; python_version >= "3.8"']


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("https://example.com/pkg-1.0.tar.gz", "URL"),
        ("git+https://github.com/x/y", "URL"),
        ("pkg @ https://example.com/pkg.whl", "direct reference"),
        ("./local/pkg", "local path"),
        ("/abs/pkg-1.0-py3-none-any.whl", "local path"),
        ("pkg-1.0-py3-none-any.whl", "local path"),
        ("-e .", "option"),
        ("--index-url https://evil.example/simple", "option"),
        ("tabulate\n--extra-index-url https://evil.example/simple", "several lines"),
        ("", "empty"),
        ("not a requirement!!", "not a valid requirement"),
        ("x" * 400, "longer than"),
    ],
)
def test_requirements_refused(text: str, says: str) -> None:
    with pytest.raises(BadRequirement) as info:
        normalize_requirement_one(text)
    assert says in info.value.message
    assert info.value.code == "bad_requirement" and info.value.hint


def normalize_requirement_one(text: object) -> list[str]:
    return normalize_requirements([text])


def test_non_string_and_too_many_requirements_refused() -> None:
    with pytest.raises(BadRequirement, match="must be a string"):
        normalize_requirements([3])
    with pytest.raises(BadRequirement, match="at most"):
        normalize_requirements([f"pkg{i}" for i in range(100)])


# ----------------------------------------------------------------------------------------------- PEP 723

SCRIPT = """\
# /// script
# requires-python = ">=3.8"
# dependencies = [
#   "Tabulate>=0.9",
#   "alpha",
# ]
#
# [tool.whatever]
# x = 1
# ///
import tabulate
print("hi")
"""


def test_pep723_block_is_read_with_the_reference_regex() -> None:
    meta = read_script_metadata(SCRIPT)
    assert meta is not None and meta["tool"] == {"whatever": {"x": 1}}
    assert script_dependencies(SCRIPT) == ["Tabulate>=0.9", "alpha"]
    assert gather_requirements(["beta"], SCRIPT) == ["alpha", "beta", "tabulate>=0.9"]
    assert gather_requirements(None, "print(1)\n") == []
    # Another block type is not a script block.
    assert script_dependencies("# /// pyproject\n# dependencies = ['x']\n# ///\n") == []


def test_pep723_errors() -> None:
    twice = SCRIPT + "\n" + SCRIPT
    with pytest.raises(BadRequirement, match="more than one"):
        script_dependencies(twice)
    with pytest.raises(BadRequirement, match="requires Python"):
        script_dependencies('# /// script\n# requires-python = "<3"\n# ///\n')
    with pytest.raises(BadRequirement, match="not valid TOML"):
        script_dependencies("# /// script\n# dependencies = [\n# ///\n")
    with pytest.raises(BadRequirement, match="list of strings"):
        script_dependencies('# /// script\n# dependencies = "tabulate"\n# ///\n')
    # Dependencies go through the same checks as the packages argument.
    with pytest.raises(BadRequirement, match="URL"):
        gather_requirements([], '# /// script\n# dependencies = ["https://evil.example/x.whl"]\n# ///\n')


# ----------------------------------------------------------------------------------------------- policy


def test_policy_any_off_allowlist() -> None:
    PackagePolicy.build("any").check(["tabulate"])
    PackagePolicy.build("off").check([])  # nothing asked, nothing refused
    with pytest.raises(PackageRefused, match="turned off"):
        PackagePolicy.build("off").check(["tabulate"])
    allow = PackagePolicy.build("allowlist", ["Scikit_Learn", "tabulate"])
    allow.check(["scikit-learn>=1.5", "tabulate"])
    with pytest.raises(PackageRefused) as info:
        allow.check(["tabulate", "requests"])
    assert "requests" in info.value.message and "scikit-learn" in info.value.hint
    assert allow.describe() == {"policy": "allowlist", "allowlist": ["scikit-learn", "tabulate"]}


def test_settings_policy_default_depends_on_transport(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).packages_policy == "any"
    assert Settings(data_dir=tmp_path, transport="http").packages_policy == "off"
    assert Settings(data_dir=tmp_path, transport="http", packages="any").packages_policy == "any"
    env = {
        "CODE_INTERPRETER_PACKAGES": "allowlist",
        "CODE_INTERPRETER_PACKAGE_ALLOWLIST": "numpy, pandas tabulate",
        "CODE_INTERPRETER_DATA_DIR": str(tmp_path),
        "CODE_INTERPRETER_PACKAGE_INDEX_URL": "https://user:s3cret@pypi.example/simple",
    }
    s = load_settings(environ=env)
    assert s.packages_policy == "allowlist"
    assert s.package_allowlist == ["numpy", "pandas", "tabulate"]
    assert s.package_cache_path == tmp_path / "packages"
    assert (s.package_install_timeout_s, s.package_set_max_mb, s.package_cache_quota_mb) == (300.0, 1024, 5120)
    assert s.package_allow_builds is False
    assert "s3cret" not in str(s.public_view())


# ----------------------------------------------------------------------------------------------- index


def test_index_from_settings_ignores_the_users_configuration(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    cfg = index_config(None, str(wheels), forbidden=[tmp_path / "data"], environ={"UV_INDEX_URL": "https://x/simple"})
    assert cfg.uv_args == ["--find-links", str(wheels), "--no-index"]
    assert cfg.pip_args == ["--find-links", str(wheels), "--no-index"]
    assert cfg.offline and cfg.source == "settings"
    assert cfg.env["UV_NO_CONFIG"] == "1" and "UV_INDEX_URL" not in cfg.env
    assert (str(wheels), str(wheels)) in cfg.readonly
    cfg = index_config("https://u:tok@idx.example/simple", None, forbidden=[], environ={})
    assert cfg.uv_args == ["--default-index", "https://u:tok@idx.example/simple"] and not cfg.offline
    assert cfg.describe()["locations"] == ["https://***@idx.example/simple"]
    assert mask_url("https://a:b@h/x") == "https://***@h/x"


def test_index_from_the_users_uv_config_binds_the_file_and_its_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / ".config" / "uv").mkdir(parents=True)
    wheels = home / "wheels"
    wheels.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (home / ".config" / "uv" / "uv.toml").write_text(
        f'find-links = ["{wheels}", "{data}", "{home}"]\nno-index = true\n'
    )
    monkeypatch.setenv("HOME", str(home))
    env = {
        "XDG_CONFIG_DIRS": str(tmp_path / "nothing"),
        "UV_HTTP_TIMEOUT": "5",
        "UV_INDEX_PRIVATE_PASSWORD": "hunter2",
        "UV_PUBLISH_TOKEN": "t",
        "UV_CACHE_DIR": "/somewhere",
        "OPENAI_API_KEY": "sk-abcdefghijkl",
    }
    cfg = index_config(None, None, forbidden=[data], environ=env)
    assert cfg.source == "uv configuration"
    assert (str(home / ".config" / "uv" / "uv.toml"), "/tmp/home/.config/uv/uv.toml") in cfg.readonly
    bound = [host for host, _ in cfg.readonly]
    # A wheel folder inside home is fine; the data folder and the whole home are never bound.
    assert str(wheels) in bound and str(data) not in bound and str(home) not in bound
    assert cfg.env["UV_HTTP_TIMEOUT"] == "5"
    for secret in ("UV_INDEX_PRIVATE_PASSWORD", "UV_PUBLISH_TOKEN", "UV_CACHE_DIR", "OPENAI_API_KEY"):
        assert secret not in cfg.env
    assert cfg.uv_args == []  # uv reads its own file


def test_index_from_a_pip_only_config_is_handed_to_uv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".config" / "pip").mkdir(parents=True)
    (home / ".config" / "pip" / "pip.conf").write_text(
        "[global]\nindex-url = https://mirror.example/simple\nextra-index-url = https://extra.example/simple\n"
    )
    monkeypatch.setenv("HOME", str(home))
    cfg = index_config(None, None, forbidden=[], environ={"XDG_CONFIG_DIRS": str(tmp_path / "nothing")})
    if Path("/etc/uv/uv.toml").exists():
        pytest.skip("this machine has a system uv.toml, which uv reads itself")
    assert cfg.source == "pip configuration"
    args = cfg.uv_args
    assert args[args.index("--default-index") + 1] == "https://mirror.example/simple"
    assert args[args.index("--index") + 1] == "https://extra.example/simple"
    assert "unsafe-best-match" in args
    assert (str(home / ".config" / "pip" / "pip.conf"), "/tmp/home/.config/pip/pip.conf") in cfg.readonly


# ----------------------------------------------------------------------------------------------- failures
# The installer tests produce each of these from real runs; here, the pip texts that need a dead network.


def test_pip_unreachable_and_uv_fallbacks() -> None:
    pip_dead = (
        "WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection "
        "broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPConnection object at 0x7f>: Failed to "
        "establish a new connection: [Errno 111] Connection refused')': /simple/beta/\n"
        "ERROR: Could not find a version that satisfies the requirement beta (from versions: none)\n"
    )
    assert isinstance(classify("pip", pip_dead), PackageIndexUnreachable)
    assert isinstance(classify("pip", "ERROR: Could not find a version that satisfies the requirement x (from "
                                      "versions: 1.0)\n"), PackageNotFound)  # fmt: skip
    uv_dns = (
        "error: Failed to fetch: http://nonexistent.invalid/simple/beta/\n  cause: error sending request for url\n"
        "  cause: dns error\n  cause: failed to lookup address information: Name or service not known\n"
    )
    assert isinstance(classify("uv", uv_dns), PackageIndexUnreachable)
    no_wheel = "error: No solution found when resolving dependencies\n  cause: Because x==1.0 has no usable wheels"
    assert isinstance(classify("uv", no_wheel), PackageNoWheel)
    other = (
        "error: No solution found when resolving dependencies\n  cause: Because a depends on b<1 and c depends on b>1"
    )
    assert isinstance(classify("uv", other), PackageConflict)
