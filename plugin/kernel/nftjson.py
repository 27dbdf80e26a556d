"""nftables through its JSON interface: rulesets are data, never text to be parsed.

Values that came from etcd or Docker (addresses, VNIs, ports) enter as JSON numbers and strings, so none can
close a brace or start a new command the way text fed to `nft -f` could. Only pyoverlay's own constants are
names and comments.

The commands go to libnftables in this process (the library `nft` itself is built on), not to an `nft`
child: the reconciler checks the firewall every few seconds, and a fork and exec of nft each time cost a
host ~1.5% of a core when idle and a slow kernel (the user-mode-linux guest) almost half of one. Where the
library cannot be loaded, the `nft` program does the same work.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import re
import subprocess
import threading
from typing import Any

Cmd = dict[str, Any]

NFT_CTX_OUTPUT_JSON = 1 << 4
_WORD = re.compile(r"[a-z][a-z0-9_]{0,63}")


class _Lib:
    """libnftables through ctypes. A context per call, made in the calling thread: its netlink socket is
    then in that thread's namespace, as an `nft` child's would be. One call at a time (the library keeps a
    little global state)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        lib = ctypes.CDLL(name, use_errno=True)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        for fn in (lib.nft_ctx_buffer_output, lib.nft_ctx_buffer_error):
            fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_int
        for fn in (lib.nft_ctx_get_output_buffer, lib.nft_ctx_get_error_buffer):
            fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self.lib = lib
        self.lock = threading.Lock()

    def run(self, text: str, dry_run: bool = False) -> tuple[int, str, str]:
        lib = self.lib
        with self.lock:
            ctx = lib.nft_ctx_new(0)
            if not ctx:
                return 1, "", "libnftables: could not make a context"
            try:
                lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
                lib.nft_ctx_set_dry_run(ctx, dry_run)
                if lib.nft_ctx_buffer_output(ctx) or lib.nft_ctx_buffer_error(ctx):
                    return 1, "", "libnftables: could not buffer its output"
                rc = lib.nft_run_cmd_from_buffer(ctx, text.encode())
                out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
                err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
                return (0 if rc == 0 else 1), out, err
            finally:
                lib.nft_ctx_free(ctx)


_lib: _Lib | None = None
_lib_tried = False
_lib_guard = threading.Lock()


def _library() -> _Lib | None:
    global _lib, _lib_tried
    with _lib_guard:
        if not _lib_tried:
            _lib_tried = True
            try:
                _lib = _Lib()
            except (OSError, AttributeError):
                _lib = None   # no libnftables (or too old an one): the nft program instead
        return _lib


def _nft(text: str, *, json_input: bool, dry_run: bool = False) -> subprocess.CompletedProcess[str]:
    """One nft command line or JSON transaction, through the library or else the program."""
    lib = _library()
    if lib is not None:
        rc, out, err = lib.run(text, dry_run)
        return subprocess.CompletedProcess(["libnftables"], rc, out, err)
    cmd = ["nft", "-j", *(["-c"] if dry_run else []), *(["-f", "-"] if json_input else text.split())]
    return subprocess.run(cmd, input=text if json_input else None, capture_output=True, text=True, timeout=10,
                          check=False)


def run(commands: list[Cmd], check_only: bool = False) -> subprocess.CompletedProcess[str]:
    """One atomic nft transaction of these commands (only checked, not applied, with check_only)."""
    return _nft(json.dumps({"nftables": commands}), json_input=True, dry_run=check_only)


def listing(*what: str) -> list[dict[str, Any]]:
    """`nft -j list ...` as a list of objects ([] when it does not exist).

    This is the one place text reaches nft's parser, so only plain identifiers pass (families, table,
    chain and object names, all pyoverlay's constants): anything else is refused, never listed."""
    if not what or not all(_WORD.fullmatch(w) for w in what):
        raise ValueError(f"nft listing: not a plain identifier in {what!r}")
    res = _nft(" ".join(["list", *what]), json_input=False)
    if res.returncode != 0:
        return []
    try:
        return list(json.loads(res.stdout).get("nftables", []))
    except (ValueError, AttributeError):
        return []


def replace_table(family: str, name: str) -> list[Cmd]:
    """Commands that leave an empty table of that name, whether or not one existed."""
    table = {"family": family, "name": name}
    return [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]


def chain(family: str, table: str, name: str, kind: str, hook: str, prio: int) -> Cmd:
    return {"add": {"chain": {"family": family, "table": table, "name": name, "type": kind, "hook": hook,
                              "prio": prio, "policy": "accept"}}}


def rule(family: str, table: str, chain_name: str, expr: list[Any], comment: str) -> Cmd:
    return {"add": {"rule": {"family": family, "table": table, "chain": chain_name, "expr": expr,
                             "comment": comment}}}


def match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def udp_dport(port: int | dict[str, list[int]]) -> dict[str, Any]:
    """udp dport PORT, or with {"set": [ports]} one of them."""
    return match({"payload": {"protocol": "udp", "field": "dport"}}, port if isinstance(port, dict) else int(port))


def vxlan_vni(vni: int) -> dict[str, Any]:
    """The VNI: 24 bits at offset 32 of the VXLAN header, which follows the 8-byte UDP header."""
    return match({"payload": {"base": "th", "offset": 96, "len": 24}}, int(vni))


def meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def counter_packets(objects: list[dict[str, Any]], chain_name: str | None = None) -> int:
    """Packets counted by the anonymous counters of a listing's rules (of one chain, when named)."""
    total = 0
    for obj in objects:
        r = obj.get("rule")
        if not isinstance(r, dict) or (chain_name is not None and r.get("chain") != chain_name):
            continue
        for e in r.get("expr", []):
            c = e.get("counter") if isinstance(e, dict) else None
            if isinstance(c, dict):
                total += int(c.get("packets", 0))
    return total
