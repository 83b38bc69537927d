"""The deployment files are what the tests run.

``examples/kubernetes/deployment.yaml`` and ``examples/systemd/*`` are loaded
here and their own arguments are run locally: addresses mapped to loopback
(port 0, read back), mounted paths mapped to temporary directories, the
interpreter of this checkout for the unit's virtual environment. The
Containerfile cannot be built on this machine (no container engine), so its
structure and commands are checked statically against the manifest.
"""

from __future__ import annotations

import itertools
import shlex
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio
import yaml

from trio_launcher._errors import ExitCode
from trio_launcher.testing import TLSFiles, presented_cert

from .net import wait_refused
from .proc import ROOT, alive, launch, socket_activated

MANIFEST = ROOT / "examples" / "kubernetes" / "deployment.yaml"
UNIT = ROOT / "examples" / "systemd" / "trio-launcher-example.service"
SOCKET_UNIT = ROOT / "examples" / "systemd" / "trio-launcher-example.socket"
CONTAINERFILE = ROOT / "Containerfile"
MARGIN = 2.0
"""Seconds a grace period must leave beyond shutdown delay + graceful timeout."""


# --- reading the files ---------------------------------------------------------


def manifest() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(pod spec, the container, the Service) of the example manifest."""
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    return pod, pod["containers"][0], docs["Service"]


def flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` and ``--name`` (value "") of an argument list."""
    parsed = {}
    for arg in args:
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            parsed[name] = value
    return parsed


def logical_lines(text: str, comments: tuple[str, ...]) -> Iterator[str]:
    """The lines of a unit file or a Containerfile: backslash continuations joined,
    blank lines and comments dropped."""
    logical = ""
    for raw in text.splitlines():
        line = logical + raw.strip()
        if line.endswith("\\"):
            logical = line[:-1] + " "
            continue
        logical = ""
        if line and not line.startswith(comments):
            yield line


def read_unit(path: Path) -> dict[str, dict[str, str]]:
    """A systemd unit file: sections of settings, backslash continuations joined."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in logical_lines(path.read_text(), ("#", ";")):
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current[key.strip()] = value.strip()
    return sections


# --- Kubernetes ------------------------------------------------------------------


def test_manifest_timing_budget_and_probes() -> None:
    pod, container, service = manifest()
    args = flags(container["args"])
    delay, graceful = float(args["--shutdown-delay"]), float(args["--graceful-timeout"])
    assert delay + graceful + MARGIN <= pod["terminationGracePeriodSeconds"]
    readiness = container["readinessProbe"]
    # Endpoints drop the pod within one failed readiness period; the delay covers it.
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < delay
    port_names = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe in (readiness, container["livenessProbe"]):
        get = probe["httpGet"]
        assert get["path"] == args["--health-path"]
        assert get["port"] in port_names
        assert get["scheme"] == ("HTTPS" if "--certfile" in args else "HTTP")
    assert args["--bind"].endswith(f":{port_names[readiness['httpGet']['port']]}")
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(port_names)


def local_args(args: list[str], mounts: dict[str, Path]) -> list[str]:
    """The manifest's args for this machine: loopback port 0, mounts in tmp."""
    mapped = []
    for arg in args:
        if arg.startswith("--bind="):
            arg = "--bind=127.0.0.1:0"
        for mount_path, local in mounts.items():
            arg = arg.replace(mount_path + "/", f"{local}/")
        mapped.append(arg)
    return mapped


async def test_kubernetes_pod_life(tmp_path: Path) -> None:
    pod, container, _ = manifest()
    (mount,) = container["volumeMounts"]
    secret = TLSFiles(tmp_path / "secret", layout="kubernetes")
    args = local_args(container["args"], {mount["mountPath"]: secret.directory})
    assert str(secret.cert_file) in " ".join(args)  # the secret's keys are tls.crt/tls.key
    settings = flags(args)
    delay, graceful = float(settings["--shutdown-delay"]), float(settings["--graceful-timeout"])
    workers = int(settings.get("--workers", "1"))
    probe_path = container["readinessProbe"]["httpGet"]["path"]
    async with launch(args, wait_serving=workers == 1, timeout=30) as proc:
        if workers > 1:
            await proc.wait_for_line(f"all {workers} workers are serving", timeout=30)
            await proc.serving.wait()
        pids = [child.pid for child in psutil.Process(proc.process.pid).children()]
        assert len(pids) == workers
        async with httpx.AsyncClient(
            base_url=proc.url, verify=secret.client_context(with_cert=False)
        ) as client:
            assert (await client.get(probe_path)).status_code == 200
            secret.rotate()  # the kubelet's ..data swap: served after validation
            with trio.fail_after(10):
                while await presented_cert(proc.port, secret) != secret.server_cert_der():
                    await trio.sleep(0.05)
            # The kubelet's SIGTERM: readiness fails at once, the pod keeps serving.
            proc.signal(signal.SIGTERM)
            stop_started = trio.current_time()
            with trio.fail_after(1):
                while (await client.get(probe_path)).status_code != 503:
                    pass
            assert (await client.get("/")).json() == {"engine": "running"}
        await wait_refused(proc.port, timeout=delay + 5)
        assert trio.current_time() - stop_started >= delay - 0.5  # the delay was kept
        code = await proc.wait(timeout=pod["terminationGracePeriodSeconds"])
        assert code == ExitCode.OK, proc.stderr
        assert trio.current_time() - stop_started < delay + graceful + MARGIN
    for pid in pids:
        assert not alive(pid)  # gone, or a zombie waiting for its parent


