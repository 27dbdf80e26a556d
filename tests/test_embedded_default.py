"""`make run`'s default: no ETCD_ENDPOINTS, the plugin runs its own single-host etcd under its state dir."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.plugin_client import call
from tests.rig import PYOVERLAY, connect_as_nobody, wait_for

pytestmark = pytest.mark.etcd


def serve(state: Path, sock: Path) -> subprocess.Popen[bytes]:
    env = {"PATH": os.environ["PATH"], "PYOVERLAY_SOCKET": str(sock), "PYOVERLAY_STATE_DIR": str(state),
           "PYOVERLAY_HOST": "solo"}
    # stdout and stderr apart, as dockerd keeps them for a managed plugin (info / error)
    proc = subprocess.Popen([PYOVERLAY, "serve"], env=env, stdout=open(state.parent / "log", "ab"),
                            stderr=open(state.parent / "errors", "ab"), start_new_session=True)
    wait_for("socket", lambda: sock.exists(), timeout=10, interval=0.05)
    return proc


def etcd_pids(state: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"data-dir {state}/etcd/data"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def assert_root_only(state: Path, pids: list[int]) -> None:
    """The embedded etcd: no TCP port at all, Unix sockets in a directory only root may enter."""
    listening = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True).stdout
    assert not any(f"pid={pid}," in listening for pid in pids), listening
    sockets = list((state / "etcd").glob("*:*"))
    assert sockets and all(p.is_socket() for p in sockets)
    for d in (state, state / "etcd"):
        assert d.stat().st_mode & 0o777 == 0o700, (d, oct(d.stat().st_mode))
    # Even with the way to it open, a user other than root cannot write to it.
    opened = [state.parent, state]
    saved = {p: p.stat().st_mode & 0o777 for p in opened}
    try:
        for p in opened:
            os.chmod(p, 0o755)
        assert connect_as_nobody(sockets[0]) == "PermissionError"
    finally:
        for p, m in saved.items():
            os.chmod(p, m)


def test_an_unreadable_state_file_stops_the_plugin_with_a_clear_error() -> None:
    work = Path(tempfile.mkdtemp(prefix="pyoverlay-solo-"))
    state = work / "state"
    state.mkdir()
    (state / "state.json").write_text('{"networks": {')
    env = {"PATH": os.environ["PATH"], "PYOVERLAY_SOCKET": str(work / "s.sock"), "PYOVERLAY_STATE_DIR": str(state),
           "PYOVERLAY_HOST": "solo"}
    try:
        res = subprocess.run([PYOVERLAY, "serve"], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and "will not start on it" in res.stderr, res.stderr[-2000:]
        assert (state / "state.json").read_text() == '{"networks": {', "left as it was"
        assert not etcd_pids(state) and not (work / "s.sock").exists()
    finally:
        subprocess.run(["rm", "-rf", str(work)])


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
        assert_root_only(state, etcd_pids(state))
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
        # Ordinary lines (gunicorn's included) on stdout, only warnings and errors on stderr.
        out, err = (work / "log").read_text(), (work / "errors").read_text()
        assert " INFO plugin.runtime.runtime: ready" in out and "INFO gunicorn.error: Listening at" in out, out[-2000:]
        assert not [line for line in err.splitlines() if " INFO " in line or " DEBUG " in line], err[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        wait_for("embedded etcd to stop", lambda: not etcd_pids(state), timeout=15)
        subprocess.run(["rm", "-rf", str(work)])
