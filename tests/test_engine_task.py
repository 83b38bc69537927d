"""serve_http(engine_task=...): the engine as a task of the runner's nursery.

Start: bind, accept (503), start the engine task, the app's lifespan startup,
serve. Stop: drain while the engine runs, lifespan shutdown, cancel the
engine task. Its crash or return is the engine's death: drain, EngineDeadError
(exit 3). In-process tests record the order of events; process tests check
exit codes and log lines.
"""

from __future__ import annotations

import logging
import re
import signal
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from examples import engine_task as example
from examples.engine_task import engine_task as example_engine_task
from trio_launcher import (
    AppStartupError,
    BindError,
    EngineDeadError,
    OptionError,
    ServerHandle,
    StopReason,
    current_engine,
    serve_http,
)
from trio_launcher._engine_task import run_engine_task
from trio_launcher._hypercorn import Config
from trio_launcher._options import Transport
from trio_launcher.testing import FakeEngine, TLSFiles, running_server

from . import engine_tasks
from .engine_tasks import App, recorded_engine
from .proc import LOOPBACK, launch, run_cli

ENGINE = "tests.engine_tasks"


@pytest.fixture(autouse=True)
def _fresh_events() -> None:
    engine_tasks.events.clear()


# --- run_engine_task on its own, in logical time --------------------------------


class Ends:
    """One ``run_engine_task`` (10 s cleanup deadline): its stop and cut events, and
    what its callbacks reported."""

    def __init__(self) -> None:
        self.ends: list[BaseException | None] = []
        self.stuck_at: list[float] = []
        self.stop = trio.Event()
        self.cut = trio.Event()

    async def start(self, nursery: trio.Nursery, task: Callable[..., Awaitable[object]]) -> Any:
        """Start ``task`` under ``run_engine_task`` in ``nursery``; its started() value."""
        return await nursery.start(
            partial(
                run_engine_task, task, self.stop, 10.0, self.on_end, self.on_stuck, cut=self.cut
            )
        )

    def on_end(self, error: BaseException | None) -> None:
        self.ends.append(error)

    def on_stuck(self) -> None:
        self.stuck_at.append(trio.current_time())


