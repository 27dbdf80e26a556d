"""Fixtures: a real etcd, and real dockerd hosts (tests/rig.py) with pyoverlay as a legacy plugin."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rig import Etcd, Rig, cleanup_stale


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
