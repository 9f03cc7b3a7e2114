"""5. Idle: a live daemon and a quiet HA; CPU per minute and wake-ups (context switches)
per second, by thread."""
from __future__ import annotations

import asyncio
import time

import aiohttp

from hass_edge_tools.bench.harness import Harness, log
from hass_edge_tools.procfs import ctxt_switches, proc_cpu_seconds, proc_kib, thread_switches


async def measure(h: Harness, s: aiohttp.ClientSession) -> None:
    log("5. idle: a live daemon, a quiet HA")
    window = h.dur(60, 5)
    d = h.daemon()
    await d.wait_live_async(s)
    await asyncio.sleep(2)
    m0 = await d.metrics_async(s)
    c0, (v0, n0, threads), t0, th0 = proc_cpu_seconds(d.pid), ctxt_switches(d.pid), time.monotonic(), thread_switches(d.pid)
    await asyncio.sleep(window)
    c1, (v1, n1, _), t1, th1 = proc_cpu_seconds(d.pid), ctxt_switches(d.pid), time.monotonic(), thread_switches(d.pid)
    m1 = await d.metrics_async(s)
    w = t1 - t0
    res = {
        "seconds": w,
        "cpu_ms_per_min": 1e3 * (c1 - c0) * 60 / w,
        "wakeups_per_s": ((v1 - v0) + (n1 - n0)) / w,
        "voluntary": v1 - v0,
        "nonvoluntary": n1 - n0,
        "threads": threads,
        "events": m1.get("hass_edge_events_received_total", 0) - m0.get("hass_edge_events_received_total", 0),
        "rss_kib": proc_kib(d.pid, "VmRSS"),
        "by_thread": {k: th1.get(k, 0) - th0.get(k, 0) for k in th1},
    }
    d.stop()
    log(f"   {res['cpu_ms_per_min']:.1f} ms CPU/min, {res['wakeups_per_s']:.2f} wake-ups/s over {w:.0f} s ({res['by_thread']}), {res['events']:.0f} events")
    h.r["idle"] = res
