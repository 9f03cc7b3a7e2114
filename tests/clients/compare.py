#!/usr/bin/env python3
"""Real Home Assistant clients against HA and against a target (hass-edge, or HA itself for the
self-check), results compared (issue 15). Run by run.sh with the clients venv's Python and
tests/lib on PYTHONPATH (for ha_ws).

    compare.py --ha-url URL --ha-token-file F --target-url URL [--target-label edge]
               [--target-token-file F] [--name-prefix P] [--no-cli-ws-lists] [--no-cli-ws]
               [--sections api-sync,api-async,api-ws-sync,api-ws-async,cli,errors,config,auth]
               [--edge-unreachable URL] [--edge-readonly URL --edge-api-token-file F]

Prints one `PASS name` / `FAIL name: why` line per check (run.sh counts them).

How a check compares:

* reads: the call against HA (a), against the target (b); equal -> pass. If not, HA is asked again
  (c) and b == c passes too: HA changed between the calls (sun.sun, a template sensor). Nothing
  else is normalised for reads, except the order of GET /api/states (sorted by entity_id: HA's
  order is its registration order, which HA does not promise; hass-edge sorts).
* writes come in idempotent pairs: before each side's call the entity is reset directly on HA
  (and, when the target is hass-edge, we wait until hass-edge's mirror shows the reset, as HA
  pushes it asynchronously); then the call, then the effect read back from HA directly and
  through the target at once. The call's results and the effects must be equal after replacing
  what a new change legitimately makes new: the timestamps of the change (last_changed,
  last_updated, last_reported, time_fired) and the context ids (id, parent_id; a new context per
  call). user_id stays.
* errors are compared as (exception class, message) with both base URLs replaced by <BASE>.
* every check also asserts what HA itself must answer (a dict with `version`, a 404, ...), so
  a broken HA or a vacuous "both failed the same way" fails.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import aiohttp
import requests

import homeassistant_api as hapi
from homeassistant_api import AsyncClient, Client, State

from ha_ws import ws_admin  # tests/lib/ha_ws.py (run.sh puts tests/lib on PYTHONPATH)

TS_KEYS = {"last_changed", "last_updated", "last_reported", "time_fired"}
RESULTS: list[tuple[bool, str, str]] = []


NAME_PREFIX = ""


def report(ok: bool, name: str, why: str = "") -> None:
    name = NAME_PREFIX + name
    RESULTS.append((ok, name, why))
    if ok:
        print(f"PASS {name}" + (f" ({why})" if why else ""), flush=True)
    else:
        print(f"FAIL {name}: {why}", flush=True)


class Side:
    def __init__(self, label: str, url: str, token: str):
        self.label, self.url, self.token = label, url.rstrip("/"), token

    def __repr__(self) -> str:
        return self.label


HA: Side
TGT: Side
TARGET_IS_EDGE = False
VERBOSE = os.environ.get("CLIENTS_VERBOSE") == "1"
CLI_WS_LISTS = True  # hass-cli's entity/area/device list (WebSocket commands); --no-cli-ws-lists
CLI_WS = True  # any hass-cli WebSocket command (raw ws too); --no-cli-ws
ALL_URLS: list[str] = []


# ---------------------------------------------------------------- normalisation
def plain(x: Any) -> Any:
    """Client objects -> JSON-like values. Pydantic models dump only the fields the server
    sent (exclude_unset): HomeAssistant-API fills fields HA did not send (last_reported before
    HA 2024.4) with now(), which would differ on every call."""
    if isinstance(x, hapi.BaseDomain):  # services are added after construction: not "set"
        return {"domain_id": x.domain_id, "services": plain(x.services)}
    if hasattr(x, "model_dump"):
        return plain(x.model_dump(mode="json", exclude_unset=True))
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, (dt.datetime, dt.date)):
        return x.isoformat()
    return x


def scrub(s: str) -> str:
    for u in sorted(ALL_URLS, key=len, reverse=True):
        s = s.replace(u, "<BASE>")
        s = s.replace(u.split("://", 1)[-1], "<HOST>")
    return s


def norm_change(x: Any) -> Any:
    """For writes: a new change has new timestamps and a new context id on each side."""
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            if k in TS_KEYS and v is not None:
                out[k] = "<ts>"
            elif k == "context" and isinstance(v, dict):
                out[k] = {ck: ("<id>" if ck in ("id", "parent_id") and cv else cv) for ck, cv in v.items()}
            elif k == "last_triggered" and v is not None:  # script attribute: the time of this call
                out[k] = "<ts>"
            else:
                out[k] = norm_change(v)
        return out
    if isinstance(x, list):
        return [norm_change(v) for v in x]
    if isinstance(x, str):
        return scrub(x)
    return x


def sort_states(x: Any) -> Any:
    """A list of state objects sorted by entity_id (stable: repeated ids keep their order)."""
    if isinstance(x, list) and all(isinstance(s, dict) and "entity_id" in s for s in x):
        return sorted(x, key=lambda s: s["entity_id"])
    return x


def capture(fn: Callable[[Side], Any], side: Side, norm: Callable[[Any], Any] = lambda v: v) -> Any:
    try:
        return ["ok", norm(plain(fn(side)))]
    except Exception as e:  # noqa: BLE001 - the exception is the result
        return ["error", type(e).__name__, scrub(str(e))]


def short(x: Any, n: int = 600) -> str:
    s = json.dumps(x, sort_keys=True, default=str)
    return s if len(s) <= n else s[:n] + f"...({len(s)} chars)"


def outcome(r: Any) -> str:
    """A captured result, for a message: `ok <value>` or `<Exception>: <message>`."""
    if isinstance(r, list) and len(r) == 2 and r[0] == "ok":
        return "ok " + short(r[1], 300)
    if isinstance(r, list) and len(r) == 3 and r[0] == "error":
        return f"{r[1]}: {r[2][:300]}"
    return short(r, 300)


def first_diff(a: Any, b: Any, path: str = "") -> str:
    for x, y in ((a, b), (a[0] if isinstance(a, list) and a else None, b[0] if isinstance(b, list) and b else None)):
        # a captured result (["ok", v] / ["error", cls, msg]) whose kind differs: say both whole
        if (isinstance(x, list) and isinstance(y, list) and x and y and x[0] in ("ok", "error")
                and y[0] in ("ok", "error") and x[0] != y[0]):
            return f"at {path or '/'}: HA -> {outcome(x)} | {TGT.label} -> {outcome(y)}"
    if type(a) is not type(b):
        return f"at {path or '/'}: HA {short(a, 300)} vs {TGT.label} {short(b, 300)}"
    if isinstance(a, dict) and isinstance(b, dict) and "status" in a and a.get("status") != b.get("status"):
        return f"at {path or '/'}: HA -> {short(a, 400)} | {TGT.label} -> {short(b, 400)}"
    if isinstance(a, dict) and "exit" in a and "stderr" in a and a != b:  # a hass-cli run: say it all
        return f"at {path or '/'}: HA -> {short(a, 400)} | {TGT.label} -> {short(b, 400)}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a:
                return f"at {path}/{k}: only {TGT.label} has it: {short(b[k], 300)}"
            if k not in b:
                return f"at {path}/{k}: only HA has it: {short(a[k], 300)}"
            if a[k] != b[k]:
                return first_diff(a[k], b[k], f"{path}/{k}")
    if isinstance(a, list):
        if len(a) != len(b):
            return f"at {path or '/'}: HA has {len(a)} items, {TGT.label} {len(b)}: HA {short(a, 300)} vs {TGT.label} {short(b, 300)}"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_diff(x, y, f"{path}/{i}")
    return f"at {path or '/'}: HA {short(a, 300)} vs {TGT.label} {short(b, 300)}"


def expect_ok(pred: Callable[[Any], bool] | None = None, what: str = "") -> Callable[[Any], str | None]:
    def check(r: Any) -> str | None:
        if r[0] != "ok":
            return f"HA itself raised {r[1]}: {r[2][:300]}"
        if pred is not None and not pred(r[1]):
            return f"HA's answer is not {what}: {short(r[1], 300)}"
        return None
    return check


def expect_error(cls: str, contains: str = "") -> Callable[[Any], str | None]:
    def check(r: Any) -> str | None:
        if r[0] != "error" or r[1] != cls or contains not in r[2]:
            return f"HA itself did not raise {cls} ({contains!r}): {short(r, 300)}"
        return None
    return check


def expect_any(*checks: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def check(r: Any) -> str | None:
        whys = [c(r) for c in checks]
        return None if any(w is None for w in whys) else " / ".join(w for w in whys if w)
    return check


# ---------------------------------------------------------------- generic comparisons
def compare_read(name: str, fn: Callable[[Side], Any], expect: Callable[[Any], str | None],
                 norm: Callable[[Any], Any] = lambda v: v) -> None:
    try:
        a = capture(fn, HA, norm)
        b = capture(fn, TGT, norm)
        if VERBOSE:
            print(f"  {name}: HA answered {short(a, 400)}", flush=True)
        why = expect(a)
        if why:
            return report(False, name, why)
        if a == b:
            return report(True, name)
        c = capture(fn, HA, norm)
        if expect(c) is None and b == c:
            return report(True, name, "HA changed between the calls; equal to HA's second answer")
        report(False, name, first_diff(a, b))
    except Exception:  # noqa: BLE001
        report(False, name, "harness error: " + traceback.format_exc(limit=3).replace("\n", " | "))


def compare_write(name: str, prepare: Callable[[], None], fn: Callable[[Side], Any],
                  effect: Callable[[Side], Any], expect: Callable[[Any], str | None],
                  norm: Callable[[Any], Any] = norm_change) -> None:
    """prepare() resets the entity on HA; fn(side) is the write; effect(side) reads it back."""
    try:
        got = []
        for side in (HA, TGT):
            prepare()
            r = capture(fn, side, norm)
            eff = {"read from HA": capture(effect, HA, norm), f"read through the caller's endpoint": capture(effect, side, norm)}
            got.append([r, eff])
        if VERBOSE:
            print(f"  {name}: through HA {short(got[0], 700)}", flush=True)
        why = expect(got[0][0])
        if why:
            return report(False, name, why)
        if got[0] == got[1]:
            return report(True, name)
        report(False, name, first_diff(got[0], got[1]))
    except Exception:  # noqa: BLE001
        report(False, name, "harness error: " + traceback.format_exc(limit=3).replace("\n", " | "))


# ---------------------------------------------------------------- direct HA helpers (setup/effects)
NO_AUTH = "<no Authorization header>"


def ha_req(method: str, path: str, body: Any = None, side: Side | None = None, token: str | None = None,
           headers: dict | None = None) -> requests.Response:
    side = side or HA
    h = {} if token == NO_AUTH else {"Authorization": f"Bearer {token if token is not None else side.token}"}
    if body is not None:
        h["Content-Type"] = "application/json"
    h.update(headers or {})
    return requests.request(method, side.url + path, headers=h,
                            data=None if body is None else json.dumps(body), timeout=30)


def ha_state(entity_id: str, side: Side | None = None) -> Any:
    r = ha_req("GET", f"/api/states/{entity_id}", side=side)
    return r.json() if r.status_code == 200 else {"status": r.status_code, "body": r.text}


def sync_target(entity_id: str) -> None:
    """Wait (≤ 3 s) until the target's GET /api/states/<id> shows what HA has: HA pushes a change
    made directly on HA to hass-edge asynchronously. Only when the target is hass-edge."""
    if not TARGET_IS_EDGE:
        return
    want = ha_state(entity_id)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if ha_state(entity_id, TGT) == want:
            return
        time.sleep(0.02)


def call_service_on_ha(domain: str, service: str, data: dict) -> None:
    r = ha_req("POST", f"/api/services/{domain}/{service}", data)
    assert r.status_code == 200, f"{domain}.{service} on HA: {r.status_code} {r.text[:200]}"


def reset_boolean(entity_id: str, state: str) -> Callable[[], None]:
    def prep() -> None:
        call_service_on_ha("input_boolean", f"turn_{state}", {"entity_id": entity_id})
        sync_target(entity_id)
    return prep


def reset_number(entity_id: str, value: float) -> Callable[[], None]:
    def prep() -> None:
        call_service_on_ha("input_number", "set_value", {"entity_id": entity_id, "value": value})
        sync_target(entity_id)
    return prep


def reset_text(entity_id: str, value: str) -> Callable[[], None]:
    def prep() -> None:
        call_service_on_ha("input_text", "set_value", {"entity_id": entity_id, "value": value})
        sync_target(entity_id)
    return prep


def reset_set_state(entity_id: str, state: str, attributes: dict | None = None) -> Callable[[], None]:
    def prep() -> None:
        r = ha_req("POST", f"/api/states/{entity_id}", {"state": state, "attributes": attributes or {}})
        assert r.status_code in (200, 201), f"POST /api/states/{entity_id} on HA: {r.status_code}"
        sync_target(entity_id)
    return prep


def read_state(entity_id: str) -> Callable[[Side], Any]:
    def eff(side: Side) -> Any:
        r = ha_req("GET", f"/api/states/{entity_id}", side=side)
        return {"status": r.status_code, "body": r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text}
    return eff


# ---------------------------------------------------------------- HomeAssistant-API
FIXED_START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def api_sync(side: Side, f: Callable[[Client], Any]) -> Any:
    with Client(side.url + "/api", side.token) as c:  # __enter__ checks GET /api/
        r = f(c)
        return list(r) if hasattr(r, "__next__") else r


def api_async(side: Side, f: Callable[[AsyncClient], Any]) -> Any:
    async def go() -> Any:
        async with AsyncClient(side.url + "/api", side.token) as c:
            r = await f(c)
            if hasattr(r, "__anext__"):
                return [x async for x in r]
            return r
    return asyncio.run(go())


async def _agen(x: Any) -> Any:  # an async generator method returns its generator unawaited
    return x


def section_api(sync: bool) -> None:
    pre = "api-sync" if sync else "api-async"
    run = api_sync if sync else api_async

    def call(f_sync: Callable, f_async: Callable) -> Callable[[Side], Any]:
        return (lambda side: run(side, f_sync)) if sync else (lambda side: run(side, f_async))

    compare_read(f"{pre} get_config", call(lambda c: c.get_config(), lambda c: c.get_config()),
                 expect_ok(lambda v: isinstance(v, dict) and "version" in v and "components" in v, "a config"))
    compare_read(f"{pre} get_states", call(lambda c: c.get_states(), lambda c: c.get_states()),
                 expect_ok(lambda v: len(v) >= 20, "≥ 20 states"), norm=sort_states)
    compare_read(f"{pre} get_entity input_boolean.kitchen",
                 call(lambda c: c.get_entity(entity_id="input_boolean.kitchen"),
                      lambda c: c.get_entity(entity_id="input_boolean.kitchen")),
                 expect_ok(lambda v: v["state"]["entity_id"] == "input_boolean.kitchen", "the entity"))
    compare_read(f"{pre} get_entity sensor.clients_no_such_entity (404)",
                 call(lambda c: c.get_entity(entity_id="sensor.clients_no_such_entity"),
                      lambda c: c.get_entity(entity_id="sensor.clients_no_such_entity")),
                 expect_error("EndpointNotFoundError"))
    compare_read(f"{pre} get_domains", call(lambda c: c.get_domains(), lambda c: c.get_domains()),
                 expect_ok(lambda v: "input_boolean" in v and "toggle" in v["input_boolean"]["services"], "the domains"))
    compare_read(f"{pre} get_components", call(lambda c: c.get_components(), lambda c: c.get_components()),
                 expect_ok(lambda v: "api" in v, "a list with api"))
    compare_read(f"{pre} get_events", call(lambda c: c.get_events(), lambda c: c.get_events()),
                 expect_ok(lambda v: any(e.get("event") == "state_changed" for e in v), "a list of events"))
    tmpl = ("{{ 1 + 1 }} {{ state_attr('input_number.living_temp', 'max') }} {{ states('input_select.house_mode') }}"
            " {{ state_attr('input_number.living_temp', 'unit_of_measurement') }} ✓ ünïcödé")
    compare_read(f"{pre} get_rendered_template", call(lambda c: c.get_rendered_template(tmpl),
                                                      lambda c: c.get_rendered_template(tmpl)),
                 expect_ok(lambda v: v.startswith("2 50"), "the rendered template"))
    compare_read(f"{pre} get_rendered_template (bad template: 400)",
                 call(lambda c: c.get_rendered_template("{{ states( }}"), lambda c: c.get_rendered_template("{{ states( }}")),
                 expect_error("BadTemplateError"))
    # history/logbook: the peer may not load them (then HA's 404 must come back as it is).
    ent = "input_boolean.kitchen"
    compare_read(f"{pre} get_history (Entity.get_history)",
                 call(lambda c: c.get_entity(entity_id=ent).get_history(start_timestamp=FIXED_START),
                      lambda c: _async_history(c, ent)),
                 expect_any(expect_ok(), expect_error("EndpointNotFoundError")))
    compare_read(f"{pre} get_logbook_entries",
                 call(lambda c: c.get_logbook_entries(filter_entities=ent, start_timestamp=FIXED_START),
                      lambda c: _agen(c.get_logbook_entries(filter_entities=ent, start_timestamp=FIXED_START))),
                 expect_any(expect_ok(), expect_error("EndpointNotFoundError")))
    compare_read(f"{pre} check_api_config (POST /api/config/core/check_config, admin)",
                 call(lambda c: c.check_api_config(), lambda c: c.check_api_config()), expect_ok(lambda v: v is True, "True"))
    compare_read(f"{pre} get_error_log (admin)", call(lambda c: c.get_error_log(), lambda c: c.get_error_log()),
                 expect_ok(lambda v: isinstance(v, str), "text"))

    # Many calls on one client (one kept-alive connection, local and forwarded routes mixed); for
    # the async client, the same calls at once (asyncio.gather: concurrent forwards).
    mixed = [lambda c: c.get_config(), lambda c: c.get_state(entity_id="input_boolean.kitchen"),
             lambda c: c.get_rendered_template("{{ 2 ** 10 }}"), lambda c: c.get_components(),
             lambda c: c.get_state(entity_id="sensor.living_temperature"),
             # (not get_events: HA's listener counts move while requests run, e.g. 5 -> 4 mid-batch)
             lambda c: c.get_rendered_template("{{ states('input_select.house_mode') }}")] * 4
    if sync:
        compare_read(f"{pre} 24 mixed calls on one kept-alive session",
                     lambda side: api_sync(side, lambda c: [f(c) for f in mixed]),
                     expect_ok(lambda v: len(v) == 24 and v[2] == "1024", "24 answers"))
    else:
        async def gather(c: AsyncClient) -> Any:
            return list(await asyncio.gather(*(f(c) for f in mixed)))
        compare_read(f"{pre} 24 mixed calls at once (asyncio.gather)", lambda side: api_async(side, gather),
                     expect_ok(lambda v: len(v) == 24 and v[2] == "1024", "24 answers"))

    # --- writes
    num = "input_number.living_temp"
    compare_write(f"{pre} trigger_service input_number.set_value", reset_number(num, 21.5),
                  call(lambda c: c.trigger_service("input_number", "set_value", entity_id=num, value=22.5),
                       lambda c: c.trigger_service("input_number", "set_value", entity_id=num, value=22.5)),
                  read_state(num), expect_ok(lambda v: any(s["entity_id"] == num and s["state"] == "22.5" for s in v), "the changed state"),
                  norm=lambda v: sort_states(norm_change(v)))
    kb = "input_boolean.kitchen"
    # Domain.<service>(): HomeAssistant-API first tries ?return_response; HA < 2024.8 ignores
    # it (toggles, answers the list, the client raises TypeError), HA >= 2024.8 answers 400 and
    # the client calls again without it. Either way it must be the same through the target.
    compare_write(f"{pre} Domain.toggle() input_boolean.kitchen", reset_boolean(kb, "off"),
                  call(lambda c: c.get_domain("input_boolean").toggle(entity_id=kb),
                       lambda c: _async_domain_call(c, "input_boolean", "toggle", entity_id=kb)),
                  read_state(kb), expect_any(expect_ok(), expect_error("TypeError")),
                  norm=lambda v: sort_states(norm_change(v)))
    txt = "input_text.last_message"
    compare_write(f"{pre} trigger_service_with_response script.say_hello", reset_text(txt, "hello"),
                  call(lambda c: c.trigger_service_with_response("script", "say_hello"),
                       lambda c: c.trigger_service_with_response("script", "say_hello")),
                  read_state(txt), expect_any(expect_ok(), expect_error("TypeError")),
                  norm=lambda v: sort_states(norm_change(v)))
    compare_write(f"{pre} trigger_service_with_response input_boolean.turn_on (no response support)",
                  reset_boolean(kb, "off"),
                  call(lambda c: c.trigger_service_with_response("input_boolean", "turn_on", entity_id=kb),
                       lambda c: c.trigger_service_with_response("input_boolean", "turn_on", entity_id=kb)),
                  read_state(kb), expect_any(expect_error("RequestError", "does not support responses"), expect_error("TypeError")),
                  norm=lambda v: sort_states(norm_change(v)))
    compare_write(f"{pre} fire_event clients_test_event", lambda: None,
                  with_events("clients_test_event", call(lambda c: c.fire_event("clients_test_event", n=1),
                                                         lambda c: c.fire_event("clients_test_event", n=1))),
                  lambda side: None, expect_ok(lambda v: "clients_test_event" in str(v["result"]) and len(v["events on HA"]) == 1,
                                               "the event message and one event on HA"))
    probe = f"sensor.clients_{'sync' if sync else 'async'}_probe"
    new = State(entity_id=probe, state="42", attributes={"unit_of_measurement": "W", "friendly_name": "Clients probe"})
    compare_write(f"{pre} set_state {probe}", reset_set_state(probe, "reset"),
                  call(lambda c: c.set_state(new), lambda c: c.set_state(new)),
                  read_state(probe), expect_ok(lambda v: v["state"] == "42", "the new state"))


def with_events(event_type: str, fn: Callable[[Side], Any]) -> Callable[[Side], Any]:
    """fn(side) while subscribed on HA (directly) to event_type: its result and the events that
    reached HA (type, data, origin, the user of the context)."""
    def go(side: Side) -> Any:
        r, events = asyncio.run(_events_during(HA, event_type, lambda: capture(fn, side, norm_change)))
        return {"result": r, "events on HA": [{"event_type": e["event"]["event_type"], "data": e["event"]["data"],
                                               "origin": e["event"]["origin"],
                                               "user_id": e["event"]["context"].get("user_id")} for e in events]}
    return go


async def _async_domain_call(c: AsyncClient, domain: str, service: str, **data: Any) -> Any:
    d = await c.get_domain(domain)
    return await getattr(d, service)(**data)


async def _async_history(c: AsyncClient, entity_id: str) -> Any:
    e = await c.get_entity(entity_id=entity_id)
    return await e.get_history(start_timestamp=FIXED_START)


# ---------------------------------------------------------------- HomeAssistant-API's WebSocket clients
def ws_sync(side: Side, f: Callable[[Any], Any]) -> Any:
    with hapi.WebsocketClient(side.url + "/api/websocket", side.token) as w:  # upgrade, auth, supported_features
        return f(w)


def ws_async(side: Side, f: Callable[[Any], Any]) -> Any:
    async def go() -> Any:
        async with hapi.AsyncWebsocketClient(side.url + "/api/websocket", side.token) as w:
            return await f(w)
    return asyncio.run(go())


def section_ws(sync: bool) -> None:
    """HomeAssistant-API's WebsocketClient / AsyncWebsocketClient: an HTTP/1.1 Upgrade to
    /api/websocket, HA's auth phase, then commands, through the target as through HA."""
    pre = "api-ws-sync" if sync else "api-ws-async"
    run = ws_sync if sync else ws_async

    def call(f: Callable[[Any], Any]) -> Callable[[Side], Any]:
        return lambda side: run(side, f)

    compare_read(f"{pre} get_config", call(lambda w: w.get_config()),
                 expect_ok(lambda v: isinstance(v, dict) and "version" in v, "a config"))
    compare_read(f"{pre} get_states", call(lambda w: w.get_states()), expect_ok(lambda v: len(v) >= 20, "≥ 20 states"),
                 norm=sort_states)
    compare_read(f"{pre} get_domains", call(lambda w: w.get_domains()),
                 expect_ok(lambda v: "input_boolean" in v, "the domains"))
    compare_read(f"{pre} get_rendered_template", call(lambda w: w.get_rendered_template("{{ 6 * 7 }}")),
                 expect_ok(lambda v: v == "42", "42"))
    num = "input_number.living_temp"
    compare_write(f"{pre} trigger_service input_number.set_value", reset_number(num, 21.5),
                  call(lambda w: w.trigger_service("input_number", "set_value", entity_id=num, value=23.5)),
                  read_state(num), expect_ok())
    txt = "input_text.last_message"
    compare_write(f"{pre} trigger_service_with_response script.say_hello", reset_text(txt, "hello"),
                  call(lambda w: w.trigger_service_with_response("script", "say_hello")), read_state(txt),
                  expect_ok(lambda v: v == {}, "{}"))
    compare_write(f"{pre} fire_event clients_ws_event", lambda: None,
                  with_events("clients_ws_event", call(_ws_fire_sync if sync else _ws_fire_async)),
                  lambda side: None, expect_ok(lambda v: v["result"][0] == "ok" and len(v["events on HA"]) == 1,
                                               "a context and one event on HA"))
    compare_read(f"{pre} bad token (auth_invalid)",
                 lambda side: run(Side(side.label, side.url, "not-a-valid-token"), lambda w: w.get_config()),
                 expect_error("UnauthorizedError"))


