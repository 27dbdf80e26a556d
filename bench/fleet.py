"""A fleet by simulation: one real host (real dockerd, real pyoverlay, real kernel) and the etcd records of N
simulated hosts, written as real hosts write them, then churn.

For each N (default 100, 500, 1,000 hosts x 40 endpoints, all on one /16 network):

1. *bring-up*: N hosts register (host record on a lease of its own, membership, 40 endpoint records, signed
   with the cluster secret), one host after another as fast as etcd takes them; measured: seconds from the
   first write until the real host's kernel holds a permanent neighbour entry for every remote endpoint;
2. *burst*: 1,000 endpoints leave and 1,000 arrive, one write each, as fast as possible: seconds until the
   kernel shows all 2,000 changes;
3. *churn*: 100 changes a second for --churn seconds (an endpoint leaves or arrives, alternately, on a random
   host): per change, the time from its etcd write returning to the neighbour entry appearing or going in the
   kernel (a netlink monitor in the network's namespace timestamps each); the plugin's CPU seconds over the
   churn; etcd's gRPC bytes sent per change (etcd's own /metrics: the one real host is its only watcher);
   also, during the churn, 2 hosts die (lease revoked) and a second network is created and removed on the
   real host;
4. *restart*: the plugin is killed and started again with every record in etcd; seconds until it programs
   an endpoint written after its socket is back;
5. the plugin's RSS and PSS (master + worker) idle before bring-up and at the end.

    sudo .venv/bin/python bench/fleet.py [--hosts 100 500 1000] [--churn 20]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import DOCS, RESULTS, ROOT, process_tree, pss_kb, rss_kb, save, summary, table

from ipam.subnets import network_key
from kvstore import EtcdConfig, Keys, KVStore, Txn
from kvstore.records import AUTH, EndpointRecord, HostRecord, MemberRecord, NetworkRecord
from plugin.kernel.datapath import mac_from_ip
from tests.rig import DockerHost, Rig, sh

PER_HOST = 40
SUBNET = ipaddress.ip_network("10.64.0.0/16")
SECRET = "fleet-bench-secret"
CHURN_RATE = 100.0
MONITOR = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
s.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)   # SO_RCVBUFFORCE: bursts of tens of thousands of events
s.bind((0, 1 << 2))                              # RTMGRP_NEIGH
print("ready", flush=True)
out = sys.stdout
while True:
    try:
        data = s.recv(1 << 20)
    except OSError as err:                       # ENOBUFS: events were lost
        print(f"error {err}", flush=True)
        continue
    now, off = time.monotonic(), 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            break
        if kind in (28, 29) and length >= 28:
            family, _, state = struct.unpack_from("=B3xiH", data, off + 16)
            a = off + 28
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype == 1 and family in (2, 10):
                    dst = socket.inet_ntop(family, data[a + 4:a + alen])
                    what = "del" if kind == 29 else ("add" if state & 0x80 else "other")
                    out.write(f"{now:.6f} {what} {dst}\n")
                a += (alen + 3) & ~3
        off += (length + 3) & ~3
    out.flush()
"""


def rss_mib(root_pid: int) -> float:
    return round(rss_kb(root_pid) / 1024, 1)


def pss_mib(root_pid: int) -> float:
    return round(pss_kb(root_pid) / 1024, 1)


