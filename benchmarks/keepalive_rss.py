"""Memory per idle keep-alive connection: ``python -m benchmarks.keepalive_rss [N]``.

Each variant serves the benchmark app with a 120 s keep-alive timeout (so no
connection closes while the others open); N connections each make one request
and stay open; the server's RSS growth divided by N is the cost of one idle
keep-alive connection. Variants: bare hypercorn-trio, the runner on httptools
(the default) and the runner on hypercorn's h11.
"""

from __future__ import annotations

import socket
import sys
import time
from functools import partial

from benchmarks.harness import bound_port, spawn, stop

VARIANTS = ("hypercorn", "runner", "runner-h11")


def serve(variant: str, port: int) -> None:
    import trio
    from hypercorn.config import Config

    from benchmarks.apps import app

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = config.errorlog = None
    config.keep_alive_timeout = 120
    config.backlog = 4096
    if variant == "hypercorn":
        from hypercorn.trio import serve as hypercorn_serve

        trio.run(partial(hypercorn_serve, app, config))  # type: ignore[arg-type]
    else:
        from trio_launcher import serve_http

        trio.run(
            partial(serve_http, app, config, http="h11" if variant == "runner-h11" else "auto")
        )


def _request(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"Hello" not in data:
        data += conn.recv(4096)
    return conn


def kib_per_connection(variant: str, count: int) -> float:
    import psutil

    argv = [sys.executable, "-m", "benchmarks.keepalive_rss", "--serve", variant, "0"]
    proc = spawn(argv)
    conns: list[socket.socket] = []
    try:
        port = bound_port(proc)
        server = psutil.Process(proc.pid)
        conns = [_request(port) for _ in range(50)]  # warm up
        time.sleep(0.5)
        before = server.memory_info().rss
        conns += [_request(port) for _ in range(count)]
        time.sleep(1.0)
        after = server.memory_info().rss
        return (after - before) / count / 1024
    finally:
        for conn in conns:
            conn.close()
        stop(proc)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--serve"]:
        serve(argv[1], int(argv[2]))
        return
    count = int(argv[0]) if argv else 1500
    for variant in VARIANTS:
        print(f"{variant}: {kib_per_connection(variant, count):.1f} KiB per idle connection")


if __name__ == "__main__":
    main(sys.argv[1:])
