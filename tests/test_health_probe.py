"""The engine health probe: a hung engine is noticed, a raising one too, exit 3."""

from __future__ import annotations

import re
from typing import Any

import pytest
import trio
import trio.testing

from trio_launcher import EngineDeadError
from trio_launcher._watchdog import OVERDUE_AFTER, HealthProbe
from trio_launcher.testing import running_server

from .bounds_apps import BoundsApp, ProbedEngine
from .proc import launch

# --- the probe alone, in logical time ----------------------------------------------


async def run_probe(engine: ProbedEngine, interval: float, timeout: float) -> tuple[str, float]:
    deaths: list[tuple[str, float]] = []
    probe = HealthProbe(
        engine.check_health,
        interval,
        timeout,
        lambda how: deaths.append((how, trio.current_time())),
    )
    start = trio.current_time()
    await probe.run()
    assert len(deaths) == 1
    return deaths[0][0], deaths[0][1] - start


@pytest.mark.parametrize(
    ("mode", "how", "after"),
    [
        pytest.param(
            "hang", "check_health() timed out after 7 s", 17, id="hanging-interval+timeout"
        ),
        pytest.param(
            "raise",
            "check_health() raised RuntimeError: engine core is not responding",
            10,
            id="raising-interval",
        ),
    ],
)
async def test_failing_probe_is_dead_after(
    mode: str, how: str, after: float, autojump_clock: trio.testing.MockClock
) -> None:
    dead_how, dead_after = await run_probe(ProbedEngine(mode), interval=10, timeout=7)
    assert dead_how == how
    assert dead_after == pytest.approx(after)


async def test_healthy_probe_runs_every_interval_and_never_dies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = ProbedEngine("healthy")
    probe = HealthProbe(engine.check_health, 10, 10, lambda how: pytest.fail(how))
    with trio.move_on_after(105):
        await probe.run()
    assert engine.calls == 10


async def test_probe_is_overdue_while_running_long(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answer = trio.Event()

    async def check_health() -> None:
        await answer.wait()

    probe = HealthProbe(check_health, 10, 30, lambda how: pytest.fail(how))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe.run)
        await trio.sleep(10.5)
        assert not probe.overdue  # running 0.5 s: not yet
        await trio.sleep(OVERDUE_AFTER)
        assert probe.overdue
        answer.set()
        await trio.testing.wait_all_tasks_blocked()
        assert not probe.overdue
        nursery.cancel_scope.cancel()


# --- in a real server ---------------------------------------------------------------


class GatedEngine(ProbedEngine):
    """check_health() answers only when ``answer`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = trio.Event()
        self.probing = trio.Event()

    async def check_health(self) -> None:
        self.calls += 1
        self.probing.set()
        await self.answer.wait()


async def test_health_path_is_503_while_a_probe_is_overdue() -> None:
    engine = GatedEngine()
    options: dict[str, Any] = {
        "engine": engine,
        "health_path": "/health",
        "engine_health_interval": 0.05,
        "engine_health_timeout": 30.0,
    }
    async with running_server(BoundsApp(), **options) as server:
        with trio.fail_after(5):
            await engine.probing.wait()
        probing = trio.current_time()
        assert (await server.client.get("/health")).status_code == 200  # just started
        with trio.fail_after(OVERDUE_AFTER + 5):
            while (overdue := await server.client.get("/health")).status_code == 200:
                await trio.sleep(0.02)
        assert trio.current_time() - probing >= OVERDUE_AFTER
        assert overdue.status_code == 503
        assert overdue.json()["engine"] == "unresponsive"
        assert (await server.client.get("/")).text == "hello"  # still serving meanwhile
        engine.answer.set()
        await trio.testing.wait_all_tasks_blocked()
        healthy = await server.client.get("/health")
        assert (healthy.status_code, healthy.json()["engine"]) == (200, "alive")
        assert not server.handle.stopping


async def test_hanging_probe_in_process_raises_engine_dead_naming_the_timeout() -> None:
    engine = ProbedEngine("hang")
    with pytest.raises(EngineDeadError, match=r"check_health\(\) timed out after 0.2 s"):
        async with running_server(
            BoundsApp(), engine=engine, engine_health_interval=0.1, engine_health_timeout=0.2
        ) as server:
            with trio.fail_after(5):
                while not server.handle.stopping:
                    await trio.sleep(0.01)


async def test_an_engine_task_value_with_check_health_is_probed() -> None:
    # engine_task= hands over its engine at started(); the probe watches it then.
    engine = ProbedEngine("raise")

    async def engine_task(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(engine)
        await trio.sleep_forever()

    with pytest.raises(EngineDeadError, match=r"check_health\(\) raised RuntimeError"):
        async with running_server(
            BoundsApp(), engine_task=engine_task, engine_health_interval=0.1
        ) as server:
            with trio.fail_after(5):
                while not server.handle.stopping:
                    await trio.sleep(0.01)
    assert engine.calls == 1


@pytest.mark.parametrize(
    ("engine", "why"),
    [
        ("hanging_engine", r"check_health\(\) timed out after 0.5 s"),
        ("raising_engine", r"check_health\(\) raised RuntimeError: engine core is not responding"),
    ],
)
async def test_cli_dead_probe_drains_and_exits_3_in_time(engine: str, why: str) -> None:
    interval, timeout = 0.3, 0.5
    args = [
        "tests.bounds_apps:app",
        "--engine",
        f"tests.bounds_apps:{engine}",
        "--bind",
        "127.0.0.1:0",
        "--engine-health-interval",
        str(interval),
        "--engine-health-timeout",
        str(timeout),
    ]
    async with launch(args) as proc:
        serving = trio.current_time()
        line = await proc.wait_for_line("the engine died")
        declared = trio.current_time() - serving
        assert await proc.wait() == 3, proc.stderr
    print(f"\nMEASURED|{engine} declared dead after|{declared:.3f} s")
    assert re.search(why, line)
    bound = interval + (timeout if engine == "hanging_engine" else 0)
    assert declared <= bound + 0.5
    assert re.search(why, proc.lines[-1])  # the one-line exit error names it too
