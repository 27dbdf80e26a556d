"""Typed records stored in etcd (JSON). Unknown fields are ignored so newer hosts can add fields."""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

R = TypeVar("R", bound="Record")


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)

    def dump(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def load(cls: type[R], raw: bytes) -> R:
        return cls.model_validate_json(raw)


class HostRecord(Record):
    host: str
    vtep: str
    port: int
    version: str
    started: float
    public_keys: dict[int, str] = Field(default_factory=dict)  # X25519 public key per held epoch
    key_epoch: int | None = None                               # the newest of them
    key_mac: str | None = None    # HMAC of host, vtep and public_keys with PYOVERLAY_CLUSTER_SECRET
    seen: dict[str, int] = Field(default_factory=dict)         # peer -> its newest epoch we can receive


class NetworkRecord(Record):
    key: str                      # cluster-wide identity: the subnet, or -o pyoverlay.network=ID
    vni: int
    subnets: list[str]            # IPv4 and/or IPv6 pools, CIDR
    gateway: str | None = None    # as Docker reported it (CIDR), IPv4
    gateway6: str | None = None
    encrypted: bool = False
    port: int
    mtu: int | None = None        # user override (-o com.docker.network.driver.mtu)
    internal: bool = False
    options: dict[str, str] = Field(default_factory=dict)  # the --opt values, for propagation
    created_by: str


class DepartureRecord(Record):
    host: str
    since: float                  # wall clock of the host that first saw it gone
    seen_by: str


class MemberRecord(Record):
    host: str
    docker_network_id: str


class EndpointRecord(Record):
    endpoint_id: str
    network_key: str
    docker_network_id: str
    host: str
    vtep: str
    mac: str
    address: str | None = None    # CIDR
    address6: str | None = None   # CIDR
    name: str | None = None       # container name when known


class PoolRecord(Record):
    pool_id: str
    cidr: str
    family: Literal[4, 6]
    explicit: bool                # keyed by --ipam-opt pyoverlay.network: may overlap other pools
    ip_range: str | None = None
    gateway: str | None = None    # plain address once assigned
    refs: dict[str, int] = Field(default_factory=dict)  # host -> RequestPool count


class AddressRecord(Record):
    address: str
    kind: Literal["endpoint", "gateway", "reserved"]
    host: str
    owner: str | None = None      # container name, when Docker says it
    endpoint: str | None = None   # the endpoint holding it, once CreateEndpoint ran
    claims: list[str] = Field(default_factory=list)  # hosts sharing a gateway/reserved address


class PoolConfig(Record):
    subnet: str
    gateway: str | None = None
    ip_range: str | None = None
    aux: dict[str, str] = Field(default_factory=dict)


class NetDefRecord(Record):
    """A Docker network as the user created it on one host, for every other host to create too."""
    name: str
    uid: str                      # this definition (a re-created network with the same name has another)
    origin_host: str
    origin_id: str                # its Docker NetworkID on the origin host
    options: dict[str, str] = Field(default_factory=dict)       # --opt
    pools: list[PoolConfig] = Field(default_factory=list)      # --subnet/--gateway/--ip-range/--aux-address
    ipam_options: dict[str, str] = Field(default_factory=dict)  # --ipam-opt
    ipam_driver: str = "pyoverlay"  # "pyoverlay": each host's own pyoverlay, whatever Docker calls it there
    internal: bool = False
    ipv6: bool = False
    attachable: bool = False
    labels: dict[str, str] = Field(default_factory=dict)


class AliasRecord(Record):
    """Names of one endpoint as Docker knows them (container name, --network-alias, short ID)."""
    endpoint_id: str
    network_key: str
    host: str
    container: str
    names: list[str]
