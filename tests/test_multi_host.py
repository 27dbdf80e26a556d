"""Three simulated Docker hosts sharing one etcd: one network across hosts over VXLAN."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.plugin_client import call
from tests.rig import Rig, rig, sh, wait_for
from tests.test_single_host import df_ping, ping

pytestmark = pytest.mark.docker
PY = ("-d", "pyoverlay", "--ipam-driver", "pyoverlay")


@pytest.fixture(scope="module")
def rig3() -> Iterator[Rig]:
    with rig(3, PYOVERLAY_LEASE_TTL="5", PYOVERLAY_DEAD_HOST_GRACE="6") as r:
        yield r


def everywhere(rig: Rig, cleanup, name: str, *args: str) -> None:  # type: ignore[no-untyped-def]
    for h in rig.hosts:
        if h.dockerd is None:
            continue
        cleanup.network(h, name)
        h.docker("network", "create", *PY, *args, name)


def start(host, cleanup, name: str, net: str, ip: str | None = None, *args: str) -> str:  # type: ignore[no-untyped-def]
    cleanup.container(host, name)
    host.run(name, net, *args, ip=ip)
    return host.ip_of(name, net)


def fdb_vteps(host, rig: Rig) -> str:  # type: ignore[no-untyped-def]
    """Every FDB destination programmed in any pyoverlay namespace of a host."""
    # The pins live in the host's own mount namespace: look from inside it.
    script = (f'for p in {host.state_dir}/netns/pyo-*; do [ -e "$p" ] && '
              f'nsenter --net="$p" bridge fdb show dev vxlan0; done; true')
    return sh("nsenter", "-t", str(host._holder_pid()), "-m", "--", "sh", "-c", script, check=False).stdout


def test_ping_across_hosts_both_directions(rig3: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h1, h2, h3 = rig3.hosts
    everywhere(rig3, cleanup, "m-ping", "--subnet", "10.40.0.0/24")
    ips = {h.name: start(h, cleanup, f"mp-{h.name}", "m-ping") for h in rig3.hosts}
    assert len(set(ips.values())) == 3, "addresses are unique cluster-wide"
    vnis = {rig3.etcd.get_json(f"{rig3.etcd_prefix}/networks/10.40.0.0_24")["vni"]}
    assert len(vnis) == 1
    for src in rig3.hosts:
        for dst in rig3.hosts:
            if src is not dst:
                wait_for(f"{src.name}->{dst.name}",
                         lambda s=src, d=dst: ping(s, f"mp-{s.name}", ips[d.name], check=False).returncode == 0,
                         timeout=10, interval=0.2)


def test_tcp_transfer_and_df_limits_across_hosts(rig3: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h1, h2, _ = rig3.hosts
    everywhere(rig3, cleanup, "m-tcp", "--subnet", "10.41.0.0/24")
    server_ip = start(h2, cleanup, "tcp-server", "m-tcp")
    start(h1, cleanup, "tcp-client", "m-tcp")
    # 10 MB over TCP (busybox httpd -> wget), checksummed at both ends.
    h2.exec("tcp-server", "sh", "-c", "mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/data bs=65536 count=160")
    h2.docker("exec", "-d", "tcp-server", "httpd", "-f", "-p", "8080", "-h", "/tmp/www")
    sent = h2.exec("tcp-server", "md5sum", "/tmp/www/data").stdout.split()[0]
    wait_for("server", lambda: ping(h1, "tcp-client", server_ip, check=False).returncode == 0, timeout=10)
    wait_for("transfer", lambda: h1.exec("tcp-client", "wget", "-q", "-O", "/tmp/got",
                                         f"http://{server_ip}:8080/data", check=False, timeout=120).returncode == 0,
             timeout=60, interval=0.5)
    assert h1.exec("tcp-client", "sh", "-c", "wc -c < /tmp/got").stdout.strip() == str(160 * 65536)
    assert h1.exec("tcp-client", "md5sum", "/tmp/got").stdout.split()[0] == sent
    largest = 1400 - 50 - 28
    ok = df_ping(h1, "tcp-client", server_ip, largest)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    too_big = df_ping(h1, "tcp-client", server_ip, largest + 1)
    assert too_big.returncode != 0 and "message too long" in (too_big.stdout + too_big.stderr).lower()


def test_conflicting_definitions_are_refused(rig3: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h1, h2, h3 = rig3.hosts
    cleanup.network(h1, "m-conf")
    h1.docker("network", "create", *PY, "--subnet", "10.42.0.0/24", "m-conf")
    cleanup.network(h2, "m-conf")
    res = h2.docker("network", "create", *PY, "--subnet", "10.42.0.0/24", "--internal", "m-conf", check=False)
    assert res.returncode != 0 and "different settings" in res.stderr and "internal" in res.stderr
    cleanup.network(h3, "m-conf")
    res = h3.docker("network", "create", *PY, "--subnet", "10.42.0.0/24", "--gateway", "10.42.0.9", "m-conf",
                    check=False)
    assert res.returncode != 0 and "gateway" in res.stderr
    # Nothing half-made: the refused hosts hold no membership.
    members = [k for k in rig3.etcd.keys(f"{rig3.etcd_prefix}/members/10.42.0.0_24/")]
    assert [m.rsplit("/", 1)[-1] for m in members] == ["h1"]


def test_networks_stay_isolated_across_hosts(rig3: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h1, h2, _ = rig3.hosts
    everywhere(rig3, cleanup, "m-isoa", "--subnet", "10.43.0.0/24")
    everywhere(rig3, cleanup, "m-isob", "--subnet", "10.44.0.0/24")
    a1 = start(h1, cleanup, "isoa-1", "m-isoa")
    a2 = start(h2, cleanup, "isoa-2", "m-isoa")
    b2 = start(h2, cleanup, "isob-2", "m-isob")
    wait_for("same network", lambda: ping(h1, "isoa-1", a2, check=False).returncode == 0, timeout=10)
    assert ping(h1, "isoa-1", b2, check=False).returncode != 0
    assert ping(h2, "isob-2", a1, check=False).returncode != 0


def test_container_moves_between_hosts(rig3: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h1, h2, h3 = rig3.hosts
    everywhere(rig3, cleanup, "m-move", "--subnet", "10.45.0.0/24")
    start(h3, cleanup, "move-probe", "m-move")
    start(h1, cleanup, "mover", "m-move", "10.45.0.50")
    wait_for("at h1", lambda: ping(h3, "move-probe", "10.45.0.50", check=False).returncode == 0, timeout=10)
    h1.docker("rm", "-f", "mover")
    start(h2, cleanup, "mover", "m-move", "10.45.0.50")
    moved = time.monotonic()
    wait_for("at h2", lambda: ping(h3, "move-probe", "10.45.0.50", check=False).returncode == 0, timeout=10)
    print(f"reachable at its new host {time.monotonic() - moved:.2f}s after docker run returned")
    h2_vtep = h2.ip
    assert h2_vtep in fdb_vteps(h3, rig3)


def test_plugin_sigkill_keeps_cross_host_traffic(rig3: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h1, h2, _ = rig3.hosts
    everywhere(rig3, cleanup, "m-kill", "--subnet", "10.46.0.0/24")
    ip1 = start(h1, cleanup, "kill-1", "m-kill")
    start(h2, cleanup, "kill-2", "m-kill")
    wait_for("before", lambda: ping(h2, "kill-2", ip1, check=False).returncode == 0, timeout=10)
    h2.kill_plugin(signal.SIGKILL)
    ping(h2, "kill-2", ip1)
    h2.start_plugin()
    ping(h2, "kill-2", ip1)
    ip3 = start(h2, cleanup, "kill-3", "m-kill")
    wait_for("new container", lambda: ping(h1, "kill-1", ip3, check=False).returncode == 0, timeout=10)


def test_etcd_outage_keeps_traffic_and_fails_new_work_fast(rig3: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    """etcd down for 60 s: existing flows keep going (no ping lost), plugin calls answer a clear Err well
    inside Docker's timeout (the client here gives up after 5 s), and everything works again afterwards
    without restarting anything."""
    h1, h2, _ = rig3.hosts
    everywhere(rig3, cleanup, "m-outage", "--subnet", "10.47.0.0/24")
    ip1 = start(h1, cleanup, "out-1", "m-outage")
    start(h2, cleanup, "out-2", "m-outage")
    wait_for("before", lambda: ping(h2, "out-2", ip1, check=False).returncode == 0, timeout=10)
    plugin_pids = [h.plugin.pid for h in rig3.hosts if h.plugin is not None]
    # 70 s of pings every 0.2 s, across the whole outage.
    flow = subprocess.Popen([*h2.docker_cmd(), "exec", "out-2", "ping", "-c", "350", "-i", "0.2",
                             "-W", "2", ip1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(3)
    rig3.etcd.stop()
    try:
        began = time.monotonic()
        slowest = 0.0
        for method, body in (
                ("IpamDriver.RequestPool", {"AddressSpace": "LocalDefault", "Pool": "10.49.0.0/24", "Options": {}}),
                ("IpamDriver.RequestAddress", {"PoolID": "cidr.10.47.0.0_24", "Address": ""}),
                ("NetworkDriver.CreateNetwork", {"NetworkID": "e" * 64, "Options": {}, "IPv4Data": [
                    {"AddressSpace": "LocalDefault", "Pool": "10.49.0.0/24", "Gateway": "10.49.0.1/24"}]})):
            t0 = time.monotonic()
            status, got = call(h2.plugin_sock, method, body, timeout=5)  # raises if the answer takes longer
            slowest = max(slowest, time.monotonic() - t0)
            assert status != 200 and "unavailable" in got["Err"] and "etcd" in got["Err"], (method, got)
        print(f"plugin calls during the outage answered an Err within {slowest:.2f}s")
        cleanup.container(h2, "out-new")
        res = h2.docker("run", "-d", "--name", "out-new", "--network", "m-outage", "bb:local", "sleep", "100",
                        check=False, timeout=60)
        assert res.returncode != 0 and "unavailable" in res.stderr
        print(f"docker run failed after {time.monotonic() - began:.1f}s: {res.stderr.strip()}")
        while time.monotonic() - began < 60:
            time.sleep(2)
        assert h2.cli_json("status")["etcd"]["healthy"] is False
    finally:
        rig3.etcd.start()
    out, _ = flow.communicate(timeout=120)
    summary = [line for line in out.splitlines() if "packets transmitted" in line]
    print(f"ping across the outage: {summary}")
    assert summary and " 0% packet loss" in summary[0], out[-500:]
    h2.docker("rm", "-f", "out-new", check=False)
    ip_new = wait_for("after etcd returns", lambda: start(h2, cleanup, "out-after", "m-outage"), timeout=30,
                      interval=1)
    wait_for("new container reachable", lambda: ping(h1, "out-1", ip_new, check=False).returncode == 0, timeout=15)
    assert [h.plugin.pid for h in rig3.hosts if h.plugin is not None] == plugin_pids, "nothing was restarted"


def test_dead_host_entries_removed(rig3: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h1, h2, h3 = rig3.hosts
    everywhere(rig3, cleanup, "m-dead", "--subnet", "10.48.0.0/24")
    start(h1, cleanup, "dead-1", "m-dead")
    ip3 = start(h3, cleanup, "dead-3", "m-dead")
    wait_for("h3 programmed on h1", lambda: h3.ip in fdb_vteps(h1, rig3), timeout=10)
    ping(h1, "dead-1", ip3)
    killed = time.monotonic()
    h3.kill_plugin(signal.SIGKILL)
    h3.stop_dockerd(signal.SIGKILL)
    h3.down()  # the whole host: daemons, namespace, everything
    # A missed lease removes nothing (its plugin may just be down); the departure after the grace does.
    wait_for("h3 no longer live", lambda: "h3" not in h1.cli_json("status")["live_hosts"], timeout=5 + 10)
    assert h3.ip in fdb_vteps(h1, rig3), "a host whose lease expired keeps its entries until it departs"
    wait_for("h3's entries gone from h1 and h2", lambda: h3.ip not in fdb_vteps(h1, rig3) + fdb_vteps(h2, rig3),
             timeout=5 + 6 + 20)
    print(f"h3's entries removed everywhere {time.monotonic() - killed:.1f}s after the host died "
          f"(lease TTL 5s, grace 6s)")
    for h in (h1, h2):  # and VXLAN from its address is no longer accepted
        wait_for("VTEP filter without h3", lambda h=h: h.cli_json("status")["vtep_filter"]["vteps"] == [h1.ip, h2.ip],
                 timeout=10)
    # After the grace period its endpoints, addresses and memberships are released: the address is free.
    prefix = rig3.etcd_prefix
    wait_for("h3's records released",
             lambda: not [k for k in rig3.etcd.keys(prefix) if k.endswith(f"/{ip3}") or k.endswith("/h3")],
             timeout=6 + 5 + 15, interval=0.5)
    print(f"h3's addresses released {time.monotonic() - killed:.1f}s after the host died (grace 6s)")
    for ep in rig3.etcd.keys(f"{prefix}/endpoints/"):
        assert rig3.etcd.get_json(ep)["host"] != "h3"
    start(h2, cleanup, "dead-3-again", "m-dead", ip3)
    ping(h1, "dead-1", ip3)
