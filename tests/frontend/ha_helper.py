"""Home Assistant's side of the frontend test (issue 15), always directly against HA with the
peer's admin token (never through hass-edge). Run with the peer venv's Python (aiohttp):

    <peer venv>/bin/python ha_helper.py setup  --url http://127.0.0.1:18160 --token-file DIR/token
    <peer venv>/bin/python ha_helper.py tokens --url ... --token-file ... --client-id http://H:P/ \
        [--since ISO-TIME] [--delete]

`setup`:

1. Finish onboarding. ha-peer.sh only does the `user` step (enough for the REST and
   WebSocket APIs), but HA's frontend sends every page to /onboarding.html until all
   steps are done. The remaining steps (core_config, analytics, integration) are posted
   with the admin token. On a peer without internet, core_config answers 500: it marks
   the step done and then fails to start the flows of met/google_translate/radio_browser
   (their Python packages are not installed); the step list read back afterwards is what
   counts. integration answers 403 for a long-lived token (no login credential to make
   an auth code from), also after marking its step done.
2. Create (or keep) the storage-mode dashboard URL_PATH and save its config: one view
   with an entities card holding input_boolean.kitchen and light.kitchen; read it back.

   Prints one JSON line: {"dashboard", "view_path", "card_title", "entities", "created",
   "onboarding_posted"}.

`tokens`: the refresh tokens of the admin token's user (the peer's one user, `edge`, whom the
browser logs in as) whose client_id is CLIENT_ID (created at or after --since, if given), as HA's `auth/refresh_tokens` lists them
(auth_provider_type, last_used_ip: the client address HA saw), one JSON list; with --delete
they are removed afterwards, so that test runs do not pile up logins.

Exit 0 = done, 1 = failed (the reason on stderr). Every request has a limit (--timeout,
default 20 s each).
"""

import argparse
import asyncio
import json
import sys
from datetime import datetime

import aiohttp

CARD_TITLE = "Edge test entities"
ENTITIES = ["input_boolean.kitchen", "light.kitchen"]


class Fail(Exception):
    pass


def dashboard_config(title: str) -> dict:
    return {
        "title": title,
        "views": [
            {
                "title": "Edge",
                "path": "0",
                "cards": [
                    {"type": "entities", "title": CARD_TITLE, "entities": list(ENTITIES)},
                    # the state as text ("On"/"Off"), beside the toggles' switches
                    {"type": "entity", "entity": "light.kitchen"},
                ],
            }
        ],
    }


async def onboarding(session: aiohttp.ClientSession, url: str, headers: dict) -> list:
    async def steps() -> dict:
        async with session.get(url + "/api/onboarding") as resp:
            # HA registers the onboarding views only while onboarding is unfinished
            if resp.status == 404:
                return {"all": True}
            if resp.status != 200:
                raise Fail(f"GET /api/onboarding: HTTP {resp.status} {await resp.text()}")
            return {s["step"]: s["done"] for s in await resp.json()}

    before = await steps()
    if before == {"all": True}:
        return []
    if not before.get("user"):
        raise Fail(f"the peer has no user yet (onboarding steps: {before}): start it with ha-peer.sh")
    posted = []
    bodies = {
        "core_config": {},
        "analytics": {},
        # HA checks client_id/redirect_uri only after marking the step done
        "integration": {"client_id": url + "/", "redirect_uri": url + "/?auth_callback=1"},
    }
    for step, body in bodies.items():
        if before.get(step, True):
            continue
        async with session.post(f"{url}/api/onboarding/{step}", json=body, headers=headers) as resp:
            posted.append(f"{step}: HTTP {resp.status}")
    after = await steps()
    if not all(after.values()):
        raise Fail(f"onboarding is still not finished after posting {posted}: {after}")
    return posted


async def ws_call(ws, msg_id: int, payload: dict, timeout: float) -> dict:
    await ws.send_json(dict(payload, id=msg_id))
    while True:
        msg = await ws.receive_json(timeout=timeout)
        if msg.get("id") == msg_id:
            return msg


