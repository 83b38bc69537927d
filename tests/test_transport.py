"""The lean transport keeps hypercorn's HTTP semantics: every case on both transports,
and on the lean transport with each HTTP/1.1 protocol (httptools, the default, and h11)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import wsproto
import wsproto.events
from hypercorn.config import Config

from trio_launcher.testing import TLSFiles, running_server

from . import quart_apps
from .apps import App, vanishing_h2_client

TRANSPORTS = ["lean", "lean-h11", "hypercorn"]
pytestmark = pytest.mark.parametrize("transport", TRANSPORTS)


def variant(transport: str) -> dict[str, Any]:
    """serve_http options for a variant: ``lean-h11`` is the lean transport on h11."""
    if transport == "lean-h11":
        return {"transport": "lean", "http": "h11"}
    return {"transport": transport}


def config(**settings: Any) -> Config:
    result = Config.from_mapping(settings)
    result.bind = ["127.0.0.1:0"]
    return result


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_keep_alive_timeout_closes_idle_connection(transport: str) -> None:
    async with running_server(App(), config(keep_alive_timeout=0.3), **variant(transport)) as s:
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await read_to_eof(stream)).endswith(b"hello")  # then closed when idle
        await stream.aclose()


async def test_graceful_drain_finishes_in_flight_request(transport: str) -> None:
    app = App()
    async with running_server(app, **variant(transport)) as server, trio.open_nursery() as n:
        result: dict[str, Any] = {}

        async def slow() -> None:
            result["r"] = await server.client.get("/slow", params={"s": "0.3"})

        n.start_soon(slow)
        await app.slow_started.wait()
        server.handle.shutdown()
    assert result["r"].text == "slept"


async def test_tls_alpn_h2(transport: str, tls_files: TLSFiles) -> None:
    async with running_server(
        App(), tls_files.config(), tls=tls_files, http2=True, **variant(transport)
    ) as server:
        for _ in range(3):
            response = await server.client.get("/")
            assert (response.http_version, response.text) == ("HTTP/2", "hello")


async def test_websocket_echo(transport: str, caplog: pytest.LogCaptureFixture) -> None:
    """An echo, then the app's close and the client's answer: a clean end. The lean
    transport read on after hypercorn had closed the socket, and every session the app
    closed logged "connection error contained: OSError: [Errno 9] Bad file descriptor"."""

    async def echo(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        message = await receive()
        await send({"type": "websocket.send", "text": "echo:" + message["text"]})
        await send({"type": "websocket.close"})
        assert (await receive())["type"] == "websocket.disconnect"  # the client's answer

    async with running_server(echo, **variant(transport)) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        await stream.send_all(ws.send(wsproto.events.Request(host="x", target="/")))
        received: list[Any] = []
        with trio.fail_after(5):
            while not any(isinstance(e, wsproto.events.AcceptConnection) for e in received):
                ws.receive_data(await stream.receive_some(65536))
                received += list(ws.events())
            await stream.send_all(ws.send(wsproto.events.TextMessage("hi")))
            while not any(isinstance(e, wsproto.events.TextMessage) for e in received):
                ws.receive_data(await stream.receive_some(65536))
                received += list(ws.events())
            while not any(isinstance(e, wsproto.events.CloseConnection) for e in received):
                ws.receive_data(await stream.receive_some(65536))
                received += list(ws.events())
            close = next(e for e in received if isinstance(e, wsproto.events.CloseConnection))
            await stream.send_all(ws.send(close.response()))
            while await stream.receive_some(65536):
                pass  # until the server closes the connection
        texts = [e.data for e in received if isinstance(e, wsproto.events.TextMessage)]
        assert texts == ["echo:hi"]
        assert close.code == 1000
        await stream.aclose()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_large_request_body(transport: str) -> None:
    async with running_server(App(), **variant(transport)) as server:
        response = await server.client.post("/upload", content=b"x" * 5_000_000)
        assert response.text == "5000000"


async def test_pipelining(transport: str) -> None:
    async with running_server(App(), **variant(transport)) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        last = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n" * 2 + last)
        data = await read_to_eof(stream)
        assert data.count(b"HTTP/1.1 200") == 3
        assert data.count(b"hello") == 3
        await stream.aclose()


async def test_read_timeout_closes_stalled_request(transport: str) -> None:
    async with running_server(App(), config(read_timeout=0.3), **variant(transport)) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nab")
        await read_to_eof(stream)  # closed by the server, not hung
        await stream.aclose()
        assert (await server.client.get("/")).text == "hello"


async def test_quart_trio_app(transport: str) -> None:
    async with running_server(quart_apps.app, **variant(transport)) as server:
        assert (await server.client.get("/")).text == "hello"
        stream = await server.client.get("/stream", params={"n": 3, "delay": 0})
        assert stream.text.count("data:") == 3


async def test_h2_abrupt_disconnects_are_contained(transport: str) -> None:
    async with running_server(App(), **variant(transport)) as server:
        for _ in range(3):
            async with trio.open_nursery() as nursery:
                for _ in range(30):
                    nursery.start_soon(vanishing_h2_client, server.port, 5)
            assert (await server.client.get("/")).text == "hello"


async def test_the_drain_closes_websocket_sessions_with_1012(
    transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An open session held the drain for the whole ``graceful_timeout`` and was then
    cut (1011, or no close frame at all), and the app was never told. Now the drain
    closes it at once with 1012 (Service Restart, as uvicorn does): the client can
    reconnect elsewhere, the app's ``receive`` says so, and the server stops."""
    told: list[Any] = []

    async def idle(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})
        told.append(await receive())

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 60  # (far beyond the bound below)
    caplog.set_level(logging.INFO, logger="trio_launcher")
    with trio.fail_after(15):
        async with running_server(idle, config, **variant(transport)) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
                await stream.send_all(ws.send(wsproto.events.Request(host="x", target="/")))
                events: list[Any] = []
                while not any(isinstance(e, wsproto.events.AcceptConnection) for e in events):
                    ws.receive_data(await stream.receive_some(65536))
                    events += list(ws.events())
                server.handle.shutdown()
                while not any(isinstance(e, wsproto.events.CloseConnection) for e in events):
                    ws.receive_data(await stream.receive_some(65536))
                    events += list(ws.events())
                close = next(e for e in events if isinstance(e, wsproto.events.CloseConnection))
                await stream.send_all(ws.send(close.response()))  # (RFC 6455: the answer)
    assert (close.code, close.reason) == (1012, "server restarting")
    assert told == [{"type": "websocket.disconnect", "code": 1012}]
    messages = [r.getMessage() for r in caplog.records]
    assert "closing 1 WebSocket session(s) with 1012 (Service Restart)" in messages
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
