"""WebSocket fan-out benchmark (issue 16): the same WebSocket clients against Home Assistant
directly and through hass-edge's /api/websocket, in one run. Run by run.sh (which checks the
prerequisites and sets PYTHONPATH); the knobs are environment variables, listed in README.md.

Sections:
  fanout — N clients (auth + unfiltered `subscribe_entities`) while HA changes ENTITIES
           entities round robin at a steady RATE changes/s (REST `POST /api/states/…`, the
           state being the generator's `time.time()`); CPU of HA, hass-edge, the clients and
           the generator over the window, events delivered, delivery latency;
  idle   — RSS of hass-edge (and HA) with 0 and with IDLE_SESSIONS idle subscribed sessions;
  storm  — STORM_CLIENTS clients connect, auth and `get_states` at once; time to the last
           answer (median of STORM_RUNS).
Targets: `edge-token` (hass-edge with `http.api_token_file`, clients present hass-edge's
token: Edge sessions, no link to HA each), `ha` (HA directly, HA's token), `edge-open`
(hass-edge without an API token, clients present HA's token: each session opens its own
link to HA at auth, a User session).
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import aiohttp

from hass_edge_tools.client import Http
from hass_edge_tools.daemon import Daemon
from hass_edge_tools.machine import busiest, describe
from hass_edge_tools.peer import Peer
from hass_edge_tools.procfs import proc_kib, stat_cpu_seconds

HERE = Path(__file__).resolve().parent


def env_list(name: str, default: str) -> list[str]:
    return os.environ.get(name, default).split()


DURATION = float(os.environ.get("DURATION", "30"))
DRAIN = float(os.environ.get("DRAIN", "1.5"))
RATES = [int(x) for x in env_list("RATES", "200 1000")]
CLIENTS = [int(x) for x in env_list("CLIENTS", "1 50 200")]
TARGETS = env_list("TARGETS", "edge-token ha edge-open")
SECTIONS = env_list("SECTIONS", "fanout idle storm")
ENTITIES = int(os.environ.get("ENTITIES", "1000"))
WORKERS = int(os.environ.get("WORKERS", "4"))
SAMPLE_MS = float(os.environ.get("SAMPLE_MS", "50"))
PROBE_EVERY = int(os.environ.get("PROBE_EVERY", "10"))
BATCH_MS = float(os.environ.get("BATCH_MS", "20"))
COALESCE = os.environ.get("COALESCE", "1") != "0"
# hass-edge's `http.websocket_coalesce_ms` (empty: its default, 10).
EDGE_COALESCE_MS = os.environ.get("EDGE_COALESCE_MS", "")
IDLE_SESSIONS = int(os.environ.get("IDLE_SESSIONS", "200"))
STORM_CLIENTS = int(os.environ.get("STORM_CLIENTS", "200"))
STORM_RUNS = int(os.environ.get("STORM_RUNS", "3"))
EDGE_PORT = int(os.environ.get("EDGE_PORT", "18196"))
GEN_CONNECTIONS = int(os.environ.get("GEN_CONNECTIONS", "16"))
# Niceness for everything measured (HA, hass-edge, clients, generator) on a shared machine, so
# that other users' builds take what is left rather than a share of each window; "" = as is.
RENICE = os.environ.get("RENICE", "")
OUT_DIR = Path(os.environ.get("OUT_DIR", "/tmp/fanout-out"))
EDGE_BIN = Path(os.environ["EDGE_BIN"])
API_TOKEN = "fanout-bench-api-token-" + os.urandom(8).hex()
# The packaged unit's environment (packaging/systemd/hass-edge.service), as measure/bench.sh.
UNIT_ENV = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}


def boost(pid: int) -> None:
    """RENICE for `pid`: its niceness, and its autogroup's (with sched_autogroup, each session
    is a group and niceness only orders the tasks inside one; HA, hass-edge and every client
    process run in sessions of their own, so that they compete as equals)."""
    if not RENICE:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, pid, int(RENICE))
        Path(f"/proc/{pid}/autogroup").write_text(RENICE)
    except OSError as e:
        log(f"   could not renice {pid}: {e}")


def log(msg: str) -> None:
    print(f"[fanout {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def listen_drops() -> tuple[int, int]:
    """(ListenOverflows, ListenDrops) of the whole machine (/proc/net/netstat TcpExt): a
    connection the kernel dropped because the server's accept queue was full is retried by
    the client's SYN retransmission, 1 s later."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for head, vals in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            d = dict(zip(head.split()[1:], map(int, vals.split()[1:])))
            return d.get("ListenOverflows", 0), d.get("ListenDrops", 0)
    return 0, 0


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


