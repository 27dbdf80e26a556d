"""`pyoverlay doctor`: what on this host stops pyoverlay from working, and how to fix each thing.

Every check is a finding with a status (ok / warn / fail), what was seen and, unless ok, what to do.
The plugin runs them in its own process (its namespaces and settings); when it does not answer, the
command runs them itself and says so.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyroute2.iproute import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kvstore import Store, StoreError
from kvstore.records import QUARANTINE
from plugin.config import Settings
from plugin.dns.nameserver import upstreams_from_host
from plugin.docker.api import API_ERRORS, DockerAPI
from plugin.kernel.datapath import VXLAN6_EXTRA, VXLAN_OVERHEAD, DataPath
from plugin.kernel.ipsec import ESP_OVERHEAD, missing_features
from plugin.kernel.vtepfilter import VtepFilter
from plugin.state import LocalState


@dataclass
class Finding:
    check: str
    status: str          # ok | warn | fail
    detail: str
    fix: str = ""


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=10, check=False)


def check_vxlan() -> Finding:
    name = "pyodoctor0"
    try:
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=name):
                ipr.link("del", index=idx)
            ipr.link("add", ifname=name, kind="vxlan", vxlan_id=16777214, vxlan_port=0)
            ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
    except NetlinkError as err:
        if err.code == errno.EOPNOTSUPP:
            return Finding("kernel: vxlan", "fail", "the kernel cannot create VXLAN devices",
                           "load the vxlan module (modprobe vxlan) or use a kernel built with CONFIG_VXLAN")
        return Finding("kernel: vxlan", "fail", f"creating a test VXLAN device failed: {err}",
                       "pyoverlay needs CAP_NET_ADMIN in the host's network namespace (the managed plugin's "
                       "config.json grants it; run a legacy plugin as root)")
    return Finding("kernel: vxlan", "ok", "VXLAN devices can be created")


def check_ipsec(encrypted_networks: int) -> Finding:
    missing = missing_features()
    if not missing:
        return Finding("kernel: esp, gcm", "ok", "IPsec ESP with AES-GCM and the guard's firewall are available")
    status = "fail" if encrypted_networks else "warn"
    return Finding("kernel: esp, gcm", status,
                   f"missing {'; '.join(missing)}: networks with --opt encrypted cannot be created here"
                   + (f" ({encrypted_networks} on this host have no data path)" if encrypted_networks else ""),
                   "modprobe esp4 (and esp6), and make sure the kernel has CONFIG_CRYPTO_GCM and CONFIG_CRYPTO_AES; "
                   "or use networks without --opt encrypted")


def check_vtep_filter(vtep_filter: VtepFilter | None, networks: int) -> Finding:
    name = "VTEP filter"
    if vtep_filter is None:
        return Finding(name, "warn", "the filter of registered VTEPs is off (PYOVERLAY_VTEP_FILTER=false): "
                       "anyone who reaches the VXLAN port can inject frames", "unset PYOVERLAY_VTEP_FILTER")
    if vtep_filter.backend() is None:
        return Finding(name, "fail", "neither nftables (ip family) nor ipset + iptables works here",
                       "install nftables (apt-get install nftables) and load nf_tables, or ipset and iptables")
    if networks and not vtep_filter.present():
        return Finding(name, "fail", "the filter of registered VTEPs is not installed"
                       + (f": {vtep_filter.error}" if vtep_filter.error else ""),
                       "check the plugin log; the reconciler re-installs it once etcd's host list is read")
    dropped = vtep_filter.dropped()
    return Finding(name, "ok", f"{vtep_filter.describe()} works" + (
        f"; VXLAN accepted only from registered hosts ({dropped} datagrams from others dropped)" if dropped >= 0
        else ""))


def check_mtu(datapath: DataPath, state: LocalState) -> Finding:
    try:
        ul = datapath.underlay()
    except Exception as err:  # noqa: BLE001 - the finding says what
        return Finding("underlay MTU", "fail", f"no underlay: {err}",
                       "set PYOVERLAY_VTEP to this host's address (or interface) on the network between hosts")
    extra = VXLAN_OVERHEAD + (VXLAN6_EXTRA if ul.version == 6 else 0)
    bad = []
    for n in state.networks():
        need = n.mtu + extra + (ESP_OVERHEAD if n.record.encrypted else 0)
        if need > ul.mtu:
            bad.append(f"{n.record.key}: MTU {n.mtu} needs {need} on the underlay")
    if bad:
        best = ul.mtu - extra
        return Finding("underlay MTU", "fail", f"{ul.ifname} ({ul.address}) has MTU {ul.mtu}; " + "; ".join(bad)
                       + ": large packets will be dropped",
                       f"re-create those networks with -o com.docker.network.driver.mtu={best} "
                       f"(or {best - ESP_OVERHEAD} if encrypted), or drop PYOVERLAY_MTU, or raise the MTU of "
                       f"{ul.ifname} on every host")
    return Finding("underlay MTU", "ok", f"{ul.ifname} ({ul.address}) MTU {ul.mtu}: room for overlay MTU "
                   f"{ul.mtu - extra} ({ul.mtu - extra - ESP_OVERHEAD} encrypted)")


def check_port(datapath: DataPath, port: int) -> Finding:
    users = datapath.udp_port_users(port)
    if users and not datapath.port_is_ours(port):
        return Finding("VXLAN port", "fail", f"UDP port {port} is taken by something other than pyoverlay",
                       "free it (Docker's swarm overlay takes 4789), or set PYOVERLAY_VXLAN_PORT to a free port on "
                       "every host")
    return Finding("VXLAN port", "ok", f"UDP {port}: " + ("held by pyoverlay's VXLAN devices" if users else "free"))


def check_etcd(store: Store | None, settings: Settings) -> Finding:
    where = ", ".join(settings.etcd_endpoints) or "the embedded single-host etcd"
    if store is None:
        return Finding("etcd", "fail", f"{where} runs inside the plugin, which is not running",
                       "start the plugin (docker plugin enable, or pyoverlay serve)")
    try:
        seconds = store.health()
    except StoreError as err:
        return Finding("etcd", "fail", f"{where}: {err}",
                       "check ETCD_ENDPOINTS and that etcd runs; with TLS, ETCD_CACERT/ETCD_CERT/ETCD_KEY; with auth, "
                       "ETCD_USERNAME/ETCD_PASSWORD. Existing traffic keeps flowing meanwhile")
    if seconds > 0.5:
        return Finding("etcd", "warn", f"{where}: a round trip takes {seconds * 1000:.0f} ms",
                       "etcd is overloaded or far away: plugin calls slow down with it; check etcd's disk and network")
    return Finding("etcd", "ok", f"{where}: round trip {seconds * 1000:.1f} ms")


def check_gwbridge(docker: DockerAPI | None, state: LocalState) -> Finding:
    if docker is None:
        return Finding("docker_gwbridge", "ok", "swarm scope: Docker manages docker_gwbridge")
    try:
        info = docker.client.api.inspect_network("docker_gwbridge")
    except API_ERRORS as err:
        if "404" in str(err) or "not found" in str(err).lower():
            return Finding("docker_gwbridge", "ok", "not created yet (Docker makes it when the first container "
                           "joins a pyoverlay network that is not --internal)")
        return Finding("docker_gwbridge", "warn", f"cannot ask Docker: {err}",
                       "set DOCKER_HOST to the local Docker socket (managed plugin: docker plugin set pyoverlay "
                       "docker.source=/var/run)")
    subnets = [c.get("Subnet") for c in (info.get("IPAM") or {}).get("Config") or [] if c.get("Subnet")]
    ours = [ipaddress.ip_network(s) for n in state.networks() for s in n.record.subnets]
    clash = [f"{s} overlaps {o}" for s in subnets for o in ours
             if ipaddress.ip_network(s).version == o.version and ipaddress.ip_network(s).overlaps(o)]
    if clash:
        return Finding("docker_gwbridge", "fail", "; ".join(clash) + ": containers lose the overlap's traffic",
                       "docker network rm docker_gwbridge (with no container running) and re-create it with another "
                       "--subnet, or use another subnet for the pyoverlay network")
    return Finding("docker_gwbridge", "ok", f"subnets {', '.join(subnets) or '-'}, no overlap with pyoverlay networks")


def daemon_json() -> Path:
    """dockerd's daemon.json as this process sees it (the managed plugin: through its /etc mount)."""
    return Path("/host/etc/docker/daemon.json") if Path("/host/etc").is_dir() else Path("/etc/docker/daemon.json")


