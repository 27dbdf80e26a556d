"""Plugin call latency under real Docker: container start/stop cycles on a pyoverlay network.

Brings up one simulated Docker host (tests/rig.py) with etcd on loopback-equivalent underlay, runs N cycles
of `docker run -d` + `docker rm -f`, and reads each call's duration as the plugin measured it (its
per-call log line). Prints p50/p99/max per call and writes JSON to bench/results/api_latency.json.

    sudo .venv/bin/python bench/api_latency.py [--cycles 200]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.rig import Rig  # noqa: E402

LINE = re.compile(r"call=(\S+) .*?ms=([0-9.]+) outcome=(\S+)")
RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
    return ordered[idx]


def summarise(log: str) -> dict[str, dict[str, float]]:
    calls: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    for m in LINE.finditer(log):
        call, ms, outcome = m.group(1), float(m.group(2)), m.group(3)
        calls.setdefault(call, []).append(ms)
        if outcome != "ok":
            errors[call] = errors.get(call, 0) + 1
    return {
        call: {"count": len(v), "p50_ms": round(statistics.median(v), 2), "p99_ms": round(percentile(v, 0.99), 2),
               "max_ms": round(max(v), 2), "errors": errors.get(call, 0)}
        for call, v in sorted(calls.items())
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=200)
    args = ap.parse_args()
    rig = Rig()
    try:
        rig.up(1)
        h = rig.hosts[0]
        h.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet",
                 "10.40.0.0/22", "bench")
        mark = len(h.plugin_log())
        start = time.monotonic()
        for i in range(args.cycles):
            h.docker("run", "-d", "--name", f"b{i}", "--network", "bench", "bb:local", "sleep", "600")
            h.docker("rm", "-f", f"b{i}")
        wall = time.monotonic() - start
        stats = summarise(h.plugin_log()[mark:])
        h.docker("network", "rm", "bench")
    finally:
        rig.down()
    result = {"benchmark": "api_latency", "cycles": args.cycles, "wall_seconds": round(wall, 1),
              "etcd": "one etcd on the rig's underlay (same machine)", "calls": stats,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "api_latency.json").write_text(json.dumps(result, indent=2))
    print(f"{args.cycles} container start/stop cycles in {wall:.1f}s")
    print(f"{'call':42} {'count':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>6}")
    for call, s in stats.items():
        print(f"{call:42} {s['count']:6d} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f} {s['max_ms']:8.2f} {s['errors']:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
