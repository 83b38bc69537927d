"""HTTP/2 control-frame floods: a PING or SETTINGS flood gets GOAWAY (ENHANCE_YOUR_CALM).

Each PING or SETTINGS frame makes the server queue an ACK. A peer that sends
them by the thousand and never reads the ACKs used to tie up its connection
for ever (the server's writes block, so it stops reading too): it stayed open
past 15 s with a keep-alive timeout of 1 s.
"""

from __future__ import annotations

from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import trio
import trio.testing

from trio_launcher._transport import ControlFrameBudget
from trio_launcher.testing import running_server

from .apps import App


def client() -> h2.connection.H2Connection:
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    return connection


def ping(connection: h2.connection.H2Connection) -> None:
    connection.ping(b"12345678")


def settings(connection: h2.connection.H2Connection) -> None:
    connection.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(10):
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:
            pass  # reset after the GOAWAY: what was read counts
    return data


@pytest.mark.parametrize("frame", [ping, settings], ids=["ping", "settings"])
async def test_a_control_frame_flood_gets_goaway_enhance_your_calm(
    frame: Callable[[h2.connection.H2Connection], None],
) -> None:
    async with running_server(App()) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        connection = client()
        for _ in range(ControlFrameBudget.BURST + 400):
            frame(connection)
        await stream.send_all(connection.data_to_send())
        events = connection.receive_data(await read_to_eof(stream))
        await stream.aclose()
        ends = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert [e.error_code for e in ends] == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]
        assert (await server.client.get("/")).text == "hello"  # others are served


async def test_a_flood_that_never_reads_is_closed() -> None:
    async with running_server(App()) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        connection = client()
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):  # closed by the server
            while True:
                for _ in range(100):
                    ping(connection)
                await stream.send_all(connection.data_to_send())
        await trio.aclose_forcefully(stream)


async def test_a_client_within_the_budget_is_answered() -> None:
    async with running_server(App()) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        connection = client()
        for _ in range(20):
            ping(connection)
        await stream.send_all(connection.data_to_send())
        acks = 0
        with trio.fail_after(10):
            while acks < 20:
                events = connection.receive_data(await stream.receive_some(65536))
                acks += sum(isinstance(e, h2.events.PingAckReceived) for e in events)
                assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
        await stream.aclose()


async def test_budget_burst_and_rate(autojump_clock: trio.testing.MockClock) -> None:
    budget = ControlFrameBudget()
    assert budget.allow(ControlFrameBudget.BURST)
    assert not budget.allow(1)
    await trio.sleep(1.0)
    assert budget.allow(int(ControlFrameBudget.RATE) - 1)  # a second refills RATE
