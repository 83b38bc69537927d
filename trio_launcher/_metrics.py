"""Prometheus metrics with prometheus_client, right across worker processes.

What is measured is in docs/observability.md (one line per metric). The names
follow OpenTelemetry's HTTP semantic conventions in Prometheus form
(``http.server.request.duration`` in seconds becomes
``http_server_request_duration_seconds``, the attribute ``http.route`` the
label ``http_route``); what only the runner knows is ``trio_launcher_*``.

Three decisions:

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
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal

import trio

from ._asgi import ASGIApp, Message, Receive, Scope, Send
from ._hypercorn import Config
from ._logging import RequestIds
from ._ports import bind_one

log = logging.getLogger("trio_launcher")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_ENV = "TRIO_LAUNCHER_METRICS"
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# OpenTelemetry's advice for http.server.request.duration.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0)  # fmt: skip
PROBE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
KNOWN_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)
MAX_METRICS_HEAD = 16384


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
        self, handler: Callable[[trio.abc.Stream], Awaitable[None]]
    ) -> Callable[[trio.abc.Stream], Awaitable[None]]:
        """``handler``, counting its open connections (unchanged when off)."""
        return handler


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
        self.shed = Counter("trio_launcher_requests_shed", "Requests refused with 503 because "
                            "the server was at its limit.", registry=reg)  # fmt: skip
        self.timed_out = Counter(
            "trio_launcher_requests_timed_out",
            "Requests that timed out: kind=response (504), kind=body (408).",
            ["kind"],
            registry=reg,
        )
        self.cut = Counter("trio_launcher_requests_cut_by_drain", "In-flight requests cancelled "
                           "at the end of a drain (graceful timeout).", registry=reg)  # fmt: skip
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
        self, handler: Callable[[trio.abc.Stream], Awaitable[None]]
    ) -> Callable[[trio.abc.Stream], Awaitable[None]]:
        requests = self.requests

        async def counted(stream: trio.abc.Stream) -> None:
            requests.connection_opened()
            try:
                await handler(stream)
            finally:
                requests.connection_closed()

        return counted

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


class LocalRequests:
    """The per-request numbers of a single process, kept in plain Python.

    Every request changes the active-requests gauge twice and the duration
    histogram once. Through prometheus_client that is five lock round trips
    and about 4 us a request on this machine (3 % of a hello-world request's
    whole cost); the event loop is one thread, so plain ints and a bisect do
    the same for a tenth of that. They are exported at scrape time as
    ordinary Prometheus families (a custom collector).
    """

    def __init__(self) -> None:
        self.active = 0
        self.connections = 0
        self.series: dict[_Key, list[float]] = {}  # bucket counts..., +Inf count, sum

    def started(self) -> None:
        self.active += 1

    def finished(self, key: _Key, seconds: float) -> None:
        self.active -= 1
        counts = self.series.get(key)
        if counts is None:
            counts = self.series[key] = [0] * (len(DURATION_BUCKETS) + 1) + [0.0]
        counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def connection_opened(self) -> None:
        self.connections += 1

    def connection_closed(self) -> None:
        self.connections -= 1

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
        yield GaugeMetricFamily(*ACTIVE, value=self.active)
        yield GaugeMetricFamily(*CONNECTIONS, value=self.connections)


class SharedRequests:
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

        self.duration = Histogram(*DURATION, DURATION_LABELS, buckets=DURATION_BUCKETS,
                                  registry=registry)  # fmt: skip
        self._active = Gauge(*ACTIVE, registry=registry, multiprocess_mode="livesum")
        self._connections = Gauge(*CONNECTIONS, registry=registry, multiprocess_mode="livesum")
        self._children: dict[_Key, Any] = {}
        self.active = 0
        self.connections = 0
        self._written = (0, 0)

    def started(self) -> None:
        self.active += 1

    def finished(self, key: _Key, seconds: float) -> None:
        self.active -= 1
        child = self._children.get(key)
        if child is None:
            method, status, route = key
            child = self._children[key] = self.duration.labels(
                method, str(status) if status else "", route
            )
        child.observe(seconds)

    def connection_opened(self) -> None:
        self.connections += 1

    def connection_closed(self) -> None:
        self.connections -= 1

    def write_gauges(self) -> None:
        now = (self.active, self.connections)
        if now != self._written:
            self._written = now
            self._active.set(self.active)
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
    workers (inherited through the environment), removed at the end."""
    directory = tempfile.mkdtemp(prefix="trio-launcher-metrics-")
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


# --- the ASGI layer: metrics path, request ids, request metrics --------------------


