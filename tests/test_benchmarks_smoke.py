"""The benchmark harness works: its fallback client against a real server (no timing)."""

from __future__ import annotations

import trio

from benchmarks import apps
from benchmarks.__main__ import render
from benchmarks.harness import paired_ratio, percentile, python_client
from trio_launcher.testing import running_server


async def test_fallback_client_drives_a_real_server() -> None:
    async with running_server(apps.app) as server:
        for path in ("/", "/stream", "/body"):
            result = await trio.to_thread.run_sync(
                python_client, "127.0.0.1", server.port, path, 4, 0.3
            )
            assert result.errors == 0
            assert result.rps > 0
            assert result.p50_ms <= result.p99_ms


def test_statistics_and_report() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) in (2.0, 3.0)
    assert paired_ratio([2, 4, 6], [1, 2, 3]) == 2
    report = render(
        {
            "machine": {"cpus": 2, "cpu": "x", "kernel": "k", "python": "3", "pinned": True},
            "date": "d",
            "command": "python -m benchmarks",
            "engine": {"wait_dead()": [0.001], "poll 0.1 s": [0.05], "poll 5 s": [2.0]},
            "sigterm": {"idle": [0.03]},
        }
    )
    assert "| wait_dead() | 1.0 ms (max 1.0, n=1) | <= 20 ms: met |" in report
    assert "| idle | 30.0 ms" in report


async def test_rolling_benchmark_client_checks_bodies() -> None:
    from benchmarks import rolling

    async with running_server(apps.app) as server:
        result = await trio.to_thread.run_sync(rolling.python_client, server.port, 0.3, 4)
    assert result["failures"] == 0, result
    assert result["requests"] > 0
    figures = {**result, "rps": 1, "workers_replaced": 0, "exit_code": 0}
    rows = rolling.render({"seconds": 1, "x / trio-launcher / python": figures})
    assert rows[2].startswith("| x | trio-launcher | Python")
