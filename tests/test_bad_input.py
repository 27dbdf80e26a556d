"""Every kind of bad input gets a clear {"Err": ...} naming the problem, and changes nothing.

Requests go straight to the plugin socket of a real host, the way Docker sends them.
"""

from __future__ import annotations

import json

import pytest

from tests.plugin_client import call
from tests.rig import Rig

pytestmark = pytest.mark.docker

NID = "f" * 64
EID = "e" * 64


def snapshot(rig: Rig) -> tuple[str, str]:
    host = rig.hosts[0]
    values = rig.etcd.ctl("get", rig.etcd_prefix, "--prefix")
    # The host record carries a lease-bound heartbeat-free payload; everything else must be identical.
    state = (host.state_dir / "state.json").read_text() if (host.state_dir / "state.json").exists() else ""
    return values, state


def expect_err(rig: Rig, method: str, body=None, raw: bytes | None = None, *needles: str) -> str:  # type: ignore[no-untyped-def]
    before = snapshot(rig)
    status, reply = call(rig.hosts[0].plugin_sock, method, body, raw=raw)
    assert status in (404, 500), (status, reply)
    assert isinstance(reply.get("Err"), str) and reply["Err"], reply
    for needle in needles:
        assert needle in reply["Err"], reply["Err"]
    assert snapshot(rig) == before, "a rejected request changed state"
    return reply["Err"]


def test_broken_json(rig1: Rig, net) -> None:  # type: ignore[no-untyped-def]
    expect_err(rig1, "NetworkDriver.CreateEndpoint", None, b'{"NetworkID": ', "not valid JSON")
    expect_err(rig1, "IpamDriver.RequestPool", None, b"[1, 2]", "must be a JSON object")


def test_missing_and_mistyped_fields(rig1: Rig, net) -> None:  # type: ignore[no-untyped-def]
    expect_err(rig1, "NetworkDriver.Join", {"NetworkID": net["nid"], "EndpointID": EID}, None, "SandboxKey")
    expect_err(rig1, "NetworkDriver.CreateEndpoint", {"EndpointID": EID}, None, "NetworkID")
    expect_err(rig1, "IpamDriver.RequestAddress", {"Address": "10.30.0.9"}, None, "PoolID")
    expect_err(rig1, "IpamDriver.RequestPool", {"Pool": "10.31.0.0/24", "V6": "yes"}, None, "V6")
    expect_err(rig1, "NetworkDriver.CreateEndpoint",
               {"NetworkID": net["nid"], "EndpointID": "../../etc"}, None, "EndpointID")


def test_bad_cidr(rig1: Rig, net) -> None:  # type: ignore[no-untyped-def]
    expect_err(rig1, "IpamDriver.RequestPool", {"AddressSpace": "PyOverlayLocal", "Pool": "10.31.0.0/33"},
               None, "Pool", "not a valid CIDR")
    expect_err(rig1, "IpamDriver.RequestPool", {"Pool": "10.31.0.7/24"}, None, "host bits")
    expect_err(rig1, "IpamDriver.RequestPool", {"Pool": "not-a-cidr"}, None, "Pool")
    expect_err(rig1, "IpamDriver.RequestPool", {"Pool": "fd00::/64", "V6": False}, None, "V6")
    expect_err(rig1, "IpamDriver.RequestPool", {"SubPool": "10.31.0.0/25"}, None, "SubPool")
    expect_err(rig1, "NetworkDriver.CreateNetwork",
               {"NetworkID": NID, "IPv4Data": [{"Pool": "10.31.0.0/99"}]}, None, "IPv4Data.Pool")


def test_overlapping_subnet_refused(rig1: Rig, net) -> None:  # type: ignore[no-untyped-def]
    expect_err(rig1, "IpamDriver.RequestPool", {"Pool": "10.30.0.0/16"}, None, "overlaps", "10.30.0.0/24")


