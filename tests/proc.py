"""Run ``python -m trio_launcher`` as a real subprocess and watch its stderr."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import psutil
import trio

from .net import get

ROOT = Path(__file__).resolve().parent.parent
URL_RE = re.compile(r"serving on (\S+)")
# Where every launched server listens: loopback, port 0 (the OS picks a free port, and
# the test reads it back from the "serving on" line; never a port picked beforehand).
LOOPBACK = ("--bind", "127.0.0.1:0")


def served(app: str, **flags: object) -> list[str]:
    """The CLI's arguments to serve ``app`` on LOOPBACK with ``--flag value`` for each
    keyword (``health_path="/health"`` is ``--health-path /health``; a list repeats
    the flag; ``True`` is the flag alone)."""
    args = [app, *LOOPBACK]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            args += [flag] if item is True else [flag, str(item)]
    return args


class InFlight:
    """A request sent in the background: its response, or the error that cut it."""

    def __init__(self) -> None:
        self.response: httpx.Response | None = None
        self.error: httpx.HTTPError | None = None

    @property
    def done(self) -> bool:
        return self.response is not None or self.error is not None

    def ok(self) -> httpx.Response:
        """The response, which must have come (the error, if any, is the message)."""
        assert self.response is not None, self.error
        return self.response

    def assert_aborted(self) -> None:
        """The request must have ended without a success: a cut connection or a 5xx."""
        if self.error is None:
            assert self.response is not None, "the request never ended"
            assert self.response.status_code >= 500, self.response


class Launched:
    """A running ``trio-launcher`` process started by a test."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.urls: list[str] = []
        self.serving = trio.Event()
        self.serving_or_exited = trio.Event()
        self.pumped = trio.Event()
        self._line_seen = trio.Event()

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait(self, timeout: float = 15.0) -> int:
        with trio.fail_after(timeout):
            code = await self.process.wait()
            await self.pumped.wait()
        return code

    async def wait_for_line(self, pattern: str, timeout: float = 10.0) -> str:
        """The first stderr line that matches ``pattern``, once there is one."""
        return (await self.wait_for_lines(pattern, 1, timeout))[0]

    async def wait_for_lines(self, pattern: str, count: int, timeout: float = 10.0) -> list[str]:
        """The stderr lines that match ``pattern``, once there are ``count`` of them."""
        regex = re.compile(pattern)
        with trio.fail_after(timeout):
            while True:
                found = [line for line in self.lines if regex.search(line)]
                if len(found) >= count:
                    return found
                await self._line_seen.wait()
                self._line_seen = trio.Event()

    async def slow_request(
        self, nursery: trio.Nursery, path: str, client: httpx.AsyncClient | None = None
    ) -> InFlight:
        """GET ``path`` (an app route that logs "slow request started") in the background;
        return once the app has logged that it started."""
        in_flight = InFlight()

        async def request() -> None:
            try:
                if client is None:
                    in_flight.response = await get(self.url + path)
                else:
                    in_flight.response = await client.get(path)
            except httpx.HTTPError as exc:
                in_flight.error = exc

        nursery.start_soon(request)
        await self.wait_for_line("slow request started")
        return in_flight

    async def _pump(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                self.lines.append(line)
                match = URL_RE.search(line)
                if match:
                    self.urls.append(match.group(1))
                    self.serving.set()
                    self.serving_or_exited.set()
                self._line_seen.set()
        if buffer:
            self.lines.append(buffer.decode(errors="replace"))
        self.pumped.set()
        self._line_seen.set()

    async def _watch_exit(self) -> None:
        await self.process.wait()
        await self.pumped.wait()  # stderr fully read: the last line is in
        self.serving_or_exited.set()


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("TRIO_LAUNCHER_KEEP_ALIVE_ON_ENGINE_DEATH", None)
    env.update(extra or {})
    return env


@asynccontextmanager
async def launch(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    wait_serving: bool = True,
    timeout: float = 20.0,
    preexec_fn: Callable[[], None] | None = None,
    new_session: bool = False,
) -> AsyncIterator[Launched]:
    """Start ``python -m trio_launcher ARGS``; on exit, kill it if still running.

    ``new_session``: in a session (and process group) of its own, as a shell
    starts a foreground job, so that a test can signal the whole group.
    """
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_launcher", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=cli_env(env),
        pass_fds=pass_fds,
        preexec_fn=preexec_fn,
        start_new_session=new_session,
    )
    launched = Launched(process)
    async with trio.open_nursery() as nursery:
        assert process.stderr is not None
        nursery.start_soon(launched._pump, process.stderr)
        nursery.start_soon(launched._watch_exit)
        try:
            if wait_serving:
                with trio.fail_after(timeout):
                    await launched.serving_or_exited.wait()
                if not launched.serving.is_set():
                    raise AssertionError(
                        f"exited {process.returncode} before serving:\n{launched.stderr}"
                    )
            yield launched
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)  # only the process we started
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await process.wait()


def run_cli(args: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion (for exit paths that never serve)."""
    return subprocess.run(
        [sys.executable, "-m", "trio_launcher", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=cli_env(),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# --- the worker processes of a launched supervisor --------------------------


def worker_pids(parent_pid: int) -> list[int]:
    return [
        child.pid
        for child in psutil.Process(parent_pid).children()
        if "trio_launcher" in " ".join(child.cmdline())
    ]


async def wait_workers(
    parent_pid: int, count: int, exclude: frozenset[int] = frozenset()
) -> list[int]:
    with trio.fail_after(15):
        while True:
            pids = [p for p in worker_pids(parent_pid) if p not in exclude]
            if len(pids) >= count:
                return pids
            await trio.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def wait_gone(pids: list[int], timeout: float) -> None:
    with trio.fail_after(timeout):
        while any(alive(pid) for pid in pids):
            await trio.sleep(0.05)


# --- what systemd does for a socket-activated Type=notify service ---------------

_SOCKET_ACTIVATION = (
    "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd);"
    "os.environ['LISTEN_FDS'] = '1'; os.environ['LISTEN_PID'] = str(os.getpid());"
    "os.execv(sys.argv[2], sys.argv[2:])"
)


async def socket_activated(
    argv: Sequence[str], listener: socket.socket, notify_path: str
) -> trio.Process:
    """Start ``argv`` as systemd would: ``listener`` as fd 3, LISTEN_FDS/LISTEN_PID for
    the service's own PID (a tiny wrapper moves the descriptor and execs), NOTIFY_SOCKET,
    and this checkout as the working directory."""
    return await trio.lowlevel.open_process(
        [sys.executable, "-c", _SOCKET_ACTIVATION, str(listener.fileno()), *argv],
        pass_fds=[listener.fileno()],
        cwd=ROOT,
        env={**os.environ, "NOTIFY_SOCKET": notify_path, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.DEVNULL,
    )
