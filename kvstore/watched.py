"""One etcd prefix kept as a typed map: etcd key -> validated record, current through one prefix watch.

Every consumer of a prefix (peers: hosts and endpoints; names: aliases; propagation: network definitions)
holds one of these instead of its own snapshot+events code. The rules are the same for all:

- a snapshot (the start, a compaction) replaces the map; the consumer hears every key that came, changed or
  went, with `whole` set;
- an event's record is validated (`load`); an invalid one is noted in the quarantine and changes nothing (the
  last valid record stays); a deletion forgets the record and tells its type (a replay of the old value
  is refused from then on);
- the consumer hears each batch once, as a list of updates (key, old, new, mod revision), under the lock it
  gave, so that its own indexes change together with the map;
- a consumer that gives `deferred` takes events in batches on its own thread: the watch's thread only queues
  them and calls `deferred()`; the consumer calls `drain()` (under its lock), which validates and applies what
  came since. Under churn the watch thread then wakes for little, and records are validated together.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Generic, NamedTuple, Protocol, TypeVar

from kvstore.base import KV, Store, Watch, WatchEvent
from kvstore.records import InvalidRecord

R = TypeVar("R")


class Loads(Protocol[R]):  # type: ignore[misc]
    """A record type: load(raw, key) validates or raises InvalidRecord; deleted(key) notes a deletion."""

    def load(self, raw: bytes, key: str = "") -> R: ...

    def deleted(self, key: str) -> None: ...


class Update(NamedTuple, Generic[R]):
    key: str
    old: R | None        # None: the key is new (or was invalid so far)
    new: R | None        # None: the key went
    revision: int        # etcd's mod revision of new (0 for a deletion)


class WatchedMap(Generic[R]):
    def __init__(self, store: Store, prefix: str, kind: Loads[R],
                 on_change: Callable[[list[Update[R]], bool], None],
                 lock: AbstractContextManager[object] | None = None,
                 deferred: Callable[[], None] | None = None) -> None:
        """on_change(updates, whole) runs under `lock` when one is given (the consumer's own), with the map
        already changed: on the watch's thread, or, for events when `deferred` is given, in `drain`."""
        self.store, self.prefix, self.kind = store, prefix, kind
        self._on_change = on_change
        self._lock = lock if lock is not None else nullcontext()
        self._map: dict[str, R] = {}
        self._watch: Watch | None = None
        self.synced = threading.Event()     # set once the first snapshot is in
        self._deferred = deferred
        self._queued: list[WatchEvent] = []   # events not drained yet (deferred consumers)
        self._queue_lock = threading.Lock()

    def start(self) -> None:
        self._watch = self.store.watch_prefix(self.prefix, self._snapshot, self._events)

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()

    # -- reading (callers hold the consumer's lock, or accept a view that may move) ---------------------------

    def get(self, key: str) -> R | None:
        return self._map.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def __len__(self) -> int:
        return len(self._map)

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def items(self) -> list[tuple[str, R]]:
        return list(self._map.items())

    def values(self) -> list[R]:
        return list(self._map.values())

    def copy(self) -> dict[str, R]:
        return dict(self._map)

    # -- the watch's callbacks --------------------------------------------------------------------------

    def _load(self, raw: bytes, key: str) -> R | None:
        try:
            return self.kind.load(raw, key)
        except InvalidRecord:
            return None   # noted in the quarantine by load

    def _snapshot(self, kvs: list[KV], revision: int) -> None:
        fresh: dict[str, R] = {}
        revisions: dict[str, int] = {}
        for kv in kvs:   # validated before the lock: a restart reads tens of thousands
            rec = self._load(kv.value, kv.key)
            if rec is not None:
                fresh[kv.key], revisions[kv.key] = rec, kv.mod_revision
        with self._lock:
            with self._queue_lock:
                self._queued = []   # older than this snapshot, which has their outcome
            old, self._map = self._map, fresh
            updates = [Update(k, old.get(k), rec, revisions[k]) for k, rec in fresh.items()]
            updates += [Update(k, rec, None, 0) for k, rec in old.items() if k not in fresh]
            self._on_change(updates, True)
        self.synced.set()

    def _events(self, events: list[WatchEvent]) -> None:
        if self._deferred is None:
            self._apply(events)
            return
        with self._queue_lock:
            self._queued += events
        self._deferred()

    def drain(self) -> None:
        """Validate and apply the events queued for a deferred consumer (called under its lock)."""
        with self._queue_lock:
            events, self._queued = self._queued, []
        if events:
            self._apply(events)

    def _apply(self, events: list[WatchEvent]) -> None:
        loaded: list[tuple[WatchEvent, R | None]] = []
        for ev in events:   # in order: a deletion decides which later values count as replays
            if ev.kind == "delete":
                self.kind.deleted(ev.key)
                loaded.append((ev, None))
            else:
                loaded.append((ev, self._load(ev.value, ev.key)))
        with self._lock:
            updates: list[Update[R]] = []
            for ev, rec in loaded:
                old = self._map.get(ev.key)
                if ev.kind == "delete":
                    if self._map.pop(ev.key, None) is not None:
                        updates.append(Update(ev.key, old, None, 0))
                elif rec is not None:
                    self._map[ev.key] = rec
                    updates.append(Update(ev.key, old, rec, ev.mod_revision))
            if updates:
                self._on_change(updates, False)
