"""Compose v2 (docker-compose from the current engine's packages) on pyoverlay across two hosts.

One project, one compose file with `driver: pyoverlay` and `ipam: driver: pyoverlay`: `up` of one service on
each host, the services resolve each other by service name across the hosts with no flag (daemon.json's
"dns" names pyoverlay's DNS address), and `down` on both hosts leaves no network behind.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin.config import DEFAULT_DNS_ADDRESS
from tests.rig import ENGINE_ROOT, IMAGE, DockerHost, Rig, rig, sh, wait_for
from tests.test_cluster import inspect, lookup

pytestmark = pytest.mark.docker

COMPOSE = ENGINE_ROOT / "usr/bin/docker-compose"
PROJECT = "shop"
NETWORK = f"{PROJECT}_default"

COMPOSE_FILE = f"""\
services:
  web:
    image: {IMAGE}
    command: ["sh", "-c", "echo hello-from-compose > /tmp/index.html && exec httpd -f -p 80 -h /tmp"]
  client:
    image: {IMAGE}
    command: ["sleep", "86400"]
networks:
  default:
    driver: pyoverlay
    ipam:
      driver: pyoverlay
      config:
        - subnet: 10.62.0.0/24
"""


@pytest.fixture(scope="module")
def rig2() -> Iterator[Rig]:
    with rig(2, daemon={"dns": [DEFAULT_DNS_ADDRESS]}, PYOVERLAY_PROPAGATE="true") as r:
        yield r


def compose(h: DockerHost, workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCKER_HOST": f"unix://{h.sock}", "PATH": h.rig.engine.path()}
    res = subprocess.run([str(COMPOSE), "-f", str(workdir / "compose.yaml"), "-p", PROJECT, *args],
                         capture_output=True, text=True, timeout=180, env=env, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"docker-compose {' '.join(args)} on {h.name}: {res.stdout}{res.stderr}")
    return res


def test_compose_services_on_two_hosts_resolve_each_other_and_down_cleans_up(rig2: Rig) -> None:
    assert COMPOSE.exists(), f"no docker-compose at {COMPOSE}: packaging/engine.sh fetches it (make test runs it)"
    print(sh(str(COMPOSE), "version").stdout.strip())
    h1, h2 = rig2.hosts
    (rig2.workdir / "compose.yaml").write_text(COMPOSE_FILE)
    compose(h1, rig2.workdir, "up", "-d", "web")
    net = inspect(h1, NETWORK)
    assert net is not None and net["Driver"] == "pyoverlay" and net["IPAM"]["Driver"] == "pyoverlay"
    # The network appears on h2 (propagation), with compose's labels: compose there uses it as its own.
    wait_for(f"{NETWORK} on h2", lambda: inspect(h2, NETWORK) is not None, timeout=30)
    compose(h2, rig2.workdir, "up", "-d", "client")
    assert [n["Name"] for n in _networks(h2) if n["Name"] == NETWORK] == [NETWORK], "one network, not two"
    web_ip = h1.docker("inspect", "-f", "{{(index .NetworkSettings.Networks \"" + NETWORK + "\").IPAddress}}",
                       f"{PROJECT}-web-1").stdout.strip()
    client = f"{PROJECT}-client-1"
    wait_for("web resolves on h2", lambda: lookup(h2, client, "web") == [web_ip], timeout=15)
    page = h2.exec(client, "wget", "-q", "-O-", "http://web/", check=False, timeout=20)
    assert page.stdout.strip() == "hello-from-compose", page.stdout + page.stderr
    # And the other way: h1's web resolves h2's client by service name.
    wait_for("client resolves on h1", lambda: lookup(h1, f"{PROJECT}-web-1", "client") != [], timeout=15)
    # down on both hosts: the containers and the network go, everywhere.
    compose(h2, rig2.workdir, "down")
    compose(h1, rig2.workdir, "down")
    for h in (h1, h2):
        wait_for(f"{NETWORK} gone from {h.name}", lambda h=h: inspect(h, NETWORK) is None, timeout=30)
        assert h.docker("ps", "-aq").stdout.strip() == ""
    wait_for("network record gone", lambda: not rig2.etcd.keys(f"{rig2.etcd_prefix}/networks/"), timeout=30)


def _networks(h: DockerHost) -> list[dict]:  # type: ignore[type-arg]
    ids = h.docker("network", "ls", "-q").stdout.split()
    return json.loads(h.docker("network", "inspect", *ids).stdout) if ids else []
