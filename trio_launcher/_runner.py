"""serve_http: one nursery that owns the server and everything that can stop it.

Rule 1: only this module opens the nursery of sibling tasks. The HTTP server,
the signal listener, the engine watchdog, the engine task and the certificate
refresher are task functions exported by their own modules; they run side by
side in serve_http's nursery and never hold handles to each other.

With an engine task (``engine_task=fn``) the order is nested, so that the
app's lifespan runs while the engine does, at both ends::

    bind -> accept (503) -> engine task started -> app startup -> serve
    stop -> drain -> app shutdown -> engine task cancelled (bounded cleanup)

The listeners accept before the engine has started, so a client gets a 503
instead of a hang while a model loads; the app is started only after the
engine, so its startup can use it (``current_engine()``).

Shutdown is carried by events and cancel scopes in one ``Control`` (the
state the tasks share, in ``_control``), never by a stored task handle.

When the server task returns (the drain is over and lifespan shutdown ran),
the body of the nursery cancels the nursery's own scope to end the helpers,
and serve_http turns the recorded reason into its outcome: return for a
signal or a requested shutdown, ``EngineDeadError`` for a dead engine,
``ForcedShutdown`` for a second signal.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections.abc import Callable
from typing import Any, Unpack

import trio

from ._asgi import ENGINE_ERRORS, Limits, RunnerMiddleware, StartingGate, describe_routes
from ._bounds import Bounds, ClientGoneStatus
from ._control import Control, StopReason, outcome_of
from ._door import Door
from ._engine_task import engine_slot
from ._errors import ConfigError, EngineDeadError, OptionError, readable_errors
from ._glue import install_glue
from ._hypercorn import Config, StatsdLogger, wrap_app
from ._logging import RequestIds, access_log_filter, logger_filter
from ._metrics import server_metrics, using
from ._observe import bind_metrics, serve_metrics
from ._options import ServeKwargs, ServeOptions, Transport, build_options
from ._ports import bind_sockets, log_foreign_holders, tcp_ports
from ._proxy import ProxyHeadersMiddleware
from ._server import serve_sockets
from ._signals import watch_signals
from ._systemd import notify
from ._tls import CertificateRefresher, SwitchableContext, initial_context

log = logging.getLogger("trio_launcher")

DEFAULT_BIND = "127.0.0.1:8000"


class ServerHandle:
    """What ``nursery.start(serve_http, ...)`` returns.

    Attributes:
        urls: every bound URL, like ``http://127.0.0.1:41234``.
    """

    def __init__(self, urls: list[str], control: Control) -> None:
        self.urls = urls
        self._control = control

    def shutdown(self) -> None:
        """Ask for a graceful shutdown; returns at once (serve_http returns after the drain)."""
        self._control.stop(StopReason.REQUESTED)

    @property
    def stopping(self) -> bool:
        """True from the moment a shutdown was asked for (readiness is 503)."""
        return self._control.stopping.is_set()

    @property
    def engine(self) -> Any:
        """The engine: the ``engine=`` object or the engine task's ``started`` value."""
        return self._control.slot.engine

    @property
    def engine_alive(self) -> bool:
        """False once the engine was found dead."""
        return not self._control.engine_dead

    @property
    def metrics_url(self) -> str | None:
        """The ``metrics_bind`` listener's URL, like ``http://127.0.0.1:9100``."""
        return self._control.metrics_url

    @property
    def stop_reason(self) -> StopReason | None:
        return self._control.reason

    @property
    def in_flight(self) -> int:
        """Requests now in the app (the health path and refused requests excluded)."""
        return len(self._control.in_flight)

    @property
    def cut_requests(self) -> int:
        """Requests still running when the drain reached graceful_timeout (cancelled)."""
        return self._control.cut_requests

    @property
    def tls(self) -> CertificateRefresher | None:
        """The certificate refresher (``reloads``, ``failures``, ``request_reload()``)."""
        return self._control.refresher

    def __repr__(self) -> str:
        return f"<ServerHandle urls={self.urls!r} stopping={self.stopping}>"


