"""Test and measurement tooling of hass-edge: one package, imported normally.

Run from the repository root with `PYTHONPATH=measure` (measure/bench.sh and
measure/reliability.sh set it), e.g. `PYTHONPATH=measure python3 -m hass_edge_tools.reliability.auth`.

Shared by both suites:
  peer      the real Home Assistant peer (tests/ha-peer/ha-peer.sh) and its REST API
  daemon    the real hass-edge binary: config, start, stop, /health, /metrics, /api/states
  mirror    is hass-edge's /api/states equal to HA's for the tracked entities
  client    a small keep-alive HTTP/1.1 client for loopback
  procfs    CPU time, memory, context switches and affinity from /proc
  stats     percentiles and spreads
  machine   what the machine is and how busy it was
The suites:
  bench        benchmarks against HA in the same run → BENCHMARKS.md (measure/bench.sh)
  reliability  restarts, half-open TCP, auth, floods, HTTP abuse → RELIABILITY.md
               (measure/reliability.sh)

Only 127.0.0.0/8 is ever contacted.
"""
from pathlib import Path

# The repository: measure/hass_edge_tools/__init__.py is two folders below it.
ROOT = Path(__file__).resolve().parents[2]
