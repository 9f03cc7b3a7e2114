"""Is hass-edge's mirror equal to Home Assistant's states? Compares GET /api/states of both
for the entities the daemon's default filter tracks."""
from __future__ import annotations

import http.client
import time

from hass_edge_tools.daemon import Daemon
from hass_edge_tools.peer import Peer

# Domains the default filter leaves out (config.rs RawFilter::default).
EXCLUDED_DOMAINS = ("media_player", "camera", "automation")


def tracked_by_default(entity_id: str) -> bool:
    return entity_id.split(".", 1)[0] not in EXCLUDED_DOMAINS


def mirror_diff(peer: Peer, daemon: Daemon) -> tuple[list[str], list[str], list[str]]:
    """(differing, missing in ours, extra in ours) for the entities the default filter tracks."""
    ha = {k: v for k, v in peer.states().items() if tracked_by_default(k)}
    ours = daemon.states()
    differ = sorted(k for k in ha if k in ours and ours[k] != ha[k])
    missing = sorted(k for k in ha if k not in ours)
    extra = sorted(k for k in ours if k not in ha)
    return differ, missing, extra


def wait_mirror(peer: Peer, daemon: Daemon, timeout: float = 15) -> tuple[float | None, str]:
    """Waits until our /api/states equals HA's for the tracked entities. Returns (seconds or
    None, last difference)."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout:
        try:
            differ, missing, extra = mirror_diff(peer, daemon)
        except (OSError, RuntimeError, http.client.HTTPException) as e:
            last = str(e)
        else:
            if not (differ or missing or extra):
                return time.monotonic() - t0, ""
            last = f"differ {differ[:5]} missing {missing[:5]} extra {extra[:5]}"
        time.sleep(0.1)
    return None, last


def explain_diff(peer: Peer, daemon: Daemon, entity_id: str) -> str:
    """How one entity differs between HA and us, attribute by attribute."""
    ha = peer.states().get(entity_id)
    ours = daemon.states().get(entity_id)
    if not ha or not ours:
        return f"{entity_id}: HA {bool(ha)} ours {bool(ours)}"
    keys = sorted(k for k in set(ha) | set(ours) if ha.get(k) != ours.get(k))
    return f"{entity_id}: " + "; ".join(f"{k}: HA {ha.get(k)!r:.120} ours {ours.get(k)!r:.120}" for k in keys)
