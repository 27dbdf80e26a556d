"""Convergence as a user sees it: from `docker run` returning on host 1 to the first reply at the others.

For each cluster size (2, 4, 8 simulated hosts of tests/rig.py), 50 trials. In a container on every other
host a prober (bench/probe.py) pings the new container's address every 10 ms, in two ways per trial:

- `after`: the prober starts pinging the moment `docker run` returns on host 1 (a user's `ping` typed then),
- `waiting`: it pings from before `docker run` starts (a client retrying; its ARP for the address goes
  unanswered until the address is programmed, and the kernel retries ARP only once a second).

Each prober records the time of its first reply; a reply before `docker run` returned counts as 0 ms.

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
GOAL_MS = 200


def _prober(pid: str, ip: str, go: bool) -> subprocess.Popen[str]:
    p = subprocess.Popen(["nsenter", "-t", pid, "-n", sys.executable, str(PROBE), ip, "20", *(["go"] if go else [])],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def trial(rig: Rig, probers: dict[str, str], ip: str, name: str) -> dict[str, list[float]]:
    """ms from docker run returning on host 1 to the first reply at each other host, per mode."""
    a = rig.hosts[0]
    waiting = [_prober(pid, ip, go=False) for pid in probers.values()]
    after = [_prober(pid, ip, go=True) for pid in probers.values()]
    a.docker("run", "-d", "--name", name, "--network", "cv", "--ip", ip, "bb:local", "sleep", "600")
    returned = time.monotonic()
    for p in after:
        p.stdin.write("go\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
    out: dict[str, list[float]] = {"after": [], "waiting": []}
    for mode, procs in (("after", after), ("waiting", waiting)):
        for p in procs:
            line = p.stdout.readline().strip()  # type: ignore[union-attr]
            p.wait()
            if line == "timeout":
                raise RuntimeError(f"{ip} never answered ({mode})")
            out[mode].append(max(0.0, (float(line) - returned) * 1000))
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
        result: dict[str, object] = {"hosts": n, "trials": trials}
        raw: dict[str, list[float]] = {"after": [], "waiting": []}
        slowest: dict[str, list[float]] = {"after": [], "waiting": []}
        for i in range(trials):
            got = trial(rig, probers, f"{SUBNET}.{100 + i}", f"cv{i}")
            for mode, values in got.items():
                raw[mode] += values
                slowest[mode].append(max(values))
            print(f"{n} hosts, trial {i + 1}/{trials}: after " + " ".join(f"{v:.1f}" for v in got["after"])
                  + " | waiting " + " ".join(f"{v:.1f}" for v in got["waiting"]) + " ms", flush=True)
        for mode in raw:
            result[mode] = {"every_prober_ms": summary(raw[mode]), "slowest_prober_ms": summary(slowest[mode]),
                            "raw_ms": raw[mode]}
    finally:
        rig.down()
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--trials", type=int, default=50)
    args = ap.parse_args()
    sizes = [run_size(n, args.trials) for n in args.hosts]
    rows = []
    for s in sizes:
        for mode in ("after", "waiting"):
            e, w = s[mode]["every_prober_ms"], s[mode]["slowest_prober_ms"]  # type: ignore[index]
            rows.append([s["hosts"], mode, s["trials"], e["p50"], e["p99"], e["max"], w["p50"], w["max"]])
    worst = max(s[m]["every_prober_ms"]["max"] for s in sizes for m in ("after", "waiting"))  # type: ignore[index]
    md = ("Time from `docker run` returning on host 1 to the first ICMP reply (probe every 10 ms) at each other "
          "host. `after`: pinging starts when `docker run` returns; `waiting`: pinging since before it started.\n\n"
          + table(["hosts", "prober", "trials", "p50 ms", "p99 ms", "max ms", "p50 ms (slowest host)",
                   "max ms (slowest host)"], rows)
          + f"\n\nGoal max <= {GOAL_MS} ms: worst {worst} ms -> {'met' if worst <= GOAL_MS else 'NOT met'}.")
    save("convergence", {"sizes": sizes, "goal_max_ms": GOAL_MS}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
