"""Processes, load generators and statistics shared by the benchmarks.

The server runs pinned to core 0 and the load generator to core 1 (``taskset``)
when the machine has two cores or more. wrk and h2load are used when present
(Debian packages ``wrk`` and ``nghttp2-client``); otherwise a small Python
client does the job, bounded in time and count, and says so in the results.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
PINNED = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


def pin(core: int, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv] if PINNED else list(argv)


def env() -> dict[str, str]:
    result = dict(os.environ)
    result["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), result.get("PYTHONPATH")]))
    return result


def spawn(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start a benchmark process in this checkout, with nothing on stdin and its output
    thrown away."""
    return subprocess.Popen(
        list(argv),
        env=env(),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def bound_port(proc: subprocess.Popen[Any], timeout: float = 20.0) -> int:
    """The TCP port the server ``proc`` listens on, once it does.

    Every server here binds 127.0.0.1 port 0 and the port is read back from the
    kernel (psutil: ``proc``'s listening socket; ``taskset`` and valgrind keep the
    PID), so no port is picked for a server to bind later, where another process
    could take it first."""
    process = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with contextlib.suppress(psutil.Error):
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.ip == "127.0.0.1":
                    return int(conn.laddr.port)
        time.sleep(0.002)
    raise TimeoutError(f"server {proc.pid} listens on no TCP port after {timeout} s")


@contextlib.contextmanager
def server(
    variant: str, tls: tuple[str, str] | None = None
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """Run ``benchmarks.server VARIANT`` pinned to core 0; yield (port, process)."""
    argv = [sys.executable, "-m", "benchmarks.server", variant, "0", *(tls or ())]
    proc = spawn(pin(0, argv))
    with listening(proc) as port:
        yield port, proc


@contextlib.contextmanager
def listening(proc: subprocess.Popen[Any], timeout: float = 20.0) -> Iterator[int]:
    """Wait until the server ``proc`` listens; yield its port; end it (by its PID) after."""
    try:
        yield bound_port(proc, timeout)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[Any]) -> None:
    """End a server we started, by its PID: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()  # only the process we started
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class LoadResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    tool: str


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not match:
        raise ValueError(f"cannot read a latency from {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(url: str, connections: int, seconds: float) -> LoadResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url]
    out = subprocess.run(pin(1, argv), capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = 0
    for match in re.finditer(r"(connect|read|write|timeout) (\d+)", out):
        errors += int(match.group(2))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    return LoadResult(rps, p50, p99, errors, "wrk")


def h2load(url: str, connections: int, seconds: float) -> LoadResult:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "h2load.log"
        argv = [
            "h2load",
            f"-c{connections}",
            "-m1",
            "-t1",
            f"-D{seconds:g}",
            f"--log-file={log}",
            url,
        ]
        out = subprocess.run(
            pin(1, argv), capture_output=True, text=True, timeout=seconds + 60
        ).stdout
        rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    latencies = sorted(int(row[2]) / 1000 for row in rows if row[1] != "-1")
    failed = sum(1 for row in rows if row[1] == "-1" or not row[1].startswith("2"))
    return LoadResult(rps, percentile(latencies, 50), percentile(latencies, 99), failed, "h2load")


def python_client(host: str, port: int, path: str, connections: int, seconds: float) -> LoadResult:
    """Fallback: keep-alive HTTP/1.1 GETs from threads, bounded in time and count."""
    request = f"GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()
    latencies: list[float] = []
    errors = [0]
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def worker() -> None:
        own: list[float] = []
        try:
            sock = socket.create_connection((host, port), 5)
        except OSError:
            with lock:
                errors[0] += 1
            return
        with sock:
            while time.monotonic() < deadline and len(own) < 1_000_000:
                start = time.perf_counter()
                try:
                    sock.sendall(request)
                    _read_response(sock)
                except OSError:
                    with lock:
                        errors[0] += 1
                    break
                own.append((time.perf_counter() - start) * 1000)
        with lock:
            latencies.extend(own)

    threads = [threading.Thread(target=worker) for _ in range(min(connections, 16))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    latencies.sort()
    return LoadResult(
        len(latencies) / seconds,
        percentile(latencies, 50),
        percentile(latencies, 99),
        errors[0],
        "python",
    )


def _read_response(sock: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lower = head.lower()
    match = re.search(rb"content-length: (\d+)", lower)
    if match:
        while len(body) < int(match.group(1)):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            body += chunk
        return
    while not body.endswith(b"0\r\n\r\n"):  # chunked
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        body += chunk


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(pct / 100 * (len(sorted_values) - 1)))
    return float(sorted_values[index])


@dataclass
class Summary:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values))

    def __str__(self) -> str:
        return f"{self.median:.4g} ({self.low:.4g}-{self.high:.4g})"


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of the per-round ratios a[i] / b[i] (rounds were interleaved)."""
    return statistics.median(x / y if y else math.inf for x, y in zip(a, b, strict=True))


def table_head(*cells: str) -> list[str]:
    """A Markdown table's header row and rule."""
    return [f"| {' | '.join(cells)} |", "|" + "---|" * len(cells)]


def rows(results: Mapping[str, Any], *meta: str) -> Iterator[tuple[str, Any]]:
    """The rows of a results mapping, without its ``meta`` entries (run settings)."""
    return ((key, value) for key, value in results.items() if key not in meta)
