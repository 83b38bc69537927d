"""Every hypercorn (and quart, and trio) internal trio_launcher touches, behind one door.

The runner serves its own sockets, drives hypercorn's sans-IO protocol
objects from its own connection layer, patches a race out of hypercorn's
stock trio connection and reads Quart's error-handler table. None of that is
public API, and a minor release may move any of it. So:

* every such name is imported or reached here and nowhere else; the rest of
  the package calls the small functions below, with keyword arguments where
  hypercorn takes positional ones;
* :data:`CONTRACT` lists each internal we rely on, and :func:`broken_contract`
  checks them all against the installed versions. A test calls it, so an
  upgrade that renames an attribute fails loudly, naming the attribute,
  instead of silently answering "idle" for a busy connection;
* pyproject pins hypercorn's minor version.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.stream
import h2.utilities
import trio
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.logging import Logger
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import EndBody, StreamClosed
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger as _StockStatsdLogger
from hypercorn.trio.task_group import TaskGroup, _handle
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState
from hypercorn.utils import (
    LifespanFailureError,
    LifespanTimeoutError,
    parse_socket_addr,
    repr_socket_addr,
    wrap_app,
)

STATSD_SEND_LIMIT = 1.0  # seconds one statsd datagram may take, shielded (StatsdLogger)
_CONTROL_EVENTS = (h2.events.PingReceived, h2.events.RemoteSettingsChanged)
ENCODER_CACHE = 64  # header fields the HPACK encoder's cache holds, at most (_never_index)
_HPACK_LOG = logging.getLogger("hpack.hpack")  # hpack's encoder logs here (see _never_index)

__all__ = [
    "CONTRACT",
    "AppWrapper",
    "Closed",
    "Config",
    "ConnectionState",
    "Event",
    "H2Flood",
    "H2Protocol",
    "Lifespan",
    "LifespanFailureError",
    "LifespanState",
    "LifespanTimeoutError",
    "ProtocolWrapper",
    "RawData",
    "StatsdLogger",
    "StockTCPServer",
    "TCPServer",
    "Updated",
    "WorkerContext",
    "broken_contract",
    "guard_h2",
    "new_protocol",
    "parse_socket_addr",
    "protocol_is_idle",
    "quart_error_handlers",
    "repr_socket_addr",
    "run_app",
    "wrap_app",
]


def new_protocol(
    app: AppWrapper,
    config: Config,
    context: WorkerContext,
    task_group: Any,
    state: ConnectionState,
    *,
    ssl: bool,
    client: tuple[str, int] | None,
    server: tuple[str, int] | None,
    send: Callable[[Event], Awaitable[None]],
    alpn: str | None,
) -> ProtocolWrapper:
    """hypercorn's protocol (HTTP/1.1 on h11, or HTTP/2) for one connection."""
    return ProtocolWrapper(
        app=app,
        config=config,
        context=context,
        task_group=task_group,
        state=state,
        ssl=ssl,
        client=client,
        server=server,
        send=send,
        alpn_protocol=alpn,
    )


async def run_app(
    app: AppWrapper,
    config: Config,
    scope: Any,
    receive: Callable[[], Awaitable[Any]],
    send: Callable[[Any], Awaitable[None]],
) -> None:
    """One ASGI request cycle as hypercorn's trio task group runs it (errors -> 500)."""
    await _handle(app, config, scope, receive, send, trio.to_thread.run_sync, trio.from_thread.run)


def protocol_is_idle(wrapper: ProtocolWrapper) -> bool:
    """No request in progress on this connection (HTTP/2: every stream idle)."""
    inner = wrapper.protocol
    if isinstance(inner, H2Protocol):
        return bool(inner.idle)
    if isinstance(inner, H11Protocol):
        return inner.stream is None
    raise TypeError(f"unknown hypercorn protocol {type(inner).__name__}")


