"""Overload and the cost of the bounds: ``python -m benchmarks.overload [--quick]``.

Two measurements, each side by side in one run:

* **Overload.** 2000 clients connect at once and each asks for a request that
  takes 2 s, against trio_launcher with ``limit_concurrency=100`` and against
  uvicorn ``--limit-concurrency 100``. Meanwhile a prober asks for the health
  path every 20 ms on a new connection. Recorded: the statuses, the health
  path's latency, the server's RSS growth, and the admitted requests' latency
  against a run of 100 requests without overload.
* **Cost.** Hello-world throughput (wrk, 64 connections) of the branch's runner
  with its defaults, with every bound on, and of ``main``'s runner (from
  ``git archive main``, if the ref exists), in interleaved rounds.

The server runs pinned to core 0, the clients to core 1 (as ``benchmarks``).
Every load is bounded in count and time; servers are ended by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import select
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import trio
import trio.testing

from benchmarks.apps import lifespan
from benchmarks.harness import (
    ROOT,
    env,
    listening,
    paired_ratio,
    percentile,
    pin,
    wrk,
)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SLOW_S = 2.0
LIMIT = 100
HERE = Path(__file__).resolve().parent


# --- the apps (the same routes on trio and on asyncio) -------------------------------------


async def _app(
    sleep: Callable[[float], Awaitable[None]], scope: Message, receive: Receive, send: Send
) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await sleep(SLOW_S)
    body = b'{"status":"serving"}' if scope["path"] == "/health" else b"Hello, world!"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def trio_app(scope: Message, receive: Receive, send: Send) -> None:
    await _app(trio.sleep, scope, receive, send)


async def asyncio_app(scope: Message, receive: Receive, send: Send) -> None:
    """For uvicorn, which answers /health in the app (and must see a coroutine function)."""
    await _app(asyncio.sleep, scope, receive, send)


def serve(variant: str, port: int) -> None:
    """The server process: ``python -m benchmarks.overload serve VARIANT PORT``."""
    from hypercorn.config import Config

    snapshot = os.environ.get("BENCH_TRIO_LAUNCHER")
    if snapshot:
        _import_package_from(Path(snapshot) / "trio_launcher")
    from trio_launcher import serve_http

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.backlog = 2048  # as the CLI
    config.errorlog = None
    config.accesslog = None
    presets: dict[str, dict[str, Any]] = {
        "limited": {"limit_concurrency": LIMIT, "health_path": "/health"},
        "bounds-off": {"body_timeout": None},
        "defaults": {},
        "all-bounds": {"limit_concurrency": 1000, "request_timeout": 30.0, "body_timeout": 60.0},
        "main": {},
    }
    options = presets[variant]
    trio.run(partial(serve_http, trio_app, config, **options))


def _import_package_from(path: Path) -> None:
    """Import ``trio_launcher`` from ``path`` (the editable install would win over sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "trio_launcher", path / "__init__.py", submodule_search_locations=[str(path)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["trio_launcher"] = module
    spec.loader.exec_module(module)


@contextmanager
def server(variant: str, snapshot: str | None = None) -> Iterator[tuple[int, int]]:
    """Start a server pinned to core 0; yield (port, pid); end it by PID."""
    if variant == "uvicorn":
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "benchmarks.overload:asyncio_app",
            "--port",
            "0",
            "--limit-concurrency",
            str(LIMIT),
            "--backlog",
            "2048",
            "--log-level",
            "error",
            "--no-access-log",
        ]
    else:
        argv = [sys.executable, "-m", "benchmarks.overload", "serve", variant, "0"]
    environment = env()
    if snapshot:
        environment["BENCH_TRIO_LAUNCHER"] = snapshot
    proc = subprocess.Popen(
        pin(0, argv),
        env=environment,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with listening(proc) as port:
        yield port, proc.pid


# --- the overload clients (on core 1: h2load for the burst, a prober process) ----------------


async def request(port: int, path: str) -> tuple[int, float]:
    """One GET on a new connection: (status or -1 on a transport error, seconds)."""
    start = time.perf_counter()
    try:
        with trio.fail_after(30):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: b\r\n\r\n".encode())
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return -1, time.perf_counter() - start
                    data += chunk
                status = int(data.split(b" ", 2)[1])
    except (OSError, trio.BrokenResourceError, trio.TooSlowError, ValueError):
        return -1, time.perf_counter() - start
    return status, time.perf_counter() - start


def probe(port: int) -> None:
    """The health prober's process: ``python -m benchmarks.overload probe PORT``.

    A GET of the health path on a new connection every 20 ms (blocking
    sockets, nothing else in this process), until stdin closes; then one JSON
    line of ``[status, seconds]`` pairs. Its own process, so that its figures
    are the server's and not a busy client loop's.
    """
    results: list[tuple[int, float]] = []
    request_bytes = b"GET /health HTTP/1.1\r\nhost: b\r\n\r\n"
    print("ready", flush=True)
    while len(results) < 5000 and not select.select([sys.stdin], [], [], 0.02)[0]:
        start = time.perf_counter()
        status = -1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(request_bytes)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                else:
                    status = int(data.split(b" ", 2)[1])
        except (OSError, ValueError):
            pass
        results.append((status, time.perf_counter() - start))
    print(json.dumps(results))


def burst(port: int, clients: int) -> list[tuple[int, float]]:
    """``clients`` connections at once, one ``GET /slow`` each (h2load, pinned to core 1)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "h2load.log"
        argv = [
            "h2load",
            "--h1",
            f"-n{clients}",
            f"-c{clients}",
            "-t1",
            f"--log-file={log}",
            f"http://127.0.0.1:{port}/slow",
        ]
        subprocess.run(pin(1, argv), capture_output=True, timeout=120, check=True)
        rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    answered = [(int(row[1]), int(row[2]) / 1e6) for row in rows]
    return answered + [(-1, math.nan)] * (clients - len(answered))  # never answered


def overload_run(port: int, pid: int, clients: int) -> dict[str, Any]:
    process = psutil.Process(pid)
    rss_before = process.memory_info().rss
    rss_peak = [rss_before]
    done = threading.Event()

    def sample_rss() -> None:
        while not done.wait(0.05):
            rss_peak[0] = max(rss_peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample_rss)
    prober = subprocess.Popen(
        pin(1, [sys.executable, "-m", "benchmarks.overload", "probe", str(port)]),
        cwd=ROOT,
        env=env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        sampler.start()
        assert prober.stdout is not None
        prober.stdout.readline()  # "ready": probing from before the burst
        slow = burst(port, clients)
        out, _ = prober.communicate("", timeout=60)
        health = [(int(status), float(t)) for status, t in json.loads(out)]
    finally:
        done.set()
        sampler.join()
        if prober.poll() is None:
            prober.kill()
            prober.wait()
    statuses = collections.Counter(status for status, _ in slow)
    admitted = sorted(t * 1000 for status, t in slow if status == 200)
    shed = sorted(t * 1000 for status, t in slow if status == 503)
    health_ms = sorted(t * 1000 for _, t in health)
    return {
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "admitted_p50_ms": percentile(admitted, 50),
        "admitted_p99_ms": percentile(admitted, 99),
        "shed_p50_ms": percentile(shed, 50),
        "shed_p99_ms": percentile(shed, 99),
        "health_statuses": dict(collections.Counter(str(s) for s, _ in health)),
        "health_p50_ms": percentile(health_ms, 50),
        "health_p99_ms": percentile(health_ms, 99),
        "health_max_ms": health_ms[-1] if health_ms else float("nan"),
        "health_probes": len(health),
        "rss_growth_mib": (rss_peak[0] - rss_before) / 2**20,
    }


def baseline_run(port: int, clients: int = LIMIT // 2) -> dict[str, Any]:
    """``clients`` slow requests at once, without overload: their latency is the reference.

    Half the limit by default: uvicorn counts connections and tasks, and sheds
    some of ``LIMIT`` requests that arrive together. ``LIMIT`` of them is the
    reference for as many requests as the overload admits (trio_launcher
    admits all of them).
    """
    times = sorted(t * 1000 for status, t in burst(port, clients) if status == 200)
    return {"ok": len(times), "p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99)}


def overload(clients: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for variant in ("limited", "uvicorn"):
        with server(variant) as (port, _):
            reference = baseline_run(port)
            reference_limit = baseline_run(port, LIMIT)
        with server(variant) as (port, pid):
            trio.run(request, port, "/")  # warm
            results[variant] = {
                "reference": reference,
                "reference_limit": reference_limit,
                **overload_run(port, pid, clients),
            }
    return results


# --- the cost of the bounds on hello world --------------------------------------------------


@contextmanager
def main_snapshot() -> Iterator[str | None]:
    """``trio_launcher`` as on the ``main`` ref, unpacked in a temporary directory; None
    when there is no git or this checkout is ``main`` (bounds-off is the baseline then)."""
    if shutil.which("git") is None:
        yield None
        return
    refs = subprocess.run(
        ["git", "rev-parse", "main", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    if len(refs) == 2 and refs[0] == refs[1]:
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "main.tar"
        made = subprocess.run(
            ["git", "archive", "-o", str(archive), "main", "trio_launcher"],
            cwd=ROOT,
            capture_output=True,
        )
        if made.returncode != 0:
            yield None
            return
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        yield tmp


def cost(rounds: int, seconds: float) -> dict[str, Any]:
    with main_snapshot() as snapshot:
        variants = ["defaults", "bounds-off", "all-bounds"] + (["main"] if snapshot else [])
        rps: dict[str, list[float]] = {v: [] for v in variants}
        p99: dict[str, list[float]] = {v: [] for v in variants}
        for i in range(rounds):
            for variant in variants[i % len(variants) :] + variants[: i % len(variants)]:
                with server(variant, snapshot if variant == "main" else None) as (port, _):
                    url = f"http://127.0.0.1:{port}/"
                    wrk(url, 64, min(1.0, seconds))  # warm-up
                    result = wrk(url, 64, seconds)
                rps[variant].append(result.rps)
                p99[variant].append(result.p99_ms)
    base = "main" if snapshot else "bounds-off"
    return {
        "rps": rps,
        "p99_ms": p99,
        "baseline": base,
        "rps_ratio": {v: paired_ratio(rps[v], rps[base]) for v in variants if v != base},
    }


def middleware_cpu(variant: str, calls: int = 50_000) -> float:
    """CPU microseconds per call of the runner's middleware around a hello-world app.

    CPU time of this process, best of seven: other work on the machine hardly
    moves it, unlike wall-clock throughput. ``variant``: ``main`` (needs
    ``BENCH_TRIO_LAUNCHER``), ``defaults``, ``bounds-off`` or ``all-bounds``.
    """
    snapshot = os.environ.get("BENCH_TRIO_LAUNCHER")
    if snapshot:
        _import_package_from(Path(snapshot) / "trio_launcher")
    from trio_launcher import _asgi

    kwargs: dict[str, Any] = {}
    if variant != "main":
        from trio_launcher import _bounds

        kwargs["bounds"] = {
            "defaults": _bounds.Bounds(),
            "bounds-off": _bounds.Bounds(body_timeout=None),
            "all-bounds": _bounds.Bounds(30.0, 1000, 60.0),
        }[variant]

    async def hello(scope: Message, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hi"})

    async def send(message: Message) -> None:
        pass

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    middleware = _asgi.RunnerMiddleware(hello, lambda exc: None, **kwargs)
    lent = trio.CancelScope()  # what the HTTP/1.1 connection lends for the request deadline
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "http_version": "1.1",
        "headers": [(b"host", b"x")],
        "extensions": {"trio_launcher.cancel": lent.cancel},
    }

    async def measure() -> float:
        best = math.inf
        async with trio.open_nursery() as nursery:
            deadlines = getattr(middleware, "deadlines", None)  # (main's middleware has none)
            if deadlines is not None and "bounds" in kwargs:
                nursery.start_soon(deadlines.run)  # the reaper, as the runner runs it
                await trio.testing.wait_all_tasks_blocked()
            for _ in range(7):
                start = time.process_time()
                for _ in range(calls):
                    await middleware(scope, receive, send)
                best = min(best, (time.process_time() - start) / calls)
            nursery.cancel_scope.cancel()
        return best * 1e6

    return trio.run(measure)


def middleware_cost(rounds: int) -> dict[str, list[float]]:
    """``middleware_cpu`` per variant, each in a fresh process, interleaved rounds."""
    with main_snapshot() as snapshot:
        variants = ["defaults", "bounds-off", "all-bounds"] + (["main"] if snapshot else [])
        results: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(rounds):
            for variant in variants:
                environment = env()
                if variant == "main" and snapshot:
                    environment["BENCH_TRIO_LAUNCHER"] = snapshot
                out = subprocess.run(
                    pin(1, [sys.executable, "-m", "benchmarks.overload", "cpu", variant]),
                    env=environment,
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                results[variant].append(float(out.stdout.strip()))
    return results


# --- report ---------------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    out = [
        "### Overload (2000 clients at once, 2 s handler, limit 100)",
        "",
        "| | trio_launcher `limit_concurrency=100` | uvicorn `--limit-concurrency 100` |",
        "|---|---|---|",
    ]
    o = results["overload"]
    a, b = o["limited"], o["uvicorn"]

    def row(name: str, fmt: Callable[[dict[str, Any]], str]) -> None:
        out.append(f"| {name} | {fmt(a)} | {fmt(b)} |")

    row("statuses of the 2000", lambda r: ", ".join(f"{k}: {v}" for k, v in r["statuses"].items()))
    row("503 p50 / p99", lambda r: f"{r['shed_p50_ms']:.0f} / {r['shed_p99_ms']:.0f} ms")
    row(
        "health path p50 / p99 / max",
        lambda r: (
            f"{r['health_p50_ms']:.1f} / {r['health_p99_ms']:.1f} / {r['health_max_ms']:.0f} ms"
        ),
    )
    row(
        "health statuses", lambda r: ", ".join(f"{k}: {v}" for k, v in r["health_statuses"].items())
    )
    row(
        "admitted p50 / p99 (overload)",
        lambda r: f"{r['admitted_p50_ms']:.0f} / {r['admitted_p99_ms']:.0f} ms",
    )
    row(
        "admitted p50 / p99 (50 alone)",
        lambda r: f"{r['reference']['p50_ms']:.0f} / {r['reference']['p99_ms']:.0f} ms",
    )
    row(
        f"admitted p50 / p99 ({LIMIT} alone)",
        lambda r: (
            f"{r['reference_limit']['p50_ms']:.0f} / {r['reference_limit']['p99_ms']:.0f} ms"
            f" ({r['reference_limit']['ok']} of {LIMIT} answered 200)"
        ),
    )
    row("RSS growth", lambda r: f"{r['rss_growth_mib']:.1f} MiB")
    c = results["cost"]
    out += [
        "",
        f"### Cost of the bounds, hello world (wrk -c64; baseline: {c['baseline']})",
        "",
        "| variant | req/s per round | p99 ms per round | ratio to baseline |",
        "|---|---|---|---|",
    ]
    for variant, values in c["rps"].items():
        ratio = c["rps_ratio"].get(variant)
        out.append(
            f"| {variant} | {', '.join(f'{v:.0f}' for v in values)} | "
            f"{', '.join(f'{v:.1f}' for v in c['p99_ms'][variant])} | "
            f"{'-' if ratio is None else f'{ratio:.3f}'} |"
        )
    m = results.get("middleware_us")
    if m:
        out += [
            "",
            "### CPU per request in the runner's middleware (hello world, best of 7)",
            "",
            "| variant | us per request, per round |",
            "|---|---|",
        ]
        out += [f"| {v} | {', '.join(f'{x:.2f}' for x in xs)} |" for v, xs in m.items()]
    return "\n".join(out)


def run(quick: bool) -> dict[str, Any]:
    """Both measurements; the clients run on core 1 meanwhile (the server on core 0)."""
    affinity = os.sched_getaffinity(0)
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})
    load_before = os.getloadavg()
    try:
        return {
            "overload": overload(2000),
            "cost": cost(2 if quick else 4, 2.0 if quick else 4.0),
            "middleware_us": middleware_cost(2 if quick else 4),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        }
    finally:
        os.sched_setaffinity(0, affinity)


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve(argv[1], int(argv[2]))
        return 0
    if argv[:1] == ["probe"]:
        probe(int(argv[1]))
        return 0
    if argv[:1] == ["cpu"]:
        print(f"{middleware_cpu(argv[1]):.3f}")
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overload")
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args(argv)
    results = run(opts.quick)
    (HERE / "overload-results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(render(results))
    print(f"\nload average before {results['load_before']}, after {results['load_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
