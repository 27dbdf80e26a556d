"""`pyoverlay inspect NETWORK`: one network as the whole cluster sees it, read from etcd."""

from __future__ import annotations

import ipaddress
from typing import Any

from ipam.subnets import NETWORK_OPT, pool_id, usable
from kvstore import Keys, Store
from kvstore.records import AddressRecord, AliasRecord, EndpointRecord, HostRecord, MemberRecord, NetworkRecord
from plugin.docker.api import API_ERRORS, DockerAPI
from plugin.errors import NotFound, short_id
from plugin.state import LocalState


def resolve(name: str, store: Store, keys: Keys, state: LocalState, docker: DockerAPI | None) -> NetworkRecord:
    """A network by its Docker name or ID on this host, or by its cluster key (subnet or -o pyoverlay.network)."""
    for local in state.networks():
        if name in (local.record.key, local.docker_network_id) or (
                len(name) >= 12 and local.docker_network_id.startswith(name)):
            return local.record
    if docker is not None:
        try:
            found = state.network(docker.client.api.inspect_network(name)["Id"])
            if found is not None:
                return found.record
        except API_ERRORS:
            pass  # not a Docker network here (or Docker unreachable): try the cluster key
    for candidate in (name, name.replace("/", "_")):
        kv = store.get(keys.network(candidate))
        if kv is not None:
            return NetworkRecord.load(kv.value, kv.key)
    raise NotFound(f"no pyoverlay network {name!r}: give a Docker network name or ID on this host, or a cluster "
                   f"key such as 10.20.0.0_24 (pyoverlay status lists them)")


def inspect(name: str, store: Store, keys: Keys, state: LocalState, docker: DockerAPI | None) -> dict[str, Any]:
    """One network as etcd has it: its record, its hosts, endpoints, pools and addresses (invalid records are
    left out here; `pyoverlay doctor` lists them)."""
    rec = resolve(name, store, keys, state, docker)
    pools, addresses = _pools_and_addresses(rec, store, keys)
    return {
        "key": rec.key, "vni": rec.vni, "subnets": rec.subnets, "gateway": rec.gateway, "gateway6": rec.gateway6,
        "encrypted": rec.encrypted, "internal": rec.internal, "mtu": rec.mtu, "port": rec.port,
        "created_by": rec.created_by, "options": rec.options, "hosts": _members(rec, store, keys),
        "endpoints": sorted(_endpoints(rec, store, keys), key=lambda e: (e["host"], e["address"] or "")),
        "addresses": sorted(addresses, key=lambda a: (a["pool"], ipaddress.ip_address(a["address"]))),
        "pools": pools,
    }


def _members(rec: NetworkRecord, store: Store, keys: Keys) -> dict[str, dict[str, Any]]:
    hosts = {h.host: h for h in HostRecord.load_valid(store.range(keys.hosts())[0]).values()}
    members = {}
    for m in MemberRecord.load_valid(store.range(keys.members(rec.key))[0]).values():
        live = hosts.get(m.host)
        members[m.host] = {"docker_network_id": short_id(m.docker_network_id), "live": live is not None,
                           "vtep": live.vtep if live else None, "key_epoch": live.key_epoch if live else None}
    return members


def _endpoints(rec: NetworkRecord, store: Store, keys: Keys) -> list[dict[str, Any]]:
    aliases = AliasRecord.load_valid(store.range(keys.all_aliases() + rec.key + "/")[0]).values()
    names = {a.endpoint_id: a.container for a in aliases}
    return [{"endpoint_id": short_id(ep.endpoint_id), "host": ep.host, "vtep": ep.vtep, "mac": ep.mac,
             "address": ep.address, "address6": ep.address6, "container": ep.name or names.get(ep.endpoint_id)}
            for ep in EndpointRecord.load_valid(store.range(keys.endpoints(rec.key))[0]).values()]


def _pools_and_addresses(rec: NetworkRecord, store: Store, keys: Keys
                         ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    pools, addresses = {}, []
    for cidr in rec.subnets:
        pid = pool_id(ipaddress.ip_network(cidr), rec.options.get(NETWORK_OPT))
        kvs, _ = store.range(keys.addrs(pid))
        first, last = usable(ipaddress.ip_network(cidr))
        pools[pid] = {"cidr": cidr, "used": len(kvs), "usable": last - first + 1}
        for held in AddressRecord.load_valid(kvs).values():
            addresses.append({"pool": pid, "address": held.address, "kind": held.kind, "host": held.host,
                              "owner": held.owner, "endpoint": short_id(held.endpoint) if held.endpoint else None,
                              "claims": held.claims})
    return pools, addresses
