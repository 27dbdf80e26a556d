"""What the host-wide DNS address costs the containers that do not use pyoverlay: the latency of an external
name lookup from a default-bridge container, before (its resolver is the host's resolver itself, as without
pyoverlay) and after (daemon.json's "dns" names pyoverlay's address, which the kernel rewrites to that
resolver: plugin/kernel/dnsredirect.py), and through the plugin's own forwarder (the way before that rule, and
where the rule cannot be had); and the same lookup from a pyoverlay container with no flag (127.0.0.11 ->
pyoverlay -> the resolver), and a name of the container's own network answered by pyoverlay itself.

One simulated host; "the internet" is tests/dns_upstream.py on the root namespace's underlay address. Each
series: --queries queries (300 by default), one at a time, from inside the container's network namespace.

    sudo .venv/bin/python bench/dns_lookup.py [--queries 300]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import save, stats_table, summary

from plugin.config import DEFAULT_DNS_ADDRESS
from tests.rig import IMAGE, ROOT, DockerHost, Rig, sh

PY = ("-d", "pyoverlay", "--ipam-driver", "pyoverlay")
EXTERNAL = ("external.example", "192.0.2.55")
ASK = r"""
import json, sys, time, dns.message, dns.query
name, server, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
q = dns.message.make_query(name, "A")
out = []
for _ in range(n):
    t0 = time.perf_counter()
    r = dns.query.udp(q, server, timeout=2)
    out.append((time.perf_counter() - t0) * 1000)
    assert r.answer, r
print(json.dumps(out))
"""


def lookups(h: DockerHost, container: str, name: str, server: str, n: int) -> list[float]:
    pid = h.docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip()
    res = subprocess.run(["nsenter", "-t", pid, "-n", sys.executable, "-c", ASK, name, server, str(n)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    if res.returncode != 0:  # e.g. more than the DNS server's per-source rate (200/s) for too long
        raise RuntimeError(f"lookups of {name} at {server} from {container}: {res.stderr[-1000:]}")
    return [round(v, 3) for v in json.loads(res.stdout)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=300)
    args = ap.parse_args()
    rig = Rig(daemon={"dns": [DEFAULT_DNS_ADDRESS]})
    upstream = None
    res: dict[str, list[float]] = {}
    try:
        rig.up(1, plugin=False)
        h = rig.hosts[0]
        upstream = subprocess.Popen([sys.executable, "-m", "tests.dns_upstream", rig.root_ip, "=".join(EXTERNAL)],
                                    cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert upstream.stdout is not None and upstream.stdout.readline().strip() == "ready"
        h.start_plugin(PYOVERLAY_DNS_UPSTREAMS=rig.root_ip)
        h.docker("run", "-d", "--name", "before", "--dns", rig.root_ip, IMAGE, "sleep", "86400")
        h.docker("run", "-d", "--name", "after", IMAGE, "sleep", "86400")
        h.docker("network", "create", *PY, "--subnet", "10.73.0.0/24", "dnsbench")
        h.run("overlay", "dnsbench")
        h.run("named", "dnsbench")
        n = args.queries
        res["bridge_direct"] = lookups(h, "before", EXTERNAL[0], rig.root_ip, n)
        other = h.cli_json("status")["dns"]["other_networks"]
        assert other.startswith("kernel DNAT"), other
        res["bridge_via_pyoverlay"] = lookups(h, "after", EXTERNAL[0], DEFAULT_DNS_ADDRESS, n)
        h.ns("nft", "delete", "table", "ip", "pyoverlay_dns")  # what is left: the plugin's forwarder on lo
        res["bridge_via_forwarder"] = lookups(h, "after", EXTERNAL[0], DEFAULT_DNS_ADDRESS, n)
        res["overlay_external"] = lookups(h, "overlay", EXTERNAL[0], "127.0.0.11", n)
        res["overlay_network_name"] = lookups(h, "overlay", "named", DEFAULT_DNS_ADDRESS, n)
        engine = rig.engine.version()
    finally:
        if upstream is not None:
            upstream.kill()
        rig.down()
    stats = {k: summary(v, 3) for k, v in res.items()}
    labels = {"bridge_direct": "default bridge, resolver = the host's resolver (before)",
              "bridge_via_pyoverlay": "default bridge, resolver = 169.254.53.53 (after: kernel DNAT)",
              "bridge_via_forwarder": "default bridge, resolver = 169.254.53.53 through the plugin's forwarder",
              "overlay_external": "pyoverlay container, external name via 127.0.0.11",
              "overlay_network_name": "pyoverlay container, its network's name via 169.254.53.53"}
    md = stats_table("lookup (ms)", labels, stats)
    md += f"\n\n{engine}; one simulated host, resolver = tests/dns_upstream.py in the root namespace."
    save("dns_lookup", {"queries": args.queries, "ms": res, "summary": stats, "engine": engine}, md)
    return 0


if __name__ == "__main__":
    sh("true")
    sys.exit(main())