class Fleet:
    """WORKERS wsload.py processes sharing `n` clients against `url`."""

    def __init__(self, url: str, token: str, n: int, mode: str = "subscribe", stagger: int = 10):
        self.url, self.token, self.n, self.mode, self.stagger = url, token, n, mode, stagger
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        k = max(1, min(WORKERS, self.n))
        shares = [self.n // k + (1 if i < self.n % k else 0) for i in range(k)]
        env = dict(os.environ, WSLOAD_TOKEN=self.token)
        for share in shares:
            args = [sys.executable, str(HERE / "wsload.py"), "--url", self.url, "--clients", str(share),
                    "--mode", self.mode, "--sample-ms", str(SAMPLE_MS), "--stagger", str(self.stagger),
                    "--probe-every", str(PROBE_EVERY), "--batch-ms", str(BATCH_MS)]
            if not COALESCE:
                args.append("--no-coalesce")
            p = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE, start_new_session=True,
                                                     stdout=asyncio.subprocess.PIPE, env=env, limit=64 * 1024 * 1024)
            boost(p.pid)
            self.procs.append(p)
        for p in self.procs:
            json.loads(await p.stdout.readline())  # {"pid": …}

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def cmd(self, c: str, timeout: float = 120) -> list[dict]:
        for p in self.procs:
            p.stdin.write(c.encode() + b"\n")
        await asyncio.gather(*(p.stdin.drain() for p in self.procs))

        async def one(p):
            line = await asyncio.wait_for(p.stdout.readline(), timeout)
            if not line:
                raise RuntimeError(f"wsload {p.pid} ended during {c!r}")
            return json.loads(line)

        return list(await asyncio.gather(*(one(p) for p in self.procs)))

    async def connect(self) -> dict:
        r = await self.cmd("connect")
        out = {"ok": sum(x["ok"] for x in r), "failed": sum(x["failed"] for x in r),
               "errors": sorted({e for x in r for e in x["errors"]})[:5],
               "t_start": min(x["t_start"] for x in r), "t_last": max(x["t_last"] for x in r),
               "t_all": [t for x in r for t in x["t_all"]]}
        if out["failed"]:
            log(f"   {out['failed']} of {self.n} clients failed: {out['errors']}")
        return out

    async def close(self) -> None:
        try:
            await self.cmd("close", timeout=10)
        except Exception:
            pass
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 5)
            except asyncio.TimeoutError:
                p.kill()
                await p.wait()


