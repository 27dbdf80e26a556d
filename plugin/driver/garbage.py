"""What of the kernel is ours and no longer owned: one definition, used by the start-up restore (removed at
once), the reconciler (removed after its grace period) and `pyoverlay gc` (shown, or removed with --apply).

Ours means tagged by this instance (plugin/kernel/datapath.py: every namespace, bridge, VXLAN device and veth
carries "pyoverlay:<instance>:<kind>:<id>" in its alias); never judged by name. Owned means this host's state
names it: a network namespace by its VNI, a veth by a joined endpoint, a host-side link by any endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from plugin.errors import short_id
from plugin.kernel.datapath import DataPath
from plugin.state import LocalEndpoint, LocalNetwork


@dataclass(frozen=True)
class Garbage:
    kind: str    # namespace | veth | host-link | endpoint-record | endpoint | address | network
    what: str    # what it is, for people
    why: str
    ref: tuple[str, ...]  # what removing it needs (and its identity across passes)


def kernel_garbage(datapath: DataPath, networks: dict[str, LocalNetwork],
                   endpoints: dict[str, LocalEndpoint]) -> list[Garbage]:
    """Our kernel objects that nothing of this host's state owns (networks and endpoints by their ids)."""
    out: list[Garbage] = []
    vnis = {n.record.vni for n in networks.values()}
    joined = {e.record.endpoint_id for e in endpoints.values() if e.joined}
    for vni in datapath.list_networks():
        if vni not in vnis:
            out.append(Garbage("namespace", f"network namespace of vni {vni}", "no network of this host uses it",
                               ("namespace", str(vni))))
            continue
        for eid in datapath.endpoint_links(vni):
            if eid not in joined:
                out.append(Garbage("veth", f"veth of endpoint {short_id(eid)} (vni {vni})",
                                   "no joined endpoint owns it", ("veth", str(vni), eid)))
    for name in datapath.stale_host_links(set(endpoints)):
        out.append(Garbage("host-link", f"link {name}", "a leftover of an interrupted Join or network create",
                           ("host-link", name)))
    return out


def remove_kernel_garbage(datapath: DataPath, g: Garbage) -> bool:
    """Remove g if it is a kernel object; False when it is not one (the caller removes it)."""
    kind, *ref = g.ref
    if kind == "namespace":
        datapath.remove_network(int(ref[0]))
    elif kind == "veth":
        datapath.remove_endpoint(int(ref[0]), ref[1])
    elif kind == "host-link":
        datapath.delete_host_link(ref[0])
    else:
        return False
    return True
