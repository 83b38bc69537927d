"""Worker processes: N runners sharing one set of listening sockets.

The parent binds the sockets once and starts N children, each a complete
``trio-launcher`` (its own nursery, watchdog and refresher) serving the
inherited descriptors (``--bind fd://N``); the kernel spreads connections
among them. The parent is a small trio program with one supervisor task per
worker and the same signal listener as the runner:

* SIGTERM/SIGINT: forwarded, every worker drains; the parent closes its own
  copies of the sockets so that the port really closes when the workers do.
  A second one is forwarded too (the workers stop at once) and the parent
  exits 128+N.
* SIGHUP: forwarded (every worker reloads its certificates).
* A worker that crashes is restarted with a doubling backoff; more than
  ``max_restarts`` crashes within ``window`` seconds means something is
  wrong for good: the parent stops every worker and exits 1.
* A worker that exits 3 (its engine died) stops them all; the parent exits 3.
* A worker that exits 0 on its own (``max_requests``) is replaced at once.
* Workers drain and exit when the parent dies, even by SIGKILL: each holds
  the read end of a pipe whose write end only the parent has (a "lifeline").

systemd sees one service: the workers report ``READY=1`` to a private notify
socket of the parent, which tells systemd once all of them serve.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import signal
import socket
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from ._metrics import recorder
from ._ports import BoundSockets
from ._signals import watch_signals
from ._systemd import notify

log = logging.getLogger("trio_launcher")

EXIT_USAGE = 2
EXIT_ENGINE_DEAD = 3


@dataclass(frozen=True)
class RestartPolicy:
    """How crashed workers are restarted."""

    max_restarts: int = 5
    window: float = 60.0
    first_backoff: float = 0.1
    max_backoff: float = 5.0


LIFELINE_ENV = "TRIO_LAUNCHER_LIFELINE"


def watch_lifeline() -> None:
    """In a worker: when the parent dies, drain (SIGTERM to ourselves).

    The parent holds the write end of a pipe and never writes; the worker
    blocks reading the read end in a daemon thread. Whatever kills the parent,
    SIGKILL included, the kernel closes the write end and the read returns.
    (``PR_SET_PDEATHSIG`` would fire when the *thread* that forked the child
    exits, and trio forks from a thread of its thread cache.)
    """
    value = os.environ.pop(LIFELINE_ENV, None)
    if value is None:
        return
    fd = int(value)

    def wait_for_parent() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        log.warning("the parent process is gone: draining")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait_for_parent, name="trio-launcher-lifeline", daemon=True).start()


class _Supervisor:
    def __init__(self, argv: Sequence[str], count: int, sockets: BoundSockets,
                 policy: RestartPolicy) -> None:  # fmt: skip
        self.argv = list(argv)
        self.count = count
        self.sockets = sockets
        self.policy = policy
        self.procs: dict[int, trio.Process] = {}  # worker slot -> live process, to signal it
        self.stopping = False
        self.forced_by: int | None = None
        self.exit_code = 0
        self.notify_address = f"@trio-launcher-{os.getpid()}-{secrets.token_hex(4)}"
        # The lifeline: workers inherit the read end; the write end dies with us.
        self.lifeline_read, self.lifeline_write = os.pipe()

    # --- signals ------------------------------------------------------------

    def _signal_all(self, signum: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, code: int | None = None) -> None:
        if code is not None and self.exit_code == 0:
            self.exit_code = code
        if self.stopping:
            return
        self.stopping = True
        notify("STOPPING=1")
        self.sockets.close()  # the workers hold the port now; it closes with them
        self._signal_all(signum)

    def on_stop_signal(self, signum: int) -> None:
        log.info("%s: workers drain", signal.Signals(signum).name)
        self.stop(signum)

    def on_force_signal(self, signum: int) -> None:
        log.warning("second %s: workers stop at once", signal.Signals(signum).name)
        self.forced_by = signum
        self._signal_all(signum)

    def on_reload_signal(self) -> None:
        self._signal_all(signal.SIGHUP)

    # --- workers --------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = self.notify_address
        env[LIFELINE_ENV] = str(self.lifeline_read)
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
        return env

    async def keep_worker(self, slot: int) -> None:
        crashes: collections.deque[float] = collections.deque()
        backoff = self.policy.first_backoff
        fds = [sock.fileno() for sock in self.sockets.all()] + [self.lifeline_read]
        while not self.stopping:
            proc = await trio.lowlevel.open_process(
                self.argv,
                pass_fds=fds,
                env=self._child_env(),
                stdin=subprocess.DEVNULL,
            )
            self.procs[slot] = proc
            log.info("worker %d started (PID %d)", slot, proc.pid)
            code = await proc.wait()
            del self.procs[slot]
            recorder().worker_exited(proc.pid)
            if self.stopping:
                if code in (EXIT_USAGE, EXIT_ENGINE_DEAD) and self.exit_code == 0:
                    self.exit_code = code
                return
            if code == EXIT_USAGE:
                log.error("worker %d (PID %d) exited 2: bad usage or config; stopping",
                          slot, proc.pid)  # fmt: skip
                self.stop(code=EXIT_USAGE)
                return
            if code == EXIT_ENGINE_DEAD:
                log.error("worker %d (PID %d): its engine died; stopping all workers",
                          slot, proc.pid)  # fmt: skip
                self.stop(code=EXIT_ENGINE_DEAD)
                return
            if code == 0:
                log.info("worker %d (PID %d) exited; replacing it", slot, proc.pid)
                recorder().worker_restart("exit")
                continue
            now = trio.current_time()
            crashes.append(now)
            while crashes and crashes[0] < now - self.policy.window:
                crashes.popleft()
            how = f"signal {-code}" if code < 0 else f"exit {code}"
            if len(crashes) > self.policy.max_restarts:
                log.error("worker %d crashed %d times in %g s (last: %s); giving up",
                          slot, len(crashes), self.policy.window, how)  # fmt: skip
                self.stop(code=1)
                return
            log.warning("worker %d (PID %d) crashed (%s); restarting in %.1f s",
                        slot, proc.pid, how, backoff)  # fmt: skip
            recorder().worker_restart("crash")
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.policy.max_backoff)

    async def relay_readiness(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Tell systemd READY=1 once every worker said so on our private socket."""
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            await sock.bind("\0" + self.notify_address[1:])
            task_status.started()
            ready = 0
            while ready < self.count:
                message = await sock.recv(4096)
                if b"READY=1" in message.split(b"\n") and not self.stopping:
                    ready += 1
            notify("READY=1", f"STATUS={self.count} workers serving")
            log.info("all %d workers are serving", self.count)
            await trio.sleep_forever()


