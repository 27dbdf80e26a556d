"""The trust boundary, end to end on real hosts: what an etcd writer, a local user or a container can do.

Two simulated hosts with a cluster secret share a network. Hostile records (copies of real ones with
injection strings in every field, forgeries without the secret, replays of records once valid) are written
straight into etcd; a non-root user tries the plugin's socket; a container floods the DNS server. Each test
asserts that nothing ran (no marker file, no namespace, no nftables table appeared), nothing was redirected
(no FDB or neighbour entry towards an unknown VTEP), the plugin still serves and the containers still
reach each other. The encryption guard under a firewall flush is tested in the guest (tests/guest/).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugin_client import call
from tests.rig import Rig, connect_as_nobody, rig, sh, wait_for
from tests.test_multi_host import PY, start
from tests.test_single_host import ping

pytestmark = pytest.mark.docker
SECRET = "trust-test-secret"
MARKER = Path("/tmp/pyoverlay-trust-pwned")
STRANGE_VTEP = "10.99.0.66"
UPSTREAM = "10.99.0.250"     # the rig's root leg: a blackhole upstream listens there during the flood


@pytest.fixture(scope="module")
def rig2() -> Iterator[Rig]:
    # Propagation on: a forged network definition must not make any host create a network. DNS forwards to
    # the root namespace's underlay address (never off this machine).
    with rig(2, PYOVERLAY_CLUSTER_SECRET=SECRET, PYOVERLAY_PROPAGATE="true", PYOVERLAY_DNS_UPSTREAMS=UPSTREAM) as r:
        yield r


def shared(r: Rig, cleanup, name: str, *args: str) -> None:  # type: ignore[no-untyped-def]
    """A network created once on h1; propagation makes it on h2."""
    for h in r.hosts:
        cleanup.network(h, name)
    r.hosts[0].docker("network", "create", *PY, *args, name)
    wait_for(f"{name} on every host", lambda: all(h.docker("network", "inspect", name, check=False).returncode == 0
                                                  for h in r.hosts), timeout=30)


def hostile_values() -> list[str]:
    cmd = f"touch {MARKER}"
    return [f"10.99.0.2\nnetns exec x sh -c '{cmd}'", f"10.99.0.2; {cmd}", f"$({cmd})", f"`{cmd}`",
            '10.99.0.2" } ; flush ruleset ; table ip pwn { chain c { } }', "../../../../tmp/pyoverlay-x",
            "x" * 70_000, "zz:zz:zz:zz:zz:zz", "300.1.2.3", STRANGE_VTEP + "/32"]


def raw_records(r: Rig, prefix: str) -> dict[str, bytes]:
    out = r.etcd.ctl("get", f"{r.etcd_prefix}/{prefix}", "--prefix", "-w", "json")
    return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"])
            for kv in json.loads(out).get("kvs", [])}


def put(r: Rig, key: str, value: bytes) -> None:
    sh("etcdctl", f"--endpoints={r.etcd.local_url}", "put", key, input=value.decode(errors="replace"))


def kernel_view(h) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """What an attack could change on a host: its nftables tables, namespaces, and every peer entry."""
    script = (f'for p in {h.state_dir}/netns/pyo-*; do [ -e "$p" ] && nsenter --net="$p" sh -c '
              f'"bridge fdb show dev vxlan0; ip neigh show dev vxlan0"; done; true')
    peers = sh("nsenter", "-t", str(h._holder_pid()), "-m", "--", "sh", "-c", script, check=False).stdout
    return {"nft": h.ns("nft", "list", "tables").stdout, "netns": " ".join(sorted(
        p.name for p in (h.state_dir / "netns").glob("*"))), "peers": peers}


def invalid_count(h) -> float:  # type: ignore[no-untyped-def]
    return sum(v for k, v in h.metrics().items() if k.startswith("pyoverlay_invalid_records_total"))


def test_hostile_records_run_nothing_and_redirect_nothing(rig2: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h1, h2 = rig2.hosts
    MARKER.unlink(missing_ok=True)
    shared(rig2, cleanup, "tr", "--subnet", "10.60.0.0/24")
    ip1 = start(h1, cleanup, "tr-1", "tr", "10.60.0.11")
    ip2 = start(h2, cleanup, "tr-2", "tr", "10.60.0.12")
    wait_for("cross-host", lambda: ping(h1, "tr-1", ip2, check=False).returncode == 0, timeout=15)
    before = kernel_view(h1)
    assert "10.99.0.2" in before["peers"]
    counted = invalid_count(h1)

    originals = {**raw_records(rig2, "endpoints/"), **raw_records(rig2, "networks/"),
                 **raw_records(rig2, "aliases/")}
    ep_key = next(k for k, v in originals.items() if "/endpoints/" in k and json.loads(v)["host"] == "h2")
    tried = 0
    # Copies of real records with a hostile value in each string field (their MACs kept).
    for key, raw in originals.items():
        body = json.loads(raw)
        for field, value in list(body.items()):
            if not isinstance(value, str) or field == "auth":
                continue
            for bad in hostile_values():
                put(rig2, key, json.dumps({**body, field: bad}).encode())
                tried += 1
        put(rig2, key, raw)  # the genuine record back (same counter: accepted again)
    # New records: a plausible endpoint towards a stranger's VTEP, unsigned and with a forged MAC; a network
    # definition asking every host for an encrypted network; a host that is not one.
    forged_ep = {**json.loads(originals[ep_key]), "endpoint_id": "f" * 64, "address": "10.60.0.99/24",
                 "mac": "02:42:0a:3c:00:63", "vtep": STRANGE_VTEP}
    forged_ep.pop("auth", None)
    nkey = forged_ep["network_key"]
    put(rig2, f"{rig2.etcd_prefix}/endpoints/{nkey}/{'f' * 64}", json.dumps(forged_ep).encode())
    forged_ep["auth"] = {"writer": "h2", "counter": time.time_ns(), "mac": "0" * 64}
    forged_ep["endpoint_id"] = "e" * 64
    put(rig2, f"{rig2.etcd_prefix}/endpoints/{nkey}/{'e' * 64}", json.dumps(forged_ep).encode())
    netdef = {"name": "pwn", "uid": "u" * 32, "origin_host": "h2", "origin_id": "d" * 64,
              "options": {"encrypted": ""}, "pools": [{"subnet": "10.66.0.0/24"}]}
    put(rig2, f"{rig2.etcd_prefix}/netdefs/pwn", json.dumps(netdef).encode())
    host = {"host": "h9", "vtep": STRANGE_VTEP, "port": 4800, "version": "0.1.0", "started": 1.0}
    put(rig2, f"{rig2.etcd_prefix}/hosts/h9", json.dumps(host).encode())
    tried += 4

    wait_for("refusals counted", lambda: invalid_count(h1) - counted >= tried // 3, timeout=60)
    refused = invalid_count(h1) - counted
    finding = next(f for f in h1.cli_json("doctor") if f["check"] == "etcd records")
    assert finding["status"] == "warn" and "invalid records ignored" in finding["detail"]
    # Nothing ran, nothing appeared, nothing was redirected; the plugin serves and traffic flows.
    assert not MARKER.exists()
    after = kernel_view(h1)
    assert after["nft"] == before["nft"] and after["netns"] == before["netns"]
    assert STRANGE_VTEP not in after["peers"] and "10.60.0.99" not in after["peers"]
    ping(h1, "tr-1", ip2, count=3)
    ping(h2, "tr-2", ip1, count=3)
    assert "pwn" not in h1.docker("network", "ls", "--format", "{{.Name}}").stdout
    start(h1, cleanup, "tr-3", "tr")
    print(f"hostile records: {tried} written, {refused:.0f} refusals counted on h1, kernel unchanged")
    for key in (f"endpoints/{nkey}/{'f' * 64}", f"endpoints/{nkey}/{'e' * 64}", "netdefs/pwn", "hosts/h9"):
        rig2.etcd.ctl("del", f"{rig2.etcd_prefix}/{key}")


def test_replayed_records_are_refused(rig2: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h1, h2 = rig2.hosts
    shared(rig2, cleanup, "rp", "--subnet", "10.62.0.0/24")
    start(h1, cleanup, "rp-1", "rp", "10.62.0.11")
    ip2 = start(h2, cleanup, "rp-2", "rp", "10.62.0.12")
    wait_for("cross-host", lambda: ping(h1, "rp-1", ip2, check=False).returncode == 0, timeout=15)
    saved = {k: v for k, v in raw_records(rig2, "endpoints/").items() if b"10.62.0.12" in v}
    assert len(saved) == 1
    (key, raw), = saved.items()
    h2.docker("rm", "-f", "rp-2")
    wait_for("peer removed", lambda: "10.62.0.12" not in kernel_view(h1)["peers"], timeout=15)
    put(rig2, key, raw)  # the last valid record of a container that is gone
    wait_for("replay refused", lambda: "a replay" in h1.plugin_log(), timeout=30)
    time.sleep(1)  # a programming pass would have run by now
    assert "10.62.0.12" not in kernel_view(h1)["peers"]
    rig2.etcd.ctl("del", key)


def test_a_local_user_cannot_use_the_socket(rig2: Rig) -> None:
    h1 = rig2.hosts[0]
    sock = h1.plugin_sock
    mode = sock.stat().st_mode & 0o777
    assert mode == 0o660, oct(mode)
    assert (h1.state_dir.stat().st_mode & 0o777) == 0o700
    assert (h1.state_dir / "state.json").stat().st_mode & 0o777 == 0o600
    for key in (h1.state_dir / "keys").glob("*.key"):
        assert key.stat().st_mode & 0o777 == 0o600
    # Open the way to the socket (the rig's directories are root's) so only the socket's own mode decides.
    opened = [p for p in (rig2.workdir, h1.dir, sock.parent)]
    saved = {p: p.stat().st_mode & 0o777 for p in opened}
    try:
        for p in opened:
            os.chmod(p, 0o755)
        assert connect_as_nobody(sock) == "PermissionError"
        # root still can
        assert call(sock, "Plugin.Activate")[0] == 200
    finally:
        for p, m in saved.items():
            os.chmod(p, m)


def test_oversized_requests_are_refused(rig2: Rig) -> None:
    sock = rig2.hosts[0].plugin_sock
    status, body = call(sock, "IpamDriver.RequestPool", raw=b'{"Pool": "' + b"1" * (2 << 20) + b'"}')
    assert status != 200 and "at most" in body["Err"]
    assert call(sock, "IpamDriver.GetCapabilities")[0] == 200


def test_ip_of_an_aux_address_is_refused(rig2: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h1 = rig2.hosts[0]
    shared(rig2, cleanup, "ax", "--subnet", "10.63.0.0/24", "--aux-address", "r=10.63.0.5")
    for attempt in range(2):
        name = f"ax-{attempt}"
        cleanup.container(h1, name)
        res = h1.docker("run", "-d", "--name", name, "--network", "ax", "--ip", "10.63.0.5", "bb:local", "sleep",
                        "100", check=False)
        assert res.returncode != 0 and "reserved by the network" in res.stderr, res.stderr


def _plugin_threads(h) -> int:  # type: ignore[no-untyped-def]
    """Threads of the plugin's processes (gunicorn master and worker)."""
    pids = [h.plugin.pid] + [int(p) for p in sh("pgrep", "-P", str(h.plugin.pid), check=False).stdout.split()]
    return sum(len(os.listdir(f"/proc/{p}/task")) for p in pids if os.path.exists(f"/proc/{p}"))


