"""Wires the pieces together inside the serving process and runs the background work.

The socket is already listening when this starts (gunicorn's master binds it), so nothing here may be
slow on the way to `ready`: restoring the data path needs only the local state file and the kernel. etcd
work (host registration, queued changes, republishing) happens afterwards, in the background, and keeps
retrying while etcd is away.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ipam.allocator import DefaultPools, Ipam
from kvstore import Keys, KVStore, StoreError
from kvstore.records import AUTH, QUARANTINE, HostRecord
from plugin import __version__, metrics
from plugin.cluster.departures import Departures
from plugin.cluster.encryption import Encryption
from plugin.cluster.keyring import KeyRing
from plugin.cluster.peers import PeerSync
from plugin.config import Settings
from plugin.dns.names import NameService
from plugin.docker.aliases import AliasPublisher
from plugin.docker.api import DockerAPI, DockerWatch, Listener, Resync, socket_name
from plugin.docker.propagation import Propagation
from plugin.driver.networks import NetworkDriver
from plugin.errors import Unavailable, short_id
from plugin.kernel.datapath import DataPath
from plugin.kernel.ipsec import IPsec
from plugin.kernel.vtepfilter import VtepFilter
from plugin.ops import cluster_view, doctor
from plugin.runtime.reconciler import Reconciler
from plugin.state import LocalState

log = logging.getLogger(__name__)


def _nothing(*_: object) -> None:
    pass


class Runtime:
    """Builds every component in three steps (this host's own, the cluster's, the repair), each getting what it
    needs at construction, and runs the background loops (see docs/architecture.md, Threads)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.etcd_prefix)
        AUTH.configure(settings.cluster_secret, settings.host)  # records this host writes and reads
        self.store = KVStore(settings.etcd(), observe=metrics.observe_etcd, health_key=self.keys.health())
        self.state = LocalState(settings.state_dir / "state.json")
        self.datapath = DataPath(settings.netns_dir, settings.host, settings.vtep)
        self._build_host()
        self._build_cluster()
        self._build_repair()
        self.ready = threading.Event()
        self.stage = "starting"
        self.lease: int | None = None
        self._published: bytes | None = None
        self.started = time.time()
        self.synced = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="runtime", daemon=True)
        self._reconcile_thread = threading.Thread(target=self._reconcile_loop, name="reconciler", daemon=True)
        # The lease's keepalive alone on a thread of its own: rotation, republishing or a slow etcd call on
        # the background thread must not let it expire (other hosts would see this one leave).
        self._lease_thread = threading.Thread(target=self._lease_loop, name="lease", daemon=True)
        self._lease_lock = threading.Lock()

    def _build_host(self) -> None:
        """This host's calls: addresses, keys, the driver."""
        settings = self.settings
        defaults = DefaultPools(settings.default_pool[0], settings.default_pool[1],
                                settings.default_pool6[0], settings.default_pool6[1])
        self.ipam = Ipam(self.store, self.keys, settings.host, defaults, self.datapath.host_routes,
                         swarm=settings.scope == "global")
        self.encryption = Encryption(KeyRing(settings.state_dir / "keys"), IPsec(), settings.host,
                                     lambda: self.datapath.underlay().address, settings.esp_port,
                                     settings.cluster_secret, settings.key_rotation, settings.key_bits)
        self.driver = NetworkDriver(settings, self.store, self.keys, self.datapath, self.state, self.ipam,
                                    self.encryption, network_changed=self._network_changed)

    def _build_cluster(self) -> None:
        """Other hosts: their endpoints (peers), and on plain Docker names across hosts and networks on every
        host; the names and the VTEP filter follow the peers."""
        settings = self.settings
        self.names = NameService(self.store, self.keys, self.state, self.datapath, settings.dns_upstreams,
                                 settings.dns_address) \
            if settings.dns else None
        self.vtep_filter = VtepFilter([settings.vxlan_port, settings.esp_port], self._vteps) \
            if settings.vtep_filter else None
        self.peers = PeerSync(self.store, self.keys, self.datapath, self.state, settings.host, self.encryption,
                              names=self.names.changed if self.names is not None else _nothing,
                              hosts_changed=self._hosts_changed, acks_changed=self.wake)
        self.propagation, self.docker = self._docker_consumers()

    def _build_repair(self) -> None:
        """The reconciler and the departures of dead hosts."""
        settings = self.settings
        # Its own Docker client: the reconciler's calls must not queue behind the event worker's.
        reconcile_docker = DockerAPI(settings.docker_host, socket_name(settings.socket), settings.docker_name) \
            if settings.scope == "local" else None
        self.reconciler = Reconciler(self.driver, self.datapath, self.peers, self.state, self.store, self.keys,
                                     settings.host, reconcile_docker, self.vtep_filter, settings.reconcile_grace,
                                     self.encryption)
        self.departures = Departures(self.store, self.keys, settings.host, settings.dead_host_grace,
                                     [self._forget_endpoints, self.ipam.forget_host])

    def start(self) -> None:
        if self.settings.metrics_addr:
            try:
                metrics.serve(self.settings.metrics_addr)
            except OSError as err:  # a second instance on this address, say: serve the plugin anyway
                log.error("metrics on %s: %s", self.settings.metrics_addr, err)
        QUARANTINE.on_refuse = lambda kind: metrics.INVALID_RECORDS.labels(kind).inc()
        metrics.KEY_EPOCH_AGE.set_function(lambda: time.time() - self.encryption.rotated_at)
        if self.vtep_filter is not None:
            metrics.VXLAN_STRANGERS.set_function(lambda: max(0, self.vtep_filter.dropped()) if self.vtep_filter else 0)
        self._thread.start()
        self._reconcile_thread.start()
        self._lease_thread.start()

    def _docker_consumers(self) -> tuple[Propagation | None, DockerWatch | None]:
        """What follows Docker's events: propagation (networks on every host) and the alias publisher (names);
        one event stream and worker for both, whose queue propagation also asks for resyncs through."""
        settings, resync = self.settings, Resync()
        propagation = Propagation(self.store, self.keys, self.state, settings.host, resync) \
            if settings.propagate else None
        listeners: list[Listener] = [propagation] if propagation is not None else []
        if self.names is not None:
            listeners.append(AliasPublisher(self.store, self.keys, self.state, settings.host,
                                            self.names.current_aliases))
        if not listeners:
            return propagation, None
        api = DockerAPI(settings.docker_host, socket_name(settings.socket), settings.docker_name)
        return propagation, DockerWatch(api, listeners, resync)

    def _vteps(self) -> set[str]:
        """VTEPs that may send us VXLAN: every known host's (live, or not yet departed), and ours."""
        known = dict(self.peers.known)   # one copy: the watch thread may change it meanwhile
        return {h.vtep for h in known.values()} | {self.datapath.underlay().address}

    def _hosts_changed(self, hosts: dict[str, HostRecord]) -> None:
        # Called on every host record change (key rotations, acks): only a changed set of VTEPs reaches nft,
        # and never on the watch's thread, which programs the peers and their keys.
        if self.vtep_filter is not None:
            self.vtep_filter.sync_later()

    def _reconcile_loop(self) -> None:
        """At start (once the data path is restored and the watches hold a full view), then periodically."""
        self.ready.wait()
        deadline = time.monotonic() + 30
        while not self.peers.synced and time.monotonic() < deadline and not self._stop.is_set():
            self._stop.wait(0.2)
        while not self._stop.is_set():
            try:
                self.reconciler.run()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("reconcile pass failed")
            self._stop.wait(self.settings.reconcile_interval)

    def _network_changed(self) -> None:
        self.peers.network_changed()
        if self.names is not None:
            self.names.networks_changed()
        if self.docker is not None:
            self.docker.kick()

    def status(self) -> dict[str, Any]:
        """What `pyoverlay status` shows: the plugin's own view, and one etcd round trip."""
        try:
            etcd: dict[str, Any] = {"healthy": True, "latency_ms": round(self.store.health() * 1000, 2), "error": ""}
        except StoreError as err:
            etcd = {"healthy": False, "latency_ms": None, "error": str(err)}
        etcd["endpoints"] = self.settings.etcd_endpoints or ["embedded"]
        etcd["watches"] = {True: "JSON gateway", False: "gRPC stream", None: "not started"}[self.store.gateway]
        etcd["pending_changes"] = len(self.state.take_pending())
        enc = self.encryption
        return {
            "etcd": etcd,
            "endpoints": [{"endpoint_id": short_id(e.record.endpoint_id), "network": e.record.network_key,
                           "address": e.record.address, "address6": e.record.address6, "mac": e.record.mac,
                           "joined": e.joined, "container": e.record.name}
                          for e in self.state.endpoints()],
            "keys": {"epoch": enc.keyring.epoch, "age_seconds": round(time.time() - enc.rotated_at),
                     "rotation_seconds": enc.rotation, "peers_acked": dict(enc.seen),
                     "waiting_for": enc.lagging(), "refused": dict(enc.refused)},
            "vtep_filter": None if self.vtep_filter is None else {
                "present": self.vtep_filter.present(), "dropped": self.vtep_filter.dropped(),
                "backend": self.vtep_filter.describe(),
                "error": self.vtep_filter.error, "vteps": sorted(self._vteps())},
            "reconcile": {k: self.reconciler.last.get(k) for k in ("removed", "repaired", "waiting", "etcd")},
            "live_hosts": sorted(self.peers.hosts),
            "host": self.settings.host, "stage": self.stage, "scope": self.settings.scope,
            "networks": {n.record.key: {"docker_id": short_id(n.docker_network_id), "vni": n.record.vni, "mtu": n.mtu,
                                        "encrypted": n.record.encrypted, "subnets": n.record.subnets}
                         for n in self.state.networks()},
            "peers": {str(vni): {"expected": e, "programmed": p} for vni, (e, p) in self.peers.counts().items()},
            "docker_api": None if self.docker is None else {
                "connected": self.docker.api.connected.is_set(), "error": self.docker.api.last_error},
            "propagation": None if self.propagation is None else self.propagation.status(),
            "dns": None if self.names is None else self.names.status(),
        }

    def inspect(self, name: str) -> dict[str, Any]:
        try:
            return cluster_view.inspect(name, self.store, self.keys, self.state, self.reconciler.docker)
        except StoreError as err:
            raise Unavailable(f"cluster store unavailable: {err}") from err

    def doctor(self) -> list[dict[str, Any]]:
        return doctor.run_all(self.settings, self.store, self.datapath, self.state, self.reconciler.docker,
                              self.vtep_filter, self.peers.counts)

    def gc(self, apply: bool) -> dict[str, Any]:
        """`pyoverlay gc`: what the reconciler would remove (apply: remove it now, without the grace period)."""
        return self.reconciler.run(force=True) if apply else self.reconciler.run(dry_run=True)

    def wake(self) -> None:
        """Run the background work now rather than at the next interval (a record to publish)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for part in (self.docker, self.propagation, self.names):
            if part is not None:
                part.stop()
        self.peers.stop()
        self._thread.join(timeout=5)

    def wait_ready(self, timeout: float = 10.0) -> None:
        if not self.ready.wait(timeout):
            raise Unavailable(f"pyoverlay is still starting ({self.stage}); try again in a moment")

    def _run(self) -> None:
        self.stage = "restoring the data path"
        try:
            self.datapath.underlay()
        except Exception as err:  # noqa: BLE001 - reported on every call until fixed
            log.error("underlay: %s", err)
        try:
            self.driver.restore()
        except Exception:  # noqa: BLE001
            log.exception("restoring the data path failed; serving anyway")
        self.stage = "ready"
        self.ready.set()
        self.peers.start()
        for part in (self.names, self.propagation, self.docker):
            if part is not None:
                part.start()
        log.info("ready: host=%s scope=%s state=%s", self.settings.host, self.settings.scope,
                 self.settings.state_dir)
        interval = max(1.0, self.settings.lease_ttl / 3)
        while not self._stop.is_set():
            try:
                self._tick()
            except StoreError as err:
                log.debug("background etcd work postponed: %s", err)
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("background work failed")
            self._wake.wait(interval)
            self._wake.clear()

    def _tick(self) -> None:
        if self.encryption.rotation_due():
            # Inbound states of the new epoch are in place (reconcile) before the key is published.
            self.encryption.rotate()
            self.peers.full_pass()
        self._keep_registered()
        if not self.synced:
            self.driver.republish()
            self.synced = True
            log.info("this host's networks and endpoints are published in etcd")
        metrics.PENDING.set(self.driver.flush_pending())
        if self.propagation is not None:
            metrics.PROPAGATION_WAITING.set(len(self.propagation.pending))
        if self.peers.synced:  # judge other hosts only from a healthy, current view of etcd
            self.departures.sweep(self.peers.endpoint_hosts())

    def _forget_endpoints(self, host: str) -> int:
        """A departed host's endpoint records go, found through the peers' index instead of read whole."""
        return self.driver.forget_host(host, self.peers.endpoint_keys_of(host))

    def _lease_loop(self) -> None:
        """Refresh the lease every third of its TTL; an expired one wakes the background work to re-register."""
        interval = max(1.0, self.settings.lease_ttl / 3)
        while not self._stop.wait(interval):
            with self._lease_lock:
                lease = self.lease
            if lease is None:
                continue
            try:
                if self.store.refresh(lease) <= 0:
                    log.warning("lease %x expired; registering again", lease)
                    with self._lease_lock:
                        if self.lease == lease:
                            self.lease = None
                    self.wake()
            except StoreError as err:
                log.debug("lease keepalive postponed: %s", err)

    def _keep_registered(self) -> None:
        """This host's record, bound to a lease that other hosts watch for liveness (kept alive by _lease_loop)."""
        with self._lease_lock:
            fresh = self.lease is None
            if fresh:
                self.lease = self.store.grant(self.settings.lease_ttl)
        underlay = self.datapath.underlay()
        record = self.encryption.stamp(HostRecord(host=self.settings.host, vtep=underlay.address,
                                                  port=self.settings.vxlan_port, version=__version__,
                                                  started=self.started))
        content = record.content()  # compared unsigned: every signature differs (its counter)
        if fresh or content != self._published:
            self.store.put(self.keys.host(self.settings.host), record.dump(), lease=self.lease)
            self._published = content
        if fresh:
            # A new lease after an outage: etcd may have lost our records meanwhile.
            self.synced = False
