"""Encrypted networks: throughput and latency, encrypted vs unencrypted pyoverlay vs a hand-made ESP+VXLAN.

The host kernel has no ESP, so this runs inside the user-mode-linux guest (tests/uml.py) and the figures are
the guest's (one emulated CPU: far below the host's absolute numbers; compare the paths with each other).
In one run, between the same two simulated host namespaces:
  esp+vxlan   a hand-made VXLAN device in each host namespace, its UDP port covered by hand-made xfrm ESP
              states and policies (transport mode, rfc4106(gcm(aes)) 128-bit, ESN) - the reference;
  encrypted   two containers on a pyoverlay network created with --opt encrypted;
  clear       two containers on an unencrypted pyoverlay network.
Paths are interleaved over the repetitions; the median repetition is reported.

    sudo .venv/bin/python bench/encrypted.py [--seconds 5] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys

from common import save, table
from dataplane import container_ns, measure_paths, wait_paths

from tests.rig import Rig

HANDMADE = {"vni": 4243, "port": 4791, "net": "192.168.251", "reqid": "4243"}
KEY_12 = "0x" + "11" * 20   # AES-128 key + 4-byte salt per direction (fixed: a benchmark, not a secret)
KEY_21 = "0x" + "22" * 20
MARKER = "ENCRYPTED-BENCH-RESULT "


def handmade_esp_vxlan(rig: Rig) -> None:
    h1, h2 = rig.hosts[:2]
    for me, peer, n in ((h1, h2, 1), (h2, h1, 2)):
        me.ns("ip", "link", "add", "hvx", "mtu", "1310", "type", "vxlan", "id", str(HANDMADE["vni"]),
              "dstport", str(HANDMADE["port"]), "local", me.ip, "remote", peer.ip, "nolearning", "noudpcsum")
        me.ns("ip", "addr", "add", f"{HANDMADE['net']}.{n}/24", "dev", "hvx")
        me.ns("ip", "link", "set", "hvx", "up")
        for src, dst, spi, key in ((h1.ip, h2.ip, "0x4243a", KEY_12), (h2.ip, h1.ip, "0x4243b", KEY_21)):
            me.ns("ip", "xfrm", "state", "add", "src", src, "dst", dst, "proto", "esp", "spi", spi, "reqid",
                  HANDMADE["reqid"], "mode", "transport", "replay-window", "128", "flag", "esn",
                  "aead", "rfc4106(gcm(aes))", key, "128")
        me.ns("ip", "xfrm", "policy", "add", "src", f"{me.ip}/32", "dst", f"{peer.ip}/32", "proto", "udp",
              "dport", str(HANDMADE["port"]), "dir", "out", "tmpl", "src", me.ip, "dst", peer.ip, "proto", "esp",
              "reqid", HANDMADE["reqid"], "mode", "transport")


def measure(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    rig = Rig()
    try:
        rig.up(2, PYOVERLAY_CLUSTER_SECRET=secrets.token_hex(32))  # encrypted networks need one
        h1, h2 = rig.hosts
        for h in (h1, h2):
            h.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--opt", "encrypted",
                     "--subnet", "10.61.0.0/24", "enc")
            h.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet",
                     "10.62.0.0/24", "clr")
            h.run(f"enc-{h.name}", "enc")
            h.run(f"clr-{h.name}", "clr")

        handmade_esp_vxlan(rig)
        paths = {
            "esp+vxlan": (["ip", "netns", "exec", h1.netns], ["ip", "netns", "exec", h2.netns],
                          f"{HANDMADE['net']}.2"),
            "encrypted": (container_ns(h1, "enc-h1"), container_ns(h2, "enc-h2"), h2.ip_of("enc-h2", "enc")),
            "clear": (container_ns(h1, "clr-h1"), container_ns(h2, "clr-h2"), h2.ip_of("clr-h2", "clr")),
        }
        wait_paths(paths, timeout=120)
        esp_before = int(h1.ns("sh", "-c", "ip -s xfrm state | grep -c esp").stdout.strip() or 0)
        assert esp_before >= 4, "pyoverlay and the hand-made path both have ESP states"
        return measure_paths(paths, args)
    finally:
        rig.down()


def report(args: argparse.Namespace, results: dict[str, dict[str, list[float]]]) -> None:
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    ref = med["esp+vxlan"]
    rows = []
    for name, m in med.items():
        rows.append([name, f"{1000 * m['gbps_1']:.0f}", f"{1000 * m['gbps_4']:.0f}", f"{m['rtt_avg_ms']:.3f}",
                     f"{m['rtt_min_ms']:.3f}", f"{100 * m['gbps_1'] / ref['gbps_1']:.0f}%",
                     f"{100 * m['gbps_4'] / ref['gbps_4']:.0f}%"])
    ratio1 = med["encrypted"]["gbps_1"] / ref["gbps_1"]
    ratio4 = med["encrypted"]["gbps_4"] / ref["gbps_4"]
    md = (f"Inside the user-mode-linux guest (one emulated CPU; absolute figures are the guest's). Median of "
          f"{args.reps} interleaved repetitions, iperf3 {args.seconds} s per run, {args.pings} pings at 10 ms "
          f"intervals; underlay MTU 1400.\n\n"
          + table(["path", "1 stream Mbit/s", "4 streams Mbit/s", "rtt avg ms", "rtt min ms",
                   "1 stream vs hand-made ESP", "4 streams vs hand-made ESP"], rows)
          + f"\n\nTarget encrypted pyoverlay >= 95% of the hand-made ESP+VXLAN: 1 stream {100 * ratio1:.0f}%, "
            f"4 streams {100 * ratio4:.0f}% -> {'met' if min(ratio1, ratio4) >= 0.95 else 'NOT met'}.")
    save("encrypted", {"seconds": args.seconds, "reps": args.reps, "raw": results, "median": med,
                       "encrypted_vs_handmade_esp": {"streams_1": round(ratio1, 3), "streams_4": round(ratio4, 3)}},
         md)
    print(md)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pings", type=int, default=200)
    args = ap.parse_args()
    if os.environ.get("PYOVERLAY_IN_UML"):
        # The guest's root is read-only: hand the figures to the host, which writes the result files.
        print(MARKER + json.dumps(measure(args)), flush=True)
        return 0
    from tests import uml

    rc, output = uml.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], timeout=3600, stream=True)
    line = next((ln for ln in output.splitlines() if ln.startswith(MARKER)), None)
    if rc != 0 or line is None:
        print(f"the benchmark failed inside the guest (exit status {rc})", file=sys.stderr)
        return rc or 1
    report(args, json.loads(line[len(MARKER):]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
