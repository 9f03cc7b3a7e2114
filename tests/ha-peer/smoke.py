#!/usr/bin/env python3
"""Smoke checks against a running test peer (run by smoke.sh with the venv's
Python).  Usage: smoke.py DIR — uses DIR/url and DIR/token.

Checks REST (states, services, templates following their helpers, the
automation, the script, REST-created entities) and WebSocket (get_services,
service_registered/service_removed on script.reload).  Leaves the peer's
entities as it found them where it can (toggles back), but the REST-created
entity it makes is deleted again.  Exit 0 when all passed.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time

import aiohttp

# Entities the peer's config makes (both versions).  2025.x adds the backup
# sensors; sensor.sun_* and sun.sun come from `sun:`; person.edge_tester from
# onboarding; zone.home from the core config.
EXPECTED = {
    "automation.doorbell_sets_message", "binary_sensor.kitchen_occupied",
    "cover.garage_door", "input_boolean.coffee_maker_power",
    "input_boolean.front_door_locked", "input_boolean.garage_open",
    "input_boolean.kitchen", "input_button.doorbell",
    "input_number.kitchen_brightness", "input_number.living_temp",
    "input_number.load", "input_select.house_mode", "input_text.last_message",
    "light.kitchen", "lock.front_door", "person.edge_tester", "script.say_hello",
    "sensor.house_mode_text", "sensor.living_temperature", "sensor.sun_next_dawn",
    "sensor.sun_next_dusk", "sensor.sun_next_midnight", "sensor.sun_next_noon",
    "sensor.sun_next_rising", "sensor.sun_next_setting", "sun.sun",
    "switch.coffee_maker", "zone.home",
}
EXPECTED_2025 = {
    "sensor.backup_backup_manager_state",
    "sensor.backup_last_successful_automatic_backup",
    "sensor.backup_next_scheduled_automatic_backup",
}
# 2026.x (seen on 2026.11.0): two more backup entities, the `event` platform's
# automatic-backup event, and the default conversation agent.
EXPECTED_2026 = {
    "conversation.home_assistant",
    "event.backup_automatic_backup",
    "sensor.backup_last_attempted_automatic_backup",
    "sensor.backup_last_successful_automatic_backup_size",
}

passed = failed = 0


def check(ok: bool, what: str) -> None:
    global passed, failed
    if ok:
        passed += 1
        print(f"  ok    {what}", flush=True)
    else:
        failed += 1
        print(f"  FAIL  {what}", flush=True)


class Peer:
    def __init__(self, session: aiohttp.ClientSession, url: str, token: str):
        self.s, self.url, self.token = session, url, token
        self.h = {"Authorization": f"Bearer {token}"}

    async def get(self, path: str, auth: bool = True):
        async with self.s.get(self.url + path, headers=self.h if auth else {}) as r:
            return r.status, (await r.json() if r.content_type == "application/json" else await r.text())

    async def post(self, path: str, body: dict):
        async with self.s.post(self.url + path, headers=self.h, json=body) as r:
            return r.status, (await r.json() if r.content_type == "application/json" else await r.text())

    async def delete(self, path: str):
        async with self.s.delete(self.url + path, headers=self.h) as r:
            return r.status

    async def state(self, entity_id: str):
        st, body = await self.get(f"/api/states/{entity_id}")
        return body if st == 200 else None

    async def call(self, domain: str, service: str, **data):
        st, body = await self.post(f"/api/services/{domain}/{service}", data)
        if st != 200:
            raise AssertionError(f"{domain}.{service}: HTTP {st} {body}")
        return body

    async def wait_for(self, entity_id: str, pred, timeout: float = 5.0):
        """Poll until pred(state) (pred(None) when the entity is absent)."""
        deadline = time.monotonic() + timeout
        while True:
            s = await self.state(entity_id)
            if pred(s):
                return s
            if time.monotonic() > deadline:
                return s
            await asyncio.sleep(0.05)


async def rest_checks(p: Peer, version: str) -> None:
    st, body = await p.get("/api/", auth=False)
    check(st == 401, f"GET /api/ without token -> 401 (got {st})")
    st, body = await p.get("/api/")
    check(st == 200 and body == {"message": "API running."}, f"GET /api/ -> 200 API running. (got {st})")

    st, states = await p.get("/api/states")
    ids = {s["entity_id"] for s in states}
    want = EXPECTED | (EXPECTED_2025 if not version.startswith("2024.") else set())
    want |= EXPECTED_2026 if int(version.split(".")[0]) >= 2026 else set()
    check(want <= ids, f"/api/states has the {len(want)} expected entities"
          + ("" if want <= ids else f" (missing {sorted(want - ids)})"))
    extra = ids - want
    check(not extra, "no unexpected entities" + (f" (extra {sorted(extra)})" if extra else ""))

    # input_boolean.kitchen drives light.kitchen and binary_sensor.kitchen_occupied
    before = (await p.state("input_boolean.kitchen"))["state"]
    after = "off" if before == "on" else "on"
    changed = await p.call("input_boolean", "toggle", entity_id="input_boolean.kitchen")
    check(any(s["entity_id"] == "input_boolean.kitchen" and s["state"] == after for s in changed),
          f"input_boolean.toggle kitchen {before} -> {after} (in the call's answer)")
    light = await p.wait_for("light.kitchen", lambda s: s is not None and s["state"] == after)
    check(light["state"] == after, f"light.kitchen follows: {light['state']}")
    occ = await p.wait_for("binary_sensor.kitchen_occupied", lambda s: s is not None and s["state"] == after)
    check(occ["state"] == after, f"binary_sensor.kitchen_occupied follows: {occ['state']}")

    # light.turn_on with brightness -> input_number.kitchen_brightness + kitchen on
    await p.call("light", "turn_on", entity_id="light.kitchen", brightness=200)
    light = await p.wait_for("light.kitchen",
                             lambda s: s is not None and s["state"] == "on" and s["attributes"].get("brightness") == 200)
    check(light["state"] == "on" and light["attributes"].get("brightness") == 200,
          f"light.turn_on brightness 200 -> light.kitchen on/200 ({light['state']}/{light['attributes'].get('brightness')})")
    nb = await p.state("input_number.kitchen_brightness")
    check(nb["state"] == "200.0", f"input_number.kitchen_brightness = {nb['state']}")
    await p.call("light", "turn_off", entity_id="light.kitchen")
    ib = await p.wait_for("input_boolean.kitchen", lambda s: s is not None and s["state"] == "off")
    check(ib["state"] == "off", "light.turn_off -> input_boolean.kitchen off")
    await p.call("input_number", "set_value", entity_id="input_number.kitchen_brightness", value=128)

    await p.call("switch", "turn_on", entity_id="switch.coffee_maker")
    s = await p.wait_for("input_boolean.coffee_maker_power", lambda s: s is not None and s["state"] == "on")
    sw = await p.wait_for("switch.coffee_maker", lambda s: s is not None and s["state"] == "on")
    check(s["state"] == "on" and sw["state"] == "on", "switch.turn_on coffee_maker -> on (and its input_boolean)")
    await p.call("switch", "turn_off", entity_id="switch.coffee_maker")

    await p.call("input_number", "set_value", entity_id="input_number.living_temp", value=23.4)
    t = await p.wait_for("sensor.living_temperature", lambda s: s is not None and s["state"] == "23.4")
    check(t["state"] == "23.4" and t["attributes"].get("unit_of_measurement") == "°C",
          f"sensor.living_temperature mirrors input_number.living_temp: {t['state']} {t['attributes'].get('unit_of_measurement')}")
    await p.call("input_number", "set_value", entity_id="input_number.living_temp", value=21.5)

    await p.call("input_select", "select_option", entity_id="input_select.house_mode", option="away")
    h = await p.wait_for("sensor.house_mode_text", lambda s: s is not None and s["state"] == "away")
    check(h["state"] == "away" and h["attributes"].get("is_away") is True,
          f"sensor.house_mode_text follows input_select.house_mode: {h['state']} is_away={h['attributes'].get('is_away')}")
    await p.call("input_select", "select_option", entity_id="input_select.house_mode", option="home")

    await p.call("cover", "open_cover", entity_id="cover.garage_door")
    c = await p.wait_for("cover.garage_door", lambda s: s is not None and s["state"] == "open")
    check(c["state"] == "open", f"cover.open_cover garage_door -> {c['state']}")
    await p.call("cover", "close_cover", entity_id="cover.garage_door")
    c = await p.wait_for("cover.garage_door", lambda s: s is not None and s["state"] == "closed")
    check(c["state"] == "closed", f"cover.close_cover garage_door -> {c['state']}")

    await p.call("lock", "unlock", entity_id="lock.front_door")
    lk = await p.wait_for("lock.front_door", lambda s: s is not None and s["state"] == "unlocked")
    check(lk["state"] == "unlocked", f"lock.unlock front_door -> {lk['state']}")
    await p.call("lock", "lock", entity_id="lock.front_door")
    lk = await p.wait_for("lock.front_door", lambda s: s is not None and s["state"] == "locked")
    check(lk["state"] == "locked", f"lock.lock front_door -> {lk['state']}")

    await p.call("input_text", "set_value", entity_id="input_text.last_message", value="hello")
    await p.call("input_button", "press", entity_id="input_button.doorbell")
    m = await p.wait_for("input_text.last_message", lambda s: s is not None and s["state"] == "ding dong")
    check(m["state"] == "ding dong", f"input_button.press doorbell -> automation -> input_text.last_message = {m['state']!r}")
    await p.call("script", "say_hello")
    m = await p.wait_for("input_text.last_message", lambda s: s is not None and s["state"] == "hello from script")
    check(m["state"] == "hello from script", f"script.say_hello -> input_text.last_message = {m['state']!r}")
    await p.call("input_text", "set_value", entity_id="input_text.last_message", value="hello")

    st, body = await p.post("/api/states/sensor.smoke_probe",
                            {"state": "1", "attributes": {"unit_of_measurement": "W"}})
    check(st == 201, f"POST /api/states/sensor.smoke_probe creates it -> {st}")
    st, body = await p.post("/api/states/sensor.smoke_probe", {"state": "2"})
    check(st == 200 and body["state"] == "2", f"POST again updates it -> {st}")
    st = await p.delete("/api/states/sensor.smoke_probe")
    check(st == 200, f"DELETE /api/states/sensor.smoke_probe -> {st}")
    st, body = await p.get("/api/states/sensor.smoke_probe")
    check(st == 404, f"GET after DELETE -> {st} {body}")


async def ws_checks(p: Peer, peer_dir: str) -> None:
    async with p.s.ws_connect(p.url + "/api/websocket") as ws:
        msg = await ws.receive_json(timeout=10)
        await ws.send_json({"type": "auth", "access_token": p.token})
        msg = await ws.receive_json(timeout=10)
        check(msg.get("type") == "auth_ok", f"WS auth_ok (ha_version {msg.get('ha_version')})")
        n = 0
        events: list[dict] = []  # events that arrived while waiting for a result

        async def cmd(**m):
            nonlocal n
            n += 1
            m["id"] = n
            await ws.send_json(m)
            while True:
                r = await ws.receive_json(timeout=15)
                if r.get("id") == n and r.get("type") == "result":
                    return r
                if r.get("type") == "event":
                    events.append(r)

        r = await cmd(type="get_services")
        check(r["success"] and "input_boolean" in r["result"] and "script" in r["result"],
              "WS get_services succeeds" + ("" if r["success"] else f" ({r.get('error')})"))
        r = await cmd(type="get_states")
        check(r["success"], f"WS get_states: {len(r.get('result') or [])} states")
        r = await cmd(type="subscribe_events", event_type="service_registered")
        sub_reg = n
        r2 = await cmd(type="subscribe_events", event_type="service_removed")
        sub_rem = n
        check(r["success"] and r2["success"], "WS subscribe_events service_registered/service_removed")

        scripts = os.path.join(peer_dir, "scripts.yaml")
        with open(scripts, encoding="utf-8") as f:
            original = f.read()

        async def reload_and_expect(sub_id: int, what: str):
            r = await cmd(type="call_service", domain="script", service="reload")
            if not r["success"]:
                return None
            deadline = time.monotonic() + 10
            while True:
                for e in events:
                    if e.get("id") == sub_id:
                        events.remove(e)
                        return e["event"]["data"]
                if time.monotonic() > deadline:
                    return None
                try:
                    e = await ws.receive_json(timeout=max(0.1, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    return None
                if e.get("type") == "event":
                    events.append(e)

        try:
            with open(scripts, "a", encoding="utf-8") as f:
                f.write("\nadded_at_runtime:\n  alias: Added at runtime\n  sequence:\n"
                        "    - delay: 0\n")
            d = await reload_and_expect(sub_reg, "registered")
            check(d == {"domain": "script", "service": "added_at_runtime"},
                  f"scripts.yaml + script.reload -> service_registered {d}")
        finally:
            with open(scripts, "w", encoding="utf-8") as f:
                f.write(original)
        d = await reload_and_expect(sub_rem, "removed")
        check(d == {"domain": "script", "service": "added_at_runtime"},
              f"script removed + script.reload -> service_removed {d}")
        # The removed script stays as `unavailable` (restored: true) because
        # it is in the entity registry; it would come back on every start.
        s = await p.state("script.added_at_runtime")
        check(s is not None and s["state"] == "unavailable" and s["attributes"].get("restored") is True,
              f"script.added_at_runtime left behind: {s and s['state']} restored={s and s['attributes'].get('restored')}")
        r = await cmd(type="config/entity_registry/remove", entity_id="script.added_at_runtime")
        gone = await p.wait_for("script.added_at_runtime", lambda s: s is None) is None
        check(r["success"] and gone,
              "config/entity_registry/remove script.added_at_runtime removes it"
              + ("" if r["success"] else f" ({r.get('error')})"))


async def main(peer_dir: str) -> int:
    url = open(os.path.join(peer_dir, "url")).read().strip()
    token = open(os.path.join(peer_dir, "token")).read().strip()
    version = open(os.path.join(peer_dir, "version")).read().strip()
    print(f"smoke checks against Home Assistant {version} at {url}")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        p = Peer(s, url, token)
        try:
            await rest_checks(p, version)
            await ws_checks(p, peer_dir)
        except Exception as err:  # report, do not hide
            check(False, f"unexpected {type(err).__name__}: {err}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(main(sys.argv[1])))
