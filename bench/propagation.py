"""How long network propagation and name changes take across hosts (plain Docker, 2 simulated hosts).

- network create / rm: `docker network create` (rm) returns on host 1 -> Docker's own create (destroy)
  event for that network on host 2 (`docker events` timestamps, nanoseconds);
- name appears / goes: `docker run --name web-N --ip …` (`docker rm -f`) returns on host 1 -> the first
  answer with that address (the first answer without it) from pyoverlay's DNS server on the network's gateway,
  asked every 10 ms from inside a container's namespace on host 2.
Each measured over --trials trials (50 by default); p50 / p99 / max reported.

    sudo .venv/bin/python bench/propagation.py [--trials 50]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import save, stats_table, summary

from tests.rig import ROOT, DockerHost, Rig, sh, wait_for

PY = ("-d", "pyoverlay", "--ipam-driver", "pyoverlay")
GATEWAY = "10.71.0.1"
POLL = r"""
import sys, time, dns.message, dns.query, dns.rcode
name, want, gw = sys.argv[1], sys.argv[2], sys.argv[3]
q = dns.message.make_query(name, "A")
print("ready", flush=True)
while True:
    try:
        r = dns.query.udp(q, gw, timeout=0.2)
    except Exception:
        time.sleep(0.01); continue
    got = [rr.to_text() for rrset in r.answer for rr in rrset]
    if (want.startswith("!") and want[1:] not in got) or (want in got):
        print(time.time(), flush=True); break
    time.sleep(0.01)
"""


def events(h: DockerHost, action: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*h.docker_cmd(), "events", "--filter", "type=network", "--filter",
                             f"event={action}", "--format", "{{.Actor.Attributes.name}} {{.TimeNano}}"],
                            stdout=subprocess.PIPE, text=True)


def event_time(proc: subprocess.Popen[str], name: str) -> float:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("docker events ended")
        got, nanos = line.split()
        if got == name:
            return int(nanos) / 1e9


def poller(h: DockerHost, container: str, name: str, want: str) -> subprocess.Popen[str]:
    pid = h.docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip()
    proc = subprocess.Popen(["nsenter", "-t", pid, "-n", sys.executable, "-c", POLL, name, want, GATEWAY],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def answered_at(proc: subprocess.Popen[str]) -> float:
    out, _ = proc.communicate(timeout=30)
    return float(out.strip())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=50)
    args = ap.parse_args()
    rig = Rig()
    res: dict[str, list[float]] = {"network_create": [], "network_rm": [], "name_appears": [], "name_goes": []}
    upstream = None
    try:
        rig.up(2, plugin=False)
        h1, h2 = rig.hosts
        # Names that are not containers go upstream: a local stand-in, nothing leaves the machine.
        upstream = subprocess.Popen([sys.executable, "-m", "tests.dns_upstream", rig.root_ip], cwd=ROOT,
                                    stdout=subprocess.PIPE, text=True)
        assert upstream.stdout is not None and upstream.stdout.readline().strip() == "ready"
        for h in rig.hosts:
            h.start_plugin(PYOVERLAY_PROPAGATE="true", PYOVERLAY_DNS_UPSTREAMS=rig.root_ip)
        created, removed = events(h2, "create"), events(h2, "destroy")
        for i in range(args.trials):
            name = f"bench{i}"
            h1.docker("network", "create", *PY, "--subnet", f"10.72.{i}.0/24", name)
            t0 = time.time()
            res["network_create"].append((event_time(created, name) - t0) * 1000)
            h1.docker("network", "rm", name)
            t0 = time.time()
            res["network_rm"].append((event_time(removed, name) - t0) * 1000)
        created.kill()
        removed.kill()
        h1.docker("network", "create", *PY, "--subnet", "10.71.0.0/24", "names")
        wait_for("names on h2", lambda: h2.docker("network", "inspect", "names", check=False).returncode == 0)
        h2.run("asker", "names", "--dns", GATEWAY)
        for i in range(args.trials):
            ip = f"10.71.0.{100 + i}"
            proc = poller(h2, "asker", f"web{i}", ip)
            h1.run(f"web{i}", "names", ip=ip)
            t0 = time.time()
            res["name_appears"].append(max(0.0, answered_at(proc) - t0) * 1000)
            proc = poller(h2, "asker", f"web{i}", "!" + ip)
            h1.docker("rm", "-f", f"web{i}")
            t0 = time.time()
            res["name_goes"].append(max(0.0, answered_at(proc) - t0) * 1000)
    finally:
        if upstream is not None:
            upstream.kill()
        rig.down()
    stats = {k: summary(v) for k, v in res.items()}
    labels = {"network_create": "network create on h1 -> exists on h2",
              "network_rm": "network rm on h1 -> removed on h2",
              "name_appears": "docker run on h1 -> name resolves on h2",
              "name_goes": "docker rm -f on h1 -> name gone on h2"}
    md = stats_table("what (ms)", labels, stats)
    save("propagation", {"trials": args.trials, "ms": res, "summary": stats}, md)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sh("true")
    sys.exit(main())
