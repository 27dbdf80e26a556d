"""Kernel programming for encrypted networks: xfrm ESP states and policies, and the nftables guard.

pyroute2 has no xfrm support, so xfrm goes through iproute2's `ip xfrm` (the narrowest well-tested
alternative, fed through stdin so keys never reach argv), and the guard through nftables' JSON interface
(one atomic transaction per change).

How VXLAN of an encrypted network, and only of it, ends up in ESP:
- encrypted networks have a VXLAN port of their own (PYOVERLAY_ESP_PORT), so the kernel's own xfrm policies
  tell them apart by port, with no firewall involved;
- one xfrm policy per peer matches (our VTEP -> peer VTEP, UDP to that port) and requires ESP in transport
  mode; states carry AES-GCM keys derived per direction (plugin/cluster/keyring.py);
- fail closed in the kernel: catch-all policies of lower priority block every other datagram to that port
  (no peer policy, no SA: dropped) and accept an incoming one only if it arrived inside ESP (the policy
  check runs before the VXLAN socket sees it). A firewall reload changes none of this;
- belt and braces: an nftables (or iptables) guard marks outgoing datagrams of the encrypted VNIs and drops
  those that leave without a transform, and drops incoming clear text with an encrypted VNI; both counted.
  It would hold alone if the xfrm policies were flushed; the reconciler checks both every pass.
Every object carries pyoverlay's tag: states and per-peer policies the reqid REQID, catch-alls the priority
CATCHALL_PRIORITY, the nftables table its name. Stale ones are found by those tags.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import subprocess
import threading
from dataclasses import dataclass

from plugin.errors import Unavailable
from plugin.kernel import nftjson, xtables

log = logging.getLogger(__name__)

REQID = 0x70790E5A        # "py" + tag: every pyoverlay xfrm state and policy template
MARK = 0x70790E00         # fwmark of datagrams that must travel inside ESP
CATCHALL_PRIORITY = 0x70790  # catch-all xfrm policies: below every per-peer policy (priority 0)
TABLE = "pyoverlay"        # nftables table; the iptables chains below where nftables cannot do it
CHAIN_MARK, CHAIN_OUT, CHAIN_IN = "PYOVERLAY-ESP-MARK", "PYOVERLAY-ESP-OUT", "PYOVERLAY-ESP-IN"
GUARD_HOOKS = (("mangle", "OUTPUT", CHAIN_MARK), ("filter", "OUTPUT", CHAIN_OUT), ("filter", "INPUT", CHAIN_IN))
ESP_OVERHEAD = 40         # ESP header 8 + IV 8 + pad <= 3 + trailer 2 + ICV 16, rounded up
ALGO = "rfc4106(gcm(aes))"


run = xtables.run   # ip xfrm and nft go through the same argument-list runner


@dataclass(frozen=True)
class SAKey:
    """One direction's ESP state: its SPI and key material (derived in plugin/cluster/keyring.py)."""

    spi: int
    key: bytes        # AES key followed by the 4-byte GCM salt, as the kernel takes it for rfc4106
    src: str
    dst: str
    src_epoch: int
    dst_epoch: int


@dataclass(frozen=True)
class State:
    src: str
    dst: str
    spi: int


@dataclass(frozen=True)
class Policy:
    src: str
    dst: str
    port: int


def missing_features() -> list[str]:
    """What this kernel lacks for encrypted networks (empty when everything is there)."""
    missing = []
    def probe(spi: str, *algo: str) -> subprocess.CompletedProcess[str]:
        where = ["src", "127.0.0.127", "dst", "127.0.0.127", "proto", "esp", "spi", spi]
        res = run(["ip", "xfrm", "state", "add", *where, "reqid", str(REQID), "mode", "transport", *algo])
        run(["ip", "xfrm", "state", "delete", *where])
        return res

    gcm = probe("0x70790002", "aead", ALGO, "0x" + "00" * 20, "128")
    # Only when ESP with GCM fails: which of the two is missing (a first use of cbc/hmac can load modules
    # and run the kernel's crypto self-tests, which a slow kernel takes seconds for)
    esp = gcm if gcm.returncode == 0 else probe("0x70790001", "enc", "cbc(aes)", "0x" + "00" * 16, "auth",
                                                 "hmac(sha256)", "0x" + "00" * 32)
    if esp.returncode != 0 and "type not found" in esp.stderr.lower():
        missing.append("ESP (kernel option CONFIG_INET_ESP, module esp4)")
    elif esp.returncode != 0 and "not found" not in esp.stderr.lower():
        missing.append(f"xfrm ({esp.stderr.strip() or 'ip xfrm failed'})")
    if gcm.returncode != 0 and "algorithm not found" in gcm.stderr.lower():
        missing.append("AES-GCM (rfc4106(gcm(aes)): kernel options CONFIG_CRYPTO_GCM and CONFIG_CRYPTO_AES)")
    elif gcm.returncode != 0 and not missing:
        missing.append(f"ESP with AES-GCM ({gcm.stderr.strip()})")
    if guard_backend() is None:
        missing.append("a firewall for the fail-closed guard (nftables with the ip family, or iptables with "
                       "the u32, policy and mark matches)")
    return missing


