"""Shared pieces of the reliability suite (issue #6): the real HA peer (tests/ha-peer),
the real hass-edge daemon, small HTTP clients, process sampling, and the check/figure
bookkeeping every script prints and hands to `reliability/run.sh`.

Environment:
  HA_VERSION       HA peer version (default 2025.4.4; 2024.3.3 also works)
  HASS_EDGE_BIN    daemon binary (default $CARGO_TARGET_DIR or target/: fast/, else debug/)
  REL_WORK         scratch directory (default /tmp/hass-edge-rel)
  REL_RESULTS      when set, each script writes <REL_RESULTS>/<script>.json for run.sh
  REL_PORT_BASE    first port for peers (default 18200; scripts use base+0..base+9)

Only 127.0.0.0/8 is ever contacted.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_SH = ROOT / "tests" / "ha-peer" / "ha-peer.sh"
VERSION = os.environ.get("HA_VERSION", "2025.4.4")
WORK = Path(os.environ.get("REL_WORK", "/tmp/hass-edge-rel"))
PORT_BASE = int(os.environ.get("REL_PORT_BASE", "18200"))
CACHE = Path(os.environ.get("HASS_EDGE_PEER_CACHE", str(Path.home() / ".cache" / "hass-edge")))

# Entities the default filter leaves out (config.rs RawFilter::default).
EXCLUDED_DOMAINS = ("media_player", "camera", "automation")


def ensure_venv() -> None:
    """Re-executes the calling script with the HA venv's Python when aiohttp is missing."""
    try:
        import aiohttp  # noqa: F401
        return
    except ImportError:
        pass
    py = CACHE / f"ha-{VERSION}" / "bin" / "python"
    if not py.exists():
        sys.exit(f"aiohttp is missing and {py} does not exist: run tests/ha-peer/install.sh {VERSION}")
    if os.environ.get("REL_REEXEC"):
        sys.exit(f"{py} has no aiohttp")
    os.environ["REL_REEXEC"] = "1"
    os.execv(str(py), [str(py), *sys.argv])


