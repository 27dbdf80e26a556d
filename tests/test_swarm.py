"""Swarm mode: three simulated hosts form a swarm; the managed plugin (PYOVERLAY_SCOPE=global) serves an
attachable network created once on the manager; containers on every node reach each other by IP and by name,
and a service's replicas (dnsrr) are reachable from a container on another node.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.rig import IMAGE, MANAGED, Rig, cleanup_stale, wait_for

pytestmark = pytest.mark.docker

NET, SUBNET = "snet", "10.80.0.0/24"


def swarm_up(rig: Rig) -> None:
    manager, *workers = rig.hosts
    manager.docker("swarm", "init", "--advertise-addr", manager.ip, "--listen-addr", f"{manager.ip}:2377")
    token = manager.docker("swarm", "join-token", "-q", "worker").stdout.strip()
    for w in workers:
        w.docker("swarm", "join", "--token", token, "--advertise-addr", w.ip, f"{manager.ip}:2377", timeout=60)
    wait_for("all nodes ready", lambda: manager.docker("node", "ls", "--format", "{{.Status}}").stdout.split()
             == ["Ready"] * len(rig.hosts), timeout=60, interval=0.5)


@pytest.fixture(scope="module")
def swarm() -> Iterator[Rig]:
    cleanup_stale()
    rig = Rig()
    try:
        rig.up(3, plugin=False)
        for h in rig.hosts:
            h.install_plugin(PYOVERLAY_SCOPE="global")
        swarm_up(rig)
        rig.hosts[0].docker("network", "create", "-d", MANAGED, "--ipam-driver", MANAGED, "--attachable",
                            "--subnet", SUBNET, NET)
        yield rig
    finally:
        for h in rig.hosts:
            lines = [ln for ln in h.dockerd_log().splitlines() if "plugin=" in ln or "level=error" in ln]
            print(f"--- {h.name} dockerd/plugin errors (tail)\n" + "\n".join(lines[-30:]))
        if rig.hosts:
            rig.hosts[0].docker("service", "rm", "web", check=False)
        for h in reversed(rig.hosts):
            h.docker("swarm", "leave", "--force", check=False, timeout=60)
        rig.down()


def run_attached(h, name: str, net: str = NET) -> None:  # type: ignore[no-untyped-def]
    """docker run on a swarm network; a node's first attachment can take a while (swarm allocates it)."""
    def attempt() -> bool:
        res = h.docker("run", "-d", "--name", name, "--network", net, IMAGE, "sleep", "86400", check=False,
                       timeout=90)
        if res.returncode != 0:
            h.docker("rm", "-f", name, check=False)
        return res.returncode == 0
    wait_for(f"{name} attached on {h.name}", attempt, timeout=180, interval=2)


def test_attachable_network_by_ip_and_by_name(swarm: Rig) -> None:
    # Docker shows a plugin network's driver on a node only once a task uses it there: check the scope.
    assert swarm.hosts[0].docker("network", "inspect", "-f", "{{.Scope}}", NET).stdout.strip() == "swarm"
    for h in swarm.hosts:
        run_attached(h, f"s-{h.name}")
    ips = {h.name: h.ip_of(f"s-{h.name}", NET) for h in swarm.hosts}
    assert all(ip.startswith("10.80.0.") for ip in ips.values())
    assert len(set(ips.values())) == 3, "one address per container, cluster-wide"
    nid = swarm.hosts[0].docker("network", "inspect", "-f", "{{.Id}}", NET).stdout.strip()
    record = swarm.etcd.get_json(f"{swarm.etcd_prefix}/networks/swarm.{nid}")
    assert record and record["subnets"] == [SUBNET], "the network is keyed by its swarm NetworkID"
    members = swarm.etcd.keys(f"{swarm.etcd_prefix}/members/swarm.{nid}/")
    assert len(members) == 3, f"every node is a member: {members}"
    for h in swarm.hosts:
        for other in swarm.hosts:
            if other is h:
                continue
            for target in (ips[other.name], f"s-{other.name}"):
                wait_for(f"{h.name} -> {target}", lambda h=h, t=target: h.exec(
                    f"s-{h.name}", "ping", "-c1", "-W1", t, check=False, timeout=10).returncode == 0,
                    timeout=60, interval=1)


def test_service_replicas_reachable_from_a_container(swarm: Rig) -> None:
    manager = swarm.hosts[0]
    manager.docker("service", "create", "-d", "--name", "web", "--network", NET, "--endpoint-mode", "dnsrr",
                   "--replicas", "3", "--no-resolve-image", IMAGE,
                   "sh", "-c", "hostname > /tmp/who; exec httpd -f -p 8080 -h /tmp", timeout=60)
    wait_for("3 replicas running", lambda: manager.docker(
        "service", "ps", "web", "--filter", "desired-state=running", "--format", "{{.CurrentState}}"
    ).stdout.count("Running") == 3, timeout=240, interval=2)
    nodes = set(manager.docker("service", "ps", "web", "--filter", "desired-state=running", "--format",
                               "{{.Node}}").stdout.split())
    print(f"replicas on nodes {sorted(nodes)}")
    client = swarm.hosts[1]
    if not client.docker("ps", "-q", "-f", "name=s-h2").stdout.strip():
        run_attached(client, "s-h2")

    def addresses() -> set[str]:
        out = client.exec("s-h2", "nslookup", "web", check=False, timeout=20).stdout
        return set(re.findall(r"Address(?: \d+)?:\s*(10\.80\.0\.\d+)", out))
    wait_for("dnsrr lists every replica", lambda: len(addresses()) == 3, timeout=120, interval=2)
    served: set[str] = set()
    for addr in sorted(addresses()):
        wait_for(f"replica {addr} answers", lambda a=addr: served.add(http_get(client, a)) or True, timeout=60,
                 interval=1)
    assert len(served) == 3, f"each replica answered from its own container: {served}"
    assert http_get(client, "web") in served, "and by the service name (round robin over the replicas)"


def http_get(h, host: str) -> str:  # type: ignore[no-untyped-def]
    """GET /who from the replica's httpd (with busybox nc: busybox-static's wget segfaulted in these containers)."""
    res = h.exec("s-h2", "sh", "-c", f"printf 'GET /who HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} 8080",
                 check=False, timeout=20)
    body = res.stdout.split("\n\n", 1)  # text mode turned CRLF into LF
    assert res.returncode == 0 and " 200 " in res.stdout.splitlines()[0] and len(body) == 2, res.stdout + res.stderr
    return body[1].strip()
