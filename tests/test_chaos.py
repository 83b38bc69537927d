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
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_launcher.testing import TLSFiles, running_server

from .apps import App, vanishing_h2_client
from .proc import ROOT, cli_env, launch
from .test_cli_process import aborted, get, wait_refused

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


async def client_loop(url: str, tally: Tally, stop: trio.Event) -> None:
    """Plain and streaming requests until ``stop`` or the server goes away.

    A request that got its 200 must get its whole body; a request refused or
    closed before any answer is fine (the client can retry it elsewhere).
    """
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while not stop.is_set():
            path, params, expected = (
                ("/stream", STREAM, STREAM_BODY) if random.random() < 0.5 else ("/", {}, b"hello")
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
    args = ["tests.apps:app", "--engine", "tests.apps:engine", "--bind", "127.0.0.1:0",
            "--graceful-timeout", "1", "--log-level", "warning"]  # fmt: skip
    async with launch(args, wait_serving=False) as proc:
        # --log-level warning hides "serving on": find the port through psutil.
        port = await _listening_port(proc.process.pid)
        url = f"http://127.0.0.1:{port}"
        tally = Tally()
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(32):
                nursery.start_soon(client_loop, url, tally, stop)
            await trio.sleep(random.uniform(0.05, 0.5))  # a random moment under load
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


@pytest.mark.parametrize("transport", ["lean", "hypercorn"])
@pytest.mark.parametrize("storm", STORMS, ids=lambda s: "-".join(x.name for x in s))
async def test_signal_storm_during_load(storm: list[signal.Signals], transport: str) -> None:
    args = ["tests.apps:app", "--bind", "127.0.0.1:0", "--graceful-timeout", "2",
            "--transport", transport]  # fmt: skip
    async with launch(args) as proc:
        tally = Tally()
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(client_loop, proc.url, tally, stop)
            await trio.sleep(0.1)
            for signum in storm:
                proc.signal(signum)
            code = await proc.wait(timeout=10)
            stop.set()
    drains = [line for line in proc.lines if ": draining (send it again" in line]
    forced = [line for line in proc.lines if "stopping at once" in line]
    record(f"signal storm ({transport})", tally.ok + tally.refused,
           [] if forced else tally.incomplete)  # fmt: skip
    assert len(drains) == 1, proc.stderr  # exactly one drain
    if forced:  # a later stop signal was taken after the first: the documented force
        name = forced[0].split("second ")[1].split(":")[0]
        assert code == 128 + signal.Signals[name], proc.stderr
        # Forcing cancels in-flight requests: a cut response is what was asked for.
    else:  # the burst merged into one stop signal: a graceful drain loses nothing
        assert code == 0, proc.stderr
        assert tally.incomplete == []
    assert "Traceback" not in proc.stderr


async def test_sighup_storm_keeps_serving() -> None:
    async with launch(["tests.apps:app", "--bind", "127.0.0.1:0"]) as proc:
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
    async with running_server(App(), config, tls=tls, enable_ssl_refresh=True,
                              ssl_refresh_interval=0.02) as server:  # fmt: skip
        failures: list[BaseException] = []
        handshakes = 0

        async def handshaker() -> None:
            nonlocal handshakes
            while True:
                try:
                    await tls.presented_cert(server.port)
                    handshakes += 1
                except (OSError, trio.BrokenResourceError) as exc:
                    failures.append(exc)
                await trio.lowlevel.checkpoint()

        good_key = tls.key_file.read_bytes()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshaker)
            for _ in range(RUNS * 3):
                for bad in (b"garbage\n" * 10, b"", other.key_file.read_bytes(), good_key[:50]):
                    tls.write_raw("key", bad)
                    await trio.sleep(0.05)  # let several polls see the bad state
                tls.key_file.unlink()
                tls.key_file.mkdir()  # a directory where the key should be
                await trio.sleep(0.05)
                tls.key_file.rmdir()
                tls.key_file.write_bytes(good_key)
                for _ in range(3):  # rapid rotations
                    tls.rotate()
                    good_key = tls.key_file.read_bytes()
                expected = tls.server_fingerprint()
                with trio.fail_after(2):
                    while await tls.presented_cert(server.port) != expected:
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        record("certificate chaos, handshakes", handshakes, failures)
        assert failures == []
        assert handshakes > 0
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
        assert huge.status_code in (400, 431)
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


