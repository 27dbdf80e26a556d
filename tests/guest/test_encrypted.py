"""--opt encrypted end to end: runs inside a user-mode-linux guest (its kernel has ESP and AES-GCM).

Started by tests/test_ipsec.py (part of `make test`) or `make test-ipsec`, never collected on the host.
Two simulated Docker hosts (tests/rig.py) share an encrypted and a clear network; the underlay is watched
with tcpdump, forged clear-text VXLAN is injected from it, keys rotate every few seconds meanwhile.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from plugin.kernel.vtepfilter import NftBackend
from tests.rig import SLOW, Rig, cleanup_stale, sh, wait_for
from tests.uml import host_cpu_hog

PY = ("-d", "pyoverlay", "--ipam-driver", "pyoverlay")
CLEAR_PORT, ESP_PORT = 4800, 4801   # PYOVERLAY_VXLAN_PORT and PYOVERLAY_ESP_PORT (defaults)
ROTATION = 10
SECRET = "guest-test-secret"


@pytest.fixture(scope="module")
def rig2() -> Iterator[Rig]:
    cleanup_stale()
    rig = Rig()
    try:
        rig.up(2, plugin=False)
        for h in rig.hosts:
            h.start_plugin(PYOVERLAY_KEY_ROTATION=str(ROTATION), PYOVERLAY_CLUSTER_SECRET=SECRET,
                           PYOVERLAY_LEASE_TTL="20", PYOVERLAY_RECONCILE_INTERVAL="15")
        for h in rig.hosts:
            h.wait_ready()
        for h in rig.hosts:
            h.docker("network", "create", *PY, "--opt", "encrypted", "--subnet", "10.50.0.0/24", "enc")
            h.docker("network", "create", *PY, "--subnet", "10.51.0.0/24", "clr")
            h.run(f"e-{h.name}", "enc")
            h.run(f"c-{h.name}", "clr")
        yield rig
    finally:
        for h in rig.hosts:
            print(f"--- {h.name} plugin log (tail)\n" + "\n".join(h.plugin_log().splitlines()[-40:]))
        rig.down()


def pid_of(h, name: str) -> str:  # type: ignore[no-untyped-def]
    return h.docker("inspect", "-f", "{{.State.Pid}}", name).stdout.strip()


def in_container(h, name: str, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """A host tool (iputils ping, tcpdump) inside a container's network namespace."""
    return sh("nsenter", "-t", pid_of(h, name), "-n", *cmd, check=False, timeout=timeout)


def vni(rig: Rig, subnet_key: str) -> int:
    return int(rig.etcd.get_json(f"{rig.etcd_prefix}/networks/{subnet_key}")["vni"])  # type: ignore[index]


def reachable(rig: Rig, net: str) -> str:
    h1, h2 = rig.hosts
    target = h2.ip_of(f"{net[0]}-h2", net)
    wait_for(f"{net} h1->h2", lambda: in_container(h1, f"{net[0]}-h1", "ping", "-c1", "-W1", target).returncode == 0,
             timeout=60 * SLOW, interval=0.5)
    return target


