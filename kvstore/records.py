"""Typed records stored in etcd (JSON), validated on every read: etcd is not trusted.

Anyone who can write etcd can write any bytes under the prefix, so every field is checked against what
pyoverlay itself would write (addresses and CIDRs by `ipaddress`, MACs, VNI and port ranges, names and keys
by pattern and length) before anything uses it. A record that fails is refused whole: `Record.load` raises
InvalidRecord, and the refusal is noted once in `QUARANTINE` (logged, counted, shown by `pyoverlay doctor`).
Values that pass are canonical (`10.0.0.1`, never ` 10.0.0.1\n...`), so later code may put them in argv.
Unknown fields are ignored so newer hosts can add fields.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Annotated, ClassVar, Literal, Protocol, TypeVar

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

log = logging.getLogger(__name__)

R = TypeVar("R", bound="Record")


class Stored(Protocol):
    """What a record is read from (kvstore.client.KV)."""
    @property
    def key(self) -> str: ...

    @property
    def value(self) -> bytes: ...

MAX_RECORD_BYTES = 64 * 1024    # a real record is well under 4 KiB; bigger ones are refused unread
VNI_MAX = (1 << 24) - 1

# Names and identifiers as pyoverlay and Docker make them. None contains "/", whitespace, quotes, braces or
# shell metacharacters.
HostName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
NetworkKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
ObjectID = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
PoolID = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
# Container names, --network-alias values and DNS names: DNS-ish text, no control characters.
DnsName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}$")]
Mac = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")]
HexMac = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Version = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,31}$")]
OptKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,127}$")]
OptValue = Annotated[str, StringConstraints(max_length=1024, pattern=r"^[^\x00-\x1f\x7f]*$")]
Port = Annotated[int, Field(ge=1, le=65535)]
Vni = Annotated[int, Field(ge=1, le=VNI_MAX)]
Epoch = Annotated[int, Field(ge=0, le=2**62)]


def _ip(value: str) -> str:
    # The C parser first: a restart validates tens of thousands of records, and ipaddress's pure-Python
    # parsing was half of each; ipaddress decides (and says why) whatever it does not take plainly.
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            canonical = socket.inet_ntop(family, socket.inet_pton(family, value))
        except (OSError, ValueError):
            continue
        if family == socket.AF_INET or not canonical.startswith("::ffff:"):  # ipaddress spells those apart
            return canonical
    return str(ipaddress.ip_address(value))


def _interface(value: str) -> str:
    address, slash, prefix = value.partition("/")
    if slash and prefix.isdigit() and prefix.isascii() and (prefix == "0" or prefix[0] != "0"):
        try:
            plain = _ip(address)
        except ValueError:
            plain = ""
        if plain and int(prefix) <= (32 if ":" not in plain else 128):
            return f"{plain}/{prefix}"
    return str(ipaddress.ip_interface(value))


def _cidr(value: str) -> str:
    return str(ipaddress.ip_network(value))


def _public_key(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError("an X25519 public key has 32 bytes")
    return value


IP = Annotated[str, StringConstraints(max_length=64), AfterValidator(_ip)]
Interface = Annotated[str, StringConstraints(max_length=64), AfterValidator(_interface)]
Cidr = Annotated[str, StringConstraints(max_length=64), AfterValidator(_cidr)]
PublicKey = Annotated[str, StringConstraints(max_length=64), AfterValidator(_public_key)]


_DNS_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}$")


def dns_name(value: object) -> str | None:
    """value when it is a name a record may carry (container names, aliases), else None."""
    return value if isinstance(value, str) and _DNS_NAME.match(value) else None


class InvalidRecord(ValueError):
    """A record from etcd that is not what pyoverlay writes: refused whole."""


class Quarantine:
    """Refused records: each (kind, key) is logged when first refused and again when its reason changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.refused: dict[tuple[str, str], str] = {}     # (record kind, etcd key) -> why
        self.counts: dict[str, int] = {}
        self.on_refuse: Callable[[str], None] = lambda kind: None  # the plugin counts them in a metric

    def note(self, kind: str, key: str, why: str) -> None:
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            new = self.refused.get((kind, key)) != why
            if new:
                if len(self.refused) >= 1000:  # a flood of bad keys must not grow memory without end
                    self.refused.pop(next(iter(self.refused)))
                self.refused[(kind, key)] = why
        if new:
            log.error("refused an invalid %s record%s: %s", kind, f" at {key}" if key else "", why)
        try:
            self.on_refuse(kind)
        except Exception:  # noqa: BLE001 - counting must never break reading
            pass

    def clear(self, kind: str, key: str) -> None:
        """The key now holds a valid record (or none)."""
        if (kind, key) in self.refused:
            with self._lock:
                self.refused.pop((kind, key), None)

    def snapshot(self) -> list[tuple[str, str, str]]:
        with self._lock:
            return sorted((k, key, why) for (k, key), why in self.refused.items())


