"""Kernel programming for pyoverlay, through pyroute2 (netlink), nothing else.

Per network, a namespace of its own (pinned at <state>/netns/pyo-<vni>) holds a bridge `br0` and a VXLAN
device `vxlan0`. The VXLAN device is created in the host namespace and then moved, so its UDP socket
stays on the underlay while its frames stay inside the network's namespace: bridged traffic never meets
the host's iptables, and networks cannot reach each other. Per endpoint, a veth pair: one end on br0,
the other left in the host namespace for Docker to move into the container.

Every call is idempotent (ensure, not create) and every object carries an alias tag "pyoverlay:..." so a
later start can tell its own stale objects from anybody else's.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pyroute2.iproute import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from plugin.errors import Conflict, InvalidRequest, Unavailable, short_id
from plugin.kernel import neighbours, netns

log = logging.getLogger(__name__)

VXLAN_OVERHEAD = 50      # inner Ethernet 14 + outer IPv4 20 + UDP 8 + VXLAN 8
VXLAN6_EXTRA = 20        # an IPv6 outer header is 20 bytes longer
TAG = "pyoverlay"
BRIDGE = "br0"
VXLAN = "vxlan0"
DNS_LABEL = "lo:pyodns"  # host namespace: the label of the host-wide DNS address on lo (ours, by this tag)


def mac_from_ip(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """02:42 followed by the last four bytes of the address, as Docker's overlay does.

    A MAC that follows the IP means a reused address never leaves peers with a stale neighbour entry.
    """
    tail = addr.packed[-4:]
    return "02:42:" + ":".join(f"{b:02x}" for b in tail)


@dataclass
class PeerIO:
    """A network's sockets for programming peers, made in its namespace: rtnetlink, and a packet socket on
    its bridge for announcements; with the VXLAN device's index. `reader` is a second rtnetlink socket for
    reading the programmed entries from any thread (see peer_entries)."""
    netlink: socket.socket
    packet: socket.socket
    vxlan: int
    reader: socket.socket
    reading: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Underlay:
    address: str   # the VTEP address other hosts send VXLAN to
    ifname: str
    mtu: int

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.address).version

    def overlay_mtu(self) -> int:
        return self.mtu - VXLAN_OVERHEAD - (VXLAN6_EXTRA if self.version == 6 else 0)


@dataclass(frozen=True)
class NetworkPlan:
    vni: int
    port: int
    mtu: int
    tag: str  # network key, recorded in the aliases
    gateways: tuple[str, ...] = ()  # CIDR: held by the bridge on every host (the DNS server listens there)


def ns_name(vni: int) -> str:
    return f"pyo-{vni:06x}"


# Interface names hold 15 characters: the endpoint ID's first 11 make them. A name is never proof of whose a link
# is (another endpoint's ID may start alike); the tag in its alias is.
def host_ifname(endpoint_id: str) -> str:
    return f"pyo{endpoint_id[:11]}"


def ns_ifname(endpoint_id: str) -> str:
    return f"ve{endpoint_id[:11]}"


F = TypeVar("F", bound=Callable[..., Any])


def kernel(fn: F) -> F:
    """Run the method on the data path's one netlink thread.

    pyroute2 binds each IPRoute (and its sockets) to the thread that made it; one thread doing all kernel
    programming also keeps changes to one network's devices strictly ordered.
    """

    @functools.wraps(fn)
    def wrapper(self: DataPath, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == self._tid:
            return fn(self, *args, **kwargs)
        return self._exec.submit(fn, self, *args, **kwargs).result()

    return wrapper  # type: ignore[return-value]


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def _info(link: Any) -> tuple[str | None, Any]:
    info = _attr(link, "IFLA_LINKINFO")
    if info is None:
        return None, None
    return info.get_attr("IFLA_INFO_KIND"), info.get_attr("IFLA_INFO_DATA")


class DataPath:
    def __init__(self, netns_dir: Path, instance: str, vtep: str | None) -> None:
        self.netns_dir = netns_dir
        self.instance = instance
        self.vtep_setting = vtep
        self._exec = ThreadPoolExecutor(1, thread_name_prefix="netlink")
        self._tid = self._exec.submit(threading.get_ident).result()
        self._host: IPRoute = self._exec.submit(IPRoute).result()
        self._ns: dict[int, IPRoute] = {}
        self._peer_ios: dict[int, PeerIO] = {}    # vni -> sockets for peer programming (see _peer_io)
        self._lock = threading.RLock()
        self._underlay: Underlay | None = None

    @kernel
    def close(self) -> None:
        with self._lock:
            for ipr in self._ns.values():
                ipr.close()
            self._ns.clear()
            for vni in list(self._peer_ios):
                self._drop_peer_io(vni)
            self._host.close()

    # -- the underlay -----------------------------------------------------------------------------------

    @kernel
    def underlay(self, refresh: bool = False) -> Underlay:
        """The VTEP: PYOVERLAY_VTEP (address or interface), else the default route's source address."""
        if self._underlay is not None and not refresh:
            return self._underlay
        with self._lock:
            self._underlay = self._find_underlay()
            return self._underlay

    def _find_underlay(self) -> Underlay:
        setting = self.vtep_setting
        addrs = list(self._host.get_addr())
        if setting:
            try:
                ipaddress.ip_address(setting)
                is_ip = True
            except ValueError:
                is_ip = False
            for a in addrs:
                ifname = self._ifname(a["index"])
                if (is_ip and _attr(a, "IFA_ADDRESS") == setting) or (not is_ip and ifname == setting):
                    return Underlay(_attr(a, "IFA_ADDRESS"), ifname, self._mtu(a["index"]))
            what = "address" if is_ip else "interface (with an address)"
            raise Unavailable(f"PYOVERLAY_VTEP={setting}: no such {what} on this host")
        for family in (2, 10):
            for r in self._host.get_default_routes(family=family):
                oif = _attr(r, "RTA_OIF")
                src = _attr(r, "RTA_PREFSRC")
                if src is None:
                    cands = [a for a in addrs if a["index"] == oif and a["family"] == family
                             and a["scope"] == 0]
                    src = _attr(cands[0], "IFA_ADDRESS") if cands else None
                if src and oif:
                    return Underlay(src, self._ifname(oif), self._mtu(oif))
        raise Unavailable("no default route to take the VTEP address from; set PYOVERLAY_VTEP")

    def _ifname(self, index: int) -> str:
        return str(_attr(self._host.link("get", index=index)[0], "IFLA_IFNAME"))

    def _mtu(self, index: int) -> int:
        return int(_attr(self._host.link("get", index=index)[0], "IFLA_MTU"))

    @kernel
    def host_routes(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """Destinations this host already routes (auto-chosen subnets must avoid them)."""
        out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for family in (2, 10):
            for r in self._host.get_routes(family=family, table=254):
                dst = _attr(r, "RTA_DST")
                if dst and r["dst_len"] > 0:
                    try:
                        out.append(ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False))
                    except ValueError:
                        continue
        return out

    @staticmethod
    def udp_port_users(port: int) -> int:
        """How many UDP sockets of this namespace are bound to port (vxlan sockets included)."""
        count = 0
        for table in ("/proc/self/net/udp", "/proc/self/net/udp6"):
            try:
                with open(table) as f:
                    next(f, None)
                    for line in f:
                        local = line.split()[1]
                        if int(local.rsplit(":", 1)[1], 16) == port:
                            count += 1
            except OSError:
                continue
        return count

    # -- networks ---------------------------------------------------------------------------------------

    def ns_path(self, vni: int) -> Path:
        return self.netns_dir / ns_name(vni)

    def _ipr(self, vni: int) -> IPRoute:
        with self._lock:
            ipr = self._ns.get(vni)
            if ipr is None:
                ipr = netns.iproute(self.ns_path(vni))
                self._ns[vni] = ipr
            return ipr

    def _tag(self, *parts: str) -> str:
        return ":".join([TAG, self.instance, *parts])

    def _owned(self, link: Any, kind: str) -> str | None:
        """The id in the link's tag when this instance made it as a `kind`, else None (not ours)."""
        parts = (_attr(link, "IFLA_IFALIAS") or "").split(":")
        if len(parts) == 4 and parts[0] == TAG and parts[1] == self.instance and parts[2] == kind:
            return parts[3]
        return None

    @kernel
    def ensure_network(self, plan: NetworkPlan) -> None:
        """Make the namespace, bridge and VXLAN device of a network exist as planned (idempotent)."""
        with self._lock:
            path = self.ns_path(plan.vni)
            fresh = False
            if not netns.is_pinned(path):
                self._ns.pop(plan.vni, None)
                self._drop_peer_io(plan.vni)
                netns.create(path)
                fresh = True
            try:
                netns.run_in(path, _quiet_namespace)
                self._ensure_devices(plan)
            except Exception:
                if fresh:
                    self.remove_network(plan.vni)
                raise

    def _ensure_devices(self, plan: NetworkPlan) -> None:
        ipr = self._ipr(plan.vni)
        underlay = self.underlay()
        br = ipr.link_lookup(ifname=BRIDGE)
        if not br:
            ipr.link("add", ifname=BRIDGE, kind="bridge", br_stp_state=0, br_forward_delay=0)
            br = ipr.link_lookup(ifname=BRIDGE)
        bridx = br[0]
        ipr.link("set", index=bridx, mtu=plan.mtu, ifalias=self._tag("net", plan.tag), state="up")
        self._ensure_gateways(ipr, bridx, plan.gateways)

        vx = ipr.link_lookup(ifname=VXLAN)
        if vx:
            problem = self._vxlan_mismatch(ipr.link("get", index=vx[0])[0], plan, underlay)
            if problem:
                log.warning("network vni %d: recreating %s (%s)", plan.vni, VXLAN, problem)
                ipr.link("del", index=vx[0])
                vx = []
        if not vx:
            self._create_vxlan(plan, underlay)
            vx = ipr.link_lookup(ifname=VXLAN)
        ipr.link("set", index=vx[0], master=bridx, mtu=plan.mtu, ifalias=self._tag("net", plan.tag),
                 state="up")
        # No learning on the VXLAN port: remote MACs are known from etcd, and an entry learned from a proxied
        # ARP reply would black-hole a MAC that later moves onto this host until its container speaks.
        ipr.brport("set", index=vx[0], learning=0)

    @staticmethod
    def _ensure_gateways(ipr: IPRoute, bridx: int, gateways: tuple[str, ...]) -> None:
        """The gateway addresses on the bridge, with a MAC that follows the first (a bridge otherwise takes
        its ports' lowest MAC, which changes as containers come and go and leaves stale ARP entries).

        Every host has the same address and MAC here; VXLAN never floods, so each host answers its own."""
        if not gateways:
            return
        ipr.link("set", index=bridx, address=mac_from_ip(ipaddress.ip_interface(gateways[0]).ip))
        have = {(_attr(a, "IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=bridx)}
        for gw in gateways:
            iface = ipaddress.ip_interface(gw)
            if (str(iface.ip), iface.network.prefixlen) in have:
                continue
            extra = {"flags": 0x02} if iface.version == 6 else {}  # IFA_F_NODAD: the same on every host
            ipr.addr("add", index=bridx, address=str(iface.ip), prefixlen=iface.network.prefixlen, **extra)

    @staticmethod
    def _vxlan_mismatch(link: Any, plan: NetworkPlan, underlay: Underlay) -> str:
        kind, data = _info(link)
        if kind != "vxlan" or data is None:
            return f"{VXLAN} is a {kind}, not vxlan"
        have = (data.get_attr("IFLA_VXLAN_ID"), data.get_attr("IFLA_VXLAN_PORT"),
                data.get_attr("IFLA_VXLAN_LOCAL") or data.get_attr("IFLA_VXLAN_LOCAL6"))
        want = (plan.vni, plan.port, underlay.address)
        return "" if have == want else f"has vni/port/local {have}, want {want}"

    def _create_vxlan(self, plan: NetworkPlan, underlay: Underlay) -> None:
        temp = f"pyovx{plan.vni:06x}"
        stale = self._host.link_lookup(ifname=temp)
        if stale:
            self._host.link("del", index=stale[0])
        local = {"vxlan_local6" if underlay.version == 6 else "vxlan_local": underlay.address}
        if self.udp_port_users(plan.port) and not self.port_is_ours(plan.port):
            raise Conflict(
                f"VXLAN port {plan.port} is already in use on this host by something other than pyoverlay "
                f"(Docker's swarm overlay uses 4789); set PYOVERLAY_VXLAN_PORT to a free port on every host"
            )
        try:
            self._host.link("add", ifname=temp, kind="vxlan", vxlan_id=plan.vni, vxlan_port=plan.port,
                            vxlan_learning=0, vxlan_proxy=1, mtu=plan.mtu,
                            # RFC 7348: zero outer UDP checksum over IPv4 (inner frames carry their own)
                            vxlan_udp_csum=0, **local)
        except NetlinkError as err:
            if err.code == errno.EEXIST:
                raise Conflict(
                    f"a VXLAN device with VNI {plan.vni} and port {plan.port} already exists in this host's "
                    f"namespace (another pyoverlay instance or overlay driver?)"
                ) from None
            raise
        idx = self._host.link_lookup(ifname=temp)[0]
        self._host.link("set", index=idx, ifalias=self._tag("vx", str(plan.vni)))  # a leftover is found by this
        fd = os.open(self.ns_path(plan.vni), os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._host.link("set", index=idx, net_ns_fd=fd, ifname=VXLAN)
        except Exception:
            self._host.link("del", index=idx)
            raise
        finally:
            os.close(fd)

    @kernel
    def set_vxlan_up(self, vni: int, up: bool) -> bool:
        """Bring a network's VXLAN device up or down; False when there is none. Down flushes its neighbours."""
        ipr = self._ipr(vni)
        vx = ipr.link_lookup(ifname=VXLAN)
        if not vx:
            return False
        ipr.link("set", index=vx[0], state="up" if up else "down")
        return True

    @kernel
    def port_is_ours(self, port: int) -> bool:
        """Is the UDP port held by a VXLAN device of one of our network namespaces?"""
        for vni in self.list_networks():
            try:
                ipr = self._ipr(vni)
                vx = ipr.link_lookup(ifname=VXLAN)
                if vx:
                    _, data = _info(ipr.link("get", index=vx[0])[0])
                    if data is not None and data.get_attr("IFLA_VXLAN_PORT") == port:
                        return True
            except (OSError, NetlinkError):
                continue
        return False

    @kernel
    def remove_network(self, vni: int) -> None:
        """Delete the network's devices and namespace; missing pieces are fine."""
        with self._lock:
            ipr = self._ns.pop(vni, None)
            self._drop_peer_io(vni)
            path = self.ns_path(vni)
            if ipr is None and netns.is_pinned(path):
                try:
                    ipr = netns.iproute(path)
                except OSError:
                    ipr = None
            if ipr is not None:
                try:
                    for link in ipr.get_links():
                        if _attr(link, "IFLA_IFNAME") != "lo":
                            try:
                                ipr.link("del", index=link["index"])
                            except NetlinkError as err:
                                if err.code != errno.ENODEV:
                                    raise
                finally:
                    ipr.close()
            netns.remove(path)

    def list_networks(self) -> list[int]:
        """VNIs of the namespaces pinned in our directory."""
        out = []
        if self.netns_dir.is_dir():
            for p in self.netns_dir.iterdir():
                if p.name.startswith("pyo-") and netns.is_pinned(p):
                    try:
                        out.append(int(p.name[4:], 16))
                    except ValueError:
                        continue
        return sorted(out)

    @kernel
    def has_network(self, vni: int) -> bool:
        try:
            ipr = self._ipr(vni)
            return bool(ipr.link_lookup(ifname=BRIDGE)) and bool(ipr.link_lookup(ifname=VXLAN))
        except (OSError, NetlinkError):
            return False

    # -- the host-wide DNS address ----------------------------------------------------------------------

    @kernel
    def ensure_dns_address(self, address: str, vnis: list[int]) -> None:
        """The DNS address (daemon.json "dns") as a /32 on the host namespace's loopback, labelled ours
        (lo:pyodns), where containers of every other network reach it through their default route; and on
        the bridge of each of these networks, where their containers reach it through the route Join gives
        them (idempotent). A dummy link would do as well, but not every kernel has one.

        The host's copy stays when the plugin stops: a query then meets "port unreachable" at once and the
        container's resolver moves on to the next server instead of waiting for a timeout."""
        with self._lock:
            self._ensure_host_address(self._host, self._host.link_lookup(ifname="lo")[0], address, DNS_LABEL)
            for vni in vnis:
                try:
                    ipr = self._ipr(vni)
                    br = ipr.link_lookup(ifname=BRIDGE)
                except (OSError, NetlinkError):
                    continue  # a network being removed this moment: its namespace is gone
                if br:
                    self._ensure_host_address(ipr, br[0], address)

    @staticmethod
    def _ensure_host_address(ipr: IPRoute, index: int, address: str, label: str | None = None) -> None:
        if any(_attr(a, "IFA_ADDRESS") == address for a in ipr.get_addr(index=index)):
            return
        try:
            ipr.addr("add", index=index, address=address, prefixlen=32, **({"label": label} if label else {}))
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise

    # -- endpoints --------------------------------------------------------------------------------------

    @kernel
    def add_endpoint(self, vni: int, endpoint_id: str, mac: str, mtu: int) -> str:
        """A veth pair: one end on the network's bridge, the other in the host namespace. Returns its name."""
        ipr = self._ipr(vni)
        outer, inner = host_ifname(endpoint_id), ns_ifname(endpoint_id)
        br = ipr.link_lookup(ifname=BRIDGE)
        if not br:
            raise Unavailable(f"network namespace {ns_name(vni)} has no bridge; restart the plugin to repair it")
        # A leftover from an earlier, interrupted Join of this endpoint: start clean. A link of that name that
        # is not this endpoint's (another endpoint whose ID starts alike, or not ours at all) stays.
        for handle, name in ((ipr, inner), (self._host, outer)):
            for old in handle.link_lookup(ifname=name):
                owner = self._owned(handle.link("get", index=old)[0], "ep")
                if owner != endpoint_id:
                    raise Conflict(f"EndpointID: interface {name} already belongs to "
                                   f"{'endpoint ' + short_id(owner) if owner else 'something that is not pyoverlay'}")
                handle.link("del", index=old)
        host_fd = netns.open_host()
        try:
            ipr.link("add", ifname=inner, kind="veth", mtu=mtu,
                     peer={"ifname": outer, "net_ns_fd": host_fd, "mtu": mtu, "address": mac})
        finally:
            os.close(host_fd)
        try:
            idx = ipr.link_lookup(ifname=inner)[0]
            ipr.link("set", index=idx, master=br[0], ifalias=self._tag("ep", endpoint_id), state="up")
            for out_idx in self._host.link_lookup(ifname=outer):  # tagged too: found by tag if Docker never takes it
                self._host.link("set", index=out_idx, ifalias=self._tag("ep", endpoint_id))
        except Exception:
            self.remove_endpoint(vni, endpoint_id)
            raise
        return outer

    @kernel
    def remove_endpoint(self, vni: int, endpoint_id: str) -> None:
        inner, outer = ns_ifname(endpoint_id), host_ifname(endpoint_id)
        try:
            ipr = self._ipr(vni) if netns.is_pinned(self.ns_path(vni)) else None
        except OSError:
            ipr = None
        if ipr is not None:
            for idx in ipr.link_lookup(ifname=inner):
                _ignore_gone(lambda i=idx: ipr.link("del", index=i))
        for idx in self._host.link_lookup(ifname=outer):
            _ignore_gone(lambda i=idx: self._host.link("del", index=i))

    def remove_endpoint_later(self, vni: int, endpoint_id: str) -> None:
        """Queue the veth's removal on the netlink thread and return at once.

        Deleting a veth waits for the kernel's RCU grace periods (10-30 ms); Docker need not wait for that.
        Later kernel work on the same thread runs after it, so ordering is kept.
        """

        def done(fut: Any) -> None:
            if fut.exception() is not None:
                log.error("removing endpoint %s (vni %d): %s", short_id(endpoint_id), vni, fut.exception())

        self._exec.submit(self.remove_endpoint, vni, endpoint_id).add_done_callback(done)

    @kernel
    def endpoint_links(self, vni: int) -> list[str]:
        """Endpoint ids of the veths on a network's bridge, from their tags (this instance's only)."""
        try:
            return [eid for link in self._ipr(vni).get_links() if (eid := self._owned(link, "ep"))]
        except (OSError, NetlinkError):
            return []

    @kernel
    def stale_host_links(self, known_endpoints: set[str]) -> list[str]:
        """Host-side veth ends that no known endpoint owns (a Join Docker never completed) and VXLAN devices
        left in the host namespace by an interrupted network create: ours by their tag, never by their name."""
        out = []
        for link in self._host.get_links():
            kind, _ = _info(link)
            eid = self._owned(link, "ep")
            if (kind == "veth" and eid is not None and eid not in known_endpoints) or (
                    kind == "vxlan" and self._owned(link, "vx") is not None):
                out.append(_attr(link, "IFLA_IFNAME") or "")
        return [name for name in out if name]

    @kernel
    def delete_host_link(self, name: str) -> None:
        for idx in self._host.link_lookup(ifname=name):
            _ignore_gone(lambda i=idx: self._host.link("del", index=i))

    # -- peers (remote endpoints) -----------------------------------------------------------------------

    @kernel
    def program_peers(self, vni: int, add: list[tuple[str, str, str]],
                      remove: list[tuple[str, str, str]]) -> list[tuple[tuple[str, str, str], Exception]]:
        """Remove, then add, many (ip, mac, vtep) peers in one pass; returns the ones that failed.

        One lookup of the VXLAN device, one trip to the netlink thread and a few netlink writes for a whole
        batch (plugin/kernel/neighbours.py): a host joining a network with 20,000 remote endpoints programs them
        in about a second.
        """
        failed: list[tuple[tuple[str, str, str], Exception]] = []
        for attempt in (1, 2):
            try:
                io = self._peer_io(vni)
            except (Unavailable, OSError, NetlinkError) as err:
                return [(p, err) for p in add]
            failed = neighbours.program(io.netlink, io.vxlan, add, remove)
            # The device was re-created (a repair): its index changed under us. Once more, looked up afresh.
            if attempt == 1 and any(getattr(e, "errno", None) == errno.ENODEV for _, e in failed):
                self._drop_peer_io(vni)
                continue
            break
        if 0 < len(add) <= ANNOUNCE_MAX:
            try:
                _announce(io.packet, add)
            except OSError as err:
                log.debug("vni %d: gratuitous ARP: %s", vni, err)
                self._drop_peer_io(vni)   # the bridge was re-created: bind afresh next time
        return failed

    def _peer_io(self, vni: int) -> PeerIO:
        """The network's sockets for peer programming, made once (in its namespace) and kept."""
        with self._lock:
            io = self._peer_ios.get(vni)
            if io is None:
                vx = self._ipr(vni).link_lookup(ifname=VXLAN)
                if not vx:
                    raise Unavailable(f"network namespace {ns_name(vni)} has no {VXLAN}")

                def make() -> tuple[socket.socket, socket.socket, socket.socket]:
                    packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
                    packet.bind((BRIDGE, 0))
                    return neighbours.open_socket(), packet, neighbours.open_socket()

                nl, packet, reader = netns.run_in(self.ns_path(vni), make)
                io = self._peer_ios[vni] = PeerIO(nl, packet, vx[0], reader)
            return io

    @kernel
    def _peer_io_made(self, vni: int) -> PeerIO:
        return self._peer_io(vni)   # made on the netlink thread (it enters the namespace through pyroute2's)

    def _drop_peer_io(self, vni: int) -> None:
        with self._lock:
            io = self._peer_ios.pop(vni, None)
        if io is not None:
            io.netlink.close()
            io.packet.close()
            io.reader.close()

    def peer_entries(self, vni: int) -> list[tuple[str, str, str]]:
        """(ip, mac, vtep) of the peers fully programmed on a network's VXLAN device: permanent neighbour,
        VXLAN FDB entry and the bridge's static entry.

        Read in the calling thread through the network's own reader socket, not on the netlink thread: with
        tens of thousands of peers the dumps take most of a second, and programming must not wait for them.
        Raises OSError when the sockets were re-made meanwhile (the caller asks again later)."""
        try:
            io = self._peer_io_made(vni)
        except Unavailable:
            return []
        with io.reading:
            try:
                return neighbours.entries(io.reader, io.vxlan)
            except OSError:
                # The namespace or device was re-made, or a dump was cut short (its rest would be read as the
                # next answer): new sockets next time.
                self._forget_peer_io(vni, io)
                raise

    @kernel
    def _forget_peer_io(self, vni: int, io: PeerIO) -> None:
        if self._peer_ios.get(vni) is io:   # else it was dropped already, its sockets closed with it
            self._drop_peer_io(vni)

# Inside a network's namespace: frames crossing br0 must not go through iptables (br_netfilter would
# send them there, costing time and giving a host's firewall a say over overlay traffic).
NAMESPACE_SYSCTLS = {
    "net/bridge/bridge-nf-call-iptables": "0",
    "net/bridge/bridge-nf-call-ip6tables": "0",
    "net/bridge/bridge-nf-call-arptables": "0",
}


def _quiet_namespace() -> None:
    for name, value in NAMESPACE_SYSCTLS.items():
        try:
            with open(f"/proc/sys/{name}", "w") as f:
                f.write(value)
        except FileNotFoundError:
            continue  # no br_netfilter in this kernel: nothing to switch off


ANNOUNCE_MAX = 64  # a bulk snapshot needs no announcements: nobody was waiting for those addresses


def _announce(s: socket.socket, peers: list[tuple[str, str, str]]) -> None:
    """Gratuitous ARP (IPv6: unsolicited Neighbor Advertisement) for new remote endpoints onto the bridge,
    through a packet socket bound to it (made in the network's namespace).

    A local container that tried to reach the address before it was programmed holds an unresolved
    neighbour entry, which the kernel retries only once a second; the announcement resolves it at once
    (existing entries are updated even with arp_accept=0).
    """
    for ip, mac, _ in peers:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            continue
        hw = bytes.fromhex(mac.replace(":", ""))
        if addr.version == 4:
            arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, hw, addr.packed, b"\0" * 6, addr.packed)
            s.send(b"\xff" * 6 + hw + b"\x08\x06" + arp)
        else:
            s.send(_unsolicited_na(addr.packed, hw))


def _unsolicited_na(ip: bytes, hw: bytes) -> bytes:
    """An unsolicited Neighbor Advertisement (RFC 4861 7.2.6) with the Override flag, to all nodes: the IPv6
    counterpart of a gratuitous ARP; a container's kernel takes the new MAC for an entry it already has."""
    all_nodes = ipaddress.IPv6Address("ff02::1").packed
    # ICMPv6 type 136, flags O (override), target, option 2 (target link-layer address, 8 bytes).
    body = struct.pack("!BBHI16sBB6s", 136, 0, 0, 0x20000000, ip, 2, 1, hw)
    pseudo = ip + all_nodes + struct.pack("!I3xB", len(body), 58)
    data = pseudo + body
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    body = body[:2] + struct.pack("!H", ~total & 0xFFFF) + body[4:]
    ipv6 = struct.pack("!IHBB16s16s", 6 << 28, len(body), 58, 255, ip, all_nodes)
    return b"\x33\x33\x00\x00\x00\x01" + hw + b"\x86\xdd" + ipv6 + body


def _ignore_gone(fn: Any) -> None:
    try:
        fn()
    except NetlinkError as err:
        if err.code not in (errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.EINVAL):
            raise


def validate_mtu(value: str, field: str) -> int:
    try:
        mtu = int(value)
    except ValueError:
        raise InvalidRequest(f"{field}: {value!r} is not a number") from None
    if not 576 <= mtu <= 65535:
        raise InvalidRequest(f"{field}: {mtu} is outside 576..65535")
    return mtu
