"""Auth failures (issue #6), against the real HA peer started with `--ip-ban`
(ip_ban_enabled, login_attempts_threshold 5) and hass-edge with
`[reconnect] max_delay_seconds = 10`.

(a) token revoked while connected: a second long-lived token is made over WS
    (`auth/long_lived_access_token`, with the peer's token); hass-edge runs with it and goes
    live; then its refresh token is deleted (`auth/refresh_tokens` + `auth/delete_refresh_token`).
    hass-edge must end in `auth_failed` (/health `status`).
(b) a wrong token at start: hass-edge must reach `auth_failed`, and over a window (default
    600 s) make at most one auth attempt per max_delay (counted from /metrics
    `hass_edge_auth_failures_total` and from HA's log "invalid authentication" lines), and
    HA must never ban 127.0.0.1 (`ip_bans.yaml` absent, HA still answers the valid token).

During (b) this script makes no WebSocket login of its own (a successful WS login resets HA's
failed-login counter for the address, `http/ban.py` `process_success_login`), so the count
HA keeps is hass-edge's alone. REST calls with the valid token neither count nor reset.

usage: python3 -m hass_edge_tools.reliability.auth [--window SECONDS] [--max-delay S] [--keep-peer]
"""
import argparse
import asyncio
import sys
import time

from hass_edge_tools.client import Http
from hass_edge_tools.peer import Peer
from hass_edge_tools.reliability.common import ensure_venv, make_daemon, make_peer, PORT_BASE, Report, VERSION
from hass_edge_tools.stats import spread

ensure_venv()
import aiohttp  # noqa: E402

INVALID_LINE = "Login attempt or request with invalid authentication from"


async def ws_commands(url: str, token: str, commands: list[dict]) -> list[dict]:
    """Logs in over WS and runs `commands` in order; returns their result messages."""
    out = []
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url.replace("http://", "ws://") + "/api/websocket") as ws:
            assert (await ws.receive_json())["type"] == "auth_required"
            await ws.send_json({"type": "auth", "access_token": token})
            msg = await ws.receive_json()
            if msg["type"] != "auth_ok":
                raise RuntimeError(f"WS auth: {msg}")
            for i, c in enumerate(commands, 1):
                await ws.send_json({"id": i, **c})
                while True:
                    m = await ws.receive_json(timeout=30)
                    if m.get("id") == i and m.get("type") in ("result", "pong"):
                        out.append(m)
                        break
    return out


def ban_note(failures: int, ha_lines: int) -> str:
    return (f"HA banned 127.0.0.1 after {failures} auth_invalid answers to hass-edge ({ha_lines} of them counted in HA's log). "
            "HA counts each failed WebSocket auth toward login_attempts_threshold with no decay; only a successful login from the same "
            "address resets the count (homeassistant/components/http/ban.py process_wrong_login / process_success_login), so retrying a "
            "rejected token every max_delay gets the address banned whatever max_delay is. HA counts a failure only if the client has "
            "not closed the socket by the time process_wrong_login runs (it sends auth_invalid first, then does a reverse DNS lookup); "
            "hass-edge closes at once, hence fewer counted than sent. After the ban every request from the address answers 403, even "
            "with the valid token, until ip_bans.yaml is removed and HA restarted; hass-edge then reports 'backoff' with "
            "'WebSocket handshake: HTTP error: 403 Forbidden' instead of auth_failed.")


def valid_token_answers(peer: Peer) -> int:
    """HTTP status of GET /api/ with the valid token (403 = banned)."""
    h = Http(peer.url, peer.token, timeout=10)
    try:
        return h.request("GET", "/api/")[0]
    except OSError:
        return 0
    finally:
        h.close()


async def part_a(r: Report, peer: Peer, max_delay: int) -> None:
    r.tried("(a) revoke hass-edge's token while it is connected")
    name = f"hass-edge-rel-{int(time.time())}"
    res = await ws_commands(peer.url, peer.token, [{"type": "auth/long_lived_access_token", "client_name": name, "lifespan": 1}])
    if not r.check(res[0].get("success"), "a second long-lived token is created over WS"):
        return
    token2 = res[0]["result"]
    daemon = make_daemon("auth-a-daemon", peer.url, token2, {"reconnect": {"max_delay_seconds": max_delay}})
    daemon.start()
    try:
        t = await asyncio.to_thread(daemon.wait_live, 60)
        if not r.check(t is not None, "hass-edge goes live with the second token"):
            return
        res = await ws_commands(peer.url, peer.token, [{"type": "auth/refresh_tokens"}])
        tokens = [t for t in res[0]["result"] if t.get("client_name") == name]
        if not r.check(len(tokens) == 1, f"its refresh token is listed ({len(tokens)} named {name})"):
            return
        t0 = time.monotonic()
        res = await ws_commands(peer.url, peer.token, [{"type": "auth/delete_refresh_token", "refresh_token_id": tokens[0]["id"]}])
        r.check(res[0].get("success"), "the refresh token is deleted")
        t = await asyncio.to_thread(daemon.wait_status, "auth_failed", 60)
        r.check(t is not None, f"hass-edge ends in auth_failed after the revocation ({'%.2fs' % t if t is not None else 'not within 60 s'}; last status {daemon.health()[1].get('status')})")
        if t is not None:
            r.figure("(a) revocation -> auth_failed", f"{time.monotonic() - t0:.2f}s")
        # Stays there (one attempt per max_delay), for a little while.
        await asyncio.sleep(3)
        r.check(daemon.health()[1].get("status") == "auth_failed", "still auth_failed a moment later")
        lines = [l for l in daemon.log_text().splitlines() if "rejected" in l or "lost" in l][-3:]
        for l in lines:
            print(f"   log: {l}")
    finally:
        daemon.stop()


