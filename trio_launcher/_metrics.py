"""Prometheus metrics with prometheus_client, right across worker processes.

What is measured is in docs/observability.md (one line per metric). The names
follow OpenTelemetry's HTTP semantic conventions in Prometheus form
(``http.server.request.duration`` in seconds becomes
``http_server_request_duration_seconds``, the attribute ``http.route`` the
label ``http_route``); what only the runner knows is ``trio_launcher_*``.

Four decisions:

* **A recording interface that costs nothing when metrics are off.** Code that
  has something to count (a shed request, a drain, a worker restart) calls
  ``recorder().something()``. ``recorder()`` reads a context variable that
  ``serve_http`` sets for its own task tree; its default is a :class:`Recorder`
  whose methods do nothing. So two servers in one process (tests) never mix
  their numbers, and no call site needs a flag.
* **One private registry per server.** Nothing is registered in
  prometheus_client's global ``REGISTRY`` (a second ``serve_http`` in the same
  process would collide with the first); a scrape exposes ours followed by the
  global one, so the app's own metrics and the process collectors come along.
* **Workers: prometheus_client's multiprocess mode.** Each process writes its
  values to memory-mapped files named by its PID in a directory that the
  parent creates and hands down in ``PROMETHEUS_MULTIPROC_DIR``; a scrape, by
  any worker or by the parent's ``metrics_bind`` listener, reads every file.
  A worker that exits leaves its counter and histogram files behind, so its
  counts are never lost, and its replacement has a new PID, so nothing is
  counted twice. The parent calls ``mark_process_dead`` for the old PID, which
  drops its *live* gauges (active requests, open connections, engine up).
  prometheus_client picks multiprocess values when it is first imported, so
  it is imported lazily here, after the parent has set the variable.
* **The per-request numbers are cheap.** In a single process they are plain
  ints and a bisect, exported by a custom collector at scrape time
  (:class:`LocalRequests`); with workers the histogram is written to the
  files at every request and the gauges every half second
  (:class:`SharedRequests`).

The ASGI layer that measures requests, and the scrape listener, are in
``_observe.py``.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import os
import shutil
import tempfile
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal

import trio

log = logging.getLogger("trio_launcher")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DIR_PREFIX = "trio-launcher-metrics-"  # + the supervisor's PID (see remove_orphans)
WORKER_ENV = "TRIO_LAUNCHER_METRICS"
# OpenTelemetry's advice for http.server.request.duration.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
FIRST_BUCKET = DURATION_BUCKETS[0]
PROBE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Recorder:
    """The recording interface; this base does nothing (metrics are off).

    Call sites get the current one with :func:`recorder` and call it
    unconditionally; every method is a no-op here.
    """

    enabled = False

    def request_shed(self) -> None:
        """A request was refused with 503 because the server was full."""

    def request_timed_out(self, kind: Literal["response", "body"]) -> None:
        """A request timed out: ``response`` (504, the app was too slow) or
        ``body`` (408, the client sent its body too slowly)."""

    def request_cut_by_drain(self) -> None:
        """An in-flight request was cancelled at the end of the drain."""

    def drain_started(self) -> None:
        """The listeners closed and the drain began."""

    def engine_up(self, up: bool) -> None:
        """The engine is alive (1) or dead (0)."""

    def health_probe(self, seconds: float) -> None:
        """One engine health probe took ``seconds``."""

    def tls_reload(self, ok: bool) -> None:
        """A certificate reload went live (``ok``) or was refused."""

    def certificate_expiry(self, timestamp: float) -> None:
        """The served certificate's ``notAfter``, in seconds since the epoch."""

    async def run(self) -> None:
        """Task: whatever the recorder does in the background (here: nothing)."""

    def worker_restart(self, cause: str) -> None:
        """The supervisor started a replacement worker (``crash``, ``exit``...)."""

    def worker_exited(self, pid: int) -> None:
        """A worker process is gone: drop its live gauges."""

    def connection_handler(
        self, handler: Callable[[trio.abc.Stream, bytes], Awaitable[None]]
    ) -> Callable[[trio.abc.Stream, bytes], Awaitable[None]]:
        """``handler``, counting its open connections (unchanged when off)."""
        return handler

    def connections_waiting(self, change: int) -> None:
        """Open connections without a task (waiting at the door for their first
        bytes) came (+1) or went (-1)."""


