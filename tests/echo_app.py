"""An app that answers with what it was told: client, scheme, host, root_path.

Importable as ``tests.echo_app:app``; ``VERSION`` is rewritten by the --reload test
in a copy of this file.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from examples.bare_asgi import respond

VERSION = "v1"

Message = MutableMapping[str, Any]


async def app(
    scope: Message,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] != "http":
        return
    headers = dict(scope["headers"])
    body = json.dumps(
        {
            "client": list(scope["client"]) if scope.get("client") else None,
            "scheme": scope["scheme"],
            "host": headers.get(b"host", b"").decode(),
            "root_path": scope.get("root_path", ""),
            "path": scope["path"],
            "version": VERSION,
        }
    ).encode()
    await respond(send, body, b"application/json")
