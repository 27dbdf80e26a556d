"""Prometheus metrics of the plugin (served on PYOVERLAY_METRICS_ADDR when set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

CALL_SECONDS = Histogram("pyoverlay_call_seconds", "Plugin call latency as the plugin measured it",
                         ["call"], buckets=_BUCKETS)
CALL_ERRORS = Counter("pyoverlay_call_errors_total", "Plugin calls answered with an Err", ["call"])
ETCD_SECONDS = Histogram("pyoverlay_etcd_seconds", "etcd round trips", ["op"], buckets=_BUCKETS)
ETCD_ERRORS = Counter("pyoverlay_etcd_errors_total", "etcd operations that failed", ["op"])
PENDING = Gauge("pyoverlay_pending_store_changes", "etcd changes queued while etcd was unreachable")


def observe_etcd(op: str, seconds: float, ok: bool) -> None:
    ETCD_SECONDS.labels(op).observe(seconds)
    if not ok:
        ETCD_ERRORS.labels(op).inc()
