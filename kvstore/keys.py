"""Where each record lives in etcd. Every key pyoverlay writes is built here.

Layout under the prefix (default /pyoverlay/v1):
    hosts/<host>                       HostRecord, bound to the host's lease
    networks/<nkey>                    NetworkRecord (cluster identity of one overlay network)
    members/<nkey>/<host>              MemberRecord: host takes part, with its Docker NetworkID
    endpoints/<nkey>/<endpoint id>     EndpointRecord: IP, MAC, VTEP (what peers program)
    departed/<host>                    DepartureRecord: when a host without a lease was first seen gone
    vnis/<vni>                         the network key holding that VNI
    pools/<pool id>                    PoolRecord (one address pool, refcounted per host)
    pool-index                         bumped by every pool create/delete: serialises overlap checks
    addrs/<pool id>/<address>          AddressRecord: one allocated address
    netdefs/<name>                     NetDefRecord: a Docker network to have on every host (propagation)
    aliases/<nkey>/<endpoint id>       AliasRecord: DNS names of an endpoint beyond its container name
Network keys, pool ids and host names never contain "/", so a prefix never matches a neighbour's keys.
"""

from __future__ import annotations


class Keys:
    def __init__(self, prefix: str = "/pyoverlay/v1") -> None:
        self.root = "/" + prefix.strip("/")

    def _k(self, *parts: str | int) -> str:
        return "/".join([self.root, *(str(p) for p in parts)])

    def hosts(self) -> str:
        return self._k("hosts", "")

    def host(self, host: str) -> str:
        return self._k("hosts", host)

    def networks(self) -> str:
        return self._k("networks", "")

    def network(self, nkey: str) -> str:
        return self._k("networks", nkey)

    def all_members(self) -> str:
        return self._k("members", "")

    def members(self, nkey: str) -> str:
        return self._k("members", nkey, "")

    def member(self, nkey: str, host: str) -> str:
        return self._k("members", nkey, host)

    def all_endpoints(self) -> str:
        return self._k("endpoints", "")

    def endpoints(self, nkey: str) -> str:
        return self._k("endpoints", nkey, "")

    def endpoint(self, nkey: str, endpoint_id: str) -> str:
        return self._k("endpoints", nkey, endpoint_id)

    def departed(self) -> str:
        return self._k("departed", "")

    def departure(self, host: str) -> str:
        return self._k("departed", host)

    def vni(self, vni: int) -> str:
        return self._k("vnis", vni)

    def pools(self) -> str:
        return self._k("pools", "")

    def pool(self, pool_id: str) -> str:
        return self._k("pools", pool_id)

    def pool_index(self) -> str:
        return self._k("pool-index")

    def all_addrs(self) -> str:
        return self._k("addrs", "")

    def addrs(self, pool_id: str) -> str:
        return self._k("addrs", pool_id, "")

    def addr(self, pool_id: str, address: str) -> str:
        return self._k("addrs", pool_id, address)

    def netdefs(self) -> str:
        return self._k("netdefs", "")

    def netdef(self, name: str) -> str:
        return self._k("netdefs", name)

    def all_aliases(self) -> str:
        return self._k("aliases", "")

    def aliases(self, nkey: str, endpoint_id: str) -> str:
        return self._k("aliases", nkey, endpoint_id)

    def health(self) -> str:
        """Never written: health checks read it (a user limited to the prefix may read nothing else)."""
        return self._k("health")

    @staticmethod
    def last(key: str) -> str:
        return key.rsplit("/", 1)[-1]
