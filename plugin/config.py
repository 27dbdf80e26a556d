"""Settings, all from the environment (the same for `pyoverlay serve` and the operator commands)."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.config import EtcdConfig

DEFAULT_SOCKET = "/run/docker/plugins/pyoverlay.sock"
DEFAULT_STATE_DIR = "/var/lib/pyoverlay"
# Not 4789: Docker's swarm overlay holds that port on every swarm node, and pyoverlay runs beside it.
DEFAULT_VXLAN_PORT = 4800
# Names with no flag per container: daemon.json's "dns" names this address once per host; pyoverlay serves it
# on every host (link-local: never routed off the host, and not a network anyone's containers use).
DEFAULT_DNS_ADDRESS = "169.254.53.53"


class ConfigError(Exception):
    pass


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _int(name: str, default: int, low: int, high: int) -> int:
    raw = _env(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is outside {low}..{high}")
    return value


def _float(name: str, default: float) -> float:
    raw = _env(name)
    try:
        return float(raw) if raw is not None else default
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def _pool(name: str, default: str) -> tuple[IPNetwork, int]:
    """BASE/SIZE, for example 10.128.0.0/9/24: networks of /SIZE taken from BASE."""
    raw = _env(name, default) or default
    try:
        base, size = raw.rsplit("/", 1)
        return ipaddress.ip_network(base), int(size)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected BASE/SIZE such as {default}") from None


def _bool(name: str, default: bool) -> bool:
    raw = (_env(name) or "").lower()
    if not raw:
        return default
    if raw not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ConfigError(f"{name}={raw!r}: use true or false")
    return raw in ("1", "true", "yes", "on")


def _metrics_addr() -> str | None:
    raw = _env("PYOVERLAY_METRICS_ADDR", "127.0.0.1:9474") or ""
    if raw.lower() in ("off", "none", "0"):
        return None
    host, _, port = raw.rpartition(":")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        if not 1 <= int(port) <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"PYOVERLAY_METRICS_ADDR={raw!r}: expected IP:PORT such as 127.0.0.1:9474, or off") from None
    if not ip.is_loopback and _env("PYOVERLAY_METRICS_PUBLIC") != "1":
        raise ConfigError(f"PYOVERLAY_METRICS_ADDR={raw!r} is not a loopback address; metrics tell a lot about "
                          f"the cluster (set PYOVERLAY_METRICS_PUBLIC=1 to mean it)")
    return raw


def _dns_address() -> str | None:
    raw = (_env("PYOVERLAY_DNS_ADDRESS", DEFAULT_DNS_ADDRESS) or "").strip()
    if raw.lower() in ("", "off", "none"):
        return None
    try:
        ip = ipaddress.IPv4Address(raw)
    except ValueError:
        raise ConfigError(f"PYOVERLAY_DNS_ADDRESS={raw!r}: expected an IPv4 address such as {DEFAULT_DNS_ADDRESS}, "
                          f"or off") from None
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        # Docker drops loopback resolvers from containers' resolv.conf; the others cannot be served.
        raise ConfigError(f"PYOVERLAY_DNS_ADDRESS={raw}: not a unicast address a container can reach")
    return raw


def _key_bits() -> int:
    bits = _int("PYOVERLAY_KEY_BITS", 128, 128, 256)
    if bits not in (128, 256):
        raise ConfigError(f"PYOVERLAY_KEY_BITS={bits}: use 128 or 256")
    return bits


@dataclass(frozen=True)
class Settings:
    socket: Path
    state_dir: Path
    host: str
    vtep: str | None                 # IP or interface name; None = source address of the default route
    vxlan_port: int
    esp_port: int                    # VXLAN of encrypted networks: only ever leaves inside ESP
    scope: str
    mtu: int | None                  # default MTU override for every network on this host
    etcd_endpoints: list[str]        # empty = embedded single-host etcd
    etcd_cacert: str | None
    etcd_cert: str | None
    etcd_key: str | None
    etcd_username: str | None
    etcd_password: str | None
    etcd_timeout: float
    etcd_prefix: str
    default_pool: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]
    default_pool6: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]
    lease_ttl: int
    dead_host_grace: int             # seconds a host may be gone before its addresses are released
    log_level: str
    cluster_secret: str | None       # authenticates published public keys (encrypted networks)
    key_rotation: int                # seconds between new key pairs
    key_bits: int                    # AES-GCM key size for encrypted networks: 128 or 256
    threads: int
    propagate: bool                  # plain Docker: networks created on one host appear on every host
    dns: bool                        # names across hosts: a DNS server on every network's gateway
    dns_upstreams: list[str]         # where other names go; empty = this host's /etc/resolv.conf
    dns_address: str | None          # the host-wide DNS address (daemon.json "dns"), None = gateways only
    docker_host: str | None          # the local Docker API (DOCKER_HOST), None = Docker's default
    docker_name: str | None          # the name Docker knows this plugin by; None = find out
    metrics_addr: str | None         # HOST:PORT for Prometheus; None = not served
    reconcile_interval: int          # seconds between reconciler passes
    reconcile_grace: int             # seconds something must stay unowned before the reconciler removes it
    vtep_filter: bool                # drop VXLAN from hosts not registered in etcd (nftables)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def netns_dir(self) -> Path:
        return self.state_dir / "netns"

    def etcd(self, endpoints: list[str] | None = None) -> EtcdConfig:
        return EtcdConfig(
            endpoints=endpoints or self.etcd_endpoints,
            cacert=self.etcd_cacert,
            cert=self.etcd_cert,
            key=self.etcd_key,
            username=self.etcd_username,
            password=self.etcd_password,
            timeout=self.etcd_timeout,
        )


def _scope() -> str:
    scope = (_env("PYOVERLAY_SCOPE", "local") or "local").lower()
    if scope not in ("local", "global"):
        raise ConfigError(f"PYOVERLAY_SCOPE={scope!r}: use local (plain Docker) or global (swarm)")
    return scope


def _pools() -> tuple[tuple[IPNetwork, int], tuple[IPNetwork, int]]:
    pool4 = _pool("PYOVERLAY_DEFAULT_POOL", "10.128.0.0/9/24")
    pool6 = _pool("PYOVERLAY_DEFAULT_POOL6", "fd75:7079:6f76::/48/64")
    if pool4[0].version != 4 or pool6[0].version != 6:
        raise ConfigError("PYOVERLAY_DEFAULT_POOL must be IPv4 and PYOVERLAY_DEFAULT_POOL6 IPv6")
    return pool4, pool6


def _ports() -> tuple[int, int]:
    """The clear VXLAN port and the encrypted networks' port (whatever is sent to it goes inside ESP)."""
    vxlan_port = _int("PYOVERLAY_VXLAN_PORT", DEFAULT_VXLAN_PORT, 1, 65535)
    esp_port = _int("PYOVERLAY_ESP_PORT", vxlan_port + 1 if vxlan_port < 65535 else vxlan_port - 1, 1, 65535)
    if esp_port == vxlan_port:
        raise ConfigError(f"PYOVERLAY_ESP_PORT={esp_port} must differ from PYOVERLAY_VXLAN_PORT: the kernel "
                          f"encrypts everything sent to the encrypted networks' port, and only that")
    return vxlan_port, esp_port


