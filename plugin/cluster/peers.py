"""Remote endpoints from etcd, programmed into each local network's VXLAN device.

Two prefix watches feed one desired state: every endpoint record (IP, MAC, VTEP, host) and every host record
(bound to that host's lease). A remote endpoint is programmed (permanent neighbour + FDB entry, nothing left to
flooding or learning) when its network exists on this host and its host is known: live, or once live and
not yet departed. A missed lease (a plugin down, stopped or slow; its kernel keeps forwarding) removes
nothing: a host's endpoints go when their records go, which happens when the host is declared departed after
PYOVERLAY_DEAD_HOST_GRACE (plugin/cluster/departures.py) or when it removes them itself. Liveness decides what is
shown and when the grace clock starts, not what is programmed.
Programming is a diff between desired and programmed, so it is idempotent, batched after a snapshot
(reconnect, compaction), and removes entries whose endpoint or host went away.

An etcd outage changes nothing here either: the watches stop delivering and the kernel keeps what it has.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from kvstore import Keys, Store
from kvstore.records import HostRecord, RemoteEndpoint
from kvstore.watched import Update, WatchedMap
from plugin import heap, metrics
from plugin.cluster.encryption import Encryption
from plugin.kernel.datapath import DataPath
from plugin.multimap import MultiMap, link, unlink
from plugin.state import LocalState

log = logging.getLogger(__name__)

# Seconds between watch-driven passes under churn (at most 10 a second). Each pass has a fixed cost (the local
# view, a netlink write and its answer, the names' turn, thread hand-overs: ~1.4 ms); at 100 changes a second,
# 0.1 s instead of 0.05 measured 1.4% of a core less, and the write-to-kernel p50 ~25 ms more. A change after
# a quiet spell still goes at once.
PASS_SPACING = 0.1
RETRY_AFTER = 1.0    # seconds before entries the kernel refused are tried again
SKEW_LIMIT = 16      # up to this many entries missing from one read may be the dump's skew (see verify_kernel)
# The periodic kernel check reads a network at most this share of the time: a standing cost whatever the churn
# (20,000 peers: ~0.65 s of CPU a read, so one about every 65 s).
CHECK_SHARE = 0.01
EARLY_READ_FOR = 10.0  # seconds the kernel's entries read at start stand for it at the first pass
TRIM_AFTER = 1000    # a full pass over this many entries returns the heap's free pages (heap.give_back)


class Peer(NamedTuple):
    ip: str
    mac: str
    vtep: str


# One kernel entry's identity: (endpoint key, the address as its record gives it). A tuple of two strings the
# record already holds: 56 bytes, where a joined "key#address" string took ~150 for each of 40,000 entries.
Entry = tuple[str, str]


# Endpoints and live hosts changed (the DNS names follow them): the records that changed (None: gone) or, when
# the flag is set, all of them; and the known hosts.
NamesFollow = Callable[[dict[str, RemoteEndpoint | None], bool, dict[str, HostRecord]], None]


def _nothing(*_: object) -> None:
    pass


class PeerSync:
    def __init__(self, store: Store, keys: Keys, datapath: DataPath, state: LocalState, host: str,
                 encryption: Encryption, *, names: NamesFollow = _nothing,
                 hosts_changed: Callable[[dict[str, HostRecord]], None] = _nothing,
                 acks_changed: Callable[[], None] = _nothing) -> None:
        """names: called after every pass; hosts_changed: the known hosts changed (the VTEP filter follows them;
        only ever called from a synced watch); acks_changed: IPsec acknowledged a peer's keys (publish now)."""
        self.encryption = encryption
        self.store = store
        self.keys = keys
        self.datapath = datapath
        self.state = state
        self.host = host
        self._lock = threading.RLock()
        # etcd key -> record, current through the endpoints watch (changed under self._lock)
        # Its events are validated and applied in batches by the passes (drain), not one by one as they come.
        self.endpoints = WatchedMap(store, keys.all_endpoints(), RemoteEndpoint, self._endpoints_updated,
                                    lock=self._lock, deferred=self._pass_soon)
        self._host_records = WatchedMap(store, keys.hosts(), HostRecord, self._hosts_updated, lock=self._lock)
        self.hosts: dict[str, HostRecord] = {}            # host name -> record, live hosts (lease held)
        self.known: dict[str, HostRecord] = {}            # the last valid record of every host that is live
        #                                                   or still has endpoint records (not departed)
        self.programmed: dict[int, dict[Entry, Peer]] = {}  # vni -> entry -> peer
        # What should be programmed, kept current change by change (see _run_pass):
        self.want: dict[int, dict[Entry, Peer]] = {}        # vni -> entry -> peer
        self._want_of: dict[str, tuple[int, tuple[Entry, ...]]] = {}  # endpoint key -> its vni and entries in want
        self._users: dict[int, Counter[tuple[str, str]]] = {}  # vni -> (ip, mac) -> entries in want
        self._by_host: MultiMap[str, str] = {}        # host name -> its endpoint keys
        self._by_network: MultiMap[str, str] = {}     # network key -> its endpoint keys
        self._dirty: set[str] = set()                     # endpoint keys changed since the last pass
        self._full = True                                 # the next pass recomputes everything
        self._named: set[str] = set()                     # endpoint keys changed since the names heard
        self._names_whole = True                          # the names hear every record at the next pass
        self._last_local: tuple[dict[str, int], set[tuple[str, str]]] = ({}, set())
        # Which snapshots have arrived ("hosts", "endpoints"). Nothing is programmed, removed or pruned on half
        # a view: at a restart, hosts without their endpoints would look like peers to remove.
        self._views: set[str] = set()
        self._background = ThreadPoolExecutor(1, thread_name_prefix="peers")
        self._pending_lock = threading.Lock()
        self._pending = False
        self.passes = 0      # passes run for watch changes (a burst is coalesced into few)
        self._last_pass = 0.0
        self._retry: threading.Timer | None = None
        self._suspects: dict[int, set[Peer]] = {}         # vni -> peers missing at the last kernel check
        self._early: dict[int, tuple[float, list[tuple[str, str, str]]]] = {}  # vni -> (when, entries) read at start
        self._hosts_version = 0                            # grows at every change of hosts or known
        self._encryption_basis: tuple[int, tuple[tuple[int, str], ...]] | None = None  # what IPsec last synced from
        self._next_check: dict[int, float] = {}            # vni -> when its kernel check is due (monotonic)
        self._names_follow = names
        self._hosts_follow = hosts_changed
        self._acks_changed = acks_changed

    def start(self) -> None:
        # The kernel's entries are read while etcd's are (the first pass adopts them; at a restart with tens of
        # thousands of peers each read takes about half a second): on the peers' thread, before any pass.
        for vni in {n.record.vni for n in self.state.networks()}:
            self._background.submit(self._read_early, vni)
        self._host_records.start()
        self.endpoints.start()

    def _read_early(self, vni: int) -> None:
        try:
            self._early[vni] = (time.monotonic(), self.datapath.peer_entries(vni))
        except Exception:  # noqa: BLE001 - the first pass reads it again, and reports
            pass

    def stop(self) -> None:
        self._host_records.stop()
        self.endpoints.stop()
        if self._retry is not None:
            self._retry.cancel()
        self._background.shutdown(wait=False, cancel_futures=True)

    @property
    def synced(self) -> bool:
        return self._host_records.synced.is_set() and self.endpoints.synced.is_set()

    # -- watch callbacks --------------------------------------------------------------------------------

    def _hosts_updated(self, updates: list[Update[HostRecord]], whole: bool) -> None:
        """The host records changed (under self._lock); a snapshot (whole) makes the next pass a full one."""
        for u in updates:
            name = Keys.last(u.key)
            if not whole:
                self._mark_hosts([name])
            self._hosts_version += 1
            if u.new is not None:
                self.hosts[name] = self.known[name] = u.new
            elif self.hosts.pop(name, None) is not None and not whole:
                log.info("host %s: lease expired or host stopped; its endpoints stay programmed until they "
                         "are removed or it is declared departed", name)
        if whole:
            self._views.add("hosts")
            self._full = True
        self._prune_known()
        self._hosts_changed()
        self._pass_soon()

    def _whole_view(self) -> bool:
        return len(self._views) == 2

    def _prune_known(self) -> None:
        """Forget hosts that are neither live nor hold endpoint records (departed, or never had any)."""
        if not self._whole_view():
            return
        for name in [n for n in self.known if n not in self.hosts and n not in self._by_host]:
            del self.known[name]
            self._hosts_version += 1

    def _hosts_changed(self) -> None:
        if not self._whole_view():
            return
        try:
            self._hosts_follow(dict(self.known))
        except Exception:  # noqa: BLE001 - the next change retries
            log.exception("following the live hosts")

    def _endpoints_updated(self, updates: list[Update[RemoteEndpoint]], whole: bool) -> None:
        """The endpoint records changed (under self._lock): their keys are marked, for this pass (events are
        drained at its start) or the next; a snapshot (whole) makes it a full one."""
        for u in updates:
            self._index(u.key, u.old, u.new)
            if not whole:
                self._dirty.add(u.key)
                self._named.add(u.key)
        if whole:
            self._views.add("endpoints")
            self._full = self._names_whole = True
        if whole or len(self.known) > len(self.hosts):
            before = set(self.known)
            self._prune_known()
            if whole or set(self.known) != before:
                self._hosts_changed()
        if whole:
            self._pass_soon()   # events come through drain, in a pass already

    # -- desired vs programmed --------------------------------------------------------------------------
    #
    # The desired entries are kept current change by change: a watch answer marks the endpoint keys it touched
    # (or every key of a host whose record changed) dirty, and a pass recomputes and diffs only those, so a
    # change costs O(changed endpoints), not O(all). A full pass (snapshots, local networks or endpoints
    # changed, the periodic repair) recomputes everything, exactly as a fresh start would.

    def _local_view(self) -> tuple[dict[str, int], set[tuple[str, str]]]:
        """This host's networks (key -> VNI) and its own endpoints' addresses per network."""
        local = {n.record.key: n.record.vni for n in self.state.networks()}
        mine = {(e.record.network_key, a.split("/")[0]) for e in self.state.endpoints()
                for a in (e.record.address, e.record.address6) if a}
        return local, mine

    def _entries_of(self, key: str, local: dict[str, int], mine: set[tuple[str, str]]) -> list[tuple[int, Entry, Peer]]:
        """The kernel entries one endpoint record should give: (vni, entry, peer)."""
        ep = self.endpoints.get(key)
        if ep is None:
            return []
        vni = local.get(ep.network_key)
        host = self.known.get(ep.host)
        # Only through the VTEP its host registered: a record cannot point traffic anywhere else.
        if vni is None or ep.host == self.host or host is None or host.vtep != ep.vtep:
            return []
        # An address of one of this host's own endpoints is never sent elsewhere, whatever a record claims.
        return [(vni, (key, addr), Peer(ip, ep.mac, ep.vtep)) for addr, ip in ep.addresses()
                if (ep.network_key, ip) not in mine]

    def desired(self) -> dict[int, dict[Entry, Peer]]:
        local, mine = self._local_view()
        want: dict[int, dict[Entry, Peer]] = {vni: {} for vni in local.values()}
        for key in self.endpoints:
            for vni, entry, peer in self._entries_of(key, local, mine):
                want[vni][entry] = peer
        return want

    def _mark(self, keys: Iterable[str]) -> None:
        self._dirty.update(keys)

    def _mark_hosts(self, names: Iterable[str]) -> None:
        for name in names:
            self._dirty.update(self._by_host.get(name, ()))

    def _index(self, key: str, old: RemoteEndpoint | None, ep: RemoteEndpoint | None) -> None:
        if old is not None:
            unlink(self._by_host, old.host, key)
            unlink(self._by_network, old.network_key, key)
        if ep is not None:
            link(self._by_host, ep.host, key)
            link(self._by_network, ep.network_key, key)

    def full_pass(self) -> None:
        """Program the difference between what should be and what is, all of it (safe to call any time)."""
        with self._lock:
            self._full = True
            self._run_pass()

    def _run_pass(self) -> None:
        self.endpoints.drain()
        if not self._whole_view():
            return  # the kernel keeps what it has until both watches have delivered their snapshot
        began, full = time.monotonic(), self._full
        local, mine = self._local_view()
        if not self._full and mine == self._last_local[1] and local != self._last_local[0]:
            came = self._networks_changed(local)
            considered = self._follow(local, mine)
            for vni in came:
                considered.setdefault(vni, set())   # adopted below, even with no remote endpoint yet
        elif self._full or (local, mine) != self._last_local or set(local.values()) - set(self.programmed):
            self._full = False
            self._dirty.clear()
            self._last_local = (local, mine)
            self.want = self.desired()
            self._want_of = {}
            self._users = {vni: Counter((p.ip, p.mac) for p in peers.values()) for vni, peers in self.want.items()}
            for vni, peers in self.want.items():
                for entry in peers:
                    self._want_entry(entry[0], vni, entry)
            for vni in set(self.programmed) - set(self.want):
                self.programmed.pop(vni, None)  # network gone here: its namespace took the entries along
            considered = {vni: set(peers) | set(self.programmed.get(vni, {})) for vni, peers in self.want.items()}
        else:
            considered = self._follow(local, mine)
        added = removed = 0
        for vni, entries in considered.items():
            peers = self.want.get(vni, {})
            if vni not in self.programmed:
                removed += self._adopt(vni, peers)
            have = self.programmed.setdefault(vni, {})
            users = self._users.get(vni, Counter())
            drop: list[Peer] = []
            todo: dict[Entry, Peer] = {}
            for entry in entries:
                old, new = have.get(entry), peers.get(entry)
                if old is not None and old != new:
                    del have[entry]
                    removed += 1
                    # A moved endpoint keeps its IP and MAC: the new entry replaces the old one in the kernel.
                    if not users[(old.ip, old.mac)]:
                        drop.append(old)
                if new is not None and have.get(entry) != new:
                    todo[entry] = new
            failed = self._program(vni, list(todo.values()), drop)
            if failed:
                self._retry_later()
            for entry, peer in todo.items():
                if peer in failed:
                    self._dirty.add(entry[0])  # retried at the next pass
                else:
                    have[entry] = peer
                    added += 1
        self._early.clear()   # read at start for a network that went before the first pass
        if added or removed or full:
            self._log_pass(added, removed, full, began)
        for vni, have in self.programmed.items():
            metrics.PEERS.labels(str(vni)).set(len(have))
        whole, self._names_whole = self._names_whole, False
        updates: dict[str, RemoteEndpoint | None] = dict(self.endpoints.items()) if whole else \
            {k: self.endpoints.get(k) for k in self._named}
        self._named = set()
        try:
            self._names_follow(updates, whole, dict(self.known))
        except Exception:  # noqa: BLE001
            self._names_whole = True   # the next pass gives the names everything
            log.exception("updating names")
        self._sync_encryption(full)

    def _sync_encryption(self, full: bool) -> None:
        """IPsec follows the known hosts and this host's encrypted networks, not endpoints: a pass for endpoint
        changes alone skips it (its check is O(hosts): 1.2 ms a pass at 1,000 hosts, 2.4% of a core at 20
        passes a second), unless the last sync failed or was undone (a rotation, a repair)."""
        vnis = self.state.encrypted_vnis()
        basis = (self._hosts_version, tuple(sorted(vnis.items())))
        if not full and basis == self._encryption_basis and self.encryption.settled:
            return
        self._encryption_basis = None
        try:
            if self.encryption.sync(dict(self.known), vnis):
                self._acks_changed()  # peers switch their sending on our ack: publish it now
            self._encryption_basis = basis
        except Exception as err:  # noqa: BLE001 - retried at the next change; the guard stays closed
            log.error("programming IPsec: %s", err)

    def _log_pass(self, added: int, removed: int, full: bool, began: float) -> None:
        wanted = sum(map(len, self.want.values()))
        log.info("peers: %d programmed, %d removed%s in %.2f s", added, removed,
                 f" (a full pass over {wanted} entries)" if full else "", time.monotonic() - began)
        if full and wanted >= TRIM_AFTER:
            heap.give_back()   # what a snapshot of this size left free (the read, its decoding, the old maps)

    def _networks_changed(self, local: dict[str, int]) -> list[int]:
        """Networks came or went here: only their endpoints are looked at (marked dirty, or their entries
        forgotten). Returns the VNIs that came."""
        before, came = self._last_local[0], []
        for nkey, vni in before.items():
            if local.get(nkey) != vni:   # gone: its namespace took the kernel entries along
                for key in self._by_network.get(nkey, ()):
                    self._want_of.pop(key, None)
                self.want.pop(vni, None)
                self._users.pop(vni, None)
                self.programmed.pop(vni, None)
        for nkey, vni in local.items():
            if before.get(nkey) != vni:
                self.want[vni], self._users[vni] = {}, Counter()
                self._dirty.update(self._by_network.get(nkey, ()))
                came.append(vni)
        self._last_local = (local, self._last_local[1])
        return came

    def _follow(self, local: dict[str, int], mine: set[tuple[str, str]]) -> dict[int, set[Entry]]:
        """Bring the desired entries of the dirty endpoint keys up to date; returns the entries to diff."""
        considered: dict[int, set[Entry]] = {}
        dirty, self._dirty = self._dirty, set()
        for key in dirty:
            vni, entries = self._want_of.pop(key, (0, ()))
            for entry in entries:
                old = self.want.get(vni, {}).pop(entry, None)
                if old is not None:
                    self._users[vni][(old.ip, old.mac)] -= 1
                considered.setdefault(vni, set()).add(entry)
            for vni, entry, peer in self._entries_of(key, local, mine):
                self.want[vni][entry] = peer
                self._users[vni][(peer.ip, peer.mac)] += 1
                self._want_entry(key, vni, entry)
                considered.setdefault(vni, set()).add(entry)
        return considered

    def _want_entry(self, key: str, vni: int, entry: Entry) -> None:
        """Note that want[vni] holds this entry of the endpoint at key (a record gives entries of one network)."""
        _, entries = self._want_of.get(key, (vni, ()))
        self._want_of[key] = (vni, (*entries, entry))

    def _adopt(self, vni: int, peers: dict[Entry, Peer]) -> int:
        """First look at a network (start-up, new network): take over what the kernel already has.

        Entries that are still wanted stay untouched (no blip for running traffic); the rest are stale
        leftovers of endpoints that went while the plugin was down, and go.
        """
        began = time.monotonic()
        when, early = self._early.pop(vni, (0.0, None))
        try:
            # What was read at start, unless etcd took long: then the kernel may have moved meanwhile.
            found = early if early is not None and began - when < EARLY_READ_FOR else self.datapath.peer_entries(vni)
            existing = {Peer(ip, mac, vtep) for ip, mac, vtep in found}
        except Exception as err:  # noqa: BLE001
            log.error("vni %d: reading programmed peers: %s", vni, err)
            return 0
        read = time.monotonic() - began
        have = self.programmed.setdefault(vni, {})
        for key, peer in peers.items():
            if peer in existing:
                have[key] = peer
        stale = existing - set(peers.values())
        self._program(vni, [], list(stale))
        if existing:
            log.info("vni %d: %d peers found in the kernel (read in %.2f s), %d kept, %d stale removed", vni,
                     len(existing), read, len(have), len(stale))
        return len(stale)

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
        self._background.submit(self._run_pass_logged, False)   # the pass looks at that network alone

    def _pass_soon(self) -> None:
        """Watch callbacks only record what changed; a pass on the peers thread programs it. Changes that arrive
        while a pass runs are programmed together by the next one: a burst of a thousand watch answers costs a
        few passes over the desired state, not a thousand (each is O(all endpoints))."""
        with self._pending_lock:
            if self._pending:
                return  # a pass is queued and has not started: it will see this change too
            self._pending = True
        self._background.submit(self._pass)

    def _retry_later(self) -> None:
        """Entries the kernel refused get a pass of their own after RETRY_AFTER, change or no change."""
        if self._retry is not None and self._retry.is_alive():
            return
        self._retry = threading.Timer(RETRY_AFTER, self._pass_soon)
        self._retry.daemon = True
        self._retry.start()

    def _pass(self) -> None:
        # Under churn, passes come at most every PASS_SPACING: the changes of that time share one pass (its
        # fixed cost: a netlink write, names, IPsec, metrics). A change after a quiet spell goes at once.
        wait = self._last_pass + PASS_SPACING - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        with self._pending_lock:
            self._pending = False
        self.passes += 1
        self._run_pass_logged(full=False)
        self._last_pass = time.monotonic()

    def _run_pass_logged(self, full: bool = True) -> None:
        try:
            with self._lock:
                self._full = self._full or full
                self._run_pass()
        except Exception:  # noqa: BLE001 - the next change or watch event retries
            with self._lock:
                self._full = True
            log.exception("reconciling peers (the next change or the periodic pass retries)")

    def verify_kernel(self, force: Iterable[int] = ()) -> list[int]:
        """VNIs whose kernel entries lack peers we believe programmed (flushed by hand, a device re-created, an
        entry deleted): exactly those entries are programmed again, by the next pass. Returns those VNIs.

        A network is read when its check is due (reads take at most CHECK_SHARE of the time: one of 40,000
        entries takes about 1.5 s) or when named in force (its device was just re-created or brought up)."""
        # The kernel is read without the lock (tens of thousands of entries take most of a second, and passes
        # go on meanwhile); only entries believed programmed before and after the read count. A dump of a
        # table that changes under it (churn) skips a few entries: a few missing are only suspects, lost
        # when still missing at the next check; many or all missing (a flush, a re-created device) are lost
        # now.
        forced, now = set(force), time.monotonic()
        with self._lock:
            before = {vni: set(have.values()) for vni, have in self.programmed.items()
                      if vni in forced or now >= self._next_check.get(vni, 0.0)}
        lost = []
        for vni, believed in before.items():
            began = time.monotonic()
            missing = self._missing(vni, believed)
            self._next_check[vni] = time.monotonic() + (time.monotonic() - began) / CHECK_SHARE
            suspects = self._suspects.pop(vni, set())
            if len(missing) <= SKEW_LIMIT and missing != believed:
                missing, self._suspects[vni] = missing & suspects, missing - suspects
            if not missing:
                continue
            with self._lock:
                have = self.programmed.get(vni, {})
                gone = [entry for entry, peer in have.items() if peer in missing]
                for entry in gone:
                    del have[entry]
                    self._dirty.add(entry[0])
            if gone:
                log.warning("vni %d: %d peers missing from the kernel; programming them again", vni, len(gone))
                lost.append(vni)
        if lost:
            self._pass_soon()
        return lost

    def _missing(self, vni: int, believed: set[Peer]) -> set[Peer]:
        try:
            return believed - {Peer(*e) for e in self.datapath.peer_entries(vni)}
        except Exception:  # noqa: BLE001 - the namespace is being re-created: next pass
            return set()

    def endpoint_records(self) -> dict[str, RemoteEndpoint]:
        """etcd key -> endpoint record, as the watch holds them."""
        with self._lock:
            return self.endpoints.copy()

    def endpoint_keys_of(self, host: str) -> list[str]:
        """The etcd keys of a host's endpoint records, as the watch holds them."""
        with self._lock:
            return list(self._by_host.get(host, ()))

    def endpoint_hosts(self) -> set[str]:
        with self._lock:
            return {ep.host for ep in self.endpoints.values()}

    def counts(self) -> dict[int, tuple[int, int]]:
        """Per VNI: peers expected, peers programmed."""
        with self._lock:
            want = self.desired() if self._full or not self.want else self.want
            return {vni: (len(want.get(vni, {})), len(self.programmed.get(vni, {}))) for vni in want}
