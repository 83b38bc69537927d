"""Connections that arrive together are accepted together (``_accept``), and a
connection that ends is freed at once.

trio's ``serve_listeners`` took one connection per scheduler round, so the
last of a burst of connects waited one round for each before it: a fresh
server's first requests and a health probe during an overload waited 5-10x
the median. The rounds are counted with a trio instrument, not timed.
"""

from __future__ import annotations

import gc
import socket
import weakref
from typing import Any

import pytest
import trio

from trio_launcher import _http1, _transport
from trio_launcher.testing import running_server

from .apps import App

BURST = 60  # below hypercorn's default listen backlog (100): the kernel completes every connect


class Rounds(trio.abc.Instrument):
    """Counts the scheduler's trips through the run loop (one I/O wait each)."""

    def __init__(self) -> None:
        self.count = 0

    def before_io_wait(self, timeout: float) -> None:
        self.count += 1


async def rounds_until_answered(sock: socket.socket) -> int:
    rounds = Rounds()
    trio.lowlevel.add_instrument(rounds)
    try:
        with trio.fail_after(10):
            while True:
                try:
                    if sock.recv(65536, socket.MSG_PEEK):
                        return rounds.count
                except BlockingIOError:
                    pass
                await trio.lowlevel.checkpoint()  # one round: the server's tasks run
    finally:
        trio.lowlevel.remove_instrument(rounds)


@pytest.mark.parametrize("transport", ["lean", "hypercorn"])
async def test_a_burst_of_connects_is_accepted_at_once(transport: str) -> None:
    async with running_server(App(), transport=transport) as server:
        # Blocking connects from this task: no scheduler round passes between
        # them, so all of them wait in the listen backlog together.
        socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(BURST)]
        try:
            last = socks[-1]
            last.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            last.setblocking(False)
            rounds = await rounds_until_answered(last)
            # One connection per round would take more than BURST rounds.
            assert rounds < 15, f"the last of {BURST} connects was answered after {rounds} rounds"
            last.setblocking(True)
            last.settimeout(5)
            assert last.recv(65536).startswith(b"HTTP/1.1 200")
        finally:
            for sock in socks:
                sock.close()


class Kept:
    """Weak references to every object of ``cls`` made while it is patched in."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: Any, method: str) -> None:
        self.refs: list[weakref.ref[Any]] = []
        original = getattr(cls, method)
        refs = self.refs

        def record(obj: Any, *args: Any, **kwargs: Any) -> None:
            original(obj, *args, **kwargs)
            refs.append(weakref.ref(obj))

        monkeypatch.setattr(cls, method, record)

    def alive(self) -> list[Any]:
        return [obj for obj in (ref() for ref in self.refs) if obj is not None]


@pytest.mark.parametrize("options", [{}, {"limit_concurrency": 10}], ids=["plain", "limit"])
async def test_a_connection_that_ends_needs_no_garbage_collection(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    """Every connection used to end as a reference cycle (its HTTP/1.1 protocol and the
    parser that calls it back; the connection and the bound method it keeps to call on
    loss), so its objects, about 35 with the task and the nursery, stayed until the
    garbage collector's next full pass: under a burst of short connections, memory the
    server could have reused at once."""
    connections = Kept(monkeypatch, _transport.Connection, "__post_init__")
    protocols = Kept(monkeypatch, _http1.HTTP1, "__init__")
    async with running_server(App(), **options) as server:
        gc.collect()
        gc.disable()
        try:
            with trio.fail_after(10):
                for _ in range(3):
                    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                    async with stream:
                        await stream.send_all(
                            b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
                        )
                        answer = b"".join([chunk async for chunk in stream])
                    assert answer.startswith(b"HTTP/1.1 200 ")
                    silent = await trio.open_tcp_stream("127.0.0.1", server.port)
                    await silent.aclose()  # (a client that leaves before a word)
                await trio.testing.wait_all_tasks_blocked()
            # (with a limit, a client that leaves before a word never gets a connection:
            # it waited in the door's room)
            assert len(connections.refs) >= (3 if options else 6)
            assert len(protocols.refs) >= 3
            assert connections.alive() == []
            assert protocols.alive() == []
        finally:
            gc.enable()
