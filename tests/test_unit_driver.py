"""The driver and the allocator on the in-memory store (kvstore.MemoryStore: etcd's transactions, leases and
watches, held to etcd's contract by tests/test_store_contract.py) and a recording kernel: no root, no etcd, no
dockerd; milliseconds each. The end-to-end tests run the same calls against real etcd, kernels and Docker."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ipam.allocator import DefaultPools, Ipam
from ipam.subnets import network_key
from kvstore import Keys, MemoryStore
from kvstore.records import EndpointRecord, NetworkRecord
from plugin import config
from plugin.driver.networks import NetworkDriver
from plugin.driver.options import Interface, Subnet
from plugin.errors import Conflict, InvalidRequest, NotFound, Unavailable
from plugin.kernel.datapath import NetworkPlan, Underlay
from plugin.state import LocalState

NID = "a" * 64
NID2 = "b" * 64
EID = "e" * 64


class Kernel:
    """What the driver asks of the data path, recorded; `fail` makes ensure_network raise it."""

    def __init__(self) -> None:
        self.networks: dict[int, NetworkPlan] = {}
        self.removed: list[int] = []
        self.links: dict[str, int] = {}      # endpoint id -> vni of its veth
        self.host_links: list[str] = []       # host-side links left by an interrupted Join (tagged ours)
        self.fail: Exception | None = None

    def underlay(self) -> Underlay:
        return Underlay("192.0.2.10", "eth0", 1500)

    def host_routes(self) -> list[Any]:
        return []

    def ensure_network(self, plan: NetworkPlan) -> None:
        if self.fail is not None:
            self.networks[plan.vni] = plan   # half made, as a failure part-way leaves it
            raise self.fail
        self.networks[plan.vni] = plan

    def remove_network(self, vni: int) -> None:
        self.networks.pop(vni, None)
        self.removed.append(vni)

    def add_endpoint(self, vni: int, endpoint_id: str, mac: str, mtu: int) -> str:
        self.links[endpoint_id] = vni
        return f"pyo{endpoint_id[:8]}"

    def remove_endpoint_later(self, vni: int, endpoint_id: str) -> None:
        self.links.pop(endpoint_id, None)

    remove_endpoint = remove_endpoint_later

    def list_networks(self) -> list[int]:
        return list(self.networks)

    def endpoint_links(self, vni: int) -> list[str]:
        return [eid for eid, v in self.links.items() if v == vni]

    def stale_host_links(self, endpoint_ids: set[str]) -> list[str]:
        return [name for name in self.host_links if name.removeprefix("pyo") not in {e[:8] for e in endpoint_ids}]

    def delete_host_link(self, name: str) -> None:
        self.host_links.remove(name)


class NoEncryption:
    def missing(self) -> list[str]:
        return ["the esp4 module"]

    def guard(self, vnis: dict[int, str]) -> None:
        pass


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("PYOVERLAY_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("PYOVERLAY_HOST", "h1")
    for name in ("ETCD_ENDPOINTS", "PYOVERLAY_SCOPE", "PYOVERLAY_CLUSTER_SECRET", "PYOVERLAY_MTU"):
        monkeypatch.delenv(name, raising=False)
    settings = config.load()
    store, keys, kernel = MemoryStore(), Keys("/unit/"), Kernel()
    state = LocalState(tmp_path / "state.json")
    ipam = Ipam(store, keys, "h1", DefaultPools(ipaddress.ip_network("10.200.0.0/16"), 24,
                                                ipaddress.ip_network("fd00:200::/48"), 64), kernel.host_routes)
    changed: list[int] = []
    driver = NetworkDriver(settings, store, keys, kernel, state, ipam, NoEncryption(),  # type: ignore[arg-type]
                           network_changed=lambda: changed.append(1))
    return SimpleNamespace(store=store, keys=keys, kernel=kernel, state=state, ipam=ipam, driver=driver,
                           changed=changed)


def _pool(env: Any, cidr: str) -> str:
    return str(env.ipam.request_pool(cidr, "", {}, False)["PoolID"])


def test_a_network_is_created_once_joined_and_removed_with_its_last_member(env: Any) -> None:
    _pool(env, "10.30.0.0/24")
    subnet = [Subnet("10.30.0.0/24", "10.30.0.1/24")]
    assert env.driver.create_network(NID, {}, subnet, []) == {}
    nkey = network_key(ipaddress.ip_network("10.30.0.0/24"), None)
    kv = env.store.get(env.keys.network(nkey))
    record = NetworkRecord.load(kv.value, kv.key)
    assert env.store.get(env.keys.member(nkey, "h1")) is not None
    assert list(env.kernel.networks) == [record.vni]
    assert list(env.kernel.networks[record.vni].gateways) == ["10.30.0.1/24"]
    assert env.state.network(NID).record.vni == record.vni and env.changed == [1]
    # Docker repeats a call it saw fail (or restarts): the same answer, nothing more.
    assert env.driver.create_network(NID, {}, subnet, []) == {}
    assert len(env.store.range(env.keys.networks())[0]) == 1
    # A second Docker network for the same cluster network on this host would split it.
    with pytest.raises(Conflict, match="already has a Docker network"):
        env.driver.create_network(NID2, {}, subnet, [])
    assert env.driver.delete_network(NID) == {}
    assert env.store.get(env.keys.network(nkey)) is None and env.store.get(env.keys.member(nkey, "h1")) is None
    assert env.kernel.removed == [record.vni] and env.state.network(NID) is None


@pytest.mark.parametrize("opts, error", [
    ({"com.docker.network.generic": {"colour": "blue"}}, "unknown --opt colour"),
    ({"com.docker.network.generic": {"pyoverlay.vni": "12x"}}, "is not a number"),
    ({"com.docker.network.generic": {"pyoverlay.vni": "0"}}, "outside"),
    ({"com.docker.network.generic": {"encrypted": "no"}}, "give it bare"),
    ({"com.docker.network.generic": {"com.docker.network.driver.mtu": "70000"}}, "mtu"),
    ({"com.docker.network.generic": ["not", "a", "map"]}, "a map of strings"),
])
def test_options_are_checked_before_anything_is_written(env: Any, opts: dict[str, Any], error: str) -> None:
    _pool(env, "10.31.0.0/24")
    before = env.store.revision
    with pytest.raises(InvalidRequest, match=error):
        env.driver.create_network(NID, opts, [Subnet("10.31.0.0/24", "10.31.0.1/24")], [])
    assert env.store.revision == before and not env.kernel.networks


def test_encrypted_fails_closed_on_a_kernel_without_esp(env: Any) -> None:
    _pool(env, "10.32.0.0/24")
    with pytest.raises(Unavailable, match="No network was created and no clear-text path"):
        env.driver.create_network(NID, {"com.docker.network.generic": {"encrypted": ""}},
                                  [Subnet("10.32.0.0/24", "10.32.0.1/24")], [])
    assert not env.kernel.networks and not env.store.range(env.keys.networks())[0]


def test_a_data_path_failure_is_rolled_back_and_says_so(env: Any) -> None:
    _pool(env, "10.33.0.0/24")
    subnet = [Subnet("10.33.0.0/24", "10.33.0.1/24")]
    env.kernel.fail = OSError("no space left on device")
    with pytest.raises(Unavailable, match="no space left on device; network not created, rolled back$"):
        env.driver.create_network(NID, {}, subnet, [])
    assert not env.store.range(env.keys.networks())[0], "the network record went with its only member"
    assert not env.kernel.networks and env.state.network(NID) is None
    # The undo cannot reach etcd: the error says what is left, and the removal is queued for later.
    env.kernel.fail = OSError("busy")
    real_delete = env.store.delete

    def unreachable(key: str) -> bool:
        env.store.fail_next(1)
        return bool(real_delete(key))

    env.store.delete = unreachable
    with pytest.raises(Unavailable, match="failed to roll back: its membership in etcd .*queued until etcd answers"):
        env.driver.create_network(NID, {}, subnet, [])
    assert {"op": "leave-network", "key": network_key(ipaddress.ip_network("10.33.0.0/24"), None)} in \
        env.state.take_pending()
    assert not env.kernel.networks


def test_endpoints_take_addresses_in_their_network_only_and_are_signed_records(env: Any) -> None:
    pid = _pool(env, "10.34.0.0/24")
    env.driver.create_network(NID, {}, [Subnet("10.34.0.0/24", "10.34.0.1/24")], [])
    with pytest.raises(InvalidRequest, match="not in the network's subnets"):
        env.driver.create_endpoint(NID, EID, Interface(address="10.99.0.5/24"))
    with pytest.raises(InvalidRequest, match="is not a MAC address"):
        env.driver.create_endpoint(NID, EID, Interface(address="10.34.0.5/24", mac="02:42:zz"))
    with pytest.raises(NotFound, match="unknown network"):
        env.driver.create_endpoint(NID2, EID, Interface(address="10.34.0.5/24"))
    address = env.ipam.request_address(pid, "", {})["Address"]
    answer = env.driver.create_endpoint(NID, EID, Interface(address=address))
    assert answer == {"Interface": {"MacAddress": "02:42:0a:22:00:01"}}, "the MAC follows the address"
    nkey = env.state.network(NID).record.key
    kv = env.store.get(env.keys.endpoint(nkey, EID))
    record = EndpointRecord.load(kv.value, kv.key)     # validates the signature and the key binding too
    assert record.address == address and record.host == "h1" and record.vtep == "192.0.2.10"
    joined = env.driver.join(NID, EID, "/var/run/docker/netns/x")
    assert joined["InterfaceName"]["SrcName"] == f"pyo{EID[:8]}" and env.kernel.links[EID]
    assert env.driver.leave(NID, EID) == {} and EID not in env.kernel.links
    assert env.driver.delete_endpoint(NID, EID) == {}
    assert env.store.get(env.keys.endpoint(nkey, EID)) is None and env.state.endpoint(EID) is None
    assert env.driver.delete_endpoint(NID, EID) == {}, "a repeated delete is not an error"


def test_the_allocator_hands_out_each_address_once_and_takes_it_back(env: Any) -> None:
    pid = _pool(env, "10.35.0.0/29")          # 6 usable addresses
    got = {env.ipam.request_address(pid, "", {})["Address"] for _ in range(6)}
    assert len(got) == 6
    with pytest.raises(Unavailable, match="no free address left in 10.35.0.0/29"):
        env.ipam.request_address(pid, "", {})
    with pytest.raises(Conflict):
        env.ipam.request_address(pid, "10.35.0.2", {})
    env.ipam.release_address(pid, "10.35.0.2")
    assert env.ipam.request_address(pid, "10.35.0.2", {})["Address"] == "10.35.0.2/29"


def test_restore_rebuilds_the_recorded_networks_and_sweeps_what_nothing_owns(env: Any) -> None:
    """The start-up restore is the reconciler's kernel sweep with no grace: the same definition of garbage."""
    _pool(env, "10.36.0.0/24")
    env.driver.create_network(NID, {}, [Subnet("10.36.0.0/24", "10.36.0.1/24")], [])
    vni = env.state.network(NID).record.vni
    address = env.ipam.request_address(env.ipam.request_pool("10.36.0.0/24", "", {}, False)["PoolID"], "", {})
    env.driver.create_endpoint(NID, EID, Interface(address=address["Address"]))
    env.driver.join(NID, EID, "/var/run/docker/netns/x")
    # While the plugin was down: its namespace vanished (a reboot), a stranger's namespace and veth of ours
    # were left behind, and a host-side link of an interrupted Join.
    env.kernel.networks.clear()
    env.kernel.networks[4242] = None
    env.kernel.links["f" * 64] = vni
    env.kernel.host_links[:] = ["pyoffffffff", f"pyo{EID[:8]}"]
    env.driver.restore()
    assert list(env.kernel.networks) == [vni], "the recorded network is back, the unowned namespace gone"
    assert env.kernel.links == {EID: vni}, "the joined endpoint's veth stays, the unowned one goes"
    assert env.kernel.host_links == [f"pyo{EID[:8]}"]


