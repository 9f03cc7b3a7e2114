"""2b. Ingest end to end: HA changing 50 entities as fast as it can (48 concurrent REST
writers); hass-edge's CPU against HA's, and whether any change was lost."""
from __future__ import annotations

import asyncio
import time

import aiohttp

from hass_edge_tools.bench.harness import Harness, log
from hass_edge_tools.daemon import Daemon
from hass_edge_tools.procfs import proc_cpu_seconds


async def measure(h: Harness, s: aiohttp.ClientSession, d: Daemon) -> None:
    log("2b. end-to-end ingest: HA at its maximum change rate")
    seconds = h.dur(20, 3)
    n_entities, conc = 50, 48
    attrs = lambda i: {"unit_of_measurement": "W", "device_class": "power", "state_class": "measurement", "friendly_name": f"Bench load {i}"}
    await h.post_many(s, [(f"sensor.bench_load_{i}", {"state": "0", "attributes": attrs(i)}) for i in range(n_entities)])
    await asyncio.sleep(0.5)
    hass = h.peer.pid()
    m0 = await d.metrics_async(s)
    c0, h0, t0 = proc_cpu_seconds(d.pid), proc_cpu_seconds(hass), time.monotonic()
    counter = 0
    done = 0
    failures = 0
    stop_at = t0 + seconds
    # A separate connection pool so the load does not queue behind other requests.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as load:
        async def worker(w: int) -> None:
            nonlocal counter, done, failures
            while time.monotonic() < stop_at:
                counter += 1
                i = counter % n_entities
                body = {"state": str(counter), "attributes": attrs(i)}
                async with load.post(f"{h.peer.url}/api/states/sensor.bench_load_{i}", json=body, headers=h.peer.headers) as r:
                    await r.read()
                    if r.status in (200, 201):
                        done += 1
                    else:
                        failures += 1

        await asyncio.gather(*(worker(w) for w in range(conc)))
    t1 = time.monotonic()
    c1, h1 = proc_cpu_seconds(d.pid), proc_cpu_seconds(hass)
    window = t1 - t0
    # Let the last events arrive, then compare everything we track with HA.
    differ = extra = -1
    settle0 = time.monotonic()
    while time.monotonic() - settle0 < 10:
        differ, extra = await h.mirror_diff(d)
        if differ == 0 and extra == 0:
            break
        await asyncio.sleep(0.1)
    m1 = await d.metrics_async(s)
    delta = lambda k: m1.get(k, 0) - m0.get(k, 0)
    res = {
        "seconds": window,
        "changes": done,
        "failures": failures,
        "ha_rate": done / window,
        "edge_cpu_s": c1 - c0,
        "edge_cpu_pct": 100 * (c1 - c0) / window,
        "ha_cpu_pct": 100 * (h1 - h0) / window,
        "events_received": delta("hass_edge_events_received_total"),
        "reconnects": delta("hass_edge_reconnects_total"),
        "decode_errors": delta("hass_edge_decode_errors_total"),
        "differ": differ,
        "extra": extra,
        "settle_s": time.monotonic() - settle0,
        "cpu_us_per_event": 1e6 * (c1 - c0) / max(1.0, delta("hass_edge_events_received_total")),
    }
    res["lost"] = res["differ"] + res["extra"] + (1 if res["events_received"] < done else 0)
    log(f"   HA {res['ha_rate']:.0f} changes/s; hass-edge {res['edge_cpu_pct']:.2f} % of a core; received {res['events_received']:.0f} of {done}; differ {differ}, extra {extra}, reconnects {res['reconnects']:.0f}")
    h.r["ingest_e2e"] = res
