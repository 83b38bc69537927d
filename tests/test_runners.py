"""HTTP/1.1 handler runners (``_http1``): a task serves one request after another.

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


async def test_a_contextvar_set_by_one_request_is_not_seen_by_the_next() -> None:
    async with running_server(RunnerApp()) as server:
        client = server.client  # one keep-alive connection
        assert (await client.get("/set")).text == "set"
        assert (await client.get("/get")).text == "unset"
        assert (await client.get("/set")).text == "set"
        assert (await client.get("/get")).text == "unset"


async def test_a_request_is_not_held_behind_the_last_handlers_background_work() -> None:
    app = RunnerApp()
    async with running_server(app) as server:
        client = server.client
        assert (await client.get("/background")).text == "answered"
        with trio.fail_after(5):
            assert (await client.get("/get")).text == "unset"  # same connection, served now
        assert not app.background_done
        app.release.set()


@pytest.mark.parametrize("variant", ["lean", "lean-h11", "hypercorn"])
async def test_request_deadline_cancels_each_late_request_and_the_connection_lives_on(
    variant: str,
) -> None:
    options: dict[str, Any] = {"transport": "hypercorn" if variant == "hypercorn" else "lean"}
    if variant == "lean-h11":
        options["http"] = "h11"
    app = BoundsApp()
    async with (
        running_server(app, request_timeout=0.3, **options) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        for _ in range(3):
            response = await client.get("/forever")
            assert response.status_code == 504
            assert response.json()["error"]["type"] == "RequestTimeout"
        assert (await client.get("/")).text == "hello"
        assert app.ended["/forever"] == ["Cancelled"] * 3
        assert app.child == ["Cancelled"] * 3
