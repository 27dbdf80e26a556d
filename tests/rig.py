"""Simulated Docker hosts on one machine, for the end-to-end tests and by hand.

Each host is a network namespace with its own underlay address (a veth to a shared underlay bridge that
lives in a namespace of its own), a private mount namespace held by a small holder process (its own
/run/docker/plugins, /etc/docker and cgroup mounts), its own dockerd and its own pyoverlay. One etcd runs
in the root namespace, reachable from every host over the underlay. Everything is torn down on exit,
even after a failure; `cleanup_stale()` removes what a killed run left behind.

By hand:  python -m tests.rig --hosts 3          (prints how to reach each host; Ctrl-C tears down)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore.embedded import stop_process

ROOT = Path(__file__).resolve().parent.parent
PYOVERLAY = os.environ.get("PYOVERLAY_BIN") or str(ROOT / ".venv" / "bin" / "pyoverlay")
PREFIX = "pyt"                       # every namespace and link the rig makes starts with this
UNDERLAY_NET = "10.99.0"             # hosts get .1 .. .N, the underlay bridge .254, the root leg .250
UNDERLAY_MTU = 1400                  # as on this machine's eth0: catches MTU mistakes
IMAGE = "bb:local"
# Daemons start 10-17x slower in the user-mode-linux guest than on a host: its waits stretch by this.
SLOW = 6 if os.environ.get("PYOVERLAY_IN_UML") else 1
MANAGED = "pyoverlay:latest"         # the managed plugin as `make plugin` creates it
ENGINE_ROOT = Path(os.environ.get("PYOVERLAY_ENGINE_ROOT", "/var/tmp/pyoverlay-engine/sid/root"))


@dataclass(frozen=True)
class Engine:
    """The Docker engine a rig's hosts run: Debian 12's (20.10, installed) or the current one (28.x, Debian
    sid's packages unpacked by packaging/engine.sh, with the system's runc)."""

    name: str
    root: Path | None = None

    def tool(self, name: str) -> str:
        for d in ("usr/bin", "usr/sbin"):
            if self.root is not None and (self.root / d / name).exists():
                return str(self.root / d / name)
        return name

    def path(self) -> str:
        system = os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        return system if self.root is None else f"{self.root / 'usr/sbin'}:{self.root / 'usr/bin'}:{system}"

    def version(self) -> str:
        return sh(self.tool("dockerd"), "--version").stdout.strip()


SYSTEM_ENGINE = Engine("20.10")
CURRENT_ENGINE = Engine("28", ENGINE_ROOT)


def engine_from_env() -> Engine:
    """PYOVERLAY_ENGINE=20.10 (default) or 28."""
    wanted = os.environ.get("PYOVERLAY_ENGINE") or "20.10"
    if wanted == "20.10":
        return SYSTEM_ENGINE
    if wanted != "28":
        raise ValueError(f"PYOVERLAY_ENGINE={wanted!r}: 28 or 20.10")
    if not (ENGINE_ROOT / "usr/sbin/dockerd").exists():
        raise RuntimeError(f"no Docker 28 under {ENGINE_ROOT}: run packaging/engine.sh (make test does)")
    return CURRENT_ENGINE


def sh(*cmd: str, check: bool = True, timeout: float = 60, capture: bool = True,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), capture_output=capture, text=True, timeout=timeout, input=input)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


def connect_as_nobody(path: Path | str) -> str:
    """Try a Unix socket as an unprivileged user (uid/gid 65534, no groups): "connected" or the error's name."""
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect(sys.argv[1]); print('connected')\nexcept OSError as e: print(type(e).__name__)")
    # Debian's python3: the one on root's PATH may live where nobody can read it.
    return sh("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", probe,
              str(path)).stdout.strip()


def wait_for(what: str, fn, timeout: float = 30, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as err:  # noqa: BLE001 - retried until the deadline
            last = err
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}" + (f": {last}" if last else ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_LOCK: list[object] = []


