"""The deployment files agree with each other and with the server: the Kubernetes manifests in deploy/kubernetes
(every secretKeyRef names a key the Secret has, ports line up, REPLICA_URL comes from the pod IP, the Deployment's
environment and arguments are what `load_settings` and the CLI actually read, the sandbox's security context holds
together), and examples/cluster/run_cluster.sh (valid bash, names every setting, renders an haproxy.cfg that
haproxy itself accepts). No cluster is started: tests/test_cluster.py runs real replicas.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from code_interpreter_mcp.cli import build_parser
from code_interpreter_mcp.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
SCRIPT = ROOT / "examples" / "cluster" / "run_cluster.sh"
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)

# The server's cluster settings by the names the environment gives them (config.py: DATABASE_URL, STORE_URL,
# REPLICA_URL and CLUSTER_SECRET have short aliases; the rest are CODE_INTERPRETER_<FIELD>), and obstore's.
SERVER_VARS = {
    "DATABASE_URL",
    "STORE_URL",
    "REPLICA_URL",
    "CLUSTER_SECRET",
    "CODE_INTERPRETER_AUTH_TOKEN",
    "CODE_INTERPRETER_DATA_DIR",
}
AWS_VARS = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ALLOW_HTTP",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
}
FAKE_POD_IP = "10.1.2.3"


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def one(kind: str) -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container() -> dict[str, Any]:
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, containers
    return containers[0]


def container_port(port: int | str) -> int:
    """A port as a number: named ports are looked up among the container's."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container()["ports"] if "name" in p}
    assert port in named, f"port name {port!r} is not one of the container's {sorted(named)}"
    return named[port]


def pod_environment() -> dict[str, str]:
    """The container's environment as the kubelet would build it, with the Secret's placeholder values, a fake pod
    IP, and $(VAR) expanded from variables defined earlier in the list (as Kubernetes does)."""
    secret = one("Secret")["stringData"]
    env: dict[str, str] = {}
    for entry in container()["env"]:
        if "value" in entry:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), entry["value"])
        elif "fieldRef" in entry["valueFrom"]:
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", entry
            value = FAKE_POD_IP
        else:
            value = secret[entry["valueFrom"]["secretKeyRef"]["key"]]
        env[entry["name"]] = value
    return env


# --- Kubernetes manifests ---------------------------------------------------------------------------------------