def _ws_fire_sync(w: Any) -> Any:  # a Context at the top: put it under "context" for norm_change
    return {"context": w.fire_event("clients_ws_event", n=2)}


async def _ws_fire_async(w: Any) -> Any:
    return {"context": await w.fire_event("clients_ws_event", n=2)}


# ---------------------------------------------------------------- homeassistant-cli
HASS_CLI = os.path.join(os.path.dirname(sys.executable), "hass-cli")


def cli(*args: str, output: str = "json", stdin: str | None = None) -> Callable[[Side], Any]:
    def run(side: Side) -> Any:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HASS_")}
        p = subprocess.run([HASS_CLI, "--server", side.url, "--token", side.token, "--timeout", "20",
                            "-o", output, *args], capture_output=True, text=True, timeout=60, env=env, input=stdin)
        out: Any = p.stdout
        try:
            out = json.loads(p.stdout)
        except ValueError:
            pass
        # stderr: only the error lines (hass-cli logs nothing else at the default level)
        return {"exit": p.returncode, "stdout": out, "stderr": scrub(p.stderr.strip())}
    return run


def section_cli() -> None:
    def ok_exit(pred: Callable[[Any], bool] | None = None, what: str = "") -> Callable[[Any], str | None]:
        return expect_ok(lambda v: v["exit"] == 0 and (pred is None or pred(v["stdout"])), what or "exit 0")

    def states_sorted(v: Any) -> Any:
        if isinstance(v, dict) and isinstance(v.get("stdout"), list):
            v = dict(v, stdout=sort_states(v["stdout"]))
        return v

    compare_read("cli state list", cli("state", "list"), ok_exit(lambda o: isinstance(o, list) and len(o) >= 20, "≥ 20 states"),
                 norm=states_sorted)
    compare_read("cli state get input_boolean.kitchen", cli("state", "get", "input_boolean.kitchen"),
                 ok_exit(lambda o: o[0]["entity_id"] == "input_boolean.kitchen", "the entity"))
    compare_read("cli state get sensor.clients_no_such_entity", cli("state", "get", "sensor.clients_no_such_entity"),
                 expect_ok(lambda v: "not found" in (v["stderr"] + str(v["stdout"])).lower(), "'not found'"))
    compare_read("cli service list", cli("service", "list"), ok_exit(lambda o: isinstance(o, list) and len(o) > 10, "services"))
    tf = tempfile.NamedTemporaryFile("w", suffix=".j2", delete=False)
    tf.write("{{ 3 * 7 }} {{ state_attr('input_number.living_temp', 'min') }}")
    tf.close()
    compare_read("cli template", cli("template", tf.name), ok_exit(lambda o: str(o).strip().startswith("21 -20"), "'21 -20'"))
    os.unlink(tf.name)
    compare_read("cli config full", cli("config", "full"), ok_exit(lambda o: isinstance(o, list) and "version" in o[0], "a config"))
    compare_read("cli raw get /api/config", cli("raw", "get", "/api/config"), ok_exit(lambda o: "version" in str(o), "a config"))
    compare_read("cli raw get /api/", cli("raw", "get", "/api/"), ok_exit(lambda o: "API running" in str(o), "API running"))
    compare_read("cli raw get /api/events", cli("raw", "get", "/api/events"), ok_exit(lambda o: "state_changed" in str(o), "events"))
    if not CLI_WS:
        return _cli_writes()
    # A WebSocket through the target (hass-cli's raw ws: connect, auth, one command).
    compare_read("cli raw ws get_config (WebSocket)", cli("raw", "ws", "get_config"),
                 ok_exit(lambda o: "location_name" in str(o), "a config"), norm=lambda v: _drop_ws_id(v))
    if not CLI_WS_LISTS:
        return _cli_writes()
    compare_read("cli entity list (WebSocket)", cli("entity", "list"),
                 ok_exit(lambda o: isinstance(o, list) and len(o) > 5, "the entity registry"))
    compare_read("cli area list (WebSocket)", cli("area", "list"), ok_exit(lambda o: isinstance(o, list), "areas"))
    compare_read("cli device list (WebSocket)", cli("device", "list"), ok_exit(lambda o: isinstance(o, list), "devices"))
    _cli_writes()


