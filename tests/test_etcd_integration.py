"""kvstore and the IPAM against a real etcd, and the same IPAM cases against the in-memory store (no Docker)."""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from ipam.allocator import DefaultPools, Ipam
from kvstore import EtcdConfig, Keys, KVStore, MemoryStore, StoreUnavailable, Txn
from plugin.errors import Conflict, NotFound, PluginError
from tests.rig import Etcd


@pytest.fixture(params=[pytest.param("etcd", marks=pytest.mark.etcd), "memory"])
def store(request: pytest.FixtureRequest) -> KVStore:
    """A real etcd, and the in-memory store with its semantics: the IPAM's cases run on both (the second in
    milliseconds, with `make test-unit`)."""
    if request.param == "memory":
        return MemoryStore()  # type: ignore[return-value]
    server = request.getfixturevalue("etcd_server")
    return KVStore(EtcdConfig([server.local_url], timeout=2))


@pytest.fixture
def etcd_store(etcd_server: Etcd) -> KVStore:
    return KVStore(EtcdConfig([etcd_server.local_url], timeout=2))


@pytest.fixture
def keys() -> Keys:
    return Keys(f"/test-{uuid.uuid4().hex[:8]}")


def ipam(store: KVStore, keys: Keys, host: str, swarm: bool = False) -> Ipam:
    defaults = DefaultPools(ipaddress.ip_network("10.128.0.0/16"), 24, ipaddress.ip_network("fd75::/48"), 64)
    return Ipam(store, keys, host, defaults, lambda: [], swarm=swarm)


def test_create_if_absent_and_compare_and_swap(store: KVStore, keys: Keys) -> None:
    k = keys.network("n")
    assert store.create(k, b"1")
    assert not store.create(k, b"2")
    kv = store.get(k)
    assert kv is not None and kv.value == b"1"
    assert store.swap(k, b"3", kv.mod_revision)
    assert not store.swap(k, b"4", kv.mod_revision), "a stale revision must not win"
    assert not store.commit(Txn().absent(k).put(keys.vni(1), b"x"))
    assert store.get(keys.vni(1)) is None
    # A create retried after its first try committed (the answer lost) finds its own value: created, not taken.
    k2 = keys.network("retried")
    assert store.create(k2, b'{"request": "r1"}')
    assert store.create(k2, b'{"request": "r1"}')
    assert not store.create(k2, b'{"request": "r2"}')


def test_a_retried_address_request_never_leaks_or_doubles(store: KVStore, keys: Keys) -> None:
    """Each allocation carries a request id: two requests for one address stay two requests."""
    a = ipam(store, keys, "a")
    pid = a.request_pool("10.91.0.0/24", "", {}, False)["PoolID"]
    first = a.request_address(pid, "10.91.0.7", {})["Address"]
    with pytest.raises(PluginError, match="already in use"):
        a.request_address(pid, "10.91.0.7", {})  # the same host, the same address, another request
    assert first == "10.91.0.7/24"
    held = json.loads(store.get(keys.addr(pid, "10.91.0.7")).value)  # type: ignore[union-attr]
    assert len(held["request"]) == 32


@pytest.mark.etcd
def test_failover_to_a_second_endpoint(etcd_server: Etcd, keys: Keys) -> None:
    dead = "http://127.0.0.1:1"  # nothing listens there
    s = KVStore(EtcdConfig([dead, etcd_server.local_url], timeout=1))
    s.put(keys.host("a"), b"up")
    assert s.get(keys.host("a")).value == b"up"  # type: ignore[union-attr]


@pytest.mark.etcd
def test_unreachable_fails_fast_and_clearly(keys: Keys) -> None:
    s = KVStore(EtcdConfig(["http://127.0.0.1:1"], timeout=1))
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        s.get(keys.host("x"))
    print(f"failed after {time.monotonic() - start:.2f}s")


