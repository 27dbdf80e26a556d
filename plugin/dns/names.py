"""Feeds the DNS server (plugin/dns/nameserver.py): which networks it serves here, and every network's names.

Endpoints and live hosts come from the peer watches (plugin/cluster/peers.py calls `changed` with the endpoint
records that changed); aliases from a watch of their own. A change updates the names of the endpoints it
touched, in place (plugin/dns/nameserver.py's NameIndex), so a name that moves or goes is answered differently at the
next query and a fleet's churn costs each change its own names. A new view (a snapshot, the live hosts
changed) builds the index anew and swaps it in.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from kvstore import Keys, Store
from kvstore.records import AliasRecord, HostRecord, RemoteEndpoint
from kvstore.watched import Update, WatchedMap
from plugin import heap
from plugin.dns.nameserver import FORWARD_ONLY, HOST_NAMESPACE, NameIndex, Names, NameServer, endpoint_names
from plugin.kernel.datapath import DataPath
from plugin.kernel.dnsredirect import DnsRedirect
from plugin.multimap import MultiMap, link, unlink
from plugin.state import LocalState

log = logging.getLogger(__name__)

TRIM_AFTER = 1000   # a rebuild for this many endpoints returns the heap's free pages


class NameService:
    def __init__(self, store: Store, keys: Keys, state: LocalState, datapath: DataPath,
                 upstreams: list[str] | None, address: str | None = None) -> None:
        self.store = store
        self.keys = keys
        self.state = state
        self.datapath = datapath
        self.address = address     # the host-wide DNS address (daemon.json "dns"), None = gateways only
        self.server = NameServer(upstreams, exclude=[address] if address else [])
        # Other networks' lookups to the address skip the plugin (plugin/kernel/dnsredirect.py).
        self.redirect = DnsRedirect(address, self.server.upstreams) if address else None
        self._alias_of: dict[str, AliasRecord] = {}        # endpoint ID -> its aliases
        self._endpoints: dict[str, RemoteEndpoint] = {}    # etcd key -> record (as the peer watch has them)
        self._keys_on: MultiMap[str, str] = {}             # host -> etcd keys of its endpoints
        self._hosts: set[str] = set()
        self._index = NameIndex()
        self._lock = threading.Lock()
        self._aliases = WatchedMap(store, keys.all_aliases(), AliasRecord, self._aliases_changed, lock=self._lock)
        # The peers' changes wait here for the names thread (see `changed`), merged: key -> record (None: gone).
        self._queue_lock = threading.Lock()
        self._queued: dict[str, RemoteEndpoint | None] = {}
        self._queued_whole = False
        self._queued_hosts: dict[str, HostRecord] = {}
        self._queue_pending = False
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="names")

    def start(self) -> None:
        self.server.start()
        self.networks_changed()
        if self.redirect is not None:
            # Once, here: the rule depends on the host's resolvers, not on the networks, and CreateNetwork
            # should not wait for nft. Lost rules fall back to the forwarder on lo until the next start.
            self.redirect.apply()
        self._aliases.start()

    def stop(self) -> None:
        self._aliases.stop()
        self._worker.shutdown(wait=False, cancel_futures=True)
        self.server.stop()

    def _aliases_changed(self, updates: list[Update[AliasRecord]], whole: bool) -> None:
        if whole:
            self._alias_of = {al.endpoint_id: al for al in self._aliases.values()}
            self._rebuild()
            return
        touched = set()   # the endpoint records the aliases are of: the same network key and endpoint ID
        for u in updates:
            if u.new is not None:
                self._alias_of[u.new.endpoint_id] = u.new
                touched.add(self.keys.endpoint(u.new.network_key, u.new.endpoint_id))
            elif u.old is not None and self._alias_of.get(u.old.endpoint_id) is u.old:
                del self._alias_of[u.old.endpoint_id]
                touched.add(self.keys.endpoint(u.old.network_key, u.old.endpoint_id))
        for key in touched:
            if key in self._endpoints:
                self._index.set(key, self._names(key))

    def current_aliases(self) -> dict[str, AliasRecord]:
        with self._lock:
            return self._aliases.copy()

    def changed(self, updates: dict[str, RemoteEndpoint | None], whole: bool, hosts: dict[str, HostRecord]) -> None:
        """The peer watches moved: these endpoint records changed (None: gone), or, with whole, `updates` is
        every record there is; `hosts` are the hosts whose endpoints count.

        Queued for the names thread, merged with what waits there: the peers' pass (and a new endpoint behind
        it) does not wait for the names, which take ~0.5 s to rebuild for 20,000 endpoints at a restart."""
        with self._queue_lock:
            if whole:
                self._queued, self._queued_whole = dict(updates), True
            else:
                self._queued.update(updates)
            self._queued_hosts = hosts
            if self._queue_pending:
                return   # queued and not started: it takes this change too
            self._queue_pending = True
        try:
            self._worker.submit(self._apply_queued)
        except RuntimeError:
            pass   # stopped: a last pass of the peers may still tell us

    def _apply_queued(self) -> None:
        with self._queue_lock:
            updates, whole, hosts = self._queued, self._queued_whole, self._queued_hosts
            self._queued, self._queued_whole, self._queue_pending = {}, False, False
        try:
            self._apply(updates, whole, hosts)
        except Exception:  # noqa: BLE001 - a name index from everything held is never half-changed
            log.exception("updating names; rebuilding them from the records held")
            with self._lock:
                self._rebuild()

    def settle(self, timeout: float = 30) -> None:
        """Wait until every change queued so far is in the names (tests, and callers that need them now)."""
        self._worker.submit(lambda: None).result(timeout=timeout)

    def _apply(self, updates: dict[str, RemoteEndpoint | None], whole: bool, hosts: dict[str, HostRecord]) -> None:
        with self._lock:
            if whole:
                self._endpoints, self._keys_on = {}, {}
            for key, ep in updates.items():
                old = self._endpoints.pop(key, None)
                if old is not None:
                    unlink(self._keys_on, old.host, key)
                if ep is not None:
                    self._endpoints[key] = ep
                    link(self._keys_on, ep.host, key)
            live = set(hosts)
            if whole:
                self._hosts = live
                self._rebuild()
                if len(updates) >= TRIM_AFTER:
                    heap.give_back()   # the old index, and what the peers' snapshot left free
                return
            # A host that came or went changes the names of its endpoints only.
            touched = set(updates)
            for host in live ^ self._hosts:
                touched.update(self._keys_on.get(host, ()))
            self._hosts = live
            for key in touched:
                self._index.set(key, self._names(key))

    def _names(self, key: str) -> Names | None:
        ep = self._endpoints.get(key)
        if ep is None or ep.host not in self._hosts:
            return None
        al = self._alias_of.get(ep.endpoint_id)
        return endpoint_names(ep, al.names if al is not None else None)

    def _rebuild(self) -> None:
        """Called with the lock held: a new index from everything, swapped in whole."""
        index = NameIndex()
        for key in self._endpoints:
            index.set(key, self._names(key))
        self._index = index
        self.server.set_zones(index.zones)

    def networks_changed(self) -> None:
        """Listen on the gateway of every local network, on the host-wide DNS address in each IPv4 network's
        namespace (containers route it to their gateway) and in the host namespace (everyone else's
        containers: forwarded only), and nowhere else."""
        wanted: dict[tuple[str, str], tuple[str, bool]] = {}
        with_address: list[int] = []
        for local in self.state.networks():
            ns = str(self.datapath.ns_path(local.record.vni))
            for gw in (local.record.gateway, local.record.gateway6):
                if gw:
                    wanted[(ns, gw.split("/")[0])] = (local.record.key, local.record.internal)
            if self.address and local.record.gateway:
                wanted[(ns, self.address)] = (local.record.key, local.record.internal)
                with_address.append(local.record.vni)
        if self.address:
            try:
                self.datapath.ensure_dns_address(self.address, with_address)
                wanted[(HOST_NAMESPACE, self.address)] = (FORWARD_ONLY, False)  # where the kernel cannot
            except Exception as err:  # noqa: BLE001 - names through the gateways keep working
                log.error("DNS address %s: %s; containers without --dns resolve names of this host only",
                          self.address, err)
        self.server.serve_networks(wanted)

    def status(self) -> dict[str, object]:
        zones = self.server.zones
        return {"serving": [f"{n or 'other networks (forwarded)'} on {a}:53" for n, a in self.server.serving()],
                "address": self.address,
                "other_networks": None if self.redirect is None else self.redirect.status(),
                "names": {nkey: sorted(z.forward) for nkey, z in sorted(zones.items())},
                "queries": self.server.queries, "dropped": self.server.dropped, "upstreams": self.server.upstreams}