def _cli_writes() -> None:
    def ok_exit(pred: Callable[[Any], bool] | None = None, what: str = "") -> Callable[[Any], str | None]:
        return expect_ok(lambda v: v["exit"] == 0 and (pred is None or pred(v["stdout"])), what or "exit 0")

    def states_sorted(v: Any) -> Any:
        if isinstance(v, dict) and isinstance(v.get("stdout"), list):
            v = dict(v, stdout=sort_states(v["stdout"]))
        return v

    # --- writes
    probe = "sensor.clients_cli_probe"
    compare_write("cli state edit", reset_set_state(probe, "reset"),
                  cli("state", "edit", probe, "--json", json.dumps({"state": "7", "attributes": {"unit_of_measurement": "kWh"}})),
                  read_state(probe), ok_exit())
    gone = "sensor.clients_cli_delete_me"
    compare_write("cli state delete", reset_set_state(gone, "here"), cli("state", "delete", gone), read_state(gone), ok_exit())
    kb = "input_boolean.kitchen"
    compare_write("cli state toggle", reset_boolean(kb, "off"), cli("state", "toggle", kb), read_state(kb),
                  ok_exit(lambda o: any(s["entity_id"] == kb and s["state"] == "on" for s in o), "the toggled state"),
                  norm=lambda v: states_sorted(norm_change(v)))
    num = "input_number.kitchen_brightness"
    compare_write("cli service call input_number.set_value", reset_number(num, 128),
                  cli("service", "call", "input_number.set_value", "--arguments", f"entity_id={num},value=77"),
                  read_state(num), ok_exit(lambda o: any(s["entity_id"] == num and s["state"] == "77.0" for s in o), "the changed state"),
                  norm=lambda v: states_sorted(norm_change(v)))
    compare_write("cli event fire", lambda: None,
                  with_events("clients_cli_event", cli("event", "fire", "clients_cli_event", "--json", '{"k": "v"}')),
                  lambda side: None, expect_ok(lambda v: v["result"][0] == "ok" and v["result"][1]["exit"] == 0
                                               and "clients_cli_event" in str(v["result"]) and len(v["events on HA"]) == 1,
                                               "exit 0, the event message and one event on HA"))


