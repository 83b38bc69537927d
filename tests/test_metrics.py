"""Prometheus metrics: scraped with prometheus_client's own parser from real servers."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypercorn.config import Config
from prometheus_client.parser import text_string_to_metric_families
from quart_trio import QuartTrio

from trio_launcher import ConfigError, serve_http
from trio_launcher._asgi import RunnerMiddleware
from trio_launcher._logging import RequestIds
from trio_launcher._metrics import (
    DURATION_BUCKETS,
    LocalRequests,
    Metrics,
    Recorder,
    recorder,
    route_template,
)
from trio_launcher.testing import FakeEngine, TLSFiles, running_server

from .apps import App
from .proc import launch, wait_gone, wait_workers

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and wanted <= ls]
    assert found, f"no sample {name} {labels} in {sorted({n for n, _ in samples})}"
    return sum(found)


async def scrape(
    client: httpx.AsyncClient, url: str = "/metrics", headers: dict[str, str] | None = None
) -> Samples:
    response = await client.get(url, headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


DURATION_COUNT = "http_server_request_duration_seconds_count"


async def test_values_move_with_real_requests() -> None:
    async with running_server(App(), metrics_path="/metrics", health_path="/health") as server:
        before = await scrape(server.client)
        assert value(before, "http_server_active_requests") == 0
        assert value(before, "trio_launcher_drains_total") == 0
        for _ in range(3):
            assert (await server.client.get("/")).status_code == 200
        assert (await server.client.get("/nowhere")).status_code == 404
        assert (await server.client.post("/raise/generate")).status_code == 500
        after = await scrape(server.client)
        get_200 = {"http_request_method": "GET", "http_response_status_code": "200"}
        assert value(after, DURATION_COUNT, **get_200) == 3
        assert value(after, DURATION_COUNT, http_response_status_code="404") == 1
        assert (
            value(
                after, DURATION_COUNT, http_request_method="POST", http_response_status_code="500"
            )
            == 1
        )
        # The bare app has no routes: the label is empty, never the raw path.
        assert all(dict(ls).get("http_route") == "" for n, ls in after if n == DURATION_COUNT)
        assert value(after, "http_server_request_duration_seconds_sum") > 0
        # One keep-alive client: one open connection, and this scrape is the active request.
        assert value(after, "http_server_open_connections") == 1
        assert value(after, "http_server_active_requests") == 0
        # The scrape and the health path are answered before the app.
        assert (await server.client.get("/health")).status_code == 200


async def test_active_requests_counts_a_request_in_flight() -> None:
    app = App()
    async with running_server(app, metrics_path="/metrics") as server, trio.open_nursery() as n:
        n.start_soon(server.client.get, "/slow?s=2")
        with trio.fail_after(10):
            await app.slow_started.wait()
        async with httpx.AsyncClient(base_url=server.handle.urls[0]) as other:
            assert value(await scrape(other), "http_server_active_requests") == 1
            assert value(await scrape(other), "http_server_open_connections") == 2
        n.cancel_scope.cancel()


async def test_open_connections_counts_those_waiting_at_the_door() -> None:
    """With a concurrency limit, a connection whose request is not in yet waits at the
    door without a task; it is still an open connection, and counts until it leaves."""
    async with running_server(App(), metrics_path="/metrics", limit_concurrency=10) as server:
        with trio.fail_after(10):
            assert value(await scrape(server.client), "http_server_open_connections") == 1
            silent = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(3)]
            await trio.testing.wait_all_tasks_blocked()
            assert value(await scrape(server.client), "http_server_open_connections") == 4
            for stream in silent[:2]:
                await stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert value(await scrape(server.client), "http_server_open_connections") == 2
            await silent[2].send_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")  # let in
            assert (await silent[2].receive_some(100)).startswith(b"HTTP/1.1 200 ")
            assert value(await scrape(server.client), "http_server_open_connections") == 2
            await silent[2].aclose()


async def test_route_template_from_quart_not_the_raw_path() -> None:
    app = QuartTrio(__name__)

    @app.route("/items/<int:item>")
    async def item(item: int) -> str:
        return str(item)

    async with running_server(app, metrics_path="/metrics") as server:
        for i in (1, 2, 3):
            assert (await server.client.get(f"/items/{i}")).text == str(i)
        samples = await scrape(server.client)
    assert value(samples, DURATION_COUNT, http_route="/items/<int:item>") == 3
    assert not [ls for n, ls in samples if n == DURATION_COUNT and ("http_route", "/items/1") in ls]


async def test_route_template_from_starlette() -> None:
    starlette_routing = pytest.importorskip("starlette.routing")
    responses = pytest.importorskip("starlette.responses")
    applications = pytest.importorskip("starlette.applications")

    async def item(request: Any) -> Any:
        return responses.PlainTextResponse(request.path_params["item"])

    app = applications.Starlette(routes=[starlette_routing.Route("/items/{item}", item)])
    async with running_server(app, metrics_path="/metrics") as server:
        assert (await server.client.get("/items/7")).text == "7"
        samples = await scrape(server.client)
    assert value(samples, DURATION_COUNT, http_route="/items/{item}") == 1


def test_route_template_shapes() -> None:
    class Route:
        path = "/a/{b}"

    assert route_template(Route()) == "/a/{b}"
    assert route_template("/x/<y>") == "/x/<y>"
    assert route_template(object()) == ""


def test_unknown_methods_are_one_series_and_never_remembered_one_by_one() -> None:
    """The per-request shortcut (labels by what a request gives) stays bounded."""

    class Route:
        path = "/a/{b}"

    requests = LocalRequests()
    for method in ("GET", "GET", "BREW", "WHEN", "GET"):
        requests.finished(method, 200, None, 0.001)
    requests.finished("GET", 200, "/x/<y>", 0.3)
    requests.finished("POST", 0, Route(), 20.0)
    assert {key: sum(counts[:-1]) for key, counts in requests.series.items()} == {
        ("GET", 200, ""): 3,
        ("_OTHER", 200, ""): 2,
        ("GET", 200, "/x/<y>"): 1,
        ("POST", 0, "/a/{b}"): 1,
    }
    assert requests.series["GET", 200, "/x/<y>"][DURATION_BUCKETS.index(0.5)] == 1
    assert requests.series["POST", 0, "/a/{b}"][-1] == 20.0
    assert len(requests.seen) == 3  # not BREW, not WHEN


async def test_separate_listener_and_engine_up() -> None:
    engine = FakeEngine()
    async with running_server(
        App(), metrics_bind="127.0.0.1:0", engine=engine, keep_alive_on_engine_death=True
    ) as server:
        url = server.handle.metrics_url
        assert url is not None and url.startswith("http://127.0.0.1:")
        assert url != server.handle.urls[0]
        # Not on the main listener.
        assert (await server.client.get("/metrics")).status_code == 404
        async with httpx.AsyncClient() as client:
            assert value(await scrape(client, url + "/metrics"), "trio_launcher_engine_up") == 1
            assert (await client.post(url + "/metrics")).status_code == 405
            await server.client.get("/")
            engine.kill()
            with trio.fail_after(5):
                while value(await scrape(client, url + "/metrics"), "trio_launcher_engine_up"):
                    await trio.sleep(0.02)
            samples = await scrape(client, url)
            assert value(samples, DURATION_COUNT, http_response_status_code="200") == 1


async def test_tls_reload_counters_and_expiry(tls_files: TLSFiles) -> None:
    options: dict[str, Any] = {"enable_ssl_refresh": True, "ssl_refresh_interval": 0.1}
    async with running_server(
        App(), tls_files.config(), tls=tls_files, metrics_path="/metrics", **options
    ) as server:
        refresher = server.handle.tls
        assert refresher is not None
        samples = await scrape(server.client)
        expiry = refresher.switch.current.not_after.timestamp()
        assert value(samples, "trio_launcher_tls_certificate_expiry_timestamp_seconds") == expiry
        assert value(samples, "trio_launcher_tls_reloads_total") == 0
        tls_files.rotate()
        tls_files.write_raw("key", b"garbage")
        with trio.fail_after(5):
            while refresher.failures < 1:
                await trio.sleep(0.02)
        tls_files.rotate()
        with trio.fail_after(5):
            while refresher.reloads < 1:
                await trio.sleep(0.02)
        samples = await scrape(server.client)
        assert value(samples, "trio_launcher_tls_reloads_total") == refresher.reloads
        assert value(samples, "trio_launcher_tls_reload_failures_total") == refresher.failures
        new_expiry = refresher.switch.current.not_after.timestamp()
        assert value(samples, "trio_launcher_tls_certificate_expiry_timestamp_seconds") == (
            new_expiry
        )


async def test_drain_is_counted_while_it_runs() -> None:
    app = App()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 10
    async with running_server(app, config, metrics_bind="127.0.0.1:0") as server:
        url = server.handle.metrics_url
        assert url is not None
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as client:
            nursery.start_soon(server.client.get, "/slow?s=1")
            with trio.fail_after(10):
                await app.slow_started.wait()
            assert value(await scrape(client, url), "trio_launcher_drains_total") == 0
            server.handle.shutdown()
            with trio.fail_after(5):
                while not value(await scrape(client, url), "trio_launcher_drains_total"):
                    await trio.sleep(0.01)
            assert value(await scrape(client, url), "http_server_active_requests") == 1


async def test_a_request_cancelled_in_the_drain_counts_as_cut() -> None:
    metrics = Metrics()
    started = trio.Event()

    async def stuck(scope: Any, receive: Any, send: Any) -> None:
        started.set()
        await trio.sleep_forever()

    async def send(message: Any) -> None:
        pass

    async def receive() -> Any:
        return {"type": "http.request"}

    observed = RunnerMiddleware(
        stuck,
        lambda exc: None,
        metrics=metrics,
        request_ids=RequestIds(),
        draining=lambda: True,
    )
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "state": {}}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(observed, scope, receive, send)
        await started.wait()
        nursery.cancel_scope.cancel()
    samples = parse(metrics.exposition().decode())
    assert value(samples, "trio_launcher_requests_cut_by_drain_total") == 1
    assert value(samples, DURATION_COUNT, http_response_status_code="") == 1
    assert value(samples, "http_server_active_requests") == 0


async def test_the_middleware_measures_as_finished_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's middleware records a request's duration inline (no call to
    ``LocalRequests.finished``): the series it fills are the ones ``finished`` fills,
    for a route that is None, a string or an (unhashable) route object, an unknown
    method, and durations in the first, a middle and the +Inf bucket."""

    class Route:  # Starlette's route objects compare by value: unhashable
        path = "/a/{b}"
        __hash__ = None  # type: ignore[assignment]

    cases = [
        ("GET", None, 200, 0.001),
        ("GET", "/x/<y>", 404, 0.3),
        ("BREW", None, 200, 0.02),
        ("POST", Route(), 201, 20.0),
        ("GET", None, 200, 0.004),
        ("GET", "/x/<y>", 404, 0.0),
    ]
    route: object = None
    status = 0

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["route"] = route
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message: Any) -> None:
        pass

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    metrics = Metrics()
    middleware = RunnerMiddleware(app, lambda exc: None, metrics=metrics)  # type: ignore[arg-type]
    expected = LocalRequests()
    monkeypatch.setattr("time.monotonic", lambda: 0.0)  # every request arrives at 0
    for method, route, status, seconds in cases:
        monkeypatch.setattr("trio_launcher._asgi._now", lambda s=seconds: s)
        scope = {"type": "http", "method": method, "path": "/", "headers": [], "state": {}}
        await middleware(scope, receive, send)
        expected.finished(method, status, route, seconds)
    assert isinstance(metrics.requests, LocalRequests)
    assert metrics.requests.series == expected.series
    assert len(metrics.requests.series) == 4


