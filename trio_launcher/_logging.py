"""One log format for runner lines and access lines, and the request id they share.

Before, one stream mixed two timestamp formats: the runner's lines came from
``logging.basicConfig`` (local time, comma milliseconds) and hypercorn's
access lines from its own formatter with ``%(t)s`` (``[02/Dec/2026:...]``).
Here one formatter serves both, in two shapes (``--log-format``):

* ``text``, for a person at a terminal::

    2026-12-02T03:04:05.678Z INFO [4242] trio_launcher: serving on http://127.0.0.1:8000
    2026-12-02T03:04:06.001Z INFO [4242] hypercorn.access: 127.0.0.1:51234 "GET /v1/models
    HTTP/1.1" 200 48 1.2ms id=5f0c9a2b1e7d-17   (one line)

* ``json``, one object per line: ``time``, ``level``, ``logger``, ``message``
  (and ``exception`` with the traceback when there is one), plus for access
  lines ``method``, ``path``, ``query``, ``status``, ``bytes`` (the response's
  Content-Length, null when streamed), ``duration_ms``, ``request_id`` and
  ``client``.

Times are ISO 8601 in UTC with milliseconds and a ``Z``. Access lines are
recognised by what hypercorn passes: its access logger calls
``logger.info(access_log_format, atoms)`` with a mapping of atoms (``m``,
``U``, ``s``, ``D``, ``{x-request-id}o``...), so any protocol that logs through
``config.log.access(scope, response, request_time)`` gets the same lines. A
custom ``access_log_format`` (hypercorn's TOML setting) is honoured in the
text shape.

**Request ids.** An incoming ``X-Request-Id`` of 1 to 128 visible ASCII
characters is kept; anything else is replaced by a new one: a random prefix
per process and a counter (``5f0c9a2b1e7d-17``), unique across workers and
restarts and far cheaper than a uuid. The id is echoed in the response,
written in the access line (from the response header) and given to the app
as ``scope["state"]["request_id"]`` (Starlette: ``request.state.request_id``;
Quart: ``request.scope["state"]["request_id"]``). Both HTTP/1.1 protocols and
hypercorn's HTTP/2 give each request (each stream) a shallow copy of the
lifespan state, so the id is written into that copy in place; the lifespan's
own dict is never touched (``tests/test_logging.py`` checks both).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import operator
import secrets
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from ._hypercorn import Config

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
REQUEST_ID_HEADER = b"x-request-id"
HEADER_EXTENSION = "trio_launcher.response_header"
"""A scope extension the runner sets for a protocol that offers ``REQUEST_ID_EXTENSION``:
the request id's whole header line (``b"x-request-id: ...\\r\\n"``), for the protocol
to write into the response head itself, with the app's headers. The runner's id is
already valid, and one header less in the app's list to check costs a hello-world
request about 2 % less (:func:`header_value` gives back the value)."""
REQUEST_ID_EXTENSION = "trio_launcher.request_id"
"""A scope extension a protocol puts in each request's extensions when it writes the
line of ``HEADER_EXTENSION`` itself (``_http1`` does): the request's own
``X-Request-Id`` value (the first one), ``b""`` if it has none. Its header loop sees
the name anyway, so the runner need not scan the headers again. Such a protocol gives
every request a ``scope["state"]`` dict of its own."""
ID_BATCH = 100  # new ids formatted together (the two digits of ``_ENDINGS``)
_ENDINGS = tuple(f"{n:02d}" for n in range(ID_BATCH))
_LINE_ENDINGS = tuple(b"%02d\r\n" % n for n in range(ID_BATCH))
_VISIBLE = bytes(range(0x21, 0x7F))  # what a request id is made of
_ACCESS_ID_ATOM = "{x-request-id}o"
_VALUE_AT = len(REQUEST_ID_HEADER) + 2  # b"x-request-id: "


class RequestIds:
    """Keeps a valid incoming ``X-Request-Id`` or makes a new one.

    ``next(ids.new)`` makes one: ``(id, its header line)``. The counter is never
    formatted per id: a batch of ``ID_BATCH`` ids shares its leading digits, and
    each id and line is one concatenation with a two-digit ending made once, all
    in C (``itertools.chain`` asks :meth:`_batch` for the next batch, lazily).
    A new id then costs a request about 1.5k instructions, where an f-string
    and ``encode`` in a method cost 2.3k and the header line 1k more.
    """

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(6) + "-"  # the process's own
        self._line = b"%s: %s" % (REQUEST_ID_HEADER, self.prefix.encode())
        self.new: Iterator[tuple[str, bytes]] = itertools.chain.from_iterable(
            map(self._batch, itertools.count())
        )

    def _batch(self, k: int) -> Iterator[tuple[str, bytes]]:
        """Ids ``100 k`` to ``100 k + 99`` (1 to 99 for k = 0), with their lines."""
        prefix, line = self.prefix, self._line
        if k == 0:
            numbers = [str(n) for n in range(1, ID_BATCH)]
            return zip(
                [prefix + n for n in numbers],
                [b"%s%s\r\n" % (line, n.encode()) for n in numbers],
                strict=True,
            )
        return zip(
            map(operator.add, itertools.repeat(f"{prefix}{k}"), _ENDINGS),
            map(operator.add, itertools.repeat(b"%s%d" % (line, k)), _LINE_ENDINGS),
            strict=True,
        )

    def assign(self, scope: Any) -> tuple[bytes, bytes]:
        """Set ``scope["state"]["request_id"]`` from the request's headers; the header
        to echo, ``(name, value)``."""
        for name, incoming in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                return (REQUEST_ID_HEADER, header_value(self.keep_or_make(incoming, scope)))
        return (REQUEST_ID_HEADER, header_value(self.keep_or_make(b"", scope)))

    def keep_or_make(self, incoming: bytes, scope: Any) -> bytes:
        """Keep the request's own id ``incoming`` (``b""``: none) if valid, or make one;
        set ``scope["state"]["request_id"]``; the header line to echo.

        The state dict is the server's per-request copy (ASGI: the server copies
        the lifespan state for each request), so it is written in place."""
        if incoming and len(incoming) <= 128 and not incoming.translate(None, _VISIBLE):
            text = incoming.decode()
            line = b"%s: %s\r\n" % (REQUEST_ID_HEADER, incoming)
        else:
            text, line = next(self.new)
        state = scope.get("state")
        if state is None:
            scope["state"] = {"request_id": text}
        else:
            state["request_id"] = text  # the server's copy for this request (ASGI lifespan state)
        # (HTTP/2: never indexed by HPACK, see ``_transport.NEVER_INDEXED``.)
        return line


def header_value(line: bytes) -> bytes:
    """The value of a request id's header line (``HEADER_EXTENSION``)."""
    return line[_VALUE_AT:-2]