def guard_backend() -> str | None:
    """nft when nftables takes our ruleset here, else iptables (u32 + policy matches, as Docker's overlay
    does) when it has what the guard needs; None when neither does."""
    if nftjson.run(_ruleset([1], 4800), check_only=True).returncode == 0:
        return "nft"
    probe = ["iptables", "-w", "-t", "filter", "-C", "INPUT", "-p", "udp", "--dport", "1", "-m", "u32", "--u32",
             _u32(1), "-m", "policy", "--dir", "in", "--pol", "none", "-j", "DROP"]
    res = run(probe)
    # -C of an absent rule says "does a matching rule exist"; a missing match module says otherwise
    if res.returncode == 0 or "matching rule" in res.stderr.lower():
        return "iptables"
    return None


def _u32(vni: int) -> str:
    """u32 match of a VXLAN VNI: skip the IP header, UDP header + 4 bytes of VXLAN flags, compare 3 bytes."""
    return f"0>>22&0x3C@12&0xFFFFFF00={vni << 8:#x}"


def _ruleset(vnis: list[int], port: int) -> list[nftjson.Cmd]:
    """The guard for the encrypted VNIs, as nftables JSON (numbers only: nothing from etcd is text here)."""
    fam = "ip"
    cmds = [*nftjson.replace_table(fam, TABLE),
            nftjson.chain(fam, TABLE, "esp_mark", "route", "output", -150),
            nftjson.chain(fam, TABLE, "esp_out_guard", "filter", "output", 10),
            nftjson.chain(fam, TABLE, "esp_in_guard", "filter", "input", -10)]
    for vni in sorted(vnis):
        match = [nftjson.udp_dport(port), nftjson.vxlan_vni(vni)]
        note = f"pyoverlay:enc:vni{int(vni)}"
        cmds.append(nftjson.rule(fam, TABLE, "esp_mark", [*match, {"mangle": {"key": nftjson.meta("mark"),
                                                                             "value": MARK}}], note))
        cmds.append(nftjson.rule(fam, TABLE, "esp_in_guard", [*match, nftjson.match(nftjson.meta("ipsec"), False),
                                                                 {"counter": None}, {"drop": None}], note))
    # udp dport: the ESP packet that leaves the transform keeps the mark and has no bundle left
    cmds.append(nftjson.rule(fam, TABLE, "esp_out_guard", [
        nftjson.udp_dport(port), nftjson.match(nftjson.meta("mark"), MARK),
        nftjson.match({"rt": {"key": "ipsec"}}, False), {"counter": None}, {"drop": None}],
        "pyoverlay: no SA, never clear text"))
    return cmds


def _addr(value: str) -> str:
    """A canonical IP address, or ValueError: the only form of address that reaches an xfrm line."""
    return str(ipaddress.ip_address(value))


