"""Chaos and abuse: under load, faults and bad input the server keeps working.

A fast subset runs in every test run. ``CHAOS_RUNS=30 python -m pytest -m chaos``
is the full run recorded in RELIABILITY.md. Every server here is a real process
or a real in-process hypercorn on 127.0.0.1; every load loop is bounded.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_launcher.testing import TLSFiles, presented_cert, running_server

from .apps import App
from .net import get
from .proc import LOOPBACK, ROOT, cli_env, launch, served

pytestmark = pytest.mark.chaos


def record(case: str, requests: int, failures: list[Any]) -> None:
    """One line per run for RELIABILITY.md (``-s`` shows them)."""
    print(f"\nRELIABILITY|{case}|{requests}|{len(failures)}")


RUNS = int(os.environ.get("CHAOS_RUNS", "2"))
STREAM_CHUNKS = 20
STREAM = {"n": STREAM_CHUNKS, "delay": 0.01}
STREAM_BODY = b"".join(b"chunk%d\n" % i for i in range(STREAM_CHUNKS))


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.refused = 0
        self.incomplete: list[str] = []


async def client_loop(
    url: str, tally: Tally, stop: trio.Event, rng: random.Random | None = None
) -> None:
    """Plain and streaming requests until ``stop`` or the server goes away.

    A request that got its 200 must get its whole body; a request refused or
    closed before any answer is fine (the client can retry it elsewhere).
    """
    rng = rng or random.Random(0)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while not stop.is_set():
            path, params, expected = (
                ("/stream", STREAM, STREAM_BODY) if rng.random() < 0.5 else ("/", {}, b"hello")
            )
            status = None
            try:
                async with client.stream("GET", path, params=params) as r:
                    status = r.status_code
                    body = b"".join([chunk async for chunk in r.aiter_bytes()])
            except httpx.TransportError as exc:
                if status == 200:
                    tally.incomplete.append(f"{path}: 200 then {exc!r}")
                else:
                    tally.refused += 1
                    return
            else:
                if status == 200 and body != expected:
                    tally.incomplete.append(f"{path}: {len(body)} bytes")
                tally.ok += 1


@pytest.mark.parametrize("run", range(RUNS))
async def test_engine_dies_at_random_under_load(run: int) -> None:
    args = served(
        "tests.apps:app", engine="tests.apps:engine", graceful_timeout=1, log_level="warning"
    )
    async with launch(args, wait_serving=False) as proc:
        # --log-level warning hides "serving on": find the port through psutil.
        port = await _listening_port(proc.process.pid)
        url = f"http://127.0.0.1:{port}"
        tally = Tally()
        stop = trio.Event()
        rng = random.Random(run)  # each run its own moment, the same on every machine
        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(client_loop, url, tally, stop, random.Random(run * 100 + i))
            await trio.sleep(rng.uniform(0.05, 0.5))  # a random moment under load
            async with httpx.AsyncClient() as killer:
                await killer.post(f"{url}/kill")
            killed = trio.current_time()
            code = await proc.wait(timeout=1 + 1)
            assert trio.current_time() - killed <= 1 + 1
            stop.set()
        record("engine dies at random, 32 clients", tally.ok + tally.refused, tally.incomplete)
        assert code == 3, proc.stderr
        assert tally.incomplete == []
        assert tally.ok > 0
        assert "Traceback" not in proc.stderr


async def _listening_port(pid: int) -> int:
    import psutil

    with trio.fail_after(15):
        while True:
            for conn in psutil.Process(pid).net_connections("tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    return int(conn.laddr.port)
            await trio.sleep(0.02)


STORMS = [
    [signal.SIGHUP, signal.SIGHUP, signal.SIGTERM],
    [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGTERM],
    [signal.SIGINT, signal.SIGINT, signal.SIGHUP],
    [signal.SIGHUP, signal.SIGTERM, signal.SIGHUP, signal.SIGHUP, signal.SIGTERM],
]


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@pytest.mark.parametrize("transport", ["lean", "hypercorn"])
@pytest.mark.parametrize("storm", STORMS, ids=lambda s: "-".join(x.name for x in s))
async def test_signal_storm_during_load(storm: list[signal.Signals], transport: str) -> None:
    """Everything before the first stop signal, then (once it was taken) the rest, at once.

    Signals that arrive together are merged by the kernel, so a storm sent in
    one burst has no single right outcome. Split at the moment the first stop
    signal was taken, it has one: any later stop signal forces (exit 128+N,
    cuts allowed), none means a graceful drain that loses nothing.
    """
    first = next(i for i, signum in enumerate(storm) if signum in STOP_SIGNALS)
    before, stop_signal, after = storm[:first], storm[first], storm[first + 1 :]
    forcing = [signum for signum in after if signum in STOP_SIGNALS]
    args = served("tests.apps:app", graceful_timeout=2, transport=transport)
    async with launch(args) as proc:
        tally = Tally()
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(client_loop, proc.url, tally, stop, random.Random(i))
            with trio.fail_after(10):
                while tally.ok < 8:  # the load is on
                    await trio.sleep(0.01)
            for signum in before:
                proc.signal(signum)
            proc.signal(stop_signal)
            await proc.wait_for_line(f"{stop_signal.name}: draining")
            for signum in after:
                proc.signal(signum)
            code = await proc.wait(timeout=10)
            stop.set()
    record(
        f"signal storm ({transport})", tally.ok + tally.refused, [] if forcing else tally.incomplete
    )
    assert len([line for line in proc.lines if ": draining (send it again" in line]) == 1
    if forcing:
        assert code == 128 + forcing[0], proc.stderr  # the first of them forced the stop
        # Forcing cancels in-flight requests: a cut response is what was asked for.
    else:
        assert code == 0, proc.stderr
        assert tally.incomplete == []
    assert "Traceback" not in proc.stderr


async def test_sighup_storm_keeps_serving() -> None:
    async with launch(["tests.apps:app", *LOOPBACK]) as proc:
        for _ in range(50):
            proc.signal(signal.SIGHUP)
        await proc.wait_for_line("SIGHUP")
        assert (await get(proc.url)).text == "hello"
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0


async def test_certificate_chaos_never_fails_a_handshake(tmp_path: Path) -> None:
    tls = TLSFiles(tmp_path / "tls")
    other = TLSFiles(tmp_path / "other")
    config = tls.config()
    async with running_server(
        App(), config, tls=tls, enable_ssl_refresh=True, ssl_refresh_interval=0.02
    ) as server:
        failures: list[BaseException] = []
        handshakes = 0

        async def handshaker() -> None:
            nonlocal handshakes
            while True:
                try:
                    await presented_cert(server.port, tls)
                    handshakes += 1
                except (OSError, trio.BrokenResourceError) as exc:
                    failures.append(exc)
                await trio.lowlevel.checkpoint()

        good_key = tls.key_file.read_bytes()
        refresher = server.handle.tls
        assert refresher is not None

        async def refused() -> None:
            """Return once the bad state on disk was refused and handshakes went on after it."""
            before = refresher.failures
            with trio.fail_after(10):
                while refresher.failures == before:
                    await trio.sleep(0.01)
                served = handshakes
                while handshakes < served + 3:
                    await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshaker)
            for _ in range(RUNS * 3):
                for bad in (b"garbage\n" * 10, b"", other.key_file.read_bytes(), good_key[:50]):
                    tls.write_raw("key", bad)
                    await refused()
                tls.key_file.unlink()
                tls.key_file.mkdir()  # a directory where the key should be
                await refused()
                tls.key_file.rmdir()
                tls.key_file.write_bytes(good_key)
                for _ in range(3):  # rapid rotations
                    tls.rotate()
                    good_key = tls.key_file.read_bytes()
                expected = tls.server_cert_der()
                with trio.fail_after(2):
                    while await presented_cert(server.port, tls) != expected:
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        record("certificate chaos, handshakes", handshakes, failures)
        assert failures == []
        assert handshakes > 0
        assert refresher.failures >= RUNS * 3 * 5  # every bad state was seen and refused
        assert (await server.client.get("/")).text == "hello"


# --- hostile clients ----------------------------------------------------------


async def test_slowloris_does_not_starve_others() -> None:
    async with running_server(App()) as server:
        streams = []
        for _ in range(200):
            streams.append(await trio.open_tcp_stream("127.0.0.1", server.port))
        for i, byte in enumerate(b"GET / HTTP/1.1\r\nhost: x\r\n"):
            for stream in streams:
                await stream.send_all(bytes([byte]))
            if i % 5 == 0:
                assert (await server.client.get("/")).text == "hello"
        for stream in streams:
            await trio.aclose_forcefully(stream)
        assert (await server.client.get("/")).text == "hello"


async def test_oversized_head_and_body() -> None:
    async with running_server(App(), max_head_size=64 * 1024) as server:
        huge = await server.client.get("/", headers={"x-big": "a" * 1_000_000})
        assert huge.status_code == 431
        body = await server.client.post("/upload", content=b"x" * 20_000_000)
        assert (body.status_code, body.text) == (200, "20000000")
        # A body the app never reads: answered, and the connection is dealt with.
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 50000000\r\n\r\n")
        with contextlib.suppress(trio.BrokenResourceError):
            for _ in range(200):
                await stream.send_all(b"x" * 65536)
        await trio.aclose_forcefully(stream)
        assert (await server.client.get("/")).text == "hello"


@settings(
    max_examples=60 * RUNS,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.one_of(
        st.binary(min_size=1, max_size=300),
        st.builds(
            lambda method, target, version, headers: (
                method + b" " + target + b" " + version + b"\r\n" + headers + b"\r\n\r\n"
            ),
            st.sampled_from([b"GET", b"POST", b"G\x00T", b"", b"PRI"]),
            st.binary(max_size=40),
            st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9", b""]),
            st.binary(max_size=120),
        ),
    )
)
def test_malformed_requests_never_kill_the_server(malformed_server: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", malformed_server), 5) as sock:
        sock.settimeout(5)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except OSError:
            pass  # the server may reset a garbage connection: that is fine
    with socket.create_connection(("127.0.0.1", malformed_server), 5) as sock:
        sock.settimeout(5)
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"hello")


@pytest.fixture(scope="module")
def malformed_server() -> object:
    """A CLI server for the hypothesis test (sync: hypothesis drives plain sockets)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_launcher", "tests.apps:app", *LOOPBACK],
        cwd=ROOT,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url, lines, pump = _serving(proc)
    yield int(url.rsplit(":", 1)[1])
    alive = proc.poll() is None
    proc.send_signal(signal.SIGTERM)  # the process this fixture started
    proc.wait(timeout=15)
    pump.join(timeout=5)
    assert proc.stderr is not None
    proc.stderr.close()
    err = "\n".join(lines)
    assert alive, err
    assert "Traceback" not in err


