#!/usr/bin/env bash
# install.sh VERSION — install a real Home Assistant Core VERSION from PyPI into
# ${HASS_EDGE_PEER_CACHE:-$HOME/.cache/hass-edge}/ha-VERSION, complete enough
# that `hass --skip-pip` starts offline with tests/ha-peer/config.
#
# Idempotent: the venv gets a marker file when it is complete; a later run
# with the same recipe returns at once.  Concurrent runs for the same VERSION
# serialize on a lock file.  See README.md.
#
# Environment:
#   HASS_EDGE_PEER_CACHE    cache dir (default ~/.cache/hass-edge)
#   HASS_EDGE_PEER_PYTHON   Python interpreter to build the venv with
#                           (default: picked by HA version, from pyenv or PATH)
#   HASS_EDGE_PEER_FORCE=1  rebuild the venv from scratch
#   HASS_EDGE_PEER_SUITE    Debian suite of the root for HA >= 2025.5 (forky)
#   HASS_EDGE_PEER_MIRROR   Debian mirror (http://deb.debian.org/debian)
#
# HA 2025.5 and later need a newer Python than this machine has (>= 3.13.2;
# 2026.3+ >= 3.14.2).  For them the cache dir holds a Debian root made with
# debootstrap (ha-VERSION/rootfs, Debian's python3) with HA in a venv at
# /opt/ha inside it; ha-VERSION itself is then a small host venv (the host's
# Python + aiohttp, for peer.py's client commands and the bench/reliability
# harnesses) whose bin/hass and bin/ha-python run HA's Python in the root
# (bin/in-root, a copy of in-root.sh: chroot in a private mount namespace,
# host network, same pid).  Callers see the same layout for every version.
set -euo pipefail

# Bump when the install steps change in a way that needs existing venvs redone.
RECIPE=2
# Bump when the root's steps (ROOTFS=1 versions only) change.
ROOT_RECIPE=1

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
say() { printf '[install.sh] %s\n' "$*" >&2; }
die() { printf '[install.sh] error: %s\n' "$*" >&2; exit 1; }