def _reachable(server: str) -> bool:
    """Can a container reach this resolver (not the host's loopback, e.g. systemd-resolved's 127.0.0.53)?"""
    try:
        return not ipaddress.ip_address(server).is_loopback
    except ValueError:
        return False


def check_dns_address(settings: Settings, path: Path | None = None) -> Finding:
    """Names with no --dns per container need daemon.json's "dns" to start with the address pyoverlay serves."""
    name = "names without --dns"
    address = settings.dns_address
    if not settings.dns or address is None:
        return Finding(name, "ok", "off (PYOVERLAY_DNS / PYOVERLAY_DNS_ADDRESS); containers use --dns <gateway>")
    path = path or daemon_json()
    fallbacks = [u for u in (settings.dns_upstreams or upstreams_from_host()) if u != address and _reachable(u)]
    line = '"dns": ' + json.dumps([address, *fallbacks[:2]])
    fix = f"put {line} in /etc/docker/daemon.json and restart dockerd (once per host)"
    try:
        config = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as err:
        return Finding(name, "fail", f"{path}: {err}", f"make it valid JSON, then {fix}")
    servers = config.get("dns") if isinstance(config, dict) else None
    if not isinstance(servers, list) or address not in servers:
        return Finding(name, "warn", f"{path} does not name {address} in \"dns\": containers resolve names of "
                       f"other hosts only with --dns <gateway of their network>", fix)
    if servers[0] != address:
        return Finding(name, "warn", f"{path}: {address} is not the first of \"dns\" {servers}: "
                       f"resolvers ask the first, which does not know the containers' names", fix)
    return Finding(name, "ok", f"{path} names {address}: containers resolve names across hosts with no flag")


