"""The firewall tools pyoverlay drives (iptables/ip6tables and their -restore), in one place.

Commands are argument lists (no shell); rule text passed to a -restore is built only from pyoverlay's own
constants and integers by the caller. Our chains are replaced whole with `-restore --noflush` and hooked
first into a built-in chain once; unhooking removes every jump, then the chain.
"""

from __future__ import annotations

import subprocess


def run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=10, check=False)


def restore(tool: str, script: str, test: bool = False) -> subprocess.CompletedProcess[str]:
    """`<tool>-restore --noflush` (tables named in the script, only our chains in them); test: parse only."""
    return run([f"{tool}-restore", "-w", "--noflush", *(["--test"] if test else [])], script)


def hooked(tool: str, table: str, hook: str, chain: str) -> bool:
    return run([tool, "-w", "-t", table, "-C", hook, "-j", chain]).returncode == 0


def hook(tool: str, table: str, hook: str, chain: str) -> str:
    """Jump to chain first thing in hook, once; "" when done, else the tool's complaint."""
    if hooked(tool, table, hook, chain):
        return ""
    res = run([tool, "-w", "-t", table, "-I", hook, "1", "-j", chain])
    return "" if res.returncode == 0 else res.stderr.strip()[:300]


def unhook(tool: str, table: str, hook: str, chain: str) -> None:
    """Every jump from hook to chain removed, then the chain itself (missing pieces are fine)."""
    while run([tool, "-w", "-t", table, "-D", hook, "-j", chain]).returncode == 0:
        pass
    run([tool, "-w", "-t", table, "-F", chain])
    run([tool, "-w", "-t", table, "-X", chain])


def saved(tool: str, table: str) -> str:
    """`<tool>-save -t table`: one read of a whole table ("" when it cannot be read). Checks read this once
    instead of asking `-C`/`-S` per chain: on a slow kernel every fork of the tool counts."""
    res = run([f"{tool}-save", "-t", table])
    return res.stdout if res.returncode == 0 else ""


def jumps_in(saved_table: str, hook: str, chain: str) -> bool:
    """Whether a saved table has the plain jump from hook to chain (the rule `hook` puts there)."""
    return f"-A {hook} -j {chain}" in saved_table.splitlines()


def rules_in(saved_table: str, chain: str) -> str:
    """A chain's rules out of a saved table, as `-S chain` prints them ("" when it does not exist)."""
    lines = saved_table.splitlines()
    if not any(line.startswith(f":{chain} ") for line in lines):
        return ""
    return "\n".join([f"-N {chain}", *(line for line in lines if line.startswith(f"-A {chain} "))])


def listing(tool: str, table: str, chain: str) -> subprocess.CompletedProcess[str]:
    """`-L chain -n -v -x`: rules with exact packet counters."""
    return run([tool, "-w", "-t", table, "-L", chain, "-n", "-v", "-x"])
