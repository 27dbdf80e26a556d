"""Kernel programming for encrypted networks: xfrm ESP states and policies, and the nftables guard.

pyroute2 has no xfrm support, so xfrm goes through iproute2's `ip xfrm` (the narrowest well-tested
alternative), and the guard through `nft -f` (one atomic ruleset per change).

How VXLAN of an encrypted network, and only of it, ends up in ESP:
- nftables marks outgoing VXLAN datagrams whose VNI belongs to an encrypted network (a `route` chain, so
  the kernel re-routes the marked packet and the xfrm policy applies);
- one xfrm policy per peer matches (our VTEP -> peer VTEP, UDP to the VXLAN port, that mark) and requires
  ESP in transport mode; states carry AES-GCM keys derived per direction (plugin/keys.py);
- fail closed: a marked datagram whose route has no xfrm bundle (no policy or no SA for that peer) is
  dropped in OUTPUT, and an incoming clear-text datagram with an encrypted VNI (no IPsec secpath) is
  dropped in INPUT. Both counted.
Every object carries pyoverlay's tag: states and policies the reqid REQID, policies the mark MARK, the
nftables table its name. Stale ones are found by those tags.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
from dataclasses import dataclass

from plugin.errors import Unavailable
from plugin.keys import SAKey

log = logging.getLogger(__name__)

REQID = 0x70790E5A        # "py" + tag: every pyoverlay xfrm state and policy template
MARK = 0x70790E00         # fwmark of datagrams that must travel inside ESP
TABLE = "pyoverlay"        # nftables table; the iptables chains below where nftables cannot do it
CHAIN_MARK, CHAIN_OUT, CHAIN_IN = "PYOVERLAY-ESP-MARK", "PYOVERLAY-ESP-OUT", "PYOVERLAY-ESP-IN"
ESP_OVERHEAD = 40         # ESP header 8 + IV 8 + pad <= 3 + trailer 2 + ICV 16, rounded up
ALGO = "rfc4106(gcm(aes))"


def run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=10, check=False)


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

    esp = probe("0x70790001", "enc", "cbc(aes)", "0x" + "00" * 16, "auth", "hmac(sha256)", "0x" + "00" * 32)
    gcm = probe("0x70790002", "aead", ALGO, "0x" + "00" * 20, "128")
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
    if run(["nft", "-c", "-f", "-"], _ruleset({1: "probe"}, 4800)).returncode == 0:
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


def _ruleset(vnis: dict[int, str], port: int) -> str:
    """The guard for the encrypted VNIs (vni -> network key, for the comments)."""
    mark_rules, in_rules = [], []
    for vni, nkey in sorted(vnis.items()):
        match = f"udp dport {port} @th,96,24 {vni}"
        note = f'comment "pyoverlay:enc:{nkey}"'
        mark_rules.append(f"    {match} meta mark set {MARK:#x} {note}")
        in_rules.append(f"    {match} meta ipsec missing counter drop {note}")
    return "\n".join([
        f"table ip {TABLE} {{",
        "  chain esp_mark {",
        "    type route hook output priority mangle; policy accept;",
        *mark_rules,
        "  }",
        "  chain esp_out_guard {",
        "    type filter hook output priority 10; policy accept;",
        # udp dport: the ESP packet that leaves the transform keeps the mark and has no bundle left
        f"    udp dport {port} meta mark {MARK:#x} rt ipsec missing counter drop "
        "comment \"pyoverlay: no SA, never clear text\"",
        "  }",
        "  chain esp_in_guard {",
        "    type filter hook input priority -10; policy accept;",
        *in_rules,
        "  }",
        "}",
    ]) + "\n"


class IPsec:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._backend: str | None = None

    def backend(self) -> str:
        if self._backend is None:
            self._backend = guard_backend() or "nft"
        return self._backend

    # -- the nftables guard -----------------------------------------------------------------------------

    def set_guard(self, vnis: dict[int, str], port: int) -> None:
        """Install (or replace atomically) the guard for these VNIs; no VNIs removes the table."""
        with self._lock:
            if not vnis:
                self.remove_guard()
                return
            if self.backend() == "iptables":
                self._set_iptables(vnis, port)
                return
            script = f"table ip {TABLE}\ndelete table ip {TABLE}\n" + _ruleset(vnis, port)
            res = run(["nft", "-f", "-"], script)
            if res.returncode != 0:
                raise Unavailable(f"could not install the encryption guard (nftables): {res.stderr.strip()}")

    def _set_iptables(self, vnis: dict[int, str], port: int) -> None:
        """Same guard with iptables: our chains are replaced whole (iptables-restore --noflush), then
        hooked into OUTPUT/INPUT once."""
        mark, out, inp = [], [], []
        for vni, nkey in sorted(vnis.items()):
            match = f"-p udp --dport {port} -m u32 --u32 {_u32(vni)}"
            note = f'-m comment --comment "pyoverlay:enc:{nkey}"'
            mark.append(f"-A {CHAIN_MARK} {match} {note} -j MARK --set-mark {MARK:#x}")
            inp.append(f"-A {CHAIN_IN} {match} -m policy --dir in --pol none {note} -j DROP")
        # -p udp: the ESP packet that leaves the transform keeps the mark and has no bundle left
        out.append(f"-A {CHAIN_OUT} -p udp --dport {port} -m mark --mark {MARK:#x} -m policy --dir out --pol none "
                   "-j DROP")
        script = "\n".join(["*mangle", f":{CHAIN_MARK} - [0:0]", *mark, "COMMIT",
                            "*filter", f":{CHAIN_OUT} - [0:0]", f":{CHAIN_IN} - [0:0]", *out, *inp, "COMMIT"]) + "\n"
        res = run(["iptables-restore", "-w", "--noflush"], script)
        if res.returncode != 0:
            raise Unavailable(f"could not install the encryption guard (iptables): {res.stderr.strip()}")
        for table, hook, chain in (("mangle", "OUTPUT", CHAIN_MARK), ("filter", "OUTPUT", CHAIN_OUT),
                                   ("filter", "INPUT", CHAIN_IN)):
            if run(["iptables", "-w", "-t", table, "-C", hook, "-j", chain]).returncode != 0:
                res = run(["iptables", "-w", "-t", table, "-I", hook, "1", "-j", chain])
                if res.returncode != 0:
                    raise Unavailable(f"could not hook the encryption guard into {hook}: {res.stderr.strip()}")

    def remove_guard(self) -> None:
        if self.backend() == "iptables":
            for table, hook, chain in (("mangle", "OUTPUT", CHAIN_MARK), ("filter", "OUTPUT", CHAIN_OUT),
                                       ("filter", "INPUT", CHAIN_IN)):
                while run(["iptables", "-w", "-t", table, "-D", hook, "-j", chain]).returncode == 0:
                    pass
                run(["iptables", "-w", "-t", table, "-F", chain])
                run(["iptables", "-w", "-t", table, "-X", chain])
            return
        run(["nft", "delete", "table", "ip", TABLE])

    def guard_counters(self) -> dict[str, int]:
        """Packets dropped by the guard: {"out": n, "in": n}."""
        if self.backend() == "iptables":
            counts = {}
            for key, chain in (("out", CHAIN_OUT), ("in", CHAIN_IN)):
                res = run(["iptables", "-w", "-t", "filter", "-L", chain, "-n", "-v", "-x"])
                counts[key] = sum(int(line.split()[0]) for line in res.stdout.splitlines()[2:] if line.strip())
            return counts
        res = run(["nft", "list", "table", "ip", TABLE])
        out = {"out": 0, "in": 0}
        chain = ""
        for line in res.stdout.splitlines():
            if "chain " in line:
                chain = "out" if "esp_out_guard" in line else ("in" if "esp_in_guard" in line else "")
            m = re.search(r"counter packets (\d+)", line)
            if m and chain:
                out[chain] += int(m.group(1))
        return out

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

    @staticmethod
    def _state_add(sa: SAKey) -> str:
        return (f"xfrm state add src {sa.src} dst {sa.dst} proto esp spi {sa.spi:#x} reqid {REQID} mode transport "
                f"replay-window 128 flag esn aead {ALGO} 0x{sa.key.hex()} 128")

    @staticmethod
    def _state_del(st: State) -> str:
        return f"xfrm state delete src {st.src} dst {st.dst} proto esp spi {st.spi:#x}"

    @staticmethod
    def _policy(verb: str, pol: Policy) -> str:
        where = (f"xfrm policy {verb} src {pol.src}/32 dst {pol.dst}/32 proto udp dport {pol.port} dir out "
                 f"mark {MARK:#x} mask 0xffffffff")
        if verb == "delete":
            return where
        return f"{where} tmpl src {pol.src} dst {pol.dst} proto esp reqid {REQID} mode transport"

    def apply(self, add: list[SAKey], set_policies: list[Policy], del_policies: list[Policy],
              del_states: list[State]) -> None:
        """One `ip -batch` in this order (make before break): new states, policies, then removals.

        One process for all of it: with many peers a rotation touches hundreds of states, and every fork of
        `ip` counts. `ip xfrm` exits at its first failure, batch or not, so when the batch fails each line
        is run alone: a state that exists already, or one that is gone already, is what we wanted; failing
        to add a state or set a policy is an error.
        """
        lines = ([self._state_add(sa) for sa in add] + [self._policy("update", p) for p in set_policies]
                 + [self._policy("delete", p) for p in del_policies] + [self._state_del(st) for st in del_states])
        if not lines or run(["ip", "-batch", "-"], "\n".join(lines) + "\n").returncode == 0:
            return
        for line in lines:
            res = run(["ip", *line.split()])
            adding = " add " in line or " update " in line
            if res.returncode != 0 and adding and "exists" not in res.stderr.lower():
                raise Unavailable(f"{line.split(' aead ')[0]}: {res.stderr.strip()}")

    def policies(self) -> list[Policy]:
        """Our outbound policies (tagged with MARK)."""
        res = run(["ip", "xfrm", "policy", "list", "dir", "out"])
        out = []
        for block in re.split(r"\n(?=src )", res.stdout):
            m = re.match(r"src (\S+?)(?:/32)? dst (\S+?)(?:/32)? proto udp dport (\d+)", block)
            if m and f"mark {MARK:#x}" in block:
                out.append(Policy(m.group(1), m.group(2), int(m.group(3))))
        return out
