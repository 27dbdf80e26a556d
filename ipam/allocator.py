"""The IpamDriver's logic: pools and addresses unique across every host sharing the etcd.

Every change is one etcd transaction that compares what it read (create-if-absent for a new address,
compare-mod-revision for a changed record), never a read followed by a blind write. Pool creation also
compares the pool index, so two hosts cannot create overlapping pools at the same moment.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ipam.subnets import (
    NETWORK_OPT,
    IPNetwork,
    check_in_pool,
    check_network_id,
    next_free,
    overlaps,
    parse_address,
    parse_cidr,
    pick_subnet,
    pool_id,
    usable,
)
from kvstore import Keys, Store, StoreError, StoreUnavailable, Txn
from kvstore.records import AddressRecord, InvalidRecord, PoolRecord, dns_name
from plugin.errors import Conflict, InvalidRequest, NotFound, Unavailable, short_id

log = logging.getLogger(__name__)

GATEWAY_TYPE = "com.docker.network.gateway"
ENDPOINT_NAME = "com.docker.network.endpoint.name"
LOCAL_SPACE = "PyOverlayLocal"
GLOBAL_SPACE = "PyOverlayGlobal"
_RETRIES = 16


@dataclass(frozen=True)
class DefaultPools:
    v4: IPNetwork
    v4_size: int
    v6: IPNetwork
    v6_size: int


@contextmanager
def store_errors(outcome: str, prefix: str = "") -> Iterator[None]:
    """etcd failures become plugin errors that say so and what did not happen (they are answered fast)."""
    try:
        yield
    except StoreUnavailable as err:
        raise Unavailable(f"{prefix}cluster store unavailable, {outcome}: {err}") from err
    except StoreError as err:
        raise Unavailable(f"{prefix}cluster store error, {outcome}: {err}") from err
    except InvalidRecord as err:
        raise Conflict(f"{prefix}{err}; {outcome} (pyoverlay doctor lists such records)") from err


def _store_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with store_errors("nothing was changed", "IPAM: "):
            return fn(*args, **kwargs)

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


class Ipam:
    def __init__(self, store: Store, keys: Keys, host: str, defaults: DefaultPools,
                 host_routes: Callable[[], list[IPNetwork]], swarm: bool = False) -> None:
        self.store = store
        # Swarm (scope global): managers allocate pools, gateways and addresses; a node then asks for the very
        # address the manager handed its task, which is a claim of that allocation, not a conflict.
        self.swarm = swarm
        self.keys = keys
        self.host = host
        self.defaults = defaults
        self.host_routes = host_routes
        self._cursor: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- pools ------------------------------------------------------------------------------------------

    @_store_errors
    def request_pool(self, pool: str, sub_pool: str, options: dict[str, str], v6: bool) -> dict[str, Any]:
        explicit = options.get(NETWORK_OPT) or None
        if explicit is not None:
            check_network_id(explicit, f"Options.{NETWORK_OPT}")
        if sub_pool and not pool:
            raise InvalidRequest("SubPool: an ip-range needs a subnet (Pool is empty)")
        net = parse_cidr(pool, "Pool", v6) if pool else None
        rng = parse_cidr(sub_pool, "SubPool", v6) if sub_pool else None
        if net is not None and rng is not None and not rng.subnet_of(net):  # type: ignore[arg-type]
            raise InvalidRequest(f"SubPool: ip-range {rng} is not inside the subnet {net}")
        family = 6 if v6 else 4

        for _ in range(_RETRIES):
            if explicit is not None:
                pid = f"net.{explicit}.v{family}"
            elif net is not None:
                pid = pool_id(net, None)
            else:
                pid = ""
            if pid:
                kv = self.store.get(self.keys.pool(pid))
                if kv is not None:
                    rec = PoolRecord.load(kv.value, kv.key)
                    self._check_same_pool(rec, net, rng)
                    rec.refs[self.host] = rec.refs.get(self.host, 0) + 1
                    if self.store.swap(kv.key, rec.dump(), kv.mod_revision):
                        return self._pool_answer(rec)
                    continue
            created = self._new_pool(pid, net, rng, explicit, family)
            if created is not None:
                return self._pool_answer(created)
        raise Unavailable("IPAM: too many concurrent pool changes; try again")

    def _check_same_pool(self, rec: PoolRecord, net: IPNetwork | None, rng: IPNetwork | None) -> None:
        if net is not None and rec.cidr != str(net):
            raise Conflict(
                f"Pool: network id {rec.pool_id.split('.')[1]} already uses subnet {rec.cidr}, not {net}"
            )
        if net is not None and (str(rng) if rng else None) != rec.ip_range:
            raise Conflict(
                f"SubPool: subnet {rec.cidr} is already defined with ip-range {rec.ip_range or 'none'}, "
                f"not {rng or 'none'}; use the same --ip-range on every host"
            )

    def _new_pool(self, pid: str, net: IPNetwork | None, rng: IPNetwork | None, explicit: str | None,
                  family: int) -> PoolRecord | None:
        """Create a pool record; None when another host changed the pools meanwhile (retry)."""
        kvs, _ = self.store.range(self.keys.pools())
        pools = list(PoolRecord.load_valid(kvs).values())
        index = self.store.get(self.keys.pool_index())
        if pid and any(p.pool_id == pid for p in pools):
            return None  # created by another host a moment ago (the same network made on both at once): join it
        if net is None:
            taken = [ipaddress.ip_network(p.cidr) for p in pools] + self.host_routes()
            base, size = (self.defaults.v6, self.defaults.v6_size) if family == 6 else (
                self.defaults.v4, self.defaults.v4_size)
            net = pick_subnet(base, size, taken)
            if net is None:
                raise Unavailable(f"IPAM: no free /{size} left in the default range {base}; pass --subnet")
            pid = pid or pool_id(net, None)
        elif explicit is None:
            clash = overlaps(net, [ipaddress.ip_network(p.cidr) for p in pools if not p.explicit])
            if clash is not None:
                raise Conflict(
                    f"Pool: {net} overlaps the pyoverlay pool {clash}; choose another subnet, or give both "
                    f"networks ids with --ipam-opt {NETWORK_OPT}=ID and -o {NETWORK_OPT}=ID"
                )
        rec = PoolRecord(pool_id=pid, cidr=str(net), family=family, explicit=explicit is not None,  # type: ignore[arg-type]
                         ip_range=str(rng) if rng else None, refs={self.host: 1})
        txn = Txn().absent(self.keys.pool(pid))
        if index is None:
            txn.absent(self.keys.pool_index())
        else:
            txn.unchanged(index.key, index.mod_revision)
        counter = int(index.value or b"0") + 1 if index else 1
        txn.put(self.keys.pool(pid), rec.dump()).put(self.keys.pool_index(), str(counter))
        return rec if self.store.commit(txn) else None

    @staticmethod
    def _pool_answer(rec: PoolRecord) -> dict[str, Any]:
        return {"PoolID": rec.pool_id, "Pool": rec.cidr, "Data": {}}

    @_store_errors
    def release_pool(self, pid: str) -> dict[str, Any]:
        self._drop_refs(pid, self.host, everything=False)
        return {}

    def _drop_refs(self, pid: str, host: str, everything: bool) -> bool:
        """One RequestPool reference of host (or all of them) goes; the last reference anywhere takes the
        pool and every address in it along, in the same transaction. Returns whether anything changed."""
        for _ in range(_RETRIES):
            kv = self.store.get(self.keys.pool(pid))
            if kv is None:
                return False
            rec = PoolRecord.load(kv.value, kv.key)
            if rec.refs.get(host, 0) <= 0:
                return False
            rec.refs[host] = 0 if everything else rec.refs[host] - 1
            if rec.refs[host] == 0:
                del rec.refs[host]
            txn = Txn().unchanged(kv.key, kv.mod_revision)
            if rec.refs:
                txn.put(kv.key, rec.dump())
            else:
                index = self.store.get(self.keys.pool_index())
                counter = int(index.value or b"0") + 1 if index else 1
                txn.delete(kv.key).delete_prefix(self.keys.addrs(pid)).put(self.keys.pool_index(), str(counter))
            if self.store.commit(txn):
                if not rec.refs:
                    self._cursor.pop(pid, None)
                return True
        raise Unavailable("IPAM: too many concurrent pool changes; try again")

    # -- hosts that left, and hosts that come back -----------------------------------------------------

    def forget_host(self, host: str) -> int:
        """Release everything a departed host held: its addresses, its share of gateway and aux
        addresses, its pool references. Each change compares what it read, so several hosts may run
        this at once. Returns how many records changed. Raises StoreError (the caller retries later)."""
        changed = 0
        pools, _ = self.store.range(self.keys.pools())
        for pkv in pools:
            pid = PoolRecord.load(pkv.value, pkv.key).pool_id
            addrs, _ = self.store.range(self.keys.addrs(pid))
            for kv in addrs:
                held = AddressRecord.load(kv.value, kv.key)
                txn = Txn().unchanged(kv.key, kv.mod_revision)
                if held.kind == "endpoint" and held.host == host:
                    txn.delete(kv.key)
                elif held.kind != "endpoint" and host in held.claims:
                    held.claims.remove(host)
                    if held.claims:
                        txn.put(kv.key, held.dump())
                    else:
                        txn.delete(kv.key)
                else:
                    continue
                if self.store.commit(txn):  # lost a race: whoever won changed it already
                    changed += 1
                    log.info("released %s in %s, held by departed host %s", held.address, pid, host)
            changed += self._drop_refs(pid, host, everything=True)
        return changed

    def reclaim(self, pid: str, cidr: str, gateway: str | None, addresses: dict[str, str]) -> list[str]:
        """After this host was away long enough to be forgotten: take back its pool reference, gateway
        claim and its endpoints' addresses (address -> endpoint id). Returns the addresses that someone
        else holds by now (a conflict the operator must resolve; they are left alone)."""
        kv = self.store.get(self.keys.pool(pid))
        if kv is None:
            net = ipaddress.ip_network(cidr)
            explicit = pid.split(".")[1] if pid.startswith("net.") else None
            if self._new_pool(pid, net, None, explicit, net.version) is None and \
                    self.store.get(self.keys.pool(pid)) is None:
                raise Unavailable(f"IPAM: could not re-create pool {pid}")
            log.warning("pool %s was gone from etcd (this host was away); re-created", pid)
        else:
            rec = PoolRecord.load(kv.value, kv.key)
            if self.host not in rec.refs:
                rec.refs[self.host] = 1
                self.store.swap(kv.key, rec.dump(), kv.mod_revision)  # a lost race is retried next time
        if gateway:
            gw = ipaddress.ip_interface(gateway).ip
            try:
                self._claim(pid, gw, "gateway", None)
            except Conflict:
                log.error("gateway %s of %s is now held by something else", gw, pid)
        lost = []
        for address, endpoint in addresses.items():
            key = self.keys.addr(pid, address)
            new = AddressRecord(address=address, kind="endpoint", host=self.host, endpoint=endpoint,
                                request=uuid.uuid4().hex)
            if self.store.create(key, new.dump()):
                log.warning("address %s of endpoint %s re-claimed after this host was away", address,
                            short_id(endpoint))
                continue
            cur = self.store.get(key)
            held = AddressRecord.load(cur.value, cur.key) if cur is not None else None
            if held is not None and not (held.host == self.host and held.kind == "endpoint"):
                lost.append(address)
                log.error("address %s of local endpoint %s was released while this host was away and is "
                          "now held%s: two containers share it; remove one of them",
                          address, short_id(endpoint), self._holder(pid, address))
        return lost

    def _pool(self, pid: str, field: str = "PoolID") -> tuple[PoolRecord, IPNetwork, int]:
        kv = self.store.get(self.keys.pool(pid))
        if kv is None:
            raise NotFound(f"{field}: unknown pool {pid!r} (never requested, or already released)")
        rec = PoolRecord.load(kv.value, kv.key)
        return rec, ipaddress.ip_network(rec.cidr), kv.mod_revision

    # -- addresses --------------------------------------------------------------------------------------

    @_store_errors
    def request_address(self, pid: str, address: str, options: dict[str, str]) -> dict[str, Any]:
        rec, net, _ = self._pool(pid)
        # Docker 20.10 sends no options for endpoints and aux addresses alike: both start as "endpoint";
        # CreateNetwork then marks the aux ones "reserved" (see mark_reserved).
        kind = "gateway" if options.get("RequestAddressType") == GATEWAY_TYPE else "endpoint"
        owner = dns_name(options.get(ENDPOINT_NAME))
        if address:
            addr = parse_address(address, "Address")
            check_in_pool(addr, net, "Address")
        elif kind == "gateway":
            addr = ipaddress.ip_address(rec.gateway) if rec.gateway else ipaddress.ip_address(usable(net)[0])
        else:
            return self._address_answer(self._allocate(rec, net, owner), net)

        if kind == "endpoint":
            new = AddressRecord(address=str(addr), kind="endpoint", host=self.host, owner=owner,
                                request=uuid.uuid4().hex)
            if not self.store.create(self.keys.addr(pid, str(addr)), new.dump()) and not (
                    self.swarm and self._take_over(pid, addr, owner)):
                # An aux address another host's network already reserved is shared, not taken.
                self._claim(pid, addr, "reserved", owner, create=False)
        else:
            self._claim(pid, addr, kind, owner)
            if rec.gateway is None:
                self._remember_gateway(pid, addr)
        return self._address_answer(addr, net)

    @_store_errors
    def mark_reserved(self, pid: str, addresses: list[str]) -> None:
        """Aux addresses (--aux-address) of a network: shared by every host that defines the network."""
        for address in addresses:
            key = self.keys.addr(pid, str(parse_address(address, "AuxAddresses")))
            for _ in range(_RETRIES):
                kv = self.store.get(key)
                if kv is None:
                    break
                held = AddressRecord.load(kv.value, kv.key)
                if held.kind == "reserved" and self.host in held.claims:
                    break
                if held.kind == "endpoint" and held.host != self.host:
                    break  # a container elsewhere holds it; Docker will not use it here anyway
                held.kind = "reserved"
                held.claims = sorted(set(held.claims) | {self.host})
                if self.store.swap(key, held.dump(), kv.mod_revision):
                    break

    @staticmethod
    def _address_answer(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, net: IPNetwork) -> dict[str, Any]:
        return {"Address": f"{addr}/{net.prefixlen}", "Data": {}}

    def _holder(self, pid: str, addr: Any) -> str:
        kv = self.store.get(self.keys.addr(pid, str(addr)))
        if kv is None:
            return ""
        held = AddressRecord.load(kv.value, kv.key)
        who = {"gateway": "the network gateway", "reserved": "a reserved (aux) address"}.get(
            held.kind, f"container {held.owner}" if held.owner else (
                f"endpoint {short_id(held.endpoint)}" if held.endpoint else "an endpoint"))
        return f" by {who} on host {held.host}"

    def _claim(self, pid: str, addr: Any, kind: str, owner: str | None, create: bool = True) -> None:
        """Gateway and aux addresses are shared by every host defining the network: claim, not take."""
        key = self.keys.addr(pid, str(addr))
        for _ in range(_RETRIES):
            kv = self.store.get(key)
            if kv is None:
                if not create:
                    raise Unavailable(f"Address: {addr} changed while it was being claimed; try again")
                new = AddressRecord(address=str(addr), kind=kind, host=self.host, owner=owner,  # type: ignore[arg-type]
                                    claims=[self.host])
                if self.store.create(key, new.dump()):
                    return
                continue
            held = AddressRecord.load(kv.value, kv.key)
            if held.kind != kind:
                raise Conflict(f"Address: {addr} is already in use{self._holder(pid, addr)}")
            if self.host in held.claims:
                if kind == "reserved" and not create:
                    # This host reserved it already (--aux-address), so this request is a container's --ip.
                    raise Conflict(f"Address: {addr} is reserved by the network (--aux-address); choose another")
                return
            held.claims.append(self.host)
            if self.store.swap(key, held.dump(), kv.mod_revision):
                return
        raise Unavailable("IPAM: too many concurrent changes to one address; try again")

    def _take_over(self, pid: str, addr: Any, owner: str | None) -> bool:
        """Swarm: the endpoint address a manager allocated for a task moves to the host the task runs on
        (which releases it when the container goes). False when the address is not an endpoint's."""
        key = self.keys.addr(pid, str(addr))
        for _ in range(_RETRIES):
            kv = self.store.get(key)
            if kv is None:
                new = AddressRecord(address=str(addr), kind="endpoint", host=self.host, owner=owner,
                                request=uuid.uuid4().hex)
                if self.store.create(key, new.dump()):
                    return True
                continue
            held = AddressRecord.load(kv.value, kv.key)
            if held.kind != "endpoint":
                return False
            if held.host == self.host:
                return True
            log.info("swarm: %s in %s moves from host %s (the manager's allocation) to this host", addr, pid,
                     held.host)
            held.host, held.owner = self.host, owner or held.owner
            if self.store.swap(key, held.dump(), kv.mod_revision):
                return True
        raise Unavailable("IPAM: too many concurrent changes to one address; try again")

    def _remember_gateway(self, pid: str, addr: Any) -> None:
        for _ in range(_RETRIES):
            kv = self.store.get(self.keys.pool(pid))
            if kv is None:
                return
            rec = PoolRecord.load(kv.value, kv.key)
            if rec.gateway is not None:
                return
            rec.gateway = str(addr)
            if self.store.swap(kv.key, rec.dump(), kv.mod_revision):
                return

    def _allocate(self, rec: PoolRecord, net: IPNetwork, owner: str | None) -> Any:
        rng = ipaddress.ip_network(rec.ip_range) if rec.ip_range else None
        first, last = usable(net, rng)
        new = AddressRecord(address=str(ipaddress.ip_address(first)), kind="endpoint", host=self.host, owner=owner,
                            request=uuid.uuid4().hex)
        with self._lock:
            cursor = self._cursor.get(rec.pool_id, first - 1)
        used: set[int] | None = None
        for _ in range(_RETRIES * 4):
            if used is None:
                # Fast path: the next address after the last one this host handed out is usually free.
                cand = next_free(first, last, set(), cursor)
            else:
                # Contended: spread the contenders over the next few free addresses instead of racing
                # them all for the same one.
                cand = next_free(first, last, used, cursor + random.randrange(8))
                if cand is None:
                    cand = next_free(first, last, used, cursor)
            if cand is None:
                raise Unavailable(f"IPAM: no free address left in {rng or net}")
            addr = ipaddress.ip_address(cand)
            new.address = str(addr)
            if self.store.create(self.keys.addr(rec.pool_id, str(addr)), new.dump()):
                with self._lock:
                    self._cursor[rec.pool_id] = cand
                return addr
            kvs, _ = self.store.range(self.keys.addrs(rec.pool_id), keys_only=True)
            used = {int(ipaddress.ip_address(Keys.last(kv.key))) for kv in kvs}
            if rec.gateway:
                used.add(int(ipaddress.ip_address(rec.gateway)))
        raise Unavailable("IPAM: too many concurrent allocations; try again")

    @_store_errors
    def release_address(self, pid: str, address: str) -> dict[str, Any]:
        addr = parse_address(address, "Address")
        key = self.keys.addr(pid, str(addr))
        for _ in range(_RETRIES):
            kv = self.store.get(key)
            if kv is None:
                return {}
            held = AddressRecord.load(kv.value, kv.key)
            txn = Txn().unchanged(key, kv.mod_revision)
            if held.kind == "endpoint":
                if held.host != self.host:
                    # Another host holds it now (a container moved there): not ours to free.
                    log.warning("ReleaseAddress %s in %s: held by host %s, not this host; left alone",
                                addr, pid, held.host)
                    return {}
                txn.delete(key)
            else:
                if self.host not in held.claims:
                    return {}
                held.claims.remove(self.host)
                if held.claims:
                    txn.put(key, held.dump())
                else:
                    txn.delete(key)
            if self.store.commit(txn):
                return {}
        raise Unavailable("IPAM: too many concurrent changes to one address; try again")

    @staticmethod
    def address_spaces() -> dict[str, str]:
        return {"LocalDefaultAddressSpace": LOCAL_SPACE, "GlobalDefaultAddressSpace": GLOBAL_SPACE}