def section_errors() -> None:
    """HA's error statuses and shapes where clients can tell them apart (issue 15): the same bad
    requests, with the HA token, against HA and the target; status, Content-Type and body."""
    def raw(method: str, path: str, body: str | None = None) -> Callable[[Side], Any]:
        def go(side: Side) -> Any:
            h = {"Authorization": f"Bearer {side.token}"}
            if body is not None:
                h["Content-Type"] = "application/json"
            r = requests.request(method, side.url + path, headers=h, data=None if body is None else body.encode(), timeout=20)
            ctype = r.headers.get("content-type", "")
            return {"status": r.status_code, "content-type": ctype, "body": r.text}
        return go

    for method, path, body, status in (
            ("GET", "/api/states/not_valid", None, 404),  # a malformed entity id: HA's 404, not 400
            ("GET", "/api/states/sensor.clients_no_such_entity", None, 404),
            ("DELETE", "/api/states/sensor.clients_no_such_entity", None, 404),
            ("POST", "/api/states/sensor.clients_bad", "{not json", 400),
            ("POST", "/api/states/sensor.clients_bad", "{}", 400),
            ("POST", "/api/services/clients_nodomain/noservice", "{}", 400),  # HA's text/plain 400
            ("POST", "/api/events/clients_bad_event", "[1, 2]", 400),
            ("GET", "/api/clients_no_such_route", None, 404)):  # HA's text/plain 404
        compare_read(f"errors {method} {path}" + (f" {body}" if body else ""), raw(method, path, body),
                     expect_ok(lambda v, st=status: v["status"] == st, f"status {status}"))


