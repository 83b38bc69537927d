"""``--workers N``: real processes, real signals, as a terminal and systemd send them."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
import trio
import trio.lowlevel
import trio.testing

from trio_launcher._ports import BoundSockets
from trio_launcher._workers import RestartPolicy, run_workers
from trio_launcher.testing import TLSFiles, presented_cert, running_server

from .apps import App
from .net import aborted, get, wait_refused
from .proc import ROOT, Launched, launch, run_cli, wait_gone, wait_workers, worker_pids


def listening_ports(pids: list[int]) -> set[int]:
    ports = set()
    for pid in pids:
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN:
                ports.add(conn.laddr.port)
    return ports


WORKERS = ["tests.apps:app", "--workers", "2", "--bind", "127.0.0.1:0"]


async def serving(proc: Launched, count: int = 2) -> list[int]:
    await proc.wait_for_line(f"all {count} workers are serving", timeout=30)
    await proc.serving.wait()
    return await wait_workers(proc.process.pid, count)


async def test_two_workers_serve_restart_and_drain() -> None:
    async with launch([*WORKERS, "--engine", "tests.apps:engine"], wait_serving=False) as proc:
        pids = await serving(proc)
        assert len(set(pids)) == 2
        # Both serve the same port.
        assert (await get(proc.url)).text == "hello"
        os.kill(pids[0], signal.SIGKILL)  # a worker we started (through the parent)
        await proc.wait_for_line(rf"worker \d \(PID {pids[0]}\) crashed \(was killed by signal 9\)")
        # The other keeps serving meanwhile, and a replacement comes up.
        assert (await get(proc.url)).text == "hello"
        new = await wait_workers(proc.process.pid, 2, exclude=frozenset({pids[0]}))
        assert pids[0] not in new
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0, proc.stderr
        await wait_gone(new, timeout=5)


async def test_engine_death_in_one_worker_stops_all_with_exit_3() -> None:
    async with launch([*WORKERS, "--engine", "tests.apps:engine"], wait_serving=False) as proc:
        pids = await serving(proc)
        async with httpx.AsyncClient() as client:
            assert (await client.post(f"{proc.url}/kill")).status_code == 202
        assert await proc.wait() == 3, proc.stderr
        await wait_gone(pids, timeout=5)


async def test_workers_die_with_a_killed_parent_without_blaming_systemd() -> None:
    async with launch(WORKERS, wait_serving=False) as proc:
        pids = await serving(proc)
        proc.signal(signal.SIGKILL)
        await wait_gone(pids, timeout=10)
        with trio.fail_after(10):
            await proc.pumped.wait()  # the workers' last lines are in
    assert any("the parent process is gone: draining" in line for line in proc.lines)
    assert not any("cannot notify systemd" in line for line in proc.lines), proc.stderr


async def test_workers_outlive_the_thread_that_forked_them() -> None:
    """trio forks from a thread of its cache, which exits after 10 idle seconds; a
    parent-death signal (PR_SET_PDEATHSIG) would then kill every worker. Not here.

    The parent runs with the cache's idle timeout at 1 s (tests/short_thread_idle)
    and the test waits for its threads to be gone, not for the clock."""
    idle = str(ROOT / "tests" / "short_thread_idle")
    env = {"PYTHONPATH": os.pathsep.join([idle, str(ROOT)])}
    async with launch(WORKERS, wait_serving=False, env=env) as proc:
        pids = await serving(proc)
        parent = psutil.Process(proc.process.pid)
        with trio.fail_after(10):
            while parent.num_threads() > 1:  # the main thread alone: the forking one is gone
                await trio.sleep(0.05)
        assert sorted(worker_pids(proc.process.pid)) == sorted(pids)
        assert not any("exited; replacing it" in line for line in proc.lines)
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0


# --- the command line reaches the workers intact ------------------------------


def test_an_abbreviated_workers_flag_exits_2_at_once() -> None:
    result = run_cli(["tests.apps:app", "--worker", "2", "--bind", "127.0.0.1:0"])
    assert result.returncode == 2, result.stderr
    assert "unrecognized arguments: --worker 2" in result.stderr


async def test_attached_short_bind_serves_exactly_one_port() -> None:
    async with launch(
        ["tests.apps:app", "--workers", "2", "-b127.0.0.1:0"], wait_serving=False
    ) as proc:
        pids = await serving(proc)
        assert listening_ports([proc.process.pid, *pids]) == {proc.port}
        assert (await get(proc.url)).text == "hello"
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0, proc.stderr


async def test_a_toml_workers_and_bind_are_the_parents_alone(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('workers = 2\nbind = ["127.0.0.1:0"]\n')
    async with launch(["tests.apps:app", "--config", str(toml)], wait_serving=False) as proc:
        pids = await serving(proc)
        assert len(pids) == 2
        assert all(worker_pids(pid) == [] for pid in pids)  # no worker started workers
        assert listening_ports([proc.process.pid, *pids]) == {proc.port}
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0, proc.stderr


@contextmanager
def held_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_busy_port_exits_4_with_one_error_line() -> None:
    with held_port() as port:
        result = run_cli(["tests.apps:app", "--workers", "2", f"-b127.0.0.1:{port}"])
    assert result.returncode == 4, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert f"127.0.0.1:{port}" in errors[0]
    assert "started (PID" not in result.stderr  # the parent bound; no worker ever started


def test_a_bad_module_prints_its_error_once() -> None:
    result = run_cli(["tests.no_such_module:app", "--workers", "3", "-b", "127.0.0.1:0"])
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "no module named" in line]
    assert len(errors) == 1, result.stderr
    assert result.stderr.count("started (PID") == 1


# --- one Ctrl-C drains, a second one forces ------------------------------------

STREAM = "/stream?n=20&delay=0.1"  # 2 s
STREAM_BODY = "".join(f"chunk{i}\n" for i in range(20))


async def stream_in_flight(url: str, started: trio.Semaphore, bodies: list[str]) -> None:
    """One stream on a connection of its own; ``started`` is released at its first byte."""
    async with httpx.AsyncClient(timeout=30) as client:
        try:
            async with client.stream("GET", url + STREAM) as response:
                body = b""
                async for chunk in response.aiter_raw():
                    if not body:
                        started.release()
                    body += chunk
        except httpx.HTTPError as exc:
            bodies.append(f"error: {exc!r}")
            return
    bodies.append(body.decode())


async def four_streams_through(proc: Launched, deliver: Callable[[], Awaitable[None]]) -> list[str]:
    """Start four streams, ``await deliver()`` once all four are sending, collect bodies."""
    bodies: list[str] = []
    started = trio.Semaphore(0)
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(stream_in_flight, proc.url, started, bodies)
        with trio.fail_after(15):
            for _ in range(4):
                await started.acquire()
        await deliver()
    return bodies


def killpg(group: int, signum: int) -> Callable[[], Awaitable[None]]:
    async def deliver() -> None:
        os.killpg(group, signum)

    return deliver


WORKER_ARGS = [*WORKERS, "--graceful-timeout", "20"]


Signals = Callable[[Launched, list[int]], Callable[[], Awaitable[None]]]


def ctrl_c_to_the_group(proc: Launched, pids: list[int]) -> Callable[[], Awaitable[None]]:
    """What a terminal does on Ctrl+C: SIGINT to the foreground process group."""
    group = os.getpgid(proc.process.pid)
    assert group == proc.process.pid
    return killpg(group, signal.SIGINT)


def sigterm_to_every_process(proc: Launched, pids: list[int]) -> Callable[[], Awaitable[None]]:
    """systemd's KillMode=control-group: SIGTERM to the parent and to each worker."""

    async def control_group() -> None:
        for pid in [proc.process.pid, *pids, *pids]:  # each worker twice, even
            os.kill(pid, signal.SIGTERM)

    return control_group


