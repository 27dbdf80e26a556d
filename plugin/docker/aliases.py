"""DNS names of this host's endpoints as Docker knows them, published for every host's DNS server.

The endpoint record already carries the container's name (Docker passes it to IPAM). What only the Docker
API knows: `--network-alias` aliases, the short container ID, and a rename. On every container and
network event touching a container (and in a full resync now and then) this host's alias records
(aliases/<nkey>/<endpoint id>) are brought in line with `docker inspect`; DeleteEndpoint removes them too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import docker.errors

from kvstore import Keys, Store
from kvstore.records import AliasRecord, dns_name
from plugin.docker.api import DockerAPI
from plugin.state import LocalState

log = logging.getLogger(__name__)

FULL_RESYNC = 60.0   # seconds between full comparisons with etcd (events keep it current in between)
EVENTS = {"start", "restart", "die", "destroy", "rename", "connect", "disconnect"}


def names_of(container: dict[str, Any], network: dict[str, Any]) -> list[str]:
    """Container name, its aliases on that network (which include the short ID), no duplicates."""
    names = [container.get("Name", "").lstrip("/"), *(network.get("Aliases") or []), *(network.get("DNSNames") or [])]
    out: list[str] = []
    for n in names:
        if dns_name(n) and n.lower() not in out:  # other hosts refuse a record with anything else in it
            out.append(n.lower())
    return out


class AliasPublisher:
    def __init__(self, store: Store, keys: Keys, state: LocalState, host: str,
                 current: Callable[[], dict[str, AliasRecord]]) -> None:
        self.store = store
        self.current = current   # etcd key -> alias record, as the names watch holds them (no extra reads)
        self.keys = keys
        self.state = state
        self.host = host
        self.published: dict[str, AliasRecord] = {}    # etcd key -> record, what this host wrote
        self.by_container: dict[str, set[str]] = {}    # container id -> its alias keys
        self._full = 0.0

    def on_event(self, api: DockerAPI, event: dict[str, Any]) -> None:
        if event.get("Action", "").split(":")[0] not in EVENTS:
            return
        actor = event.get("Actor") or {}
        container = actor.get("Attributes", {}).get("container") if event.get("Type") == "network" else actor.get("ID")
        if container:
            self._refresh(api, container)

    def resync(self, api: DockerAPI) -> None:
        if time.monotonic() - self._full < FULL_RESYNC:
            return
        want: dict[str, AliasRecord] = {}
        by_container: dict[str, set[str]] = {}
        for c in api.client.containers.list():
            for key, value in self._records(c.attrs).items():
                want[key] = value
                by_container.setdefault(c.id, set()).add(key)
        have = {key: rec for key, rec in self.current().items() if rec.host == self.host}
        for key in set(have) - set(want):
            self.store.delete(key)
        for key, rec in want.items():
            if have.get(key) != rec:
                self.store.put(key, rec.dump())
        self.published, self.by_container = want, by_container
        self._full = time.monotonic()

    def _refresh(self, api: DockerAPI, container_id: str) -> None:
        try:
            attrs = api.client.containers.get(container_id).attrs
            want = self._records(attrs) if (attrs.get("State") or {}).get("Running") else {}
        except docker.errors.NotFound:
            want = {}
        old = self.by_container.get(container_id, set())
        for key in old - set(want):
            self.store.delete(key)
            self.published.pop(key, None)
        for key, rec in want.items():
            if self.published.get(key) != rec:
                self.store.put(key, rec.dump())
                self.published[key] = rec
        if want:
            self.by_container[container_id] = set(want)
        else:
            self.by_container.pop(container_id, None)

    def _records(self, attrs: dict[str, Any]) -> dict[str, AliasRecord]:
        out = {}
        for net in ((attrs.get("NetworkSettings") or {}).get("Networks") or {}).values():
            local = self.state.network(net.get("NetworkID") or "")
            endpoint = net.get("EndpointID")
            if local is None or not endpoint:
                continue  # not a pyoverlay network, or not joined (yet)
            rec = AliasRecord(endpoint_id=endpoint, network_key=local.record.key, host=self.host,
                              container=attrs["Id"], names=names_of(attrs, net))
            out[self.keys.aliases(local.record.key, endpoint)] = rec
        return out
