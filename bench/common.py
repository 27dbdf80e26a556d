"""Shared by the benchmarks: percentiles, result files, running things inside the rig's namespaces."""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "bench"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
    return ordered[idx]


def summary(values: list[float], digits: int = 1) -> dict[str, float]:
    return {"n": len(values), "p50": round(statistics.median(values), digits),
            "p99": round(percentile(values, 0.99), digits), "max": round(max(values), digits),
            "min": round(min(values), digits)}


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def stats_table(what: str, labels: dict[str, str], stats: dict[str, dict[str, float]]) -> str:
    """One row per series (its label, n, p50, p99, max) from summary() results."""
    return table([what, "n", "p50", "p99", "max"],
                 [[labels[k], s["n"], s["p50"], s["p99"], s["max"]] for k, s in stats.items()])


def save(name: str, result: dict[str, Any], markdown: str) -> None:
    """bench/results/<name>.json (raw) and docs/bench/<name>.md (the table docs/benchmarks.md links)."""
    result = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    DOCS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (DOCS / f"{name}.md").write_text(f"<!-- written by bench/{name}.py at {result['time']} -->\n{markdown}\n")
    print(markdown)
    print(f"\nwrote {RESULTS / (name + '.json')} and {DOCS / (name + '.md')}")


def process_tree(root_pid: int) -> list[int]:
    """A process and all its descendants (a plugin's gunicorn master and workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def rss_kb(root_pid: int) -> int:
    """Resident memory of a process and all its descendants, in KiB (pages they share counted in each)."""
    return _rollup_kb(root_pid, "Rss")


def pss_kb(root_pid: int) -> int:
    """Proportional set size of a process and its descendants, in KiB: each shared page counted once among
    those sharing it (gunicorn's master and its forked worker share the interpreter's pages)."""
    return _rollup_kb(root_pid, "Pss")


def _rollup_kb(root_pid: int, field: str) -> int:
    total = 0
    for pid in process_tree(root_pid):
        try:
            m = re.search(rf"^{field}:\s+(\d+)", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.MULTILINE)
        except OSError:
            continue
        total += int(m.group(1)) if m else 0
    return total
