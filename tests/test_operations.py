"""Operating pyoverlay on three real hosts: the operator commands (status, inspect, doctor, gc) and the
metrics, tested for what they say; the reconciler repairing and cleaning up; VXLAN from a machine that is
no registered host dropped; and a burst of 60 containers while one plugin is SIGKILLed."""

from __future__ import annotations

import base64
import json
import signal
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvstore.records import AddressRecord, EndpointRecord
from tests.plugin_client import call
from tests.rig import UNDERLAY_NET, DockerHost, Rig, rig, sh, wait_for
from tests.test_multi_host import PY, everywhere, start
from tests.test_single_host import ping

pytestmark = pytest.mark.docker
GRACE = 6  # PYOVERLAY_RECONCILE_GRACE here


@pytest.fixture(scope="module")
def rig3() -> Iterator[Rig]:
    with rig(3, PYOVERLAY_LEASE_TTL="5", PYOVERLAY_DEAD_HOST_GRACE="6", PYOVERLAY_RECONCILE_INTERVAL="2",
             PYOVERLAY_RECONCILE_GRACE=str(GRACE)) as r:
        yield r


def pin(h: DockerHost, vni: int) -> str:
    return f"{h.state_dir}/netns/pyo-{vni:06x}"


def in_network_ns(h: DockerHost, vni: int, *cmd: str, check: bool = True):  # type: ignore[no-untyped-def]
    """Run a command in one of the host's network namespaces (its pin lives in the host's mount namespace)."""
    return sh("nsenter", "-t", str(h._holder_pid()), "-m", "--", "nsenter", f"--net={pin(h, vni)}", *cmd, check=check)


def vxlan_rx(h: DockerHost, vni: int) -> int:
    info = json.loads(in_network_ns(h, vni, "ip", "-s", "-j", "link", "show", "vxlan0").stdout)
    return int(info[0]["stats64"]["rx"]["packets"])


def etcd_records(rig: Rig, prefix: str, cls):  # type: ignore[no-untyped-def]
    out = rig.etcd.ctl("get", f"{rig.etcd_prefix}/{prefix}", "--prefix", "-w", "json")
    kvs = json.loads(out).get("kvs", [])
    return {base64.b64decode(kv["key"]).decode(): cls.load(base64.b64decode(kv["value"])) for kv in kvs}