[[ $# -eq 1 && -n "$1" ]] || { echo "usage: $0 VERSION   (e.g. 2024.3.3, 2025.4.4, 2026.11.0)" >&2; exit 2; }
VERSION=$1
[[ $VERSION =~ ^20[0-9]{2}\.[0-9]{1,2}\.[0-9]+$ ]] || die "not a Home Assistant version: $VERSION"

CACHE=${HASS_EDGE_PEER_CACHE:-$HOME/.cache/hass-edge}
VENV=$CACHE/ha-$VERSION
MARKER=$VENV/.hass-edge-peer-complete
# The configuration this version runs with (ha-peer.sh renders it per version).
CONFIG=$CACHE/.ha-$VERSION.configuration.yaml
mkdir -p "$CACHE"
bash "$HERE/ha-peer.sh" _render-config "$VERSION" >"$CONFIG.tmp" && mv "$CONFIG.tmp" "$CONFIG" \
	|| die "cannot render the configuration for $VERSION"

# The integrations we load decide what HA would pip-install: re-install when
# the set of top-level keys / platforms in the config changes.
config_sig() {
	grep -E '^[a-z_]+:|platform:' "$CONFIG" | sed -e 's/[[:space:]]*#.*//' -e 's/[[:space:]]*$//' \
		| sort -u | sha256sum | cut -c1-16
}
want_marker() {
	printf 'recipe=%s version=%s config=%s' "$RECIPE" "$VERSION" "$(config_sig)"
	if ((ROOTFS)); then printf ' root=%s.%s' "$SUITE" "$ROOT_RECIPE"; fi
	printf '\n'
}

# ---- which Python -------------------------------------------------------------
# HA's minimum Python by release: <=2024.3 -> 3.11, 2024.4..2025.1 -> 3.12,
# 2025.2..2025.4 -> 3.13.0, 2025.5..2026.2 -> 3.13.2, 2026.3+ -> 3.14.2.
# pyenv here tops out at 3.13.0: 2025.5+ run on Debian's python3 in a root
# (ROOTFS=1); the host Python then only runs the helper venv.  Only 2026.11.0
# has been tried that way.
IFS=. read -r Y M _ <<<"$VERSION"
YM=$((10#$Y * 100 + 10#$M))
ROOTFS=0
if ((YM <= 202403)); then PYVER=3.11
elif ((YM <= 202501)); then PYVER=3.12
elif ((YM <= 202504)); then PYVER=3.13
else ROOTFS=1; PYVER=3.11
fi
SUITE=${HASS_EDGE_PEER_SUITE:-forky}
MIRROR=${HASS_EDGE_PEER_MIRROR:-http://deb.debian.org/debian}
ROOTDIR=$VENV/rootfs
# Debian's python3 for HA, a compiler for the few wheels PyPI lacks for it
# (pymicro-vad, pyspeex-noise: C++), tzdata for HA's time zone.
ROOT_PKGS="python3 python3-venv python3-dev g++ make tzdata ca-certificates"

# ---- fast path --------------------------------------------------------------
WANT=$(want_marker)
if [[ ${HASS_EDGE_PEER_FORCE:-0} != 1 && -f $MARKER && -x $VENV/bin/hass ]] \
	&& [[ $(head -n1 "$MARKER") == "$WANT" ]]; then
	say "Home Assistant $VERSION already installed in $VENV"
	exit 0
fi


# ---- pick the Python ----------------------------------------------------------
find_python() {
	local roots=() r cand
	if command -v pyenv >/dev/null 2>&1; then roots+=("$(pyenv root 2>/dev/null || true)"); fi
	roots+=("${PYENV_ROOT:-}" "$HOME/.pyenv")
	for r in "${roots[@]}"; do
		[[ -n $r && -d $r/versions ]] || continue
		cand=$(ls -d "$r/versions/$PYVER".* 2>/dev/null | grep -E "/$PYVER\.[0-9]+$" | sort -V | tail -n1 || true)
		if [[ -n $cand && -x $cand/bin/python$PYVER ]]; then echo "$cand/bin/python$PYVER"; return 0; fi
	done
	if command -v "python$PYVER" >/dev/null 2>&1; then command -v "python$PYVER"; return 0; fi
	return 1
}
if [[ -n ${HASS_EDGE_PEER_PYTHON:-} ]]; then
	PY=$HASS_EDGE_PEER_PYTHON
else
	PY=$(find_python) || die "Python $PYVER not found (looked in pyenv's versions/ and PATH); HA $VERSION needs it. Set HASS_EDGE_PEER_PYTHON=/path/to/python$PYVER"
fi
PYFULL=$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])') || die "cannot run $PY"
"$PY" -c 'import venv, ensurepip' 2>/dev/null || die "$PY has no venv/ensurepip module"

mkdir -p "$CACHE"
exec 9>"$CACHE/.ha-$VERSION.lock"
if ! flock -n 9; then
	say "another install of $VERSION is running; waiting for it (up to 15 min)"
	flock -w 900 9 || die "timed out waiting for the lock $CACHE/.ha-$VERSION.lock"
	if [[ -f $MARKER && $(head -n1 "$MARKER") == "$WANT" && ${HASS_EDGE_PEER_FORCE:-0} != 1 ]]; then
		say "Home Assistant $VERSION was installed meanwhile in $VENV"
		exit 0
	fi
fi

T0=$(date +%s)
LOG=$CACHE/ha-$VERSION.install.log
: >"$LOG"
say "installing Home Assistant $VERSION with Python $PYFULL ($PY) into $VENV"
say "pip output goes to $LOG"
run_logged() {
	# run a command with its output in $LOG; on failure show the tail
	echo "+ $*" >>"$LOG"
	if ! "$@" >>"$LOG" 2>&1; then
		tail -n 40 "$LOG" >&2
		die "failed: $* (full log: $LOG)"
	fi
}

rm -f "$MARKER"
if [[ ${HASS_EDGE_PEER_FORCE:-0} == 1 && -d $VENV ]]; then
	say "HASS_EDGE_PEER_FORCE=1: removing $VENV"
	rm -rf "$VENV"
fi
if [[ -d $VENV ]]; then
	have=$("$VENV/bin/python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || true)
	if [[ $have != "$PYFULL" ]]; then
		say "existing $VENV is unusable (python '${have:-none}', want $PYFULL): removing it"
		rm -rf "$VENV"
	else
		say "reusing the incomplete venv $VENV (no or outdated marker)"
	fi
fi
if [[ ! -d $VENV/bin ]]; then
	say "creating the venv"
	run_logged "$PY" -m venv "$VENV"
fi

# setup_root: the Debian root for ROOTFS versions, with an empty venv /opt/ha
# in it; sets VPY (a command running the root's HA venv Python).
setup_root() {
	local done=$ROOTDIR/.hass-edge-root-complete script pyv
	((EUID == 0)) || die "HA $VERSION runs in a Debian root: debootstrap, chroot and a mount namespace need root (2024.3.3 and 2025.4.4 do not)"
	install -m 755 "$HERE/in-root.sh" "$VENV/bin/in-root"
	if [[ ! -f $done || $(head -n1 "$done") != "suite=$SUITE" ]]; then
		command -v debootstrap >/dev/null 2>&1 \
			|| die "debootstrap is missing (apt-get install debootstrap; scripts/packaging-deps.sh installs it)"
		rm -rf "$ROOTDIR" "$ROOTDIR.tmp"
		# bookworm's debootstrap has no script for forky (testing): sid's fits
		script=/usr/share/debootstrap/scripts/$SUITE
		[[ -e $script ]] || script=/usr/share/debootstrap/scripts/sid
		say "debootstrap $SUITE (minbase + $ROOT_PKGS) into $ROOTDIR"
		run_logged debootstrap --variant=minbase --include="${ROOT_PKGS// /,}" \
			"$SUITE" "$ROOTDIR.tmp" "$MIRROR" "$script"
		rm -rf "$ROOTDIR.tmp/var/cache/apt/archives"/*.deb
		mv "$ROOTDIR.tmp" "$ROOTDIR"
		printf 'suite=%s\npkgs=%s\n' "$SUITE" "$ROOT_PKGS" >"$done"
	fi
	# pip inside the root reaches PyPI like the host: same DNS, same CA bundle
	cp -L /etc/resolv.conf "$ROOTDIR/etc/resolv.conf"
	# (the host's bundle may hold a local CA: it replaces the root's)
	cp -L "${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}" "$ROOTDIR/etc/ssl/certs/ca-certificates.crt"
	export PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
	unset PIP_FIND_LINKS # a host directory
	if [[ $(sed -n 2p "$done") != "pkgs=$ROOT_PKGS" ]]; then
		say "apt-get install $ROOT_PKGS in the root"
		run_logged "$VENV/bin/in-root" "$ROOTDIR" -- /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
			-o Acquire::Check-Valid-Until=false # the mirror's Release may be past Valid-Until
		run_logged "$VENV/bin/in-root" "$ROOTDIR" -- /usr/bin/env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $ROOT_PKGS
		"$VENV/bin/in-root" "$ROOTDIR" -- /usr/bin/apt-get clean
		printf 'suite=%s\npkgs=%s\n' "$SUITE" "$ROOT_PKGS" >"$done"
	fi
	pyv=$("$VENV/bin/in-root" "$ROOTDIR" -- /usr/bin/python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])') \
		|| die "cannot run python3 in $ROOTDIR"
	ROOTPY=$pyv
	say "Debian $SUITE root: Python $pyv"
	if [[ ! -x $ROOTDIR/opt/ha/bin/python ]]; then
		run_logged "$VENV/bin/in-root" "$ROOTDIR" -- /usr/bin/python3 -m venv /opt/ha
	fi
	VPY=("$VENV/bin/in-root" "$ROOTDIR" --auto-bind -- /opt/ha/bin/python)
}

# VPY runs the Python of HA's venv; VIN is that venv's path as VPY sees it,
# VFS the same directory as seen from here.
if ((ROOTFS)); then
	ROOTPY=""
	setup_root
	VIN=/opt/ha VFS=$ROOTDIR/opt/ha
else
	VPY=("$VENV/bin/python")
	VIN=$VENV VFS=$VENV
fi
PIP=("${VPY[@]}" -m pip --disable-pip-version-check --no-input)

say "downloading the homeassistant==$VERSION wheel"
DL=$VFS/.download
mkdir -p "$DL"
run_logged "${PIP[@]}" download --no-deps --only-binary=:all: -d "$VIN/.download" "homeassistant==$VERSION"
WHEEL=$(ls "$DL"/homeassistant-"$VERSION"-*.whl 2>/dev/null | head -n1)
[[ -n $WHEEL ]] || die "no homeassistant $VERSION wheel in $DL"
WHEEL=$VIN/.download/$(basename "$WHEEL")

say "extracting homeassistant/package_constraints.txt from $(basename "$WHEEL")"
CONSTRAINTS=$VIN/ha-package-constraints.txt
"${VPY[@]}" - "$WHEEL" "$CONSTRAINTS" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    data = z.read("homeassistant/package_constraints.txt")
open(sys.argv[2], "wb").write(data)
EOF
say "  $(grep -cE '^[A-Za-z]' "$VFS/ha-package-constraints.txt") constraints"

EXTRA=()
if ((YM < 202500)); then
	# josepy 2 removed APIs acme (HA's dep) uses: every HTTP request answers 500.
	EXTRA+=("josepy==1.14.0")
fi

say "pip install homeassistant==$VERSION${EXTRA[*]:+ ${EXTRA[*]}} (constrained; takes about a minute)"
run_logged "${PIP[@]}" install --progress-bar off -c "$CONSTRAINTS" "$WHEEL" "${EXTRA[@]}"
got=$("${VPY[@]}" -c 'from homeassistant.const import __version__; print(__version__)') || die "homeassistant does not import"
[[ $got == "$VERSION" ]] || die "installed homeassistant is $got, not $VERSION"

say "finding what HA would pip-install on first start for $CONFIG"
mapfile -t REQS < <("${VPY[@]}" "$HERE/peer.py" requirements -v "$CONFIG" 2>>"$LOG")
((${#REQS[@]} > 0)) || die "no requirements computed (see $LOG)"
say "  ${#REQS[@]} requirements: ${REQS[*]}"
run_logged "${PIP[@]}" install --progress-bar off -c "$CONSTRAINTS" "${REQS[@]}" "${EXTRA[@]}"

say "checking that HA sees every requirement as installed (so --skip-pip is safe)"
"${VPY[@]}" - "${REQS[@]}" <<'EOF' || die "requirements missing after install"
import sys
from homeassistant.util.package import is_installed
missing = [r for r in sys.argv[1:] if not is_installed(r)]
if missing:
    print("[install.sh] not installed:", " ".join(missing), file=sys.stderr)
    sys.exit(1)
EOF
# Modules HA imports at run time without them being requirements of anything
# we load: WS get_services validates services.yaml files with
# helpers.service._base_components(), which imports camera -> stream -> numpy
# (without numpy, get_services answers unknown_error).  Install numpy, then
# import _base_components() and install whatever else turns up missing.
say "checking the imports of WS get_services (helpers.service._base_components)"
RUNTIME=(numpy)
run_logged "${PIP[@]}" install --progress-bar off -c "$CONSTRAINTS" "${RUNTIME[@]}"
mod=""
for _ in 1 2 3 4 5 6 7 8 9 10 11 12; do
	rc=0
	mod=$("${VPY[@]}" -c '
import sys, traceback
try:
    from homeassistant.helpers import service
    f = getattr(service, "_base_components", None)
    if f is not None:
        f()
except ModuleNotFoundError as err:
    print((err.name or "?").split(".")[0])
except Exception:
    traceback.print_exc()
    sys.exit(1)
' 2>>"$LOG") || rc=$?
	((rc == 0)) || die "importing homeassistant.helpers.service failed (see $LOG)"
	[[ -n $mod ]] || break
	case $mod in # module -> distribution, for the usual suspects
	PIL) dist=Pillow ;; turbojpeg) dist=PyTurboJPEG ;; haffmpeg) dist=ha-ffmpeg ;;
	pymicro_vad) dist=pymicro-vad ;; pyspeex_noise) dist=pyspeex-noise ;; *) dist=$mod ;;
	esac
	if ! grep -qiE "^${dist//[-_.]/[-_.]}[=<>~ ]" "$VFS/ha-package-constraints.txt"; then
		die "module '$mod' is missing and '$dist' is not in HA's package_constraints.txt: add it to install.sh"
	fi
	say "  module '$mod' missing: pip install $dist"
	run_logged "${PIP[@]}" install --progress-bar off -c "$CONSTRAINTS" "$dist"
	RUNTIME+=("$dist")
done
[[ -z $mod ]] || die "modules still missing after 12 rounds (see $LOG)"

"${PIP[@]}" check >>"$LOG" 2>&1 || say "note: 'pip check' reports conflicts (see $LOG); HA runs anyway"

if ((ROOTFS)); then
	# The host side of a root peer: bin/python (the host's, with aiohttp) runs
	# peer.py's client commands and the bench/reliability harnesses; bin/hass
	# and bin/ha-python run the root's HA venv (ha-peer.sh uses ha-python for
	# what imports homeassistant).  The same pid all the way down (in-root.sh).
	say "host helper venv: aiohttp for $PY; bin/hass and bin/ha-python run in the root"
	run_logged "$VENV/bin/python" -m pip --disable-pip-version-check --no-input install --progress-bar off aiohttp
	for w in hass python; do
		name=$w
		[[ $w == python ]] && name=ha-python
		printf '#!/bin/sh\n# Home Assistant %s in its Debian root (see install.sh)\nexec "%s" "%s" --auto-bind -- /opt/ha/bin/%s "$@"\n' \
			"$VERSION" "$VENV/bin/in-root" "$ROOTDIR" "$w" >"$VENV/bin/$name.tmp"
		chmod 755 "$VENV/bin/$name.tmp"
		mv "$VENV/bin/$name.tmp" "$VENV/bin/$name"
	done
	got=$("$VENV/bin/ha-python" -c 'from homeassistant.const import __version__; print(__version__)') \
		|| die "bin/ha-python does not run"
	[[ $got == "$VERSION" ]] || die "bin/ha-python has homeassistant $got, not $VERSION"
fi

rm -rf "$DL"
{
	want_marker
	if ((ROOTFS)); then
		echo "python=$ROOTPY (Debian $SUITE root $ROOTDIR, /opt/ha); helper python=$PYFULL ($PY)"
	else
		echo "python=$PYFULL ($PY)"
	fi
	echo "installed=$(date -u +%Y-%m-%dT%H:%M:%SZ) seconds=$(($(date +%s) - T0))"
	printf 'requirement=%s\n' "${REQS[@]}" "${EXTRA[@]}" "${RUNTIME[@]}"
} >"$MARKER.tmp"
mv "$MARKER.tmp" "$MARKER"
say "done in $(($(date +%s) - T0)) s: $VENV/bin/hass (marker $MARKER)"
