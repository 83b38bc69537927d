"""Small HTTP and socket helpers the tests share (clients only, loopback only)."""

from __future__ import annotations

import httpx
import trio


async def get(url: str, timeout: float = 10.0) -> httpx.Response:
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await client.get(url)


async def aborted(url: str) -> None:
    """The request must end without a success: a cut connection or a 5xx."""
    try:
        response = await get(url)
    except httpx.HTTPError:
        return
    assert response.status_code >= 500, response


async def connection_refused(port: int) -> bool:
    with trio.socket.socket() as sock:
        try:
            await sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:
            return False  # the listener closed during this handshake
    return False


async def wait_refused(port: int, timeout: float) -> None:
    """Return once connecting to ``port`` is refused; fail after ``timeout``."""
    with trio.fail_after(timeout):
        while not await connection_refused(port):
            await trio.sleep(0.002)


async def open_request(port: int, extra: bytes = b"") -> tuple[trio.SocketStream, bytes]:
    """Send ``GET /`` on a new connection; return the stream and the whole response."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET / HTTP/1.1\r\nhost: t\r\n" + extra + b"\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += await stream.receive_some(65536)
    return stream, head + b"\r\n\r\n" + body


async def wait_eof(stream: trio.SocketStream) -> None:
    """Read until the server closes the connection, then close our end."""
    async with stream:
        while await stream.receive_some(65536):
            pass
