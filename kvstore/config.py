"""How to reach etcd: a plain dataclass, importable without the gRPC client (the plugin's start path needs it
before its socket is bound, and loading etcd3/gRPC takes a while)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: Sequence[str]
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password: str | None = None
    timeout: float = 2.0
