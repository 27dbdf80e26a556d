"""glibc's malloc, told how this process uses memory: a few threads allocate much (watches, passes), most
wait; big transient allocations (a restart's snapshot of tens of thousands of records: the gRPC answer,
its decoded messages, the JSON) are freed soon after."""

from __future__ import annotations

import ctypes

M_ARENA_MAX = -8   # glibc's mallopt parameter


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def few_arenas() -> None:
    """glibc gives each thread that allocates an arena of its own, up to 8 per core, and keeps what is freed
    in each: with ~20 threads (watches, pools, gRPC's) that held memory idle. Two arenas serve this process's
    mostly-waiting threads; set before any thread or fork, so the worker inherits it."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_ARENA_MAX, 2)   # not glibc: its own allocator's defaults


def give_back() -> None:
    """Return the heap's free pages to the system (malloc_trim). glibc keeps freed memory below the top of
    its heaps for reuse: after a restart's snapshot that is tens of MiB the process would hold for good."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
