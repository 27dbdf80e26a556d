"""Untrusted input, unit level: records from etcd, the text fed to ip/nft, DNS bounds, the state file.

Every string a hostile etcd writer could put in a record is refused before use, and what reaches the
kernel's parsers is built from canonical addresses and integers only. The end-to-end counterparts (real
etcd, dockerd, a non-root user, a DNS flood) are in tests/test_trust.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import pytest

from kvstore.records import (
    AUTH,
    QUARANTINE,
    AliasRecord,
    EndpointRecord,
    HostRecord,
    InvalidRecord,
    NetDefRecord,
    NetworkRecord,
)
from plugin.cluster.keyring import SAKey
from plugin.dns.nameserver import NameServer, RateLimit, Zone, to_wire
from plugin.kernel import ipsec, nftjson, vtepfilter
from plugin.state import LocalState, StateUnreadable

HOSTILE = [
    "10.99.0.2\nnetns exec x sh -c 'touch /tmp/pwned'",
    "10.99.0.2; touch /tmp/pwned",
    "$(touch /tmp/pwned)",
    "`touch /tmp/pwned`",
    '10.99.0.2" } ; flush ruleset ; table ip x {',
    "../../../../etc/passwd",
    "a" * 70_000,
    "zz:zz:zz:zz:zz:zz",
    "300.1.2.3",
    "",
    " 10.99.0.2",
]

DANGEROUS = set("\n\r\t ;$`\"'{}()|&<>\\")
PUB = base64.b64encode(bytes(range(32))).decode()
GOOD: dict[type, tuple[str, dict[str, Any]]] = {
    HostRecord: ("/p/hosts/h2", {"host": "h2", "vtep": "10.99.0.2", "port": 4800, "version": "0.1.0",
                                 "started": 1.5, "public_keys": {"1": PUB}, "key_epoch": 1, "seen": {"h1": 1}}),
    EndpointRecord: ("/p/endpoints/10.50.0.0_24/" + "e" * 64,
                     {"endpoint_id": "e" * 64, "network_key": "10.50.0.0_24", "docker_network_id": "d" * 64,
                      "host": "h2", "vtep": "10.99.0.2", "mac": "02:42:0a:32:00:0c", "address": "10.50.0.12/24",
                      "name": "web-1"}),
    NetworkRecord: ("/p/networks/10.50.0.0_24",
                    {"key": "10.50.0.0_24", "vni": 5000, "subnets": ["10.50.0.0/24"], "gateway": "10.50.0.1/24",
                     "encrypted": True, "port": 4800, "options": {"encrypted": ""}, "created_by": "h2"}),
    NetDefRecord: ("/p/netdefs/appnet", {"name": "appnet", "uid": "u" * 32, "origin_host": "h2",
                                         "origin_id": "d" * 64, "options": {"encrypted": ""},
                                         "pools": [{"subnet": "10.50.0.0/24"}], "labels": {"team": "blue"}}),
    AliasRecord: ("/p/aliases/10.50.0.0_24/" + "e" * 64,
                  {"endpoint_id": "e" * 64, "network_key": "10.50.0.0_24", "host": "h2", "container": "c" * 64,
                   "names": ["web", "web-1"]}),
}


def _string_fields(body: dict[str, Any], prefix: str = "") -> Iterator[tuple[list[str], str]]:
    for k, v in body.items():
        if isinstance(v, str):
            yield [*prefix.split("/")[1:], k] if prefix else [k], v
        elif isinstance(v, dict):
            yield from _string_fields(v, f"{prefix}/{k}")


def _with(body: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(body))
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return out


@pytest.fixture
def quarantine() -> Iterator[None]:
    QUARANTINE.refused.clear()
    yield
    QUARANTINE.refused.clear()


@pytest.fixture
def secret() -> Iterator[None]:
    AUTH.configure("unit-secret", "h2")
    try:
        yield
    finally:
        AUTH.configure(None, "")
        AUTH._last.clear()


@pytest.mark.parametrize("cls", list(GOOD), ids=lambda c: c.__name__)
def test_every_string_field_refuses_hostile_values(cls: type, quarantine: None) -> None:
    key, body = GOOD[cls]
    cls.load(json.dumps(body).encode(), key)  # the genuine record is fine
    counted = QUARANTINE.counts.get(cls.__name__, 0)
    for path, _ in _string_fields(body):
        free_text = path[0] in ("options", "labels")  # --opt and label values: any printable text
        for value in HOSTILE:
            raw = json.dumps(_with(body, path, value)).encode()
            try:
                cls.load(raw, key)
            except InvalidRecord:
                continue
            # Accepted only where the value can steer nothing: printable free text, or a plain word.
            if free_text:
                assert "\n" not in value and len(value) <= 1024, (cls.__name__, path, value[:40])
            else:
                assert not set(value) & DANGEROUS and ".." not in value, (cls.__name__, path, value[:40])
    assert QUARANTINE.counts[cls.__name__] - counted >= len(HOSTILE)  # each refusal counted


def test_a_record_must_sit_at_its_own_key(quarantine: None) -> None:
    key, body = GOOD[HostRecord]
    with pytest.raises(InvalidRecord, match="not its key"):
        HostRecord.load(json.dumps(body).encode(), "/p/hosts/h1")  # h2's record planted as h1's
    with pytest.raises(InvalidRecord, match="bytes, more than"):
        HostRecord.load(b"{" + b" " * 70_000 + b"}", key)
    with pytest.raises(InvalidRecord, match="not a JSON object"):
        HostRecord.load(b"[1]", key)


def test_signed_records_refuse_forgery_alteration_and_replay(secret: None, quarantine: None) -> None:
    key, body = GOOD[EndpointRecord]
    rec = EndpointRecord.model_validate(body)
    first = rec.dump()
    assert EndpointRecord.load(first, key) == rec
    assert EndpointRecord.load(first, key) == rec  # the same record again (a resync) is fine
    # unsigned, as someone without the secret would write it
    with pytest.raises(InvalidRecord, match="no authentication code"):
        EndpointRecord.load(json.dumps(body).encode(), key)
    # altered: another VTEP, the code kept
    altered = json.loads(first)
    altered["vtep"] = "10.99.0.66"
    with pytest.raises(InvalidRecord, match="fails authentication"):
        EndpointRecord.load(json.dumps(altered).encode(), key)
    # written by a host other than the one it describes
    AUTH.configure("unit-secret", "h3")
    with pytest.raises(InvalidRecord, match="written by h3"):
        EndpointRecord.load(rec.dump(), key)
    AUTH.configure("unit-secret", "h2")
    # replay: a newer record seen, then the older one put back
    newer = rec.model_copy(update={"name": "web-2"}).dump()
    assert EndpointRecord.load(newer, key).name == "web-2"
    with pytest.raises(InvalidRecord, match="replay"):
        EndpointRecord.load(first, key)
    # deleted, then its last record put back
    EndpointRecord.deleted(key)
    with pytest.raises(InvalidRecord, match="replay"):
        EndpointRecord.load(newer, key)
    assert EndpointRecord.load(rec.dump(), key) == rec  # a fresh write by the host is accepted
    # another secret
    AUTH.configure("another-secret", "h2")
    with pytest.raises(InvalidRecord, match="fails authentication"):
        EndpointRecord.load(first, key)


def test_signatures_check_in_the_writers_exact_text(secret: None, quarantine: None) -> None:
    """Signatures are checked against orjson's text first (a restart checks tens of thousands); where it is
    not the writer's text (json.dumps: non-ASCII escaped, 1e-05, integers past 64 bits, in fields a newer
    version added), the writer's exact form decides: such records still pass, and forgeries still fail."""
    key, body = GOOD[EndpointRecord]
    for extra in ("caf\u00e9 \u2603", 1e-05, 1e16, 2 ** 70):
        sealed = AUTH.seal("EndpointRecord", {**body, "note": extra})
        assert EndpointRecord.load(json.dumps(sealed).encode(), key).endpoint_id == body["endpoint_id"]
        forged = {**sealed, "note": "other"}
        with pytest.raises(InvalidRecord, match="fails authentication"):
            EndpointRecord.load(json.dumps(forged).encode(), key)
        AUTH._last.clear()


