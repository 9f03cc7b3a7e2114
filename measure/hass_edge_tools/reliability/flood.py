"""Event floods (issue #6), against the real HA peer; hass-edge runs with
`[cache] max_entities = 1000`.

A. HA at its maximum rate for --flood seconds (default 60): many concurrent
   (--procs client processes x --concurrency) `POST /api/states/sensor.flood_<k>` (200 entities) plus `input_number.set_value` calls
   from an asyncio client. Must hold: HA never drops hass-edge as a slow consumer (no
   reconnect: `hass_edge_reconnects_total` unchanged; HA's log has no "Client unable to keep
   up"), /health answers 200 throughout, and afterwards our /api/states equals HA's.
B. Distinct entity ids: `POST /api/states/sensor.distinct_<n>` for n = 0, 1, 2, … with a
   sliding window (each id is deleted again --window ids later, so HA holds at most that
   many), until --distinct ids or --budget seconds, whichever comes first. hass-edge's RSS
   (VmRSS/VmHWM from /proc) is sampled throughout and must stay bounded; its store must stay
   within max_entities; afterwards ours equals HA's again.
C. Overflow: the same with a window of 3000 (> max_entities) for --overflow seconds: the store
   must stay at ≤ 1000 entries (evicting), RSS bounded.

What was actually pushed is reported; nothing is extrapolated.

usage: python3 -m hass_edge_tools.reliability.flood [--flood S] [--distinct N] [--budget S] [--window W] [--overflow S] [--keep-peer]
"""
import argparse
import asyncio
import itertools
import multiprocessing as mp
import sys
import time

from hass_edge_tools.client import Http
from hass_edge_tools.daemon import Daemon
from hass_edge_tools.mirror import tracked_by_default, wait_mirror
from hass_edge_tools.peer import Peer
from hass_edge_tools.procfs import fmt_mem, proc_mem, stat_cpu_seconds
from hass_edge_tools.reliability.common import ensure_venv, make_daemon, make_peer, PORT_BASE, Report, stop_all, VERSION

ensure_venv()
import aiohttp  # noqa: E402

MAX_ENTITIES = 1000


class Sampler:
    """Samples hass-edge's memory and /health every `period` seconds in the background."""

    def __init__(self, daemon: Daemon, period: float = 2.0):
        self.daemon = daemon
        self.period = period
        self.samples: list[tuple[float, dict]] = []
        self.health_bad = 0
        self.health_total = 0
        self.task = None

    async def run(self) -> None:
        t0 = time.monotonic()
        h = Http(self.daemon.base, timeout=5)
        while True:
            self.samples.append((time.monotonic() - t0, proc_mem(self.daemon.pid)))
            try:
                code = (await asyncio.to_thread(h.request, "GET", "/health"))[0]
            except OSError:
                code = 0
            self.health_total += 1
            self.health_bad += code != 200
            await asyncio.sleep(self.period)

    def __enter__(self):
        self.task = asyncio.get_running_loop().create_task(self.run())
        return self

    def __exit__(self, *exc):
        self.task.cancel()


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


def flood_writer_process(url: str, token: str, seconds: float, concurrency: int, proc: int, out) -> None:
    """One client process: `concurrency` asyncio writers for `seconds`; sends counts back."""

    async def run() -> dict:
        done = {"states": 0, "services": 0, "errors": 0}
        stop = time.monotonic() + seconds
        counter = itertools.count(proc, 16)
        headers = {"Authorization": f"Bearer {token}"}

        async def writer(session: aiohttp.ClientSession, w: int) -> None:
            while time.monotonic() < stop:
                n = next(counter)
                try:
                    if n % 10 == 0:
                        url_ = f"{url}/api/services/input_number/set_value"
                        body = {"entity_id": "input_number.load", "value": n % 1_000_000 + 1}
                        kind = "services"
                    else:
                        url_ = f"{url}/api/states/sensor.flood_{n % 200}"
                        body = {"state": str(n), "attributes": {"writer": w, "n": n}}
                        kind = "states"
                    async with session.post(url_, json=body, headers=headers) as resp:
                        await resp.read()
                        done[kind if resp.status in (200, 201) else "errors"] += 1
                except aiohttp.ClientError:
                    done["errors"] += 1

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            await asyncio.gather(*(writer(session, w) for w in range(concurrency)))
        return done

    out.send(asyncio.run(run()))


