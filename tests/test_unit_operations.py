"""Pure logic of the operator side: doctor's findings and the reconciler's grace period."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from kvstore import KV, Keys, StoreUnavailable
from kvstore.records import NetworkRecord
from plugin import config
from plugin.driver.garbage import Garbage
from plugin.kernel.datapath import Underlay
from plugin.ops import doctor
from plugin.runtime.reconciler import Reconciler
from plugin.state import LocalNetwork, LocalState


def _state(tmp_path: Path, *networks: tuple[str, int, bool]) -> LocalState:
    st = LocalState(tmp_path / "state.json")
    for key, mtu, encrypted in networks:
        rec = NetworkRecord(key=key, vni=5000 + mtu, subnets=["10.9.0.0/24"], encrypted=encrypted, port=4800,
                            created_by="h")
        st.put_network(LocalNetwork(docker_network_id=key * 4, record=rec, mtu=mtu))
    return st


class FakeDataPath:
    def __init__(self, mtu: int) -> None:
        self.ul = Underlay("10.0.0.1", "eth0", mtu)

    def underlay(self) -> Underlay:
        return self.ul


def test_mtu_finding_names_the_mtu_that_fits(tmp_path: Path) -> None:
    ok = doctor.check_mtu(FakeDataPath(1500), _state(tmp_path, ("a", 1450, False), ("b", 1410, True)))  # type: ignore[arg-type]
    assert ok.status == "ok" and "1450" in ok.detail and "1410 encrypted" in ok.detail
    bad = doctor.check_mtu(FakeDataPath(1400), _state(tmp_path, ("c", 1400, False)))  # type: ignore[arg-type]
    assert bad.status == "fail" and "c: MTU 1400 needs 1450" in bad.detail
    assert "driver.mtu=1350" in bad.fix and "1310 if encrypted" in bad.fix


def test_encrypted_network_on_a_kernel_without_esp_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "missing_features", lambda: ["ESP (kernel option CONFIG_INET_ESP, module esp4)"])
    assert doctor.check_ipsec(0).status == "warn"
    failed = doctor.check_ipsec(2)
    assert failed.status == "fail" and "2 on this host have no data path" in failed.detail and "esp4" in failed.fix
    monkeypatch.setattr(doctor, "missing_features", lambda: [])
    assert doctor.check_ipsec(2).status == "ok"


def test_neighbour_table_near_its_limit_or_overflowed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    head = "entries  allocs   destroys hash_grows lookups  hits     res_failed table_fulls"
    files = {"/proc/net/stat/arp_cache": f"{head}\n{900:08x} 0 0 0 0 0 0 00000000\n{900:08x} 0 0 0 0 0 0 00000000\n",
             "/proc/sys/net/ipv4/neigh/default/gc_thresh3": "1024\n"}

    class P(type(Path())):  # type: ignore[misc]
        def read_text(self, *a: Any, **k: Any) -> str:
            return files[str(self)]

    monkeypatch.setattr(doctor, "Path", P)
    near = doctor.check_neighbours()
    assert near.status == "warn" and "900 entries of at most 1024" in near.detail and "gc_thresh3" in near.fix
    files["/proc/net/stat/arp_cache"] = f"{head}\n{10:08x} 0 0 0 0 0 0 00000003\n{10:08x} 0 0 0 0 0 0 00000002\n"
    full = doctor.check_neighbours()
    assert full.status == "warn" and "overflowed 5 times" in full.detail
    files["/proc/net/stat/arp_cache"] = f"{head}\n{10:08x} 0 0 0 0 0 0 00000000\n"
    assert doctor.check_neighbours().status == "ok"


def test_peers_short_of_expected_is_a_warning() -> None:
    assert doctor.check_peers({4096: (3, 3)}).status == "ok"
    short = doctor.check_peers({4096: (3, 1), 4097: (2, 2)})
    assert short.status == "warn" and "vni 4096: 1/3" in short.detail and "4097" not in short.detail


class StubReconciler(Reconciler):
    """The pass logic alone: candidates and removals are stubbed, the clock is ours."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._suspects = {}
        self.found: list[Garbage] = []
        self.removed: list[Garbage] = []
        self.etcd_down = False
        self._lock = threading.Lock()
        self.last = {}
        self.keys = Keys()
        self.store = self  # type: ignore[assignment]  # range() below stands in for etcd

    def range(self, prefix: str, keys_only: bool = False) -> tuple[list[KV], int]:
        if self.etcd_down:
            raise StoreUnavailable("etcd unreachable")
        return [], 1

    def repair(self) -> list[str]:
        return []

    def candidates(self, addrs: list[KV]) -> list[Garbage]:
        return list(self.found)

    def _remove(self, g: Garbage) -> None:
        self.removed.append(g)

    def pool_usage(self, addrs: list[KV]) -> None:
        pass


