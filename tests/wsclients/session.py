"""The scripted session of tests/wsclients with hass-client (music-assistant's HomeAssistantClient), issue 16.

Two clients are connected at once: A to Home Assistant directly, B to the target (hass-edge's
/api/websocket, or HA again for the self-check). Every step is made on both and the results
compared; changes are made in HA directly (REST with the HA token), so both see the very same
events and the results compare as they are. hass-client has no entity map of its own: the session
keeps one per client from `subscribe_entities` (HA's compressed format), as an app would, and
reconnects by itself after the HA SIGKILL (hass-client does not). Prints one `PASS name` /
`FAIL name: why` line per check. Environment: as session.mjs (see run.sh, README.md).
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from typing import Any, Awaitable, Callable

import aiohttp
from hass_client import HomeAssistantClient
from hass_client.exceptions import AuthenticationFailed, BaseHassClientError

E = os.environ.get
HA_URL, HA_TOKEN = E("HA_URL", ""), E("HA_TOKEN", "")
TGT_URL, TGT_TOKEN, TGT_LABEL = E("TGT_URL", ""), E("TGT_TOKEN", ""), E("TGT_LABEL", "target")
PREFIX = E("WSC_PREFIX", "py: ")
VERBOSE = E("WSC_VERBOSE") == "1"
COUNT = {"passed": 0, "failed": 0}


def report(ok: bool, name: str, why: str = "") -> None:
    COUNT["passed" if ok else "failed"] += 1
    print(f"PASS {PREFIX}{name}" if ok else f"FAIL {PREFIX}{name}: {why}", flush=True)


def short(v: Any, n: int = 300) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= n else s[:n] + "…"


def first_diff(a: Any, b: Any, path: str = "$") -> str | None:
    if a == b:
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                return f"{path}.{k}: HA has none | {TGT_LABEL} -> {short(b[k], 200)}"
            if k not in b:
                return f"{path}.{k}: HA -> {short(a[k], 200)} | {TGT_LABEL} has none"
            if (d := first_diff(a[k], b[k], f"{path}.{k}")) is not None:
                return d
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if (d := first_diff(x, y, f"{path}[{i}]")) is not None:
                return d
    return f"{path}: HA -> {short(a, 200)} | {TGT_LABEL} -> {short(b, 200)}"


def compare(name: str, a: Any, b: Any, want: Callable[[Any], Any] = lambda _: True) -> None:
    if VERBOSE:
        print(f"  {name}: HA -> {short(a, 2000)}")
    w = want(a)
    if w is not True:
        report(False, name, f"HA's own answer is not as expected: {short(a) if w is False else w}")
        return
    d = first_diff(a, b)
    report(d is None, name, d or "")


async def settle(aw: Awaitable[Any]) -> dict:
    """{"ok": result} or {"error": [exception class, message]} (hass-client's FailedCommand carries
    HA's message only)."""
    try:
        return {"ok": await aw}
    except (BaseHassClientError, asyncio.TimeoutError) as e:
        return {"error": [type(e).__name__, str(e)]}


async def wait_for(pred: Callable[[], bool], seconds: float = 10) -> bool:
    end = time.monotonic() + seconds
    while True:
        if pred():
            return True
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.03)


def drop_fresh(v: Any) -> Any:
    """A new change makes new timestamps and a new context id: two calls' results compare without."""
    if isinstance(v, list):
        return [drop_fresh(x) for x in v]
    if isinstance(v, dict):
        return {k: "<time>" if k in ("last_changed", "last_updated", "last_reported", "lc", "lu")
                else ("<id>" if k in ("id", "parent_id") and x is not None else drop_fresh(x)) for k, x in v.items()}
    return v


# ---------------------------------------------------------------- HA directly (REST, HA token)
HTTP: aiohttp.ClientSession


async def ha_rest(method: str, path: str, body: Any = None) -> Any:
    async with HTTP.request(method, HA_URL + path, json=body, headers={"Authorization": f"Bearer {HA_TOKEN}"}) as r:
        text = await r.text()
        if r.status >= 300:
            raise RuntimeError(f"{method} {path}: {r.status} {text[:200]}")
        return json.loads(text) if text else None


