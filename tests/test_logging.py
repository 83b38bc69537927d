"""Request ids (response, scope, access log) and the one log format (text and JSON)."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.logging import AccessLogAtoms

from trio_launcher._logging import ID_BATCH, JsonFormatter, RequestIds, TextFormatter, iso_time
from trio_launcher.testing import TLSFiles, running_server

from .apps import Receive, Send, respond
from .proc import LOOPBACK, launch, served

GENERATED = re.compile(r"^[0-9a-f]{12}-\d+$")
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


class StateApp:
    """Answers with the request id the app sees in ``scope["state"]``; ``/slow``
    sleeps first (so that HTTP/2 streams overlap). Its lifespan puts ``model``
    in the state."""

    def __init__(self) -> None:
        self.lifespan_state: dict[str, Any] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.lifespan_state = scope["state"]
                    scope["state"]["model"] = "tiny"
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        state = scope["state"]
        if scope["path"] == "/slow":
            await trio.sleep(0.05)
        body = json.dumps({"id": state.get("request_id"), "model": state.get("model")})
        await respond(send, 200, body.encode())


async def test_an_id_is_made_echoed_and_given_to_the_app() -> None:
    app = StateApp()
    async with running_server(app) as server:
        first = await server.client.get("/")
        second = await server.client.get("/")
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert all(GENERATED.match(i) for i in ids), ids
    assert ids[0] != ids[1]
    assert [first.json()["id"], second.json()["id"]] == ids
    # The lifespan state is there, and the lifespan's own dict was never written to.
    assert first.json()["model"] == "tiny"
    assert app.lifespan_state == {"model": "tiny"}


@pytest.mark.parametrize(
    "variant",
    [{"transport": "lean"}, {"transport": "lean", "http": "h11"}, {"transport": "hypercorn"}],
    ids=["lean-httptools", "lean-h11", "stock-hypercorn"],
)
async def test_every_http1_protocol_echoes_the_id_and_logs_it(
    variant: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The lean HTTP/1.1 protocol writes the id's line itself (``HEADER_EXTENSION``);
    the others get it in the app's headers. Response, state and access line agree."""
    config = Config()
    config.accesslog = logging.getLogger("test.access")
    caplog.set_level(logging.INFO, logger="test.access")
    async with running_server(StateApp(), config, **variant) as server:
        responses = [await server.client.get("/"), await server.client.head("/")]
        incoming = await server.client.get("/", headers={"x-request-id": "mine"})
    echoed = [r.headers["x-request-id"] for r in responses]
    assert all(GENERATED.match(i) for i in echoed) and echoed[0] != echoed[1]
    assert responses[0].json()["id"] == echoed[0]
    assert (incoming.headers["x-request-id"], incoming.json()["id"]) == ("mine", "mine")
    assert list(incoming.headers.keys()).count("x-request-id") == 1
    atoms = [r.args for r in caplog.records if r.name == "test.access"]
    # (hypercorn's own connection sometimes logs the request after a HEAD twice, first
    # as if its client had gone: status 499; only the answered lines are compared.)
    answered = [a for a in atoms if isinstance(a, AccessLogAtoms) and a["s"] == "200"]
    assert [a["{x-request-id}o"] for a in answered] == [
        *echoed,
        "mine",
    ]


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [
        ("client-id-42", True),
        ("x" * 128, True),
        ("!~#" * 5, True),
        ("x" * 129, False),
        ("has space", False),
        ("tab\there", False),
    ],
)
async def test_an_incoming_id_is_kept_only_if_valid(incoming: str, kept: bool) -> None:
    async with running_server(StateApp()) as server:
        response = await server.client.get("/", headers={"x-request-id": incoming})
    echoed = response.headers["x-request-id"]
    assert (echoed == incoming) is kept
    if not kept:
        assert GENERATED.match(echoed)
    assert response.json()["id"] == echoed


async def test_an_incoming_id_is_kept_with_raw_header_names() -> None:
    """``h11_pass_raw_headers``: the request's header names keep their case."""
    config = Config()
    config.h11_pass_raw_headers = True
    async with running_server(StateApp(), config) as server:
        response = await server.client.get("/", headers=[(b"X-Request-Id", b"mine")])
    assert (response.headers["x-request-id"], response.json()["id"]) == ("mine", "mine")


async def test_non_ascii_id_is_replaced() -> None:
    async with running_server(StateApp()) as server:
        response = await server.client.get("/", headers=[(b"x-request-id", "café".encode())])
    assert GENERATED.match(response.headers["x-request-id"])


async def test_concurrent_http2_streams_each_keep_their_own_id(tls_files: TLSFiles) -> None:
    async with running_server(StateApp(), tls_files.config(), tls=tls_files, http2=True) as server:
        results: list[httpx.Response] = []

        async def one(i: int) -> None:
            results.append(
                await server.client.get("/slow", headers={"x-request-id": f"stream-{i}"})
            )

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
    assert {r.http_version for r in results} == {"HTTP/2"}
    assert sorted(r.json()["id"] for r in results) == sorted(f"stream-{i}" for i in range(8))
    assert all(r.json()["id"] == r.headers["x-request-id"] for r in results)


