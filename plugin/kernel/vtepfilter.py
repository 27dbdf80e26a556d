"""VXLAN from strangers: only the VTEPs of hosts registered in etcd may send VXLAN to this host.

VXLAN has no authentication: anyone who can reach the VXLAN port can inject frames into an overlay
network. A set of the registered VTEPs (kept in sync with the live host records) and a rule that drops, and
counts, every datagram to the VXLAN ports from any other source, in one of two forms:

- nftables: tables of pyoverlay's own, one per address family (`ip`, and `ip6` where the kernel has it),
- where nftables lacks those families (user-mode-linux's kernel, some appliances): ipsets (written over
  netlink with pyroute2) and one iptables/ip6tables chain that matches them.

The set changes atomically (one nftables transaction, or an ipset swap), so there is never a moment with an
empty set; sets, rules and counters survive plugin restarts (the kernel keeps them), and they are written only
from a synced view of etcd, so an etcd outage leaves them as they were. Addresses reach the kernel as JSON
strings or netlink attributes, never as text a firewall tool parses.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from plugin.kernel import nftjson, xtables

log = logging.getLogger(__name__)

TABLE = "pyoverlay_vtep"
COUNTER = "strangers"
SET = "vteps"
ADDR_TYPE = {"ip": "ipv4_addr", "ip6": "ipv6_addr"}
NOTE = "pyoverlay: VXLAN from a host not registered in etcd"
CHAIN = "PYOVERLAY-VTEP"
IPSETS = {"ip": "pyoverlay-vteps4", "ip6": "pyoverlay-vteps6"}
TOOLS = {"ip": "iptables", "ip6": "ip6tables"}


def _split(addrs: list[str], fam: str) -> list[str]:
    return [a for a in addrs if (":" in a) == (fam == "ip6")]


class Backend(Protocol):
    families: list[str]

    def present(self) -> bool: ...
    def apply(self, addrs: list[str]) -> str: ...   # "" when done, else why not
    def dropped(self) -> int: ...
    def remove(self) -> None: ...


# -- nftables ---------------------------------------------------------------------------------------------

def _ruleset(fam: str, ports: list[int]) -> list[nftjson.Cmd]:
    return [
        *nftjson.replace_table(fam, TABLE),
        {"add": {"counter": {"family": fam, "table": TABLE, "name": COUNTER}}},
        {"add": {"set": {"family": fam, "table": TABLE, "name": SET, "type": ADDR_TYPE[fam]}}},
        # before conntrack and every other filter: a stranger's datagram is never looked at
        nftjson.chain(fam, TABLE, "input", "filter", "input", -310),
        nftjson.rule(fam, TABLE, "input", [
            nftjson.udp_dport({"set": sorted(int(p) for p in ports)}),
            nftjson.match({"payload": {"protocol": fam, "field": "saddr"}}, f"@{SET}", "!="),
            {"counter": COUNTER}, {"drop": None}], NOTE),
    ]


def _elements(fam: str, addrs: list[str]) -> list[nftjson.Cmd]:
    """Replace a set's elements: addresses go in as JSON strings, each canonical (ipaddress) already."""
    where = {"family": fam, "table": TABLE, "name": SET}
    cmds: list[nftjson.Cmd] = [{"flush": {"set": where}}]
    if addrs:
        cmds.append({"add": {"element": {**where, "elem": addrs}}})
    return cmds


