#!/usr/bin/env bash
# ha_restarts.sh [N]: N (default 50) restarts of the real HA peer (restart / hup / kill+start);
# after each, hass-edge must reconnect and mirror HA exactly. See ha_restarts.py.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec python3 "$HERE/ha_restarts.py" "${1:-50}" "${@:2}"
