"""Convergence: how soon after `docker run` returns on one host its container answers from the others.

For each cluster size (2, 4, 8 simulated hosts of tests/rig.py), 50 trials: a prober (bench/probe.py,
ICMP every 10 ms) waits in a container on every other host; a container with a fresh --ip is started on
host 1; the time from `docker run` returning to each prober's first reply is recorded. A reply that
arrives before `docker run` returns counts as 0 ms (Docker starts the container before it answers).

    sudo .venv/bin/python bench/convergence.py [--hosts 2 4 8] [--trials 50]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import save, summary, table

from tests.rig import Rig

PROBE = Path(__file__).resolve().parent / "probe.py"
SUBNET = "10.61.0"


def trial(rig: Rig, probers: dict[str, str], ip: str, name: str) -> list[float]:
    """ms from docker run returning on host 1 to the first reply at each other host."""
    a = rig.hosts[0]
    procs = []
    for pid in probers.values():
        p = subprocess.Popen(["nsenter", "-t", pid, "-n", sys.executable, str(PROBE), ip, "15"],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        procs.append(p)
    a.docker("run", "-d", "--name", name, "--network", "cv", "--ip", ip, "bb:local", "sleep", "600")
    returned = time.monotonic()
    out = []
    for p in procs:
        line = p.stdout.readline().strip()  # type: ignore[union-attr]
        p.wait()
        if line == "timeout":
            raise RuntimeError(f"{ip} never answered")
        out.append(max(0.0, (float(line) - returned) * 1000))
    a.docker("rm", "-f", name)
    return out


def run_size(n: int, trials: int) -> dict[str, object]:
    rig = Rig()
    try:
        rig.up(n)
        for h in rig.hosts:
            h.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet",
                     f"{SUBNET}.0/24", "cv")
        probers = {}
        for h in rig.hosts[1:]:
            h.run(f"probe-{h.name}", "cv")
            probers[h.name] = h.docker("inspect", "-f", "{{.State.Pid}}", f"probe-{h.name}").stdout.strip()
        trial(rig, probers, f"{SUBNET}.99", "warmup")  # first container start pulls caches in
        every, slowest = [], []
        for i in range(trials):
            got = trial(rig, probers, f"{SUBNET}.{100 + i}", f"cv{i}")
            every += got
            slowest.append(max(got))
            print(f"{n} hosts, trial {i + 1}/{trials}: " + " ".join(f"{v:.1f}" for v in got) + " ms", flush=True)
    finally:
        rig.down()
    return {"hosts": n, "trials": trials, "every_prober_ms": summary(every),
            "slowest_prober_ms": summary(slowest), "raw_ms": every}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--trials", type=int, default=50)
    args = ap.parse_args()
    sizes = [run_size(n, args.trials) for n in args.hosts]
    rows = []
    for s in sizes:
        e, w = s["every_prober_ms"], s["slowest_prober_ms"]
        rows.append([s["hosts"], s["trials"], e["p50"], e["p99"], e["max"], w["p50"], w["p99"]])  # type: ignore[index]
    worst = max(s["slowest_prober_ms"]["p99"] for s in sizes)  # type: ignore[index]
    md = ("Time from `docker run` returning on host 1 to the first ICMP reply (probe every 10 ms) at each "
          "other host.\n\n"
          + table(["hosts", "trials", "p50 ms", "p99 ms", "max ms", "p50 ms (last host)", "p99 ms (last host)"],
                  rows)
          + f"\n\nTarget p99 <= 200 ms: worst p99 {worst} ms -> {'met' if worst <= 200 else 'NOT met'}.")
    save("convergence", {"sizes": sizes}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
