#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/seeds/<target>/.

ha_frame: every frame recorded from real Home Assistant in tests/fixtures/<version>/ (each
file, each line of a .jsonl, each received frame of restart_transcript.jsonl), also with the
`id` rewritten to 4 (the id subscribe_entities gets on a fresh connection, so the frame hits
the live subscription), plus a few hand-made frames for paths the recordings miss (removal,
attribute removal, failures, coalesced mixes).
http_request: raw requests like the local API's clients send, and a few refusals.
config: TOML files covering every section, and URLs with user info (issue 13).
entity_id: ids of HA's shape and the bad ones issue 13 found HA can send (NUL, newline,
quotes, `..`, `/`, 10 KB), each also as the id inside an HA frame for ha_frame.
sse_selection: `?entity_id=` lists, then ids to match, one per line.
state_file: a first byte picking the kind of path (0 regular, 1 symlink to it, 2 FIFO,
3 symlink to a FIFO, 4 socket, 5 directory, 6 device), then a state file's bytes.
ws_session: a flags byte (ASCII: "@" hass-edge's token, "A" a user's, "B"/"C" the same
read-only, "D" refused, "H" no get_config yet, "P" a frame before the verdict), then client
frames one per line, the first the auth message; a line "!…" is a batch of mirror changes
(JSON triples, or one canned change per byte); a line "~…" changes the dashboards'
allowlist (per byte a canned state added, or with the high bit removed).

