"""nftables through its JSON interface (`nft -j -f -`): rulesets are data, never text to be parsed.

Values that came from etcd or Docker (addresses, VNIs, ports) enter as JSON numbers and strings, so none can
close a brace or start a new command the way text fed to `nft -f` could. Only pyoverlay's own constants are
names and comments.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

Cmd = dict[str, Any]


def run(commands: list[Cmd], check_only: bool = False) -> subprocess.CompletedProcess[str]:
    """One atomic nft transaction of these commands."""
    args = ["nft", "-j", *(["-c"] if check_only else []), "-f", "-"]
    return subprocess.run(args, input=json.dumps({"nftables": commands}), capture_output=True, text=True,
                          timeout=10, check=False)


def listing(*what: str) -> list[dict[str, Any]]:
    """`nft -j list ...` as a list of objects ([] when it does not exist)."""
    res = subprocess.run(["nft", "-j", "list", *what], capture_output=True, text=True, timeout=10, check=False)
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