async def flood(r: Report, peer: Peer, daemon: Daemon, seconds: float, concurrency: int, procs: int) -> None:
    r.tried(f"A. flood HA for {seconds:.0f}s: {procs} client processes x {concurrency} concurrent REST writers")
    before = daemon.metrics()
    log_off = peer.log_size()
    headers = {"Authorization": f"Bearer {peer.token}"}
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(False) for _ in range(procs)]
    workers = [ctx.Process(target=flood_writer_process, args=(peer.url, peer.token, seconds, concurrency, i, tx)) for i, (_, tx) in enumerate(pipes)]
    ha_pid = peer.hass_pid()
    cpu0, edge0, m0 = stat_cpu_seconds(ha_pid), stat_cpu_seconds(daemon.pid), machine_busy()
    t0 = time.monotonic()
    with Sampler(daemon, 1.0) as s:
        for w in workers:
            w.start()
        results = [await asyncio.to_thread(rx.recv) for rx, _ in pipes]
        for w in workers:
            w.join()
        elapsed = time.monotonic() - t0
        ha_cpu = (stat_cpu_seconds(ha_pid) - cpu0) / elapsed
        edge_cpu = (stat_cpu_seconds(daemon.pid) - edge0) / elapsed
        m1 = machine_busy()
        busy = (m1[0] - m0[0]) / max(1, m1[1] - m0[1])
        settle_t0 = time.monotonic()
        ok, diff = await asyncio.to_thread(wait_mirror, peer, daemon, 60)
        settle = time.monotonic() - settle_t0
    done = {k: sum(d[k] for d in results) for k in ("states", "services", "errors")}
    after = daemon.metrics()
    changes = done["states"] + done["services"]
    r.figure("A. state writes accepted by HA", f"{done['states']} POST /api/states + {done['services']} set_value in {elapsed:.1f}s = {changes / elapsed:.0f}/s ({done['errors']} errors)")
    r.figure("A. CPU during the flood", f"HA {ha_cpu * 100:.0f}% of a core, hass-edge {edge_cpu * 100:.0f}% of a core, whole machine {busy * 100:.0f}% busy (HA's rate is bounded by the CPU it gets)")
    received = after.get("hass_edge_events_received_total", 0) - before.get("hass_edge_events_received_total", 0)
    r.figure("A. entity updates received by hass-edge", f"{received:.0f} ({received / elapsed:.0f}/s)")
    r.figure("A. hass-edge memory after the flood", fmt_mem(daemon.mem()))
    reconnects = after.get("hass_edge_reconnects_total", 0) - before.get("hass_edge_reconnects_total", 0)
    r.check(reconnects == 0, f"no reconnect during the flood (hass_edge_reconnects_total +{reconnects:.0f})")
    text = peer.log_since(log_off)
    r.check("Client unable to keep up" not in text, "HA's log has no 'Client unable to keep up'")
    r.check(s.health_bad == 0, f"/health answered 200 throughout ({s.health_total - s.health_bad}/{s.health_total})")
    r.check(ok is not None, f"afterwards our /api/states equals HA's (after {settle:.2f}s){'' if ok is not None else ': ' + diff}")
    r.check(received >= changes, f"hass-edge received an update for every accepted write ({received:.0f} updates, {changes} writes)")
    # Clean up: the flood entities go, and must go from ours too.
    async with aiohttp.ClientSession() as session:
        for k in range(200):
            async with session.delete(f"{peer.url}/api/states/sensor.flood_{k}", headers=headers) as resp:
                await resp.read()
    ok, diff = await asyncio.to_thread(wait_mirror, peer, daemon, 30)
    r.check(ok is not None, f"deleted flood entities are gone from ours too{'' if ok is not None else ': ' + diff}")