def test_recorder_off_is_a_no_op() -> None:
    rec = recorder()
    assert type(rec) is Recorder
    assert not rec.enabled
    rec.request_shed()
    rec.request_timed_out("body")
    rec.worker_restart("crash")
    rec.health_probe(0.1)


async def test_bad_metrics_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="metrics_path must start with '/'"):
        await serve_http(App(), metrics_path="metrics", handle_signals=False)
    with pytest.raises(ConfigError, match="metrics_path is the health path too"):
        await serve_http(App(), metrics_path="/h", health_path="/h", handle_signals=False)


# --- workers: multiprocess mode ------------------------------------------------------


WORKERS = ["tests.apps:app", "--workers", "2", "--bind", "127.0.0.1:0"]
CLOSE = {"connection": "close"}  # a new connection each: both workers get some


async def test_workers_counts_survive_a_restart_and_are_never_doubled() -> None:
    args = [*WORKERS, "--metrics-path", "/metrics", "--metrics-bind", "127.0.0.1:0"]
    async with launch(args, wait_serving=False) as proc:
        await proc.wait_for_line("all 2 workers are serving")
        line = await proc.wait_for_line(r"metrics on http://")
        metrics_url = line.rsplit(" ", 1)[1]
        pids = await wait_workers(proc.process.pid, 2)
        url = proc.url
        async with httpx.AsyncClient() as client:
            for _ in range(20):
                assert (
                    await client.get(url + "/", headers={"connection": "close"})
                ).text == "hello"

            async def total() -> float:
                return value(await scrape(client, metrics_url), DURATION_COUNT, http_route="")

            # Every worker answers the scrape with the sum over all of them; the parent too.
            assert await total() == 20
            scraped_by_workers = [
                value(
                    await scrape(client, url + "/metrics", headers=CLOSE),
                    DURATION_COUNT,
                    http_response_status_code="200",
                )
                for _ in range(4)
            ]
            assert set(scraped_by_workers) == {20}  # (the scrapes are not in the histogram)
            os.kill(pids[0], signal.SIGKILL)
            await proc.wait_for_line(rf"worker \d \(PID {pids[0]}\) crashed")
            new = await wait_workers(proc.process.pid, 2, exclude=frozenset({pids[0]}))
            assert pids[0] not in new
            samples = await scrape(client, metrics_url)
            assert value(samples, DURATION_COUNT, http_response_status_code="200") == 20
            assert value(samples, "trio_launcher_worker_restarts_total", cause="crash") == 1
            # The dead worker's live gauges are gone: two live workers, no open connections.
            assert value(samples, "http_server_active_requests") == 0
            # Gauges reach the shared files too (written every half second).
            async with httpx.AsyncClient() as keep_alive:
                assert (await keep_alive.get(url + "/")).text == "hello"
                with trio.fail_after(10):
                    while not value(
                        await scrape(client, metrics_url, headers=CLOSE),
                        "http_server_open_connections",
                    ):
                        await trio.sleep(0.05)
            for _ in range(10):
                assert (
                    await client.get(url + "/", headers={"connection": "close"})
                ).text == "hello"
            assert (
                value(
                    await scrape(client, metrics_url),
                    DURATION_COUNT,
                    http_response_status_code="200",
                )
                == 31
            )
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0, proc.stderr


