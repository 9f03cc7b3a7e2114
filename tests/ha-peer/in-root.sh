#!/usr/bin/env bash
# in-root.sh ROOT [--bind PATH]... [--auto-bind] -- CMD [ARG]...
#
# Runs CMD chrooted into the Debian root ROOT (made by install.sh for HA
# versions that need a newer Python than this machine has), in a private
# mount namespace: /proc, /dev and /sys are bind-mounted in, and every PATH
# at the same path inside the root.  --auto-bind also binds every absolute
# path among CMD's arguments that exists on the host (a directory itself, a
# file's directory), so `hass -c DIR` and `python peer.py ... --dir DIR` see
# DIR.  System directories of the root (/usr, /etc, /opt, ...) are never
# shadowed.
#
# No fork on the way: in-root.sh execs unshare, which execs this script
# again, which execs chroot, which execs CMD — so the pid of `in-root.sh`
# is CMD's pid, and a signal sent to it (SIGKILL, SIGTERM, SIGHUP) reaches
# CMD itself.  The mounts vanish with the namespace when CMD exits; nothing
# is left to clean up.  The network is the host's (no network namespace):
# a server in the root listening on 127.0.0.1 is on the host's loopback.
#
# install.sh copies this file into the peer's cache (bin/in-root), so the
# installed peer does not depend on this checkout.
set -euo pipefail

die() { printf '[in-root] error: %s\n' "$*" >&2; exit 1; }

# A host path we may bind at the same place inside the root.
bindable() {
	local p=$1 top
	[[ $p == /* && $p != / && -e $p ]] || return 1
	top=${p#/}
	top=${top%%/*}
	case $top in
	usr | lib | lib32 | lib64 | bin | sbin | etc | opt | proc | dev | sys | boot | run | var) return 1 ;;
	esac
	return 0
}

if [[ ${1:-} == _inner ]]; then
	shift
	ROOT=$1
	shift
	mount --rbind /proc "$ROOT/proc"
	mount --rbind /dev "$ROOT/dev"
	mount --rbind /sys "$ROOT/sys"
	while [[ ${1:-} == --bind ]]; do
		p=$2
		shift 2
		[[ -d $p ]] || p=$(dirname "$p")
		mkdir -p "$ROOT$p"
		mount --bind "$p" "$ROOT$p"
	done
	[[ ${1:-} == -- ]] && shift
	exec chroot "$ROOT" "$@"
fi

(($# >= 3)) || die "usage: $0 ROOT [--bind PATH]... [--auto-bind] -- CMD [ARG]..."
ROOT=$(cd "$1" && pwd -P) || die "no root $1"
shift
[[ -x $ROOT/usr/bin/env ]] || die "$ROOT is not a Debian root"
binds=()
auto=0
while (($#)); do
	case $1 in
	--bind) bindable "$2" || die "cannot bind $2"; binds+=(--bind "$2"); shift 2 ;;
	--auto-bind) auto=1; shift ;;
	--) shift; break ;;
	*) die "unexpected argument $1 (missing --?)" ;;
	esac
done
(($#)) || die "no command"
if ((auto)); then
	for a in "$@"; do
		bindable "$a" && binds+=(--bind "$a")
	done
fi
exec unshare --mount --propagation private -- "$BASH" "${BASH_SOURCE[0]}" _inner "$ROOT" "${binds[@]}" -- "$@"
