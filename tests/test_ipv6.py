"""IPv6 end to end on three simulated hosts: a dual-stack pyoverlay network (`--ipv6`), ping6 across hosts,
AAAA names with no flag, a full-MTU ping6 with nothing fragmented, an address released and reused on another
host; and an IPv6-only network (`--ipv4=false`, Docker 28)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from plugin.config import DEFAULT_DNS_ADDRESS
from tests.rig import DockerHost, Rig, rig, sh, wait_for
from tests.test_cluster import inspect, lookup
from tests.test_single_host import pid_of

pytestmark = pytest.mark.docker
PY = ("-d", "pyoverlay", "--ipam-driver", "pyoverlay")
V6, V4 = "fd00:10::/64", "10.30.0.0/24"
GW6 = "fd00:20::fe"   # the IPv6-only network's gateway


@pytest.fixture(scope="module")
def rig3() -> Iterator[Rig]:
    with rig(3, daemon={"dns": [DEFAULT_DNS_ADDRESS]}, PYOVERLAY_PROPAGATE="true") as r:
        yield r


def ip6_of(h: DockerHost, container: str, network: str) -> str:
    fmt = '{{(index .NetworkSettings.Networks "' + network + '").GlobalIPv6Address}}'
    return h.docker("inspect", "-f", fmt, container).stdout.strip()


def ping6(h: DockerHost, container: str, target: str, size: int = 56) -> bool:
    """iputils ping -6 with Don't-Fragment from the container's namespace."""
    return sh("nsenter", "-t", pid_of(h, container), "-n", "ping", "-6", "-M", "do", "-s", str(size), "-c", "1",
              "-W", "2", target, check=False).returncode == 0


def test_dual_stack_network_across_three_hosts(rig3: Rig) -> None:
    h1, h2, h3 = rig3.hosts
    h1.docker("network", "create", *PY, "--ipv6", "--subnet", V6, "--subnet", V4, "v6net")
    for h in (h2, h3):
        wait_for(f"v6net on {h.name}", lambda h=h: inspect(h, "v6net") is not None, timeout=30)
        assert inspect(h, "v6net")["EnableIPv6"] is True  # type: ignore[index]
    addrs = {}
    for h in rig3.hosts:
        h.run(f"six-{h.name}", "v6net")
        addrs[h.name] = ip6_of(h, f"six-{h.name}", "v6net")
        assert ipaddress.ip_address(addrs[h.name]) in ipaddress.ip_network(V6)
    assert len(set(addrs.values())) == 3, "IPv6 addresses are unique cluster-wide"
    for src in rig3.hosts:
        for dst in rig3.hosts:
            if src is not dst:
                wait_for(f"ping6 {src.name}->{dst.name}",
                         lambda s=src, d=dst: ping6(s, f"six-{s.name}", addrs[d.name]), timeout=15, interval=0.3)
    # AAAA names across hosts, no flag (daemon.json "dns").
    wait_for("six-h1 AAAA on h2", lambda: addrs["h1"] in lookup(h2, "six-h2", "six-h1"), timeout=15)
    # The full MTU, Don't-Fragment: the overlay's MTU holds for IPv6 (40-byte header + 8 ICMPv6).
    mtu = int(h2.exec("six-h2", "cat", "/sys/class/net/eth0/mtu").stdout)
    assert ping6(h2, "six-h2", addrs["h3"], mtu - 48), f"a {mtu}-byte IPv6 packet crosses whole"
    assert not ping6(h2, "six-h2", addrs["h3"], mtu - 47), "one byte more does not fit the interface"
    # Released on one host, reused on another.
    gone = addrs["h1"]
    h1.docker("rm", "-f", "six-h1")
    wait_for("address released", lambda: h3.docker("run", "-d", "--name", "six-again", "--network", "v6net",
                                                   "--ip6", gone, "bb:local", "sleep", "86400",
                                                   check=False).returncode == 0, timeout=20, interval=1)
    assert ip6_of(h3, "six-again", "v6net") == gone
    wait_for("the reused address answers", lambda: ping6(h2, "six-h2", gone), timeout=15, interval=0.3)


def test_ipv6_only_network(rig3: Rig) -> None:
    """Docker 28 creates networks with no IPv4 (--ipv4=false); Docker 20.10 has no such option."""
    h1, h2, _ = rig3.hosts
    if rig3.engine.name != "28":
        pytest.skip("--ipv4=false needs Docker 27 or later (this run: Docker 20.10)")
    res = h1.docker("network", "create", *PY, "--ipv4=false", "--ipv6", "--subnet", "fd00:20::/64",
                    "--gateway", GW6, "only6",
                    check=False)
    assert res.returncode == 0, res.stderr
    wait_for("only6 on h2", lambda: inspect(h2, "only6") is not None, timeout=30)
    h1.run("o6-a", "only6")
    h2.run("o6-b", "only6")
    a, b = ip6_of(h1, "o6-a", "only6"), ip6_of(h2, "o6-b", "only6")
    assert a and b and a != b
    h4 = h1.docker("inspect", "-f", '{{(index .NetworkSettings.Networks "only6").IPAddress}}', "o6-a").stdout.strip()
    assert h4 == "", "no IPv4 address on an IPv6-only network"
    wait_for("ping6 across hosts", lambda: ping6(h1, "o6-a", b), timeout=15, interval=0.3)
    assert ping6(h2, "o6-b", a)
    # Names across hosts: the DNS address is IPv4, so here through --dns <the network's IPv6 gateway>.
    h2.run("o6-asker", "only6", "--dns", GW6)
    wait_for("o6-a AAAA on h2", lambda: a in lookup(h2, "o6-asker", "o6-a"), timeout=15)
