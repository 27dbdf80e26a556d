"""Operator commands: they ask the running plugin over its own socket (the same settings as `serve`)."""

from __future__ import annotations

import http.client
import json
import socket
import sys
from typing import Any

from plugin.config import Settings


class UnixHTTP(http.client.HTTPConnection):
    """HTTP over the plugin's Unix socket (as Docker talks to it)."""

    def __init__(self, path: str, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def ask(settings: Settings, path: str) -> dict[str, Any]:
    conn = UnixHTTP(str(settings.socket))
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return json.loads(resp.read())  # type: ignore[no-any-return]
    finally:
        conn.close()


def status(settings: Settings, as_json: bool) -> int:
    try:
        st = ask(settings, "/pyoverlay/status")
    except OSError as err:
        print(f"pyoverlay: the plugin does not answer on {settings.socket}: {err}. Is it running "
              f"(docker plugin ls / the pyoverlay service)?", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    print(f"host {st['host']}  ({st['stage']}, scope {st['scope']})")
    print(f"{'NETWORK':<28} {'VNI':>8} {'MTU':>6} {'ENC':>4}  {'PEERS':>9}  SUBNETS")
    for key, n in sorted(st["networks"].items()):
        peers = st["peers"].get(str(n["vni"]), {"expected": 0, "programmed": 0})
        print(f"{key:<28} {n['vni']:>8} {n['mtu']:>6} {'yes' if n['encrypted'] else 'no':>4}  "
              f"{peers['programmed']:>4}/{peers['expected']:<4}  {','.join(n['subnets'])}")
    api = st.get("docker_api")
    if api is not None:
        print(f"docker API: {'connected' if api['connected'] else 'NOT connected: ' + api['error']}")
    prop = st.get("propagation")
    if prop is not None:
        print(f"propagated networks: {', '.join(prop['definitions']) or '-'}")
        for name, why in sorted(prop["pending_removal"].items()):
            print(f"  removal waits: {name}: {why}")
        for name, why in sorted(prop["conflicts"].items()):
            print(f"  not propagated: {name}: {why}")
    names = st.get("dns")
    if names is not None:
        print(f"DNS: {'; '.join(names['serving']) or 'no network'}; upstreams {', '.join(names['upstreams']) or '-'}")
    return 0
