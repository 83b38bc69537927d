"""Lifecycle latencies: engine death, SIGTERM, certificate rotation."""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config

from benchmarks.apps import app
from benchmarks.harness import bound_port, spawn
from trio_launcher import EngineDeadError, serve_http
from trio_launcher.testing import FakeEngine, FakePollingEngine, TLSFiles, presented_cert


async def _refused(port: int) -> bool:
    with trio.socket.socket() as sock:
        try:
            await sock.connect(("127.0.0.1", port))
        except (ConnectionRefusedError, ConnectionResetError):
            return True
    return False


async def engine_death_once(wait_dead: bool, interval: float) -> float:
    """Seconds from engine.kill() to the listener refusing connections."""
    engine = FakeEngine() if wait_dead else FakePollingEngine()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.errorlog = None
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(partial_serve, config, engine, interval)
        port = int(handle.urls[0].rsplit(":", 1)[1])
        await trio.sleep(random.uniform(0, interval if math.isfinite(interval) else 0.05))
        start = time.perf_counter()
        engine.kill()
        with trio.fail_after(interval + 5 if math.isfinite(interval) else 5):
            while not await _refused(port):
                await trio.sleep(0.0005)
        return time.perf_counter() - start


async def partial_serve(
    config: Config, engine: object, interval: float, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    with contextlib.suppress(EngineDeadError):  # expected: it must not cancel the probe
        await serve_http(
            app,
            config,
            engine=engine,
            watchdog_interval=interval,
            handle_signals=False,
            task_status=task_status,
        )


def engine_death(runs: dict[str, int]) -> dict[str, list[float]]:
    cases = {"wait_dead()": (True, math.inf), "poll 0.1 s": (False, 0.1), "poll 5 s": (False, 5.0)}
    results: dict[str, list[float]] = {}
    for name, (wait_dead, interval) in cases.items():
        results[name] = [
            trio.run(engine_death_once, wait_dead, interval) for _ in range(runs[name])
        ]
    return results


def _launch(extra: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    argv = [
        sys.executable,
        "-m",
        "trio_launcher",
        "benchmarks.apps:app",
        "--bind",
        "127.0.0.1:0",
        "--log-level",
        "warning",
        *extra,
    ]
    proc = spawn(argv)
    return proc, bound_port(proc)


def sigterm_to_exit(runs: int) -> dict[str, list[float]]:
    """Seconds from SIGTERM to process exit: idle, request in flight, keep-alive client."""
    results: dict[str, list[float]] = {
        "idle": [],
        "request in flight (0.2 s left)": [],
        "idle keep-alive client": [],
    }
    for _ in range(runs):
        for case in results:
            proc, port = _launch([])
            sock = None
            if case != "idle":
                sock = socket.create_connection(("127.0.0.1", port))
                path = "/slow" if case.startswith("request") else "/"
                sock.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
                if path == "/":
                    sock.recv(65536)  # answered: now an idle keep-alive connection
                else:
                    time.sleep(0.01)  # let the request reach the app
            start = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
            results[case].append(time.perf_counter() - start)
            if sock is not None:
                sock.close()
    return results


async def cert_change_once(mode: str, interval: float) -> float:
    """Seconds from the new files on disk to the first handshake presenting them."""
    with tempfile.TemporaryDirectory() as tmp:
        tls = TLSFiles(Path(tmp), layout="kubernetes" if mode == "kubernetes" else "plain")
        config = tls.config()
        config.errorlog = None
        sighup = mode == "SIGHUP"
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                partial(
                    serve_http,
                    app,
                    config,
                    enable_ssl_refresh=not sighup,
                    ssl_refresh_interval=interval,
                    handle_signals=sighup,
                )
            )
            port = int(handle.urls[0].rsplit(":", 1)[1])
            await trio.sleep(random.uniform(0, interval) if not sighup else 0.05)
            tls.rotate("inplace" if mode == "in-place" else "rename")
            start = time.perf_counter()
            if sighup:
                os.kill(os.getpid(), signal.SIGHUP)
            expected = tls.server_cert_der()
            with trio.fail_after(interval + 5):
                while await presented_cert(port, tls) != expected:
                    await trio.sleep(0.001)
            elapsed = time.perf_counter() - start
            handle.shutdown()
    return elapsed


def cert_change(runs: int, interval: float = 1.0) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    for mode in ("in-place", "rename", "kubernetes", "SIGHUP"):
        results[mode] = [trio.run(cert_change_once, mode, interval) for _ in range(runs)]
    return results