async def test_http2_ids_are_never_indexed_by_hpack() -> None:
    """A fresh id per response must not go into HPACK's dynamic table: it would evict
    the headers that repeat (date, server, content-type) and make every header search
    scan a table full of ids. hypercorn rebuilds the app's header tuples, so the flag
    has to be set at the encoder (the client's decoder table shows what was indexed)."""
    async with running_server(StateApp()) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        connection.initiate_connection()
        echoed: list[bytes] = []
        with trio.fail_after(10):
            for stream_id in range(1, 41, 2):
                connection.send_headers(
                    stream_id,
                    [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")],
                    end_stream=True,
                )
                await stream.send_all(connection.data_to_send())
                ended = False
                while not ended:
                    for event in connection.receive_data(await stream.receive_some(65536)):
                        if isinstance(event, h2.events.ResponseReceived):
                            echoed += [v for k, v in event.headers if k == b"x-request-id"]
                        ended = ended or isinstance(event, h2.events.StreamEnded)
                await stream.send_all(connection.data_to_send())
        await stream.aclose()
    assert len(set(echoed)) == 20
    indexed = [name for name, _ in connection.decoder.header_table.dynamic_entries]
    assert b"x-request-id" not in indexed
    assert b"date" in indexed  # the table itself works


def test_new_ids_count_up_across_batches() -> None:
    """New ids are made a batch at a time (``ID_BATCH``), each with its header line:
    they still count 1, 2, 3... after the prefix, and each line holds its own id."""
    ids = RequestIds()
    made = [next(ids.new) for _ in range(3 * ID_BATCH + 5)]
    assert [text for text, _ in made] == [f"{ids.prefix}{n}" for n in range(1, 3 * ID_BATCH + 6)]
    assert all(GENERATED.match(text) for text, _ in made)
    assert all(line == b"x-request-id: %s\r\n" % text.encode() for text, line in made)


async def test_request_ids_off() -> None:
    async with running_server(StateApp(), request_ids=False) as server:
        response = await server.client.get("/", headers={"x-request-id": "abc"})
    assert response.json()["id"] is None
    assert "x-request-id" not in response.headers


async def test_starlette_sees_it_as_request_state() -> None:
    applications = pytest.importorskip("starlette.applications")
    responses = pytest.importorskip("starlette.responses")
    routing = pytest.importorskip("starlette.routing")

    async def show(request: Any) -> Any:
        return responses.PlainTextResponse(request.state.request_id)

    app = applications.Starlette(routes=[routing.Route("/", show)])
    async with running_server(app) as server:
        response = await server.client.get("/", headers={"x-request-id": "abc"})
    assert response.text == "abc" == response.headers["x-request-id"]


async def test_quart_sees_it_in_the_request_scope() -> None:
    from quart import request
    from quart_trio import QuartTrio

    app = QuartTrio(__name__)

    @app.route("/")
    async def show() -> str:
        return str(request.scope["state"]["request_id"])

    async with running_server(app) as server:
        response = await server.client.get("/", headers={"x-request-id": "q-1"})
    assert response.text == "q-1" == response.headers["x-request-id"]


# --- formatters ------------------------------------------------------------------------


def access_record(request_id: str | None = "rid-1") -> logging.LogRecord:
    """A record exactly as hypercorn's access logger makes it."""
    scope: Any = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": "/v1/x",
        "query_string": b"a=1",
        "scheme": "http",
        "client": ("10.0.0.7", 5555),
        "headers": [(b"user-agent", b"t")],
    }
    headers = [(b"content-length", b"42")]
    if request_id is not None:
        headers.append((b"x-request-id", request_id.encode()))
    atoms = AccessLogAtoms(scope, {"status": 201, "headers": headers}, 0.0123456)
    return logging.LogRecord(
        "hypercorn.access", logging.INFO, __file__, 1, Config.access_log_format, (atoms,), None
    )


def test_json_access_line_has_every_field() -> None:
    data = json.loads(JsonFormatter().format(access_record()))
    assert re.fullmatch(ISO, data["time"])
    assert data["level"] == "INFO"
    assert data["logger"] == "hypercorn.access"
    assert data["method"] == "POST"
    assert data["path"] == "/v1/x"
    assert data["query"] == "a=1"
    assert data["status"] == 201
    assert data["bytes"] == 42
    assert data["duration_ms"] == 12.345
    assert data["request_id"] == "rid-1"
    assert data["client"] == "10.0.0.7:5555"
    assert data["message"] == '10.0.0.7:5555 "POST /v1/x?a=1 HTTP/1.1" 201 42 12.3ms id=rid-1'


