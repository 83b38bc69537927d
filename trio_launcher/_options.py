"""serve_http's options in one place: a frozen, validated, documented object.

Both front doors build the same object. ``serve_http(app, config, **options)``
turns its keyword arguments into a :class:`ServeOptions`; the CLI turns its
flags into one. Adding an option therefore means: a field here (with its
default, its one-line doc and its CLI flag in ``metadata``), its check in
``__post_init__``, its key in :class:`ServeKwargs` (the typed signature of
``serve_http``; a test keeps the two in step) and the flag in the parser.

hypercorn's ``Config`` stays the configuration of the HTTP server itself
(binds, TLS files, keep-alive, graceful timeout); these are the runner's own
options. Nothing here reads the environment: the CLI does that.

A bad value raises :class:`OptionError`, which names the option; the CLI
prints the flag instead (``--health-path must start with '/'``).
"""

from __future__ import annotations

import dataclasses
import math
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, cast

from ._engine_task import DEFAULT_ENGINE_SHUTDOWN_TIMEOUT
from ._errors import OptionError
from ._proxy import parse_trusted
from ._watchdog import check_engine

Transport = Literal["lean", "hypercorn"]
TRANSPORTS: tuple[Transport, ...] = ("lean", "hypercorn")
HTTP1Protocol = Literal["auto", "httptools", "h11"]
HTTP1_PROTOCOLS: tuple[HTTP1Protocol, ...] = ("auto", "httptools", "h11")