def test_inspect_shows_the_network_as_etcd_has_it_and_skips_invalid_records(env: Any) -> None:
    from plugin.ops.cluster_view import inspect

    pid = _pool(env, "10.37.0.0/24")
    env.driver.create_network(NID, {}, [Subnet("10.37.0.0/24", "10.37.0.1/24")], [])
    address = env.ipam.request_address(pid, "", {})["Address"]
    env.driver.create_endpoint(NID, EID, Interface(address=address))
    nkey = env.state.network(NID).record.key
    env.store.put(env.keys.member(nkey, "h9"), b"{broken")       # a bad member record does not break inspect
    info = inspect(NID[:12], env.store, env.keys, env.state, None)
    assert info["key"] == nkey and info["vni"] == env.state.network(NID).record.vni
    assert list(info["hosts"]) == ["h1"] and info["hosts"]["h1"]["docker_network_id"] == NID[:12]
    assert [(e["endpoint_id"], e["address"]) for e in info["endpoints"]] == [(EID[:12], address)]
    assert info["pools"][pid]["used"] == 1 and info["pools"][pid]["usable"] == 254
    assert [(a["address"], a["endpoint"]) for a in info["addresses"]] == [(address.split("/")[0], EID[:12])]
    with pytest.raises(NotFound, match="no pyoverlay network"):
        inspect("nonesuch", env.store, env.keys, env.state, None)


