"""Peer programming logic at fleet size, without a kernel: plugin.cluster.peers.PeerSync fed by the in-memory store
(tests/peer_fleet.py), the kernel replaced by a recorder. It isolates the plugin's own work per change from
netlink and etcd: the time to program every remote endpoint of N hosts x 40, then to follow 2,000 changes
(1,000 endpoints leave, 1,000 arrive, each its own write), with the watch answers coalesced into passes (as
the plugin runs) and, for comparison up to 4,000 endpoints, one pass per watch answer (as before).

    .venv/bin/python bench/peer_churn.py [--hosts 100 500] [--per-host 40]
"""

from __future__ import annotations

import argparse
import sys
import time

from common import save, table

from tests.peer_fleet import Fleet


def run(hosts: int, per_host: int, coalesce: bool) -> dict[str, float]:
    fleet = Fleet(hosts, per_host)
    if not coalesce:
        fleet.peers._pass_soon = fleet.peers.full_pass  # type: ignore[method-assign]
    fleet.write_hosts()
    fleet.peers.start()
    try:
        records = fleet.prepare(hosts * per_host)
        cpu0 = time.process_time()
        began = time.monotonic()
        fleet.write(records)
        fleet.wait_programmed(timeout=600)
        initial = time.monotonic() - began
        passes0 = fleet.peers.passes
        keys, arriving = [k for k, _ in records], fleet.prepare(1000)
        cpu1 = time.process_time()
        began = time.monotonic()
        fleet.delete(keys[:1000])
        fleet.write(arriving, batch=1)
        fleet.wait_programmed(timeout=600)
        churn = time.monotonic() - began
        cpu2 = time.process_time()
        return {"hosts": hosts, "endpoints": hosts * per_host, "coalesced": coalesce,
                "initial_s": round(initial, 2), "initial_cpu_s": round(cpu1 - cpu0, 2),
                "churn_2000_s": round(churn, 2), "churn_cpu_s": round(cpu2 - cpu1, 2),
                "churn_passes": fleet.peers.passes - passes0 if coalesce else 2000}
    finally:
        fleet.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--per-host", type=int, default=40)
    args = ap.parse_args()
    rows, results = [], []
    for n in args.hosts:
        # one pass per answer only where it finishes in minutes (it is O(changes x endpoints))
        for coalesce in (True, False) if n * args.per_host <= 4000 else (True,):
            r = run(n, args.per_host, coalesce)
            results.append(r)
            print(r, flush=True)
            rows.append([r["hosts"], r["endpoints"], "coalesced" if coalesce else "one per answer",
                         r["initial_s"], r["churn_2000_s"], r["churn_cpu_s"], r["churn_passes"]])
    md = ("PeerSync with the in-memory store and a recording kernel (no netlink, no etcd): seconds to program "
          "every remote endpoint, then 2,000 changes (1,000 leave, 1,000 arrive, one write each).\n\n"
          + table(["hosts", "endpoints", "passes", "all programmed s", "2,000 changes s", "CPU s (changes)",
                   "reconcile passes"], rows))
    save("peer_churn", {"results": results}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