def test_unsigned_kinds_and_no_secret_stay_unsigned() -> None:
    key, body = GOOD[HostRecord]
    rec = HostRecord.model_validate(body)
    assert "auth" not in json.loads(rec.dump())
    assert HostRecord.load(rec.dump(), key) == rec


def test_guard_and_filter_rulesets_are_json_with_numbers_only() -> None:
    cmds = ipsec._ruleset([5000, 6000], 4800)
    text = json.dumps({"nftables": cmds})
    for obj in json.loads(text)["nftables"]:
        for rule in [obj["add"]["rule"]] if "rule" in obj.get("add", {}) else []:
            values = [m["match"]["right"] for m in rule["expr"] if "match" in m]
            assert all(isinstance(v, (int, bool)) for v in values), values
            assert rule["comment"].startswith("pyoverlay")
    assert nftjson.vxlan_vni(5000)["match"]["right"] == 5000
    elems = vtepfilter._elements("vteps4", ["10.99.0.1", "10.99.0.2"])
    assert elems[1]["add"]["element"]["elem"] == ["10.99.0.1", "10.99.0.2"]


def test_xfrm_lines_take_canonical_addresses_only() -> None:
    good = SAKey(0x1234, bytes(20), "10.99.0.1", "10.99.0.2", 1, 1)
    line = ipsec.IPsec._state_add(good)
    assert line.count("\n") == 0 and " src 10.99.0.1 dst 10.99.0.2 " in line
    for bad in HOSTILE:
        with pytest.raises(ValueError):
            ipsec.IPsec._state_add(SAKey(0x1234, bytes(20), bad, "10.99.0.2", 1, 1))
        with pytest.raises(ValueError):
            ipsec.IPsec._policy("update", ipsec.Policy("10.99.0.1", bad, 4800))


