"""This checkout against an earlier one, over HTTP/2 and TLS: ``python -m benchmarks.against``.

Issue 14 asks that HTTP/2 and TLS be no slower than before the HTTP/1.1 work.
Each round starts the ``runner`` variant of ``benchmarks.server`` from this
checkout and from ``git archive REF`` (default: the end of round one), one
after the other, pinned to core 0, and loads it from core 1: HTTP/2 with
h2load (64 connections, prior knowledge), HTTP/1.1 over TLS with wrk (64
connections). Recorded per version: requests a second and the server's CPU
time per request (user + system over the load, from psutil), the figure a
busy machine moves least. Rounds interleave the versions; ratios are medians
of per-round ratios. Servers are ended by PID.

    python -m benchmarks.against [--ref REF] [--rounds N] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from benchmarks.harness import (
    ROOT,
    LoadResult,
    Summary,
    h2load,
    listening,
    paired_ratio,
    pin,
    wrk,
)

ROUND_ONE = "e17d688"  # the last commit of round one (2026-11-25)
KINDS = ("h2", "tls")


@contextmanager
def snapshot(ref: str) -> Iterator[Path]:
    """The tree at ``ref``, unpacked in a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "tree.tar"
        subprocess.run(["git", "archive", "-o", str(archive), ref], cwd=ROOT, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp)


@contextmanager
def certificate() -> Iterator[tuple[str, str]]:
    import trustme

    with tempfile.TemporaryDirectory() as tmp:
        cert = trustme.CA().issue_cert("127.0.0.1")
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        cert.private_key_pem.write_to_path(str(key_path))
        yield str(cert_path), str(key_path)


def measure(tree: Path, kind: str, tls: tuple[str, str], seconds: float) -> dict[str, float]:
    """One server of ``tree``, loaded once to warm up and once to measure."""
    argv = [sys.executable, "-m", "benchmarks.server", "runner", "0"]
    if kind == "tls":
        argv += list(tls)
    proc = subprocess.Popen(
        pin(0, argv),
        cwd=tree,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with listening(proc) as port:
        process = psutil.Process(proc.pid)
        scheme = "https" if kind == "tls" else "http"
        url = f"{scheme}://127.0.0.1:{port}/"

        def load(duration: float) -> LoadResult:
            return h2load(url, 64, duration) if kind == "h2" else wrk(url, 64, duration)

        load(1.0)
        before = process.cpu_times()
        result = load(seconds)
        after = process.cpu_times()
    cpu = (after.user + after.system) - (before.user + before.system)
    requests = result.rps * seconds
    return {
        "rps": result.rps,
        "cpu_us": cpu / requests * 1e6 if requests else float("nan"),
        "p99_ms": result.p99_ms,
        "errors": result.errors,
    }


def run(ref: str, rounds: int, seconds: float) -> dict[str, Any]:
    if not shutil.which("h2load") or not shutil.which("wrk"):
        raise SystemExit("benchmarks.against needs h2load (nghttp2-client) and wrk")
    results: dict[str, Any] = {"ref": ref, "kinds": {}}
    with snapshot(ref) as old, certificate() as tls:
        trees = {"before": old, "now": ROOT}
        for kind in KINDS:
            rows: dict[str, list[dict[str, float]]] = {"before": [], "now": []}
            for i in range(rounds):
                order = ["before", "now"] if i % 2 == 0 else ["now", "before"]
                for name in order:
                    rows[name].append(measure(trees[name], kind, tls, seconds))
            results["kinds"][kind] = rows
    return results


def render(results: dict[str, Any]) -> str:
    lines = [
        "| load | version | req/s median (range) | server CPU us/request | "
        "now / before (req/s, CPU) |",
        "|---|---|---|---|---|",
    ]
    for kind, rows in results["kinds"].items():
        before, now = rows["before"], rows["now"]
        rps_ratio = paired_ratio([r["rps"] for r in now], [r["rps"] for r in before])
        cpu_ratio = paired_ratio([r["cpu_us"] for r in now], [r["cpu_us"] for r in before])
        label = "HTTP/2, h2load -c64" if kind == "h2" else "HTTPS/1.1, wrk -c64"
        for name, data in (("before", before), ("now", now)):
            version = results["ref"] if name == "before" else "this checkout"
            ratios = f"{rps_ratio:.2f}x, {cpu_ratio:.2f}x" if name == "now" else ""
            lines.append(
                f"| {label} | {version} | {Summary.of([r['rps'] for r in data])} | "
                f"{Summary.of([r['cpu_us'] for r in data])} | {ratios} |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.against")
    parser.add_argument("--ref", default=ROUND_ONE, help="the earlier version (a git ref)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    opts = parser.parse_args(argv)
    results = run(opts.ref, opts.rounds, opts.seconds)
    (ROOT / "benchmarks" / "against-results.json").write_text(json.dumps(results, indent=1))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