class Ws:
    """One authenticated WebSocket connection to HA; call() returns a command's result."""

    def __init__(self, ws, timeout: float):
        self.ws, self.timeout, self.n = ws, timeout, 0

    @classmethod
    async def connect(cls, session: aiohttp.ClientSession, url: str, token: str, timeout: float):
        ws = await session.ws_connect("ws" + url[len("http"):] + "/api/websocket", heartbeat=None)
        hello = await ws.receive_json(timeout=timeout)
        if hello.get("type") != "auth_required":
            raise Fail(f"WebSocket: expected auth_required, got {hello}")
        await ws.send_json({"type": "auth", "access_token": token})
        ok = await ws.receive_json(timeout=timeout)
        if ok.get("type") != "auth_ok":
            raise Fail(f"WebSocket auth failed: {ok}")
        return cls(ws, timeout)

    async def call(self, payload: dict):
        self.n += 1
        msg = await ws_call(self.ws, self.n, payload, self.timeout)
        if not msg.get("success"):
            raise Fail(f"{payload['type']}: {msg.get('error')}")
        return msg.get("result")


async def setup(args, session, url, token) -> dict:
    headers = {"Authorization": f"Bearer {token}"}
    posted = await onboarding(session, url, headers)
    ws = await Ws.connect(session, url, token, args.timeout)
    try:
        boards = await ws.call({"type": "lovelace/dashboards/list"})
        existing = [b for b in boards if b.get("url_path") == args.dashboard]
        created = False
        if not existing:
            await ws.call({
                "type": "lovelace/dashboards/create",
                "url_path": args.dashboard,
                "title": args.title,
                "mode": "storage",
                "require_admin": False,
                "show_in_sidebar": True,
            })
            created = True
        else:
            board = existing[0]
            if board.get("mode") != "storage" or board.get("require_admin"):
                raise Fail(f"dashboard {args.dashboard} exists with other settings: {board}")
        config = dashboard_config(args.title)
        await ws.call({"type": "lovelace/config/save", "url_path": args.dashboard, "config": config})
        back = await ws.call({"type": "lovelace/config", "url_path": args.dashboard, "force": True})
        if back != config:
            raise Fail(f"lovelace/config of {args.dashboard} reads back as {back}, saved {config}")
    finally:
        await ws.ws.close()
    return {
        "dashboard": args.dashboard,
        "view_path": config["views"][0]["path"],
        "card_title": CARD_TITLE,
        "entities": ENTITIES,
        "created": created,
        "onboarding_posted": posted,
    }


async def tokens(args, session, url, token) -> list:
    since = datetime.fromisoformat(args.since.replace("Z", "+00:00")) if args.since else None
    ws = await Ws.connect(session, url, token, args.timeout)
    try:
        found = [t for t in await ws.call({"type": "auth/refresh_tokens"})
                 if t.get("client_id") == args.client_id
                 and (since is None or datetime.fromisoformat(t["created_at"]) >= since)]
        if args.delete:
            for t in found:
                await ws.call({"type": "auth/delete_refresh_token", "refresh_token_id": t["id"]})
    finally:
        await ws.ws.close()
    return found


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["setup", "tokens"])
    ap.add_argument("--url", required=True)
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--dashboard", default="edge-test")
    ap.add_argument("--title", default="Edge test")
    ap.add_argument("--client-id")
    ap.add_argument("--since", help="only tokens created at or after this ISO time (UTC)")
    ap.add_argument("--delete", action="store_true")
    ap.add_argument("--timeout", type=float, default=20)
    args = ap.parse_args()
    url = args.url.rstrip("/")
    with open(args.token_file, encoding="utf-8") as f:
        token = f.read().strip()
    timeout = aiohttp.ClientTimeout(total=args.timeout, connect=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        if args.command == "setup":
            out = await setup(args, session, url, token)
        else:
            if not args.client_id:
                raise Fail("tokens needs --client-id")
            out = await tokens(args, session, url, token)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except Fail as e:
        print(f"frontend: FAIL: ha_helper: {e}", file=sys.stderr)
        sys.exit(1)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
        print(f"frontend: FAIL: ha_helper: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