def test_text_access_line() -> None:
    line = TextFormatter().format(access_record(None))
    assert re.fullmatch(
        ISO + r' INFO \[\d+\] hypercorn.access: 10.0.0.7:5555 "POST /v1/x\?a=1 HTTP/1.1" '
        r"201 42 12.3ms",
        line,
    ), line


def test_a_custom_access_log_format_is_honoured() -> None:
    record = access_record()
    record.msg = "%(s)s %({x-request-id}o)s"
    assert TextFormatter().format(record).endswith("hypercorn.access: 201 rid-1")


def test_runner_lines_and_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "trio_launcher", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info()
        )
    data = json.loads(JsonFormatter().format(record))
    assert data["message"] == "failed x"
    assert data["level"] == "ERROR"
    assert "ValueError: boom" in data["exception"]
    assert "method" not in data
    text = TextFormatter().format(record)
    assert re.match(ISO + r" ERROR \[\d+\] trio_launcher: failed x\nTraceback", text)
    assert text.rstrip().endswith("ValueError: boom")


def test_iso_time_is_utc() -> None:
    assert iso_time(0.5) == "1970-01-01T00:00:00.500Z"
    assert iso_time(1764644645.1239) == "2025-12-02T03:04:05.123Z"


# --- the CLI: one stream, one format ---------------------------------------------------


async def read_lines(path: Path, count: int) -> list[str]:
    with trio.fail_after(10):
        while True:
            file = trio.Path(path)
            lines = (await file.read_text()).splitlines() if await file.exists() else []
            if len(lines) >= count:
                return lines
            await trio.sleep(0.02)


async def test_cli_json_lines_for_runner_and_access(tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    args = served("tests.apps:app", log_format="json", access_log=access)
    async with launch(args, wait_serving=False) as proc:
        line = await proc.wait_for_line(r'"message": "serving on ')
        url = json.loads(line)["message"].split()[-1]
        async with httpx.AsyncClient() as client:
            response = await client.get(url + "/?q=1", headers={"x-request-id": "from-lb-7"})
            generated = (await client.get(url + "/")).headers["x-request-id"]
        assert response.headers["x-request-id"] == "from-lb-7"
        lines = await read_lines(access, 2)
        proc.signal(2)
        assert await proc.wait() == 0
    first, second = (json.loads(x) for x in lines)
    assert first["request_id"] == "from-lb-7"
    assert second["request_id"] == generated
    assert (first["method"], first["path"], first["query"], first["status"], first["bytes"]) == (
        "GET",
        "/",
        "q=1",
        200,
        5,
    )
    assert first["client"].startswith("127.0.0.1:")
    assert first["duration_ms"] >= 0
    # Every stderr line is one JSON object with an ISO 8601 UTC time.
    runner = [json.loads(x) for x in proc.lines if x.strip()]
    assert runner and all(re.fullmatch(ISO, r["time"]) for r in runner)
    assert {r["logger"] for r in runner} >= {"trio_launcher"}


async def test_with_proxy_headers_the_access_line_names_the_forwarded_client(
    tmp_path: Path,
) -> None:
    """Behind a trusted proxy the app saw the client of ``X-Forwarded-For``, but the
    access line named the proxy: the rewrite went to a copy of the scope that the
    protocol, which writes the line, never saw. uvicorn logs the forwarded client."""
    access = tmp_path / "access.log"
    args = served("tests.apps:app", log_format="json", access_log=access, proxy_headers=True)
    async with launch(args, wait_serving=False) as proc:
        line = await proc.wait_for_line(r'"message": "serving on ')
        url = json.loads(line)["message"].split()[-1]
        async with httpx.AsyncClient() as client:
            forwarded = {"x-forwarded-for": "203.0.113.7", "x-forwarded-proto": "https"}
            assert (await client.get(url, headers=forwarded)).status_code == 200
            assert (await client.get(url)).status_code == 200
        lines = await read_lines(access, 2)
        proc.signal(2)
        assert await proc.wait() == 0
    first, second = (json.loads(x) for x in lines)
    assert first["client"].startswith("203.0.113.7:")
    assert second["client"].startswith("127.0.0.1:")


async def test_cli_text_lines_share_one_timestamp_format(tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    args = ["tests.apps:app", *LOOPBACK, "--access-log", str(access)]
    async with launch(args) as proc:
        async with httpx.AsyncClient() as client:
            await client.get(proc.url + "/", headers={"x-request-id": "r1"})
        (line,) = await read_lines(access, 1)
        proc.signal(2)
        assert await proc.wait() == 0
    assert re.fullmatch(
        ISO
        + r' INFO \[\d+\] hypercorn.access: 127.0.0.1:\d+ "GET / HTTP/1.1" 200 5 [\d.]+ms id=r1',
        line,
    ), line
    starts = [x for x in proc.lines if x and not x.startswith(" ")]
    assert starts and all(re.match(ISO + r" [A-Z]+ \[\d+\] ", x) for x in starts), starts
