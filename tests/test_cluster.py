"""The cluster experience on plain Docker: a network created on one host appears on every host, and
containers resolve each other's names across hosts (3 simulated hosts, real dockerd, real etcd).

Names: every host's daemon.json names pyoverlay's DNS address once ("dns": ["169.254.53.53"]), so Docker's
embedded DNS asks pyoverlay's server for what it does not know, with no flag per container; a container
started with `--dns <gateway of the network>` reaches the same server on the gateway address. "The internet"
is a small DNS server on the root namespace's underlay address (tests/dns_upstream.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from plugin.config import DEFAULT_DNS_ADDRESS as DNS_ADDRESS
from tests.rig import IMAGE, ROOT, DockerHost, Rig, cleanup_stale, wait_for

pytestmark = pytest.mark.docker

PY = ("-d", "pyoverlay", "--ipam-driver", "pyoverlay")
EXTERNAL = ("external.example", "192.0.2.55")


@pytest.fixture(scope="module")
def rig3() -> Iterator[Rig]:
    cleanup_stale()
    rig = Rig(daemon={"dns": [DNS_ADDRESS]})
    upstream = None
    try:
        rig.up(3, plugin=False)
        upstream = subprocess.Popen([sys.executable, "-m", "tests.dns_upstream", rig.root_ip, "=".join(EXTERNAL)],
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert upstream.stdout is not None and upstream.stdout.readline().strip() == "ready"
        for h in rig.hosts[:2]:  # h3 comes later (test_a_late_host_gets_every_network)
            start(h, rig)
        yield rig
    finally:
        for h in rig.hosts:
            print(f"--- {h.name} plugin log (tail)\n" + "\n".join(h.plugin_log().splitlines()[-60:]))
        if upstream is not None:
            upstream.kill()
            upstream.wait()
        rig.down()


def start(h: DockerHost, rig: Rig) -> None:
    h.start_plugin(PYOVERLAY_PROPAGATE="true", PYOVERLAY_DNS_UPSTREAMS=rig.root_ip)


def status(h: DockerHost) -> dict:  # type: ignore[type-arg]
    return h.cli_json("status")  # type: ignore[no-any-return]


def inspect(h: DockerHost, name: str) -> dict | None:  # type: ignore[type-arg]
    res = h.docker("network", "inspect", name, check=False)
    return json.loads(res.stdout)[0] if res.returncode == 0 else None


def appears(h: DockerHost, name: str, timeout: float = 10) -> float:
    began = time.monotonic()
    wait_for(f"{name} on {h.name}", lambda: inspect(h, name) is not None, timeout=timeout, interval=0.05)
    return time.monotonic() - began


def test_a_network_created_on_one_host_appears_on_every_host(rig3: Rig) -> None:
    h1, h2, _ = rig3.hosts
    h1.docker("network", "create", *PY, "--subnet", "10.61.0.0/24", "--gateway", "10.61.0.254",
              "--opt", "com.docker.network.driver.mtu=1300", "--label", "team=blue", "app")
    took = appears(h2, "app")
    print(f"app appeared on h2 {took:.2f} s after docker network create returned on h1")
    a, b = inspect(h1, "app"), inspect(h2, "app")
    assert a is not None and b is not None
    assert b["Driver"] == "pyoverlay" and b["IPAM"]["Driver"] == "pyoverlay"
    assert b["IPAM"]["Config"] == a["IPAM"]["Config"] == [{"Subnet": "10.61.0.0/24", "Gateway": "10.61.0.254"}]
    assert b["Options"] == a["Options"] == {"com.docker.network.driver.mtu": "1300"}
    assert b["Labels"]["team"] == "blue" and b["Labels"]["pyoverlay.origin"] == "h1"
    vnis = [status(h)["networks"]["10.61.0.0_24"]["vni"] for h in (h1, h2)]
    assert vnis[0] == vnis[1], "the same VNI on both hosts"
    # --internal too, and a network made without --subnet gets the subnet its origin got.
    h2.docker("network", "create", *PY, "--internal", "quiet")
    appears(h1, "quiet")
    q1, q2 = inspect(h1, "quiet"), inspect(h2, "quiet")
    assert q1 is not None and q2 is not None and q1["Internal"] is True
    assert q1["IPAM"]["Config"] == q2["IPAM"]["Config"]
    # The copies are not published again (no loop): one definition each.
    defs = [k for k in rig3.etcd.keys(f"{rig3.etcd_prefix}/netdefs/")]
    assert sorted(d.rsplit("/", 1)[-1] for d in defs) == ["app", "quiet"]
    # Containers on the propagated network reach each other across hosts.
    h1.run("app-1", "app")
    h2.run("app-2", "app")
    target = h1.ip_of("app-1", "app")
    wait_for("app-2 -> app-1", lambda: h2.exec("app-2", "ping", "-c1", "-W1", target, check=False).returncode == 0,
             timeout=20)


def test_rm_removes_it_everywhere_except_where_containers_still_use_it(rig3: Rig) -> None:
    h1, h2, _ = rig3.hosts
    h1.docker("network", "create", *PY, "--subnet", "10.62.0.0/24", "short")
    h1.docker("network", "create", *PY, "--subnet", "10.63.0.0/24", "busy")
    appears(h2, "short")
    appears(h2, "busy")
    h2.run("busy-user", "busy")
    h2.docker("network", "rm", "short")  # rm on a host that did not create it
    wait_for("short gone from h1", lambda: inspect(h1, "short") is None, timeout=10, interval=0.05)
    h1.docker("network", "rm", "busy")
    wait_for("busy removal noticed on h2",
             lambda: "busy" in status(h2)["propagation"]["pending_removal"], timeout=10, interval=0.2)
    assert inspect(h2, "busy") is not None, "kept: a container still uses it"
    why = status(h2)["propagation"]["pending_removal"]["busy"]
    assert "busy-user" in why
    assert "busy" in h2.plugin_log() and "still in use here by busy-user" in h2.plugin_log()
    h2.docker("rm", "-f", "busy-user")
    wait_for("busy gone from h2 once unused", lambda: inspect(h2, "busy") is None, timeout=15, interval=0.1)
    assert not status(h2)["propagation"]["pending_removal"]


def test_a_late_host_gets_every_network(rig3: Rig) -> None:
    h3 = rig3.hosts[2]
    assert inspect(h3, "app") is None
    start(h3, rig3)
    for name in ("app", "quiet"):
        appears(h3, name, timeout=30)
    assert inspect(h3, "app")["IPAM"]["Config"] == [{"Subnet": "10.61.0.0/24", "Gateway": "10.61.0.254"}]  # type: ignore[index]


def lookup(h: DockerHost, container: str, name: str) -> list[str]:
    """The addresses busybox nslookup gets through the container's resolver (Docker's 127.0.0.11)."""
    res = h.exec(container, "nslookup", name, check=False, timeout=20)
    if res.returncode != 0:
        return []
    answer = res.stdout.split(f"Name:\t{name}", 1)[-1] if "Name:" in res.stdout else ""
    return [line.split()[-1] for line in answer.splitlines() if line.startswith("Address")]


def test_names_resolve_across_hosts(rig3: Rig) -> None:
    """No flag per container: daemon.json's "dns" (set once per host) is enough."""
    h1, h2, h3 = rig3.hosts
    appears(h3, "app", timeout=30)
    gw = "10.61.0.254"
    h1.run("web", "app", "--network-alias", "www", ip="10.61.0.80", cmd=("httpd", "-f", "-p", "80", "-h", "/tmp"))
    h1.exec("web", "sh", "-c", "echo hello-from-web > /tmp/index.html")
    h2.run("client", "app")
    wait_for("web resolves on h2", lambda: lookup(h2, "client", "web") == ["10.61.0.80"], timeout=10)
    assert h2.exec("client", "ping", "-c1", "-W2", "web", check=False).returncode == 0
    assert lookup(h2, "client", "www") == ["10.61.0.80"], "--network-alias resolves too"
    # A second pyoverlay network on the same container: its Join gives no second route to the DNS address
    # (Docker would fail the connect), and names keep resolving through the first.
    h2.docker("network", "create", *PY, "--subnet", "10.64.0.0/24", "app2")
    h2.docker("network", "connect", "app2", "client")
    assert lookup(h2, "client", "web") == ["10.61.0.80"]
    page = h2.exec("client", "wget", "-q", "-O-", "http://web/", check=False, timeout=20)
    assert page.stdout.strip() == "hello-from-web", page.stdout + page.stderr
    # --dns <gateway> keeps working (the way before the host-wide address).
    h3.run("client3", "app", "--dns", gw)
    wait_for("web resolves on h3", lambda: lookup(h3, "client3", "web") == ["10.61.0.80"], timeout=10)
    assert lookup(h2, "client", EXTERNAL[0]) == [EXTERNAL[1]], "other names go to the host's resolvers"
    assert lookup(h3, "client3", EXTERNAL[0]) == [EXTERNAL[1]]
    assert lookup(h2, "client", "no-such-container") == []
    # Containers on other networks resolve external names through the same address (forwarded only).
    h3.docker("run", "-d", "--name", "bridged", IMAGE, "sleep", "86400")
    assert lookup(h3, "bridged", EXTERNAL[0]) == [EXTERNAL[1]]
    assert lookup(h3, "bridged", "web") == [], "pyoverlay's names are for its networks' containers only"
    # ... in the kernel (a nat rule to the upstream: no hop through the plugin), so with the plugin down too.
    other = status(h3)["dns"]["other_networks"]
    assert other.startswith(f"kernel DNAT to {rig3.root_ip}:53"), other
    h3.kill_plugin()
    assert lookup(h3, "bridged", EXTERNAL[0]) == [EXTERNAL[1]], "external names resolve with the plugin down"
    start(h3, rig3)
    # The container moves to h3 (another address): its name follows within 2 s.
    h1.docker("rm", "-f", "web")
    began = time.monotonic()
    wait_for("web gone", lambda: lookup(h2, "client", "web") == [], timeout=2, interval=0.05)
    gone_after = time.monotonic() - began
    h3.run("web", "app", "--network-alias", "www", ip="10.61.0.81", cmd=("httpd", "-f", "-p", "80", "-h", "/tmp"))
    began = time.monotonic()
    wait_for("web follows to h3", lambda: lookup(h2, "client", "web") == ["10.61.0.81"], timeout=2, interval=0.05)
    print(f"name gone {gone_after:.2f} s after docker rm; resolves to its new host {time.monotonic() - began:.2f} s "
          f"after docker run")
    assert lookup(h2, "client", "www") == ["10.61.0.81"]
    # A restarted container keeps resolving (same name, same address).
    h3.docker("restart", "-t", "0", "web")
    wait_for("web after restart", lambda: lookup(h2, "client", "web") == ["10.61.0.81"], timeout=5)
    # Same-host names resolve as Docker always did.
    h2.run("plain", "app")
    assert lookup(h2, "plain", "client") != []
    # doctor finds the daemon.json line; status names the address.
    finding = next(f for f in h2.cli_json("doctor") if f["check"] == "names without --dns")
    assert finding["status"] == "ok", finding
    assert status(h2)["dns"]["address"] == DNS_ADDRESS