async def ha_service(domain: str, service: str, data: dict) -> Any:
    return await ha_rest("POST", f"/api/services/{domain}/{service}", data)


# ---------------------------------------------------------------- a client with its entity map
def ws_url(base: str) -> str:
    return base.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/api/websocket"


class Side:
    """One hass-client connection and the entity map kept from its subscribe_entities."""

    def __init__(self, base: str, token: str, label: str) -> None:
        self.base, self.token, self.label = base, token, label
        self.client: HomeAssistantClient | None = None
        self.listener: asyncio.Task | None = None
        self.map: dict[str, dict] | None = None
        self.state_events: list[dict] = []
        self.reconnects = 0

    async def connect(self) -> None:
        self.client = HomeAssistantClient(ws_url(self.base), self.token)
        await self.client.connect()
        self.listener = asyncio.create_task(self.client.start_listening())

    async def close(self) -> None:
        if self.client:
            await self.client.disconnect()

    def apply(self, ev: dict) -> None:
        """HA's compressed entity format (websocket_api/messages.py): `a` added (full), `c` changed
        (`+` with s/a/c/lc/lu, `-` with removed attribute keys), `r` removed."""
        m = {} if self.map is None else dict(self.map)
        for eid, s in (ev.get("a") or {}).items():
            m[eid] = {"entity_id": eid, "state": s["s"], "attributes": s.get("a", {}),
                      "context": s["c"] if isinstance(s["c"], dict) else {"id": s["c"], "parent_id": None, "user_id": None},
                      "lc": s["lc"], "lu": s.get("lu", s["lc"])}
        for eid, ch in (ev.get("c") or {}).items():
            if eid not in m:
                continue
            e = dict(m[eid])
            add, rem = ch.get("+") or {}, ch.get("-") or {}
            if "s" in add:
                e["state"] = add["s"]
            if "c" in add:
                e["context"] = dict(e["context"], **(add["c"] if isinstance(add["c"], dict) else {"id": add["c"]}))
            if "lc" in add:
                e["lc"] = e["lu"] = add["lc"]
            elif "lu" in add:
                e["lu"] = add["lu"]
            if "a" in add or "a" in rem:
                e["attributes"] = {k: v for k, v in {**e["attributes"], **add.get("a", {})}.items() if k not in rem.get("a", [])}
            m[eid] = e
        for eid in ev.get("r") or []:
            m.pop(eid, None)
        self.map = m

    async def subscribe(self, entity_ids: list[str]) -> None:
        await self.client.subscribe_entities(self.apply, entity_ids)
        await self.client.subscribe_events(lambda ev: self.state_events.append(ev), "state_changed")

    def alive(self) -> bool:
        return self.client is not None and self.client.connected and self.listener is not None and not self.listener.done()


def state_of(side: Side, eid: str) -> str | None:
    return ((side.map or {}).get(eid) or {}).get("state")


