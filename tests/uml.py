"""Run a command inside a user-mode-linux guest whose kernel has ESP and AES-GCM (the host kernel has not).

The guest boots Debian's user-mode-linux kernel (on a CPU with AMX, the same kernel rebuilt with one patch by
packaging/uml-kernel.sh) with this machine's filesystem as its (read-only) root,
mounts tmpfs where things are written, loads the modules pyoverlay needs from /usr/lib/uml/modules, makes
iptables mean iptables-legacy (dockerd's NAT needs it; the UML kernel has no nft NAT), runs the command
from the repository directory, and hands its output and exit status back through a writable hostfs
directory. The exit status of this script is the command's.

Through the same directory a guest test can ask for a CPU hog on every core of the host (`host_cpu_hog()`):
the guest's kernel then competes for the CPU as it would on a busy machine.

    python -m tests.uml [--mem 3G] [--timeout 1500] -- .venv/bin/python -m pytest tests/test_ipsec.py
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "/usr/bin/linux.uml"
# Debian 12's kernel panics on a CPU with AMX; this builds (once) and names one that boots there.
AMX_KERNEL_BUILDER = ROOT / "packaging" / "uml-kernel.sh"
MODULES = Path("/usr/lib/uml/modules")
# What the guest loads up front (dependencies come along through modprobe).
LOAD = ["veth", "bridge", "br_netfilter", "vxlan", "esp4", "xfrm_user", "xfrm4_tunnel", "af_key", "gcm",
        "aes_generic", "ghash_generic", "ctr", "seqiv", "echainiv", "authenc", "nf_tables",
        "nft_compat", "nft_ct", "nft_xfrm", "nf_conntrack", "nf_nat", "iptable_nat", "iptable_filter",
        "iptable_mangle", "ip6table_filter", "ip6table_nat", "xt_conntrack", "xt_MASQUERADE", "xt_addrtype",
        "xt_nat", "xt_mark", "xt_comment", "xt_tcpudp", "xt_multiport", "xt_policy", "xt_u32", "ipt_REJECT",
        "overlay", "tun", "dummy", "nf_reject_ipv4", "nft_masq", "ip_set",
        "ip_set_hash_ip", "xt_set"]

INIT = """#!/bin/sh
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
[ -c /dev/urandom ] || mount -t devtmpfs dev /dev   # the kernel may have mounted it already
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs shm /dev/shm
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
mount -t tmpfs varlib /var/lib
mkdir -p {out}
mount -t hostfs -o {out} none {out}
# A checkout under one of the tmpfs mounts above (/tmp, say) is hidden now: bring it back from the host.
[ -d {repo}/plugin ] || {{ mkdir -p {repo} && mount -t hostfs -o {repo} none {repo}; }}
# cgroup v1 hierarchies, like the host (tests/rig.py re-mounts them per simulated host)
mount -t tmpfs cgroup /sys/fs/cgroup
for c in $(awk 'NR>1 && $4==1 {{print $1}}' /proc/cgroups); do
  mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
done
mkdir -p /run/uml-bin
cat > /run/uml-bin/modprobe <<'EOF'
#!/bin/sh
exec /sbin/modprobe -d {modroot} "$@"
EOF
chmod +x /run/uml-bin/modprobe
echo /run/uml-bin/modprobe > /proc/sys/kernel/modprobe
for m in {modules}; do /run/uml-bin/modprobe $m 2>>{out}/modprobe.log; done
ln -sf /usr/sbin/iptables-legacy /run/uml-bin/iptables
ln -sf /usr/sbin/ip6tables-legacy /run/uml-bin/ip6tables
ln -sf /usr/sbin/iptables-legacy-save /run/uml-bin/iptables-save
ln -sf /usr/sbin/iptables-legacy-restore /run/uml-bin/iptables-restore
ln -sf /usr/sbin/ip6tables-legacy-save /run/uml-bin/ip6tables-save
ln -sf /usr/sbin/ip6tables-legacy-restore /run/uml-bin/ip6tables-restore
export PATH=/run/uml-bin:$PATH HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYOVERLAY_IN_UML=1 PYOVERLAY_UML_OUT={out}
hostname uml
ip link set lo up
sysctl -qw net.ipv4.ip_forward=1
# The first ESP state with AES-GCM makes the kernel build and self-test the algorithm (seconds here): once now.
ip xfrm state add src 127.0.0.9 dst 127.0.0.9 proto esp spi 9 mode transport aead 'rfc4106(gcm(aes))' \
  0x0000000000000000000000000000000000000000 128 2>>{out}/modprobe.log
