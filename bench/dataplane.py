"""Data-path throughput and latency between containers on two simulated hosts.

Side by side in one run, between the same two host namespaces of tests/rig.py:
  underlay   the raw underlay between the hosts (the physical limit here)
  vxlan      a hand-made VXLAN device in each host namespace (no bridge, no veth)
  pyoverlay  two containers on a pyoverlay network (veth -> bridge -> VXLAN in the network namespace)
  docker-overlay  two containers on Docker's built-in overlay (swarm of the two hosts, --attachable)
Each path: iperf3 TCP with 1 and 4 streams, and ping round trips. Paths are interleaved over the
repetitions so drift on the machine affects them alike; the median repetition is reported.

    sudo .venv/bin/python bench/dataplane.py [--seconds 5] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time

from common import save, table

from tests.rig import Rig, sh, wait_for
from tests.test_swarm import run_attached, swarm_up

HANDMADE = {"vni": 4242, "port": 4790, "net": "192.168.250"}
RTT = re.compile(r"= ([0-9.]+)/([0-9.]+)/([0-9.]+)/")


def iperf(client: list[str], server: list[str], target: str, seconds: int, streams: int) -> float:
    """Gbit/s received, iperf3 run with client/server command prefixes (namespace entry)."""
    srv = subprocess.Popen([*server, "iperf3", "-s", "-1", "-B", target], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        out, last = None, ""
        for _ in range(50):
            res = sh(*client, "iperf3", "-c", target, "-t", str(seconds), "-P", str(streams), "-J",
                     check=False, timeout=seconds + 30)
            data = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}
            if res.returncode == 0 and "sum_received" in data.get("end", {}):
                out = data
                break
            last = data.get("error") or res.stderr.strip()
            time.sleep(0.2)  # the server is not listening yet
        if out is None:
            raise RuntimeError(f"iperf3 to {target} failed: {last}")
        return out["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        srv.kill()
        srv.wait()


def rtt(client: list[str], target: str, count: int) -> dict[str, float]:
    res = sh(*client, "ping", "-q", "-c", str(count), "-i", "0.01", "-s", "56", target, timeout=count + 30)
    m = RTT.search(res.stdout)
    assert m, res.stdout
    return {"min_ms": float(m.group(1)), "avg_ms": float(m.group(2))}


Path = tuple[list[str], list[str], str]   # client command prefix, server command prefix, target address


def container_ns(h, name: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Command prefix entering a container's network namespace."""
    pid = h.docker("inspect", "-f", "{{.State.Pid}}", name).stdout.strip()
    return ["nsenter", "-t", pid, "-n"]


def wait_paths(paths: dict[str, Path], timeout: float) -> None:
    for name, (client, _, target) in paths.items():
        wait_for(f"{name} path", lambda c=client, t=target: sh(*c, "ping", "-c1", "-W1", t,
                                                               check=False).returncode == 0, timeout=timeout)