# --- the bounds: 503 shed, 504 and 408 timed out; the engine health probe -----------


async def test_shed_and_timed_out_requests_are_counted() -> None:
    app = App()
    bounds: dict[str, Any] = {"limit_concurrency": 1, "request_timeout": 1.0, "body_timeout": 0.3}
    async with running_server(app, metrics_path="/metrics", **bounds) as server:
        async with trio.open_nursery() as nursery:
            slow: list[int] = []

            async def slow_request() -> None:
                slow.append((await server.client.get("/slow?s=5")).status_code)

            nursery.start_soon(slow_request)
            with trio.fail_after(10):
                await app.slow_started.wait()
            async with httpx.AsyncClient(base_url=server.handle.urls[0]) as other:
                assert (await other.get("/")).status_code == 503
                # The scrape is answered before the limits: never shed.
                assert value(await scrape(other), "trio_launcher_requests_shed_total") == 1
        assert slow == [504]
        # A body that stalls: 408.
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(
            b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123"
        )
        with trio.fail_after(10):
            reply = await stream.receive_some(4096)
        await stream.aclose()
        assert reply.startswith(b"HTTP/1.1 408")
        samples = await scrape(server.client)
    assert value(samples, "trio_launcher_requests_shed_total") == 1
    assert value(samples, "trio_launcher_requests_timed_out_total", kind="response") == 1
    assert value(samples, "trio_launcher_requests_timed_out_total", kind="body") == 1
    for status in ("503", "504", "408"):
        assert value(samples, DURATION_COUNT, http_response_status_code=status) == 1