def test_the_manifests_hold_the_expected_kinds() -> None:
    kinds = sorted(d["kind"] for d in documents())
    assert kinds == ["Deployment", "Secret", "Service", "Service"], kinds
    deployment = one("Deployment")
    assert deployment["apiVersion"] == "apps/v1" and deployment["spec"]["replicas"] == 3
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in (d for d in documents() if d["kind"] == "Service"):
        # A selector that matches no pod leaves the Service without endpoints, silently.
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]["name"]
    front = [d for d in documents() if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None"]
    assert len(front) == 1 and front[0]["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in front[0]["spec"]["ports"]] == [80]


def test_the_deployment_sets_every_cluster_setting() -> None:
    names = [e["name"] for e in container()["env"]]
    assert len(names) == len(set(names)), "a variable is set twice"
    missing = (SERVER_VARS | AWS_VARS) - set(names)
    assert not missing, f"not set in the Deployment: {sorted(missing)}"


def test_every_secret_ref_names_a_key_of_the_secret() -> None:
    secret = one("Secret")
    keys = set(secret["stringData"])
    refs = [e["valueFrom"]["secretKeyRef"] for e in container()["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert refs, "the Deployment reads nothing from the Secret"
    for ref in refs:
        assert ref["name"] == secret["metadata"]["name"], ref
        assert ref["key"] in keys, f"secretKeyRef to {ref['key']!r}, which the Secret does not define"
    # Every credential the Secret carries reaches the server (a key nobody reads is a typo somewhere).
    assert {r["key"] for r in refs} == keys


def test_ports_agree_between_container_services_and_probes() -> None:
    spec = container()
    ports = [p["containerPort"] for p in spec["ports"]]
    assert len(ports) == 1, ports
    for service in (d for d in documents() if d["kind"] == "Service"):
        for port in service["spec"]["ports"]:
            assert container_port(port["targetPort"]) == ports[0], service["metadata"]["name"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in spec, f"no {probe}"
        check = spec[probe].get("tcpSocket") or spec[probe].get("httpGet")
        assert check is not None, f"{probe} is neither tcpSocket nor httpGet"
        assert container_port(check["port"]) == ports[0], probe
    # The server listens where the container port says, on every interface (127.0.0.1 would refuse the kubelet).
    assert spec["command"] == ["code-interpreter-mcp"]
    args = build_parser().parse_args(spec["args"])
    assert (args.command, args.transport, args.host, args.port) == ("serve", "http", "0.0.0.0", ports[0])


def test_replica_url_is_built_from_the_pod_ip() -> None:
    env = container()["env"]
    names = [e["name"] for e in env]
    pod_ip = env[names.index("POD_IP")]
    assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    replica_url = env[names.index("REPLICA_URL")]
    assert "$(POD_IP)" in replica_url["value"]
    # Kubernetes expands $(VAR) only from variables listed earlier: after REPLICA_URL it would stay literal.
    assert names.index("POD_IP") < names.index("REPLICA_URL")
    assert pod_environment()["REPLICA_URL"] == f"http://{FAKE_POD_IP}:{container()['ports'][0]['containerPort']}"


def test_the_server_reads_the_deployments_environment_as_intended() -> None:
    env = pod_environment()
    settings = load_settings(environ=env)
    secret = one("Secret")["stringData"]
    assert settings.replica_url == env["REPLICA_URL"]
    assert settings.database_url == secret["DATABASE_URL"]
    assert settings.store_url == secret["STORE_URL"]
    assert settings.cluster_secret is not None
    assert settings.cluster_secret.get_secret_value() == secret["CLUSTER_SECRET"]
    assert settings.auth_token is not None and settings.auth_token.get_secret_value() == secret["AUTH_TOKEN"]
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    assert str(settings.data_dir) in mounts, "DATA_DIR is not a mounted volume"
    volumes = {v["name"]: v for v in one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    # Per pod: two replicas must never share a data folder.
    assert "emptyDir" in volumes[mounts[str(settings.data_dir)]]


def test_the_sandbox_may_make_user_namespaces_without_privileges() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    context = container()["securityContext"]
    assert context.get("privileged", False) is False and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    # The default seccomp profile refuses unshare(CLONE_NEWUSER) without CAP_SYS_ADMIN.
    seccomp = context.get("seccompProfile") or pod["securityContext"]["seccompProfile"]
    assert seccomp["type"] in ("Unconfined", "Localhost"), seccomp
    assert context["appArmorProfile"]["type"] in ("Unconfined", "Localhost")
    # The API server rejects procMount: Unmasked unless the pod has its own user namespace.
    if context.get("procMount") == "Unmasked":
        assert pod.get("hostUsers") is False
    # A read-only root needs a writable /tmp: bubblewrap builds each sandbox's root there.
    if context.get("readOnlyRootFilesystem"):
        assert "/tmp" in {m["mountPath"] for m in container()["volumeMounts"]}


# --- examples/cluster/run_cluster.sh ----------------------------------------------------------------------------


def test_the_cluster_script_is_valid_bash_and_names_every_setting() -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    missing = {name for name in SERVER_VARS | AWS_VARS if not re.search(rf"\b{name}\b", text)}
    assert not missing, f"run_cluster.sh never mentions {sorted(missing)}"
    assert os.access(SCRIPT, os.X_OK), "run_cluster.sh is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_the_cluster_script_passes_shellcheck() -> None:
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout


def render_haproxy(tmp_path: Path, affinity: str, backends: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AFFINITY": affinity, "STATS_SOCKET": str(tmp_path / "haproxy.sock")}
    return subprocess.run(
        ["bash", str(SCRIPT), "haproxy-config", "127.0.0.1:18100", *backends],
        capture_output=True,
        text=True,
        env=env,
        timeout=10,
    )


@pytest.mark.parametrize("affinity", ["mcp-session-id", "none"])
def test_the_rendered_haproxy_config_balances_three_replicas(tmp_path: Path, affinity: str) -> None:
    backends = ["127.0.0.1:19001", "127.0.0.1:19002", "127.0.0.1:19003"]
    done = render_haproxy(tmp_path, affinity, backends)
    assert done.returncode == 0, done.stderr
    cfg = done.stdout
    assert "@" not in cfg, "a placeholder was left unrendered"
    # Comments may talk about options; only live lines count.
    lines = [line.split("#", 1)[0].strip() for line in cfg.splitlines()]
    lines = [line for line in lines if line]
    assert [line for line in lines if line.startswith("server ")] == [
        f"server r{i} {addr}" for i, addr in enumerate(backends)
    ]
    assert "balance roundrobin" in lines and "bind 127.0.0.1:18100" in lines
    assert "default-server check inter 2s fall 2 rise 1" in lines
    # A run's SSE stream may stay silent for as long as the run: an idle timeout shorter than an hour cuts it.
    assert "timeout server 1h" in lines and "timeout client 1h" in lines
    assert not any(line in ("option http-server-close", "option httpclose") for line in lines)
    sticky = "stick match req.hdr(mcp-session-id)" in lines
    assert sticky == (affinity == "mcp-session-id")
    if HAPROXY is None:
        pytest.skip("haproxy not installed (apt-get install -y haproxy): the config was not checked by haproxy -c")
    path = tmp_path / "haproxy.cfg"
    path.write_text(cfg)
    check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=10)
    assert check.returncode == 0, check.stdout + check.stderr


def test_an_unknown_affinity_is_refused(tmp_path: Path) -> None:
    done = render_haproxy(tmp_path, "cookie", ["127.0.0.1:19001"])
    assert done.returncode != 0 and "AFFINITY" in done.stderr
