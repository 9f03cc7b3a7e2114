"""Where the time and the memory go: summaries of valgrind (massif, callgrind) and perf
profiles, for the tables under the benchmark table."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path


def massif_summary(path: Path) -> dict:
    """Peak and final heap of a massif profile; the peak's bytes by the innermost hass_edge
    function (or, outside our code, the outermost frame massif kept)."""
    snaps = []
    cur: dict = {}
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("snapshot="):
            cur = {"tree": None}
            snaps.append(cur)
        elif line.startswith(("mem_heap_B=", "mem_heap_extra_B=", "mem_stacks_B=", "time=")):
            k, v = line.split("=")
            cur[k] = int(v)
        elif line.startswith("heap_tree="):
            cur["kind"] = line.split("=")[1]
            if cur["kind"] in ("peak", "detailed"):
                tree_lines = []
                j = i + 1
                while j < len(lines) and not lines[j].startswith("#"):
                    tree_lines.append(lines[j])
                    j += 1
                cur["tree"] = tree_lines
                i = j - 1
        i += 1
    peak = next((x for x in snaps if x.get("kind") == "peak"), max(snaps, key=lambda x: x.get("mem_heap_B", 0)))
    by_fn: dict[str, int] = {}

    interesting = ("hass_edge::", "bytes::", "tungstenite::", "async_tungstenite::", "rustls", "ureq", "lru::", "zbus", "async_io::", "polling::")

    def walk(k: int, depth: int, owner: str | None, ours: str | None) -> int:
        # a node: "<indent>n<children>: <bytes> <addr>: <fn> (<file>)"; its children are
        # its callers, so walking down goes outward from malloc.
        line = peak["tree"][k]
        m = re.match(r"^(\s*)n(\d+): (\d+) (.*)$", line)
        children, size, rest = int(m.group(2)), int(m.group(3)), m.group(4)
        fn = re.sub(r"^0x[0-9A-F]+: ", "", rest)
        fn = re.sub(r" \(in [^)]*\)$| \([^)]*:\d+\)$", "", fn)
        if not fn.startswith("in ") and fn.startswith(interesting):
            owner = owner or shorten(fn)
            if fn.startswith("hass_edge::"):
                ours = ours or shorten(fn)
        k += 1
        if children == 0 or depth > 60:
            key = owner or shorten(fn)
            if owner and ours and owner != ours:
                key = f"{owner} ← {ours}"
            by_fn[key] = by_fn.get(key, 0) + size
            while k < len(peak["tree"]) and len(peak["tree"][k]) - len(peak["tree"][k].lstrip()) > len(m.group(1)):
                k += 1
            return k
        for _ in range(children):
            k = walk(k, depth + 1, owner, ours)
        return k

    if peak.get("tree"):
        try:
            walk(0, 0, None, None)
        except (AttributeError, IndexError):
            pass
    top = sorted(by_fn.items(), key=lambda kv: -kv[1])[:10]
    return {
        "peak_heap": peak.get("mem_heap_B", 0) + peak.get("mem_heap_extra_B", 0),
        "peak_heap_useful": peak.get("mem_heap_B", 0),
        "peak_at": peak.get("time", 0) / max(1, snaps[-1].get("time", 1)),
        "top": top,
    }



_PERF: bool | None = None


def perf_works() -> bool:
    global _PERF
    if _PERF is None:
        _PERF = bool(shutil.which("perf")) and subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-o", "/dev/null", "true"], capture_output=True).returncode == 0
    return _PERF


def perf_summary(data: Path) -> dict:
    """Kernel/user split and the top user-space symbols of a cpu-clock profile."""
    def report(*sort: str) -> list[tuple[float, str]]:
        out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--stdio", "-g", "none", "--sort", ",".join(sort)], capture_output=True, text=True).stdout
        rows = []
        for line in out.splitlines():
            m = re.match(r"^\s+([\d.]+)%\s+(.*\S)\s*$", line)
            if m:
                rows.append((float(m.group(1)), m.group(2)))
        return rows
    dsos = report("dso")
    kernel = sum(p for p, name in dsos if "kernel" in name)
    syms = [(p, re.sub(r"^\[\.\]\s+", "", name)) for p, name in report("sym") if name.startswith("[.]")][:8]
    return {"kernel_pct": kernel, "dsos": dsos[:5], "user_top": [(p, shorten(n)) for p, n in syms]}


def callgrind_total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no total in {path}")


def callgrind_self_costs(path: Path) -> dict[str, int]:
    out = subprocess.run(["callgrind_annotate", "--threshold=100", str(path)], capture_output=True, text=True).stdout
    costs: dict[str, int] = {}
    for line in out.splitlines():
        m = re.match(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S.*)$", line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        name = re.sub(r"\s*\[[^\]]*\]$", "", m.group(2))
        name = re.sub(r"^(\?\?\?|[^:]*\.(c|S|rs)):", "", name)
        costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def callgrind_hot(short: Path, long: Path, events: int, top: int = 15) -> list[tuple[float, float, str]]:
    """Per-event hot spots: self cost of each function in the long run minus the short run
    (the set-up cancels), as (percent, Ir per event, short name)."""
    a, b = callgrind_self_costs(short), callgrind_self_costs(long)
    diff = {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b)}
    total = sum(diff.values())
    ranked = sorted(diff.items(), key=lambda kv: -kv[1])[:top]
    return [(100 * v / total, v / events, shorten(k)) for k, v in ranked]


def shorten(name: str) -> str:
    name = re.sub(r"::h[0-9a-f]{16}$", "", name)
    name = re.sub(r"<[^<>]*(<[^<>]*(<[^<>]*>[^<>]*)*>[^<>]*)*>", "<…>", name) if len(name) > 90 else name
    return name[:110]