def cpu_seconds(root_pid: int) -> float:
    ticks = 0
    for pid in process_tree(root_pid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, and those of its children that ended (the `ip`, `nft`, `iptables` it ran)
        ticks += sum(int(f) for f in fields[11:15])
    return ticks / 100.0


def thread_cpu(root_pid: int) -> dict[int, tuple[str, float, float]]:
    """Per thread: (the kernel's comm, user seconds, system seconds). Python's threads all show the process's
    comm; thread_names() tells them apart."""
    out: dict[int, tuple[str, float, float]] = {}
    for pid in process_tree(root_pid):
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            fields = text.rsplit(")", 1)[1].split()
            out[int(stat.parent.name)] = (text[text.index("(") + 1:text.rindex(")")], int(fields[11]) / 100.0,
                                          int(fields[12]) / 100.0)
    return out


def restart_split(log: str) -> dict[str, float]:
    """From a restarted plugin's log: the endpoint watch's snapshot (etcd read; validation and indexing) and
    the peers' first full pass."""
    out: dict[str, float] = {}
    snap = re.search(r"watch \S*/endpoints/: snapshot of \d+ keys at revision \d+: read in ([\d.]+) s, taken in "
                     r"([\d.]+) s", log)
    if snap:
        out["etcd_read"], out["validate_and_index"] = float(snap[1]), float(snap[2])
    full = re.search(r"peers: \d+ programmed, \d+ removed \(a full pass over \d+ entries\) in ([\d.]+) s", log)
    if full:
        out["first_full_pass"] = float(full[1])
    return out


def thread_names(root_pid: int) -> dict[int, str]:
    """OS thread id -> Python thread name, from py-spy (the bench extra's, next to this Python)."""
    spy, names = str(Path(sys.executable).with_name("py-spy")), {}
    for pid in process_tree(root_pid):   # one process per dump: --json shows only the first of --subprocesses
        try:
            done = subprocess.run([spy, "dump", "--json", "--nonblocking", "-p", str(pid)], capture_output=True,
                                  text=True, timeout=60)
            threads = json.loads(done.stdout)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            continue
        names.update({t["os_thread_id"]: str(t.get("thread_name") or "?") for t in threads
                      if isinstance(threads, list) and isinstance(t, dict) and isinstance(t.get("os_thread_id"), int)})
    return names


def cpu_by_thread(before: dict[int, tuple[str, float, float]], after: dict[int, tuple[str, float, float]],
                  names: dict[int, str]) -> dict[str, list[float]]:
    """Thread name -> [user s, system s] spent between the two readings, the busiest first."""
    out: dict[str, list[float]] = {}
    for tid, (comm, user, system) in after.items():
        _, user0, system0 = before.get(tid, (comm, 0.0, 0.0))
        name = re.sub(r"_\d+$", "", names.get(tid, comm))   # pool workers: one line per pool
        name = re.sub(r"^(dns(-tcp)?)-\d+$", r"\1", name)
        row = out.setdefault(name, [0.0, 0.0])
        row[0] += user - user0
        row[1] += system - system0
    rows = sorted(((k, [round(u, 2), round(s, 2)]) for k, (u, s) in out.items() if u + s > 0),
                  key=lambda kv: -sum(kv[1]))
    return dict(rows[:10])


def etcd_sent_bytes(url: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    m = re.search(r"^etcd_network_client_grpc_sent_bytes_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class Monitor:
    """Neighbour events in the network's namespace, timestamped as they arrive (time.monotonic)."""

    def __init__(self, h: DockerHost, vni: int) -> None:
        pin = f"{h.state_dir}/netns/pyo-{vni:06x}"
        self.proc = subprocess.Popen(["nsenter", "-t", str(h._holder_pid()), "-m", "--", "nsenter", f"--net={pin}",
                                      sys.executable, "-c", MONITOR], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        self.first: dict[tuple[str, str], float] = {}      # (kind, ip) -> first time seen (since reset)
        self.errors = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if parts[:1] == ["error"]:
                self.errors += 1
            elif len(parts) == 3:
                with self.lock:
                    self.first.setdefault((parts[1], parts[2]), float(parts[0]))

    def reset(self) -> None:
        with self.lock:
            self.first = {}

    def seen(self, kind: str, ip: str) -> float | None:
        with self.lock:
            return self.first.get((kind, ip))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def programmed(h: DockerHost, vni: int) -> int:
    script = (f"nsenter --net={h.state_dir}/netns/pyo-{vni:06x} ip neigh show dev vxlan0 nud permanent "
              f"2>/dev/null | wc -l")
    out = sh("nsenter", "-t", str(h._holder_pid()), "-m", "--", "sh", "-c", script, check=False).stdout.strip()
    return int(out or 0)


class Simulation:
    def __init__(self, store: KVStore, keys: Keys, nkey: str, hosts: int) -> None:
        self.store, self.keys, self.nkey, self.n = store, keys, nkey, hosts
        self.addresses: Iterator[ipaddress.IPv4Address] = iter(list(SUBNET.hosts())[300:])  # type: ignore[arg-type]
        self.endpoints: dict[str, tuple[int, str]] = {}    # key -> (host index, ip)
        self.born: dict[str, float] = {}                   # key -> when written
        self.leases: dict[int, int] = {}
        self.rng = random.Random(1)
        self.seq = 0
        self.dead: set[int] = set()
        self.lock = threading.Lock()   # the churn loop and the side work (kill) both change `endpoints`

    @staticmethod
    def vtep(i: int) -> str:
        return f"10.98.{i // 250}.{i % 250 + 1}"

    def endpoint(self, i: int) -> tuple[str, bytes, str]:
        ip = next(self.addresses)
        self.seq += 1
        eid = f"{self.seq:08x}".rjust(64, "e")
        rec = EndpointRecord(endpoint_id=eid, network_key=self.nkey, docker_network_id=f"{i:064x}", host=f"sim{i}",
                             vtep=self.vtep(i), mac=mac_from_ip(ip), address=f"{ip}/{SUBNET.prefixlen}",
                             name=f"c{self.seq}")
        AUTH.writer = f"sim{i}"    # each simulated host signs its own records
        key = self.keys.endpoint(self.nkey, eid)
        with self.lock:
            self.endpoints[key] = (i, str(ip))
            self.born[key] = time.monotonic()
        return key, rec.dump(), str(ip)

    def register(self, i: int) -> int:
        """Host i comes up with its 40 endpoints (one transaction, as fast as etcd takes it); returns bytes."""
        lease = self.store.grant(3600)
        self.leases[i] = lease
        AUTH.writer = f"sim{i}"
        host = HostRecord(host=f"sim{i}", vtep=self.vtep(i), port=4800, version="fleet", started=time.time())
        txn = Txn().put(self.keys.host(f"sim{i}"), host.dump())
        txn.put(self.keys.member(self.nkey, f"sim{i}"),
                MemberRecord(host=f"sim{i}", docker_network_id=f"{i:064x}").dump())
        size = 0
        for _ in range(PER_HOST):
            key, value, _ = self.endpoint(i)
            txn.put(key, value)
            size += len(value)
        self.store.commit(txn)
        self.store.put(self.keys.host(f"sim{i}"), host.dump(), lease=lease)
        return size

    def kill(self, i: int) -> list[str]:
        """Host i dies: its lease is revoked (its host record goes); returns its endpoints' addresses."""
        self.store.revoke(self.leases[i])
        with self.lock:
            self.dead.add(i)
            gone = [k for k, (host, _) in self.endpoints.items() if host == i]
            for k in gone:
                self.born.pop(k, None)
            return [self.endpoints.pop(k)[1] for k in gone]

    def arrive(self) -> tuple[str, str]:
        with self.lock:
            alive = [i for i in range(self.n) if i not in self.dead]
        key, value, ip = self.endpoint(self.rng.choice(alive))
        self.store.put(key, value)
        return "add", ip

    def leave(self) -> tuple[str, str]:
        """A random endpoint at least a second old goes: one written and deleted within one pass (0.1 s) is
        rightly never programmed, and the monitor would wait for it in vain."""
        with self.lock:
            old = time.monotonic() - 1.0
            key = self.rng.choice([k for k in self.endpoints if self.born[k] < old])
            _, ip = self.endpoints.pop(key)
            del self.born[key]
        self.store.delete(key)
        return "del", ip


def wait(what: str, cond, timeout: float) -> float:  # type: ignore[no-untyped-def]
    began = time.monotonic()
    while not cond():
        if time.monotonic() - began > timeout:
            raise TimeoutError(what)
        time.sleep(0.02)
    return time.monotonic() - began


def run(n: int, churn_seconds: float, profile: str | None = None) -> dict[str, object]:
    rig = Rig()
    mon = None
    try:
        rig.up(1, PYOVERLAY_CLUSTER_SECRET=SECRET, PYOVERLAY_DEAD_HOST_GRACE="15")
        h = rig.hosts[0]
        AUTH.configure(SECRET, "sim0")
        store = KVStore(EtcdConfig([rig.etcd.local_url], timeout=10))
        keys = Keys(rig.etcd_prefix)
        h.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", str(SUBNET),
                 "fleet")
        nkey = network_key(SUBNET, None)
        got = store.get(keys.network(nkey))
        assert got is not None
        vni = NetworkRecord.load(got.value, keys.network(nkey)).vni
        assert h.plugin is not None
        time.sleep(2)
        rss_idle, pss_idle = rss_mib(h.plugin.pid), pss_mib(h.plugin.pid)
        sim = Simulation(store, keys, nkey, n)
        mon = Monitor(h, vni)
        total = n * PER_HOST

        # 1. bring-up
        began = time.monotonic()
        record_bytes = sum(sim.register(i) for i in range(n)) / total
        written = time.monotonic() - began
        wait(f"{total} programmed", lambda: programmed(h, vni) >= total, timeout=600)
        bringup = time.monotonic() - began
        rss_full, pss_full = rss_mib(h.plugin.pid), pss_mib(h.plugin.pid)
        print(f"N={n}: {total} endpoints written in {written:.1f} s, all programmed {bringup:.2f} s after the "
              f"first write; RSS {rss_idle} -> {rss_full} MiB, PSS {pss_idle} -> {pss_full} MiB", flush=True)

        # 2. burst: 1,000 leave, 1,000 arrive
        mon.reset()
        began = time.monotonic()
        changes = [sim.leave() for _ in range(1000)] + [sim.arrive() for _ in range(1000)]
        burst_written = time.monotonic() - began
        try:
            burst_after = wait("burst", lambda: all(mon.seen(k, ip) is not None for k, ip in changes), timeout=120)
        except TimeoutError:
            missing = [(k, ip) for k, ip in changes if mon.seen(k, ip) is None]
            raise TimeoutError(f"{len(missing)} of {len(changes)} changes not seen in the kernel: {missing[:10]}; "
                               f"monitor errors {mon.errors}; plugin log: {h.plugin_log()[-3000:]}") from None
        burst_total = burst_written + burst_after
        print(f"N={n}: 2,000 changes written one by one in {burst_written:.2f} s, all in the kernel "
              f"{burst_after:.2f} s after the last write", flush=True)

        # 3. idle for 10 s (the cost of being there), then churn at 100/s, 2 hosts die, a network comes and goes
        cpu0, idle0 = cpu_seconds(h.plugin.pid), time.monotonic()
        time.sleep(10)
        idle_pct = round(100 * (cpu_seconds(h.plugin.pid) - cpu0) / (time.monotonic() - idle0), 1)
        mon.reset()
        cpu0, sent0 = cpu_seconds(h.plugin.pid), etcd_sent_bytes(rig.etcd.local_url)
        threads0 = thread_cpu(h.plugin.pid)
        written_at: list[tuple[str, str, float]] = []
        side: dict[str, float] = {}
        dead: list[str] = []

        def side_work() -> None:
            time.sleep(churn_seconds / 4)
            side["killed_at"] = time.monotonic()
            dead.extend(ip for i in (0, 1) for ip in sim.kill(i))
            t = time.monotonic()
            h.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet",
                     "10.65.0.0/24", "fleet2")
            side["network_create_s"] = round(time.monotonic() - t, 2)
            t = time.monotonic()
            h.docker("network", "rm", "fleet2")
            side["network_rm_s"] = round(time.monotonic() - t, 2)

        worker = threading.Thread(target=side_work)
        worker.start()
        spy = None
        if profile:   # where the plugin's time goes during the churn (py-spy, collapsed stacks of the GIL holder)
            spy_bin = str(Path(sys.executable).with_name("py-spy"))   # the bench extra's, next to this Python
            spy = subprocess.Popen([spy_bin, "record", "--format", "raw", "-o", f"{profile}/fleet-{n}.txt", "--gil",
                                    "-d", str(int(churn_seconds)), "-p", str(h.plugin.pid), "--subprocesses",
                                    "-r", "50"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        began = time.monotonic()
        count = int(churn_seconds * CHURN_RATE)
        for c in range(count):
            due = began + c / CHURN_RATE
            if (pause := due - time.monotonic()) > 0:
                time.sleep(pause)
            kind, ip = sim.leave() if c % 2 else sim.arrive()
            written_at.append((kind, ip, time.monotonic()))
        worker.join()
        if spy is not None:
            spy.wait(timeout=120)
        try:
            wait("churn", lambda: all(mon.seen(k, ip) is not None for k, ip, _ in written_at), timeout=120)
        except TimeoutError:
            missing = [(k, ip) for k, ip, _ in written_at if mon.seen(k, ip) is None]
            raise TimeoutError(f"{len(missing)} of {len(written_at)} changes not seen in the kernel: {missing[:10]}, "
                               f"plugin log: {h.plugin_log()[-3000:]}") from None
        churn_wall = time.monotonic() - began
        cpu = cpu_seconds(h.plugin.pid) - cpu0
        threads = cpu_by_thread(threads0, thread_cpu(h.plugin.pid), thread_names(h.plugin.pid))
        sent = etcd_sent_bytes(rig.etcd.local_url) - sent0
        # The dead hosts' endpoints go when the real host declares them departed (grace 15 s here).
        wait("departed", lambda: all(mon.seen("del", ip) is not None for ip in dead), timeout=180)
        departed = max(mon.seen("del", ip) or 0.0 for ip in dead) - side.pop("killed_at")
        lat = [max(0.0, (mon.seen(k, ip) or 0.0) - t) * 1000 for k, ip, t in written_at]
        lat_stats = summary(lat, 1)
        print(f"N={n}: churn {count} changes at {CHURN_RATE:.0f}/s: write->kernel p50 {lat_stats['p50']} ms p99 "
              f"{lat_stats['p99']} ms; plugin CPU {cpu:.1f} s over {churn_wall:.1f} s "
              f"({100 * cpu / churn_wall:.1f}% of a core; idle {idle_pct}%); etcd sent {sent / count:.0f} B per "
              f"change; CPU s by thread: {threads}", flush=True)

        # 4. restart with every record in etcd
        h.kill_plugin()
        h.start_plugin()
        mon.reset()
        began = time.monotonic()
        if profile:   # where the restarted plugin's time goes, every thread (py-spy, collapsed stacks)
            spy = subprocess.Popen([spy_bin, "record", "--format", "raw", "-o", f"{profile}/fleet-{n}-restart.txt",
                                    "-d", "5", "-p", str(h.plugin.pid), "--subprocesses", "-r", "200"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kind, ip = sim.arrive()
        restart = wait("restart", lambda: mon.seen("add", ip) is not None, timeout=120)
        time.sleep(2)
        if profile and spy is not None:
            spy.wait(timeout=60)
        restart_log = h.plugin_log()[h._log_mark:]
        (RESULTS / f"fleet-{n}-restart.log").write_text(restart_log)
        split = restart_split(restart_log)
        print(f"N={n}: restarted plugin programmed a new endpoint {restart:.2f} s after its socket was back; "
              f"where the time went (its log): {split}", flush=True)
        # The case: 100 endpoints added one by one to a plugin restarted with every record in etcd
        # (before the message limit was raised, none was programmed within 30 s).
        after = []
        for _ in range(100):
            kind, ip = sim.arrive()
            after.append((ip, time.monotonic()))
            time.sleep(0.05)
        wait("after restart", lambda: all(mon.seen("add", ip) is not None for ip, _ in after), timeout=60)
        after_stats = summary([max(0.0, (mon.seen("add", ip) or 0.0) - t) * 1000 for ip, t in after], 1)
        print(f"N={n}: then 100 endpoints written one by one: write->kernel p50 {after_stats['p50']} ms, "
              f"p99 {after_stats['p99']} ms", flush=True)
        rss_end = rss_mib(h.plugin.pid) if h.plugin is not None else 0.0
        pss_end = pss_mib(h.plugin.pid) if h.plugin is not None else 0.0
        store.close()
        return {"hosts": n, "endpoints": total, "record_bytes": round(record_bytes),
                "bringup_write_s": round(written, 2), "bringup_programmed_s": round(bringup, 2),
                "burst_2000_s": round(burst_total, 2), "burst_write_s": round(burst_written, 2),
                "burst_after_last_write_s": round(burst_after, 2), "churn_changes": count,
                "churn_latency_ms": lat_stats,
                "churn_cpu_s": round(cpu, 2), "churn_wall_s": round(churn_wall, 2),
                "churn_cpu_pct_core": round(100 * cpu / churn_wall, 1), "idle_cpu_pct_core": idle_pct,
                "churn_cpu_s_by_thread": threads,
                "etcd_bytes_per_change": round(sent / count), "restart_new_endpoint_s": round(restart, 2),
                "restart_split_s": split, "after_restart_latency_ms": after_stats,
                "rss_idle_mib": rss_idle, "rss_full_mib": rss_full, "rss_after_restart_mib": rss_end,
                "pss_idle_mib": pss_idle, "pss_full_mib": pss_full, "pss_after_restart_mib": pss_end,
                "departed_after_lease_s": round(departed, 1), "monitor_errors": mon.errors, **side}
    finally:
        if mon is not None:
            mon.stop()
        rig.down()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, nargs="+", default=[100, 500, 1000])
    ap.add_argument("--churn", type=float, default=20.0, help="seconds of churn at 100 changes/s")
    ap.add_argument("--profile", help="a directory: py-spy's collapsed stacks of the plugin during the churn")
    ap.add_argument("--plot", action="store_true",
                    help="only write the table and plots again from bench/results/fleet.json")
    args = ap.parse_args()
    if args.plot:
        report(json.loads((RESULTS / "fleet.json").read_text())["results"])
        return 0
    results = []
    for n in args.hosts:
        results.append(run(n, args.churn, args.profile))
        print(json.dumps(results[-1]), flush=True)
    report(results)
    return 0


def report(results: list[dict[str, Any]]) -> None:
    """bench/results/fleet.json, the table in docs/bench/fleet.md and the plots."""
    rows = [[r["hosts"], r["endpoints"], r["bringup_programmed_s"], r["burst_2000_s"],
             r["churn_latency_ms"]["p50"], r["churn_latency_ms"]["p99"], r["churn_cpu_pct_core"],
             r["idle_cpu_pct_core"], r["etcd_bytes_per_change"], r["restart_new_endpoint_s"],
             r.get("after_restart_latency_ms", {}).get("p99", "-"), r["rss_idle_mib"],
             r["rss_full_mib"], r.get("pss_idle_mib", "-"), r.get("pss_full_mib", "-")]
            for r in results]
    md = ("One real host (dockerd + pyoverlay + kernel) and the signed etcd records of N simulated hosts x "
          f"{PER_HOST} endpoints on one /16 network (`bench/fleet.py`).\n\n"
          + table(["hosts", "remote endpoints", "all programmed s", "2,000 changes s", "churn p50 ms",
                   "churn p99 ms", "CPU % of a core at 100 changes/s", "idle CPU %", "etcd bytes per change",
                   "restart: new endpoint s", "after restart: new endpoints p99 ms",
                   "RSS idle MiB", "RSS all MiB", "PSS idle MiB", "PSS all MiB"], rows)
          + "\nRSS sums the gunicorn master's and the worker's resident pages, counting the pages they share "
          "(the interpreter, forked) twice; PSS counts each shared page once.\n")
    save("fleet", {"results": results}, md)
    plot(results)


def plot(results: list[dict[str, Any]]) -> None:
    """docs/bench/fleet-convergence.png and fleet-memory.png: the figures against N (matplotlib: the bench
    extra, `pip install -e '.[bench]'`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r["hosts"])
    n = [r["hosts"] for r in results]

    def draw(ax: Any, ylabel: str, series: list[tuple[str, str, list[float]]]) -> None:
        for style, label, values in series:
            ax.plot(n, values, style, label=label)
        ax.set_xlabel(f"hosts (x {PER_HOST} endpoints)")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    right.axhline(200, color="grey", linestyle=":", label="goal p99")
    draw(left, "seconds", [
        ("o-", "all written and programmed (s)", [r["bringup_programmed_s"] for r in results]),
        ("v-", "all programmed: after the last write (s)",
         [round(r["bringup_programmed_s"] - r["bringup_write_s"], 2) for r in results]),
        ("s-", "restart: new endpoint (s)", [r["restart_new_endpoint_s"] for r in results]),
        ("^-", "2,000 changes: after last write (s)", [r["burst_after_last_write_s"] for r in results])])
    draw(right, "ms from write to kernel, 100 changes/s", [
        ("o-", "p50", [r["churn_latency_ms"]["p50"] for r in results]),
        ("s-", "p99", [r["churn_latency_ms"]["p99"] for r in results])])
    fig.suptitle("pyoverlay: one real host following a simulated fleet (bench/fleet.py)")
    fig.tight_layout()
    fig.savefig(DOCS / "fleet-convergence.png", dpi=100)
    fig, ax = plt.subplots(figsize=(6, 4))
    memory = [("o-", "idle", [r["rss_idle_mib"] for r in results]),
              ("s-", "every remote endpoint programmed", [r["rss_full_mib"] for r in results]),
              ("^-", "after a restart", [r["rss_after_restart_mib"] for r in results])]
    if all("pss_full_mib" in r for r in results):   # results from before PSS was measured have none
        memory.append(("d--", "PSS, every remote endpoint programmed", [r["pss_full_mib"] for r in results]))
    draw(ax, "plugin RSS, MiB (gunicorn master + worker)", memory)
    fig.tight_layout()
    fig.savefig(DOCS / "fleet-memory.png", dpi=100)
    print(f"wrote {DOCS / 'fleet-convergence.png'} and {DOCS / 'fleet-memory.png'}")


if __name__ == "__main__":
    sys.exit(main())
