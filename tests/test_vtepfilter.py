"""The VTEP filter in both of its forms, in the kernel: nftables, and ipset + iptables (the form used where
nftables lacks the ip family, as in the user-mode-linux guest that runs the encrypted-network tests).

Two network namespaces joined by a veth pair: `tx` holds a registered VTEP address and a stranger's, `rx`
runs the filter and a UDP listener on the VXLAN port. Each backend must drop (and count) exactly the
stranger's datagrams, follow a change of the set, and leave nothing behind when removed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.rig import ROOT, sh

pytestmark = pytest.mark.docker  # needs root and network namespaces, like the end-to-end tests

REGISTERED, STRANGER, RX = "10.98.0.1", "10.98.0.2", "10.98.0.10"
PORT = 4800

LISTEN = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1]))); s.settimeout(2)
print("ready", flush=True)
seen = {}
try:
    while True:
        _, (src, _) = s.recvfrom(100)
        seen[src] = seen.get(src, 0) + 1
except socket.timeout:
    print(json.dumps(seen))
"""

SEND = """
import socket, sys
for src in sys.argv[1:3]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((src, 0))
    for _ in range(5):
        s.sendto(b"x" * 16, (sys.argv[3], int(sys.argv[4])))
"""

FILTER = """
import json, sys
sys.path.insert(0, sys.argv[4])
from plugin.kernel import vtepfilter as v
kind, action, vteps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ports = [4800, 4801]
b = v.NftBackend(ports, ["ip"]) if kind == "nft" else v.IptablesBackend(ports, ["ip"])
if action == "apply":
    print(json.dumps({"problem": b.apply(vteps), "present": b.present()}))
elif action == "dropped":
    print(json.dumps(b.dropped()))
else:
    b.remove()
    print(json.dumps(b.present()))
"""


@pytest.fixture
def netns_pair() -> Iterator[str]:
    tag = os.urandom(2).hex()
    tx, rx = f"pyt-{tag}-vtx", f"pyt-{tag}-vrx"
    try:
        sh("ip", "netns", "add", tx)
        sh("ip", "netns", "add", rx)
        sh("ip", "link", "add", f"pyt{tag}a", "netns", tx, "type", "veth", "peer", "name", f"pyt{tag}b", "netns", rx)
        sh("ip", "-n", tx, "addr", "add", f"{REGISTERED}/24", "dev", f"pyt{tag}a")
        sh("ip", "-n", tx, "addr", "add", f"{STRANGER}/24", "dev", f"pyt{tag}a")
        sh("ip", "-n", rx, "addr", "add", f"{RX}/24", "dev", f"pyt{tag}b")
        for ns, dev in ((tx, f"pyt{tag}a"), (rx, f"pyt{tag}b")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield tag
    finally:
        sh("ip", "netns", "delete", tx, check=False)
        sh("ip", "netns", "delete", rx, check=False)


def _in(ns: str, *cmd: str) -> str:
    return sh("ip", "netns", "exec", ns, *cmd, timeout=60).stdout


def _filter(tag: str, kind: str, action: str, vteps: list[str] | None = None):  # type: ignore[no-untyped-def]
    return json.loads(_in(f"pyt-{tag}-vrx", sys.executable, "-c", FILTER, kind, action, json.dumps(vteps or []),
                          str(ROOT)))


def _deliveries(tag: str) -> dict[str, int]:
    listener = subprocess.Popen(["ip", "netns", "exec", f"pyt-{tag}-vrx", sys.executable, "-c", LISTEN,
                                 str(PORT)],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        _in(f"pyt-{tag}-vtx", sys.executable, "-c", SEND, REGISTERED, STRANGER, RX, str(PORT))
        out, _ = listener.communicate(timeout=30)
    finally:
        listener.kill()
    return dict(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("kind", ["nft", "iptables"])
def test_only_registered_vteps_get_through_and_nothing_stays_behind(netns_pair: str, kind: str) -> None:
    tag = netns_pair
    assert _deliveries(tag) == {REGISTERED: 5, STRANGER: 5}, "without the filter both arrive"
    got = _filter(tag, kind, "apply", [REGISTERED])
    assert got == {"problem": "", "present": True}
    assert _deliveries(tag) == {REGISTERED: 5}
    assert _filter(tag, kind, "dropped") == 5
    # The set follows the registered hosts (swapped whole), the rules stay.
    assert _filter(tag, kind, "apply", [STRANGER])["problem"] == ""
    assert _deliveries(tag) == {STRANGER: 5}
    assert _filter(tag, kind, "dropped") == 10
    assert _filter(tag, kind, "remove") is False
    assert _deliveries(tag) == {REGISTERED: 5, STRANGER: 5}
    rx = f"pyt-{tag}-vrx"
    left = _in(rx, "iptables", "-S") + _in(rx, "nft", "list", "ruleset")
    assert "pyoverlay" not in left.lower(), left
    sets = _in(rx, sys.executable, "-c", "from pyroute2.ipset import IPSet; "
               "print([m.get_attr('IPSET_ATTR_SETNAME') for m in IPSet().list()])")
    assert "pyoverlay" not in sets, sets
