"""What pyoverlay needs from a key-value store, independent of etcd: the types, the errors, transactions as
plain data, and the `Store` interface that kvstore.client (etcd v3) and kvstore.memory (an in-memory fake with
the same transaction semantics, for fast tests) both implement.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

log = logging.getLogger(__name__)


class StoreError(Exception):
    """Base class of everything kvstore raises."""


class StoreUnavailable(StoreError):
    """The store could not be reached within the timeout (on any endpoint)."""


class Compacted(StoreError):
    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted (oldest available {revision})")
        self.revision = revision


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int


@dataclass
class WatchEvent:
    kind: str  # "put" | "delete"
    key: str
    value: bytes
    mod_revision: int


class WatchAnswer(NamedTuple):
    """One answer of an etcd watch stream, whichever way it was read (gRPC, or the JSON gateway)."""
    events: list[WatchEvent]
    revision: int            # the header's: etcd's revision when it answered
    created: bool
    compact_revision: int    # non-zero: the revision asked for was compacted
    canceled: bool
    cancel_reason: str


@dataclass(frozen=True)
class Compare:
    """key's version (0: absent) or mod revision equals value."""

    key: str
    target: str  # "version" | "mod"
    value: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int | None = None


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False  # every key that starts with key


def _raw(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


@dataclass
class Txn:
    """A transaction under construction: all comparisons hold -> every operation runs, in one revision."""

    compare: list[Compare] = field(default_factory=list)
    success: list[Put | Delete] = field(default_factory=list)

    def absent(self, key: str) -> Txn:
        self.compare.append(Compare(key, "version", 0))
        return self

    def unchanged(self, key: str, mod_revision: int) -> Txn:
        self.compare.append(Compare(key, "mod", mod_revision))
        return self

    def put(self, key: str, value: bytes | str, lease: int | None = None) -> Txn:
        self.success.append(Put(key, _raw(value), lease))
        return self

    def delete(self, key: str) -> Txn:
        self.success.append(Delete(key))
        return self

    def delete_prefix(self, prefix: str) -> Txn:
        self.success.append(Delete(prefix, prefix=True))
        return self


class Watch(Protocol):
    """A prefix followed in the background: on_snapshot once (and again after a compaction), then on_events."""

    synced: threading.Event

    def stop(self) -> None: ...


class SnapshotFirst:
    """What both stores' prefix watches share: a fresh snapshot whenever the next revision is unknown
    (at the start, and after a compaction took the revisions the watch still needed)."""

    store: Store
    prefix: str
    revision: int          # next revision to receive; 0 = a snapshot is needed
    synced: threading.Event
    on_snapshot: Callable[[list[KV], int], None]

    def _snapshot_if_needed(self) -> None:
        if self.revision == 0:
            began = time.monotonic()
            kvs, rev = self.store.range(self.prefix)
            read = time.monotonic()
            self.on_snapshot(kvs, rev)
            self.revision = rev + 1
            self.synced.set()
            if kvs:   # what a restart costs, and where: the read, or the validation and indexing
                log.info("watch %s: snapshot of %d keys at revision %d: read in %.2f s, taken in %.2f s",
                         self.prefix, len(kvs), rev, read - began, time.monotonic() - read)


class Store(Protocol):
    """The operations pyoverlay uses. Every call is bounded in time; failures raise StoreError subclasses."""

    def get(self, key: str) -> KV | None: ...
    def range(self, prefix: str, keys_only: bool = False) -> tuple[list[KV], int]: ...
    def health(self) -> float: ...
    def put(self, key: str, value: bytes | str, lease: int | None = None) -> int: ...
    def delete(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def commit(self, txn: Txn) -> bool: ...
    def create(self, key: str, value: bytes | str, lease: int | None = None) -> bool: ...
    def swap(self, key: str, value: bytes | str, mod_revision: int) -> bool: ...
    def grant(self, ttl: int) -> int: ...
    def refresh(self, lease_id: int) -> int: ...
    def revoke(self, lease_id: int) -> None: ...
    def close(self) -> None: ...

    def watch_prefix(self, prefix: str, on_snapshot: Callable[[list[KV], int], None],
                     on_events: Callable[[list[WatchEvent]], None],
                     on_error: Callable[[Exception], None] | None = None) -> Watch: ...
