"""User-space instructions per request, counted by valgrind's callgrind.

CPU time on a shared machine is too noisy to split a few microseconds (the
same server measures 75-107 us per request in four runs in a row on our
2-core box). Instructions are not: callgrind counts every user-space
instruction of the server process, and a fixed lockstep load makes the count
per request repeat to about 0.2 %. Kernel work (the same system calls either
way, see BENCHMARKS.md) is not counted, so a ratio of instructions is an
upper bound on the ratio of CPU time.

Method: ``benchmarks.server VARIANT`` under ``valgrind --tool=callgrind``
with ``PYTHONHASHSEED=0``; ``WARM_UP`` lockstep GETs on ``CONNECTIONS``
keep-alive connections; ``callgrind_control --zero``; ``REQUESTS`` more;
``callgrind_control --dump``; instructions / ``REQUESTS``. With
``new_connections``, a quarter as many requests, each on its own connection.

    python -m benchmarks.instructions [--path PATH] VARIANT [VARIANT...]

``--path /health`` with the ``runner-health`` variant counts what the runner
answers itself (the health path; a shed 503 takes the same way).

"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import env, listening, pin

CONNECTIONS = 4
WARM_UP = 400
REQUESTS = 1600
REQUEST = b"GET / HTTP/1.1\r\nhost: bench\r\nuser-agent: lockstep\r\n\r\n"


def available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


def per_request(variant: str, new_connections: bool = False, path: str = "/") -> float:
    """User-space instructions per hello-world request of ``variant``: on keep-alive
    connections, or with ``new_connections`` each on a connection of its own (accept,
    request, ``connection: close``), the work a burst of new clients makes. ``path``:
    the path of every GET."""
    request = REQUEST.replace(b"GET / ", f"GET {path} ".encode(), 1)
    with tempfile.TemporaryDirectory(prefix="callgrind-") as directory:
        out = Path(directory) / "cg.out"
        argv = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "benchmarks.server",
            variant,
            "0",
        ]
        proc = subprocess.Popen(
            pin(0, argv),
            env={**env(), "PYTHONHASHSEED": "0"},
            cwd=Path(__file__).parent.parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with listening(proc, timeout=120.0) as port:
            if new_connections:
                one_by_one(port, WARM_UP // 4, request)
                control("--zero", proc.pid)
                one_by_one(port, REQUESTS // 4, request)
                control("--dump", proc.pid)
                return _dumped(Path(directory)) / (REQUESTS // 4)
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(CONNECTIONS)]
            try:
                lockstep(socks, WARM_UP // CONNECTIONS, request)
                control("--zero", proc.pid)
                lockstep(socks, REQUESTS // CONNECTIONS, request)
                control("--dump", proc.pid)
                return _dumped(Path(directory)) / REQUESTS
            finally:
                for sock in socks:
                    sock.close()


def _dumped(directory: Path) -> int:
    # The dump asked for is "cg.out.1"; "cg.out" is only written at exit.
    dumps = sorted(directory.glob("cg.out.*"), key=os.path.getmtime)
    return total(dumps[-1])


def one_by_one(port: int, count: int, request: bytes = REQUEST) -> None:
    """``count`` requests, each on a new connection that the server closes."""
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(request.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n"))
            while sock.recv(65536):
                pass


def control(command: str, pid: int) -> None:
    subprocess.run(
        ["callgrind_control", command, str(pid)], check=True, capture_output=True, timeout=60
    )


def total(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        match = re.match(r"(?:summary|totals): (\d+)", line)
        if match:
            return int(match.group(1))
    raise RuntimeError(f"no instruction total in {dump}")


def lockstep(socks: list[socket.socket], rounds: int, request: bytes = REQUEST) -> None:
    """``rounds`` times: one GET on each connection, each answered before the next."""
    for _ in range(rounds):
        for sock in socks:
            sock.settimeout(60)
            sock.sendall(request)
            read_response(sock)


def read_response(sock: socket.socket) -> None:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            continue
        match = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
        if match is None:
            raise RuntimeError("a response without content-length")
        if len(body) >= int(match.group(1)):
            return


def main(argv: list[str]) -> None:
    path = "/"
    if argv[:1] == ["--path"]:
        path, argv = argv[1], argv[2:]
    for variant in argv or ["runner-plain"]:
        kept = per_request(variant, path=path)
        fresh = per_request(variant, new_connections=True, path=path)
        print(
            f"{variant} GET {path}: {kept:,.0f} per keep-alive request, "
            f"{fresh:,.0f} per new connection"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
