"""3. Freshness: from a change posted to HA to our SSE stream and to a tight GET poll of
ours, against HA's own WebSocket client seeing the same change."""
from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp

from hass_edge_tools.bench.harness import Harness, log
from hass_edge_tools.daemon import Daemon
from hass_edge_tools.stats import pct


async def measure(h: Harness, s: aiohttp.ClientSession, d: Daemon) -> None:
    log("3. freshness: HA change -> our SSE / GET vs HA's own WebSocket")
    n = int(h.dur(400, 40))
    entity = "sensor.bench_fresh"
    await h.post_many(s, [(entity, {"state": "init", "attributes": {"friendly_name": "Bench fresh"}})], 1)
    await asyncio.sleep(0.3)
    seen_ws: dict[str, float] = {}
    seen_sse: dict[str, float] = {}
    clock = time.perf_counter

    async def ha_ws(ready: asyncio.Event) -> None:
        async with s.ws_connect(h.peer.url + "/api/websocket", max_msg_size=0) as ws:
            await ws.receive_json()
            await ws.send_json({"type": "auth", "access_token": h.peer.token})
            assert (await ws.receive_json())["type"] == "auth_ok"
            await ws.send_json({"id": 1, "type": "subscribe_entities"})
            async for msg in ws:
                t = clock()
                data = json.loads(msg.data)
                for m in data if isinstance(data, list) else [data]:
                    if m.get("type") == "result":
                        continue
                    ev = m.get("event", {})
                    if "a" in ev and not ready.is_set():
                        ready.set()
                        continue
                    ch = ev.get("c", {}).get(entity, {}).get("+", {})
                    if "s" in ch:
                        seen_ws.setdefault(ch["s"], t)
                    a = ev.get("a", {}).get(entity)
                    if a:
                        seen_ws.setdefault(a["s"], t)

    async def sse(ready: asyncio.Event) -> None:
        async with s.get(f"{d.base}/api/stream?entity_id={entity}", timeout=aiohttp.ClientTimeout(total=None)) as r:
            assert r.status == 200, r.status
            ready.set()
            async for line in r.content:
                t = clock()
                if line.startswith(b"data:") and line[5:].strip() != b"ping":
                    ev = json.loads(line[5:])["data"]  # HA's envelope
                    ns = ev.get("new_state") or {}
                    if "state" in ns:
                        seen_sse.setdefault(ns["state"], t)

    async def trigger(value: str) -> float:
        t0 = clock()
        async with s.post(f"{h.peer.url}/api/states/{entity}", json={"state": value, "attributes": {"friendly_name": "Bench fresh"}}, headers=h.peer.headers) as r:
            await r.read()
        return t0

    async def wait_for(value: str, *maps: dict) -> bool:
        end = clock() + 2
        while clock() < end:
            if all(value in m for m in maps):
                return True
            await asyncio.sleep(0.0005)
        return False

    r1, r2 = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(ha_ws(r1)), asyncio.create_task(sse(r2))]
    await asyncio.wait_for(asyncio.gather(r1.wait(), r2.wait()), 10)
    ws_a, sse_a, delta_sse, missing = [], [], [], 0
    # Phase A: push delivery, both observers idle-waiting.
    for i in range(n):
        value = f"a{i}"
        t0 = await trigger(value)
        if not await wait_for(value, seen_ws, seen_sse):
            missing += 1
            continue
        ws_a.append(1e3 * (seen_ws[value] - t0))
        sse_a.append(1e3 * (seen_sse[value] - t0))
        delta_sse.append(1e3 * (seen_sse[value] - seen_ws[value]))
        await asyncio.sleep(random.uniform(0.005, 0.015))
    # Phase B: a reader polling our GET as fast as it can (one request in flight).
    ws_b, get_b, delta_get = [], [], []
    for i in range(n):
        value = f"b{i}"
        post = asyncio.create_task(trigger(value))
        await asyncio.sleep(0)
        t0 = None
        seen_get = None
        end = clock() + 2
        while clock() < end:
            async with s.get(f"{d.base}/api/states/{entity}") as r:
                body = await r.json()
            if body.get("state") == value:
                seen_get = clock()
                break
        t0 = await post
        if seen_get is None or not await wait_for(value, seen_ws):
            missing += 1
            continue
        ws_b.append(1e3 * (seen_ws[value] - t0))
        get_b.append(1e3 * (seen_get - t0))
        delta_get.append(1e3 * (seen_get - seen_ws[value]))
        await asyncio.sleep(random.uniform(0.005, 0.015))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    summary = lambda v: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)}
    res = {
        "samples": n,
        "missing": missing,
        "ha_ws": summary(ws_a),
        "sse": summary(sse_a),
        "sse_minus_ws": summary(delta_sse),
        "ha_ws_b": summary(ws_b),
        "get": summary(get_b),
        "get_minus_ws": summary(delta_get),
    }
    log(f"   HA WS p50/p99 {res['ha_ws']['p50']:.2f}/{res['ha_ws']['p99']:.2f} ms; SSE {res['sse']['p50']:.2f}/{res['sse']['p99']:.2f}; GET {res['get']['p50']:.2f}/{res['get']['p99']:.2f}; missing {missing}")
    h.r["freshness"] = res