class StockTCPServer(TCPServer):
    """hypercorn's trio connection with its idle timer and server close as hooks.

    Subclasses override :meth:`idle_timeout` (called where hypercorn calls
    its private ``_idle_timeout``) and may call :meth:`close_from_server`.
    ``reading`` is a cancel scope around hypercorn's read loop.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.reading = trio.CancelScope()
        self._h2_ends_streams = False

    async def protocol_send(self, event: Event) -> None:
        # An HTTP/2 protocol's first send (its settings, in ``initiate``) comes
        # before its first stream, whether ALPN, prior knowledge or h2c made it.
        if not self._h2_ends_streams:
            self._h2_ends_streams = reset_cut_streams(self.protocol)
        await super().protocol_send(event)

    async def _idle_timeout(self) -> None:
        await self.idle_timeout()

    async def _read_data(self) -> None:
        _cancel_on_disconnect(self._task_group)  # (before the first request)
        with self.reading:
            await super()._read_data()

    async def idle_timeout(self) -> None:
        await super()._idle_timeout()

    async def close_from_server(self) -> None:
        await self._initiate_server_close()

    @property
    def wrapper(self) -> ProtocolWrapper:
        return self.protocol


def _cancel_on_disconnect(task_group: TaskGroup) -> None:
    """hypercorn's task group, with each HTTP request's handler in a cancel scope of
    its own that ``http.disconnect`` cancels, unless the response has ended.

    hypercorn tells a handler that its client left (a closed connection, an
    HTTP/2 ``RST_STREAM``) only by queueing ``http.disconnect``, which a handler
    busy with the engine never reads: it ran on for nothing. A handler whose
    response has ended runs on (ASGI allows background work after it)."""
    spawn_app = task_group.spawn_app

    async def spawn(app: AppWrapper, config: Config, scope: Any, send: Any) -> Any:
        if scope["type"] != "http":
            return await spawn_app(app, config, scope, send)
        cut = trio.CancelScope()
        complete = False

        async def scoped(scope: Any, receive: Any, send: Any, *rest: Any) -> None:
            async def sent(message: Any) -> None:
                nonlocal complete
                if message is not None and message["type"] == "http.response.body":
                    complete = complete or not message.get("more_body", False)
                await send(message)

            with cut:
                await app(scope, receive, sent, *rest)

        put = await spawn_app(scoped, config, scope, send)  # type: ignore[arg-type]

        async def told(message: Any) -> None:
            if message["type"] == "http.disconnect" and not complete:
                cut.cancel()
            await put(message)

        return told

    task_group.spawn_app = spawn  # type: ignore[method-assign]


class H2Flood(Exception):
    """An HTTP/2 peer sent control frames (PING, SETTINGS) faster than the budget.

    Attributes:
        goaway: the bytes of a GOAWAY (ENHANCE_YOUR_CALM) to send before closing.
    """

    def __init__(self, goaway: bytes) -> None:
        super().__init__("HTTP/2 control-frame flood")
        self.goaway = goaway


def guard_h2(
    wrapper: ProtocolWrapper,
    allow: Callable[[int], bool],
    never_indexed: frozenset[bytes] = frozenset(),
) -> bool:
    """Count the peer's PING and SETTINGS frames on an HTTP/2 connection.

    Wraps the h2 connection's ``receive_data``: after each chunk, ``allow(n)``
    is asked about the ``n`` control frames it carried; when it says no, the
    ACKs queued for them are dropped and :class:`H2Flood` is raised with a
    GOAWAY (ENHANCE_YOUR_CALM). Request body data for a stream whose response
    has ended is dropped there too (:func:`_drop_late_data`), and the encoder
    never indexes the headers named in ``never_indexed`` (:func:`_never_index`).
    Returns False if the connection is not (yet) HTTP/2.
    """
    inner = wrapper.protocol
    if not isinstance(inner, H2Protocol):
        return False
    connection = inner.connection
    receive_data = connection.receive_data

    def counted(data: bytes) -> list[Any]:  # (h2 takes any buffer; it gets bytes here)
        events = receive_data(data)
        control = 0
        late = False
        streams = inner.streams
        for event in events:  # (one loop, no generators: this runs for every read)
            if isinstance(event, _CONTROL_EVENTS):
                control += 1
            elif type(event) is h2.events.DataReceived and event.stream_id not in streams:
                late = True
        if control and not allow(control):
            connection.clear_outbound_data_buffer()
            connection.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            raise H2Flood(connection.data_to_send())
        if late:
            return _drop_late_data(connection, events, streams.keys())
        return events

    connection.receive_data = counted  # type: ignore[method-assign,assignment]
    if never_indexed:
        _never_index(connection.encoder, never_indexed)
    _end_with_last_data(inner)
    _end_streams(inner)
    _check_outbound_in_one_pass(connection)
    return True


def _check_outbound_in_one_pass(connection: Any) -> None:
    """h2's checks of the header blocks we send, made in one pass (:func:`outbound_headers`).

    h2 normalizes and validates every header block it sends through a chain of
    nine generators: nine generator steps for each header of each response.
    Here its two flags are off for this connection (its own configuration
    object), and ``send_headers`` (responses, informational responses,
    trailers) makes the same checks in one loop first. A push promise goes
    through h2's own two functions, with the flags h2 would give it.
    """
    config = connection.config
    config.normalize_outbound_headers = False
    config.validate_outbound_headers = False
    streams = connection.streams
    send_headers = connection.send_headers
    push_stream = connection.push_stream

    def checked_send_headers(
        stream_id: int, headers: Any, end_stream: bool = False, *args: Any, **kwargs: Any
    ) -> None:
        stream = streams.get(stream_id)
        trailers = stream is not None and bool(stream.state_machine.headers_sent)
        checked = outbound_headers(
            headers, trailers=trailers, split_cookies=config.split_outbound_cookies
        )
        send_headers(stream_id, checked, end_stream, *args, **kwargs)

    def checked_push_stream(stream_id: int, promised_stream_id: int, request_headers: Any) -> None:
        flags = h2.utilities.HeaderValidationFlags(
            is_client=False, is_trailer=False, is_response_header=False, is_push_promise=True
        )
        headers = h2.utilities.utf8_encode_headers(request_headers)
        normalized = h2.utilities.normalize_outbound_headers(
            headers, flags, config.split_outbound_cookies
        )
        push_stream(
            stream_id,
            promised_stream_id,
            list(h2.utilities.validate_outbound_headers(normalized, flags)),
        )

    connection.send_headers = checked_send_headers
    connection.push_stream = checked_push_stream


_CONNECTION_HEADERS = h2.utilities.CONNECTION_HEADERS
_SECURE_HEADERS = h2.utilities._SECURE_HEADERS
_PSEUDO_HEADERS = h2.utilities._ALLOWED_PSEUDO_HEADER_FIELDS
_REQUEST_ONLY_HEADERS = h2.utilities._REQUEST_ONLY_HEADERS


def outbound_headers(headers: Any, *, trailers: bool, split_cookies: bool = False) -> list[Any]:
    """A response's (or trailers') header block, normalized and validated as h2 does it.

    h2's ``normalize_outbound_headers`` (names lowercased, names and values
    stripped, connection-specific headers dropped, ``authorization`` and short
    cookies never indexed) then its ``validate_outbound_headers`` for a server's
    response or trailers (``te`` only "trailers"; pseudo-headers known, first,
    once, ``:status`` there and no request-only one; none in trailers), one
    header at a time in the same order, so the same header fails first.

    Raises:
        h2.exceptions.ProtocolError: as h2 raises it.
    """
    if split_cookies:  # (hypercorn never asks for it): h2's own generators
        flags = h2.utilities.HeaderValidationFlags(
            is_client=False,
            is_trailer=trailers,
            is_response_header=not trailers,
            is_push_promise=False,
        )
        normalized = h2.utilities.normalize_outbound_headers(
            h2.utilities.utf8_encode_headers(headers), flags, True
        )
        return list(h2.utilities.validate_outbound_headers(normalized, flags))
    checked: list[Any] = []
    pseudo: set[bytes] = set()
    regular = False
    for header in headers:
        name, value = header[0], header[1]
        if type(name) is not bytes:
            name = name.encode("utf-8") if isinstance(name, str) else name
        if type(value) is not bytes:
            value = value.encode("utf-8") if isinstance(value, str) else value
        name = name.lower().strip()
        value = value.strip()
        if name in _CONNECTION_HEADERS:
            continue
        if name in _SECURE_HEADERS or (name == b"cookie" and len(value) < 20):
            header = NeverIndexedHeaderTuple(name, value)
        elif isinstance(header, HeaderTuple):
            header = header.__class__(name, value)
        else:
            header = (name, value)
        if name == b"te" and value.lower() != b"trailers":
            raise h2.exceptions.ProtocolError(f"Invalid value for TE header: {value!r}")
        if name[0] == 0x3A:  # b":" (an empty name raises IndexError here, as in h2)
            if name in pseudo:
                raise h2.exceptions.ProtocolError(
                    f"Received duplicate pseudo-header field {name!r}"
                )
            pseudo.add(name)
            if regular:
                raise h2.exceptions.ProtocolError(
                    f"Received pseudo-header field out of sequence: {name!r}"
                )
            if name not in _PSEUDO_HEADERS:
                raise h2.exceptions.ProtocolError(f"Received custom pseudo-header field {name!r}")
        else:
            regular = True
        checked.append(header)
    if trailers:
        if pseudo:
            raise h2.exceptions.ProtocolError(f"Received pseudo-header in trailer {pseudo}")
    elif b":status" not in pseudo:
        raise h2.exceptions.ProtocolError("Header block missing mandatory b':status' header")
    elif pseudo & _REQUEST_ONLY_HEADERS:
        raise h2.exceptions.ProtocolError(
            f"Encountered request-only headers {pseudo & _REQUEST_ONLY_HEADERS}"
        )
    return checked


_UNENDED = frozenset((h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE))


def _end_streams(protocol: H2Protocol) -> None:
    """A stream whose handler ended before its response did is reset (INTERNAL_ERROR);
    a response whose rest fits in one DATA frame is ended at once.

    When the app raises (or is cut by a bound) after its response started,
    hypercorn closes the stream on its side and sends nothing: no END_STREAM,
    no RST_STREAM, and the client waits for the rest of a response that will
    never come. HTTP/1.1 closes the connection there; on HTTP/2 only that
    stream is ended, with the error code RFC 9113 gives a server failure.

    At the end of a response (``EndBody``) hypercorn marks its buffer complete,
    wakes its sending task and waits for it to send the rest: two task
    switches for every response. When the rest fits in one DATA frame and
    the flow-control windows, and no other stream has bytes waiting (their
    order is the sending task's), it goes out here, with END_STREAM, as the
    sending task would send it (:func:`_end_with_last_data`).
    """
    connection = protocol.connection
    stream_send = protocol.stream_send
    buffers = protocol.stream_buffers

    def ended_here(stream_id: int) -> bool:
        buffer = buffers.get(stream_id)
        if buffer is None or buffer._complete:
            return False
        for other in buffers.values():
            if other.buffer and other is not buffer:
                return False  # another stream waits to send: the sending task's order
        data = buffer.buffer
        try:
            if len(data) > min(
                connection.max_outbound_frame_size,
                connection.local_flow_control_window(stream_id),
            ):
                return False
            if data:
                connection.send_data(stream_id, bytes(data), end_stream=True)
            else:
                connection.end_stream(stream_id)
        except h2.exceptions.ProtocolError:
            return False  # (the stream closed: hypercorn's way handles it)
        del buffers[stream_id]
        protocol.priority.remove_stream(stream_id)
        return True

    async def send(event: Any) -> None:
        kind = type(event)
        if kind is EndBody:
            if ended_here(event.stream_id):
                await protocol._flush()
                return
        elif kind is StreamClosed and _reset_unended(connection, event.stream_id):
            await protocol._flush()
        await stream_send(event)

    protocol.stream_send = send  # type: ignore[method-assign]


def _reset_unended(connection: Any, stream_id: int) -> bool:
    """Reset the stream (INTERNAL_ERROR) if its response has not ended: its handler
    ended first. True if a reset is queued (to flush)."""
    stream = connection.streams.get(stream_id)
    if stream is None or stream.state_machine.state not in _UNENDED:
        return False
    with contextlib.suppress(h2.exceptions.H2Error):
        connection.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
    return True


def reset_cut_streams(wrapper: ProtocolWrapper) -> bool:
    """The stock transport's share of :func:`_end_streams`: a stream whose handler
    ended before its response did is reset (INTERNAL_ERROR), where hypercorn sent
    nothing and the client waited for ever. False if the connection is not (yet)
    HTTP/2; call it before the protocol's first stream (its first ``send``)."""
    protocol = wrapper.protocol
    if not isinstance(protocol, H2Protocol):
        return False
    stream_send = protocol.stream_send
    buffers = protocol.stream_buffers

    async def send(event: Any) -> None:
        if type(event) is StreamClosed:
            # An ended response whose last bytes wait for the sending task has a
            # complete buffer (EndBody); the task ends its stream.
            buffer = buffers.get(event.stream_id)
            ended = buffer is not None and buffer._complete
            if not ended and _reset_unended(protocol.connection, event.stream_id):
                await protocol._flush()
        await stream_send(event)

    protocol.stream_send = send  # type: ignore[method-assign]
    return True


def _end_with_last_data(protocol: H2Protocol) -> None:
    """A response's last DATA frame carries END_STREAM.

    hypercorn's sending task sends the last body bytes, flushes, then ends the
    stream with an empty DATA frame of its own and flushes again: one more
    frame and one more write (a system call) for every response. This is its
    ``_send_data`` with the two joined; everything else is as hypercorn does it.
    """
    connection = protocol.connection
    buffers = protocol.stream_buffers

    async def send_data(stream_id: int) -> None:
        try:
            chunk_size = min(
                connection.local_flow_control_window(stream_id),
                connection.max_outbound_frame_size,
            )
            buffer = buffers[stream_id]
            data = await buffer.pop(max(0, chunk_size))
            complete = buffer.complete
            if data:
                connection.send_data(stream_id, data, end_stream=complete)
                await protocol._flush()
            else:
                protocol.priority.block(stream_id)
                if complete:
                    connection.end_stream(stream_id)
                    await protocol._flush()
            if complete:
                del buffers[stream_id]
                protocol.priority.remove_stream(stream_id)
        except (h2.exceptions.StreamClosedError, KeyError, h2.exceptions.ProtocolError):
            # The stream or the connection closed while waiting to send (as hypercorn).
            await buffers[stream_id].close()
            del buffers[stream_id]
            protocol.priority.remove_stream(stream_id)

    protocol._send_data = send_data  # type: ignore[method-assign]


def _drop_late_data(connection: Any, events: list[Any], live: Iterable[int]) -> list[Any]:
    """Request body data for a stream whose response has ended (hypercorn forgot it).

    RFC 9113 8.1 lets a server answer before the request body has all arrived.
    hypercorn then raises KeyError on the rest of the body, which closes the
    connection with every other stream on it. Here the data is taken off the
    flow-control windows and dropped, and the stream is reset with NO_ERROR:
    the RFC's way of telling the client to stop sending it.
    """
    kept = []
    streams = set(live)
    for event in events:
        if type(event) is h2.events.RequestReceived:
            streams.add(event.stream_id)  # hypercorn opens it before the data that follows
        if type(event) is not h2.events.DataReceived or event.stream_id in streams:
            kept.append(event)
            continue
        with contextlib.suppress(h2.exceptions.H2Error):
            connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        with contextlib.suppress(h2.exceptions.H2Error):
            connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.NO_ERROR)
    return kept