QUARANTINE = Quarantine()


class Authenticator:
    """With a cluster secret: records that steer traffic carry {"auth": {writer, counter, mac}}.

    The MAC (HMAC-SHA256 with the secret) covers the record kind, every field, the writer and the counter;
    the record's own identity fields are bound to its etcd key by `key_tail`, so a record cannot be moved
    to another key either. The counter grows with every write of a writer (nanoseconds, never repeating),
    and a reader refuses a record older than the last it accepted at that key, or one at a key it saw
    deleted (a replay). Without a secret nothing is signed or checked: whoever may write etcd is trusted.
    """

    def __init__(self) -> None:
        self.secret: bytes | None = None
        self._keyed: hmac.HMAC | None = None
        self.writer = ""
        self._lock = threading.Lock()
        self._counter = 0
        # kind -> key -> newest counter accepted (+1: deleted); per kind, not per (kind, key) pair: a fleet's
        # hosts hold tens of thousands of keys, and a pair tuple is 56 bytes more for each
        self._last: dict[str, dict[str, int]] = {}

    def configure(self, secret: str | None, writer: str) -> None:
        self.secret = secret.encode() if secret else None
        # Keyed once: each MAC starts from a copy instead of keying HMAC again (a record is checked on every
        # host at every change).
        self._keyed = hmac.new(self.secret, digestmod=hashlib.sha256) if self.secret else None
        self.writer = writer

    def _mac(self, kind: str, body: dict[str, object], writer: str, counter: int, fast: bool = False) -> str:
        """HMAC of the canonical text: json.dumps with sorted keys and no spaces, what every version writes.
        fast: orjson's text instead, the same bytes for records of ASCII strings and integers (all of ours; a
        restart checks tens of thousands, at a third of the cost); check() falls back on a mismatch."""
        assert self._keyed is not None
        signed = {"kind": kind, "body": body, "writer": writer, "counter": counter}
        text = None
        if fast:
            with contextlib.suppress(TypeError):   # an integer beyond 64 bits: only json.dumps writes it
                text = orjson.dumps(signed, option=orjson.OPT_SORT_KEYS)
        if text is None:
            text = json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()
        mac = self._keyed.copy()
        mac.update(text)
        return mac.hexdigest()

    def _matches(self, mac: str, kind: str, body: dict[str, object], writer: str, counter: int) -> bool:
        # orjson's text differs from the writer's only where a body has non-ASCII text (not escaped) or some
        # float spellings (1e-05): there the exact form decides.
        return hmac.compare_digest(mac, self._mac(kind, body, writer, counter, fast=True)) or \
            hmac.compare_digest(mac, self._mac(kind, body, writer, counter))

    def seal(self, kind: str, body: dict[str, object]) -> dict[str, object]:
        if self.secret is None:
            return body
        with self._lock:
            self._counter = max(self._counter + 1, time.time_ns())
            counter = self._counter
        return {**body, "auth": {"writer": self.writer, "counter": counter,
                                 "mac": self._mac(kind, body, self.writer, counter)}}

    def check(self, kind: str, key: str, body: dict[str, object], auth: object, writer_field: str | None) -> str:
        """"" when acceptable, else why not."""
        if self.secret is None:
            return ""
        if not isinstance(auth, dict):
            return "it carries no authentication code, and PYOVERLAY_CLUSTER_SECRET is set"
        writer, counter, mac = auth.get("writer"), auth.get("counter"), auth.get("mac")
        if not isinstance(writer, str) or not isinstance(counter, int) or not isinstance(mac, str):
            return "its authentication code is malformed"
        if not self._matches(mac, kind, body, writer, counter):
            return "it fails authentication (forged or altered, or written with another PYOVERLAY_CLUSTER_SECRET)"
        if writer_field is not None and body.get(writer_field) != writer:
            return f"it was written by {writer}, not by the host it describes"
        if key:
            with self._lock:
                seen = self._last.setdefault(kind, {})
                if counter < seen.get(key, 0):
                    return "it is older than one already seen at this key (a replay)"
                seen[key] = counter
        return ""

    def deleted(self, kind: str, key: str) -> None:
        """The key was deleted: the record it held must not come back (a replay); a new write will."""
        if self.secret is not None:
            with self._lock:
                seen = self._last.get(kind, {})
                if key in seen:
                    seen[key] += 1


