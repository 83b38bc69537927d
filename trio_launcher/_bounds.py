"""Per-request bounds, applied by the runner's middleware (``_asgi``).

Bounds live here, not in the connection layer, because here they mean the
same thing for every protocol: one HTTP/2 stream is one request, exactly as
one HTTP/1.1 request is, and the handler is a trio task we can cancel.

* **Load shedding** (``limit_concurrency``) counts *requests* in flight, not
  connections: 2000 clients that connect at once are 2000 connections, but
  only the requests beyond the limit are refused (uvicorn counts connections
  and refused all 2000). A refused request gets 503, ``Retry-After`` and a
  JSON body at once; nothing is queued, so overload costs no memory and the
  health path (exempt from the limit) stays fast.
* **Request deadline** (``request_timeout``): a request whose response has
  not started S seconds after it arrived has its handler cancelled (its
  nurseries too: it is plain trio cancellation) and is answered 504 with a
  JSON body; a started response (a stream) is never cut by it. How: the
  lean transport runs each handler in a cancel scope it holds (a runner's
  long-lived scope, on HTTP/1.1 and HTTP/2 alike) and lends the middleware
  that scope's ``cancel`` (``CANCEL_EXTENSION``); one task per server
  (``Deadlines``) sleeps until the oldest request's deadline and cancels it
  there. A request costs a dict insert and a delete, not a cancel scope and
  a deadline of its own (together about 10 % of a hello-world request).
  The body timeout uses the same lent ``cancel``. Only where nothing is lent
  (the stock transport) does the handler run in a cancel scope of the
  middleware's own, whose deadline is lifted when the response starts.
* **Body timeout** (``body_timeout``, mod_reqtimeout's rule): only the time
  the handler spends *waiting* in ``receive()`` for body bytes counts, and
  it may not exceed ``body_timeout + received / BODY_MIN_RATE`` seconds in
  total, nor ``body_timeout`` seconds for any one wait. A client that keeps
  up ``BODY_MIN_RATE`` (1 KiB/s) on average is never cut; a trickling or
  stalled one is answered 408 (with ``connection: close`` on HTTP/1.x) and
  the handler is cancelled. A handler that stops reading to think does not
  burn the client's allowance.
* **In-flight table**: every request is in it from arrival to the handler's
  return; the health JSON reports ``in_flight`` and ``oldest_request_s`` and
  a drain that reaches its deadline names what it cut.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import trio

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]


BODY_MIN_RATE = 1024.0
"""Bytes per second a request body must keep up on average, after the allowance."""


RETRY_AFTER = b"1"

CANCEL_EXTENSION = "trio_launcher.cancel"
"""ASGI scope extension: cancels the handler's scope (lent by the lean transport)."""

BODY_PENDING_EXTENSION = "trio_launcher.body_pending"
"""ASGI scope extension: True if the request body had not all arrived when the
handler was called (set by the lean transport, HTTP/1.1 and HTTP/2). A body that is all in
already has nothing left to trickle: it gets no body clock. Without it the
request headers say whether there is a body (``has_body``)."""


@dataclass(frozen=True)
class Bounds:
    """Per-request bounds (see the module docstring for the rules).

    Attributes:
        request_timeout: seconds for the response to start; None: no deadline.
        limit_concurrency: most requests in flight; more get 503 at once.
        body_timeout: the request body's allowance in seconds; None: no limit.
    """

    request_timeout: float | None = None
    limit_concurrency: int | None = None
    body_timeout: float | None = 60.0


class InFlight:
    """The requests now in the app: arrival time, method and path, oldest first.

    ``requests`` is the table itself (key -> (arrival, method, path)):
    ``len(in_flight.requests)`` counts without a Python call (the
    concurrency limit asks for every request).
    """

    def __init__(self) -> None:
        self.requests: dict[int, tuple[float, str, str]] = {}
        self._next = 0
        self.shed = 0  # requests refused by the concurrency limit
        self.coming = 0  # requests the door let in that have not reached the app yet

    def __len__(self) -> int:
        return len(self.requests)

    def add(self, method: str, path: str) -> int:
        key = self._next = self._next + 1
        self.requests[key] = (time.monotonic(), method, path)
        return key

    def remove(self, key: int) -> float:
        """The request is done; its arrival time (``time.monotonic()``)."""
        return self.requests.pop(key)[0]

    def oldest_age(self) -> float:
        """Seconds since the oldest request in flight arrived (0 when none is)."""
        for arrived, _, _ in self.requests.values():  # insertion order: oldest first
            return time.monotonic() - arrived
        return 0.0

    def describe(self, most: int = 5) -> str:
        """``GET /a, POST /b (and 3 more)``: the oldest requests in flight."""
        requests = self.requests
        items = [f"{method} {path}" for _, method, path in list(requests.values())[:most]]
        if len(requests) > most:
            items.append(f"and {len(requests) - most} more")
        return ", ".join(items)


class ClientGoneStatus(logging.Filter):
    """Access-log status 499 for a request whose client left before its response ended.

    hypercorn logs such a request with status ``-``. It is nginx's 499 (Client
    Closed Request), unless ``cutting()`` says the drain deadline passed: then
    the server cut it, and ``-`` stays.
    """

    def __init__(self, cutting: Callable[[], bool]) -> None:
        super().__init__()
        self.cutting = cutting

    def filter(self, record: logging.LogRecord) -> bool:
        atoms = record.args
        if isinstance(atoms, MutableMapping) and atoms.get("s") == "-" and not self.cutting():
            atoms["s"], atoms["st"] = "499", "Client Closed Request"
        return True


