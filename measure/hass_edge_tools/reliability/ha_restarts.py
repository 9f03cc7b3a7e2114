"""HA restarts (issue #6): N times (default 50) restart the real HA peer — graceful
`restart` (homeassistant.restart), `hup` (SIGHUP) or `kill` (SIGKILL) + `start` — and after
each one check that hass-edge reconnected (a new connection, not the old one), resynced, and
that its /api/states equals HA's /api/states for the tracked entities (default filter: all
but media_player/camera/automation): nothing stale (X-Cache hit on every entity), nothing
left over (a REST-created entity, which vanishes with the restart, is gone from ours too;
one created and deleted between restarts is gone as well), helpers reset by the restart are
reset in ours. Prints per-kind counts and recovery times (min/p50/max).

Recovery = from the moment the restart command was issued until hass-edge is live again
with states equal to HA's ("outage"); "after RUNNING" = from the moment ha-peer.sh saw HA
RUNNING again to the same point (what hass-edge's back-off adds).

usage: python3 -m hass_edge_tools.reliability.ha_restarts [N] [--seed S] [--keep-peer]
"""
import argparse
import random
import sys
import time

from hass_edge_tools.daemon import Daemon
from hass_edge_tools.mirror import explain_diff, mirror_diff, wait_mirror
from hass_edge_tools.peer import Peer
from hass_edge_tools.reliability.common import make_daemon, make_peer, PORT_BASE, Report, stop_all, VERSION
from hass_edge_tools.stats import spread


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", nargs="?", type=int, default=50)
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument("--keep-peer", action="store_true")
    args = ap.parse_args()

    r = Report("ha_restarts")
    peer = make_peer(f"ha-restarts-{VERSION}", PORT_BASE + 1)
    r.tried(f"start HA {VERSION} on {peer.url}")
    peer.start()
    daemon = make_daemon("ha-restarts-daemon", peer.url, peer.token, {"reconnect": {"max_delay_seconds": 10}})
    daemon.start()
    try:
        run(r, peer, daemon, args)
    finally:
        stop_all(r, daemon, peer, args.keep_peer)
    sys.exit(r.finish())


def recover(peer: Peer, failures: list[str], what: str) -> bool:
    """After a failed step: get the peer RUNNING again (start is a no-op when it is). False,
    with the failure recorded, when it cannot be started: the run stops there."""
    try:
        peer.start()
        return True
    except RuntimeError as e:
        print(f"   peer start failed: {e}", flush=True)
        failures.append(f"{what}: the peer cannot be started again; stopping here")
        return False


