"""The real Home Assistant peer of the tests (tests/ha-peer): one place to start, stop,
restart or kill it (through ha-peer.sh, which owns installing, onboarding and waiting for
RUNNING) and to read and write its states over its REST API."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from hass_edge_tools import ROOT
from hass_edge_tools.client import Http

PEER_SH = ROOT / "tests" / "ha-peer" / "ha-peer.sh"
# Where tests/ha-peer/install.sh keeps one venv per HA version.
CACHE = Path(os.environ.get("HASS_EDGE_PEER_CACHE", str(Path.home() / ".cache" / "hass-edge")))


def venv_python(version: str) -> Path:
    """The Python of HA `version`'s venv (it has aiohttp, which HA depends on)."""
    return CACHE / f"ha-{version}" / "bin" / "python"


class Peer:
    """A real Home Assistant `version` run by ha-peer.sh in `directory` on 127.0.0.1:`port`."""

    def __init__(self, directory: Path, port: int, version: str, ip_ban: bool = False):
        self.dir = directory
        self.port = port
        self.version = version
        self.ip_ban = ip_ban
        self.url = f"http://127.0.0.1:{port}"
        self.token = ""
        self.http: Http | None = None

    @classmethod
    def attach(cls, directory: Path) -> "Peer":
        """A peer that ha-peer.sh already started in `directory` (its url, version and token
        files say which)."""
        url = (directory / "url").read_text().strip()
        p = cls(directory, urlsplit(url).port, (directory / "version").read_text().strip())
        p.url = url
        p._connect()
        return p

    def _connect(self) -> None:
        self.token = (self.dir / "token").read_text().strip()
        self.http = Http(self.url, self.token)

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header for HA's REST API (for clients other than `http`)."""
        return {"Authorization": f"Bearer {self.token}"}

    def sh(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["bash", str(PEER_SH), *args]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        return r

    def start(self) -> None:
        fresh = not (self.dir / "token").exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        args = ["start", self.version, str(self.dir), str(self.port)] + (["--ip-ban"] if self.ip_ban else [])
        self.sh(*args)
        self._connect()
        if fresh:
            # HA saves its auth storage (the onboarded user, our token) with a delay: a
            # SIGKILL in the first seconds after onboarding loses it and the token stops
            # working. A graceful restart writes it out.
            self.restart()

    def stop(self) -> None:
        if self.dir.exists():
            self.sh("stop", str(self.dir), check=False)

    def restart(self) -> None:
        self.sh("restart", str(self.dir))

    def hup(self) -> None:
        self.sh("hup", str(self.dir))

    def kill(self) -> None:
        self.sh("kill", str(self.dir))

    def unban(self) -> None:
        self.sh("unban", str(self.dir), check=False)

    def hass_pid(self) -> int | None:
        """The pid of the `hass` process, or None while there is none."""
        try:
            return int((self.dir / "hass.pid").read_text())
        except (OSError, ValueError):
            return None

    def pid(self) -> int:
        """The pid of the `hass` process; an error when it is not running."""
        pid = self.hass_pid()
        if pid is None:
            raise RuntimeError(f"no hass process in {self.dir}")
        return pid

    def log_size(self) -> int:
        try:
            return (self.dir / "ha.log").stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        """HA's warnings and errors (its stderr, appended over all runs) from `offset`."""
        try:
            with open(self.dir / "ha.log", "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def states(self) -> dict[str, dict]:
        """GET /api/states by entity_id."""
        assert self.http
        status, body = self.http.get("/api/states")
        if status != 200:
            raise RuntimeError(f"HA GET /api/states: {status} {body!r:.200}")
        return {s["entity_id"]: s for s in body}

    def post_state(self, entity_id: str, state: str, attributes: dict | None = None) -> int:
        assert self.http
        return self.http.json("POST", f"/api/states/{entity_id}", {"state": state, "attributes": attributes or {}})[0]

    def delete_state(self, entity_id: str) -> int:
        assert self.http
        return self.http.json("DELETE", f"/api/states/{entity_id}")[0]

    def call(self, domain: str, service: str, **data) -> int:
        assert self.http
        return self.http.json("POST", f"/api/services/{domain}/{service}", data)[0]
