"""pyoverlay as a managed Docker plugin (`make plugin`), installed on three simulated hosts the way a user would:
`docker plugin set` + `enable`, networks with `-d pyoverlay:latest --ipam-driver pyoverlay:latest`.

The network is created on one host and the plugins propagate it to the others; containers resolve each
other's names across hosts with no flag (daemon.json's "dns"). Then the plugin's process is killed (Docker
restarts it), the plugin is force-disabled and enabled again with networks present, and dockerd is restarted
with --live-restore: each time the existing containers keep their connectivity (no ping lost) and new
containers join.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from plugin.config import DEFAULT_DNS_ADDRESS
from tests.rig import MANAGED, Rig, cleanup_stale, sh, wait_for
from tests.test_cluster import lookup

pytestmark = pytest.mark.docker

PY = ("-d", MANAGED, "--ipam-driver", MANAGED)
NET, SUBNET = "mnet", "10.70.0.0/24"


@pytest.fixture(scope="module")
def rig3() -> Iterator[Rig]:
    cleanup_stale()
    rig = Rig(daemon={"dns": [DEFAULT_DNS_ADDRESS]})   # names with no flag per container
    try:
        rig.up(3, plugin=False)
        for h in rig.hosts:
            h.install_plugin(PYOVERLAY_LEASE_TTL="6", PYOVERLAY_PROPAGATE="true")
        # Created on h1 only: the plugins propagate it to h2 and h3.
        rig.hosts[0].docker("network", "create", *PY, "--subnet", SUBNET, NET)
        for h in rig.hosts:
            wait_for(f"{NET} on {h.name}", lambda h=h: h.docker("network", "inspect", NET, check=False)
                     .returncode == 0, timeout=30)
            h.run(f"m-{h.name}", NET)
        yield rig
    finally:
        for h in rig.hosts:
            lines = [ln for ln in h.dockerd_log().splitlines() if "plugin=" in ln]
            print(f"--- {h.name} managed plugin output (tail)\n" + "\n".join(lines[-40:]))
        rig.down()


def reach(src, name: str, target: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    wait_for(f"{name} -> {target}", lambda: src.exec(name, "ping", "-c1", "-W1", target, check=False,
                                                     timeout=10).returncode == 0, timeout=timeout, interval=0.5)


def all_pairs(rig: Rig) -> None:
    ips = {h.name: h.ip_of(f"m-{h.name}", NET) for h in rig.hosts}
    for h in rig.hosts:
        for other, ip in ips.items():
            if other != h.name:
                reach(h, f"m-{h.name}", ip)


class Pinger:
    """A continuous ping from a container on h2 to h1's container while something is done to h1."""

    def __init__(self, rig: Rig, seconds: float) -> None:
        h1, h2 = rig.hosts[:2]
        target = h1.ip_of("m-h1", NET)
        count = int(seconds / 0.2)
        self.proc = subprocess.Popen(
            [*h2.docker_cmd(), "exec", "m-h2", "ping", "-c", str(count), "-i", "0.2", "-W", "1",
             target], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def result(self) -> tuple[int, int]:
        out, _ = self.proc.communicate(timeout=300)
        m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
        assert m, out
        return int(m.group(1)), int(m.group(2))


def test_installed_on_every_host_and_hosts_connect(rig3: Rig) -> None:
    for h in rig3.hosts:
        info = h.docker("plugin", "inspect", "-f", "{{.Enabled}} {{json .Settings.Env}}", MANAGED).stdout
        assert info.startswith("true") and f"PYOVERLAY_VTEP={h.ip}" in info
        assert h.managed_pids(), f"the plugin runs on {h.name}"
        # The network's namespace is pinned in the state mount and visible on the host (rshared).
        assert list((h.managed_state / "pyoverlay" / "netns").iterdir()), "namespace pins reach the host"
        # Nothing was made by hand: the plugin created its state directory, for root only.
        assert (h.managed_state / "pyoverlay").stat().st_mode & 0o777 == 0o700
    all_pairs(rig3)
    # `pyoverlay status` / `doctor` with nothing typed find the managed plugin (docker plugin inspect).
    h1 = rig3.hosts[0]
    res = h1.cli_bare("status", "--json")
    assert res.returncode == 0 and f"the managed plugin {MANAGED}" in res.stderr, res.stderr
    st = json.loads(res.stdout)
    vni = str(st["networks"]["10.70.0.0_24"]["vni"])
    assert st["peers"][vni]["programmed"] == 2, st["peers"]
    doc = h1.cli_bare("doctor", "--json")
    findings = {f["check"]: f["status"] for f in json.loads(doc.stdout)}
    assert "plugin" not in findings and findings.get("etcd") == "ok", findings  # the plugin itself answered


def test_propagated_network_and_names_across_hosts(rig3: Rig) -> None:
    h1, h2, h3 = rig3.hosts
    for h in (h2, h3):
        labels = json.loads(h.docker("network", "inspect", "-f", "{{json .Labels}}", NET).stdout)
        assert labels.get("pyoverlay.origin") == "h1", labels
        assert len(h.docker("network", "ls", "-q", "--filter", f"name=^{NET}$").stdout.split()) == 1
    ip1 = h1.ip_of("m-h1", NET)
    wait_for("m-h1 resolves on h3", lambda: lookup(h3, "m-h3", "m-h1") == [ip1], timeout=30)
    assert lookup(h2, "m-h2", "m-h3") == [h3.ip_of("m-h3", NET)]
    assert h3.exec("m-h3", "ping", "-c1", "-W2", "m-h1", check=False).returncode == 0
    # dockerd files the plugin's stdout at info and its stderr at error: a healthy plugin logs no errors.
    plugin_lines = [ln for ln in h1.dockerd_log().splitlines() if "plugin=" in ln]
    assert any("level=info" in ln for ln in plugin_lines), plugin_lines[-5:]
    errors = [ln for ln in plugin_lines if "level=error" in ln]
    assert not errors, errors[:5]


def test_killed_plugin_is_restarted_by_docker_and_nothing_drops(rig3: Rig) -> None:
    h1 = rig3.hosts[0]
    before = set(h1.managed_pids())
    ping = Pinger(rig3, 12)
    time.sleep(2)
    for pid in before:
        with contextlib.suppress(ProcessLookupError):  # a short-lived child (nft, ip) may be gone already
            os.kill(pid, signal.SIGKILL)
    wait_for("docker restarts the plugin", lambda: set(h1.managed_pids()) - before, timeout=30)
    sent, got = ping.result()
    print(f"during the kill and restart: {got}/{sent} pings answered")
    assert got == sent, "existing containers keep connectivity while the plugin is down"
    h1.run("m-h1-new", NET)
    reach(h1, "m-h1-new", rig3.hosts[1].ip_of("m-h2", NET))
    reach(rig3.hosts[2], "m-h3", h1.ip_of("m-h1-new", NET))


def test_disable_and_enable_with_networks_present(rig3: Rig) -> None:
    h1 = rig3.hosts[0]
    ping = Pinger(rig3, 10)
    time.sleep(1)
    h1.docker("plugin", "disable", "-f", MANAGED)
    assert not h1.managed_pids()
    time.sleep(3)
    # dockerd may answer `disable -f` before containerd has deleted the plugin's container ("id already in
    # use" for a moment on a busy machine): enable once it takes it, as a user would retry.
    wait_for("plugin enabled again", lambda: h1.docker("plugin", "enable", MANAGED, check=False, timeout=60)
             .returncode == 0 or h1.docker("plugin", "inspect", "-f", "{{.Enabled}}", MANAGED,
                                           check=False).stdout.strip() == "true", timeout=60, interval=1)
    sent, got = ping.result()
    print(f"during disable -f / enable: {got}/{sent} pings answered")
    assert got == sent, "the data path outlives the plugin (namespaces pinned on the host)"
    h1.run("m-h1-after", NET)
    reach(h1, "m-h1-after", rig3.hosts[2].ip_of("m-h3", NET))
    all_pairs(rig3)


def test_dockerd_restart_with_live_restore_keeps_containers_connected(rig3: Rig) -> None:
    h1 = rig3.hosts[0]
    # Switch h1's dockerd to --live-restore (a restart without it stops the containers), then start over.
    for name in ("m-h1", "m-h1-new", "m-h1-after"):
        h1.docker("rm", "-f", name, check=False)
    h1.stop_dockerd()
    h1.start_dockerd(["--live-restore"])
    wait_for("plugin enabled after restart", lambda: h1.docker(
        "plugin", "inspect", "-f", "{{.Enabled}}", MANAGED, check=False).stdout.strip() == "true", timeout=30)
    h1.run("m-h1", NET)
    reach(rig3.hosts[1], "m-h2", h1.ip_of("m-h1", NET), timeout=60)

    ping = Pinger(rig3, 10)
    time.sleep(1)
    h1.stop_dockerd()
    assert sh("ip", "netns", "pids", h1.netns).stdout.split(), "containers keep running without dockerd"
    h1.start_dockerd(["--live-restore"])
    sent, got = ping.result()
    print(f"during a live-restore restart of dockerd: {got}/{sent} pings answered")
    assert got == sent
    assert h1.docker("inspect", "-f", "{{.State.Running}}", "m-h1").stdout.strip() == "true"
    h1.run("m-h1-live", NET)
    reach(h1, "m-h1-live", rig3.hosts[2].ip_of("m-h3", NET), timeout=60)
    all_pairs(rig3)