@pytest.mark.parametrize(
    "signals",
    [
        pytest.param(ctrl_c_to_the_group, id="ctrl-c-to-the-process-group"),
        pytest.param(sigterm_to_every_process, id="sigterm-to-every-process"),
    ],
)
async def test_a_stop_signal_drains_every_stream(signals: Signals) -> None:
    async with launch(WORKER_ARGS, wait_serving=False, new_session=True) as proc:
        pids = await serving(proc)
        bodies = await four_streams_through(proc, signals(proc, pids))
        assert bodies == [STREAM_BODY] * 4
        assert await proc.wait() == 0, proc.stderr
    assert not any("stopping at once" in line for line in proc.lines), proc.stderr


async def test_a_second_ctrl_c_forces_every_worker_and_exits_130() -> None:
    async with launch(WORKER_ARGS, wait_serving=False, new_session=True) as proc:
        pids = await serving(proc)
        group = os.getpgid(proc.process.pid)

        async def twice() -> None:
            os.killpg(group, signal.SIGINT)
            await proc.wait_for_line("SIGINT: workers drain")
            os.killpg(group, signal.SIGINT)  # the streams still have 1.5 s or more to go

        bodies = await four_streams_through(proc, twice)
        assert await proc.wait(timeout=10) == 130, proc.stderr
        await wait_gone(pids, timeout=5)
    assert len(bodies) == 4
    assert STREAM_BODY not in bodies  # cut, every one