def check_forwarding() -> Finding:
    try:
        forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    except OSError:
        forwarding = False
    res = _run("iptables", "-w", "-S", "FORWARD")
    policy = next((line.split()[2] for line in res.stdout.splitlines() if line.startswith("-P FORWARD")), "unknown")
    docker_rules = "DOCKER" in res.stdout
    if not forwarding:
        return Finding("FORWARD", "warn", f"net.ipv4.ip_forward=0 (FORWARD policy {policy}): containers cannot reach "
                       "outside through docker_gwbridge (the overlay itself is unaffected)",
                       "sysctl -w net.ipv4.ip_forward=1 (Docker sets it unless started with --ip-forward=false)")
    if policy == "DROP" and not docker_rules:
        return Finding("FORWARD", "warn", "FORWARD policy DROP and no Docker rules: traffic to and from "
                       "docker_gwbridge is dropped (the overlay itself is bridged inside its own namespace and "
                       "unaffected)", "start dockerd with --iptables=true, or allow docker_gwbridge in FORWARD")
    return Finding("FORWARD", "ok", f"ip_forward=1, FORWARD policy {policy}; overlay traffic never crosses FORWARD "
                   "(bridged inside each network's namespace)")


def check_neighbours() -> Finding:
    """The kernel's ARP table is one for every network namespace of the host: each container's entries and
    pyoverlay's permanent ones count against net.ipv4.neigh.default.gc_thresh3 (1024 by default)."""
    try:
        lines = Path("/proc/net/stat/arp_cache").read_text().split("\n")
        head = lines[0].split()
        rows = [dict(zip(head, (int(v, 16) for v in line.split()), strict=True)) for line in lines[1:] if line.strip()]
        entries, fulls = rows[0]["entries"], sum(r.get("table_fulls", 0) for r in rows)
    except (OSError, ValueError, IndexError, KeyError):
        return Finding("neighbour table", "ok", "ARP table statistics are not readable here")
    try:
        thresh: int | None = int(Path("/proc/sys/net/ipv4/neigh/default/gc_thresh3").read_text())
    except (OSError, ValueError):
        thresh = None  # only the host's initial namespace shows the limit
    limit = f"at most {thresh}" if thresh else "a limit only the host's own namespace shows"
    fix = ("raise the limits, e.g. sysctl -w net.ipv4.neigh.default.gc_thresh1=4096 "
           "net.ipv4.neigh.default.gc_thresh2=16384 net.ipv4.neigh.default.gc_thresh3=32768 (and in /etc/sysctl.d); "
           "every container needs an entry per peer it talks to")
    if thresh and entries > 0.75 * thresh:
        return Finding("neighbour table", "warn", f"the kernel's ARP table holds {entries} entries of {limit}: beyond "
                       "it, new neighbours are refused and containers cannot reach each other", fix)
    if fulls:
        return Finding("neighbour table", "warn", f"the kernel's ARP table has overflowed {fulls} times since boot "
                       f"({entries} entries now, {limit}): containers failed to reach each other then", fix)
    return Finding("neighbour table", "ok", f"{entries} ARP entries in use, {limit}")


