"""Turning a shed request away at the door: its 503 before the connection has a task.

Under overload (``limit_concurrency`` reached) nearly every new connection
carries a request that the runner's middleware sheds. Served the ordinary
way, each one cost a task, a socket stream, a protocol with its parser and a
trip through the middleware, about 0.77 million instructions (BENCHMARKS.md):
a burst of 2000 refused clients kept the server busy for half a second, a
health probe that connected during it waited behind all of it, and every
refused connection held its objects until its turn came.

So the door looks at a new connection's first bytes, on the way in. While
a concurrency limit is set, the accept loop reads the first bytes of every new
plain-TCP connection; one whose bytes are not in yet (a burst's clients
connect first and write later) waits for them in the waiting room
(``_accept.WaitingRoom``), without a task. If the server sheds when the bytes
are in, and they hold a whole HTTP/1.x request head that the middleware would
shed (``RunnerMiddleware.shed_at_door``: not the health or metrics path, not a
head the limits would refuse with 431 first), the door writes the 503 the
middleware would (``Retry-After``, the JSON body, a new request id,
``Connection: close``), counts and logs it like any other response, and the
socket closes: a few system calls, and no task, protocol or parser. What it
lets in gets its connection task with the bytes read, and counts against the
limit until it reaches the app (``let_in``, ``arrived``).

Everything else takes the ordinary way, where the middleware sheds it as
before: TLS and HTTP/2 (the bytes are no HTTP/1.x head), a head not all there
yet (not all in the first read), an ``Upgrade``, an ``X-Request-Id`` of its own
(to be kept and echoed), a proxy's ``X-Forwarded-*`` (the access line names
the forwarded client, ``_proxy``), a target that is not a plain path (the middleware
compares the decoded path).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Protocol

from ._bounds import RETRY_AFTER
from ._http1 import default_headers, status_line
from ._hypercorn import Config, logs_access
from ._logging import REQUEST_ID_HEADER, header_value

TAKE = 65536  # bytes read before the close (what the client sent with its request)

_VERSIONS = {b"HTTP/1.1": "1.1", b"HTTP/1.0": "1.0"}


class Shedder(Protocol):
    """What the door asks of the runner's middleware."""

    def shedding(self) -> bool: ...

    def let_in(self) -> None: ...

    def arrived(self) -> None: ...

    def shed_at_door(
        self, method: str, path: str, header_count: int, head_size: int
    ) -> tuple[bytes, bytes | None] | None: ...


class Door:
    """Answers a new connection's request with the 503 it would get anyway, or lets
    it in (see the module docstring).

    Args:
        config: the server's config (default headers, the access log).
        shedder: the runner's middleware.
    """

    def __init__(self, config: Config, shedder: Shedder) -> None:
        self.config = config
        self.shedding = shedder.shedding
        self.let_in = shedder.let_in
        self.arrived = shedder.arrived
        self._shed = shedder.shed_at_door
        self._logs_access = logs_access(config)  # (the statsd logger counts every response)
        self._body = b""
        self._head = b""
        self._headers: list[tuple[bytes, bytes]] = []

    async def turn_away(self, fd: int, head: bytes, client: Any, *, more: bool) -> bool:
        """Answer the request whose first bytes are ``head`` (read already) on
        the non-blocking socket ``fd`` with 503, if it is shed: True, and the caller
        closes the socket. False: serve it (nothing was read or written). ``more``: bytes
        may be waiting in the socket (the read of ``head`` filled its buffer)."""
        start = time.time()
        request = plain_head(head)
        if request is None:
            return False
        method, path, query, version, fields = request
        count = fields.count(b"\r\n") + 1 if fields else 0
        size = len(method) + len(path) + len(query) + len(fields) + 16  # (at least)
        answer = self._shed(method.decode(), path.decode(), count, size)
        if answer is None:
            return False
        body, id_line = answer
        if body is not self._body:  # (the same body every time: its head is made once)
            self._body = body
            self._headers = [
                (b"content-type", b"application/json"),
                (b"retry-after", RETRY_AFTER),
                (b"connection", b"close"),
                (b"content-length", b"%d" % len(body)),
            ]
            self._head = status_line(503) + b"".join(b"%s: %s\r\n" % h for h in self._headers)
        response = b"%s%s%s\r\n%s" % (
            self._head,
            id_line or b"",
            default_headers(self.config),
            b"" if method == b"HEAD" else body,
        )
        if more:
            with contextlib.suppress(OSError):
                os.read(fd, TAKE)  # read: the close then sends a FIN, not a reset
        with contextlib.suppress(OSError):  # the client left: nothing to say to it
            os.write(fd, response)  # (a new connection's buffer holds it)
        if self._logs_access:
            scope = {
                "type": "http",
                "http_version": _VERSIONS[version],
                "scheme": "http",
                "method": method.decode(),
                "path": path.decode(),
                "raw_path": path,
                "query_string": query,
                "root_path": self.config.root_path,
                "headers": _header_list(fields),
                "client": tuple(client[:2]) if isinstance(client, tuple) else None,
                "server": None,
            }
            headers = self._headers
            if id_line is not None:
                headers = [*headers, (REQUEST_ID_HEADER, header_value(id_line))]
            summary = {"status": 503, "headers": headers}
            await self.config.log.access(scope, summary, time.time() - start)  # type: ignore[arg-type]
        return True


def plain_head(data: bytes) -> tuple[bytes, bytes, bytes, bytes, bytes] | None:
    """``(method, path, query, version, header lines)`` if ``data`` starts with a whole
    HTTP/1.x request head the door may answer, else None (the ordinary way decides)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    line, _, fields = data[:end].partition(b"\r\n")
    words = line.split(b" ")
    if len(words) != 3 or words[2] not in _VERSIONS:
        return None
    method, target, version = words
    path, _, query = target.partition(b"?")
    if not (method.isalpha() and path[:1] == b"/" and path.isascii()) or b"%" in path:
        return None
    lowered = fields.lower()
    if b"upgrade:" in lowered or b"x-request-id:" in lowered or b"x-forwarded-" in lowered:
        return None  # (a proxy's request: its access line names the forwarded client)
    return method, path, query, version, fields


def _header_list(fields: bytes) -> list[tuple[bytes, bytes]]:
    headers = []
    for line in fields.split(b"\r\n") if fields else ():
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    return headers