async def run_workers(
    argv: Sequence[str],
    count: int,
    sockets: BoundSockets,
    policy: RestartPolicy = RestartPolicy(),
) -> int:
    """Run ``count`` workers of ``argv`` on ``sockets`` until they stop; the exit code.

    ``argv`` is the complete child command line; it must serve the inherited
    descriptors of ``sockets`` (``--bind fd://N``).
    """
    supervisor = _Supervisor(argv, count, sockets, policy)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                watch_signals,
                supervisor.on_stop_signal,
                supervisor.on_force_signal,
                supervisor.on_reload_signal,
            )
            await nursery.start(supervisor.relay_readiness)
            async with trio.open_nursery() as workers:
                for slot in range(count):
                    workers.start_soon(supervisor.keep_worker, slot)
            nursery.cancel_scope.cancel()  # every worker is gone
    finally:
        sockets.close()
    if supervisor.forced_by is not None:
        return 128 + supervisor.forced_by
    return supervisor.exit_code


def child_argv(executable: str, argv: Sequence[str], sockets: BoundSockets) -> list[str]:
    """The worker's command line: ours without --workers/--bind, plus the inherited fds."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--bind", "-b", "--metrics-bind"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--bind=", "--metrics-bind=")):
            continue
        kept.append(arg)
    binds = [f"--bind=fd://{sock.fileno()}" for sock in sockets.all()]
    return [executable, "-m", "trio_launcher", *kept, *binds]
