"""Docker's remote NetworkDriver and IpamDriver wire format: one schema per call.

Field names are Docker's Go field names, exact case. Unknown fields are ignored (newer Docker versions add
some); a missing or mistyped field is an error that names the field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from plugin.driver.options import Interface, Subnet
from plugin.errors import InvalidRequest

# Docker IDs end up in etcd keys and interface names: keep them to safe characters.
DockerID = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
NonEmpty = Annotated[str, StringConstraints(min_length=1, max_length=512)]


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class Empty(Request):
    pass


class IPAMData(Request):
    AddressSpace: str = ""
    Pool: NonEmpty
    Gateway: str | None = None
    AuxAddresses: dict[str, str] | None = None


class CreateNetwork(Request):
    NetworkID: DockerID
    Options: dict[str, Any] | None = None
    IPv4Data: list[IPAMData] | None = None
    IPv6Data: list[IPAMData] | None = None


class AllocateNetwork(CreateNetwork):
    pass


class NetworkRef(Request):
    NetworkID: DockerID


class EndpointInterface(Request):
    Address: str = ""
    AddressIPv6: str = ""
    MacAddress: str = ""


class CreateEndpoint(Request):
    NetworkID: DockerID
    EndpointID: DockerID
    Interface: EndpointInterface | None = None
    Options: dict[str, Any] | None = None


class EndpointRef(Request):
    NetworkID: DockerID
    EndpointID: DockerID


class Join(Request):
    NetworkID: DockerID
    EndpointID: DockerID
    SandboxKey: NonEmpty
    Options: dict[str, Any] | None = None


class ExternalConnectivity(Request):
    NetworkID: DockerID
    EndpointID: DockerID
    Options: dict[str, Any] | None = None


class Discover(Request):
    DiscoveryType: int
    DiscoveryData: Any = None


class RequestPool(Request):
    AddressSpace: str = ""
    Pool: str = ""
    SubPool: str = ""
    Options: dict[str, str] | None = None
    V6: bool = False


class PoolRef(Request):
    PoolID: NonEmpty


class RequestAddress(Request):
    PoolID: NonEmpty
    Address: str = ""
    Options: dict[str, str] | None = None


class ReleaseAddress(Request):
    PoolID: NonEmpty
    Address: NonEmpty


def parse(model: type[Request], body: bytes, call: str) -> Request:
    """Decode and validate a request body; errors name the call and the field."""
    if not body.strip():
        raw: Any = {}
    else:
        try:
            raw = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise InvalidRequest(f"{call}: request body is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{call}: request body must be a JSON object, not {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "body"
            problems.append(f"{field}: {e['msg']}")
        raise InvalidRequest(f"{call}: " + "; ".join(problems)) from None


# -- the driver's plain inputs, from the wire models (the driver never sees these models) ----------------

def subnets(data: list[IPAMData] | None) -> list[Subnet]:
    return [Subnet(d.Pool, d.Gateway or None, tuple((d.AuxAddresses or {}).values())) for d in data or []]


def interface(iface: EndpointInterface | None) -> Interface:
    if iface is None:
        return Interface()
    return Interface(iface.Address, iface.AddressIPv6, iface.MacAddress)
