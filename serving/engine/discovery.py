"""Where a pool's workers are: a static list, or a DNS name resolved again and again.

A Kubernetes headless service (``clusterIP: None``) answers DNS with one address per
ready pod, so re-resolving its name is how a pool follows pods as they come, go and
move; the same works for any DNS round-robin name.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> the IP addresses the name has now."""


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses of ``host`` from the system resolver (A and AAAA records)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class DnsDiscovery:
    """The workers behind one DNS name, e.g. ``http://trtllm.models.svc.cluster.local:8000``.

    Args:
        url: base URL whose host is resolved; each address becomes a worker with the same
            scheme, port and path.
        resolver: the resolver (tests pass a fake).
    """

    def __init__(self, url: str, *, resolver: Resolver = system_resolver) -> None:
        parts = urlsplit(url.rstrip("/"))
        if not parts.hostname:
            raise ValueError(f"discovery URL {url!r} has no host name")
        self._parts = parts
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._resolver = resolver
        self.last: list[str] = []

    async def __call__(self) -> list[str]:
        """The worker URLs now; the previous answer when resolution fails (a DNS blip must not empty the pool)."""
        try:
            addresses = await self._resolver(self._host, self._port)
        except OSError as exc:
            logger.warning("resolving %s failed (%s); keeping %d workers", self._host, exc, len(self.last))
            return self.last
        urls = [self._url_for(a) for a in addresses]
        if urls != self.last:
            logger.info("%s resolves to %s", self._host, ", ".join(urls) or "nothing")
        self.last = urls
        return urls

    def _url_for(self, address: str) -> str:
        host = f"[{address}]" if ":" in address else address
        return urlunsplit((self._parts.scheme, f"{host}:{self._port}", self._parts.path, "", ""))


def static_members(urls: Sequence[str]) -> Callable[[], Awaitable[list[str]]]:
    """A discovery function that always answers ``urls``."""
    members = [u.rstrip("/") for u in urls]

    async def members_now() -> list[str]:
        return members

    return members_now
