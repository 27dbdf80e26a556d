"""Feeds the DNS server (plugin/dns.py): which networks it serves here, and every network's names.

Endpoints and live hosts come from the peer watches (plugin/peers.py calls `changed`); aliases from a
watch of their own. Zones are rebuilt whole on each change (a few thousand names take milliseconds) and
swapped in, so a name that moves or goes is answered differently at the next query.
"""

from __future__ import annotations

import logging
import threading

from kvstore import KV, Keys, Store, WatchEvent
from kvstore.base import Watch
from kvstore.records import AliasRecord, EndpointRecord, HostRecord, InvalidRecord
from plugin.datapath import DataPath
from plugin.dns import FORWARD_ONLY, HOST_NAMESPACE, NameServer, build_zones
from plugin.dnsredirect import DnsRedirect
from plugin.state import LocalState

log = logging.getLogger(__name__)


class NameService:
    def __init__(self, store: Store, keys: Keys, state: LocalState, datapath: DataPath,
                 upstreams: list[str] | None, address: str | None = None) -> None:
        self.store = store
        self.keys = keys
        self.state = state
        self.datapath = datapath
        self.address = address     # the host-wide DNS address (daemon.json "dns"), None = gateways only
        self.server = NameServer(upstreams, exclude=[address] if address else [])
        # Other networks' lookups to the address skip the plugin (plugin/dnsredirect.py).
        self.redirect = DnsRedirect(address, self.server.upstreams) if address else None
        self.aliases: dict[str, AliasRecord] = {}
        self._endpoints: list[EndpointRecord] = []
        self._hosts: set[str] = set()
        self._lock = threading.Lock()
        self._watch: Watch | None = None

    def start(self) -> None:
        self.server.start()
        self.networks_changed()
        self._watch = self.store.watch_prefix(self.keys.all_aliases(), self._snapshot, self._events)

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        self.server.stop()

    def _snapshot(self, kvs: list[KV], revision: int) -> None:
        with self._lock:
            self.aliases = {}
            for kv in kvs:
                rec = _load(kv.value, kv.key)
                if rec is not None:
                    self.aliases[kv.key] = rec
        self._rebuild()

    def _events(self, events: list[WatchEvent]) -> None:
        with self._lock:
            for ev in events:
                if ev.kind == "delete":
                    AliasRecord.deleted(ev.key)
                    self.aliases.pop(ev.key, None)
                elif (rec := _load(ev.value, ev.key)) is not None:
                    self.aliases[ev.key] = rec   # an invalid record changes nothing: the last valid one stays
        self._rebuild()

    def current_aliases(self) -> dict[str, AliasRecord]:
        with self._lock:
            return dict(self.aliases)

    def changed(self, endpoints: list[EndpointRecord], hosts: dict[str, HostRecord]) -> None:
        """The peer watches moved (endpoints or live hosts)."""
        with self._lock:
            self._endpoints, self._hosts = endpoints, set(hosts)
        self._rebuild()

    def _rebuild(self) -> None:
        with self._lock:
            zones = build_zones(self._endpoints, self._hosts, list(self.aliases.values()))
        self.server.set_zones(zones)

    def networks_changed(self) -> None:
        """Listen on the gateway of every local network, on the host-wide DNS address in each IPv4 network's
        namespace (containers route it to their gateway) and in the host namespace (everyone else's
        containers: forwarded only), and nowhere else."""
        wanted: dict[tuple[str, str], tuple[str, bool]] = {}
        with_address: list[int] = []
        for local in list(self.state.data.networks.values()):
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
                if self.redirect is not None:
                    self.redirect.apply()
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


def _load(raw: bytes, key: str) -> AliasRecord | None:
    try:
        return AliasRecord.load(raw, key)
    except InvalidRecord:
        return None  # noted in the quarantine
