"""Small steps run.sh needs around the sessions (run with the wsclients venv's Python: aiohttp; and
tests/lib on PYTHONPATH, for ha_ws).

  helper.py nonadmin HA_URL HA_TOKEN          print a fresh access token of a non-admin user
                                              (made over HA's WebSocket once; reused by later runs)
  helper.py origin URL                        a raw WebSocket handshake of /api/websocket with a
                                              foreign Origin and with the target's own: PASS/FAIL
  helper.py status URL [TOKEN]                print GET /status's `websocket_api` key (INFO line)
"""
from __future__ import annotations

import asyncio
import json
import sys

import aiohttp

from ha_ws import ws_admin  # tests/lib/ha_ws.py (run.sh puts tests/lib on PYTHONPATH)

NONADMIN_NAME = "WS clients non-admin"
NONADMIN_USER, NONADMIN_PASS = "wsclients-nonadmin", "wsclients-nonadmin-password-1"
CLIENT_ID = "http://127.0.0.1/"


async def login(url: str) -> str | None:
    """HA's login flow for the non-admin user; its access token (30 min) or None."""
    async with aiohttp.ClientSession() as s:
        r = await s.post(url + "/auth/login_flow", json={"client_id": CLIENT_ID, "handler": ["homeassistant", None],
                                                         "redirect_uri": CLIENT_ID})
        flow = await r.json()
        r = await s.post(f"{url}/auth/login_flow/{flow['flow_id']}",
                         json={"client_id": CLIENT_ID, "username": NONADMIN_USER, "password": NONADMIN_PASS})
        step = await r.json()
        if step.get("type") != "create_entry":
            return None
        r = await s.post(url + "/auth/token", data={"grant_type": "authorization_code", "code": step["result"],
                                                     "client_id": CLIENT_ID})
        return (await r.json()).get("access_token") if r.status == 200 else None


async def nonadmin(url: str, token: str) -> None:
    tok = await login(url)
    if not tok:
        [lst] = await ws_admin(url, token, [{"type": "config/auth/list"}])
        old = [u for u in lst["result"] if u.get("name") == NONADMIN_NAME]
        if old:
            await ws_admin(url, token, [{"type": "config/auth/delete", "user_id": u["id"]} for u in old])
        [made] = await ws_admin(url, token, [{"type": "config/auth/create", "name": NONADMIN_NAME,
                                              "group_ids": ["system-users"]}])
        assert made["success"], made
        [cred] = await ws_admin(url, token, [{"type": "config/auth_provider/homeassistant/create",
                                              "user_id": made["result"]["user"]["id"],
                                              "username": NONADMIN_USER, "password": NONADMIN_PASS}])
        assert cred["success"], cred
        tok = await login(url)
    assert tok, "no token for the non-admin user"
    print(tok)


async def handshake(url: str, origin: str | None) -> str:
    headers = {"Origin": origin} if origin else {}
    async with aiohttp.ClientSession() as s:
        try:
            async with s.ws_connect(url + "/api/websocket", headers=headers) as ws:
                first = await ws.receive_json(timeout=5)
                return f"101, {first.get('type')}"
        except aiohttp.WSServerHandshakeError as e:
            return str(e.status)


async def origin(url: str) -> int:
    foreign = await handshake(url, "http://evil.example")
    own = await handshake(url, url)
    fails = 0
    for ok, name, got in ((foreign == "403", "WebSocket handshake with a foreign Origin (http://evil.example) is refused 403", foreign),
                          (own == "101, auth_required", "WebSocket handshake with the target's own Origin is accepted (auth_required)", own)):
        print(f"PASS {name}" if ok else f"FAIL {name}: got {got}")
        fails += not ok
    return 1 if fails else 0


async def status(url: str, token: str | None) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/status", headers={"Authorization": f"Bearer {token}"} if token else {}) as r:
            body = await r.json(content_type=None) if r.status == 200 else None
    if body is None:
        print(f"INFO /status: HTTP {r.status}")
    elif "websocket_api" in body:
        print(f"INFO /status websocket_api: {json.dumps(body['websocket_api'], sort_keys=True)}")
    else:
        print("INFO /status has no websocket_api key yet")


def main() -> int:
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "nonadmin":
        asyncio.run(nonadmin(*args))
    elif cmd == "origin":
        return asyncio.run(origin(*args))
    elif cmd == "status":
        asyncio.run(status(*args))
    else:
        sys.exit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
