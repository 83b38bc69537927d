"""Clients that connect first and write later, while the server sheds:
``python -m benchmarks.door [N]``.

One request holds the server's only slot (``limit_concurrency=1``); N clients
connect (default 2000) and wait 2 s without a word, then each sends a GET and
reads its answer (all 503). Recorded: the server's RSS growth while the N
connections wait, its peak (``VmHWM``) over the whole run, and the statuses.
h2load's clients in ``benchmarks.overload`` do the same, faster. With
``BENCH_TRIO_LAUNCHER=DIR`` the server imports ``trio_launcher`` from ``DIR``
(another checkout, to compare).
"""

from __future__ import annotations

import collections
import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, env, listening

REQUEST = b"GET /x HTTP/1.1\r\nhost: door\r\n\r\n"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    import trio

    from benchmarks.apps import lifespan

    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    if scope["path"] == "/hold":
        await trio.sleep_forever()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def serve(port: int) -> None:
    """The server: ``python -m benchmarks.door serve PORT``."""
    from functools import partial

    import trio
    from hypercorn.config import Config

    from benchmarks.overload import _import_package_from

    snapshot = os.environ.get("BENCH_TRIO_LAUNCHER")
    if snapshot:
        _import_package_from(Path(snapshot) / "trio_launcher")
    from trio_launcher import serve_http

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.backlog = 4096
    config.accesslog = config.errorlog = None
    trio.run(partial(serve_http, app, config, limit_concurrency=1))


def _kib(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"{field}:\s+(\d+)", status)
    assert match is not None
    return int(match.group(1))


def run(clients: int) -> dict[str, Any]:
    environment = env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.door", "serve", "0"],
        env=environment,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    statuses: collections.Counter[str] = collections.Counter()
    with listening(proc) as port:
        held = socket.create_connection(("127.0.0.1", port))
        held.sendall(b"GET /hold HTTP/1.1\r\nhost: door\r\n\r\n")
        time.sleep(0.5)  # (a benchmark, not a test: the slot is taken by then)
        before = _kib(proc.pid, "VmRSS")
        socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(clients)]
        time.sleep(2.0)
        waiting = _kib(proc.pid, "VmRSS")
        for sock in socks:
            sock.sendall(REQUEST)
        for sock in socks:
            try:
                answer = sock.recv(65536)
                statuses[answer.split(b" ", 2)[1].decode() if answer else "closed"] += 1
            except OSError as exc:
                statuses[type(exc).__name__] += 1
            sock.close()
        time.sleep(0.5)
        peak = _kib(proc.pid, "VmHWM")
        held.close()
    return {
        "clients": clients,
        "waiting_mib": (waiting - before) / 1024,
        "waiting_kib_each": (waiting - before) / clients,
        "peak_mib": (peak - before) / 1024,
        "statuses": dict(statuses),
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve(int(argv[1]))
        return 0
    clients = int(argv[0]) if argv else 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, clients * 2 + 256)), hard))
    result = run(clients)
    print(
        f"{result['clients']} clients connected, waiting: RSS +{result['waiting_mib']:.1f} MiB "
        f"({result['waiting_kib_each']:.1f} KiB each); then shed: peak "
        f"+{result['peak_mib']:.1f} MiB; statuses {result['statuses']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