def test_status_inspect_doctor_and_metrics_say_what_is_there(rig3: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h1, h2, h3 = rig3.hosts
    everywhere(rig3, cleanup, "op-view", "--subnet", "10.50.0.0/24")
    ip1 = start(h1, cleanup, "view-1", "op-view", "10.50.0.11")
    ip2 = start(h2, cleanup, "view-2", "op-view", "10.50.0.12")
    wait_for("cross-host", lambda: ping(h1, "view-1", ip2, check=False).returncode == 0, timeout=10)

    st = h1.cli_json("status")
    net = st["networks"]["10.50.0.0_24"]
    assert net["encrypted"] is False and net["subnets"] == ["10.50.0.0/24"]
    assert st["peers"][str(net["vni"])] == {"expected": 1, "programmed": 1}, "view-2 on h2"
    assert st["etcd"]["healthy"] is True and st["etcd"]["latency_ms"] > 0
    assert st["etcd"]["watches"] == "JSON gateway", "etcd's gateway is on by default: watches use it"
    assert [e["address"] for e in st["endpoints"] if e["network"] == "10.50.0.0_24"] == [f"{ip1}/24"]
    assert st["live_hosts"] == ["h1", "h2", "h3"]
    assert st["vtep_filter"]["present"] and st["vtep_filter"]["vteps"] == [h.ip for h in rig3.hosts]
    assert st["keys"]["epoch"] >= 1
    text = h1.cli("status", check=True).stdout
    assert "10.50.0.0_24" in text and ip1 in text and "healthy" in text and "3 registered VTEPs" in text

    view = h3.cli_json("inspect", "op-view")  # by Docker name, from a host without containers on it
    assert view["vni"] == net["vni"] and view["encrypted"] is False
    assert {h: v["live"] for h, v in view["hosts"].items()} == {"h1": True, "h2": True, "h3": True}
    assert {(e["host"], e["address"]) for e in view["endpoints"]} == {("h1", f"{ip1}/24"), ("h2", f"{ip2}/24")}
    kinds = {a["address"]: (a["kind"], a["host"]) for a in view["addresses"]}
    assert kinds[ip1] == ("endpoint", "h1") and kinds[ip2] == ("endpoint", "h2")
    assert kinds["10.50.0.1"][0] == "gateway"
    assert view["pools"]["cidr.10.50.0.0_24"]["used"] == 3 and view["pools"]["cidr.10.50.0.0_24"]["usable"] == 254
    text = h3.cli("inspect", "10.50.0.0_24", check=True).stdout  # by cluster key
    assert ip1 in text and ip2 in text and "h1" in text and "gateway" in text
    assert "no pyoverlay network" in h3.cli("inspect", "nonesuch").stderr

    found = {f["check"]: f for f in h1.cli_json("doctor")}
    for check in ("kernel: vxlan", "underlay MTU", "VXLAN port", "etcd", "docker_gwbridge", "FORWARD", "VTEP filter",
                  "peers"):
        assert found[check]["status"] == "ok", found[check]
    # The ARP table is the machine's: ok, or a warning that names the sysctl to raise.
    assert found["neighbour table"]["status"] in ("ok", "warn") and "ARP" in found["neighbour table"]["detail"]
    assert found["neighbour table"]["status"] == "ok" or "gc_thresh3" in found["neighbour table"]["fix"]
    assert "1400" in found["underlay MTU"]["detail"] and "4800" in found["VXLAN port"]["detail"]
    # This machine's kernel has no ESP: a warning (no encrypted network here) with what to do.
    assert found["kernel: esp, gcm"]["status"] == "warn" and "modprobe esp4" in found["kernel: esp, gcm"]["fix"]
    assert h1.cli("doctor").returncode == 0

    # A network whose MTU does not fit the underlay: doctor fails and says which MTU would.
    cleanup.network(h1, "op-bigmtu")
    h1.docker("network", "create", *PY, "--subnet", "10.51.0.0/24", "-o", "com.docker.network.driver.mtu=1400",
              "op-bigmtu")
    res = h1.cli("doctor")
    assert res.returncode == 1 and "FAIL] underlay MTU" in res.stdout and "driver.mtu=1350" in res.stdout
    h1.docker("network", "rm", "op-bigmtu")

    # With the plugin stopped, doctor says so and still checks the host itself.
    h3.kill_plugin(signal.SIGTERM)
    try:
        res = h3.cli("doctor", "--json")
        offline = {f["check"]: f for f in json.loads(res.stdout)}
        assert res.returncode == 1 and offline["plugin"]["status"] == "fail" and "start it" in offline["plugin"]["fix"]
        assert offline["etcd"]["status"] == "ok" and offline["kernel: vxlan"]["status"] == "ok"
        assert "does not answer" in h3.cli("status").stderr
    finally:
        h3.start_plugin()

    m = h1.metrics()
    assert m['pyoverlay_call_seconds_count{call="NetworkDriver.CreateEndpoint"}'] >= 1
    assert m.get('pyoverlay_call_errors_total{call="NetworkDriver.CreateNetwork"}', 0) == 0
    assert m[f'pyoverlay_peers_programmed{{vni="{net["vni"]}"}}'] == 1
    assert m['pyoverlay_reconcile_runs_total{outcome="ok"}'] >= 1
    assert m['pyoverlay_ipam_addresses_used{pool="cidr.10.50.0.0_24"}'] == 3
    assert m['pyoverlay_ipam_addresses_usable{pool="cidr.10.50.0.0_24"}'] == 254
    assert m["pyoverlay_vxlan_dropped_unregistered_total"] >= 0
    assert 0 <= m["pyoverlay_key_epoch_age_seconds"] < 12 * 3600
    assert any(k.startswith('pyoverlay_etcd_seconds_bucket{le="0.01",op="txn"}') for k in m)


def test_reconciler_repairs_the_kernel_and_gc_removes_what_nothing_owns(rig3: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h1, h2, _ = rig3.hosts
    everywhere(rig3, cleanup, "op-gc", "--subnet", "10.53.0.0/24")
    ip1 = start(h1, cleanup, "gc-1", "op-gc")
    start(h2, cleanup, "gc-2", "op-gc")
    vni = h1.cli_json("status")["networks"]["10.53.0.0_24"]["vni"]
    wait_for("cross-host", lambda: ping(h2, "gc-2", ip1, check=False).returncode == 0, timeout=10)

    # Repairs: the VXLAN device deleted by hand comes back, and so do flushed peer entries.
    in_network_ns(h1, vni, "ip", "link", "del", "vxlan0")
    wait_for("vxlan0 re-created", lambda: in_network_ns(h1, vni, "ip", "link", "show", "vxlan0",
                                                        check=False).returncode == 0, timeout=15)
    wait_for("traffic after the repair", lambda: ping(h2, "gc-2", ip1, check=False).returncode == 0, timeout=15)
    in_network_ns(h2, vni, "ip", "neigh", "flush", "dev", "vxlan0", "nud", "permanent")
    wait_for("peers re-programmed", lambda: ip1 in in_network_ns(h2, vni, "ip", "neigh", "show", "dev", "vxlan0",
                                                                 check=False).stdout, timeout=15)
    repairs = h1.metrics()
    assert repairs['pyoverlay_reconcile_repairs_total{kind="network"}'] >= 1

    # Garbage: an address nobody holds (RequestAddress answered, then the container never came), an endpoint
    # record this host does not have, a tagged veth left by an interrupted Join.
    prefix = rig3.etcd_prefix
    stray = AddressRecord(address="10.53.0.200", kind="endpoint", host="h1", owner="ghost")
    rig3.etcd.ctl("put", f"{prefix}/addrs/cidr.10.53.0.0_24/10.53.0.200", stray.dump().decode())
    ghost = EndpointRecord(endpoint_id="e" * 64, network_key="10.53.0.0_24", docker_network_id="d" * 64, host="h1",
                           vtep=h1.ip, mac="02:42:0a:35:00:c9", address="10.53.0.201/24")
    rig3.etcd.ctl("put", f"{prefix}/endpoints/10.53.0.0_24/{'e' * 64}", ghost.dump().decode())
    # A veth tagged as one of h1's endpoints that h1 does not have, and one merely named like ours.
    h1.ns("ip", "link", "add", "pyoabcdef01234", "type", "veth", "peer", "name", "pyoabcdef01235")
    h1.ns("ip", "link", "set", "pyoabcdef01234", "alias", "pyoverlay:h1:ep:" + "abcdef0123" * 6 + "abcd")
    h1.ns("ip", "link", "add", "pyoforeign0001", "type", "veth", "peer", "name", "pyoforeign0002")
    h1.cli("gc")  # a first look starts their clocks; nothing goes yet
    plan = h1.cli_json("gc")
    kinds = {g["kind"]: g for g in plan["waiting"]}
    assert set(kinds) == {"address", "endpoint-record", "host-link"}, plan
    assert "10.53.0.200" in kinds["address"]["what"] and "ghost" in kinds["address"]["what"]
    assert "no endpoint holds it" in kinds["address"]["why"]
    assert "pyoabcdef0123" in kinds["host-link"]["what"]
    assert plan["removed"] == []
    text = h1.cli("gc", check=True).stdout
    assert "would remove: address" in text and "10.53.0.200" in text and "pyoverlay gc --apply" in text
    assert rig3.etcd.get_json(f"{prefix}/addrs/cidr.10.53.0.0_24/10.53.0.200") is not None, "a dry run removes nothing"

    done = h1.cli("gc", "--apply", check=True).stdout
    assert "removed: address" in done and "removed: endpoint-record" in done and "removed: host-link" in done
    assert rig3.etcd.get_json(f"{prefix}/addrs/cidr.10.53.0.0_24/10.53.0.200") is None
    assert rig3.etcd.get_json(f"{prefix}/endpoints/10.53.0.0_24/{'e' * 64}") is None
    links = h1.ns("ip", "-o", "link").stdout
    assert "pyoabcdef" not in links
    assert "pyoforeign0001" in links, "a link merely named like ours is not ours"
    h1.ns("ip", "link", "del", "pyoforeign0001")
    assert "nothing to remove" in h1.cli("gc", check=True).stdout
    ping(h2, "gc-2", ip1)  # what is owned stayed

    # Without gc: the reconciler removes a stray address itself once the grace period has passed.
    rig3.etcd.ctl("put", f"{prefix}/addrs/cidr.10.53.0.0_24/10.53.0.210", stray.model_copy(
        update={"address": "10.53.0.210"}).dump().decode())
    put = time.monotonic()
    wait_for("stray address released", lambda: rig3.etcd.get_json(
        f"{prefix}/addrs/cidr.10.53.0.0_24/10.53.0.210") is None, timeout=GRACE + 15, interval=0.5)
    assert time.monotonic() - put >= GRACE - 1, "not before the grace period"
    assert h1.metrics()['pyoverlay_reconcile_repairs_total{kind="address"}'] >= 2

    # An endpoint Docker no longer has (the plugin missed DeleteEndpoint): made here the way Docker makes one,
    # through the plugin's socket, so Docker never hears of it. Endpoint, record and address go.
    nid = h1.docker("network", "inspect", "-f", "{{.ID}}", "op-gc").stdout.strip()
    status, got = call(h1.plugin_sock, "IpamDriver.RequestAddress", {"PoolID": "cidr.10.53.0.0_24", "Address": ""})
    assert status == 200, got
    eid, got_ip = "f" * 64, got["Address"]
    status, got = call(h1.plugin_sock, "NetworkDriver.CreateEndpoint", {
        "NetworkID": nid, "EndpointID": eid, "Interface": {"Address": got_ip}, "Options": {}})
    assert status == 200, got
    address = got_ip.split("/")[0]
    assert [e for e in h1.cli_json("status")["endpoints"] if e["endpoint_id"] == eid[:12]]
    wait_for("missed endpoint cleaned up", lambda: not [
        e for e in h1.cli_json("status")["endpoints"] if e["endpoint_id"] == eid[:12]], timeout=GRACE + 20)
    assert address not in {a.address for a in etcd_records(rig3, "addrs/cidr.10.53.0.0_24/", AddressRecord).values()}
    assert not [k for k in rig3.etcd.keys(f"{prefix}/endpoints/") if k.endswith(eid)]
    ping(h2, "gc-2", ip1)


def test_forged_vxlan_from_an_unregistered_address_is_dropped(rig3: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h1 = rig3.hosts[0]
    everywhere(rig3, cleanup, "op-forge", "--subnet", "10.54.0.0/24")
    target = start(h1, cleanup, "forge-target", "op-forge", "10.54.0.10")
    vni = h1.cli_json("status")["networks"]["10.54.0.0_24"]["vni"]
    mac = h1.docker("inspect", "-f", '{{(index .NetworkSettings.Networks "op-forge").MacAddress}}',
                    "forge-target").stdout.strip()
    # VXLAN header + an Ethernet frame carrying an ICMP echo to the container, from an invented sender.
    inner = (bytes.fromhex(mac.replace(":", "")) + bytes.fromhex("020000000077") + b"\x08\x00"
             + struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 1, 0, bytes([10, 54, 0, 200]),
                           bytes(int(x) for x in target.split("."))) + b"\x08\x00\xf7\xff\x00\x00\x00\x00")
    packet = (b"\x08\x00\x00\x00" + vni.to_bytes(3, "big") + b"\x00" + inner).hex()
    send = ("import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"[s.sendto(bytes.fromhex('{packet}'), ('{h1.ip}', 4800)) for _ in range(20)]")
    stranger_ip = f"{UNDERLAY_NET}.77"
    with rig3.stranger(77) as ns:
        before, dropped = vxlan_rx(h1, vni), h1.cli_json("status")["vtep_filter"]["dropped"]
        sh("ip", "netns", "exec", ns, "python3", "-c", send)
        time.sleep(0.5)
        assert vxlan_rx(h1, vni) == before, "no forged frame reached the network"
        assert h1.cli_json("status")["vtep_filter"]["dropped"] >= dropped + 20
        # The control: the same datagrams from an address in the set do arrive (the test can fail).
        h1.ns("nft", "add", "element", "ip", "pyoverlay_vtep", "vteps", f"{{ {stranger_ip} }}")
        try:
            sh("ip", "netns", "exec", ns, "python3", "-c", send)
            wait_for("accepted from a registered address", lambda: vxlan_rx(h1, vni) >= before + 20, timeout=5)
        finally:
            h1.ns("nft", "delete", "element", "ip", "pyoverlay_vtep", "vteps", f"{{ {stranger_ip} }}")
    assert h1.metrics()["pyoverlay_vxlan_dropped_unregistered_total"] >= 20


def test_burst_of_60_containers_with_a_plugin_sigkilled_midway(rig3: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    hosts = rig3.hosts
    everywhere(rig3, cleanup, "op-burst", "--subnet", "10.55.0.0/24")
    names = [f"burst-{i:02d}" for i in range(60)]
    where = {n: hosts[i % 3] for i, n in enumerate(names)}
    for n in names:
        cleanup.container(where[n], n)
    started = threading.Semaphore(0)

    def launch(name: str) -> tuple[str, int, str]:
        res = where[name].docker("run", "-d", "--name", name, "--network", "op-burst", "bb:local", "sleep", "86400",
                                 check=False, timeout=180)
        started.release()
        return name, res.returncode, res.stderr.strip()

    victim = hosts[1]

    def kill_midway() -> None:
        for _ in range(12):
            started.acquire(timeout=60)
        victim.kill_plugin(signal.SIGKILL)
        time.sleep(2)
        victim.start_plugin()

    killer = threading.Thread(target=kill_midway)
    killer.start()
    with ThreadPoolExecutor(9) as pool:
        results = list(pool.map(launch, names))
    killer.join()
    failed = [(n, err) for n, rc, err in results if rc != 0]
    print(f"{len(failed)} of 60 docker run failed while {victim.name}'s plugin was killed: "
          + "; ".join(f"{n}: {e[-120:]}" for n, e in failed[:5]))
    for name, _ in failed:  # the user's retry
        where[name].docker("rm", "-f", name, check=False)
        wait_for(f"{name} again", lambda n=name: where[n].docker(
            "run", "-d", "--name", n, "--network", "op-burst", "bb:local", "sleep", "86400", check=False,
            timeout=120).returncode == 0 or where[n].docker("rm", "-f", n, check=False) and False, timeout=60)

    def running_ips() -> dict[str, str]:
        out = {}
        for h in hosts:
            for cid in h.docker("ps", "-q", "--filter", "network=op-burst").stdout.split():
                name = h.docker("inspect", "-f", "{{.Name}}", cid).stdout.strip().lstrip("/")
                out[name] = h.ip_of(name, "op-burst")
        return out

    ips = running_ips()
    assert sorted(ips) == names, "all 60 run"
    assert len(set(ips.values())) == 60, "no address is held twice cluster-wide"

    def held() -> tuple[set[str], set[str]]:
        addrs = {a.address for a in etcd_records(rig3, "addrs/cidr.10.55.0.0_24/", AddressRecord).values()
                 if a.kind == "endpoint"}
        eps = {e.address.split("/")[0] for e in etcd_records(rig3, "endpoints/10.55.0.0_24/", EndpointRecord).values()
               if e.address}
        return addrs, eps

    # Whatever the kill left behind (an address answered but never used) is released after the grace period.
    wait_for("etcd holds exactly the running containers' addresses",
             lambda: held() == (set(ips.values()), set(ips.values())), timeout=GRACE + 40, interval=1)

    # Every container pings every other. A pair that misses is asked again (up to three more rounds, a few
    # seconds apart) and the first-round misses are printed: what must not happen is a pair that never
    # connects.
    todo = {n: [ip for other, ip in ips.items() if other != n] for n in names}
    first_misses = 0
    for round_ in range(4):
        def unreachable(name: str, targets: list[str]) -> list[str]:
            script = f"for ip in {' '.join(targets)}; do ping -c 1 -W 2 $ip >/dev/null 2>&1 || echo $ip; done"
            return where[name].exec(name, "sh", "-c", script, timeout=600).stdout.split()

        with ThreadPoolExecutor(6) as pool:
            misses = dict(zip(todo, pool.map(unreachable, todo, todo.values()), strict=True))
        todo = {n: m for n, m in misses.items() if m}
        if round_ == 0:
            first_misses = sum(len(m) for m in todo.values())
        if not todo:
            break
        time.sleep(3)
    print(f"all-pairs pings: {first_misses} of {60 * 59} missed the first round")
    assert not todo, f"pairs that never connected: {todo}"