def daemon_bin() -> Path:
    if os.environ.get("HASS_EDGE_BIN"):
        return Path(os.environ["HASS_EDGE_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    for p in (target / "fast/hass-edge", target / "debug/hass-edge"):
        if p.exists():
            return p
    sys.exit(f"no hass-edge binary in {target}: build with cargo build --profile fast (or set HASS_EDGE_BIN)")


def binary_info() -> str:
    """The daemon binary, when it was built, and the commit checked out now."""
    b = daemon_bin()
    built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(b.stat().st_mtime))
    head = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %ci"], capture_output=True, text=True).stdout.strip()
    return f"{b} built {built}; HEAD {head}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tracked_by_default(entity_id: str) -> bool:
    return entity_id.split(".", 1)[0] not in EXCLUDED_DOMAINS


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def spread(values: list[float], unit: str = "s", digits: int = 2) -> str:
    if not values:
        return "n/a"
    return f"min {min(values):.{digits}f}{unit} p50 {statistics.median(values):.{digits}f}{unit} max {max(values):.{digits}f}{unit}"


# ---------------------------------------------------------------------------- checks


class Report:
    """Prints what was tried and what held; collects figures; exits non-zero on a failure."""

    def __init__(self, name: str):
        self.name = name
        self.checks: list[tuple[bool, str]] = []
        self.figures: dict[str, object] = {}
        self.notes: list[str] = []
        self.started = time.time()
        self.load_start = os.getloadavg()
        print(f"== {name} (HA {VERSION}, daemon {daemon_bin()}, load average {self.load_start[0]:.1f})", flush=True)

    def tried(self, what: str) -> None:
        print(f"-- try: {what}", flush=True)

    def check(self, ok: bool, what: str) -> bool:
        self.checks.append((bool(ok), what))
        print(f"   {'held' if ok else 'FAIL'}: {what}", flush=True)
        return bool(ok)

    def figure(self, key: str, value: object) -> None:
        self.figures[key] = value
        print(f"   figure: {key} = {value}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"   note: {text}", flush=True)

    @property
    def failed(self) -> list[str]:
        return [w for ok, w in self.checks if not ok]

    def finish(self) -> int:
        """Prints the summary, writes the JSON for run.sh; returns the exit code."""
        load = os.getloadavg()
        self.figure("machine load average (1 min) at start / end", f"{self.load_start[0]:.1f} / {load[0]:.1f} on {os.cpu_count()} cores")
        failed = self.failed
        held = len(self.checks) - len(failed)
        elapsed = time.time() - self.started
        print(f"== {self.name}: {held} held, {len(failed)} failed ({elapsed:.0f}s)", flush=True)
        for w in failed:
            print(f"   FAILED: {w}", flush=True)
        out = os.environ.get("REL_RESULTS")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            # The default version's results are <name>.json; another version's <name>@<version>.json.
            stem = self.name if VERSION == "2025.4.4" else f"{self.name}@{VERSION}"
            (Path(out) / f"{stem}.json").write_text(
                json.dumps(
                    {
                        "name": self.name,
                        "ha_version": VERSION,
                        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                        "binary": binary_info(),
                        "seconds": round(elapsed, 1),
                        "held": [w for ok, w in self.checks if ok],
                        "failed": failed,
                        "figures": self.figures,
                        "notes": self.notes,
                    },
                    indent=1,
                    default=str,
                )
            )
        return 1 if failed else 0


# ---------------------------------------------------------------------------- HTTP


class Http:
    """A small keep-alive HTTP/1.1 client (http.client) for one host on loopback."""

    def __init__(self, base: str, token: str | None = None, timeout: float = 30.0):
        m = re.match(r"http://([^:/]+):(\d+)", base)
        assert m, base
        self.host, self.port = m.group(1), int(m.group(2))
        assert self.host.startswith("127.") or self.host == "localhost", "loopback only"
        self.token = token
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: object = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
        h = dict(headers or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                self.conn.request(method, path, body=data, headers=h)
                r = self.conn.getresponse()
                payload = r.read()
                hdrs = {k.lower(): v for k, v in r.getheaders()}
                if hdrs.get("connection", "").lower() == "close":
                    self.close()
                return r.status, hdrs, payload
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        status, _, payload = self.request(method, path, body)
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload.decode(errors="replace")

    def get(self, path: str) -> tuple[int, object]:
        return self.json("GET", path)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# ---------------------------------------------------------------------------- the HA peer


class Peer:
    """A real Home Assistant run by tests/ha-peer/ha-peer.sh in WORK/<name> on `port`."""

    def __init__(self, name: str, port: int, version: str = VERSION, ip_ban: bool = False):
        self.dir = WORK / name
        self.port = port
        self.version = version
        self.ip_ban = ip_ban
        self.url = f"http://127.0.0.1:{port}"
        self.token = ""
        self.http: Http | None = None

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
        self.token = (self.dir / "token").read_text().strip()
        self.http = Http(self.url, self.token)
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
        try:
            return int((self.dir / "hass.pid").read_text())
        except (OSError, ValueError):
            return None

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


# ---------------------------------------------------------------------------- the daemon


def stop_all(r: Report, daemon: "Daemon", peer: Peer, keep_peer: bool) -> None:
    """The end of every script: stop hass-edge, which must exit 0 on SIGTERM, then the peer
    unless it is kept (`--keep-peer`)."""
    code = daemon.stop()
    r.check(code == 0, f"hass-edge exits 0 on SIGTERM (got {code})")
    if not keep_peer:
        peer.stop()


class Daemon:
    """The real hass-edge binary with a config written into WORK/<name>/."""

    def __init__(self, name: str, ha_url: str, token: str, settings: dict | None = None, log_level: str = "info"):
        self.dir = WORK / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ha_url = ha_url
        self.token = token
        self.settings = settings or {}
        self.log_level = log_level
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = self.dir / "daemon.log"
        self.proc: subprocess.Popen | None = None
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
        env["RUST_LOG"] = self.log_level
        self.proc = subprocess.Popen(
            [str(daemon_bin()), "--config", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "wb"),
            env=env,
        )

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if not self.proc:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        return self.proc.returncode

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
        """Metric name -> value summed over label sets."""
        status, _, body = self.http.request("GET", "/metrics")
        out: dict[str, float] = {}
        if status != 200:
            return out
        for line in body.decode().splitlines():
            if not line or line.startswith("#"):
                continue
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            try:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
        return out

    def states(self) -> dict[str, dict]:
        status, body = self.http.get("/api/states")
        if status != 200:
            raise RuntimeError(f"hass-edge GET /api/states: {status}")
        return {s["entity_id"]: s for s in body}

    def status(self) -> dict:
        return self.http.get("/status")[1]

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def mem(self) -> dict[str, int]:
        """VmRSS / VmHWM in kB from /proc/<pid>/status."""
        return proc_mem(self.pid)


def proc_mem(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "VmSize", "Threads"):
                out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def fmt_mem(m: dict[str, int]) -> str:
    return f"VmRSS {m.get('VmRSS', 0) / 1024:.1f} MiB, VmHWM {m.get('VmHWM', 0) / 1024:.1f} MiB"


def mirror_diff(peer: Peer, daemon: Daemon) -> tuple[list[str], list[str], list[str]]:
    """(differing, missing in ours, extra in ours) for the entities the default filter tracks."""
    ha = {k: v for k, v in peer.states().items() if tracked_by_default(k)}
    ours = daemon.states()
    differ = sorted(k for k in ha if k in ours and ours[k] != ha[k])
    missing = sorted(k for k in ha if k not in ours)
    extra = sorted(k for k in ours if k not in ha)
    return differ, missing, extra


def wait_mirror(peer: Peer, daemon: Daemon, timeout: float = 15) -> tuple[float | None, str]:
    """Waits until our /api/states equals HA's for the tracked entities. Returns (seconds or
    None, last difference)."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout:
        try:
            differ, missing, extra = mirror_diff(peer, daemon)
        except (OSError, RuntimeError, http.client.HTTPException) as e:
            last = str(e)
        else:
            if not (differ or missing or extra):
                return time.monotonic() - t0, ""
            last = f"differ {differ[:5]} missing {missing[:5]} extra {extra[:5]}"
        time.sleep(0.1)
    return None, last


def explain_diff(peer: Peer, daemon: Daemon, entity_id: str) -> str:
    ha = peer.states().get(entity_id)
    ours = daemon.states().get(entity_id)
    if not ha or not ours:
        return f"{entity_id}: HA {bool(ha)} ours {bool(ours)}"
    keys = sorted(k for k in set(ha) | set(ours) if ha.get(k) != ours.get(k))
    return f"{entity_id}: " + "; ".join(f"{k}: HA {ha.get(k)!r:.120} ours {ours.get(k)!r:.120}" for k in keys)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {os.uname().sysname} {os.uname().release}"
