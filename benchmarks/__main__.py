"""Run the benchmarks: ``python -m benchmarks [--quick] [--only SECTION ...]``.

Sections: throughput, http1, quart, engine, sigterm, certs, cost, workers, overload,
observability, rolling (``benchmarks/overload.py``: 2000 clients against limit_concurrency,
beside uvicorn; ``benchmarks/observability.py``: metrics and request ids on and off;
``benchmarks/rolling.py``: rolling restarts and recycling under load). Results go to
``benchmarks/results.json`` and a markdown report to stdout and
``benchmarks/last-run.md``; BENCHMARKS.md records a run of it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    PINNED,
    LoadResult,
    Summary,
    h2load,
    paired_ratio,
    python_client,
    server,
    wrk,
)

HERE = Path(__file__).resolve().parent
SECTIONS = (
    "throughput",
    "http1",
    "quart",
    "engine",
    "sigterm",
    "certs",
    "cost",
    "workers",
    "overload",
    "observability",
    "rolling",
)
HTTP1_VARIANTS = ["uvicorn", "hypercorn", "runner-h11", "runner", "uvicorn-fast"]
HTTP1_TARGETS = {"hello": 1.5, "10-chunk stream": 1.2}  # x uvicorn (h11), issue 14.5


def load(kind: str, port: int, path: str, seconds: float, tls: bool) -> LoadResult:
    scheme = "https" if tls else "http"
    url = f"{scheme}://127.0.0.1:{port}{path}"
    if kind == "h2":
        return h2load(url, 64, seconds)
    if shutil.which("wrk"):
        return wrk(url, 64, seconds)
    if tls:
        raise RuntimeError("the Python fallback client does not do TLS")
    return python_client("127.0.0.1", port, path, 64, seconds)


def compare(
    variants: list[str],
    kind: str,
    path: str,
    rounds: int,
    seconds: float,
    tls: tuple[str, str] | None,
) -> dict[str, Any]:
    """Interleaved rounds (the order rotates); each run on a fresh server.

    Ratios are paired per round against the first variant (the baseline).
    """
    runs: dict[str, list[LoadResult]] = {v: [] for v in variants}
    for i in range(rounds):
        order = variants[i % len(variants) :] + variants[: i % len(variants)]
        for variant in order:
            with server(variant, tls) as (port, _):
                if kind != "h2":
                    # No h2 warm-up: bare hypercorn's trio worker dies when an h2load
                    # run ends (BusyResourceError from a vanishing client), so every
                    # h2 run gets a fresh server instead.
                    load(kind, port, path, min(1.0, seconds), tls is not None)
                runs[variant].append(load(kind, port, path, seconds, tls is not None))
    base = variants[0]
    rps = {v: [r.rps for r in rs] for v, rs in runs.items()}
    p99 = {v: [r.p99_ms for r in rs] for v, rs in runs.items()}
    return {
        "variants": variants,
        "rps": {v: vars(Summary.of(x)) for v, x in rps.items()},
        "p50_ms": {v: vars(Summary.of([r.p50_ms for r in rs])) for v, rs in runs.items()},
        "p99_ms": {v: vars(Summary.of(x)) for v, x in p99.items()},
        "errors": {v: sum(r.errors for r in rs) for v, rs in runs.items()},
        "rps_ratio": {v: paired_ratio(rps[v], rps[base]) for v in variants[1:]},
        "p99_ratio": {v: paired_ratio(p99[v], p99[base]) for v in variants[1:]},
        "tool": runs[base][0].tool,
    }


def throughput(rounds: int, seconds: float) -> dict[str, Any]:
    from trio_launcher.testing import TLSFiles

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tls = TLSFiles(Path(tmp))
        files = (str(tls.cert_file), str(tls.key_file))
        workloads = [
            ("hello, HTTP/1.1", "h1", "/", None),
            ("10-chunk stream, HTTP/1.1", "h1", "/stream", None),
            ("64 KiB body, HTTP/1.1", "h1", "/body", None),
            ("hello, HTTP/1.1 + TLS", "h1", "/", files),
            ("hello, HTTP/2 (h2c)", "h2", "/", None),
        ]
        for name, kind, path, tls_files in workloads:
            if kind == "h2" and not shutil.which("h2load"):
                results[name] = {"skipped": "h2load is not installed"}
                continue
            print(f"  {name} ...", file=sys.stderr, flush=True)
            results[name] = compare(
                ["hypercorn", "runner-stock", "runner"], kind, path, rounds, seconds, tls_files
            )
    return results


def http1(rounds: int, seconds: float) -> dict[str, Any]:
    """Our HTTP/1.1 (httptools) side by side with uvicorn (h11, and httptools + uvloop),
    bare hypercorn-trio and the runner on hypercorn's h11; uvicorn (h11) is the baseline."""
    import importlib.util

    if importlib.util.find_spec("uvicorn") is None:
        return {"skipped": "uvicorn is not installed (pip install -e .[bench])"}
    return {
        name: compare(HTTP1_VARIANTS, "h1", path, rounds, seconds, None)
        for name, path in (("hello", "/"), ("10-chunk stream", "/stream"))
    }