def iso_time(created: float) -> str:
    """``2026-12-02T03:04:05.678Z``: ISO 8601, UTC, milliseconds."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _atoms(record: logging.LogRecord) -> Mapping[str, Any] | None:
    args = record.args
    if isinstance(args, Mapping) and "m" in args and "s" in args and "D" in args:
        return args
    return None


class _PlainGet(Mapping[str, Any]):
    __slots__ = ("_d",)

    def __init__(self, d: dict[str, Any]) -> None:
        self._d = d

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self._d, key, default)

    def __getitem__(self, key: str) -> Any:
        return dict.__getitem__(self._d, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


def access_fields(atoms: Mapping[str, Any]) -> dict[str, Any]:
    """The access line's fields from hypercorn's atoms."""
    # dict.get: hypercorn's atoms answer "-" for a missing key through [].
    values: Mapping[str, Any] = _PlainGet(atoms) if isinstance(atoms, dict) else atoms
    status, size = values.get("s"), values.get("b")
    return {
        "method": values.get("m"),
        "path": values.get("U"),
        "query": values.get("q") or None,
        "status": int(status) if isinstance(status, str) and status.isdigit() else None,
        "bytes": int(size) if isinstance(size, str) and size.isdigit() else None,
        "duration_ms": round(int(values.get("D") or 0) / 1000, 3),
        "request_id": values.get(_ACCESS_ID_ATOM),
        "client": values.get("h"),
        "protocol": values.get("H"),
    }


def _access_text(record: logging.LogRecord, fields: dict[str, Any]) -> str:
    if record.msg != Config.access_log_format:
        return record.getMessage()  # the user's own access_log_format
    target = fields["path"] + (f"?{fields['query']}" if fields["query"] else "")
    size = "-" if fields["bytes"] is None else fields["bytes"]
    line = (
        f'{fields["client"] or "-"} "{fields["method"]} {target} HTTP/{fields["protocol"]}" '
        f"{fields['status'] or '-'} {size} {fields['duration_ms']:.1f}ms"
    )
    if fields["request_id"]:
        line += f" id={fields['request_id']}"
    return line


class TextFormatter(logging.Formatter):
    """``TIME LEVEL [PID] LOGGER: MESSAGE``, access lines rebuilt from their atoms."""

    def format(self, record: logging.LogRecord) -> str:
        atoms = _atoms(record)
        message = (
            record.getMessage() if atoms is None else _access_text(record, access_fields(atoms))
        )
        stamp = iso_time(record.created)
        line = f"{stamp} {record.levelname} [{record.process}] {record.name}: {message}"
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        atoms = _atoms(record)
        data: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
        }
        if atoms is None:
            data["message"] = record.getMessage()
        else:
            fields = access_fields(atoms)
            data["message"] = _access_text(record, fields)
            data.update(fields)
        data["pid"] = record.process
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            data["exception"] = record.exc_text
        return json.dumps(data, default=str)


def formatter(log_format: LogFormat) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    return TextFormatter()


def configure(level: str, log_format: LogFormat = "text") -> None:
    """The CLI's logging: runner lines to stderr in ``log_format`` (like
    ``logging.basicConfig``, it leaves a root logger that has handlers alone)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def format_access_log(config: Config, log_format: LogFormat) -> None:
    """Give the handlers hypercorn made for ``config.accesslog`` our formatter."""
    if not config.accesslog or isinstance(config.accesslog, logging.Logger):
        return
    logger = config.log.access_logger
    if logger is not None:
        for handler in logger.handlers:
            handler.setFormatter(formatter(log_format))


class _ExcludePaths(logging.Filter):
    """Drops the access lines of some paths (``access_log_exclude``)."""

    def __init__(self, paths: Sequence[str]) -> None:
        super().__init__()
        self.paths = frozenset(paths)

    def filter(self, record: logging.LogRecord) -> bool:
        atoms = record.args
        return not (isinstance(atoms, Mapping) and atoms.get("U") in self.paths)


@contextlib.contextmanager
def logger_filter(logger: logging.Logger | None, log_filter: logging.Filter) -> Iterator[None]:
    """``log_filter`` on ``logger`` (if any) for the block's life only: filters
    are scoped to a server, never left on a logger other code shares."""
    if logger is None:
        yield
        return
    logger.addFilter(log_filter)
    try:
        yield
    finally:
        logger.removeFilter(log_filter)


def access_log_filter(
    config: Config, paths: Sequence[str]
) -> contextlib.AbstractContextManager[None]:
    """Leave ``paths`` out of ``config``'s access log while the block runs."""
    return logger_filter(config.log.access_logger if paths else None, _ExcludePaths(paths))