@settings(max_examples=60 * RUNS, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
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
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trio_launcher",
            "tests.apps:app",
            "--bind",
            f"127.0.0.1:{port}",
            "--log-level",
            "critical",
        ],
        cwd=ROOT,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _wait_port(port)
    yield port
    alive = proc.poll() is None
    proc.send_signal(signal.SIGTERM)  # the process this fixture started
    _, err = proc.communicate(timeout=15)
    assert alive, err.decode()
    assert b"Traceback" not in err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int) -> None:
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(port)


async def test_abrupt_disconnects_http11() -> None:
    async with running_server(App()) as server:
        for i in range(50 * RUNS):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            if i % 2:  # mid-request
                await stream.send_all(
                    b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nab"
                )
            else:  # mid-response of a slow stream
                await stream.send_all(b"GET /stream?n=50&delay=0.001 HTTP/1.1\r\nhost: x\r\n\r\n")
                await stream.receive_some(10)
            await trio.aclose_forcefully(stream)
        assert (await server.client.get("/")).text == "hello"


async def test_abrupt_disconnects_http2_server_survives() -> None:
    """The stock hypercorn trio worker died of BusyResourceError here; we must not."""
    async with running_server(App()) as server:
        for _ in range(5 * RUNS):
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(vanishing_h2_client, server.port, 5)
            assert (await server.client.get("/")).text == "hello"
        if shutil_which("h2load"):
            for _ in range(2):
                await trio.run_process(["h2load", "-c32", "-m4", "-D1", f"{server.url}/stream"],
                                       capture_stdout=True)  # fmt: skip
                assert (await server.client.get("/")).text == "hello"


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


# --- scale ---------------------------------------------------------------------


async def test_thousand_keep_alive_connections() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for 1,000 connections")
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

    port = _free_port()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_launcher", "tests.apps:app", "--bind", f"127.0.0.1:{port}"],
        cwd=ROOT, env=cli_env(), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=low_limit,
    )  # fmt: skip
    try:
        await trio.to_thread.run_sync(_wait_port, port)
        hogs = []
        for _ in range(60):  # more than the server has descriptors for
            try:
                hogs.append(await trio.open_tcp_stream("127.0.0.1", port))
            except OSError:
                break
        await trio.sleep(0.3)  # the server is out of descriptors now; it must not die
        assert process.poll() is None
        for hog in hogs:
            await trio.aclose_forcefully(hog)
        with trio.fail_after(10):
            while True:
                try:
                    response = await get(f"http://127.0.0.1:{port}/", timeout=2)
                    break
                except httpx.TransportError:
                    await trio.sleep(0.1)
        assert response.text == "hello"
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
        assert process.stderr is not None
        err = (await process.stderr.receive_some(1 << 20)).decode()
        assert "Too many open files" in err or "EMFILE" in err or "accept" in err.lower()
        assert "Traceback" not in err  # one line per failed accept
    finally:
        if process.returncode is None:
            process.kill()


# --- app faults ------------------------------------------------------------------


async def test_handler_that_never_returns_is_cancelled_at_drain_deadline() -> None:
    args = ["tests.apps:app", "--bind", "127.0.0.1:0", "--graceful-timeout", "0.5"]
    async with launch(args) as proc, trio.open_nursery() as nursery:

        async def stuck() -> None:
            await aborted(f"{proc.url}/slow?s=3600")

        nursery.start_soon(stuck)
        await proc.wait_for_line("slow request started")
        proc.signal(signal.SIGTERM)
        start = trio.current_time()
        assert await proc.wait(timeout=5) == 0
        assert trio.current_time() - start < 0.5 + 1


async def test_startup_failure_releases_the_socket() -> None:
    port = _free_port()
    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "trio_launcher",
            "tests.apps:failing_app",
            "--bind",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        env=cli_env(),
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1
    assert len([line for line in result.stderr.decode().splitlines() if "error:" in line]) == 1
    with socket.socket() as sock:  # the port is free again at once
        sock.bind(("127.0.0.1", port))
    await wait_refused(port, timeout=1)
