"""hass-edge's benchmarks against a real Home Assistant in the same run (issue #6), one
module for each thing measured: ingest (in process), ingest_e2e, reads, freshness, memory,
idle, ha_load, sizes. `python -m hass_edge_tools.bench` runs them (measure/bench.sh starts
it); harness holds what they share, report writes BENCHMARKS.md, profiles reads valgrind's
and perf's output."""
