"""Scale: one host joins a network that already has 1,000 / 5,000 remote endpoints.

The remote hosts and their endpoints are records written straight into etcd (50 hosts with live
leases, endpoints spread over them); then `docker network create` on one real simulated host
(tests/rig.py) makes it join. Measured: seconds from the start of `docker network create` until the
kernel of that host holds a permanent neighbour entry for every remote endpoint, and the plugin's
memory (RSS of its processes) before and after. A fresh rig per size.

    sudo .venv/bin/python bench/scale.py [--sizes 1000 5000]
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time

from common import rss_kb, save, table

from ipam.subnets import network_key
from kvstore import EtcdConfig, Keys, KVStore, Txn
from kvstore.records import EndpointRecord, HostRecord, MemberRecord, NetworkRecord
from plugin.kernel.datapath import mac_from_ip
from tests.rig import DockerHost, Rig, sh

FAKE_HOSTS = 50
SUBNET = ipaddress.ip_network("10.62.0.0/16")
VNI = 70000


def seed(store: KVStore, keys: Keys, count: int) -> None:
    lease = store.grant(3600)
    for i in range(FAKE_HOSTS):
        rec = HostRecord(host=f"fake{i}", vtep=f"10.98.{i // 250}.{i % 250 + 1}", port=4800, version="bench",
                         started=time.time())
        store.put(keys.host(rec.host), rec.dump(), lease=lease)
    nkey = network_key(SUBNET, None)
    gateway = f"{next(SUBNET.hosts())}/{SUBNET.prefixlen}"
    net = NetworkRecord(key=nkey, vni=VNI, subnets=[str(SUBNET)], gateway=gateway,
                        port=4800, created_by="fake0")
    txn = Txn().put(keys.network(nkey), net.dump()).put(keys.vni(VNI), nkey)
    for i in range(FAKE_HOSTS):
        txn.put(keys.member(nkey, f"fake{i}"), MemberRecord(host=f"fake{i}", docker_network_id=f"{i:064x}").dump())
    store.commit(txn)
    hosts = list(SUBNET.hosts())
    batch = Txn()
    for i in range(count):
        ip = hosts[1000 + i]
        eid = f"{i:064x}"
        rec = EndpointRecord(endpoint_id=eid, network_key=nkey, docker_network_id=f"{i % FAKE_HOSTS:064x}",
                             host=f"fake{i % FAKE_HOSTS}", vtep=f"10.98.0.{i % FAKE_HOSTS + 1}",
                             mac=mac_from_ip(ip), address=f"{ip}/{SUBNET.prefixlen}")
        batch.put(keys.endpoint(nkey, eid), rec.dump())
        if (i + 1) % 100 == 0 or i + 1 == count:
            store.commit(batch)
            batch = Txn()


def programmed(h: DockerHost) -> int:
    script = (f"nsenter --net={h.state_dir}/netns/pyo-{VNI:06x} ip neigh show dev vxlan0 nud permanent "
              f"2>/dev/null | wc -l")
    out = sh("nsenter", "-t", str(h._holder_pid()), "-m", "--", "sh", "-c", script, check=False).stdout.strip()
    return int(out or 0)


def run_size(count: int) -> dict[str, object]:
    rig = Rig()
    try:
        rig.up(1)
        h = rig.hosts[0]
        store = KVStore(EtcdConfig([rig.etcd.local_url], timeout=10))
        keys = Keys(rig.etcd_prefix)
        began = time.monotonic()
        seed(store, keys, count)
        seeded = time.monotonic() - began
        assert h.plugin is not None
        before = rss_kb(h.plugin.pid)
        start = time.monotonic()
        h.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", str(SUBNET),
                 "scale")
        created = time.monotonic() - start
        while (n := programmed(h)) < count:
            if time.monotonic() - start > 300:
                raise RuntimeError(f"only {n} of {count} programmed after 300 s")
            time.sleep(0.05)
        done = time.monotonic() - start
        after = rss_kb(h.plugin.pid)
        store.close()
    finally:
        rig.down()
    print(f"{count} remote endpoints: all programmed {done:.2f}s after docker network create started "
          f"(create itself {created:.2f}s); plugin RSS {before // 1024} -> {after // 1024} MiB", flush=True)
    return {"endpoints": count, "fake_hosts": FAKE_HOSTS, "seed_seconds": round(seeded, 2),
            "network_create_seconds": round(created, 2), "all_programmed_seconds": round(done, 2),
            "rss_before_mib": round(before / 1024, 1), "rss_after_mib": round(after / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    args = ap.parse_args()
    sizes = [run_size(n) for n in args.sizes]
    rows = [[s["endpoints"], s["network_create_seconds"], s["all_programmed_seconds"], s["rss_before_mib"],
             s["rss_after_mib"]] for s in sizes]
    md = ("One host joins a network whose remote endpoints (spread over 50 hosts) are already in etcd; "
          "time from the start of `docker network create` until every remote endpoint has its permanent "
          "neighbour entry in the kernel, and the plugin's resident memory (master + worker).\n\n"
          + table(["remote endpoints", "network create s", "all programmed s", "RSS before MiB",
                   "RSS after MiB"], rows))
    save("scale", {"sizes": sizes}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
