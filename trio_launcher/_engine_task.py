"""The engine as a task of the runner's nursery: start, supervision, bounded cleanup.

An engine is often code that runs (a batching loop, a queue consumer) rather
than an object with attributes. serve_http(engine_task=fn) runs ``fn`` in its
own nursery, under run_engine_task below, which owns three rules:

* ``fn`` speaks trio's start protocol. The value it passes to
  ``task_status.started(value)`` is the engine; the runner reaches it
  through current_engine() and, when it has ``errored``/``is_running``,
  watches it like an ``engine=`` object.
* After ``started``, ``fn`` ending for any reason (an exception or a plain
  return) is the engine's death. The exception is caught here, never left to
  cancel the runner's nursery, and handed to ``on_end``: the runner drains
  and raises EngineDeadError from it. Before ``started`` an exception
  propagates to the runner's ``nursery.start``, which treats it the same way.
* The runner stops the engine last (``stop`` is set after the drain and the
  app's lifespan shutdown): ``fn`` is cancelled and has ``shutdown_timeout``
  seconds to clean up. Cleanup that must await runs under
  engine_cleanup_scope(), a shielded scope whose deadline is that moment.
  Any other cancellation from outside (a stop while the task starts, a
  failing app startup) leaves it the same bounded cleanup; a second signal
  (``cut``) ends the cleanup at once. A task still running after the
  deadline (an unbounded shield of its own, a thread that ignores
  cancellation) is reported with an ERROR line and ``on_stuck`` is called;
  the CLI then exits the process without it. In-process nothing can end
  such a task.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import trio

log = logging.getLogger("trio_launcher")


DEFAULT_ENGINE_SHUTDOWN_TIMEOUT = 10.0
START_PROGRESS_INTERVAL = 10.0
STUCK_GRACE = 1.0  # after the deadline, time for a cut cleanup to unwind


class EngineSlot:
    """Where the running engine is found (current_engine()); one per serve_http."""

    def __init__(self, engine: object | None = None) -> None:
        self.engine = engine
        self.started = engine is not None


_SLOT: contextvars.ContextVar[EngineSlot] = contextvars.ContextVar("trio_launcher_engine")


def current_engine() -> Any:
    """The engine of the serve_http this code runs under.

    The value the engine task passed to ``task_status.started(value)`` (or the
    ``engine=`` object). Works in request handlers and in the app's lifespan
    startup and shutdown, which run while the engine does.

    Raises:
        LookupError: not under serve_http, or it has no engine (yet).
    """
    slot = _SLOT.get(None)
    if slot is None or not slot.started:
        raise LookupError("no engine: not under serve_http(engine_task=...) or it has not started")
    return slot.engine


@contextlib.contextmanager
def engine_slot(slot: EngineSlot) -> Iterator[None]:
    """Make ``slot`` what current_engine() reads, for tasks started inside."""
    token = _SLOT.set(slot)
    try:
        yield
    finally:
        _SLOT.reset(token)


class _Ending:
    """The engine task's stop: when it began, its deadline, the cleanup scopes."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.deadline = math.inf
        self.stopping = False
        self.done = trio.Event()
        self.scope = trio.CancelScope()  # around the task: cancelled to stop it
        self.cleanups: list[trio.CancelScope] = []
        self.was_cut = False

    def begin(self) -> None:
        self.stopping = True
        self.deadline = trio.current_time() + self.timeout
        for scope in self.cleanups:
            scope.deadline = min(scope.deadline, self.deadline)

    def cut(self) -> None:
        self.was_cut = True
        for scope in self.cleanups:
            scope.cancel()


_ENDING: contextvars.ContextVar[_Ending] = contextvars.ContextVar("trio_launcher_ending")


@contextlib.contextmanager
def engine_cleanup_scope() -> Iterator[trio.CancelScope]:
    """A shielded cancel scope for the engine task's cleanup, bounded by the runner.

    Use it in the task's ``finally`` for cleanup that awaits::

        finally:
            with trio_launcher.engine_cleanup_scope():
                await model.aclose()

    The shield lets the cleanup await although the task was cancelled; the
    deadline is the end of ``engine_shutdown_timeout`` from the moment the
    runner stopped the task (or from now, when the task is ending by itself),
    and a second signal cuts it at once. Outside an engine task the default
    timeout applies.
    """
    ending = _ENDING.get(None)
    timeout = ending.timeout if ending is not None else DEFAULT_ENGINE_SHUTDOWN_TIMEOUT
    deadline = trio.current_time() + timeout
    if ending is not None and ending.stopping:
        deadline = min(deadline, ending.deadline)
    scope = trio.CancelScope(shield=True, deadline=deadline)
    if ending is not None:
        ending.cleanups.append(scope)
        if ending.was_cut:
            scope.cancel()
    try:
        with scope:
            yield scope
    finally:
        if ending is not None:
            ending.cleanups.remove(scope)


class _Status:
    """Forwards ``started()`` to the runner and remembers that it was called."""

    def __init__(self, inner: trio.TaskStatus[Any]) -> None:
        self.inner = inner
        self.called = False

    def started(self, value: Any = None) -> None:
        self.called = True
        self.inner.started(value)