def distinct_writer_process(url: str, token: str, first: int, step: int, count: int, budget: float, window: int, concurrency: int, out) -> None:
    """One client process: creates sensor.distinct_<n> for n = first, first+step, … (at most
    `count` ids, for at most `budget` seconds), deleting n - window*step as it goes (so HA
    holds at most `window` of this process's ids); then deletes what is left. Sends counts."""

    async def run() -> dict:
        done = {"created": 0, "deleted": 0, "errors": 0, "last": first - step}
        headers = {"Authorization": f"Bearer {token}"}
        ks = itertools.count()
        stop = time.monotonic() + budget
        created_ks: list[int] = []

        async def writer(session: aiohttp.ClientSession) -> None:
            while time.monotonic() < stop:
                k = next(ks)
                if k >= count:
                    return
                n = first + k * step
                try:
                    async with session.post(f"{url}/api/states/sensor.distinct_{n}", json={"state": "1"}, headers=headers) as resp:
                        await resp.read()
                        ok = resp.status in (200, 201)
                        done["created" if ok else "errors"] += 1
                        if ok:
                            created_ks.append(k)
                            done["last"] = max(done["last"], n)
                    if k >= window:
                        async with session.delete(f"{url}/api/states/sensor.distinct_{n - window * step}", headers=headers) as resp:
                            await resp.read()
                            done["deleted" if resp.status == 200 else "errors"] += 1
                except aiohttp.ClientError:
                    done["errors"] += 1

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            await asyncio.gather(*(writer(session) for _ in range(concurrency)))
            done["seconds"] = budget - max(0.0, stop - time.monotonic())
            # What is left of the window (and stragglers whose delete was not reached).
            top = max(created_ks, default=-1)
            left = range(max(0, top - window - concurrency), top + 1)
            sem = asyncio.Semaphore(concurrency)

            async def rm(k: int) -> None:
                async with sem:
                    async with session.delete(f"{url}/api/states/sensor.distinct_{first + k * step}", headers=headers) as resp:
                        await resp.read()

            await asyncio.gather(*(rm(k) for k in left))
        return done

    out.send(asyncio.run(run()))


