"""Prometheus metrics of the plugin (served on PYOVERLAY_METRICS_ADDR when set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

CALL_SECONDS = Histogram("pyoverlay_call_seconds", "Plugin call latency as the plugin measured it",
                         ["call"], buckets=_BUCKETS)
CALL_ERRORS = Counter("pyoverlay_call_errors_total", "Plugin calls answered with an Err", ["call"])
ETCD_SECONDS = Histogram("pyoverlay_etcd_seconds", "etcd round trips", ["op"], buckets=_BUCKETS)
ETCD_ERRORS = Counter("pyoverlay_etcd_errors_total", "etcd operations that failed", ["op"])
PENDING = Gauge("pyoverlay_pending_store_changes", "etcd changes queued while etcd was unreachable")
PEERS = Gauge("pyoverlay_peers_programmed", "Remote endpoints programmed into the kernel, per VNI", ["vni"])
KEY_EPOCH_AGE = Gauge("pyoverlay_key_epoch_age_seconds", "Age of this host's current key pair")
DNS_QUERIES = Counter("pyoverlay_dns_queries_total", "Queries to the DNS servers on the network gateways",
                      ["answer"])
DNS_DROPPED = Counter("pyoverlay_dns_dropped_total",
                      "DNS queries and connections dropped by a bound (per-source rate, queue, TCP slots)")
PROPAGATION_WAITING = Gauge("pyoverlay_propagation_pending_removals",
                            "Networks removed in the cluster that containers here still use")
RECONCILE_RUNS = Counter("pyoverlay_reconcile_runs_total", "Reconciler passes", ["outcome"])
RECONCILE_REPAIRS = Counter("pyoverlay_reconcile_repairs_total",
                            "What the reconciler re-created or removed, by kind", ["kind"])
IPAM_USED = Gauge("pyoverlay_ipam_addresses_used", "Addresses allocated in a pool (cluster-wide)", ["pool"])
IPAM_SIZE = Gauge("pyoverlay_ipam_addresses_usable", "Usable addresses of a pool", ["pool"])
VXLAN_STRANGERS = Gauge("pyoverlay_vxlan_dropped_unregistered_total",
                        "VXLAN datagrams dropped because their source is no host registered in etcd")
GUARD_LOST = Counter("pyoverlay_encryption_guard_lost_total",
                     "Times the reconciler found part of the encryption guard gone (encrypted networks down)")
INVALID_RECORDS = Counter("pyoverlay_invalid_records_total",
                          "Records read from etcd and refused (forged, corrupt, or not what pyoverlay writes)",
                          ["kind"])


def serve(address: str) -> None:
    """Serve /metrics on HOST:PORT (a loopback address unless the operator says otherwise)."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]"))


def observe_etcd(op: str, seconds: float, ok: bool) -> None:
    ETCD_SECONDS.labels(op).observe(seconds)
    if not ok:
        ETCD_ERRORS.labels(op).inc()
