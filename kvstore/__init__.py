"""etcd v3 access for pyoverlay: the client, the key layout, typed records and the embedded etcd.

The etcd client (etcd3 and gRPC, slow to import) loads on first use of its name, so that `pyoverlay serve`
binds its socket without waiting for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvstore.base import KV, Compacted, Store, StoreError, StoreUnavailable, Txn, WatchEvent
from kvstore.config import EtcdConfig
from kvstore.keys import Keys

if TYPE_CHECKING:
    from kvstore.client import KVStore
    from kvstore.memory import MemoryStore

_LAZY = {"KVStore": "kvstore.client", "MemoryStore": "kvstore.memory"}

__all__ = [
    "KV", "Compacted", "EtcdConfig", "KVStore", "Keys", "MemoryStore", "Store", "StoreError", "StoreUnavailable",
    "Txn", "WatchEvent",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
