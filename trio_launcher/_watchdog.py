"""The engine protocol and the watchdog task.

An engine is whatever does the real work behind the HTTP front: a model, a
worker pool, a connection to a database. trio_launcher knows it only through
vLLM's two attributes: ``errored`` and ``is_running``. The engine is dead when
it has ``errored`` and is no longer ``is_running``; nothing can serve again
and the process should stop, so that systemd or Kubernetes restarts it.

vLLM polls those attributes every five seconds, so a death is noticed 2.5 s
late on average. We poll too (``watchdog_interval``), for engines that only
have the attributes, but an engine that also offers ``async def wait_dead()``
is awaited directly, and the runner reacts the moment that call returns:
milliseconds, not seconds.

Neither notices an engine that *hangs*: ``errored`` stays False, requests
never finish, and the health path said 200 for as long as anyone watched.
An engine that offers ``async def check_health()`` (vLLM's ``EngineClient``
name; it raises when unhealthy) is probed: every ``interval`` seconds, under
a deadline of ``timeout`` seconds. A probe that raises or misses its deadline
means the engine is dead, with the reason (what it raised, or how long it
was given). While a probe has run longer than ``OVERDUE_AFTER`` seconds (or
its whole timeout, if shorter) it is *overdue*: the health path answers 503
from then on, so a load balancer stops routing here before the verdict.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

import trio

from ._metrics import recorder

log = logging.getLogger("trio_launcher")


@runtime_checkable
class Engine(Protocol):
    """What the runner needs of an engine (vLLM's ``EngineClient`` fits)."""

    @property
    def errored(self) -> bool: ...

    @property
    def is_running(self) -> bool: ...


def engine_is_dead(engine: object) -> bool:
    """vLLM's rule: dead means ``errored and not is_running``."""
    return bool(getattr(engine, "errored", False)) and not bool(getattr(engine, "is_running", True))


def check_engine(engine: object) -> None:
    """Raise ``TypeError`` naming what is missing if ``engine`` is not an engine."""
    missing = [name for name in ("errored", "is_running") if not hasattr(engine, name)]
    if missing:
        raise TypeError(
            f"engine {engine!r} lacks {' and '.join(missing)}: an engine needs "
            "'errored' and 'is_running' attributes"
        )
    for name in ("wait_dead", "check_health"):
        method = getattr(engine, name, None)
        if method is not None and not callable(method):
            raise TypeError(f"engine {engine!r}: {name} must be an async method")


async def watch_engine(engine: object, interval: float, on_dead: Callable[[str], None]) -> None:
    """Call ``on_dead(how)`` once when the engine dies, then return.

    Polls ``errored``/``is_running`` every ``interval`` seconds (``inf``: never)
    and, if the engine has ``wait_dead()``, also awaits it.
    """
    wait_dead: Callable[[], Awaitable[object]] | None = getattr(engine, "wait_dead", None)
    async with trio.open_nursery() as nursery:
        if wait_dead is not None:
            nursery.start_soon(_await_death, wait_dead, on_dead, nursery.cancel_scope)
        if math.isfinite(interval):
            # Polling is the point: the engine only offers attributes.
            while not engine_is_dead(engine):  # noqa: ASYNC110
                await trio.sleep(interval)
            on_dead("the watchdog found it errored and not running")
            nursery.cancel_scope.cancel()


async def _await_death(
    wait_dead: Callable[[], Awaitable[object]],
    on_dead: Callable[[str], None],
    scope: trio.CancelScope,
) -> None:
    try:
        await wait_dead()
    except Exception:
        # A broken wait_dead must not take the server down: polling still runs.
        log.exception("engine.wait_dead() raised; falling back to polling")
        return
    on_dead("wait_dead() returned")
    scope.cancel()


OVERDUE_AFTER = 1.0


@dataclasses.dataclass(eq=False)
class HealthProbe:
    """Calls the engine's ``check_health()`` on a schedule; a task via :meth:`run`.

    Args:
        check_health: the engine's ``async def check_health()``.
        interval: seconds from the end of one probe to the start of the next.
        timeout: seconds a probe may take.
        on_dead: called once with the reason when a probe fails.
    """

    check_health: Callable[[], Awaitable[object]]
    interval: float
    timeout: float
    on_dead: Callable[[str], None]
    probes: int = dataclasses.field(default=0, init=False)
    _running_since: float | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def overdue(self) -> bool:
        """A probe has run longer than ``OVERDUE_AFTER`` (or its timeout, if shorter)."""
        since = self._running_since
        return since is not None and (
            trio.current_time() - since >= min(OVERDUE_AFTER, self.timeout)
        )

    async def run(self) -> None:
        """Probe until a probe fails (then call ``on_dead`` and return)."""
        while True:
            await trio.sleep(self.interval)
            failure = await self.probe()
            if failure is not None:
                self.on_dead(failure)
                return

    async def probe(self) -> str | None:
        """One probe: None if healthy, else why the engine counts as dead."""
        self._running_since = since = trio.current_time()
        self.probes += 1
        try:
            with trio.move_on_after(self.timeout) as waited:
                await self.check_health()
        except Exception as exc:
            return f"check_health() raised {type(exc).__name__}: {exc}"
        finally:
            self._running_since = None
            recorder().health_probe(trio.current_time() - since)
        if waited.cancelled_caught:
            return f"check_health() timed out after {self.timeout:g} s"
        return None