# --- Containerfile (static: no container engine here) ---------------------------


def containerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per stage, continuation lines joined."""
    stages: list[list[tuple[str, str]]] = []
    for line in logical_lines(CONTAINERFILE.read_text(), ("#",)):
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def test_containerfile_is_multi_stage_non_root_and_matches_the_manifest() -> None:
    build, runtime = containerfile_stages()
    assert build[0][1].endswith(" AS build")
    install = " ".join(rest for op, rest in build if op == "RUN")
    assert "python -m venv /opt/venv" in install
    assert "/opt/venv/bin/python -m pip install --no-cache-dir ." in install
    for op, rest in build + runtime:
        if op == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
    runtime_ops = dict(runtime)
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime
    user = runtime_ops["USER"].split(":")[0]
    assert user not in ("0", "root")
    pod, container, _ = manifest()
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": int(user)}
    assert runtime_ops["ENTRYPOINT"] == '["trio-launcher"]'
    ports = {str(port["containerPort"]) for port in container["ports"]}
    assert runtime_ops["EXPOSE"] in ports
    assert "Containerfile" in MANIFEST.read_text()
    image = container["image"]
    assert f"-t {image} -f Containerfile ." in MANIFEST.read_text()
    cmd = yaml.safe_load(runtime_ops["CMD"])  # a JSON array is YAML too
    assert set(cmd) <= set(container["args"])


# --- systemd ---------------------------------------------------------------------


def unit_argv() -> tuple[list[str], dict[str, str]]:
    """ExecStart with this checkout's interpreter, and the [Service] settings."""
    service = read_unit(UNIT)["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == f"{service['WorkingDirectory']}/.venv/bin/trio-launcher"
    return [sys.executable, "-m", "trio_launcher", *argv[1:]], service


def test_unit_exit_codes_and_stop_budget() -> None:
    _, service = unit_argv()
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"  # exit 3 (engine died) and 1 restart
    assert service["RestartPreventExitStatus"].split() == [str(ExitCode.USAGE)]
    assert service.get("KillMode", "control-group") == "control-group"
    graceful = float(flags_from(shlex.split(service["ExecStart"]))["--graceful-timeout"])
    assert graceful + MARGIN <= float(service["TimeoutStopSec"])
    socket_unit = read_unit(SOCKET_UNIT)
    assert "Socket" in socket_unit
    assert "--bind" not in service["ExecStart"]  # the socket comes from systemd


def flags_from(argv: list[str]) -> dict[str, str]:
    """``--name value`` pairs of a unit's command line."""
    return {a: b for a, b in itertools.pairwise(argv) if a.startswith("--")}


async def _start_unit(
    tmp_path: Path,
) -> tuple[trio.Process, trio.socket.SocketType, int, dict[str, str]]:
    argv, service = unit_argv()
    listen = read_unit(SOCKET_UNIT)["Socket"]
    host, _, _ = listen["ListenStream"].rpartition(":")
    listener = socket.socket()
    listener.bind((host, 0))  # the unit's host, a free port read back
    if listen.get("NoDelay") == "true":
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.listen()
    port = listener.getsockname()[1]
    notify_path = str(tmp_path / "notify.sock")
    notify_sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify_sock.bind(notify_path)
    process = await socket_activated(argv, listener, notify_path)
    listener.close()
    return process, notify_sock, port, service


async def test_systemd_unit_life(tmp_path: Path) -> None:
    process, notify_sock, port, service = await _start_unit(tmp_path)
    health = flags_from(shlex.split(service["ExecStart"]))["--health-path"]
    try:
        with trio.fail_after(20):
            assert (await notify_sock.recv(4096)).decode().startswith("READY=1")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            body = (await client.get(health)).json()
            assert (body["status"], body["engine"]) == ("serving", "alive")
            # ExecReload, as written (SIGHUP; without TLS there is nothing to reload).
            reload = service["ExecReload"].replace("$MAINPID", str(process.pid))
            reloaded = await trio.run_process(shlex.split(reload), check=False)
            assert reloaded.returncode == 0
            assert (await client.get(health)).status_code == 200
        # KillMode=control-group: KillSignal goes to every process of the unit.
        kill_signal = signal.Signals[service["KillSignal"]]
        for proc in [psutil.Process(process.pid), *psutil.Process(process.pid).children()]:
            proc.send_signal(kill_signal)
        with trio.fail_after(float(service["TimeoutStopSec"])):
            assert (await notify_sock.recv(4096)).decode() == "STOPPING=1"
            assert await process.wait() == ExitCode.OK
    finally:
        if process.returncode is None:
            process.kill()
        notify_sock.close()


async def test_systemd_unit_engine_death_is_a_failure_to_restart(tmp_path: Path) -> None:
    process, notify_sock, port, service = await _start_unit(tmp_path)
    try:
        with trio.fail_after(20):
            assert (await notify_sock.recv(4096)).decode().startswith("READY=1")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.post("/admin/kill")).status_code == 202
        with trio.fail_after(float(service["TimeoutStopSec"])):
            code = await process.wait()
        assert code == ExitCode.ENGINE_DEAD
        assert str(code) not in service["RestartPreventExitStatus"].split()
    finally:
        if process.returncode is None:
            process.kill()
        notify_sock.close()


@pytest.mark.parametrize("path", [MANIFEST, UNIT, SOCKET_UNIT, CONTAINERFILE])
def test_deployment_files_exist(path: Path) -> None:
    assert path.is_file()
