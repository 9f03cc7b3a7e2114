#!/usr/bin/env python3
"""Helpers for tests/ha-peer/{install.sh,ha-peer.sh}.

Run with the Python of a Home Assistant venv made by install.sh (it needs
aiohttp, which HA depends on).  Subcommands:

  requirements CONFIG_YAML      print the pip requirements HA would install on
                                first start for that configuration (manifest
                                closure, HA's own rules), one per line
  onboard --url U --dir D       onboarding without a browser; writes D/token
  wait-running --url U --token-file F [--supervisor-pid-file P]
               [--hass-pid-file H --not-pid N] [--timeout S]
               [--log-file L --log-offset BYTES]
                                block until WS get_config says RUNNING
  call-restart --url U --token-file F
                                POST /api/services/homeassistant/restart
  check-config --dir D --port P parse D/configuration.yaml like HA does
  promote-http --url U --token-file F
                                HA >= 2026.x keeps the http: config it migrated
                                from YAML as "pending" and, unless promoted
                                within 5 min, restarts with the stable one
                                (0.0.0.0:8123): promote it (WS http/config/promote);
                                a no-op on older HA or when nothing is pending

Exit codes: 0 ok, 1 failure (message on stderr), 2 usage, 3 timeout,
4 token rejected, 5 HA (its supervisor) exited while we waited.
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import re
import sys
import time

EXIT_FAIL, EXIT_TIMEOUT, EXIT_AUTH, EXIT_DIED = 1, 3, 4, 5

ONBOARD_USER = {
    # person.edge_tester comes from this name (as in shared/ha-captures).
    "name": "Edge Tester",
    "username": "edge",
    "password": "edge-tester-password",
    "language": "en",
}


def log(msg: str) -> None:
    print(f"[peer.py] {msg}", file=sys.stderr, flush=True)


class Fail(Exception):
    def __init__(self, msg: str, code: int = EXIT_FAIL):
        super().__init__(msg)
        self.code = code


# --------------------------------------------------------------------------
# requirements: what HA would pip-install on first start
# --------------------------------------------------------------------------

# Fallbacks if HA's source cannot be parsed (values of 2024.3.3).
_FALLBACK = {
    "CORE_INTEGRATIONS": {"homeassistant", "persistent_notification"},
    "LOGGING_INTEGRATIONS": {"logger", "system_log"},
    "FRONTEND_INTEGRATIONS": {"frontend"},
    "DEFAULT_INTEGRATIONS": {
        "application_credentials", "backup", "frontend", "hardware", "logger",
        "network", "system_health", "automation", "person", "scene", "script",
        "tag", "zone", "counter", "input_boolean", "input_button",
        "input_datetime", "input_number", "input_select", "input_text",
        "schedule", "timer",
    },
}
_FALLBACK_DISCOVERY = {
    "dhcp": ("dhcp",), "mqtt": ("mqtt",), "ssdp": ("ssdp",),
    "zeroconf": ("zeroconf", "homekit"),
}


def _module_constants(path: str) -> dict[str, object]:
    """Literal module-level constants of a Python file (no import)."""
    out: dict[str, object] = {}
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        target = value = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and value is not None:
            try:
                out[target.id] = ast.literal_eval(value)
            except (ValueError, SyntaxError, TypeError):
                pass
    return out


def _config_domains(config_yaml: str) -> set[str]:
    domains = set()
    with open(config_yaml, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^([a-z_][a-z0-9_]*)(?: [^:]*)?:", line)
            if m and m.group(1) != "homeassistant":
                domains.add(m.group(1))
            # "- platform: template" under light:/switch:/...
            m = re.match(r"^\s+-?\s*platform:\s*([a-z_][a-z0-9_]*)", line)
            if m:
                domains.add(m.group(1))
    return domains


def cmd_requirements(args: argparse.Namespace) -> int:
    import importlib.util

    spec = importlib.util.find_spec("homeassistant")  # the venv's, not imported
    if spec is None or not spec.submodule_search_locations:
        raise Fail("homeassistant is not installed in this Python")
    base = list(spec.submodule_search_locations)[0]
    comp = os.path.join(base, "components")
    consts = dict(_FALLBACK)
    # Newer names of the same sets (LOGGING_INTEGRATIONS became
    # LOGGING_AND_HTTP_DEPS_INTEGRATIONS by 2026.x).
    aliases = {"LOGGING_INTEGRATIONS": ("LOGGING_AND_HTTP_DEPS_INTEGRATIONS",)}
    try:
        parsed = _module_constants(os.path.join(base, "bootstrap.py"))
        imported = None
        for key in _FALLBACK:
            names = (key, *aliases.get(key, ()))
            value = next((parsed[n] for n in names if isinstance(parsed.get(n), (set, frozenset, list, tuple))), None)
            if value is None:
                # Not a literal (2026.x: DEFAULT_INTEGRATIONS holds
                # *(BASE_PLATFORMS - {...})): read it from the module itself.
                try:
                    if imported is None:
                        import homeassistant.bootstrap as imported
                    value = next((getattr(imported, n) for n in names if hasattr(imported, n)), None)
                except Exception as err:  # an import failure: use the fallback
                    log(f"cannot import homeassistant.bootstrap ({err})")
            if value is not None:
                consts[key] = set(value)
            else:
                log(f"bootstrap.py: {key} not found, using a fallback")
    except (OSError, SyntaxError) as err:
        log(f"cannot parse bootstrap.py ({err}); using fallbacks")
    discovery = _FALLBACK_DISCOVERY
    try:
        parsed = _module_constants(os.path.join(base, "requirements.py"))
        if isinstance(parsed.get("DISCOVERY_INTEGRATIONS"), dict):
            discovery = parsed["DISCOVERY_INTEGRATIONS"]
    except (OSError, SyntaxError) as err:
        log(f"cannot parse requirements.py ({err}); using a fallback")

    config_domains = _config_domains(args.config)
    start = (
        config_domains
        | consts["CORE_INTEGRATIONS"]
        | consts["DEFAULT_INTEGRATIONS"]
        | (consts["LOGGING_INTEGRATIONS"] & (config_domains | {"logger", "system_log"}))
        | consts["FRONTEND_INTEGRATIONS"]
    )

    def manifest(domain: str) -> dict | None:
        try:
            with open(os.path.join(comp, domain, "manifest.json"), encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    # HA's RequirementsManager._async_process_integration: requirements of
    # the integration, then (recursively) of its dependencies AND
    # after_dependencies, plus the discovery integrations its manifest
    # mentions (zeroconf, ssdp, ...).
    done: set[str] = set()
    reqs: dict[str, set[str]] = {}
    todo = sorted(start)
    while todo:
        domain = todo.pop()
        if domain in done:
            continue
        done.add(domain)
        m = manifest(domain)
        if m is None:
            log(f"no manifest for {domain!r} (ignored)")
            continue
        for r in m.get("requirements", []):
            reqs.setdefault(r, set()).add(domain)
        nxt = list(m.get("dependencies", [])) + list(m.get("after_dependencies", []))
        for check_domain, keys in discovery.items():
            if any(k in m for k in keys):
                nxt.append(check_domain)
        todo.extend(d for d in nxt if d not in done)

    # The auth modules HA loads by default (hass.auth: provider
    # "homeassistant", MFA module "totp") have REQUIREMENTS of their own,
    # pip-installed at start unless --skip-pip (pyotp, PyQRCode).
    for mod in ("auth/providers/homeassistant.py", "auth/mfa_modules/totp.py"):
        try:
            mreqs = _module_constants(os.path.join(base, mod)).get("REQUIREMENTS", [])
        except (OSError, SyntaxError):
            mreqs = []
        for r in mreqs:
            reqs.setdefault(r, set()).add(mod)

    if args.verbose:
        log(f"config domains: {' '.join(sorted(config_domains))}")
        log(f"integrations considered ({len(done)}): {' '.join(sorted(done))}")
        for r, ds in sorted(reqs.items()):
            log(f"  {r:45s} <- {', '.join(sorted(ds))}")
    for r in sorted(reqs):
        print(r)
    return 0


# --------------------------------------------------------------------------
# check-config: parse DIR/configuration.yaml the way HA does
# --------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    """A configuration.yaml HA cannot parse sends it into recovery mode, where
    it serves the default http config (all interfaces, port 8123) and never
    answers on our port: refuse to start instead."""
    from homeassistant.util.yaml import load_yaml

    path = os.path.join(args.dir, "configuration.yaml")
    try:
        conf = load_yaml(path)
    except Exception as err:  # HomeAssistantError, yaml errors
        raise Fail(f"{path} does not parse: {err}") from None
    http = (conf or {}).get("http") or {}
    if http.get("server_host") != "127.0.0.1" or http.get("server_port") != args.port:
        raise Fail(f"{path}: http must have server_host 127.0.0.1 and server_port {args.port}")
    return 0


RECOVERY_MARKERS = ("Activating recovery mode", "Activating safe mode")


def _log_says_recovery(log_file: str | None, offset: int) -> str | None:
    """A line from the part of HA's log written since `offset` that says HA
    went into recovery mode (bad configuration.yaml, frontend failing)."""
    if not log_file:
        return None
    try:
        with open(log_file, "rb") as f:
            f.seek(offset)
            for raw in f:
                line = raw.decode("utf-8", "replace")
                if any(m in line for m in RECOVERY_MARKERS):
                    return line.strip()
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------
# HTTP / WebSocket helpers
# --------------------------------------------------------------------------


def _read(path: str | None) -> str | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def _pid_alive(pid_file: str | None) -> bool | None:
    """None when there is no pid file to check."""
    if not pid_file:
        return None
    pid = _read(pid_file)
    if not pid or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie counts as dead
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except OSError:
        return False
    return True


class AuthRejected(Exception):
    pass


async def _ws_get_config(session, url: str, token: str, io_timeout: float) -> dict:
    import aiohttp

    async with session.ws_connect(
        url + "/api/websocket", timeout=aiohttp.ClientWSTimeout(ws_close=io_timeout)
        if hasattr(aiohttp, "ClientWSTimeout") else io_timeout,
        autoping=True,
    ) as ws:
        first = await ws.receive_json(timeout=io_timeout)
        if first.get("type") != "auth_required":
            raise Fail(f"unexpected first WS message: {first}")
        await ws.send_json({"type": "auth", "access_token": token})
        msg = await ws.receive_json(timeout=io_timeout)
        if msg.get("type") != "auth_ok":
            raise AuthRejected(msg.get("message") or msg.get("type"))
        await ws.send_json({"id": 1, "type": "get_config"})
        while True:
            msg = await ws.receive_json(timeout=io_timeout)
            if msg.get("id") == 1 and msg.get("type") == "result":
                if not msg.get("success"):
                    raise Fail(f"get_config failed: {msg.get('error')}")
                return msg["result"]


async def _wait_running(args: argparse.Namespace) -> int:
    import aiohttp

    token = _read(args.token_file)
    if not token:
        raise Fail(f"no token in {args.token_file}")
    deadline = time.monotonic() + args.timeout
    last = "no answer yet"
    seen_new_pid = args.not_pid is None
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=10, connect=2)
    ) as session:
        while True:
            if _pid_alive(args.supervisor_pid_file) is False:
                raise Fail(
                    "Home Assistant is not running (its supervisor exited); see the log",
                    EXIT_DIED,
                )
            if line := _log_says_recovery(args.log_file, args.log_offset):
                raise Fail(f"Home Assistant went into recovery mode: {line}")
            if not seen_new_pid:
                pid = _read(args.hass_pid_file)
                if pid and pid != args.not_pid and _pid_alive(args.hass_pid_file):
                    seen_new_pid = True
                    log(f"hass restarted: pid {args.not_pid} -> {pid}")
                else:
                    last = f"hass pid still {args.not_pid} (old process not restarted yet)"
            if seen_new_pid:
                try:
                    cfg = await _ws_get_config(session, args.url, token, 5)
                    state = cfg.get("state")
                    if cfg.get("recovery_mode") or cfg.get("safe_mode"):
                        raise Fail("Home Assistant runs in recovery/safe mode; see the log")
                    if state == "RUNNING":
                        async with session.get(
                            args.url + "/api/", headers={"Authorization": f"Bearer {token}"}
                        ) as resp:
                            if resp.status == 200:
                                print(cfg.get("version", ""))
                                return 0
                            last = f"RUNNING, but GET /api/ answers HTTP {resp.status}"
                    else:
                        last = f"core state {state}"
                except AuthRejected as err:
                    raise Fail(
                        f"Home Assistant rejected the token in {args.token_file} "
                        f"({err}); remove the peer DIR to start from scratch",
                        EXIT_AUTH,
                    ) from None
                except aiohttp.WSServerHandshakeError as err:
                    if err.status == 403:
                        raise Fail(
                            "HTTP 403 on /api/websocket: 127.0.0.1 is banned (ip_ban_enabled; "
                            "see ip_bans.yaml); `ha-peer.sh unban DIR` lifts it",
                            EXIT_AUTH,
                        ) from None
                    last = f"{type(err).__name__}: {err}".strip()
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError,
                        TypeError) as err:
                    last = f"{type(err).__name__}: {err}".strip()
            if time.monotonic() >= deadline:
                raise Fail(
                    f"Home Assistant at {args.url} not RUNNING after {args.timeout:g} s "
                    f"(last: {last})",
                    EXIT_TIMEOUT,
                )
            await asyncio.sleep(0.25)


async def _onboard(args: argparse.Namespace) -> int:
    import aiohttp

    url = args.url
    client_id = url + "/"
    token_file = os.path.join(args.dir, "token")
    deadline = time.monotonic() + args.timeout
    last = "no answer yet"
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=30, connect=2)
    ) as session:
        # 1. wait for the onboarding API (HTTP is up, onboarding loaded)
        while True:
            if _pid_alive(args.supervisor_pid_file) is False:
                raise Fail("Home Assistant exited before onboarding", EXIT_DIED)
            if line := _log_says_recovery(args.log_file, args.log_offset):
                raise Fail(f"Home Assistant went into recovery mode: {line}")
            try:
                async with session.get(url + "/api/onboarding") as resp:
                    if resp.status == 200:
                        steps = await resp.json()
                        break
                    last = f"GET /api/onboarding: HTTP {resp.status}"
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as err:
                last = f"{type(err).__name__}: {err}".strip()
            if time.monotonic() >= deadline:
                raise Fail(f"onboarding API not up after {args.timeout:g} s ({last})",
                           EXIT_TIMEOUT)
            await asyncio.sleep(0.25)
        if any(s.get("step") == "user" and s.get("done") for s in steps):
            raise Fail(
                f"{args.dir} is already onboarded but has no token file; "
                "remove the directory to start from scratch"
            )
        # 2. create the owner -> auth_code
        body = dict(ONBOARD_USER, client_id=client_id)
        async with session.post(url + "/api/onboarding/users", json=body) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise Fail(f"POST /api/onboarding/users: HTTP {resp.status}: {text}")
            auth_code = json.loads(text)["auth_code"]
        # 3. auth_code -> access token (30 min)
        form = {"grant_type": "authorization_code", "code": auth_code, "client_id": client_id}
        async with session.post(url + "/auth/token", data=form) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise Fail(f"POST /auth/token: HTTP {resp.status}: {text}")
            access = json.loads(text)["access_token"]
        # 4. WS auth/long_lived_access_token -> 10-year token
        async with session.ws_connect(url + "/api/websocket") as ws:
            msg = await ws.receive_json(timeout=10)
            await ws.send_json({"type": "auth", "access_token": access})
            msg = await ws.receive_json(timeout=10)
            if msg.get("type") != "auth_ok":
                raise Fail(f"WS auth with the new access token failed: {msg}")
            await ws.send_json({
                "id": 1, "type": "auth/long_lived_access_token",
                "client_name": "hass-edge test peer", "lifespan": 3650,
            })
            while True:
                msg = await ws.receive_json(timeout=10)
                if msg.get("id") == 1:
                    break
            if not msg.get("success"):
                raise Fail(f"auth/long_lived_access_token failed: {msg.get('error')}")
            token = msg["result"]
    _write_private(token_file, token + "\n")
    _write_private(
        os.path.join(args.dir, "credentials.json"),
        json.dumps({"username": ONBOARD_USER["username"],
                    "password": ONBOARD_USER["password"],
                    "client_id": client_id}, indent=1) + "\n",
    )
    log(f"onboarded (user {ONBOARD_USER['username']!r}); long-lived token in {token_file}")
    return 0


def _write_private(path: str, text: str) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


async def _call_restart(args: argparse.Namespace) -> int:
    import aiohttp

    token = _read(args.token_file)
    if not token:
        raise Fail(f"no token in {args.token_file}")
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=30, connect=2)
    ) as session:
        try:
            async with session.post(
                args.url + "/api/services/homeassistant/restart",
                headers={"Authorization": f"Bearer {token}"}, json={},
            ) as resp:
                text = await resp.text()
                if resp.status == 401:
                    raise Fail("restart: HTTP 401 (token rejected)", EXIT_AUTH)
                if resp.status >= 300:
                    raise Fail(f"restart: HTTP {resp.status}: {text[:500]}")
                log(f"restart requested: HTTP {resp.status}")
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as err:
            # HA may go down before it answers
            log(f"restart requested (connection ended: {type(err).__name__})")
    return 0


async def _promote_http(args: argparse.Namespace) -> int:
    """components/http/config.py (2026.x): the YAML `http:` config is migrated to
    .storage/http as a pending trial; HA reverts it after AUTO_REVERT_DELAY (5 min)
    unless an admin promotes it.  Old HA answers unknown_command: nothing to do."""
    import aiohttp

    token = _read(args.token_file)
    if not token:
        raise Fail(f"no token in {args.token_file}")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30, connect=2)) as session:
        async with session.ws_connect(args.url + "/api/websocket") as ws:
            if (await ws.receive_json(timeout=10)).get("type") != "auth_required":
                raise Fail("no auth_required")
            await ws.send_json({"type": "auth", "access_token": token})
            if (await ws.receive_json(timeout=10)).get("type") != "auth_ok":
                raise Fail("token rejected", EXIT_AUTH)
            await ws.send_json({"id": 1, "type": "http/config/promote"})
            while True:
                msg = await ws.receive_json(timeout=10)
                if msg.get("id") == 1 and msg.get("type") == "result":
                    break
    if msg.get("success"):
        log("promoted the pending http config to stable (no revert to 0.0.0.0:8123 in 5 min)")
        return 0
    err = msg.get("error") or {}
    if err.get("code") == "unknown_command" or "No pending" in str(err.get("message")):
        return 0
    raise Fail(f"http/config/promote: {err}")


# --------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="peer.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("requirements")
    r.add_argument("config")
    r.add_argument("-v", "--verbose", action="store_true")

    o = sub.add_parser("onboard")
    o.add_argument("--url", required=True)
    o.add_argument("--dir", required=True)
    o.add_argument("--supervisor-pid-file")
    o.add_argument("--timeout", type=float, default=120)
    o.add_argument("--log-file", help="fail fast if this log says 'recovery mode'")
    o.add_argument("--log-offset", type=int, default=0, help="... past this byte offset")

    w = sub.add_parser("wait-running")
    w.add_argument("--url", required=True)
    w.add_argument("--token-file", required=True)
    w.add_argument("--supervisor-pid-file")
    w.add_argument("--hass-pid-file")
    w.add_argument("--not-pid", help="first wait until hass.pid names another process")
    w.add_argument("--timeout", type=float, default=120)
    w.add_argument("--log-file", help="fail fast if this log says 'recovery mode'")
    w.add_argument("--log-offset", type=int, default=0, help="... past this byte offset")

    k = sub.add_parser("check-config")
    k.add_argument("--dir", required=True)
    k.add_argument("--port", type=int, required=True)

    c = sub.add_parser("call-restart")
    c.add_argument("--url", required=True)
    c.add_argument("--token-file", required=True)

    h = sub.add_parser("promote-http")
    h.add_argument("--url", required=True)
    h.add_argument("--token-file", required=True)

    args = p.parse_args(argv)
    if getattr(args, "url", None):
        args.url = args.url.rstrip("/")
    try:
        if args.cmd == "requirements":
            return cmd_requirements(args)
        if args.cmd == "onboard":
            return asyncio.run(_onboard(args))
        if args.cmd == "wait-running":
            return asyncio.run(_wait_running(args))
        if args.cmd == "check-config":
            return cmd_check_config(args)
        if args.cmd == "call-restart":
            return asyncio.run(_call_restart(args))
        if args.cmd == "promote-http":
            return asyncio.run(_promote_http(args))
    except Fail as err:
        log(f"error: {err}")
        return err.code
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