def measure_paths(paths: dict[str, Path], args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """iperf3 with 1 and 4 streams and a ping run per path, paths interleaved over args.reps repetitions."""
    results: dict[str, dict[str, list[float]]] = {}
    for rep in range(args.reps):
        for name, (client, server, target) in paths.items():
            r = results.setdefault(name, {"gbps_1": [], "gbps_4": [], "rtt_avg_ms": [], "rtt_min_ms": []})
            r["gbps_1"].append(iperf(client, server, target, args.seconds, 1))
            r["gbps_4"].append(iperf(client, server, target, args.seconds, 4))
            lat = rtt(client, target, args.pings)
            r["rtt_avg_ms"].append(lat["avg_ms"])
            r["rtt_min_ms"].append(lat["min_ms"])
            print(f"rep {rep + 1}/{args.reps} {name:10} 1 stream {r['gbps_1'][-1]:.3f} Gbit/s, "
                  f"4 streams {r['gbps_4'][-1]:.3f} Gbit/s, rtt avg {lat['avg_ms']:.3f} ms", flush=True)
    return results


def handmade_vxlan(rig: Rig) -> None:
    h1, h2 = rig.hosts[:2]
    for me, peer, n in ((h1, h2, 1), (h2, h1, 2)):
        me.ns("ip", "link", "add", "hvx", "mtu", "1350", "type", "vxlan", "id", str(HANDMADE["vni"]),
              "dstport", str(HANDMADE["port"]), "local", me.ip, "remote", peer.ip, "nolearning")
        me.ns("ip", "addr", "add", f"{HANDMADE['net']}.{n}/24", "dev", "hvx")
        me.ns("ip", "link", "set", "hvx", "up")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pings", type=int, default=300)
    args = ap.parse_args()
    rig = Rig()
    try:
        rig.up(2)
        h1, h2 = rig.hosts
        for h in (h1, h2):
            h.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet",
                     "10.60.0.0/24", "dp")
        h1.run("dp-1", "dp")
        h2.run("dp-2", "dp")
        c2_ip = h2.ip_of("dp-2", "dp")
        # Docker's own overlay, same hosts: a swarm of the two, an attachable network (VXLAN on 4789).
        swarm_up(rig)
        h1.docker("network", "create", "-d", "overlay", "--attachable", "--subnet", "10.63.0.0/24", "dov")
        run_attached(h1, "dov-1", "dov")
        run_attached(h2, "dov-2", "dov")
        ov_ip = h2.ip_of("dov-2", "dov")

        handmade_vxlan(rig)
        paths = {
            "underlay": (["ip", "netns", "exec", h1.netns], ["ip", "netns", "exec", h2.netns], h2.ip),
            "vxlan": (["ip", "netns", "exec", h1.netns], ["ip", "netns", "exec", h2.netns],
                      f"{HANDMADE['net']}.2"),
            "pyoverlay": (container_ns(h1, "dp-1"), container_ns(h2, "dp-2"), c2_ip),
            "docker-overlay": (container_ns(h1, "dov-1"), container_ns(h2, "dov-2"), ov_ip),
        }
        wait_paths(paths, timeout=60)
        results = measure_paths(paths, args)
    finally:
        for h in reversed(rig.hosts):
            h.docker("swarm", "leave", "--force", check=False, timeout=60)
        rig.down()

    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    ref = med["vxlan"]
    rows = []
    for name, m in med.items():
        rows.append([name, f"{m['gbps_1']:.2f}", f"{m['gbps_4']:.2f}", f"{m['rtt_avg_ms']:.3f}",
                     f"{m['rtt_min_ms']:.3f}", f"{100 * m['gbps_1'] / ref['gbps_1']:.0f}%",
                     f"{100 * m['gbps_4'] / ref['gbps_4']:.0f}%"])
    ratio1 = med["pyoverlay"]["gbps_1"] / ref["gbps_1"]
    ratio4 = med["pyoverlay"]["gbps_4"] / ref["gbps_4"]
    ov = med["docker-overlay"]
    vs_docker = {"streams_1": round(med["pyoverlay"]["gbps_1"] / ov["gbps_1"], 3),
                 "streams_4": round(med["pyoverlay"]["gbps_4"] / ov["gbps_4"], 3),
                 "rtt_avg_ms": [round(med["pyoverlay"]["rtt_avg_ms"], 3), round(ov["rtt_avg_ms"], 3)]}
    md = (f"Median of {args.reps} interleaved repetitions, iperf3 {args.seconds} s per run, "
          f"{args.pings} pings at 10 ms intervals; underlay MTU 1400.\n\n"
          + table(["path", "1 stream Gbit/s", "4 streams Gbit/s", "rtt avg ms", "rtt min ms",
                   "1 stream vs hand-made VXLAN", "4 streams vs hand-made VXLAN"], rows)
          + f"\n\nTarget pyoverlay >= 95% of the hand-made VXLAN: 1 stream {100 * ratio1:.0f}%, "
            f"4 streams {100 * ratio4:.0f}% -> {'met' if min(ratio1, ratio4) >= 0.95 else 'NOT met'}."
          + f"\n\nTarget pyoverlay >= Docker's overlay, latency no worse: 1 stream "
            f"{100 * vs_docker['streams_1']:.0f}%, 4 streams {100 * vs_docker['streams_4']:.0f}%, rtt avg "
            f"{ov['rtt_avg_ms']:.3f} ms (Docker) vs {med['pyoverlay']['rtt_avg_ms']:.3f} ms (pyoverlay).")
    save("dataplane", {"seconds": args.seconds, "reps": args.reps, "raw": results, "median": med,
                       "pyoverlay_vs_vxlan": {"streams_1": round(ratio1, 3), "streams_4": round(ratio4, 3)},
                       "pyoverlay_vs_docker_overlay": vs_docker}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
