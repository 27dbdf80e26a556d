"""Remote endpoints from etcd, programmed into each local network's VXLAN device.

Two prefix watches feed one desired state: every endpoint record (IP, MAC, VTEP, host) and every host record
(bound to that host's lease). A remote endpoint is programmed (permanent neighbour + FDB entry, nothing left to
flooding or learning) when its network exists on this host and its host is known: live, or once live and
not yet departed. A missed lease (a plugin down, stopped or slow; its kernel keeps forwarding) removes
nothing: a host's endpoints go when their records go, which happens when the host is declared departed after
PYOVERLAY_DEAD_HOST_GRACE (plugin/departures.py) or when it removes them itself. Liveness decides what is
shown and when the grace clock starts, not what is programmed.
Programming is a diff between desired and programmed, so it is idempotent, batched after a snapshot
(reconnect, compaction), and removes entries whose endpoint or host went away.

An etcd outage changes nothing here either: the watches stop delivering and the kernel keeps what it has.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from kvstore import KV, Keys, Store, WatchEvent
from kvstore.base import Watch
from kvstore.records import EndpointRecord, HostRecord, InvalidRecord
from plugin import metrics
from plugin.datapath import DataPath
from plugin.encryption import Encryption
from plugin.state import LocalState

log = logging.getLogger(__name__)


class Peer(NamedTuple):
    ip: str
    mac: str
    vtep: str


class PeerSync:
    def __init__(self, store: Store, keys: Keys, datapath: DataPath, state: LocalState, host: str,
                 encryption: Encryption) -> None:
        self.encryption = encryption
        self.store = store
        self.keys = keys
        self.datapath = datapath
        self.state = state
        self.host = host
        self._lock = threading.RLock()
        self.endpoints: dict[str, EndpointRecord] = {}    # etcd key -> record
        self.hosts: dict[str, HostRecord] = {}            # host name -> record, live hosts (lease held)
        self.known: dict[str, HostRecord] = {}            # the last valid record of every host that is live
        #                                                   or still has endpoint records (not departed)
        self.programmed: dict[int, dict[str, Peer]] = {}  # vni -> endpoint key -> peer
        self._watches: list[Watch] = []
        # Which snapshots have arrived ("hosts", "endpoints"). Nothing is programmed, removed or pruned on half
        # a view: at a restart, hosts without their endpoints would look like peers to remove.
        self._views: set[str] = set()
        self._background = ThreadPoolExecutor(1, thread_name_prefix="peers")
        self._pending_lock = threading.Lock()
        self._pending = False
        self.passes = 0      # reconcile passes run for watch changes (a burst is coalesced into few)
        self.on_seen_change: Callable[[], None] = lambda: None
        # Endpoints and live hosts changed (the DNS names follow them).
        self.on_change: Callable[[list[EndpointRecord], dict[str, HostRecord]], None] = lambda e, h: None
        # The known hosts changed (the VTEP filter follows them); only ever called from a synced watch.
        self.on_hosts: Callable[[dict[str, HostRecord]], None] = lambda h: None

    def start(self) -> None:
        self._watches = [
            self.store.watch_prefix(self.keys.hosts(), self._host_snapshot, self._host_events),
            self.store.watch_prefix(self.keys.all_endpoints(), self._endpoint_snapshot, self._endpoint_events),
        ]

    def stop(self) -> None:
        for w in self._watches:
            w.stop()
        self._background.shutdown(wait=False, cancel_futures=True)

    @property
    def synced(self) -> bool:
        return all(w.synced.is_set() for w in self._watches)

    # -- watch callbacks --------------------------------------------------------------------------------

    def _host_snapshot(self, kvs: list[KV], revision: int) -> None:
        with self._lock:
            self.hosts = {rec.host: rec for rec in HostRecord.load_valid(kvs).values()}
            self.known.update(self.hosts)
            self._views.add("hosts")
            self._prune_known()
            self._hosts_changed()
        self._reconcile_soon()

    def _host_events(self, events: list[WatchEvent]) -> None:
        with self._lock:
            for ev in events:
                name = Keys.last(ev.key)
                if ev.kind == "delete":
                    log.info("host %s: lease expired or host stopped; its endpoints stay programmed until they "
                             "are removed or it is declared departed", name)
                    self.hosts.pop(name, None)
                    HostRecord.deleted(ev.key)
                else:
                    try:
                        self.hosts[name] = self.known[name] = HostRecord.load(ev.value, ev.key)
                    except InvalidRecord:
                        continue  # noted in the quarantine; the host's last valid record stays
            self._prune_known()
            self._hosts_changed()
        self._reconcile_soon()

    def _whole_view(self) -> bool:
        return len(self._views) == 2

    def _prune_known(self) -> None:
        """Forget hosts that are neither live nor hold endpoint records (departed, or never had any)."""
        if not self._whole_view():
            return
        holding = {ep.host for ep in self.endpoints.values()}
        for name in [n for n in self.known if n not in self.hosts and n not in holding]:
            del self.known[name]

    def _hosts_changed(self) -> None:
        if not self._whole_view():
            return
        try:
            self.on_hosts(dict(self.known))
        except Exception:  # noqa: BLE001 - the next change retries
            log.exception("following the live hosts")

    def _endpoint_snapshot(self, kvs: list[KV], revision: int) -> None:
        with self._lock:
            self.endpoints = EndpointRecord.load_valid(kvs)
            self._views.add("endpoints")
            self._prune_known()
            self._hosts_changed()
        self._reconcile_soon()

    def _endpoint_events(self, events: list[WatchEvent]) -> None:
        with self._lock:
            for ev in events:
                if ev.kind == "delete":
                    self.endpoints.pop(ev.key, None)
                    EndpointRecord.deleted(ev.key)
                else:
                    try:
                        self.endpoints[ev.key] = EndpointRecord.load(ev.value, ev.key)
                    except InvalidRecord:
                        continue  # noted in the quarantine; the last valid record stays
            if len(self.known) > len(self.hosts):
                before = set(self.known)
                self._prune_known()
                if set(self.known) != before:
                    self._hosts_changed()
        self._reconcile_soon()

    # -- desired vs programmed --------------------------------------------------------------------------

    def desired(self) -> dict[int, dict[str, Peer]]:
        local = {n.record.key: n.record.vni for n in list(self.state.data.networks.values())}
        # An address of one of this host's own endpoints is never sent elsewhere, whatever a record claims.
        mine = {(e.record.network_key, a.split("/")[0]) for e in list(self.state.data.endpoints.values())
                for a in (e.record.address, e.record.address6) if a}
        want: dict[int, dict[str, Peer]] = {vni: {} for vni in local.values()}
        for key, ep in self.endpoints.items():
            vni = local.get(ep.network_key)
            host = self.known.get(ep.host)
            # Only through the VTEP its host registered: a record cannot point traffic anywhere else.
            if vni is None or ep.host == self.host or host is None or host.vtep != ep.vtep:
                continue
            for addr in (ep.address, ep.address6):
                if addr and (ep.network_key, addr.split("/")[0]) not in mine:
                    want[vni][f"{key}#{addr}"] = Peer(addr.split("/")[0], ep.mac, ep.vtep)
        return want

    def reconcile(self) -> None:
        """Program the difference between what should be and what is (safe to call any time)."""
        with self._lock:
            if not self._whole_view():
                return  # the kernel keeps what it has until both watches have delivered their snapshot
            want = self.desired()
            for vni in set(self.programmed) - set(want):
                self.programmed.pop(vni, None)  # network gone here: its namespace took the entries along
            added = removed = 0
            for vni, peers in want.items():
                if vni not in self.programmed:
                    removed += self._adopt(vni, peers)
                have = self.programmed.setdefault(vni, {})
                drop = []
                for key in [k for k in have if k not in peers or have[k] != peers[k]]:
                    old = have.pop(key)
                    removed += 1
                    if not self._still_used(peers, old):
                        drop.append(old)
                todo = {k: p for k, p in peers.items() if have.get(k) != p}
                failed = self._program(vni, list(todo.values()), drop)
                for key, peer in todo.items():
                    if peer not in failed:
                        have[key] = peer
                        added += 1
            if added or removed:
                log.info("peers: %d programmed, %d removed", added, removed)
            for vni, have in self.programmed.items():
                metrics.PEERS.labels(str(vni)).set(len(have))
            try:
                self.on_change(list(self.endpoints.values()), dict(self.known))
            except Exception:  # noqa: BLE001
                log.exception("updating names")
            try:
                if self.encryption.sync(dict(self.known), self.state.encrypted_vnis()):
                    self.on_seen_change()  # peers switch their sending on our ack: publish it now
            except Exception as err:  # noqa: BLE001 - retried at the next change; the guard stays closed
                log.error("programming IPsec: %s", err)

    def _adopt(self, vni: int, peers: dict[str, Peer]) -> int:
        """First look at a network (start-up, new network): take over what the kernel already has.

        Entries that are still wanted stay untouched (no blip for running traffic); the rest are stale
        leftovers of endpoints that went while the plugin was down, and go.
        """
        try:
            existing = {Peer(ip, mac, vtep) for ip, mac, vtep in self.datapath.peer_entries(vni)}
        except Exception as err:  # noqa: BLE001
            log.error("vni %d: reading programmed peers: %s", vni, err)
            return 0
        have = self.programmed.setdefault(vni, {})
        for key, peer in peers.items():
            if peer in existing:
                have[key] = peer
        stale = existing - set(peers.values())
        self._program(vni, [], list(stale))
        return len(stale)

    @staticmethod
    def _still_used(peers: dict[str, Peer], old: Peer) -> bool:
        # A moved endpoint keeps its IP and MAC: the new entry replaced the old one already.
        return any(p.ip == old.ip and p.mac == old.mac for p in peers.values())

    def _program(self, vni: int, add: list[Peer], remove: list[Peer]) -> set[Peer]:
        """Batch to the kernel; returns the peers that could not be added (retried at the next change)."""
        if not add and not remove:
            return set()
        try:
            failed = self.datapath.program_peers(vni, list(add), list(remove))
        except Exception as err:  # noqa: BLE001 - the namespace went away under us, for example
            log.error("vni %d: programming %d peers: %s", vni, len(add) + len(remove), err)
            return set(add)
        for (ip, _, vtep), problem in failed:
            log.error("vni %d peer %s via %s: %s", vni, ip, vtep, problem)
        return {Peer(*p) for p, _ in failed}

    def network_changed(self) -> None:
        """A local network appeared or went: program its peers from what the watches already hold.

        Queued, not run here: Docker waits on CreateNetwork, and a network with thousands of remote
        endpoints takes seconds to program. Reconciles are serialised by the lock and idempotent.
        """
        self._background.submit(self._reconcile_logged)

    def _reconcile_soon(self) -> None:
        """Watch callbacks only record what changed; a pass on the peers thread programs it. Changes that arrive
        while a pass runs are programmed together by the next one: a burst of a thousand watch answers costs a
        few passes over the desired state, not a thousand (each is O(all endpoints))."""
        with self._pending_lock:
            if self._pending:
                return  # a pass is queued and has not started: it will see this change too
            self._pending = True
        self._background.submit(self._pass)

    def _pass(self) -> None:
        with self._pending_lock:
            self._pending = False
        self.passes += 1
        self._reconcile_logged()

    def _reconcile_logged(self) -> None:
        try:
            self.reconcile()
        except Exception:  # noqa: BLE001 - the next change or watch event retries
            log.exception("reconciling peers (the next change or the periodic pass retries)")

    def verify_kernel(self) -> list[int]:
        """VNIs whose kernel entries lack peers we believe programmed (flushed by hand, a device re-created):
        they are forgotten and programmed again. Returns those VNIs."""
        with self._lock:
            lost = []
            for vni, have in list(self.programmed.items()):
                try:
                    kernel = {Peer(*e) for e in self.datapath.peer_entries(vni)}
                except Exception:  # noqa: BLE001 - the namespace is being re-created: next pass
                    continue
                if not set(have.values()) <= kernel:
                    lost.append(vni)
                    self.programmed.pop(vni, None)
            if lost:
                self.reconcile()
            return lost

    def endpoint_records(self) -> dict[str, EndpointRecord]:
        """etcd key -> endpoint record, as the watch holds them."""
        with self._lock:
            return dict(self.endpoints)

    def endpoint_hosts(self) -> set[str]:
        with self._lock:
            return {ep.host for ep in self.endpoints.values()}

    def counts(self) -> dict[int, tuple[int, int]]:
        """Per VNI: peers expected, peers programmed."""
        with self._lock:
            want = self.desired()
            return {vni: (len(want.get(vni, {})), len(self.programmed.get(vni, {}))) for vni in want}