class Capture:
    """tcpdump on the underlay bridge, read back as text."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.file = rig.workdir / f"ul-{time.monotonic_ns()}.pcap"
        self.proc = subprocess.Popen(["ip", "netns", "exec", rig.underlay_ns, "tcpdump", "-i", "br0", "-U", "-w",
                                      str(self.file), "udp or esp"], stderr=subprocess.DEVNULL)
        time.sleep(2)

    def stop(self) -> tuple[int, dict[int, int]]:
        """(ESP packets, VXLAN packets per VNI)."""
        time.sleep(1)
        self.proc.terminate()
        self.proc.wait()
        esp = sh("tcpdump", "-nn", "-r", str(self.file), "esp", check=False).stdout.count("ESP(")
        per_vni: dict[int, int] = {}
        ports = f"udp port {CLEAR_PORT} or udp port {ESP_PORT}"
        text = sh("tcpdump", "-nn", "-T", "vxlan", "-r", str(self.file), ports, check=False).stdout
        for m in re.finditer(r"vni (\d+)", text):
            per_vni[int(m.group(1))] = per_vni.get(int(m.group(1)), 0) + 1
        return esp, per_vni


def test_encrypted_traffic_is_only_esp_on_the_wire(rig2: Rig) -> None:
    h1, h2 = rig2.hosts
    enc_vni, clr_vni = vni(rig2, "10.50.0.0_24"), vni(rig2, "10.51.0.0_24")
    enc_target, clr_target = reachable(rig2, "enc"), reachable(rig2, "clr")
    mtu = h1.exec("e-h1", "cat", "/sys/class/net/eth0/mtu").stdout.strip()
    assert int(mtu) == 1400 - 50 - 40, "the MTU accounts for VXLAN and ESP"
    # The form the guest kernel allows: nftables where it has the ip family (user-mode-linux 7.x), else
    # ipset + iptables (6.1).
    expected = "nftables" if NftBackend.usable([4789], "ip") else "ipset+iptables"
    for h in rig2.hosts:
        wait_for(f"VTEP filter on {h.name}", lambda h=h: h.cli_json("status")["vtep_filter"]["present"],
                 timeout=60 * SLOW)
        vf = h.cli_json("status")["vtep_filter"]
        assert vf["vteps"] == [x.ip for x in rig2.hosts] and vf["backend"].startswith(expected), vf
    cap = Capture(rig2)
    # 10 MB over TCP on the encrypted network, checksummed at both ends, plus pings on both networks.
    h2.exec("e-h2", "sh", "-c", "mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/data bs=65536 count=160")
    h2.docker("exec", "-d", "e-h2", "httpd", "-f", "-p", "8080", "-h", "/tmp/www")
    sent = h2.exec("e-h2", "md5sum", "/tmp/www/data").stdout.split()[0]
    wait_for("transfer", lambda: h1.exec("e-h1", "wget", "-q", "-O", "/tmp/got", f"http://{enc_target}:8080/data",
                                         check=False, timeout=300).returncode == 0, timeout=300 * SLOW, interval=1)
    assert h1.exec("e-h1", "md5sum", "/tmp/got").stdout.split()[0] == sent
    assert in_container(h1, "e-h1", "ping", "-c", "5", "-i", "0.2", enc_target).returncode == 0
    assert in_container(h1, "c-h1", "ping", "-c", "10", "-i", "0.2", clr_target).returncode == 0
    esp, per_vni = cap.stop()
    print(f"underlay: {esp} ESP packets, VXLAN per VNI {per_vni} (encrypted VNI {enc_vni}, clear {clr_vni})")
    assert esp > 1000, "the 10 MB transfer travelled as ESP"
    assert per_vni.get(enc_vni, 0) == 0, "no clear-text VXLAN with the encrypted VNI, ever"
    assert per_vni.get(clr_vni, 0) >= 10, "the unencrypted network still shows clear VXLAN"


def _forged_vxlan(vni_: int, dst_mac: str, dst_ip: str, port: int, payload: bytes) -> bytes:
    def csum(data: bytes) -> int:
        s = sum(struct.unpack(f"!{len(data) // 2}H", data + b"\0" * (len(data) % 2)))
        s = (s >> 16) + (s & 0xFFFF)
        return ~(s + (s >> 16)) & 0xFFFF

    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton("10.50.0.200"), socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex("02badbadbad0") + b"\x08\x00"
    return struct.pack("!II", 0x08000000, vni_ << 8) + eth + ip + udp


def test_forged_clear_vxlan_with_the_encrypted_vni_never_arrives(rig2: Rig) -> None:
    """Forged VXLAN from the underlay: with a registered VTEP's address (h1's, spoofed) the encryption guard
    drops it on the encrypted network; from an address no host registered, the VTEP filter drops it."""
    h1, h2 = rig2.hosts
    reachable(rig2, "enc")
    reachable(rig2, "clr")
    strangers_before = h2.cli_json("status")["vtep_filter"]["dropped"]
    results = {}
    for net, key, src in (("enc", "10.50.0.0_24", h1.ip), ("clr", "10.51.0.0_24", h1.ip),
                          ("clr", "10.51.0.0_24", "")):
        name = f"{net[0]}-h2"
        target_ip = h2.ip_of(name, net)
        mac = h2.docker("inspect", "-f", '{{(index .NetworkSettings.Networks "' + net + '").MacAddress}}',
                        name).stdout.strip()
        dump = subprocess.Popen(["nsenter", "-t", pid_of(h2, name), "-n", "tcpdump", "-nn", "-l", "-i", "eth0",
                                 "udp port 9999"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(2)
        frame = _forged_vxlan(vni(rig2, key), mac, target_ip, 9999, b"forged")
        port = ESP_PORT if net == "enc" else CLEAR_PORT  # where each network's VXLAN listens
        # IP_TRANSPARENT (19) lets the underlay send with h1's address as the source
        script = ("import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); src=sys.argv[2]\n"
                  "if src: s.setsockopt(socket.SOL_IP, 19, 1); s.bind((src, 0))\n"
                  f"[s.sendto(bytes.fromhex(sys.argv[1]), ('{h2.ip}', {port})) for _ in range(5)]")
        sh("ip", "netns", "exec", rig2.underlay_ns, "python3", "-c", script, frame.hex(), src)
        time.sleep(2)
        dump.terminate()
        out, _ = dump.communicate()
        results[f"{net} from {src or 'a stranger'}"] = out.count("9999")
    strangers = h2.cli_json("status")["vtep_filter"]["dropped"] - strangers_before
    print(f"forged datagrams seen inside the containers: {results}; dropped by the VTEP filter: {strangers}")
    assert results[f"clr from {h1.ip}"] >= 1, "the injection works (the clear network delivers it)"
    assert results[f"enc from {h1.ip}"] == 0, "clear-text VXLAN with the encrypted VNI is dropped"
    assert results["clr from a stranger"] == 0 and strangers >= 5, "VXLAN from an unregistered VTEP is dropped"
    counters = sh("ip", "netns", "exec", h2.netns, sys.executable, "-c",
                  "from plugin.kernel.ipsec import IPsec; print(IPsec().guard_counters()['in'])").stdout
    assert int(counters.strip()) >= 5, "the guard counted the forged datagrams"


def _ping_and_transfer(h1, target: str, sent: str, seconds: int) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    """A 0.1 s ping and back-to-back 5 MB transfers (each checksummed) for that long: (ping output, transfers)."""
    pinger = subprocess.Popen(["nsenter", "-t", pid_of(h1, "e-h1"), "-n", "ping", "-D", "-O", "-i", "0.1", "-c",
                               str(seconds * 10), target], stdout=subprocess.PIPE, text=True)
    transfers = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        res = h1.exec("e-h1", "sh", "-c", f"wget -q -O /tmp/big http://{target}:8081/big && md5sum /tmp/big",
                      check=False, timeout=300)
        assert res.returncode == 0 and res.stdout.split()[0] == sent, f"transfer {transfers}: {res.stderr}"
        transfers += 1
    out, _ = pinger.communicate(timeout=seconds + 120)
    return out, transfers


def test_rotation_under_ping_and_tcp_loses_nothing(rig2: Rig) -> None:
    h1, h2 = rig2.hosts
    target = reachable(rig2, "enc")

    def epochs() -> list[int]:
        # A host's record may be missing for a moment (a lease lapsing in the slow guest; it costs no traffic):
        # read it once it is there.
        recs = [wait_for(f"{h.name}'s record", lambda h=h: rig2.etcd.get_json(f"{rig2.etcd_prefix}/hosts/{h.name}"),
                         timeout=30 * SLOW) for h in rig2.hosts]
        return [int(r["key_epoch"]) for r in recs]

    before = epochs()
    h2.exec("e-h2", "sh", "-c", "mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/big bs=65536 count=80")
    h2.docker("exec", "-d", "e-h2", "httpd", "-f", "-p", "8081", "-h", "/tmp/www")
    sent = h2.exec("e-h2", "md5sum", "/tmp/www/big").stdout.split()[0]
    seconds = ROTATION * 4
    with host_cpu_hog() as hogs:
        print(f"{hogs} busy loops on the host's {hogs} cores while keys rotate every {ROTATION} s")
        out, transfers = _ping_and_transfer(h1, target, sent, seconds)
    after = epochs()
    for h in rig2.hosts:
        stats = sh("ip", "netns", "exec", h.netns, "cat", "/proc/net/xfrm_stat").stdout.split()
        print(h.name, "xfrm errors:", {k: v for k, v in zip(stats[::2], stats[1::2], strict=True) if v != "0"})
    print("unanswered:", "\n".join(line for line in out.splitlines() if "no answer" in line)[:3000])
    print(f"epochs {before} -> {after}; {transfers} transfers of 5 MB intact; ping: {out.strip().splitlines()[-2]}")
    assert all(a >= b + 2 for a, b in zip(after, before, strict=True)), "both hosts rotated at least twice"
    if not re.search(r" 0% packet loss", out):
        for h in rig2.hosts:
            print(f"--- {h.name} key and SA log\n" + "\n".join(
                line for line in h.plugin_log().splitlines() if re.search(r"sending to|removed|key pair|IPsec", line)))
    assert re.search(r" 0% packet loss", out), out.strip().splitlines()[-2]


def test_etcd_holds_no_key_material(rig2: Rig) -> None:
    reachable(rig2, "enc")
    values = rig2.etcd.ctl("get", "--prefix", "")
    keys = set()
    for h in rig2.hosts:
        text = sh("ip", "netns", "exec", h.netns, "ip", "xfrm", "state").stdout
        keys |= {k[2:] for k in re.findall(r"aead \S+ (0x[0-9a-f]+)", text)}
        for f in (h.state_dir / "keys").glob("x25519-*.key"):
            raw = f.read_bytes()
            keys |= {raw.hex(), base64.b64encode(raw).decode()}
    assert len(keys) >= 8
    for k in keys:
        assert k not in values.lower() and k[:16] not in values.lower(), "an SA or private key is in etcd"
    assert "public_keys" in values


def test_substituted_public_key_is_refused(rig2: Rig) -> None:
    h1, h2 = rig2.hosts
    target = reachable(rig2, "enc")
    key = f"{rig2.etcd_prefix}/hosts/h2"
    # Someone with write access to etcd puts a record for h2 with public keys of their choosing, the old
    # authentication code kept.
    rec = rig2.etcd.get_json(key)
    assert rec is not None
    forged = dict(rec)
    forged["public_keys"] = {e: base64.b64encode(bytes(32 - i for i in range(32))).decode()
                             for e in rec["public_keys"]}
    rig2.etcd.ctl("put", key, json.dumps(forged))
    wait_for("refusal logged", lambda: "fails authentication" in h1.plugin_log(), timeout=30 * SLOW)
    # Refused whole: h1 keeps h2's last authentic record, so no SA is made from a key an attacker chose and
    # the encrypted network keeps working with the real keys.
    assert in_container(h1, "e-h1", "ping", "-c", "3", "-W", "2", target).returncode == 0
    status = json.loads(h1.cli("status", "--json", check=True).stdout)
    assert "h2" not in status["keys"]["refused"]
    # h2's plugin restarted puts its own record back (bound to a fresh lease).
    h2.kill_plugin()
    h2.start_plugin()
    reachable(rig2, "enc")


def _clear_on_esp_port(cap: Capture) -> int:
    """Datagrams to the encrypted networks' VXLAN port seen on the underlay: clear text, every one."""
    time.sleep(1)
    cap.proc.terminate()
    cap.proc.wait()
    return sh("tcpdump", "-nn", "-r", str(cap.file), f"udp port {ESP_PORT}", check=False).stdout.count(" > ")