def exclusive() -> None:
    """One process at a time may run rigs on this machine: cleanup_stale would tear down another
    process's hosts. Taken once per process and held until it exits; a second process waits."""
    if _LOCK:
        return
    f = open("/run/pyoverlay-rig.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("rig: another process is running a rig; waiting for it", file=sys.stderr, flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    _LOCK.append(f)


def cleanup_stale() -> None:
    """Remove namespaces, links and processes a previous (killed) run of the rig left behind."""
    exclusive()
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX + "-"):
            pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", name, check=False)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX + "-"):
            sh("ip", "link", "del", name, check=False)


def busybox_tarball(workdir: Path) -> Path:
    """A rootfs of busybox-static with one symlink per applet, as a tarball for `docker import`."""
    tar = workdir / "busybox-rootfs.tar"
    if tar.exists():
        return tar
    busybox = shutil.which("busybox") or "/bin/busybox"
    root = workdir / "bbroot"
    (root / "bin").mkdir(parents=True, exist_ok=True)
    for d in ("etc", "tmp", "proc", "sys", "dev", "var/www", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    applets = sh(str(root / "bin" / "busybox"), "--list").stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "var" / "www" / "index.html").write_text("hello from pyoverlay\n")
    sh("tar", "-C", str(root), "-cf", str(tar), ".")
    return tar


def _stop_group(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    """Signal a process group started with start_new_session; SIGKILL it if it outlives timeout."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Etcd:
    """A real etcd (Debian's etcd-server) with its data in a temp dir, on loopback and the underlay."""

    def __init__(self, workdir: Path, listen: list[str], extra: tuple[str, ...] = ()) -> None:
        self.dir = workdir / "etcd"
        self.port, self.peer = free_port(), free_port()
        self.listen = listen
        self.extra = extra        # more etcd flags
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def local_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, ip: str) -> str:
        return f"http://{ip}:{self.port}"

    @property
    def endpoints(self) -> list[str]:
        """Where the harness (root namespace) reaches etcd."""
        return [self.local_url]

    def hosts_url(self, root_ip: str) -> str:
        """ETCD_ENDPOINTS for the hosts' plugins."""
        return self.url(root_ip)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        clients = ",".join(f"http://{ip}:{self.port}" for ip in self.listen)
        purl = f"http://127.0.0.1:{self.peer}"
        log = open(self.dir / "etcd.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", str(self.dir / "data"), "--listen-client-urls", clients,
             "--advertise-client-urls", self.local_url, "--listen-peer-urls", purl,
             "--initial-advertise-peer-urls", purl, "--initial-cluster", f"t={purl}",
             "--initial-cluster-state", "new", "--log-level", "warn", "--logger", "zap", *self.extra],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )
        log.close()
        wait_for("etcd", lambda: sh("etcdctl", f"--endpoints={self.local_url}", "endpoint", "health",
                                    check=False, timeout=5).returncode == 0, timeout=20)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def ctl(self, *args: str) -> str:
        return sh("etcdctl", f"--endpoints={','.join(self.endpoints)}", *args, timeout=10 * SLOW).stdout

    def keys(self, prefix: str = "/") -> list[str]:
        return [k for k in self.ctl("get", prefix, "--prefix", "--keys-only").splitlines() if k.strip()]

    def get_json(self, key: str) -> dict | None:  # type: ignore[type-arg]
        out = self.ctl("get", key, "--print-value-only")
        return json.loads(out) if out.strip() else None