# --- what the workers report -----------------------------------------------------

FAKE_WORKER = """
import os, sys
from trio_launcher import _worker, _systemd
fd = _worker.take_worker_role()
_systemd.notify("READY=1")
os.read(fd, 100)  # the parent's order
_worker.report_cut_requests(3)
"""


async def test_requests_cut_in_a_workers_drain_are_an_error_in_the_parent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sockets = BoundSockets()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sockets.insecure.append(sock)
    caplog.set_level(logging.INFO, "trio_launcher")
    argv = [sys.executable, "-c", FAKE_WORKER]
    async with trio.open_nursery() as nursery:
        result: list[int] = []

        async def supervise() -> None:
            result.append(await run_workers(argv, 1, sockets, RestartPolicy()))

        nursery.start_soon(supervise)
        with trio.fail_after(20):
            while "all 1 workers are serving" not in caplog.text:
                await trio.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor's signal receiver has it
    assert result == [0]
    cut = [r for r in caplog.records if "cut 3 requests" in r.getMessage()]
    assert len(cut) == 1
    assert cut[0].levelno == logging.ERROR


# --- rolling restart on SIGHUP, recycling ----------------------------------------

VERSIONED_APP = """
VERSION = "{version}"


async def app(scope, receive, send):
    if scope["type"] != "http":
        return  # no lifespan
    body = VERSION.encode()
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]}})
    await send({{"type": "http.response.body", "body": body}})
"""