def test_keys_never_reach_argv_even_when_the_batch_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[str], str | None]] = []

    class Done:
        returncode, stdout, stderr = 1, "", "RTNETLINK answers: File exists"

    def fake_run(args: list[str], stdin: str | None = None) -> Done:
        calls.append((args, stdin))
        return Done()

    monkeypatch.setattr(ipsec, "run", fake_run)
    key = bytes(range(20))
    # An SPI already taken is a failure of that peer's state (never "fine"), and the other peer's still runs.
    failed = ipsec.IPsec().apply([SAKey(0x4321, key, "10.99.0.1", "10.99.0.2", 1, 1),
                                  SAKey(0x4322, key, "10.99.0.1", "10.99.0.3", 1, 1)], [], [], [])
    assert [(src, dst) for src, dst, _ in failed] == [("10.99.0.1", "10.99.0.2"), ("10.99.0.1", "10.99.0.3")]
    assert all("File exists" in why and key.hex() not in why for _, _, why in failed)
    assert len(calls) == 3  # the batch, then each line alone
    assert len(calls) >= 2
    for args, stdin in calls:
        assert key.hex() not in " ".join(args)
        assert args == ["ip", "-batch", "-"] and stdin is not None and key.hex() in stdin


def test_dns_rate_limit_is_per_source_and_bounded() -> None:
    rl = RateLimit(rate=10, burst=20, sources=100)
    assert sum(rl.allow("10.0.0.2", now=0.0) for _ in range(100)) == 20
    assert rl.allow("10.0.0.3", now=0.0)       # another source is not affected
    assert sum(rl.allow("10.0.0.2", now=1.0) for _ in range(100)) == 10  # refilled at the rate
    for i in range(1000):
        rl.allow(f"10.1.{i // 250}.{i % 250}", now=2.0)
    assert len(rl._buckets) <= 100


def test_dns_truncates_instead_of_failing_and_refuses_forwarding_on_internal_networks() -> None:
    zone = Zone()
    for i in range(200):
        zone.add("big", f"10.50.{i // 250}.{i % 250 + 1}")
    query = dns.message.make_query("big", "A")
    server = NameServer(["127.0.0.1"])
    try:
        server.zones = {"n": zone}
        wire = server.resolve(query.to_wire(), "n", tcp=False)
        assert wire is not None and len(wire) <= 512
        reply = dns.message.from_wire(wire)
        assert reply.flags & dns.flags.TC and not reply.answer
        full = dns.message.from_wire(server.resolve(query.to_wire(), "n", tcp=True) or b"")
        assert len(full.answer[0]) == 200
        outside = dns.message.make_query("example.org", "A").to_wire()
        refused = dns.message.from_wire(server.resolve(outside, "n", tcp=False, internal=True) or b"")
        assert refused.rcode() == dns.rcode.REFUSED
    finally:
        server.stop()
    short = to_wire(dns.message.make_response(query), query, 512)
    assert dns.message.from_wire(short).rcode() == dns.rcode.NOERROR


