"""Network namespaces pinned under the plugin's state directory, and netlink sockets inside them.

Namespace switches happen in short-lived threads (setns and unshare change only the calling thread), so
the serving threads never leave the host namespace. A namespace lives as long as its pin (a bind mount
of nsfs), which outlives the plugin process: a restarted plugin finds its namespaces where it left them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from pyroute2.iproute import IPRoute

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MNT_DETACH = 2
NETLINK_ROUTE = 0

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
HOST_NETNS = "/proc/self/ns/net"


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def in_thread(fn: Callable[[], T]) -> T:
    """Run fn in a fresh thread (whose namespace changes die with it) and return its result."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            box["error"] = err

    t = threading.Thread(target=run, name="netns")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")  # type: ignore[return-value]


def _enter(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns {path}")
    finally:
        os.close(fd)


MS_REMOUNT = 32


def writable_proc_sys() -> bool:
    """Make /proc/sys writable in this process's mount namespace if a container runtime mounted it
    read-only (a managed plugin: runc does). The per-namespace sysctls of the networks' namespaces are
    written through it. Returns whether a remount was needed."""
    try:
        with open("/proc/self/mountinfo") as f:
            ro = any(line.split()[4] == "/proc/sys" and "ro" in line.split()[5].split(",") for line in f)
    except OSError:
        return False
    if ro:
        _check(_libc.mount(b"none", b"/proc/sys", None, MS_REMOUNT | MS_BIND, None), "remount /proc/sys rw")
    return ro


def is_pinned(path: Path) -> bool:
    """True when path is a bind mount of a network namespace (a live pin)."""
    target = str(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] == target:
                    return True
    except OSError:
        return False
    return False


def create(path: Path) -> None:
    """Create a new, empty network namespace pinned at path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(exist_ok=True)

    def run() -> None:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        _check(_libc.mount(b"/proc/thread-self/ns/net", str(path).encode(), b"none", MS_BIND, None),
               f"pin {path}")

    try:
        in_thread(run)
    except OSError:
        path.unlink(missing_ok=True)
        raise


def remove(path: Path) -> None:
    """Unpin a namespace; it disappears once nothing else (a process, a pin) holds it."""
    rc = _libc.umount2(str(path).encode(), MNT_DETACH)
    if rc != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        _check(rc, f"unpin {path}")
    path.unlink(missing_ok=True)


def iproute(path: Path) -> IPRoute:
    """A pyroute2 IPRoute whose netlink socket lives in the namespace pinned at path."""
    from pyroute2.iproute import IPRoute  # here: `pyoverlay serve` imports this module before its socket is bound


    def run() -> socket.socket:
        _enter(path)
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)

    return IPRoute(use_socket=in_thread(run))


def run_in(path: Path, fn: Callable[[], T]) -> T:
    """Run fn inside the namespace (for /proc/sys writes and similar)."""

    def run() -> T:
        _enter(path)
        return fn()

    return in_thread(run)


def open_host() -> int:
    """A file descriptor of the plugin's own (host) network namespace."""
    return os.open(HOST_NETNS, os.O_RDONLY | os.O_CLOEXEC)
