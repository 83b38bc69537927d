"""SIGINT/SIGTERM start the drain, a second one stops at once, SIGHUP reloads TLS.

Three facts about trio's signal receiver shape this module:

* ``trio.open_signal_receiver`` owns its signals for the whole ``with`` block,
  so the receiver is opened before any socket listens and stays open until
  the runner is done. A SIGHUP that arrived with default handling would kill
  the process.
* Signals that arrive before the receiver reads them are merged: a quick
  TERM, TERM reads as one. "A second signal" is therefore one that arrives
  after the first was taken, which is exactly what an operator means by
  pressing Ctrl-C twice.
* On leaving the block, trio re-raises pending signals with the handlers that
  were installed before it. A SIGTERM caught in that last instant would then
  kill the process with 143 and lie about why it stopped. So before opening
  the receiver we install a Python handler that only records late signals;
  trio restores and re-raises into it, and we put the original handlers back
  afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from types import FrameType

import trio

log = logging.getLogger("trio_launcher")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)


def _ignore_late(signum: int, frame: FrameType | None) -> None:
    log.info("ignoring %s that arrived while the runner was exiting", signal.strsignal(signum))


def absorb_signals_for_process() -> None:
    """For a program that owns the process (the CLI): from now on until exit,
    a stop signal outside the runner's receiver is logged and ignored.

    Without this, a signal that arrives after serve_http has put the original
    handlers back but before the process has exited would kill it (143, or
    -1 for SIGHUP) and hide the real exit code. Install it right before
    ``trio.run``: the runner opens its own receiver at once.
    """
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, _ignore_late)


def ignore_signals_until_exit() -> None:
    """After the run, in a program that owns the process: SIG_IGN until exit.

    Python's finalization puts SIG_DFL back for every signal that has a Python
    handler, so a signal in the process's last milliseconds would still kill
    it; SIG_IGN is left alone.
    """
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def _absorb_late_signals() -> Iterator[None]:
    previous = {sig: signal.signal(sig, _ignore_late) for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def watch_signals(
    on_stop: Callable[[int], None],
    on_force: Callable[[int], None],
    on_reload: Callable[[], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Route signals until cancelled.

    The first SIGINT/SIGTERM calls ``on_stop(signum)``; any later one calls
    ``on_force(signum)``; SIGHUP calls ``on_reload()``. Must run in the main
    thread.
    """
    with _absorb_late_signals():
        try:
            with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
                task_status.started()
                await _route(signals, on_stop, on_force, on_reload)
        finally:
            # A signal that reached trio's handler but not yet the receiver is
            # re-raised by trio from the event loop once the receiver is closed.
            # Let those callbacks run while the absorbing handler is still here.
            with trio.CancelScope(shield=True):
                for _ in range(3):
                    await trio.lowlevel.checkpoint()


async def _route(
    signals: AsyncIterator[int],
    on_stop: Callable[[int], None],
    on_force: Callable[[int], None],
    on_reload: Callable[[], None],
) -> None:
    stopping = False
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            log.info("SIGHUP: reloading TLS certificates")
            on_reload()
        elif not stopping:
            stopping = True
            log.info("%s: draining (send it again to stop at once)", name)
            on_stop(signum)
        else:
            log.warning("second %s: stopping at once", name)
            on_force(signum)
