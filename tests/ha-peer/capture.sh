#!/usr/bin/env bash
# capture.sh VERSION PORT OUT_DIR — record real Home Assistant frames for
# tests/fixtures/VERSION: starts a fresh peer (ha-peer.sh, temporary DIR),
# runs capture.py against it (REST samples, auth, get_*, subscribe_entities
# with and without the server-side filter, coalesced frames, state changes,
# service_registered/removed, a restart transcript), waits until HA is back
# after the restart, stops it.  OUT_DIR gets every file; copy what the tests
# replay into tests/fixtures/VERSION (see tests/fixtures/README-2026.11.0.md).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -eq 3 ]] || { echo "usage: $0 VERSION PORT OUT_DIR" >&2; exit 2; }
VERSION=$1 PORT=$2 OUT=$3
DIR=$(mktemp -d "${TMPDIR:-/tmp}/ha-capture.XXXXXX")
trap 'bash "$HERE/ha-peer.sh" stop "$DIR" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
bash "$HERE/ha-peer.sh" start "$VERSION" "$DIR" "$PORT" >/dev/null
"$(cat "$DIR/venv")/bin/python" "$HERE/capture.py" "$DIR" "$OUT"
bash "$HERE/ha-peer.sh" wait-running "$DIR"
echo "[capture] $VERSION frames in $OUT" >&2