def _serving(proc: subprocess.Popen[str]) -> tuple[str, list[str], threading.Thread]:
    """Read stderr until the URL is announced; a thread keeps reading after that."""
    assert proc.stderr is not None
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if "serving on http://" in line:
            break
    else:
        raise AssertionError("exited before serving:\n" + "\n".join(lines))
    last = lines[-1]

    def pump() -> None:
        assert proc.stderr is not None
        lines.extend(line.rstrip("\n") for line in proc.stderr)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return last.split("serving on ")[1], lines, thread


# --- scale ---------------------------------------------------------------------


@pytest.mark.skipif(
    resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2200,
    reason="the RLIMIT_NOFILE hard limit is too low for 1,000 connections",
)
async def test_thousand_keep_alive_connections() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2200), hard))
    try:
        async with running_server(App()) as server:
            streams = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(1000)]
            for stream in streams:
                await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            answered = 0
            with trio.fail_after(30):
                for stream in streams:
                    if b" 200 " in await stream.receive_some(65536):
                        answered += 1
            assert answered == 1000
            for stream in streams:
                await stream.aclose()
            assert (await server.client.get("/")).text == "hello"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_descriptor_exhaustion_recovers() -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    async with launch(["tests.apps:app", *LOOPBACK], preexec_fn=low_limit) as proc:
        hogs = []
        for _ in range(60):  # more than the server has descriptors for
            try:
                hogs.append(await trio.open_tcp_stream("127.0.0.1", proc.port))
            except OSError:
                break
        # The server is out of descriptors now: it says so, once per failed accept,
        # and it must not die.
        line = await proc.wait_for_line("Too many open files")
        assert proc.process.poll() is None
        for hog in hogs:
            await trio.aclose_forcefully(hog)
        with trio.fail_after(10):
            while True:
                try:
                    response = await get(f"{proc.url}/", timeout=2)
                    break
                except httpx.TransportError:
                    await trio.sleep(0.1)
        assert response.text == "hello"
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
        assert "Traceback" not in proc.stderr  # one line per failed accept
        assert "accept" in line.lower()


# --- app faults ------------------------------------------------------------------


async def test_handler_that_never_returns_is_cancelled_at_drain_deadline() -> None:
    args = ["tests.apps:app", *LOOPBACK, "--graceful-timeout", "0.5"]
    async with launch(args) as proc, trio.open_nursery() as nursery:
        stuck = await proc.slow_request(nursery, "/slow?s=3600")
        proc.signal(signal.SIGTERM)
        start = trio.current_time()
        assert await proc.wait(timeout=5) == 0
        assert trio.current_time() - start < 0.5 + 3  # the deadline, not the hour
    stuck.assert_aborted()


async def test_startup_failure_exits_1_with_one_error_line() -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "trio_launcher", "tests.apps:failing_app", *LOOPBACK],
        cwd=ROOT,
        env=cli_env(),
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1
    assert len([line for line in result.stderr.decode().splitlines() if "error:" in line]) == 1
