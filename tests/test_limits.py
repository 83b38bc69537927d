"""Bounds on requests: deadlines, load shedding, slow bodies, honest drains, startup.

Every server is real (in-process hypercorn on 127.0.0.1:0, or the CLI as a
subprocess). Real-time bounds are generous for a busy 2-core machine; the
measured figures are printed (``-s``) for docs/limits.md.
"""

from __future__ import annotations

import contextlib
import math
import signal
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from trio_launcher import AppStartupError, ConfigError, serve_http
from trio_launcher.testing import running_server

from .bounds_apps import BoundsApp
from .proc import launch, run_cli


def elapsed_since(start: float) -> float:
    return trio.current_time() - start


# --- 2. request deadline -------------------------------------------------------


async def test_request_timeout_answers_504_and_cancels_the_handler_and_its_nursery() -> None:
    app = BoundsApp()
    async with running_server(app, request_timeout=1.0) as server:
        start = trio.current_time()
        response = await server.client.get("/forever")
        took = elapsed_since(start)
        print(f"\nMEASURED|504 after|{took:.3f} s")
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "RequestTimeout"
        assert 1.0 <= took < 1.5
        assert app.ended["/forever"] == ["Cancelled"]
        assert app.child == ["Cancelled"]  # the cancellation reached the handler's nursery
        assert server.handle.in_flight == 0
        assert (await server.client.get("/")).text == "hello"  # the connection lives on


async def test_request_timeout_never_cuts_a_started_response() -> None:
    app = BoundsApp()
    async with running_server(app, request_timeout=0.3) as server:
        with trio.move_on_after(1.2) as waited:
            async with server.client.stream("GET", "/stream") as response:
                assert response.status_code == 200
                chunks = response.aiter_raw()
                assert await chunks.__anext__() == b"started\n"
                await chunks.__anext__()  # would end (cut) if the deadline applied
        assert waited.cancelled_caught  # still streaming at 4x the request timeout


async def test_request_timeout_off_by_default() -> None:
    app = BoundsApp()
    async with running_server(app) as server:
        with trio.move_on_after(0.5) as waited:
            await server.client.get("/hold")
        assert waited.cancelled_caught  # no 504: still waiting


# --- 3. load shedding ----------------------------------------------------------


async def test_limit_concurrency_sheds_excess_at_once_and_health_stays_fast() -> None:
    app = BoundsApp()
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with running_server(app, limit_concurrency=10, health_path="/health") as server:
        statuses: list[int] = []
        shed_times: list[float] = []
        retry_after: set[str | None] = set()

        async def one(client: httpx.AsyncClient) -> None:
            start = trio.current_time()
            response = await client.get("/hold")
            statuses.append(response.status_code)
            if response.status_code == 503:
                shed_times.append(elapsed_since(start))
                retry_after.add(response.headers.get("retry-after"))
                assert response.json()["error"]["type"] == "Overloaded"

        async with (
            httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client,
            trio.open_nursery() as nursery,
        ):
            for _ in range(50):
                nursery.start_soon(one, client)
            with trio.fail_after(10):
                while len(statuses) < 40:
                    await trio.sleep(0.01)
            assert app.running == 10
            health_start = trio.current_time()
            health = await client.get("/health")
            health_took = elapsed_since(health_start)
            assert health.status_code == 200
            body = health.json()
            assert body["in_flight"] == 10
            assert body["oldest_request_s"] > 0
            app.release.set()
        print(f"\nMEASURED|503 latency max|{max(shed_times):.3f} s|health|{health_took:.3f} s")
        assert sorted(statuses) == [200] * 10 + [503] * 40
        assert app.peak == 10
        assert retry_after == {"1"}
        assert max(shed_times) < 1.0  # the 100 ms, with room for a busy machine
        assert health_took < 0.5
        assert server.handle.in_flight == 0
        health = await server.client.get("/health")
        assert (health.json()["in_flight"], health.json()["oldest_request_s"]) == (0, 0.0)


async def test_limit_counts_requests_not_connections() -> None:
    app = BoundsApp()
    async with running_server(app, limit_concurrency=1) as server:
        # Ten idle keep-alive connections hold no request: they do not count.
        streams = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(10)]
        try:
            for _ in range(3):
                assert (await server.client.get("/")).status_code == 200
        finally:
            for stream in streams:
                await stream.aclose()