class IPsec:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._backend: str | None = None

    def backend(self) -> str:
        if self._backend is None:
            self._backend = guard_backend() or "nft"
        return self._backend

    # -- the nftables guard -----------------------------------------------------------------------------

    def set_guard(self, vnis: list[int], port: int) -> None:
        """Install (or replace atomically) the guard for these VNIs; no VNIs removes the table."""
        with self._lock:
            if not vnis:
                self.remove_guard()
                return
            if self.backend() == "iptables":
                self._set_iptables(vnis, port)
                return
            res = nftjson.run(_ruleset(vnis, port))
            if res.returncode != 0:
                raise Unavailable(f"could not install the encryption guard (nftables): {res.stderr.strip()}")

    def _set_iptables(self, vnis: list[int], port: int) -> None:
        """Same guard with iptables: our chains are replaced whole (iptables-restore --noflush), then
        hooked into OUTPUT/INPUT once. Only integers (VNIs, the port, our mark) are formatted into it."""
        mark, out, inp = [], [], []
        for vni in sorted(int(v) for v in vnis):
            match = f"-p udp --dport {int(port)} -m u32 --u32 {_u32(vni)}"
            note = f"-m comment --comment pyoverlay:enc:vni{vni}"
            mark.append(f"-A {CHAIN_MARK} {match} {note} -j MARK --set-mark {MARK:#x}")
            inp.append(f"-A {CHAIN_IN} {match} -m policy --dir in --pol none {note} -j DROP")
        # -p udp: the ESP packet that leaves the transform keeps the mark and has no bundle left
        out.append(f"-A {CHAIN_OUT} -p udp --dport {port} -m mark --mark {MARK:#x} -m policy --dir out --pol none "
                   "-j DROP")
        script = "\n".join(["*mangle", f":{CHAIN_MARK} - [0:0]", *mark, "COMMIT",
                            "*filter", f":{CHAIN_OUT} - [0:0]", f":{CHAIN_IN} - [0:0]", *out, *inp, "COMMIT"]) + "\n"
        res = xtables.restore("iptables", script)
        if res.returncode != 0:
            raise Unavailable(f"could not install the encryption guard (iptables): {res.stderr.strip()}")
        for table, hook, chain in GUARD_HOOKS:
            problem = xtables.hook("iptables", table, hook, chain)
            if problem:
                raise Unavailable(f"could not hook the encryption guard into {hook}: {problem}")

    def remove_guard(self) -> None:
        if self.backend() == "iptables":
            for table, hook, chain in GUARD_HOOKS:
                xtables.unhook("iptables", table, hook, chain)
            return
        if nftjson.listing("table", "ip", TABLE):
            nftjson.run([{"delete": {"table": {"family": "ip", "name": TABLE}}}])

    def guard_counters(self) -> dict[str, int]:
        """Packets dropped by the guard: {"out": n, "in": n}."""
        if self.backend() == "iptables":
            counts = {}
            for key, chain in (("out", CHAIN_OUT), ("in", CHAIN_IN)):
                res = xtables.listing("iptables", "filter", chain)
                counts[key] = sum(int(line.split()[0]) for line in res.stdout.splitlines()[2:] if line.strip())
            return counts
        table = nftjson.listing("table", "ip", TABLE)
        return {"out": nftjson.counter_packets(table, "esp_out_guard"),
                "in": nftjson.counter_packets(table, "esp_in_guard")}

    def guard_present(self, vnis: list[int]) -> bool:
        """Whether the kernel still has the guard for exactly these VNIs (a firewall reload removes it)."""
        if not vnis:
            return True
        if self.backend() == "iptables":
            tables = {t: xtables.saved("iptables", t) for t in {t for t, _, _ in GUARD_HOOKS}}  # one read each
            if not all(xtables.jumps_in(tables[t], hook, chain) for t, hook, chain in GUARD_HOOKS):
                return False
            marked = xtables.rules_in(tables["mangle"], CHAIN_MARK)
            have = {int(m) for m in re.findall(r"pyoverlay:enc:vni(\d+)", marked)}
            return have == {int(v) for v in vnis} and "-j DROP" in xtables.rules_in(tables["filter"], CHAIN_OUT)
        table = nftjson.listing("table", "ip", TABLE)
        notes = {r["rule"].get("comment", "") for r in table if "rule" in r}
        want = {f"pyoverlay:enc:vni{int(v)}" for v in vnis} | {"pyoverlay: no SA, never clear text"}
        return want <= notes

    # -- xfrm -------------------------------------------------------------------------------------------

    def states(self) -> list[State]:
        """Our ESP states (tagged with REQID)."""
        res = run(["ip", "xfrm", "state", "list"])
        out, src, dst = [], "", ""
        for line in res.stdout.splitlines():
            m = re.match(r"src (\S+) dst (\S+)", line)
            if m:
                src, dst = m.groups()
                continue
            m = re.search(r"proto esp spi (0x[0-9a-f]+) reqid (\d+)", line)
            if m and int(m.group(2)) == REQID:
                out.append(State(src, dst, int(m.group(1), 16)))
        return out

    # Every xfrm line is built from canonical addresses (_addr) and integers only, so nothing read from etcd
    # can end a line or add a word: the ip -batch text has exactly the shape written here.

    @staticmethod
    def _state_add(sa: SAKey) -> str:
        return (f"xfrm state add src {_addr(sa.src)} dst {_addr(sa.dst)} proto esp spi {int(sa.spi):#x} "
                f"reqid {REQID} mode transport replay-window 128 flag esn aead {ALGO} 0x{bytes(sa.key).hex()} 128")

    @staticmethod
    def _state_del(st: State) -> str:
        return f"xfrm state delete src {_addr(st.src)} dst {_addr(st.dst)} proto esp spi {int(st.spi):#x}"

    @staticmethod
    def _policy(verb: str, pol: Policy) -> str:
        where = (f"xfrm policy {verb} src {_addr(pol.src)}/32 dst {_addr(pol.dst)}/32 proto udp "
                 f"dport {int(pol.port)} dir out")
        if verb == "delete":
            return where
        return f"{where} tmpl src {_addr(pol.src)} dst {_addr(pol.dst)} proto esp reqid {REQID} mode transport"

    def apply(self, add: list[SAKey], set_policies: list[Policy], del_policies: list[Policy],
              del_states: list[State]) -> list[tuple[str, str, str]]:
        """One `ip -batch` in this order (make before break): new states, policies, then removals.

        One process for all of it: with many peers a rotation touches hundreds of states, and every fork of
        `ip` counts. `ip xfrm` exits at its first failure, batch or not, so when the batch fails each line
        is run alone, still through stdin (a key in argv would show in /proc/*/cmdline): a state that is
        gone already is what we wanted; a state that could not be added (an SPI taken, say) or a policy that
        could not be set is returned as (src, dst, why), and every other line still runs.
        """
        pairs = ([(sa.src, sa.dst) for sa in add] + [(p.src, p.dst) for p in set_policies]
                 + [(p.src, p.dst) for p in del_policies] + [(st.src, st.dst) for st in del_states])
        lines = ([self._state_add(sa) for sa in add] + [self._policy("update", p) for p in set_policies]
                 + [self._policy("delete", p) for p in del_policies] + [self._state_del(st) for st in del_states])
        if not lines or run(["ip", "-batch", "-"], "\n".join(lines) + "\n").returncode == 0:
            return []
        failed = []
        for (src, dst), line in zip(pairs, lines, strict=True):
            res = run(["ip", "-batch", "-"], line + "\n")
            if res.returncode != 0 and (" add " in line or " update " in line):
                why = f"{line.split(' aead ')[0]}: {res.stderr.strip()[:200]}"
                log.error("xfrm: %s", why)
                failed.append((src, dst, why))
        return failed

    @staticmethod
    def policy_listing() -> str:
        """Every xfrm policy as `ip xfrm policy list` prints it: one read for the checks that need several."""
        return run(["ip", "xfrm", "policy", "list"]).stdout

    def policies(self, listing: str | None = None) -> list[Policy]:
        """Our per-peer outbound policies (a /32 pair with a template tagged REQID)."""
        out = []
        for block in re.split(r"\n(?=src )", self.policy_listing() if listing is None else listing):
            m = re.match(r"src (\S+)/32 dst (\S+)/32 proto udp dport (\d+)", block)
            if m and re.search(r"\sdir out\s", block) and f"reqid {REQID} " in block + " ":
                out.append(Policy(m.group(1), m.group(2), int(m.group(3))))
        return out

    # -- the kernel's own fail-closed policies -------------------------------------------------------------

    @staticmethod
    def _catchalls(verb: str, port: int) -> list[str]:
        lines = []
        for any_ in ("0.0.0.0/0", "::/0"):
            where = f"xfrm policy {verb} src {any_} dst {any_} proto udp dport {int(port)}"
            if verb == "delete":
                lines += [f"{where} dir out", f"{where} dir in"]
                continue
            lines.append(f"{where} dir out priority {CATCHALL_PRIORITY} action block")
            lines.append(f"{where} dir in priority {CATCHALL_PRIORITY} tmpl proto esp reqid {REQID} mode transport")
        return lines

    def set_catchall(self, port: int | None, old: int | None = None) -> None:
        """Block clear text to/from the encrypted networks' port (None: remove the catch-alls of old)."""
        if old is not None and old != port:
            run(["ip", "-force", "-batch", "-"], "\n".join(self._catchalls("delete", old)) + "\n")
        if port is None:
            return
        res = run(["ip", "-batch", "-"], "\n".join(self._catchalls("update", port)) + "\n")
        if res.returncode != 0:
            raise Unavailable(f"could not install the xfrm catch-all policies for port {port}: "
                              f"{res.stderr.strip()[:300]}")

    def catchall_present(self, port: int, listing: str | None = None) -> bool:
        found = 0
        for block in re.split(r"\n(?=src )", self.policy_listing() if listing is None else listing):
            if (re.match(rf"src (0\.0\.0\.0|::)/0 dst (0\.0\.0\.0|::)/0 proto udp dport {int(port)}\b", block)
                    and f"priority {CATCHALL_PRIORITY} " in block + " "):
                found += 1
        return found >= 4
