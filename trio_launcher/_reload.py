"""``--reload``: restart the server in a fresh process when the code changes.

For development only. The parent process never imports the app: it runs the
same command line without ``--reload`` as a child, watches the directories
(``--reload-dir``, default the current one) with watchfiles, and on a change
to a ``.py`` file stops the child with SIGTERM (a normal drain, bounded) and
starts a new one. A new process, not a re-import, because modules keep state
(an engine, a thread) that no reload can undo.

SIGINT/SIGTERM to the parent stop the child and the parent; the exit code is
the child's. The child runs in its own session (a terminal's Ctrl-C reaches
only the parent, which sends one SIGTERM) and holds the workers' lifeline, so
it drains if the parent is killed. watchfiles is an optional extra; without it ``--reload`` is a
usage error (exit 2) that names the extra.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

import trio

from ._errors import ConfigError

log = logging.getLogger("trio_launcher")

LIFELINE_ENV = "TRIO_LAUNCHER_RELOAD_LIFELINE"
"""In the child: the read end of a pipe whose write end only the parent holds."""

STOP_TIMEOUT = 10.0
"""Longest wait for a child to drain after SIGTERM before it is killed."""


def run_reloading(argv: Sequence[str], directories: Sequence[str]) -> int:
    """Serve ``argv`` (the CLI's arguments) in a child restarted on code changes."""
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--reload needs watchfiles: pip install 'trio-launcher[reload]'"
        ) from None
    child = [sys.executable, "-m", "trio_launcher", *without_reload(argv)]
    watched = [os.path.abspath(d) for d in directories] or [os.getcwd()]
    for directory in watched:
        if not os.path.isdir(directory):
            raise ConfigError(f"--reload-dir {directory}: not a directory")
    return trio.run(_Supervisor(child, watched).run)


def watch_lifeline() -> None:
    """In a child of ``--reload``: drain (SIGTERM to ourselves) when the parent dies.

    The parent never writes to the pipe; whatever ends it, SIGKILL included,
    the kernel closes the write end and the read returns.
    """
    value = os.environ.pop(LIFELINE_ENV, None)
    if value is None:
        return
    fd = int(value)
    os.set_inheritable(fd, False)

    def wait_for_parent() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        log.warning("reload: the parent process is gone: draining")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait_for_parent, name="trio-launcher-reload", daemon=True).start()


def without_reload(argv: Sequence[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--reload-dir":
            skip = True
        elif arg != "--reload" and not arg.startswith("--reload-dir="):
            kept.append(arg)
    return kept


class _Supervisor:
    """Wakes the loop on a code change, a stop signal or the child's own exit."""

    def __init__(self, child: list[str], watched: list[str]) -> None:
        import anyio

        self.child = child
        self.watched = watched
        self.stop = anyio.Event()  # watchfiles waits on it: set, its Rust thread ends
        self.stopping = False
        self.changed = False
        self.wake = trio.Event()
        # A lifeline: the child drains when we die, even by SIGKILL.
        self.lifeline_read, self.lifeline_write = os.pipe()

    def _wake(self) -> None:
        self.wake.set()

    async def watch(self) -> None:
        import watchfiles

        async for batch in watchfiles.awatch(
            *self.watched, watch_filter=watchfiles.PythonFilter(), stop_event=self.stop
        ):
            names = sorted({path for _, path in batch})
            log.info("reload: %s changed; restarting", ", ".join(names))
            self.changed = True
            self._wake()

    async def on_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("reload: %s: stopping the server", signal.Signals(signum).name)
                self.stopping = True
                self.stop.set()
                self._wake()

    async def run(self) -> int:
        code = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.on_signals)
            nursery.start_soon(self.watch)
            log.info("reload: watching %s", ", ".join(self.watched))
            while not self.stopping:
                self.changed = False
                self.wake = trio.Event()
                # Its own session: a terminal's Ctrl-C reaches only us, and the
                # child gets exactly one SIGTERM from us (not a second signal).
                process = await trio.lowlevel.open_process(
                    self.child,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    pass_fds=[self.lifeline_read],
                    env={**os.environ, LIFELINE_ENV: str(self.lifeline_read)},
                )
                async with trio.open_nursery() as waiting:

                    async def exited(process: trio.Process = process) -> None:
                        await process.wait()
                        self._wake()

                    waiting.start_soon(exited)
                    await self.wake.wait()
                    waiting.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    code = await _stop(process)
                if not self.stopping and not self.changed:
                    log.info("reload: the server exited %d; waiting for a change", code)
                    self.wake = trio.Event()
                    await self.wake.wait()
            nursery.cancel_scope.cancel()
        return code


async def _stop(process: trio.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            return await process.wait()
        log.warning("reload: the server did not stop in %s s; killing it", STOP_TIMEOUT)
        process.kill()
    return await process.wait()
