"""How to reach etcd: a plain dataclass, importable without the gRPC client (the plugin's start path needs it
before its socket is bound, and loading etcd3/gRPC takes a while)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from kvstore.base import StoreError


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: Sequence[str]
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password: str | None = None
    timeout: float = 2.0

    def member(self, endpoint: str) -> tuple[str, int, bool]:
        """Host, port and whether TLS is used for a host:port or http(s):// endpoint: how both the gRPC client
        and the JSON gateway's watches reach it."""
        url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        if not url.hostname:
            raise StoreError(f"bad etcd endpoint {endpoint!r}")
        return url.hostname, url.port or 2379, url.scheme == "https" or self.cacert is not None
