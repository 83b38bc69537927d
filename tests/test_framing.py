"""Framing over raw sockets, against a real server: for each case, the status and
whether the connection closes (RFC 9112). The default HTTP/1.1 path (httptools)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import h2.events as h2_events
import pytest
import trio
from hypercorn.config import Config

from trio_launcher.testing import TLSFiles, running_server

from .apps import App
from .http1_wire import Response, responses

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def config(**settings: Any) -> Config:
    result = Config.from_mapping(settings)
    result.bind = ["127.0.0.1:0"]
    return result


class Client:
    """A raw connection that reads whole responses and notices the close."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.data = b""

    async def responses(self, count: int, head_only: bool = False) -> list[Response]:
        with trio.fail_after(5):
            while True:
                try:
                    got = responses(self.data, head_only)
                    if len(got) >= count and (head_only or self._complete(got)):
                        return got
                except (ValueError, IndexError):
                    pass
                chunk = await self.stream.receive_some(65536)
                assert chunk, f"closed after {self.data!r}"
                self.data += chunk

    @staticmethod
    def _complete(got: list[Response]) -> bool:
        last = got[-1]
        size = last.headers.get(b"content-length")
        return size is None or len(last.body) == int(size)

    async def closed(self) -> bool:
        """True if the server closes within 5 s (False: it answered more instead)."""
        with trio.fail_after(5):
            return await self.stream.receive_some(65536) == b""


