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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

import trio

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
    wait_dead = getattr(engine, "wait_dead", None)
    if wait_dead is not None and not callable(wait_dead):
        raise TypeError(f"engine {engine!r}: wait_dead must be an async method")


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