class Observed:
    """The runner's outermost layer: answers the metrics path, gives every request
    an id, measures every request.

    Args:
        app: the runner's middleware (health, limits, engine errors) and the app.
        metrics: the server's metrics, or None when metrics are off.
        metrics_path: a GET/HEAD path answered with the scrape, before the app.
        request_ids: keep or make an ``X-Request-Id`` for every request.
        draining: True once the drain has started (a cancelled request then
            counts as cut by the drain).
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics | None,
        *,
        metrics_path: str | None,
        request_ids: bool,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.metrics_path = metrics_path if metrics is not None else None
        self.ids = RequestIds() if request_ids else None
        self.draining = draining
        self.requests = metrics.requests if metrics is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        if scope["path"] == self.metrics_path and method in ("GET", "HEAD"):
            assert self.metrics is not None
            await send_metrics(send, self.metrics, head_only=method == "HEAD")
            return
        header = self.ids.assign(scope) if self.ids is not None else None
        requests = self.requests
        if requests is None:  # request ids only
            await self.app(scope, receive, _with_header(send, header))
            return
        status = 0

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if header is not None:
                    message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        start = time.perf_counter()
        requests.started()
        try:
            await self.app(scope, receive, observed_send)
        except BaseException as exc:
            if not status:
                if _is_cancel(exc):
                    if self.draining() and self.metrics is not None:
                        self.metrics.request_cut_by_drain()
                else:
                    status = 500  # hypercorn answers it
            raise
        finally:
            requests.finished(
                (method if method in KNOWN_METHODS else "_OTHER", status, route_template(scope)),
                time.perf_counter() - start,
            )


def _with_header(send: Send, header: tuple[bytes, bytes] | None) -> Send:
    if header is None:
        return send

    async def id_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), header]
        await send(message)

    return id_send


def route_template(scope: Scope) -> str:
    """The route the framework matched (never the raw path), or "".

    Starlette/FastAPI put the matched route object in ``scope["route"]``
    (``.path`` is the template); ``trio_launcher.quart`` puts Quart's rule string
    there.
    """
    route = scope.get("route")
    if route is None:
        return ""
    if isinstance(route, str):
        return route
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else ""


def _is_cancel(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_cancel(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


async def send_metrics(send: Send, metrics: Metrics, head_only: bool = False) -> None:
    body = metrics.exposition()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", CONTENT_TYPE),
                        (b"content-length", str(len(body)).encode())],
        }
    )  # fmt: skip
    await send({"type": "http.response.body", "body": b"" if head_only else body})


# --- the separate listener (metrics_bind) -------------------------------------------


def bind_metrics(address: str) -> trio.SocketListener:
    """Bind ``address`` (``HOST:PORT``, ``[V6]:PORT``, ``unix:PATH``) for the scrape.

    Raises:
        BindError: the address could not be bound.
        ConfigError: an address that cannot be parsed.
    """
    sock = bind_one(address, Config())
    sock.listen(128)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def listener_url(listener: trio.SocketListener) -> str:
    name = listener.socket.getsockname()
    if isinstance(name, tuple):
        host = f"[{name[0]}]" if ":" in name[0] else name[0]
        return f"http://{host}:{name[1]}"
    return f"unix:{name}"


async def serve_metrics(
    metrics: Metrics,
    listener: trio.SocketListener,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Task: answer every GET on ``listener`` with the scrape (like prometheus_client's
    own server, any path). One request per connection; plain HTTP."""
    url = listener_url(listener)
    log.info("metrics on %s", url)
    async with trio.open_nursery() as nursery:
        task_status.started(url)
        await trio.serve_listeners(partial_answer(metrics), [listener], handler_nursery=nursery)


def partial_answer(metrics: Metrics) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def answer(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(10):
                head = b""
                while b"\r\n\r\n" not in head and len(head) < MAX_METRICS_HEAD:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    head += data
                words = head.split(b"\r\n", 1)[0].split()
                if len(words) != 3 or words[0] not in (b"GET", b"HEAD"):
                    status, body, ctype = b"405 Method Not Allowed", b"", b"text/plain"
                else:
                    status, body, ctype = b"200 OK", metrics.exposition(), CONTENT_TYPE
                response = b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n" \
                    b"connection: close\r\n\r\n" % (status, ctype, len(body))  # fmt: skip
                if words and words[0] != b"HEAD":
                    response += body
                await stream.send_all(response)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    return answer


async def run_with_metrics_listener(
    main: Callable[..., Awaitable[int]], *args: Any, bind: str | None
) -> int:
    """The supervisor's program: ``main(*args)``, with the scrape listener beside it.

    The supervisor is a small runner of its own: this is its nursery.
    """
    metrics = recorder()
    if bind is None or not isinstance(metrics, Metrics):
        return await main(*args)
    listener = bind_metrics(bind)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_metrics, metrics, listener)
        code = await main(*args)
        nursery.cancel_scope.cancel()
    return code