# ---------------------------------------------------------------- the session
async def main() -> None:
    A, B = Side(HA_URL, HA_TOKEN, "HA"), Side(TGT_URL, TGT_TOKEN, TGT_LABEL)
    sides = (A, B)
    try:
        # 1. connect + auth
        r = await asyncio.gather(settle(A.connect()), settle(B.connect()))
        if any("error" in x for x in r):
            report(False, "connect + auth (version)", f"HA -> {short(r[0])} | {TGT_LABEL} -> {short(r[1])}")
            return
        compare("connect + auth (version)", {"version": A.client.version, "connected": A.client.connected},
                {"version": B.client.version, "connected": B.client.connected},
                lambda x: (x["connected"] and x["version"].startswith("20")) or short(x))
        bad = []
        for base in (HA_URL, TGT_URL):
            c = HomeAssistantClient(ws_url(base), "x" + "a" * 40)
            try:
                await c.connect()
                bad.append("auth_ok")
                await c.disconnect()
            except AuthenticationFailed as e:
                bad.append(["AuthenticationFailed", str(e)])
                await c.disconnect()  # closes the aiohttp session hass-client made
            except BaseHassClientError as e:
                bad.append([type(e).__name__, str(e)])
                await c.disconnect()
        compare("connect with a bad token: AuthenticationFailed", bad[0], bad[1],
                lambda x: x[0] == "AuthenticationFailed" or short(x))

        # 2.-4. get_states, get_services, get_config (HA asked again when A and B differ: sun.sun)
        async def read_both(name: str, f: Callable[[HomeAssistantClient], Awaitable[Any]], want=lambda _: True) -> None:
            a, b = await asyncio.gather(settle(f(A.client)), settle(f(B.client)))
            if a != b:
                c = await settle(f(A.client))
                if c == b:
                    a = c
            compare(name, a, b, want)

        async def states_sorted(c: HomeAssistantClient) -> list:
            return sorted(await c.get_states(), key=lambda s: s["entity_id"])
        await read_both("get_states (as a set)", states_sorted,
                        lambda r: any(s["entity_id"] == "input_boolean.kitchen" for s in r.get("ok", [])) or short(r))
        await read_both("get_services", lambda c: c.get_services(), lambda r: "toggle" in r.get("ok", {}).get("input_boolean", {}) or short(r))
        await read_both("get_config", lambda c: c.get_config(), lambda r: r.get("ok", {}).get("location_name") == "Edge Test Home" or short(r))

        # 5. subscribe_entities (every entity id HA has) + subscribe_events(state_changed)
        ids = sorted(s["entity_id"] for s in await A.client.get_states()) + ["sensor.wsclients_probe"]
        await asyncio.gather(A.subscribe(ids), B.subscribe(ids))
        if not await wait_for(lambda: A.map is not None and B.map is not None):
            report(False, "subscribe_entities: initial entity map", f"HA: {A.map is not None}, {TGT_LABEL}: {B.map is not None}")
        else:
            if A.map != B.map:
                await asyncio.sleep(0.5)
            compare("subscribe_entities: initial entity map", A.map, B.map, lambda m: "input_boolean.kitchen" in m or "no input_boolean.kitchen")
        want = "off" if state_of(A, "input_boolean.kitchen") == "on" else "on"
        for s in sides:
            s.state_events.clear()
        await ha_service("input_boolean", "toggle", {"entity_id": "input_boolean.kitchen"})
        trio = ("input_boolean.kitchen", "light.kitchen", "binary_sensor.kitchen_occupied")
        ok = await wait_for(lambda: all(state_of(s, e) == want for s in sides for e in trio))
        if not ok:
            report(False, "subscribe_entities: a change made in HA arrives (input_boolean.toggle)",
                   f"HA -> {state_of(A, trio[0])} | {TGT_LABEL} -> {state_of(B, trio[0])} (want {want})")
        else:
            compare("subscribe_entities: a change made in HA arrives (input_boolean.toggle)",
                    {e: A.map[e] for e in trio}, {e: B.map[e] for e in trio})
        ok = await wait_for(lambda: all(len([e for e in s.state_events if e["data"]["entity_id"] in trio]) >= 3 for s in sides))
        pick = lambda s: sorted((e for e in s.state_events if e["data"]["entity_id"] in trio), key=lambda e: e["data"]["entity_id"])  # noqa: E731
        if not ok:
            report(False, "subscribe_events state_changed: the 3 events of the toggle", f"HA: {len(pick(A))}, {TGT_LABEL}: {len(pick(B))}")
        else:
            compare("subscribe_events state_changed: the 3 events of the toggle", pick(A), pick(B))
        pid = "sensor.wsclients_probe"
        await ha_rest("POST", f"/api/states/{pid}", {"state": "1", "attributes": {"a": 1, "b": "x"}})
        ok = await wait_for(lambda: all(state_of(s, pid) == "1" for s in sides))
        await ha_rest("POST", f"/api/states/{pid}", {"state": "2", "attributes": {"a": 2}})
        ok = ok and await wait_for(lambda: all(state_of(s, pid) == "2" for s in sides))
        if not ok:
            report(False, "subscribe_entities: POST /api/states in HA arrives (added, then attribute removed)",
                   f"HA -> {short((A.map or {}).get(pid))} | {TGT_LABEL} -> {short((B.map or {}).get(pid))}")
        else:
            compare("subscribe_entities: POST /api/states in HA arrives (added, then attribute removed)", A.map[pid], B.map[pid],
                    lambda x: x["attributes"] == {"a": 2} or short(x))
        await ha_rest("DELETE", f"/api/states/{pid}")
        ok = await wait_for(lambda: all(pid not in (s.map or {}) for s in sides))
        report(ok, "subscribe_entities: DELETE /api/states in HA removes the entity (r)",
               "" if ok else f"HA has it: {pid in (A.map or {})}, {TGT_LABEL} has it: {pid in (B.map or {})}")

        # 6. call_service through each client in turn; the effect read from both maps
        async def call_both(name: str, domain: str, service: str, data: dict, reset: Callable[[], Awaitable[Any]],
                            is_reset: Callable[[Side], bool], is_done: Callable[[Side], bool], ents: tuple[str, ...]) -> None:
            res = []
            for s in sides:
                await reset()
                await wait_for(lambda: all(is_reset(x) for x in sides), 5)
                r = await settle(s.client.call_service(domain, service, data))
                arrived = await wait_for(lambda: all(is_done(x) for x in sides))
                view = lambda x: {e: (x.map or {}).get(e) for e in ents}  # noqa: E731
                res.append({"result": drop_fresh(r), "arrived": arrived, "effect": drop_fresh(view(A)),
                            "effect_same_on_both": view(A) == view(B)})
            compare(name, res[0], res[1], lambda x: (x["arrived"] and x["effect_same_on_both"] and "ok" in x["result"]) or short(x))
        await call_both("call_service input_boolean.toggle (effect in both maps)", "input_boolean", "toggle",
                        {"entity_id": "input_boolean.garage_open"},
                        lambda: ha_service("input_boolean", "turn_off", {"entity_id": "input_boolean.garage_open"}),
                        lambda s: state_of(s, "input_boolean.garage_open") == "off" and state_of(s, "cover.garage_door") == "closed",
                        lambda s: state_of(s, "input_boolean.garage_open") == "on" and state_of(s, "cover.garage_door") == "open",
                        ("input_boolean.garage_open", "cover.garage_door"))
        await call_both("call_service input_number.set_value (effect in both maps)", "input_number", "set_value",
                        {"entity_id": "input_number.living_temp", "value": 23.4},
                        lambda: ha_service("input_number", "set_value", {"entity_id": "input_number.living_temp", "value": 19.5}),
                        lambda s: state_of(s, "sensor.living_temperature") == "19.5",
                        lambda s: state_of(s, "input_number.living_temp") == "23.4" and state_of(s, "sensor.living_temperature") == "23.4",
                        ("input_number.living_temp", "sensor.living_temperature"))
        a, b = await asyncio.gather(*(settle(s.client.call_service("input_boolean", "no_such_service", {})) for s in sides))
        compare("call_service of an unknown service: HA's error", a, b, lambda x: "error" in x or short(x))

        # 7. registry lists (hass-client's own calls, and send_command for the rest)
        await read_both("registry get_entity_registry (config/entity_registry/list)", lambda c: c.get_entity_registry(), lambda r: "ok" in r or short(r))
        await read_both("registry get_area_registry", lambda c: c.get_area_registry(), lambda r: "ok" in r or short(r))
        await read_both("registry get_device_registry", lambda c: c.get_device_registry(), lambda r: "ok" in r or short(r))
        await read_both("registry send_command config/entity_registry/list_for_display",
                        lambda c: c.send_command("config/entity_registry/list_for_display"), lambda r: "ok" in r or short(r))
        await read_both("registry get_entity_registry_entry (config/entity_registry/get)",
                        lambda c: c.get_entity_registry_entry("input_boolean.kitchen"), lambda r: "ok" in r or short(r))

        # 8. render_template and subscribe_trigger through client.subscribe
        tpl = "{{ states('input_select.house_mode') }} / {{ state_attr('sensor.house_mode_text', 'is_away') }}"
        await ha_service("input_select", "select_option", {"entity_id": "input_select.house_mode", "option": "home"})
        await asyncio.sleep(0.2)
        got: list[list] = [[], []]
        unsubs = await asyncio.gather(*(s.client.subscribe(lambda m, i=i: got[i].append(m["event"]), "render_template", template=tpl)
                                        for i, s in enumerate(sides)))
        if not await wait_for(lambda: all(got)):
            report(False, "render_template: first result", f"HA: {len(got[0])}, {TGT_LABEL}: {len(got[1])} results")
        else:
            compare("render_template: first result", got[0][0], got[1][0], lambda x: x.get("result") == "home / False" or short(x))
        await ha_service("input_select", "select_option", {"entity_id": "input_select.house_mode", "option": "away"})
        if not await wait_for(lambda: all(any(e.get("result") == "away / True" for e in g) for g in got)):
            report(False, "render_template: a change re-renders", f"HA: {short(got[0])} | {TGT_LABEL}: {short(got[1])}")
        else:
            await asyncio.sleep(0.3)
            compare("render_template: a change re-renders", got[0], got[1])
        for u in unsubs:
            u()
        await ha_service("input_select", "select_option", {"entity_id": "input_select.house_mode", "option": "home"})
        got = [[], []]
        unsubs = await asyncio.gather(*(s.client.subscribe(lambda m, i=i: got[i].append(m["event"]), "subscribe_trigger",
                                                           trigger={"platform": "state", "entity_id": "input_boolean.coffee_maker_power"})
                                        for i, s in enumerate(sides)))
        await ha_service("input_boolean", "toggle", {"entity_id": "input_boolean.coffee_maker_power"})
        if not await wait_for(lambda: all(got)):
            report(False, "subscribe_trigger: a state trigger fires on a change", f"HA: {len(got[0])}, {TGT_LABEL}: {len(got[1])} events")
        else:
            compare("subscribe_trigger: a state trigger fires on a change", got[0], got[1],
                    lambda x: x[0].get("variables", {}).get("trigger", {}).get("entity_id") == "input_boolean.coffee_maker_power" or short(x))
        for u in unsubs:
            u()

        # 9. errors
        a, b = await asyncio.gather(*(settle(s.client.send_command("wsclients/no_such_command")) for s in sides))
        compare("an unknown command: HA's unknown_command (\"Unknown command.\")", a, b, lambda x: x == {"error": ["FailedCommand", "Unknown command."]} or short(x))
        na = E("NONADMIN_TOKEN", "")
        if not na:
            report(False, "a non-admin user: config/auth/list is unauthorized", "no NONADMIN_TOKEN")
        else:
            out = []
            for base in (HA_URL, TGT_URL):
                c = HomeAssistantClient(ws_url(base), na)
                r = await settle(c.connect())
                if "error" in r:
                    out.append({"connect": r})
                    await c.disconnect()
                    continue
                t = asyncio.create_task(c.start_listening())
                lst = await settle(c.send_command("config/auth/list"))
                st = await settle(c.get_states())
                out.append({"list": lst, "get_states_ok": isinstance(st.get("ok"), list)})
                await c.disconnect()
                await asyncio.wait({t})
            compare("a non-admin user: config/auth/list is unauthorized", out[0], out[1],
                    lambda x: (x.get("list") == {"error": ["FailedCommand", "Unauthorized"]} and x["get_states_ok"]) or short(x))

        # 10. HA SIGKILL mid-session
        if E("WSC_KILL", "0") == "1":
            await kill_step(A, B, ids)
    finally:
        for s in sides:
            try:
                await s.close()
            except Exception:  # noqa: BLE001
                pass