AUTH = Authenticator()


def _why(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        where = ".".join(str(x) for x in e["loc"]) or "record"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)[:300]


# pydantic keeps, per model instance, the set of fields it was given (728 bytes for 9 names): records read
# from etcd, tens of thousands of them, share one set per distinct set of names instead. Only
# `model_dump(exclude_unset=True)` reads it (never used here); model_copy copies it before changing it.
_FIELDS_SETS: dict[frozenset[str], set[str]] = {}
# 20 digits in a row, found in C (a regular expression costs 15 us a record): digits mapped to NUL, which
# JSON text cannot hold raw
_DIGITS = bytes.maketrans(b"0123456789", b"\0" * 10)
_TWENTY_DIGITS = b"\0" * 20


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)
    # Records that steer traffic or names are authenticated when a cluster secret is set (AUTH).
    signed: ClassVar[bool] = False
    writer_field: ClassVar[str | None] = None   # the field that must name the writer
    # Fields whose values repeat across many records of a fleet (a network's key, a host's name and VTEP):
    # records loaded from etcd keep one copy of each distinct value.
    shared_fields: ClassVar[tuple[str, ...]] = ()

    def content(self) -> bytes:
        """The record without authentication: what to compare."""
        return self.model_dump_json(exclude_none=True).encode()

    def dump(self) -> bytes:
        """What to store: the content, sealed by AUTH for signed kinds."""
        if not self.signed or AUTH.secret is None:
            return self.content()
        return json.dumps(AUTH.seal(type(self).__name__, json.loads(self.content()))).encode()

    @classmethod
    def deleted(cls, key: str) -> None:
        AUTH.deleted(cls.__name__, key)

    def key_tail(self) -> tuple[str, ...]:
        """The last segments of the etcd key this record must be stored at (empty: not checked)."""
        return ()

    @classmethod
    def load(cls: type[R], raw: bytes, key: str = "") -> R:
        """Parse, validate and authenticate; raises InvalidRecord (a ValueError), noted in QUARANTINE."""
        rec, why = cls._parse(raw, key)
        if rec is not None:
            if key:
                QUARANTINE.clear(cls.__name__, key)
            return rec
        QUARANTINE.note(cls.__name__, key, why)
        raise InvalidRecord(f"invalid {cls.__name__} record{f' at {key}' if key else ''}: {why}")

    @classmethod
    def _parse(cls: type[R], raw: bytes, key: str) -> tuple[R | None, str]:
        if len(raw) > MAX_RECORD_BYTES:
            return None, f"{len(raw)} bytes, more than {MAX_RECORD_BYTES}"
        try:
            # orjson in C, except where it would read an integer past 64 bits as a float (20 digits or more)
            body = json.loads(raw) if _TWENTY_DIGITS in raw.translate(_DIGITS) else orjson.loads(raw)
        except ValueError as err:   # orjson.JSONDecodeError is one too
            return None, f"not JSON: {str(err)[:100]}"
        if not isinstance(body, dict):
            return None, "not a JSON object"
        auth = body.pop("auth", None)
        try:
            rec = cls.model_validate(body)
        except ValidationError as err:
            return None, _why(err)
        tail = "/" + "/".join(rec.key_tail())
        if key and tail != "/" and not key.endswith(tail):
            return None, f"it names {tail.lstrip('/')}, which is not its key"  # no record speaks for another
        if cls.signed:
            why = AUTH.check(cls.__name__, key, body, auth, cls.writer_field)
            if why:
                return None, why
        return rec._compacted(), ""

    def _compacted(self: R) -> R:
        """The same record in less memory (a fleet's hosts hold tens of thousands): see _FIELDS_SETS and
        shared_fields."""
        values = self.__dict__
        for name in self.shared_fields:
            value = values.get(name)
            if type(value) is str:
                values[name] = sys.intern(value)   # interned strings are freed when no record holds them
        given = self.__pydantic_fields_set__
        object.__setattr__(self, "__pydantic_fields_set__", _FIELDS_SETS.setdefault(frozenset(given), given))
        return self

    @classmethod
    def load_valid(cls: type[R], kvs: Iterable[Stored]) -> dict[str, R]:
        """etcd key -> record for every valid record among kvs; invalid ones are noted and skipped."""
        out = {}
        for kv in kvs:
            try:
                out[kv.key] = cls.load(kv.value, kv.key)
            except InvalidRecord:
                continue
        return out


