"""What metrics and request ids cost: on against off, hello world, side by side.

Three measures, because throughput alone is noise on a busy machine:

* req/s with wrk, both servers loaded at the same time (each by its own wrk)
  so that they share whatever else the machine is doing; ratio paired per
  round;
* server CPU time per request (user + system of the server process over the
  run, divided by the requests wrk counted): what the work costs, less
  sensitive to what else runs on the core;
* the layer alone, in-process: the same ASGI request through the runner's
  middleware with and without ids and metrics, in a loop (microseconds per request);
* user-space instructions per request of the whole server, counted by
  callgrind (``benchmarks/instructions.py``; skipped without valgrind): the
  one measure that does not move with the machine's load.

``python -m benchmarks.observability`` takes the cost apart: each half alone
against plain, and the making of the id alone (``runner-ids`` against
``runner-ids-fixed``, where every request gets one ready-made id).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import trio

from benchmarks import instructions
from benchmarks.harness import Summary, paired_ratio, rows, server, table_head, wrk

VARIANTS = ["runner-plain", "runner-observed"]


def side_by_side(rounds: int, seconds: float) -> dict[str, Any]:
    """The comparison, and the same measurement of plain against plain (the noise floor);
    instructions per request when valgrind is there."""
    results = {
        "observed vs plain": pair(VARIANTS, rounds, seconds),
        "plain vs plain (control)": pair([VARIANTS[0], VARIANTS[0]], rounds, seconds),
        "layer_us": layer_cost(),
    }
    if instructions.available():
        variants = ["runner-plain", "runner-ids", "runner-observed"]
        results["instructions"] = {v: instructions.per_request(v) for v in variants}
    return results


def pair(variants: list[str], rounds: int, seconds: float) -> dict[str, Any]:
    """Two servers at the same time, each under its own wrk, so that both see the
    same machine; ``rounds`` fresh pairs, the start order alternating."""
    rps: list[list[float]] = [[], []]
    cpu_us: list[list[float]] = [[], []]
    for i in range(rounds):
        order = [0, 1] if i % 2 == 0 else [1, 0]
        with server(variants[order[0]]) as first, server(variants[order[1]]) as second:
            started = {order[0]: first, order[1]: second}
            urls = [f"http://127.0.0.1:{started[k][0]}/" for k in (0, 1)]
            procs = [psutil.Process(started[k][1].pid) for k in (0, 1)]
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(wrk, urls, [64, 64], [1.0, 1.0]))  # warm-up
                before = [sum(p.cpu_times()[:2]) for p in procs]
                loads = list(pool.map(wrk, urls, [64, 64], [seconds, seconds]))
                used = [sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before, strict=True)]
            for k in (0, 1):
                rps[k].append(loads[k].rps)
                cpu_us[k].append(1e6 * used[k] / max(1.0, loads[k].rps * seconds))
    return {
        "variants": variants,
        "rounds": rounds,
        "seconds": seconds,
        "rps": [vars(Summary.of(x)) for x in rps],
        "cpu_us_per_request": [vars(Summary.of(x)) for x in cpu_us],
        "rps_ratios": [b / a for a, b in zip(*rps, strict=True)],
        "cpu_ratios": [b / a for a, b in zip(*cpu_us, strict=True)],
        "rps_ratio": paired_ratio(rps[1], rps[0]),
        "cpu_ratio": paired_ratio(cpu_us[1], cpu_us[0]),
    }


def layer_cost(requests: int = 20000, repeats: int = 5) -> dict[str, float]:
    """Microseconds per request of the observability layer alone (best of ``repeats``)."""
    from trio_launcher._asgi import RunnerMiddleware
    from trio_launcher._logging import RequestIds
    from trio_launcher._metrics import Metrics

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]}
        )
        await send({"type": "http.response.body", "body": b"hello"})

    async def send(message: Any) -> None:
        pass

    async def receive() -> Any:
        return {"type": "http.request"}

    def scope() -> dict[str, Any]:
        return {
            "type": "http",
            "method": "GET",
            "path": "/",
            "query_string": b"",
            "headers": [(b"host", b"x"), (b"user-agent", b"wrk")],
            "state": {},
        }

    def ignore(exc: BaseException) -> None:
        pass

    layers = {
        "off": RunnerMiddleware(app, ignore),
        "request ids": RunnerMiddleware(app, ignore, request_ids=RequestIds()),
        "metrics + request ids": RunnerMiddleware(
            app, ignore, metrics=Metrics(), metrics_path="/metrics", request_ids=RequestIds()
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


# The cost taken apart (``python -m benchmarks.observability``): each pair measured the
# same way as ``side_by_side``; the target applies to "observed vs plain" only.
PARTS: dict[str, list[str]] = {
    "control, plain vs plain": ["runner-plain", "runner-plain"],
    "observed vs plain": ["runner-plain", "runner-observed"],
    "request ids vs plain": ["runner-plain", "runner-ids"],
    "metrics vs plain": ["runner-plain", "runner-metrics"],
    "making the id: request ids vs one ready-made id": ["runner-ids-fixed", "runner-ids"],
}


def decompose(rounds: int, seconds: float) -> dict[str, Any]:
    return {name: pair(variants, rounds, seconds) for name, variants in PARTS.items()}


def render_parts(results: dict[str, Any]) -> list[str]:
    first = next(iter(results.values()))
    out = table_head(
        f"hello HTTP/1.1, wrk -c64, {first['rounds']} rounds of {first['seconds']:g} s, "
        "both servers at once",
        "A",
        "B",
        "req/s B / A (per-round range)",
        "server CPU per request B / A (range)",
    )
    for name, r in results.items():
        a, b = r["variants"]
        out.append(
            f"| {name} | {a} {_fmt(r['rps'][0])} | {b} {_fmt(r['rps'][1])} | "
            f"{r['rps_ratio']:.3f} ({min(r['rps_ratios']):.2f}-{max(r['rps_ratios']):.2f}) | "
            f"{r['cpu_ratio']:.3f} ({min(r['cpu_ratios']):.2f}-{max(r['cpu_ratios']):.2f}) |"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.observability",
        description="what request ids and metrics cost, taken apart (~10 minutes)",
    )
    parser.add_argument("--rounds", type=int, default=10, help="pairs per comparison")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of a round")
    args = parser.parse_args(argv)
    print("\n".join(render_parts(decompose(args.rounds, args.seconds))))


def render(results: dict[str, Any]) -> list[str]:
    first = results["observed vs plain"]
    out = table_head(
        f"observability, hello HTTP/1.1 (wrk -c64, {first['rounds']} rounds of "
        f"{first['seconds']:g} s, both servers at once)",
        "A",
        "B",
        "B / A median (per-round range)",
        "target",
    )
    for name, r in rows(results, "layer_us", "instructions"):
        a, b = r["variants"]
        control = a == b
        ok = r["rps_ratio"] >= 0.97
        target = "" if control else f">= 0.97: {'met' if ok else 'MISSED'}"
        out.append(
            f"| {name}: req/s | {a} {_fmt(r['rps'][0])} | {b} {_fmt(r['rps'][1])} | "
            f"{r['rps_ratio']:.3f} ({min(r['rps_ratios']):.2f}-{max(r['rps_ratios']):.2f}) "
            f"| {target} |"
        )
        ok = r["cpu_ratio"] <= 1.03
        target = "" if control else f"<= 1.03: {'met' if ok else 'MISSED'}"
        out.append(
            f"| {name}: server CPU us per request | {_fmt(r['cpu_us_per_request'][0])} | "
            f"{_fmt(r['cpu_us_per_request'][1])} | {r['cpu_ratio']:.3f} "
            f"({min(r['cpu_ratios']):.2f}-{max(r['cpu_ratios']):.2f}) | {target} |"
        )
    counted = results.get("instructions")
    if counted:
        plain = counted["runner-plain"]
        for variant, count in counted.items():
            if variant == "runner-plain":
                continue
            ratio = count / plain
            verdict = "met" if ratio <= 1.03 else "MISSED"
            out.append(
                f"| user-space instructions per request (callgrind, lockstep): {variant} | "
                f"runner-plain {plain:,.0f} | {variant} {count:,.0f} (+{count - plain:,.0f}) | "
                f"{ratio:.3f} | <= 1.03 (an upper bound on CPU): {verdict} |"
            )
    plain_cpu = first["cpu_us_per_request"][0]["median"]
    for name, us in results["layer_us"].items():
        share = 100 * us / plain_cpu
        out.append(
            f"| the layer alone, in-process: {name} | | +{us:.2f} us CPU per request | "
            f"{share:.1f} % of a plain request's CPU in this run | |"
        )
    return out


def _fmt(summary: dict[str, float]) -> str:
    return f"{summary['median']:.4g} ({summary['low']:.4g}-{summary['high']:.4g})"


if __name__ == "__main__":
    main()
