"""Drains: under keep-alive load (both transports), and after max_requests.

Clients that send their next request the moment a response arrives catch the
drain between two requests. hypercorn's HTTP/1.1 protocol then parks the
connection (h11 PAUSED) after it has closed it, and the stock path used to
wait out the whole ``graceful_timeout`` (3.15 s against 0.13 s).
"""

from __future__ import annotations

import httpx
import pytest
import trio
from hypercorn.config import Config

from trio_launcher.testing import running_server

from .apps import App

GRACEFUL = 10.0
REQUEST = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"


async def keep_asking(port: int, answered: list[int]) -> None:
    """Send the next request as soon as the last response is complete, until EOF."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    buffer = b""
    with trio.move_on_after(GRACEFUL * 2):
        try:
            while True:
                await stream.send_all(REQUEST)
                while not buffer.endswith(b"hello"):
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buffer += chunk
                buffer = b""
                answered.append(1)
        except trio.BrokenResourceError:
            return
        finally:
            await trio.aclose_forcefully(stream)


@pytest.mark.parametrize("transport", ["lean", "hypercorn"])
async def test_drain_under_keep_alive_load_does_not_wait_out_the_deadline(
    transport: str,
) -> None:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = GRACEFUL
    answered: list[int] = []
    async with trio.open_nursery() as nursery:
        async with running_server(App(), config, transport=transport) as server:
            for _ in range(16):
                nursery.start_soon(keep_asking, server.port, answered)
            with trio.fail_after(30):
                while len(answered) < 200:  # every client is in its loop
                    await trio.sleep(0.01)
            server.handle.shutdown()
            started = trio.current_time()
        drained = trio.current_time() - started
    # Nothing is in flight for long (each request takes microseconds): the drain
    # ends as soon as every connection finished its request, far from the deadline.
    assert drained < GRACEFUL / 2, drained


async def test_max_requests_drains() -> None:
    # Lean transport only: hypercorn 0.18 never counts requests, so the stock
    # path's max_requests is inert (README, docs/transports.md).
    config = Config.from_mapping(max_requests=3, max_requests_jitter=0, keep_alive_timeout=30)
    config.bind = ["127.0.0.1:0"]
    with trio.fail_after(10):
        async with running_server(App(), config, transport="lean") as server:
            answered = 0
            for _ in range(6):
                try:
                    answered += (await server.client.get("/")).text == "hello"
                except httpx.TransportError:
                    break  # the listener closed: the drain started
            assert answered >= 3
            while not server.handle.stopping:
                await trio.sleep(0.01)