def _never_index(encoder: Any, names: frozenset[bytes]) -> None:
    """HPACK: never add a header named in ``names`` to the dynamic table; and remember
    the fields that went out as table indexes.

    An id that changes with every response would evict the headers that do
    repeat (date, server, content-type) and leave a table of ids that every
    header search scans. hpack skips the table for a ``NeverIndexedHeaderTuple``,
    but hypercorn rebuilds the app's headers as plain tuples, so the choice is
    made here, in the encoder. The value goes out as a raw literal: hpack's
    Huffman coder is pure Python, and coding 15 bytes cost more (about 100k
    instructions) than the rest of the response's headers together.

    Most of a response's other headers (status, content-type, server, the
    date within its second) are in the table already, and hpack finds each by
    a scan of the dynamic table, logging twice on the way, to write an index
    of a byte or two. What ``add`` returned for a header that left the table
    as it was is kept, keyed by the header, and is valid for as long as the
    table stays the same: any change (an entry added, entries evicted by a
    resize) comes with a new first entry or a new length, and empties the
    cache. It holds ``ENCODER_CACHE`` fields at most: a peer whose table is 0
    bytes never lets the table change, and every distinct field sent (a date a
    second, each ETag) would stay for the life of the connection. Off while
    hpack's logger says DEBUG (its lines stay complete).
    """
    add = encoder.add
    entries = encoder.header_table.dynamic_entries  # (a deque: new entries go in at the left)
    cache: dict[tuple[bytes, bytes], bytes] = {}
    table: list[Any] = [0, None]  # the length and first entry the cache was made for

    def add_header(to_add: tuple[bytes, bytes], sensitive: bool, huffman: bool = False) -> bytes:
        if to_add[0] in names:  # and as a raw literal: hpack's Huffman coder is pure Python
            return add(to_add, True, False)  # type: ignore[no-any-return]
        if sensitive or not huffman or _HPACK_LOG.isEnabledFor(logging.DEBUG):
            return add(to_add, sensitive, huffman)  # type: ignore[no-any-return]
        size = len(entries)
        first = entries[0] if size else None
        if size == table[0] and first is table[1]:
            encoded: bytes | None = cache.get(to_add)
            if encoded is not None:
                return encoded
        else:
            cache.clear()
            table[0], table[1] = size, first
        encoded = add(to_add, False, True)
        if len(entries) == size and (entries[0] if size else None) is first:
            if len(cache) >= ENCODER_CACHE:
                cache.clear()
            cache[to_add] = encoded  # the table is as it was: an index (or the same literal)
        return encoded

    encoder.add = add_header