class StreamReset:
    """HTTP/2: cancel the handler when the client resets its stream.

    When a client closes the *connection*, the transport cancels every handler
    on it. A reset stream (``RST_STREAM``, connection kept) only queues
    ``http.disconnect`` for a handler that calls ``receive()``, and one busy
    with the engine never does. So for HTTP/2 a small task reads ``receive()``
    on the handler's behalf (in order, one message ahead) and cancels the
    handler if the disconnect comes before its response ended (after that,
    ASGI lets a handler run on: background tasks). One task per HTTP/2
    request, on the stock transport only: the lean transport cancels a reset
    stream's handler itself (``_transport._Handler``).
    """

    def __init__(
        self, receive: Receive, scope: trio.CancelScope, complete: Callable[[], bool]
    ) -> None:
        self._receive = receive
        self._scope = scope
        self._complete = complete
        self._to_app, self._from_pump = trio.open_memory_channel[Message](1)
        self.gone = False

    async def pump(self) -> None:
        async with self._to_app:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    if not self._complete():
                        self.gone = True
                        self._scope.cancel()
                    await self._to_app.send(message)
                    return
                await self._to_app.send(message)

    async def receive(self) -> Message:
        try:
            return await self._from_pump.receive()
        except trio.EndOfChannel:
            return {"type": "http.disconnect"}


class Deadlines:
    """The request deadline for requests the connection can cancel (see above).

    ``request_timeout`` is the same for every request, so arrival order is
    deadline order: the table is a dict in insertion order, and the reaper
    (``run``, one task) sleeps until its first entry is due (or, with none,
    for one timeout: nothing armed meanwhile is due sooner). An entry leaves
    when the response starts or the handler returns; one that is due is
    cancelled and remembered in ``fired`` until the middleware has answered.
    """

    __slots__ = ("armed", "fired", "now", "running", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.armed: dict[int, tuple[float, Callable[[], object]]] = {}
        """Key -> (due, cancel); the middleware's ``send`` pops a started response's entry."""
        self.now: Callable[[], float] = trio.current_time
        """The clock of ``arm`` (the middleware also arms inline, with this clock)."""
        self.fired: set[int] = set()
        self.running = False  # without the reaper, the middleware uses a scope per request

    def arm(self, key: int, cancel: Callable[[], object]) -> None:
        self.armed[key] = (self.now() + self.timeout, cancel)

    def disarm(self, key: int) -> None:
        self.armed.pop(key, None)

    async def run(self) -> None:
        """Cancel each request whose deadline passed; runs until cancelled."""
        armed = self.armed
        # The run's clock, asked directly: a sixth of trio.current_time()'s cost.
        self.now = trio.lowlevel.current_clock().current_time
        self.running = True
        try:
            await self._reap(armed)
        finally:
            self.running = False

    async def _reap(self, armed: dict[int, tuple[float, Callable[[], object]]]) -> None:
        while True:
            if not armed:
                # Nothing armed now is due before a timeout from now: sleep that long
                # rather than be woken by the next arm (a task switch per request
                # when requests come one at a time: 15 % of a hello world's cost).
                await trio.sleep(self.timeout)
                continue
            key = next(iter(armed))
            due, cancel = armed[key]
            if trio.current_time() < due:
                await trio.sleep_until(due)
                continue
            del armed[key]
            self.fired.add(key)
            cancel()


class BodyTimeoutError(Exception):
    """A request body stalled after its response had started: the response is cut."""


class BodyClock:
    """``receive()`` with the body timeout (the rule is in the module docstring)."""

    __slots__ = ("_receive", "cancel", "done", "received", "timed_out", "timeout", "waited")

    def __init__(self, receive: Receive, timeout: float, cancel: Callable[[], object]) -> None:
        self._receive = receive
        self.timeout = timeout
        self.cancel = cancel  # cancels the handler
        self.received = 0
        self.waited = 0.0
        self.done = False
        self.timed_out = False

    def is_late(self) -> bool:
        """For the response start: True if the body timed out (the request is cut)."""
        return self.timed_out

    async def receive(self) -> Message:
        if self.done:
            return await self._receive()
        began = trio.current_time()
        allowance = min(self.timeout, self.timeout + self.received / BODY_MIN_RATE - self.waited)
        with trio.move_on_at(began + max(allowance, 0.0)) as waiting:
            message = await self._receive()
        self.waited += trio.current_time() - began
        if waiting.cancelled_caught:
            self.timed_out = self.done = True
            self.cancel()
            await trio.lowlevel.checkpoint()  # raises Cancelled unless the handler shields
            return {"type": "http.disconnect"}
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
        else:
            self.done = True
        return message


def has_body(scope: Scope) -> bool:
    """An HTTP/1.x request that says it has a body (HTTP/2 is treated apart); the
    fallback where the protocol does not say ``BODY_PENDING_EXTENSION``."""
    for name, value in scope.get("headers") or ():
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return True
    return False


def is_http1(scope: Scope) -> bool:
    return str(scope.get("http_version", "1.1")).startswith("1")
