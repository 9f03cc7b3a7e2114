"""2a. Ingest in process: benches/ingest.rs (recorded HA frames through the daemon's
decode-and-apply step) on one core, in events per CPU-second; then instructions per event
and where they go, from two callgrind runs that differ only in the passes over the stream."""
from __future__ import annotations

import subprocess
import sys

from hass_edge_tools.bench.harness import Harness, log
from hass_edge_tools.bench.profiles import callgrind_hot, callgrind_total


def measure(h: Harness) -> None:
    if not h.ingest:
        log("2a. skipped: no ingest bench binary")
        return
    log("2a. in-process ingest (benches/ingest.rs)")
    v = h.peer.version
    if h.smoke:
        extra = ["--events", "5000", "--seconds", "0.3", "--rounds", "2", "--frames", "all"]
    else:
        extra = ["--events", "20000", "--seconds", "2", "--rounds", "5", "--frames", "all"]
    out = subprocess.run(["taskset", "-c", "1", str(h.ingest), "--version", v] + extra, capture_output=True, text=True, check=True)
    sys.stderr.write(out.stderr)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    kv = dict(x.split("=", 1) for x in line.split()[1:])
    res = {k: float(x) for k, x in kv.items()}
    for l in out.stdout.splitlines():
        if not l.startswith("RESULT"):
            log("   " + l)
    # Instructions per event: two callgrind runs that differ only in the number of passes
    # over the same stream; the difference cancels the set-up (fixtures, CA roots, stream).
    events = 2000 if h.smoke else 20000
    irs = {}
    for passes in (1, 3):
        cg = h.work / f"callgrind.{passes}.out"
        p = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={cg}", str(h.ingest), "--version", v, "--events", str(events), "--passes", str(passes), "--frames", "mixed"],
            capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"callgrind run failed: {p.stderr[-2000:]}")
        irs[passes] = callgrind_total(cg)
    res["ir_per_event"] = (irs[3] - irs[1]) / (2 * events)
    res["callgrind_events"] = events
    res["hot"] = callgrind_hot(h.work / "callgrind.1.out", h.work / "callgrind.3.out", 2 * events)
    log(f"   {res['mixed_events_per_sec']:.0f} events/s, {res['ir_per_event']:.0f} Ir/event")
    h.r["ingest"] = res
