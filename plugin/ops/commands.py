"""Operator commands: they ask the running plugin over its own socket (the same settings as `serve`)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import urllib.parse
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
        if len(self.path.encode()) < 100:
            self.sock.connect(self.path)
            return
        # A managed plugin's socket under a long exec root exceeds sun_path (108 bytes): reach it through
        # an open descriptor of its directory instead.
        fd = os.open(os.path.dirname(self.path), os.O_PATH)
        try:
            self.sock.connect(f"/proc/self/fd/{fd}/{os.path.basename(self.path)}")
        finally:
            os.close(fd)


class NoAnswer(Exception):
    pass


def ask(settings: Settings, path: str, method: str = "GET", timeout: float = 30) -> Any:
    """One request to the running plugin; NoAnswer when it does not answer."""
    conn = UnixHTTP(str(settings.socket), timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        body = json.loads(resp.read())
    except OSError as err:
        raise NoAnswer(f"the plugin does not answer on {settings.socket}: {err}. Is it running (docker plugin ls, "
                       f"or the pyoverlay service)?") from err
    finally:
        conn.close()
    if isinstance(body, dict) and "Err" in body:
        raise NoAnswer(body["Err"])
    return body


def _fail(err: Exception) -> int:
    print(f"pyoverlay: {err}", file=sys.stderr)
    return 1


def _json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def status(settings: Settings, as_json: bool) -> int:
    try:
        st = ask(settings, "/pyoverlay/status")
    except NoAnswer as err:
        return _fail(err)
    if as_json:
        _json(st)
        return 0
    for part in (_status_overview, _status_tables, _status_keys, _status_services):
        part(st)
    return 0


def _status_overview(st: dict[str, Any]) -> None:
    etcd = st["etcd"]
    print(f"host {st['host']}  ({st['stage']}, scope {st['scope']})")
    print(f"etcd {', '.join(etcd['endpoints'])}: " + (f"healthy, {etcd['latency_ms']} ms" if etcd["healthy"]
                                                      else f"UNREACHABLE: {etcd['error']}")
          + (f"; {etcd['pending_changes']} changes queued" if etcd["pending_changes"] else "")
          + (f"; watches through its {etcd['watches']}" if etcd.get("watches") else ""))
    print(f"live hosts: {', '.join(st['live_hosts']) or '-'}")


def _status_tables(st: dict[str, Any]) -> None:
    print()
    print(f"{'NETWORK':<28} {'VNI':>8} {'MTU':>6} {'ENC':>4}  {'PEERS':>9}  SUBNETS")
    for key, n in sorted(st["networks"].items()):
        peers = st["peers"].get(str(n["vni"]), {"expected": 0, "programmed": 0})
        print(f"{key:<28} {n['vni']:>8} {n['mtu']:>6} {'yes' if n['encrypted'] else 'no':>4}  "
              f"{peers['programmed']:>4}/{peers['expected']:<4}  {','.join(n['subnets'])}")
    print()
    print(f"{'ENDPOINT':<13} {'NETWORK':<28} {'ADDRESS':<20} {'MAC':<18} {'JOINED':<6} CONTAINER")
    for e in sorted(st["endpoints"], key=lambda e: (e["network"], e["address"] or "")):
        print(f"{e['endpoint_id']:<13} {e['network']:<28} {e['address'] or e['address6'] or '-':<20} {e['mac']:<18} "
              f"{'yes' if e['joined'] else 'no':<6} {e['container'] or '-'}")


def _status_keys(st: dict[str, Any]) -> None:
    keys = st["keys"]
    print()
    print(f"key epoch {keys['epoch']}, {keys['age_seconds']} s old (rotation every {keys['rotation_seconds']} s); "
          f"peers acked: {', '.join(f'{h}={e}' for h, e in sorted(keys['peers_acked'].items())) or '-'}"
          + (f"; waiting for {', '.join(keys['waiting_for'])}" if keys["waiting_for"] else ""))
    for h, why in sorted(keys["refused"].items()):
        print(f"  keys of {h} REFUSED: {why}")


def _status_services(st: dict[str, Any]) -> None:
    vf = st.get("vtep_filter")
    if vf is not None:
        print("VXLAN filter: " + (f"{len(vf['vteps'])} registered VTEPs, {vf['dropped']} datagrams from others dropped"
                                   if vf["present"] else f"NOT installed {vf['error']}"))
    rec = st.get("reconcile") or {}
    if rec.get("etcd"):
        print(f"reconciler: last pass removed {len(rec['removed'] or [])}, repaired {len(rec['repaired'] or [])}, "
              f"{len(rec['waiting'] or [])} waiting for the grace period (etcd {rec['etcd']})")
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
        if names.get("other_networks"):
            print(f"DNS address {names['address']} for other networks' containers: {names['other_networks']}")


def inspect(settings: Settings, name: str, as_json: bool) -> int:
    try:
        info = ask(settings, f"/pyoverlay/inspect/{urllib.parse.quote(name, safe='')}")
    except NoAnswer as err:
        return _fail(err)
    if as_json:
        _json(info)
        return 0
    print(f"network {info['key']}  vni {info['vni']}  subnets {', '.join(info['subnets'])}  "
          f"encrypted {'yes' if info['encrypted'] else 'no'}  port {info['port']}  created by {info['created_by']}")
    for pid, pool in sorted(info["pools"].items()):
        print(f"pool {pid}: {pool['used']}/{pool['usable']} addresses in use")
    print()
    print(f"{'HOST':<16} {'LIVE':<5} {'VTEP':<18} {'EPOCH':<6} DOCKER ID")
    for host, h in sorted(info["hosts"].items()):
        print(f"{host:<16} {'yes' if h['live'] else 'NO':<5} {h['vtep'] or '-':<18} {h['key_epoch'] or '-'!s:<6} "
              f"{h['docker_network_id']}")
    print()
    print(f"{'ADDRESS':<22} {'KIND':<9} {'HOST':<16} {'ENDPOINT':<13} CONTAINER")
    by_ep = {e["endpoint_id"]: e for e in info["endpoints"]}
    for a in info["addresses"]:
        ep = by_ep.get(a["endpoint"] or "", {})
        host = a["host"] if a["kind"] == "endpoint" else ",".join(a["claims"])
        print(f"{a['address']:<22} {a['kind']:<9} {host:<16} {a['endpoint'] or '-':<13} "
              f"{ep.get('container') or a['owner'] or '-'}")
    return 0


def doctor(settings: Settings, as_json: bool) -> int:
    try:
        findings = ask(settings, "/pyoverlay/doctor", timeout=60)
    except NoAnswer as err:
        findings = [{"check": "plugin", "status": "fail", "detail": str(err),
                     "fix": "start it: docker plugin enable pyoverlay (managed) or pyoverlay serve (legacy); "
                            "its log says why it stopped"}] + _doctor_here(settings)
    if as_json:
        _json(findings)
    else:
        marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
        for f in findings:
            print(f"[{marks.get(f['status'], f['status'])}] {f['check']}: {f['detail']}")
            if f["fix"]:
                print(f"       fix: {f['fix']}")
    return 1 if any(f["status"] == "fail" for f in findings) else 0


def _doctor_here(settings: Settings) -> list[dict[str, Any]]:
    """The checks, run by this command itself (the plugin is not there to run them)."""
    from kvstore import Keys, KVStore
    from plugin.docker.api import DockerAPI, socket_name
    from plugin.kernel.datapath import DataPath
    from plugin.kernel.vtepfilter import VtepFilter
    from plugin.ops import doctor as checks
    from plugin.state import LocalState

    store = KVStore(settings.etcd(), health_key=Keys(settings.etcd_prefix).health()) \
        if settings.etcd_endpoints else None
    datapath = DataPath(settings.netns_dir, settings.host, settings.vtep)
    docker = DockerAPI(settings.docker_host, socket_name(settings.socket), settings.docker_name) \
        if settings.scope == "local" else None
    try:
        vtep_filter = VtepFilter([settings.vxlan_port, settings.esp_port]) if settings.vtep_filter else None
        return checks.run_all(settings, store, datapath, LocalState(settings.state_dir / "state.json"), docker,
                              vtep_filter, None)
    finally:
        datapath.close()


def gc(settings: Settings, apply: bool, as_json: bool) -> int:
    try:
        result = ask(settings, "/pyoverlay/gc", method="POST" if apply else "GET", timeout=120)
    except NoAnswer as err:
        return _fail(err)
    if as_json:
        _json(result)
        return 0
    if not str(result["etcd"]).startswith("ok"):
        print(f"etcd {result['etcd']}: nothing is judged or removed while etcd cannot be read")
        return 1
    for line in result["repaired"]:
        print(f"repaired: {line}")
    items = result["removed"] if apply else result["waiting"]
    verb = "removed" if apply else "would remove"
    if not items:
        print("nothing to remove: every pyoverlay object on this host has an owner")
    for g in items:
        print(f"{verb}: {g['kind']:<16} {g['what']}  ({g['why']}; unowned for {g['for_seconds']} s)")
    for g in result["waiting"] if apply else []:
        print(f"NOT removed: {g['what']}: {g.get('error', '')}")
    if not apply and items:
        print(f"the reconciler removes these once unowned for {result['grace']} s; pyoverlay gc --apply removes "
              f"them now")
    return 0


def adopt_managed(environ: dict[str, str]) -> str | None:
    """Where no legacy plugin socket exists, take the settings of the managed pyoverlay plugin Docker runs here
    (found with `docker plugin inspect`: its socket, state and certs directories as the host sees them, its
    etcd settings), so `pyoverlay status|doctor|inspect|gc` need no path typed. Returns the plugin's name, or
    None (no such plugin, or Docker not reachable)."""
    import docker  # noqa: PLC0415 - only here

    from plugin.docker.api import NETWORK_DRIVER, interface_types  # noqa: PLC0415

    try:
        client = docker.DockerClient(base_url=environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock",
                                     timeout=10)
        plugins = client.plugins.list()
    except Exception:  # noqa: BLE001 - no Docker here: nothing to adopt
        return None
    for p in plugins:
        cfg = p.attrs.get("Config") or {}
        entry = (cfg.get("Entrypoint") or [""])[0]
        if not p.enabled or NETWORK_DRIVER not in interface_types(cfg) or not entry.endswith("/pyoverlay"):
            continue
        settings = p.attrs.get("Settings") or {}
        env = dict(e.split("=", 1) for e in settings.get("Env", []) if "=" in e)
        mounts = {m.get("Name"): m.get("Source") for m in settings.get("Mounts", [])}
        inside = {"/host/var/lib": mounts.get("state") or "/var/lib", "/host/etc": mounts.get("certs") or "/etc"}

        def on_host(path: str, inside: dict[str, str] = inside) -> str:
            for prefix, source in inside.items():
                if path == prefix or path.startswith(prefix + "/"):
                    return source.rstrip("/") + path[len(prefix):]
            return path

        exec_root = environ.get("PYOVERLAY_DOCKER_EXEC_ROOT") or "/run/docker"
        env["PYOVERLAY_SOCKET"] = f"{exec_root}/plugins/{p.id}/{cfg['Interface'].get('Socket', 'pyoverlay.sock')}"
        for key in ("PYOVERLAY_STATE_DIR", "ETCD_CACERT", "ETCD_CERT", "ETCD_KEY"):
            if env.get(key):
                env[key] = on_host(env[key])
        env.pop("DOCKER_HOST", None)   # the plugin's view of the Docker socket; ours stays
        env.pop("PATH", None)
        env["PYOVERLAY_DOCKER_NAME"] = str(p.name)
        environ.update(env)
        return str(p.name)
    return None