async def test_health_probe_latency_is_measured() -> None:
    from .bounds_apps import ProbedEngine

    engine = ProbedEngine("healthy")
    async with running_server(
        App(), engine=engine, engine_health_interval=0.05, metrics_path="/metrics"
    ) as server:
        with trio.fail_after(10):
            while engine.calls < 3:
                await trio.sleep(0.02)
        samples = await scrape(server.client)
    probes = value(samples, "trio_launcher_engine_health_probe_duration_seconds_count")
    assert probes >= 2
    assert (
        value(samples, "trio_launcher_engine_health_probe_duration_seconds_bucket", le="1.0") >= 2
    )
    assert value(samples, "trio_launcher_engine_up") == 1


def metrics_dirs(parent: Path) -> list[Path]:
    """The workers' metrics directories in ``parent``."""
    return sorted(parent.glob("trio-launcher-metrics-*"))


async def test_a_killed_supervisors_metrics_directory_is_removed_by_the_next_one(
    tmp_path: Path,
) -> None:
    """SIGKILL gives a ``--workers`` supervisor no chance to remove its workers'
    metrics directory (prometheus_client's files): each such kill left one in the
    temporary directory for good. The next supervisor removes those of supervisors
    that are gone, and keeps those of the living."""
    env = {"TMPDIR": str(tmp_path)}
    args = [*WORKERS, "--metrics-path", "/metrics"]
    async with launch(args, env=env, wait_serving=False) as first:
        await first.wait_for_line("all 2 workers are serving")
        workers = await wait_workers(first.process.pid, 2)
        [left] = metrics_dirs(tmp_path)
        for pid in (first.process.pid, *workers):  # (the supervisor we started, its workers)
            os.kill(pid, signal.SIGKILL)
        with trio.fail_after(10):
            await first.process.wait()
        await wait_gone(workers, timeout=10)
    assert left.is_dir()  # nobody could remove it
    async with launch(args, env=env, wait_serving=False) as second:
        await second.wait_for_line("all 2 workers are serving")
        [own] = metrics_dirs(tmp_path)
        assert own != left
        assert own.name.startswith(f"trio-launcher-metrics-{second.process.pid}-")
        async with launch(args, env=env, wait_serving=False) as third:
            await third.wait_for_line("all 2 workers are serving")
            assert own.is_dir()  # a living supervisor's directory stays
