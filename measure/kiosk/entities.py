"""Home Assistant's side of the entity-load measurement (issue 16), always directly against HA
with the peer's admin token. Run with the peer venv's Python (aiohttp) and tests/lib on
PYTHONPATH (ha_ws; run.sh sets it):

    <peer venv>/bin/python entities.py count     --url http://127.0.0.1:18199 --token-file DIR/token N
    <peer venv>/bin/python entities.py dashboard --url ... --token-file ...
    <peer venv>/bin/python entities.py clean     --url ... --token-file ...

`count N`: exactly the sensors sensor.kiosk_bench_1 … sensor.kiosk_bench_N exist in HA's state
machine: the missing ones are set with REST `POST /api/states/<id>` (a state set this way needs
no integration; it is not in the entity registry), the ones above N are removed (`DELETE`).
Each has a temperature's attributes (unit, device_class, state_class, friendly_name), so one
state is about as big as a real sensor's. Prints {"count", "created", "removed", "seconds",
"ha_states"} (ha_states: every entity HA holds afterwards).

`dashboard`: HA's default dashboard (`lovelace`) saved in storage mode as one view "Kiosk"
(path `0`) of 20 cards: 19 entity cards of sensor.kiosk_bench_50, _100, … _950 (all within the
first 1,000, so the same dashboard serves every count) and, last, an entities card of
input_boolean.kitchen ("Kitchen") and light.kitchen — the row the kiosk measurement waits for.
Read back; prints {"url_path": "lovelace", "entities": [...]} (21 entity ids).

`clean`: the sensors removed and the default dashboard's config deleted (HA generates it again).

Exit 0 = done, 1 = failed (the reason on stderr).
"""

import argparse
import asyncio
import json
import sys
import time

import aiohttp

from ha_ws import Fail, Ws  # tests/lib/ha_ws.py (run.sh puts tests/lib on PYTHONPATH)

PREFIX = "sensor.kiosk_bench_"
DASHBOARD_SENSORS = [f"{PREFIX}{k * 50}" for k in range(1, 20)]
KITCHEN_CARD = {"type": "entities", "title": "Kitchen", "entities": ["input_boolean.kitchen", "light.kitchen"]}
PARALLEL = 16  # REST requests in flight (HA handles them one event-loop turn each)


def sensor_state(n: int) -> dict:
    return {
        "state": f"{(n * 37) % 350 / 10 + 2:.1f}",
        "attributes": {
            "unit_of_measurement": "°C",
            "device_class": "temperature",
            "state_class": "measurement",
            "friendly_name": f"Kiosk bench {n}",
        },
    }


async def ha_states(session, url) -> list:
    async with session.get(url + "/api/states") as resp:
        if resp.status != 200:
            raise Fail(f"GET /api/states: HTTP {resp.status}")
        return await resp.json()


async def in_parallel(jobs):
    queue = list(jobs)

    async def worker():
        while queue:
            await queue.pop()()

    await asyncio.gather(*(worker() for _ in range(PARALLEL)))


async def count(args, session, url) -> dict:
    t0 = time.monotonic()
    have = {s["entity_id"] for s in await ha_states(session, url) if s["entity_id"].startswith(PREFIX)}
    want = {f"{PREFIX}{n}" for n in range(1, args.n + 1)}

    def setter(entity_id):
        async def run():
            n = int(entity_id[len(PREFIX):])
            async with session.post(f"{url}/api/states/{entity_id}", json=sensor_state(n)) as resp:
                if resp.status not in (200, 201):
                    raise Fail(f"POST /api/states/{entity_id}: HTTP {resp.status} {await resp.text()}")
        return run

    def remover(entity_id):
        async def run():
            async with session.delete(f"{url}/api/states/{entity_id}") as resp:
                if resp.status not in (200, 404):
                    raise Fail(f"DELETE /api/states/{entity_id}: HTTP {resp.status}")
        return run

    missing, extra = sorted(want - have), sorted(have - want)
    await in_parallel([setter(e) for e in missing] + [remover(e) for e in extra])
    total = len(await ha_states(session, url))
    return {"count": args.n, "created": len(missing), "removed": len(extra),
            "seconds": round(time.monotonic() - t0, 1), "ha_states": total}


async def dashboard(args, session, url, token) -> dict:
    cards = [{"type": "entity", "entity": e} for e in DASHBOARD_SENSORS] + [KITCHEN_CARD]
    config = {"title": "Kiosk bench", "views": [{"title": "Kiosk", "path": "0", "cards": cards}]}
    ws = await Ws.connect(session, url, token)
    try:
        await ws.save_dashboard(config)
    finally:
        await ws.ws.close()
    return {"url_path": "lovelace", "cards": len(cards), "entities": DASHBOARD_SENSORS + KITCHEN_CARD["entities"]}


async def clean(args, session, url, token) -> dict:
    args.n = 0
    removed = await count(args, session, url)
    ws = await Ws.connect(session, url, token)
    try:
        try:
            await ws.call({"type": "lovelace/config/delete"})
        except Fail as e:  # never saved: nothing to delete
            if "config_not_found" not in str(e):
                raise
    finally:
        await ws.ws.close()
    return {"removed": removed["removed"], "dashboard_deleted": True}


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["count", "dashboard", "clean"])
    ap.add_argument("n", nargs="?", type=int)
    ap.add_argument("--url", required=True)
    ap.add_argument("--token-file", required=True)
    args = ap.parse_args()
    if args.command == "count" and (args.n is None or args.n < 0):
        ap.error("count needs N >= 0")
    url = args.url.rstrip("/")
    with open(args.token_file) as f:
        token = f.read().strip()
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=600, sock_read=30)
    try:
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            if args.command == "count":
                out = await count(args, session, url)
            elif args.command == "dashboard":
                out = await dashboard(args, session, url, token)
            else:
                out = await clean(args, session, url, token)
    except (Fail, aiohttp.ClientError, asyncio.TimeoutError) as e:
        print(f"entities.py {args.command}: {e!r}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