def section_ws_token() -> None:
    """For the api-token pass: hass-edge's API token in HA's in-band WebSocket auth. hass-edge
    swaps it for its HA token in the tunnel (README, Credentials: HA never sees the API token,
    which it would count as a failed login), so the session is HA's session for hass-edge's HA
    token: auth_ok and HA's get_config, as HA answers its own token directly."""
    compare_read("WebSocket auth with hass-edge's API token: HA's session for hass-edge's HA token",
                 lambda side: asyncio.run(ws_exchange(side, side.token, [{"type": "get_config"}])),
                 expect_ok(lambda v: v[0]["type"] == "auth_ok", "auth_ok"))


def section_config() -> None:
    """get_config after a core-config change (HA's WebSocket config/core/update of the currency),
    made directly on HA and through the target's WebSocket: the target's answer (hass-edge: from
    its link, refreshed on core_config_updated, so asynchronously: we wait ≤ 3 s) must become
    HA's. The currency is put back (EUR, the peer's) in any case."""
    def set_currency(side: Side, cur: str) -> None:
        [r] = asyncio.run(ws_admin(side.url, side.token, [{"type": "config/core/update", "currency": cur}]))
        assert r["success"], r

    def follow(want_currency: str) -> tuple[bool, Any, Any]:
        deadline = time.monotonic() + 3
        while True:
            ha = api_sync(HA, lambda c: c.get_config())
            tgt = api_sync(TGT, lambda c: c.get_config())
            if ha == tgt and ha.get("currency") == want_currency:
                return True, ha, tgt
            if time.monotonic() > deadline:
                return False, ha, tgt
            time.sleep(0.05)

    for via in (HA, TGT):
        name = f"config get_config follows a core config change made {'on HA' if via is HA else 'through the target (WebSocket)'}"
        try:
            set_currency(via, "USD")
            ok, ha, tgt = follow("USD")
            report(ok, name, "" if ok else f"after 3 s: {first_diff(ha, tgt)}")
        except Exception:  # noqa: BLE001
            report(False, name, traceback.format_exc(limit=3).replace("\n", " | "))
        finally:
            try:
                set_currency(HA, "EUR")
                follow("EUR")
            except Exception:  # noqa: BLE001
                pass