Deterministic; re-run after the fixtures change. tests/fuzz_regressions.rs replays them.
"""
import json
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"
ENTITIES_ID = 4


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


def ha_frames():
    n = 0
    for version in ["2024.3.3", "2025.4.4"]:
        for f in sorted((ROOT / "tests" / "fixtures" / version).iterdir()):
            text = f.read_text()
            stem = f"{version}-{f.stem}"
            frames = []
            if f.name == "restart_transcript.jsonl":
                frames = [json.loads(l)["frame"] for l in text.splitlines() if l.strip() and json.loads(l)["dir"] == "recv"]
            elif f.suffix == ".jsonl":
                frames = [l for l in text.splitlines() if l.strip()]
            else:
                frames = [text.strip()]
            for i, frame in enumerate(frames):
                write("ha_frame", f"{stem}-{i}", frame)
                n += 1
                try:
                    v = json.loads(frame)
                except ValueError:
                    continue
                if isinstance(v, dict) and "id" in v and v["id"] != ENTITIES_ID:
                    v["id"] = ENTITIES_ID
                    write("ha_frame", f"{stem}-{i}-id4", json.dumps(v, separators=(",", ":")))
                    n += 1
    hand = {
        "remove-tracked": {"id": 4, "type": "event", "event": {"r": ["input_boolean.kitchen", "light.nope"]}},
        "add-new-and-excluded": {"id": 4, "type": "event", "event": {"a": {
            "sensor.new": {"s": "1", "a": {"unit_of_measurement": "W", "x": [1, {"y": None}]}, "c": "01ABC", "lc": 1795349249.5},
            "camera.front": {"s": "idle", "a": {}, "c": "01ABD", "lc": 1795349249.5, "lu": 1795349250.25}}}},
        "diff-attr-remove": {"id": 4, "type": "event", "event": {"c": {"input_boolean.kitchen": {
            "+": {"a": {"icon": "mdi:x"}, "lu": 1795349251.000001, "c": {"id": "01X", "parent_id": "01P"}}, "-": {"a": ["friendly_name"]}}}}},
        "diff-unknown-entity": {"id": 4, "type": "event", "event": {"c": {"light.unknown": {"+": {"s": "on"}}}}},
        "diff-bad-timestamp": {"id": 4, "type": "event", "event": {"c": {"input_boolean.kitchen": {"+": {"lc": 1e300}}}}},
        "add-bad-timestamp": {"id": 4, "type": "event", "event": {"a": {"sensor.x": {"s": "1", "c": "c", "lc": -1}}}},
        "result-failed-4": {"id": 4, "type": "result", "success": False, "error": {"code": "invalid_format", "message": "extra keys"}},
        "result-failed-3": {"id": 3, "type": "result", "success": False, "error": {"code": "unknown_error", "message": "x"}},
        "pong": {"id": 1, "type": "pong"},
        "auth-invalid": {"type": "auth_invalid", "message": "Invalid access token or password"},
        "service-registered": {"id": 5, "type": "event", "event": {"event_type": "service_registered", "data": {"domain": "script", "service": "x"}}},
        "get-states-7": {"id": 7, "type": "result", "success": True, "result": [
            {"entity_id": "input_boolean.kitchen", "state": "off", "attributes": {}, "last_changed": "2026-11-22T12:07:28+00:00",
             "last_reported": "2026-11-22T12:07:29.500000+00:00", "last_updated": "2026-11-22T12:07:28.000001+00:00", "context": {"id": "x", "parent_id": None, "user_id": None}}]},
    }
    for name, v in hand.items():
        write("ha_frame", f"hand-{name}", json.dumps(v, separators=(",", ":")))
        n += 1
    coalesced = [hand["add-new-and-excluded"], hand["diff-attr-remove"], hand["remove-tracked"], hand["pong"]]
    write("ha_frame", "hand-coalesced-mix", json.dumps(coalesced, separators=(",", ":")))
    write("ha_frame", "hand-not-json", "{\"id\":4,\"type\":\"event\",\"event\":{\"a\":")
    return n + 2


def http_requests():
    reqs = {
        "get-health": "GET /health HTTP/1.1\r\nHost: 127.0.0.1:8124\r\n\r\n",
        "get-states-keepalive": "GET /api/states HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nAuthorization: Bearer abcdefghijklmnop\r\n\r\n",
        "get-state-refresh": "GET /api/states/light.kitchen?refresh=true HTTP/1.1\r\nHost: x\r\n\r\n",
        "head-metrics-http10": "HEAD /metrics HTTP/1.0\r\n\r\n",
        "stream-query": "GET /api/stream?entity_id=light.,switch.kitchen,sensor.*&snapshot=1&access_token=a%20b%2Bc HTTP/1.1\r\nHost: x\r\nOrigin: http://localhost:3000\r\n\r\n",
        "post-service": "POST /api/services/light/turn_on HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 31\r\n\r\n{\"entity_id\": \"light.kitchen\"}\n",
        "options-preflight": "OPTIONS /api/states HTTP/1.1\r\nOrigin: http://a.b\r\nAccess-Control-Request-Method: GET\r\n\r\n",
        "chunked": "POST /api/services/a/b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "conflicting-length": "POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        "bad-length": "POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        "huge-length": "POST /x HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        "absolute-target": "GET http://example.com/health HTTP/1.1\r\n\r\n",
        "partial": "GET /health HTTP/1.1\r\nHost: 127.0",
        "percent-query": "GET /api/states?%ZZ=%&&=&a=%E2%82%AC+x HTTP/1.1\r\n\r\n",
        "many-headers": "GET / HTTP/1.1\r\n" + "".join(f"X-{i}: {i}\r\n" for i in range(60)) + "\r\n",
        "pipelined": "GET /health HTTP/1.1\r\n\r\nGET /status HTTP/1.1\r\n\r\n",
    }
    for name, r in reqs.items():
        write("http_request", name, r)
    return len(reqs)


def configs():
    cfgs = {
        "minimal.toml": '[ha]\nurl = "http://127.0.0.1:8123"\ntoken_file = "/tmp/token"\n',
        "full.toml": """[ha]
url = "https://ha.example:8443/prefix/"
token_file = "/etc/hass-edge/token"
ca_file = "/etc/hass-edge/ca.pem"

[filter]
enabled = true
include_prefixes = ["light.", "sensor.living_"]
exclude_domains = ["camera", "media_player"]

[cache]
mode = "invalidate"
max_entities = 1000
ttl_seconds = 5
negative_ttl_seconds = 60
persist = true
state_file = "/var/lib/hass-edge/states.json"
persist_interval_seconds = 900

[reconnect]
max_attempts = 0
max_delay_seconds = 10

[heartbeat]
interval_seconds = 5
timeout_seconds = 3

[http]
listen = "127.0.0.1:18124"
api_token_file = "/etc/hass-edge/api-token"
allow_service_calls = false
cors_origins = ["http://localhost:3000", "https://panel.example"]

[dbus]
bus = "none"
entity_signals = true

