"""Proxy headers: the client's address and scheme as a trusted proxy saw them.

Behind a reverse proxy every connection comes from the proxy, over plain
HTTP. The proxy says who the client was in ``X-Forwarded-For``, which scheme
it used in ``X-Forwarded-Proto`` and which host it asked for in
``X-Forwarded-Host``. Anybody can send those headers, so they are believed
only when the connection's peer is a trusted proxy (``forwarded_allow_ips``,
``127.0.0.1`` by default as in uvicorn; ``*`` trusts every peer, which is
also what a proxy on a Unix socket needs, as it has no address).

What changes, for trusted peers only:

* ``X-Forwarded-For: client, proxy1, proxy2``: the scope's ``client`` becomes
  the right-most address that is not itself a trusted proxy (a client cannot
  forge the hops our own proxies appended);
* ``X-Forwarded-Proto``: the scope's ``scheme`` (``ws``/``wss`` for WebSockets);
* ``X-Forwarded-Host``: the ``host`` header the app sees.

The scope is changed in place, so the access line names the forwarded client too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from ._asgi import ASGIApp, Receive, Scope, Send

DEFAULT_FORWARDED_ALLOW_IPS = ("127.0.0.1",)
_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}


def parse_trusted(values: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Addresses and networks (``10.0.0.0/8``) of trusted proxies; ValueError if bad.

    ``*`` is handled by the caller.
    """
    networks = []
    for value in values:
        value = value.strip()
        if value and value != "*":
            networks.append(ipaddress.ip_network(value, strict=False))
    return networks


class ProxyHeadersMiddleware:
    """Rewrite ``client``, ``scheme`` and ``host`` from trusted proxies' headers.

    Args:
        app: the ASGI app to wrap.
        trusted: addresses or networks of trusted proxies, or ``*`` for all.
    """

    def __init__(self, app: ASGIApp, trusted: Sequence[str] = DEFAULT_FORWARDED_ALLOW_IPS) -> None:
        self.app = app
        self.trust_all = any(value.strip() == "*" for value in trusted)
        self.networks = parse_trusted(trusted)

    def is_trusted(self, host: str | None) -> bool:
        if self.trust_all:
            return True
        if not host:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            if self.is_trusted(client[0] if client else None):
                self._rewrite(scope)
        await self.app(scope, receive, send)

    def _rewrite(self, scope: Scope) -> None:
        forwarded: dict[bytes, str] = {}
        for name, value in scope.get("headers") or ():
            if name in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"):
                forwarded[name] = value.decode("latin-1")
        if not forwarded:
            return
        # In place, as uvicorn does: the protocol that writes the access line (client,
        # scheme) holds this very scope.
        proto = forwarded.get(b"x-forwarded-proto", "").rsplit(",", 1)[-1].strip().lower()
        if proto in _SCHEMES:
            secure = _SCHEMES[proto] == "https"
            if scope["type"] == "websocket":
                scope["scheme"] = "wss" if secure else "ws"
            else:
                scope["scheme"] = "https" if secure else "http"
        hops = [hop.strip() for hop in forwarded.get(b"x-forwarded-for", "").split(",")]
        hops = [hop for hop in hops if hop]
        if hops:
            client = next((hop for hop in reversed(hops) if not self.is_trusted(hop)), hops[0])
            scope["client"] = (client, 0)
        host = forwarded.get(b"x-forwarded-host", "").rsplit(",", 1)[-1].strip()
        if host:
            headers = [(n, v) for n, v in scope["headers"] if n != b"host"]
            scope["headers"] = [(b"host", host.encode("latin-1")), *headers]
