"""A private single-node etcd for the single-host default (no ETCD_ENDPOINTS given).

It listens on loopback only, keeps its data under the plugin's state directory (so addresses and networks
survive restarts), and dies with the plugin (PR_SET_PDEATHSIG) so a killed plugin leaves no orphan.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedEtcd:
    def __init__(self, state_dir: Path, binary: str = "etcd") -> None:
        self.dir = state_dir / "etcd"
        self.binary = shutil.which(binary) or binary
        self.proc: subprocess.Popen[bytes] | None = None

    def _ports(self) -> tuple[int, int]:
        """Reuse the ports of the last run when free (stable endpoint); pick new ones otherwise."""
        path = self.dir / "ports.json"
        try:
            saved = json.loads(path.read_text())
            client, peer = int(saved["client"]), int(saved["peer"])
            if _port_free(client) and _port_free(peer):
                return client, peer
        except (OSError, ValueError, KeyError):
            pass
        client, peer = _free_port(), _free_port()
        while peer == client:
            peer = _free_port()
        path.write_text(json.dumps({"client": client, "peer": peer}))
        return client, peer

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
        self.dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        client, peer = self._ports()
        curl, purl = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        log_file = open(self.dir / "etcd.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [self.binary, "--name", "pyoverlay", "--data-dir", str(self.dir / "data"),
             "--listen-client-urls", curl, "--advertise-client-urls", curl,
             "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
             "--initial-cluster", f"pyoverlay={purl}", "--initial-cluster-state", "new",
             "--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000",
             "--log-level", "warn", "--logger", "zap"],
            stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        log_file.close()
        (self.dir / "etcd.pid").write_text(str(self.proc.pid))
        log.info("embedded etcd starting on %s (data in %s)", curl, self.dir / "data")
        return curl

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
