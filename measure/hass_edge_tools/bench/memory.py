"""4. Memory: RSS, peak, PSS/USS of a daemon synced with 100 / 1,000 / 20,000 entities
(5,000 in a smoke), HA's RSS beside it, and the heap by function (valgrind massif)."""
from __future__ import annotations

import asyncio
import time

import aiohttp

from hass_edge_tools.bench.harness import Harness, log
from hass_edge_tools.bench.profiles import massif_summary
from hass_edge_tools.mirror import tracked_by_default
from hass_edge_tools.procfs import proc_kib, proc_status, smaps_kib


async def measure(h: Harness, s: aiohttp.ClientSession) -> None:
    log("4. memory: RSS with 100 / 1,000 / 20,000 tracked entities")
    levels = [100, 1000, 5000] if h.smoke else [100, 1000, 20000]
    hass = h.peer.pid()
    rows = []
    created = 0
    ha_base = proc_kib(hass, "VmRSS")
    base_tracked = sum(1 for k in await asyncio.to_thread(h.peer.states) if tracked_by_default(k) and not k.startswith("sensor.bench_"))
    for n in levels:
        t0 = time.monotonic()
        items = [(f"sensor.bench_{i:05d}", {"state": f"{20 + (i % 100) / 10:.1f}", "attributes": {
            "unit_of_measurement": "°C", "device_class": "temperature", "state_class": "measurement",
            "friendly_name": f"Bench temperature {i}"}}) for i in range(created, n)]
        await h.post_many(s, items)
        created = n
        create_s = time.monotonic() - t0
        ha_all = await asyncio.to_thread(h.peer.states)
        want = sum(1 for k in ha_all if tracked_by_default(k))
        settings = {} if n <= 8000 else {"cache": {"max_entities": max(10000, 2 * want)}}
        d = h.daemon(settings)
        try:
            sync_s = await d.wait_live_async(s, count=want)
            await asyncio.sleep(1)
            st = proc_status(d.pid)
            row = {
                "entities": n,
                "tracked": want,
                "rss_kib": int(st["VmRSS"].split()[0]),
                "hwm_kib": int(st["VmHWM"].split()[0]),
                "anon_kib": int(st["RssAnon"].split()[0]),
                "file_kib": int(st["RssFile"].split()[0]),
                "pss_kib": smaps_kib(d.pid, "Pss"),
                "uss_kib": smaps_kib(d.pid, "Private_Clean") + smaps_kib(d.pid, "Private_Dirty"),
                "ha_rss_kib": proc_kib(hass, "VmRSS"),
                "sync_s": sync_s,
                "create_s": create_s,
                "max_entities": max(10000, 2 * want) if settings else 10000,
            }
            # Then one client reads the whole list, as a dashboard would at start.
            async with s.get(d.base + "/api/states") as r:
                listed = len(await r.json())
            if listed != want:
                raise RuntimeError(f"/api/states lists {listed} entities, HA has {want} tracked")
            row["hwm_after_list_kib"] = proc_kib(d.pid, "VmHWM")
            row["rss_after_list_kib"] = proc_kib(d.pid, "VmRSS")
        finally:
            d.stop()
        rows.append(row)
        log(f"   {n} entities ({want} tracked): RSS {row['rss_kib']} KiB (anon {row['anon_kib']}, file {row['file_kib']}), peak {row['hwm_kib']} KiB; HA {row['ha_rss_kib']} KiB; synced in {sync_s:.2f} s")
        if n == 1000 or (n == levels[-1] and not h.smoke):
            h.r.setdefault("massif", {})[str(n)] = await massif(h, s, settings, want)
    h.r["memory"] = {"rows": rows, "ha_base_kib": ha_base, "base_tracked": base_tracked}


async def massif(h: Harness, s: aiohttp.ClientSession, settings: dict, want: int) -> dict:
    """The daemon's heap under valgrind massif: synced with `want` entities, then stopped."""
    out = h.work / f"massif.{want}.out"
    d = h.daemon(settings, wrap=["valgrind", "--tool=massif", f"--massif-out-file={out}", "--depth=40"])
    try:
        await d.wait_live_async(s, count=want, timeout=300)
        await asyncio.sleep(2)
    finally:
        d.stop(grace=60)
    return massif_summary(out)