class HostRecord(Record):
    signed = True
    writer_field = 'host'
    host: HostName
    vtep: IP
    port: Port
    version: Version
    started: float
    public_keys: dict[Epoch, PublicKey] = Field(default_factory=dict, max_length=8)  # per held epoch
    key_epoch: Epoch | None = None                               # the newest of them
    key_mac: HexMac | None = None    # HMAC of host, vtep and public_keys with PYOVERLAY_CLUSTER_SECRET
    seen: dict[HostName, Epoch] = Field(default_factory=dict, max_length=10000)  # peer -> newest epoch
    # peer -> nonce of the SAs from that peer to this host, published once their inbound side is installed
    nonces: dict[HostName, Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]] = Field(
        default_factory=dict, max_length=10000)

    def key_tail(self) -> tuple[str, ...]:
        return (self.host,)


class NetworkRecord(Record):
    signed = True
    writer_field = None
    key: NetworkKey               # cluster-wide identity: the subnet, or -o pyoverlay.network=ID
    vni: Annotated[int, Field(ge=0, le=VNI_MAX)]  # 0 only in a record being built (never stored)
    subnets: list[Cidr] = Field(max_length=2)     # IPv4 and/or IPv6 pools
    gateway: Interface | None = None    # as Docker reported it (CIDR), IPv4
    gateway6: Interface | None = None
    encrypted: bool = False
    port: Annotated[int, Field(ge=0, le=65535)]
    mtu: Annotated[int, Field(ge=576, le=65535)] | None = None  # user override (-o ...driver.mtu)
    internal: bool = False
    options: dict[OptKey, OptValue] = Field(default_factory=dict, max_length=32)  # --opt, for propagation
    created_by: Annotated[str, StringConstraints(pattern=r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,62})?$")]

    def key_tail(self) -> tuple[str, ...]:
        return (self.key,)


class DepartureRecord(Record):
    host: HostName
    since: float                  # wall clock of the host that first saw it gone
    seen_by: HostName

    def key_tail(self) -> tuple[str, ...]:
        return (self.host,)


class MemberRecord(Record):
    host: HostName
    docker_network_id: ObjectID

    def key_tail(self) -> tuple[str, ...]:
        return (self.host,)


class EndpointRecord(Record):
    signed = True
    writer_field = 'host'
    shared_fields = ("network_key", "docker_network_id", "host", "vtep")
    endpoint_id: ObjectID
    network_key: NetworkKey
    docker_network_id: ObjectID
    host: HostName
    vtep: IP
    mac: Mac
    address: Interface | None = None    # CIDR
    address6: Interface | None = None   # CIDR
    name: DnsName | None = None         # container name when known

    def key_tail(self) -> tuple[str, ...]:
        return (self.network_key, self.endpoint_id)