def quart_error_handlers(app: Any) -> dict[type[BaseException], Any]:
    """A Quart app's app-wide error handlers by exception type (blueprint None, code None)."""
    handlers: dict[type[BaseException], Any] = app.error_handler_spec[None][None]
    return handlers


# --- the contract -------------------------------------------------------------


def _params(func: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(func).parameters)


def _quart_has_error_handler_spec() -> bool:
    try:
        from quart import Quart
    except ImportError:  # quart is optional: nothing to check
        return True
    return isinstance(quart_error_handlers(Quart("contract")), dict)


_PROTOCOL_WRAPPER_PARAMS = [
    "self",
    "app",
    "config",
    "context",
    "task_group",
    "state",
    "ssl",
    "client",
    "server",
    "send",
    "alpn_protocol",
]
_HANDLE_PARAMS = ["app", "config", "scope", "receive", "send", "sync_spawn", "call_soon"]


def set_task_context(task: trio.lowlevel.Task, context: contextvars.Context) -> None:
    """Run ``task``'s next steps in ``context`` (trio reads ``Task.context`` at every step)."""
    task.context = context


def _trio_steps_in_task_context() -> bool:
    from trio._core import _run

    return "task.context.run(" in inspect.getsource(_run.unrolled_run)


def _encoder_adds_each_header() -> bool:
    from hpack import Encoder

    return "self.add(" in inspect.getsource(Encoder.encode)