async def crash_after_start(
    *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started("the engine")
    await trio.sleep(3)
    raise ValueError("boom")


async def test_crash_after_start_is_reported_not_raised(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ends = Ends()
    async with trio.open_nursery() as nursery:
        value = await ends.start(nursery, crash_after_start)
        assert value == "the engine"
    assert len(ends.ends) == 1
    assert isinstance(ends.ends[0], ValueError)
    assert trio.current_time() == 3


async def test_return_after_start_is_a_death_with_no_error() -> None:
    ends = Ends()
    async with trio.open_nursery() as nursery:
        await ends.start(nursery, engine_tasks.returns_at_once)
    assert ends.ends == [None]


async def test_crash_before_start_raises_the_tasks_own_exception() -> None:
    ends = Ends()
    async with trio.open_nursery() as nursery:
        with pytest.raises(OSError, match="model file missing"):
            await ends.start(nursery, engine_tasks.crashes_while_loading)
    assert ends.ends == []


async def test_stop_cancels_and_a_cut_cleanup_logs_error(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    ends = Ends()
    async with trio.open_nursery() as nursery:
        await ends.start(nursery, engine_tasks.cut_cleanup)
        await trio.sleep(5)
        ends.stop.set()
    assert trio.current_time() == 15  # cut at the deadline, not later
    assert ends.ends == []  # a stop is not a death
    assert ends.stuck_at == []
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["the engine task's cleanup did not finish within 10 s: it was cut short"]


async def unbounded_cleanup(
    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.sleep(100)


async def test_a_task_that_ignores_cancellation_is_reported_stuck(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    ends = Ends()
    async with trio.open_nursery() as nursery:
        await ends.start(nursery, unbounded_cleanup)
        ends.stop.set()
    assert ends.stuck_at == [11.0]  # the deadline plus the grace for a cut cleanup
    assert "it ignores cancellation" in caplog.text


@pytest.mark.parametrize("second_signal", [False, True])
async def test_outside_cancellation_leaves_a_bounded_cleanup_unless_cut(
    autojump_clock: trio.testing.MockClock, second_signal: bool
) -> None:
    ends = Ends()
    with trio.move_on_after(5):
        async with trio.open_nursery() as nursery:
            await ends.start(nursery, engine_tasks.cut_cleanup)
            if second_signal:
                ends.cut.set()
            await trio.sleep_forever()
    # A second signal ends the cleanup at once; else it has its 10 s.
    assert trio.current_time() == (5 if second_signal else 15)
    assert ends.ends == []
    assert ends.stuck_at == []


async def test_second_signal_cuts_a_cleanup_in_progress(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ends = Ends()
    async with trio.open_nursery() as nursery:
        await ends.start(nursery, engine_tasks.cut_cleanup)
        ends.stop.set()
        await trio.sleep(3)  # the cleanup runs...
        ends.cut.set()  # ...a second signal
        nursery.cancel_scope.cancel()
    assert trio.current_time() == 3


async def test_start_progress_is_logged_every_10_s(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="trio_launcher")
    ends = Ends()
    slow = partial(example_engine_task, load_seconds=25)
    async with trio.open_nursery() as nursery:
        await ends.start(nursery, slow)
        ends.stop.set()
    messages = [r.getMessage() for r in caplog.records if r.name == "trio_launcher"]
    assert [m for m in messages if "still starting" in m] == [
        "the engine task is still starting (10 s)",
        "the engine task is still starting (20 s)",
    ]
    assert "the engine task started in 25.0 s" in messages


async def test_cancellation_is_never_swallowed(autojump_clock: trio.testing.MockClock) -> None:
    ends = Ends()
    with trio.move_on_after(4) as scope:
        async with trio.open_nursery() as nursery:
            await ends.start(nursery, crash_after_start)
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert isinstance(ends.ends[0], ValueError)  # died at 3 s, before the cancel


# --- serve_http with a real server --------------------------------------------------


async def get_ok(client: httpx.AsyncClient, path: str) -> httpx.Response:
    response = await client.get(path)
    assert response.status_code == 200, response.text
    return response


async def test_engine_starts_before_the_app_and_stops_after_it() -> None:
    async with running_server(App(), engine_task=recorded_engine, health_path="/health") as server:
        assert (await get_ok(server.client, "/ask?q=hi")).text == "HI"
        health = await get_ok(server.client, "/health")
        assert health.json() == {
            "status": "serving",
            "engine": "alive",
            "in_flight": 0,
            "oldest_request_s": 0.0,
        }
        assert engine_tasks.events == [
            "engine started",
            "lifespan startup (engine running: True)",
            "answered /ask",
        ]
    assert engine_tasks.events[3:] == [
        "lifespan shutdown (engine running: True)",
        "engine cleanup done",
    ]


async def test_shutdown_drains_while_the_engine_runs_then_stops_it() -> None:
    app = App()
    result: dict[str, httpx.Response] = {}
    async with running_server(app, engine_task=recorded_engine) as server:

        async def slow_ask() -> None:
            result["r"] = await server.client.get("/slow-ask", params={"s": "0.5", "q": "late"})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_ask)
            await app.slow_started.wait()
            server.handle.shutdown()
    assert result["r"].status_code == 200
    assert result["r"].text == "LATE"
    assert engine_tasks.events[-3:] == [
        "answered /slow-ask",
        "lifespan shutdown (engine running: True)",
        "engine cleanup done",
    ]


async def test_engine_crash_drains_in_flight_and_raises_from_the_tasks_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App()
    results: dict[str, httpx.Response] = {}
    with pytest.raises(EngineDeadError, match="RuntimeError: the model crashed") as info:
        async with running_server(app, engine_task=recorded_engine) as server:

            async def call(name: str, path: str) -> None:
                results[name] = await server.client.get(path)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "slow", "/slow?s=0.5")  # needs no engine
                nursery.start_soon(call, "wait-ask", "/wait-ask?q=x")  # needs it later
                await app.slow_started.wait()
                await app.waiting.wait()
                await call("crash", "/ask?q=crash")
                app.release.set()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert results["crash"].status_code == 500
    assert results["crash"].json()["error"]["type"] == "EngineDeadError"
    assert results["slow"].status_code == 200
    assert results["slow"].text == "slept"
    assert results["wait-ask"].status_code == 500
    assert results["wait-ask"].json()["error"]["type"] == "EngineDeadError"
    tracebacks = [r for r in caplog.records if r.exc_info and r.name == "trio_launcher"]
    assert len(tracebacks) == 1
    assert isinstance(tracebacks[0].exc_info[1], RuntimeError)  # type: ignore[index]
    # A crashed task ends at once (its cleanup ran); the drain and the app's
    # lifespan shutdown follow.
    assert engine_tasks.events.count("engine cleanup done") == 1
    assert "answered /slow" in engine_tasks.events
    assert engine_tasks.events[-1] == "lifespan shutdown (engine running: False)"


async def test_engine_returning_is_a_death() -> None:
    with pytest.raises(EngineDeadError, match="the engine task returned"):
        async with running_server(App(), engine_task=engine_tasks.returns_at_once):
            pass


async def test_engine_crashing_while_loading_is_a_death_and_the_app_never_starts() -> None:
    bound = socket.socket()
    bound.bind(("127.0.0.1", 0))
    with pytest.raises(EngineDeadError, match="into its start: model file missing") as info:
        await serve_http(
            App(), engine_task=engine_tasks.crashes_while_loading, sock=bound, handle_signals=False
        )
    assert isinstance(info.value.__cause__, OSError)
    assert engine_tasks.events == []


def listening() -> socket.socket:
    """A socket listening on 127.0.0.1, port 0: clients can connect before the runner runs."""
    bound = socket.socket()
    bound.bind(("127.0.0.1", 0))
    bound.listen()
    return bound


class Starting:
    """``serve``, a ``serve_http`` partial, started in ``nursery`` in the background: its
    start (the engine task's) may take as long as the test wants."""

    def __init__(self, nursery: trio.Nursery, serve: Callable[..., Awaitable[None]]) -> None:
        self._ready = trio.Event()
        self._handle: ServerHandle | None = None
        self._nursery = nursery
        nursery.start_soon(self._start, serve)

    async def _start(self, serve: Callable[..., Awaitable[None]]) -> None:
        handle = await self._nursery.start(serve)
        assert isinstance(handle, ServerHandle)
        self._handle = handle
        self._ready.set()

    async def handle(self) -> ServerHandle:
        """Wait (10 s at most) until the server has started; its handle."""
        with trio.fail_after(10):
            await self._ready.wait()
        assert self._handle is not None
        return self._handle


@pytest.mark.parametrize("transport", ["lean", "hypercorn"])
async def test_503_while_the_engine_starts_then_serving(transport: Transport) -> None:
    """Port bound at once; health 503 "starting", other requests 503 + Retry-After."""
    release = trio.Event()

    async def gated(*, task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
        await release.wait()
        await engine_tasks.recorded_engine(task_status=task_status)

    bound = listening()
    url = f"http://127.0.0.1:{bound.getsockname()[1]}"
    async with trio.open_nursery() as nursery, httpx.AsyncClient(base_url=url) as client:
        starting = Starting(
            nursery,
            partial(
                serve_http,
                App(),
                engine_task=gated,
                sock=bound,
                handle_signals=False,
                health_path="/health",
                metrics_path="/metrics",
                transport=transport,
            ),
        )
        with trio.fail_after(10):  # (a client may even connect before the runner runs)
            health = await client.get("/health")
        assert (health.status_code, health.json()["status"]) == (503, "starting")
        refused = await client.get("/ask?q=x")
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["connection"] == "close"
        assert refused.json()["error"]["type"] == "Starting"
        # Like every response: an id, and measured (the scrape is answered while starting).
        assert refused.headers["x-request-id"] != health.headers["x-request-id"]
        scrape = (await client.get("/metrics")).text
        assert re.search(r'_count\{[^}]*http_response_status_code="503"[^}]*\} 2\.0', scrape)
        assert engine_tasks.events == []  # neither the engine nor the app has started
        release.set()
        handle = await starting.handle()
        assert (await get_ok(client, "/ask?q=x")).text == "X"
        assert (await get_ok(client, "/health")).json()["status"] == "serving"
        assert handle.engine.is_running  # the task's started() value
        handle.shutdown()


class StateApp:
    """Puts ``model`` into the lifespan state; GET / answers it from the request's state."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                scope["state"]["model"] = "loaded"
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = str(scope.get("state", {}).get("model")).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


async def test_an_http2_connection_opened_while_starting_sees_the_lifespan_state(
    tls_files: TLSFiles,
) -> None:
    """HTTP/2 keeps the connection it opened during the start (no Connection:
    close there); its later requests still see the app's lifespan state."""
    release = trio.Event()

    async def gated(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await release.wait()
        task_status.started()
        await trio.sleep_forever()

    bound = listening()
    url = f"https://127.0.0.1:{bound.getsockname()[1]}"
    context = tls_files.client_context(http2=True)
    async with (
        trio.open_nursery() as nursery,
        httpx.AsyncClient(base_url=url, verify=context, http2=True) as client,
    ):
        starting = Starting(
            nursery,
            partial(
                serve_http,
                StateApp(),
                tls_files.config(),
                engine_task=gated,
                sock=bound,
                handle_signals=False,
            ),
        )
        with trio.fail_after(10):
            first = await client.get("/")
        assert (first.status_code, first.http_version) == (503, "HTTP/2")
        release.set()
        handle = await starting.handle()
        second = await client.get("/")  # the same connection
        assert (second.status_code, second.http_version, second.text) == (200, "HTTP/2", "loaded")
        handle.shutdown()


async def test_current_engine_is_the_engine_object_too() -> None:
    engine = FakeEngine()
    seen: list[object] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append(current_engine())
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    async with running_server(app, engine=engine) as server:
        await server.client.get("/")
    assert seen == [engine]


async def test_a_failing_app_startup_still_gives_the_engine_its_cleanup() -> None:
    class FailingApp(App):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                await receive()
                await send({"type": "lifespan.startup.failed", "message": "no config"})
                return
            await super().__call__(scope, receive, send)

    with pytest.raises(AppStartupError, match="no config"):
        async with running_server(FailingApp(), engine_task=recorded_engine):
            pass
    assert engine_tasks.events == ["engine started", "engine cleanup done"]


async def test_shutdown_during_the_engine_start_cancels_it_and_skips_the_app() -> None:
    started_loading = trio.Event()

    async def never_ready(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started_loading.set()
        try:
            await trio.sleep_forever()
        finally:
            engine_tasks.record("load cancelled")

    bound = socket.socket()
    bound.bind(("127.0.0.1", 0))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    serve_http, App(), engine_task=never_ready, sock=bound, handle_signals=False
                )
            )
            await started_loading.wait()
            nursery.cancel_scope.cancel()
    assert engine_tasks.events == ["load cancelled"]


async def test_the_example_as_documented(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    task = partial(example_engine_task, load_seconds=0)
    with pytest.raises(EngineDeadError, match="the model crashed"):
        async with running_server(example.app, engine_task=task, health_path="/health") as server:
            assert (await get_ok(server.client, "/health")).json()["engine"] == "alive"
            assert (await get_ok(server.client, "/ask?q=hello")).json() == {"answer": "HELLO"}
            crashed = await server.client.get("/ask?q=crash")
            assert crashed.status_code == 500
    lines = [r.getMessage() for r in caplog.records if r.name == "examples.engine_task"]
    # (the crashed engine's cleanup and the drain run side by side)
    assert lines[0] == "lifespan startup; the engine is running"
    assert sorted(lines[1:]) == [
        "engine task: cleanup done",
        "lifespan shutdown; the engine is stopped",
    ]


async def test_a_busy_port_fails_before_the_engine_starts() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    config = Config()
    config.bind = [f"127.0.0.1:{holder.getsockname()[1]}"]
    with holder, pytest.raises(BindError):
        await serve_http(App(), config, engine_task=recorded_engine, handle_signals=False)
    assert engine_tasks.events == []


async def test_a_signal_during_the_engine_start_still_ends_the_start_with_a_handle() -> None:
    """nursery.start(serve_http, ...) returns (a stopping handle), not RuntimeError."""
    loading = trio.Event()

    async def never_ready(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        loading.set()
        await trio.sleep_forever()

    bound = socket.socket()
    bound.bind(("127.0.0.1", 0))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def raise_sigterm() -> None:
                await loading.wait()  # serve_http owns SIGTERM by now
                signal.raise_signal(signal.SIGTERM)

            nursery.start_soon(raise_sigterm)
            handle = await nursery.start(
                partial(serve_http, App(), engine_task=never_ready, sock=bound)
            )
    assert handle.stopping
    assert handle.stop_reason is StopReason.SIGNAL
    assert engine_tasks.events == []  # the app never started


class Probed:
    """A started() value with the engine attributes and check_health()."""

    errored = False
    is_running = True

    def __init__(self) -> None:
        self.sick = trio.Event()

    async def check_health(self) -> None:
        if self.sick.is_set():
            raise RuntimeError("out of GPU memory")


async def test_the_started_value_gets_the_health_probe() -> None:
    probed = Probed()

    async def task(*, task_status: trio.TaskStatus[Probed] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(probed)
        await trio.sleep_forever()

    with pytest.raises(EngineDeadError, match="out of GPU memory"):
        async with running_server(App(), engine_task=task, engine_health_interval=0.01):
            probed.sick.set()
            with trio.fail_after(10):
                await trio.sleep_forever()  # until the probe's death drains the server


async def test_current_engine_outside_serve_http() -> None:
    with pytest.raises(LookupError, match="no engine"):
        current_engine()


async def test_engine_and_engine_task_are_exclusive() -> None:
    with pytest.raises(OptionError, match="engine_task and engine are exclusive"):
        await serve_http(App(), engine=FakeEngine(), engine_task=recorded_engine)


# --- the CLI as a real process ---------------------------------------------------------


async def test_cli_engine_crash_mid_request_drains_and_exits_3() -> None:
    args = [f"{ENGINE}:app", "--engine-task", f"{ENGINE}:engine_task", *LOOPBACK]
    async with launch(args) as proc, httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
        async with trio.open_nursery() as nursery:
            slow = await proc.slow_request(nursery, "/slow?s=1", client)
            crash = await client.get("/ask?q=crash")
        assert crash.status_code == 500
        assert slow.ok().status_code == 200
        assert await proc.wait() == 3, proc.stderr
    assert proc.stderr.count("Traceback") == 1, proc.stderr
    assert "RuntimeError: the model crashed" in proc.stderr
    assert "engine died" in proc.lines[-1]


async def test_cli_sigterm_with_a_slow_request_that_needs_the_engine_at_its_end() -> None:
    args = [f"{ENGINE}:app", "--engine-task", f"{ENGINE}:recorded_engine", *LOOPBACK]
    async with launch(args) as proc, httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
        async with trio.open_nursery() as nursery:
            slow_ask = await proc.slow_request(nursery, "/slow-ask?s=1&q=bye", client)
            proc.signal(signal.SIGTERM)
        assert slow_ask.ok().status_code == 200
        assert slow_ask.ok().text == "BYE"
        assert await proc.wait() == 0, proc.stderr
    order = [line.split("event: ")[1] for line in proc.lines if "event: " in line]
    assert order[-3:] == [
        "answered /slow-ask",
        "lifespan shutdown (engine running: True)",
        "engine cleanup done",
    ]


async def test_cli_slow_engine_start_port_bound_at_once_503_until_ready() -> None:
    args = [
        f"{ENGINE}:app",
        "--engine-task",
        f"{ENGINE}:slow_start",
        *LOOPBACK,
        "--health-path",
        "/health",
    ]
    async with launch(args, wait_serving=False) as proc:
        line = await proc.wait_for_line(r"accepting on http://\S+")
        url = line.split("accepting on ")[1].split(";")[0]
        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            first = await client.get("/health")
            assert (first.status_code, first.json()["status"]) == (503, "starting")
            assert not any("engine task started" in x for x in proc.lines)  # still loading
            with trio.fail_after(15):
                while True:  # a client that honours 503 + Retry-After: no request fails
                    response = await client.get("/ask?q=x")
                    statuses.append(response.status_code)
                    if response.status_code == 200:
                        break
                    assert response.status_code == 503
                    assert response.headers["retry-after"] == "1"
                    await trio.sleep(0.2)  # (a short retry, not the advertised second)
            assert response.text == "X"
        assert statuses[0] == 503
        await proc.wait_for_line("the engine task started in 2")
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0, proc.stderr


async def test_cli_cleanup_that_ignores_cancellation_exits_after_the_timeout() -> None:
    args = [
        f"{ENGINE}:app",
        "--engine-task",
        f"{ENGINE}:hanging_cleanup",
        *LOOPBACK,
        "--engine-shutdown-timeout",
        "0.5",
    ]
    async with launch(args) as proc:
        proc.signal(signal.SIGTERM)
        await proc.wait_for_line("event: cleanup hangs")
        start = trio.current_time()
        assert await proc.wait(timeout=10) == 0, proc.stderr
        elapsed = trio.current_time() - start
    assert 0.5 <= elapsed < 5, elapsed  # the timeout and the 1 s grace, then out
    errors = [line for line in proc.lines if " ERROR [" in line]
    assert len(errors) == 1
    assert "did not finish within 0.5 s of its cancellation" in errors[0]


async def test_cli_sigterm_during_the_engine_start_cancels_it_and_exits_0() -> None:
    args = [f"{ENGINE}:app", "--engine-task", f"{ENGINE}:slow_start", *LOOPBACK]
    async with launch(args, wait_serving=False) as proc:
        await proc.wait_for_line("starting the engine task")
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0, proc.stderr
    assert any("its start was cancelled" in line for line in proc.lines)
    assert not any("event: lifespan" in line for line in proc.lines)  # the app never started
    assert not any("serving on" in line for line in proc.lines)


async def test_cli_sigterm_during_a_load_that_ignores_cancellation_exits_after_the_timeout() -> (
    None
):
    args = [
        f"{ENGINE}:app",
        "--engine-task",
        f"{ENGINE}:blocking_load",
        *LOOPBACK,
        "--engine-shutdown-timeout",
        "0.5",
    ]
    async with launch(args, wait_serving=False) as proc:
        await proc.wait_for_line("event: loading in a thread")
        proc.signal(signal.SIGTERM)
        assert await proc.wait(timeout=10) == 0, proc.stderr
    errors = [line for line in proc.lines if " ERROR [" in line]
    assert len(errors) == 1
    assert "did not finish within 0.5 s of its cancellation" in errors[0]


async def test_cli_second_signal_exits_130() -> None:
    args = [
        f"{ENGINE}:app",
        "--engine-task",
        f"{ENGINE}:cut_cleanup",
        *LOOPBACK,
        "--graceful-timeout",
        "30",
    ]
    async with launch(args) as proc, trio.open_nursery() as nursery:
        long_request = await proc.slow_request(nursery, "/slow?s=20")
        proc.signal(signal.SIGINT)
        await proc.wait_for_line("SIGINT: draining")
        proc.signal(signal.SIGINT)
        assert await proc.wait(timeout=5) == 130, proc.stderr
    long_request.assert_aborted()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            ["--engine", "tests.apps:engine", "--engine-task", f"{ENGINE}:engine_task"],
            ["argument --engine-task: not allowed with argument --engine"],
        ),
        (["--engine-task", f"{ENGINE}:nope"], ["engine task", "has no attribute 'nope'"]),
        (
            ["--engine-task", f"{ENGINE}:engine_task", "--engine-shutdown-timeout", "0"],
            ["--engine-shutdown-timeout", "must be > 0"],
        ),
    ],
)
def test_cli_bad_engine_task_usage_exits_2_with_one_line(
    args: list[str], needles: list[str]
) -> None:
    result = run_cli([f"{ENGINE}:app", *args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


async def test_cli_workers_each_run_their_engine_task() -> None:
    args = [
        f"{ENGINE}:app",
        "--engine-task",
        f"{ENGINE}:engine_task",
        *LOOPBACK,
        "--workers",
        "2",
    ]
    async with launch(args, wait_serving=False) as proc:
        await proc.wait_for_line("all 2 workers are serving", timeout=30)
        started = [line for line in proc.lines if "the engine task started" in line]
        assert len({line.split("[")[1] for line in started}) == 2  # two PIDs
        assert len(started) == 2
        url = next(line for line in proc.lines if "serving on" in line).split("serving on ")[1]
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await get_ok(client, "/ask?q=w")).text == "W"
        proc.signal(signal.SIGTERM)
        assert await proc.wait(timeout=20) == 0, proc.stderr