class NftBackend:
    def __init__(self, ports: list[int], families: list[str]) -> None:
        self.ports, self.families = ports, families

    @staticmethod
    def usable(ports: list[int], fam: str) -> bool:
        return nftjson.run(_ruleset(fam, ports), check_only=True).returncode == 0

    def _present(self, fam: str) -> bool:
        rules = [o["rule"] for o in nftjson.listing("chain", fam, TABLE, "input") if "rule" in o]
        return any(nftjson.udp_dport({"set": self.ports}) in r.get("expr", []) for r in rules)

    def present(self) -> bool:
        return all(self._present(fam) for fam in self.families)

    def apply(self, addrs: list[str]) -> str:
        cmds: list[nftjson.Cmd] = []
        if nftjson.listing("table", "inet", TABLE):
            # the one inet table of earlier versions: the per-family tables replace it
            cmds.append({"delete": {"table": {"family": "inet", "name": TABLE}}})
        for fam in self.families:
            # A new table (or one for other ports) is created whole, counter from zero.
            cmds += [] if self._present(fam) else _ruleset(fam, self.ports)
            cmds += _elements(fam, _split(addrs, fam))
        res = nftjson.run(cmds)
        return "" if res.returncode == 0 else f"nftables refused it ({res.stderr.strip()[:300]})"

    def dropped(self) -> int:
        total, found = 0, False
        for fam in self.families:
            for item in nftjson.listing("counter", fam, TABLE, COUNTER):
                try:
                    total += int(item["counter"]["packets"])
                    found = True
                except (KeyError, TypeError, ValueError):
                    continue
        return total if found else -1

    def remove(self) -> None:
        nftjson.run([{"delete": {"table": {"family": fam, "name": TABLE}}}
                     for fam in ("inet", "ip", "ip6") if nftjson.listing("table", fam, TABLE)])


# -- ipset + iptables -------------------------------------------------------------------------------------

class IptablesBackend:
    """An ipset per family (hash:ip, filled over netlink) and one chain hooked first into INPUT."""

    AF = {"ip": socket.AF_INET, "ip6": socket.AF_INET6}

    def __init__(self, ports: list[int], families: list[str]) -> None:
        self.ports, self.families = ports, families

    def usable(self, fam: str) -> bool:
        """The kernel has ipset for this family and the firewall tool takes our chain (parsed, not committed)."""
        from pyroute2.ipset import IPSet  # noqa: PLC0415 - netlink only where this backend is used
        try:
            with IPSet() as ipset:
                ipset.create(IPSETS[fam], family=self.AF[fam], exclusive=False)
        except Exception:  # noqa: BLE001 - no ipset in this kernel
            return False
        if xtables.restore(TOOLS[fam], self._script(fam), test=True).returncode == 0:
            return True
        with IPSet() as ipset:
            ipset.destroy(IPSETS[fam])
        return False

    def _script(self, fam: str) -> str:
        # Only pyoverlay's constants and the integer ports are text here; addresses live in the ipset.
        ports = ",".join(str(int(p)) for p in self.ports)
        return "\n".join(["*filter", f":{CHAIN} - [0:0]",
                          f"-A {CHAIN} -p udp -m multiport --dports {ports} -m set ! --match-set {IPSETS[fam]} src "
                          f'-m comment --comment "{NOTE}" -j DROP', "COMMIT", ""])

    def _present(self, fam: str) -> bool:
        table = xtables.saved(TOOLS[fam], "filter")   # one read for the hook and the rules
        if not xtables.jumps_in(table, "INPUT", CHAIN):
            return False
        rules = xtables.rules_in(table, CHAIN)
        return f"--match-set {IPSETS[fam]} src" in rules and ",".join(map(str, self.ports)) in rules

    def present(self) -> bool:
        return all(self._present(fam) for fam in self.families)

    def apply(self, addrs: list[str]) -> str:
        from pyroute2.ipset import IPSet  # noqa: PLC0415
        try:
            with IPSet() as ipset:
                for fam in self.families:
                    name, af = IPSETS[fam], self.AF[fam]
                    # Filled aside, then swapped in: the live set is never empty or half-written.
                    ipset.create(name, family=af, exclusive=False)
                    ipset.create(name + "-n", family=af, exclusive=False)
                    ipset.flush(name + "-n")
                    for addr in _split(addrs, fam):
                        ipset.add(name + "-n", addr, family=af)
                    ipset.swap(name, name + "-n")
                    ipset.destroy(name + "-n")
        except Exception as err:  # noqa: BLE001
            return f"ipset refused it ({err})"
        for fam in self.families:
            if self._present(fam):
                continue
            tool = TOOLS[fam]
            res = xtables.restore(tool, self._script(fam))
            if res.returncode != 0:
                return f"{tool}-restore refused it ({res.stderr.strip()[:300]})"
            problem = xtables.hook(tool, "filter", "INPUT", CHAIN)
            if problem:
                return f"{tool} could not hook {CHAIN} into INPUT ({problem})"
        return ""

    def dropped(self) -> int:
        total, found = 0, False
        for fam in self.families:
            res = xtables.listing(TOOLS[fam], "filter", CHAIN)
            if res.returncode != 0:
                continue
            found = True
            total += sum(int(line.split()[0]) for line in res.stdout.splitlines()[2:] if line.strip())
        return total if found else -1

    def remove(self) -> None:
        from pyroute2.ipset import IPSet  # noqa: PLC0415
        for fam in self.families:
            xtables.unhook(TOOLS[fam], "filter", "INPUT", CHAIN)
        try:
            with IPSet() as ipset:
                for fam in self.families:
                    ipset.destroy(IPSETS[fam])
        except Exception:  # noqa: BLE001,S110 - not there
            pass