class EtcdMember:
    """One member of an etcd cluster, in a network namespace of its own on the underlay (so it can be
    partitioned by taking its link down)."""

    def __init__(self, rig: Rig, index: int, names: list[str]) -> None:
        self.rig, self.index, self.names = rig, index, names
        self.name = names[index]
        self.ip = f"{UNDERLAY_NET}.{241 + index}"
        self.netns = f"{PREFIX}-{rig.tag}-e{index}"
        self.outer = f"{PREFIX}-{rig.tag}e{index}"
        self.dir = rig.workdir / f"etcd-{index}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.ip}:2379"

    def up(self) -> None:
        ul = self.rig.underlay_ns
        sh("ip", "netns", "add", self.netns)
        sh("ip", "link", "add", self.outer, "mtu", str(UNDERLAY_MTU), "type", "veth", "peer", "name", "eth0",
           "mtu", str(UNDERLAY_MTU), "netns", self.netns)
        sh("ip", "link", "set", self.outer, "netns", ul)
        sh("ip", "-n", ul, "link", "set", self.outer, "master", "br0", "up")
        sh("ip", "-n", self.netns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        sh("ip", "-n", self.netns, "link", "set", "eth0", "up")
        sh("ip", "-n", self.netns, "link", "set", "lo", "up")

    def start(self, new: bool = True) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        cluster = ",".join(f"{n}=http://{UNDERLAY_NET}.{241 + i}:2380" for i, n in enumerate(self.names))
        log = open(self.dir / "etcd.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "etcd", "--name", self.name, "--data-dir", str(self.dir / "data"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", f"http://{self.ip}:2380", "--initial-advertise-peer-urls", f"http://{self.ip}:2380",
             "--initial-cluster", cluster, "--initial-cluster-state", "new" if new else "existing",
             "--initial-cluster-token", f"pyt-{self.rig.tag}", "--log-level", "warn", "--logger", "zap"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()

    def kill(self) -> None:
        _stop_group(self.proc, signal.SIGKILL, 10)
        self.proc = None

    def partition(self, cut: bool) -> None:
        """Its only link down (cut) or up again: the member keeps running, cut off from everyone."""
        sh("ip", "-n", self.netns, "link", "set", "eth0", "down" if cut else "up")

    def down(self) -> None:
        self.kill()
        sh("ip", "-n", self.rig.underlay_ns, "link", "del", self.outer, check=False)
        sh("ip", "netns", "del", self.netns, check=False)


class EtcdCluster:
    """A 3-member etcd cluster (Debian's etcd-server), each member in its own namespace on the underlay;
    the hosts name all three in ETCD_ENDPOINTS. Same interface as Etcd for the rest of the rig."""

    def __init__(self, rig: Rig, size: int = 3) -> None:
        names = [f"m{i}" for i in range(size)]
        self.members = [EtcdMember(rig, i, names) for i in range(size)]

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    @property
    def local_url(self) -> str:
        return self.members[0].url

    def hosts_url(self, root_ip: str) -> str:
        return ",".join(self.endpoints)

    def start(self) -> None:
        for m in self.members:
            m.up()
            m.start()
        wait_for("etcd cluster healthy", lambda: self.healthy() == len(self.members), timeout=60)

    def healthy(self) -> int:
        res = sh("etcdctl", f"--endpoints={','.join(self.endpoints)}", "endpoint", "health", "-w", "json",
                 check=False, timeout=10)
        try:
            return sum(1 for e in json.loads(res.stdout or "[]") if e.get("health"))
        except ValueError:
            return 0

    def leader(self) -> EtcdMember:
        """The member that leads now (asked of every member that answers)."""
        res = sh("etcdctl", f"--endpoints={','.join(self.endpoints)}", "endpoint", "status", "-w", "json",
                 check=False, timeout=10)
        for st in json.loads(res.stdout or "[]"):
            header, leader = st.get("Status", {}).get("header", {}), st.get("Status", {}).get("leader")
            if leader and header.get("member_id") == leader:
                return next(m for m in self.members if m.url == st["Endpoint"])
        raise RuntimeError(f"no leader: {res.stdout} {res.stderr}")

    def stop(self) -> None:
        for m in self.members:
            m.down()

    def ctl(self, *args: str) -> str:
        return sh("etcdctl", f"--endpoints={','.join(self.endpoints)}", *args, timeout=10 * SLOW).stdout

    def keys(self, prefix: str = "/") -> list[str]:
        return [k for k in self.ctl("get", prefix, "--prefix", "--keys-only").splitlines() if k.strip()]


class DockerHost:
    def __init__(self, rig: Rig, index: int, forward_policy: str = "DROP") -> None:
        self.rig = rig
        self.index = index
        self.name = f"h{index}"
        self.netns = f"{PREFIX}-{rig.tag}-{self.name}"
        self.ip = f"{UNDERLAY_NET}.{index}"
        self.dir = rig.workdir / self.name
        self.sock = self.dir / "docker.sock"
        self.plugin_sock = self.dir / "plugins" / "pyoverlay.sock"
        self.state_dir = self.dir / "pyoverlay"
        self.managed_state = self.dir / "managed-state"     # the managed plugin's state mount (its /host/var/lib)
        self.forward_policy = forward_policy
        self.holder: subprocess.Popen[bytes] | None = None
        self.dockerd: subprocess.Popen[bytes] | None = None
        self.plugin: subprocess.Popen[bytes] | None = None
        self.plugin_env: dict[str, str] = {}
        self._log_mark = 0
        self.managed: str | None = None     # the managed plugin's name, once installed

    # -- lifecycle --------------------------------------------------------------------------------------

    def up(self) -> None:
        for d in ("plugins", "etc-docker", "data", "exec", "pyoverlay", "managed-state"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        ns, ul = self.netns, self.rig.underlay_ns
        outer = f"{PREFIX}-{self.rig.tag}{self.index}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", outer, "mtu", str(UNDERLAY_MTU), "type", "veth", "peer", "name", "eth0",
           "mtu", str(UNDERLAY_MTU), "netns", ns)
        sh("ip", "link", "set", outer, "netns", ul)
        sh("ip", "-n", ul, "link", "set", outer, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", f"{UNDERLAY_NET}.254")
        if self.rig.daemon:
            (self.dir / "etc-docker" / "daemon.json").write_text(json.dumps(self.rig.daemon))
        self._start_holder()
        self.start_dockerd()

    def _start_holder(self) -> None:
        """A process owning this host's mount namespace: dockerd and pyoverlay enter it (nsenter)."""
        lines = ["set -e", "mount -t tmpfs cgroup-root /sys/fs/cgroup"]
        for line in Path("/proc/self/mounts").read_text().splitlines():
            dev, path, fstype, opts = line.split()[:4]
            if not path.startswith("/sys/fs/cgroup/"):
                continue
            lines.append(f"mkdir -p {path}")
            if fstype == "cgroup2":
                lines.append(f"mount -t cgroup2 cgroup2 {path}")
            elif fstype == "cgroup":
                sub = [o for o in opts.split(",") if o not in ("rw", "ro", "relatime", "nosuid", "nodev",
                                                                 "noexec")]
                lines.append(f"mount -t cgroup -o {','.join(sub)} cgroup {path}")
        lines += [
            f"hostname {self.name}",
            "mkdir -p /run/docker/plugins /etc/docker",
            # The managed plugin's state mount is rshared: its namespace pins must reach this host's mount
            # namespace (as they reach a real host's, whose / is shared), so this directory is a shared mount.
            f"mount --bind {self.managed_state} {self.managed_state}",
            f"mount --make-shared {self.managed_state}",
            f"mount --bind {self.dir}/plugins /run/docker/plugins",
            f"mount --bind {self.dir}/etc-docker /etc/docker",
            "exec sleep infinity",
        ]
        script = "\n".join(lines)
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "-m", "-u", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(self.dir / "holder.log", "ab"),
            start_new_session=True,
        )
        # Wait until the holder's mount namespace is set up (the bind mount is visible in it).
        wait_for("host namespace", lambda: self._holder_ready(), timeout=10 * SLOW)

    def _holder_pid(self) -> int:
        assert self.holder is not None
        # ip netns exec -> unshare -> sh (exec'd into sleep): find the sleep in our netns.
        for pid in sh("ip", "netns", "pids", self.netns).stdout.split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                    return int(pid)
            except OSError:
                continue
        raise RuntimeError("holder not running")

    def _holder_ready(self) -> bool:
        pid = self._holder_pid()
        return "/run/docker/plugins" in Path(f"/proc/{pid}/mountinfo").read_text()

    def enter(self) -> list[str]:
        """Command prefix running a program inside this host (its network and mount namespaces)."""
        return ["nsenter", "-t", str(self._holder_pid()), "-m", "-n", "-u", "--"]

    def start_dockerd(self, extra: list[str] | None = None) -> None:
        cmd = self.enter() + [
            "dockerd", "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "exec"),
            "-H", f"unix://{self.sock}", "--pidfile", str(self.dir / "dockerd.pid"),
            "--cgroup-parent", f"{PREFIX}-{self.rig.tag}-{self.name}",
            "--bip", f"172.30.{self.index}.1/24",
            "--default-address-pool", "base=172.21.0.0/16,size=24",
            "--iptables=true", *(extra or []),
        ]
        # Swarm tasks use the images already here (imported), never a registry: none is reachable.
        env = {**os.environ, "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1", "PATH": self.rig.engine.path()}
        self.dockerd = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(self.dir / "dockerd.log", "ab"),
                                        stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            wait_for(f"dockerd on {self.name}",
                     lambda: self.docker("info", check=False, timeout=5).returncode == 0,
                     timeout=60 * SLOW, interval=0.2)
        except TimeoutError:
            print(f"--- {self.name} dockerd log (tail)\n{self.dockerd_log()[-4000:]}")
            raise
        self.iptables("-P", "FORWARD", self.forward_policy)
        if self.docker("image", "inspect", IMAGE, check=False).returncode != 0:
            tar = busybox_tarball(self.rig.workdir)
            sh(*self.docker_cmd(), "import", "-c", 'CMD ["/bin/sh"]', str(tar), IMAGE)

    def stop_dockerd(self, sig: int = signal.SIGTERM) -> None:
        _stop_group(self.dockerd, sig, 30)
        self.dockerd = None

    def start_plugin(self, **env: str) -> None:
        self.plugin_env = {**self.plugin_env, **env}
        full = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "PYOVERLAY_SOCKET": str(self.plugin_sock),
            "PYOVERLAY_STATE_DIR": str(self.state_dir),
            "PYOVERLAY_HOST": self.name,
            "PYOVERLAY_VTEP": self.ip,
            "ETCD_ENDPOINTS": self.rig.etcd.hosts_url(self.rig.root_ip),
            "PYOVERLAY_ETCD_PREFIX": self.rig.etcd_prefix,
            "LOG_LEVEL": "info",
            "DOCKER_HOST": f"unix://{self.sock}",
            # Most tests create a network on each host by hand; tests/test_cluster.py turns propagation on.
            "PYOVERLAY_PROPAGATE": "false",
            **self.plugin_env,
        }
        # A killed plugin leaves its socket file: do not mistake it for the new one listening.
        self.plugin_sock.unlink(missing_ok=True)
        self._log_mark = len(self.plugin_log())   # wait_ready reads only what this start writes
        self.plugin = subprocess.Popen(
            self.enter() + ["env", "-i", *(f"{k}={v}" for k, v in full.items()), PYOVERLAY, "serve"],
            stdin=subprocess.DEVNULL, stdout=open(self.dir / "plugin.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        plugin = self.plugin
        wait_for(f"pyoverlay socket on {self.name}", lambda: self.plugin_sock.exists() or plugin.poll() is not None,
                 timeout=10 * SLOW, interval=0.05)
        if plugin.poll() is not None:
            raise RuntimeError(f"pyoverlay on {self.name} exited ({plugin.returncode}): {self.plugin_log()[-2000:]}")

    def wait_ready(self) -> None:
        """Until the plugin has restored its state and joined the cluster (its log says `ready:`); the socket
        answers before that, and on the slow guest the rest of a start takes tens of seconds."""
        wait_for(f"pyoverlay on {self.name} ready", lambda: "ready: host=" in self.plugin_log()[self._log_mark:],
                 timeout=60 * SLOW)

    def cli(self, *args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`pyoverlay ARGS` on this host, with the environment its plugin runs with (as an operator would)."""
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "PYOVERLAY_SOCKET": str(self.plugin_sock), "PYOVERLAY_STATE_DIR": str(self.state_dir),
               "PYOVERLAY_HOST": self.name, "PYOVERLAY_VTEP": self.ip,
               "ETCD_ENDPOINTS": self.rig.etcd.hosts_url(self.rig.root_ip),
               "PYOVERLAY_ETCD_PREFIX": self.rig.etcd_prefix,
               "DOCKER_HOST": f"unix://{self.sock}", "LOG_LEVEL": "warning", **self.plugin_env}
        return sh(*self.enter(), "env", "-i", *(f"{k}={v}" for k, v in env.items()), PYOVERLAY, *args,
                  check=check, timeout=timeout)

    def cli_bare(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`pyoverlay ARGS` on this host with no pyoverlay setting at all: it must find the plugin (the managed one
        through `docker plugin inspect`). Only what differs from a standard host is given: the Docker socket
        (managed plugins' sockets are under /run/docker/plugins whatever dockerd's --exec-root)."""
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "DOCKER_HOST": f"unix://{self.sock}",
               "LOG_LEVEL": "warning"}
        return sh(*self.enter(), "env", "-i", *(f"{k}={v}" for k, v in env.items()), PYOVERLAY, *args, check=False,
                  timeout=timeout)

    def cli_json(self, *args: str) -> Any:
        res = self.cli(*args, "--json", check=False)
        assert res.stdout.strip(), f"pyoverlay {' '.join(args)} printed nothing: {res.stderr}"
        return json.loads(res.stdout)

    def metrics(self) -> dict[str, float]:
        """The plugin's Prometheus metrics, read on the host's own loopback (PYOVERLAY_METRICS_ADDR default)."""
        text = self.ns(sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
                       "'http://127.0.0.1:9474/metrics', timeout=10).read().decode())").stdout
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    # -- the managed plugin (make plugin) -----------------------------------------------------------------

    def install_plugin(self, name: str = MANAGED, **env: str) -> None:
        """`make plugin` against this host's dockerd, then `docker plugin set` + enable, as a user would."""
        res = sh("make", "-C", str(ROOT), "plugin", f"DOCKER_HOST=unix://{self.sock}", "PULL=0",
                 f"DOCKER={self.rig.engine.tool('docker')}", check=False,
                 timeout=1200)
        assert res.returncode == 0, f"make plugin failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        # As on a fresh host: the state mount's directory holds no pyoverlay/ yet (the plugin makes it) and the
        # certs mount keeps its default, the host's /etc, which has no pyoverlay/ either.
        settings = {
            "state.source": str(self.managed_state),
            "ETCD_ENDPOINTS": self.rig.etcd.hosts_url(self.rig.root_ip),
            "PYOVERLAY_ETCD_PREFIX": self.rig.etcd_prefix,
            "PYOVERLAY_VTEP": self.ip,
            "docker.source": str(self.dir),  # this host's docker.sock is there
            "PYOVERLAY_PROPAGATE": "false",
            **env,
        }
        self.docker("plugin", "set", name, *(f"{k}={v}" for k, v in settings.items()))
        self.docker("plugin", "enable", name, timeout=60)
        self.managed = name

    def managed_pids(self) -> list[int]:
        """The managed plugin's processes on this host (it shares the host's network namespace)."""
        mine = os.stat(f"/run/netns/{self.netns}").st_ino
        out = []
        for pid in sh("pgrep", "-f", "/opt/pyoverlay/bin/pyoverlay serve", check=False).stdout.split():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/ns/net").st_ino == mine:
                    out.append(int(pid))
        return out

    def dockerd_log(self) -> str:
        try:
            return (self.dir / "dockerd.log").read_text(errors="replace")
        except OSError:
            return ""

    def kill_plugin(self, sig: int = signal.SIGKILL) -> None:
        _stop_group(self.plugin, sig, 15)
        self.plugin = None

    def plugin_log(self) -> str:
        try:
            return (self.dir / "plugin.log").read_text(errors="replace")
        except OSError:
            return ""

    def down(self) -> None:
        if self.dockerd is not None:
            if self.plugin is not None or self.managed:
                # Containers go while the plugin still answers: a dockerd stopping containers on a
                # network whose plugin is gone retries each call for half a minute.
                ids = self.docker("ps", "-aq", check=False).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, check=False)
            if self.managed:
                # With --live-restore dockerd leaves plugins running when it stops: stop it first.
                self.docker("plugin", "disable", "-f", self.managed, check=False)
            self.stop_dockerd(signal.SIGTERM)
        self.kill_plugin(signal.SIGTERM)
        for pid in sh("ip", "netns", "pids", self.netns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        if self.holder is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.holder.pid, signal.SIGKILL)
            self.holder.wait()
        sh("ip", "netns", "del", self.netns, check=False)
        self._remove_cgroups()

    def _remove_cgroups(self) -> None:
        parent = f"{PREFIX}-{self.rig.tag}-{self.name}"
        for base in Path("/sys/fs/cgroup").iterdir():
            d = base / parent
            if d.is_dir():
                for child in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if child.is_dir():
                        with contextlib.suppress(OSError):
                            child.rmdir()
                with contextlib.suppress(OSError):
                    d.rmdir()

    # -- helpers for tests ------------------------------------------------------------------------------

    def docker(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # In the guest dockerd itself is slow (a bridge network takes ~10 s to create there, a container
        # ~30 s when the machine's CPU is stolen): its commands get the guest's margin.
        return sh(*self.docker_cmd(), *args, check=check, timeout=timeout * SLOW)

    def docker_cmd(self) -> list[str]:
        """The engine's own client, talking to this host's dockerd."""
        return [self.rig.engine.tool("docker"), "-H", f"unix://{self.sock}"]

    def ns(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command in this host's network namespace (root mount namespace)."""
        return sh("ip", "netns", "exec", self.netns, *cmd, check=check, timeout=timeout)

    def iptables(self, *args: str) -> None:
        self.ns("iptables", *args)

    def run(self, name: str, network: str, *args: str, ip: str | None = None, cmd: tuple[str, ...] = ()) -> str:
        extra = ["--ip", ip] if ip else []
        out = self.docker("run", "-d", "--name", name, "--network", network, *extra, *args, IMAGE,
                          *(cmd or ("sleep", "86400")))
        return out.stdout.strip()

    def exec(self, container: str, *cmd: str, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.docker("exec", container, *cmd, check=check, timeout=timeout)

    def ip_of(self, container: str, network: str) -> str:
        fmt = '{{(index .NetworkSettings.Networks "' + network + '").IPAddress}}'
        return self.docker("inspect", "-f", fmt, container).stdout.strip()


class Rig:
    def __init__(self, workdir: Path | None = None, tag: str | None = None, engine: Engine | None = None,
                 daemon: dict[str, Any] | None = None, etcd_members: int = 1) -> None:
        self.engine = engine or engine_from_env()
        self.daemon = daemon or {}      # every host's /etc/docker/daemon.json
        self.tag = tag or os.urandom(2).hex()
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="pyoverlay-rig-"))
        self.underlay_ns = f"{PREFIX}-{self.tag}-ul"
        self.root_ip = f"{UNDERLAY_NET}.250"
        # One etcd in the root namespace, or a cluster of members on the underlay.
        self.etcd: Etcd | EtcdCluster = (Etcd(self.workdir, ["127.0.0.1", self.root_ip]) if etcd_members == 1
                                         else EtcdCluster(self, etcd_members))
        self.etcd_prefix = f"/pyoverlay-test-{self.tag}"
        self.hosts: list[DockerHost] = []
        self._root_leg = f"{PREFIX}-{self.tag}r"

    def up_underlay(self) -> None:
        ul = self.underlay_ns
        sh("ip", "netns", "add", ul)
        sh("ip", "-n", ul, "link", "add", "br0", "mtu", str(UNDERLAY_MTU), "type", "bridge")
        sh("ip", "-n", ul, "addr", "add", f"{UNDERLAY_NET}.254/24", "dev", "br0")
        sh("ip", "-n", ul, "link", "set", "br0", "up")
        sh("ip", "-n", ul, "link", "set", "lo", "up")
        # The root namespace's leg: etcd listens there for the hosts.
        sh("ip", "link", "add", self._root_leg, "mtu", str(UNDERLAY_MTU), "type", "veth", "peer", "name", "rootleg",
           "mtu", str(UNDERLAY_MTU), "netns", ul)
        sh("ip", "-n", ul, "link", "set", "rootleg", "master", "br0", "up")
        sh("ip", "addr", "add", f"{self.root_ip}/24", "dev", self._root_leg)
        sh("ip", "link", "set", self._root_leg, "up")

    @contextlib.contextmanager
    def stranger(self, index: int = 77) -> Iterator[str]:
        """A machine on the underlay that is no registered host (a namespace); yields its netns name."""
        ns, outer = f"{PREFIX}-{self.tag}-x{index}", f"{PREFIX}-{self.tag}x{index}"
        try:
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outer, "mtu", str(UNDERLAY_MTU), "type", "veth", "peer", "name", "eth0",
               "mtu", str(UNDERLAY_MTU), "netns", ns)
            sh("ip", "link", "set", outer, "netns", self.underlay_ns)
            sh("ip", "-n", self.underlay_ns, "link", "set", outer, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{UNDERLAY_NET}.{index}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            yield ns
        finally:
            sh("ip", "-n", self.underlay_ns, "link", "del", outer, check=False)
            sh("ip", "netns", "del", ns, check=False)

    def add_host(self, forward_policy: str = "DROP", plugin: bool = True, **env: str) -> DockerHost:
        host = DockerHost(self, len(self.hosts) + 1, forward_policy)
        self.hosts.append(host)
        host.up()
        if plugin:
            host.start_plugin(**env)
        return host

    # Every simulated host shares this machine's one ARP table (it is per kernel, not per namespace); real
    # hosts each have their own. Room for several hosts' worth of containers, restored afterwards.
    NEIGH = {"net.ipv4.neigh.default.gc_thresh1": 4096, "net.ipv4.neigh.default.gc_thresh2": 16384,
             "net.ipv4.neigh.default.gc_thresh3": 32768}

    def _raise_neigh_limits(self) -> None:
        self._neigh_saved = {}
        for key, value in self.NEIGH.items():
            path = Path("/proc/sys") / key.replace(".", "/")
            current = int(path.read_text())
            if current < value:
                self._neigh_saved[key] = current
                path.write_text(str(value))

    def _restore_neigh_limits(self) -> None:
        for key, value in getattr(self, "_neigh_saved", {}).items():
            with contextlib.suppress(OSError):
                (Path("/proc/sys") / key.replace(".", "/")).write_text(str(value))

    def up(self, hosts: int = 1, plugin: bool = True, **env: str) -> Rig:
        """Underlay, etcd and the hosts; each host's pyoverlay started with env unless plugin is False."""
        cleanup_stale()
        self._raise_neigh_limits()
        self.up_underlay()
        self.etcd.start()
        for i in range(hosts):
            # Alternate FORWARD policies so both are always covered.
            self.add_host("DROP" if i % 2 == 0 else "ACCEPT", plugin=plugin, **env)
        return self

    def down(self) -> None:
        for host in reversed(self.hosts):
            try:
                host.down()
            except Exception as err:  # noqa: BLE001 - tear down the rest regardless
                print(f"rig: tearing down {host.name}: {err}", file=sys.stderr)
        self.etcd.stop()
        self._restore_neigh_limits()
        sh("ip", "link", "del", self._root_leg, check=False)
        sh("ip", "netns", "del", self.underlay_ns, check=False)
        if not os.environ.get("PYOVERLAY_KEEP_RIG"):
            shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def rig(hosts: int = 1, daemon: dict[str, Any] | None = None, **env: str) -> Iterator[Rig]:
    """A rig of hosts running pyoverlay (with env), torn down afterwards whatever happens."""
    r = Rig(daemon=daemon)
    try:
        yield r.up(hosts, **env)
    finally:
        r.down()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--hold", type=float, default=0, help="seconds to keep the rig (0 = until Ctrl-C)")
    args = ap.parse_args()
    with rig(args.hosts) as r:
        print(f"etcd: {r.etcd.local_url} (prefix {r.etcd_prefix})")
        for h in r.hosts:
            print(f"{h.name}: docker -H unix://{h.sock} ...   netns {h.netns}   underlay {h.ip}   "
                  f"plugin log {h.dir / 'plugin.log'}")
        try:
            if args.hold:
                time.sleep(args.hold)
            else:
                signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
