"""Connections that arrive together are accepted together (``_accept``).

trio's ``serve_listeners`` took one connection per scheduler round, so the
last of a burst of connects waited one round for each before it: a fresh
server's first requests and a health probe during an overload waited 5-10x
the median. The rounds are counted with a trio instrument, not timed.
"""

from __future__ import annotations

import socket

import pytest
import trio

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