async def serve_http(
    app: Any,
    config: Config | None = None,
    *,
    options: ServeOptions | None = None,
    task_status: trio.TaskStatus[ServerHandle] = trio.TASK_STATUS_IGNORED,
    **kwargs: Unpack[ServeKwargs],
) -> None:
    """Serve an ASGI app with hypercorn until a signal, a shutdown request or engine death.

    Args:
        app: an ASGI application (Quart-Trio, Starlette, a bare callable...).
        config: hypercorn configuration; default binds 127.0.0.1:8000. It is
            copied, never changed.
        options: a :class:`ServeOptions`; keyword arguments override its fields.
        task_status: receives a :class:`ServerHandle` once serving (stopped
            while an engine task started: a stopping handle, as it returns).
        **kwargs: the fields of :class:`ServeOptions` (``engine``,
            ``health_path``, ``shutdown_delay``...), documented there.

    Returns:
        After a signal or ``ServerHandle.shutdown()``, once drained.

    Raises:
        EngineDeadError: the engine died (raised after the drain).
        ForcedShutdown: a second SIGINT/SIGTERM stopped the server at once.
        BindError: an address could not be bound.
        AppStartupError: the app's lifespan startup failed.
        ConfigError: a bad argument (``OptionError`` names the option).
    """
    opts = build_options(options, kwargs)
    if not callable(app):  # (else it is served, and every request gets a 500)
        got = type(app).__name__
        raise ConfigError(f"app must be an ASGI application (a callable), got {got} {app!r:.60}")
    config = _prepare_config(config)
    if opts.handle_signals and threading.current_thread() is not threading.main_thread():
        raise OptionError("handle_signals", "needs the main thread; pass handle_signals=False")
    if opts.enable_ssl_refresh and not config.ssl_enabled:
        raise OptionError("enable_ssl_refresh", "needs config.certfile and config.keyfile")
    if opts.max_head_size is not None:
        config.h11_max_incomplete_size = opts.max_head_size
        config.h2_max_header_list_size = opts.max_head_size
    engine = opts.engine
    config.startup_timeout = _startup_limit(config, opts.startup_timeout)

    control = Control(engine, opts.keep_alive_on_engine_death, opts.shutdown_delay)
    control.watchdog_interval = opts.watchdog_interval
    control.health_probe = (opts.engine_health_interval, opts.engine_health_timeout)
    error_types = (*ENGINE_ERRORS, *opts.engine_error_types)
    served_app: Any = install_glue(app, control.on_app_error, error_types)
    if opts.engine_task is not None:
        control.has_engine_task = control.starting = True
        served_app = StartingGate(served_app, lambda: control.starting, opts.health_path)
    metrics = server_metrics(opts.metrics_path, opts.metrics_bind)
    middleware = RunnerMiddleware(
        served_app,
        control.on_app_error,
        error_types,
        health_path=opts.health_path,
        health=control.health,
        limits=Limits(opts.max_header_count, opts.max_head_size),
        bounds=Bounds(opts.request_timeout, opts.limit_concurrency, opts.body_timeout),
        in_flight=control.in_flight,
        metrics=metrics,
        metrics_path=opts.metrics_path,
        request_ids=RequestIds() if opts.request_ids else None,
        draining=control.drain.is_set,
    )
    outer: Any = middleware
    if opts.proxy_headers:
        outer = ProxyHeadersMiddleware(outer, opts.forwarded_allow_ips)
    wrapped = wrap_app(outer, config.wsgi_max_body_size, "asgi")
    ssl_context = initial_context(config) if config.ssl_enabled else None
    if ssl_context is not None:
        interval = opts.ssl_refresh_interval if opts.enable_ssl_refresh else math.inf
        control.refresher = CertificateRefresher(
            config, ssl_context, interval, control.notify_reloading
        )

    sockets = bind_sockets(config, opts.sock)
    ports = tcp_ports(sockets)
    _log_routes(app, opts.health_path)
    try:
        bind = opts.metrics_bind
        metrics_listener = bind_metrics(bind) if metrics is not None and bind is not None else None
    except BaseException:
        sockets.close()
        raise
    try:
        with (
            readable_errors(),
            control.force,
            access_log_filter(config, opts.access_log_exclude),
            logger_filter(config.log.access_logger, ClientGoneStatus(lambda: control.cutting)),
            engine_slot(control.slot),  # current_engine(), for every task started below
            using(metrics),
        ):
            async with trio.open_nursery() as nursery:
                if opts.handle_signals:
                    await nursery.start(
                        watch_signals,
                        control.on_stop_signal,
                        control.on_force_signal,
                        control.on_reload_signal,
                    )
                if metrics is not None:
                    nursery.start_soon(metrics.run)
                if opts.request_timeout is not None:
                    nursery.start_soon(middleware.deadlines.run)  # the request deadline's reaper
                nursery.start_soon(middleware.websockets.run, control.drain)  # 1012 at the drain
                if metrics is not None and metrics_listener is not None:
                    control.metrics_url = await nursery.start(
                        serve_metrics, metrics, metrics_listener
                    )
                if control.refresher is not None:
                    await nursery.start(control.refresher.run)
                    await nursery.start(control.refresher.watch_expiry)
                if opts.shutdown_delay > 0:
                    nursery.start_soon(control.drain_after_delay)
                if engine is not None:
                    control.watch_engine(nursery, engine)
                urls = await nursery.start(
                    _run_server,
                    wrapped,
                    config,
                    sockets,
                    control,
                    ssl_context,
                    opts.transport,
                    opts.on_max_requests,
                    opts.http1_protocol,
                    opts.header_timeout,
                    middleware.answers_itself,
                    Door(config, middleware) if opts.limit_concurrency is not None else None,
                )
                if opts.engine_task is None or await control.start_engine_then_app(
                    nursery, opts.engine_task, opts, urls
                ):
                    for url in urls:
                        log.info("serving on %s", url)
                    notify("READY=1", f"STATUS=serving on {' '.join(urls)}")
                    control.ready = True
                    task_status.started(ServerHandle(urls, control))
                await control.served.wait()
                # The engine stops last: after the drain and the app's lifespan shutdown.
                control.engine_stop.set()
                if opts.engine_task is not None:
                    await control.engine_done.wait()
                nursery.cancel_scope.cancel()  # the helpers' work is done
    finally:
        sockets.close()
        if metrics_listener is not None:
            metrics_listener.socket.close()
        if isinstance(config.log, StatsdLogger):
            config.log.socket.close()  # (hypercorn's own, never closed by it)

    if control.forced_by is not None:
        log_foreign_holders(ports)
    result = outcome_of(control)
    if isinstance(result, EngineDeadError):
        raise result from control.engine_error  # the engine task's own exception, if any
    if result is not None:
        raise result
    log.info("stopped: %s", control.reason.value if control.reason else "server returned")
    if not control.ready:
        # Stopped while the engine task started (a signal): the start is over
        # all the same; a caller's nursery.start gets a handle that says so.
        task_status.started(ServerHandle(urls, control))


