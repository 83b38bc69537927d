"""Starlette and FastAPI served by the runner, under trio, with nothing to write.

A real FastAPI app (tests/fastapi_apps.py) runs under trio through anyio's
trio backend and is served by a real server on 127.0.0.1:0.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
import wsproto
import wsproto.events
from fastapi import BackgroundTasks, FastAPI, WebSocket, WebSocketDisconnect
from hypercorn.config import Config

from trio_launcher import EngineDeadError
from trio_launcher.testing import FakePollingEngine, TLSFiles, running_server

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


def background_app(release: trio.Event, sent: trio.Event) -> FastAPI:
    """A FastAPI app whose one route answers, then sends its "email" in the background
    once ``release`` is set (and sets ``sent``)."""
    api = FastAPI()

    async def send_email() -> None:
        await release.wait()
        sent.set()

    @api.get("/")
    async def hello(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(send_email)
        return {"hello": "world"}

    return api


@pytest.mark.parametrize(
    ("transport", "http", "http2"),
    [
        ("lean", "auto", False),
        ("lean", "h11", False),
        ("lean", "auto", True),
        ("hypercorn", "auto", False),
    ],
    ids=["httptools", "h11", "h2", "stock"],
)
async def test_a_background_task_outlives_a_client_that_closed(
    transport: str, http: str, http2: bool, tmp_path: Path
) -> None:
    """FastAPI's background tasks run after the response, in the request's ASGI call.
    A client that closed its connection once it had the response (curl, a one-shot
    client, ``Connection: close``) cancelled them with the connection's tasks: the
    email was never sent."""
    release, sent = trio.Event(), trio.Event()
    tls = TLSFiles(tmp_path / "tls") if http2 else None
    config = tls.config() if tls is not None else None
    api = background_app(release, sent)
    async with running_server(
        api, config, tls=tls, http2=http2, transport=transport, http=http
    ) as server:
        with trio.fail_after(10):
            response = await server.client.get(
                "/", headers={} if http2 else {"connection": "close"}
            )
            assert response.json() == {"hello": "world"}
            assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            await server.client.aclose()  # (HTTP/2: the client closes the connection)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
            await sent.wait()  # (cancelled with its connection, it never comes)


@pytest.mark.parametrize("transport", ["lean", "hypercorn"])
async def test_a_fastapi_websocket_is_told_1012_when_the_server_drains(transport: str) -> None:
    """A FastAPI WebSocket loop ends with ``WebSocketDisconnect(1012)`` when the drain
    starts, and the client gets a close frame with 1012: the drain does not wait
    ``graceful_timeout`` for the session."""
    codes: list[int] = []
    api = FastAPI()

    @api.websocket("/ws")
    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text("echo:" + await websocket.receive_text())
        except WebSocketDisconnect as disconnect:
            codes.append(disconnect.code)

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 60  # (far beyond the bound below)
    with trio.fail_after(15):
        async with running_server(api, config, transport=transport) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
                await stream.send_all(ws.send(wsproto.events.Request(host="x", target="/ws")))
                events: list[Any] = []

                async def until(kind: type[Any]) -> Any:
                    while not any(isinstance(e, kind) for e in events):
                        ws.receive_data(await stream.receive_some(65536))
                        events.extend(ws.events())
                    return next(e for e in events if isinstance(e, kind))

                await until(wsproto.events.AcceptConnection)
                await stream.send_all(ws.send(wsproto.events.TextMessage("hi")))
                assert (await until(wsproto.events.TextMessage)).data == "echo:hi"
                server.handle.shutdown()
                close = await until(wsproto.events.CloseConnection)
                await stream.send_all(ws.send(close.response()))
    assert close.code == 1012
    assert codes == [1012]