NOOP = Recorder()
_current: contextvars.ContextVar[Recorder] = contextvars.ContextVar(
    "trio_launcher_metrics", default=NOOP
)


def recorder() -> Recorder:
    """The recorder of the server (or supervisor) this task belongs to."""
    return _current.get()


@contextlib.contextmanager
def using(rec: Recorder | None) -> Iterator[None]:
    """``rec`` (or the no-op recorder) is current inside the block."""
    token = _current.set(rec if rec is not None else NOOP)
    try:
        yield
    finally:
        _current.reset(token)


def server_metrics(metrics_path: str | None, metrics_bind: str | None) -> Metrics | None:
    """A server's metrics: on when it serves a scrape, or when it is a worker of a
    supervisor that does (the supervisor says so in the environment)."""
    if metrics_path is None and metrics_bind is None and os.environ.get(WORKER_ENV) != "1":
        return None
    return Metrics()


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics(Recorder):
    """The prometheus_client metrics of one server, or of the workers' supervisor.

    Args:
        supervisor: the parent of ``--workers``: only what it measures itself
            (worker restarts) is defined, so that it adds no zero samples to
            the workers' gauges.
    """

    enabled = True

    def __init__(self, supervisor: bool = False) -> None:
        _import_multiprocess_aware()
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self._Gauge = Gauge
        self._Histogram = Histogram
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess_enabled()
        reg = self.registry
        self._engine_up: Any = None
        self._probe: Any = None
        self._expiry: Any = None
        self.worker_restarts = Counter(
            "trio_launcher_worker_restarts",
            "Worker processes started again, by cause.",
            ["cause"],
            registry=reg,
        )
        if supervisor:
            return
        self.requests: LocalRequests | SharedRequests
        if self.multiprocess:
            self.requests = SharedRequests(reg)
        else:
            self.requests = LocalRequests()
            reg.register(self.requests)
        self.shed = Counter(
            "trio_launcher_requests_shed",
            "Requests refused with 503 because the server was at its limit.",
            registry=reg,
        )
        self.timed_out = Counter(
            "trio_launcher_requests_timed_out",
            "Requests that timed out: kind=response (504), kind=body (408).",
            ["kind"],
            registry=reg,
        )
        self.cut = Counter(
            "trio_launcher_requests_cut_by_drain",
            "In-flight requests cancelled at the end of a drain (graceful timeout).",
            registry=reg,
        )
        self.drains = Counter("trio_launcher_drains", "Drains started.", registry=reg)
        self.tls_reloads = Counter(
            "trio_launcher_tls_reloads", "Certificate reloads that went live.", registry=reg
        )
        self.tls_reload_failures = Counter(
            "trio_launcher_tls_reload_failures",
            "Certificate reloads refused (the previous certificate stays live).",
            registry=reg,
        )

    # --- the recording interface ------------------------------------------------

    def request_shed(self) -> None:
        self.shed.inc()

    def request_timed_out(self, kind: Literal["response", "body"]) -> None:
        self.timed_out.labels(kind).inc()

    def request_cut_by_drain(self) -> None:
        self.cut.inc()

    def drain_started(self) -> None:
        self.drains.inc()

    def engine_up(self, up: bool) -> None:
        if self._engine_up is None:
            self._engine_up = self._Gauge(
                "trio_launcher_engine_up",
                "1 while the engine is alive, 0 once it is dead (with workers: the lowest).",
                registry=self.registry,
                multiprocess_mode="livemin",
            )
        self._engine_up.set(1 if up else 0)

    def health_probe(self, seconds: float) -> None:
        if self._probe is None:
            self._probe = self._Histogram(
                "trio_launcher_engine_health_probe_duration_seconds",
                "Duration of the engine health probe.",
                buckets=PROBE_BUCKETS,
                registry=self.registry,
            )
        self._probe.observe(seconds)

    def tls_reload(self, ok: bool) -> None:
        (self.tls_reloads if ok else self.tls_reload_failures).inc()

    def certificate_expiry(self, timestamp: float) -> None:
        if self._expiry is None:
            self._expiry = self._Gauge(
                "trio_launcher_tls_certificate_expiry_timestamp_seconds",
                "notAfter of the served certificate, seconds since the epoch "
                "(with workers: the earliest).",
                registry=self.registry,
                multiprocess_mode="livemin",
            )
        self._expiry.set(timestamp)

    async def run(self) -> None:
        """Task (with workers): write the gauges to the shared files now and then."""
        if isinstance(self.requests, SharedRequests):
            await self.requests.run()

    def worker_restart(self, cause: str) -> None:
        self.worker_restarts.labels(cause).inc()

    def worker_exited(self, pid: int) -> None:
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

    def connection_handler(
        self, handler: Callable[[trio.abc.Stream, bytes], Awaitable[None]]
    ) -> Callable[[trio.abc.Stream, bytes], Awaitable[None]]:
        requests = self.requests

        async def counted(stream: trio.abc.Stream, first: bytes) -> None:
            requests.connection_opened()
            try:
                await handler(stream, first)
            finally:
                requests.connection_closed()

        return counted

    def connections_waiting(self, change: int) -> None:
        self.requests.connections += change

    # --- the scrape -----------------------------------------------------------

    def exposition(self) -> bytes:
        """The text a scrape returns: every process's numbers, then the app's own."""
        from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

        if self.multiprocess:
            from prometheus_client import multiprocess

            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry) + generate_latest(REGISTRY)


