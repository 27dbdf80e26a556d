"""The NetworkDriver's logic: networks, endpoints, joins; etcd records and the data path kept in step.

Every call either completes or undoes what it did (etcd and kernel), and every delete path accepts IDs it
does not know. etcd is written before the local file, so a crash between the two is repaired from etcd at
the next start; etcd changes that fail on a delete path are queued and retried, never dropped.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from ipam.allocator import Ipam, store_errors
from ipam.subnets import NETWORK_OPT, network_key, pool_id
from kvstore import KV, Keys, Store, StoreError, Txn
from kvstore.records import AddressRecord, EndpointRecord, InvalidRecord, MemberRecord, NetworkRecord, R
from plugin.cluster.encryption import Encryption
from plugin.config import Settings
from plugin.driver.garbage import kernel_garbage, remove_kernel_garbage
from plugin.driver.options import (
    GENERIC,
    VNI_MAX,
    VNI_MIN,
    VNI_OPT,
    Addressing,
    Interface,
    NetworkOptions,
    Subnet,
    addressing,
    network_options,
)
from plugin.errors import Conflict, InvalidRequest, NotFound, PluginError, Unavailable, short_id
from plugin.kernel.datapath import DataPath, NetworkPlan, mac_from_ip
from plugin.kernel.ipsec import ESP_OVERHEAD
from plugin.state import LocalEndpoint, LocalNetwork, LocalState

log = logging.getLogger(__name__)



def _loads_as(cls: type[R], kv: KV) -> R | None:
    """The record at kv, or None when it is invalid (ours then replaces it)."""
    try:
        return cls.load(kv.value, kv.key)
    except InvalidRecord:
        return None


class NetworkDriver:
    def __init__(self, settings: Settings, store: Store, keys: Keys, datapath: DataPath,
                 state: LocalState, ipam: Ipam, encryption: Encryption,
                 network_changed: Callable[[], None] = lambda: None) -> None:
        """network_changed: a local network came or went (the peers are programmed for local networks)."""
        self.settings = settings
        self.encryption = encryption
        self.ipam = ipam
        self.store = store
        self.keys = keys
        self.datapath = datapath
        self.state = state
        self.host = settings.host
        self._network_changed = network_changed
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()

    def _lock(self, docker_network_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[docker_network_id]

    # -- capabilities -----------------------------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        return {"Scope": self.settings.scope, "ConnectivityScope": "global"}

    # -- networks ---------------------------------------------------------------------------------------

    def create_network(self, nid: str, opts: dict[str, Any], v4: list[Subnet], v6: list[Subnet]) -> dict[str, Any]:
        """Docker's CreateNetwork: check everything first, then join (or make) the cluster network in etcd, then
        this host's kernel objects; a failure after the join is rolled back, and the error says how that went."""
        options, addrs = network_options(opts), addressing(v4, v6)
        self._check_encryption_possible(options)
        wanted = self._wanted_record(nid, options, addrs)
        # Per cluster network too: two Docker networks created at the same moment for one cluster network (by
        # hand and by propagation, which Docker 20.10's name check lets through) must not both be made here.
        with self._lock(nid), self._lock(f"key:{wanted.key}"):
            if self._already_here(nid, wanted):
                return {}  # a repeated CreateNetwork: already done
            record = self._register_network(nid, wanted, options, addrs)
            mtu = self._set_up_kernel(nid, record)
            self.state.put_network(LocalNetwork(docker_network_id=nid, record=record, mtu=mtu))
        self._network_changed()
        log.info("network %s: key=%s vni=%d mtu=%d subnets=%s", short_id(nid), record.key, record.vni, mtu,
                 ",".join(record.subnets))
        return {}

    def _check_encryption_possible(self, options: NetworkOptions) -> None:
        if not options.encrypted:
            return
        missing = self.encryption.missing()   # probes the kernel: once
        if missing:
            # Fail closed: no clear-text network may stand in for an encrypted one.
            raise Unavailable(
                f"--opt encrypted: this host's kernel lacks {'; '.join(missing)}. "
                f"No network was created and no clear-text path was set up; use a kernel with IPsec ESP and "
                f"AES-GCM, or create the network without --opt encrypted only if clear text is acceptable"
            )
        if not self.settings.cluster_secret:
            # Without a secret anyone who writes etcd can substitute a host's public keys (man in the middle).
            raise InvalidRequest(
                "--opt encrypted needs a cluster secret: set PYOVERLAY_CLUSTER_SECRET to the same random value "
                "on every host (for example from `openssl rand -hex 32`; managed plugin: docker plugin set "
                "pyoverlay PYOVERLAY_CLUSTER_SECRET=...), restart the plugin, and create the network again"
            )
        if self.datapath.underlay().version == 6:
            raise InvalidRequest(
                "--opt encrypted needs an IPv4 underlay: this host's VTEP is IPv6, for which pyoverlay has no "
                "fail-closed ESP path (its kernel policies block encrypted VXLAN over IPv6). Set PYOVERLAY_VTEP to "
                "an IPv4 address of this host, or create the network without --opt encrypted"
            )

    def _wanted_record(self, nid: str, options: NetworkOptions, addrs: Addressing) -> NetworkRecord:
        # Swarm hands every node the same NetworkID for a network: that is its cluster identity there.
        nkey = f"swarm.{nid}" if self._swarm else network_key(addrs.subnets[0], options.explicit)
        return NetworkRecord(
            key=nkey, vni=options.vni or 0, subnets=[str(s) for s in addrs.subnets], gateway=addrs.gateway,
            gateway6=addrs.gateway6, encrypted=options.encrypted,
            port=self.settings.esp_port if options.encrypted else self.settings.vxlan_port,
            mtu=options.mtu, internal=options.internal, options=options.generic, created_by=self.host,
        )

    @property
    def _swarm(self) -> bool:
        return self.settings.scope == "global"

    def _already_here(self, nid: str, wanted: NetworkRecord) -> bool:
        """True for a repeated CreateNetwork of the same network; Conflict for another one with its key."""
        existing = self.state.network(nid)
        if existing is not None:
            self._check_same(existing.record, wanted)
            return True
        twin = self.state.by_key(wanted.key)
        if twin is not None:
            raise Conflict(
                f"this host already has a Docker network for {wanted.key} (network "
                f"{short_id(twin.docker_network_id)}, created here by hand or by propagation): a second one would "
                f"split the network; use that one (if Docker no longer lists it, `pyoverlay gc` removes what is "
                f"left of it)"
            )
        return False

    def _register_network(self, nid: str, wanted: NetworkRecord, options: NetworkOptions,
                          addrs: Addressing) -> NetworkRecord:
        """This host joins the cluster network in etcd (made if it is the first); returns its record."""
        with store_errors("network not created"):
            if not self._swarm:  # in swarm the manager requested the pool; the network is keyed by its id
                self._check_ipam_matches(addrs.subnets, options.explicit)
            for net, given in zip(addrs.subnets, addrs.given, strict=True):
                if given.reserved:
                    self.ipam.mark_reserved(pool_id(net, options.explicit), list(given.reserved))
            record, _ = self._join_cluster_network(nid, wanted)
            return record

    def _set_up_kernel(self, nid: str, record: NetworkRecord) -> int:
        """The network's namespace, bridge and VXLAN device (and first the encryption guard); returns the MTU.
        On failure everything of this create is undone."""
        mtu = self._mtu(record)
        try:
            if record.encrypted:  # the guard exists before the network's VXLAN device can send
                self.encryption.guard({**self.state.encrypted_vnis(), record.vni: record.key})
            self.datapath.ensure_network(self.plan(record, mtu))
        except Exception as err:
            undo = self._undo_create(nid, record)
            self._guard_quietly()
            if isinstance(err, PluginError):
                raise type(err)(f"{err.message}; network not created, {undo}") from err
            raise Unavailable(f"could not set up the data path for VNI {record.vni}: {err}; network not created, "
                              f"{undo}") from err
        return mtu

    def plan(self, record: NetworkRecord, mtu: int) -> NetworkPlan:
        # The gateway addresses go on the bridge only for the DNS server (plugin/dns/nameserver.py) to listen there.
        gateways = tuple(g for g in (record.gateway, record.gateway6) if g) if self.settings.dns else ()
        return NetworkPlan(record.vni, record.port, mtu, record.key, gateways)

    def _mtu(self, record: NetworkRecord) -> int:
        default = self.datapath.underlay().overlay_mtu() - (ESP_OVERHEAD if record.encrypted else 0)
        return record.mtu or self.settings.mtu or default

    def _guard_quietly(self) -> None:
        try:
            self.encryption.guard(self.state.encrypted_vnis())
        except PluginError as err:
            log.error("encryption guard: %s", err)

    def _check_ipam_matches(self, subnets: list[Any], explicit: str | None) -> None:
        """Catch -o pyoverlay.network without the matching --ipam-opt (and the reverse) early."""
        first = subnets[0]
        by_cidr = self.store.get(self.keys.pool(pool_id(first, None)))
        if explicit is not None and by_cidr is not None and self.store.get(
                self.keys.pool(pool_id(first, explicit))) is None:
            raise InvalidRequest(
                f"-o {NETWORK_OPT}={explicit} needs --ipam-opt {NETWORK_OPT}={explicit} as well, "
                f"so the addresses of {first} belong to that network"
            )
        if explicit is None and by_cidr is None:
            kvs, _ = self.store.range(self.keys.pools())
            for kv in kvs:
                if kv.key.endswith(f".v{first.version}") and f'"cidr":"{first}"' in kv.value.decode():
                    raise InvalidRequest(
                        f"--ipam-opt {NETWORK_OPT}=... was given for {first}: pass the same value as "
                        f"-o {NETWORK_OPT}=..."
                    )

    @staticmethod
    def _check_same(have: NetworkRecord, want: NetworkRecord) -> None:
        diffs = []
        for field in ("subnets", "gateway", "gateway6", "encrypted", "port", "mtu", "internal"):
            a, b = getattr(have, field), getattr(want, field)
            if field == "subnets":
                a, b = sorted(a), sorted(b)
            if a != b:
                diffs.append(f"{field} {b!r} (the cluster has {a!r})")
        if want.vni and want.vni != have.vni:
            diffs.append(f"vni {want.vni} (the cluster has {have.vni})")
        if diffs:
            raise Conflict(
                f"network {have.key} already exists in the cluster (created by host {have.created_by}) with "
                f"different settings: " + "; ".join(diffs) + ". Use the same options on every host, or a "
                f"different subnet / -o {NETWORK_OPT}=ID"
            )

    def _join_cluster_network(self, nid: str, wanted: NetworkRecord) -> tuple[NetworkRecord, bool]:
        """Find or create the cluster network record and add this host as a member.

        Membership is added in the same transaction that checks the network record is unchanged, so a
        host deleting the last membership concurrently cannot leave us a member of a deleted network.
        """
        member_key = self.keys.member(wanted.key, self.host)
        member = MemberRecord(host=self.host, docker_network_id=nid)
        for _ in range(32):
            kv = self.store.get(self.keys.network(wanted.key))
            if kv is not None:
                record = NetworkRecord.load(kv.value, kv.key)
                self._check_same(record, wanted)
                mine = self.store.get(member_key)
                if mine is not None:
                    other = MemberRecord.load(mine.value, mine.key).docker_network_id
                    if other != nid and self.state.network(other) is not None:
                        raise Conflict(
                            f"network {record.key} already exists on this host as Docker network {short_id(other)}"
                        )
                txn = Txn().unchanged(kv.key, kv.mod_revision).put(kv.key, kv.value).put(member_key, member.dump())
                if self.store.commit(txn):
                    return record, False
                continue
            vni = wanted.vni or self._vni_start(wanted.key)
            for probe in range(64):
                cand = wanted.vni or VNI_MIN + (vni - VNI_MIN + probe) % (VNI_MAX - VNI_MIN + 1)
                record = wanted.model_copy(update={"vni": cand})
                txn = (Txn().absent(self.keys.network(wanted.key)).absent(self.keys.vni(cand))
                       .put(self.keys.network(wanted.key), record.dump())
                       .put(self.keys.vni(cand), wanted.key).put(member_key, member.dump()))
                if self.store.commit(txn):
                    return record, True
                if self.store.get(self.keys.network(wanted.key)) is not None:
                    break  # created by another host meanwhile: join it
                if wanted.vni:
                    raise Conflict(f"--opt {VNI_OPT}={wanted.vni}: that VNI is used by another network")
            else:
                raise Unavailable("could not allocate a VNI (64 candidates taken)")
        raise Unavailable("too many concurrent changes to this network; try again")

    @staticmethod
    def _vni_start(key: str) -> int:
        # A stable starting point per network spreads VNIs and makes a re-created network likely to get
        # the same one.
        return VNI_MIN + zlib.crc32(key.encode()) % (VNI_MAX - VNI_MIN + 1)

    def _undo_create(self, nid: str, record: NetworkRecord) -> str:
        """Undo a create that failed after joining the cluster network: this host's kernel objects for it and
        its membership. Returns how that went, for the error Docker shows: "rolled back" or what is left."""
        left = []
        if not any(n.record.vni == record.vni for n in self.state.networks()):   # no other network uses them
            try:
                self.datapath.remove_network(record.vni)
            except Exception as err:  # noqa: BLE001 - reported; the reconciler removes unowned namespaces
                left.append(f"its namespace for VNI {record.vni} ({err}; the reconciler removes it later)")
        try:
            self._leave_cluster_network(record)
        except StoreError as err:
            log.error("network %s: rollback could not reach etcd (%s); queued", short_id(nid), err)
            self.state.defer({"op": "leave-network", "key": record.key})
            left.append(f"its membership in etcd ({err}; queued until etcd answers)")
        return "rolled back" if not left else f"failed to roll back: {'; '.join(left)}"

    def _leave_cluster_network(self, record: NetworkRecord) -> None:
        self.drop_member(record.key, self.host)

    def drop_member(self, nkey: str, host: str) -> None:
        """Drop a host's membership; the last member removes the network record and its VNI."""
        self.store.delete(self.keys.member(nkey, host))
        for _ in range(32):
            kv = self.store.get(self.keys.network(nkey))
            if kv is None:
                return
            members, _ = self.store.range(self.keys.members(nkey), keys_only=True)
            if members:
                return
            current = NetworkRecord.load(kv.value, kv.key)
            txn = (Txn().unchanged(kv.key, kv.mod_revision).delete(kv.key)
                   .delete(self.keys.vni(current.vni)).delete_prefix(self.keys.endpoints(nkey)))
            if self.store.commit(txn):
                return

    def forget_host(self, host: str, endpoint_keys: Iterable[str] | None = None) -> int:
        """A departed host's endpoint records and memberships go (its addresses: Ipam.forget_host).

        endpoint_keys: where its endpoint records are, as the peers' watch knows them. Each is read and checked
        again before it goes; without them every endpoint record is read (at 20,000 endpoints 9 MB, and every
        live host sweeps at about the same time)."""
        changed = 0
        if endpoint_keys is None:
            kvs, _ = self.store.range(self.keys.all_endpoints())
        else:
            kvs = [kv for kv in map(self.store.get, endpoint_keys) if kv is not None]
        for kv in kvs:
            try:
                rec = EndpointRecord.load(kv.value, kv.key)
            except ValueError:
                continue
            if rec.host == host and self.store.commit(Txn().unchanged(kv.key, kv.mod_revision).delete(kv.key)):
                self.store.delete(self.keys.aliases(rec.network_key, rec.endpoint_id))
                changed += 1
        members, _ = self.store.range(self.keys.all_members(), keys_only=True)
        for kv in members:
            nkey, member = kv.key.split("/")[-2:]
            if member == host:
                self.drop_member(nkey, host)
                changed += 1
        return changed

    def delete_network(self, nid: str) -> dict[str, Any]:
        with self._lock(nid):
            local = self.state.network(nid)
            if local is None:
                return {}
            self.datapath.remove_network(local.record.vni)
            gone = self.state.drop_network(nid)
            for ep in gone:
                self._forget_endpoint_record(ep.record)
            try:
                self._leave_cluster_network(local.record)
            except StoreError as err:
                log.warning("network %s: etcd unreachable (%s); membership removal queued", short_id(nid), err)
                self.state.defer({"op": "leave-network", "key": local.record.key})
        self._network_changed()
        log.info("network %s deleted (key=%s vni=%d)", short_id(nid), local.record.key, local.record.vni)
        return {}

    @staticmethod
    def allocate_network(opts: dict[str, Any]) -> dict[str, Any]:
        # Swarm managers: hand the --opt values back so workers receive them in CreateNetwork.
        generic = opts.get(GENERIC) if isinstance(opts.get(GENERIC), dict) else None
        options = generic if generic is not None else {k: v for k, v in opts.items() if isinstance(v, str)}
        return {"Options": options}

    # -- endpoints --------------------------------------------------------------------------------------

    def _network(self, nid: str) -> LocalNetwork:
        local = self.state.network(nid)
        if local is None:
            raise NotFound(
                f"NetworkID: unknown network {short_id(nid)}: pyoverlay has no record of it on this host "
                f"(created while another plugin served this name?); remove and re-create the network"
            )
        return local

    def create_endpoint(self, nid: str, eid: str, iface: Interface) -> dict[str, Any]:
        local = self._network(nid)
        if not iface.address and not iface.address6:
            raise InvalidRequest("Interface.Address: an endpoint needs an IPv4 or IPv6 address from the IPAM")
        subnets = [ipaddress.ip_network(s) for s in local.record.subnets]
        addrs = []
        for field, value in (("Interface.Address", iface.address), ("Interface.AddressIPv6", iface.address6)):
            if not value:
                continue
            try:
                ifc = ipaddress.ip_interface(value)
            except ValueError:
                raise InvalidRequest(f"{field}: {value!r} is not an address in CIDR form") from None
            if not any(ifc.ip in s for s in subnets):
                raise InvalidRequest(f"{field}: {ifc.ip} is not in the network's subnets {local.record.subnets}")
            addrs.append(ifc)
        mac = iface.mac or mac_from_ip(addrs[0].ip)
        if iface.mac:
            octets = iface.mac.split(":")
            try:
                mac = ":".join(f"{int(x, 16):02x}" for x in octets)
            except ValueError:
                mac = ""
            if len(octets) != 6 or len(mac) != 17:
                raise InvalidRequest(f"Interface.MacAddress: {iface.mac!r} is not a MAC address")
        v4 = next((a for a in addrs if a.version == 4), None)
        v6 = next((a for a in addrs if a.version == 6), None)
        record = EndpointRecord(
            endpoint_id=eid, network_key=local.record.key, docker_network_id=nid,
            host=self.host, vtep=self.datapath.underlay().address, mac=mac,
            address=str(v4) if v4 else None, address6=str(v6) if v6 else None,
        )
        existing = self.state.endpoint(eid)
        if existing is not None and existing.record.model_dump(exclude={"name"}) == record.model_dump(
                exclude={"name"}):
            return self._endpoint_answer(iface, mac)
        try:
            record.name = self._bind_address(local.record, addrs[0], eid)
            self.store.put(self.keys.endpoint(record.network_key, record.endpoint_id), record.dump())
        except StoreError as err:
            raise Unavailable(f"cluster store unavailable, endpoint not created: {err}") from err
        self.state.put_endpoint(LocalEndpoint(record=record))
        return self._endpoint_answer(iface, mac)

    @staticmethod
    def _endpoint_answer(iface: Interface, mac: str) -> dict[str, Any]:
        # Docker lets a driver fill only what it left empty: answer the MAC only when it gave none.
        return {"Interface": None if iface.mac else {"MacAddress": mac}}

    def _bind_address(self, record: NetworkRecord, addr: Any, endpoint_id: str) -> str | None:
        """Note the endpoint on its address record (for "in use by" errors and garbage collection).

        Returns the container name if Docker told the IPAM (Docker >= 23 does; 20.10 does not).
        """
        key = self.keys.addr(pool_id(addr.network, record.options.get(NETWORK_OPT)), str(addr.ip))
        kv = self.store.get(key)
        if kv is None:
            return None
        held = AddressRecord.load(kv.value, kv.key)
        if held.kind == "endpoint" and held.host == self.host and held.endpoint is None:
            held.endpoint = endpoint_id
            self.store.swap(key, held.dump(), kv.mod_revision)
        return held.owner

    def endpoint_info(self, nid: str, eid: str) -> dict[str, Any]:
        ep = self.state.endpoint(eid)
        local = self.state.network(nid)
        if ep is None or local is None:
            return {"Value": {}}
        return {"Value": {"pyoverlay.vni": str(local.record.vni), "pyoverlay.host": self.host,
                          "pyoverlay.vtep": ep.record.vtep}}

    def _unplug(self, eid: str) -> LocalEndpoint | None:
        """Queue the removal of the endpoint's veth (see DataPath.remove_endpoint_later); None if it is unknown."""
        ep = self.state.endpoint(eid)
        if ep is not None and (local := self.state.network(ep.record.docker_network_id)) is not None:
            self.datapath.remove_endpoint_later(local.record.vni, eid)
        return ep

    def delete_endpoint(self, nid: str, eid: str) -> dict[str, Any]:
        ep = self._unplug(eid)
        if ep is None:
            return {}
        self._forget_endpoint_record(ep.record)
        self.state.drop_endpoint(eid)
        return {}

    def _forget_endpoint_record(self, record: EndpointRecord) -> None:
        # Its DNS aliases go with it (plugin/docker/aliases.py writes them; a name must stop resolving now).
        for key in (self.keys.endpoint(record.network_key, record.endpoint_id),
                    self.keys.aliases(record.network_key, record.endpoint_id)):
            try:
                self.store.delete(key)
            except StoreError as err:
                log.warning("endpoint %s: etcd unreachable (%s); record removal queued",
                            short_id(record.endpoint_id), err)
                self.state.defer({"op": "delete", "key": key})

    def join(self, nid: str, eid: str, sandbox: str) -> dict[str, Any]:
        ep = self.state.endpoint(eid)
        if ep is None:
            raise NotFound(f"EndpointID: unknown endpoint {short_id(eid)} (CreateEndpoint never succeeded)")
        local = self._network(nid)
        try:
            ifname = self.datapath.add_endpoint(local.record.vni, eid, ep.record.mac, local.mtu)
        except PluginError:
            raise
        except Exception as err:
            raise Unavailable(f"could not create the endpoint's interface: {err}") from err
        routes = self._dns_route(local, sandbox, eid)
        ep.joined, ep.sandbox, ep.dns_route = True, sandbox, bool(routes)
        self.state.put_endpoint(ep)
        reply: dict[str, Any] = {"InterfaceName": {"SrcName": ifname, "DstPrefix": "eth"},
                                 "DisableGatewayService": False}
        if routes:
            reply["StaticRoutes"] = routes
        return reply

    def _dns_route(self, local: LocalNetwork, sandbox: str, endpoint_id: str) -> list[dict[str, Any]]:
        """The host-wide DNS address through this network's gateway: Docker's embedded DNS forwards what it
        does not know to daemon.json's "dns" from inside the container, and so reaches this network's names.

        A container on two pyoverlay networks keeps the route its first one gave (the kernel has one route to
        an address, and Docker fails a Join whose route exists already)."""
        address, gateway = self.settings.dns_address, local.record.gateway
        if not (self.settings.dns and address and gateway):
            return []
        if any(other.dns_route for eid, other in self.state.endpoints_in(sandbox) if eid != endpoint_id):
            return []
        return [{"Destination": f"{address}/32", "RouteType": 0, "NextHop": gateway.split("/")[0]}]

    def leave(self, nid: str, eid: str) -> dict[str, Any]:
        ep = self._unplug(eid)
        if ep is None:
            return {}
        ep.joined, ep.sandbox, ep.dns_route = False, None, False
        self.state.put_endpoint(ep)
        return {}

    # -- start-up and background repair ---------------------------------------------------------------

    def restore(self) -> None:
        """Bring the kernel in line with this host's recorded networks; remove our stale objects."""
        known_vnis = set()
        try:
            self.encryption.guard(self.state.encrypted_vnis())
        except PluginError as err:
            # Fail closed: an encrypted network whose guard cannot be installed gets no data path.
            log.error("restore: %s; encrypted networks stay down", err)
            for local in self.state.networks():
                if local.record.encrypted:
                    self.datapath.remove_network(local.record.vni)
                    known_vnis.add(local.record.vni)
        for local in self.state.networks():
            if local.record.vni in known_vnis:
                continue
            known_vnis.add(local.record.vni)
            if local.record.encrypted and local.record.port == self.settings.vxlan_port:
                # Made by a pyoverlay that encrypted by firewall mark on the clear port: the kernel's policies
                # now encrypt by port, so this network would leave in clear text. Fail closed.
                log.error("network %s is encrypted but uses the clear VXLAN port %d (made by an older pyoverlay); "
                          "it stays down: remove and re-create it", local.record.key, local.record.port)
                self.datapath.remove_network(local.record.vni)
                continue
            try:
                self.datapath.ensure_network(self.plan(local.record, local.mtu))
            except Exception as err:  # noqa: BLE001 - keep restoring the others
                log.error("restore network %s (vni %d): %s", local.record.key, local.record.vni, err)
        # Then the reconciler's sweep of our kernel objects, with no grace: nothing of this host's can be using
        # what its state does not name (the plugin was not running).
        for g in kernel_garbage(self.datapath, *self.state.snapshot()):
            log.info("restore: removing %s (%s)", g.what, g.why)
            remove_kernel_garbage(self.datapath, g)

    def flush_pending(self) -> int:
        """Retry queued etcd changes; returns how many are still pending."""
        for op in self.state.take_pending():
            try:
                if op["op"] == "delete":
                    self.store.delete(op["key"])
                elif op["op"] == "leave-network" and self.state.by_key(op["key"]) is None:
                    self._leave_cluster_network(NetworkRecord(key=op["key"], vni=0, subnets=[], port=0,
                                                              created_by=""))
                self.state.done_pending(op)
            except StoreError:
                break
        return len(self.state.take_pending())

    def republish(self) -> None:
        """Make etcd hold this host's memberships, endpoints and addresses again (after an outage, a
        restart, or an absence long enough for other hosts to have released what this host held)."""
        for local in self.state.networks():
            self._join_cluster_network(local.docker_network_id, local.record)
            self._reclaim_addresses(local)
        for ep in self.state.endpoints():
            key = self.keys.endpoint(ep.record.network_key, ep.record.endpoint_id)
            kv = self.store.get(key)
            if kv is None or _loads_as(EndpointRecord, kv) != ep.record:
                self.store.put(key, ep.record.dump())

    def _reclaim_addresses(self, local: LocalNetwork) -> None:
        explicit = local.record.options.get(NETWORK_OPT)
        eps = [e.record for e in self.state.endpoints()
               if e.record.docker_network_id == local.docker_network_id]
        for cidr in local.record.subnets:
            net = ipaddress.ip_network(cidr)
            gateway = local.record.gateway if net.version == 4 else local.record.gateway6
            held = {}
            for rec in eps:
                for addr in (rec.address, rec.address6):
                    if addr and ipaddress.ip_interface(addr).ip in net:
                        held[str(ipaddress.ip_interface(addr).ip)] = rec.endpoint_id
            self.ipam.reclaim(pool_id(net, explicit), cidr, gateway, held)