# --- bad values ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("request_timeout", 0),
        ("request_timeout", -1.0),
        ("request_timeout", math.nan),
        ("body_timeout", 0.0),
        ("body_timeout", "60"),
        ("limit_concurrency", 0),
        ("limit_concurrency", 2.5),
        ("engine_health_interval", 0),
        ("engine_health_timeout", -3),
        ("startup_timeout", 0),
    ],
)
async def test_bad_bound_values_raise_config_error_naming_the_option(
    option: str, value: object
) -> None:
    options: dict[str, Any] = {option: value, "handle_signals": False}
    with pytest.raises(ConfigError, match=option):
        await serve_http(BoundsApp(), None, **options)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--request-timeout", "0"),
        ("--request-timeout", "soon"),
        ("--body-timeout", "-1"),
        ("--limit-concurrency", "0"),
        ("--limit-concurrency", "ten"),
        ("--engine-health-interval", "0"),
        ("--engine-health-timeout", "nan"),
        ("--startup-timeout", "-5"),
    ],
)
def test_bad_flag_values_exit_2_naming_the_flag(flag: str, value: str) -> None:
    result = run_cli(["tests.bounds_apps:app", "--bind", "127.0.0.1:0", flag, value])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert flag in lines[0]


# --- 5. honest drains ------------------------------------------------------------


async def test_drain_past_graceful_timeout_logs_one_error_naming_cut_requests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = BoundsApp()
    config_timeout = 0.3
    from hypercorn.config import Config

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = config_timeout
    async with (
        httpx.AsyncClient(timeout=10) as client,  # outlives the server: cut by the drain
        trio.open_nursery() as outer,
    ):
        async with running_server(app, config) as server:

            async def hold(path: str) -> None:
                with contextlib.suppress(httpx.HTTPError):  # cut by the drain: expected
                    await client.get(server.url + path)

            outer.start_soon(hold, "/hold")
            outer.start_soon(hold, "/forever")
            with trio.fail_after(5):
                while server.handle.in_flight < 2:
                    await trio.sleep(0.01)
        assert server.handle.cut_requests == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert "2 requests still running" in errors[0]
    assert "GET /hold" in errors[0]
    assert "GET /forever" in errors[0]


async def test_drain_within_graceful_timeout_cuts_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = BoundsApp()
    async with running_server(app) as server:
        assert (await server.client.get("/")).status_code == 200
    assert server.handle.cut_requests == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_cli_drain_that_cuts_requests_says_so_and_exits_0() -> None:
    args = ["tests.bounds_apps:app", "--bind", "127.0.0.1:0", "--graceful-timeout", "0.5",
            "--health-path", "/health"]  # fmt: skip
    async with launch(args) as proc, httpx.AsyncClient(base_url=proc.url, timeout=10) as client:

        async def slow() -> None:
            with contextlib.suppress(httpx.HTTPError):
                await client.get("/slow", params={"s": "30"})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            nursery.start_soon(slow)
            with trio.fail_after(10):
                while (await client.get("/health")).json()["in_flight"] < 2:
                    await trio.sleep(0.01)
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
    errors = [line for line in proc.lines if "[ERROR]" in line]
    assert len(errors) == 1, proc.stderr
    assert "2 requests still running" in errors[0]
    assert "GET /slow" in errors[0]


# --- 7. startup --------------------------------------------------------------------


class SlowStartApp(BoundsApp):
    def __init__(self, startup: float, fail: bool = False) -> None:
        super().__init__()
        self.startup = startup
        self.fail = fail

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await trio.sleep(self.startup)
                    if self.fail:
                        await send({"type": "lifespan.startup.failed", "message": "no model"})
                        return
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await super().__call__(scope, receive, send)


async def test_startup_has_no_hidden_limit_and_says_it_is_running(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="trio_launcher")
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(
            lambda task_status: serve_http(
                SlowStartApp(125.0), None, handle_signals=False, task_status=task_status
            )
        )
        assert trio.current_time() >= 125.0  # hypercorn's hidden limit was 60 s
        handle.shutdown()
    lines = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert lines[:3] == [f"app startup still running ({s} s)" for s in (10, 20, 30)]
    assert len(lines) == 12


async def test_startup_timeout_exceeded_is_an_app_startup_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(AppStartupError, match=r"longer than 30 s \(the startup timeout\)"):
        await serve_http(SlowStartApp(3600.0), None, handle_signals=False, startup_timeout=30)
    assert trio.current_time() == pytest.approx(30.0)


def test_cli_startup_timeout_and_failure_exit_1_naming_the_cause() -> None:
    result = run_cli(["tests.test_limits:slow_start_app", "--bind", "127.0.0.1:0",
                      "--startup-timeout", "0.5"])  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "longer than 0.5 s (the startup timeout)" in result.stderr
    result = run_cli(["tests.test_limits:failing_start_app", "--bind", "127.0.0.1:0"])
    assert result.returncode == 1, result.stderr
    assert "lifespan startup failed" in result.stderr
    assert "no model" in result.stderr


slow_start_app = SlowStartApp(30.0)
failing_start_app = SlowStartApp(0.0, fail=True)
