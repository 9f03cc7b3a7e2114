"""The real hass-edge binary, run against a peer: one place to write its config, start it,
stop it and ask it how it is (/health, /metrics, /api/states, /status, /proc)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from hass_edge_tools.client import Http
from hass_edge_tools.procfs import proc_mem


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {series: value}; a labelled series is there under its full name and
    summed into its bare metric name."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        out[name] = v
        base = re.split(r"[{ ]", name, maxsplit=1)[0]
        if base != name:
            out[base] = out.get(base, 0.0) + v
    return out


class Daemon:
    """hass-edge `binary` with a config written into `directory`, listening on
    127.0.0.1:`port` (a free one by default), mirroring the HA at `ha_url`.

    `settings` are config sections merged over the defaults ({"cache": {"max_entities":
    1000}}); `env` is added to the environment (which loses our own HASS_EDGE_* overrides
    and systemd's notify/watchdog variables); `prefix` goes before the command (taskset,
    valgrind)."""

    def __init__(self, binary: Path, directory: Path, ha_url: str, token: str, settings: dict | None = None,
                 port: int | None = None, env: dict[str, str] | None = None, prefix: list[str] | None = None):
        self.binary = binary
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ha_url = ha_url
        self.token = token
        self.settings = settings or {}
        self.env = env or {}
        self.prefix = prefix or []
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = self.dir / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self._stderr = None
        self.http = Http(self.base)

    def write_config(self) -> Path:
        token_file = self.dir / "token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        sections: dict[str, dict] = {
            "ha": {"url": self.ha_url, "token_file": str(token_file)},
            "http": {"listen": f"127.0.0.1:{self.port}"},
            "dbus": {"bus": "none"},
            # Warm-start file of this daemon only (the default is /var/lib/hass-edge/).
            "cache": {"state_file": str(self.dir / "states.json")},
        }
        for section, keys in self.settings.items():
            sections.setdefault(section, {}).update(keys)
        text = ""
        for section, keys in sections.items():
            text += f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
        cfg = self.dir / "config.toml"
        cfg.write_text(text)
        return cfg

    def start(self) -> None:
        cfg = self.write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HASS_EDGE_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        env.update(self.env)
        self._stderr = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [*self.prefix, str(self.binary), "--config", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env=env,
        )

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10) -> int | None:
        """SIGTERM, SIGKILL after `grace` seconds; the exit code (None if never started)."""
        if not self.proc:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        if self._stderr:
            self._stderr.close()
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def mem(self) -> dict[str, int]:
        """VmRSS / VmHWM / VmSize in kB and Threads, from /proc/<pid>/status."""
        return proc_mem(self.pid)

    # ------------------------------------------------------------ blocking HTTP

    def health(self) -> tuple[int, dict]:
        try:
            status, body = self.http.get("/health")
            return status, body if isinstance(body, dict) else {}
        except OSError:
            return 0, {}

    def wait_status(self, want: str, timeout: float) -> float | None:
        """Seconds until /health says `want` (`live`, `auth_failed`, …), or None."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.health()[1].get("status") == want:
                return time.monotonic() - t0
            if not self.alive():
                return None
            time.sleep(0.05)
        return None

    def wait_live(self, timeout: float = 60) -> float | None:
        return self.wait_status("live", timeout)

    def metrics(self) -> dict[str, float]:
        """GET /metrics, parsed by `parse_metrics`; empty unless 200."""
        status, _, body = self.http.request("GET", "/metrics")
        return parse_metrics(body.decode()) if status == 200 else {}

    def states(self) -> dict[str, dict]:
        """GET /api/states by entity_id."""
        status, body = self.http.get("/api/states")
        if status != 200:
            raise RuntimeError(f"hass-edge GET /api/states: {status}")
        return {s["entity_id"]: s for s in body}

    def status(self) -> dict:
        return self.http.get("/status")[1]

    # ------------------------------------------------------------ asyncio (aiohttp)

    async def wait_live_async(self, session, count: int | None = None, timeout: float = 120) -> float:
        """Waits, polling every 20 ms through the aiohttp `session`, for /health 200 and, with
        `count`, that many tracked entities; the seconds it took. An error, with the end of
        the daemon's log, when it exits or is not live in `timeout` seconds."""
        import aiohttp

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.alive():
                raise RuntimeError(f"hass-edge exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            try:
                async with session.get(self.base + "/health") as r:
                    if r.status == 200:
                        if count is None:
                            return time.monotonic() - t0
                        # The gauge, not /api/states: serialising a 20,000-entity list would
                        # itself raise the peak being measured.
                        if (await self.metrics_async(session)).get("hass_edge_entities_tracked", 0) >= count:
                            return time.monotonic() - t0
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.02)
        raise RuntimeError(f"hass-edge not live after {timeout} s: {self.log_text()[-2000:]}")

    async def metrics_async(self, session) -> dict[str, float]:
        """GET /metrics through the aiohttp `session`, parsed by `parse_metrics`."""
        async with session.get(self.base + "/metrics") as r:
            return parse_metrics(await r.text())