def test_a_departed_hosts_endpoint_records_go_whether_found_by_index_or_read_whole(env: Any) -> None:
    """forget_host takes the keys the peers' index holds for the host (no read of every record), checks each
    record again (a key whose record now names another host stays), and reads everything without them."""
    from kvstore.records import EndpointRecord

    def write(host: str, eid: str) -> str:
        rec = EndpointRecord(endpoint_id=eid, network_key="net1", docker_network_id="d" * 12, host=host,
                             vtep="10.99.0.9", mac="02:42:0a:00:00:09", address="10.9.0.9/24")
        key = env.keys.endpoint("net1", eid)
        env.store.put(key, rec.dump())
        env.store.put(env.keys.aliases("net1", eid), b"{}")
        return key

    gone = [write("h9", f"e{i}") for i in range(3)]
    other = write("h8", "e8")
    read_whole = []
    real_range = env.store.range
    env.store.range = lambda prefix, keys_only=False: (read_whole.append(prefix), real_range(prefix, keys_only))[1]
    assert env.driver.forget_host("h9", [*gone[:2], other, env.keys.endpoint("net1", "never")]) == 2
    assert env.keys.all_endpoints() not in read_whole, "the index named where to look"
    assert [env.store.get(k) is None for k in (*gone, other)] == [True, True, False, False]
    assert env.store.get(env.keys.aliases("net1", "e0")) is None
    assert env.driver.forget_host("h9") == 1 and env.store.get(gone[2]) is None   # read whole: the rest
    assert env.keys.all_endpoints() in read_whole and env.store.get(other) is not None
