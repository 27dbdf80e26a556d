"""A private single-node etcd for the single-host default (no ETCD_ENDPOINTS given).

It listens on Unix sockets only, in a directory only root may enter (no TCP port that any local user, or a
`--network host` container, could write to: etcd holds what every host programs into its kernel). It keeps
its data under the plugin's state directory (so addresses and networks survive restarts), and dies with the
plugin (PR_SET_PDEATHSIG) so a killed plugin leaves no orphan.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
CLIENT_SOCKET, PEER_SOCKET = "client:2379", "peer:2380"


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedEtcd:
    def __init__(self, state_dir: Path, binary: str = "etcd") -> None:
        self.dir = state_dir / "etcd"
        self.binary = shutil.which(binary) or binary
        self.proc: subprocess.Popen[bytes] | None = None

    def _stop_stale(self) -> None:
        pidfile = self.dir / "etcd.pid"
        try:
            pid = int(pidfile.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(self.dir).encode() in cmdline:
                os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            pass

    def start(self) -> str:
        """Start etcd (without waiting for it) and return its client URL."""
        if not shutil.which(self.binary):
            raise RuntimeError(
                "ETCD_ENDPOINTS is not set and no etcd binary was found for the embedded single-host store; "
                "install etcd-server or set ETCD_ENDPOINTS"
            )
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        self._stop_stale()
        # etcd names a unix socket after the URL's host:port, relative to its working directory (self.dir).
        for name in (CLIENT_SOCKET, PEER_SOCKET):
            (self.dir / name).unlink(missing_ok=True)
        curl, purl = f"unix://{CLIENT_SOCKET}", f"unix://{PEER_SOCKET}"
        log_file = open(self.dir / "etcd.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [self.binary, "--name", "pyoverlay", "--data-dir", str(self.dir / "data"),
             "--listen-client-urls", curl, "--advertise-client-urls", curl,
             "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
             "--initial-cluster", f"pyoverlay={purl}", "--initial-cluster-state", "new",
             "--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000",
             "--log-level", "warn", "--logger", "zap"],
            stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, cwd=self.dir,
        )
        log_file.close()
        (self.dir / "etcd.pid").write_text(str(self.proc.pid))
        url = f"unix:{self.dir / CLIENT_SOCKET}"
        log.info("embedded etcd starting on %s (data in %s)", url, self.dir / "data")
        return url

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL after timeout; fine if it already exited."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