DURATION = ("http_server_request_duration_seconds", "Duration of HTTP server requests.")
DURATION_LABELS = ("http_request_method", "http_response_status_code", "http_route")
ACTIVE = ("http_server_active_requests", "Number of active HTTP server requests.")
CONNECTIONS = ("http_server_open_connections", "Number of open client connections.")
_Key = tuple[str, int, str]  # method, status (0: no response), route
_Seen = tuple[str, int, str | None]  # the same as a request gives them (route None: none)
KNOWN_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)


def request_key(method: str, status: int, route: object) -> _Key:
    """The histogram's labels: an unknown method is ``_OTHER``; ``route`` is
    ``scope.get("route")`` (None: no route matched); ``status`` 0: no response."""
    return (
        method if method in KNOWN_METHODS else "_OTHER",
        status,
        "" if route is None else route_template(route),
    )


def route_template(route: object) -> str:
    """The route the framework matched (never the raw path), or "", from
    ``scope["route"]``.

    Starlette/FastAPI put the matched route object there (``.path`` is the
    template); ``trio_launcher.quart`` puts Quart's rule string there.
    """
    if isinstance(route, str):
        return route
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else ""


class _Counting:
    """The two gauges both kinds keep: requests active (read from the runner's
    in-flight table, ``active_now``), connections open (a plain int)."""

    def __init__(self) -> None:
        self.active_now: Callable[[], int] = lambda: 0
        self.connections = 0

    def connection_opened(self) -> None:
        self.connections += 1

    def connection_closed(self) -> None:
        self.connections -= 1


