"""What the machine is, and what else kept it busy (it is shared with other builds and tests)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """The `model name` of /proc/cpuinfo, or "?"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def describe() -> str:
    """"2 cores (<model>), Linux <release>"."""
    return f"{os.cpu_count()} cores ({cpu_model()}), {os.uname().sysname} {os.uname().release}"


def busiest(n: int = 4) -> list[tuple[float, str]]:
    """The processes using the most CPU over one second (top), other machine users included."""
    out = subprocess.run(["top", "-b", "-n", "2", "-d", "1", "-w", "200"], capture_output=True, text=True).stdout
    block = out.split("PID USER")[-1].splitlines()[1:]
    rows = []
    for line in block:
        f = line.split()
        if len(f) >= 12:
            try:
                rows.append((float(f[8]), f"{' '.join(f[11:])[:40]} (pid {f[0]})"))
            except ValueError:
                continue
    rows.sort(key=lambda x: -x[0])
    return [r for r in rows[:n] if r[0] >= 5]
