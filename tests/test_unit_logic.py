"""Pure logic: address arithmetic, request schemas, settings."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ipam import subnets as s
from plugin import config
from plugin.api import protocol as p
from plugin.errors import InvalidRequest
from plugin.kernel.datapath import Underlay, mac_from_ip


def test_parse_cidr_accepts_and_rejects() -> None:
    assert str(s.parse_cidr("10.1.0.0/24", "Pool")) == "10.1.0.0/24"
    assert s.parse_cidr("fd00::/64", "Pool", v6=True).version == 6
    for bad, needle in (("10.1.0.1/24", "host bits"), ("10.1.0.0/33", "valid CIDR"), ("10.1.0.0", "prefix"),
                        ("10.1.0.0/31", "too small"), ("x", "valid CIDR")):
        with pytest.raises(InvalidRequest, match=needle):
            s.parse_cidr(bad, "Pool")
    with pytest.raises(InvalidRequest, match="V6"):
        s.parse_cidr("10.1.0.0/24", "Pool", v6=True)


def test_pool_ids_and_network_keys_are_stable() -> None:
    net = ipaddress.ip_network("10.20.0.0/24")
    assert s.pool_id(net, None) == "cidr.10.20.0.0_24"
    assert s.pool_id(net, "blue") == "net.blue.v4"
    assert s.network_key(net, None) == "10.20.0.0_24"
    assert s.network_key(net, "blue") == "blue"
    with pytest.raises(InvalidRequest):
        s.check_network_id("has/slash", "opt")


def test_pick_subnet_skips_taken_and_routes() -> None:
    base = ipaddress.ip_network("10.128.0.0/9")
    taken = [ipaddress.ip_network("10.128.0.0/24"), ipaddress.ip_network("10.128.1.0/25"),
             ipaddress.ip_network("192.168.0.0/16")]
    assert str(s.pick_subnet(base, 24, taken)) == "10.128.2.0/24"
    assert s.pick_subnet(ipaddress.ip_network("10.0.0.0/24"), 24, [ipaddress.ip_network("10.0.0.0/8")]) is None


def test_usable_and_next_fit() -> None:
    pool = ipaddress.ip_network("10.0.0.0/29")
    first, last = s.usable(pool)
    assert (ipaddress.ip_address(first), ipaddress.ip_address(last)) == (
        ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.6"))
    assert s.usable(ipaddress.ip_network("fd00::/126"))[1] == int(ipaddress.ip_address("fd00::3"))
    # Next-fit: continues after the last handed out, wraps, never reuses what is in use.
    assert s.next_free(1, 6, set(), 3) == 4
    assert s.next_free(1, 6, {4, 5, 6}, 3) == 1
    assert s.next_free(1, 6, {1, 2, 3, 4, 5, 6}, 3) is None
    assert s.next_free(1, 6, set(), 6) == 1


def test_check_in_pool() -> None:
    pool = ipaddress.ip_network("10.0.0.0/24")
    s.check_in_pool(ipaddress.ip_address("10.0.0.9"), pool, "Address")
    for bad in ("10.0.0.0", "10.0.0.255", "10.0.1.1"):
        with pytest.raises(InvalidRequest):
            s.check_in_pool(ipaddress.ip_address(bad), pool, "Address")


def test_mac_follows_ip() -> None:
    assert mac_from_ip(ipaddress.ip_address("10.20.0.7")) == "02:42:0a:14:00:07"
    assert mac_from_ip(ipaddress.ip_address("fd00::a:b")) == "02:42:00:0a:00:0b"


def test_overlay_mtu() -> None:
    assert Underlay("192.0.2.1", "eth0", 1400).overlay_mtu() == 1350
    assert Underlay("fd00::1", "eth0", 1500).overlay_mtu() == 1430


def test_protocol_parse() -> None:
    req = p.parse(p.Join, b'{"NetworkID":"abc","EndpointID":"def","SandboxKey":"/x","Extra":1}\n', "Join")
    assert isinstance(req, p.Join) and req.SandboxKey == "/x"
    assert isinstance(p.parse(p.Empty, b"", "Activate"), p.Empty)
    with pytest.raises(InvalidRequest, match="SandboxKey"):
        p.parse(p.Join, b'{"NetworkID":"abc","EndpointID":"def"}', "Join")
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        p.parse(p.Join, b"{", "Join")
    with pytest.raises(InvalidRequest, match="V6"):
        p.parse(p.RequestPool, b'{"V6": 1}', "RequestPool")
    with pytest.raises(InvalidRequest, match="NetworkID"):
        p.parse(p.NetworkRef, b'{"NetworkID": "a b"}', "DeleteNetwork")


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://a:2379, http://b:2379")
    monkeypatch.setenv("PYOVERLAY_SCOPE", "global")
    monkeypatch.setenv("PYOVERLAY_VXLAN_PORT", "4790")
    st = config.load()
    assert st.etcd_endpoints == ["http://a:2379", "http://b:2379"]
    assert st.scope == "global" and st.vxlan_port == 4790
    monkeypatch.setenv("PYOVERLAY_SCOPE", "swarm")
    with pytest.raises(config.ConfigError, match="PYOVERLAY_SCOPE"):
        config.load()
    monkeypatch.setenv("PYOVERLAY_SCOPE", "local")
    monkeypatch.setenv("PYOVERLAY_VXLAN_PORT", "99999")
    with pytest.raises(config.ConfigError, match="PYOVERLAY_VXLAN_PORT"):
        config.load()


def test_esp_keys_agree_per_direction_and_never_leave_the_host(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import stat

    from plugin.cluster.keyring import KeyRing, derive, mac_of, verify

    a, b = KeyRing(tmp_path / "a"), KeyRing(tmp_path / "b")
    pa, pb = a.public()[a.epoch], b.public()[b.epoch]
    a_to_b = derive(a.shared(a.epoch, pb), "10.0.0.1", "10.0.0.2", a.epoch, b.epoch, 128)
    b_sees = derive(b.shared(b.epoch, pa), "10.0.0.1", "10.0.0.2", a.epoch, b.epoch, 128)
    b_to_a = derive(b.shared(b.epoch, pa), "10.0.0.2", "10.0.0.1", b.epoch, a.epoch, 128)
    assert a_to_b == b_sees, "both ends derive the same key and SPI for one direction"
    assert a_to_b.key != b_to_a.key and a_to_b.spi != b_to_a.spi, "each direction has its own"
    assert len(a_to_b.key) == 16 + 4 and a_to_b.spi >= 0x1000
    assert len(derive(a.shared(1, pb), "x", "y", 1, 1, 256).key) == 32 + 4
    key_file = tmp_path / "a" / f"x25519-{a.epoch}.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # Rotation keeps two epochs, persists, and a restart reads the same keys back.
    first = a.epoch
    a.rotate()
    a.rotate()
    assert sorted(a.pairs) == [first + 1, first + 2]
    assert KeyRing(tmp_path / "a").public() == a.public()
    # Authentication of published keys with the cluster secret.
    keys = a.public()
    good = mac_of("s3cret", "h1", "10.0.0.1", keys)
    assert verify("s3cret", "h1", "10.0.0.1", keys, good) is None
    assert verify(None, "h1", "10.0.0.1", keys, None) is None
    forged = {**keys, max(keys): b.public()[b.epoch]}
    assert "fail authentication" in (verify("s3cret", "h1", "10.0.0.1", forged, good) or "")
    assert "no authentication" in (verify("s3cret", "h1", "10.0.0.1", keys, None) or "")


def test_rotation_waits_for_every_peer_to_take_the_current_epoch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kvstore.records import HostRecord
    from plugin.cluster.encryption import ROTATION_PATIENCE, Encryption
    from plugin.cluster.keyring import KeyRing
    from plugin.kernel.ipsec import IPsec

    enc = Encryption(KeyRing(tmp_path / "k"), IPsec(), "h1", lambda: "10.0.0.1", 4789, None, 60, 128)
    epoch = enc.keyring.epoch

    def peer(name: str, seen: dict[str, int]) -> HostRecord:
        return HostRecord(host=name, vtep="10.0.0.9", port=4789, version="t", started=0.0, seen=seen)

    # h2 acknowledged our epoch, h3 not yet; h4 has no encrypted network (acknowledges nothing): not waited for.
    enc._hosts = {"h1": peer("h1", {}), "h2": peer("h2", {"h1": epoch}), "h3": peer("h3", {"h1": epoch - 1}),
                  "h4": peer("h4", {})}
    assert enc.lagging() == ["h3"]
    enc._rotated -= 61
    assert not enc.rotation_due(), "a peer that still lacks the current epoch holds the rotation back"
    enc._hosts["h3"] = peer("h3", {"h1": epoch})
    assert enc.rotation_due()
    enc._hosts["h3"] = peer("h3", {"h1": epoch - 1})
    enc._rotated -= ROTATION_PATIENCE * 60
    assert enc.rotation_due(), "a stuck peer holds it back for a bounded time only"


def test_dns_zones_and_answers() -> None:
    import dns.message
    import dns.rcode

    from kvstore.records import AliasRecord, EndpointRecord, RemoteEndpoint
    from plugin.dns.nameserver import answer, build_zones

    def ep(eid: str, name: str, addr: str, host: str, addr6: str | None = None) -> RemoteEndpoint:
        return RemoteEndpoint(EndpointRecord(endpoint_id=eid, network_key="n1", docker_network_id="d", host=host,
                                             vtep="1.1.1.1", mac="02:42:00:00:00:01", address=addr, address6=addr6,
                                             name=name))

    endpoints = [ep("e1", "web", "10.0.0.5/24", "h1", "fd00::5/64"), ep("e2", "db", "10.0.0.6/24", "gone"),
                 ep("e3", "old-name", "10.0.0.7/24", "h2")]
    aliases = [AliasRecord(endpoint_id="e3", network_key="n1", host="h2", container="c", names=["new-name", "api"])]
    zone = build_zones(endpoints, {"h1", "h2"}, aliases)["n1"]
    assert set(zone.addresses("web")) == {"10.0.0.5", "fd00::5"}
    assert "db" not in zone.forward, "a dead host's names do not resolve"
    assert "old-name" not in zone.forward and zone.addresses("api") == ("10.0.0.7",), "Docker's current names win"

    def ask(name: str, rdtype: str) -> dns.message.Message | None:
        return answer(dns.message.make_query(name, rdtype), zone)

    a = ask("WEB.", "A")
    assert a is not None and [r.to_text() for r in a.answer[0]] == ["10.0.0.5"] and a.answer[0].ttl <= 2
    aaaa = ask("web", "AAAA")
    assert aaaa is not None and [r.to_text() for r in aaaa.answer[0]] == ["fd00::5"]
    empty = ask("api", "AAAA")
    assert empty is not None and empty.rcode() == dns.rcode.NOERROR and not empty.answer, "NODATA, not NXDOMAIN"
    ptr = ask("5.0.0.10.in-addr.arpa", "PTR")
    assert ptr is not None and [r.to_text() for r in ptr.answer[0]] == ["web."]
    assert ask("example.org", "A") is None, "anything else is forwarded"


def test_propagation_definitions() -> None:
    from plugin.docker.propagation import LABEL_DEF, OURS, definition_of, same_network

    inspect = {"Name": "app", "Id": "abc", "Driver": "pyoverlay:latest", "Internal": True, "EnableIPv6": False,
               "Options": {"encrypted": ""}, "Labels": {"team": "blue", LABEL_DEF: "x"},
               "IPAM": {"Driver": "pyoverlay:latest", "Options": {},
                        "Config": [{"Subnet": "10.1.0.0/24", "Gateway": "10.1.0.1"}]}}
    d = definition_of(inspect, "h1", "pyoverlay:latest")
    assert d.ipam_driver == OURS and d.internal and d.labels == {"team": "blue"} and d.origin_id == "abc"
    assert d.pools[0].subnet == "10.1.0.0/24" and d.pools[0].gateway == "10.1.0.1"
    assert d.ipv4, "Docker 20.10's inspect has no EnableIPv4: IPv4 is on"
    only6 = {**inspect, "EnableIPv4": False, "EnableIPv6": True, "IPAM": {"Config": [{"Subnet": "fd00:20::/64"}]}}
    assert not definition_of(only6, "h1", "pyoverlay").ipv4, "an IPv6-only network stays IPv6-only everywhere"
    other = d.model_copy(update={"uid": "y", "origin_host": "h2"})
    assert same_network(d, other) is None, "who made it and its uid do not matter"
    assert "subnets" in (same_network(d, d.model_copy(update={"pools": []})) or "")
    assert "--opt" in (same_network(d, d.model_copy(update={"options": {}})) or "")


def test_names_follow_each_change_and_equal_a_fresh_build() -> None:
    """NameService applies each change in place; after moves, renames, aliases and a dead host the zones
    equal what a build from everything gives."""
    import random

    from kvstore import Keys, MemoryStore, WatchEvent
    from kvstore.records import AliasRecord, EndpointRecord, HostRecord, RemoteEndpoint
    from plugin.dns.names import NameService
    from plugin.dns.nameserver import build_zones
    from plugin.state import LocalState

    svc = NameService(MemoryStore(), Keys("/t"), LocalState(Path("/nonexistent/state.json")),
                      None, ["192.0.2.1"])  # type: ignore[arg-type]
    hosts = {h: HostRecord(host=h, vtep="10.99.0.1", port=4800, version="t", started=0.0) for h in ("h1", "h2")}
    rng = random.Random(7)
    records: dict[str, RemoteEndpoint] = {}
    aliases: dict[str, AliasRecord] = {}

    def ep(i: int, host: str, name: str | None, eid: str = "e") -> RemoteEndpoint:
        return RemoteEndpoint(EndpointRecord(endpoint_id=f"{eid}{i:04d}", network_key="n1", docker_network_id="d",
                                             host=host, vtep="10.99.0.1", mac="02:42:00:00:00:01",
                                             address=f"10.0.{i // 250}.{i % 250 + 1}/16", name=name))

    def key(i: int, eid: str = "e") -> str:
        return svc.keys.endpoint("n1", f"{eid}{i:04d}")

    for i in range(200):
        records[key(i)] = ep(i, "h1" if i % 2 else "h2", f"c{i}")
    svc.changed(dict(records), True, hosts)
    for step in range(300):
        i = rng.randrange(200)
        k, updates = key(i), {}
        roll = rng.random()
        if roll < 0.3:                                     # removed
            records.pop(k, None)
            updates[k] = None
        elif roll < 0.6:                                   # (re)created, renamed, on either host
            records[k] = ep(i, rng.choice(["h1", "h2"]), rng.choice([f"c{i}", f"r{i}", "shared"]))
            updates[k] = records[k]
        elif roll < 0.7:                                   # moving: the container's endpoint on another host
            old = records.get(k)                           # (a new endpoint ID), same name and IP, for a moment
            if old is not None:
                records[key(i, "m")] = ep(i, "h2" if old.host == "h1" else "h1", old.name, "m")
                updates[key(i, "m")] = records[key(i, "m")]
        else:                                              # Docker's aliases for it
            al = AliasRecord(endpoint_id=f"e{i:04d}", network_key="n1", host="h1", container=f"c{i}",
                             names=[f"c{i}", f"alias{step % 5}"])
            aliases[al.endpoint_id] = al
            svc._aliases._events([WatchEvent("put", svc.keys.aliases("n1", al.endpoint_id), al.dump(), step)])
        if updates:
            svc.changed(updates, False, hosts)
        if step == 150:
            hosts = {"h1": hosts["h1"]}                    # h2 no longer counts
            svc.changed({}, False, hosts)
        svc.settle()   # the names follow on a thread of their own
        fresh = build_zones(records.values(), set(hosts), aliases.values()).get("n1")
        got = svc.server.zones.get("n1")
        for table in ("addresses", "names"):   # the same names and addresses, in whatever order they came
            have = {n: set(getattr(got, table)(n)) for n in (got.forward if table == "addresses" else got.reverse)} \
                if got else {}
            assert have == ({n: set(getattr(fresh, table)(n))
                             for n in (fresh.forward if table == "addresses" else fresh.reverse)}
                            if fresh else {}), f"step {step}"
    svc.server.stop()