def _table_adds_at_the_left() -> bool:
    import hpack.hpack
    from hpack.table import HeaderTable

    return (
        "self.dynamic_entries.appendleft(" in inspect.getsource(HeaderTable.add)
        and hpack.hpack.log is _HPACK_LOG
    )


def _h2_checks_outbound_per_block() -> bool:
    build = inspect.getsource(h2.stream.H2Stream._build_headers_frames)
    return (
        _params(h2.connection.H2Connection.send_headers)[:4]
        == ["self", "stream_id", "headers", "end_stream"]
        and _params(h2.connection.H2Connection.push_stream)
        == ["self", "stream_id", "promised_stream_id", "request_headers"]
        and "self.config.normalize_outbound_headers" in build
        and "self.config.validate_outbound_headers" in build
        and "self.headers_sent" in inspect.getsource(h2.stream.H2StreamStateMachine.__init__)
        and _has(
            h2.utilities,
            "CONNECTION_HEADERS",
            "_SECURE_HEADERS",
            "_ALLOWED_PSEUDO_HEADER_FIELDS",
            "_REQUEST_ONLY_HEADERS",
            "HeaderValidationFlags",
            "normalize_outbound_headers",
            "validate_outbound_headers",
            "utf8_encode_headers",
        )()
    )


class StatsdLogger(_StockStatsdLogger):
    """hypercorn's trio statsd logger, each datagram sent shielded.

    A response's counts are three datagrams, each a checkpoint. A client that
    closed as soon as its response arrived cancelled the handler between them, and
    the counts were lost. A UDP send does not wait in practice; the deadline bounds
    it anyway."""

    async def _socket_send(self, message: bytes) -> None:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + STATSD_SEND_LIMIT):
            await super()._socket_send(message)


