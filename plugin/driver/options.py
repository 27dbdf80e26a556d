"""The driver's plain inputs: a CreateNetwork's options and subnets, checked, and a CreateEndpoint's interface.

Nothing here touches etcd or the kernel; every refusal names the option and what it takes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from ipam.subnets import NETWORK_OPT, check_network_id, parse_cidr
from plugin.errors import InvalidRequest
from plugin.kernel.datapath import validate_mtu

GENERIC = "com.docker.network.generic"
DRIVER_MTU = "com.docker.network.driver.mtu"
INTERNAL = "com.docker.network.internal"
VNI_OPT = "pyoverlay.vni"
ENCRYPTED = "encrypted"
KNOWN_OPTS = {ENCRYPTED, NETWORK_OPT, VNI_OPT, DRIVER_MTU}
VNI_MIN, VNI_MAX = 4096, (1 << 24) - 1  # below 4096 would collide with 802.1Q VLAN ids on some platforms


@dataclass(frozen=True)
class Subnet:
    """One address pool Docker's IPAM gave a network (a CreateNetwork IPv4Data/IPv6Data entry)."""

    pool: str
    gateway: str | None = None
    reserved: tuple[str, ...] = ()   # --aux-address values: never handed to a container


@dataclass(frozen=True)
class Interface:
    """What Docker's IPAM chose for a new endpoint (CreateEndpoint's Interface); "" where it chose nothing."""

    address: str = ""
    address6: str = ""
    mac: str = ""


@dataclass(frozen=True)
class NetworkOptions:
    generic: dict[str, str]       # the --opt values as given (kept on the network record)
    encrypted: bool
    explicit: str | None          # -o pyoverlay.network: the cluster network's name, else keyed by subnet
    mtu: int | None
    vni: int | None
    internal: bool


@dataclass(frozen=True)
class Addressing:
    subnets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]   # IPv4 first, then IPv6
    given: list[Subnet]                                             # as Docker gave them, in the same order
    gateway: str | None
    gateway6: str | None


def network_options(opts: dict[str, Any]) -> NetworkOptions:
    generic = opts.get(GENERIC) or {}
    if not isinstance(generic, dict) or not all(isinstance(v, str) for v in generic.values()):
        raise InvalidRequest(f"Options.{GENERIC}: expected a map of strings (the --opt values)")
    unknown = sorted(set(generic) - KNOWN_OPTS)
    if unknown:
        raise InvalidRequest(
            f"unknown --opt {', '.join(unknown)}; pyoverlay understands: {', '.join(sorted(KNOWN_OPTS))}")
    if ENCRYPTED in generic and generic[ENCRYPTED] not in ("", "true", "1"):
        raise InvalidRequest(f"--opt encrypted={generic[ENCRYPTED]!r}: give it bare (--opt encrypted)")
    explicit = generic.get(NETWORK_OPT) or None
    if explicit is not None:
        check_network_id(explicit, f"--opt {NETWORK_OPT}")
    mtu = validate_mtu(generic[DRIVER_MTU], f"--opt {DRIVER_MTU}") if DRIVER_MTU in generic else None
    return NetworkOptions(dict(generic), ENCRYPTED in generic, explicit, mtu, _vni(generic),
                          opts.get(INTERNAL) is True)


def _vni(generic: dict[str, str]) -> int | None:
    if VNI_OPT not in generic:
        return None
    try:
        vni = int(generic[VNI_OPT])
    except ValueError:
        raise InvalidRequest(f"--opt {VNI_OPT}={generic[VNI_OPT]!r} is not a number") from None
    if not 1 <= vni <= VNI_MAX:
        raise InvalidRequest(f"--opt {VNI_OPT}={vni} is outside 1..{VNI_MAX}")
    return vni


def addressing(v4: list[Subnet], v6: list[Subnet]) -> Addressing:
    if len(v4) > 1 or len(v6) > 1:
        raise InvalidRequest("pyoverlay networks take one IPv4 and/or one IPv6 subnet (several --subnet given)")
    if not v4 and not v6:
        raise InvalidRequest("IPv4Data: a network needs a subnet (none was allocated)")
    subnets = [parse_cidr(data[0].pool, f"{label}.Pool", is6)
               for label, data, is6 in (("IPv4Data", v4, False), ("IPv6Data", v6, True)) if data]
    return Addressing(subnets, [*v4, *v6], v4[0].gateway or None if v4 else None,
                      v6[0].gateway or None if v6 else None)
