"""The data path holds while the control plane wobbles: a plugin that is down or stopped for two minutes,
far longer than its lease, costs its host no traffic (three simulated hosts, real dockerd, real etcd)."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.rig import Rig, rig, wait_for
from tests.test_multi_host import everywhere, fdb_vteps, start
from tests.test_single_host import pid_of, ping

pytestmark = pytest.mark.docker
TTL = 5
DOWN = 120   # seconds the plugin stays down: 24 lease TTLs
PROGRAMMED = re.compile(r"peers: \d+ programmed, \d+ removed")


@pytest.fixture(scope="module")
def rig3() -> Iterator[Rig]:
    with rig(3, PYOVERLAY_LEASE_TTL=str(TTL)) as r:
        try:
            yield r
        finally:
            for h in r.hosts:
                print(f"--- {h.name} plugin log (tail)\n" + "\n".join(h.plugin_log().splitlines()[-40:]))


def pinger(h, container: str, target: str, seconds: float) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
    """iputils ping (0.2 s apart) from inside a container's network namespace; every reply is counted."""
    return subprocess.Popen(["nsenter", "-t", pid_of(h, container), "-n", "ping", "-i", "0.2", "-W", "1", "-c",
                             str(int(seconds * 5)), target], stdout=subprocess.PIPE, text=True)


def loss(proc: subprocess.Popen[str]) -> tuple[int, int, str]:
    out, _ = proc.communicate(timeout=DOWN + 120)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    return int(m.group(1)), int(m.group(2)), out.strip().splitlines()[-2]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_plugin_down_for_two_minutes_costs_no_traffic(rig3: Rig, cleanup, how: str) -> None:  # type: ignore[no-untyped-def]
    h1, h2, h3 = rig3.hosts
    net = f"st-{how.lower()}"
    everywhere(rig3, cleanup, net, "--subnet", "10.70.0.0/24" if how == "SIGKILL" else "10.71.0.0/24")
    start(h1, cleanup, f"{net}-1", net)
    ip2 = start(h2, cleanup, f"{net}-2", net)
    start(h3, cleanup, f"{net}-3", net)
    for h in (h1, h3):
        wait_for(f"{h.name} reaches h2", lambda h=h: ping(h, f"{net}-{h.index}", ip2, check=False).returncode == 0,
                 timeout=15)
    logs_before = {h.name: len(PROGRAMMED.findall(h.plugin_log())) for h in (h1, h3)}
    fdb_before = {h.name: fdb_vteps(h, rig3) for h in (h1, h3)}
    pings = [pinger(h, f"{net}-{h.index}", ip2, DOWN + 20) for h in (h1, h3)]
    time.sleep(5)
    pid = h2.plugin.pid if h2.plugin is not None else 0
    if how == "SIGKILL":
        h2.kill_plugin(signal.SIGKILL)
    else:
        subprocess.run(["kill", "-STOP", "--", f"-{pid}"], check=True)  # the whole process group: frozen
    time.sleep(DOWN)
    # Meanwhile h1 and h3 saw h2's lease expire (it is no live host) but kept its endpoints programmed.
    assert "h2" not in h1.cli_json("status")["live_hosts"]
    if how == "SIGKILL":
        h2.start_plugin()
    else:
        subprocess.run(["kill", "-CONT", "--", f"-{pid}"], check=True)
    wait_for("h2 live again", lambda: "h2" in h1.cli_json("status")["live_hosts"], timeout=30)
    results = [loss(p) for p in pings]
    for h, (sent, got, line) in zip((h1, h3), results, strict=True):
        print(f"{how} h2's plugin for {DOWN}s: {h.name} -> h2 {line}")
        assert sent == got, f"{h.name} lost {sent - got} of {sent} pings while h2's plugin was down"
    # Nothing was removed or re-programmed on the other hosts, then or when h2 came back.
    for h in (h1, h3):
        assert len(PROGRAMMED.findall(h.plugin_log())) == logs_before[h.name], "peers were re-programmed"
        assert fdb_vteps(h, rig3) == fdb_before[h.name]
    ping(h1, f"{net}-1", ip2)
