"""Apps in the real world: Quart-Trio, readiness, shutdown delay, head limits, access log."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
import trio
from hypercorn.config import Config

from trio_launcher import EngineDeadError
from trio_launcher._options import HTTP1Protocol, Transport
from trio_launcher.testing import FakeEngine, TLSFiles, running_server

from . import quart_apps
from .apps import App
from .net import get, open_request, wait_eof, wait_refused
from .proc import LOOPBACK, launch, served


def local_config(**settings: object) -> Config:
    config = Config.from_mapping(settings)
    config.bind = ["127.0.0.1:0"]
    return config


# --- readiness and shutdown delay -------------------------------------------


async def test_readiness_turns_503_at_once_and_delay_keeps_serving() -> None:
    args = served("tests.apps:app", health_path="/health", shutdown_delay=1)
    async with launch(args) as proc:
        async with httpx.AsyncClient(base_url=proc.url) as client:
            ready = await client.get("/health")
            assert ready.status_code == 200
            assert ready.json() == {"status": "serving", "in_flight": 0, "oldest_request_s": 0.0}
            proc.signal(signal.SIGTERM)
            with trio.fail_after(0.5):  # at once; room for a busy machine, within the delay
                while (await client.get("/health")).status_code != 503:
                    pass
            assert (await client.get("/health")).json()["status"] == "stopping"
        # During the delay new connections are still accepted and served.
        assert (await get(proc.url)).text == "hello"
        await wait_refused(proc.port, timeout=2)
        assert await proc.wait() == 0, proc.stderr


async def test_second_signal_during_delay_forces() -> None:
    args = ["tests.apps:app", *LOOPBACK, "--shutdown-delay", "30"]
    async with launch(args) as proc:
        proc.signal(signal.SIGTERM)
        await proc.wait_for_line("shutdown delay")
        proc.signal(signal.SIGTERM)
        assert await proc.wait(timeout=5) == 128 + signal.SIGTERM


async def test_health_503_when_engine_dead_with_keep_alive() -> None:
    engine = FakeEngine()
    async with running_server(
        App(), engine=engine, keep_alive_on_engine_death=True, health_path="/health"
    ) as server:
        healthy = await server.client.get("/health")
        assert (healthy.status_code, healthy.json()) == (
            200,
            {"status": "serving", "engine": "alive", "in_flight": 0, "oldest_request_s": 0.0},
        )
        engine.kill()
        await trio.testing.wait_all_tasks_blocked()
        dead = await server.client.get("/health")
        assert dead.status_code == 503
        assert (dead.json()["status"], dead.json()["engine"]) == ("serving", "dead")
        assert (await server.client.get("/")).text == "hello"  # still serving
        assert (await server.client.head("/health")).status_code == 503


# --- header limits -----------------------------------------------------------


def headers(n: int) -> dict[str, str]:
    return {f"x-h-{i}": "v" for i in range(n)}


async def test_header_count_limit_http11() -> None:
    async with running_server(App()) as server, trio.open_nursery() as nursery:
        stream, first = await open_request(server.port)  # a bystander connection
        assert b" 200 " in first
        assert (await server.client.get("/", headers=headers(100))).status_code == 200
        refused = await server.client.get("/", headers=headers(300))
        assert refused.status_code == 431
        assert "the limit is 256" in refused.json()["error"]["message"]
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        assert b" 200 " in await stream.receive_some(65536)
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_header_count_limit_http2(tls_files: TLSFiles) -> None:
    async with running_server(App(), tls_files.config(), tls=tls_files, http2=True) as server:
        ok = await server.client.get("/", headers=headers(100))
        assert (ok.status_code, ok.http_version) == (200, "HTTP/2")
        refused = await server.client.get("/", headers=headers(300))
        assert (refused.status_code, refused.http_version) == (431, "HTTP/2")
        assert (await server.client.get("/")).status_code == 200


@pytest.mark.parametrize(
    ("transport", "http"),
    [("lean", "httptools"), ("lean", "h11"), ("hypercorn", "auto")],
    ids=["lean-httptools", "lean-h11", "stock-hypercorn"],
)
async def test_head_size_limit_every_layer(transport: Transport, http: HTTP1Protocol) -> None:
    async with running_server(App(), max_head_size=2000, transport=transport, http=http) as server:
        assert (await server.client.get("/", headers={"x-big": "a" * 1000})).status_code == 200
        refused = await server.client.get("/", headers={"x-big": "a" * 3000})
        assert refused.status_code == 431
        huge = await server.client.get("/", headers={"x-big": "a" * 100_000})
        assert huge.status_code == 431
        assert (await server.client.get("/")).status_code == 200


# --- access log --------------------------------------------------------------


async def test_access_log_excludes_paths(tmp_path: Path) -> None:
    log_file = tmp_path / "access.log"
    args = served(
        "tests.apps:app",
        health_path="/health",
        access_log=log_file,
        access_log_exclude=["/health", "/metrics"],
    )
    async with launch(args) as proc:
        async with httpx.AsyncClient(base_url=proc.url) as client:
            for path in ("/", "/health", "/metrics", "/slow?s=0"):
                await client.get(path)
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    text = log_file.read_text()
    assert "GET / " in text
    assert "/slow" in text
    assert "/health" not in text
    assert "/metrics" not in text


# --- streams and engine death ------------------------------------------------


async def test_engine_killed_mid_stream_ends_stream_and_exits_3() -> None:
    args = served("tests.apps:app", engine="tests.apps:engine", graceful_timeout=1)
    async with launch(args) as proc:
        params = {"n": 1000, "delay": 0.01}
        async with (
            httpx.AsyncClient(base_url=proc.url, timeout=10) as client,
            client.stream("GET", "/stream", params=params) as r,
        ):
            assert r.status_code == 200
            chunks = r.aiter_bytes()
            await chunks.__anext__()
            async with httpx.AsyncClient(base_url=proc.url) as other:
                assert (await other.post("/kill")).status_code == 202
            killed_at = trio.current_time()
            with pytest.raises(httpx.HTTPError):  # cut at the drain deadline
                async for _ in chunks:
                    pass
        assert await proc.wait() == 3
        # The drain deadline (1 s) and the exit, with room for a busy machine; far below
        # the 10 s the stream still had to run.
        assert trio.current_time() - killed_at < 1 + 3


# --- Quart-Trio --------------------------------------------------------------


async def test_quart_engine_dead_in_nursery_gives_500_json_and_exit_3() -> None:
    async with launch(["tests.quart_apps:app", *LOOPBACK]) as proc:
        assert any("/dead-in-nursery" in line for line in proc.lines)  # route log
        response = await get(f"{proc.url}/dead-in-nursery")
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "EngineDeadError"
        assert await proc.wait() == 3


async def test_quart_idle_keep_alive_client_does_not_delay_exit() -> None:
    args = ["tests.quart_apps:app", *LOOPBACK, "--graceful-timeout", "10"]
    async with launch(args) as proc:
        stream, response = await open_request(proc.port)
        assert b"hello" in response
        proc.signal(signal.SIGTERM)
        start = trio.current_time()
        assert await proc.wait(timeout=10) == 0
        assert trio.current_time() - start < 2  # well under graceful_timeout
        with trio.fail_after(2):
            await wait_eof(stream)


async def test_quart_keep_alive_timeout_closes_idle_connection() -> None:
    async with running_server(quart_apps.app, local_config(keep_alive_timeout=0.3)) as server:
        stream, response = await open_request(server.port)
        assert b"hello" in response
        with trio.fail_after(3):
            await wait_eof(stream)


async def test_quart_connection_close_is_not_hung() -> None:
    async with running_server(quart_apps.app) as server:
        for _ in range(5):
            stream, response = await open_request(server.port, b"connection: close\r\n")
            assert b"hello" in response
            with trio.fail_after(2):
                await wait_eof(stream)


async def test_quart_errors_and_response_timeout() -> None:
    async with running_server(quart_apps.app) as server:
        assert quart_apps.app.config["RESPONSE_TIMEOUT"] is None
        assert (await server.client.get("/value-error")).status_code == 500
        assert not server.handle.stopping
        assert (await server.client.get("/")).text == "hello"


# --- examples ----------------------------------------------------------------


async def test_example_quart_service_streams_and_dies_with_exit_3() -> None:
    args = served(
        "examples.quart_service:app", engine="examples.quart_service:engine", health_path="/health"
    )
    async with launch(args) as proc:
        async with httpx.AsyncClient(base_url=proc.url) as client:
            stream = await client.get("/generate", params={"tokens": 3})
            assert stream.text.count("event: token") == 3
            assert "event: done" in stream.text
            assert (await client.get("/health")).status_code == 200
            assert (await client.post("/admin/kill")).status_code == 202
        assert await proc.wait() == 3


async def test_example_bare_asgi() -> None:
    async with launch(["examples.bare_asgi:app", *LOOPBACK]) as proc:
        assert (await get(proc.url)).text.startswith("hello")
        proc.signal(signal.SIGINT)
        assert await proc.wait() == 0


async def test_example_embedded() -> None:
    from examples import embedded

    with trio.fail_after(10):
        await embedded.main("127.0.0.1:0", ticks=1)


async def test_example_service_engine_death() -> None:
    args = ["examples.service:app", "--engine", "examples.service:engine", *LOOPBACK]
    async with launch(args) as proc:
        async with httpx.AsyncClient(base_url=proc.url) as client:
            tokens = await client.get("/generate", params={"tokens": 2})
            assert tokens.text.split() == ["token-0", "token-1"]
            assert (await client.post("/admin/kill")).status_code == 202
        assert await proc.wait() == 3


async def test_quart_app_served_twice_reaches_each_servers_dead_check() -> None:
    for _ in range(2):  # the error handlers are per app, the dead check per serve_http
        with pytest.raises(EngineDeadError):
            async with running_server(quart_apps.app) as server:
                response = await server.client.get("/dead-in-nursery")
                assert response.status_code == 500
                assert response.json()["error"]["type"] == "EngineDeadError"
