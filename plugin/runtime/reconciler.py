"""The reconciler: at start and periodically, bring etcd and the kernel in line with what should exist.

Repairs (always safe, run even while etcd is away): a network namespace, bridge or VXLAN device that is
missing is re-created from this host's records; peers missing from the kernel are programmed again; the
VXLAN filter is put back.

Removals (only from a healthy etcd and, for what Docker owns, a reachable Docker API; never guesses):
- a namespace, veth or host link tagged by pyoverlay that no network or endpoint owns;
- an endpoint record of this host in etcd that this host does not have;
- an endpoint, its address and record, that Docker no longer has (the plugin missed DeleteEndpoint);
- an address this host allocated that no endpoint holds and Docker does not use (RequestAddress answered,
  then the plugin or Docker died before CreateEndpoint);
- a network Docker no longer has (the plugin missed DeleteNetwork).
A candidate is removed only once it has stayed a candidate for the grace period: a container being
started right now holds an address before its endpoint exists, and an endpoint before Docker stores it.
`pyoverlay gc` shows the candidates and removes them at once on request.
Hosts that left the cluster are released by plugin/cluster/departures.py.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import docker.errors

from ipam.subnets import NETWORK_OPT, pool_id, usable
from kvstore import KV, Keys, Store, StoreError
from kvstore.records import AddressRecord, NetworkRecord, PoolRecord
from plugin import metrics
from plugin.cluster.encryption import Encryption
from plugin.cluster.peers import PeerSync
from plugin.docker.api import API_ERRORS, DockerAPI
from plugin.driver.garbage import Garbage, kernel_garbage, remove_kernel_garbage
from plugin.driver.networks import NetworkDriver
from plugin.errors import short_id
from plugin.kernel.datapath import DataPath
from plugin.kernel.vtepfilter import VtepFilter
from plugin.state import LocalState

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, driver: NetworkDriver, datapath: DataPath, peers: PeerSync, state: LocalState,
                 store: Store, keys: Keys, host: str, docker: DockerAPI | None, vtep_filter: VtepFilter | None,
                 grace: float, encryption: Encryption) -> None:
        self.driver = driver
        self.datapath = datapath
        self.peers = peers
        self.state = state
        self.store = store
        self.keys = keys
        self.host = host
        self.docker = docker          # None in swarm: the managers own addresses there
        self.vtep_filter = vtep_filter
        self.grace = grace
        self.encryption = encryption
        self._guard_down: set[int] = set()   # encrypted VNIs whose VXLAN this reconciler took down
        self._suspects: dict[Garbage, float] = {}
        self._lock = threading.Lock()  # one pass at a time (periodic and `pyoverlay gc`)
        self.last: dict[str, Any] = {}

    # -- repairs ----------------------------------------------------------------------------------------

    def repair_guard(self) -> list[str]:
        """Encrypted networks fail closed: while any part of the guard is missing their VXLAN devices are down;
        the guard and the peers' policies are put back, checked, and only then are they up again (and their
        peers re-programmed). Devices taken down are remembered, so a later pass brings them up."""
        missing = self.encryption.guard_missing()
        if missing:
            vnis = sorted(self.encryption.vnis)
            log.error("encryption guard: %s missing (a firewall reload?); VXLAN of encrypted networks %s down "
                      "until it is back", ", ".join(missing), vnis)
            metrics.GUARD_LOST.inc()
            for vni in vnis:
                self.datapath.set_vxlan_up(vni, False)
            self._guard_down.update(vnis)
            try:
                self.encryption.repair_guard()
                self.peers.full_pass()  # per-peer policies and states come back with a sync
            except Exception as err:  # noqa: BLE001 - they stay down; retried next pass
                log.error("encryption guard: could not re-install it (%s); encrypted networks stay down", err)
                return [f"encryption guard missing ({', '.join(missing)}); re-installing failed: {err}"]
            still = self.encryption.guard_missing()
            if still:
                return [f"encryption guard still missing after re-installing: {', '.join(still)}"]
        if not self._guard_down:
            return []
        for vni in sorted(self._guard_down):
            self.datapath.set_vxlan_up(vni, True)
        up, self._guard_down = set(self._guard_down), set()
        self.peers.full_pass()
        self.peers.verify_kernel(force=up)  # a device taken down lost its neighbour entries
        metrics.RECONCILE_REPAIRS.labels("encryption-guard").inc()
        gone = f" ({', '.join(missing)} had gone)" if missing else ""
        return [f"encryption guard re-installed{gone}; encrypted networks up again"]

    def repair(self) -> list[str]:
        done = self.repair_guard()
        remade = set()
        for local in self.state.networks():
            vni = local.record.vni
            if not self.datapath.has_network(vni):
                try:
                    self.datapath.ensure_network(self.driver.plan(local.record, local.mtu))
                    remade.add(vni)
                    done.append(f"network {local.record.key} (vni {vni}): namespace/devices re-created")
                    metrics.RECONCILE_REPAIRS.labels("network").inc()
                except Exception as err:  # noqa: BLE001 - reported; retried next pass
                    log.error("reconcile: re-creating network %s (vni %d): %s", local.record.key, vni, err)
        for vni in self.peers.verify_kernel(force=remade):   # a re-created device has no entries yet
            done.append(f"vni {vni}: peers missing from the kernel programmed again")
            metrics.RECONCILE_REPAIRS.labels("peers").inc()
        vf = self.vtep_filter
        if vf is not None and self.peers.synced and not vf.present():
            lost = vf.applied  # installed before: the kernel lost it (a firewall reload, say)
            if vf.refresh() and lost:
                done.append("VXLAN filter of registered VTEPs re-installed")
                metrics.RECONCILE_REPAIRS.labels("vtep-filter").inc()
        for line in done:
            log.warning("reconcile: %s", line)
        return done

    # -- garbage ----------------------------------------------------------------------------------------

    def candidates(self, addrs: list[KV]) -> list[Garbage]:
        """What nothing owns any more, given every address record (read from etcd this pass)."""
        out: list[Garbage] = []
        networks, endpoints = self.state.snapshot()
        out += kernel_garbage(self.datapath, networks, endpoints)
        if self.peers.synced:  # etcd's endpoint records, as the peers' watch holds them
            for key, rec in self.peers.endpoint_records().items():
                if rec.host == self.host and rec.endpoint_id not in endpoints:
                    out.append(Garbage("endpoint-record", f"endpoint {short_id(rec.endpoint_id)} ({rec.address})",
                                       "etcd has it, this host does not", ("endpoint-record", key)))
        out += self._docker_candidates(networks, endpoints, addrs)
        return out

    def _docker_candidates(self, networks: dict[str, Any], endpoints: dict[str, Any],
                           addrs: list[KV]) -> list[Garbage]:
        """What Docker no longer has. Nothing when Docker cannot be asked."""
        if self.docker is None:
            return []
        try:
            out, used, docker_eps = self._docker_networks(self.docker, networks)
        except API_ERRORS as err:
            log.debug("reconcile: Docker API unavailable (%s); nothing Docker owns is judged", err)
            return []
        held: dict[str, str] = {}          # pool id + address -> endpoint holding it here
        for eid, ep in endpoints.items():
            local = networks.get(ep.record.docker_network_id)
            if local is None:
                continue
            for addr in (ep.record.address, ep.record.address6):
                if addr:
                    ifc = ipaddress.ip_interface(addr)
                    held[f"{_pool(local.record, ifc.network)}/{ifc.ip}"] = eid
            if eid not in docker_eps and ep.record.docker_network_id in used:
                out.append(Garbage("endpoint", f"endpoint {short_id(eid)} ({ep.record.address or ep.record.address6})",
                                   "Docker no longer has this endpoint", ("endpoint", eid)))
        return out + self._address_garbage(networks, addrs, held, used)

    @staticmethod
    def _docker_networks(api: DockerAPI, networks: dict[str, Any]
                         ) -> tuple[list[Garbage], dict[str, set[str]], set[str]]:
        """Docker's view of this host's networks: those it no longer has (garbage), the addresses its endpoints
        hold per network, and its endpoint IDs. Raises API_ERRORS when Docker cannot be asked."""
        out: list[Garbage] = []
        used: dict[str, set[str]] = {}      # docker network id -> addresses Docker's endpoints hold
        docker_eps: set[str] = set()
        for nid, local in networks.items():
            try:
                info = api.client.api.inspect_network(nid)
            except docker.errors.NotFound:
                out.append(Garbage("network", f"network {local.record.key} ({short_id(nid)})",
                                   "Docker no longer has this network", ("network", nid)))
                continue
            ips = set()
            for c in (info.get("Containers") or {}).values():
                docker_eps.add(c.get("EndpointID", ""))
                for field in ("IPv4Address", "IPv6Address"):
                    if c.get(field):
                        ips.add(str(ipaddress.ip_interface(c[field]).ip))
            used[nid] = ips
        return out, used, docker_eps

    def _address_garbage(self, networks: dict[str, Any], addrs: list[KV], held: dict[str, str],
                         used: dict[str, set[str]]) -> list[Garbage]:
        """This host's address records in its networks' pools that no endpoint holds and Docker does not use."""
        out: list[Garbage] = []
        pools = {_pool(local.record, ipaddress.ip_network(cidr)): local.docker_network_id
                 for local in networks.values() for cidr in local.record.subnets}
        for kv in addrs:
            pid = kv.key.split("/")[-2]
            if pid not in pools:
                continue
            try:
                rec = AddressRecord.load(kv.value, kv.key)
            except ValueError:
                continue
            if rec.kind != "endpoint" or rec.host != self.host or f"{pid}/{rec.address}" in held:
                continue
            if rec.address in used.get(pools[pid], set()):
                continue
            out.append(Garbage("address", f"address {rec.address} in {pid}" + (
                f" (for {rec.owner})" if rec.owner else ""), "no endpoint holds it and Docker does not use it",
                ("address", pid, rec.address)))
        return out

    def _remove(self, g: Garbage) -> None:
        if remove_kernel_garbage(self.datapath, g):
            return
        kind, *ref = g.ref
        if kind == "endpoint-record":
            self.store.delete(ref[0])
        elif kind == "endpoint":
            ep = self.state.endpoint(ref[0])
            if ep is None:
                return
            local = self.state.network(ep.record.docker_network_id)
            self.driver.delete_endpoint(ep.record.docker_network_id, ref[0])
            if local is not None:
                for addr in (ep.record.address, ep.record.address6):
                    if addr:
                        ifc = ipaddress.ip_interface(addr)
                        self.driver.ipam.release_address(_pool(local.record, ifc.network), str(ifc.ip))
        elif kind == "address":
            self.driver.ipam.release_address(ref[0], ref[1])
        elif kind == "network":
            self.driver.delete_network(ref[0])

    # -- one pass ---------------------------------------------------------------------------------------

    def run(self, force: bool = False, dry_run: bool = False) -> dict[str, Any]:
        """Repair, then remove garbage that has been garbage for the grace period (force: all of it)."""
        with self._lock:
            started = time.monotonic()
            result: dict[str, Any] = {"repaired": [] if dry_run else self.repair(), "removed": [], "waiting": [],
                                      "etcd": "ok", "grace": self.grace}
            try:
                # One read of every address record per pass: for the garbage and for the pool metrics. When it
                # fails, nothing is judged.
                addrs, _ = self.store.range(self.keys.all_addrs())
                found = self.candidates(addrs)
            except StoreError as err:
                # Never remove anything on a partial view: an unreachable etcd looks like an empty cluster.
                result["etcd"] = f"unreachable: {err}"
                metrics.RECONCILE_RUNS.labels("etcd-unreachable").inc()
                self.last = result
                return result
            now = time.monotonic()
            self._suspects = {g: self._suspects.get(g, now) for g in found}
            for g, since in list(self._suspects.items()):
                entry = {**asdict(g), "for_seconds": round(now - since, 1)}
                if dry_run or not (force or now - since >= self.grace):
                    result["waiting"].append(entry)
                    continue
                try:
                    self._remove(g)
                except Exception as err:  # noqa: BLE001 - one failure must not stop the rest
                    log.error("reconcile: removing %s: %s", g.what, err)
                    entry["error"] = str(err)
                    result["waiting"].append(entry)
                    continue
                log.warning("reconcile: removed %s (%s, for %.0fs)", g.what, g.why, now - since)
                metrics.RECONCILE_REPAIRS.labels(g.kind).inc()
                result["removed"].append(entry)
                self._suspects.pop(g, None)
            self.pool_usage(addrs)
            metrics.RECONCILE_RUNS.labels("ok").inc()
            result["seconds"] = round(time.monotonic() - started, 3)
            if not dry_run:
                self.last = result
            return result

    def pool_usage(self, addrs: list[KV]) -> None:
        """Addresses in use and usable per pool, for the metrics."""
        used = Counter(kv.key.split("/")[-2] for kv in addrs)
        for kv in self.store.range(self.keys.pools())[0]:
            try:
                rec = PoolRecord.load(kv.value, kv.key)
            except ValueError:
                continue
            first, last = usable(ipaddress.ip_network(rec.cidr),
                                 ipaddress.ip_network(rec.ip_range) if rec.ip_range else None)
            metrics.IPAM_USED.labels(rec.pool_id).set(used[rec.pool_id])
            metrics.IPAM_SIZE.labels(rec.pool_id).set(last - first + 1)


def _pool(record: NetworkRecord, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """The IPAM pool of one of a network's subnets."""
    return pool_id(net, record.options.get(NETWORK_OPT))
