"""This host's own view, kept in a file under the state directory.

etcd holds the cluster's records; this file lets the plugin restore its data path and keep answering for
existing networks and endpoints after a restart, even when etcd is unreachable at that moment. Writes are
atomic (temp file + rename) so a SIGKILL never leaves half a file, and readable by root only. A file
that exists but cannot be read stops the plugin (StateUnreadable) rather than being taken as empty.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from kvstore.records import EndpointRecord, NetworkRecord


class LocalNetwork(BaseModel):
    model_config = ConfigDict(extra="ignore")
    docker_network_id: str
    record: NetworkRecord
    mtu: int


class LocalEndpoint(BaseModel):
    model_config = ConfigDict(extra="ignore")
    record: EndpointRecord
    joined: bool = False
    sandbox: str | None = None    # the container's SandboxKey while joined
    dns_route: bool = False       # Join gave this container the route to the DNS address


class StateFile(BaseModel):
    model_config = ConfigDict(extra="ignore")
    networks: dict[str, LocalNetwork] = Field(default_factory=dict)     # by Docker NetworkID
    endpoints: dict[str, LocalEndpoint] = Field(default_factory=dict)   # by EndpointID
    pending: list[dict[str, str]] = Field(default_factory=list)         # etcd changes to retry
    originated: dict[str, str] = Field(default_factory=dict)  # Docker NetworkID -> uid of the definition


class StateUnreadable(Exception):
    """state.json exists but cannot be read: starting from nothing would tear this host's networks down."""


class LocalState:
    """This host's networks and endpoints (state.json). Read and written only through these methods, each under
    the lock; readers get copies of the lists, never the live maps."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._data = self._read()

    def _read(self) -> StateFile:
        try:
            return StateFile.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return StateFile()
        except (OSError, ValueError) as err:
            # Starting empty would remove every namespace of this host as stale: refuse, say what to do.
            raise StateUnreadable(
                f"{self.path} cannot be read ({str(err).splitlines()[0][:200]}). pyoverlay will not start on it: "
                f"starting from an empty state would remove this host's networks from the kernel. Restore the "
                f"file, or move it away to start afresh (running containers then lose their pyoverlay networks)"
            ) from err

    def save(self) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # root's only: endpoints, keys
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(self._data.model_dump_json(exclude_none=True))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    # Small helpers: every mutation goes through here and is saved at once.

    def snapshot(self) -> tuple[dict[str, LocalNetwork], dict[str, LocalEndpoint]]:
        """Networks by Docker id and endpoints by id, read together (one consistent view)."""
        with self._lock:
            return dict(self._data.networks), dict(self._data.endpoints)

    def networks(self) -> list[LocalNetwork]:
        with self._lock:
            return list(self._data.networks.values())

    def endpoints(self) -> list[LocalEndpoint]:
        with self._lock:
            return list(self._data.endpoints.values())

    def endpoint_ids(self) -> set[str]:
        with self._lock:
            return set(self._data.endpoints)

    def originated(self, docker_network_id: str) -> str | None:
        """The definition uid this host created the network from (propagation), if it did."""
        with self._lock:
            return self._data.originated.get(docker_network_id)

    def set_originated(self, docker_network_id: str, uid: str) -> None:
        with self._lock:
            self._data.originated[docker_network_id] = uid
            self.save()

    def forget_originated(self, docker_network_id: str) -> bool:
        with self._lock:
            if self._data.originated.pop(docker_network_id, None) is None:
                return False
            self.save()
            return True

    def network(self, docker_network_id: str) -> LocalNetwork | None:
        with self._lock:
            return self._data.networks.get(docker_network_id)

    def by_key(self, key: str) -> LocalNetwork | None:
        with self._lock:
            return next((n for n in self._data.networks.values() if n.record.key == key), None)

    def encrypted_vnis(self) -> dict[int, str]:
        """VNI -> network key of this host's encrypted networks."""
        return {n.record.vni: n.record.key for n in self.networks() if n.record.encrypted}

    def endpoint(self, endpoint_id: str) -> LocalEndpoint | None:
        with self._lock:
            return self._data.endpoints.get(endpoint_id)

    def endpoints_in(self, sandbox: str) -> list[tuple[str, LocalEndpoint]]:
        """The joined endpoints of one container (by its SandboxKey)."""
        with self._lock:
            return [(eid, ep) for eid, ep in self._data.endpoints.items() if ep.joined and ep.sandbox == sandbox]

    def put_network(self, net: LocalNetwork) -> None:
        with self._lock:
            self._data.networks[net.docker_network_id] = net
            self.save()

    def drop_network(self, docker_network_id: str) -> list[LocalEndpoint]:
        with self._lock:
            self._data.networks.pop(docker_network_id, None)
            gone = [e for e in self._data.endpoints.values() if e.record.docker_network_id == docker_network_id]
            for e in gone:
                self._data.endpoints.pop(e.record.endpoint_id, None)
            self.save()
            return gone

    def put_endpoint(self, ep: LocalEndpoint) -> None:
        with self._lock:
            self._data.endpoints[ep.record.endpoint_id] = ep
            self.save()

    def drop_endpoint(self, endpoint_id: str) -> None:
        with self._lock:
            if self._data.endpoints.pop(endpoint_id, None) is not None:
                self.save()

    def defer(self, op: dict[str, str]) -> None:
        with self._lock:
            if op not in self._data.pending:
                self._data.pending.append(op)
                self.save()

    def take_pending(self) -> list[dict[str, str]]:
        with self._lock:
            return [dict(p) for p in self._data.pending]

    def done_pending(self, op: dict[str, str]) -> None:
        with self._lock:
            if op in self._data.pending:
                self._data.pending.remove(op)
                self.save()

    def dump(self) -> str:
        with self._lock:
            return json.dumps(json.loads(self._data.model_dump_json()), indent=2)
