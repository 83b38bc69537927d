"""Starlette and FastAPI served by the runner, under trio, with nothing to write.

A real FastAPI app (tests/fastapi_apps.py) runs under trio through anyio's
trio backend and is served by a real server on 127.0.0.1:0.
"""

from __future__ import annotations

import math
import subprocess
import sys

import httpx
import pytest
import trio

from trio_launcher import EngineDeadError
from trio_launcher.testing import FakePollingEngine, running_server

from . import fastapi_apps
from .net import get
from .proc import ROOT, cli_env, launch


@pytest.mark.parametrize("path", ["/dead", "/dead-in-group"])
async def test_engine_dead_gives_json_500_and_stops(path: str) -> None:
    with trio.fail_after(15), pytest.raises(EngineDeadError, match="engine is gone"):
        async with running_server(fastapi_apps.app) as server:
            response = await server.client.get(path)
            assert response.status_code == 500
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"]["type"] == "EngineDeadError"
            assert server.handle.stopping


async def test_engine_generate_error_gives_json_500_and_keeps_serving() -> None:
    async with running_server(fastapi_apps.app) as server:
        response = await server.client.get("/generate-error")
        assert response.status_code == 500
        assert response.json() == {
            "error": {"type": "EngineGenerateError", "message": "one bad request"}
        }
        assert not server.handle.stopping
        assert (await server.client.get("/")).json() == {"hello": "world"}


async def test_ordinary_error_reaches_dead_check() -> None:
    engine = FakePollingEngine()  # no wait_dead and no polling: only the dead check sees it
    with trio.fail_after(15), pytest.raises(EngineDeadError, match="ValueError"):
        async with running_server(
            fastapi_apps.app, engine=engine, watchdog_interval=math.inf
        ) as server:
            assert (await server.client.get("/value-error")).status_code == 500
            assert not server.handle.stopping  # the engine is fine: an ordinary bug
            engine.kill()
            assert (await server.client.get("/value-error")).status_code == 500
            assert server.handle.stopping


async def test_engine_dead_mid_stream_reaches_dead_check() -> None:
    with trio.fail_after(15), pytest.raises(EngineDeadError, match="mid-stream"):
        async with running_server(fastapi_apps.app) as server:
            async with server.client.stream("GET", "/stream-dies") as response:
                assert response.status_code == 200
                with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
                    await response.aread()
            assert server.handle.stopping


async def test_apps_own_handler_is_kept_and_served_twice() -> None:
    own = fastapi_apps.with_own_handler()
    for _ in range(2):  # the stack is built by the first serve; the second still has it
        async with running_server(own) as server:
            response = await server.client.get("/generate-error")
            assert (response.status_code, response.json()) == (
                503,
                {"retry": True, "why": "overloaded"},
            )


async def test_plain_starlette_engine_dead() -> None:
    with trio.fail_after(15), pytest.raises(EngineDeadError):
        async with running_server(fastapi_apps.starlette_app) as server:
            assert (await server.client.get("/")).text == "hello"
            response = await server.client.get("/dead")
            assert response.status_code == 500
            assert response.json()["error"]["type"] == "EngineDeadError"


async def test_cli_route_log_lists_routes_and_health_path_then_exit_3() -> None:
    args = ["tests.fastapi_apps:app", "--bind", "127.0.0.1:0", "--health-path", "/health"]
    async with launch(args) as proc:
        routes = [line.split(": ", 1)[-1].strip() for line in proc.lines]
        assert "/health [GET, HEAD] (answered by the runner)" in routes
        assert "/dead-in-group [GET]" in routes
        assert (await get(f"{proc.url}/health")).json()["status"] == "serving"
        response = await get(f"{proc.url}/dead-in-group")
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "EngineDeadError"
        assert await proc.wait() == 3, proc.stderr


def test_recognised_without_importing_starlette() -> None:
    code = (
        "import sys, trio_launcher, trio_launcher._glue as r\n"
        "class App: pass\n"
        "assert not r.is_starlette_app(App())\n"
        "assert 'starlette' not in sys.modules, 'starlette was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