def _flag(name: str | None) -> Mapping[str, Any]:
    """Field metadata: the CLI flag that sets this option (None: API only)."""
    return {"flag": name}


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """Everything ``serve_http`` takes besides the app and hypercorn's ``Config``."""

    engine: object | None = field(default=None, metadata=_flag("--engine"))
    """An object with ``errored`` and ``is_running`` (optionally ``async def
    wait_dead()``); its death drains and stops the server."""

    engine_task: Callable[..., Awaitable[object]] | None = field(
        default=None, metadata=_flag("--engine-task")
    )
    """An async function speaking trio's start protocol, run in the runner's
    nursery: started before the app (503 until then), stopped after the drain;
    its end is the engine's death. Exclusive with ``engine``. See docs/engine-task.md."""

    engine_shutdown_timeout: float = field(
        default=DEFAULT_ENGINE_SHUTDOWN_TIMEOUT, metadata=_flag("--engine-shutdown-timeout")
    )
    """Seconds the cancelled engine task has to clean up before the runner gives up on it."""

    sock: socket.socket | None = field(default=None, metadata=_flag(None))
    """A bound TCP or Unix socket to serve instead of ``config.bind``; the
    runner takes ownership and closes it."""

    handle_signals: bool = field(default=True, metadata=_flag(None))
    """Own SIGINT/SIGTERM (drain, then force) and SIGHUP. Needs the main thread."""

    watchdog_interval: float = field(default=5.0, metadata=_flag("--watchdog-interval"))
    """Seconds between engine polls (``inf``: never poll)."""

    keep_alive_on_engine_death: bool = field(
        default=False, metadata=_flag("--keep-alive-on-engine-death")
    )
    """Keep serving when the engine dies."""

    engine_error_types: tuple[type[BaseException], ...] = field(default=(), metadata=_flag(None))
    """More exception types that, raised by a request, are answered with a
    500 JSON body and run the dead check."""

    enable_ssl_refresh: bool = field(default=False, metadata=_flag("--ssl-refresh"))
    """Reload the certificate files when they change. SIGHUP reloads whenever TLS is on."""

    ssl_refresh_interval: float = field(default=1.0, metadata=_flag("--ssl-refresh-interval"))
    """Seconds between checks of the certificate files."""

    health_path: str | None = field(default=None, metadata=_flag("--health-path"))
    """A GET/HEAD path the runner answers itself: 200 and a JSON state while
    serving with a live engine, 503 once stopping or the engine is dead."""

    shutdown_delay: float = field(default=0.0, metadata=_flag("--shutdown-delay"))
    """After the first stop signal, keep serving this many seconds with
    readiness at 503 before the listeners close."""

    max_header_count: int | None = field(default=256, metadata=_flag("--max-header-count"))
    """Most request headers (HTTP/1.1 and HTTP/2); more get 431."""

    max_head_size: int | None = field(default=None, metadata=_flag("--max-head-size"))
    """Most bytes in a request head; more get 431."""

    access_log_exclude: tuple[str, ...] = field(default=(), metadata=_flag("--access-log-exclude"))
    """Request paths left out of the access log (``/health``, ``/metrics``)."""

    transport: Transport = field(default="lean", metadata=_flag("--transport"))
    """``lean``: trio_launcher's own connection layer; ``hypercorn``: hypercorn's
    stock trio connection."""

    proxy_headers: bool = field(default=False, metadata=_flag("--proxy-headers"))
    """Believe ``X-Forwarded-For``/``-Proto``/``-Host`` from trusted proxies: they
    set the scope's client, scheme and host (see ``trio_launcher._proxy``)."""

    forwarded_allow_ips: tuple[str, ...] = field(
        default=("127.0.0.1",), metadata=_flag("--forwarded-allow-ips")
    )
    """Addresses or networks of trusted proxies for ``proxy_headers``; ``*``: any peer."""

    http: HTTP1Protocol = field(default="auto", metadata=_flag("--http"))
    """HTTP/1.1 protocol: ``httptools`` (trio_launcher's own, strict and fast;
    docs/http1.md), ``h11`` (hypercorn's), ``auto``: httptools on the lean transport."""

    header_timeout: float = field(default=10.0, metadata=_flag("--header-timeout"))
    """Seconds a request head may take from its first byte (HTTP/1.1 on
    httptools); later gets 408 and the connection closes."""

    on_max_requests: Callable[[], None] | None = field(default=None, metadata=_flag(None))
    """Called instead of draining when ``config.max_requests`` is reached (a
    worker of ``--workers`` asks its supervisor for a replacement)."""

    # --- limits and deadlines (docs/limits.md) ---------------------------------

    request_timeout: float | None = field(default=None, metadata=_flag("--request-timeout"))
    """Seconds for a response to start; later, the handler is cancelled and
    the client gets 504. None: no deadline."""

    limit_concurrency: int | None = field(default=None, metadata=_flag("--limit-concurrency"))
    """Most requests in flight (not connections); more get 503 at once."""

    body_timeout: float | None = field(default=60.0, metadata=_flag("--body-timeout"))
    """A request body's allowance: the handler may wait this long for body
    bytes, plus 1 s per KiB received; a slower body gets 408. None: no limit."""

    startup_timeout: float | None = field(default=None, metadata=_flag("--startup-timeout"))
    """Seconds the app's lifespan startup may take. None: no limit (unless
    ``config.startup_timeout`` was changed from hypercorn's 60)."""

    engine_health_interval: float = field(default=10.0, metadata=_flag("--engine-health-interval"))
    """Seconds between calls of the engine's ``check_health()``, if it has one."""

    engine_health_timeout: float = field(default=10.0, metadata=_flag("--engine-health-timeout"))
    """Seconds a ``check_health()`` call may take; one that raises or takes
    longer means the engine is dead."""

    metrics_path: str | None = field(default=None, metadata=_flag("--metrics-path"))
    """A GET/HEAD path answered with the Prometheus scrape, before the app
    (docs/observability.md)."""

    metrics_bind: str | None = field(default=None, metadata=_flag("--metrics-bind"))
    """An address (``HOST:PORT``) for a separate plain-HTTP listener that
    answers every GET with the Prometheus scrape."""

    request_ids: bool = field(default=True, metadata=_flag("--no-request-id"))
    """Keep a valid incoming ``X-Request-Id`` or make one, echo it in the
    response and give it to the app as ``scope["state"]["request_id"]``."""

    def __post_init__(self) -> None:
        # Lists are welcome at the door; the frozen object keeps tuples.
        for name in ("access_log_exclude", "engine_error_types", "forwarded_allow_ips"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.engine is not None:
            try:
                check_engine(self.engine)
            except TypeError as exc:
                raise OptionError("engine", str(exc).removeprefix("engine ")) from None
        if self.engine_task is not None:
            if self.engine is not None:
                raise OptionError("engine_task", "and engine are exclusive: give one of them")
            if not callable(self.engine_task):
                raise OptionError(
                    "engine_task", f"must be an async function, got {self.engine_task!r}"
                )
        _positive("engine_shutdown_timeout", self.engine_shutdown_timeout)
        _positive("watchdog_interval", self.watchdog_interval, infinite_ok=True)
        _positive("ssl_refresh_interval", self.ssl_refresh_interval)
        _at_least_zero("shutdown_delay", self.shutdown_delay)
        if self.transport not in TRANSPORTS:
            raise OptionError("transport", f"must be 'lean' or 'hypercorn', got {self.transport!r}")
        if self.http not in HTTP1_PROTOCOLS:
            raise OptionError("http", f"must be 'auto', 'httptools' or 'h11', got {self.http!r}")
        if self.http == "httptools" and self.transport != "lean":
            raise OptionError("http", "httptools needs the lean transport")
        _positive("header_timeout", self.header_timeout)
        if self.health_path is not None and not self.health_path.startswith("/"):
            raise OptionError("health_path", f"must start with '/', got {self.health_path!r}")
        if self.metrics_path is not None and not self.metrics_path.startswith("/"):
            raise OptionError("metrics_path", f"must start with '/', got {self.metrics_path!r}")
        if self.metrics_path is not None and self.metrics_path == self.health_path:
            raise OptionError("metrics_path", f"is the health path too ({self.metrics_path!r})")
        if self.metrics_bind is not None and not self.metrics_bind:
            raise OptionError("metrics_bind", "must be an address like 127.0.0.1:9100")
        for name in ("max_header_count", "max_head_size", "limit_concurrency"):
            limit = getattr(self, name)
            if limit is not None and (not isinstance(limit, int) or limit < 1):
                raise OptionError(name, f"must be a whole number >= 1, got {limit!r}")
        try:
            parse_trusted(self.forwarded_allow_ips)
        except ValueError as exc:
            raise OptionError("forwarded_allow_ips", f"has a bad address: {exc}") from None
        for name in ("request_timeout", "body_timeout", "startup_timeout"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name), infinite_ok=True)
        _positive("engine_health_interval", self.engine_health_interval)
        _positive("engine_health_timeout", self.engine_health_timeout)
        for exc_type in self.engine_error_types:
            if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
                raise OptionError(
                    "engine_error_types", f"must hold exception types, got {exc_type!r}"
                )

    @property
    def http1_protocol(self) -> str:
        """The HTTP/1.1 protocol in effect: ``httptools`` or ``h11``."""
        return "httptools" if self.http != "h11" and self.transport == "lean" else "h11"

    def replace(self, **changes: Any) -> ServeOptions:
        """A copy with ``changes`` applied (and validated)."""
        return build_options(self, changes)


