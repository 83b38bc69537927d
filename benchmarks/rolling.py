"""Rolling restarts and recycling under load: nothing may fail.

``--workers 2`` serves hello world while a load generator runs for a fixed
time; meanwhile the parent gets SIGHUP three times (each a rolling restart of
both workers), or the workers are recycled by ``--max-requests``. Two clients:

* wrk, 64 keep-alive connections: non-2xx answers and timeouts must be 0.
  (wrk also counts a keep-alive connection that a draining worker closes
  while idle as a socket error and reconnects; those are reported, not
  failures: no request was sent on them.)
* A Python client, 32 keep-alive connections, that checks every status and
  every body byte for byte, and counts failures the way real HTTP clients
  do: a request that got no response byte on a *reused* keep-alive
  connection (the server closed it while idle) is retried once on a new
  connection, as browsers, httpx and urllib3 do; anything else is a failure.

Run alone: ``python -m benchmarks.rolling [--seconds 20] [--compare]``
(``--compare``: the same with uvicorn's and gunicorn's workers, if
installed); it is also the
``rolling`` section of ``python -m benchmarks``. Nothing is pinned: the two
workers need both cores, and so does the load generator.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from benchmarks.apps import HELLO
from benchmarks.harness import ROOT, bound_port, env, rows, table_head

URL_RE = re.compile(r"serving on http://127\.0\.0\.1:(\d+)")
SWAP_RE = re.compile(r"PID \d+ serves, PID \d+ drains")


class Server:
    """A server with two workers under test, its log read in a thread.

    ``variant``: ``trio-launcher`` (the parent reports when both workers
    serve), or for comparison ``uvicorn`` (``--workers 2``) and ``gunicorn``
    (``-w 2 -k uvicorn.workers.UvicornWorker``), ready once both workers
    finished their lifespan startup. All three restart their workers on SIGHUP.
    """

    def __init__(self, variant: str, extra: list[str]) -> None:
        app = "benchmarks.apps:app"
        if variant == "trio-launcher":
            argv = [
                sys.executable,
                "-m",
                "trio_launcher",
                app,
                "--workers",
                "2",
                "--bind",
                "127.0.0.1:0",
                *extra,
            ]
            self.port, ready, self.ready_count = 0, "all 2 workers are serving", 1
        else:
            self.port, ready, self.ready_count = 0, "Application startup complete", 2
            if variant == "uvicorn":
                argv = [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    app,
                    "--workers",
                    "2",
                    "--port",
                    "0",
                    "--no-access-log",
                ]
            else:
                worker = "uvicorn.workers.UvicornWorker"
                argv = [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    app,
                    "-w",
                    "2",
                    "-b",
                    "127.0.0.1:0",
                    "-k",
                    worker,
                ]
            argv += _translated(variant, extra)
        self.proc = subprocess.Popen(
            argv, env=env(), cwd=ROOT, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.ready_line = ready
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(60):
            self.proc.kill()
            raise RuntimeError("the server did not come up:\n" + "\n".join(self.lines))
        if variant != "trio-launcher":  # (the port each bound, read back: they log none)
            self.port = bound_port(self.proc)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        seen = 0
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            if match := URL_RE.search(line):
                self.port = int(match.group(1))
            if self.ready_line in line:
                seen += 1
                if seen == self.ready_count:
                    self.ready.set()

    def swaps(self) -> int | None:
        if self.ready_count != 1:
            return None  # (not counted for the others)
        return sum(1 for line in self.lines if SWAP_RE.search(line))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def _translated(variant: str, extra: list[str]) -> list[str]:
    """``--max-requests N --max-requests-jitter J`` as uvicorn and gunicorn spell them."""
    opts = dict(zip(extra[::2], extra[1::2], strict=True))
    if "--max-requests" not in opts:
        return []
    prefix = "--limit-" if variant == "uvicorn" else "--"
    return [
        f"{prefix}max-requests",
        opts["--max-requests"],
        f"{prefix}max-requests-jitter",
        opts.get("--max-requests-jitter", "0"),
    ]


def wrk(port: int, seconds: float) -> dict[str, Any]:
    argv = ["wrk", "-t2", "-c64", f"-d{seconds:g}s", "--timeout", "5s", f"http://127.0.0.1:{port}/"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    requests = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if sock := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    ):
        errors = dict(zip(errors, map(int, sock.groups()), strict=True))
    return {
        "requests": int(requests.group(1)) if requests else 0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "timeouts": errors["timeout"],
        "socket_errors": errors,
    }


def python_client(port: int, seconds: float, connections: int = 32) -> dict[str, Any]:
    """Keep-alive GETs from threads; each body checked; one retry for a dead idle connection."""
    totals = {"requests": 0, "failures": 0, "retries": 0}
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def one(conn: http.client.HTTPConnection) -> bytes:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200 or body != HELLO:
            raise ValueError(f"{response.status} {body[:40]!r}")
        return body

    def worker() -> None:
        done = retries = 0
        errors: list[str] = []
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        reused = False
        while time.monotonic() < deadline:
            try:
                one(conn)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                conn.close()
                if not reused:
                    errors.append(repr(exc))
                    continue
                retries += 1
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                try:
                    one(conn)
                except Exception as again:
                    errors.append(f"after a retry: {again!r}")
                    conn.close()
                    reused = False
                    continue
            except Exception as exc:
                errors.append(repr(exc))
                conn.close()
                reused = False
                continue
            done += 1
            reused = conn.sock is not None  # http.client reopens a closed one itself
        conn.close()
        with lock:
            totals["requests"] += done
            totals["retries"] += retries
            totals["failures"] += len(errors)
            failures.extend(errors[:3])

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    return {**totals, "failure_samples": failures[:5]}


def scenario(
    variant: str, client: str, extra: list[str], sighups: int, seconds: float
) -> dict[str, Any]:
    server = Server(variant, extra)
    try:
        result: dict[str, Any] = {}

        def load() -> None:
            if client == "wrk":
                result.update(wrk(server.port, seconds))
            else:
                result.update(python_client(server.port, seconds))

        loader = threading.Thread(target=load)
        started = time.monotonic()
        loader.start()
        for i in range(sighups):
            time.sleep(max(0.0, started + seconds * (i + 1) / (sighups + 1) - time.monotonic()))
            server.proc.send_signal(signal.SIGHUP)
        loader.join(seconds + 120)
        result["rps"] = round(result["requests"] / seconds)
        result["workers_replaced"] = server.swaps()
    finally:
        result["exit_code"] = server.stop()
    return result


def run(seconds: float = 20.0, compare: bool = False) -> dict[str, Any]:
    """Every scenario once; the figures for BENCHMARKS.md.

    ``compare``: also uvicorn and gunicorn (with uvicorn's worker), where installed.
    """
    scenarios = {
        "3 rolling restarts (SIGHUP)": ([], 3),
        "--max-requests 500 --max-requests-jitter 50": (
            ["--max-requests", "500", "--max-requests-jitter", "50"],
            0,
        ),
    }
    variants = ["trio-launcher"]
    if compare:
        variants += [v for v in ("uvicorn", "gunicorn") if importlib.util.find_spec(v)]
    clients = ["wrk", "python"] if shutil.which("wrk") else ["python"]
    results: dict[str, Any] = {"seconds": seconds}
    for name, (extra, sighups) in scenarios.items():
        for variant in variants:
            for client in clients:
                print(f"  {name}, {variant}, {client} ...", file=sys.stderr, flush=True)
                key = f"{name} / {variant} / {client}"
                results[key] = scenario(variant, client, extra, sighups, seconds)
    return results


def render(results: dict[str, Any]) -> list[str]:
    out = table_head(
        f"2 workers under load for {results['seconds']:g} s",
        "server",
        "client",
        "requests (req/s)",
        "workers replaced",
        "non-2xx",
        "timeouts",
        "failed (retried)",
        "exit",
    )
    for key, r in rows(results, "seconds"):
        name, variant, client = key.split(" / ")
        if client == "wrk":
            errs = r["socket_errors"]
            failed = (
                f"- (socket errors: connect {errs['connect']}, read {errs['read']}, "
                f"write {errs['write']})"
            )
            non2xx, timeouts = str(r["non_2xx"]), str(r["timeouts"])
            label = "wrk -c64"
        else:
            failed = f"{r['failures']} ({r['retries']})"
            non2xx = timeouts = "-"
            label = "Python, 32 keep-alive, bodies checked"
        replaced = "-" if r["workers_replaced"] is None else r["workers_replaced"]
        out.append(
            f"| {name} | {variant} | {label} | {r['requests']} ({r['rps']}) | "
            f"{replaced} | {non2xx} | {timeouts} | {failed} | "
            f"{r['exit_code']} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rolling")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--compare", action="store_true", help="also uvicorn and gunicorn")
    opts = parser.parse_args(argv)
    results = run(opts.seconds, opts.compare)
    print(json.dumps(results, indent=2))
    print("\n".join(render(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