class Bench:
    def __init__(self, peer: Peer):
        self.peer = peer
        self.work = OUT_DIR / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.edge: Daemon | None = None
        self.edge_target = ""
        self.results: dict = {"fanout": [], "idle": [], "storm": []}

    # ------------------------------------------------------------------ targets
    def start_edge(self, target: str) -> Daemon:
        if self.edge and self.edge_target == target and self.edge.alive():
            return self.edge
        self.stop_edge()
        settings = {"http": {"max_websocket_clients": 1024}, "log": {"level": "warn"},
                    "filter": {"exclude_domains": []}}
        if EDGE_COALESCE_MS:
            settings["http"]["websocket_coalesce_ms"] = int(EDGE_COALESCE_MS)
        if target == "edge-token":
            tf = self.work / "api_token"
            tf.write_text(API_TOKEN)
            tf.chmod(0o600)
            settings["http"]["api_token_file"] = str(tf)
        d = Daemon(EDGE_BIN, self.work / target, self.peer.url, self.peer.token, settings, port=EDGE_PORT, env=UNIT_ENV,
                   prefix=["setsid"])  # a session (autogroup) of its own, like HA's
        if target == "edge-token":
            d.http = Http(d.base, API_TOKEN)  # /metrics needs it
        d.start()
        boost(d.pid)
        if d.wait_live(60) is None:
            d.stop(grace=2)
            raise RuntimeError(f"hass-edge ({target}) not live within 60 s: {d.log_text()[-2000:]}")
        # Live means synced; wait until it tracks the bench entities too.
        t0 = time.monotonic()
        while d.metrics().get("hass_edge_entities_tracked", 0) < ENTITIES and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        self.edge, self.edge_target = d, target
        return d

    def stop_edge(self) -> None:
        if self.edge:
            rc = self.edge.stop()
            if rc not in (0, None):
                log(f"   hass-edge ({self.edge_target}) exited {rc}: {self.edge.log_text()[-1000:]}")
            self.edge = None
            self.edge_target = ""

    def endpoint(self, target: str) -> tuple[str, str]:
        """(ws url, token) for a target; starts hass-edge as needed."""
        if target == "ha":
            self.stop_edge()
            return self.peer.url.replace("http", "ws", 1) + "/api/websocket", self.peer.token
        self.start_edge(target)
        token = API_TOKEN if target == "edge-token" else self.peer.token
        return f"ws://127.0.0.1:{EDGE_PORT}/api/websocket", token

    # ------------------------------------------------------------------ load
    async def make_entities(self, s: aiohttp.ClientSession) -> None:
        sem = asyncio.Semaphore(GEN_CONNECTIONS)

        async def one(i: int) -> None:
            async with sem:
                async with s.post(f"{self.peer.url}/api/states/sensor.bench_{i}", headers=self.peer.headers,
                                  json={"state": f"{time.time():.6f}", "attributes": self.attrs(i)}) as r:
                    await r.read()
                    if r.status not in (200, 201):
                        raise RuntimeError(f"POST sensor.bench_{i}: {r.status}")

        await asyncio.gather(*(one(i) for i in range(ENTITIES)))

    @staticmethod
    def attrs(i: int) -> dict:
        return {"friendly_name": f"Fan-out bench {i}", "unit_of_measurement": "s"}

    async def generate(self, s: aiohttp.ClientSession, rate: int, seconds: float) -> dict:
        """`rate` state changes per second for `seconds`, open loop: every 5 ms the changes
        due by now are started (at most GEN_CONNECTIONS in flight; when HA cannot keep up, the
        rate achieved falls and says so)."""
        sem = asyncio.Semaphore(GEN_CONNECTIONS)
        done = failed = started = 0
        tasks = set()
        attrs = [self.attrs(i) for i in range(ENTITIES)]
        url = f"{self.peer.url}/api/states/sensor.bench_"
        headers = self.peer.headers
        t0 = time.monotonic()

        async def one(n: int) -> None:
            nonlocal done, failed
            async with sem:
                i = n % ENTITIES
                async with s.post(url + str(i), headers=headers,
                                  json={"state": f"{time.time():.6f}", "attributes": attrs[i]}) as r:
                    await r.read()
                    if r.status in (200, 201):
                        done += 1
                    else:
                        failed += 1

        while True:
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            due = int(rate * (now - t0)) - started
            # Do not queue without bound behind a saturated HA: the rate achieved is reported.
            due = min(due, GEN_CONNECTIONS * 2 - len(tasks))
            for _ in range(max(0, due)):
                t = asyncio.ensure_future(one(started))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                started += 1
            await asyncio.sleep(0.005)
        if tasks:
            await asyncio.gather(*tasks)
        t1 = time.monotonic()
        return {"changes": done, "failed": failed, "seconds": t1 - t0, "rate": done / (t1 - t0)}

    # ------------------------------------------------------------------ sections
    async def fanout_one(self, s: aiohttp.ClientSession, target: str, n: int, rate: int) -> dict:
        url, token = self.endpoint(target)
        fleet = Fleet(url, token, n)
        await fleet.start()
        try:
            c = await fleet.connect()
            await asyncio.sleep(1.0)
            ha = self.peer.pid()
            edge = self.edge.pid if target != "ha" and self.edge else None
            gen = os.getpid()
            pids = {"ha": [ha], "edge": [edge] if edge else [], "clients": fleet.pids, "gen": [gen]}
            await fleet.cmd("reset")
            cpu0 = {k: sum(stat_cpu_seconds(p) for p in v) for k, v in pids.items()}
            t0 = time.monotonic()
            g = await self.generate(s, rate, DURATION)
            await asyncio.sleep(DRAIN)
            t1 = time.monotonic()
            cpu1 = {k: sum(stat_cpu_seconds(p) for p in v) for k, v in pids.items()}
            r = await fleet.cmd("report")
            edge_rss = proc_kib(edge, "VmRSS") if edge else None
        finally:
            await fleet.close()
        events = [e for x in r for e in x["events"]]
        lat_set = [v for x in r for v in x["lat_set"]]
        lat_post = [v for x in r for v in x["lat_post"]]
        window = t1 - t0
        res = {
            "target": target, "n": n, "rate": rate, "connected": c["ok"], "connect_failed": c["failed"],
            "window_s": window, "changes": g["changes"], "gen_failed": g["failed"], "rate_achieved": g["rate"],
            "delivered": sum(events), "per_client_mean": sum(events) / max(1, len(events)),
            "per_client_min": min(events, default=0), "closed": sum(x["closed"] for x in r),
            "cpu_s": {k: cpu1[k] - cpu0[k] for k in pids}, "lat_set_n": len(lat_set),
            "lat_set_p50": pct(lat_set, 50), "lat_set_p99": pct(lat_set, 99),
            "lat_post_p50": pct(lat_post, 50), "lat_post_p99": pct(lat_post, 99), "edge_rss_kib": edge_rss,
        }
        cpu = res["cpu_s"]
        log(f"   {target:10} N={n:3} rate {rate:4}: achieved {res['rate_achieved']:.0f}/s, delivered/client "
            f"{res['per_client_mean']:.0f} (min {res['per_client_min']}, changes {g['changes']}), closed {res['closed']}; "
            f"CPU % HA {100 * cpu['ha'] / window:.0f} edge {100 * cpu['edge'] / window:.0f} "
            f"clients {100 * cpu['clients'] / window:.0f} gen {100 * cpu['gen'] / window:.0f}; "
            f"latency p50/p99 {1e3 * res['lat_set_p50']:.1f}/{1e3 * res['lat_set_p99']:.1f} ms")
        return res

    async def fanout(self, s: aiohttp.ClientSession) -> None:
        log(f"fan-out: rates {RATES}, clients {CLIENTS}, targets {TARGETS}, {DURATION:g} s each")
        for rate in RATES:
            for n in CLIENTS:
                for target in TARGETS:
                    self.results["fanout"].append(await self.fanout_one(s, target, n, rate))
                    self.save()

    async def idle(self) -> None:
        log(f"idle RSS: 0 and {IDLE_SESSIONS} idle subscribed sessions")
        for target in TARGETS:
            if target == "ha":
                url, token = self.endpoint("ha")
                pid = self.peer.pid()
            else:
                self.stop_edge()  # a fresh daemon: RSS with 0 sessions never having had any
                url, token = self.endpoint(target)
                pid = self.edge.pid
            await asyncio.sleep(2)
            rss0 = proc_kib(pid, "VmRSS")
            fleet = Fleet(url, token, IDLE_SESSIONS)
            await fleet.start()
            try:
                c = await fleet.connect()
                await asyncio.sleep(3)
                rss1 = proc_kib(pid, "VmRSS")
            finally:
                await fleet.close()
            await asyncio.sleep(2)
            rss2 = proc_kib(pid, "VmRSS")
            res = {"target": target, "sessions": c["ok"], "rss0_kib": rss0, "rss1_kib": rss1, "rss_after_kib": rss2,
                   "kib_per_session": (rss1 - rss0) / max(1, c["ok"])}
            log(f"   {target:10} RSS {rss0} KiB → {rss1} KiB with {c['ok']} sessions ({res['kib_per_session']:.1f} KiB each), {rss2} KiB after")
            self.results["idle"].append(res)
            self.save()

    async def storm(self) -> None:
        log(f"connect storm: {STORM_CLIENTS} clients, auth + get_states at once, {STORM_RUNS} runs")
        for target in TARGETS:
            times = []
            fails = []
            p50s = []
            overflows = []
            for run in range(STORM_RUNS):
                url, token = self.endpoint(target)
                fleet = Fleet(url, token, STORM_CLIENTS, mode="states", stagger=0)
                await fleet.start()
                try:
                    await asyncio.sleep(0.3)
                    o0 = listen_drops()
                    t0 = time.monotonic()
                    c = await fleet.connect()
                    o1 = listen_drops()
                finally:
                    await fleet.close()
                times.append(c["t_last"] - t0 if c["ok"] else float("nan"))
                p50s.append(pct([t - t0 for t in c["t_all"]], 50))
                fails.append(c["failed"])
                overflows.append(o1[0] - o0[0])
                log(f"   {target:10} run {run + 1}: {c['ok']} answers, half after {1e3 * p50s[-1]:.0f} ms, last after "
                    f"{1e3 * times[-1]:.0f} ms, {c['failed']} failed; accept-queue overflows {overflows[-1]}")
                await asyncio.sleep(1)
            self.results["storm"].append({"target": target, "runs_ms": [1e3 * t for t in times],
                                          "median_ms": 1e3 * statistics.median(times), "failed": fails,
                                          "p50_ms": [1e3 * t for t in p50s], "overflows": overflows})
            self.save()

    def save(self) -> None:
        (OUT_DIR / "fanout.json").write_text(json.dumps(self.results, indent=1))


