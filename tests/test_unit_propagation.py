"""Propagation (networks on every host) between two hosts that share the in-memory store, each with a fake
Docker that keeps its networks in a dict: publish, create elsewhere, remove everywhere, conflicts. No root, no
etcd, no dockerd; the end-to-end version is tests/test_cluster.py."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import docker.errors

from kvstore import Keys, MemoryStore
from plugin.docker.api import Resync
from plugin.docker.propagation import LABEL_DEF, Propagation
from plugin.state import LocalState

KEYS = Keys("/prop/")
IDS = itertools.count(1)


class FakeNetwork:
    def __init__(self, docker: FakeDocker, attrs: dict[str, Any]) -> None:
        self.docker, self.attrs = docker, attrs

    def remove(self) -> None:
        if self.attrs.get("Containers"):
            raise docker.errors.APIError("network has active endpoints")
        self.docker.nets.pop(self.attrs["Id"], None)


class FakeDocker:
    """The part of DockerAPI propagation uses: networks listed, created (the raw API call), got, removed."""

    def __init__(self) -> None:
        self.nets: dict[str, dict[str, Any]] = {}
        self.client, self.api = self, self   # api.client.networks / api.client.api
        self.networks = self

    def driver_name(self) -> str:
        return "pyoverlay"

    # client.networks
    def list(self, filters: dict[str, str]) -> list[FakeNetwork]:
        return [FakeNetwork(self, n) for n in self.nets.values() if n["Driver"] == filters["driver"]]

    def get(self, nid: str) -> FakeNetwork:
        if nid not in self.nets:
            raise docker.errors.NotFound("no such network")
        return FakeNetwork(self, self.nets[nid])

    # client.api (the raw create)
    def _url(self, path: str) -> str:
        return path

    def _post_json(self, url: str, data: dict[str, Any]) -> dict[str, Any]:
        assert url == "/networks/create"
        return data

    def _result(self, body: dict[str, Any], json: bool) -> dict[str, str]:
        if any(n["Name"] == body["Name"] for n in self.nets.values()):
            raise docker.errors.APIError(f"network with name {body['Name']} already exists")
        ipam = body["IPAM"]
        nid = self.create(body["Name"], ipam["Config"][0]["Subnet"], labels=body["Labels"],
                          options=body["Options"] or {})
        return {"Id": nid}

    def create(self, name: str, subnet: str, labels: dict[str, str] | None = None,
               options: dict[str, str] | None = None) -> str:
        nid = f"{next(IDS):064x}"
        self.nets[nid] = {"Name": name, "Id": nid, "Driver": "pyoverlay", "Options": options or {},
                          "Labels": labels or {}, "IPAM": {"Driver": "pyoverlay", "Config": [{"Subnet": subnet}]},
                          "Containers": {}}
        return nid


def _host(store: MemoryStore, name: str, tmp: Path) -> tuple[Propagation, FakeDocker]:
    p = Propagation(store, KEYS, LocalState(tmp / f"{name}.json"), name, Resync())
    p.start()
    assert p._netdefs.synced.wait(10)
    return p, FakeDocker()


def _delivered(store: MemoryStore, hosts: tuple[tuple[Propagation, FakeDocker], ...]) -> None:
    """Wait until every host's watch holds what the store holds (a condition, not a time)."""
    deadline = time.monotonic() + 30
    while True:
        want = {kv.key.rsplit("/", 1)[1] for kv in store.range(KEYS.netdefs())[0]}
        if all(set(p.status()["definitions"]) == want for p, _ in hosts):
            return
        assert time.monotonic() < deadline, "the watches did not deliver"
        time.sleep(0.01)


def _settle(*hosts: tuple[Propagation, FakeDocker]) -> None:
    """Resync every host (what the Docker worker does on a kick) until the definitions settle: a host's
    resync may publish or delete one that the others then follow."""
    store = hosts[0][0].store
    for _ in range(3):
        _delivered(store, hosts)   # type: ignore[arg-type]
        for p, api in hosts:
            p.resync(api)   # type: ignore[arg-type]
    _delivered(store, hosts)   # type: ignore[arg-type]


def names(api: FakeDocker) -> list[str]:
    return sorted(n["Name"] for n in api.nets.values())


def test_a_network_made_on_one_host_appears_on_the_other_and_goes_from_both(tmp_path: Path) -> None:
    store = MemoryStore()
    h1, h2 = _host(store, "h1", tmp_path), _host(store, "h2", tmp_path)
    try:
        nid = h1[1].create("appnet", "10.40.0.0/24", options={"encrypted": ""})
        _settle(h1, h2)
        assert names(h2[1]) == ["appnet"], "created on h2 from h1's definition"
        copy = next(iter(h2[1].nets.values()))
        assert copy["Options"] == {"encrypted": ""} and copy["Labels"][LABEL_DEF]
        assert store.get(KEYS.netdef("appnet")) is not None
        # Removed where it was made: its definition goes, and with it the copy.
        h1[1].nets.pop(nid)
        h1[0].on_event(h1[1], {"Type": "network", "Action": "destroy",   # type: ignore[arg-type]
                               "Actor": {"ID": nid, "Attributes": {"type": "pyoverlay", "name": "appnet"}}})
        _settle(h1, h2)
        assert store.get(KEYS.netdef("appnet")) is None and names(h1[1]) == names(h2[1]) == []
    finally:
        h1[0].stop()
        h2[0].stop()


def test_a_copy_in_use_waits_and_a_different_network_of_the_same_name_is_a_conflict(tmp_path: Path) -> None:
    store = MemoryStore()
    h1, h2 = _host(store, "h1", tmp_path), _host(store, "h2", tmp_path)
    try:
        nid = h1[1].create("db", "10.41.0.0/24")
        _settle(h1, h2)
        copy_id = next(iter(h2[1].nets))
        h2[1].nets[copy_id]["Containers"] = {"c" * 64: {"Name": "postgres"}}
        h1[1].nets.pop(nid)
        h1[0].on_event(h1[1], {"Type": "network", "Action": "destroy",   # type: ignore[arg-type]
                               "Actor": {"ID": nid, "Attributes": {"type": "pyoverlay", "name": "db"}}})
        _settle(h1, h2)
        assert names(h2[1]) == ["db"] and "postgres" in h2[0].status()["pending_removal"]["db"]
        h2[1].nets[copy_id]["Containers"] = {}
        _settle(h1, h2)
        assert names(h2[1]) == [] and h2[0].status()["pending_removal"] == {}
        # The same name with another subnet on each host: the first is published, the second is not.
        h1[1].create("web", "10.42.0.0/24")
        _settle(h1, h2)
        h3 = _host(store, "h3", tmp_path)
        try:
            h3[1].create("web", "10.43.0.0/24")
            _settle(h1, h2, h3)
            assert "subnets" in h3[0].status()["conflicts"]["web"]
            assert names(h2[1]) == ["web"] and next(iter(h2[1].nets.values()))["IPAM"]["Config"][0]["Subnet"] == \
                "10.42.0.0/24"
        finally:
            h3[0].stop()
    finally:
        h1[0].stop()
        h2[0].stop()
