"""What every script of the reliability suite (issue #6) shares beyond the package's peer
and daemon: its settings from the environment, its peers and daemons under WORK, and the
check/figure bookkeeping each script prints and hands to measure/reliability.sh.

Environment:
  HA_VERSION       HA peer version (default 2025.4.4; 2024.3.3 also works)
  HASS_EDGE_BIN    daemon binary (default $CARGO_TARGET_DIR or target/: fast/, else debug/)
  REL_WORK         scratch directory (default /tmp/hass-edge-rel)
  REL_RESULTS      when set, each script writes <REL_RESULTS>/<script>.json for reliability.sh
  REL_PORT_BASE    first port for peers (default 18200; scripts use base+0..base+9)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hass_edge_tools import ROOT
from hass_edge_tools.daemon import Daemon
from hass_edge_tools.peer import Peer, venv_python

VERSION = os.environ.get("HA_VERSION", "2025.4.4")
WORK = Path(os.environ.get("REL_WORK", "/tmp/hass-edge-rel"))
PORT_BASE = int(os.environ.get("REL_PORT_BASE", "18200"))


def ensure_venv() -> None:
    """Re-executes the calling script (`python3 -m …`) with the HA venv's Python when
    aiohttp is missing."""
    try:
        import aiohttp  # noqa: F401
        return
    except ImportError:
        pass
    py = venv_python(VERSION)
    if not py.exists():
        sys.exit(f"aiohttp is missing and {py} does not exist: run tests/ha-peer/install.sh {VERSION}")
    if os.environ.get("REL_REEXEC"):
        sys.exit(f"{py} has no aiohttp")
    os.environ["REL_REEXEC"] = "1"
    module = sys.modules["__main__"].__spec__.name
    os.execv(str(py), [str(py), "-m", module, *sys.argv[1:]])


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


def make_peer(name: str, port: int, ip_ban: bool = False) -> Peer:
    """HA_VERSION's peer in WORK/<name> on `port` (not started yet)."""
    return Peer(WORK / name, port, VERSION, ip_ban)


def make_daemon(name: str, ha_url: str, token: str, settings: dict | None = None, log_level: str = "info") -> Daemon:
    """The daemon under test in WORK/<name>, logging at `log_level` (RUST_LOG); not started yet."""
    return Daemon(daemon_bin(), WORK / name, ha_url, token, settings, env={"RUST_LOG": log_level})


def stop_all(r: "Report", daemon: Daemon, peer: Peer, keep_peer: bool) -> None:
    """The end of every script: stop hass-edge, which must exit 0 on SIGTERM, then the peer
    unless it is kept (`--keep-peer`)."""
    code = daemon.stop()
    r.check(code == 0, f"hass-edge exits 0 on SIGTERM (got {code})")
    if not keep_peer:
        peer.stop()


class Report:
    """Prints what was tried and what held; collects figures; exits non-zero on a failure."""

    def __init__(self, name: str):
        self.name = name
        self.checks: list[tuple[bool, str]] = []
        self.goals: list[tuple[bool, str]] = []
        self.figures: dict[str, object] = {}
        self.notes: list[str] = []
        # Optional markdown (a table) that report.py puts in this script's section as it is.
        self.markdown = ""
        self.started = time.time()
        self.load_start = os.getloadavg()
        print(f"== {name} (HA {VERSION}, daemon {daemon_bin()}, load average {self.load_start[0]:.1f})", flush=True)

    def tried(self, what: str) -> None:
        print(f"-- try: {what}", flush=True)

    def check(self, ok: bool, what: str) -> bool:
        self.checks.append((bool(ok), what))
        print(f"   {'held' if ok else 'FAIL'}: {what}", flush=True)
        return bool(ok)

    def goal(self, ok: bool, what: str) -> bool:
        """A speed or memory goal: reported (held / MISS) but never a failure of the run.
        The project's rule: timing and memory goals are measured and printed, not asserted
        by a test (a CI machine's load is not ours to control)."""
        self.goals.append((bool(ok), what))
        print(f"   {'held' if ok else 'MISS'}: {what} (goal)", flush=True)
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
        """Prints the summary, writes the JSON for reliability.sh; returns the exit code."""
        load = os.getloadavg()
        self.figure("machine load average (1 min) at start / end", f"{self.load_start[0]:.1f} / {load[0]:.1f} on {os.cpu_count()} cores")
        failed = self.failed
        held = len(self.checks) - len(failed)
        elapsed = time.time() - self.started
        print(f"== {self.name}: {held} held, {len(failed)} failed ({elapsed:.0f}s)", flush=True)
        for w in failed:
            print(f"   FAILED: {w}", flush=True)
        for ok, w in self.goals:
            if not ok:
                print(f"   goal missed (reported, not a failure): {w}", flush=True)
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
                        "held": [w for ok, w in self.checks + self.goals if ok],
                        "failed": failed + [w for ok, w in self.goals if not ok],
                        "figures": self.figures,
                        "notes": self.notes,
                        "markdown": self.markdown,
                    },
                    indent=1,
                    default=str,
                )
            )
        return 1 if failed else 0
