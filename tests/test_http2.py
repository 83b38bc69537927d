"""HTTP/2 on the lean transport: what goes on the wire for a response."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_launcher.testing import TLSFiles, running_server

from .apps import h2_read, open_client

BIG = 200_000  # more than the initial flow-control window (65,535): the end waits for it


async def sized(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b"x" * int(scope["path"].strip("/") or 5)
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize("size", [5, BIG])
async def test_the_last_data_frame_ends_the_stream(size: int) -> None:
    """hypercorn ended every response with an empty DATA frame of its own after the
    last body bytes: one more frame and one more write (a system call) per response.
    The last DATA frame carries END_STREAM now, also when flow control held it back."""
    async with running_server(sized) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        head = [(":method", "GET"), (":path", f"/{size}"), (":scheme", "http"), (":authority", "t")]
        conn.send_headers(1, head, end_stream=True)
        frames: list[tuple[int, bool]] = []  # (data length, ends the stream)
        async with stream:
            await stream.send_all(conn.data_to_send())
            with trio.fail_after(10):
                while not frames or not frames[-1][1]:
                    data = await stream.receive_some(65536)
                    assert data, "the server closed the connection"
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.DataReceived):
                            frames.append((len(event.data), event.stream_ended is not None))
                            conn.acknowledge_received_data(
                                event.flow_controlled_length, event.stream_id
                            )
                    await stream.send_all(conn.data_to_send())
    assert sum(length for length, _ in frames) == size
    assert frames[-1][0] > 0, f"an empty DATA frame ended the stream: {frames[-3:]}"
    assert [ends for _, ends in frames].count(True) == 1


async def failing(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/raise":
        raise ValueError("the handler failed")
    if scope["path"] == "/half":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise ValueError("the handler failed mid-response")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("secure", [False, True], ids=["h2c", "tls"])
@pytest.mark.parametrize("transport", ["lean", "hypercorn"])
async def test_a_failing_handler_ends_only_its_stream_and_its_runner_serves_on(
    transport: str, secure: bool, tmp_path: Path
) -> None:
    """A stream's end (hypercorn's closing ``send(None)``) is held back while its handler
    runs and sent once it returns: a handler that raises before its response gets a 500,
    one that raises mid-response has its stream cut, and the same connection (and its
    runner) serves the next stream. On the stock transport (hypercorn's own connection)
    the cut stream was left open: the client waited for ever."""
    tls = TLSFiles(tmp_path / "tls") if secure else None
    config = tls.config() if tls is not None else None
    async with running_server(failing, config, tls=tls, transport=transport) as server:
        stream = await open_client(server.port, tls, "h2")
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        statuses: dict[int, str] = {}
        ended: dict[int, str] = {}

        async def flush() -> None:
            await stream.send_all(conn.data_to_send())

        async with stream:
            with trio.fail_after(10):
                for stream_id, path in (
                    (1, "/half"),  # (in the connection's first bytes, with the preface)
                    (3, "/raise"),
                    (5, "/half"),
                    (7, "/"),
                    (9, "/raise"),
                    (11, "/"),
                ):
                    head = [
                        (":method", "GET"),
                        (":path", path),
                        (":scheme", "http"),
                        (":authority", "t"),
                    ]
                    conn.send_headers(stream_id, head, end_stream=True)
                    await flush()
                    while stream_id not in ended:
                        await h2_read(stream, conn, statuses, flush, ended)
    assert statuses == {1: "200", 3: "500", 5: "200", 7: "200", 9: "500", 11: "200"}
    assert ended == {1: "reset", 3: "ended", 5: "reset", 7: "ended", 9: "ended", 11: "ended"}


def test_the_encoder_cache_writes_what_hpack_writes() -> None:
    """The encoder's cache of fields sent as table indexes (``_never_index``) gives the
    same bytes as hpack's own encoder, block after block: across new dates and
    lengths, evictions (a small table), a resize from the peer's settings, huffman
    off, and sensitive headers; and a decoder reads them back."""
    import hpack

    from trio_launcher._hypercorn import _never_index

    plain, cached, decoder = hpack.Encoder(), hpack.Encoder(), hpack.Decoder()
    _never_index(cached, frozenset((b"x-request-id",)))
    for encoder in (plain, cached):
        encoder.header_table_size = 300  # a few entries: additions evict
    decoder.header_table_size = 300
    for i in range(200):
        if i == 120:
            for encoder in (plain, cached):
                encoder.header_table_size = 120  # the peer's SETTINGS_HEADER_TABLE_SIZE
        block = [
            (b":status", b"200" if i % 7 else b"404"),
            (b"content-type", b"text/plain"),
            (b"content-length", b"%d" % (i % 5)),
            (b"date", b"second %d" % (i // 10)),
            (b"server", b"hypercorn-h2"),
            (b"authorization", b"secret") if i % 3 else (b"vary", b"accept"),
        ]
        huffman = i % 11 != 0
        ours = cached.encode(block, huffman)
        assert ours == plain.encode(block, huffman), i
        assert decoder.decode(ours, raw=True) == block
        ids = [(b"x-request-id", b"id-%d" % i)]
        assert decoder.decode(cached.encode(ids), raw=True) == ids
    assert b"x-request-id" not in [name for name, _ in cached.header_table.dynamic_entries]


def test_the_encoder_cache_stays_small_when_nothing_is_indexed() -> None:
    """A peer may set its header table to 0 bytes: then no field ever enters the table,
    the table never changes, and a cache emptied only on a change kept every field
    ever sent (a date a second, every ETag) for the life of the connection."""
    import tracemalloc

    import hpack

    from trio_launcher._hypercorn import _never_index

    encoder = hpack.Encoder()
    _never_index(encoder, frozenset((b"x-request-id",)))
    encoder.header_table_size = 0  # the peer's SETTINGS_HEADER_TABLE_SIZE
    encoder.encode([(b":status", b"200")])
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            encoder.encode([(b":status", b"200"), (b"etag", b'"%d"' % i)])
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 200_000, f"{grown} bytes kept after 20,000 distinct fields"


_NAMES = [
    b":status", b":path", b":authority", b":custom", b"te", b"TE", b"connection", b"keep-alive",
    b"Content-Type", b" server ", b"authorization", b"cookie", b"x-id", b"", b"date",
]  # fmt: skip
_VALUES = [b"200", b"103", b"trailers", b"Trailers", b"gzip", b" v ", b"", b"a" * 25, b"ok"]


def _h2_outbound(headers: list[Any], trailers: bool) -> list[Any]:
    from h2.utilities import (
        HeaderValidationFlags,
        normalize_outbound_headers,
        utf8_encode_headers,
        validate_outbound_headers,
    )

    flags = HeaderValidationFlags(False, trailers, not trailers, False)
    normalized = normalize_outbound_headers(utf8_encode_headers(headers), flags)
    return list(validate_outbound_headers(normalized, flags))


@given(
    st.lists(
        st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES), st.integers(0, 3)),
        max_size=7,
    ),
    st.booleans(),
)
@settings(max_examples=1000, deadline=None)
def test_our_outbound_header_check_is_h2s(
    raw: list[tuple[bytes, bytes, int]], trailers: bool
) -> None:
    """``outbound_headers`` (h2's outbound checks in one loop, on for every HTTP/2
    response) gives what h2's normalize + validate give, and fails where they fail:
    names lowercased and stripped, connection headers dropped, secrets never indexed,
    te, pseudo-headers (known, once, first, :status in a response, none in trailers)."""
    import hpack
    from h2.exceptions import ProtocolError

    from trio_launcher._hypercorn import outbound_headers

    def made(name: bytes, value: bytes, kind: int) -> Any:
        if kind == 1:
            return hpack.HeaderTuple(name, value)
        if kind == 2:
            return hpack.NeverIndexedHeaderTuple(name, value)
        return (name.decode(), value.decode()) if kind == 3 else (name, value)

    headers = [made(name, value, kind) for name, value, kind in raw]
    expected: Any
    try:
        expected = _h2_outbound(headers, trailers)
    except (ProtocolError, IndexError) as exc:
        expected = type(exc)
    ours: Any
    try:
        ours = outbound_headers(headers, trailers=trailers)
    except (ProtocolError, IndexError) as exc:
        ours = type(exc)
    assert ours == expected
    if isinstance(expected, list):
        assert [type(h) for h in ours] == [type(h) for h in expected]


async def _bodies(
    sizes: dict[int, int], window: int | None = None, ack_after: int = 0
) -> dict[int, list[tuple[int, bool]]]:
    """Request ``/size`` on each stream id of ``sizes`` at once; each stream's DATA
    frames (length, ends the stream). With ``window``, the client's initial stream
    window; flow control is acknowledged only once ``ack_after`` streams ended."""
    frames: dict[int, list[tuple[int, bool]]] = {stream_id: [] for stream_id in sizes}
    async with running_server(sized) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.increment_flow_control_window(2**30)  # (only stream windows hold data back)
        if window is not None:
            conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        for stream_id, size in sizes.items():
            head = [(":method", "GET"), (":path", f"/{size}"), (":scheme", "http")]
            conn.send_headers(stream_id, [*head, (":authority", "t")], end_stream=True)
        unacked: list[tuple[int, int]] = []
        async with stream:
            await stream.send_all(conn.data_to_send())
            with trio.fail_after(10):
                while not all(got and got[-1][1] for got in frames.values()):
                    data = await stream.receive_some(65536)
                    assert data, "the server closed the connection"
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.DataReceived):
                            ends = event.stream_ended is not None
                            frames[event.stream_id].append((len(event.data), ends))
                            unacked.append((event.flow_controlled_length, event.stream_id))
                    if sum(bool(got and got[-1][1]) for got in frames.values()) >= ack_after:
                        for length, stream_id in unacked:
                            conn.acknowledge_received_data(length, stream_id)
                        unacked.clear()
                    await stream.send_all(conn.data_to_send())
    return frames


async def test_a_short_rest_ends_at_once_and_waits_its_turn() -> None:
    """A response whose rest fits one DATA frame is ended at once (not through
    hypercorn's sending task), unless another stream has bytes waiting: then it
    waits its turn there. Stream 1 waits for flow control (the client acknowledges
    nothing until the three small responses ended), so the small ones take
    hypercorn's way: they end meanwhile, whole, each in one frame; then stream 1."""
    frames = await _bodies({1: BIG, 3: 5, 5: 7, 7: 0}, ack_after=3)
    assert {stream_id: sum(n for n, _ in got) for stream_id, got in frames.items()} == {
        1: BIG,
        3: 5,
        5: 7,
        7: 0,
    }
    assert frames[3] == [(5, True)] and frames[5] == [(7, True)]
    assert [ends for _, ends in frames[1]].count(True) == 1


async def test_a_rest_larger_than_the_window_waits_for_it() -> None:
    """The client's stream window (3 bytes) is smaller than the 5-byte body: 3 bytes
    go out, the other 2 (with END_STREAM) after the client's WINDOW_UPDATE."""
    frames = await _bodies({1: 5}, window=3)
    assert frames[1] == [(3, False), (2, True)]