def _drop_ws_id(v: Any) -> Any:
    return v  # the frame's id is 1 on both sides; nothing to drop (kept as a hook)


# ---------------------------------------------------------------- credentials: non-admin user, login flow
NONADMIN_USER, NONADMIN_PASS = "clients-nonadmin", "clients-nonadmin-password-1"
CLIENT_ID = "http://127.0.0.1/"


def login(side: Side, username: str, password: str) -> tuple[list[Any], str | None]:
    """HA's login flow (POST /auth/login_flow, /auth/login_flow/<id>, /auth/token) against a side.
    Returns the normalised steps (flow id, code and tokens replaced) and the access token."""
    steps: list[Any] = []
    s = requests.Session()
    r = s.post(side.url + "/auth/login_flow", json={"client_id": CLIENT_ID, "handler": ["homeassistant", None],
                                                      "redirect_uri": CLIENT_ID}, timeout=20)
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
    steps.append({"status": r.status_code, "body": _norm_flow(body)})
    if r.status_code != 200:
        return steps, None
    r = s.post(f"{side.url}/auth/login_flow/{body['flow_id']}", json={"client_id": CLIENT_ID, "username": username,
                                                                     "password": password}, timeout=20)
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
    steps.append({"status": r.status_code, "body": _norm_flow(body)})
    if r.status_code != 200 or body.get("type") != "create_entry":
        return steps, None
    r = s.post(side.url + "/auth/token", data={"grant_type": "authorization_code", "code": body["result"],
                                                "client_id": CLIENT_ID}, timeout=20)
    tok = r.json() if r.status_code == 200 else {}
    steps.append({"status": r.status_code, "keys": sorted(tok), "token_type": tok.get("token_type"),
                  "expires_in": tok.get("expires_in")})
    return steps, tok.get("access_token")


def _norm_flow(b: Any) -> Any:
    if isinstance(b, dict):
        return {k: ("<id>" if k in ("flow_id", "result") else v) for k, v in b.items()}
    return b


def ensure_nonadmin_user() -> None:
    """A non-admin user (group system-users) with a password, made over HA's WebSocket with the
    peer's admin token; reused across runs of the same peer DIR."""
    [lst] = asyncio.run(ws_admin(HA.url, HA.token, [{"type": "config/auth/list"}]))
    users = [u for u in lst["result"] if u.get("name") == "Clients non-admin"]
    if users:
        steps, tok = login(HA, NONADMIN_USER, NONADMIN_PASS)
        if tok:
            return
        asyncio.run(ws_admin(HA.url, HA.token, [{"type": "config/auth/delete", "user_id": u["id"]} for u in users]))
    [made] = asyncio.run(ws_admin(HA.url, HA.token, [{"type": "config/auth/create", "name": "Clients non-admin",
                                                       "group_ids": ["system-users"]}]))
    assert made["success"], made
    uid = made["result"]["user"]["id"]
    [cred] = asyncio.run(ws_admin(HA.url, HA.token, [{"type": "config/auth_provider/homeassistant/create",
                                                       "user_id": uid, "username": NONADMIN_USER,
                                                       "password": NONADMIN_PASS}]))
    assert cred["success"], cred


def http_result(method: str, path: str, token: str | Callable[[Side], str], body: Any = None,
                headers: dict | None = None) -> Callable[[Side], Any]:
    def go(side: Side) -> Any:
        r = ha_req(method, path, body, side=side, token=token(side) if callable(token) else token, headers=headers)
        ctype = r.headers.get("content-type", "").split(";")[0]
        b: Any = r.text
        if ctype == "application/json":
            b = r.json()
        # HA sends Date on every answer (issue 15: so must hass-edge)
        return {"status": r.status_code, "content-type": ctype, "body": b, "has Date": "Date" in r.headers}
    return go


