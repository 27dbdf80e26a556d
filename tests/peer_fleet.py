"""The peer programming logic (plugin.cluster.peers.PeerSync) fed by the in-memory store, with a kernel that only
records what it is told: the records of a fleet of remote hosts, then churn. No root, no etcd, no kernel.

Used by tests/test_unit_peers.py (correctness) and bench/peer_churn.py (figures).
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvstore import Keys, MemoryStore, Txn
from kvstore.records import EndpointRecord, HostRecord, NetworkRecord
from plugin.cluster.peers import Peer, PeerSync
from plugin.dns.names import NameService
from plugin.kernel.datapath import mac_from_ip
from plugin.state import LocalNetwork, LocalState

NKEY, VNI, SUBNET = "10.200.0.0_16", 4242, "10.200.0.0/16"


class RecordingKernel:
    """DataPath's peer interface over dicts shaped like the kernel's tables: per VNI, neighbours (ip -> mac)
    and VXLAN FDB entries (mac -> vtep). Like the kernel, a `replace` overwrites the entry of that IP or
    MAC, and a removal takes only the entry that matches."""

    def __init__(self) -> None:
        self.neigh: dict[int, dict[str, str]] = {}
        self.fdb: dict[int, dict[str, str]] = {}
        self.batches = 0
        self.lock = threading.Lock()

    def program_peers(self, vni: int, add: list[Peer], remove: list[Peer]) -> list[Any]:
        with self.lock:
            neigh, fdb = self.neigh.setdefault(vni, {}), self.fdb.setdefault(vni, {})
            for ip, mac, vtep in remove:
                if neigh.get(ip) == mac:
                    del neigh[ip]
                if fdb.get(mac) == vtep:
                    del fdb[mac]
            for ip, mac, vtep in add:
                neigh[ip], fdb[mac] = mac, vtep
            self.batches += 1
        return []

    def peer_entries(self, vni: int) -> list[tuple[str, str, str]]:
        with self.lock:
            fdb = self.fdb.get(vni, {})
            return sorted((ip, mac, fdb[mac]) for ip, mac in self.neigh.get(vni, {}).items() if mac in fdb)

    def count(self) -> int:
        """Neighbour entries (cheap; peer_entries says which are complete)."""
        with self.lock:
            return len(self.neigh.get(VNI, {}))


class NoEncryption:
    settled = True   # in line with the hosts after each sync

    def __init__(self) -> None:
        self.syncs = 0

    def sync(self, hosts: dict[str, Any], vnis: dict[int, str]) -> bool:
        self.syncs += 1
        return False


class Fleet:
    """One local host ("local") with one network, and N remote hosts with E endpoints each, in a MemoryStore."""

    def __init__(self, hosts: int, per_host: int) -> None:
        self.store = MemoryStore()
        self.keys = Keys("/fleet")
        self.kernel = RecordingKernel()
        self.dir = Path(tempfile.mkdtemp(prefix="pyoverlay-fleet-"))
        self.state = LocalState(self.dir / "state.json")
        record = NetworkRecord(key=NKEY, vni=VNI, subnets=[SUBNET], port=4800, created_by="local")
        self.state.put_network(LocalNetwork(docker_network_id="n" * 12, record=record, mtu=1450))
        self.hosts, self.per_host = hosts, per_host
        # The names follow every pass, as in the plugin (their sockets are never opened here).
        self.names = NameService(self.store, self.keys, self.state, None, ["192.0.2.1"])  # type: ignore[arg-type]
        self.peers = PeerSync(self.store, self.keys, self.kernel, self.state, "local",  # type: ignore[arg-type]
                              NoEncryption(), names=self.names.changed)  # type: ignore[arg-type]
        self.next_ip = 1
        self.want: dict[str, tuple[str, str, str]] = {}   # endpoint key -> the entry it should give

    def vtep(self, h: int) -> str:
        return str(ipaddress.ip_address("10.99.0.0") + 1 + h)

    def write_hosts(self) -> None:
        for h in range(self.hosts):
            rec = HostRecord(host=f"r{h}", vtep=self.vtep(h), port=4800, version="t", started=0.0)
            self.store.put(self.keys.host(f"r{h}"), rec.dump())

    def endpoint(self, h: int) -> tuple[str, bytes]:
        ip = ipaddress.ip_address("10.200.0.0") + self.next_ip
        self.next_ip += 1
        eid = f"e{self.next_ip:08d}"
        rec = EndpointRecord(endpoint_id=eid, network_key=NKEY, docker_network_id="d" * 12, host=f"r{h}",
                             vtep=self.vtep(h), mac=mac_from_ip(ip), address=f"{ip}/16", name=f"c-{eid}")
        key = self.keys.endpoint(NKEY, eid)
        self.want[key] = (str(ip), rec.mac, rec.vtep)
        return key, rec.dump()

    def prepare(self, count: int, first_host: int = 0) -> list[tuple[str, bytes]]:
        """count endpoint records spread over the hosts (made before any timing starts)."""
        return [self.endpoint((first_host + i // self.per_host) % self.hosts) for i in range(count)]

    def write(self, records: list[tuple[str, bytes]], batch: int = 100) -> None:
        """In transactions of `batch` (1: one write each, as hosts make them)."""
        for i in range(0, len(records), batch):
            txn = Txn()
            for key, value in records[i:i + batch]:
                txn.put(key, value)
            self.store.commit(txn)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self.store.delete(key)
            self.want.pop(key, None)

    @contextlib.contextmanager
    def running(self) -> Iterator[list[str]]:
        """The hosts and all their endpoints written and programmed; yields the endpoint keys."""
        self.write_hosts()
        self.peers.start()
        try:
            keys = self.write_endpoints()
            self.wait_programmed()
            yield keys
        finally:
            self.close()

    def close(self) -> None:
        self.peers.stop()
        self.names.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def write_endpoints(self) -> list[str]:
        records = self.prepare(self.hosts * self.per_host)
        self.write(records)
        return [k for k, _ in records]

    def churn(self, keys: list[str], changes: int) -> list[str]:
        """changes/2 endpoints leave and changes/2 arrive, each its own write (as hosts make them)."""
        arriving = self.prepare(changes // 2)
        self.delete(keys[: changes // 2])
        self.write(arriving, batch=1)
        return keys[changes // 2:] + [k for k, _ in arriving]

    def settle(self) -> None:
        """Until the peers' thread has no pass queued or running (the kernel holds its final word) and the names
        have every change."""
        self.peers._background.submit(lambda: None).result(timeout=30)
        self.peers._background.submit(lambda: None).result(timeout=30)
        self.names.settle()

    def wait_programmed(self, timeout: float = 120) -> float:
        """Seconds until the kernel holds exactly the entries of the endpoint records in the store."""
        began, want = time.monotonic(), set(self.want.values())
        while time.monotonic() - began < timeout:
            if self.kernel.count() == len(want) and set(self.kernel.peer_entries(VNI)) == want:
                return time.monotonic() - began
            time.sleep(0.005)
        raise TimeoutError(f"kernel has {self.kernel.count()} of {len(want)} entries")


def bytes_per_endpoint(count: int = 2000) -> float:
    """What the plugin keeps per remote endpoint (the validated record, its peer entries, its names, and the
    in-memory store's copy), by tracemalloc over count endpoints. Run it in a fresh interpreter (`python -m
    tests.peer_fleet`): in a test session other tests' threads and caches would be counted too."""
    import gc
    import tracemalloc

    fleet = Fleet(hosts=count // 40, per_host=40)
    fleet.write_hosts()
    fleet.peers.start()
    try:
        records = fleet.prepare(count)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            fleet.write(records)
            fleet.wait_programmed()
            fleet.settle()
            gc.collect()
            return (tracemalloc.get_traced_memory()[0] - before) / count
        finally:
            tracemalloc.stop()
    finally:
        fleet.close()


if __name__ == "__main__":
    print(f"{bytes_per_endpoint():.0f}")
