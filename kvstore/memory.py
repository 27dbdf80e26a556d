"""An in-memory Store with etcd's semantics, for tests that need no etcd, no root and no time.

Same revisions (one per write or transaction, starting at 1), per-key create/mod revision and version,
transactions that compare versions and mod revisions and apply all their operations in one revision, leases
with TTLs on a clock the test controls (`advance()`), prefix watches that deliver a snapshot and then every
change in order, and compaction: a watch that has fallen behind a compacted revision takes a new snapshot,
as kvstore.client's does. `fail_next()` makes calls raise StoreUnavailable (an outage).

The contract tests in tests/test_store_contract.py run the same cases against this and a real etcd.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.base import KV, Compacted, Compare, Put, SnapshotFirst, StoreUnavailable, Txn, WatchEvent, _raw


@dataclass
class _Lease:
    ttl: int
    expires: float
    keys: set[str] = field(default_factory=set)


class MemoryStore:
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._data: dict[str, KV] = {}
        self._history: list[WatchEvent] = []      # every change since the last compaction, in order
        self._compacted = 0                       # revisions before this one are gone from the history
        self._revision = 1                        # etcd starts at 1
        self._leases: dict[int, _Lease] = {}
        self._next_lease = 0x1000
        self._offset = 0.0
        self._clock = clock or time.monotonic
        self._failing = 0

    # -- test controls ----------------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move the lease clock forward (expired leases take their keys along at the next call)."""
        with self._lock:
            self._offset += seconds
            self._expire()

    def compact(self, revision: int) -> None:
        """As etcd's compaction: a watch may no longer start before revision."""
        with self._lock:
            self._compacted = max(self._compacted, min(revision, self._revision))
            self._history = [e for e in self._history if e.mod_revision >= self._compacted]
            self._changed.notify_all()

    def fail_next(self, calls: int = 1) -> None:
        """The next `calls` operations raise StoreUnavailable, as an unreachable etcd does."""
        with self._lock:
            self._failing = calls

    @property
    def revision(self) -> int:
        return self._revision

    # -- internals --------------------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock() + self._offset

    def _enter(self, op: str) -> None:
        if self._failing > 0:
            self._failing -= 1
            raise StoreUnavailable(f"memory store: {op} failed (simulated outage)")
        self._expire()

    def _expire(self) -> None:
        now = self._now()
        gone = [lid for lid, lease in self._leases.items() if lease.expires <= now]
        if gone:
            rev = self._revision + 1
            for lid in gone:
                for key in sorted(self._leases.pop(lid).keys):
                    self._remove(key, rev)
            self._commit_revision(rev)

    def _commit_revision(self, rev: int) -> None:
        self._revision = rev
        self._changed.notify_all()

    def _write(self, key: str, value: bytes, lease: int | None, rev: int) -> None:
        old = self._data.get(key)
        if old is not None and old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        if lease:
            self._leases[lease].keys.add(key)
        self._data[key] = KV(key, value, rev, old.create_revision if old else rev, old.version + 1 if old else 1,
                             lease or 0)
        self._history.append(WatchEvent("put", key, value, rev))

    def _remove(self, key: str, rev: int) -> bool:
        old = self._data.pop(key, None)
        if old is None:
            return False
        if old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        self._history.append(WatchEvent("delete", key, b"", rev))
        return True

    def _holds(self, c: Compare) -> bool:
        kv = self._data.get(c.key)
        have = (kv.version if kv else 0) if c.target == "version" else (kv.mod_revision if kv else 0)
        return bool(have == c.value)

    # -- reads ------------------------------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        with self._lock:
            self._enter("get")
            return self._data.get(key)

    def range(self, prefix: str, keys_only: bool = False) -> tuple[list[KV], int]:
        with self._lock:
            self._enter("range")
            kvs = [kv for k, kv in sorted(self._data.items()) if k.startswith(prefix)]
            if keys_only:
                kvs = [KV(kv.key, b"", kv.mod_revision, kv.create_revision, kv.version, kv.lease) for kv in kvs]
            return kvs, self._revision

    def health(self) -> float:
        with self._lock:
            self._enter("health")
        return 0.0

    # -- writes -----------------------------------------------------------------------------------------

    def commit(self, txn: Txn) -> bool:
        with self._lock:
            self._enter("txn")
            if not all(self._holds(c) for c in txn.compare):
                return False
            missing = [op.lease for op in txn.success if isinstance(op, Put) and op.lease
                       and op.lease not in self._leases]
            if missing:
                raise StoreUnavailable(f"memory store: lease {missing[0]:#x} not found")  # as etcd: nothing applied
            rev, changed = self._revision + 1, False
            for op in txn.success:
                if isinstance(op, Put):
                    self._write(op.key, op.value, op.lease, rev)
                    changed = True
                else:
                    keys = [k for k in sorted(self._data) if k.startswith(op.key)] if op.prefix else [op.key]
                    for key in keys:
                        changed = self._remove(key, rev) or changed
            if changed:
                self._commit_revision(rev)
            return True

    def put(self, key: str, value: bytes | str, lease: int | None = None) -> int:
        self.commit(Txn().put(key, value, lease))
        return self._revision

    def delete(self, key: str) -> bool:
        with self._lock:
            present = key in self._data
            self.commit(Txn().delete(key))
            return present

    def delete_prefix(self, prefix: str) -> int:
        with self._lock:
            n = sum(1 for k in self._data if k.startswith(prefix))
            self.commit(Txn().delete_prefix(prefix))
            return n

    def create(self, key: str, value: bytes | str, lease: int | None = None) -> bool:
        with self._lock:
            if self.commit(Txn().absent(key).put(key, value, lease)):
                return True
            kv = self._data.get(key)
            return kv is not None and kv.value == _raw(value)   # our own earlier write: created

    def swap(self, key: str, value: bytes | str, mod_revision: int) -> bool:
        return self.commit(Txn().unchanged(key, mod_revision).put(key, value))

    # -- leases -----------------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        with self._lock:
            self._enter("lease")
            self._next_lease += 1
            self._leases[self._next_lease] = _Lease(ttl, self._now() + ttl)
            return self._next_lease

    def refresh(self, lease_id: int) -> int:
        with self._lock:
            self._enter("lease")
            lease = self._leases.get(lease_id)
            if lease is None:
                return 0
            lease.expires = self._now() + lease.ttl
            return lease.ttl

    def revoke(self, lease_id: int) -> None:
        with self._lock:
            self._enter("lease")
            lease = self._leases.pop(lease_id, None)
            if lease is not None and lease.keys:
                rev = self._revision + 1
                for key in sorted(lease.keys):
                    self._remove(key, rev)
                self._commit_revision(rev)

    def close(self) -> None:
        pass

    # -- watches ----------------------------------------------------------------------------------------

    def watch_prefix(self, prefix: str, on_snapshot: Callable[[list[KV], int], None],
                     on_events: Callable[[list[WatchEvent]], None],
                     on_error: Callable[[Exception], None] | None = None) -> MemoryWatch:
        w = MemoryWatch(self, prefix, on_snapshot, on_events, on_error)
        w.start()
        return w

    def _events_since(self, prefix: str, revision: int) -> list[WatchEvent]:
        """Changes under prefix from revision on (caller holds the lock); Compacted when some are gone."""
        if revision < self._compacted:
            raise Compacted(self._compacted)
        start = bisect.bisect_left(self._history, revision, key=lambda e: e.mod_revision)  # ordered by revision
        return [e for e in self._history[start:] if e.key.startswith(prefix)]