def test_an_unreadable_state_file_stops_instead_of_starting_empty(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"networks": {"x": ')
    with pytest.raises(StateUnreadable, match="will not start"):
        LocalState(path)
    assert path.read_text() == '{"networks": {"x": '  # left for the operator
    ok = LocalState(tmp_path / "fresh.json")
    ok.save()
    assert (tmp_path / "fresh.json").stat().st_mode & 0o777 == 0o600


class FakeIPsec:
    """The kernel's xfrm as a dictionary; adding a state towards/from one VTEP fails (an SPI taken, say)."""

    def __init__(self, broken: str) -> None:
        self.broken = broken
        self.st: set[ipsec.State] = set()
        self.pol: set[ipsec.Policy] = set()

    def set_guard(self, vnis: list[int], port: int) -> None:
        pass

    def set_catchall(self, port: int | None, old: int | None = None) -> None:
        pass

    def states(self) -> list[ipsec.State]:
        return list(self.st)

    def policies(self) -> list[ipsec.Policy]:
        return list(self.pol)

    def apply(self, add: list[SAKey], set_policies: list[ipsec.Policy], del_policies: list[ipsec.Policy],
              del_states: list[ipsec.State]) -> list[tuple[str, str, str]]:
        failed = []
        for sa in add:
            if self.broken in (sa.src, sa.dst):
                failed.append((sa.src, sa.dst, "File exists"))
            else:
                self.st.add(ipsec.State(sa.src, sa.dst, sa.spi))
        self.pol |= set(set_policies)
        self.pol -= set(del_policies)
        self.st -= set(del_states)
        return failed


def test_one_bad_peer_affects_only_itself_and_keys_are_published_once_installed(tmp_path: Path) -> None:
    from plugin.cluster.encryption import Encryption
    from plugin.cluster.keyring import KeyRing

    fake = FakeIPsec(broken="10.0.0.3")
    enc = Encryption(KeyRing(tmp_path / "h1"), fake, "h1", lambda: "10.0.0.1", 4801, None, 60, 128)  # type: ignore[arg-type]
    record = HostRecord(host="h1", vtep="10.0.0.1", port=4800, version="t", started=0.0)
    assert enc.stamp(record).public_keys == {}, "no key is published before its inbound states are in"

    def peer(name: str, vtep: str) -> HostRecord:
        ring = KeyRing(tmp_path / name)
        return HostRecord(host=name, vtep=vtep, port=4800, version="t", started=0.0, public_keys=ring.public(),
                          key_epoch=ring.epoch, nonces={"h1": "ab" * 16})  # their side for us is in

    hosts = {"h2": peer("h2", "10.0.0.2"), "h3": peer("h3", "10.0.0.3")}
    assert enc.sync(hosts, {5000: "k"}) is True
    assert "h3" in enc.refused and "h2" not in enc.refused
    assert enc.seen == {"h2": hosts["h2"].key_epoch}
    assert {s.dst for s in fake.st} == {"10.0.0.1", "10.0.0.2"} and {s.src for s in fake.st} == {"10.0.0.1", "10.0.0.2"}
    assert enc.stamp(record).public_keys == enc.keyring.public()
    # A new epoch is not published until a sync has put its inbound states in.
    enc.rotate()
    assert max(enc.stamp(record).public_keys) < enc.keyring.epoch
    enc.sync(hosts, {5000: "k"})
    assert max(enc.stamp(record).public_keys) == enc.keyring.epoch


def _host(enc, name: str, vtep: str) -> HostRecord:  # type: ignore[no-untyped-def]
    return enc.stamp(HostRecord(host=name, vtep=vtep, port=4800, version="t", started=0.0))


def test_both_ends_derive_the_same_sa_and_a_returning_peer_never_gets_an_old_one(tmp_path: Path) -> None:
    from plugin.cluster.encryption import Encryption
    from plugin.cluster.keyring import KeyRing

    k1, k2 = FakeIPsec(broken="-"), FakeIPsec(broken="-")
    e1 = Encryption(KeyRing(tmp_path / "h1"), k1, "h1", lambda: "10.0.0.1", 4801, None, 60, 128)  # type: ignore[arg-type]
    e2 = Encryption(KeyRing(tmp_path / "h2"), k2, "h2", lambda: "10.0.0.2", 4801, None, 60, 128)  # type: ignore[arg-type]
    vnis = {5000: "k"}

    def exchange() -> None:
        for _ in range(3):  # keys, then each side's nonce for the other, then acks
            e1.sync({"h2": _host(e2, "h2", "10.0.0.2")}, vnis)
            e2.sync({"h1": _host(e1, "h1", "10.0.0.1")}, vnis)

    e1.sync({}, vnis)
    e2.sync({}, vnis)
    exchange()
    out1 = {st for st in k1.st if st.src == "10.0.0.1"}
    in2 = {st for st in k2.st if st.src == "10.0.0.1"}
    assert out1 and out1 <= in2, "h1 sends with an SA that h2 has as inbound"
    assert {st for st in k2.st if st.src == "10.0.0.2"} <= {st for st in k1.st if st.src == "10.0.0.2"}
    before = {st.spi for st in k1.st if st.dst == "10.0.0.1"}
    # h2 departs: h1 removes everything of it. It returns with the same key pairs: h1 makes its inbound side
    # afresh under a new nonce, so no SA (and no replay window) comes back the same.
    e1.sync({}, vnis)
    assert not k1.st
    exchange()
    after = {st.spi for st in k1.st if st.dst == "10.0.0.1"}
    assert after and not before & after
    out1 = {st for st in k1.st if st.src == "10.0.0.1"}
    assert out1 and out1 <= {st for st in k2.st if st.src == "10.0.0.1"}


def test_an_spi_collision_is_derived_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    from plugin.cluster import encryption as enc_mod
    from plugin.cluster.encryption import Encryption
    from plugin.cluster.keyring import KeyRing, derive

    calls = {"n": 0}

    def colliding(*args: Any, **kwargs: Any) -> SAKey:
        sa = derive(*args, **kwargs)
        calls["n"] += 1
        return SAKey(0x4444, sa.key, sa.src, sa.dst, sa.src_epoch, sa.dst_epoch) if calls["n"] <= 2 else sa

    monkeypatch.setattr(enc_mod, "derive", colliding)
    fake = FakeIPsec(broken="-")
    e1 = Encryption(KeyRing(tmp_path / "h1"), fake, "h1", lambda: "10.0.0.1", 4801, None, 60, 128)  # type: ignore[arg-type]
    e1.keyring.rotate()  # two epochs: two inbound states per peer epoch
    ring = KeyRing(tmp_path / "h2")
    rec = HostRecord(host="h2", vtep="10.0.0.2", port=4800, version="t", started=0.0, public_keys=ring.public())
    e1.sync({"h2": rec}, {5000: "k"})
    spis = [st.spi for st in fake.st if st.dst == "10.0.0.1"]
    assert len(spis) == len(set(spis)) == 2, "both inbound states installed, with distinct SPIs"
    assert "collides" in caplog.text and calls["n"] >= 4, "the colliding pair was derived again under a new nonce"


def test_guard_repair_keeps_encrypted_vxlan_down_until_everything_is_back_then_up() -> None:
    from plugin.runtime.reconciler import Reconciler

    class Enc:
        vnis = {5000: "k"}

        def __init__(self) -> None:
            self.missing = ["the xfrm catch-all policies", "per-peer xfrm policies"]
            self.repaired = 0

        def guard_missing(self) -> list[str]:
            return list(self.missing)

        def repair_guard(self) -> None:
            self.repaired += 1
            self.missing = ["per-peer xfrm policies"]  # catch-alls back; the policies need a sync

    class Peers:
        def __init__(self, enc: Enc) -> None:
            self.enc, self.synced_policies, self.forced = enc, 0, []

        def full_pass(self) -> None:
            self.enc.missing = []   # a sync puts the per-peer policies back
            self.synced_policies += 1

        def verify_kernel(self, force: Iterable[int] = ()) -> list[int]:
            self.forced.append(set(force))   # a device brought up lost its entries: read at once
            return []

    class Path:
        def __init__(self) -> None:
            self.up: dict[int, bool] = {}

        def set_vxlan_up(self, vni: int, up: bool) -> bool:
            self.up[vni] = up
            return True

    r = Reconciler.__new__(Reconciler)
    enc, path = Enc(), Path()
    r.encryption, r.datapath, r.peers, r._guard_down = enc, path, Peers(enc), set()  # type: ignore[assignment]
    done = r.repair_guard()
    assert path.up == {5000: True} and enc.repaired == 1 and "up again" in done[0]
    # Something a sync cannot repair: the devices stay down, and come up at the first pass that finds it back.
    enc.missing = ["the iptables guard"]
    enc.repair_guard = lambda: None  # type: ignore[method-assign]
    r.peers.full_pass = lambda: None  # type: ignore[method-assign]
    assert "still missing" in r.repair_guard()[0] and path.up == {5000: False}
    enc.missing = []
    assert "up again" in r.repair_guard()[0] and path.up == {5000: True}
    assert r.peers.forced == [{5000}, {5000}]  # type: ignore[attr-defined]
    assert r.repair_guard() == []


SAVED_FILTER = """# Generated by iptables-save v1.8.9
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:PYOVERLAY-VTEP - [0:0]
:PYOVERLAY-VTEP2 - [0:0]
-A INPUT -j PYOVERLAY-VTEP
-A INPUT -p tcp -j PYOVERLAY-VTEP2
-A PYOVERLAY-VTEP -p udp -m multiport --dports 4800,4801 -m set ! --match-set pyoverlay-vteps src -j DROP
-A PYOVERLAY-VTEP2 -j DROP
COMMIT
"""


def test_a_saved_table_answers_what_check_and_list_chain_would() -> None:
    """One iptables-save read stands for `-C hook -j chain` and `-S chain` (the checks' many forks)."""
    from plugin.kernel import xtables
    assert xtables.jumps_in(SAVED_FILTER, "INPUT", "PYOVERLAY-VTEP")
    assert not xtables.jumps_in(SAVED_FILTER, "INPUT", "PYOVERLAY-VTEP2"), "a jump with a match is not the hook"
    assert not xtables.jumps_in(SAVED_FILTER, "OUTPUT", "PYOVERLAY-VTEP")
    rules = xtables.rules_in(SAVED_FILTER, "PYOVERLAY-VTEP")
    assert rules.splitlines() == ["-N PYOVERLAY-VTEP", "-A PYOVERLAY-VTEP -p udp -m multiport --dports 4800,4801 "
                                  "-m set ! --match-set pyoverlay-vteps src -j DROP"]
    assert xtables.rules_in(SAVED_FILTER, "PYOVERLAY-GONE") == ""
    assert xtables.rules_in("", "PYOVERLAY-VTEP") == ""


POLICIES = """src 10.99.0.1/32 dst 10.99.0.2/32 proto udp dport 4801
	dir out priority 0 ptype main
	tmpl src 10.99.0.1 dst 10.99.0.2
		proto esp reqid 1886981722 mode transport
src 10.99.0.1/32 dst 10.99.0.3/32 proto udp dport 4801
	dir in priority 0 ptype main
	tmpl src 10.99.0.1 dst 10.99.0.3
		proto esp reqid 1886981722 mode transport
src 10.99.0.1/32 dst 10.99.0.4/32 proto udp dport 4801
	dir out priority 0 ptype main
	tmpl src 10.99.0.1 dst 10.99.0.4
		proto esp reqid 7 mode transport
"""


def test_one_policy_listing_serves_both_checks() -> None:
    """The per-peer policies read from one full listing: only outbound ones with our reqid."""
    got = ipsec.IPsec.policies(ipsec.IPsec.__new__(ipsec.IPsec), POLICIES)
    assert got == [ipsec.Policy("10.99.0.1", "10.99.0.2", 4801)]


def test_an_nft_listing_takes_only_plain_identifiers() -> None:
    """The listing is the one text that reaches nft's parser: a word that could end or add a command is
    refused before anything runs."""
    for bad in ("x; flush ruleset", "pyoverlay vtep", "a\nflush ruleset", "", "Table", "{x}"):
        with pytest.raises(ValueError):
            nftjson.listing("table", "ip", bad)