async def _run_server(
    app: Any,
    config: Config,
    sockets: Any,
    control: Control,
    ssl_context: SwitchableContext | None,
    transport: Transport,
    on_max_requests: Callable[[], None] | None,
    http: str,
    header_timeout: float,
    answers_itself: Callable[[dict[str, Any]], bool],
    door: Door | None,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    if on_max_requests is None:
        on_max_requests = lambda: control.stop(StopReason.MAX_REQUESTS)  # noqa: E731
    try:
        await serve_sockets(
            app,
            config,
            sockets,
            control.drain,
            ssl_context,
            transport=transport,
            http=http,
            header_timeout=header_timeout,
            answers_itself=answers_itself,
            door=door,
            on_max_requests=on_max_requests,
            on_drain_deadline=control.on_drain_deadline,
            app_start=control.app_start if control.has_engine_task else None,
            task_status=task_status,
        )
    finally:
        control.served.set()


def _startup_limit(config: Config, startup_timeout: float | None) -> float:
    """The lifespan startup limit: the option, else a changed config value, else none.

    hypercorn's default of 60 s was silent and too short to load a large model.
    """
    if startup_timeout is not None:
        return startup_timeout
    if config.startup_timeout != Config.startup_timeout:
        return float(config.startup_timeout)
    return math.inf


def _prepare_config(config: Config | None) -> Config:
    """Our own copy of the caller's Config (the runner writes limits into it), with
    hypercorn's trio statsd logger if ``statsd_host`` is set. That must happen before
    anything reads ``config.log``: the first read makes the logger, of the class set then."""
    if config is None:
        config = Config()
        config.bind = [DEFAULT_BIND]
    elif not isinstance(config, Config):
        raise ConfigError(f"config must be a hypercorn.config.Config, got {type(config).__name__}")
    else:
        config = copy.copy(config)
    config.set_statsd_logger_class(StatsdLogger)
    return config


def _log_routes(app: object, health_path: str | None = None) -> None:
    routes = describe_routes(app)
    health = [f"{health_path} [GET, HEAD] (answered by the runner)"] if health_path else []
    if routes is None:
        log.info(
            "routes: %s is a bare ASGI callable; its routes cannot be listed", type(app).__name__
        )
        for line in health:
            log.info("  %s", line)
        return
    routes = [*health, *routes]
    log.info("routes (%d):", len(routes))
    for line in routes:
        log.info("  %s", line)
