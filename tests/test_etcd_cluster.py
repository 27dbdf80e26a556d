"""pyoverlay against a 3-member etcd cluster: three simulated Docker hosts and three etcd members, each member
in its own namespace on the underlay, every plugin naming all three in ETCD_ENDPOINTS. Members are killed
(the leader, with SIGKILL) and cut off (their link down) while containers start and traffic flows."""

from __future__ import annotations

import collections
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tests.plugin_client import call
from tests.rig import IMAGE, DockerHost, Rig, wait_for
from tests.test_single_host import ping

pytestmark = pytest.mark.docker
PY = ("-d", "pyoverlay", "--ipam-driver", "pyoverlay")
SUBNET, POOL = "10.70.0.0/24", "cidr.10.70.0.0_24"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Rig]:
    r = Rig(etcd_members=3)
    try:
        r.up(3, PYOVERLAY_LEASE_TTL="5")
        for h in r.hosts:
            h.docker("network", "create", *PY, "--subnet", SUBNET, "cl")
        yield r
    finally:
        r.down()


def members_back(r: Rig) -> None:
    """Every member running and reachable again, and the cluster healthy."""
    for m in r.etcd.members:  # type: ignore[union-attr]
        m.partition(False)
        if m.proc is None:
            m.start()
    wait_for("all members healthy", lambda: r.etcd.healthy() == 3, timeout=60)  # type: ignore[union-attr]


def etcd_addresses(r: Rig) -> list[str]:
    prefix = f"{r.etcd_prefix}/addrs/{POOL}/"
    return [k[len(prefix):] for k in r.etcd.keys(prefix)]


def run_eventually(h: DockerHost, name: str, timeout: float = 60) -> float:
    """docker run until it succeeds (removing what a failed try left); returns the seconds it took."""
    began = time.monotonic()
    while h.docker("run", "-d", "--name", name, "--network", "cl", IMAGE, "sleep", "86400", check=False,
                   timeout=60).returncode != 0:
        h.docker("rm", "-f", name, check=False)
        assert time.monotonic() - began < timeout, f"{name} did not start within {timeout} s"
        time.sleep(1)
    return time.monotonic() - began


def run_with_retry(h: DockerHost, name: str, outcomes: collections.Counter[str]) -> None:
    """docker run: success, or a clear error and a retry that succeeds (a half-made container is removed)."""
    for attempt in range(4):
        res = h.docker("run", "-d", "--name", name, "--network", "cl", IMAGE, "sleep", "86400", check=False,
                       timeout=60)
        if res.returncode == 0:
            outcomes["first try" if attempt == 0 else "after a retry"] += 1
            return
        err = res.stderr.strip()
        assert err, f"{name}: docker run failed without saying why"
        why = next((line for line in err.splitlines() if "rror" in line), err.splitlines()[0])
        outcomes[f"error: {why[:300]}"] += 1
        h.docker("rm", "-f", name, check=False)
        time.sleep(1)
    raise AssertionError(f"{name} did not start in 4 tries")


def test_leader_killed_during_a_burst_of_runs(cluster: Rig) -> None:
    """60 `docker run` across 3 hosts; the leader is SIGKILLed after the first few: every run succeeds or
    fails with a clear error and succeeds on retry; afterwards no address twice and none leaked."""
    outcomes: collections.Counter[str] = collections.Counter()
    started = threading.Event()
    failures: list[BaseException] = []

    def host_runs(h: DockerHost, index: int) -> None:
        try:
            for i in range(20):
                run_with_retry(h, f"b{index}-{i}", outcomes)
                if i == 3:
                    started.set()
        except BaseException as err:  # noqa: BLE001 - reported below
            failures.append(err)

    workers = [threading.Thread(target=host_runs, args=(h, n)) for n, h in enumerate(cluster.hosts)]
    for w in workers:
        w.start()
    assert started.wait(120)
    leader = cluster.etcd.leader()  # type: ignore[union-attr]
    leader.kill()
    print(f"killed the leader {leader.name} during the burst")
    for w in workers:
        w.join(timeout=600)
    assert not failures, failures
    print(f"docker run outcomes: {dict(outcomes)}")
    ips = [h.ip_of(f"b{n}-{i}", "cl") for n, h in enumerate(cluster.hosts) for i in range(20)]
    assert len(ips) == 60 and len(set(ips)) == 60, "no address given twice"
    allocated = set(etcd_addresses(cluster))
    leaked = allocated - set(ips) - {"10.70.0.1"}
    assert not leaked, f"addresses allocated in etcd that no container holds: {sorted(leaked)}"
    assert set(ips) <= allocated, "every container's address is allocated in etcd"
    members_back(cluster)


