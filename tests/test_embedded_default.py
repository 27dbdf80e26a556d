"""`make run`'s default: no ETCD_ENDPOINTS, the plugin runs its own single-host etcd under its state dir."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.plugin_client import call
from tests.rig import PYOVERLAY, wait_for

pytestmark = pytest.mark.etcd


def serve(state: Path, sock: Path) -> subprocess.Popen[bytes]:
    env = {"PATH": os.environ["PATH"], "PYOVERLAY_SOCKET": str(sock), "PYOVERLAY_STATE_DIR": str(state),
           "PYOVERLAY_HOST": "solo"}
    proc = subprocess.Popen([PYOVERLAY, "serve"], env=env, stdout=open(state.parent / "log", "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    wait_for("socket", lambda: sock.exists(), timeout=10, interval=0.05)
    return proc


def etcd_pids(state: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"data-dir {state}/etcd/data"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_embedded_etcd_serves_and_survives_restart() -> None:
    work = Path(tempfile.mkdtemp(prefix="pyoverlay-solo-"))
    state, sock = work / "state", work / "pyoverlay.sock"
    proc = serve(state, sock)
    try:
        status, pool = wait_for("pool", lambda: (r := call(sock, "IpamDriver.RequestPool",
                                                           {"Pool": "10.55.0.0/24"}))[0] == 200 and r, timeout=20)
        status, addr = call(sock, "IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": ""})
        assert status == 200 and addr["Address"] == "10.55.0.1/24"
        assert etcd_pids(state), "the embedded etcd runs"
        os.killpg(proc.pid, signal.SIGKILL)  # the plugin dies: its etcd must not linger
        proc.wait()
        wait_for("embedded etcd to exit", lambda: not etcd_pids(state), timeout=15)
        proc = serve(state, sock)
        # The data survived: the pool is known and the address handed out before is still taken.
        status, again = wait_for("restart", lambda: (r := call(sock, "IpamDriver.RequestAddress",
                                                               {"PoolID": pool["PoolID"], "Address": "10.55.0.1"}))
                                 is not None
                                 and "unavailable" not in r[1].get("Err", "") and r, timeout=20)
        assert status == 500 and "10.55.0.1 is already in use" in again["Err"], again
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        wait_for("embedded etcd to stop", lambda: not etcd_pids(state), timeout=15)
        subprocess.run(["rm", "-rf", str(work)])