def _list(name: str) -> list[str]:
    return [item.strip() for item in (_env(name, "") or "").split(",") if item.strip()]


def load() -> Settings:
    """The settings from the environment, each checked: a ConfigError names the variable and what it takes."""
    scope, (pool4, pool6), (vxlan_port, esp_port) = _scope(), _pools(), _ports()
    return Settings(
        socket=Path(_env("PYOVERLAY_SOCKET", DEFAULT_SOCKET) or DEFAULT_SOCKET),
        state_dir=Path(_env("PYOVERLAY_STATE_DIR", DEFAULT_STATE_DIR) or DEFAULT_STATE_DIR),
        host=_env("PYOVERLAY_HOST", socket.gethostname()) or socket.gethostname(),
        vtep=_env("PYOVERLAY_VTEP"),
        vxlan_port=vxlan_port,
        esp_port=esp_port,
        scope=scope,
        mtu=_int("PYOVERLAY_MTU", 0, 576, 65535) if _env("PYOVERLAY_MTU") else None,
        etcd_endpoints=_list("ETCD_ENDPOINTS"),
        etcd_cacert=_env("ETCD_CACERT"),
        etcd_cert=_env("ETCD_CERT"),
        etcd_key=_env("ETCD_KEY"),
        etcd_username=_env("ETCD_USERNAME"),
        etcd_password=_env("ETCD_PASSWORD"),
        etcd_timeout=_float("PYOVERLAY_ETCD_TIMEOUT", 2.0),
        etcd_prefix=_env("PYOVERLAY_ETCD_PREFIX", "/pyoverlay/v1") or "/pyoverlay/v1",
        default_pool=pool4,
        default_pool6=pool6,
        lease_ttl=_int("PYOVERLAY_LEASE_TTL", 15, 5, 3600),
        dead_host_grace=_int("PYOVERLAY_DEAD_HOST_GRACE", 300, 0, 30 * 86400),
        log_level=(_env("LOG_LEVEL", "info") or "info").upper(),
        cluster_secret=_env("PYOVERLAY_CLUSTER_SECRET"),
        key_rotation=_int("PYOVERLAY_KEY_ROTATION", 12 * 3600, 10, 365 * 86400),
        key_bits=_key_bits(),
        threads=_int("PYOVERLAY_THREADS", 16, 2, 256),
        # Swarm propagates networks and resolves names across nodes itself.
        propagate=_bool("PYOVERLAY_PROPAGATE", scope == "local"),
        dns=_bool("PYOVERLAY_DNS", scope == "local"),
        dns_upstreams=_list("PYOVERLAY_DNS_UPSTREAMS"),
        dns_address=_dns_address(),
        docker_host=_env("DOCKER_HOST"),
        docker_name=_env("PYOVERLAY_DOCKER_NAME"),
        metrics_addr=_metrics_addr(),
        reconcile_interval=_int("PYOVERLAY_RECONCILE_INTERVAL", 30, 1, 3600),
        reconcile_grace=_int("PYOVERLAY_RECONCILE_GRACE", 60, 0, 86400),
        vtep_filter=_bool("PYOVERLAY_VTEP_FILTER", True),
    )