def run(r: Report, peer: Peer, daemon: Daemon, args) -> None:
    t = daemon.wait_live(60)
    if not r.check(t is not None, "hass-edge goes live at start"):
        print(daemon.log_text()[-3000:])
        return
    ok, diff = wait_mirror(peer, daemon)
    r.check(ok is not None, "initial states equal HA's" + (f" ({diff})" if diff else ""))

    rng = random.Random(args.seed)
    kinds = ["restart", "hup", "kill"]
    plan = [kinds[i % 3] for i in range(args.n)]
    rng.shuffle(plan)
    r.tried(f"{args.n} restarts of HA: " + ", ".join(f"{k} x{plan.count(k)}" for k in kinds))

    outage: dict[str, list[float]] = {k: [] for k in kinds}
    after_running: dict[str, list[float]] = {k: [] for k in kinds}
    ha_down: dict[str, list[float]] = {k: [] for k in kinds}
    failures: list[str] = []
    log_off = peer.log_size()
    for i, kind in enumerate(plan, 1):
        what = f"#{i} {kind}"
        # Before: one REST entity that must vanish with the restart, one created and deleted
        # while connected, and a helper moved off its initial value (HA resets it).
        probe, gone = f"sensor.rel_restart_{i}", f"sensor.rel_deleted_{i}"
        try:
            peer.post_state(probe, str(i), {"friendly_name": f"probe {i}"})
            peer.post_state(gone, "x")
            peer.delete_state(gone)
            peer.call("input_number", "set_value", entity_id="input_number.living_temp", value=10 + i % 30)
            ok, diff = wait_mirror(peer, daemon, 10)
            if ok is None:
                failures.append(f"{what}: before the restart, ours != HA's: {diff}")
            before = daemon.metrics().get("hass_edge_reconnects_total", 0)
            connected_before = daemon.status().get("connection", {}).get("last_connected")
        except (OSError, RuntimeError) as e:
            failures.append(f"{what}: HA or hass-edge unreachable before the restart: {e}")
            if not recover(peer, failures, what):
                break
            continue

        t0 = time.monotonic()
        try:
            if kind == "restart":
                peer.restart()
            elif kind == "hup":
                peer.hup()
            else:
                peer.kill()
                peer.start()
        except RuntimeError as e:
            failures.append(f"{what}: the peer did not come back: {e}")
            if not recover(peer, failures, what):
                break
            continue
        t_running = time.monotonic()
        ha_down[kind].append(t_running - t0)

        # hass-edge must notice, reconnect, resync.
        deadline = time.monotonic() + 60
        recovered = None
        last = ""
        while time.monotonic() < deadline:
            try:
                m = daemon.metrics()
                st = daemon.status().get("connection", {})
                reconnected = m.get("hass_edge_reconnects_total", 0) > before and st.get("last_connected") != connected_before
                if reconnected and daemon.health()[0] == 200:
                    differ, missing, extra = mirror_diff(peer, daemon)
                else:
                    time.sleep(0.05)
                    continue
            except (OSError, RuntimeError) as e:
                last = f"unreachable: {e}"
                time.sleep(0.2)
                continue
            if not (differ or missing or extra):
                recovered = time.monotonic()
                break
            last = f"differ {differ[:4]} missing {missing[:4]} extra {extra[:4]}"
            if differ:
                last += " | " + explain_diff(peer, daemon, differ[0])
            time.sleep(0.05)
        if recovered is None:
            failures.append(f"{what}: not resynced within 60 s of HA RUNNING: {last or daemon.health()}")
            continue
        outage[kind].append(recovered - t0)
        after_running[kind].append(recovered - t_running)

        # Nothing left over, nothing stale.
        ours = daemon.states()
        if probe in ours or gone in ours:
            failures.append(f"{what}: REST-created entity left over in ours")
        if ours.get("input_number.living_temp", {}).get("state") != "21.5":
            failures.append(f"{what}: input_number.living_temp not reset in ours: {ours.get('input_number.living_temp', {}).get('state')}")
        stale = []
        for eid in ours:
            status, hdrs, _ = daemon.http.request("GET", f"/api/states/{eid}")
            if status != 200 or hdrs.get("x-cache") != "hit":
                stale.append(f"{eid}: {status} {hdrs.get('x-cache')}")
        if stale:
            failures.append(f"{what}: entities not served fresh: {stale[:5]}")
        st, _, _ = daemon.http.request("GET", f"/api/states/{probe}")
        if st != 404:
            failures.append(f"{what}: GET /api/states/{probe} answered {st}, want 404")
        print(f"   {what}: HA back in {t_running - t0:.1f}s, hass-edge resynced {recovered - t_running:.2f}s after RUNNING ({len(ours)} entities)", flush=True)

    for f in failures:
        print(f"   problem: {f}")
    done = sum(len(v) for v in outage.values())
    r.check(not failures, f"{done}/{args.n} restarts: reconnected, resynced, equal to HA, none stale, none left over" + (f" ({len(failures)} problems, first: {failures[0]})" if failures else ""))
    for k in kinds:
        r.figure(f"{k}: count", f"{len(outage[k])} of {plan.count(k)}")
        r.figure(f"{k}: HA down (command to RUNNING)", spread(ha_down[k]))
        r.figure(f"{k}: outage (command to hass-edge live + equal)", spread(outage[k]))
        r.figure(f"{k}: resync after HA RUNNING", spread(after_running[k]))
    allv = [x for v in after_running.values() for x in v]
    r.figure("all: resync after HA RUNNING", spread(allv))
    text = peer.log_since(log_off)
    r.check("Client unable to keep up" not in text, "HA never dropped hass-edge as a slow consumer")
    r.check(daemon.alive(), "hass-edge still running")


if __name__ == "__main__":
    main()