class RemoteEndpoint:
    """An endpoint record as the peers and the names hold it (tens of thousands per host): the validated
    EndpointRecord's fields in slots, ~120 bytes instead of pydantic's ~350 (an instance and its __dict__),
    plus each address without its prefix length (`ip`, `ip6`), made once and shared by the kernel entry and
    the DNS names. Read-only by convention; EndpointRecord stays what is written and compared."""

    __slots__ = ("endpoint_id", "network_key", "docker_network_id", "host", "vtep", "mac", "address", "address6",
                 "name", "ip", "ip6")
    endpoint_id: str
    network_key: str
    docker_network_id: str
    host: str
    vtep: str
    mac: str
    address: str | None
    address6: str | None
    name: str | None
    ip: str | None
    ip6: str | None

    def __init__(self, rec: EndpointRecord) -> None:
        values = rec.__dict__
        for field in EndpointRecord.model_fields:
            setattr(self, field, values[field])
        self.ip = rec.address.split("/")[0] if rec.address else None
        self.ip6 = rec.address6.split("/")[0] if rec.address6 else None

    @classmethod
    def load(cls, raw: bytes, key: str = "") -> RemoteEndpoint:
        """EndpointRecord.load (validated, authenticated, noted in QUARANTINE when refused), kept small."""
        return cls(EndpointRecord.load(raw, key))

    @staticmethod
    def deleted(key: str) -> None:
        EndpointRecord.deleted(key)

    def addresses(self) -> tuple[tuple[str, str], ...]:
        """(address as the record gives it, plain address) of each family it has."""
        return tuple((a, ip) for a, ip in ((self.address, self.ip), (self.address6, self.ip6)) if a and ip)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RemoteEndpoint):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self.__slots__)

    __hash__ = None  # type: ignore[assignment]   # mutable slots, like the record it stands for

    def __repr__(self) -> str:
        return f"RemoteEndpoint({', '.join(f'{f}={getattr(self, f)!r}' for f in EndpointRecord.model_fields)})"


class PoolRecord(Record):
    pool_id: PoolID
    cidr: Cidr
    family: Literal[4, 6]
    explicit: bool                # keyed by --ipam-opt pyoverlay.network: may overlap other pools
    ip_range: Cidr | None = None
    gateway: IP | None = None     # plain address once assigned
    refs: dict[HostName, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)  # host -> RequestPool count

    def key_tail(self) -> tuple[str, ...]:
        return (self.pool_id,)


class AddressRecord(Record):
    address: IP
    kind: Literal["endpoint", "gateway", "reserved"]
    host: HostName
    owner: DnsName | None = None      # container name, when Docker says it
    endpoint: ObjectID | None = None  # the endpoint holding it, once CreateEndpoint ran
    claims: list[HostName] = Field(default_factory=list, max_length=10000)  # hosts sharing a gateway/reserved
    request: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")] | None = None  # the allocating call

    def key_tail(self) -> tuple[str, ...]:
        return (self.address,)


class PoolConfig(Record):
    subnet: Cidr
    gateway: IP | None = None
    ip_range: Cidr | None = None
    aux: dict[OptKey, IP] = Field(default_factory=dict, max_length=256)


class NetDefRecord(Record):
    """A Docker network as the user created it on one host, for every other host to create too."""
    signed = True
    writer_field = 'origin_host'
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
    uid: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]  # this definition
    origin_host: HostName
    origin_id: ObjectID           # its Docker NetworkID on the origin host
    options: dict[OptKey, OptValue] = Field(default_factory=dict, max_length=32)        # --opt
    pools: list[PoolConfig] = Field(default_factory=list, max_length=4)                 # --subnet/--gateway/...
    ipam_options: dict[OptKey, OptValue] = Field(default_factory=dict, max_length=32)   # --ipam-opt
    # "pyoverlay": each host's own pyoverlay, whatever Docker calls it there
    ipam_driver: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")] = "pyoverlay"
    internal: bool = False
    ipv6: bool = False
    ipv4: bool = True             # False: an IPv6-only network (Docker 27+ --ipv4=false)
    attachable: bool = False
    labels: dict[OptKey, OptValue] = Field(default_factory=dict, max_length=64)

    def key_tail(self) -> tuple[str, ...]:
        return (self.name,)


class AliasRecord(Record):
    """Names of one endpoint as Docker knows them (container name, --network-alias, short ID)."""
    signed = True
    writer_field = 'host'
    shared_fields = ("network_key", "host")
    endpoint_id: ObjectID
    network_key: NetworkKey
    host: HostName
    container: DnsName
    names: list[DnsName] = Field(max_length=64)

    def key_tail(self) -> tuple[str, ...]:
        return (self.network_key, self.endpoint_id)