Connect = Callable[[int], Awaitable[Client]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Open raw connections; every one is closed at the end of the test."""
    clients: list[Client] = []

    async def open_one(port: int) -> Client:
        clients.append(Client(await trio.open_tcp_stream("127.0.0.1", port)))
        return clients[-1]

    yield open_one
    for client in clients:
        await trio.aclose_forcefully(client.stream)


async def still_serves(client: Client) -> bool:
    await client.stream.send_all(GET)
    client.data = b""
    return [r.body for r in await client.responses(1)] == [b"hello"]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 41\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            b"GET /raise/value HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
            id="cl-te-smuggling",
        ),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, id="missing-host"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, id="repeated-host"),
        pytest.param(b"GET / HTTP/1.1\nHost: x\n\n", 400, id="bare-lf"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
            400,
            id="obs-fold-te",
        ),
        pytest.param(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 400, id="http-2.0-in-http1"),
        pytest.param(b"GET / HTTP/1.7\r\nHost: x\r\n\r\n", 400, id="http-1.7"),
        pytest.param(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"-1\r\nabc\r\n0\r\n\r\n",
            400,
            id="bad-chunk-size",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-H: v\r\n" * 300 + b"\r\n",
            431,
            id="too-many-headers",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-H: " + b"v" * 20000 + b"\r\n\r\n",
            431,
            id="head-too-large",
        ),
    ],
)
async def test_refused_and_closed(request_bytes: bytes, status: int, connect: Connect) -> None:
    async with running_server(App()) as server:
        client = await connect(server.port)
        await client.stream.send_all(request_bytes)
        [response] = await client.responses(1)
        assert response.status == status
        assert response.headers[b"connection"] == b"close"
        assert await client.closed()
        assert client.data.count(b"HTTP/1.1 ") == 1  # never a second (smuggled) answer


async def test_head_response_has_no_body_and_keeps_the_connection(connect: Connect) -> None:
    async with running_server(App()) as server:
        client = await connect(server.port)
        await client.stream.send_all(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        [response] = await client.responses(1, head_only=True)
        assert response.headers[b"content-length"] == b"5"
        assert client.data.endswith(b"\r\n\r\n")
        assert await still_serves(client)  # no stray body bytes in the way


async def test_expect_100_continue(connect: Connect) -> None:
    async with running_server(App()) as server:
        client = await connect(server.port)
        await client.stream.send_all(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
        )
        [interim] = await client.responses(1)
        assert interim.status == 100
        await client.stream.send_all(b"abc")
        got = await client.responses(2)
        assert (got[1].status, got[1].body) == (200, b"3")
        assert await still_serves(client)


async def test_chunked_request_body_trailers_discarded(connect: Connect) -> None:
    async with running_server(App()) as server:
        client = await connect(server.port)
        await client.stream.send_all(
            b"POST /upload HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n"
            b"0\r\nX-Trailer: 1\r\n\r\n"
        )
        [response] = await client.responses(1)
        assert response.body == b"4"
        assert await still_serves(client)


async def test_pipelined_answered_in_order_up_to_connection_close(connect: Connect) -> None:
    async with running_server(App()) as server:
        client = await connect(server.port)
        close = b"GET /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        await client.stream.send_all(GET + close + GET)
        got = await client.responses(2)
        assert [(r.status, r.body) for r in got] == [(200, b"hello"), (200, b"0")]
        assert await client.closed()
        assert client.data.count(b"HTTP/1.1 ") == 2


async def test_http10_keep_alive_pipelined(connect: Connect) -> None:
    async with running_server(App()) as server:
        client = await connect(server.port)
        await client.stream.send_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" * 2)
        got = await client.responses(2)
        assert [r.body for r in got] == [b"hello", b"hello"]
        assert got[0].headers[b"connection"] == b"keep-alive"
        assert await still_serves(client)


async def test_http10_without_keep_alive_closes(connect: Connect) -> None:
    async with running_server(App()) as server:
        client = await connect(server.port)
        await client.stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
        [response] = await client.responses(1)
        assert response.body == b"hello"
        assert await client.closed()


async def test_app_connection_close_header_closes(connect: Connect) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = [(b"connection", b"close"), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 408, "headers": headers})
            await send({"type": "http.response.body", "body": b""})

    async with running_server(app) as server:
        client = await connect(server.port)
        await client.stream.send_all(GET + GET)
        [response] = await client.responses(1)
        assert response.status == 408
        assert await client.closed()


class Forever:
    """A handler that would run forever; records its cancellation."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.cancelled = trio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
        self.started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled.set()
            raise


@pytest.mark.parametrize("path", ["/", "/stream"])
async def test_client_leaving_cancels_handler_and_logs_499(
    path: str, caplog: pytest.LogCaptureFixture, connect: Connect
) -> None:
    app = Forever()
    access = logging.getLogger("test.framing.access")
    with caplog.at_level("INFO", logger=access.name):
        async with running_server(app, config(accesslog=access)) as server:
            client = await connect(server.port)
            await client.stream.send_all(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
            with trio.fail_after(5):
                await app.started.wait()
            await client.stream.aclose()
            with trio.fail_after(1):  # generous for a busy machine; measured about 1 ms
                await app.cancelled.wait()
    lines = [r.getMessage() for r in caplog.records if r.name == access.name]
    assert len(lines) == 1
    assert f'"GET {path} 1.1" 499' in lines[0]


async def test_head_must_arrive_within_header_timeout(connect: Connect) -> None:
    async with running_server(App(), header_timeout=0.5) as server:
        client = await connect(server.port)
        start = trio.current_time()
        # A byte every 0.1 s: a deadline restarted per byte would never fire.
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            try:
                await client.stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                break
            await trio.sleep(0.1)
            if client.data or trio.current_time() - start > 3:
                break
            with trio.move_on_after(0):
                client.data += await client.stream.receive_some(65536)
        [response] = await client.responses(1)
        assert response.status == 408
        assert 0.4 < trio.current_time() - start < 3
        assert await client.closed()


async def test_idle_gap_between_requests_is_the_keep_alive_timeout(connect: Connect) -> None:
    async with running_server(App(), config(keep_alive_timeout=5), header_timeout=0.3) as server:
        client = await connect(server.port)
        await client.stream.send_all(GET)
        await client.responses(1)
        await trio.sleep(0.6)  # idle, past the header timeout: still open
        assert await still_serves(client)


async def test_fast_sender_is_back_pressured(connect: Connect) -> None:
    release = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await release.wait()  # reads nothing

    async with running_server(app) as server:
        client = await connect(server.port)
        size = 200 * 2**20
        await client.stream.send_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
        )
        sent = 0
        block = b"x" * 2**16
        with trio.move_on_after(1.5):
            while sent < size:
                await client.stream.send_all(block)
                sent += len(block)
        assert sent < 32 * 2**20  # kernel buffers and HIGH_WATER, not the whole body
        release.set()
        await client.stream.aclose()


async def test_slow_request_outlives_the_keep_alive_deadline(connect: Connect) -> None:
    # The keep-alive deadline passes while the handler runs: the request is
    # answered all the same, and the idle connection closes after it.
    async with running_server(App(), config(keep_alive_timeout=0.2)) as server:
        client = await connect(server.port)
        await client.stream.send_all(b"GET /slow?s=0.6 HTTP/1.1\r\nHost: x\r\n\r\n")
        [response] = await client.responses(1)
        assert response.body == b"slept"
        answered = trio.current_time()
        assert await client.closed()
        assert trio.current_time() - answered < 2


async def test_h2c_upgrade_is_handed_to_hypercorn(connect: Connect) -> None:
    async with running_server(App()) as server:
        client = await connect(server.port)
        h2 = h2_connection(client_side=True)
        settings = h2.initiate_upgrade_connection()
        await client.stream.send_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, "
            b"HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\n\r\n"
        )
        with trio.fail_after(5):
            while b"\r\n\r\n" not in client.data:
                client.data += await client.stream.receive_some(65536)
        head, _, rest = client.data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        await client.stream.send_all(h2.data_to_send())
        body = b""
        events = h2.receive_data(rest)
        with trio.fail_after(5):
            while not any(isinstance(e, h2_events.StreamEnded) for e in events):
                body += b"".join(e.data for e in events if isinstance(e, h2_events.DataReceived))
                await client.stream.send_all(h2.data_to_send())
                events = h2.receive_data(await client.stream.receive_some(65536))
        body += b"".join(e.data for e in events if isinstance(e, h2_events.DataReceived))
        assert body == b"hello"


def h2_connection(client_side: bool) -> Any:
    import h2.config
    import h2.connection

    return h2.connection.H2Connection(h2.config.H2Configuration(client_side=client_side))


async def test_client_leaving_over_tls_cancels_handler(tls_files: TLSFiles) -> None:
    app = Forever()
    async with running_server(app, tls_files.config(), tls=tls_files) as server:
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1",
            server.port,
            ssl_context=tls_files.client_context(),
            https_compatible=True,
        )
        try:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with trio.fail_after(5):
                await app.started.wait()
        finally:
            await trio.aclose_forcefully(stream)
        with trio.fail_after(1):  # generous for a busy machine
            await app.cancelled.wait()