class LocalRequests(_Counting):
    """The per-request numbers of a single process, kept in plain Python.

    Every request changes the active-requests gauge twice and the duration
    histogram once. Through prometheus_client that is five lock round trips
    and about 4 us a request on this machine (3 % of a hello-world request's
    whole cost); the event loop is one thread, so plain ints and a bisect do
    the same for a tenth of that. They are exported at scrape time as
    ordinary Prometheus families (a custom collector).
    """

    def __init__(self) -> None:
        super().__init__()
        self.series: dict[_Key, list[float]] = {}  # bucket counts..., +Inf count, sum
        # The same lists by what a request gives, ``(method, status, route)``, for a route
        # that is None or a string (else ask :meth:`counts`). The runner's middleware
        # does :meth:`finished` inline with it (two Python calls fewer a request).
        self.seen: dict[_Seen, list[float]] = {}

    def finished(self, method: str, status: int, route: object, seconds: float) -> None:
        """One request ended (the arguments: :func:`request_key`)."""
        counts = None
        if route is None or type(route) is str:
            counts = self.seen.get((method, status, route))
        if counts is None:
            counts = self.counts(method, status, route)
        # (Most requests of a fast service end in the first bucket: one comparison.)
        counts[0 if seconds <= FIRST_BUCKET else bisect_left(DURATION_BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def counts(self, method: str, status: int, route: object) -> list[float]:
        """The series of a request (made the first time): bucket counts..., the +Inf
        count, the sum."""
        given = _given_route(route)
        counts = self.seen.get((method, status, given))
        if counts is None:
            key = request_key(method, status, given)
            counts = self.series.get(key)
            if counts is None:
                counts = self.series[key] = [0] * (len(DURATION_BUCKETS) + 1) + [0.0]
            if key[0] == method:  # (an unknown method is not remembered: no bound)
                self.seen[method, status, given] = counts
        return counts

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

        histogram = HistogramMetricFamily(*DURATION, labels=DURATION_LABELS)
        bounds = [*(str(b) for b in DURATION_BUCKETS), "+Inf"]
        for (method, status, route), counts in self.series.items():
            cumulative = list(itertools.accumulate(counts[:-1]))
            histogram.add_metric(
                [method, str(status) if status else "", route],
                list(zip(bounds, cumulative, strict=True)),
                counts[-1],
            )
        yield histogram
        yield GaugeMetricFamily(*ACTIVE, value=self.active_now())
        yield GaugeMetricFamily(*CONNECTIONS, value=self.connections)


def _given_route(route: object) -> str | None:
    """The route as a request gives it, hashable: a route object (Starlette's) by its
    template."""
    return route if route is None or isinstance(route, str) else route_template(route)


class SharedRequests(_Counting):
    """The same numbers in prometheus_client's multiprocess files (``--workers``).

    Each write to those files takes a lock and checks the PID (about 2 us).
    The histogram is written at every request (a worker killed at any moment
    loses nothing); the two gauges are plain ints that :meth:`write_gauges`
    copies to the files every ``GAUGE_EVERY`` seconds (a task of the runner),
    so a busy worker does not pay four more writes a request for numbers that
    are a snapshot anyway.
    """

    GAUGE_EVERY = 0.5

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Gauge, Histogram

        super().__init__()
        self.duration = Histogram(
            *DURATION, DURATION_LABELS, buckets=DURATION_BUCKETS, registry=registry
        )
        self._active = Gauge(*ACTIVE, registry=registry, multiprocess_mode="livesum")
        self._connections = Gauge(*CONNECTIONS, registry=registry, multiprocess_mode="livesum")
        self._children: dict[_Seen, Any] = {}  # by what a request gives
        self._written = (0, 0)

    def finished(self, method: str, status: int, route: object, seconds: float) -> None:
        given = _given_route(route)
        child = self._children.get((method, status, given))
        if child is None:
            key = request_key(method, status, given)
            child = self.duration.labels(key[0], str(status) if status else "", key[2])
            if key[0] == method:  # (an unknown method is not remembered: no bound)
                self._children[method, status, given] = child
        child.observe(seconds)

    def write_gauges(self) -> None:
        now = (self.active_now(), self.connections)
        if now != self._written:
            self._written = now
            self._active.set(now[0])
            self._connections.set(self.connections)

    async def run(self) -> None:
        """Task: keep the gauges in the files current."""
        while True:
            self.write_gauges()
            await trio.sleep(self.GAUGE_EVERY)


def _import_multiprocess_aware() -> None:
    """Import prometheus_client so that it honours PROMETHEUS_MULTIPROC_DIR even if
    something imported it before the variable was set."""
    from prometheus_client import values

    if multiprocess_enabled() and values.ValueClass is values.MutexValue:
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def supervisor_metrics() -> Iterator[Metrics]:
    """In the parent of ``--workers``: a private multiprocess directory for the
    workers (inherited through the environment), removed at the end.

    Its name holds the supervisor's PID. A supervisor killed with SIGKILL cannot
    remove its directory, so each new one first removes those of supervisors that
    are gone (:func:`remove_orphans`)."""
    remove_orphans(tempfile.gettempdir())
    directory = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = directory
    os.environ[WORKER_ENV] = "1"
    try:
        metrics = Metrics(supervisor=True)
        with using(metrics):
            yield metrics
    finally:
        os.environ.pop(WORKER_ENV, None)
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(directory, ignore_errors=True)


def remove_orphans(parent: str) -> None:
    """Remove the workers' directories in ``parent`` whose supervisor is gone: named
    ``DIR_PREFIX<PID>-...``, owned by this user, and no process has that PID. (A PID
    taken again by another process keeps its directory: the safe side.)"""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(DIR_PREFIX):
            continue
        pid_text = entry.name[len(DIR_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            continue  # (alive, another user's, or gone from under us)
