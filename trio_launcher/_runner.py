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

Shutdown is carried by two things, never by a stored task handle:

* ``_Control.drain``, a ``trio.Event``, is the server's shutdown trigger.
  Setting it closes the listeners and starts the graceful drain. A signal, a
  dead engine, ``ServerHandle.shutdown()`` and ``max_requests`` all set it;
  the first to do so records *why* the server stopped.
* ``_Control.force``, a ``trio.CancelScope`` around the nursery, is the
  emergency stop for a second signal: cancelling it ends every task at once.
* ``_Control.engine_starting`` (a cancel scope: a stop while the engine task
  starts cancels its start) and ``_Control.engine_stop`` (an event set once
  the server has returned: the engine task is cancelled then).

When the server task returns (the drain is over and lifespan shutdown ran),
the body of the nursery cancels the nursery's own scope to end the helpers,
and serve_http turns the recorded reason into its outcome: return for a
signal or a requested shutdown, ``EngineDeadError`` for a dead engine,
``ForcedShutdown`` for a second signal.
"""

from __future__ import annotations

import copy
import enum
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Unpack

import trio

from ._asgi import ENGINE_ERRORS, Limits, RunnerMiddleware, StartingGate, describe_routes
from ._bounds import Bounds, ClientGoneStatus, InFlight
from ._engine_task import EngineSlot, engine_slot, run_engine_task
from ._errors import (
    ConfigError,
    EngineDeadError,
    ForcedShutdown,
    LauncherError,
    OptionError,
    readable_errors,
)
from ._hypercorn import Config, wrap_app
from ._metrics import recorder, server_metrics, using
from ._observe import Observed, bind_metrics, serve_metrics
from ._options import ServeKwargs, ServeOptions, Transport, build_options
from ._ports import bind_sockets, log_foreign_holders, tcp_ports
from ._proxy import ProxyHeadersMiddleware
from ._server import AppStart, serve_sockets
from ._signals import watch_signals
from ._systemd import notify, notify_reloading
from ._tls import CertificateRefresher, SwitchableContext, initial_context
from ._watchdog import HealthProbe, check_engine, engine_is_dead, watch_engine

log = logging.getLogger("trio_launcher")

DEFAULT_BIND = "127.0.0.1:8000"


class StopReason(enum.Enum):
    """Why the server stopped (or is stopping)."""

    REQUESTED = "shutdown() was called"
    SIGNAL = "a signal asked for it"
    ENGINE_DEAD = "the engine died"
    MAX_REQUESTS = "max_requests was reached"


class _Control:
    """The state the sibling tasks share: the stop events and why they were set.

    ``stopping`` is set the moment a stop is asked for (readiness turns 503);
    ``drain`` is set when the listeners must close: at once, or after the
    shutdown delay for a signal.
    """

    def __init__(
        self, engine: object | None, keep_alive_on_engine_death: bool, shutdown_delay: float = 0
    ) -> None:
        self.engine = engine
        self.keep_alive_on_engine_death = keep_alive_on_engine_death
        self.shutdown_delay = shutdown_delay
        self.stopping = trio.Event()
        self.drain = trio.Event()
        self.force = trio.CancelScope()
        self.served = trio.Event()
        self.reason: StopReason | None = None
        self.stop_signal: int | None = None
        self.forced_by: int | None = None
        self.engine_dead = False
        self.engine_death: str | None = None
        self.refresher: CertificateRefresher | None = None
        self.ready = False
        self.in_flight = InFlight()
        self.probe: HealthProbe | None = None
        self.cut_requests = 0
        self.cutting = False  # the drain deadline passed: requests are being cut
        # serve_http(engine_task=...): see start_engine_task.
        self.slot = EngineSlot(engine)
        self.has_engine_task = False
        self.starting = False  # the gate answers 503 while set
        self.app_start = AppStart()
        self.engine_starting = trio.CancelScope()  # cancelled by a stop during the start
        self.engine_stop = trio.Event()
        self.engine_cut = trio.Event()
        self.engine_done = trio.Event()
        self.engine_error: BaseException | None = None
        self.watchdog_interval = math.inf
        self.health_probe = (math.inf, math.inf)  # check_health(): interval, timeout
        self.metrics_url: str | None = None

    def stop(self, reason: StopReason) -> None:
        # A dead engine outranks any other reason: its death is never silent.
        if self.reason is None or reason is StopReason.ENGINE_DEAD:
            self.reason = reason
        if not self.stopping.is_set():
            notify("STOPPING=1")
        self.stopping.set()
        self.engine_starting.cancel()
        if reason is not StopReason.SIGNAL or self.shutdown_delay <= 0:
            self.drain.set()

    async def drain_after_delay(self) -> None:
        """Task: after a stop signal, keep serving ``shutdown_delay`` s, then drain."""
        await self.stopping.wait()
        if not self.drain.is_set():
            log.info(
                "shutdown delay: serving %s s more before draining (readiness is 503)",
                self.shutdown_delay,
            )
            with trio.move_on_after(self.shutdown_delay):
                await self.drain.wait()
        self.drain.set()

    def notify_reloading(self, reloading: bool) -> None:
        """systemd RELOADING=1 / READY=1 around a reload, once ready (never before
        READY=1: a SIGHUP during startup must not announce readiness)."""
        if self.ready and not self.stopping.is_set():
            notify_reloading(reloading)

    def health(self) -> tuple[int, dict[str, Any]]:
        """The health path's answer: 200 while serving with a live engine, else 503."""
        state = "stopping" if self.stopping.is_set() else "serving"
        if self.starting and state == "serving":
            return 503, {"status": "starting"}
        body: dict[str, Any] = {"status": state}
        overdue = self.probe is not None and self.probe.overdue and not self.engine_dead
        if self.engine is not None or self.has_engine_task:
            body["engine"] = "dead" if self.engine_dead else "unresponsive" if overdue else "alive"
        healthy = state == "serving" and not self.engine_dead and not overdue
        return (200 if healthy else 503), body

    def on_drain_deadline(self, graceful_timeout: float) -> None:
        """The drain reached graceful_timeout: say what is about to be cut."""
        self.cutting = True
        self.cut_requests = len(self.in_flight)
        if self.cut_requests:
            log.error(
                "drain: graceful_timeout (%g s) reached with %d request%s still running; "
                "cutting them: %s",
                graceful_timeout,
                self.cut_requests,
                "" if self.cut_requests == 1 else "s",
                self.in_flight.describe(),
            )

    def on_stop_signal(self, signum: int) -> None:
        self.stop_signal = signum
        self.stop(StopReason.SIGNAL)

    def on_force_signal(self, signum: int) -> None:
        self.forced_by = signum
        self.engine_cut.set()  # (before the cancel: the engine's cleanup is cut too)
        self.force.cancel()

    def on_reload_signal(self) -> None:
        if self.refresher is None:
            log.info("TLS is off: SIGHUP has nothing to reload")
        else:
            self.refresher.request_reload()

    def on_engine_dead(self, how: str) -> None:
        if self.engine_dead or self.engine_stop.is_set():  # (stopped on purpose: not a death)
            return
        self.engine_dead = True
        self.engine_death = how
        recorder().engine_up(False)
        if self.keep_alive_on_engine_death:
            log.error(
                "the engine died (%s); still serving because keep-alive on engine death is on", how
            )
            return
        log.error("the engine died (%s): draining", how)
        self.stop(StopReason.ENGINE_DEAD)

    def on_app_error(self, exc: BaseException) -> None:
        """The dead check run after every error a request raised."""
        if isinstance(exc, EngineDeadError):
            self.on_engine_dead(f"a request raised EngineDeadError: {exc}")
        elif self.engine is not None and engine_is_dead(self.engine):
            self.on_engine_dead(f"a request raised {type(exc).__name__} and the engine is dead")

    async def start_engine_task(
        self, nursery: trio.Nursery, fn: Callable[..., Awaitable[object]], opts: ServeOptions
    ) -> None:
        """Start the engine task in ``nursery`` and wait until it has started.

        A stop meanwhile cancels the start; a crash (or a return) before
        ``started`` is the engine's death. The task's value becomes the engine.
        """
        began = trio.current_time()
        with self.engine_starting:
            try:
                value = await nursery.start(self._engine_task, fn, opts.engine_shutdown_timeout)
            except Exception as exc:
                self.on_engine_task_end(exc, trio.current_time() - began)
                return
        if self.engine_starting.cancelled_caught:
            log.info("stopping before the engine task had started: its start was cancelled")
            return
        self.slot.engine, self.slot.started = value, True
        try:
            check_engine(value)
        except TypeError:
            return  # a value without the engine attributes: the task itself is watched
        self.engine = value
        self.watch_engine(nursery, value)

    def watch_engine(self, nursery: trio.Nursery, engine: object) -> None:
        """The watchdog and, if the engine has ``check_health()``, the health probe."""
        recorder().engine_up(True)
        nursery.start_soon(watch_engine, engine, self.watchdog_interval, self.on_engine_dead)
        check_health = getattr(engine, "check_health", None)
        if check_health is not None:
            interval, timeout = self.health_probe
            self.probe = HealthProbe(check_health, interval, timeout, self.on_engine_dead)
            nursery.start_soon(self.probe.run)

    async def start_engine_then_app(
        self,
        nursery: trio.Nursery,
        fn: Callable[..., Awaitable[object]],
        opts: ServeOptions,
        urls: list[str],
    ) -> bool:
        """The sockets accept (503); start the engine task, then the app. False
        if the server stopped first (the app is then never started)."""
        for url in urls:
            log.info("accepting on %s; 503 until the engine task has started", url)
        notify("STATUS=starting the engine task")
        await self.start_engine_task(nursery, fn, opts)
        self.app_start.skip = self.stopping.is_set()
        self.app_start.go.set()
        if self.app_start.skip:
            return False
        await self.app_start.started.wait()
        self.starting = False
        return True

    async def _engine_task(
        self,
        fn: Callable[..., Awaitable[object]],
        shutdown_timeout: float,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await run_engine_task(
                fn,
                self.engine_stop,
                shutdown_timeout,
                self.on_engine_task_end,
                self._engine_stuck,
                cut=self.engine_cut,
                task_status=task_status,
            )
        finally:
            self.engine_done.set()

    def on_engine_task_end(
        self, error: BaseException | None, starting: float | None = None
    ) -> None:
        """The engine task ended by itself (``starting``: seconds into its start)."""
        self.engine_error = error
        when = "" if starting is None else f" {starting:.1f} s into its start"
        if error is None:
            how = f"the engine task returned{when}"
        else:
            how = f"the engine task raised {type(error).__name__}{when}: {error}"
            log.error("%s", how, exc_info=error)  # the traceback, once
        if self.engine_dead:
            # A request that needed the engine saw the death first; the task's
            # own end is the cause worth reporting.
            self.engine_death = how
        self.on_engine_dead(how)

    def _engine_stuck(self) -> None:
        _on_engine_stuck(_outcome(self))


class ServerHandle:
    """What ``nursery.start(serve_http, ...)`` returns.

    Attributes:
        urls: every bound URL, like ``http://127.0.0.1:41234``.
    """

    def __init__(self, urls: list[str], control: _Control) -> None:
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

    control = _Control(engine, opts.keep_alive_on_engine_death, opts.shutdown_delay)
    control.watchdog_interval = opts.watchdog_interval
    control.health_probe = (opts.engine_health_interval, opts.engine_health_timeout)
    error_types = (*ENGINE_ERRORS, *opts.engine_error_types)
    served_app = app
    if is_quart_app(app):
        from .quart import install

        served_app = install(app, control.on_app_error, error_types)
    elif is_starlette_app(app):
        from .starlette import install as install_starlette

        served_app = install_starlette(app, control.on_app_error, error_types)
    middleware = RunnerMiddleware(
        served_app,
        control.on_app_error,
        error_types,
        health_path=opts.health_path,
        health=control.health,
        limits=Limits(opts.max_header_count, opts.max_head_size),
        bounds=Bounds(opts.request_timeout, opts.limit_concurrency, opts.body_timeout),
        in_flight=control.in_flight,
    )
    outer: Any = middleware
    if opts.proxy_headers:
        outer = ProxyHeadersMiddleware(outer, opts.forwarded_allow_ips)
    if opts.engine_task is not None:
        control.has_engine_task = control.starting = True
        outer = StartingGate(outer, lambda: control.starting, opts.health_path)
    metrics = server_metrics(opts.metrics_path, opts.metrics_bind)
    if metrics is not None or opts.request_ids:
        outer = Observed(
            outer,
            metrics,
            metrics_path=opts.metrics_path,
            request_ids=opts.request_ids,
            draining=control.drain.is_set,
        )
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
            _access_log_filter(config, opts.access_log_exclude),
            _logger_filter(config.log.access_logger, ClientGoneStatus(lambda: control.cutting)),
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

    if control.forced_by is not None:
        log_foreign_holders(ports)
    outcome = _outcome(control)
    if isinstance(outcome, EngineDeadError):
        raise outcome from control.engine_error  # the engine task's own exception, if any
    if outcome is not None:
        raise outcome
    log.info("stopped: %s", control.reason.value if control.reason else "server returned")
    if not control.ready:
        # Stopped while the engine task started (a signal): the start is over
        # all the same; a caller's nursery.start gets a handle that says so.
        task_status.started(ServerHandle(urls, control))


def _outcome(control: _Control) -> LauncherError | None:
    """What serve_http raises for the way it stopped (None: it returns)."""
    if control.forced_by is not None:
        return ForcedShutdown(control.forced_by)
    if control.reason is StopReason.ENGINE_DEAD:
        return EngineDeadError(
            f"the engine died ({control.engine_death}); the server drained and stopped"
        )
    return None


_engine_stuck_hook: Callable[[LauncherError | None], None] | None = None


def exit_process_if_engine_stuck(hook: Callable[[LauncherError | None], None] | None) -> None:
    """For a program that owns the process (the CLI): when the engine task is
    still running after its shutdown timeout, call ``hook`` with what serve_http
    would raise (it exits the process: nothing in trio can end such a task)."""
    global _engine_stuck_hook
    _engine_stuck_hook = hook


def _on_engine_stuck(outcome: LauncherError | None) -> None:
    if _engine_stuck_hook is not None:
        _engine_stuck_hook(outcome)


async def _run_server(
    app: Any,
    config: Config,
    sockets: Any,
    control: _Control,
    ssl_context: SwitchableContext | None,
    transport: Transport,
    on_max_requests: Callable[[], None] | None,
    http: str,
    header_timeout: float,
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
    """Our own copy of the caller's Config (the runner writes limits into it)."""
    if config is None:
        config = Config()
        config.bind = [DEFAULT_BIND]
        return config
    if not isinstance(config, Config):
        raise ConfigError(f"config must be a hypercorn.config.Config, got {type(config).__name__}")
    return copy.copy(config)


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


def is_quart_app(app: object) -> bool:
    """A Quart app, recognised without importing quart."""
    return any(cls.__module__.split(".")[0] == "quart" for cls in type(app).__mro__)


def is_starlette_app(app: object) -> bool:
    """A Starlette or FastAPI app, recognised without importing either."""
    return any(cls.__module__.split(".")[0] == "starlette" for cls in type(app).__mro__)


class _ExcludePaths(logging.Filter):
    def __init__(self, paths: Sequence[str]) -> None:
        super().__init__()
        self.paths = frozenset(paths)

    def filter(self, record: logging.LogRecord) -> bool:
        atoms = record.args
        return not (isinstance(atoms, Mapping) and atoms.get("U") in self.paths)


@contextmanager
def _access_log_filter(config: Config, paths: Sequence[str]) -> Iterator[None]:
    logger = config.log.access_logger if paths else None
    if logger is None:
        yield
        return
    exclude = _ExcludePaths(paths)
    logger.addFilter(exclude)
    try:
        yield
    finally:
        logger.removeFilter(exclude)


@contextmanager
def _logger_filter(logger: logging.Logger | None, log_filter: logging.Filter) -> Iterator[None]:
    if logger is None:
        yield
        return
    logger.addFilter(log_filter)
    try:
        yield
    finally:
        logger.removeFilter(log_filter)