def choose_backend(ports: list[int]) -> Backend | None:
    """nftables where it has the ip family (ip6 too when it has it), else ipset + iptables; None: neither."""
    if NftBackend.usable(ports, "ip"):
        return NftBackend(ports, ["ip", "ip6"] if NftBackend.usable(ports, "ip6") else ["ip"])
    probe = IptablesBackend(ports, [])
    if probe.usable("ip"):
        return IptablesBackend(ports, ["ip", "ip6"] if probe.usable("ip6") else ["ip"])
    return None


class VtepFilter:
    def __init__(self, ports: list[int], desired: Callable[[], set[str]] | None = None) -> None:
        self.ports = sorted(set(ports))   # the clear and the encrypted networks' VXLAN ports
        # The VTEPs that may send us VXLAN now, read afresh under the lock at every refresh: a set computed
        # earlier (before a host appeared) can never overwrite a newer one.
        self.desired = desired
        self._lock = threading.RLock()
        self._applied: frozenset[str] | None = None
        self._pending = threading.Event()   # a refresh is queued and has not read the VTEPs yet
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="vtep-filter")
        self.error = ""          # why the filter is not in place ("" when it is)
        self._backend: Backend | None = None
        self._chosen = False

    def backend(self) -> Backend | None:
        if not self._chosen:
            self._backend, self._chosen = choose_backend(self.ports), True
        return self._backend

    def describe(self) -> str:
        b = self.backend()
        kind = {NftBackend: "nftables", IptablesBackend: "ipset+iptables"}.get(type(b), "none")
        return f"{kind} ({', '.join(b.families)})" if b else kind

    def sync_later(self) -> None:
        """refresh() in the background; a burst of calls makes one (a failed attempt is retried by the
        reconciler's periodic repair, not by every host record change)."""
        if self._pending.is_set():
            return
        self._pending.set()

        def run() -> None:
            self._pending.clear()   # a change from now on queues another refresh
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - logged; the reconciler retries
                log.exception("VTEP filter")

        self._worker.submit(run)

    def refresh(self) -> bool:
        """sync() to the VTEPs wanted now; True when the kernel had to be changed."""
        if self.desired is None:
            return False
        with self._lock:
            return self.sync(self.desired())

    @property
    def applied(self) -> bool:
        return self._applied is not None

    def present(self) -> bool:
        b = self.backend()
        return b is not None and b.present()

    def sync(self, vteps: set[str]) -> bool:
        """Make the kernel's sets exactly these VTEPs; True when the kernel had to be changed."""
        clean = sorted({str(ipaddress.ip_address(v)) for v in vteps if _is_ip(v)})
        with self._lock:
            b = self.backend()
            if self._applied == frozenset(clean) and self.present():
                return False
            problem = "neither nftables (ip family) nor ipset+iptables is usable here" if b is None \
                else b.apply(clean)
            if problem:
                self.error = f"VTEP filter not installed: {problem}: VXLAN from unregistered hosts is NOT dropped"
                log.error("%s", self.error)
                self._applied = None
                return False
            assert b is not None
            self._applied = frozenset(clean)
            self.error = "" if "ip6" in b.families else "no IPv6 filtering here: IPv6 VXLAN is not filtered"
            log.info("VXLAN accepted from %d registered VTEPs (%s): %s", len(clean), self.describe(),
                     ", ".join(clean))
            return True

    def dropped(self) -> int:
        """Datagrams dropped because their source is no registered VTEP (-1: no filter)."""
        b = self.backend()
        return -1 if b is None else b.dropped()

    def remove(self) -> None:
        b = self.backend()
        if b is not None:
            b.remove()
        self._applied = None


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False
