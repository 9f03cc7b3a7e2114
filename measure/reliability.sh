#!/usr/bin/env bash
# measure/reliability.sh [--short]: runs the whole reliability suite (issue #6) against real
# Home Assistant peers (tests/ha-peer, ports 18200-18209) and the real hass-edge binary,
# writes RELIABILITY.md (what was tried, how often, what held, figures, machine) and prints
# a summary. Exits non-zero when any check failed.
#
#   --short   small counts for a CI smoke run (≈ 7 min instead of ≈ 50 min)
#
# Environment: HA_VERSION (default 2025.4.4), HASS_EDGE_BIN (default: built here with
# `--profile fast` into CARGO_TARGET_DIR, default target/), REL_WORK (default
# /tmp/hass-edge-rel), REL_RESULTS (per-script results, default measure/results),
# REL_REPORT (the report, default RELIABILITY.md), REL_ONLY (names of
# the scripts to run, e.g. "flood auth"), and per-script overrides:
# REL_RESTARTS, REL_AUTH_WINDOW, REL_FLOOD_ARGS, REL_ABUSE_ARGS, REL_HALF_OPEN_ARGS,
# REL_STARVE_ARGS.
# The scripts are modules of measure/hass_edge_tools/reliability/, run with python3 -m.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
export PYTHONPATH=$HERE${PYTHONPATH:+:$PYTHONPATH}
REL=hass_edge_tools.reliability
MODE=full
[[ ${1:-} == --short ]] && MODE=short
export REL_RESULTS=${REL_RESULTS:-$HERE/results}
mkdir -p "$REL_RESULTS"

REPORT=${REL_REPORT:-$ROOT/RELIABILITY.md}
if [[ -z ${HASS_EDGE_BIN:-} ]]; then
	TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
	echo "building hass-edge (--profile fast: release without LTO, in $TARGET)…" >&2
	(cd "$ROOT" && cargo build --profile fast --bin hass-edge) >&2 || exit 1
	export HASS_EDGE_BIN=$TARGET/fast/hass-edge
fi
bash "$ROOT/tests/ha-peer/install.sh" "${HA_VERSION:-2025.4.4}" >&2 || exit 1

if [[ $MODE == short ]]; then
	RESTARTS=${REL_RESTARTS:-6}
	HALF=${REL_HALF_OPEN_ARGS:---rounds 2}
	AUTH_WINDOW=${REL_AUTH_WINDOW:-60}
	FLOOD=${REL_FLOOD_ARGS:---flood 10 --budget 30 --overflow 10}
	ABUSE=${REL_ABUSE_ARGS:---short}
	STARVE=${REL_STARVE_ARGS:---short}
else
	RESTARTS=${REL_RESTARTS:-50}
	HALF=${REL_HALF_OPEN_ARGS:---rounds 6}
	AUTH_WINDOW=${REL_AUTH_WINDOW:-600}
	FLOOD=${REL_FLOOD_ARGS:---flood 60 --budget 600 --overflow 30}
	ABUSE=${REL_ABUSE_ARGS:-}
	STARVE=${REL_STARVE_ARGS:-}
fi

declare -A cmds=(
	[ha_restarts]="python3 -m $REL.ha_restarts $RESTARTS"
	[half_open]="python3 -m $REL.half_open $HALF"
	[auth]="python3 -m $REL.auth --window $AUTH_WINDOW"
	[flood]="python3 -m $REL.flood $FLOOD"
	[http_abuse]="python3 -m $REL.http_abuse $ABUSE"
	[starve]="python3 -m $REL.starve $STARVE"
)
ORDER=${REL_ONLY:-ha_restarts half_open auth flood http_abuse starve}
failed=()
start=$(date +%s)
# Results are <name>.* for the default HA version, <name>@<version>.* for another (as
# common.Report names its JSON), so a run against another version keeps the default's results.
VERSION=${HA_VERSION:-2025.4.4}
for name in $ORDER; do
	stem=$name
	[[ $VERSION == 2025.4.4 ]] || stem="$name@$VERSION"
	# Results of scripts not run now (REL_ONLY) stay and are reported as they were.
	rm -f "$REL_RESULTS/$stem".{json,log,rc}
	echo "=== $stem: ${cmds[$name]}" >&2
	t0=$(date +%s)
	${cmds[$name]} 2>&1 | tee "$REL_RESULTS/$stem.log"
	rc=${PIPESTATUS[0]}
	echo "$rc $(($(date +%s) - t0)) ${cmds[$name]}" >"$REL_RESULTS/$stem.rc"
	((rc == 0)) || failed+=("$name")
done

python3 -m $REL.report "$REL_RESULTS" "$MODE" "$(($(date +%s) - start))" >"$REPORT"
echo
echo "== reliability suite ($MODE): $(($(date +%s) - start))s; $REPORT written"
for name in $ORDER; do
	stem=$name
	[[ $VERSION == 2025.4.4 ]] || stem="$name@$VERSION"
	[[ -f $REL_RESULTS/$stem.rc ]] || continue
	read -r rc secs _ <"$REL_RESULTS/$stem.rc"
	printf '   %-12s %s (%ss)\n' "$stem" "$([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc)")" "$secs"
done
((${#failed[@]} == 0))
