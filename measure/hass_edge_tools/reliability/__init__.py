"""hass-edge's reliability suite against a real Home Assistant (issue #6): one module for
each script (ha_restarts, half_open, auth, flood, http_abuse), each run with `python3 -m`;
common holds their settings and bookkeeping, report writes RELIABILITY.md.
measure/reliability.sh runs them all."""
