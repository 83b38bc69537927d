"""hypercorn's own trio connection, kept as the fallback (``transport="hypercorn"``).

The lean transport (``_transport``) is the default; this path serves each
connection with hypercorn's ``TCPServer`` as hypercorn's trio worker would,
with two changes the runner needs: an error escaping one connection stays in
that connection, and the drain race below is closed.
"""

from __future__ import annotations

import trio

from ._hypercorn import (
    AppWrapper,
    Closed,
    Config,
    ConnectionState,
    Event,
    LifespanState,
    StockTCPServer,
    WorkerContext,
    protocol_is_idle,
)
from ._transport import contained


class _DrainSafeTCPServer(StockTCPServer):
    """hypercorn's connection, minus two faults of its drain.

    **A closed connection that kept reading.** A keep-alive client that sends
    its next request the moment a response arrives catches the drain between
    two requests: hypercorn's HTTP/1.1 protocol has already read the new
    request (h11 says PAUSED until the cycle ends), then ends the cycle by
    closing the connection because the server is terminating, and goes back
    to waiting for PAUSED to clear, which never happens. The read loop is
    stuck inside the protocol, so the connection lived until
    ``graceful_timeout`` cancelled it (3.15 s instead of 0.13 s under load).
    Here the read loop is cancelled the moment the protocol closes the
    connection: there is nothing left to read for.

    **A race that cut answered requests.
    When the drain starts, hypercorn wakes every connection's idle timer to
    close idle keep-alive connections. A request that arrives on such a
    connection at that very moment is parsed and answered, while the timer,
    already past its last checkpoint, closes the connection in a shielded
    scope: the client gets a 200 and then no body (found by the chaos suite's
    signal storms). Here the timer leaves a busy connection alone (the end of
    that request re-arms it and hypercorn closes the connection then), and an
    idle one is closed at the socket *before* any checkpoint, so no request
    can slip in between the decision and the close: it finds the connection
    closed and gets no answer at all, never half of one.
    """

    async def protocol_send(self, event: Event) -> None:
        await super().protocol_send(event)
        if isinstance(event, Closed):
            self.reading.cancel()

    async def idle_timeout(self) -> None:
        with trio.move_on_after(self.config.keep_alive_timeout):
            await self.context.terminated.wait()
        with trio.CancelScope(shield=True):
            if not protocol_is_idle(self.wrapper):
                return
            transport = getattr(self.stream, "transport_stream", self.stream)
            sock = getattr(transport, "socket", None)
            if sock is not None:
                sock.close()  # synchronous: wakes the reader with ClosedResourceError
            await self.close_from_server()


async def serve_stock_connection(
    app: AppWrapper,
    config: Config,
    context: WorkerContext,
    lifespan_state: LifespanState,
    stream: trio.abc.Stream,
    first: bytes = b"",
) -> None:
    """Serve one accepted stream with hypercorn's connection; its errors stay in it.
    (``first`` is always b"": the door, which reads first bytes, is the lean
    transport's.)"""
    async with contained(stream):
        await _DrainSafeTCPServer(
            app,
            config,
            context,
            ConnectionState(lifespan_state.copy()),
            stream,
        ).run()