# ---------------------------------------------------------------------- report
def report(results: dict, meta: dict) -> str:
    lines = [f"Run: {meta['when']}; {meta['minutes']:.1f} min. Machine: {meta['machine']}; load average "
             f"{meta['load0']} at the start, {meta['load1']} at the end"
             f"{'; measured processes at niceness ' + meta['renice'] if meta.get('renice') else ''}. Home Assistant {meta['ha_version']} "
             f"(tests/ha-peer), {ENTITIES} REST-made entities `sensor.bench_*` changed round robin; "
             f"{DURATION:g} s per window (+{DRAIN:g} s drain); clients {'with' if COALESCE else 'without'} "
             f"`coalesce_messages`; hass-edge's `http.websocket_coalesce_ms` "
             f"{EDGE_COALESCE_MS or 'default (10)'}; {WORKERS} client processes, every {PROBE_EVERY}th client a latency probe, "
             f"the others reading every {BATCH_MS:g} ms.", ""]
    fo = results["fanout"]
    if fo:
        def find(t, n, rate):
            return next((r for r in fo if r["target"] == t and r["n"] == n and r["rate"] == rate), None)

        lines += ["| target | N | changes/s (achieved) | delivered/client (min) | dropped | CPU % HA | CPU % hass-edge | CPU % clients | CPU % generator | latency p50 / p99 | marginal CPU per client event: HA / hass-edge |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in fo:
            w = r["window_s"]
            cpu = r["cpu_s"]
            base = find(r["target"], 1, r["rate"])
            marg = ""
            if base and r["n"] > 1:
                extra = r["delivered"] - base["delivered"]
                if extra > 0:
                    mh = 1e6 * (cpu["ha"] - base["cpu_s"]["ha"]) / extra
                    me = 1e6 * (cpu["edge"] - base["cpu_s"]["edge"]) / extra if r["target"] != "ha" else None
                    marg = f"{mh:.2f} µs / " + (f"{me:.2f} µs" if me is not None else "—")
            lines.append(
                f"| {r['target']} | {r['n']} | {r['rate']} ({r['rate_achieved']:.0f}) | {r['per_client_mean']:.0f} ({r['per_client_min']}) "
                f"| {r['closed']} | {100 * cpu['ha'] / w:.0f} | {100 * cpu['edge'] / w:.1f} | {100 * cpu['clients'] / w:.0f} "
                f"| {100 * cpu['gen'] / w:.0f} | {1e3 * r['lat_set_p50']:.1f} / {1e3 * r['lat_set_p99']:.1f} ms | {marg} |")
        lines.append("")
        # The goal rows: hass-edge's marginal CPU against HA's, and p99 against HA's.
        goal = []
        for rate in RATES:
            for n in CLIENTS:
                if n == 1:
                    continue
                ha, ha1 = find("ha", n, rate), find("ha", 1, rate)
                for t in ("edge-token", "edge-open"):
                    e, e1 = find(t, n, rate), find(t, 1, rate)
                    if not (ha and ha1 and e and e1):
                        continue
                    dh = ha["delivered"] - ha1["delivered"]
                    de = e["delivered"] - e1["delivered"]
                    if dh <= 0 or de <= 0:
                        continue
                    mh = (ha["cpu_s"]["ha"] - ha1["cpu_s"]["ha"]) / dh
                    me = (e["cpu_s"]["edge"] - e1["cpu_s"]["edge"]) / de
                    ratio = mh / me if me > 0 else float("inf")
                    p99ok = e["lat_set_p99"] <= ha["lat_set_p99"]
                    goal.append(f"| {t} vs ha | {n} | {rate} | {1e6 * me:.2f} µs vs {1e6 * mh:.2f} µs | 1/{ratio:.1f} — {'met' if ratio >= 10 else '**MISSED**'} "
                                f"| {1e3 * e['lat_set_p99']:.1f} vs {1e3 * ha['lat_set_p99']:.1f} ms — {'met' if p99ok else '**MISSED**'} |")
        if goal:
            lines += ["| comparison | N | changes/s | marginal CPU per client event, hass-edge vs HA | goal ≤ 1/10 | p99, hass-edge vs HA (goal: no worse) |",
                      "|---|---:|---:|---:|---|---|", *goal, ""]
    if results["idle"]:
        lines += ["| target | idle sessions | RSS with 0 | RSS with them | per session | RSS after they left | goal |", "|---|---:|---:|---:|---:|---:|---|"]
        for r in results["idle"]:
            g = "" if r["target"] == "ha" else ("≤ 16 KiB — " + ("met" if r["kib_per_session"] <= 16 else "**MISSED**"))
            lines.append(f"| {r['target']} | {r['sessions']} | {r['rss0_kib']:,} KiB | {r['rss1_kib']:,} KiB | {r['kib_per_session']:.1f} KiB | {r['rss_after_kib']:,} KiB | {g} |")
        lines.append("")
    if results["storm"]:
        lines += [f"| connect storm: {STORM_CLIENTS} clients, auth + get_states at once | median time to the last answer | runs: last answer | runs: half answered | failed | accept-queue overflows (machine) |", "|---|---:|---|---|---|---|"]
        for r in results["storm"]:
            lines.append(f"| {r['target']} | {r['median_ms']:.0f} ms | {' / '.join(f'{t:.0f}' for t in r['runs_ms'])} ms "
                         f"| {' / '.join(f'{t:.0f}' for t in r['p50_ms'])} ms | {sum(r['failed'])} | {' / '.join(map(str, r['overflows']))} |")
        lines.append("")
    return "\n".join(lines)


async def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    peer = Peer.attach(Path(os.environ["HA_PEER_DIR"]))
    t_start = time.monotonic()
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": describe(),
            "load0": " ".join(f"{x:.2f}" for x in os.getloadavg()), "ha_version": peer.version}
    busy = busiest()
    if busy:
        log(f"busiest processes at the start: {busy}")
    b = Bench(peer)
    ha_nice = os.getpriority(os.PRIO_PROCESS, peer.pid())
    if RENICE:
        try:
            os.setsid()  # the generator's own autogroup
        except OSError:
            pass  # already a group leader: its session is then ours alone or the caller's
        boost(os.getpid())
        boost(peer.pid())
        log(f"niceness {RENICE} (process and autogroup) for HA (pid {peer.pid()}), hass-edge, the clients and the generator")
    meta["renice"] = RENICE
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=GEN_CONNECTIONS)) as s:
            log(f"making {ENTITIES} entities sensor.bench_* in HA")
            await b.make_entities(s)
            if "fanout" in SECTIONS:
                await b.fanout(s)
            if "idle" in SECTIONS:
                await b.idle()
            if "storm" in SECTIONS:
                await b.storm()
    finally:
        b.stop_edge()
        try:
            os.setpriority(os.PRIO_PROCESS, peer.pid(), ha_nice)
            Path(f"/proc/{peer.pid()}/autogroup").write_text("0")
        except OSError:
            pass
    meta["load1"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["minutes"] = (time.monotonic() - t_start) / 60
    meta["busy_start"] = busy
    b.results["meta"] = meta
    b.save()
    text = report(b.results, meta)
    (OUT_DIR / "fanout.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    asyncio.run(main())
