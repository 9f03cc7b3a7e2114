"""ha_ws — Home Assistant's WebSocket API as the Python harnesses use it to set HA up and read it
back, directly against HA with an admin token (never the thing under test): tests/clients/compare.py,
tests/wsclients/helper.py, tests/frontend/ha_helper.py and measure/kiosk/entities.py. Needs aiohttp,
which each of their Pythons has (the clients and wsclients venvs, the HA peer's venv).

Imported as a plain module: the harnesses' run.sh put this folder on PYTHONPATH (lib.sh's
PYTHONPATH_LIB); to run one of those scripts by hand, do the same:

    PYTHONPATH=tests/lib <venv>/bin/python tests/frontend/ha_helper.py setup --url ... --token-file ...

The shell side of the harnesses is tests/lib.sh, the Node side tests/lib/harness.mjs.
"""
from __future__ import annotations

import aiohttp


class Fail(Exception):
    """A step against HA failed; the message says which (the scripts print it and exit 1)."""


async def ws_admin(url: str, token: str, frames: list[dict]) -> list[dict]:
    """One WebSocket connection to HA at URL (http://host:port) authenticated with TOKEN; sends
    each of FRAMES (ids 1, 2, … added) after the previous one's result came, and returns the
    `result` messages in order (success or not: the caller looks). Fails by assert when HA does
    not answer auth_required / auth_ok."""
    out = []
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url + "/api/websocket") as ws:
            assert (await ws.receive_json())["type"] == "auth_required"
            await ws.send_json({"type": "auth", "access_token": token})
            m = await ws.receive_json()
            assert m["type"] == "auth_ok", m
            for i, f in enumerate(frames, 1):
                await ws.send_json(dict(f, id=i))
                while True:
                    m = await ws.receive_json()
                    if m.get("id") == i and m["type"] == "result":
                        out.append(m)
                        break
    return out


class Ws:
    """One authenticated WebSocket connection to HA; call() returns a command's result. Every
    receive waits at most `timeout` seconds (asyncio.TimeoutError beyond)."""

    def __init__(self, ws, timeout: float):
        self.ws, self.timeout, self.n = ws, timeout, 0

    @classmethod
    async def connect(cls, session: aiohttp.ClientSession, url: str, token: str, timeout: float = 20):
        """HA at URL (http://host:port), auth with TOKEN; Fail when HA does not say auth_ok."""
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
        """Sends PAYLOAD (the next id added), waits for the message with that id; its `result`,
        or Fail("TYPE: ERROR") when HA answered success false."""
        self.n += 1
        await self.ws.send_json(dict(payload, id=self.n))
        while True:
            msg = await self.ws.receive_json(timeout=self.timeout)
            if msg.get("id") == self.n:
                break
        if not msg.get("success"):
            raise Fail(f"{payload['type']}: {msg.get('error')}")
        return msg.get("result")

    async def save_dashboard(self, config: dict, url_path: str | None = None) -> None:
        """Saves CONFIG as the storage-mode config of dashboard URL_PATH (None: HA's default
        dashboard, `lovelace`) and reads it back (lovelace/config, force); Fail when it differs."""
        where = {"url_path": url_path} if url_path is not None else {}
        await self.call({"type": "lovelace/config/save", **where, "config": config})
        back = await self.call({"type": "lovelace/config", **where, "force": True})
        if back != config:
            raise Fail(f"lovelace/config of {url_path or 'the default dashboard'} reads back as {back}, saved {config}")
