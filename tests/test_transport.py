"""The lean transport keeps hypercorn's HTTP semantics: every case on both transports,
and on the lean transport with each HTTP/1.1 protocol (httptools, the default, and h11)."""

from __future__ import annotations

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


async def test_websocket_echo(transport: str) -> None:
    async def echo(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        message = await receive()
        await send({"type": "websocket.send", "text": "echo:" + message["text"]})
        await send({"type": "websocket.close"})

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
        texts = [e.data for e in received if isinstance(e, wsproto.events.TextMessage)]
        assert texts == ["echo:hi"]
        await stream.aclose()


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
