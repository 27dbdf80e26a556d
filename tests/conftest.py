"""Fixtures: a real etcd, and real dockerd hosts (tests/rig.py) with pyoverlay as a legacy plugin."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore import EtcdConfig, KVStore
from tests.rig import Etcd, Rig, cleanup_stale, wait_for


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces, dockerd)")


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[Etcd]:
    """A private etcd on loopback (Debian's etcd-server) with a temp data dir."""
    if not shutil.which("etcd"):
        pytest.fail("etcd is not installed (apt-get install etcd-server); .ci/run installs it")
    workdir = Path(tempfile.mkdtemp(prefix="pyoverlay-etcd-"))
    server = Etcd(workdir, ["127.0.0.1"])
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def rig1() -> Iterator[Rig]:
    """One simulated Docker host running pyoverlay, for the single-host tests."""
    _need_root()
    cleanup_stale()
    rig = Rig()
    try:
        rig.up(1)
        yield rig
    finally:
        rig.down()


class Cleanup:
    """Containers and networks a test made, removed afterwards even when it fails."""

    def __init__(self) -> None:
        self.items: list[tuple[object, str, str]] = []

    def container(self, host: object, name: str) -> str:
        self.items.append((host, "container", name))
        return name

    def network(self, host: object, name: str) -> str:
        self.items.append((host, "network", name))
        return name

    def run(self) -> None:
        for host, kind, name in sorted(self.items, key=lambda i: i[1] != "container"):
            if kind == "container":
                host.docker("rm", "-f", name, check=False)  # type: ignore[attr-defined]
            else:
                host.docker("network", "rm", name, check=False)  # type: ignore[attr-defined]


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    c = Cleanup()
    try:
        yield c
    finally:
        c.run()


# tests/guest/ runs inside the user-mode-linux guest (tests/test_ipsec.py boots it), never on the host.
collect_ignore = [] if os.environ.get("PYOVERLAY_IN_UML") else ["guest"]


@pytest.fixture
def net(rig1: Rig, cleanup):  # type: ignore[no-untyped-def]
    """A real network (made through Docker) with a container on it (10.30.0.5), to aim bad requests at."""
    h = rig1.hosts[0]
    cleanup.network(h, "n-bad")
    h.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", "10.30.0.0/24",
             "n-bad")
    cleanup.container(h, "bad-holder")
    h.run("bad-holder", "n-bad", ip="10.30.0.5")
    nid = h.docker("network", "inspect", "-f", "{{.ID}}", "n-bad").stdout.strip()
    eid = h.docker("inspect", "-f", '{{(index .NetworkSettings.Networks "n-bad").EndpointID}}',
                   "bad-holder").stdout.strip()
    # The holder's names reach etcd after its start event (the alias publisher): let that settle first, so
    # that tests comparing etcd before and after a request see only what the request did.
    store = KVStore(EtcdConfig([rig1.etcd.local_url]))
    try:
        wait_for("the holder's alias record", lambda: store.get(f"{rig1.etcd_prefix}/aliases/10.30.0.0_24/{eid}"),
                 timeout=60)
    finally:
        store.close()
    return {"nid": nid, "eid": eid, "pool": "cidr.10.30.0.0_24"}


def pytest_report_header(config: pytest.Config) -> str:
    from tests.rig import engine_from_env  # noqa: PLC0415
    try:
        engine = engine_from_env()
        return f"docker engine of the rig's hosts: {engine.name} ({engine.version()})"
    except Exception as err:  # noqa: BLE001 - a header, not a test
        return f"docker engine of the rig's hosts: unavailable ({err})"
