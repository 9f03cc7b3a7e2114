"""What /proc says about a process: CPU time, memory, context switches; and its CPU
affinity (taskset)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """CPU time of the whole process: the sum of every thread's on-CPU nanoseconds from
    /proc/<pid>/task/*/schedstat; without schedstats, `stat_cpu_seconds`. Threads that
    already ended are not counted by the former."""
    try:
        total = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue
        if total:
            return total / 1e9
    except OSError:
        pass
    return stat_cpu_seconds(pid)


def stat_cpu_seconds(pid: int | None) -> float:
    """utime + stime from /proc/<pid>/stat (fields 14, 15; 10 ms ticks), in seconds; NaN
    when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return float("nan")


def status_file(path: Path) -> dict[str, str]:
    """A /proc status file as {key: value}."""
    out = {}
    for line in path.read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def proc_status(pid: int) -> dict[str, str]:
    return status_file(Path(f"/proc/{pid}/status"))


def proc_kib(pid: int, key: str) -> int:
    """A kB line of /proc/<pid>/status (VmRSS, VmHWM, …)."""
    return int(proc_status(pid)[key].split()[0])


def smaps_kib(pid: int, key: str) -> int:
    """A line of /proc/<pid>/smaps_rollup (Pss, Private_Dirty, …) in kB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def proc_mem(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / VmSize in kB and Threads; empty once the process is gone."""
    try:
        st = proc_status(pid)
    except OSError:
        return {}
    return {k: int(st[k].split()[0]) for k in ("VmRSS", "VmHWM", "VmSize", "Threads") if k in st}


def fmt_mem(m: dict[str, int]) -> str:
    return f"VmRSS {m.get('VmRSS', 0) / 1024:.1f} MiB, VmHWM {m.get('VmHWM', 0) / 1024:.1f} MiB"


def ctxt_switches(pid: int) -> tuple[int, int, int]:
    """(voluntary, nonvoluntary, threads) summed over every thread of pid."""
    vol = nonvol = n = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            st = status_file(task / "status")
        except OSError:
            continue
        vol += int(st["voluntary_ctxt_switches"])
        nonvol += int(st["nonvoluntary_ctxt_switches"])
        n += 1
    return vol, nonvol, n


def thread_switches(pid: int) -> dict[str, int]:
    """Context switches (voluntary + nonvoluntary) by thread name (`comm`)."""
    out: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            st = status_file(task / "status")
        except OSError:
            continue
        out[st["Name"]] = out.get(st["Name"], 0) + int(st["voluntary_ctxt_switches"]) + int(st["nonvoluntary_ctxt_switches"])
    return out


def pin(pid: int, cpus: str) -> None:
    """Sets the CPU affinity of every thread of pid (taskset -a)."""
    subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True, stdout=subprocess.DEVNULL)
