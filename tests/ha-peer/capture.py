#!/usr/bin/env python3
"""Record real Home Assistant WebSocket/REST frames from a running test peer.

    capture.py PEER_DIR OUT_DIR

PEER_DIR is a peer started by ha-peer.sh (url, token, scripts.yaml); run with
the peer's bin/python (aiohttp).  capture.sh starts a fresh peer and calls
this.  Writes the file set of tests/fixtures/<version>/ (see
tests/fixtures/README-2026.11.0.md for what each file is):

* `*.json`: ONE WebSocket text frame exactly as HA sent it, plus "\\n";
* `*.jsonl`: one verbatim frame per line, in arrival order;
* `*_transcript*.jsonl`: both directions, {"t", "dir": send|recv|recv-nontext|note,
  "frame"}; the access token is replaced by <redacted> (the only edit);
* `rest_samples.json`: REST request -> {status, body} (body verbatim);
* `capture_summary.json`: what the run observed.

The peer is left changed (helpers, REST-made entities) and HA is restarted at
the end (restart transcript): capture.sh waits for it and stops it.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import aiohttp

COMPACT = {"separators": (",", ":"), "ensure_ascii": False}


class Conn:
    """One WebSocket connection that records every frame in both directions."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str):
        self.session, self.url, self.token = session, url, token
        self.transcript: list[dict] = []
        self.frames: list[tuple[str, object]] = []  # (verbatim text, parsed)
        self.next_id = 1
        self.waiters: dict[int, asyncio.Future] = {}
        self.new_frame = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_info: dict | None = None

    async def open(self, token: str | None = None, read: bool = True) -> tuple[str, str]:
        self.ws = await self.session.ws_connect(self.url, max_msg_size=0, autoclose=True, heartbeat=None)
        first = await self._recv_one()
        await self.send({"type": "auth", "access_token": token or self.token})
        second = await self._recv_one()
        if read:
            self.reader = asyncio.create_task(self._read())
        return first, second

    def note(self, text: str) -> None:
        self.transcript.append({"t": time.time(), "dir": "note", "frame": text})

    async def send(self, obj: dict) -> None:
        text = json.dumps(obj, **COMPACT)
        shown = json.dumps({**obj, "access_token": "<redacted>"}, **COMPACT) if "access_token" in obj else text
        self.transcript.append({"t": time.time(), "dir": "send", "frame": shown})
        await self.ws.send_str(text)

    async def _recv_one(self) -> str:
        msg = await self.ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"expected a text frame, got {msg.type}")
        self.transcript.append({"t": time.time(), "dir": "recv", "frame": msg.data})
        return msg.data

    async def _read(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.transcript.append({"t": time.time(), "dir": "recv", "frame": msg.data})
                parsed = json.loads(msg.data)
                self.frames.append((msg.data, parsed))
                for m in parsed if isinstance(parsed, list) else [parsed]:
                    if m.get("type") == "result" and m.get("id") in self.waiters:
                        self.waiters.pop(m["id"]).set_result((msg.data, m))
                self.new_frame.set()
                continue
            self.close_info = {
                "type": str(int(msg.type)),
                "data": msg.data if isinstance(msg.data, (int, str, type(None))) else str(msg.data),
                "extra": msg.extra if isinstance(msg.extra, (int, str, type(None))) else str(msg.extra),
                "ws_close_code": self.ws.close_code,
            }
            self.transcript.append({"t": time.time(), "dir": "recv-nontext", "frame": json.dumps(self.close_info)})
            self.closed.set()
            for fut in self.waiters.values():
                if not fut.done():
                    fut.set_exception(RuntimeError("connection closed"))
            return

    async def request(self, obj: dict, wait: bool = True):
        """Sends obj with the next id; returns (verbatim result frame, parsed result)."""
        mid = self.next_id
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.waiters[mid] = fut
        await self.send({"id": mid, **obj})
        if not wait:
            return mid
        return await asyncio.wait_for(fut, 30)

    def events(self, sub_id: int) -> list[str]:
        """Verbatim event frames of subscription sub_id (uncoalesced connections)."""
        return [text for text, m in self.frames if isinstance(m, dict) and m.get("type") == "event" and m.get("id") == sub_id]

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()


def write(out: str, name: str, text: str) -> None:
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        f.write(text + "\n")


def write_lines(out: str, name: str, lines: list[str]) -> None:
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


def write_transcript(out: str, name: str, conn: Conn) -> None:
    write_lines(out, name, [json.dumps(e, ensure_ascii=False) for e in conn.transcript])


async def main(peer_dir: str, out: str) -> int:
    base = open(os.path.join(peer_dir, "url")).read().strip()
    token = open(os.path.join(peer_dir, "token")).read().strip()
    ws_url = base.replace("http", "ws", 1) + "/api/websocket"
    os.makedirs(out, exist_ok=True)
    auth = {"Authorization": f"Bearer {token}"}
    summary: dict = {}

    async with aiohttp.ClientSession() as http:

        async def rest(method: str, path: str, body=None, use_auth=True):
            async with http.request(method, base + path, json=body, headers=auth if use_auth else {}) as r:
                return r.status, await r.text()

        # ---- REST samples (sensor.edge_probe ends at "2", before any subscription)
        samples = []
        for method, path, body, use_auth in [
            ("GET", "/api/", None, False),
            ("GET", "/api/", None, True),
            ("GET", "/api/states/input_boolean.kitchen", None, True),
            ("GET", "/api/states/sensor.does_not_exist", None, True),
            ("DELETE", "/api/states/sensor.edge_probe", None, True),
            ("POST", "/api/states/sensor.edge_probe", {"state": "1", "attributes": {"unit_of_measurement": "W", "friendly_name": "Edge probe"}}, True),
            ("POST", "/api/states/sensor.edge_probe", {"state": "2", "attributes": {"unit_of_measurement": "W", "friendly_name": "Edge probe"}}, True),
            ("POST", "/api/services/input_boolean/turn_off", {"entity_id": "input_boolean.kitchen"}, True),
            ("POST", "/api/services/nope/nothing", {}, True),
        ]:
            status, text = await rest(method, path, body, use_auth)
            samples.append({"request": {"method": method, "path": path, "json": body, "auth": use_auth}, "status": status, "body": text})
        with open(os.path.join(out, "rest_samples.json"), "w", encoding="utf-8") as f:
            json.dump(samples, f, indent=1, ensure_ascii=False)
            f.write("\n")

        # ---- auth_invalid
        bad = Conn(http, ws_url, token)
        _, invalid = await bad.open(token="not-a-token", read=False)
        write(out, "auth_invalid.json", invalid)
        msg = await bad.ws.receive()
        summary["auth_invalid_then"] = {"type": str(int(msg.type)), "close_code": bad.ws.close_code}
        await bad.ws.close()

        # ---- main: subscriptions, then changes of every kind
        main = Conn(http, ws_url, token)
        required, ok = await main.open()
        write(out, "auth_required.json", required)
        write(out, "auth_ok.json", ok)
        summary["ha_version"] = json.loads(ok)["ha_version"]
        text, _ = await main.request({"type": "subscribe_events", "event_type": "state_changed"})  # id 1
        write(out, "subscribe_events_result.json", text)
        await main.send({"id": main.next_id, "type": "ping"})  # id 2
        main.next_id += 1
        while not any(m.get("type") == "pong" for _, m in main.frames if isinstance(m, dict)):
            main.new_frame.clear()
            await asyncio.wait_for(main.new_frame.wait(), 10)
        write(out, "pong.json", next(t for t, m in main.frames if isinstance(m, dict) and m.get("type") == "pong"))
        for kind in ("get_config", "get_services", "get_states"):  # ids 3, 4, 5
            text, _ = await main.request({"type": kind})
            write(out, f"{kind}_result.json", text)
        entities_id = main.next_id  # 6
        text, _ = await main.request({"type": "subscribe_entities"})
        write(out, "subscribe_entities_result.json", text)
        registered_id = main.next_id  # 7
        await main.request({"type": "subscribe_events", "event_type": "service_registered"})
        removed_id = main.next_id  # 8
        await main.request({"type": "subscribe_events", "event_type": "service_removed"})
        await asyncio.sleep(0.5)

        async def call(domain: str, service: str, data: dict) -> str:
            text, _ = await main.request({"type": "call_service", "domain": domain, "service": service, "service_data": data})
            await asyncio.sleep(0.4)
            return text

        first = await call("input_boolean", "toggle", {"entity_id": "input_boolean.kitchen"})
        write(out, "call_service_result.json", first)
        await call("input_number", "set_value", {"entity_id": "input_number.living_temp", "value": 23.4})
        await call("input_select", "select_option", {"entity_id": "input_select.house_mode", "option": "away"})
        await call("input_number", "set_value", {"entity_id": "input_number.kitchen_brightness", "value": 200})
        await call("cover", "open_cover", {"entity_id": "cover.garage_door"})
        await call("lock", "unlock", {"entity_id": "lock.front_door"})
        await call("switch", "turn_on", {"entity_id": "switch.coffee_maker"})
        await call("input_button", "press", {"entity_id": "input_button.doorbell"})
        await asyncio.sleep(0.6)
        await call("script", "say_hello", {})
        await asyncio.sleep(1.0)
        for note, (method, path, body) in [
            ("state change", ("POST", "/api/states/sensor.edge_probe", {"state": "3", "attributes": {"unit_of_measurement": "W", "friendly_name": "Edge probe"}})),
            ("attribute-only change", ("POST", "/api/states/sensor.edge_probe", {"state": "3", "attributes": {"unit_of_measurement": "W", "friendly_name": "Edge probe", "phase": "L1"}})),
            ("attribute removed", ("POST", "/api/states/sensor.edge_probe", {"state": "3", "attributes": {"unit_of_measurement": "W", "friendly_name": "Edge probe"}})),
            ("created", ("POST", "/api/states/sensor.edge_created_later", {"state": "hello"})),
            ("removed", ("DELETE", "/api/states/sensor.edge_created_later", None)),
        ]:
            main.note(f"REST {method} {path} {json.dumps(body, ensure_ascii=False) if body else ''} ({note})".replace("  ", " "))
            await rest(method, path, body)
            await asyncio.sleep(0.4)
        # a script added to scripts.yaml + script.reload, then removed again
        scripts = os.path.join(peer_dir, "scripts.yaml")
        original = open(scripts, encoding="utf-8").read()
        with open(scripts, "a", encoding="utf-8") as f:
            f.write("\nadded_at_runtime:\n  alias: Added at runtime\n  sequence: []\n")
        await call("script", "reload", {})
        await asyncio.sleep(1.0)
        with open(scripts, "w", encoding="utf-8") as f:
            f.write(original)
        await call("script", "reload", {})
        await asyncio.sleep(1.5)
        await main.close()

        initial, *later = main.events(entities_id)
        write(out, "subscribe_entities_initial.json", initial)
        write_lines(out, "subscribe_entities_events.jsonl", later)
        write_lines(out, "state_changed_events.jsonl", main.events(1))
        reg, rem = main.events(registered_id), main.events(removed_id)
        if reg:
            write(out, "service_registered_event.json", reg[0])
        if rem:
            write(out, "service_removed_event.json", rem[0])
        write_transcript(out, "transcript_main.jsonl", main)
        summary["state_changed_events"] = len(main.events(1))
        summary["subscribe_entities_events"] = len(later)
        summary["state_changed_entities"] = sorted({json.loads(t)["event"]["data"]["entity_id"] for t in main.events(1)})
        summary["entities"] = sorted(json.loads(initial)["event"]["a"])

        # ---- coalesced frames: supported_features, then a burst of changes
        co = Conn(http, ws_url, token)
        await co.open()
        text, _ = await co.request({"type": "supported_features", "features": {"coalesce_messages": 1}})
        write(out, "supported_features_result.json", text)
        await co.request({"type": "subscribe_events", "event_type": "state_changed"})
        for i in range(60):
            await co.request({"type": "call_service", "domain": "input_number", "service": "set_value",
                              "service_data": {"entity_id": "input_number.load", "value": i + 1}}, wait=False)
        await asyncio.sleep(2.0)
        await co.close()
        write_lines(out, "coalesced_frames.jsonl", [t for t, _ in co.frames])
        summary["coalesced_array_frames"] = sum(1 for t, _ in co.frames if t.startswith("["))

        # ---- filtered subscribe_entities (server-side include/exclude, HA >= 2024.9)
        fl = Conn(http, ws_url, token)
        await fl.open()
        fl.next_id = 3
        req = {"type": "subscribe_entities", "include": {"domains": ["light"], "entity_globs": ["sensor.temp*"]},
               "exclude": {"domains": ["automation"]}}
        write(out, "subscribe_entities_filtered_request.json", json.dumps({"id": 3, **req}, **COMPACT))
        text, res = await fl.request(req)
        write(out, "subscribe_entities_filtered_result.json", text)
        if res.get("success"):
            await asyncio.sleep(0.5)
            for method, path, body in [
                ("POST", "/api/states/sensor.temp_probe", {"state": "20.5", "attributes": {"unit_of_measurement": "°C", "friendly_name": "Temp probe"}}),
                ("POST", "/api/states/sensor.temp_probe", {"state": "21.0", "attributes": {"unit_of_measurement": "°C", "friendly_name": "Temp probe"}}),
                ("POST", "/api/states/sensor.temp_probe", {"state": "21.0", "attributes": {"unit_of_measurement": "°C", "friendly_name": "Temp probe"}}),
                ("POST", "/api/states/sensor.temp_probe", {"state": "21.0", "attributes": {"unit_of_measurement": "°C", "friendly_name": "Temp probe", "battery": 90}}),
                ("POST", "/api/states/sensor.other_probe", {"state": "1"}),
                ("POST", "/api/services/homeassistant/toggle", {"entity_id": "input_boolean.kitchen"}),
                ("POST", "/api/services/light/turn_on", {"entity_id": "light.kitchen", "brightness": 100}),
                ("POST", "/api/services/input_button/press", {"entity_id": "input_button.doorbell"}),
                ("DELETE", "/api/states/sensor.temp_probe", None),
                ("DELETE", "/api/states/sensor.other_probe", None),
            ]:
                fl.note(f"REST {method} {path}" + (f" {json.dumps(body, ensure_ascii=False)}" if body else ""))
                await rest(method, path, body)
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)
            fev = fl.events(3)
            write(out, "subscribe_entities_filtered_initial.json", fev[0])
            write_lines(out, "subscribe_entities_filtered_events.jsonl", fev[1:])
            summary["filtered_initial_entities"] = sorted(json.loads(fev[0])["event"]["a"])
        await fl.close()
        write_transcript(out, "subscribe_entities_filtered_transcript.jsonl", fl)

        # ---- restart: what a subscriber sees
        rs = Conn(http, ws_url, token)
        await rs.open()
        await rs.request({"type": "subscribe_events"})
        rs.note("REST POST /api/services/homeassistant/restart")
        t0 = time.time()
        try:
            await rest("POST", "/api/services/homeassistant/restart", {})
        except aiohttp.ClientError as err:  # HA may go down before it answers
            rs.note(f"REST answer lost: {err}")
        try:
            await asyncio.wait_for(rs.closed.wait(), 60)
        except asyncio.TimeoutError:
            rs.note("no close within 60 s")
        summary["restart_close"] = rs.close_info
        summary["restart_seconds_to_close"] = round(time.time() - t0, 3)
        write_transcript(out, "restart_transcript.jsonl", rs)
        write_lines(out, "restart_events_before_close.jsonl", [t for t, _ in rs.frames])
        rs.reader.cancel()

    with open(os.path.join(out, "capture_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(json.dumps(summary, ensure_ascii=False)[:2000], file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2])))