def section_auth() -> None:
    try:
        ensure_nonadmin_user()
        steps, na_token = login(HA, NONADMIN_USER, NONADMIN_PASS)
        assert na_token, f"no token for the non-admin user: {steps}"
    except Exception:  # noqa: BLE001
        report(False, "auth non-admin user setup", traceback.format_exc(limit=3).replace("\n", " | "))
        return
    # The login flow itself through the target (/auth/* is forwarded), and its token works on HA.
    try:
        a, _ = login(HA, NONADMIN_USER, NONADMIN_PASS)
        b, tok_b = login(TGT, NONADMIN_USER, NONADMIN_PASS)
        works = tok_b is not None and ha_req("GET", "/api/config", token=tok_b).status_code == 200
        if a == b and works:
            report(True, "auth login flow (/auth/login_flow, /auth/token)")
        else:
            report(False, "auth login flow (/auth/login_flow, /auth/token)",
                   f"token works on HA: {works}; " + first_diff(a, b))
    except Exception:  # noqa: BLE001
        report(False, "auth login flow (/auth/login_flow, /auth/token)", traceback.format_exc(limit=3).replace("\n", " | "))

    def is_status(*codes: int) -> Callable[[Any], str | None]:
        return expect_ok(lambda v: v["status"] in codes, f"status {codes}")

    # Admin-only routes with the non-admin user's token: HA refuses (401), and so must the target.
    compare_read("auth non-admin GET /api/error_log (admin only)", http_result("GET", "/api/error_log", na_token), is_status(401, 403))
    compare_read("auth non-admin POST /api/config/core/check_config (admin only)",
                 http_result("POST", "/api/config/core/check_config", na_token), is_status(401, 403))
    compare_read("auth non-admin POST /api/services/homeassistant/check_config (admin service)",
                 http_result("POST", "/api/services/homeassistant/check_config", na_token, {}), is_status(401, 403))
    # What the non-admin user may do works with its own token (a forwarded route and a local one).
    compare_read("auth non-admin GET /api/events", http_result("GET", "/api/events", na_token), is_status(200))
    compare_read("auth non-admin GET /api/config", http_result("GET", "/api/config", na_token), is_status(200))
    # A token HA does not accept: HA's 401 on a forwarded route.
    compare_read("auth invalid token GET /api/events", http_result("GET", "/api/events", "not-a-valid-token"), is_status(401))
    # The non-admin user over a WebSocket through the target: its own auth, and HA's refusal of an
    # admin-only command (the WebSocket must carry the client's token, not hass-edge's).
    compare_read("auth non-admin WebSocket: auth_ok, then config/auth/list refused",
                 lambda side: asyncio.run(ws_exchange(side, na_token, [{"type": "get_config"}, {"type": "config/auth/list"}])),
                 expect_ok(lambda v: v[0]["type"] == "auth_ok" and v[1]["success"] and not v[2]["success"],
                           "auth_ok, get_config ok, config/auth/list refused"))
    compare_read("auth invalid token WebSocket: auth_invalid",
                 lambda side: asyncio.run(ws_exchange(side, "not-a-valid-token", [{"type": "get_config"}])),
                 expect_ok(lambda v: v[0]["type"] == "auth_invalid", "auth_invalid"))
    if TARGET_IS_EDGE:
        section_edge_credentials()


async def ws_exchange(side: Side, token: str, frames: list[dict]) -> list[Any]:
    """auth with token, then each frame; returns the auth answer and each result (or what ended
    the connection), normalised: the result of get_config is reduced to its version."""
    out: list[Any] = []
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(side.url + "/api/websocket") as ws:
            first = await ws.receive_json()
            out.append({"first": first["type"], "ha_version": first.get("ha_version")})
            await ws.send_json({"type": "auth", "access_token": token})
            m = await ws.receive_json()
            out[0] = {"type": m["type"], "first": first["type"], "ha_version": m.get("ha_version"), "message": m.get("message")}
            if m["type"] != "auth_ok":
                return out
            for i, f in enumerate(frames, 1):
                await ws.send_json(dict(f, id=i))
                while True:
                    msg = await ws.receive(timeout=10)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        out.append({"closed": str(msg.type)})
                        return out
                    m = json.loads(msg.data)
                    if m.get("id") == i and m.get("type") == "result":
                        r = m.get("result")
                        if isinstance(r, dict) and "version" in r:
                            m = dict(m, result={"version": r["version"]})
                        out.append(m)
                        break
    return out


def section_edge_credentials() -> None:
    """hass-edge only (issue 15, credentials): in the loopback-open mode a request without
    credentials is forwarded with hass-edge's HA token; a cross-site request without credentials
    (foreign Origin, text/plain, as a page's no-cors fetch would send) never reaches HA."""
    global TGT
    compare_read("edge no credentials (loopback-open): GET /api/events as with the HA token",
                 http_result("GET", "/api/events", lambda side: side.token if side is HA else NO_AUTH),
                 expect_ok(lambda v: v["status"] == 200, "200"))
    compare_write("edge no credentials (loopback-open): POST /api/events/clients_noauth_event fired as hass-edge's HA user",
                  lambda: None,
                  with_events("clients_noauth_event", http_result("POST", "/api/events/clients_noauth_event",
                                                                  lambda side: side.token if side is HA else NO_AUTH, {"z": 1})),
                  lambda side: None, expect_ok(lambda v: len(v["events on HA"]) == 1, "one event on HA"))
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        name = f"edge cross-site: POST /api/events/clients_xsite_event, Origin http://attacker.example, {ctype}, no credentials -> 403, nothing on HA"
        try:
            r, events = asyncio.run(_events_during(HA, "clients_xsite_event", lambda: requests.post(
                TGT.url + "/api/events/clients_xsite_event", data='{"x": 1}', timeout=10,
                headers={"Origin": "http://attacker.example", "Content-Type": ctype})))
            report(r.status_code == 403 and not events, name, f"{r.status_code} {r.text[:150]!r}; events on HA: {len(events)}")
        except Exception:  # noqa: BLE001
            report(False, name, traceback.format_exc(limit=3).replace("\n", " | "))


# ---------------------------------------------------------------- hass-edge only: unreachable HA, read-only mode
def section_unreachable(url: str) -> None:
    for method, path, body in (("GET", "/api/events", None), ("POST", "/api/events/clients_x", {}),
                               ("GET", "/api/error_log", None), ("GET", "/lovelace/0", None)):
        name = f"edge HA unreachable: {method} {path} -> 502 JSON within 1 s"
        try:
            t = time.monotonic()
            h = {"Authorization": f"Bearer {HA.token}"}
            if body is not None:
                h["Content-Type"] = "application/json"
            r = requests.request(method, url + path, headers=h, data=None if body is None else json.dumps(body), timeout=10)
            took = time.monotonic() - t
            ctype = r.headers.get("content-type", "").split(";")[0]
            try:
                msg = r.json().get("message")
            except ValueError:
                msg = None
            ok = r.status_code == 502 and ctype == "application/json" and isinstance(msg, str) and took < 1.0
            report(ok, name, f"{r.status_code} {ctype} {r.text[:200]!r} in {took:.3f} s")
        except Exception as e:  # noqa: BLE001
            report(False, name, f"{type(e).__name__}: {e}")