class Mirror:
    """What a prefix watch shows: key -> value, from its snapshots and events."""

    def __init__(self) -> None:
        self.seen: dict[str, bytes] = {}
        self.snapshots: list[int] = []
        self.lock = threading.Lock()

    def on_snapshot(self, kvs, rev):  # type: ignore[no-untyped-def]
        with self.lock:
            self.snapshots.append(rev)
            self.seen = {kv.key: kv.value for kv in kvs}

    def on_events(self, events):  # type: ignore[no-untyped-def]
        with self.lock:
            for ev in events:
                if ev.kind == "put":
                    self.seen[ev.key] = ev.value
                else:
                    self.seen.pop(ev.key, None)

    def until(self, want: dict[str, bytes], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.seen == want:
                    return
            time.sleep(0.05)
        with self.lock:
            assert self.seen == want


@pytest.mark.etcd
def test_watch_resumes_and_recovers_from_compaction(etcd_store: KVStore, keys: Keys, etcd_server: Etcd) -> None:
    store = etcd_store
    prefix = keys.networks()
    store.put(keys.network("a"), b"1")
    mirror = Mirror()
    w = store.watch_prefix(prefix, mirror.on_snapshot, mirror.on_events)
    try:
        assert w.synced.wait(5)
        store.put(keys.network("b"), b"2")
        store.delete(keys.network("a"))
        mirror.until({keys.network("b"): b"2"}, timeout=5)
        # Force the watch to reconnect from a compacted revision: it must resynchronise fully.
        w._cancel() if w._cancel else None  # type: ignore[misc]
        w.revision = 1
        store.put(keys.network("c"), b"3")
        rev = store.put(keys.network("d"), b"4")
        etcd_server.ctl("compact", str(rev))
        mirror.until({keys.network("b"): b"2", keys.network("c"): b"3", keys.network("d"): b"4"}, timeout=10)
        assert len(mirror.snapshots) >= 2, "a compacted revision must trigger a new snapshot"
    finally:
        w.stop()


@pytest.mark.etcd
@pytest.mark.parametrize("gateway", [True, False], ids=["json-gateway", "grpc-stream"])
def test_watches_read_the_json_gateway_or_grpc_where_it_is_off(gateway: bool, keys: Keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Watches go through etcd's JSON gateway (less than half of gRPC's CPU per event), and through gRPC's stream on
    an etcd without one. Either way: binary values, deletions, one revision of 2,000 events (a ~1.8 MB answer),
    and a key that is not UTF-8 (someone wrote it under our prefix) that must not stop the watch."""
    server = Etcd(tmp_path, ["127.0.0.1"],   # room for 2,000 puts in one transaction: one answer of ~1.8 MB
                  extra=("--max-txn-ops=2000", *(() if gateway else ("--enable-grpc-gateway=false",))))
    server.start()
    store = KVStore(EtcdConfig([server.local_url], timeout=2))
    prefix = keys.networks()
    mirror = Mirror()
    until = mirror.until
    store.put(keys.network("a"), b"\xff\x00binary")
    w = store.watch_prefix(prefix, mirror.on_snapshot, mirror.on_events)
    try:
        assert w.synced.wait(10)
        until({keys.network("a"): b"\xff\x00binary"})
        server.ctl("put", prefix + "\udcff", "x")   # the byte 0xff: no UTF-8
        store.put(keys.network("b"), b"2")
        store.delete(keys.network("a"))
        until({prefix + "\ufffd": b"x", keys.network("b"): b"2"})
        txn = Txn()
        for i in range(2000):
            txn.put(keys.network(f"m{i}"), b"v" * 500)
        assert store.commit(txn)
        until({prefix + "\ufffd": b"x", keys.network("b"): b"2",
               **{keys.network(f"m{i}"): b"v" * 500 for i in range(2000)}})
        assert store.gateway is gateway
    finally:
        w.stop()
        store.close()
        server.stop()


def test_pool_refcount_across_hosts_and_release(store: KVStore, keys: Keys) -> None:
    a, b = ipam(store, keys, "a"), ipam(store, keys, "b")
    r1 = a.request_pool("10.50.0.0/24", "", {}, False)
    r2 = b.request_pool("10.50.0.0/24", "", {}, False)
    assert r1["PoolID"] == r2["PoolID"] == "cidr.10.50.0.0_24"
    gw_a = a.request_address(r1["PoolID"], "", {"RequestAddressType": "com.docker.network.gateway"})
    gw_b = b.request_address(r1["PoolID"], "", {"RequestAddressType": "com.docker.network.gateway"})
    assert gw_a == gw_b == {"Address": "10.50.0.1/24", "Data": {}}
    addr = a.request_address(r1["PoolID"], "", {})["Address"]
    assert a.release_pool(r1["PoolID"]) == {}
    assert store.get(keys.pool(r1["PoolID"])) is not None, "host b still uses it"
    assert b.release_pool(r1["PoolID"]) == {}
    assert store.get(keys.pool(r1["PoolID"])) is None
    assert store.range(keys.addrs(r1["PoolID"]))[0] == [], f"{addr} must go with the pool"
    with pytest.raises(NotFound):
        a.request_address(r1["PoolID"], "", {})


def test_the_same_subnet_requested_on_many_hosts_at_once_is_one_pool(store: KVStore, keys: Keys) -> None:
    """The same network created by hand on every host at the same moment: every host joins one pool."""
    for round_ in range(10):
        subnet = f"10.71.{round_}.0/24"
        hosts = [ipam(store, keys, f"h{i}") for i in range(4)]
        barrier = threading.Barrier(len(hosts))

        def request(a: Ipam, subnet: str = subnet, barrier: threading.Barrier = barrier) -> str:
            barrier.wait()
            return str(a.request_pool(subnet, "", {}, False)["PoolID"])

        with ThreadPoolExecutor(len(hosts)) as pool:
            ids = list(pool.map(request, hosts))
        assert len(set(ids)) == 1, ids
        kv = store.get(keys.pool(ids[0]))
        assert kv is not None and json.loads(kv.value)["refs"] == {f"h{i}": 1 for i in range(4)}


def test_overlap_refused_unless_explicit_ids(store: KVStore, keys: Keys) -> None:
    a = ipam(store, keys, "a")
    a.request_pool("10.60.0.0/24", "", {}, False)
    with pytest.raises(Conflict, match="overlaps"):
        a.request_pool("10.60.0.0/16", "", {}, False)
    r = a.request_pool("10.60.0.0/24", "", {"pyoverlay.network": "red"}, False)
    assert r["PoolID"] == "net.red.v4"
    auto = a.request_pool("", "", {}, False)
    assert not ipaddress.ip_network(auto["Pool"]).overlaps(ipaddress.ip_network("10.60.0.0/24"))


def test_concurrent_allocation_from_two_hosts_is_unique(store: KVStore, keys: Keys) -> None:
    a, b = ipam(store, keys, "a"), ipam(store, keys, "b")
    pid = a.request_pool("10.70.0.0/25", "", {}, False)["PoolID"]
    b.request_pool("10.70.0.0/25", "", {}, False)

    def grab(who: Ipam) -> str:
        return str(who.request_address(pid, "", {})["Address"])

    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(grab, [a, b] * 60))
    assert len(got) == len(set(got)) == 120
    # The pool has 126 usable addresses: 6 left, then a clear error.
    for _ in range(6):
        grab(a)
    with pytest.raises(Exception, match="no free address"):
        grab(b)


def test_static_address_conflict_and_release_by_owner_only(store: KVStore, keys: Keys) -> None:
    a, b = ipam(store, keys, "a"), ipam(store, keys, "b")
    pid = a.request_pool("10.80.0.0/24", "", {}, False)["PoolID"]
    b.request_pool("10.80.0.0/24", "", {}, False)
    a.request_address(pid, "10.80.0.9", {})
    with pytest.raises(Conflict, match="already in use"):
        b.request_address(pid, "10.80.0.9", {})
    b.release_address(pid, "10.80.0.9")  # not b's: left alone
    assert store.get(keys.addr(pid, "10.80.0.9")) is not None
    a.release_address(pid, "10.80.0.9")
    a.release_address(pid, "10.80.0.9")  # idempotent
    assert store.get(keys.addr(pid, "10.80.0.9")) is None
    b.request_address(pid, "10.80.0.9", {})  # a container moved to host b keeps its address


def test_swarm_node_claims_the_address_its_manager_allocated(store: KVStore, keys: Keys) -> None:
    manager, worker = ipam(store, keys, "m", swarm=True), ipam(store, keys, "w", swarm=True)
    pid = manager.request_pool("", "", {}, False)["PoolID"]        # swarm's allocator, on the manager
    gw = manager.request_address(pid, "", {"RequestAddressType": "com.docker.network.gateway"})["Address"]
    task = manager.request_address(pid, "", {})["Address"].split("/")[0]
    cidr = manager._pool(pid)[0].cidr
    # The worker defines the network with the manager's pool and gateway, then its task's endpoint.
    assert worker.request_pool(cidr, "", {}, False)["PoolID"] == pid
    assert worker.request_address(pid, gw.split("/")[0], {"RequestAddressType": "com.docker.network.gateway"})
    assert worker.request_address(pid, task, {})["Address"].startswith(task + "/")
    held = json.loads(store.get(keys.addr(pid, task)).value)  # type: ignore[union-attr]
    assert held["host"] == "w", "the address belongs to the host its container runs on"
    assert worker.request_address(pid, task, {})  # repeated: still the same claim
    manager.release_address(pid, task)              # the manager forgets the task first: the worker's stays
    assert store.get(keys.addr(pid, task)) is not None
    worker.release_address(pid, task)
    assert store.get(keys.addr(pid, task)) is None
    # Outside swarm the same request is a conflict.
    local = ipam(store, keys, "x")
    other = manager.request_address(pid, "", {})["Address"].split("/")[0]
    with pytest.raises(Conflict, match="already in use"):
        local.request_address(pid, other, {})


def test_aux_addresses_are_shared(store: KVStore, keys: Keys) -> None:
    a, b = ipam(store, keys, "a"), ipam(store, keys, "b")
    pid = a.request_pool("10.90.0.0/24", "", {}, False)["PoolID"]
    b.request_pool("10.90.0.0/24", "", {}, False)
    a.request_address(pid, "10.90.0.200", {})
    a.mark_reserved(pid, ["10.90.0.200/24"])
    b.request_address(pid, "10.90.0.200", {})  # host b defines the same network: a claim, not a clash
    with pytest.raises(PluginError, match="reserved by the network"):
        b.request_address(pid, "10.90.0.200", {})  # b has reserved it: now a container's --ip
    a.release_address(pid, "10.90.0.200")
    assert store.get(keys.addr(pid, "10.90.0.200")) is not None
    b.release_address(pid, "10.90.0.200")
    assert store.get(keys.addr(pid, "10.90.0.200")) is None


def test_ipv6_pool(store: KVStore, keys: Keys) -> None:
    a = ipam(store, keys, "a")
    r = a.request_pool("fd10::/64", "", {}, True)
    addr = a.request_address(r["PoolID"], "", {})["Address"]
    assert addr == "fd10::1/64"
    auto = a.request_pool("", "", {}, True)
    assert ipaddress.ip_network(auto["Pool"]).prefixlen == 64


def test_departed_host_released_after_grace_and_reclaims_on_return(store: KVStore, keys: Keys) -> None:
    """Host b dies holding an address, a gateway claim and a pool reference; host a releases them only
    after the grace period, and only while b has no host record; b coming back later takes its address
    back unless someone else took it meanwhile."""
    from kvstore.records import AddressRecord, DepartureRecord, PoolRecord
    from plugin.cluster.departures import Departures

    a, b = ipam(store, keys, "a"), ipam(store, keys, "b")
    pid = a.request_pool("10.77.0.0/24", "", {}, False)["PoolID"]
    b.request_pool("10.77.0.0/24", "", {}, False)
    gw = {"RequestAddressType": "com.docker.network.gateway"}
    a.request_address(pid, "", gw)
    b.request_address(pid, "", gw)
    b.request_address(pid, "10.77.0.20", {})
    b.request_address(pid, "10.77.0.21", {})
    store.put(keys.member("10.77.0.0_24", "b"), b'{"host":"b","docker_network_id":"x"}')
    store.put(keys.host("a"), b"{}")
    now = [1000.0]

    def drop_member(host: str) -> int:  # NetworkDriver.forget_host's part, covered by the docker tests
        return int(store.delete(keys.member("10.77.0.0_24", host)))

    dep = Departures(store, keys, "a", grace=60, forget=[a.forget_host, drop_member], clock=lambda: now[0])

    assert dep.sweep(set()) == []  # first sight: only noted
    mark = store.get(keys.departure("b"))
    assert mark is not None and DepartureRecord.load(mark.value).since == 1000.0
    now[0] += 59
    assert dep.sweep(set()) == [] and store.get(keys.addr(pid, "10.77.0.20")) is not None
    now[0] += 2
    assert dep.sweep(set()) == ["b"]
    assert store.get(keys.addr(pid, "10.77.0.20")) is None
    gw_rec = AddressRecord.load(store.get(keys.addr(pid, "10.77.0.1")).value)  # type: ignore[union-attr]
    assert gw_rec.claims == ["a"], "a's claim on the shared gateway stays"
    assert PoolRecord.load(store.get(keys.pool(pid)).value).refs == {"a": 1}  # type: ignore[union-attr]
    assert store.get(keys.departure("b")) is None

    # Meanwhile a container on a took .21; b returns and reclaims what is still free.
    a.request_address(pid, "10.77.0.21", {})
    lost = b.reclaim(pid, "10.77.0.0/24", "10.77.0.1/24", {"10.77.0.20": "e" * 64, "10.77.0.21": "f" * 64})
    assert lost == ["10.77.0.21"]
    back = AddressRecord.load(store.get(keys.addr(pid, "10.77.0.20")).value)  # type: ignore[union-attr]
    assert back.host == "b" and back.endpoint == "e" * 64
    assert PoolRecord.load(store.get(keys.pool(pid)).value).refs == {"a": 1, "b": 1}  # type: ignore[union-attr]

    # A host that returns within the grace period loses nothing, and its mark goes.
    store.put(keys.member("10.77.0.0_24", "c"), b'{"host":"c","docker_network_id":"y"}')
    dep.sweep(set())
    assert store.get(keys.departure("c")) is not None
    store.put(keys.host("c"), b"{}")
    now[0] += 1000
    assert dep.sweep(set()) == [] and store.get(keys.departure("c")) is None


@pytest.mark.etcd
def test_a_prefix_larger_than_grpcs_message_limit_is_read_whole(etcd_store: KVStore, keys: Keys) -> None:
    """A restarted plugin reads every endpoint record of a large fleet: 9,000 records of 600 bytes (5.4 MB,
    above gRPC's default 4 MiB answer) come back whole, at one revision, in a range and in a watch's snapshot,
    and the watch then follows new writes."""
    store = etcd_store
    prefix = keys.root + "/endpoints/"
    value = json.dumps({"pad": "x" * 580})
    for batch in range(90):
        txn = Txn()
        for i in range(100):
            txn.put(f"{prefix}n/{batch:03d}-{i:03d}", value)
        assert store.commit(txn)
    kvs, revision = store.range(prefix)
    assert len(kvs) == 9000 and sum(len(kv.value) for kv in kvs) > 4 * 1024 * 1024
    assert len({kv.key for kv in kvs}) == 9000 and all(kv.mod_revision <= revision for kv in kvs)
    store.put(prefix + "late", value)  # after the read: not part of it
    assert store.range(prefix)[1] > revision

    got: dict[str, int] = {}
    events: list[str] = []
    done = threading.Event()

    def snapshot(kvs: list, rev: int) -> None:  # type: ignore[type-arg]
        got.update({kv.key: rev for kv in kvs})
        done.set()

    watch = store.watch_prefix(prefix, snapshot, lambda evs: events.extend(e.key for e in evs))
    try:
        assert done.wait(30), "the snapshot arrived"
        assert len(got) == 9001
        store.put(prefix + "after", value)
        deadline = time.monotonic() + 10
        while prefix + "after" not in events and time.monotonic() < deadline:
            time.sleep(0.05)
        assert prefix + "after" in events
    finally:
        watch.stop()
        store.delete_prefix(prefix)