[log]
level = "debug"
""",
        "bad-key.toml": '[cache]\nmax_entitys = 5\n',
        "bad-range.toml": '[heartbeat]\ninterval_seconds = 0\n[cache]\nmax_entities = 0\n',
        "ipv6-listen.toml": '[http]\nlisten = "[::1]:8124"\n[ha]\nurl = "http://[::1]:8123"\n',
        "empty.toml": "",
        "no-persist.toml": '[cache]\npersist = false\nstate_file = ""\n',
        "bad-persist.toml": '[cache]\npersist = true\nstate_file = "/"\n',
        "url-ftp-userinfo.toml": '[ha]\nurl = "ftp://user:pass@host"\n',
        "url-userinfo.toml": '[ha]\nurl = "http://user:pass@host:8123"\n',
        "url-slash-password.toml": '[ha]\nurl = "http://user:pa/ss@host"\n',
        "url-space.toml": '[ha]\nurl = "http://user:pass@ho st"\n',
        "url-no-scheme.toml": '[ha]\nurl = "user:pass@host:8123"\n',
        "cors-userinfo.toml": '[http]\ncors_origins = ["http://u:p@kiosk.local"]\n',
    }
    for name, c in cfgs.items():
        write("config", name, c)
    return len(cfgs)


BAD_IDS = {
    "nul": "light.a\u0000b",
    "newline": "light.a\nb",
    "quote": 'light.a"b',
    "single-quote": "light.a'b",
    "dotdot": "light..kitchen",
    "traversal": "light.x/../../etc",
    "slash": "light/kitchen",
    "10k": "sensor." + "x" * 10240,
    "upper": "Light.Kitchen",
    "space": "light.a b",
    "no-dot": "light",
    "two-dots": "light.a.b",
    "empty-object": "light.",
    "unicode": "light.k\u00fcche",
    "dbus-path": "/io/hassedge/HassEdge1",
}


def entity_ids():
    ids = dict(BAD_IDS)
    ids.update({"good": "light.kitchen_2", "good-255": "sensor." + "a" * 248, "good-256": "sensor." + "a" * 249})
    for name, i in ids.items():
        write("entity_id", name, i)
    # The same ids inside the frames HA sends, for ha_frame: added, changed, removed.
    for name, i in BAD_IDS.items():
        add = {"id": 4, "type": "event", "event": {"a": {i: {"s": "on", "a": {}, "c": "01C", "lc": 1795349249.5}}}}
        change = {"id": 4, "type": "event", "event": {"c": {i: {"+": {"s": "off"}}}}}
        remove = {"id": 4, "type": "event", "event": {"r": [i]}}
        write("ha_frame", f"hand-bad-id-{name}-add", json.dumps(add, separators=(",", ":")))
        write("ha_frame", f"hand-bad-id-{name}-mix", json.dumps([add, change, remove], separators=(",", ":")))
        states = {"id": 4, "type": "result", "success": True, "result": [
            {"entity_id": i, "state": "on", "attributes": {}, "last_changed": "2026-11-22T12:07:28+00:00",
             "last_updated": "2026-11-22T12:07:28+00:00", "context": {"id": "x", "parent_id": None, "user_id": None}}]}
        write("ha_frame", f"hand-bad-id-{name}-get-states", json.dumps(states, separators=(",", ":")))
    return len(ids)


def selections():
    sels = {
        "empty": "\nlight.kitchen\n",
        "prefixes": "light.,switch.kitchen,sensor.temp*\nlight.kitchen\nswitch.kitchen\nswitch.kitchen_2\nsensor.temperature\nsensor.humidity",
        "spaces": " light. , ,switch.a ,\nlight.x\nswitch.a",
        "stars": "*,**,light.**,*.\nlight.*x\nanything",
        "dot-and-star": ".,.*,light.*.\nlight.\n.",
        "exact-vs-prefix": "light.kitchen,light.kitchen.\nlight.kitchen\nlight.kitchen.x\nlight.kitchen_2",
        "commas": ",,,\nlight.a",
        "unicode": "l\u00edght.,\u2003light.b\u2003\nl\u00edght.x\nlight.b",
        "many": ",".join(f"sensor.s{i}" for i in range(2700)) + "\nsensor.s1\nsensor.s2699\nsensor.s27000",
    }
    for name, s in sels.items():
        write("sse_selection", name, s)
    return len(sels)


def state_files():
    body = [{"entity_id": "light.kitchen", "state": "on", "attributes": {"friendly_name": "Kitchen"},
             "last_changed": "2026-11-22T12:07:28+00:00", "last_updated": "2026-11-22T12:07:28+00:00",
             "context": {"id": "01C", "parent_id": None, "user_id": None}}]
    raw = json.dumps(body, separators=(",", ":")).encode()
    saved_at_us, count, length = 1795349249123456, 1, len(raw)
    import struct
    import zlib
    crc = zlib.crc32(struct.pack("<qQQ", saved_at_us, count, length) + raw)
    header = (f'{{"format":"hass-edge-states","version":1,"saved_at_us":{saved_at_us},'
              f'"count":{count},"length":{length},"crc32":{crc}}}\n').encode()
    good = header + raw + b"\n"
    files = {
        "regular-good": b"\x00" + good,
        "symlink-good": b"\x01" + good,
        "regular-torn": b"\x00" + good[: len(good) // 2],
        "regular-bad-crc": b"\x00" + good.replace(b"Kitchen", b"Kitchem"),
        "regular-newer": b"\x00" + good.replace(b'"version":1', b'"version":2'),
        "regular-empty": b"\x00",
        "regular-small-limit": b"\x00\x01" + good,
        "fifo": b"\x02" + good,
        "symlink-fifo": b"\x03",
        "socket": b"\x04",
        "directory": b"\x05",
        "device": b"\x06",
    }
    for name, data in files.items():
        write("state_file", name, data)
    return len(files)


def ws_sessions():
    def j(v):
        return json.dumps(v, separators=(",", ":"))
    auth = j({"type": "auth", "access_token": "abcdefghijklmnop"})
    state = {"state": "on", "attributes": {"friendly_name": "Kitchen", "brightness": 255},
             "last_changed": "2026-11-22T12:07:28+00:00", "last_updated": "2026-11-22T12:07:28.000001+00:00",
             "context": {"id": "01C1", "parent_id": None, "user_id": None}}
    dimmed = dict(state, state="off", attributes={"friendly_name": "Kitchen"},
                  last_updated="2026-11-22T12:07:40.250000+00:00", context={"id": "01C9", "parent_id": "01P", "user_id": "u"})
    changes = "!" + j([["light.kitchen", state, dimmed, [1795349249.5, 1795349260.25]],
                       ["switch.new", None, dimmed], ["light.kitchen", state, None],
                       ["sensor.noisy_2", state, dimmed], ["light.kitchen", state, state],
                       ['light.q"uote', None, dict(state, attributes={"x\n": "\u2028"})]])
    sessions = {
        "edge-local": ["@", auth,
                       j({"id": 1, "type": "supported_features", "features": {"coalesce_messages": 1}}),
                       j({"id": 2, "type": "get_states"}), j({"id": 3, "type": "get_config"}),
                       j({"id": 4, "type": "ping"}), j({"id": 5, "type": "subscribe_entities"}),
                       "!\x00\x01\x02\x03\x41\x82\xc0",
                       j({"id": 6, "type": "subscribe_events", "event_type": "state_changed"}),
                       j({"id": 7, "type": "subscribe_entities", "entity_ids": ["switch.fan", "light.kitchen"]}),
                       j({"id": 8, "type": "subscribe_entities", "entity_ids": "Light.Kitchen, switch.fan"}),
                       changes,
                       j({"id": 9, "type": "unsubscribe_events", "subscription": 6}),
                       j({"id": 10, "type": "unsubscribe_events", "subscription": 5}), changes,
                       j({"id": 11, "type": "get_services"}), j({"id": 12, "type": "config/area_registry/list"})],
        "user-forward": ["A", auth,
                         j({"id": 1, "type": "call_service", "domain": "light", "service": "toggle",
                            "service_data": {"entity_id": "light.kitchen"}}),
                         j({"id": 2, "type": "render_template", "template": "{{ 1 }}"}),
                         j({"id": 3, "type": "subscribe_events", "event_type": "lovelace_updated"}),
                         j({"id": 4, "type": "subscribe_events"}),
                         j({"id": 5, "type": "unsubscribe_events", "subscription": 3}),
                         j({"id": 6, "type": "subscribe_entities", "entity_ids": ["camera.door"]}),
                         j({"id": 7, "type": "subscribe_entities", "include": {"domains": ["light"]}}),
                         j({"id": 8, "type": "get_states", "extra": 1}),
                         j({"id": 9, "type": "config/entity_registry/list_for_display"}),
                         j({"id": 10, "type": "unsubscribe_events", "subscription": 999})],
        "read-only-edge": ["B", auth,
                           j({"id": 1, "type": "call_service", "domain": "light", "service": "toggle"}),
                           j({"id": 2, "type": "unsubscribe_events", "subscription": 1}),
                           j({"id": 3, "type": "ping"}), j({"id": 4, "type": "get_services"})],
        "read-only-user": ["C", auth,
                           j({"id": 1, "type": "call_service", "domain": "light", "service": "toggle"})],
        "ids-and-formats": ["@", auth, j({"id": 5, "type": "ping"}), j({"id": 5, "type": "ping"}),
                            j({"id": 4, "type": "ping"}), j({"id": 0, "type": "ping"}), j({"id": "7", "type": "ping"}),
                            '{"id":7.5,"type":"ping"}', '{"id":-1,"type":"ping"}', '{"id":1e2,"type":"ping"}',
                            j({"id": 7}), j({"id": 8, "type": ""}), j({"type": "ping"}), "[1]", "[]", "null", "5", '"x"',
                            j([{"id": 9, "type": "ping"}, {"id": 9, "type": "ping"}, {"id": 10, "type": "get_states"},
                               [{"id": 11}], {"id": 18446744073709551615, "type": "ping"}]),
                            j({"id": 12, "type": "ping"})],
        "bad-auth": ["@", j({"type": "auth", "api_password": "x"}), j({"id": 1, "type": "ping"})],
        "auth-extra-key": ["@", j({"type": "auth", "access_token": "t", "id": 1})],
        "auth-not-json": ["@", "{", j({"id": 1, "type": "ping"})],
        "refused": ["D", auth, j({"id": 1, "type": "ping"})],
        "early-frame": ["P", auth, j({"id": 2, "type": "ping"})],
        "no-config": ["H", auth, j({"id": 1, "type": "get_config"}), j({"id": 2, "type": "get_config", "x": 1})],
        "invalid-json-closes": ["@", auth, j({"id": 1, "type": "subscribe_entities"}), "{\"id\":2,", "!\x00",
                                j({"id": 3, "type": "ping"})],
        "features-odd": ["@", auth, j({"id": 1, "type": "supported_features", "features": {"coalesce_messages": "1"}}),
                         j({"id": 2, "type": "supported_features", "features": []}),
                         j({"id": 3, "type": "supported_features"}),
                         j({"id": 4, "type": "supported_features", "features": {"coalesce_messages": 1.5, "x": -1}})],
        "subscribe-ids-odd": ["@", auth, j({"id": 1, "type": "subscribe_entities", "entity_ids": []}),
                              j({"id": 2, "type": "subscribe_entities", "entity_ids": ""}),
                              j({"id": 3, "type": "subscribe_entities", "entity_ids": ["light..x"]}),
                              j({"id": 4, "type": "subscribe_entities", "entity_ids": [1]}),
                              j({"id": 5, "type": "subscribe_entities", "entity_ids": ["light.nope"]}),
                              j({"id": 6, "type": "subscribe_events", "event_type": "state_changed", "x": 1}),
                              "!\x00\x40\x80\xc0\x03", changes,
                              j({"id": 7, "type": "unsubscribe_events", "subscription": 1}),
                              j({"id": 8, "type": "unsubscribe_events", "subscription": 1}), changes],
        "allowlist-change": ["@", auth, j({"id": 1, "type": "subscribe_entities"}),
                             j({"id": 2, "type": "subscribe_entities", "entity_ids": []}),
                             j({"id": 3, "type": "subscribe_entities", "entity_ids": ["switch.fan"]}),
                             j({"id": 4, "type": "subscribe_events", "event_type": "state_changed"}),
                             "~\x00\x01\x83", "~\x82", "~\x03\x03",
                             j({"id": 5, "type": "unsubscribe_events", "subscription": 1}), "~\x00\x81"],
    }
    for name, lines in sessions.items():
        flags, frames = lines[0], lines[1:]
        # "\xNN" in a changes or allowlist line stands for that byte.
        data = flags.encode() + b"\n".join(
            f.encode("latin-1").decode("unicode_escape").encode("latin-1") if (f.startswith("!") and not f.startswith("![")) or f.startswith("~")
            else f.encode() for f in frames)
        write("ws_session", name, data)
    return len(sessions)


def main():
    for t in ["ha_frame", "http_request", "config", "entity_id", "sse_selection", "state_file", "ws_session"]:
        shutil.rmtree(SEEDS / t, ignore_errors=True)
    counts = {"ha_frame": ha_frames(), "http_request": http_requests(), "config": configs(),
              "entity_id": entity_ids(), "sse_selection": selections(), "state_file": state_files(),
              "ws_session": ws_sessions()}
    for t, n in counts.items():
        print(f"{t}: {n} seeds in {SEEDS / t}")


if __name__ == "__main__":
    main()
