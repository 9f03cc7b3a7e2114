"""Runs the benchmarks in order, prints the table and writes BENCHMARKS.md. Started by
measure/bench.sh with the HA peer's venv Python (aiohttp), after it has built the binaries
and started the peer. Every daemon started here is stopped in a `finally`."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import aiohttp

from hass_edge_tools.bench import freshness, ha_load, idle, ingest, ingest_e2e, memory, reads, sizes
from hass_edge_tools.bench.harness import Harness, log
from hass_edge_tools.bench.report import plain_table, write_markdown
from hass_edge_tools.machine import busiest


async def run(h: Harness) -> None:
    h.machine()
    only = set(h.args.only.split(",")) if h.args.only else None
    want = lambda name: only is None or name in only
    t_all = time.monotonic()
    timings: dict[str, float] = {}
    h.r["timings"] = timings
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64)) as s:
        try:
            if want("ingest"):
                t = time.monotonic()
                ingest.measure(h)
                timings["ingest"] = time.monotonic() - t
            # These share one daemon, live before the first starts.
            steps = [(n, f) for n, f in (("reads", reads.measure), ("freshness", freshness.measure), ("ha_load", ha_load.measure), ("ingest_e2e", ingest_e2e.measure)) if want(n)]
            if steps:
                d = h.daemon()
                await d.wait_live_async(s)
                for name, step in steps:
                    t = time.monotonic()
                    await step(h, s, d)
                    timings[name] = time.monotonic() - t
                d.stop()
            if want("idle"):
                t = time.monotonic()
                await idle.measure(h, s)
                timings["idle"] = time.monotonic() - t
            if want("memory"):
                t = time.monotonic()
                await memory.measure(h, s)
                timings["memory"] = time.monotonic() - t
            sizes.measure(h)
        finally:
            for d in h.daemons:
                d.stop()
    h.r["machine"]["load_end"] = os.getloadavg()
    h.r["busy_end"] = busiest()
    timings["total"] = time.monotonic() - t_all


def main() -> int:
    sections = "ingest,reads,freshness,ha_load,ingest_e2e,idle,memory"
    ap = argparse.ArgumentParser(prog="python -m hass_edge_tools.bench")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--work", required=True)
    ap.add_argument("--peer", required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--ingest")
    ap.add_argument("--repo", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--port-base", type=int, default=18222)
    ap.add_argument("--port-max", type=int, default=18240)
    ap.add_argument("--aarch64", action="append")
    ap.add_argument("--deb-dir", action="append")
    ap.add_argument("--build-seconds", type=float, default=0)
    ap.add_argument("--only", help=f"comma-separated sections to run (development): {sections}")
    args = ap.parse_args()
    h = Harness(args)
    asyncio.run(run(h))
    h.r["timings"]["build"] = args.build_seconds
    (Path(args.work) / "results.json").write_text(json.dumps(h.r, indent=1, default=str))
    print(plain_table(h.r))
    print(f"\nload average at start {h.r['machine']['load_start']}, at end {h.r['machine']['load_end']}; total {h.r['timings']['total']:.0f} s")
    write_markdown(Path(args.out), h.r)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
