"""What every benchmark shares: the run's arguments and results, the HA peer that
measure/bench.sh started, the daemons started for the run (each on the next port of the
run's range, listed in WORK/pids for bench.sh's trap), and the load put on HA."""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from hass_edge_tools.daemon import Daemon
from hass_edge_tools.machine import busiest, cpu_model
from hass_edge_tools.mirror import mirror_diff
from hass_edge_tools.peer import Peer


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)

class Harness:
    """One run of the benchmarks; `r` collects what BENCHMARKS.md is written from."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.smoke = args.smoke
        self.work = Path(args.work)
        self.peer = Peer.attach(Path(args.peer))
        self.bin = Path(args.bin)
        self.ingest = Path(args.ingest) if args.ingest else None
        self.repo = Path(args.repo)
        self.port = args.port_base
        self.daemons: list[Daemon] = []
        self.r: dict = {"smoke": self.smoke, "ha_version": self.peer.version}
        # Daemons run with the environment the packaged unit gives them (its Environment=
        # lines, e.g. the malloc tunable), as systemd would start them.
        unit = self.repo / "packaging" / "systemd" / "hass-edge.service"
        self.unit_env = dict(line.split("=", 2)[1:] for line in unit.read_text().splitlines() if line.startswith("Environment=") and line.count("=") >= 2)
        self.r["unit_env"] = self.unit_env

    def next_port(self) -> int:
        self.port += 1
        if self.port > self.args.port_max:
            raise RuntimeError("out of ports")
        return self.port

    def dur(self, full: float, smoke: float) -> float:
        return smoke if self.smoke else full

    def daemon(self, settings: dict | None = None, wrap: list[str] | None = None) -> Daemon:
        """A started hass-edge in WORK/daemon-N/ logging warnings only, without a state file
        (`persist = false`), `wrap` (valgrind) before its command."""
        sections: dict[str, dict] = {"log": {"level": "warn"}, "cache": {"persist": False}}
        for section, keys in (settings or {}).items():
            sections.setdefault(section, {}).update(keys)
        d = Daemon(self.bin, self.work / f"daemon-{len(self.daemons) + 1}", self.peer.url, self.peer.token, sections,
                   port=self.next_port(), env=self.unit_env, prefix=wrap)
        d.start()
        with open(self.work / "pids", "a") as f:
            f.write(f"{d.pid}\n")
        self.daemons.append(d)
        return d

    # -------------------------------------------------------------- load on HA

    async def post_many(self, s, items: list[tuple[str, dict]], concurrency: int = 32) -> None:
        """POST /api/states/<entity_id> to HA for each (entity_id, body), `concurrency` at a
        time, through the aiohttp session `s`."""
        queue = list(reversed(items))

        async def worker() -> None:
            while queue:
                entity_id, body = queue.pop()
                async with s.post(f"{self.peer.url}/api/states/{entity_id}", json=body, headers=self.peer.headers) as r:
                    if r.status not in (200, 201):
                        raise RuntimeError(f"POST {entity_id}: {r.status} {await r.text()}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def mirror_diff(self, d: Daemon) -> tuple[int, int]:
        """(entities that differ or are missing, extra entities) between HA's tracked states and ours."""
        differ, missing, extra = await asyncio.to_thread(mirror_diff, self.peer, d)
        return len(differ) + len(missing), len(extra)

    # -------------------------------------------------------------- the machine

    def machine(self) -> None:
        rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
        self.r["busy_start"] = busiest()
        self.r["machine"] = {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "load_start": os.getloadavg(),
            "rustc": rustc,
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0].strip() or "wrk",
        }
