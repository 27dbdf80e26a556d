"""Create a network once, have it on every host (plain Docker; swarm does this itself).

A pyoverlay network that a user creates on one host is published as a definition (netdefs/<name>:
subnets, gateway, --opt, --internal, labels; create-if-absent). Every host creates the networks it lacks
through its own Docker API, labelled with the definition's uid, and a labelled network is never published
again (no loops). `docker network rm` on any host deletes the definition (only if it is still the one that
network came from), and every other host removes its copy; a host whose containers still use it keeps it,
retries at each resync, and says so in its log and `pyoverlay status`.

Which networks this host published is kept in its state file (a network id -> uid), so a restart, or a
definition deleted while this host was away, is told apart from a network that was never published.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

import docker.errors
import docker.types

from kvstore import Keys, Store, StoreError, Txn
from kvstore.records import NetDefRecord, PoolConfig
from kvstore.watched import Update, WatchedMap
from plugin.docker.api import DockerAPI, Resync
from plugin.errors import short_id
from plugin.state import LocalState

log = logging.getLogger(__name__)

LABEL_DEF = "pyoverlay.netdef"      # on a propagated network: the uid of the definition it was made from
LABEL_ORIGIN = "pyoverlay.origin"   # ... and the host it was first created on
OURS = "pyoverlay"                  # stands for "this host's pyoverlay" in a definition's ipam_driver


def definition_of(net: dict[str, Any], host: str, ours: str) -> NetDefRecord:
    """A definition from `docker network inspect` output."""
    ipam = net.get("IPAM") or {}
    pools = [PoolConfig(subnet=c["Subnet"], gateway=c.get("Gateway") or None, ip_range=c.get("IPRange") or None,
                        aux=c.get("AuxiliaryAddresses") or {}) for c in ipam.get("Config") or [] if c.get("Subnet")]
    ipam_driver = ipam.get("Driver") or "default"
    return NetDefRecord(
        name=net["Name"], uid=uuid.uuid4().hex, origin_host=host, origin_id=net["Id"],
        options=net.get("Options") or {}, pools=pools, ipam_options=ipam.get("Options") or {},
        ipam_driver=OURS if ipam_driver == ours else ipam_driver, internal=bool(net.get("Internal")),
        ipv6=bool(net.get("EnableIPv6")), ipv4=net.get("EnableIPv4") is not False,  # 20.10: no such field
        attachable=bool(net.get("Attachable")),
        labels={k: v for k, v in (net.get("Labels") or {}).items() if k not in (LABEL_DEF, LABEL_ORIGIN)},
    )


def same_network(a: NetDefRecord, b: NetDefRecord) -> str | None:
    """None when two definitions describe the same network; else what differs."""
    for what, x, y in (("subnets", sorted(p.subnet for p in a.pools), sorted(p.subnet for p in b.pools)),
                       ("gateways", sorted(str(p.gateway) for p in a.pools), sorted(str(p.gateway) for p in b.pools)),
                       ("--opt", a.options, b.options), ("--internal", a.internal, b.internal)):
        if x != y:
            return f"{what} {x} here vs {y} in the cluster"
    return None


class Propagation:
    def __init__(self, store: Store, keys: Keys, state: LocalState, host: str, resync: Resync) -> None:
        self.store = store
        self.keys = keys
        self.state = state
        self.host = host
        self.defs: dict[str, tuple[NetDefRecord, int]] = {}   # name -> (definition, mod revision)
        self.pending: dict[str, str] = {}      # network name -> why its removal here waits
        self.conflicts: dict[str, str] = {}    # network name -> why it is not propagated
        self.known: dict[str, tuple[str, str | None]] = {}   # local network id -> (name, definition uid)
        self._undelivered: dict[str, str] = {}  # name -> uid whose definition must still be deleted
        self._lock = threading.RLock()
        self._netdefs = WatchedMap(store, keys.netdefs(), NetDefRecord, self._netdefs_changed, lock=self._lock)
        self._docker_work = resync   # the Docker worker's queue: a changed definition asks it to resync

    def start(self) -> None:
        self._netdefs.start()

    def stop(self) -> None:
        self._netdefs.stop()

    def _netdefs_changed(self, updates: list[Update[NetDefRecord]], whole: bool) -> None:
        if whole:
            self.defs = {}
        for u in updates:
            if u.new is None:
                self.defs.pop(Keys.last(u.key), None)
            else:
                self.defs[Keys.last(u.key)] = (u.new, u.revision)
        self._kick()

    def _kick(self) -> None:
        self._docker_work.ask()

    # -- Docker side (runs on the DockerWatch worker thread) ------------------------------------------------

    def on_event(self, api: DockerAPI, event: dict[str, Any]) -> None:
        action = event.get("Action", "")
        attrs = (event.get("Actor") or {}).get("Attributes") or {}
        if event.get("Type") == "network" and action == "destroy" and attrs.get("type") == api.driver_name():
            self._removed_here(event["Actor"]["ID"], attrs.get("name", ""))
        if event.get("Type") == "network" and action in ("create", "destroy", "disconnect") or \
                event.get("Type") == "container" and action in ("die", "destroy") and self.pending:
            self.resync(api)

    def _removed_here(self, network_id: str, name: str) -> None:
        """A pyoverlay network went on this host: if it came from (or made) a definition, that goes too."""
        with self._lock:
            _, uid = self.known.pop(network_id, (name, None))
            uid = self.state.originated(network_id) or uid
            log.debug("network %s (%s) went here; its definition %s", name, short_id(network_id), uid)
            self.pending.pop(name, None)
            if uid is None:
                return
            self._undelivered[name] = uid
            self.state.forget_originated(network_id)
        self._deliver_removals()

    def _deliver_removals(self) -> None:
        for name, uid in list(self._undelivered.items()):
            current = self.defs.get(name)
            try:
                if current is not None and current[0].uid == uid:
                    txn = Txn().unchanged(self.keys.netdef(name), current[1]).delete(self.keys.netdef(name))
                    if self.store.commit(txn):
                        log.info("network %s removed here: removing it from every host", name)
                    else:
                        log.debug("network %s: its definition changed meanwhile; left alone", name)
                self._undelivered.pop(name, None)
            except StoreError as err:
                log.warning("network %s: could not delete its definition yet (%s); retrying", name, err)

    def resync(self, api: DockerAPI) -> None:
        if not self._netdefs.synced.is_set():
            return  # judge nothing from an empty or stale view of etcd
        self._deliver_removals()
        ours = api.driver_name()
        local = {n.attrs["Name"]: n.attrs for n in api.client.networks.list(filters={"driver": ours})}
        ids = {n["Id"] for n in local.values()}
        for network_id, (name, _) in list(self.known.items()):
            if network_id not in ids:  # removed here, its destroy event not handled yet
                self._removed_here(network_id, name)
        with self._lock:
            defs = dict(self.defs)
            self.known = {n["Id"]: (name, (n.get("Labels") or {}).get(LABEL_DEF) or
                                    self.state.originated(n["Id"])) for name, n in local.items()}
        for name, net in local.items():
            self._reconcile_local(api, name, net, defs.get(name))
        for name, (rec, _) in defs.items():
            if name not in local and name not in self._undelivered:
                self._create_here(api, rec)
        for name in list(self.pending):
            if name not in local:
                self.pending.pop(name, None)

    def _reconcile_local(self, api: DockerAPI, name: str, net: dict[str, Any], current: tuple[NetDefRecord, int] | None
                         ) -> None:
        uid = (net.get("Labels") or {}).get(LABEL_DEF) or self.state.originated(net["Id"])
        if uid is not None:
            if current is None or current[0].uid != uid:
                self._remove_here(api, name, net)  # removed (or replaced) elsewhere
            return
        # Created here by a user and not published yet.
        mine = definition_of(net, self.host, api.driver_name())
        if current is None:
            if self.store.create(self.keys.netdef(name), mine.dump()):
                self.state.set_originated(net["Id"], mine.uid)
                self.conflicts.pop(name, None)
                log.info("network %s published: every host running pyoverlay creates it", name)
            return
        problem = same_network(mine, current[0])
        if problem is None:  # the same network, created here by hand too: it is that definition's copy
            self.state.set_originated(net["Id"], current[0].uid)
            self.conflicts.pop(name, None)
        elif self.conflicts.get(name) != problem:
            self.conflicts[name] = problem
            log.error("network %s exists in the cluster with different settings (%s): not propagated; remove "
                      "or rename one of them", name, problem)

    def _create_here(self, api: DockerAPI, rec: NetDefRecord) -> None:
        ours = api.driver_name()
        pools = [docker.types.IPAMPool(subnet=p.subnet, gateway=p.gateway.split("/")[0] if p.gateway else None,
                                       iprange=p.ip_range, aux_addresses=p.aux or None) for p in rec.pools]
        ipam = docker.types.IPAMConfig(driver=ours if rec.ipam_driver == OURS else rec.ipam_driver,
                                       pool_configs=pools, options=rec.ipam_options or None)
        # The API call docker-py's networks.create makes, plus EnableIPv4 (which docker-py does not know yet):
        # without it Docker 28 would give an IPv6-only network an IPv4 pool here.
        body: dict[str, Any] = {
            "Name": rec.name, "Driver": ours, "Options": rec.options or None, "IPAM": ipam,
            "CheckDuplicate": True, "Internal": rec.internal, "EnableIPv6": rec.ipv6, "Attachable": rec.attachable,
            "Labels": {**rec.labels, LABEL_DEF: rec.uid, LABEL_ORIGIN: rec.origin_host}}
        if not rec.ipv4:
            body["EnableIPv4"] = False
        low = api.client.api
        try:
            created = low._result(low._post_json(low._url("/networks/create"), data=body), json=True)
        except docker.errors.APIError as err:
            problem = f"could not create it here: {err.explanation or err}"
            if self.conflicts.get(rec.name) != problem:
                log.error("network %s (from %s): %s", rec.name, rec.origin_host, problem)
            self.conflicts[rec.name] = problem
            return
        self.conflicts.pop(rec.name, None)
        self.known[created["Id"]] = (rec.name, rec.uid)
        log.info("network %s created here from %s's definition", rec.name, rec.origin_host)

    def _remove_here(self, api: DockerAPI, name: str, net: dict[str, Any]) -> None:
        try:
            api.client.networks.get(net["Id"]).remove()
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as err:
            users = self._users(api, net["Id"])
            why = f"still in use here by {', '.join(users) or 'containers'}; removed once they leave"
            if self.pending.get(name) != why:
                log.warning("network %s was removed in the cluster but is %s (%s)", name, why,
                            err.explanation or err)
            self.pending[name] = why
            return
        with self._lock:
            self.pending.pop(name, None)
            self.known.pop(net["Id"], None)
            self.state.forget_originated(net["Id"])
        log.info("network %s removed here (removed in the cluster)", name)

    @staticmethod
    def _users(api: DockerAPI, network_id: str) -> list[str]:
        try:
            containers = api.client.networks.get(network_id).attrs.get("Containers") or {}
        except docker.errors.APIError:
            return []
        return sorted(c.get("Name", short_id(cid)) for cid, c in containers.items())

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"definitions": sorted(self.defs), "pending_removal": dict(self.pending),
                    "conflicts": dict(self.conflicts)}