def logs_access(config: Config) -> bool:
    """False when an access line would do nothing: hypercorn's own ``Logger`` without
    an access logger (a subclass, such as the statsd one, counts every response)."""
    log = config.log
    return type(log) is not Logger or log.access_logger is not None


def _has(owner: Any, *names: str) -> Callable[[], bool]:
    return lambda: all(hasattr(owner, name) for name in names)


def _assigns(method: Callable[..., Any], attribute: str) -> Callable[[], bool]:
    pattern = re.compile(rf"self\.{attribute}\s*(:[^=\n]*)?=")
    return lambda: pattern.search(inspect.getsource(method)) is not None


CONTRACT: list[tuple[str, Callable[[], bool]]] = [
    (
        "hypercorn.protocol.ProtocolWrapper(...) keywords",
        lambda: _params(ProtocolWrapper.__init__) == _PROTOCOL_WRAPPER_PARAMS,
    ),
    ("hypercorn.protocol.ProtocolWrapper.protocol", _assigns(ProtocolWrapper.__init__, "protocol")),
    (
        "hypercorn.trio.statsd.StatsdLogger._socket_send (StatsdLogger)",
        _has(_StockStatsdLogger, "_socket_send"),
    ),
    (
        "hypercorn.logging.Logger.access_logger (logs_access)",
        _assigns(Logger.__init__, "access_logger"),
    ),
    (
        "hypercorn.trio.task_group._handle(...) parameters",
        lambda: _params(_handle) == _HANDLE_PARAMS,
    ),
    ("hypercorn.protocol.h2.H2Protocol.idle", lambda: isinstance(H2Protocol.idle, property)),
    (
        "hypercorn.protocol.h2.H2Protocol.connection (h2's H2Connection, read in handle)",
        _assigns(H2Protocol.__init__, "connection"),
    ),
    (
        "hpack.Encoder.encode calls self.add per header (guard_h2's never_indexed)",
        _encoder_adds_each_header,
    ),
    (
        "hpack.HeaderTable.dynamic_entries (a deque; add puts entries in at the left) and"
        " the 'hpack.hpack' logger (guard_h2's encoder cache)",
        _table_adds_at_the_left,
    ),
    (
        "h2: H2Connection.send_headers/push_stream parameters, H2Stream._build_headers_frames"
        " reads normalize/validate_outbound_headers per block, state_machine.headers_sent,"
        " h2.utilities' header sets and outbound functions (guard_h2's outbound check)",
        _h2_checks_outbound_per_block,
    ),
    (
        "hypercorn.protocol.h2.H2Protocol.streams (the live streams, by id)",
        _assigns(H2Protocol.__init__, "streams"),
    ),
    (
        "hypercorn.protocol.h2.H2Protocol._send_data(stream_id), stream_buffers, priority,"
        " _flush (its sending task's step)",
        lambda: (
            _params(H2Protocol._send_data) == ["self", "stream_id"]
            and _assigns(H2Protocol.__init__, "stream_buffers")()
            and _assigns(H2Protocol.__init__, "priority")()
            and _has(H2Protocol, "_flush")()
            and "self._send_data(" in inspect.getsource(H2Protocol.send_task)
        ),
    ),
    (
        "hypercorn.protocol.h2.H2Protocol.stream_send(event) gets StreamClosed at a stream's"
        " end; h2's H2Connection.streams and H2Stream.state_machine.state (a StreamState)",
        lambda: (
            _params(H2Protocol.stream_send) == ["self", "event"]
            and "StreamClosed" in inspect.getsource(H2Protocol.stream_send)
            and "self.state_machine =" in inspect.getsource(h2.stream.H2Stream.__init__)
            and "self.streams" in inspect.getsource(h2.connection.H2Connection.__init__)
        ),
    ),
    ("hypercorn.protocol.h11.H11Protocol.stream", _assigns(H11Protocol.__init__, "stream")),
    ("hypercorn.trio.tcp_server.TCPServer._idle_timeout", _has(TCPServer, "_idle_timeout")),
    (
        "hypercorn.trio.tcp_server.TCPServer._initiate_server_close",
        _has(TCPServer, "_initiate_server_close"),
    ),
    ("hypercorn.trio.tcp_server.TCPServer.protocol", _assigns(TCPServer.run, "protocol")),
    (
        "hypercorn.trio.tcp_server.TCPServer._task_group, TaskGroup.spawn_app(app, config,"
        " scope, send) (_cancel_on_disconnect)",
        lambda: (
            _assigns(TCPServer.run, "_task_group")()
            and _params(TaskGroup.spawn_app) == ["self", "app", "config", "scope", "send"]
        ),
    ),
    (
        "hypercorn.trio.tcp_server.TCPServer._read_data/protocol_send",
        _has(TCPServer, "_read_data", "protocol_send"),
    ),
    (
        "hypercorn.trio.lifespan.Lifespan.handle_lifespan/asgi_send/wait_for_startup/"
        "wait_for_shutdown",
        _has(Lifespan, "handle_lifespan", "asgi_send", "wait_for_startup", "wait_for_shutdown"),
    ),
    (
        "hypercorn.trio.worker_context.WorkerContext.terminate/terminated/mark_request/"
        "max_requests",
        _has(WorkerContext(None), "terminate", "terminated", "mark_request", "max_requests"),
    ),
    ("quart.Quart.error_handler_spec[None][None]", _quart_has_error_handler_spec),
    ("trio.lowlevel.Task.context, read at each step of the task", _trio_steps_in_task_context),
]


def broken_contract() -> list[str]:
    """The internals that the installed hypercorn/quart no longer provide (empty: all fine)."""
    broken = []
    for name, holds in CONTRACT:
        try:
            ok = holds()
        except Exception:
            ok = False
        if not ok:
            broken.append(name)
    return broken
