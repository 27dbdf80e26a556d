"""etcd v3 access for pyoverlay: the client, the key layout, typed records and the embedded etcd."""

from kvstore.client import KV, Compacted, EtcdConfig, KVStore, StoreError, StoreUnavailable, Txn, WatchEvent
from kvstore.keys import Keys

__all__ = [
    "KV", "Compacted", "EtcdConfig", "KVStore", "Keys", "StoreError", "StoreUnavailable", "Txn", "WatchEvent",
]
