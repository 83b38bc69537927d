"""The drain's 1012 for WebSocket sessions, at the ASGI level (``_websockets``): the
orders a real server can hardly produce on demand (a send under way as the drain
starts, an accept during the drain). tests/test_transport.py and
tests/test_starlette.py show the same over real connections."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from trio_launcher._websockets import SessionClosed, WebSockets


class Peer:
    """The server side under the app: records what the app sends; ``hold`` makes the
    next ``websocket.send`` wait until set."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.inbox_send, self.inbox = trio.open_memory_channel[dict[str, Any]](10)
        self.hold: trio.Event | None = None

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.receive()

    async def send(self, message: Any) -> None:
        if message["type"] == "websocket.send" and self.hold is not None:
            await self.hold.wait()
        self.sent.append(dict(message))


async def test_a_send_under_way_goes_out_before_the_close_and_later_ones_are_refused() -> None:
    websockets, peer, drain = WebSockets(), Peer(), trio.Event()
    outcome: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "under way"})
        try:
            await send({"type": "websocket.send", "text": "too late"})
        except SessionClosed as closed:
            outcome.append(f"refused: {closed}")
            assert isinstance(closed, OSError)  # (the ASGI spec's kind: Starlette's 1006)
        await send({"type": "websocket.close", "code": 1000})  # closed already: taken as done
        outcome.append("returned")

    peer.hold = trio.Event()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(websockets.run, drain)
            nursery.start_soon(
                websockets.serve, app, {"type": "websocket"}, peer.receive, peer.send
            )
            await trio.testing.wait_all_tasks_blocked()  # the app's send waits in ``hold``
            drain.set()
            await trio.testing.wait_all_tasks_blocked()
            assert [m["type"] for m in peer.sent] == ["websocket.accept"]  # no close yet
            peer.hold.set()
    assert [m.get("text", m.get("code")) for m in peer.sent[1:]] == ["under way", 1012]
    assert outcome == [
        "refused: WebSocket closed by the server (1012, server restarting)",
        "returned",
    ]
    assert not websockets.sessions


@pytest.mark.parametrize("answer", ["websocket.disconnect", "websocket.receive"])
async def test_a_session_accepted_during_the_drain_is_closed_at_once(answer: str) -> None:
    """And the disconnect the app then reads says 1012 (a message still in flight
    before it is the client's and stays as it was)."""
    websockets, peer, drain = WebSockets(), Peer(), trio.Event()
    received: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "websocket.accept"})
        received.append(dict(await receive()))

    drain.set()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(websockets.run, drain)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(
                websockets.serve, app, {"type": "websocket"}, peer.receive, peer.send
            )
            await trio.testing.wait_all_tasks_blocked()
            assert peer.sent == [
                {"type": "websocket.accept"},
                {"type": "websocket.close", "code": 1012, "reason": "server restarting"},
            ]
            await peer.inbox_send.send({"type": answer, "code": 1000})
    expected = {"type": answer, "code": 1012 if answer == "websocket.disconnect" else 1000}
    assert received == [expected]


async def test_a_session_the_app_closed_itself_gets_no_second_close() -> None:
    websockets, peer, drain = WebSockets(), Peer(), trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 4000})
        await receive()  # (its client's answer)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(websockets.run, drain)
            nursery.start_soon(
                websockets.serve, app, {"type": "websocket"}, peer.receive, peer.send
            )
            await trio.testing.wait_all_tasks_blocked()
            drain.set()
            await trio.testing.wait_all_tasks_blocked()
            await peer.inbox_send.send({"type": "websocket.disconnect", "code": 4000})
    assert [m.get("code") for m in peer.sent] == [None, 4000]
