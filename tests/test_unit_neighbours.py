"""plugin/kernel/neighbours.py against the real kernel, in a throwaway network namespace (it dies with its process):
a bridge and a VXLAN device as pyoverlay makes them, thousands of peers in bulk, then removals, failures
and the answers read back through pyroute2's dumps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from plugin.kernel.neighbours import messages

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import ipaddress, json
    from pyroute2 import IPRoute
    from plugin.kernel import neighbours
    from plugin.kernel.datapath import _attr

    ipr = IPRoute()
    ipr.link("add", ifname="br0", kind="bridge")
    ipr.link("add", ifname="vx0", kind="vxlan", vxlan_id=42, vxlan_port=4789, vxlan_learning=0)
    br, vx = ipr.link_lookup(ifname="br0")[0], ipr.link_lookup(ifname="vx0")[0]
    ipr.link("set", index=vx, master=br)
    for i in (vx, br):
        ipr.link("set", index=i, state="up")

    def peer(i, vtep=None):
        ip = str(ipaddress.ip_address("10.200.0.0") + i)
        return (ip, "02:42:%02x:%02x:%02x:%02x" % (10, 200, i >> 8 & 255, i & 255), vtep or f"10.99.0.{i % 200 + 1}")

    def kernel():
        vteps = {_attr(f, "NDA_LLADDR"): _attr(f, "NDA_DST") for f in ipr.fdb("dump", ifindex=vx)
                 if f["ifindex"] == vx and _attr(f, "NDA_DST")}
        bridged = {_attr(f, "NDA_LLADDR") for f in ipr.fdb("dump", ifindex=vx)
                   if f["ifindex"] == vx and not f["flags"] & neighbours.NTF_SELF and f["state"] & neighbours.NUD_NOARP}
        out = set()
        for fam in (2, 10):
            for n in ipr.get_neighbours(ifindex=vx, family=fam):
                mac = _attr(n, "NDA_LLADDR")
                if n["state"] & neighbours.NUD_PERMANENT and mac in vteps and mac in bridged:
                    out.add((_attr(n, "NDA_DST"), mac, vteps[mac]))
        return out

    sock = neighbours.open_socket()
    peers = [peer(i) for i in range(1, 5001)]
    v6 = ("fd00:20::7", "02:42:fd:00:00:07", "10.99.0.9")
    assert neighbours.program(sock, vx, peers + [v6], []) == []
    assert kernel() == set(peers) | {v6}
    assert set(neighbours.entries(sock, vx)) == kernel()
    # A move (same IP and MAC, other VTEP) is a replace; removals of what is not there are fine; a bad MAC
    # fails its own entry only.
    moved = peer(7, "10.99.1.1")
    bad = ("10.200.99.1", "02:42:zz:00:00:01", "10.99.0.1")
    failed = neighbours.program(sock, vx, [moved, bad], peers[2000:4000] + [peer(9999)])
    assert [p for p, _ in failed] == [bad], failed
    want = (set(peers[:2000]) | set(peers[4000:]) | {v6, moved}) - {peer(7)}
    assert kernel() == want, (len(kernel()), len(want))
    # What the fast dump reads back is what pyroute2's dumps see.
    assert set(neighbours.entries(sock, vx)) == want and len(neighbours.entries(sock, vx)) == len(want)
    # A device that is not there: every add fails, each with its reason.
    failed = neighbours.program(sock, 999999, [peer(1), peer(2)], [])
    assert sorted(p for p, _ in failed) == [peer(1), peer(2)] and all(isinstance(e, OSError) for _, e in failed)
    print("ok")
""")


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare")
def test_bulk_neighbours_in_a_real_kernel() -> None:
    res = subprocess.run(["unshare", "-n", sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, check=False)
    assert res.stdout.strip() == "ok", res.stdout + res.stderr


def test_messages_take_canonical_values_only() -> None:
    good = messages(3, ("10.0.0.5", "02:42:0a:00:00:05", "192.0.2.1"), add=True)
    assert len(good) == 3 and all(attrs for *_, attrs in good)
    for bad in [("10.0.0.5 ", "02:42:0a:00:00:05", "192.0.2.1"), ("10.0.0.5", "02:42:0a:00:00:5", "192.0.2.1"),
                ("10.0.0.5", "02:42:0a:00:00:05\n", "192.0.2.1"), ("10.0.0.5", "02 42 0a 00 00 05", "192.0.2.1"),
                ("10.0.0.5", "02:42:0a:00:00:05", "192.0.2.1;")]:
        with pytest.raises(ValueError):
            messages(3, bad, add=True)