def quart(rounds: int, seconds: float) -> dict[str, Any]:
    return {
        "Quart-Trio hello, HTTP/1.1": compare(
            ["quart-own", "quart-runner"], "h1", "/", rounds, seconds, None
        )
    }


def workers(rounds: int, seconds: float) -> dict[str, Any]:
    """``--workers 2`` against one process, hello world over HTTP/1.1 (nothing pinned:
    the workers need both cores, and so does wrk)."""

    from benchmarks.harness import bound_port, spawn, stop

    results: dict[str, list[float]] = {"1 process": [], "2 workers": []}
    for i in range(rounds):
        for name in sorted(results, reverse=i % 2 == 1):
            count = "2" if name == "2 workers" else "1"
            argv = [
                sys.executable,
                "-m",
                "trio_launcher",
                "benchmarks.apps:app",
                "--workers",
                count,
                "--bind",
                "127.0.0.1:0",
                "--log-level",
                "warning",
            ]
            proc = spawn(argv)
            try:
                port = bound_port(proc)  # (the parent binds; its workers serve that socket)
                url = f"http://127.0.0.1:{port}/"
                wrk_unpinned(url, 1.0)
                results[name].append(wrk_unpinned(url, seconds))
            finally:
                stop(proc)
    return {name: vars(Summary.of(values)) for name, values in results.items()}