def test_leader_killed_then_a_member_cut_off_under_traffic(cluster: Rig) -> None:
    """Pings every 0.2 s between hosts while the leader is killed and then another member is cut off (no
    quorum left): none is lost, plugin calls answer within 5 s throughout, nothing is restarted; with the
    members back, containers start again."""
    h1, h2, _ = cluster.hosts
    h1.run("p1", "cl")
    h2.run("p2", "cl")
    ip1 = h1.ip_of("p1", "cl")
    wait_for("p2 reaches p1", lambda: ping(h2, "p2", ip1, check=False).returncode == 0, timeout=20)
    plugin_pids = [h.plugin.pid for h in cluster.hosts if h.plugin is not None]
    flow = subprocess.Popen([*h2.docker_cmd(), "exec", "p2", "ping", "-c", "300", "-i", "0.2", "-W", "2", ip1],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    slowest = 0.0

    def calls_answer() -> None:
        nonlocal slowest
        for h in cluster.hosts:
            t0 = time.monotonic()
            status, got = call(h.plugin_sock, "IpamDriver.RequestAddress", {"PoolID": POOL, "Address": ""},
                               timeout=5)   # raises if the answer takes longer
            slowest = max(slowest, time.monotonic() - t0)
            if status == 200:   # a real allocation: give it back
                call(h.plugin_sock, "IpamDriver.ReleaseAddress", {"PoolID": POOL, "Address": got["Address"]},
                     timeout=5)
            else:
                assert "etcd" in got["Err"], got

    try:
        time.sleep(3)
        leader = cluster.etcd.leader()  # type: ignore[union-attr]
        leader.kill()
        began = time.monotonic()
        while time.monotonic() - began < 15:
            calls_answer()
            time.sleep(1)
        other = next(m for m in cluster.etcd.members if m.proc is not None)  # type: ignore[union-attr]
        other.partition(True)
        print(f"killed {leader.name}, then cut off {other.name}: one member of three left")
        began = time.monotonic()
        while time.monotonic() - began < 20:
            calls_answer()
            time.sleep(1)
    finally:
        members_back(cluster)
    out, _ = flow.communicate(timeout=120)
    summary = [line for line in out.splitlines() if "packets transmitted" in line]
    print(f"ping across both failures: {summary}; slowest plugin call {slowest:.2f} s")
    assert summary and " 0% packet loss" in summary[0], out[-500:]
    assert [h.plugin.pid for h in cluster.hosts if h.plugin is not None] == plugin_pids, "nothing was restarted"
    run_eventually(cluster.hosts[2], "after")


def test_a_plugin_on_a_cut_off_member_fails_over(cluster: Rig) -> None:
    """h3's plugin talks to one member first; that member is cut off from the others: h3 fails over, and
    what it allocates meanwhile is never what h1 allocated (no stale read of the pool)."""
    h1, _, h3 = cluster.hosts
    first = cluster.etcd.members[0]  # type: ignore[union-attr]
    h3.kill_plugin()
    h3.start_plugin(ETCD_ENDPOINTS=",".join(m.url for m in cluster.etcd.members))  # type: ignore[union-attr]
    h3.wait_ready()
    h3.run("f-0", "cl")   # connected to the first member now
    try:
        first.partition(True)
        for i in range(3):
            h1.run(f"g-{i}", "cl")
        took = run_eventually(h3, "f-1")
        print(f"h3 failed over and started a container {took:.1f} s after its member was cut off")
        ips = [h1.ip_of(f"g-{i}", "cl") for i in range(3)] + [h3.ip_of("f-0", "cl"), h3.ip_of("f-1", "cl")]
        assert len(set(ips)) == len(ips), ips
        wait_for("f-1 reachable from h1", lambda: ping(h1, "g-0", h3.ip_of("f-1", "cl"), check=False).returncode == 0,
                 timeout=60)  # h1 may have to fail over too (a bound, not a pace)
    finally:
        members_back(cluster)
