"""Worker processes: N runners sharing one set of listening sockets.

The parent binds the sockets once and starts N children, each a complete
``trio-launcher`` (its own nursery, watchdog and refresher) serving the
inherited descriptors (``--bind fd://N``); the kernel spreads connections
among them. The parent is a small trio program: one supervisor task per
worker slot, one task that replaces workers, one that reads what the workers
report.

**The parent alone decides.** A terminal's Ctrl-C signals the whole
foreground process group and systemd's ``KillMode=control-group`` signals
every process of the unit; a worker that took such a signal *and* the
parent's forwarded copy as two signals would force its stop and cut its
streams. So:

* Workers run in their own session (``start_new_session``): Ctrl-C reaches
  the parent only.
* The parent gives orders over a pipe per worker (``drain``, ``force N``),
  never by signal; the worker reads them in its signal task
  (``_signals.obey_parent``). End of file means the parent is gone, even by
  SIGKILL: the worker drains.
* A SIGINT/SIGTERM delivered to a worker directly means "drain", however
  often it comes. Only the parent's second signal forces: it orders every
  worker to stop at once and exits 128+N.

**The worker's command line is built from the parsed options**, never by
editing argv text (``_worker.worker_argv``), without the supervisor's own
options, plus ``--bind fd://N`` for each inherited socket. A worker is
marked by its environment (the order pipe's variable); it refuses
``--workers`` and any address but ``fd://`` (exit 2), and ignores a TOML
``workers`` setting: a worker can never start workers or bind.

**Readiness and reports.** Workers send ``READY=1`` to a private notify
socket of the parent, which tells the sender apart by its kernel-given
credentials (``SO_PASSCRED``), so a message from anything else is ignored.
The same socket carries ``RETIRE=1`` (a worker reached ``--max-requests``;
it does not drain itself) and ``CUT=N`` (its drain cut N requests at
``graceful_timeout``; the parent logs it as an error). The parent tells
systemd ``READY=1`` once every slot serves.

**Start, replace, stop.**

* The first worker starts alone; the others once it serves, so a module that
  does not import fails once, with one error line (exit 2).
* SIGHUP: a rolling restart. For each slot in turn, a new worker is started
  (importing the app and loading TLS afresh), and once it serves the old one
  is ordered to drain. systemd sees ``RELOADING=1`` then ``READY=1``. A new
  worker that fails before serving ends the restart; the old ones keep
  serving.
* Recycling (``--max-requests`` with jitter, ``--worker-max-rss``,
  ``--worker-lifetime``): a worker past a limit is replaced the same way. One
  task does every replacement, so never more than one at a time.
* Stopping: serving workers drain; a worker still starting (importing the
  app, loading a model) has no request yet and is killed at once.
* A worker that crashes is restarted with a doubling backoff; more than
  ``max_restarts`` crashes within ``window`` seconds means something is wrong
  for good: every worker drains and the parent exits 1. A worker that exits 2
  or 3 (its engine died) stops them all with that code. A worker forced
  during the stop makes the parent exit 128+N.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import random
import secrets
import signal
import socket
import struct
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psutil
import trio

from ._errors import ExitCode
from ._metrics import recorder
from ._ports import BoundSockets
from ._signals import watch_signals
from ._systemd import notify, notify_reloading
from ._worker import MAX_REQUESTS_ENV, ORDERS_ENV

log = logging.getLogger("trio_launcher")

EXIT_USAGE = ExitCode.USAGE
EXIT_ENGINE_DEAD = ExitCode.ENGINE_DEAD


@dataclass(frozen=True)
class RestartPolicy:
    """How crashed workers are restarted."""

    max_restarts: int = 5
    window: float = 60.0
    first_backoff: float = 0.1
    max_backoff: float = 5.0


@dataclass(frozen=True)
class Recycling:
    """When a worker is replaced by a fresh one (None: never for that reason)."""

    max_requests: int | None = None
    max_requests_jitter: int = 0
    max_rss_mib: float | None = None
    lifetime: float | None = None
    poll_interval: float = 0.5

    @property
    def active(self) -> bool:
        return (self.max_requests, self.max_rss_mib, self.lifetime) != (None, None, None)


@dataclass(eq=False)
class _Worker:
    slot: int
    process: trio.Process
    orders: int  # write end of its order pipe
    started: float
    lifetime: float
    ready: trio.Event = field(default_factory=trio.Event)
    exited: trio.Event = field(default_factory=trio.Event)
    code: int | None = None
    retire_asked: bool = False
    retired: bool = False
    dismissed: bool = False  # killed by the parent while starting

    @property
    def pid(self) -> int:
        return self.process.pid

    def order(self, line: str) -> None:
        if self.exited.is_set():
            return
        # Gone (EPIPE), or not reading at all (EAGAIN): nothing more to do.
        with contextlib.suppress(OSError):
            os.write(self.orders, line.encode() + b"\n")


class _Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        count: int,
        sockets: BoundSockets,
        policy: RestartPolicy,
        recycling: Recycling,
        rng: random.Random,
    ) -> None:
        self.argv = list(argv)
        self.count = count
        self.sockets = sockets
        self.policy = policy
        self.recycling = recycling
        self.rng = rng
        self.current: dict[int, _Worker] = {}  # slot -> the worker that serves it
        self.by_pid: dict[int, _Worker] = {}  # every live worker, draining ones too
        self.ever: dict[int, _Worker] = {}  # every worker started: reports may come late
        self.stopping = False
        self.forced_by: int | None = None
        self.worker_forced: int | None = None
        self.exit_code = 0
        self.notify_address = f"@trio-launcher-{os.getpid()}-{secrets.token_hex(4)}"
        self._changed = trio.Event()
        self.replace_send, self.replace_receive = trio.open_memory_channel[
            tuple[_Worker | None, str, str]
        ](math.inf)
        self.workers: trio.Nursery | None = None
        self.spawning = 0
        self._reports: socket.socket | None = None

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()

    # --- orders ---------------------------------------------------------------

    def stop(self, code: int | None = None) -> None:
        if code is not None and (self.exit_code == 0 or code == EXIT_ENGINE_DEAD):
            self.exit_code = code
        if self.stopping:
            return
        self.stopping = True
        notify("STOPPING=1")
        self._close_sockets_once_idle()
        self.replace_send.close()
        for worker in list(self.by_pid.values()):
            self._dismiss(worker)
        self._poke()

    def _dismiss(self, worker: _Worker) -> None:
        """Stopping: a serving worker drains; one still starting (no request yet, and
        its startup may take minutes) is killed at once."""
        if worker.ready.is_set():
            worker.order("drain")
        elif not worker.exited.is_set():
            worker.dismissed = True
            # Its process group (its own session): what its startup spawned goes too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)

    def on_stop_signal(self, signum: int) -> None:
        log.info("%s: workers drain", signal.Signals(signum).name)
        self.stop()

    def on_force_signal(self, signum: int) -> None:
        log.warning("second %s: workers stop at once", signal.Signals(signum).name)
        self.forced_by = signum
        self.stop()
        for worker in list(self.by_pid.values()):
            worker.order(f"force {signum}")  # (stop() killed those still starting)

    def on_reload_signal(self) -> None:
        if self.stopping:
            return
        log.info("SIGHUP: rolling restart of %d workers", self.count)
        self.replace_send.send_nowait((None, "SIGHUP", "reload"))

    def ask_replacement(self, worker: _Worker, why: str, cause: str) -> None:
        """Replace ``worker`` (new one serving first); ``cause`` labels the restart metric."""
        if worker.retire_asked or self.stopping or self.current.get(worker.slot) is not worker:
            return
        worker.retire_asked = True
        log.info("worker %d (PID %d) %s: replacing it", worker.slot, worker.pid, why)
        self.replace_send.send_nowait((worker, why, cause))

    def _close_sockets_once_idle(self) -> None:
        # The workers hold the port now; it closes with them. (Not while a
        # worker is being started: it is about to inherit them.)
        if self.stopping and self.spawning == 0:
            self.sockets.close()

    # --- one worker process ---------------------------------------------------

    def _child_env(self, orders_fd: int) -> dict[str, str]:
        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = self.notify_address
        env[ORDERS_ENV] = str(orders_fd)
        env.pop(MAX_REQUESTS_ENV, None)
        if self.recycling.max_requests is not None:
            jitter = self.rng.randint(0, self.recycling.max_requests_jitter)
            env[MAX_REQUESTS_ENV] = str(self.recycling.max_requests + jitter)
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
        return env

    async def _spawn(self, slot: int) -> _Worker:
        assert self.workers is not None
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        self.spawning += 1
        try:
            process = await trio.lowlevel.open_process(
                self.argv,
                pass_fds=[*(sock.fileno() for sock in self.sockets.all()), read_end],
                env=self._child_env(read_end),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C is for the parent alone
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
            self.spawning -= 1
            self._close_sockets_once_idle()
        lifetime = math.inf
        if self.recycling.lifetime is not None:
            lifetime = self.recycling.lifetime * self.rng.uniform(1.0, 1.1)  # spread them out
        worker = _Worker(slot, process, write_end, trio.current_time(), lifetime)
        self.by_pid[process.pid] = self.ever[process.pid] = worker
        log.info("worker %d started (PID %d)", slot, process.pid)
        self.workers.start_soon(self._watch, worker)
        if self.stopping:
            self._dismiss(worker)
        return worker

    async def _watch(self, worker: _Worker) -> None:
        worker.code = await worker.process.wait()
        recorder().worker_exited(worker.pid)  # its metrics files are kept, marked dead
        del self.by_pid[worker.pid]
        os.close(worker.orders)
        if self.stopping:
            self._note_exit_in_stop(worker)
        elif worker.retired and worker.code != 0:
            log.warning("retired worker %d (PID %d) %s", worker.slot, worker.pid, _how(worker.code))
        worker.exited.set()
        self._poke()

    def _note_exit_in_stop(self, worker: _Worker) -> None:
        code = worker.code
        assert code is not None
        if worker.dismissed:
            return
        if code == EXIT_ENGINE_DEAD:
            self.stop(EXIT_ENGINE_DEAD)
        elif code < 0 or code > 128:
            signum = -code if code < 0 else code - 128
            log.warning(
                "worker %d (PID %d) was forced to stop (%s)", worker.slot, worker.pid, _how(code)
            )
            self.worker_forced = self.worker_forced or signum
        elif code != 0:
            log.warning("worker %d (PID %d) %s while stopping", worker.slot, worker.pid, _how(code))
            self.stop(code)

    async def keep_slot(self, slot: int, worker: _Worker) -> None:
        """Keep one slot served: follow replacements, restart crashes."""
        crashes: collections.deque[float] = collections.deque()
        backoff = self.policy.first_backoff
        while True:
            await worker.exited.wait()
            if self.current[slot] is not worker:  # replaced: follow the new one
                worker = self.current[slot]
                continue
            if self.stopping:
                return
            code = worker.code
            assert code is not None
            if code == EXIT_USAGE:
                log.error(
                    "worker %d (PID %d) exited 2: bad usage or config; stopping", slot, worker.pid
                )
                self.stop(EXIT_USAGE)
                return
            if code == EXIT_ENGINE_DEAD:
                log.error(
                    "worker %d (PID %d): its engine died; stopping all workers", slot, worker.pid
                )
                self.stop(EXIT_ENGINE_DEAD)
                return
            if code == 0:
                log.info("worker %d (PID %d) exited; replacing it", slot, worker.pid)
                recorder().worker_restart("exit")
            else:
                now = trio.current_time()
                crashes.append(now)
                while crashes and crashes[0] < now - self.policy.window:
                    crashes.popleft()
                if len(crashes) > self.policy.max_restarts:
                    log.error(
                        "worker %d crashed %d times in %g s (last: %s); giving up",
                        slot,
                        len(crashes),
                        self.policy.window,
                        _how(code),
                    )
                    self.stop(ExitCode.ERROR)
                    return
                log.warning(
                    "worker %d (PID %d) crashed (%s); restarting in %.1f s",
                    slot,
                    worker.pid,
                    _how(code),
                    backoff,
                )
                recorder().worker_restart("crash")
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.policy.max_backoff)
                if self.stopping:
                    return
            worker = await self._spawn(slot)
            self.current[slot] = worker
            self._poke()

    # --- start, replace -------------------------------------------------------

    def _all_serving(self) -> bool:
        return all(self.current[s].ready.is_set() for s in range(self.count))

    async def start_all(self) -> None:
        """The first worker alone, the others once it serves; READY=1 once all do."""
        assert self.workers is not None
        for slot in range(self.count):
            if self.stopping:
                return
            self.current[slot] = worker = await self._spawn(slot)
            self.workers.start_soon(self.keep_slot, slot, worker)
            if slot == 0:
                await self._until(lambda: self.stopping or self.current[0].ready.is_set())
        await self._until(lambda: self.stopping or self._all_serving())
        if not self.stopping:
            notify("READY=1", f"STATUS={self.count} workers serving")
            log.info("all %d workers are serving", self.count)

    async def replace_workers(self) -> None:
        """One replacement at a time: SIGHUP (every slot) or one retiring worker."""
        async for target, why, cause in self.replace_receive:
            if target is not None:
                if await self._replace(target.slot, target, why):
                    recorder().worker_restart(cause)
                continue
            notify_reloading(True)
            replaced = 0
            for slot in range(self.count):
                if not await self._replace(slot, self.current[slot], why):
                    break
                recorder().worker_restart(cause)
                replaced += 1
            if not self.stopping:
                log.info("rolling restart: %d of %d workers replaced", replaced, self.count)
                notify_reloading(False)

    async def _replace(self, slot: int, old: _Worker, why: str) -> bool:
        if self.stopping or self.current[slot] is not old:
            return not self.stopping
        new = await self._spawn(slot)
        await self._until(lambda: self.stopping or new.ready.is_set() or new.exited.is_set())
        if self.stopping:
            return False
        if not new.ready.is_set():
            log.error(
                "worker %d: the new worker (PID %d) %s before serving; PID %d serves on",
                slot,
                new.pid,
                _how(new.code),
                old.pid,
            )
            old.retire_asked = False
            return False
        if self.current[slot] is not old:  # the old one crashed meanwhile, already restarted
            new.retired = True
            new.order("drain")
            return True
        self.current[slot] = new
        self._poke()
        log.info("worker %d: PID %d serves, PID %d drains (%s)", slot, new.pid, old.pid, why)
        old.retired = True
        old.order("drain")
        return True

    async def watch_limits(self) -> None:
        """Poll each serving worker's RSS and age against the recycling limits."""
        limit = self.recycling.max_rss_mib
        while True:
            await trio.sleep(self.recycling.poll_interval)
            now = trio.current_time()
            for worker in list(self.current.values()):
                if not worker.ready.is_set() or worker.exited.is_set():
                    continue
                if now - worker.started > worker.lifetime:
                    self.ask_replacement(worker, f"is {now - worker.started:.0f} s old", "lifetime")
                if limit is not None:
                    try:
                        rss = psutil.Process(worker.pid).memory_info().rss / 2**20
                    except psutil.Error:
                        continue
                    if rss > limit:
                        self.ask_replacement(
                            worker, f"uses {rss:.0f} MiB > {limit:g} MiB", "max_rss"
                        )

    async def read_reports(self, *, task_status: trio.TaskStatus[None]) -> None:
        """READY=1, RETIRE=1 and CUT=N from the workers, told apart by sender PID."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            raw.bind("\0" + self.notify_address[1:])
            raw.setblocking(False)
            self._reports = raw
            sock = trio.socket.from_stdlib_socket(raw)
            task_status.started()
            while True:
                self._on_datagram(*await sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size)))

    def read_late_reports(self) -> None:
        """After the last worker exited: what it said just before (CUT=N) still counts."""
        while self._reports is not None:
            try:
                self._on_datagram(*self._reports.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size)))
            except OSError:  # nothing left (or the socket is gone)
                return

    def _on_datagram(
        self, data: bytes, ancillary: list[tuple[int, int, bytes]], *_: object
    ) -> None:
        for level, kind, cdata in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(cdata[: _UCRED.size])[0]
                if (worker := self.ever.get(pid)) is not None:
                    self._on_report(worker, data.decode(errors="replace").split("\n"))

    def _on_report(self, worker: _Worker, states: list[str]) -> None:
        for state in states:
            key, _, value = state.partition("=")
            if state == "READY=1" and not worker.ready.is_set():
                worker.ready.set()
                self._poke()
            elif state == "RETIRE=1":
                self.ask_replacement(worker, "reached --max-requests", "max_requests")
            elif key == "CUT" and value.isdigit():
                log.error(
                    "worker %d (PID %d): its drain cut %s requests at graceful_timeout",
                    worker.slot,
                    worker.pid,
                    value,
                )


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _how(code: int | None) -> str:
    if code is None:
        return "is still running"
    return f"was killed by signal {-code}" if code < 0 else f"exited {code}"


async def run_workers(
    argv: Sequence[str],
    count: int,
    sockets: BoundSockets,
    policy: RestartPolicy = RestartPolicy(),
    recycling: Recycling = Recycling(),
    *,
    seed: int | None = None,
) -> int:
    """Run ``count`` workers of ``argv`` on ``sockets`` until they stop; the exit code.

    ``argv`` is the complete child command line; it must serve the inherited
    descriptors of ``sockets`` (``--bind fd://N``).
    """
    supervisor = _Supervisor(argv, count, sockets, policy, recycling, random.Random(seed))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                watch_signals,
                supervisor.on_stop_signal,
                supervisor.on_force_signal,
                supervisor.on_reload_signal,
            )
            await nursery.start(supervisor.read_reports)
            async with trio.open_nursery() as workers:
                supervisor.workers = workers
                await supervisor.start_all()
                if recycling.lifetime is not None or recycling.max_rss_mib is not None:
                    nursery.start_soon(supervisor.watch_limits)
                await supervisor.replace_workers()  # until the stop
            supervisor.read_late_reports()
            nursery.cancel_scope.cancel()  # every worker is gone
    finally:
        sockets.close()
        supervisor.replace_send.close()
    if supervisor.forced_by is not None:
        return 128 + supervisor.forced_by
    if supervisor.exit_code == 0 and supervisor.worker_forced is not None:
        return 128 + supervisor.worker_forced
    return supervisor.exit_code