FLOOD = r"""
import os, random, socket, string, struct, sys, time
gw, seconds = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
sent, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    name = "".join(random.choices(string.ascii_lowercase, k=12)) + ".example"
    q = struct.pack("!HHHHHH", random.getrandbits(16), 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
    try:
        s.sendto(q, (gw, 53)); sent += 1
    except BlockingIOError:
        pass
    try:
        while True: s.recv(4096)
    except BlockingIOError:
        pass
print(sent)
"""


def test_a_dns_flood_stays_bounded(rig2: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h1, h2 = rig2.hosts
    shared(rig2, cleanup, "fl", "--subnet", "10.64.0.0/24")
    start(h1, cleanup, "fl-1", "fl", "10.64.0.11")
    start(h2, cleanup, "fl-name", "fl", "10.64.0.12")
    wait_for("name served", lambda: "10.64.0.12" in h1.exec("fl-1", "nslookup", "fl-name", "10.64.0.1",
                                                               check=False).stdout, timeout=20)
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # an upstream that never answers: worst case
    blackhole.bind((UPSTREAM, 53))
    baseline = _plugin_threads(h1)
    pid = h1.docker("inspect", "-f", "{{.State.Pid}}", "fl-1").stdout.strip()
    flood = subprocess.Popen(["nsenter", "-t", pid, "-n", "python3", "-c", FLOOD, "10.64.0.1", "10"],
                             stdout=subprocess.PIPE, text=True)
    peak, stop = [baseline], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(_plugin_threads(h1))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        time.sleep(2)
        began = time.monotonic()
        start(h1, cleanup, "fl-during", "fl")   # docker run works during the flood
        run_seconds = time.monotonic() - began
        # the network's own names keep answering during the flood
        during = h1.exec("fl-during", "nslookup", "fl-name", "10.64.0.1", check=False).stdout
        sent = int(flood.communicate(timeout=60)[0].strip() or 0)
    finally:
        stop.set()
        sampler.join()
        blackhole.close()
        if flood.poll() is None:
            flood.kill()
    dropped = sum(v for k, v in h1.metrics().items() if k.startswith("pyoverlay_dns_dropped_total"))
    print(f"DNS flood: {sent} queries in 10 s; plugin threads {baseline} -> peak {max(peak)}; "
          f"{dropped:.0f} dropped; docker run during the flood took {run_seconds:.1f} s")
    assert sent > 1000
    assert max(peak) <= baseline + 40, (baseline, max(peak))
    assert "10.64.0.12" in during
    wait_for("DNS after the flood", lambda: "10.64.0.12" in h1.exec("fl-1", "nslookup", "fl-name", "10.64.0.1",
                                                                     check=False).stdout, timeout=30)