def section_readonly(url: str, api_token: str) -> None:
    ro = Side("hass-edge (read-only)", url, api_token)
    # Forwarded writes: 403, and nothing reaches HA.
    probe, victim, kb = "sensor.clients_readonly_probe", "sensor.clients_readonly_victim", "input_boolean.kitchen"
    for tok_name, tok in (("hass-edge's API token", api_token), ("the HA token", HA.token)):
        for method, path, body in (("POST", "/api/events/clients_readonly_event", {}),
                                   ("POST", f"/api/states/{probe}", {"state": "1"}),
                                   ("DELETE", f"/api/states/{victim}", None),
                                   ("POST", "/api/services/input_boolean/turn_on", {"entity_id": kb})):
            name = f"edge read-only: {method} {path} with {tok_name} -> 403"
            try:
                # the state before: no probe, the victim there, the kitchen off
                ha_req("DELETE", f"/api/states/{probe}")
                reset_set_state(victim, "still here")()
                reset_boolean(kb, "off")()
                before = ha_state(kb)
                r, events = asyncio.run(_events_during(HA, "clients_readonly_event",
                                                       lambda: ha_req(method, path, body, side=ro, token=tok)))
                probe_st = ha_req("GET", f"/api/states/{probe}").status_code
                victim_st = ha_req("GET", f"/api/states/{victim}").status_code
                kb_same = ha_state(kb) == before
                ctype = r.headers.get("content-type", "").split(";")[0]
                ok = (r.status_code == 403 and ctype == "application/json" and not events and probe_st == 404
                      and victim_st == 200 and kb_same)
                report(ok, name, f"{r.status_code} {ctype} {r.text[:160]!r}; on HA afterwards: events fired {len(events)}, "
                                 f"{probe} {probe_st} (want 404), {victim} {victim_st} (want 200), {kb} unchanged {kb_same}")
            except Exception:  # noqa: BLE001
                report(False, name, traceback.format_exc(limit=3).replace("\n", " | "))
    # Reads still go through, with hass-edge's API token (forwarded with hass-edge's HA token).
    global TGT
    saved, TGT = TGT, ro
    try:
        compare_read("edge read-only: GET /api/events with hass-edge's API token (forwarded read)",
                     lambda side: http_result("GET", "/api/events", side.token)(side), expect_ok(lambda v: v["status"] == 200, "200"))
        compare_read("edge read-only: GET /api/states/input_boolean.kitchen with hass-edge's API token",
                     lambda side: http_result("GET", "/api/states/input_boolean.kitchen", side.token)(side),
                     expect_ok(lambda v: v["status"] == 200, "200"))
        # issue 15: with an API token configured, local routes also accept any token HA accepts.
        compare_read("edge read-only: GET /api/states/input_boolean.kitchen with the HA token",
                     lambda side: http_result("GET", "/api/states/input_boolean.kitchen", HA.token)(side),
                     expect_ok(lambda v: v["status"] == 200, "200"))
    finally:
        TGT = saved


async def _events_during(side: Side, event_type: str, action: Callable[[], Any]) -> tuple[Any, list]:
    """Run action() while subscribed to event_type on HA; return its result and the events seen
    within 0.5 s after it."""
    events: list = []
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(side.url + "/api/websocket") as ws:
            await ws.receive_json()
            await ws.send_json({"type": "auth", "access_token": side.token})
            await ws.receive_json()
            await ws.send_json({"id": 1, "type": "subscribe_events", "event_type": event_type})
            m = await ws.receive_json()
            assert m.get("success"), m
            r = await asyncio.get_running_loop().run_in_executor(None, action)
            try:
                while True:
                    m = await asyncio.wait_for(ws.receive_json(), 0.5)
                    if m.get("type") == "event":
                        events.append(m)
            except asyncio.TimeoutError:
                pass
    return r, events


# ---------------------------------------------------------------- main
def main() -> int:
    global HA, TGT, TARGET_IS_EDGE, ALL_URLS, NAME_PREFIX, CLI_WS_LISTS, CLI_WS
    ap = argparse.ArgumentParser()
    ap.add_argument("--ha-url", required=True)
    ap.add_argument("--ha-token-file", required=True)
    ap.add_argument("--target-url", required=True)
    ap.add_argument("--target-token-file", help="token the clients send to the target (default: the HA token)")
    ap.add_argument("--target-label", default="hass-edge")
    ap.add_argument("--sections", default="api-sync,api-async,api-ws-sync,api-ws-async,cli,errors,config,auth")
    ap.add_argument("--edge-unreachable", help="URL of a hass-edge whose HA is a closed port")
    ap.add_argument("--edge-readonly", help="URL of a hass-edge with allow_service_calls = false and an API token")
    ap.add_argument("--edge-api-token-file")
    ap.add_argument("--name-prefix", default="", help="put before every check's name")
    ap.add_argument("--no-cli-ws-lists", action="store_true", help="skip hass-cli's entity/area/device list")
    ap.add_argument("--no-cli-ws", action="store_true", help="skip every hass-cli WebSocket command (raw ws too)")
    a = ap.parse_args()
    ha_token = open(a.ha_token_file).read().strip()
    tgt_token = open(a.target_token_file).read().strip() if a.target_token_file else ha_token
    HA = Side("HA", a.ha_url, ha_token)
    TGT = Side(a.target_label, a.target_url, tgt_token)
    TARGET_IS_EDGE = a.target_url.rstrip("/") != a.ha_url.rstrip("/")
    ALL_URLS = [u.rstrip("/") for u in (a.ha_url, a.target_url, a.edge_unreachable, a.edge_readonly) if u]
    NAME_PREFIX = a.name_prefix
    CLI_WS_LISTS = not a.no_cli_ws_lists
    CLI_WS = not a.no_cli_ws
    sections = [x for x in a.sections.split(",") if x]
    for s in sections:
        t = time.monotonic()
        if s == "api-sync":
            section_api(True)
        elif s == "api-async":
            section_api(False)
        elif s == "api-ws-sync":
            section_ws(True)
        elif s == "api-ws-async":
            section_ws(False)
        elif s == "cli":
            section_cli()
        elif s == "errors":
            section_errors()
        elif s == "config":
            section_config()
        elif s == "ws-token":
            section_ws_token()
        elif s == "auth":
            section_auth()
        else:
            print(f"unknown section {s}", file=sys.stderr)
            return 2
        print(f"# section {s}: {time.monotonic() - t:.1f} s", flush=True)
    if a.edge_unreachable:
        section_unreachable(a.edge_unreachable.rstrip("/"))
    if a.edge_readonly:
        section_readonly(a.edge_readonly.rstrip("/"), open(a.edge_api_token_file).read().strip())
    return 0 if all(ok for ok, _, _ in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
