"""One contract, two stores: every case runs against a real etcd and against kvstore.memory.MemoryStore, so the
fake that fast tests use behaves as etcd does (revisions, versions, transactions, leases, watches)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from kvstore import KV, EtcdConfig, KVStore, MemoryStore, Store, Txn, WatchEvent


@pytest.fixture(params=[pytest.param("etcd", marks=pytest.mark.etcd), "memory"])
def store(request: pytest.FixtureRequest) -> Store:
    if request.param == "memory":
        return MemoryStore()
    server = request.getfixturevalue("etcd_server")
    return KVStore(EtcdConfig([server.local_url], timeout=2))


@pytest.fixture
def prefix() -> str:
    return f"/contract-{uuid.uuid4().hex[:8]}/"


def test_revisions_versions_create_and_swap(store: Store, prefix: str) -> None:
    k = prefix + "a"
    assert store.get(k) is None
    rev = store.put(k, "1")
    kv = store.get(k)
    assert kv is not None and kv.value == b"1" and kv.version == 1 and kv.mod_revision == kv.create_revision == rev
    rev2 = store.put(k, b"2")
    kv2 = store.get(k)
    assert rev2 == rev + 1 and kv2 is not None and kv2.version == 2 and kv2.create_revision == rev
    assert store.create(k, "other") is False, "exists with another value"
    assert store.create(k, "2") is True, "its own earlier write counts as created"
    assert store.create(prefix + "b", "x") is True and store.create(prefix + "b", "y") is False
    assert store.swap(k, "3", rev) is False, "stale revision"
    assert store.swap(k, "3", rev2) is True
    assert store.get(k).value == b"3"  # type: ignore[union-attr]


def test_transactions_are_all_or_nothing_in_one_revision(store: Store, prefix: str) -> None:
    store.put(prefix + "x", "1")
    x = store.get(prefix + "x")
    assert x is not None
    failed = Txn().absent(prefix + "new").unchanged(prefix + "x", x.mod_revision - 1).put(prefix + "new", "n")
    assert store.commit(failed) is False
    assert store.get(prefix + "new") is None
    ok = (Txn().absent(prefix + "new").unchanged(prefix + "x", x.mod_revision)
          .put(prefix + "new", "n").put(prefix + "y", "y").delete(prefix + "x"))
    assert store.commit(ok) is True
    new, y = store.get(prefix + "new"), store.get(prefix + "y")
    assert new is not None and y is not None and new.mod_revision == y.mod_revision
    assert store.get(prefix + "x") is None
    kvs, rev = store.range(prefix)
    assert [kv.key for kv in kvs] == [prefix + "new", prefix + "y"] and rev == new.mod_revision
    assert store.delete_prefix(prefix) == 2 and store.range(prefix)[0] == []
    assert store.delete(prefix + "new") is False


def test_leased_keys_go_with_their_lease(store: Store, prefix: str) -> None:
    lease = store.grant(30)
    store.put(prefix + "held", "v", lease=lease)
    assert store.create(prefix + "held2", "v", lease=lease)
    kv = store.get(prefix + "held")
    assert kv is not None and kv.lease == lease
    assert store.refresh(lease) > 0
    store.revoke(lease)
    assert store.get(prefix + "held") is None and store.get(prefix + "held2") is None
    assert store.refresh(lease) <= 0, "a revoked lease stays gone"


def test_a_watch_gets_a_snapshot_then_every_change_in_order(store: Store, prefix: str) -> None:
    store.put(prefix + "before", "0")
    snapshots: list[tuple[list[KV], int]] = []
    batches: list[list[WatchEvent]] = []
    seen = threading.Event()

    def on_events(events: list[WatchEvent]) -> None:
        batches.append(events)
        if any(e.key == prefix + "last" for e in events):
            seen.set()

    w = store.watch_prefix(prefix, lambda kvs, rev: snapshots.append((kvs, rev)), on_events)
    try:
        assert w.synced.wait(10)
        store.put(prefix + "one", "1")
        store.commit(Txn().put(prefix + "two", "2").delete(prefix + "before"))
        store.put("/elsewhere-" + prefix.strip("/"), "not watched")
        store.put(prefix + "last", "3")
        assert seen.wait(10)
    finally:
        w.stop()
    (kvs, rev), = snapshots
    assert [kv.key for kv in kvs] == [prefix + "before"] and kvs[0].mod_revision <= rev
    flat = [(e.kind, e.key) for b in batches for e in b]
    assert flat == [("put", prefix + "one"), ("put", prefix + "two"), ("delete", prefix + "before"),
                    ("put", prefix + "last")]
    revs = [e.mod_revision for b in batches for e in b]
    assert revs == sorted(revs) and revs[0] > rev
    home = {e.mod_revision: i for i, b in enumerate(batches) for e in b}
    assert all(home[e.mod_revision] == i for i, b in enumerate(batches) for e in b), \
        "a revision's events arrive together (a transaction is seen whole)"


def test_memory_store_leases_expire_on_its_clock_and_watches_resnapshot_after_compaction() -> None:
    store = MemoryStore()
    lease = store.grant(10)
    store.put("/m/host", "h", lease=lease)
    store.advance(5)
    assert store.refresh(lease) == 10
    store.advance(9)
    assert store.get("/m/host") is not None
    store.advance(2)
    assert store.get("/m/host") is None and store.refresh(lease) == 0

    snapshots: list[int] = []
    w = store.watch_prefix("/m/", lambda kvs, rev: snapshots.append(len(kvs)), lambda evs: None)
    try:
        assert w.synced.wait(5)
        w.revision = 1            # as if it had fallen behind: the start of history is compacted away
        store.compact(store.revision)
        store.put("/m/a", "1")
        deadline = time.monotonic() + 5
        while len(snapshots) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert snapshots[:2] == [0, 1], "a new snapshot instead of the lost events"
    finally:
        w.stop()
    store.fail_next()
    with pytest.raises(Exception, match="simulated outage"):
        store.get("/m/a")
    assert store.get("/m/a") is not None