class MemoryWatch(SnapshotFirst):
    """A background thread following one prefix of a MemoryStore, with kvstore.client.PrefixWatch's contract."""

    store: MemoryStore

    def __init__(self, store: MemoryStore, prefix: str, on_snapshot: Callable[[list[KV], int], None],
                 on_events: Callable[[list[WatchEvent]], None],
                 on_error: Callable[[Exception], None] | None) -> None:
        self.store, self.prefix = store, prefix
        self.on_snapshot, self.on_events = on_snapshot, on_events
        self.on_error = on_error or (lambda err: None)
        self.revision = 0
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"memwatch:{prefix}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.store._changed:
            self.store._changed.notify_all()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._snapshot_if_needed()
                with self.store._changed:
                    while not self._stop.is_set() and self.store.revision < self.revision:
                        self.store._changed.wait(0.5)
                        self.store._expire()
                    if self._stop.is_set():
                        return
                    events = self.store._events_since(self.prefix, self.revision)
                    now = self.store.revision
                # One callback per revision, as etcd sends one watch answer per revision.
                for rev in sorted({e.mod_revision for e in events}):
                    self.on_events([e for e in events if e.mod_revision == rev])
                self.revision = now + 1
            except Compacted:
                self.revision = 0
            except Exception as err:  # noqa: BLE001 - reported; the watch goes on, as the etcd one does
                self.on_error(err)
                self._stop.wait(0.1)