def test_address_outside_pool(rig1: Rig, net) -> None:  # type: ignore[no-untyped-def]
    expect_err(rig1, "IpamDriver.RequestAddress", {"PoolID": net["pool"], "Address": "10.99.0.9",
                                                  "Options": {"com.docker.network.endpoint.name": "x"}},
               None, "10.99.0.9 is outside the pool 10.30.0.0/24")
    expect_err(rig1, "IpamDriver.RequestAddress", {"PoolID": net["pool"], "Address": "10.30.0.255"},
               None, "broadcast")
    expect_err(rig1, "IpamDriver.RequestAddress", {"PoolID": net["pool"], "Address": "banana"},
               None, "not a valid IP address")
    expect_err(rig1, "NetworkDriver.CreateEndpoint",
               {"NetworkID": net["nid"], "EndpointID": EID, "Interface": {"Address": "10.77.0.2/24"}},
               None, "not in the network's subnets")


def test_address_taken(rig1: Rig, net) -> None:  # type: ignore[no-untyped-def]
    err = expect_err(rig1, "IpamDriver.RequestAddress",
                     {"PoolID": net["pool"], "Address": "10.30.0.5",
                      "Options": {"com.docker.network.endpoint.name": "intruder"}},
                     None, "10.30.0.5 is already in use")
    # Docker 20.10 does not tell the IPAM container names: the holder is named by its endpoint.
    holder_eid = rig1.hosts[0].docker("inspect", "-f", '{{(index .NetworkSettings.Networks "n-bad").EndpointID}}',
                                      "bad-holder").stdout.strip()
    assert f"endpoint {holder_eid[:12]} on host h1" in err


def test_unknown_pool(rig1: Rig, net) -> None:  # type: ignore[no-untyped-def]
    expect_err(rig1, "IpamDriver.RequestAddress", {"PoolID": "cidr.10.66.0.0_24", "Address": ""},
               None, "unknown pool")


def test_unknown_network_and_endpoint(rig1: Rig, net) -> None:  # type: ignore[no-untyped-def]
    expect_err(rig1, "NetworkDriver.CreateEndpoint",
               {"NetworkID": NID, "EndpointID": EID, "Interface": {"Address": "10.30.0.9/24"}},
               None, "unknown network")
    expect_err(rig1, "NetworkDriver.Join",
               {"NetworkID": net["nid"], "EndpointID": EID, "SandboxKey": "/var/run/docker/netns/x"},
               None, "unknown endpoint")


def test_unknown_option_and_method(rig1: Rig, net) -> None:  # type: ignore[no-untyped-def]
    expect_err(rig1, "NetworkDriver.CreateNetwork",
               {"NetworkID": NID, "Options": {"com.docker.network.generic": {"colour": "blue"}},
                "IPv4Data": [{"Pool": "10.30.0.0/24"}]}, None, "unknown --opt colour")
    err = expect_err(rig1, "NetworkDriver.Teleport", {}, None, "not implemented")
    assert "Teleport" in err


def test_deletes_of_unknown_ids_are_fine(rig1: Rig, net) -> None:  # type: ignore[no-untyped-def]
    sock = rig1.hosts[0].plugin_sock
    before = snapshot(rig1)
    for method, body in (
        ("NetworkDriver.Leave", {"NetworkID": NID, "EndpointID": EID}),
        ("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID}),
        ("NetworkDriver.DeleteNetwork", {"NetworkID": NID}),
        ("IpamDriver.ReleaseAddress", {"PoolID": net["pool"], "Address": "10.30.0.77"}),
        ("IpamDriver.ReleasePool", {"PoolID": "cidr.10.66.0.0_24"}),
    ):
        assert call(sock, method, body) == (200, {}), method
    assert snapshot(rig1) == before


def test_capability_calls_with_empty_bodies(rig1: Rig) -> None:
    sock = rig1.hosts[0].plugin_sock
    assert call(sock, "NetworkDriver.GetCapabilities") == (200, {"Scope": "local", "ConnectivityScope": "global"})
    status, body = call(sock, "IpamDriver.GetDefaultAddressSpaces")
    assert status == 200 and set(body) == {"LocalDefaultAddressSpace", "GlobalDefaultAddressSpace"}
    assert json.dumps(call(sock, "IpamDriver.GetCapabilities")[1])
