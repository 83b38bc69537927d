"""Every hypercorn (and quart) internal trio_launcher touches, behind one door.

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

import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.task_group import _handle
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

__all__ = [
    "CONTRACT",
    "AppWrapper",
    "Closed",
    "Config",
    "ConnectionState",
    "Event",
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

    async def _idle_timeout(self) -> None:
        await self.idle_timeout()

    async def _read_data(self) -> None:
        with self.reading:
            await super()._read_data()

    async def idle_timeout(self) -> None:
        await super()._idle_timeout()

    async def close_from_server(self) -> None:
        await self._initiate_server_close()

    @property
    def wrapper(self) -> ProtocolWrapper:
        return self.protocol


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
        "hypercorn.trio.task_group._handle(...) parameters",
        lambda: _params(_handle) == _HANDLE_PARAMS,
    ),
    ("hypercorn.protocol.h2.H2Protocol.idle", lambda: isinstance(H2Protocol.idle, property)),
    ("hypercorn.protocol.h11.H11Protocol.stream", _assigns(H11Protocol.__init__, "stream")),
    ("hypercorn.trio.tcp_server.TCPServer._idle_timeout", _has(TCPServer, "_idle_timeout")),
    (
        "hypercorn.trio.tcp_server.TCPServer._initiate_server_close",
        _has(TCPServer, "_initiate_server_close"),
    ),
    ("hypercorn.trio.tcp_server.TCPServer.protocol", _assigns(TCPServer.run, "protocol")),
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
