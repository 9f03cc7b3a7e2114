#!/usr/bin/env bash
# fuzz/run.sh [SECONDS] — runs each cargo-fuzz target of hass-edge for SECONDS (default 60)
# and prints a table: target, executions, exec/s, corpus, crashes. Exits non-zero when a
# target crashed, hung (libFuzzer -timeout) or ran out of memory; the input is then in
# fuzz/artifacts/<target>/ — copy it to tests/fuzz_regressions/<target>/ so that
# `cargo test --test fuzz_regressions` (stable) replays it.
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Environment: FUZZ_TARGETS (default "http_request ha_frame config entity_id sse_selection
#              state_file ws_session"),
#              FUZZ_ARGS (extra libFuzzer flags, e.g. "-jobs=2 -workers=2").
# Seeds: fuzz/seeds/<target>/ (tracked; fuzz/make_seeds.py writes them); what the fuzzer
# learns goes to fuzz/corpus/<target>/ (git-ignored) and is reused by later runs.
set -uo pipefail

SECS=${1:-60}
[[ $SECS =~ ^[0-9]+$ ]] || { echo "usage: $0 [SECONDS]" >&2; exit 2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE"
TARGETS=${FUZZ_TARGETS:-http_request ha_frame config entity_id sse_selection state_file ws_session}
LOGS=$HERE/logs
mkdir -p "$LOGS"

if [[ ! -d seeds/ha_frame || ! -d seeds/state_file || ! -d seeds/ws_session ]]; then
	python3 make_seeds.py
fi

echo "building fuzz targets (cargo +nightly fuzz build)…" >&2
if ! cargo +nightly fuzz build >"$LOGS/build.log" 2>&1; then
	tail -n 40 "$LOGS/build.log" >&2
	echo "fuzz build failed" >&2
	exit 1
fi

declare -A max_len=([http_request]=12000 [ha_frame]=32768 [config]=4096 [entity_id]=12000
	[sse_selection]=8192 [state_file]=65536 [ws_session]=16384)
rows=()
failed=0
for t in $TARGETS; do
	mkdir -p "corpus/$t" "artifacts/$t"
	before=$(find "artifacts/$t" -type f | sort)
	echo "fuzzing $t for ${SECS}s…" >&2
	# -timeout: an input taking longer than 10 s counts as a hang (saved as timeout-*).
	cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
		-max_total_time="$SECS" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
		-max_len="${max_len[$t]:-8192}" ${FUZZ_ARGS:-} >"$LOGS/$t.log" 2>&1
	rc=$?
	execs=$(awk '/stat::number_of_executed_units/ {s += $2} END {print s + 0}' "$LOGS/$t.log")
	rate=$(awk '/stat::average_exec_per_sec/ {s += $2} END {print s + 0}' "$LOGS/$t.log")
	corpus=$(find "corpus/$t" -type f | wc -l)
	new=$(comm -13 <(echo "$before") <(find "artifacts/$t" -type f | sort) | grep -v '^$' || true)
	crashes=$(printf '%s\n' "$new" | grep -c . || true)
	if ((rc != 0)) && ((crashes == 0)); then
		crashes="?(rc $rc)"
	fi
	rows+=("$t|$execs|$rate|$corpus|$crashes")
	# Every run of every target is kept (one line each) for the summary.
	kcount=$crashes
	[[ $kcount =~ ^[0-9]+$ ]] || kcount=1
	echo "$t|$execs|$rate|$corpus|$kcount|$SECS|$(date -u '+%Y-%m-%d %H:%M UTC')" >>"$LOGS/$t.history"
	if ((rc != 0)) || [[ $crashes != 0 ]]; then
		failed=1
		echo "!! $t: exit code $rc; new artifacts:" >&2
		printf '   %s\n' $new >&2
		grep -m1 -A12 -E "panicked|ERROR: (libFuzzer|AddressSanitizer)|SUMMARY" "$LOGS/$t.log" >&2 || tail -n 20 "$LOGS/$t.log" >&2
	fi
done

printf '\n%-14s %14s %10s %8s %8s\n' target executions exec/s corpus crashes
for row in "${rows[@]}"; do
	IFS='|' read -r t e r c k <<<"$row"
	printf '%-14s %14s %10s %8s %8s\n' "$t" "$e" "$r" "$c" "$k"
done
echo "(${SECS}s per target; logs in $LOGS)"
{
	printf '%-14s %5s %8s %14s %12s %8s %8s  %s\n' target runs seconds executions "last exec/s" corpus crashes "last run"
	for f in "$LOGS"/*.history; do
		awk -F'|' '{n++; e += $2; s += $6; k += $5; r = $3; c = $4; w = $7; t = $1}
			END {printf "%-14s %5d %8d %14d %12d %8d %8d  %s\n", t, n, s, e, r, c, k, w}' "$f"
	done
	echo "(all runs of fuzz/run.sh on this checkout; $(nproc) cores shared with other work; corpus = inputs now in fuzz/corpus/<target>)"
} >"$LOGS/summary.txt"
exit $failed