ip xfrm state flush
cd {repo}
{env} {command} > {out}/log 2>&1
echo $? > {out}/rc
sync
echo o > /proc/sysrq-trigger
sleep 5
"""


def available() -> str | None:
    """None when a guest can boot here; otherwise what is missing."""
    if not os.path.exists(KERNEL):
        return f"{KERNEL} is missing (apt-get install user-mode-linux)"
    if not MODULES.is_dir():
        return f"{MODULES} is missing (apt-get install user-mode-linux)"
    return None


def kernel() -> str:
    """The guest's kernel for this CPU: Debian's, or on an AMX CPU the patched build of it."""
    if not _cpu_flags(["amx_tile"]):
        return KERNEL
    built = subprocess.run([str(AMX_KERNEL_BUILDER)], capture_output=True, text=True, check=False)
    if built.returncode != 0:
        raise RuntimeError("this CPU has AMX, where Debian's user-mode-linux 6.1 cannot boot, and building the "
                           f"patched kernel failed ({AMX_KERNEL_BUILDER}):\n{built.stderr[-3000:]}")
    return built.stdout.strip().splitlines()[-1]


def run(command: list[str], mem: str = "3G", timeout: float = 1500, env: dict[str, str] | None = None,
        stream: bool = True) -> tuple[int, str]:
    """Boot, run command inside, power off. Returns (exit status, output)."""
    problem = available()
    if problem:
        raise RuntimeError(problem)
    # Not under /tmp: the guest mounts a tmpfs there, which would hide this directory.
    work = Path(tempfile.mkdtemp(prefix="pyoverlay-uml-", dir="/var/tmp"))
    out = work / "out"
    out.mkdir()
    modroot = work / "modroot"
    (modroot / "lib").mkdir(parents=True)
    (modroot / "lib" / "modules").symlink_to(MODULES)
    init = work / "init.sh"
    init.write_text(INIT.format(out=out, modroot=modroot, modules=" ".join(LOAD), repo=ROOT,
                                command=shlex.join(command),
                                env=" ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())))
    init.chmod(0o755)
    args = [kernel(), f"mem={mem}", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "ro", f"init={init}",
            "con=null", "con0=null,fd:1", "quiet"]
    began = time.monotonic()
    done = threading.Event()
    hogs = threading.Thread(target=_serve_hog_requests, args=(out, done), daemon=True)
    hogs.start()
    try:
        guest = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, "TMPDIR": str(work)}, check=False)
    except subprocess.TimeoutExpired:
        subprocess.run(["pkill", "-KILL", "-f", str(init)], check=False)
        return 124, f"guest did not finish within {timeout}s\n" + _read(out / "log")
    finally:
        done.set()
        hogs.join()
    rc_text = _read(out / "rc").strip()
    log = _read(out / "log")
    if stream:
        print(log, flush=True)
    took = time.monotonic() - began
    if not rc_text:
        why = ""
        if "ptrace set fp regs failed" in guest.stdout:
            # Debian's unpatched 6.1 on a CPU with more XSAVE state than it knows (kernel() avoids that).
            why = ("this host's CPU state is larger than this user-mode-linux kernel can handle (AMX: "
                   f"{', '.join(_cpu_flags(['amx_tile', 'amx_int8', 'amx_bf16'])) or 'none seen'}); "
                   "packaging/uml-kernel.sh builds one that can\n")
        return 125, (f"guest ended without a result after {took:.0f}s\n{why}console:\n{guest.stdout[-4000:]}"
                     f"\n{log}")
    shutil.rmtree(work, ignore_errors=True)
    return int(rc_text), log


def _serve_hog_requests(out: Path, done: threading.Event) -> None:
    """While the guest runs: a busy loop on every host core for as long as the file `hog` exists in out;
    `hog.running` says so (with the hogs' pids) to the guest."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        while not done.wait(0.2):
            wanted = (out / "hog").exists()
            if wanted and not procs:
                procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                         for _ in range(os.cpu_count() or 1)]
                (out / "hog.running").write_text(" ".join(str(p.pid) for p in procs))
            elif not wanted and procs:
                _stop(procs)
                procs = []
                (out / "hog.running").unlink(missing_ok=True)
    finally:
        _stop(procs)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
        p.wait()


@contextlib.contextmanager
def host_cpu_hog(timeout: float = 60) -> Iterator[int]:
    """Inside the guest: every core of the host busy for the duration (yields how many hogs run)."""
    out = Path(os.environ["PYOVERLAY_UML_OUT"])

    def running() -> bool:
        return "hog.running" in os.listdir(out)   # readdir reaches the host; a cached lookup might not

    (out / "hog").write_text("on")
    try:
        deadline = time.monotonic() + timeout
        while not running():
            if time.monotonic() > deadline:
                raise TimeoutError("the host did not start its CPU hog")
            time.sleep(0.2)
        yield len((out / "hog.running").read_text().split())
    finally:
        (out / "hog").unlink(missing_ok=True)
        deadline = time.monotonic() + timeout
        while running() and time.monotonic() < deadline:
            time.sleep(0.2)


def _cpu_flags(wanted: list[str]) -> list[str]:
    text = _read(Path("/proc/cpuinfo"))
    return [f for f in wanted if f" {f}" in text]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem", default="3G")
    ap.add_argument("--timeout", type=float, default=1500)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    rc, output = run(command or ["sh", "-c", "uname -a; cat /proc/crypto | grep -c name"], args.mem, args.timeout)
    if rc in (124, 125):
        print(output)
    print(f"uml: exit status {rc}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
