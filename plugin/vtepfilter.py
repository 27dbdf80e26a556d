"""VXLAN from strangers: only the VTEPs of hosts registered in etcd may send VXLAN to this host.

VXLAN has no authentication: anyone who can reach the VXLAN port can inject frames into an overlay
network. One nftables table of pyoverlay's own holds a set of the registered VTEPs (kept in sync with the
live host records) and drops, and counts, every datagram to the VXLAN port from any other source.

The set changes in one nftables JSON transaction (flush + add), so there is never a moment with an empty set;
the table and its counter survive plugin restarts (the kernel keeps them), and it is written only from a
synced view of etcd, so an etcd outage leaves it as it was.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from plugin import nftjson
from plugin.ipsec import run

log = logging.getLogger(__name__)

TABLE = "pyoverlay_vtep"
COUNTER = "strangers"


def _ruleset(ports: list[int]) -> list[nftjson.Cmd]:
    fam, note = "inet", "pyoverlay: VXLAN from a host not registered in etcd"
    drop = [{"counter": COUNTER}, {"drop": None}]
    port = {"set": sorted(int(p) for p in ports)}
    return [
        *nftjson.replace_table(fam, TABLE),
        {"add": {"counter": {"family": fam, "table": TABLE, "name": COUNTER}}},
        {"add": {"set": {"family": fam, "table": TABLE, "name": "vteps4", "type": "ipv4_addr"}}},
        {"add": {"set": {"family": fam, "table": TABLE, "name": "vteps6", "type": "ipv6_addr"}}},
        # before conntrack and every other filter: a stranger's datagram is never looked at
        nftjson.chain(fam, TABLE, "input", "filter", "input", -310),
        nftjson.rule(fam, TABLE, "input", [nftjson.udp_dport(port), nftjson.match(
            {"payload": {"protocol": "ip", "field": "saddr"}}, "@vteps4", "!="), *drop], note),
        nftjson.rule(fam, TABLE, "input", [nftjson.udp_dport(port), nftjson.match(
            {"payload": {"protocol": "ip6", "field": "saddr"}}, "@vteps6", "!="), *drop], note),
    ]


def _elements(name: str, addrs: list[str]) -> list[nftjson.Cmd]:
    """Replace a set's elements: addresses go in as JSON strings, each canonical (ipaddress) already."""
    where = {"family": "inet", "table": TABLE, "name": name}
    cmds: list[nftjson.Cmd] = [{"flush": {"set": where}}]
    if addrs:
        cmds.append({"add": {"element": {**where, "elem": addrs}}})
    return cmds


class VtepFilter:
    def __init__(self, ports: list[int]) -> None:
        self.ports = sorted(set(ports))   # the clear and the encrypted networks' VXLAN ports
        self._lock = threading.Lock()
        self._applied: frozenset[str] | None = None
        self._requested: frozenset[str] | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="vtep-filter")
        self.error = ""          # why the filter is not in place ("" when it is)

    def sync_later(self, vteps: set[str]) -> None:
        """sync() in the background, and only when the set differs from the last one asked for (a failed
        attempt is retried by the reconciler's periodic repair, not by every host record change)."""
        wanted = frozenset(vteps)
        if wanted == self._requested:
            return
        self._requested = wanted

        def run() -> None:
            if self._requested == wanted:  # a newer set supersedes this one
                try:
                    self.sync(set(wanted))
                except Exception:  # noqa: BLE001 - logged; the reconciler retries
                    log.exception("VTEP filter")

        self._worker.submit(run)

    @property
    def applied(self) -> bool:
        return self._applied is not None

    def present(self) -> bool:
        rules = [o["rule"] for o in nftjson.listing("chain", "inet", TABLE, "input") if "rule" in o]
        return any(nftjson.udp_dport({"set": self.ports}) in r.get("expr", []) for r in rules)

    def sync(self, vteps: set[str]) -> bool:
        """Make the kernel's set exactly these VTEPs; True when the kernel had to be changed."""
        clean = sorted({str(ipaddress.ip_address(v)) for v in vteps if _is_ip(v)})
        with self._lock:
            if self._applied == frozenset(clean) and self.present():
                return False
            # A new table (or one for another port) is created whole, counter from zero.
            cmds = [] if self.present() else _ruleset(self.ports)
            cmds += _elements("vteps4", [a for a in clean if ":" not in a])
            cmds += _elements("vteps6", [a for a in clean if ":" in a])
            res = nftjson.run(cmds)
            if res.returncode != 0:
                self.error = (f"nftables refused the VTEP filter ({res.stderr.strip()[:300]}): VXLAN from "
                              f"unregistered hosts is NOT dropped")
                log.error("%s", self.error)
                self._applied = None
                return False
            self._applied = frozenset(clean)
            self.error = ""
            log.info("VXLAN accepted from %d registered VTEPs: %s", len(clean), ", ".join(clean))
            return True

    def dropped(self) -> int:
        """Datagrams dropped because their source is no registered VTEP (-1: no filter)."""
        for item in nftjson.listing("counter", "inet", TABLE, COUNTER):
            try:
                return int(item["counter"]["packets"])
            except (KeyError, TypeError, ValueError):
                continue
        return -1

    def remove(self) -> None:
        run(["nft", "delete", "table", "inet", TABLE])
        self._applied = None


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False
