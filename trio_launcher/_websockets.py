"""WebSocket sessions at the drain: closed with 1012 (Service Restart), at once.

A WebSocket session is a request that never ends by itself. Without this a
drain waited the whole ``graceful_timeout`` for every open session and then
cut it (the client saw 1011, Internal Error, or a bare close of the TCP
connection), and the app was never told the server was going away. uvicorn
closes its sessions with 1012 at shutdown; so does the runner, from the
moment the drain starts:

* the client gets a close frame with code 1012 and reason "server
  restarting", so it reconnects, to another instance;
* the app's ``receive`` gives ``websocket.disconnect`` with code 1012 (when
  the client answers the close, at once for any client that follows RFC 6455);
* an app ``send`` after that raises :class:`SessionClosed`, an ``OSError`` as
  the ASGI spec asks (Starlette turns it into ``WebSocketDisconnect``); a
  ``websocket.close`` of its own is taken as done;
* a session accepted after the drain started is closed the same way as soon
  as it is accepted.

A session whose client never answers the close is still cut by the drain
deadline, as any request.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import trio

from ._bounds import Message, Receive, Scope

log = logging.getLogger("trio_launcher")

SERVICE_RESTART = 1012  # RFC 6455 registry: the server is restarting
REASON = "server restarting"

Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class SessionClosed(OSError):
    """The runner closed this WebSocket session for the drain (code 1012)."""


class WebSockets:
    """The open WebSocket sessions of one server; :meth:`run` closes them at the drain."""

    def __init__(self) -> None:
        self.sessions: set[_Session] = set()
        self.draining = False

    async def serve(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run ``app`` for one WebSocket session, known here until it ends."""
        session = _Session(self, receive, send)
        self.sessions.add(session)
        try:
            await app(scope, session.receive, session.send)
        finally:
            self.sessions.discard(session)

    async def run(self, drain: trio.Event) -> None:
        """Task: when ``drain`` is set, close every open session with 1012."""
        await drain.wait()
        self.draining = True
        sessions = [session for session in self.sessions if session.accepted]
        if sessions:
            log.info("closing %d WebSocket session(s) with 1012 (Service Restart)", len(sessions))
        async with trio.open_nursery() as nursery:
            for session in sessions:
                nursery.start_soon(session.close)


class _Session:
    """One session's ``receive`` and ``send``, as the app sees them."""

    __slots__ = ("_receive", "_send", "accepted", "closed", "ended", "registry", "sending", "sent")

    def __init__(self, registry: WebSockets, receive: Receive, send: Send) -> None:
        self.registry = registry
        self._receive = receive
        self._send = send
        self.accepted = False
        self.ended = False  # the app closed it, or the runner did
        self.closed = False  # the runner did (1012)
        self.sending = 0  # the app's sends under way
        self.sent: trio.Event | None = None  # set when they are done, for the close

    async def receive(self) -> Message:
        message = await self._receive()
        if self.closed and message["type"] == "websocket.disconnect":
            return {**message, "code": SERVICE_RESTART}
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.closed:
            if kind == "websocket.close":
                return  # closed already, by the runner
            raise SessionClosed(f"WebSocket closed by the server ({SERVICE_RESTART}, {REASON})")
        self.sending += 1
        try:
            await self._send(message)
        finally:
            self.sending -= 1
            if not self.sending and self.sent is not None:
                self.sent.set()
        if kind == "websocket.accept":
            self.accepted = True
            if self.registry.draining:
                await self.close()  # accepted during the drain: closed at once
        elif kind == "websocket.close":
            self.ended = True

    async def close(self) -> None:
        """Close with 1012 once the app's sends under way are done; refuse the rest."""
        if self.ended or not self.accepted:
            return
        self.ended = self.closed = True  # (from here on the app's sends are refused)
        while self.sending:
            self.sent = trio.Event()
            await self.sent.wait()
        message = {"type": "websocket.close", "code": SERVICE_RESTART, "reason": REASON}
        with contextlib.suppress(Exception):  # (the client may be gone: nothing to tell)
            await self._send(message)
