"""The cost of being there: idle RSS, cold start, idle CPU, against bare hypercorn."""

from __future__ import annotations

import socket
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.harness import bound_port, server, spawn, stop
from trio_launcher.testing import TLSFiles


def _get(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 1) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def cold_start(variant: str) -> float:
    """Seconds from process spawn to the first 200."""
    argv = [sys.executable, "-m", "benchmarks.server", variant, "0"]
    start = time.perf_counter()
    proc = spawn(argv)
    try:
        port = bound_port(proc, 30)  # (polled every 2 ms, as the GET below)
        deadline = start + 30
        while not _get(port):
            if time.perf_counter() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{variant} did not answer")
            time.sleep(0.002)
        return time.perf_counter() - start
    finally:
        stop(proc)


def idle_rss(variant: str) -> float:
    """MiB resident after start-up and one request."""
    with server(variant) as (port, proc):
        _get(port)
        time.sleep(0.5)
        children = psutil.Process(proc.pid).children(recursive=True)
        target = children[0] if children else psutil.Process(proc.pid)  # taskset execs
        return float(target.memory_info().rss) / 2**20


def idle_cpu(seconds: float) -> dict[str, float]:
    """Percent of one core used while idle: runner (engine + TLS refresher) vs hypercorn.

    Both run at the same time over the same window, with TLS on.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tls = TLSFiles(Path(tmp))
        files = (str(tls.cert_file), str(tls.key_file))
        with server("runner-idle", files) as (_, runner), server("hypercorn", files) as (_, bare):
            procs = {
                "runner (watchdog 5 s + TLS refresher 1 s)": psutil.Process(runner.pid),
                "bare hypercorn": psutil.Process(bare.pid),
            }
            time.sleep(1)
            before = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
            time.sleep(seconds)
            after = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
    return {name: 100 * (after[name] - before[name]) / seconds for name in procs}
