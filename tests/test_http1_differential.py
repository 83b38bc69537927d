"""Differential test: the same bytes to hypercorn's H11Protocol and to ours.

For every request both accept, the app must see the same scope and the same
body. Every case where the two differ is listed in ``DIFFERENCES`` with the RFC
reason ours is right; a difference not in the table fails. Hypothesis adds
generated valid requests (both must serve them identically) and mutated ones
(ours may refuse what h11 accepts, never the other way round unless listed, and
every refusal closes the connection).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_launcher._transport import LeanTaskGroup

from .http1_wire import protocol, responses

SCOPE_KEYS = ("method", "path", "raw_path", "query_string", "http_version", "headers")


@dataclass
class Outcome:
    """What the app saw and what the client got."""

    requests: list[tuple[Any, ...]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    closed: bool = False


def recording_app(outcome: Outcome) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        outcome.requests.append((*(scope[k] for k in SCOPE_KEYS), body))
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def run_ours(data: bytes) -> Outcome:
    outcome = Outcome()
    app = recording_app(outcome)
    async with protocol(app, client=("1.2.3.4", 1), server=("5.6.7.8", 2), state={}) as (
        http1,
        transport,
    ):
        await http1.data_received(data)
        for _ in range(20):  # pipelined requests: each one's turn
            await trio.testing.wait_all_tasks_blocked()
            if transport.closed or not http1.paused:
                break
    outcome.statuses = [r.status for r in responses(transport.written) if r.status != 100]
    outcome.closed = transport.closed
    return outcome


async def run_hypercorn(data: bytes) -> Outcome:
    outcome = Outcome()
    config = Config.from_mapping({"include_date_header": False})  # as protocol() sets it
    app: Any = wrap_app(recording_app(outcome), config.wsgi_max_body_size, "asgi")
    written = bytearray()

    async def send(event: Event) -> None:
        if isinstance(event, RawData):
            written.extend(event.data)
        elif isinstance(event, Closed):
            outcome.closed = True

    async with trio.open_nursery() as nursery:
        group: Any = LeanTaskGroup(nursery)
        protocol = H11Protocol(
            app,
            config,
            WorkerContext(None),
            group,
            ConnectionState({}),
            False,
            ("1.2.3.4", 1),
            ("5.6.7.8", 2),
            send,
        )
        with trio.move_on_after(5):
            await protocol.handle(RawData(data))
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    outcome.statuses = [r.status for r in responses(written) if r.status != 100]
    return outcome


def both(data: bytes) -> tuple[Outcome, Outcome]:
    async def run() -> tuple[Outcome, Outcome]:
        return await run_hypercorn(data), await run_ours(data)

    return trio.run(run)


H = b"Host: x\r\n"

# (id, request bytes): requests on which both must agree exactly.
SAME = [
    ("get", b"GET /p?q=1 HTTP/1.1\r\n" + H + b"\r\n"),
    ("quoted-path", b"GET /a%20b%2F/c HTTP/1.1\r\n" + H + b"\r\n"),
    ("post-cl", b"POST /u HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello"),
    (
        "post-chunked",
        b"POST /u HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
    ),
    (
        "chunked-trailer",
        b"POST /u HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b"1\r\nx\r\n0\r\nX-T: 1\r\n\r\n",
    ),
    ("pipelined-2", b"GET /1 HTTP/1.1\r\n" + H + b"\r\nGET /2 HTTP/1.1\r\n" + H + b"\r\n"),
    ("header-ows", b"GET / HTTP/1.1\r\n" + H + b"X-A:   spaced  \r\nX-B:\tt\r\n\r\n"),
    ("header-case", b"GET / HTTP/1.1\r\nHOST: x\r\nX-Mixed-Case: V\r\n\r\n"),
    ("obs-text-value", b"GET / HTTP/1.1\r\n" + H + b"X: caf\xe9\r\n\r\n"),
    ("http10", b"GET / HTTP/1.0\r\n\r\n"),
    ("http10-host", b"GET / HTTP/1.0\r\n" + H + b"\r\n"),
    ("connection-close", b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"),
    ("missing-host", b"GET / HTTP/1.1\r\n\r\n"),
    ("repeated-host", b"GET / HTTP/1.1\r\n" + H + H + b"\r\n"),
    (
        "two-content-lengths",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    ),
    (
        "bad-chunk-size",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    ),
    ("te-gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nabc"),
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n"),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n"),
    ("non-ascii-target", b"GET /\xc3\xa9 HTTP/1.1\r\n" + H + b"\r\n"),
]

# The one table of differences: id -> (request, RFC reason ours is right).
DIFFERENCES: dict[str, tuple[bytes, str]] = {
    "cl-and-te": (
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 32\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n",
        "RFC 9112 6.3 (3): Transfer-Encoding with Content-Length may be smuggling; a server "
        "MUST close the connection after the response. h11 answers two requests, ours 400.",
    ),
    "bare-lf": (
        b"GET / HTTP/1.1\n" + b"Host: x\n\n",
        "RFC 9112 2.2: LF-only line endings MAY be accepted; front ends that disagree make "
        "smuggling possible, so ours refuses (as llhttp/Node.js and uvicorn do).",
    ),
    "obs-fold": (
        b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n b\r\n\r\n",
        "RFC 9112 5.2: obs-fold is deprecated; a server MUST reject it with 400 or unfold it. "
        "h11 unfolds, ours rejects.",
    ),
    "http-2.0-in-http1": (
        b"GET / HTTP/2.0\r\n" + H + b"\r\n",
        "RFC 9112 2.3: HTTP/2 does not use this syntax; h11 serves it as HTTP/1.1, ours 400.",
    ),
    "absolute-form": (
        b"GET http://x/p?q=1 HTTP/1.1\r\n" + H + b"\r\n",
        "RFC 9112 3.2.2: a server MUST accept absolute-form; the ASGI path is the path "
        "(h11 passes 'http://x/p' as the path).",
    ),
    "pipelined-after-close": (
        b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\nGET / HTTP/1.1\r\n" + H + b"\r\n",
        "RFC 9112 9.6: a server that receives close MUST NOT process further requests: ours "
        "answers the first and closes; h11 answered the extra bytes 400 instead of the 200.",
    ),
    "http10-keep-alive": (
        b"GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n"
        b"Connection: keep-alive\r\n\r\n",
        "RFC 9112 9.3 and C.2.2: HTTP/1.0 persistent connections with keep-alive; h11 "
        "does not do them (it answered the second request 400), ours serves both.",
    ),
    "lowercase-method": (
        b"get / HTTP/1.1\r\n" + H + b"\r\n",
        "RFC 9110 9.1: the method token is case-sensitive and an unknown method SHOULD get "
        "501; h11 uppercases 'get' and serves GET. (llhttp knows the registered methods only.)",
    ),
    "head-too-large": (
        b"GET / HTTP/1.1\r\n" + H + b"X: " + b"a" * 20000 + b"\r\n\r\n",
        "RFC 6585 5 (431, and close): config.h11_max_incomplete_size (16 KiB) is the head "
        "limit. h11 checks it only while a head is incomplete, so a 20 KB head that arrives "
        "in one read is served; ours bounds every head.",
    ),
}


def _served_alike(ours: Outcome, theirs: Outcome) -> None:
    assert ours.requests == theirs.requests
    assert ours.statuses == theirs.statuses
    assert ours.closed == theirs.closed


@pytest.mark.parametrize(("data"), [pytest.param(d, id=i) for i, d in SAME])
def test_same_outcome(data: bytes) -> None:
    theirs, ours = both(data)
    _served_alike(ours, theirs)


@pytest.mark.parametrize("case", sorted(DIFFERENCES))
def test_listed_differences_are_real_and_ours_refuses_or_serves_right(case: str) -> None:
    data, reason = DIFFERENCES[case]
    assert reason
    theirs, ours = both(data)
    assert (ours.requests, ours.statuses, ours.closed) != (
        theirs.requests,
        theirs.statuses,
        theirs.closed,
    )
    if ours.statuses and ours.statuses[-1] >= 400:
        assert ours.closed  # every refusal closes


# --- generated requests ----------------------------------------------------------

TOKEN = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=12
)
VALUE = st.text("".join(chr(c) for c in range(0x21, 0x7F)), max_size=20)
PATH = st.text("abcxyz0123456789-._~%!$&'()*+,;=:@/", max_size=20)


@st.composite
def valid_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    path = "/" + draw(PATH).replace("%", "%25")
    query = draw(st.one_of(st.just(""), VALUE.map(lambda v: "?" + v.replace("#", ""))))
    names = draw(st.lists(TOKEN, max_size=6))
    reserved = {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "expect",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
    }
    headers = [(n, draw(VALUE)) for n in names if n.lower() not in reserved]
    body = draw(st.binary(max_size=200)) if method in ("POST", "PUT", "PATCH") else b""
    chunked = bool(body) and draw(st.booleans())
    head = f"{method} {path}{query} HTTP/1.1\r\nHost: x\r\n"
    head += "".join(f"{n}: {v}\r\n" for n, v in headers)
    if chunked:
        cuts = sorted(draw(st.lists(st.integers(1, len(body)), max_size=4, unique=True)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + framed
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


SETTINGS = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@SETTINGS
@given(valid_requests())
def test_generated_valid_requests_are_served_alike(data: bytes) -> None:
    theirs, ours = both(data)
    assert len(ours.requests) == 1
    _served_alike(ours, theirs)


@SETTINGS
@given(valid_requests(), st.integers(0, 10_000), st.binary(min_size=1, max_size=3))
def test_generated_invalid_requests_ours_is_never_looser(
    data: bytes, where: int, junk: bytes
) -> None:
    where %= len(data)
    mutated = data[:where] + junk + data[where:]
    theirs, ours = both(mutated)
    if ours.statuses and ours.statuses[-1] >= 400:
        assert ours.closed  # every refusal closes
    for request in ours.requests:  # what ours serves, h11 serves the same way
        assert request in theirs.requests, (mutated, request, theirs)