def check_peers(counts: dict[int, tuple[int, int]]) -> Finding:
    short = {vni: c for vni, c in counts.items() if c[1] < c[0]}
    if short:
        detail = ", ".join(f"vni {vni}: {p}/{e}" for vni, (e, p) in sorted(short.items()))
        return Finding("peers", "warn", f"remote endpoints not programmed yet: {detail}",
                       "see the plugin log for the failing entries; the reconciler retries every pass")
    total = sum(e for e, _ in counts.values())
    return Finding("peers", "ok", f"{total} remote endpoints programmed on {len(counts)} networks")


def check_records(refused: list[tuple[str, str, str]]) -> Finding:
    """Records in etcd this plugin refused (kvstore/records.py): forged, corrupt or from a newer writer."""
    if not refused:
        return Finding("etcd records", "ok", "every record read from etcd was valid")
    shown = "; ".join(f"{kind} at {key or '?'}: {why}" for kind, key, why in refused[:5])
    more = f" (and {len(refused) - 5} more)" if len(refused) > 5 else ""
    return Finding("etcd records", "warn", f"{len(refused)} invalid records ignored: {shown}{more}",
                   "find out who wrote them (only pyoverlay hosts should write under the prefix: etcd auth, "
                   "PYOVERLAY_CLUSTER_SECRET); delete or rewrite them with etcdctl")


def run_all(settings: Settings, store: Store | None, datapath: DataPath, state: LocalState,
            docker: DockerAPI | None, vtep_filter: VtepFilter | None,
            peer_counts: Callable[[], dict[int, tuple[int, int]]] | None) -> list[dict[str, Any]]:
    networks = state.networks()
    findings = [
        check_vxlan(),
        check_ipsec(sum(1 for n in networks if n.record.encrypted)),
        check_vtep_filter(vtep_filter, len(networks)),
        check_mtu(datapath, state),
        check_port(datapath, settings.vxlan_port),
        check_etcd(store, settings),
        check_gwbridge(docker, state),
        check_dns_address(settings),
        check_forwarding(),
        check_neighbours(),
    ]
    if peer_counts is not None:
        findings.append(check_peers(peer_counts()))
        findings.append(check_records(QUARANTINE.snapshot()))  # only the serving plugin has read etcd
    return [asdict(f) for f in findings]