class Load:
    """Requests one after the other, each on a new connection, until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.bodies: list[str] = []
        self.failures: list[str] = []
        self.done = trio.Event()

    async def run(self, stop: trio.Event) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=10, limits=limits) as client:
            while not stop.is_set():
                try:
                    response = await client.get(self.url)
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code} {response.text}")
                self.bodies.append(response.text)
        self.done.set()


def replacements(lines: list[str]) -> list[tuple[int, int]]:
    """(new PID, old PID) for every 'PID new serves, PID old drains' line."""
    found = []
    for line in lines:
        if m := re.search(r"PID (\d+) serves, PID (\d+) drains", line):
            found.append((int(m.group(1)), int(m.group(2))))
    return found


def one_at_a_time(lines: list[str], count: int) -> None:
    """After the first ``count`` starts, each start is followed by its swap first."""
    events = [line for line in lines if "started (PID" in line or " serves, PID " in line]
    starts = 0
    pending = 0
    for line in events:
        if "started (PID" in line:
            starts += 1
            if starts > count:
                pending += 1
                assert pending == 1, "\n".join(events)
        else:
            pending -= 1


async def test_sighup_restarts_workers_one_by_one_with_fresh_code(tmp_path: Path) -> None:
    module = tmp_path / "versioned_app.py"
    module.write_text(VERSIONED_APP.format(version="v1"))
    notify_path = str(tmp_path / "notify.sock")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock:
        await notify_sock.bind(notify_path)

        async def next_message() -> str:
            with trio.fail_after(30):
                return (await notify_sock.recv(4096)).decode()

        env = {"NOTIFY_SOCKET": notify_path, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
        args = ["versioned_app:app", "--workers", "2", "--bind", "127.0.0.1:0"]
        async with launch(args, env=env, wait_serving=False) as proc:
            old = await serving(proc)
            assert (await next_message()).startswith("READY=1")
            assert (await get(proc.url)).text == "v1"
            module.write_text(VERSIONED_APP.format(version="v2"))
            load = Load(proc.url)
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load.run, stop)
                proc.signal(signal.SIGHUP)
                reloading = (await next_message()).split("\n")
                assert reloading[0] == "RELOADING=1"
                assert reloading[1].startswith("MONOTONIC_USEC=")
                assert await next_message() == "READY=1"
                await wait_gone(old, timeout=10)
                stop.set()
            new = worker_pids(proc.process.pid)
            assert len(new) == 2
            assert not set(new) & set(old)
            assert sorted(old) == sorted(o for _, o in replacements(proc.lines))
            assert (await get(proc.url)).text == "v2"
            assert load.failures == []
            assert set(load.bodies) <= {"v1", "v2"}
            one_at_a_time(proc.lines, 2)
            proc.signal(signal.SIGTERM)
            assert await next_message() == "STOPPING=1"
            assert await proc.wait() == 0, proc.stderr


async def test_a_broken_reload_keeps_the_old_workers_serving(tmp_path: Path) -> None:
    module = tmp_path / "versioned_app.py"
    module.write_text(VERSIONED_APP.format(version="v1"))
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    args = ["versioned_app:app", "--workers", "2", "--bind", "127.0.0.1:0"]
    async with launch(args, env=env, wait_serving=False) as proc:
        old = await serving(proc)
        module.write_text("raise RuntimeError('a bad deploy')\n")
        proc.signal(signal.SIGHUP)
        await proc.wait_for_line(r"the new worker \(PID \d+\) exited 2 before serving", 30)
        await proc.wait_for_line("rolling restart: 0 of 2 workers replaced")
        assert sorted(worker_pids(proc.process.pid)) == sorted(old)
        assert (await get(proc.url)).text == "v1"
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0, proc.stderr


@pytest.mark.parametrize(
    ("limit", "why"),
    [
        (["--max-requests", "15", "--max-requests-jitter", "5"], "reached --max-requests"),
        (["--worker-lifetime", "2"], r"is \d+ s old"),
        (["--worker-max-rss", "1"], r"uses \d+ MiB > 1 MiB"),
    ],
)
async def test_recycling_replaces_workers_without_a_failed_request(
    limit: list[str], why: str
) -> None:
    async with launch([*WORKERS, *limit], wait_serving=False) as proc:
        first = await serving(proc)
        load = Load(proc.url)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run, stop)
            await proc.wait_for_lines(r"PID \d+ serves, PID \d+ drains", 2, timeout=60)
            stop.set()
        await proc.wait_for_line(why)
        assert load.failures == []
        assert len(load.bodies) > 0
        assert {old for _, old in replacements(proc.lines)} & set(first)
        one_at_a_time(proc.lines, 2)
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0, proc.stderr


async def test_sighup_with_workers_loads_tls_files_afresh(tmp_path: Path) -> None:
    tls = TLSFiles(tmp_path / "tls")
    args = [*WORKERS, "--certfile", str(tls.cert_file), "--keyfile", str(tls.key_file)]
    async with launch(args, wait_serving=False) as proc:
        await serving(proc)
        before = await presented_cert(proc.port, tls)
        tls.rotate()
        assert tls.server_cert_der() != before
        proc.signal(signal.SIGHUP)
        await proc.wait_for_line("rolling restart: 2 of 2 workers replaced", timeout=30)
        for _ in range(4):  # whichever worker answers
            assert await presented_cert(proc.port, tls) == tls.server_cert_der()
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0, proc.stderr


async def test_a_connection_accepted_just_before_the_drain_gets_its_answer() -> None:
    """What a rolling restart needs from the drain: a worker that is told to drain
    may have accepted a connection whose request has not arrived yet. Closing
    it as idle loses that request ('server disconnected without a response')."""
    async with running_server(App()) as server:
        fresh = await trio.open_tcp_stream("127.0.0.1", server.port)
        # Accepted once a later connection is answered (the backlog is FIFO).
        assert (await server.client.get("/")).text == "hello"
        server.handle.shutdown()
        await wait_refused(server.port, timeout=5)  # the drain has begun
        await trio.testing.wait_all_tasks_blocked()  # and idle connections were closed
        await fresh.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while chunk := await fresh.receive_some(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200")
        assert data.endswith(b"hello")
        await fresh.aclose()


async def test_a_response_sent_during_the_drain_says_connection_close() -> None:
    """Else a keep-alive client sends its next request on a connection that the
    draining worker closes after this response: wrk counts each as an error."""
    app = App()
    async with running_server(app) as server, trio.open_nursery() as nursery:
        responses: list[httpx.Response] = []

        async def slow() -> None:
            responses.append(await server.client.get("/slow", params={"s": "0.3"}))

        nursery.start_soon(slow)
        await app.slow_started.wait()
        server.handle.shutdown()
    assert responses[0].text == "slept"
    assert responses[0].headers["connection"] == "close"


async def test_a_worker_killed_during_the_drain_makes_the_parent_exit_128_plus_n() -> None:
    async with launch(WORKER_ARGS, wait_serving=False) as proc:
        pids = await serving(proc)

        async def drain_then_kill_them() -> None:
            proc.signal(signal.SIGTERM)
            await proc.wait_for_line("SIGTERM: workers drain")
            for pid in pids:
                os.kill(pid, signal.SIGKILL)  # (the OOM killer, say)

        bodies = await four_streams_through(proc, drain_then_kill_them)
        assert await proc.wait() == 128 + signal.SIGKILL, proc.stderr
    assert STREAM_BODY not in bodies
    await proc.wait_for_line(r"was forced to stop \(was killed by signal 9\)")


async def test_a_stop_does_not_wait_for_a_worker_that_is_still_starting(tmp_path: Path) -> None:
    """An app that takes minutes to load (a model, say): SIGTERM during its import
    ends the worker at once (it has no request to finish), and the exit stays 0."""
    (tmp_path / "slow_import.py").write_text("import time\ntime.sleep(60)\napp = None\n")
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    args = ["slow_import:app", "--workers", "2", "--bind", "127.0.0.1:0"]
    async with launch(args, env=env, wait_serving=False) as proc:
        await proc.wait_for_line(r"worker 0 started \(PID \d+\)")
        pids = await wait_workers(proc.process.pid, 1)
        proc.signal(signal.SIGTERM)
        assert await proc.wait(timeout=10) == 0, proc.stderr
        await wait_gone(pids, timeout=5)


async def test_requests_a_real_worker_cuts_at_graceful_timeout_are_counted_by_the_parent() -> None:
    args = [*WORKERS, "--graceful-timeout", "0.5"]
    async with launch(args, wait_serving=False) as proc:
        await serving(proc)
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(aborted, f"{proc.url}/slow?s=30")
            await proc.wait_for_lines("slow request started", 3)
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0, proc.stderr
    cut = re.compile(r"ERROR.*trio_launcher: worker \d \(PID \d+\): its drain cut (\d+)")
    counts = [int(m.group(1)) for line in proc.lines if (m := cut.search(line))]
    assert sum(counts) == 3, proc.stderr