class ServeKwargs(TypedDict, total=False):
    """``serve_http``'s keyword arguments: the fields of :class:`ServeOptions`."""

    engine: object | None
    engine_task: Callable[..., Awaitable[object]] | None
    engine_shutdown_timeout: float
    sock: socket.socket | None
    handle_signals: bool
    watchdog_interval: float
    keep_alive_on_engine_death: bool
    engine_error_types: tuple[type[BaseException], ...]
    enable_ssl_refresh: bool
    ssl_refresh_interval: float
    health_path: str | None
    shutdown_delay: float
    max_header_count: int | None
    max_head_size: int | None
    access_log_exclude: tuple[str, ...] | list[str]
    transport: Transport
    proxy_headers: bool
    forwarded_allow_ips: tuple[str, ...] | list[str]
    http: HTTP1Protocol
    header_timeout: float
    on_max_requests: Callable[[], None] | None
    request_timeout: float | None
    limit_concurrency: int | None
    body_timeout: float | None
    startup_timeout: float | None
    engine_health_interval: float
    engine_health_timeout: float
    metrics_path: str | None
    metrics_bind: str | None
    request_ids: bool


def build_options(base: ServeOptions | None, changes: Mapping[str, Any]) -> ServeOptions:
    """``base`` (or the defaults) with ``changes``; an unknown name is an OptionError."""
    names = {f.name for f in dataclasses.fields(ServeOptions)}
    for name in changes:
        if name not in names:
            raise OptionError(name, "is not an option of serve_http")
    if base is None:
        return ServeOptions(**changes)
    return dataclasses.replace(base, **changes)


def option_flags() -> dict[str, str | None]:
    """Each option's CLI flag (None: API only), in declaration order."""
    return {
        f.name: cast("str | None", f.metadata["flag"]) for f in dataclasses.fields(ServeOptions)
    }


def _positive(name: str, value: float, *, infinite_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionError(name, f"must be a number of seconds, got {value!r}")
    if not value > 0 or (math.isinf(value) and not infinite_ok):
        raise OptionError(name, f"must be > 0, got {value!r}")


def _at_least_zero(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionError(name, f"must be a number of seconds, got {value!r}")
    if not value >= 0 or math.isinf(value):
        raise OptionError(name, f"must be a finite number >= 0, got {value!r}")