@pytest.mark.parametrize("flush", ["firewall", "xfrm"])
def test_guard_loss_never_lets_clear_text_out(rig2: Rig, flush: str) -> None:
    """A firewall reload (iptables -F, nft flush ruleset) or an `ip xfrm policy flush` under ping and TCP:
    the other layer holds, so nothing leaves in clear text; the reconciler puts the guard back and the
    encrypted network works again."""
    h1, h2 = rig2.hosts
    target = reachable(rig2, "enc")
    h2.exec("e-h2", "sh", "-c", "mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/g bs=65536 count=16")
    h2.docker("exec", "-d", "e-h2", "httpd", "-f", "-p", "8082", "-h", "/tmp/www")
    cap = Capture(rig2)
    pinger = subprocess.Popen(["nsenter", "-t", pid_of(h1, "e-h1"), "-n", "ping", "-i", "0.1", "-c", "200", target],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(2)
    for h in rig2.hosts:  # what a firewall reload or an IKE daemon's restart does
        if flush == "firewall":
            for table in ("filter", "mangle"):
                h.ns("iptables", "-t", table, "-F", check=False)
            h.ns("nft", "flush", "ruleset", check=False)
        else:
            h.ns("ip", "xfrm", "policy", "flush")
    end = time.monotonic() + 8
    transfers = 0
    while time.monotonic() < end:   # TCP while the guard is gone and while it is repaired
        h1.exec("e-h1", "sh", "-c", f"wget -q -O /tmp/g http://{target}:8082/g", check=False, timeout=60)
        transfers += 1
    wait_for("guard repaired", lambda: "encryption guard re-installed" in h1.plugin_log()
             and "encryption guard re-installed" in h2.plugin_log(), timeout=60 * SLOW, interval=0.5)
    reachable(rig2, "enc")
    res = h1.exec("e-h1", "sh", "-c", f"wget -q -O /tmp/g http://{target}:8082/g && md5sum /tmp/g", check=False)
    assert res.returncode == 0 and res.stdout.split()[0] == h2.exec("e-h2", "md5sum", "/tmp/www/g").stdout.split()[0]
    out, _ = pinger.communicate(timeout=120)
    clear = _clear_on_esp_port(cap)
    print(f"{flush} flush under ping+TCP: {clear} clear datagrams on the encrypted port; {transfers} transfers "
          f"tried; ping: {out.strip().splitlines()[-2]}")
    assert clear == 0, "no clear-text VXLAN of the encrypted network on the underlay, ever"
    for h in rig2.hosts:
        missing = sh("ip", "netns", "exec", h.netns, sys.executable, "-c",
                     "from plugin.kernel.ipsec import IPsec; i = IPsec(); print(i.catchall_present(4801))").stdout
        assert missing.strip() == "True"