async def part_b(r: Report, peer: Peer, window: float, max_delay: int) -> None:
    r.tried(f"(b) wrong token at start; watch {window:.0f}s with max_delay_seconds = {max_delay}")
    ban_file = peer.dir / "ip_bans.yaml"
    r.check(not ban_file.exists(), "no ip_bans.yaml before (b)")
    # A clean failed-login count at HA for 127.0.0.1: one successful WS login resets it.
    await ws_commands(peer.url, peer.token, [{"type": "ping"}])
    log_off = peer.log_size()
    daemon = make_daemon("auth-b-daemon", peer.url, "wrong-token-" + "x" * 40, {"reconnect": {"max_delay_seconds": max_delay}})
    daemon.start()
    t0 = time.monotonic()
    attempt_times: list[float] = []
    statuses: dict[str, int] = {}
    banned_at = None
    last_failures = 0.0
    last_rest = 0.0
    try:
        t = await asyncio.to_thread(daemon.wait_status, "auth_failed", 30)
        r.check(t is not None, f"hass-edge reaches auth_failed with a wrong token ({'%.2fs' % t if t is not None else 'not within 30 s'})")
        while time.monotonic() - t0 < window:
            try:
                m = await asyncio.to_thread(daemon.metrics)
                code, body = await asyncio.to_thread(daemon.health)
            except OSError:
                m, body = {}, {}
            s = body.get("status", "?")
            statuses[s] = statuses.get(s, 0) + 1
            f = m.get("hass_edge_auth_failures_total", last_failures)
            if f > last_failures:
                attempt_times.extend([time.monotonic() - t0] * int(f - last_failures))
                last_failures = f
            now = time.monotonic() - t0
            if banned_at is None and now - last_rest >= 15:
                last_rest = now
                if ban_file.exists() or await asyncio.to_thread(valid_token_answers, peer) == 403:
                    banned_at = now
                    print(f"   127.0.0.1 banned by HA at {now:.0f}s, after {int(last_failures)} failed attempts by hass-edge", flush=True)
            if not daemon.alive():
                break
            await asyncio.sleep(0.5)
        elapsed = time.monotonic() - t0
        m = await asyncio.to_thread(daemon.metrics)
        failures = int(m.get("hass_edge_auth_failures_total", 0))
        reconnects = int(m.get("hass_edge_reconnects_total", 0))
        ha_lines = peer.log_since(log_off).count(INVALID_LINE)
        allowed = int(elapsed // max_delay) + 1
        gaps = [b - a for a, b in zip(attempt_times, attempt_times[1:])]
        r.figure("(b) window", f"{elapsed:.0f}s")
        r.figure("(b) auth failures (hass-edge metric)", failures)
        r.figure("(b) connection attempts that failed (hass_edge_reconnects_total)", reconnects)
        r.figure("(b) invalid-auth lines in HA's log", ha_lines)
        r.figure("(b) gaps between auth attempts", spread(gaps))
        r.figure("(b) /health status samples", statuses)
        r.check(failures <= allowed and reconnects <= allowed, f"at most one attempt per max_delay: {failures} auth failures, {reconnects} attempts in {elapsed:.0f}s (allowed {allowed})")
        r.check(not gaps or min(gaps) >= max_delay * 0.95, f"no two auth attempts closer than max_delay ({max_delay}s): min gap {min(gaps) if gaps else float('nan'):.1f}s")
        r.check(ha_lines <= allowed, f"HA logged {ha_lines} invalid-auth attempts from 127.0.0.1 (allowed {allowed})")
        code = await asyncio.to_thread(valid_token_answers, peer)
        banned = ban_file.exists() or code == 403 or banned_at is not None
        if banned and banned_at is None:
            banned_at = time.monotonic() - t0
        ban_line = next((l for l in peer.log_since(log_off).splitlines() if "Banned IP" in l), "")
        if ban_line:
            r.figure("(b) HA's ban line", ban_line.strip())
        r.check(not banned, "HA never banned 127.0.0.1 (no ip_bans.yaml, the valid token still answers 200)"
                + (f" — banned (seen at {banned_at:.0f}s, after {failures} auth failures by hass-edge); ip_bans.yaml {'present' if ban_file.exists() else 'absent'}; GET /api/ with the valid token: {code}" if banned else ""))
        if banned:
            r.note(ban_note(failures, ha_lines))
            r.figure("(b) hass-edge /health after the ban", daemon.health()[1].get("status"))
            last_err = daemon.status().get("connection", {}).get("last_error")
            r.figure("(b) hass-edge last_error after the ban", last_err)
        r.check(daemon.alive(), "hass-edge still running")
    finally:
        daemon.stop()


async def main_async(args) -> int:
    r = Report("auth")
    peer = make_peer(f"auth-{VERSION}", PORT_BASE + 3, ip_ban=True)
    r.tried(f"start HA {VERSION} on {peer.url} with --ip-ban (login_attempts_threshold 5)")
    if (peer.dir / "ip_bans.yaml").exists():
        await asyncio.to_thread(peer.unban)
    await asyncio.to_thread(peer.start)
    try:
        await part_a(r, peer, args.max_delay)
        await part_b(r, peer, args.window, args.max_delay)
    finally:
        if (peer.dir / "ip_bans.yaml").exists():
            print("   removing HA's ban (ha-peer.sh unban)")
            await asyncio.to_thread(peer.unban)
        if not args.keep_peer:
            await asyncio.to_thread(peer.stop)
    return r.finish()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=float, default=600)
    ap.add_argument("--max-delay", type=int, default=10)
    ap.add_argument("--keep-peer", action="store_true")
    sys.exit(asyncio.run(main_async(ap.parse_args())))


if __name__ == "__main__":
    main()