async def run_engine_task(
    fn: Callable[..., Awaitable[object]],
    stop: trio.Event,
    shutdown_timeout: float,
    on_end: Callable[[BaseException | None], None],
    on_stuck: Callable[[], None],
    *,
    cut: trio.Event | None = None,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the engine task ``fn`` until it ends or ``stop`` is set; see above.

    Args:
        fn: ``async def fn(*, task_status=trio.TASK_STATUS_IGNORED)``.
        stop: set by the runner when the engine must stop (cancel, then
            ``shutdown_timeout`` seconds for cleanup).
        shutdown_timeout: seconds the cancelled task has to finish.
        on_end: called once when ``fn`` ends after ``started`` other than by
            the runner's cancellation: with its exception (also one raised
            while it was being stopped: a crash already under way when the
            stop came looks just like that), or with None when it returned.
        on_stuck: called when ``fn`` is still running after the deadline.
        cut: set by the runner on a second signal: the cleanup ends at once.
        task_status: receives the value ``fn`` passed to ``started``.

    Raises:
        Whatever ``fn`` raised before calling ``started``; RuntimeError if it
        returned before that.
    """
    ending = _Ending(shutdown_timeout)
    _ENDING.set(ending)  # this task's context: fn, started below, inherits it
    outcome = _Outcome()
    try:
        async with trio.open_nursery() as guard:
            guard.start_soon(
                _stop_when_asked, stop, cut if cut is not None else trio.Event(), ending, on_stuck
            )
            try:
                with ending.scope:
                    async with trio.open_nursery() as nursery:
                        began = trio.current_time()
                        async with _start_progress(began):
                            value = await nursery.start(_guarded, fn, outcome)
                        if not outcome.failed_to_start:
                            log.info("the engine task started in %.1f s",
                                     trio.current_time() - began)  # fmt: skip
                            task_status.started(value)
            finally:
                ending.done.set()
                guard.cancel_scope.cancel()
    finally:  # (also when cancelled from outside: an error is never lost)
        if outcome.error is not None and not outcome.failed_to_start:
            on_end(outcome.error)
    if outcome.failed_to_start:
        assert outcome.error is not None
        raise outcome.error
    if outcome.error is None and not ending.stopping:
        on_end(None)


class _Outcome:
    error: BaseException | None = None
    failed_to_start = False


_NOT_STARTED = object()


async def _guarded(
    fn: Callable[..., Awaitable[object]],
    outcome: _Outcome,
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``fn``; its exception is recorded, never left to cancel the nursery.

    ``trio.Cancelled`` is never caught: ``except*`` splits it out of a group
    that also holds a real error, and it goes on up.
    """
    status = _Status(task_status)
    try:
        await fn(task_status=status)
    except* Exception as group:
        outcome.error = group.exceptions[0] if len(group.exceptions) == 1 else group
    if not status.called:
        if outcome.error is None:
            outcome.error = RuntimeError("the engine task returned without calling started()")
        outcome.failed_to_start = True
        task_status.started(_NOT_STARTED)


async def _stop_when_asked(
    stop: trio.Event, cut: trio.Event, ending: _Ending, on_stuck: Callable[[], None]
) -> None:
    try:
        await stop.wait()
        ending.begin()
        ending.scope.cancel()
        await _await_end(ending, on_stuck)
    except trio.Cancelled:
        # Cancelled from outside (or the task is done: nothing left to wait
        # for). A second signal (``cut``) ends the cleanup at once; any other
        # outside cancellation (a stop while the task starts, a failing app
        # startup, an embedding program) leaves it its bounded cleanup.
        if ending.done.is_set():
            raise
        if not ending.stopping:
            ending.begin()
        if cut.is_set():
            ending.cut()
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cut_when_set, cut, ending)
                await _await_end(ending, on_stuck)
                nursery.cancel_scope.cancel()
        raise


async def _await_end(ending: _Ending, on_stuck: Callable[[], None]) -> None:
    """Wait for the cancelled task until its deadline; report a cut cleanup or
    a task that runs on (a shield of its own, a thread that ignores cancellation)."""
    with trio.move_on_at(ending.deadline):
        await ending.done.wait()
        return
    with trio.move_on_after(STUCK_GRACE):
        await ending.done.wait()
        log.error("the engine task's cleanup did not finish within %g s: it was cut short",
                  ending.timeout)  # fmt: skip
        return
    _report_stuck(ending, on_stuck)


async def _cut_when_set(cut: trio.Event, ending: _Ending) -> None:
    await cut.wait()
    ending.cut()


def _report_stuck(ending: _Ending, on_stuck: Callable[[], None]) -> None:
    log.error("the engine task did not finish within %g s of its cancellation (it ignores "
              "cancellation): exiting without it", ending.timeout)  # fmt: skip
    on_stuck()


@contextlib.asynccontextmanager
async def _start_progress(began: float) -> AsyncIterator[None]:
    """Log every START_PROGRESS_INTERVAL s while the engine task starts (a model
    load takes minutes; silence looks like a hang)."""
    log.info("starting the engine task; the server answers 503 until it is ready")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_log_progress, began)
        yield
        nursery.cancel_scope.cancel()


async def _log_progress(began: float) -> None:
    while True:
        await trio.sleep(START_PROGRESS_INTERVAL)
        log.info("the engine task is still starting (%.0f s)", trio.current_time() - began)