def wrk_unpinned(url: str, seconds: float) -> float:
    import re
    import subprocess

    out = subprocess.run(
        ["wrk", "-t1", "-c64", f"-d{seconds:g}s", url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(match.group(1)) if match else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="short runs (about 3 minutes)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    opts = parser.parse_args(argv)
    logging.getLogger("trio_launcher").setLevel(logging.CRITICAL)  # measured, not logged
    rounds, seconds = (3, 3.0) if opts.quick else (5, 6.0)
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "pinned": PINNED,
        },
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    from benchmarks import cost, lifecycle, rolling

    for section in opts.only:
        print(f"[{section}]", file=sys.stderr, flush=True)
        if section == "throughput":
            results[section] = throughput(rounds, seconds)
        elif section == "http1":
            results[section] = http1(rounds, seconds)
        elif section == "quart":
            results[section] = quart(rounds, seconds)
        elif section == "engine":
            runs = {"wait_dead()": 20, "poll 0.1 s": 20, "poll 5 s": 1 if opts.quick else 4}
            results[section] = lifecycle.engine_death(runs)
        elif section == "sigterm":
            results[section] = lifecycle.sigterm_to_exit(3 if opts.quick else 7)
        elif section == "certs":
            results[section] = lifecycle.cert_change(3 if opts.quick else 7)
        elif section == "workers":
            results[section] = workers(rounds, seconds)
        elif section == "overload":
            from benchmarks import overload

            results[section] = overload.run(opts.quick)
        elif section == "observability":
            from benchmarks import observability

            results[section] = observability.side_by_side(2 * rounds, seconds)
        elif section == "rolling":
            results[section] = rolling.run(10.0 if opts.quick else 20.0)
        elif section == "cost":
            variants = ("runner", "hypercorn")
            n = 3 if opts.quick else 5
            results[section] = {
                "cold start s": {v: [cost.cold_start(v) for _ in range(n)] for v in variants},
                "idle RSS MiB": {v: [cost.idle_rss(v) for _ in range(n)] for v in variants},
                "idle CPU %": cost.idle_cpu(10 if opts.quick else 60),
            }
    results_file = HERE / "results.json"
    if set(opts.only) != set(SECTIONS) and results_file.exists():
        # A partial run updates its sections of the last full run.
        merged = json.loads(results_file.read_text())
        merged.update({k: v for k, v in results.items() if k in SECTIONS})
        merged.setdefault("partial_runs", []).append(
            {"date": results["date"], "command": results["command"]}
        )
        results = merged
    results_file.write_text(json.dumps(results, indent=2))
    report = render(results)
    (HERE / "last-run.md").write_text(report)
    print(report)
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _fmt(summary: dict[str, float], unit: str = "") -> str:
    return f"{summary['median']:.4g}{unit} ({summary['low']:.4g}-{summary['high']:.4g})"


def _ms(values: list[float]) -> str:
    good = [v * 1000 for v in values if not math.isnan(v)]
    if not good:
        return "n/a"
    return f"{statistics.median(good):.1f} ms (max {max(good):.1f}, n={len(good)})"


def _target(section: str, name: str, variant: str, rps: float, p99: float) -> str:
    """The issue targets: no cost for the runner; 2x / 1.5x for the lean transport."""
    if variant == "runner" and section == "throughput":
        if "64 KiB" in name:
            return "(no lean target)"
        goal = 1.5 if ("TLS" in name or "HTTP/2" in name) else 2.0
        ok = rps >= goal and p99 <= 1.0
        return f">= {goal}x, p99 no worse: {'met' if ok else 'MISSED'}"
    ok = rps >= 0.98 and p99 <= 1.05
    return f">= 0.98x, p99 <= 1.05x: {'met' if ok else 'MISSED'}"


def _render_http1(section: dict[str, Any]) -> list[str]:
    if "skipped" in section:
        return [f"HTTP/1.1 protocols: skipped ({section['skipped']})", ""]
    out = [
        "| HTTP/1.1, wrk -c64 | variant | req/s median (range) | x uvicorn (h11) "
        "| p50 ms | p99 ms | p99 / p50 | errors | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in section.items():
        for v in r["variants"]:
            p50, p99 = r["p50_ms"][v]["median"], r["p99_ms"][v]["median"]
            tail = p99 / p50 if p50 else math.nan
            ratio = r["rps_ratio"].get(v, 1.0)
            target = ""
            if v == "runner":
                goal = HTTP1_TARGETS[name]
                target = (
                    f">= {goal}x: {'met' if ratio >= goal else 'MISSED'}; "
                    f"p99 <= 3x p50: {'met' if tail <= 3 else 'MISSED'}"
                )
            out.append(
                f"| {name} | {v} | {_fmt(r['rps'][v])} | {ratio:.2f} | {p50:.3g} | "
                f"{p99:.3g} | {tail:.2f} | {r['errors'][v]} | {target} |"
            )
    out.append("")
    return out


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        f"Run {results['date']} on {m['cpus']} x {m['cpu']}, Linux {m['kernel']}, "
        f"Python {m['python']}, server/load pinned to separate cores: {m['pinned']}.",
        f"Command: `{results['command']}`",
    ]
    for partial in results.get("partial_runs", []):
        out.append(f"Sections re-run {partial['date']}: `{partial['command']}`")
    out.append("")
    for section in ("throughput", "quart"):
        if section not in results:
            continue
        out += [
            "| workload | variant | req/s median (range) | x baseline | p99 ms median (range) "
            "| p99 x baseline | errors | target |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in results[section].items():
            if "skipped" in r:
                out.append(f"| {name} | skipped: {r['skipped']} |||||||")
                continue
            base = r["variants"][0]
            for v in r["variants"]:
                if v == base:
                    ratio = p99r = "1 (baseline)"
                    target = ""
                else:
                    ratio, p99r = f"{r['rps_ratio'][v]:.2f}", f"{r['p99_ratio'][v]:.2f}"
                    target = _target(section, name, v, r["rps_ratio"][v], r["p99_ratio"][v])
                out.append(
                    f"| {name} ({r['tool']}) | {v} | {_fmt(r['rps'][v])} | {ratio} | "
                    f"{_fmt(r['p99_ms'][v])} | {p99r} | {r['errors'][v]} | {target} |"
                )
        out.append("")
    if "http1" in results:
        out += _render_http1(results["http1"])
    if "observability" in results:
        from benchmarks import observability

        out += [*observability.render(results["observability"]), ""]
    if "engine" in results:
        out += [
            "| engine death -> listener closed | median (max, runs) | target |",
            "|---|---|---|",
        ]
        targets = {"wait_dead()": 0.020, "poll 0.1 s": 0.1 + 0.020, "poll 5 s": 5 + 0.020}
        for name, values in results["engine"].items():
            worst = max(values)
            ok = "met" if worst <= targets[name] else "MISSED"
            out.append(f"| {name} | {_ms(values)} | <= {targets[name] * 1000:.0f} ms: {ok} |")
        out.append("| vLLM's design (fixed 5 s poll) | 2500 ms average, 5000 ms worst | |")
        out.append("")
    if "sigterm" in results:
        out += ["| SIGTERM -> process exit | median (max, runs) |", "|---|---|"]
        out += [f"| {name} | {_ms(values)} |" for name, values in results["sigterm"].items()]
        out.append("")
    if "certs" in results:
        out += [
            "| certificate on disk -> first handshake presenting it (interval 1 s) | "
            "median (max, runs) | target |",
            "|---|---|---|",
        ]
        for name, values in results["certs"].items():
            limit = 0.050 if name == "SIGHUP" else 1.050
            ok = "met" if max(values) <= limit else "MISSED"
            out.append(f"| {name} | {_ms(values)} | <= {limit * 1000:.0f} ms: {ok} |")
        out.append("")
    if "workers" in results:
        w = results["workers"]
        out += [
            "| workers (hello, HTTP/1.1, wrk 64 connections, nothing pinned) | req/s |",
            "|---|---|",
        ]
        out += [f"| {name} | {_fmt(summary)} |" for name, summary in w.items()]
        out.append("")
    if "rolling" in results:
        from benchmarks import rolling

        out += [*rolling.render(results["rolling"]), ""]
    if "cost" in results:
        c = results["cost"]
        out += ["| cost of being there | runner | bare hypercorn |", "|---|---|---|"]
        cs = c["cold start s"]
        out.append(
            f"| cold start (spawn -> first 200) | {_ms(cs['runner'])} | {_ms(cs['hypercorn'])} |"
        )
        rss = c["idle RSS MiB"]
        out.append(
            f"| idle RSS | {statistics.median(rss['runner']):.1f} MiB | "
            f"{statistics.median(rss['hypercorn']):.1f} MiB |"
        )
        cpu = c["idle CPU %"]
        names = list(cpu)
        out.append(f"| idle CPU, % of one core | {cpu[names[0]]:.3f} % | {cpu[names[1]]:.3f} % |")
        out.append("")
    if "overload" in results:
        from benchmarks import overload

        out += [overload.render(results["overload"]), ""]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