def test_metrics_say_what_happened(rig3: Rig) -> None:
    h2 = rig3.hosts[1]
    m = h2.metrics()
    assert m['pyoverlay_call_seconds_count{call="NetworkDriver.Join"}'] >= 2
    assert m['pyoverlay_call_seconds_count{call="NetworkDriver.CreateNetwork"}'] >= 3
    assert m['pyoverlay_dns_queries_total{answer="network"}'] >= 5, "cross-host names were answered here"
    assert m['pyoverlay_dns_queries_total{answer="forwarded"}'] >= 1, "external.example went upstream"
    vni = status(h2)["networks"]["10.61.0.0_24"]["vni"]
    assert m[f'pyoverlay_peers_programmed{{vni="{vni}"}}'] >= 2, "app-1 and web on the other hosts"
    assert any(k.startswith("pyoverlay_etcd_seconds_count") and v > 0 for k, v in m.items())
    assert m["pyoverlay_propagation_pending_removals"] == 0


def test_the_same_network_created_by_hand_on_every_host_at_once_is_one_network(rig3: Rig) -> None:
    """Configuration tools create a network by hand on every host, while propagation creates it too:
    however the creations interleave, every host ends with exactly one network of that name."""
    rounds, outcomes = 20, {"created": 0, "refused": 0}

    def create(h: DockerHost, name: str, subnet: str, delay: float) -> None:
        time.sleep(delay)  # staggered: propagation from the first host races the later hands
        res = h.docker("network", "create", *PY, "--subnet", subnet, name, check=False)
        # Losing the race is Docker's own "already exists" (or pyoverlay's "already has this network"):
        # an error that names the cause, never a second network.
        if res.returncode == 0:
            outcomes["created"] += 1
        else:
            assert "already" in res.stderr, res.stderr
            outcomes["refused"] += 1

    def count(h: DockerHost, name: str) -> int:
        out = h.docker("network", "ls", "-q", "--filter", f"name=^{name}$").stdout
        return len(out.split())

    for i in range(rounds):
        name, subnet = f"dup{i}", f"10.70.{i}.0/24"
        delays = [0.0, 0.05 * (i % 5), 0.1 * (i % 7)]
        threads = [threading.Thread(target=create, args=(h, name, subnet, d)) for h, d in zip(rig3.hosts, delays,
                                                                                                strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for h in rig3.hosts:
            wait_for(f"{name} on {h.name}", lambda h=h, name=name: count(h, name) >= 1, timeout=30)
        # Give propagation time to (wrongly) add a second copy: its resync runs every few seconds.
        settle = time.monotonic() + 3
        while time.monotonic() < settle:
            assert [count(h, name) for h in rig3.hosts] == [1, 1, 1], f"round {i}: duplicate {name}"
            time.sleep(0.3)
    print(f"{rounds} rounds on 3 hosts: {outcomes['created']} creations succeeded, {outcomes['refused']} were "
          f"refused as already existing, one network per name per host every time")
    rig3.hosts[0].docker("network", "rm", *(f"dup{i}" for i in range(rounds)))
    for h in rig3.hosts:
        wait_for(f"dup networks gone on {h.name}", lambda h=h: all(count(h, f"dup{i}") == 0 for i in range(rounds)),
                 timeout=60)
