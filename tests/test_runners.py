"""Handler runners: a task serves one request after another (HTTP/1.1, ``_http1``) or
one HTTP/2 stream after another (``_transport.LeanTaskGroup``).

What a task per request gave for free must still hold: each request starts
with the connection's contextvars as they were (nothing leaks from one
request to the next), a request is not held behind the previous handler's
background work, and the request deadline cancels one request at a time on
a connection that lives on.
"""

from __future__ import annotations

import contextvars
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from trio_launcher.testing import running_server

from .apps import respond
from .bounds_apps import BoundsApp, Message, Receive, Send

LEFT_BY_LAST = contextvars.ContextVar[str]("LEFT_BY_LAST", default="unset")


class RunnerApp:
    """GET /set sets a contextvar; GET /get answers it; GET /background answers,
    then keeps working until ``release`` is set."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.background_done = False

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/set":
            LEFT_BY_LAST.set("set by the previous request")
            await respond(send, 200, b"set")
        elif scope["path"] == "/background":
            await respond(send, 200, b"answered")
            await self.release.wait()  # background work after the response
            self.background_done = True
        else:
            await respond(send, 200, LEFT_BY_LAST.get().encode())


def one_connection(url: str, http: str) -> httpx.AsyncClient:
    """A client of one keep-alive connection: HTTP/1.1, or HTTP/2 (prior knowledge)."""
    h2 = http == "h2"
    limits = httpx.Limits(max_connections=1)
    return httpx.AsyncClient(base_url=url, http1=not h2, http2=h2, limits=limits, timeout=10)


@pytest.mark.parametrize("http", ["http/1.1", "h2"])
async def test_a_contextvar_set_by_one_request_is_not_seen_by_the_next(http: str) -> None:
    async with running_server(RunnerApp()) as server, one_connection(server.url, http) as client:
        for _ in range(2):
            assert (await client.get("/set")).text == "set"
            response = await client.get("/get")
            assert response.text == "unset"
            assert response.http_version == ("HTTP/2" if http == "h2" else "HTTP/1.1")


@pytest.mark.parametrize("http", ["http/1.1", "h2"])
async def test_a_request_is_not_held_behind_the_last_handlers_background_work(
    http: str,
) -> None:
    app = RunnerApp()
    async with running_server(app) as server, one_connection(server.url, http) as client:
        assert (await client.get("/background")).text == "answered"
        with trio.fail_after(5):
            assert (await client.get("/get")).text == "unset"  # same connection, served now
        assert not app.background_done
        app.release.set()


async def test_http2_streams_beyond_the_idle_runners_all_run_and_leak_nothing() -> None:
    """More concurrent streams than a connection keeps idle runners for: each gets a
    runner; afterwards the kept runners serve the next streams, each with fresh
    contextvars."""
    async with running_server(RunnerApp()) as server, one_connection(server.url, "h2") as client:
        for _ in range(3):
            results: list[str] = []
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(get_into, client, "/set" if i % 2 else "/get", results)
            assert sorted(results) == ["set"] * 10 + ["unset"] * 10


async def get_into(client: httpx.AsyncClient, path: str, results: list[str]) -> None:
    results.append((await client.get(path)).text)


@pytest.mark.parametrize("variant", ["lean", "lean-h11", "lean-h2", "hypercorn"])
async def test_request_deadline_cancels_each_late_request_and_the_connection_lives_on(
    variant: str,
) -> None:
    options: dict[str, Any] = {"transport": "hypercorn" if variant == "hypercorn" else "lean"}
    if variant == "lean-h11":
        options["http"] = "h11"
    app = BoundsApp()
    async with (
        running_server(app, request_timeout=0.3, **options) as server,
        one_connection(server.url, "h2" if variant == "lean-h2" else "http/1.1") as client,
    ):
        for _ in range(3):
            response = await client.get("/forever")
            assert response.status_code == 504
            assert response.json()["error"]["type"] == "RequestTimeout"
        assert (await client.get("/")).text == "hello"
        assert app.ended["/forever"] == ["Cancelled"] * 3
        assert app.child == ["Cancelled"] * 3


async def test_a_finished_streams_late_disconnect_cancels_nothing_on_its_runner() -> None:
    """An HTTP/2 runner serves stream after stream in one cancel scope: a cancel meant
    for a stream whose handler has returned must not reach the next stream's handler."""
    from hypercorn.config import Config

    from trio_launcher._transport import LeanTaskGroup

    outcomes: list[str] = []
    second_running = trio.Event()
    first_ended = trio.Event()
    release = trio.Event()

    async def app(scope: Message, receive: Receive, send: Send, *_: Any) -> None:
        if scope["path"] == "/first":
            return  # no response: not complete, so a disconnect would cancel it
        second_running.set()
        try:
            await release.wait()
        except trio.Cancelled:
            outcomes.append("second cancelled")
            raise
        outcomes.append("second finished")

    async def send(message: Message | None) -> None:
        if message is None:
            first_ended.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            group = LeanTaskGroup(nursery)
            wrapper: Any = app  # (an AppWrapper: hypercorn's five-argument call)
            first = {"type": "http", "path": "/first"}
            put_first = await group.spawn_app(wrapper, Config(), first, send)
            await first_ended.wait()
            await group.spawn_app(wrapper, Config(), {"type": "http", "path": "/second"}, send)
            await second_running.wait()
            await put_first({"type": "http.disconnect"})  # late: its handler has returned
            await trio.testing.wait_all_tasks_blocked()
            release.set()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # (the parked runner)
    assert outcomes == ["second finished"]
