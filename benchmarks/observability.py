"""What metrics and request ids cost: on against off, hello world, side by side.

Three measures, because throughput alone is noise on a busy machine:

* req/s with wrk, both servers loaded at the same time (each by its own wrk)
  so that they share whatever else the machine is doing; ratio paired per
  round;
* server CPU time per request (user + system of the server process over the
  run, divided by the requests wrk counted): what the work costs, less
  sensitive to what else runs on the core;
* the layer alone, in-process: the same ASGI request through the runner's
  observability layer and without it, in a loop (microseconds per request).
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import trio

from benchmarks.harness import Summary, paired_ratio, server, wrk

VARIANTS = ["runner-plain", "runner-observed"]


def side_by_side(rounds: int, seconds: float) -> dict[str, Any]:
    """Both servers at the same time, each under its own wrk, so that both see the
    same machine; ``rounds`` fresh pairs."""
    rps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_us: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        with server(VARIANTS[0]) as (port_a, proc_a), server(VARIANTS[1]) as (port_b, proc_b):
            urls = [f"http://127.0.0.1:{port}/" for port in (port_a, port_b)]
            procs = [psutil.Process(p.pid) for p in (proc_a, proc_b)]
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(wrk, urls, [64, 64], [1.0, 1.0]))  # warm-up
                before = [sum(p.cpu_times()[:2]) for p in procs]
                loads = list(pool.map(wrk, urls, [64, 64], [seconds, seconds]))
                used = [sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before, strict=True)]
            for i, v in enumerate(VARIANTS):
                rps[v].append(loads[i].rps)
                cpu_us[v].append(1e6 * used[i] / max(1.0, loads[i].rps * seconds))
    base, other = VARIANTS
    return {
        "variants": VARIANTS,
        "rounds": rounds,
        "seconds": seconds,
        "rps": {v: vars(Summary.of(x)) for v, x in rps.items()},
        "cpu_us_per_request": {v: vars(Summary.of(x)) for v, x in cpu_us.items()},
        "rps_ratio": paired_ratio(rps[other], rps[base]),
        "cpu_ratio": paired_ratio(cpu_us[other], cpu_us[base]),
        "layer_us": layer_cost(),
    }


def layer_cost(requests: int = 20000, repeats: int = 5) -> dict[str, float]:
    """Microseconds per request of the observability layer alone (best of ``repeats``)."""
    from trio_launcher._metrics import Metrics, Observed

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"5")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"hello"})

    async def send(message: Any) -> None:
        pass

    async def receive() -> Any:
        return {"type": "http.request"}

    def scope() -> dict[str, Any]:
        return {"type": "http", "method": "GET", "path": "/", "query_string": b"",
                "headers": [(b"host", b"x"), (b"user-agent", b"wrk")], "state": {}}  # fmt: skip

    layers = {
        "off": app,
        "request ids": Observed(app, None, metrics_path=None, request_ids=True),
        "metrics + request ids": Observed(
            app, Metrics(), metrics_path="/metrics", request_ids=True
        ),
    }

    async def run(layer: Any) -> float:
        start = time.process_time()
        for _ in range(requests):
            await layer(scope(), receive, send)
        return 1e6 * (time.process_time() - start) / requests

    async def main() -> dict[str, float]:
        # Interleaved, best of ``repeats`` each: the machine is shared.
        best = dict.fromkeys(layers, float("inf"))
        for _ in range(repeats):
            for name, layer in layers.items():
                best[name] = min(best[name], await run(layer))
        return best

    times = trio.run(main)
    return {name: times[name] - times["off"] for name in times if name != "off"}


def render(r: dict[str, Any]) -> list[str]:
    base, other = r["variants"]
    out = [
        f"| observability, hello HTTP/1.1 (wrk, {r['rounds']} rounds of "
        f"{r['seconds']:g} s, both at once) | runner-plain (off) | "
        "runner-observed (metrics + ids) | observed / plain | target |",
        "|---|---|---|---|---|",
    ]
    ok = r["rps_ratio"] >= 0.97
    out.append(
        f"| req/s median (range) | {_fmt(r['rps'][base])} | {_fmt(r['rps'][other])} | "
        f"{r['rps_ratio']:.3f} | >= 0.97: {'met' if ok else 'MISSED'} |"
    )
    ok = r["cpu_ratio"] <= 1.03
    out.append(
        f"| server CPU us per request | {_fmt(r['cpu_us_per_request'][base])} | "
        f"{_fmt(r['cpu_us_per_request'][other])} | {r['cpu_ratio']:.3f} | "
        f"<= 1.03: {'met' if ok else 'MISSED'} |"
    )
    plain_cpu = statistics.median([r["cpu_us_per_request"][base]["median"]])
    for name, us in r["layer_us"].items():
        out.append(f"| the layer alone, in-process: {name} | | +{us:.2f} us | "
                   f"{100 * us / plain_cpu:.1f} % of a plain request's CPU | |")  # fmt: skip
    return out


def _fmt(summary: dict[str, float]) -> str:
    return f"{summary['median']:.4g} ({summary['low']:.4g}-{summary['high']:.4g})"
