"""10,000 generated malformed or hostile requests across every route (hypothesis), against a real plugin on a
real host with a real network in use: each is answered with success or a JSON {"Err": ...}, the plugin
stays up, and a rejected request changes nothing in etcd or in the plugin's state file.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore import EtcdConfig, KVStore
from plugin.api.app import ROUTES
from tests.plugin_client import call
from tests.rig import Rig

pytestmark = pytest.mark.docker

EXAMPLES = 10_000
FIELDS = ["NetworkID", "EndpointID", "PoolID", "Pool", "SubPool", "Address", "Options", "IPv4Data", "IPv6Data",
          "Interface", "SandboxKey", "V6", "AddressSpace", "Gateway", "AuxAddresses", "MacAddress",
          "AddressIPv6", "com.docker.network.generic", "pyoverlay.vni", "encrypted"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)


def plausible(target: dict[str, str]) -> st.SearchStrategy[Any]:
    """Values that get past the first checks: real and almost-real IDs, CIDRs, addresses, options."""
    return st.sampled_from([
        target["nid"], target["eid"], target["pool"], "f" * 64, "0" * 63, "../../etc", "10.30.0.0/24", "10.30.0.5",
        "10.30.0.300", "10.31.0.0/33", "fd00::/64", "::1", "", " ", "cidr.10.30.0.0_24/../x", "\x00",
        "a" * 5000, {"com.docker.network.generic": {"encrypted": "", "pyoverlay.vni": "99999999"}},
        [{"Pool": "10.30.0.0/24", "Gateway": "10.30.0.1/24"}], [{"Pool": "nope", "AuxAddresses": {"x": 1}}],
        {"Address": "10.30.0.77/24", "MacAddress": "zz"}, {"com.docker.network.endpoint.name": "x" * 300},
    ])


def bodies(target: dict[str, str]) -> st.SearchStrategy[tuple[str, bytes]]:
    routes = st.sampled_from(sorted(ROUTES) + ["NetworkDriver.Bogus", "Plugin.Nope", "../../x"])
    obj = st.dictionaries(st.sampled_from(FIELDS), plausible(target) | json_values, max_size=8)
    raw = st.one_of(
        obj.map(lambda d: json.dumps(d).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )
    return st.tuples(routes, raw)


def snapshot(rig: Rig, store: KVStore) -> tuple[list[tuple[str, bytes]], str]:
    kvs, _ = store.range(rig.etcd_prefix + "/")
    state = rig.hosts[0].state_dir / "state.json"
    return sorted((kv.key, kv.value) for kv in kvs), state.read_text() if state.exists() else ""


def changes(before: tuple[list[tuple[str, bytes]], str], after: tuple[list[tuple[str, bytes]], str]) -> str:
    """What differs between two snapshots, for the failure message: etcd keys (before -> after), state file."""
    was, now = dict(before[0]), dict(after[0])
    keys = {k: (was.get(k), now.get(k)) for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)}
    state = "state.json unchanged" if before[1] == after[1] else f"state.json {before[1]!r} -> {after[1]!r}"
    return f"etcd {keys}; {state}"


def test_hostile_requests_get_an_answer_or_a_json_err_and_rejections_change_nothing(rig1: Rig, net, cleanup) -> None:  # type: ignore[no-untyped-def]
    h = rig1.hosts[0]
    target = net
    store = KVStore(EtcdConfig([rig1.etcd.local_url]))
    counts = {"ok": 0, "err": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(bodies(target))
    def one(request: tuple[str, bytes]) -> None:
        method, raw = request
        before = snapshot(rig1, store)
        status, reply = call(h.plugin_sock, method, raw=raw, timeout=30)
        assert isinstance(reply, dict), (method, raw, status, reply)
        if "Err" in reply:
            assert isinstance(reply["Err"], str) and reply["Err"].strip(), (method, raw, reply)
            assert status >= 400, (method, raw, status, reply)
            after = snapshot(rig1, store)
            assert after == before, f"rejected {method} {raw[:200]!r} changed state: {reply}; {changes(before, after)}"
            counts["err"] += 1
        else:
            assert status == 200, (method, raw, status, reply)
            counts["ok"] += 1

    try:
        one()
    finally:
        store.close()
    print(f"{counts['ok'] + counts['err']} requests: {counts['ok']} answered, {counts['err']} refused with an Err")
    # Still up and still right. (The generated requests carry the real IDs too, so they may have deleted the
    # network in use, as Docker itself could: a fresh network is made and used.)
    assert call(h.plugin_sock, "Plugin.Activate")[1] == {"Implements": ["NetworkDriver", "IpamDriver"]}
    cleanup.network(h, "n-after")
    h.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", "10.32.0.0/24",
             "n-after")
    for name in ("after-1", "after-2"):
        cleanup.container(h, name)
        h.run(name, "n-after")
    assert h.exec("after-1", "ping", "-c1", "-W2", h.ip_of("after-2", "n-after"), check=False).returncode == 0