def as_view(s: dict) -> dict:
    """What the map can be compared on with HA's REST state: timestamps in ms (the map's come from
    float seconds), the context's id."""
    def ms(v: Any) -> float:
        return v * 1000 if isinstance(v, (int, float)) else datetime.fromisoformat(v).timestamp() * 1000
    return {"entity_id": s["entity_id"], "state": s["state"], "attributes": s["attributes"],
            "last_changed": ms(s.get("lc", s.get("last_changed"))), "last_updated": ms(s.get("lu", s.get("last_updated"))),
            "context_id": s["context"]["id"]}


def align(want: dict, have: dict) -> dict:
    out = {}
    for k, h in have.items():
        h = dict(h)
        for t in ("last_changed", "last_updated"):
            if k in want and abs(want[k][t] - h[t]) <= 2:
                h[t] = want[k][t]
        out[k] = h
    return out


async def kill_step(A: Side, B: Side, ids: list[str]) -> None:
    """SIGKILL the HA peer, restart it, make a change; both maps must end equal to HA's states.
    hass-client does not reconnect: like an app, the session reconnects a dropped client (retrying
    until HA, or hass-edge's forward to it, answers) and subscribes again, starting a fresh map."""
    name = "HA SIGKILL mid-session: both entity maps end equal to HA's states"
    peer = [E("PEER_SCRIPT", ""), E("HA_PEER_DIR", "")]
    t0 = time.monotonic()
    r = subprocess.run(["bash", peer[0], "kill", peer[1]], capture_output=True, text=True)
    if r.returncode:
        report(False, name, f"ha-peer.sh kill: {r.stderr[-300:]}")
        return
    dropped: dict[str, bool] = {}

    async def keep(s: Side) -> None:
        """Reconnect s whenever its connection is gone, until HA is back and it is subscribed."""
        while True:
            if s.alive():
                await asyncio.sleep(0.1)
                continue
            dropped[s.label] = True
            try:
                await s.close()
            except Exception:  # noqa: BLE001
                pass
            s.map = None
            try:
                await s.connect()
                await s.subscribe(ids)
                s.reconnects += 1
            except Exception:  # noqa: BLE001
                await asyncio.sleep(0.5)
    keepers = [asyncio.create_task(keep(s)) for s in (A, B)]
    try:
        await asyncio.sleep(1)
        r = await asyncio.to_thread(subprocess.run, ["bash", peer[0], "start", E("HA_VERSION", ""), peer[1], E("HA_PORT", "")],
                                    capture_output=True, text=True)
        if r.returncode:
            report(False, name, f"ha-peer.sh start: {r.stderr[-300:]}")
            return
        await ha_service("input_number", "set_value", {"entity_id": "input_number.kitchen_brightness", "value": 77})
        arrived = await wait_for(lambda: all(state_of(s, "input_number.kitchen_brightness") == "77.0" for s in (A, B)), 30)
        t1 = time.monotonic()
        last = ""
        for _ in range(20):
            ha = {s["entity_id"]: as_view(s) for s in await ha_rest("GET", "/api/states")}
            views = [align(ha, {k: as_view(v) for k, v in (s.map or {}).items()}) for s in (A, B)]
            da, db = first_diff(ha, views[0]), first_diff(ha, views[1])
            if arrived and da is None and db is None:
                report(True, name)
                print(f"INFO {PREFIX}SIGKILL: HA connection {'dropped, reconnected' if dropped.get('HA') else 'kept'}; "
                      f"{TGT_LABEL} connection {'dropped, reconnected' if dropped.get(TGT_LABEL) else 'kept (never dropped)'}; "
                      f"change seen {int((t1 - t0) * 1000)} ms after the kill", flush=True)
                return
            last = f"change arrived: {arrived}; HA vs its own connection: {da or 'equal'}; HA vs {TGT_LABEL}: {db or 'equal'}"
            await asyncio.sleep(0.5)
        report(False, name, last)
    finally:
        for k in keepers:
            k.cancel()


async def run() -> None:
    global HTTP
    async with aiohttp.ClientSession() as HTTP:
        try:
            await main()
        except Exception as e:  # noqa: BLE001
            import traceback
            report(False, "session", "aborted: " + traceback.format_exc(limit=4).replace("\n", " | "))
            del e


if __name__ == "__main__":
    asyncio.run(run())
    print(f"INFO {PREFIX}{COUNT['passed']} passed, {COUNT['failed']} failed", flush=True)
    sys.exit(1 if COUNT["failed"] else 0)