def test_reconciler_removes_only_after_the_grace_period_and_never_without_etcd(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("plugin.runtime.reconciler.time.monotonic", lambda: now[0])
    r = StubReconciler(grace=60)
    stray = Garbage("address", "address 10.9.0.9", "nobody", ("address", "cidr.10.9.0.0_24", "10.9.0.9"))
    r.found = [stray]
    first = r.run()
    assert r.removed == [] and first["waiting"][0]["for_seconds"] == 0
    now[0] += 59
    r.run()
    assert r.removed == []
    r.etcd_down = True
    now[0] += 600
    down = r.run()
    assert r.removed == [] and down["etcd"].startswith("unreachable"), "nothing goes while etcd is away"
    r.etcd_down = False
    now[0] += 1
    r.run()
    assert r.removed == [stray], "its clock kept running: gone once past the grace period"
    # Something that stops being a candidate starts again from zero.
    again = Garbage("veth", "veth x", "unowned", ("veth", "4096", "x"))
    r.found, r.removed = [again], []
    r.run()
    r.found = []
    now[0] += 50
    r.run()
    r.found = [again]
    now[0] += 50
    r.run()
    assert r.removed == []
    # gc --apply (force) removes at once; a dry run removes nothing.
    assert r.run(dry_run=True)["removed"] == [] and r.removed == []
    assert r.run(force=True)["removed"][0]["kind"] == "veth" and r.removed == [again]


def test_a_managed_plugin_is_found_and_its_paths_are_the_hosts(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`pyoverlay status` with nothing typed: the managed plugin's socket, state and certs as the host sees them,
    from `docker plugin inspect` as the Docker API gives it (interface types as objects)."""
    import docker

    from plugin.ops.commands import adopt_managed

    class FakePlugin:
        id, name, enabled = "abc123", "pyoverlay:latest", True
        attrs = {
            "Enabled": True,
            "Config": {"Entrypoint": ["/opt/pyoverlay/bin/pyoverlay", "serve"],
                       "Interface": {"Socket": "pyoverlay.sock",
                                     "Types": [{"Prefix": "docker", "Capability": "networkdriver", "Version": "1.0"},
                                               {"Prefix": "docker", "Capability": "ipamdriver", "Version": "1.0"}]}},
            "Settings": {"Env": ["PYOVERLAY_STATE_DIR=/host/var/lib/pyoverlay", "ETCD_ENDPOINTS=http://10.0.0.5:2379",
                                 "ETCD_CACERT=/host/etc/pyoverlay/ca.pem", "DOCKER_HOST=unix:///run/docker-host/x",
                                 "PATH=/opt/pyoverlay/bin", "PYOVERLAY_VTEP=10.0.0.7"],
                         "Mounts": [{"Name": "state", "Source": "/srv/state"}, {"Name": "certs", "Source": "/etc"}]},
        }

    class FakeClient:
        def __init__(self, **kwargs: object) -> None:
            self.plugins = self

        def list(self) -> list[FakePlugin]:
            return [FakePlugin()]

    monkeypatch.setattr(docker, "DockerClient", FakeClient)
    env = {"DOCKER_HOST": "unix:///var/run/docker.sock", "PATH": "/usr/bin"}
    assert adopt_managed(env) == "pyoverlay:latest"
    assert env["PYOVERLAY_SOCKET"] == "/run/docker/plugins/abc123/pyoverlay.sock"
    assert env["PYOVERLAY_STATE_DIR"] == "/srv/state/pyoverlay"
    assert env["ETCD_CACERT"] == "/etc/pyoverlay/ca.pem"
    assert env["DOCKER_HOST"] == "unix:///var/run/docker.sock" and env["PATH"] == "/usr/bin"
    assert env["ETCD_ENDPOINTS"] == "http://10.0.0.5:2379" and env["PYOVERLAY_DOCKER_NAME"] == "pyoverlay:latest"
    FakePlugin.enabled = False
    assert adopt_managed({}) is None


def test_doctor_names_the_daemon_json_line_for_names_without_a_flag(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("PYOVERLAY_DNS_UPSTREAMS", "127.0.0.53,192.0.2.1")
    settings = config.load()
    assert settings.dns_address == config.DEFAULT_DNS_ADDRESS
    daemon = tmp_path / "daemon.json"
    missing = doctor.check_dns_address(settings, daemon)
    # systemd-resolved's loopback address is useless inside a container: not offered as the fallback.
    assert missing.status == "warn" and '"dns": ["169.254.53.53", "192.0.2.1"]' in missing.fix
    daemon.write_text('{"dns": ["192.0.2.1", "169.254.53.53"]}')
    assert doctor.check_dns_address(settings, daemon).status == "warn", "resolvers ask the first server"
    daemon.write_text('{"dns": ["169.254.53.53", "192.0.2.1"]}')
    assert doctor.check_dns_address(settings, daemon).status == "ok"
    daemon.write_text('{"dns": ')
    assert doctor.check_dns_address(settings, daemon).status == "fail"
    monkeypatch.setenv("PYOVERLAY_DNS_ADDRESS", "off")
    assert doctor.check_dns_address(config.load(), daemon).status == "ok"


@pytest.mark.parametrize("value", ["127.0.0.1", "224.0.0.53", "0.0.0.0", "fd00::53", "dns.example", "1.2.3.4; rm"])
def test_the_dns_address_must_be_a_unicast_ipv4_address(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PYOVERLAY_DNS_ADDRESS", value)
    with pytest.raises(config.ConfigError, match="PYOVERLAY_DNS_ADDRESS"):
        config.load()


def test_plugin_interface_types_in_both_engines_shapes() -> None:
    from plugin.docker.api import NETWORK_DRIVER, interface_types
    docker20 = {"Interface": {"Types": [{"Prefix": "docker", "Capability": "networkdriver", "Version": "1.0"},
                                        {"Prefix": "docker", "Capability": "ipamdriver", "Version": "1.0"}]}}
    docker28 = {"Interface": {"Types": ["docker.networkdriver/1.0", "docker.ipamdriver/1.0"]}}
    assert interface_types(docker20) == interface_types(docker28) == {NETWORK_DRIVER, "docker.ipamdriver/1.0"}
    assert interface_types({}) == set() and interface_types({"Interface": {"Types": [7, None]}}) == set()


def test_vtep_filter_never_applies_a_set_read_before_a_newer_one() -> None:
    """The reconciler and the host watch both refresh the filter: each reads the wanted VTEPs under the
    filter's lock, so one that waited for the lock cannot install the set it would have read before."""
    from plugin.kernel.vtepfilter import VtepFilter

    class Backend:
        families = ["ip"]
        sets: list[list[str]] = []

        def present(self) -> bool:
            return True

        def apply(self, addrs: list[str]) -> str:
            self.sets.append(addrs)
            return ""

    known = {"10.0.0.1"}
    vf = VtepFilter([4800], lambda: set(known))
    vf._backend, vf._chosen = Backend(), True  # type: ignore[assignment]
    with vf._lock:                      # a refresh (the reconciler's) waits for the lock ...
        waiting = threading.Thread(target=vf.refresh)
        waiting.start()
        known.add("10.0.0.2")           # ... while a host appears
        vf.sync_later()
    waiting.join(5)
    vf._worker.submit(lambda: None).result(5)
    assert Backend.sets[-1] == ["10.0.0.1", "10.0.0.2"] and vf._applied == {"10.0.0.1", "10.0.0.2"}


def test_the_dns_redirect_targets_the_first_upstream_the_kernel_can_forward_to() -> None:
    from plugin.kernel.dnsredirect import target
    assert target(["127.0.0.53", "fd00::1", "192.0.2.1", "192.0.2.2"], "169.254.53.53") == "192.0.2.1"
    assert target(["169.254.53.53", "10.0.0.2"], "169.254.53.53") == "10.0.0.2", "never to the address itself"
    assert target(["127.0.0.53", "::1", "0.0.0.0", "not-an-address"], "169.254.53.53") is None


@pytest.mark.skipif(shutil.which("nft") is None or shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs root, nft and unshare")
def test_the_dns_redirect_in_a_real_kernel_is_idempotent_and_removable() -> None:
    """In a throwaway network namespace (gone with its process): the rule goes in once, reads back, is not
    rewritten when it is current, follows a new upstream and goes away."""
    script = textwrap.dedent("""
        from plugin.kernel.dnsredirect import DnsRedirect
        r = DnsRedirect("169.254.53.53", ["127.0.0.53", "192.0.2.1"])
        assert r.current() is None
        assert r.apply() and r.current() == "192.0.2.1", r.reason
        assert r.apply() and r.status().startswith("kernel DNAT to 192.0.2.1:53")
        r.upstreams[:] = ["192.0.2.9"]
        assert r.apply() and r.current() == "192.0.2.9"
        r.upstreams[:] = ["127.0.0.53"]
        assert not r.apply() and r.current() is None and "no IPv4 upstream" in r.reason
        assert r.status().startswith("plugin forwarder")
        print("ok")
    """)
    res = subprocess.run(["unshare", "-n", sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parent.parent, check=False)
    assert res.stdout.strip() == "ok", res.stdout + res.stderr
