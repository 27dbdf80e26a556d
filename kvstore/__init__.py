"""etcd v3 access for pyoverlay: the client, the key layout, typed records and the embedded etcd.

The client (etcd3 and gRPC, slow to import) loads on first use of one of its names, so that `pyoverlay serve`
binds its socket without waiting for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvstore.config import EtcdConfig
from kvstore.keys import Keys

if TYPE_CHECKING:
    from kvstore.client import KV, Compacted, KVStore, StoreError, StoreUnavailable, Txn, WatchEvent

_CLIENT = {"KV", "Compacted", "KVStore", "StoreError", "StoreUnavailable", "Txn", "WatchEvent"}

__all__ = [
    "KV", "Compacted", "EtcdConfig", "KVStore", "Keys", "StoreError", "StoreUnavailable", "Txn", "WatchEvent",
]


def __getattr__(name: str) -> Any:
    if name in _CLIENT:
        from kvstore import client

        return getattr(client, name)
    raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
