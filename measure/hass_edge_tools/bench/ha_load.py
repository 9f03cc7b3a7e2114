"""6. HA load: the REST requests HA gets from hass-edge while a client polls 10 entities
through it (scaled to one poll every 10 s), against the client polling HA directly."""
from __future__ import annotations

import asyncio
import time

import aiohttp

from hass_edge_tools.bench.harness import Harness, log
from hass_edge_tools.daemon import Daemon


POLL_ENTITIES = [
    "input_boolean.kitchen", "input_number.living_temp", "input_select.house_mode", "light.kitchen",
    "switch.coffee_maker", "cover.garage_door", "lock.front_door", "sensor.living_temperature",
    "binary_sensor.kitchen_occupied", "sun.sun",
]


async def measure(h: Harness, s: aiohttp.ClientSession, d: Daemon) -> None:
    log("6. HA REST load caused by a poller reading through hass-edge")
    window, period = h.dur(60, 5), h.dur(1.0, 0.5)
    m0 = await d.metrics_async(s)
    hits = polls = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < window:
        tick = time.monotonic()
        for e in POLL_ENTITIES:
            async with s.get(f"{d.base}/api/states/{e}") as r:
                await r.read()
                polls += 1
                hits += r.status == 200 and r.headers.get("X-Cache") == "hit"
        await asyncio.sleep(max(0.0, period - (time.monotonic() - tick)))
    w = time.monotonic() - t0
    m1 = await d.metrics_async(s)
    rest = m1.get("hass_edge_ha_rest_requests_total", 0) - m0.get("hass_edge_ha_rest_requests_total", 0)
    # Scale to the client: 10 entities every 10 s.
    per_hour = rest / w * 3600 * (period / 10)
    res = {"seconds": w, "period_s": period, "polls": polls, "hits": hits, "rest_requests": rest, "per_hour_at_10s": per_hour, "direct_per_hour": len(POLL_ENTITIES) * 360}
    log(f"   {polls} polls ({hits} hits), {rest:.0f} HA REST requests -> {per_hour:.0f}/h vs {res['direct_per_hour']}/h direct")
    h.r["ha_load"] = res
