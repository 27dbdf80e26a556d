"""Pure address arithmetic for the IPAM: pool identities, subnet choice, address choice, MACs."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator

from plugin.errors import InvalidRequest

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NETWORK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
NETWORK_OPT = "pyoverlay.network"


def parse_cidr(value: str, field: str, v6: bool | None = None) -> IPNetwork:
    """A pool CIDR as Docker passes it; host bits must be clear."""
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as err:
        raise InvalidRequest(f"{field}: {value!r} is not a valid CIDR ({err})") from None
    if "/" not in value:
        raise InvalidRequest(f"{field}: {value!r} is not a CIDR (no prefix length)")
    net = iface.network
    if iface.ip != net.network_address:
        raise InvalidRequest(f"{field}: {value!r} has host bits set; did you mean {net}?")
    if v6 is not None and (net.version == 6) != v6:
        raise InvalidRequest(f"{field}: {value} is IPv{net.version} but V6 is {str(v6).lower()}")
    if net.version == 4 and net.prefixlen > 30:
        raise InvalidRequest(f"{field}: {value} is too small: an IPv4 pool needs at least a /30")
    if net.version == 6 and net.prefixlen > 126:
        raise InvalidRequest(f"{field}: {value} is too small: an IPv6 pool needs at least a /126")
    return net


def parse_address(value: str, field: str) -> IPAddress:
    """A plain address, or an address in CIDR form (Docker uses both)."""
    try:
        return ipaddress.ip_interface(value).ip
    except ValueError:
        raise InvalidRequest(f"{field}: {value!r} is not a valid IP address") from None


def check_network_id(value: str, field: str) -> str:
    if not NETWORK_ID_RE.match(value):
        raise InvalidRequest(
            f"{field}: {value!r} is not a valid network id (1-63 of A-Z a-z 0-9 _ . -, starting alphanumeric)"
        )
    return value


def encode_cidr(net: IPNetwork) -> str:
    """A CIDR usable inside one etcd key segment: 10.20.0.0/24 -> 10.20.0.0_24."""
    return f"{net.network_address}_{net.prefixlen}"


def pool_id(net: IPNetwork, explicit_id: str | None) -> str:
    """The PoolID Docker carries around. Same subnet (or same explicit id) -> same PoolID, on every host."""
    if explicit_id:
        return f"net.{explicit_id}.v{net.version}"
    return f"cidr.{encode_cidr(net)}"


def network_key(subnet: IPNetwork | None, explicit_id: str | None) -> str:
    """The cluster identity of a network: the explicit id, else its (first) subnet."""
    if explicit_id:
        return explicit_id
    if subnet is None:
        raise InvalidRequest("network has neither a subnet nor -o pyoverlay.network=ID")
    return encode_cidr(subnet)


def overlaps(net: IPNetwork, others: Iterable[IPNetwork]) -> IPNetwork | None:
    for other in others:
        if other.version == net.version and net.overlaps(other):
            return other
    return None


def candidate_subnets(base: IPNetwork, size: int) -> Iterator[IPNetwork]:
    if size < base.prefixlen:
        raise InvalidRequest(f"default pool size /{size} is larger than the default range {base}")
    yield from base.subnets(new_prefix=size)


def pick_subnet(base: IPNetwork, size: int, taken: list[IPNetwork]) -> IPNetwork | None:
    """The first subnet of base/size that overlaps nothing in taken (pools and host routes)."""
    same_family = sorted((t for t in taken if t.version == base.version), key=lambda n: int(n.network_address))
    for cand in candidate_subnets(base, size):
        if overlaps(cand, same_family) is None:
            return cand
    return None


def usable(pool: IPNetwork, ip_range: IPNetwork | None = None) -> tuple[int, int]:
    """First and last allocatable address (as ints): no network address, no IPv4 broadcast."""
    first, last = int(pool.network_address) + 1, int(pool.broadcast_address)
    if pool.version == 4:
        last -= 1
    if ip_range is not None:
        first = max(first, int(ip_range.network_address))
        last = min(last, int(ip_range.broadcast_address))
    return first, last


def check_in_pool(addr: IPAddress, pool: IPNetwork, field: str) -> None:
    if addr.version != pool.version or addr not in pool:
        raise InvalidRequest(f"{field}: {addr} is outside the pool {pool}")
    if addr == pool.network_address:
        raise InvalidRequest(f"{field}: {addr} is the network address of {pool}")
    if pool.version == 4 and addr == pool.broadcast_address:
        raise InvalidRequest(f"{field}: {addr} is the broadcast address of {pool}")


def next_free(first: int, last: int, used: set[int], after: int) -> int | None:
    """Next-fit: the first free address after the last one handed out, wrapping once.

    Not reusing a just-released address at once spares peers a stale neighbour entry.
    """
    span = last - first + 1
    if span <= 0:
        return None
    start = after + 1 if first <= after < last else first
    for i in range(span):
        cand = first + (start - first + i) % span
        if cand not in used:
            return cand
    return None