async def distinct(r: Report, peer: Peer, daemon: Daemon, label: str, target: int, budget: float, window: int, concurrency: int, procs: int, start_at: int) -> int:
    r.tried(f"{label}. up to {target} distinct entity ids (HA holds at most {window} at a time; budget {budget:.0f}s; {procs} client processes x {concurrency} writers)")
    before = daemon.metrics()
    max_store = 0
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(False) for _ in range(procs)]
    per_proc = -(-target // procs)
    workers = [
        ctx.Process(target=distinct_writer_process, args=(peer.url, peer.token, start_at + p, procs, per_proc, budget, max(1, window // procs), concurrency, tx))
        for p, (_, tx) in enumerate(pipes)
    ]

    async def store_size() -> None:
        nonlocal max_store
        while True:
            st = await asyncio.to_thread(daemon.status)
            max_store = max(max_store, st.get("store", {}).get("entities", 0))
            await asyncio.sleep(2)

    t0 = time.monotonic()
    with Sampler(daemon, 5.0) as s:
        watcher = asyncio.get_running_loop().create_task(store_size())
        for w in workers:
            w.start()
        results = [await asyncio.to_thread(rx.recv) for rx, _ in pipes]
        for w in workers:
            w.join()
        watcher.cancel()
        samples = s.samples
    elapsed = max(d["seconds"] for d in results)
    created = sum(d["created"] for d in results)
    deleted = sum(d["deleted"] for d in results)
    errors = sum(d["errors"] for d in results)
    last = max(d["last"] for d in results)
    after = daemon.metrics()
    r.figure(f"{label}. distinct entity ids pushed through HA", f"{created} created + {deleted} deleted (plus the last window) in {elapsed:.0f}s ({created / elapsed:.0f} ids/s; {errors} errors)")
    received = after.get("hass_edge_events_received_total", 0) - before.get("hass_edge_events_received_total", 0)
    r.figure(f"{label}. entity updates received by hass-edge", f"{received:.0f}")
    for t, m in samples[:: max(1, len(samples) // 8)] + samples[-1:]:
        print(f"   t={t:5.0f}s {fmt_mem(m)}")
    rss = [m.get("VmRSS", 0) for _, m in samples]
    hwm = max(m.get("VmHWM", 0) for _, m in samples)
    quarter = rss[len(rss) // 4] if rss else 0
    r.figure(f"{label}. hass-edge VmRSS start / 25% / end / VmHWM", f"{rss[0] / 1024:.1f} / {quarter / 1024:.1f} / {rss[-1] / 1024:.1f} / {hwm / 1024:.1f} MiB")
    r.check(rss[-1] <= quarter + 16 * 1024, f"{label}: RSS bounded (end {rss[-1] / 1024:.1f} MiB <= 25%-mark {quarter / 1024:.1f} MiB + 16 MiB)")
    r.check(max_store <= MAX_ENTITIES, f"{label}: store stayed within max_entities ({max_store} <= {MAX_ENTITIES})")
    reconnects = after.get("hass_edge_reconnects_total", 0) - before.get("hass_edge_reconnects_total", 0)
    r.check(reconnects == 0, f"{label}: no reconnect (+{reconnects:.0f})")
    r.check(s.health_bad == 0, f"{label}: /health answered 200 throughout ({s.health_total - s.health_bad}/{s.health_total})")
    r.figure(f"{label}. store evictions (total)", after.get("hass_edge_cache_evictions_total", 0))
    return last + 1


async def main_async(args) -> int:
    r = Report("flood")
    peer = make_peer(f"flood-{VERSION}", PORT_BASE + 4)
    r.tried(f"start HA {VERSION} on {peer.url}")
    await asyncio.to_thread(peer.start)
    daemon = make_daemon("flood-daemon", peer.url, peer.token, {"cache": {"max_entities": MAX_ENTITIES}}, log_level="warn")
    daemon.start()
    try:
        t = await asyncio.to_thread(daemon.wait_live, 60)
        if r.check(t is not None, "hass-edge goes live"):
            r.figure("hass-edge memory at start", fmt_mem(daemon.mem()))
            await flood(r, peer, daemon, args.flood, args.concurrency, args.procs)
            n = await distinct(r, peer, daemon, "B", args.distinct, args.budget, args.window, args.concurrency, args.procs, 0)
            ok, diff = await asyncio.to_thread(wait_mirror, peer, daemon, 30)
            r.check(ok is not None, f"B: afterwards ours equals HA's{'' if ok is not None else ': ' + diff}")
            if args.overflow > 0:
                await distinct(r, peer, daemon, "C", 10**9, args.overflow, 3000, args.concurrency, args.procs, n)
                await asyncio.sleep(2)
                ours = await asyncio.to_thread(daemon.states)
                left = [k for k in ours if k.startswith("sensor.distinct_")]
                r.check(not left, f"C: no deleted entity left in ours ({len(left)})")
                ha = {k for k in (await asyncio.to_thread(peer.states)) if tracked_by_default(k)}
                missing = sorted(ha - set(ours))
                r.figure("C. after the overflow: tracked entities in our /api/states / in HA", f"{len(set(ours) & ha)} / {len(ha)}")
                if missing:
                    st, hdrs, _ = await asyncio.to_thread(daemon.http.request, "GET", f"/api/states/{missing[0]}")
                    r.figure(f"C. GET /api/states/{missing[0]} (evicted) ", f"{st}, X-Cache {hdrs.get('x-cache')}")
                    # max_entities is smaller than what HA pushed: the list is incomplete until
                    # the next snapshot. The operator must be able to see that.
                    evicted = (await asyncio.to_thread(daemon.status)).get("store", {}).get("tracked_evictions", 0)
                    r.figure("C. /status store.tracked_evictions", str(evicted))
                    r.check(evicted >= len(missing), f"C: /status counts the evicted tracked entities ({evicted} >= {len(missing)} missing from the list)")
                    r.check("tracked entities evicted by [cache] max_entities" in daemon.log_text(), "C: the daemon logged a warning naming max_entities")
            r.figure("hass-edge memory at the end", fmt_mem(daemon.mem()))
            r.check(daemon.alive(), "hass-edge still running")
    finally:
        await asyncio.to_thread(stop_all, r, daemon, peer, args.keep_peer)
    return r.finish()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flood", type=float, default=60)
    ap.add_argument("--distinct", type=int, default=1_000_000)
    ap.add_argument("--budget", type=float, default=600)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--overflow", type=float, default=30)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--procs", type=int, default=2, help="client processes for the flood")
    ap.add_argument("--keep-peer", action="store_true")
    sys.exit(asyncio.run(main_async(ap.parse_args())))


if __name__ == "__main__":
    main()
