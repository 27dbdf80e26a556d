"""End to end on one real dockerd (in a network namespace of its own) with pyoverlay as a legacy plugin."""

from __future__ import annotations

import ipaddress
import signal
import time

import pytest

from tests.plugin_client import call
from tests.rig import Rig, sh, wait_for

pytestmark = pytest.mark.docker

PY = ("-d", "pyoverlay", "--ipam-driver", "pyoverlay")


def create(host, cleanup, name: str, *args: str) -> str:  # type: ignore[no-untyped-def]
    cleanup.network(host, name)
    host.docker("network", "create", *PY, *args, name)
    return name


def run(host, cleanup, name: str, net: str, *args: str, ip: str | None = None) -> str:  # type: ignore[no-untyped-def]
    cleanup.container(host, name)
    host.run(name, net, *args, ip=ip)
    return name


def pid_of(host, container: str) -> str:  # type: ignore[no-untyped-def]
    return host.docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip()


def ping(host, container: str, target: str, count: int = 1, check: bool = True):  # type: ignore[no-untyped-def]
    return host.exec(container, "ping", "-c", str(count), "-W", "2", target, check=check)


def df_ping(host, container: str, target: str, size: int):  # type: ignore[no-untyped-def]
    """iputils ping with Don't-Fragment, run in the container's network namespace."""
    return sh("nsenter", "-t", pid_of(host, container), "-n", "ping", "-M", "do", "-s", str(size), "-c", "1",
              "-W", "2", target, check=False)


