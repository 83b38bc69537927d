"""A worker of ``--workers``: its command line, its role, what it tells the parent.

The parent (``_workers.py``, where the reasoning is) starts each worker with
a command line built here from the parsed options, never by editing argv
text: every option whose value differs from its default is written out again
under its canonical long name, except the supervisor's own (``--workers``,
``--bind``, recycling), and ``--bind fd://N`` is added for each inherited
socket. Flags added later need no code here.

A worker is marked by its environment: the read end of its order pipe
(``ORDERS_ENV``) and its request budget (``MAX_REQUESTS_ENV``).
:func:`take_worker_role` takes both out of the environment, so that the
app's own subprocesses are not workers. What a worker reports goes to the
parent's private notify socket (``NOTIFY_SOCKET`` in a worker):
``RETIRE=1`` and ``CUT=N``.
"""

from __future__ import annotations

import argparse
import logging
import os

from ._errors import ConfigError
from ._ports import BoundSockets
from ._systemd import notify

log = logging.getLogger("trio_launcher")

ORDERS_ENV = "TRIO_LAUNCHER_LIFELINE"
"""Set in a worker's environment: the read end of its order pipe. Marks a worker."""
MAX_REQUESTS_ENV = "TRIO_LAUNCHER_MAX_REQUESTS"
"""Set in a worker's environment: after this many requests, ask to be retired."""

SUPERVISOR_ONLY = frozenset(
    {
        "workers",
        "bind",
        "max_requests",
        "max_requests_jitter",
        "worker_max_rss",
        "worker_lifetime",
        "metrics_bind",  # the parent's listener adds up every worker's numbers
        # uvicorn-style spellings of an address, should they come: the parent binds.
        "host",
        "port",
        "uds",
        "fd",
    }
)
"""Option destinations the parent keeps for itself; a worker never sees them."""


# --- the worker's command line ------------------------------------------------


def worker_argv(
    parser: argparse.ArgumentParser,
    opts: argparse.Namespace,
    sockets: BoundSockets,
    executable: str,
) -> list[str]:
    """The worker's command line, from the parser's actions and the parsed options.

    Raises:
        ConfigError: a value that would not read back the same in the worker.
    """
    options: list[str] = []
    positionals: list[str] = []
    for action in parser._actions:
        if action.dest in SUPERVISOR_ONLY or action.default == argparse.SUPPRESS:
            continue
        value = getattr(opts, action.dest, action.default)
        if not action.option_strings:
            positionals += [_text(action, v) for v in _as_list(value)]
            continue
        flag = _canonical(action)
        if isinstance(action, argparse.BooleanOptionalAction):
            if value is not None and value != action.default:
                options.append(flag if value else "--no-" + flag[2:])
        elif action.nargs == 0:
            if isinstance(action, argparse._CountAction):
                options += [flag] * ((value or 0) - (action.default or 0))
            elif value != action.default:
                options.append(flag)
        elif isinstance(action, argparse._AppendAction):
            already = len(action.default or [])
            options += [f"{flag}={_text(action, v)}" for v in (value or [])[already:]]
        elif value != action.default and value is not None:
            if action.nargs is None or action.nargs == argparse.OPTIONAL:
                options.append(f"{flag}={_text(action, value)}")
            else:
                options += [flag, *(_text(action, v) for v in _as_list(value))]
    binds = [f"--bind=fd://{sock.fileno()}" for sock in sockets.all()]
    return [executable, "-m", "trio_launcher", *options, *binds, "--", *positionals]


def _canonical(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return longs[0] if longs else action.option_strings[0]


def _as_list(value: object) -> list[object]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _text(action: argparse.Action, value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if not isinstance(value, str) and callable(action.type):
        try:
            same = action.type(text) == value
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            same = False
        if not same:
            flag = _canonical(action) if action.option_strings else action.dest
            raise ConfigError(f"{flag}: {value!r} cannot be passed on to the workers")
    return text


# --- the worker's side --------------------------------------------------------


_role: dict[str, int | None] = {}


def take_worker_role() -> int | None:
    """In a worker: the read end of the order pipe (None in any other process).

    Takes the variables out of the environment: the app's own subprocesses
    are not workers.
    """
    if "orders" not in _role:
        orders = os.environ.pop(ORDERS_ENV, None)
        max_requests = os.environ.pop(MAX_REQUESTS_ENV, None)
        _role["orders"] = int(orders) if orders else None
        _role["max_requests"] = int(max_requests) if orders and max_requests else None
    return _role["orders"]


def is_worker() -> bool:
    """True in a process started by the supervisor."""
    return take_worker_role() is not None


def worker_max_requests() -> int | None:
    """In a worker: the request count after which to ask for retirement, if any."""
    take_worker_role()
    return _role["max_requests"]


def ask_to_retire() -> None:
    """In a worker: ``--max-requests`` reached; the parent replaces us, then we drain."""
    log.info("max_requests reached: asking the parent process for a replacement")
    notify("RETIRE=1")


def report_cut_requests(count: int) -> None:
    """In a worker: our drain cut ``count`` requests at graceful_timeout; tell the parent.

    The worker's CLI calls this after serve_http returns.
    """
    if count > 0 and is_worker():
        notify(f"CUT={count}")
