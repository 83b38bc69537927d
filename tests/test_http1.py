"""The HTTP/1.1 protocol on its own: bytes in, ASGI events and bytes out, no sockets."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from trio_launcher import OptionError, ServeOptions
from trio_launcher._cli import main
from trio_launcher._http1 import HIGH_WATER, HTTP1

from .http1_wire import protocol, responses

Message = dict[str, Any]


@dataclass
class Recorder:
    """An ASGI app that records what it sees and answers by path."""

    scopes: list[Message] = field(default_factory=list)
    received: list[Message] = field(default_factory=list)
    release: trio.Event = field(default_factory=trio.Event)
    cancelled: bool = False

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        path = scope["path"]
        if path == "/echo":
            body = b""
            while True:
                message = await receive()
                self.received.append(message)
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            await respond(send, body)
        elif path == "/wait":
            try:
                await self.release.wait()
            except trio.Cancelled:
                self.cancelled = True
                raise
            await respond(send, b"released")
        elif path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for chunk in (b"a", b"bb", b""):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif path == "/close":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"connection", b"close")],
                }
            )
            await send({"type": "http.response.body", "body": b"bye"})
        elif path == "/ignore-body":
            await respond(send, b"not read")
        elif path == "/raise":
            raise ValueError("boom")
        elif path == "/disconnect":
            await respond(send, b"ok", more=True)
            self.received.append(await receive())
            self.received.append(await receive())
        else:
            await respond(send, b"hello")


async def respond(send: Any, body: bytes, more: bool = False) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": more})


async def feed(http1: HTTP1, data: bytes) -> None:
    await http1.data_received(data)
    await trio.testing.wait_all_tasks_blocked()


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
CHUNKED_POST = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_hello_scope_and_response() -> None:
    app = Recorder()
    async with protocol(app) as (http1, transport):
        await feed(http1, b"GET /a%20b?q=1 HTTP/1.1\r\nHost: x\r\nX-Thing: v  \r\n\r\n")
        [scope] = app.scopes
        assert scope["type"] == "http"
        assert scope["http_version"] == "1.1"
        assert (scope["method"], scope["path"], scope["raw_path"]) == ("GET", "/a b", b"/a%20b")
        assert scope["query_string"] == b"q=1"
        assert scope["headers"] == [(b"host", b"x"), (b"x-thing", b"v")]
        assert scope["client"] == ("10.0.0.1", 5000)
        assert scope["server"] == ("127.0.0.1", 80)
        assert scope["scheme"] == "http"
        assert scope["state"] == {"k": 1}
        [response] = responses(transport.written)
        assert (response.status, response.body) == (200, b"hello")
        assert response.headers[b"content-length"] == b"5"
        assert b"connection" not in response.headers
        assert transport.written.startswith(b"HTTP/1.1 200 OK\r\n")
        assert transport.idle and not transport.closed


async def test_pipelined_requests_answered_in_order_one_at_a_time() -> None:
    app = Recorder()
    async with protocol(app) as (http1, transport):
        await feed(http1, b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n" + GET)
        assert [s["path"] for s in app.scopes] == ["/wait"]  # the second waits its turn
        assert http1.paused  # and the socket is not read meanwhile
        app.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert [r.body for r in responses(transport.written)] == [b"released", b"hello"]
        assert not http1.paused and not transport.closed


async def test_connection_close_answers_first_and_discards_the_rest() -> None:
    app = Recorder()
    async with protocol(app) as (http1, transport):
        await feed(http1, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + GET)
        [response] = responses(transport.written)
        assert response.status == 200
        assert response.headers[b"connection"] == b"close"
        assert transport.closed
        assert len(app.scopes) == 1


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="cl-and-te",
        ),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="missing-host"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", id="repeated-host"),
        pytest.param(b"GET / HTTP/1.1\nHost: x\n\n", id="bare-lf"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", id="obs-fold"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n",
            id="obs-fold-te",
        ),
        pytest.param(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", id="http-2.0"),
        pytest.param(b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", id="http-1.2"),
        pytest.param(b"GET /\r\n\r\n", id="http-0.9"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nabc\r\n0\r\n\r\n",
            id="bad-chunk-size",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            id="two-content-lengths",
        ),
        pytest.param(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", id="space-before-colon"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", id="nul-in-value"),
    ],
)
async def test_bad_requests_get_400_and_close(request_bytes: bytes) -> None:
    app = Recorder()
    async with protocol(app) as (http1, transport):
        await feed(http1, request_bytes)
        [response] = responses(transport.written)
        assert response.status == 400
        assert response.headers[b"connection"] == b"close"
        assert transport.closed
        assert app.scopes == []


async def test_http10_without_host_is_fine() -> None:
    async with protocol(Recorder()) as (http1, transport):
        await feed(http1, b"GET / HTTP/1.0\r\n\r\n")
        [response] = responses(transport.written)
        assert response.status == 200
        assert transport.closed  # HTTP/1.0 without keep-alive


async def test_http10_keep_alive_serves_pipelined_requests() -> None:
    app = Recorder()
    request = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    async with protocol(app) as (http1, transport):
        await feed(http1, request * 2)
        got = responses(transport.written)
        assert [r.status for r in got] == [200, 200]
        assert got[0].headers[b"connection"] == b"keep-alive"
        assert not transport.closed


async def test_head_too_large_gets_431_and_close() -> None:
    async with protocol(Recorder(), h11_max_incomplete_size=1024) as (http1, transport):
        await feed(http1, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
        assert responses(transport.written)[0].status == 431
        assert transport.closed


async def test_unfinished_head_over_the_limit_gets_431() -> None:
    async with protocol(Recorder(), h11_max_incomplete_size=1024) as (http1, transport):
        await feed(http1, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 600)
        assert not transport.closed
        await feed(http1, b"a" * 600)  # never ends: the buffer is bounded all the same
        assert responses(transport.written)[0].status == 431
        assert transport.closed


async def test_head_response_has_no_body() -> None:
    async with protocol(Recorder()) as (http1, transport):
        await feed(http1, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n" + GET)
        data = bytes(transport.written)
        first, second = data.split(b"HTTP/1.1 200 OK\r\n")[1:]
        assert first.endswith(b"\r\n\r\n")  # the HEAD answer: a head only
        assert second.endswith(b"\r\n\r\nhello")


async def test_streamed_response_is_chunked() -> None:
    async with protocol(Recorder()) as (http1, transport):
        await feed(http1, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        [response] = responses(transport.written)
        assert response.headers[b"transfer-encoding"] == b"chunked"
        assert response.body == b"abb"
        assert transport.written.endswith(b"0\r\n\r\n")
        assert b"\r\n0\r\n\r\n" not in transport.written[:-5]  # an empty body sent no chunk


async def test_streamed_response_to_http10_ends_with_the_connection() -> None:
    async with protocol(Recorder()) as (http1, transport):
        await feed(http1, b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        [response] = responses(transport.written)
        assert response.body == b"abb"
        assert response.headers[b"connection"] == b"close"
        assert transport.closed


async def test_chunked_request_body_with_trailers() -> None:
    app = Recorder()
    async with protocol(app) as (http1, transport):
        body = b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
        await feed(http1, CHUNKED_POST + body + GET)
        got = responses(transport.written)
        assert [r.body for r in got] == [b"abcde", b"hello"]
        assert app.scopes[0]["headers"] == [(b"host", b"x"), (b"transfer-encoding", b"chunked")]


async def test_body_arrives_in_pieces() -> None:
    app = Recorder()
    async with protocol(app) as (http1, transport):
        await feed(http1, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nab")
        await feed(http1, b"cd")
        await feed(http1, b"ef")
        assert [m["body"] for m in app.received] == [b"ab", b"cd", b"ef"]
        assert [m["more_body"] for m in app.received] == [True, True, False]
        assert responses(transport.written)[0].body == b"abcdef"


async def test_expect_100_continue_only_when_the_body_is_read() -> None:
    head = b"POST /%s HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    async with protocol(Recorder()) as (http1, transport):
        await feed(http1, head % b"echo")
        assert transport.written == b"HTTP/1.1 100 Continue\r\n\r\n"
        await feed(http1, b"abc")
        assert [r.status for r in responses(transport.written)] == [100, 200]
    async with protocol(Recorder()) as (http1, transport):
        await feed(http1, head % b"ignore-body")
        [response] = responses(transport.written)
        assert response.status == 200  # no 100: the app never asked for the body
        assert response.headers[b"connection"] == b"close"  # the unread body is in the way
        assert transport.closed


async def test_body_faster_than_the_app_reads_pauses_reading() -> None:
    app = Recorder()
    async with protocol(app) as (http1, _):
        size = 4 * HIGH_WATER
        await feed(http1, b"POST /wait HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        await feed(http1, b"x" * (HIGH_WATER + 1))
        assert http1.paused  # the app has not read: the transport must stop reading


async def test_client_gone_mid_response_delivers_disconnect_and_logs_499(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Recorder()
    async with protocol(app, accesslog=logging.getLogger("test.access")) as (http1, _):
        await feed(http1, b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        with caplog.at_level("INFO", logger="test.access"):
            await http1.connection_lost(499)
        assert any('"GET /wait 1.1" 499' in r.getMessage() for r in caplog.records)


async def test_receive_after_response_is_disconnect() -> None:
    app = Recorder()
    async with protocol(app) as (http1, _):
        await feed(http1, b"GET /disconnect HTTP/1.1\r\nHost: x\r\n\r\n")
        assert app.received[0] == {"type": "http.request", "body": b"", "more_body": False}
        assert app.received[1:] == []  # waits: the body was delivered, the response goes on
        await http1.connection_lost(499)
        await trio.testing.wait_all_tasks_blocked()
        assert app.received[1] == {"type": "http.disconnect"}


async def test_app_connection_close_header_closes() -> None:
    async with protocol(Recorder()) as (http1, transport):
        await feed(http1, b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n" + GET)
        [response] = responses(transport.written)
        assert response.body == b"bye"
        assert transport.closed


async def test_app_error_before_the_response_is_500() -> None:
    async with protocol(Recorder()) as (http1, transport):
        await feed(http1, b"GET /raise HTTP/1.1\r\nHost: x\r\n\r\n")
        [response] = responses(transport.written)
        assert response.status == 500
        assert transport.closed


async def test_error_in_a_pipelined_request_is_answered_after_the_first() -> None:
    app = Recorder()
    async with protocol(app) as (http1, transport):
        await feed(http1, b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n\r\n")
        assert not transport.closed and http1.paused
        app.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert [r.status for r in responses(transport.written)] == [200, 400]
        assert transport.closed


async def test_websocket_upgrade_is_handed_over_with_its_bytes() -> None:
    app = Recorder()
    async with protocol(app) as (http1, _):
        await feed(
            http1,
            b"GET /ws?a=1 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\nFRAME",
        )
        assert app.scopes == []
        assert http1.upgrade == (
            b"GET /ws?a=1 HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\n"
            b"upgrade: websocket\r\n\r\nFRAME"
        )


async def test_http2_preface_is_handed_over() -> None:
    async with protocol(Recorder()) as (http1, _):
        await feed(http1, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert http1.upgrade == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


async def test_absolute_form_target() -> None:
    app = Recorder()
    async with protocol(app) as (http1, _):
        await feed(http1, b"GET http://x/p/q?z=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (app.scopes[0]["path"], app.scopes[0]["query_string"]) == ("/p/q", b"z=1")


async def test_head_timeout_answer_only_while_a_head_arrives() -> None:
    async with protocol(Recorder()) as (http1, transport):
        assert http1.timed_out() is None  # idle: a keep-alive timeout closes silently
        await feed(http1, b"GET / HTTP/1.1\r\nHo")
        assert transport.heads == 1
        refusal = http1.timed_out()
        assert refusal is not None and refusal.startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(b"x", b"a\r\nset-cookie: evil")], id="crlf-inside"),
        pytest.param([(b"x", b"evil\r\n")], id="crlf-at-the-end"),
        pytest.param([(b"a", b"fine"), (b"x", bytearray(b"evil\x00"))], id="nul-in-a-later-one"),
        pytest.param([(b"x", b" \tevil\n")], id="lf-after-spaces"),
    ],
)
async def test_invalid_response_header_is_refused(headers: list[tuple[bytes, Any]]) -> None:
    async def app(scope: Message, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    async with protocol(app) as (http1, transport):
        await feed(http1, GET)
        [response] = responses(transport.written)
        assert response.status == 500  # never the injected header
        assert b"evil" not in transport.written


# --- the option -------------------------------------------------------------------


def test_http_option_picks_the_protocol() -> None:
    assert ServeOptions().http1_protocol == "httptools"  # auto, lean transport
    assert ServeOptions(http="h11").http1_protocol == "h11"
    assert ServeOptions(transport="hypercorn").http1_protocol == "h11"
    with pytest.raises(OptionError, match=r"^http must be 'auto', 'httptools' or 'h11'"):
        ServeOptions(http="fast")  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"^http httptools needs the lean transport"):
        ServeOptions(http="httptools", transport="hypercorn")
    with pytest.raises(OptionError, match=r"^header_timeout must be > 0"):
        ServeOptions(header_timeout=0)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--http", "fast"], "invalid choice: 'fast'"),
        (["--header-timeout", "0"], "--header-timeout: '0' must be > 0"),
        (
            ["--http", "httptools", "--transport", "hypercorn"],
            "--http httptools needs the lean transport",
        ),
    ],
)
def test_cli_flags_refuse_bad_values(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tests.apps:app", "--bind", "127.0.0.1:0", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


async def test_unknown_server_name_gets_404_and_close() -> None:
    app = Recorder()
    async with protocol(app, server_names=["good"]) as (http1, transport):
        await feed(http1, b"GET / HTTP/1.1\r\nHost: evil\r\n\r\n")
        [response] = responses(transport.written)
        assert response.status == 404
        assert transport.closed and app.scopes == []
    async with protocol(Recorder(), server_names=["good"]) as (http1, transport):
        await feed(http1, b"GET / HTTP/1.1\r\nHost: good\r\n\r\n")
        assert responses(transport.written)[0].status == 200


async def test_keep_alive_max_requests_closes_after_the_last() -> None:
    async with protocol(Recorder(), keep_alive_max_requests=2) as (http1, transport):
        await feed(http1, GET * 3)
        got = responses(transport.written)
        assert [r.status for r in got] == [200, 200]
        assert got[1].headers[b"connection"] == b"close"
        assert transport.closed


async def test_raw_header_names_when_configured() -> None:
    app = Recorder()
    async with protocol(app, h11_pass_raw_headers=True) as (http1, _):
        await feed(http1, b"GET / HTTP/1.1\r\nHOST: x\r\nX-Mixed: v\r\n\r\n")
        assert app.scopes[0]["headers"] == [(b"HOST", b"x"), (b"X-Mixed", b"v")]