def test_network_with_subnet_two_containers_ping_by_ip_and_name(rig1: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h = rig1.hosts[0]
    net = create(h, cleanup, "n-basic", "--subnet", "10.20.0.0/24")
    run(h, cleanup, "basic-a", net)
    run(h, cleanup, "basic-b", net)
    ip_b = h.ip_of("basic-b", net)
    assert ipaddress.ip_address(ip_b) in ipaddress.ip_network("10.20.0.0/24")
    ping(h, "basic-a", ip_b)
    out = ping(h, "basic-a", "basic-b").stdout
    assert ip_b in out
    # The MAC follows the IP (02:42 + the address), as Docker's overlay does.
    mac = h.docker("inspect", "-f", '{{(index .NetworkSettings.Networks "n-basic").MacAddress}}', "basic-b").stdout
    assert mac.strip() == "02:42:" + ":".join(f"{int(o):02x}" for o in ip_b.split("."))


def test_mtu_and_largest_df_ping(rig1: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h = rig1.hosts[0]
    net = create(h, cleanup, "n-mtu", "--subnet", "10.21.0.0/24")
    run(h, cleanup, "mtu-a", net)
    run(h, cleanup, "mtu-b", net)
    mtu = int(h.exec("mtu-a", "cat", "/sys/class/net/eth0/mtu").stdout)
    assert mtu == 1400 - 50  # underlay MTU minus VXLAN overhead
    target = h.ip_of("mtu-b", net)
    largest = mtu - 28  # IPv4 + ICMP headers
    ok = df_ping(h, "mtu-a", target, largest)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    too_big = df_ping(h, "mtu-a", target, largest + 1)
    assert too_big.returncode != 0
    assert "message too long" in (too_big.stdout + too_big.stderr).lower()


def test_mtu_option_overrides(rig1: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h = rig1.hosts[0]
    net = create(h, cleanup, "n-mtu2", "--subnet", "10.22.0.0/24", "-o", "com.docker.network.driver.mtu=1200")
    run(h, cleanup, "mtu2-a", net)
    assert h.exec("mtu2-a", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1200"


def test_network_without_subnet_avoids_host_routes(rig1: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h = rig1.hosts[0]
    # A route of the host inside the default range: the automatic choice must skip it.
    h.ns("ip", "route", "add", "10.128.0.0/24", "dev", "lo")
    try:
        net = create(h, cleanup, "n-auto")
        net2 = create(h, cleanup, "n-auto2")
        subnet = h.docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}", net).stdout.strip()
        subnet2 = h.docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}", net2).stdout.strip()
    finally:
        h.ns("ip", "route", "del", "10.128.0.0/24", "dev", "lo", check=False)
    a, b = ipaddress.ip_network(subnet), ipaddress.ip_network(subnet2)
    assert a.subnet_of(ipaddress.ip_network("10.128.0.0/9")) and a.prefixlen == 24
    assert not a.overlaps(ipaddress.ip_network("10.128.0.0/24"))
    assert not a.overlaps(b)
    run(h, cleanup, "auto-a", net)
    assert ipaddress.ip_address(h.ip_of("auto-a", net)) in a


def test_ip_range_gateway_aux_and_static_ip(rig1: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h = rig1.hosts[0]
    net = create(h, cleanup, "n-ranges", "--subnet", "10.23.0.0/24", "--ip-range", "10.23.0.128/29",
                 "--gateway", "10.23.0.254", "--aux-address", "reserved=10.23.0.129")
    gw = h.docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", net).stdout.strip()
    assert gw == "10.23.0.254"
    names = [run(h, cleanup, f"range-{i}", net) for i in range(3)]
    ips = {h.ip_of(n, net) for n in names}
    assert len(ips) == 3
    for ip in ips:
        assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.23.0.128/29")
        assert ip not in ("10.23.0.129", "10.23.0.254")
    run(h, cleanup, "range-static", net, ip="10.23.0.10")
    assert h.ip_of("range-static", net) == "10.23.0.10"
    # The same address twice: refused with a clear error naming the holder.
    cleanup.container(h, "range-dup")
    dup = h.docker("run", "-d", "--name", "range-dup", "--network", net, "--ip", "10.23.0.10", "bb:local",
                   "sleep", "1000", check=False)
    assert dup.returncode != 0
    assert "10.23.0.10 is already in use" in dup.stderr


def test_egress_through_docker_gwbridge_and_internal_has_none(rig1: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h = rig1.hosts[0]
    outside = "10.99.0.254"  # the underlay namespace: another namespace, reachable only through NAT
    net = create(h, cleanup, "n-egress", "--subnet", "10.24.0.0/24")
    run(h, cleanup, "egress-a", net)
    ping(h, "egress-a", outside)
    internal = create(h, cleanup, "n-internal", "--internal", "--subnet", "10.25.0.0/24")
    run(h, cleanup, "internal-a", internal)
    run(h, cleanup, "internal-b", internal)
    assert ping(h, "internal-a", outside, check=False).returncode != 0
    ping(h, "internal-a", h.ip_of("internal-b", internal))  # but the network itself works


def test_networks_are_isolated(rig1: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h = rig1.hosts[0]
    n1 = create(h, cleanup, "n-iso1", "--subnet", "10.26.0.0/24")
    n2 = create(h, cleanup, "n-iso2", "--subnet", "10.27.0.0/24")
    run(h, cleanup, "iso-a", n1)
    run(h, cleanup, "iso-a2", n1)
    run(h, cleanup, "iso-b", n2)
    ping(h, "iso-a", h.ip_of("iso-a2", n1))
    assert ping(h, "iso-a", h.ip_of("iso-b", n2), check=False).returncode != 0
    assert ping(h, "iso-b", h.ip_of("iso-a", n1), check=False).returncode != 0


def _etcd_keys_about(rig: Rig, *needles: str) -> list[str]:
    return [k for k in rig.etcd.keys(rig.etcd_prefix) if any(n in k for n in needles)]


def test_rm_releases_address_and_network_rm_leaves_nothing(rig1: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h = rig1.hosts[0]
    net = create(h, cleanup, "n-rm", "--subnet", "10.28.0.0/24")
    run(h, cleanup, "rm-a", net)
    ip = h.ip_of("rm-a", net)
    assert _etcd_keys_about(rig1, f"/{ip}")
    h.docker("rm", "-f", "rm-a")
    assert not _etcd_keys_about(rig1, f"/{ip}"), "docker rm -f must release the address"
    vni = rig1.etcd.get_json(f"{rig1.etcd_prefix}/networks/10.28.0.0_24")["vni"]
    h.docker("network", "rm", net)
    assert _etcd_keys_about(rig1, "10.28.0.0", f"/vnis/{vni}") == []
    assert not (h.state_dir / "netns" / f"pyo-{vni:06x}").exists()
    links = h.ns("ip", "-o", "link").stdout
    assert "pyo" not in links
    mounts = sh("cat", f"/proc/{h._holder_pid()}/mountinfo").stdout
    assert f"pyo-{vni:06x}" not in mounts


def test_plugin_sigkill_and_restart_keeps_connectivity(rig1: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    h = rig1.hosts[0]
    net = create(h, cleanup, "n-restart", "--subnet", "10.29.0.0/24")
    run(h, cleanup, "restart-a", net)
    run(h, cleanup, "restart-b", net)
    target = h.ip_of("restart-b", net)
    ping(h, "restart-a", target)
    h.kill_plugin(signal.SIGKILL)
    ping(h, "restart-a", target)  # the data path is the kernel's: it does not need the plugin
    h.start_plugin()
    ping(h, "restart-a", target)
    run(h, cleanup, "restart-c", net)  # Docker does not resend CreateNetwork: the plugin must remember
    ping(h, "restart-c", target)
    ping(h, "restart-c", "restart-a")
    assert h.ip_of("restart-c", net) not in (target, h.ip_of("restart-a", net))


def test_socket_listens_quickly_after_start(rig1: Rig) -> None:
    h = rig1.hosts[0]
    h.kill_plugin(signal.SIGKILL)
    start = time.monotonic()
    h.start_plugin()
    status, body = wait_for("Activate", lambda: call(h.plugin_sock, "Plugin.Activate"), timeout=10)
    print(f"socket answered {time.monotonic() - start:.2f}s after start")
    assert status == 200 and body == {"Implements": ["NetworkDriver", "IpamDriver"]}


def test_vxlan_port_taken_gives_a_clear_error_and_leaves_nothing(rig1: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    """Swarm's overlay holds UDP 4789 with a VXLAN device of its own: pyoverlay told to use that port
    must say so, not fail silently, and leave no network behind."""
    h = rig1.hosts[0]
    h.ns("ip", "link", "add", "swarmvx", "type", "vxlan", "id", "4097", "dstport", "4789", "local", h.ip)
    h.ns("ip", "link", "set", "swarmvx", "up")  # the UDP socket exists once the device is up
    try:
        h.kill_plugin(signal.SIGTERM)
        h.start_plugin(PYOVERLAY_VXLAN_PORT="4789")
        cleanup.network(h, "n-port")
        res = h.docker("network", "create", *PY, "--subnet", "10.30.0.0/24", "n-port", check=False)
        assert res.returncode != 0
        assert "VXLAN port 4789 is already in use" in res.stderr and "PYOVERLAY_VXLAN_PORT" in res.stderr
        assert _etcd_keys_about(rig1, "10.30.0.0") == []
        assert not list((h.state_dir / "netns").glob("pyo-*"))
        assert "pyovx" not in h.ns("ip", "-o", "link").stdout
    finally:
        h.ns("ip", "link", "del", "swarmvx", check=False)
        h.kill_plugin(signal.SIGTERM)
        h.start_plugin(PYOVERLAY_VXLAN_PORT="4800")


def test_encrypted_on_a_kernel_without_esp_fails_clearly_and_leaves_nothing(rig1: Rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    """This machine's own kernel has no ESP and no AES-GCM: --opt encrypted must say so and set up
    nothing (no etcd record, no namespace, no VXLAN device, no half-made firewall)."""
    h = rig1.hosts[0]
    from plugin.kernel.ipsec import missing_features

    if not missing_features():
        pytest.skip("this kernel has ESP; the IPsec tests (make test-ipsec) cover it")
    cleanup.network(h, "n-enc")
    res = h.docker("network", "create", *PY, "--opt", "encrypted", "--subnet", "10.31.0.0/24", "n-enc", check=False)
    assert res.returncode != 0
    assert "lacks ESP" in res.stderr and "AES-GCM" in res.stderr and "No network was created" in res.stderr
    assert _etcd_keys_about(rig1, "10.31.0.0") == []
    assert not list((h.state_dir / "netns").glob("pyo-*"))
    assert "pyovx" not in h.ns("ip", "-o", "link").stdout
    assert "table ip pyoverlay\n" not in h.ns("nft", "list", "tables").stdout, "no half-made encryption guard"
    assert "pyoverlay" not in h.ns("ip", "xfrm", "state").stdout
