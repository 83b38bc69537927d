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

A worker of ``--workers`` is different: it takes its orders from the parent,
which alone decides (the reasoning is in ``_workers.py``). The parent writes
one line per order to a pipe whose read end the worker inherited
(:func:`obey_parent`): ``drain``, ``force N``; end of file means the parent is
gone, so drain. A SIGINT or SIGTERM delivered to the worker directly (systemd's
``KillMode=control-group`` signals every process of the unit) means "drain",
however often it comes: a worker never takes a signal as the second one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType

import trio

log = logging.getLogger("trio_launcher")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)


_orders_fd: int | None = None


def obey_parent(fd: int) -> None:
    """In a worker: from now on, orders come from the parent over ``fd``, and
    SIGINT/SIGTERM only ever drain. ``watch_signals`` reads the orders."""
    global _orders_fd
    os.set_inheritable(fd, False)  # the app's own subprocesses must not hold it
    _orders_fd = fd


def _ignore_late(signum: int, frame: FrameType | None) -> None:
    log.info("ignoring %s that arrived while the runner was not running", signal.strsignal(signum))


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
    """Route signals (and, in a worker, the parent's orders) until cancelled.

    The first SIGINT/SIGTERM calls ``on_stop(signum)``; any later one calls
    ``on_force(signum)`` (in a worker: nothing, only the parent forces);
    SIGHUP calls ``on_reload()``. Must run in the main thread.
    """
    router = _Router(on_stop, on_force, on_reload, worker=_orders_fd is not None)
    with _absorb_late_signals():
        try:
            with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
                async with trio.open_nursery() as nursery:
                    if _orders_fd is not None:
                        nursery.start_soon(_read_orders, os.dup(_orders_fd), router)
                    task_status.started()
                    async for signum in signals:
                        router.signal(signum)
        finally:
            # A signal that reached trio's handler but not yet the receiver is
            # re-raised by trio from the event loop once the receiver is closed.
            # Let those callbacks run while the absorbing handler is still here.
            with trio.CancelScope(shield=True):
                for _ in range(3):
                    await trio.lowlevel.checkpoint()


@dataclass(eq=False)
class _Router:
    on_stop: Callable[[int], None]
    on_force: Callable[[int], None]
    on_reload: Callable[[], None]
    worker: bool = field(kw_only=True)
    stopping: bool = field(default=False, init=False)

    def signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            log.info("SIGHUP: reloading TLS certificates")
            self.on_reload()
        elif not self.stopping:
            self.drain(signum, f"{name}: draining")
        elif self.worker:
            log.info("%s: already draining (only the parent process can force the stop)", name)
        else:
            log.warning("second %s: stopping at once", name)
            self.on_force(signum)

    def drain(self, signum: int, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("%s%s", why, "" if self.worker else " (send it again to stop at once)")
        self.on_stop(signum)

    def order(self, line: bytes) -> None:
        words = line.decode(errors="replace").split()
        if words == ["drain"]:
            self.drain(signal.SIGTERM, "the parent process says: draining")
        elif len(words) == 2 and words[0] == "force" and words[1].isdigit():
            log.warning("the parent process says: stopping at once")
            self.stopping = True
            self.on_force(int(words[1]))
        else:
            log.warning("ignoring an unknown order from the parent process: %r", line)


async def _read_orders(fd: int, router: _Router) -> None:
    buffer = b""
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some(4096):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                router.order(line)
    router.drain(signal.SIGTERM, "the parent process is gone: draining")
