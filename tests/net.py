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
