"""kvstore.WatchedMap, the one mirror of an etcd prefix that peers, names and propagation share: on the
in-memory store and through its callbacks directly (no root, no etcd)."""

from __future__ import annotations

import threading
import time

from kvstore import KV, Keys, MemoryStore, WatchEvent
from kvstore.records import QUARANTINE, HostRecord
from kvstore.watched import Update, WatchedMap

KEYS = Keys("/w/")


def host(name: str, vtep: str = "192.0.2.1") -> bytes:
    return HostRecord(host=name, vtep=vtep, port=4789, version="t", started=1.0).dump()


class Heard:
    def __init__(self) -> None:
        self.calls: list[tuple[list[Update[HostRecord]], bool]] = []
        self.lock = threading.Lock()
        self.held_lock: list[bool] = []

    def __call__(self, updates: list[Update[HostRecord]], whole: bool) -> None:
        self.held_lock.append(self.lock.locked())
        self.calls.append((updates, whole))


def test_snapshot_events_invalid_records_and_deletions() -> None:
    heard = Heard()
    m = WatchedMap(MemoryStore(), KEYS.hosts(), HostRecord, heard, lock=heard.lock)
    a, b, c = KEYS.host("a"), KEYS.host("b"), KEYS.host("c")
    m._snapshot([KV(a, host("a"), 2, 2, 1, 0), KV(b, b"{not json", 3, 3, 1, 0)], 3)
    assert list(m) == [a] and heard.calls[-1][1] is True and heard.held_lock == [True]
    assert [(u.key, u.old, u.new is not None, u.revision) for u in heard.calls[-1][0]] == [(a, None, True, 2)]
    assert any(key == b for _, key, _ in QUARANTINE.snapshot()), "the invalid record is noted"
    first = m.get(a)
    # An event: a valid change, an invalid one (the last valid record stays, nobody hears of it), a new key.
    m._events([WatchEvent("put", a, host("a", "192.0.2.9"), 4), WatchEvent("put", b, b"[]", 5),
               WatchEvent("put", c, host("c"), 6)])
    updates, whole = heard.calls[-1]
    assert whole is False and [(u.key, u.revision) for u in updates] == [(a, 4), (c, 6)]
    assert updates[0].old is first and m.get(a).vtep == "192.0.2.9" and b not in m
    m._events([WatchEvent("put", a, b"{}", 7)])
    assert len(heard.calls) == 2 and m.get(a).vtep == "192.0.2.9", "an invalid value changes nothing"
    # A deletion is heard with its old record; deleting a key the map never held is not.
    m._events([WatchEvent("delete", c, b"", 8), WatchEvent("delete", b, b"", 9)])
    assert [(u.key, u.new) for u in heard.calls[-1][0]] == [(c, None)] and c not in m
    # A new snapshot (a compaction, a reconnect): every key that came, changed or went is heard, whole.
    m._snapshot([KV(c, host("c"), 10, 10, 1, 0)], 10)
    updates, whole = heard.calls[-1]
    assert whole and {(u.key, u.old is not None, u.new is not None) for u in updates} == {(c, False, True),
                                                                                            (a, True, False)}
    assert list(m) == [c]


def test_it_follows_a_live_store() -> None:
    store, heard = MemoryStore(), Heard()
    store.put(KEYS.host("a"), host("a"))
    m = WatchedMap(store, KEYS.hosts(), HostRecord, heard)
    m.start()
    try:
        assert m.synced.wait(10) and list(m) == [KEYS.host("a")]
        store.put(KEYS.host("b"), host("b"))
        store.delete(KEYS.host("a"))
        deadline = time.monotonic() + 10
        while list(m) != [KEYS.host("b")] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(m) == [KEYS.host("b")]
        heard_keys = [(u.key, u.new is None) for updates, whole in heard.calls if not whole for u in updates]
        assert heard_keys == [(KEYS.host("b"), False), (KEYS.host("a"), True)]
    finally:
        m.stop()


def test_a_deferred_consumer_takes_events_in_batches_when_it_drains() -> None:
    """The watch's thread only queues events for a deferred consumer (and tells it); drain validates and applies
    them in order, under the consumer's lock; a snapshot supersedes what was queued before it."""
    heard, told = Heard(), []
    m = WatchedMap(MemoryStore(), KEYS.hosts(), HostRecord, heard, lock=heard.lock,
                   deferred=lambda: told.append(len(m._queued)))
    a, b = KEYS.host("a"), KEYS.host("b")
    m._snapshot([KV(a, host("a"), 2, 2, 1, 0)], 2)
    m._events([WatchEvent("put", a, host("a", "192.0.2.9"), 3)])
    m._events([WatchEvent("put", b, host("b"), 4), WatchEvent("delete", a, b"", 5)])
    assert told == [1, 3] and len(heard.calls) == 1 and m.get(a).vtep == "192.0.2.1", "queued, not applied"
    m.drain()   # (the consumer's lock is reentrant: peers drain with it held)
    updates, whole = heard.calls[-1]
    assert not whole and heard.held_lock[-1] and [(u.key, u.new is not None) for u in updates] == \
        [(a, True), (b, True), (a, False)]
    assert list(m) == [b]
    m.drain()
    assert len(heard.calls) == 2, "nothing queued: nobody hears anything"
    # Queued events older than a snapshot are dropped with it (the snapshot has their outcome).
    m._events([WatchEvent("put", a, host("a"), 6)])
    m._snapshot([KV(b, host("b"), 4, 4, 1, 0)], 7)
    m.drain()
    assert list(m) == [b] and heard.calls[-1][1] is True
