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
    rec = resolve(name, store, keys, state, docker)
    hosts = {}
    for kv in store.range(keys.hosts())[0]:
        try:
            h = HostRecord.load(kv.value, kv.key)
        except ValueError:
            continue
        hosts[h.host] = h
    members = {}
    for kv in store.range(keys.members(rec.key))[0]:
        m = MemberRecord.load(kv.value, kv.key)
        live = hosts.get(m.host)
        members[m.host] = {"docker_network_id": short_id(m.docker_network_id), "live": live is not None,
                           "vtep": live.vtep if live else None, "key_epoch": live.key_epoch if live else None}
    names = {}
    for kv in store.range(keys.all_aliases() + rec.key + "/")[0]:
        try:
            a = AliasRecord.load(kv.value, kv.key)
            names[a.endpoint_id] = a.container
        except ValueError:
            continue
    endpoints = []
    for kv in store.range(keys.endpoints(rec.key))[0]:
        try:
            ep = EndpointRecord.load(kv.value, kv.key)
        except ValueError:
            continue
        endpoints.append({"endpoint_id": short_id(ep.endpoint_id), "host": ep.host, "vtep": ep.vtep, "mac": ep.mac,
                          "address": ep.address, "address6": ep.address6,
                          "container": ep.name or names.get(ep.endpoint_id)})
    addresses = []
    pools = {}
    for cidr in rec.subnets:
        pid = pool_id(ipaddress.ip_network(cidr), rec.options.get(NETWORK_OPT))
        kvs, _ = store.range(keys.addrs(pid))
        first, last = usable(ipaddress.ip_network(cidr))
        pools[pid] = {"cidr": cidr, "used": len(kvs), "usable": last - first + 1}
        for kv in kvs:
            try:
                held = AddressRecord.load(kv.value, kv.key)
            except ValueError:
                continue
            addresses.append({"pool": pid, "address": held.address, "kind": held.kind, "host": held.host,
                              "owner": held.owner, "endpoint": short_id(held.endpoint) if held.endpoint else None,
                              "claims": held.claims})
    return {
        "key": rec.key, "vni": rec.vni, "subnets": rec.subnets, "gateway": rec.gateway, "gateway6": rec.gateway6,
        "encrypted": rec.encrypted, "internal": rec.internal, "mtu": rec.mtu, "port": rec.port,
        "created_by": rec.created_by, "options": rec.options, "hosts": members,
        "endpoints": sorted(endpoints, key=lambda e: (e["host"], e["address"] or "")),
        "addresses": sorted(addresses, key=lambda a: (a["pool"], ipaddress.ip_address(a["address"]))),
        "pools": pools,
    }
