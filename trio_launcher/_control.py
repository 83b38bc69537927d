"""The state serve_http's sibling tasks share: the stop events, and why they were set.

Shutdown is carried by events and cancel scopes, never by a stored task handle:

* ``Control.stopping`` is set the moment a stop is asked for (readiness
  turns 503); ``Control.drain``, a ``trio.Event``, is the server's shutdown
  trigger: setting it closes the listeners and starts the graceful drain
  (at once, or after ``shutdown_delay`` for a signal). A signal, a dead
  engine, ``ServerHandle.shutdown()`` and ``max_requests`` all ask for a stop;
  the first to do so records *why* the server stopped (a dead engine outranks
  the others: its death is never silent).
* ``Control.force``, a ``trio.CancelScope`` around the nursery, is the
  emergency stop for a second signal: cancelling it ends every task at once.
* ``Control.engine_starting`` (a cancel scope: a stop while the engine task
  starts cancels its start) and ``Control.engine_stop`` (an event set once
  the server has returned: the engine task is cancelled then).

The tasks report to it through its ``on_*`` callbacks (a signal, an engine
death, an app error, the drain deadline); :func:`outcome_of` turns what was
recorded into what serve_http raises.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ._bounds import InFlight
from ._engine_task import EngineSlot, run_engine_task
from ._errors import EngineDeadError, ForcedShutdown, LauncherError
from ._metrics import recorder
from ._options import ServeOptions
from ._server import AppStart
from ._systemd import notify, notify_reloading
from ._tls import CertificateRefresher
from ._watchdog import HealthProbe, check_engine, engine_is_dead, watch_engine

log = logging.getLogger("trio_launcher")


class StopReason(enum.Enum):
    """Why the server stopped (or is stopping)."""

    REQUESTED = "shutdown() was called"
    SIGNAL = "a signal asked for it"
    ENGINE_DEAD = "the engine died"
    MAX_REQUESTS = "max_requests was reached"


class Control:
    """The state the sibling tasks share (the module docstring says how it stops)."""

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
        _on_engine_stuck(outcome_of(self))


def outcome_of(control: Control) -> LauncherError | None:
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
