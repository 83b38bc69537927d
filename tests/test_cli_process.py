"""The CLI as a real process: signals, engine death, bind failures, sockets."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from .net import get, wait_refused
from .proc import LOOPBACK, ROOT, InFlight, Launched, cli_env, launch, run_cli

APP = "tests.apps:app"


@asynccontextmanager
async def draining(
    signum: signal.Signals, graceful_timeout: int, path: str
) -> AsyncIterator[tuple[Launched, InFlight]]:
    """The CLI with a request to ``path`` in flight, draining after ``signum``; the
    request's outcome is complete once the block has ended."""
    async with (
        launch([APP, *LOOPBACK, "--graceful-timeout", str(graceful_timeout)]) as proc,
        trio.open_nursery() as nursery,
    ):
        in_flight = await proc.slow_request(nursery, path)
        proc.signal(signum)
        await proc.wait_for_line(f"{signum.name}: draining")
        yield proc, in_flight


async def test_sigterm_drains_in_flight_request_and_exits_0() -> None:
    async with draining(signal.SIGTERM, 10, "/slow?s=3") as (proc, slow):
        # The listener closes at once (milliseconds), while the request is in
        # flight; the bound leaves room for a busy machine.
        await wait_refused(proc.port, timeout=2.5)
        assert not slow.done  # still running: refused during the drain
        assert await proc.wait() == 0, proc.stderr
    assert slow.ok().status_code == 200
    assert slow.ok().text == "slept"


async def test_second_sigint_forces_exit_130_fast() -> None:
    async with draining(signal.SIGINT, 30, "/slow?s=20") as (proc, long_request):
        proc.signal(signal.SIGINT)
        start = trio.current_time()
        code = await proc.wait(timeout=5)
        elapsed = trio.current_time() - start
    long_request.assert_aborted()
    assert code == 130, proc.stderr
    assert elapsed < 3.0, elapsed  # far below the 20 s request and 30 s drain
    assert "Traceback" not in proc.stderr


async def test_engine_wait_dead_closes_listener_fast_and_exits_3() -> None:
    args = [APP, "--engine", "tests.apps:engine", *LOOPBACK]
    async with launch(args) as proc:
        async with trio.open_nursery() as nursery:
            slow = await proc.slow_request(nursery, "/slow?s=1")
            async with httpx.AsyncClient() as client:
                kill = await client.post(f"{proc.url}/kill")
            assert kill.status_code == 202
            # The kill answer arrives after the engine died; the listener closes
            # at once (about 1 ms, BENCHMARKS.md), long before the 1 s request.
            await wait_refused(proc.port, timeout=1.0)
        assert slow.ok().status_code == 200
        assert await proc.wait() == 3, proc.stderr
        assert "engine died" in proc.lines[-1]


async def test_polling_engine_exits_3_within_interval() -> None:
    args = [
        APP,
        "--engine",
        "tests.apps:polling_engine",
        "--watchdog-interval",
        "0.2",
        *LOOPBACK,
    ]
    async with launch(args) as proc:
        async with httpx.AsyncClient() as client:
            assert (await client.post(f"{proc.url}/kill")).status_code == 202
        await wait_refused(proc.port, timeout=0.2 + 2.0)  # one interval, and a busy machine
        assert await proc.wait() == 3, proc.stderr


async def test_app_raising_engine_dead_gets_500_json_then_exit_3() -> None:
    async with launch([APP, *LOOPBACK]) as proc:
        response = await get(f"{proc.url}/raise/dead")
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "EngineDeadError"
        assert await proc.wait() == 3, proc.stderr


async def test_port_held_by_other_process_exits_4_naming_pid() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    # A real other process holds the port: the fd is passed to a sleeping child.
    child = await trio.lowlevel.open_process(
        [sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=[holder.fileno()]
    )
    holder.close()
    try:
        result = await trio.to_thread.run_sync(run_cli, [APP, "--bind", f"127.0.0.1:{port}"])
    finally:
        child.kill()
        await child.wait()
    assert result.returncode == 4, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1
    assert f"127.0.0.1:{port}" in error_lines[0]
    assert f"PID {child.pid}" in error_lines[0]
    assert "errno 98" in error_lines[0]


async def test_inherited_fd() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    try:
        async with launch(
            [APP, "--bind", f"fd://{sock.fileno()}"], pass_fds=[sock.fileno()]
        ) as proc:
            assert proc.url == f"http://127.0.0.1:{port}"
            assert (await get(proc.url)).text == "hello"
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
    finally:
        sock.close()


async def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    async with launch([APP, "--bind", f"unix:{path}"]) as proc:
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.get("http://localhost/")).text == "hello"
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["tests.nope:app"], "no module named 'tests.nope'"),
        (["tests.apps:nope"], "has no attribute 'nope'"),
        (["tests.apps"], "must look like MODULE:ATTR"),
        ([APP, "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        ([APP, "--graceful-timeout", "soon"], "'soon' is not a number"),
        ([APP, "--config", "/nonexistent.toml"], "/nonexistent.toml"),
        ([APP, "--bind", "127.0.0.1:http"], "port is not a number"),
        ([APP, "--engine", "tests.apps:App"], "lacks"),
    ],
)
def test_bad_usage_exits_2_with_one_line(args: list[str], needle: str) -> None:
    result = run_cli(args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert lines[0].startswith("trio-launcher: error:")


@pytest.mark.parametrize(
    ("content", "needle"),
    [("bind = [", "invalid TOML"), ("no_such_setting = 1", "unknown setting 'no_such_setting'")],
)
def test_bad_config_file_exits_2(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    result = run_cli([APP, "--config", str(path)])
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert needle in result.stderr


def test_failing_startup_exits_1_with_one_line() -> None:
    result = run_cli(["tests.apps:failing_app", *LOOPBACK])
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [errors[0]] and "no model" in errors[0]
    assert "Traceback" not in result.stderr


async def test_config_file_is_used_and_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text('bind = ["127.0.0.1:1"]\ngraceful_timeout = 7.5\n')
    async with launch([APP, "--config", str(path), *LOOPBACK]) as proc:
        assert (await get(proc.url)).text == "hello"
        proc.signal(signal.SIGTERM)
        await proc.wait_for_line(r"requests have 7.5 s")
        assert await proc.wait() == 0


CONSOLE_SCRIPT = shutil.which("trio-launcher", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(CONSOLE_SCRIPT is None, reason="trio-launcher is not installed in this venv")
def test_module_entry_point_and_console_script_agree() -> None:
    assert CONSOLE_SCRIPT is not None
    module = run_cli(["--help"])
    script = subprocess.run(
        [CONSOLE_SCRIPT, "--help"], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert module.returncode == script.returncode == 0
    assert module.stdout == script.stdout
    assert module.stdout.startswith("usage: trio-launcher [-h]")
    for code in ("0 clean", "2 usage/config", "3 engine died", "4 cannot bind"):
        assert code in module.stdout
    bad = run_cli(["tests.nope:app"])
    bad_script = subprocess.run(
        [CONSOLE_SCRIPT, "tests.nope:app"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=cli_env(),
    )
    assert bad.returncode == bad_script.returncode == 2
    assert bad.stderr == bad_script.stderr


def test_debug_log_level_shows_traceback() -> None:
    quiet = run_cli(["tests.nope:app"])
    loud = run_cli(["tests.nope:app", "--log-level", "debug"])
    assert "Traceback" not in quiet.stderr
    assert "Traceback" in loud.stderr
    assert loud.returncode == quiet.returncode == 2
