"""hass-edge benchmarks against a real Home Assistant (issue #6). Started by bench/run.sh.

Runs with the HA peer's own venv Python (aiohttp). run.sh has built the binaries and started
the peer; this measures, prints the table and writes the generated part of BENCHMARKS.md.
Every daemon it starts is stopped in a `finally` (and listed in WORK/pids for run.sh's trap).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

CLK_TCK = os.sysconf("SC_CLK_TCK")
EXCLUDED = ("media_player.", "camera.", "automation.")  # the daemon's default filter
READ_ENTITY = "sensor.living_temperature"
POLL_ENTITIES = [
    "input_boolean.kitchen", "input_number.living_temp", "input_select.house_mode", "light.kitchen",
    "switch.coffee_maker", "cover.garage_door", "lock.front_door", "sensor.living_temperature",
    "binary_sensor.kitchen_occupied", "sun.sun",
]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def tracked(entity_id: str) -> bool:
    return not entity_id.startswith(EXCLUDED)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(p / 100 * len(v) + 0.5)) - 1))
    return v[k]


# ------------------------------------------------------------------ processes


def proc_cpu_seconds(pid: int) -> float:
    """CPU time of the whole process: the sum of every thread's on-CPU nanoseconds from
    /proc/<pid>/task/*/schedstat; without schedstats, utime + stime from /proc/<pid>/stat
    (fields 14, 15; 10 ms ticks). Threads that already ended are not counted by the former."""
    try:
        total = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue
        if total:
            return total / 1e9
    except OSError:
        pass
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def smaps_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def proc_kib(pid: int, key: str) -> int:
    return int(proc_status(pid)[key].split()[0])


def ctxt_switches(pid: int) -> tuple[int, int, int]:
    """(voluntary, nonvoluntary, threads) summed over every thread of pid."""
    vol = nonvol = n = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            st = proc_status_path(task / "status")
        except OSError:
            continue
        vol += int(st["voluntary_ctxt_switches"])
        nonvol += int(st["nonvoluntary_ctxt_switches"])
        n += 1
    return vol, nonvol, n


def thread_switches(pid: int) -> dict[str, int]:
    """Context switches (voluntary + nonvoluntary) by thread name (`comm`)."""
    out: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            st = proc_status_path(task / "status")
        except OSError:
            continue
        out[st["Name"]] = out.get(st["Name"], 0) + int(st["voluntary_ctxt_switches"]) + int(st["nonvoluntary_ctxt_switches"])
    return out


def proc_status_path(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def pin(pid: int, cpus: str) -> None:
    """Sets the CPU affinity of every thread of pid (taskset -a)."""
    subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True, stdout=subprocess.DEVNULL)


class Peer:
    def __init__(self, directory: Path):
        self.dir = directory
        self.url = (directory / "url").read_text().strip()
        self.token = (directory / "token").read_text().strip()
        self.version = (directory / "version").read_text().strip()
        self.headers = {"Authorization": f"Bearer {self.token}"}

    def pid(self) -> int:
        return int((self.dir / "hass.pid").read_text().strip())


class Daemon:
    """One hass-edge process with its own config in WORK/daemon-N/."""

    count = 0

    def __init__(self, h: "Harness", extra: str = "", cpus: str | None = None, wrap: list[str] | None = None):
        Daemon.count += 1
        self.h = h
        self.dir = h.work / f"daemon-{Daemon.count}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = h.next_port()
        self.base = f"http://127.0.0.1:{self.port}"
        token_file = self.dir / "token"
        token_file.write_text(h.peer.token)
        token_file.chmod(0o600)
        text = (
            f'[ha]\nurl = "{h.peer.url}"\ntoken_file = "{token_file}"\n'
            f'[http]\nlisten = "127.0.0.1:{self.port}"\n[dbus]\nbus = "none"\n[log]\nlevel = "warn"\n'
        )
        text += extra
        if h.persist_keys:
            # Keep the bench from writing a state file outside its work directory.
            if "[cache]" in text:
                text = text.replace("[cache]\n", f'[cache]\npersist = false\nstate_file = "{self.dir / "states.json"}"\n')
            else:
                text += f'[cache]\npersist = false\nstate_file = "{self.dir / "states.json"}"\n'
        self.config = self.dir / "config.toml"
        self.config.write_text(text)
        cmd = [str(h.bin), "--config", str(self.config)]
        if cpus:
            cmd = ["taskset", "-c", cpus] + cmd
        if wrap:
            cmd = wrap + cmd
        env = {k: v for k, v in os.environ.items() if not k.startswith("HASS_EDGE_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env.update(h.unit_env)
        self.log = open(self.dir / "daemon.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        self.pid = self.proc.pid
        with open(h.work / "pids", "a") as f:
            f.write(f"{self.pid}\n")
        h.daemons.append(self)

    def stop(self, grace: float = 5) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    async def wait_live(self, session: aiohttp.ClientSession, count: int | None = None, timeout: float = 120) -> float:
        """Waits for /health 200 (and `count` tracked entities); returns the seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hass-edge exited with {self.proc.returncode}: {(self.dir / 'daemon.log').read_text()[-2000:]}")
            try:
                async with session.get(self.base + "/health") as r:
                    if r.status == 200:
                        if count is None:
                            return time.monotonic() - t0
                        # The gauge, not /api/states: serialising a 20,000-entity list would
                        # itself raise the peak being measured.
                        if (await self.metrics(session)).get("hass_edge_entities_tracked", 0) >= count:
                            return time.monotonic() - t0
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.02)
        raise RuntimeError(f"hass-edge not live after {timeout} s: {(self.dir / 'daemon.log').read_text()[-2000:]}")

    async def metrics(self, session: aiohttp.ClientSession) -> dict[str, float]:
        async with session.get(self.base + "/metrics") as r:
            text = await r.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
            base = name.split("{", 1)[0]
            if base != name:
                out[base] = out.get(base, 0.0) + float(value)
        return out


# ------------------------------------------------------------------ the harness


class Harness:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.smoke = args.smoke
        self.work = Path(args.work)
        self.peer = Peer(Path(args.peer))
        self.bin = Path(args.bin)
        self.ingest = Path(args.ingest) if args.ingest else None
        self.repo = Path(args.repo)
        self.port = args.port_base
        self.daemons: list[Daemon] = []
        self.r: dict = {"smoke": self.smoke, "ha_version": self.peer.version}
        self.persist_keys = self._config_accepts("[cache]\npersist = false\n")
        # Daemons run with the environment the packaged unit gives them (its Environment=
        # lines, e.g. the malloc tunable), as systemd would start them.
        unit = self.repo / "packaging" / "systemd" / "hass-edge.service"
        self.unit_env = dict(line.split("=", 2)[1:] for line in unit.read_text().splitlines() if line.startswith("Environment=") and line.count("=") >= 2)
        self.r["unit_env"] = self.unit_env

    def next_port(self) -> int:
        self.port += 1
        if self.port > self.args.port_max:
            raise RuntimeError("out of ports")
        return self.port

    def _config_accepts(self, extra: str) -> bool:
        cfg = self.work / "probe.toml"
        cfg.write_text(f'[ha]\nurl = "{self.peer.url}"\ntoken_file = "/dev/null"\n{extra}')
        ok = subprocess.run([str(self.bin), "check-config", "--config", str(cfg)], capture_output=True).returncode == 0
        return ok

    def dur(self, full: float, smoke: float) -> float:
        return smoke if self.smoke else full

    # -------------------------------------------------------------- helpers with HA

    async def ha_states(self, s: aiohttp.ClientSession) -> dict[str, dict]:
        async with s.get(self.peer.url + "/api/states", headers=self.peer.headers) as r:
            return {x["entity_id"]: x for x in await r.json()}

    async def post_many(self, s: aiohttp.ClientSession, items: list[tuple[str, dict]], concurrency: int = 32) -> None:
        queue = list(reversed(items))

        async def worker() -> None:
            while queue:
                entity_id, body = queue.pop()
                async with s.post(f"{self.peer.url}/api/states/{entity_id}", json=body, headers=self.peer.headers) as r:
                    if r.status not in (200, 201):
                        raise RuntimeError(f"POST {entity_id}: {r.status} {await r.text()}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def mirror_diff(self, s: aiohttp.ClientSession, d: Daemon) -> tuple[int, int]:
        """(entities that differ or are missing, extra entities) between HA's tracked states and ours."""
        ha = {k: v for k, v in (await self.ha_states(s)).items() if tracked(k)}
        async with s.get(d.base + "/api/states") as r:
            ours = {x["entity_id"]: x for x in await r.json()}
        differ = sum(1 for k, v in ha.items() if ours.get(k) != v)
        extra = sum(1 for k in ours if k not in ha)
        return differ, extra

    # -------------------------------------------------------------- 1. reads

    def wrk(self, url: str, conns: int, seconds: float, lua: Path | None, token: str | None, server: int, profile: Path | None = None) -> dict:
        cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "5s"]
        if lua:
            cmd += ["-s", str(lua)]
        cmd.append(url)
        env = dict(os.environ)
        if token:
            env["HA_TOKEN"] = token
        ru0, cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN), proc_cpu_seconds(server)
        perf = None
        if profile:
            # cpu-clock sampling works where hardware counters are "not supported".
            perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-p", str(server), "-o", str(profile), "--", "sleep", str(max(1, round(seconds)) - 0.5)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        ru1, cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN), proc_cpu_seconds(server)
        if perf:
            perf.wait()
        unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}

        def lat(p: str) -> float:
            m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
            if not m:
                raise RuntimeError(f"no {p}% latency in wrk output:\n{out}")
            return float(m.group(1)) * unit[m.group(2)]

        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        errors = re.search(r"Socket errors:.*", out)
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        client_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        return {"rps": rps, "p50_ms": lat("50"), "p99_ms": lat("99"), "non2xx": int(non2xx.group(1)) if non2xx else 0, "errors": errors.group(0) if errors else "",
                "server_cpu_us_per_req": 1e6 * (cpu1 - cpu0) / max(1, requests), "server_cpu_pct": 100 * (cpu1 - cpu0) / max(1, round(seconds)),
                "client_cpu_pct": 100 * client_cpu / max(1, round(seconds))}

    def wrk_median(self, url: str, conns: int, seconds: float, lua: Path | None, token: str | None, server: int) -> dict:
        """`wrk` in three runs of `seconds` / 3 (one in a smoke), each figure the median of
        the runs: one burst of a neighbour's activity on the shared machine moves a 1 %
        tail of one run by an order of magnitude."""
        runs = 1 if self.smoke else 3
        results = [self.wrk(url, conns, seconds / runs, lua, token, server) for _ in range(runs)]
        out = {k: sorted(r[k] for r in results)[runs // 2] for k in ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_req", "server_cpu_pct", "client_cpu_pct")}
        out["non2xx"] = sum(r["non2xx"] for r in results)
        out["errors"] = "; ".join(r["errors"] for r in results if r["errors"])
        out["runs"] = runs
        out["p99_each_ms"] = [r["p99_ms"] for r in results]
        return out

    async def bench_reads(self, s: aiohttp.ClientSession, d: Daemon) -> None:
        log("1. reads: wrk against hass-edge and HA")
        seconds = self.dur(12, 2)
        async with s.get(f"{d.base}/api/states/{READ_ENTITY}") as r:
            assert r.status == 200 and r.headers.get("X-Cache") == "hit", f"{READ_ENTITY} is not a cache hit: {r.status} {r.headers}"
        lua = self.repo / "bench" / "ha_auth.lua"
        hass = self.peer.pid()
        pin(d.pid, "0")
        pin(hass, "0")
        res = {}
        nginx = await self.start_nginx(s, d)
        try:
            for conns in (1, 16):
                edge = self.wrk_median(f"{d.base}/api/states/{READ_ENTITY}", conns, seconds, None, None, d.pid)
                if conns == 16 and perf_works():
                    # A separate run: sampling at 1 kHz would itself stretch the measured tail.
                    prof = self.work / "perf.reads.data"
                    self.wrk(f"{d.base}/api/states/{READ_ENTITY}", conns, min(seconds, 3), None, None, d.pid, prof)
                    if prof.exists():
                        self.r["reads_profile"] = perf_summary(prof)
                ha = self.wrk_median(f"{self.peer.url}/api/states/{READ_ENTITY}", conns, seconds, lua, self.peer.token, hass)
                for name, x in (("edge", edge), ("ha", ha)):
                    if x["non2xx"]:
                        raise RuntimeError(f"{name}: {x['non2xx']} non-2xx answers to wrk")
                res[conns] = {"edge": edge, "ha": ha}
                if nginx:
                    res[conns]["nginx"] = self.wrk_median(nginx[1], conns, seconds, None, None, nginx[0].pid)
                log(f"   c={conns}: edge {edge['rps']:.0f} req/s p99 {edge['p99_ms']:.3f} ms ({edge['server_cpu_pct']:.0f} % CPU, {edge['server_cpu_us_per_req']:.1f} µs/req; wrk {edge['client_cpu_pct']:.0f} %); "
                    f"HA {ha['rps']:.0f} req/s p99 {ha['p99_ms']:.3f} ms ({ha['server_cpu_pct']:.0f} % CPU, {ha['server_cpu_us_per_req']:.0f} µs/req)"
                    + (f"; nginx {res[conns]['nginx']['rps']:.0f} req/s p99 {res[conns]['nginx']['p99_ms']:.3f} ms" if nginx else ""))
        finally:
            pin(d.pid, "0-1")
            pin(hass, "0-1")
            if nginx:
                nginx[0].terminate()
                nginx[0].wait()
        self.r["reads"] = {"seconds": max(1, round(seconds)), "entity": READ_ENTITY, "by_conns": res}

    async def start_nginx(self, s: aiohttp.ClientSession, d: Daemon) -> tuple[subprocess.Popen, str] | None:
        """The machine's floor for the same work: nginx (one worker, pinned to the servers'
        core) serving the entity's JSON, as hass-edge answers it, from a static file; `None`
        without nginx. (process, url)."""
        binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if not binary:
            log("   nginx not installed: no floor reference")
            return None
        root = self.work / "nginx"
        root.mkdir(exist_ok=True)
        async with s.get(f"{d.base}/api/states/{READ_ENTITY}") as r:
            (root / "state.json").write_bytes(await r.read())
        port = self.next_port()
        temp = " ".join(f"{k}_temp_path {root};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (root / "nginx.conf").write_text(
            f"daemon off; worker_processes 1; pid {root}/nginx.pid; error_log {root}/error.log warn;\n"
            "events { worker_connections 1024; }\n"
            f"http {{ access_log off; keepalive_requests 100000000; default_type application/json; {temp}\n"
            f"  server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n")
        proc = subprocess.Popen(["taskset", "-c", "0", binary, "-c", str(root / "nginx.conf"), "-p", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/state.json"
        for _ in range(100):
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        else:
            proc.kill()
            raise RuntimeError(f"nginx did not start: {(root / 'error.log').read_text() if (root / 'error.log').exists() else ''}")
        self.r["nginx_version"] = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr.strip().replace("nginx version: ", "")
        return proc, url

    # -------------------------------------------------------------- 2a. in-process ingest

    def bench_ingest(self) -> None:
        if not self.ingest:
            log("2a. skipped: no ingest bench binary")
            return
        log("2a. in-process ingest (benches/ingest.rs)")
        v = self.peer.version
        if self.smoke:
            extra = ["--events", "5000", "--seconds", "0.3", "--rounds", "2", "--frames", "all"]
        else:
            extra = ["--events", "20000", "--seconds", "2", "--rounds", "5", "--frames", "all"]
        out = subprocess.run(["taskset", "-c", "1", str(self.ingest), "--version", v] + extra, capture_output=True, text=True, check=True)
        sys.stderr.write(out.stderr)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
        kv = dict(x.split("=", 1) for x in line.split()[1:])
        res = {k: float(x) for k, x in kv.items()}
        for l in out.stdout.splitlines():
            if not l.startswith("RESULT"):
                log("   " + l)
        # Instructions per event: two callgrind runs that differ only in the number of passes
        # over the same stream; the difference cancels the set-up (fixtures, CA roots, stream).
        events = 2000 if self.smoke else 20000
        irs = {}
        for passes in (1, 3):
            cg = self.work / f"callgrind.{passes}.out"
            p = subprocess.run(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={cg}", str(self.ingest), "--version", v, "--events", str(events), "--passes", str(passes), "--frames", "mixed"],
                capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"callgrind run failed: {p.stderr[-2000:]}")
            irs[passes] = callgrind_total(cg)
        res["ir_per_event"] = (irs[3] - irs[1]) / (2 * events)
        res["callgrind_events"] = events
        res["hot"] = callgrind_hot(self.work / "callgrind.1.out", self.work / "callgrind.3.out", 2 * events)
        log(f"   {res['mixed_events_per_sec']:.0f} events/s, {res['ir_per_event']:.0f} Ir/event")
        self.r["ingest"] = res

    # -------------------------------------------------------------- 2b. end-to-end ingest

    async def bench_ingest_e2e(self, s: aiohttp.ClientSession, d: Daemon) -> None:
        log("2b. end-to-end ingest: HA at its maximum change rate")
        seconds = self.dur(20, 3)
        n_entities, conc = 50, 48
        attrs = lambda i: {"unit_of_measurement": "W", "device_class": "power", "state_class": "measurement", "friendly_name": f"Bench load {i}"}
        await self.post_many(s, [(f"sensor.bench_load_{i}", {"state": "0", "attributes": attrs(i)}) for i in range(n_entities)])
        await asyncio.sleep(0.5)
        hass = self.peer.pid()
        m0 = await d.metrics(s)
        c0, h0, t0 = proc_cpu_seconds(d.pid), proc_cpu_seconds(hass), time.monotonic()
        counter = 0
        done = 0
        failures = 0
        stop_at = t0 + seconds
        # A separate connection pool so the load does not queue behind other requests.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as load:
            async def worker(w: int) -> None:
                nonlocal counter, done, failures
                while time.monotonic() < stop_at:
                    counter += 1
                    i = counter % n_entities
                    body = {"state": str(counter), "attributes": attrs(i)}
                    async with load.post(f"{self.peer.url}/api/states/sensor.bench_load_{i}", json=body, headers=self.peer.headers) as r:
                        await r.read()
                        if r.status in (200, 201):
                            done += 1
                        else:
                            failures += 1

            await asyncio.gather(*(worker(w) for w in range(conc)))
        t1 = time.monotonic()
        c1, h1 = proc_cpu_seconds(d.pid), proc_cpu_seconds(hass)
        window = t1 - t0
        # Let the last events arrive, then compare everything we track with HA.
        differ = extra = -1
        settle0 = time.monotonic()
        while time.monotonic() - settle0 < 10:
            differ, extra = await self.mirror_diff(s, d)
            if differ == 0 and extra == 0:
                break
            await asyncio.sleep(0.1)
        m1 = await d.metrics(s)
        delta = lambda k: m1.get(k, 0) - m0.get(k, 0)
        res = {
            "seconds": window,
            "changes": done,
            "failures": failures,
            "ha_rate": done / window,
            "edge_cpu_s": c1 - c0,
            "edge_cpu_pct": 100 * (c1 - c0) / window,
            "ha_cpu_pct": 100 * (h1 - h0) / window,
            "events_received": delta("hass_edge_events_received_total"),
            "reconnects": delta("hass_edge_reconnects_total"),
            "decode_errors": delta("hass_edge_decode_errors_total"),
            "differ": differ,
            "extra": extra,
            "settle_s": time.monotonic() - settle0,
            "cpu_us_per_event": 1e6 * (c1 - c0) / max(1.0, delta("hass_edge_events_received_total")),
        }
        res["lost"] = res["differ"] + res["extra"] + (1 if res["events_received"] < done else 0)
        log(f"   HA {res['ha_rate']:.0f} changes/s; hass-edge {res['edge_cpu_pct']:.2f} % of a core; received {res['events_received']:.0f} of {done}; differ {differ}, extra {extra}, reconnects {res['reconnects']:.0f}")
        self.r["ingest_e2e"] = res

    # -------------------------------------------------------------- 3. freshness

    async def bench_freshness(self, s: aiohttp.ClientSession, d: Daemon) -> None:
        log("3. freshness: HA change -> our SSE / GET vs HA's own WebSocket")
        n = int(self.dur(400, 40))
        entity = "sensor.bench_fresh"
        await self.post_many(s, [(entity, {"state": "init", "attributes": {"friendly_name": "Bench fresh"}})], 1)
        await asyncio.sleep(0.3)
        seen_ws: dict[str, float] = {}
        seen_sse: dict[str, float] = {}
        clock = time.perf_counter

        async def ha_ws(ready: asyncio.Event) -> None:
            async with s.ws_connect(self.peer.url + "/api/websocket", max_msg_size=0) as ws:
                await ws.receive_json()
                await ws.send_json({"type": "auth", "access_token": self.peer.token})
                assert (await ws.receive_json())["type"] == "auth_ok"
                await ws.send_json({"id": 1, "type": "subscribe_entities"})
                async for msg in ws:
                    t = clock()
                    data = json.loads(msg.data)
                    for m in data if isinstance(data, list) else [data]:
                        if m.get("type") == "result":
                            continue
                        ev = m.get("event", {})
                        if "a" in ev and not ready.is_set():
                            ready.set()
                            continue
                        ch = ev.get("c", {}).get(entity, {}).get("+", {})
                        if "s" in ch:
                            seen_ws.setdefault(ch["s"], t)
                        a = ev.get("a", {}).get(entity)
                        if a:
                            seen_ws.setdefault(a["s"], t)

        async def sse(ready: asyncio.Event) -> None:
            async with s.get(f"{d.base}/api/stream?entity_id={entity}", timeout=aiohttp.ClientTimeout(total=None)) as r:
                assert r.status == 200, r.status
                ready.set()
                async for line in r.content:
                    t = clock()
                    if line.startswith(b"data:"):
                        ev = json.loads(line[5:])
                        ns = ev.get("new_state") or {}
                        if "state" in ns:
                            seen_sse.setdefault(ns["state"], t)

        async def trigger(value: str) -> float:
            t0 = clock()
            async with s.post(f"{self.peer.url}/api/states/{entity}", json={"state": value, "attributes": {"friendly_name": "Bench fresh"}}, headers=self.peer.headers) as r:
                await r.read()
            return t0

        async def wait_for(value: str, *maps: dict) -> bool:
            end = clock() + 2
            while clock() < end:
                if all(value in m for m in maps):
                    return True
                await asyncio.sleep(0.0005)
            return False

        r1, r2 = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(ha_ws(r1)), asyncio.create_task(sse(r2))]
        await asyncio.wait_for(asyncio.gather(r1.wait(), r2.wait()), 10)
        ws_a, sse_a, delta_sse, missing = [], [], [], 0
        # Phase A: push delivery, both observers idle-waiting.
        for i in range(n):
            value = f"a{i}"
            t0 = await trigger(value)
            if not await wait_for(value, seen_ws, seen_sse):
                missing += 1
                continue
            ws_a.append(1e3 * (seen_ws[value] - t0))
            sse_a.append(1e3 * (seen_sse[value] - t0))
            delta_sse.append(1e3 * (seen_sse[value] - seen_ws[value]))
            await asyncio.sleep(random.uniform(0.005, 0.015))
        # Phase B: a reader polling our GET as fast as it can (one request in flight).
        ws_b, get_b, delta_get = [], [], []
        for i in range(n):
            value = f"b{i}"
            post = asyncio.create_task(trigger(value))
            await asyncio.sleep(0)
            t0 = None
            seen_get = None
            end = clock() + 2
            while clock() < end:
                async with s.get(f"{d.base}/api/states/{entity}") as r:
                    body = await r.json()
                if body.get("state") == value:
                    seen_get = clock()
                    break
            t0 = await post
            if seen_get is None or not await wait_for(value, seen_ws):
                missing += 1
                continue
            ws_b.append(1e3 * (seen_ws[value] - t0))
            get_b.append(1e3 * (seen_get - t0))
            delta_get.append(1e3 * (seen_get - seen_ws[value]))
            await asyncio.sleep(random.uniform(0.005, 0.015))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        summary = lambda v: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)}
        res = {
            "samples": n,
            "missing": missing,
            "ha_ws": summary(ws_a),
            "sse": summary(sse_a),
            "sse_minus_ws": summary(delta_sse),
            "ha_ws_b": summary(ws_b),
            "get": summary(get_b),
            "get_minus_ws": summary(delta_get),
        }
        log(f"   HA WS p50/p99 {res['ha_ws']['p50']:.2f}/{res['ha_ws']['p99']:.2f} ms; SSE {res['sse']['p50']:.2f}/{res['sse']['p99']:.2f}; GET {res['get']['p50']:.2f}/{res['get']['p99']:.2f}; missing {missing}")
        self.r["freshness"] = res

    # -------------------------------------------------------------- 5. idle

    async def bench_idle(self, s: aiohttp.ClientSession) -> None:
        log("5. idle: a live daemon, a quiet HA")
        window = self.dur(60, 5)
        d = Daemon(self)
        await d.wait_live(s)
        await asyncio.sleep(2)
        m0 = await d.metrics(s)
        c0, (v0, n0, threads), t0, th0 = proc_cpu_seconds(d.pid), ctxt_switches(d.pid), time.monotonic(), thread_switches(d.pid)
        await asyncio.sleep(window)
        c1, (v1, n1, _), t1, th1 = proc_cpu_seconds(d.pid), ctxt_switches(d.pid), time.monotonic(), thread_switches(d.pid)
        m1 = await d.metrics(s)
        w = t1 - t0
        res = {
            "seconds": w,
            "cpu_ms_per_min": 1e3 * (c1 - c0) * 60 / w,
            "wakeups_per_s": ((v1 - v0) + (n1 - n0)) / w,
            "voluntary": v1 - v0,
            "nonvoluntary": n1 - n0,
            "threads": threads,
            "events": m1.get("hass_edge_events_received_total", 0) - m0.get("hass_edge_events_received_total", 0),
            "rss_kib": proc_kib(d.pid, "VmRSS"),
            "by_thread": {k: th1.get(k, 0) - th0.get(k, 0) for k in th1},
        }
        d.stop()
        log(f"   {res['cpu_ms_per_min']:.1f} ms CPU/min, {res['wakeups_per_s']:.2f} wake-ups/s over {w:.0f} s ({res['by_thread']}), {res['events']:.0f} events")
        self.r["idle"] = res

    # -------------------------------------------------------------- 6. HA load from polling

    async def bench_ha_load(self, s: aiohttp.ClientSession, d: Daemon) -> None:
        log("6. HA REST load caused by a poller reading through hass-edge")
        window, period = self.dur(60, 5), self.dur(1.0, 0.5)
        m0 = await d.metrics(s)
        hits = polls = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < window:
            tick = time.monotonic()
            for e in POLL_ENTITIES:
                async with s.get(f"{d.base}/api/states/{e}") as r:
                    await r.read()
                    polls += 1
                    hits += r.status == 200 and r.headers.get("X-Cache") == "hit"
            await asyncio.sleep(max(0.0, period - (time.monotonic() - tick)))
        w = time.monotonic() - t0
        m1 = await d.metrics(s)
        rest = m1.get("hass_edge_ha_rest_requests_total", 0) - m0.get("hass_edge_ha_rest_requests_total", 0)
        # Scale to the client: 10 entities every 10 s.
        per_hour = rest / w * 3600 * (period / 10)
        res = {"seconds": w, "period_s": period, "polls": polls, "hits": hits, "rest_requests": rest, "per_hour_at_10s": per_hour, "direct_per_hour": len(POLL_ENTITIES) * 360}
        log(f"   {polls} polls ({hits} hits), {rest:.0f} HA REST requests -> {per_hour:.0f}/h vs {res['direct_per_hour']}/h direct")
        self.r["ha_load"] = res

    # -------------------------------------------------------------- 4. memory

    async def bench_memory(self, s: aiohttp.ClientSession) -> None:
        log("4. memory: RSS with 100 / 1,000 / 20,000 tracked entities")
        levels = [100, 1000, 5000] if self.smoke else [100, 1000, 20000]
        hass = self.peer.pid()
        rows = []
        created = 0
        ha_base = proc_kib(hass, "VmRSS")
        base_tracked = sum(1 for k in await self.ha_states(s) if tracked(k) and not k.startswith("sensor.bench_"))
        for n in levels:
            t0 = time.monotonic()
            items = [(f"sensor.bench_{i:05d}", {"state": f"{20 + (i % 100) / 10:.1f}", "attributes": {
                "unit_of_measurement": "°C", "device_class": "temperature", "state_class": "measurement",
                "friendly_name": f"Bench temperature {i}"}}) for i in range(created, n)]
            await self.post_many(s, items)
            created = n
            create_s = time.monotonic() - t0
            ha_all = await self.ha_states(s)
            want = sum(1 for k in ha_all if tracked(k))
            extra = "" if n <= 8000 else f"[cache]\nmax_entities = {max(10000, 2 * want)}\n"
            d = Daemon(self, extra)
            try:
                sync_s = await d.wait_live(s, count=want)
                await asyncio.sleep(1)
                st = proc_status(d.pid)
                row = {
                    "entities": n,
                    "tracked": want,
                    "rss_kib": int(st["VmRSS"].split()[0]),
                    "hwm_kib": int(st["VmHWM"].split()[0]),
                    "anon_kib": int(st["RssAnon"].split()[0]),
                    "file_kib": int(st["RssFile"].split()[0]),
                    "pss_kib": smaps_kib(d.pid, "Pss"),
                    "uss_kib": smaps_kib(d.pid, "Private_Clean") + smaps_kib(d.pid, "Private_Dirty"),
                    "ha_rss_kib": proc_kib(hass, "VmRSS"),
                    "sync_s": sync_s,
                    "create_s": create_s,
                    "max_entities": max(10000, 2 * want) if extra else 10000,
                }
                # Then one client reads the whole list, as a dashboard would at start.
                async with s.get(d.base + "/api/states") as r:
                    listed = len(await r.json())
                if listed != want:
                    raise RuntimeError(f"/api/states lists {listed} entities, HA has {want} tracked")
                row["hwm_after_list_kib"] = proc_kib(d.pid, "VmHWM")
                row["rss_after_list_kib"] = proc_kib(d.pid, "VmRSS")
            finally:
                d.stop()
            rows.append(row)
            log(f"   {n} entities ({want} tracked): RSS {row['rss_kib']} KiB (anon {row['anon_kib']}, file {row['file_kib']}), peak {row['hwm_kib']} KiB; HA {row['ha_rss_kib']} KiB; synced in {sync_s:.2f} s")
            if n == 1000 or (n == levels[-1] and not self.smoke):
                self.r.setdefault("massif", {})[str(n)] = await self.massif(s, extra, want)
        self.r["memory"] = {"rows": rows, "ha_base_kib": ha_base, "base_tracked": base_tracked}

    async def massif(self, s: aiohttp.ClientSession, extra: str, want: int) -> dict:
        """The daemon's heap under valgrind massif: synced with `want` entities, then stopped."""
        out = self.work / f"massif.{want}.out"
        d = Daemon(self, extra, wrap=["valgrind", "--tool=massif", f"--massif-out-file={out}", "--depth=40"])
        try:
            await d.wait_live(s, count=want, timeout=300)
            await asyncio.sleep(2)
        finally:
            d.stop(grace=60)
        return massif_summary(out)

    # -------------------------------------------------------------- 7. sizes

    def sizes(self) -> None:
        res = {}
        stripped = self.work / "hass-edge.stripped"
        subprocess.run(["strip", "-o", str(stripped), str(self.bin)], check=True)
        res["x86_64"] = stripped.stat().st_size
        arm = [Path(p) for p in self.args.aarch64] if self.args.aarch64 else []
        for p in arm:
            if p.exists():
                tool = shutil.which("aarch64-linux-gnu-strip")
                if tool:
                    out = self.work / "hass-edge.aarch64.stripped"
                    subprocess.run([tool, "-o", str(out), str(p)], check=True)
                    res["aarch64"] = out.stat().st_size
                else:
                    res["aarch64"] = p.stat().st_size
                res["aarch64_path"] = str(p)
                break
        debs = []
        for dirname in self.args.deb_dir or []:
            for deb in sorted(Path(dirname).glob("*.deb")):
                debs.append({"name": deb.name, "bytes": deb.stat().st_size})
        res["debs"] = debs
        self.r["sizes"] = res

    # -------------------------------------------------------------- the machine

    def machine(self) -> None:
        model = "?"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
        self.r["busy_start"] = busiest()
        self.r["machine"] = {
            "cpu": model,
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "load_start": os.getloadavg(),
            "rustc": rustc,
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0].strip() or "wrk",
        }

    # -------------------------------------------------------------- run

    async def run(self) -> None:
        self.machine()
        only = set(self.args.only.split(",")) if self.args.only else None
        want = lambda name: only is None or name in only
        t_all = time.monotonic()
        timings: dict[str, float] = {}
        self.r["timings"] = timings
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64)) as s:
            try:
                if want("ingest"):
                    t = time.monotonic()
                    self.bench_ingest()
                    timings["ingest"] = time.monotonic() - t
                steps = [(n, f) for n, f in (("reads", self.bench_reads), ("freshness", self.bench_freshness), ("ha_load", self.bench_ha_load), ("ingest_e2e", self.bench_ingest_e2e)) if want(n)]
                if steps:
                    d = Daemon(self)
                    await d.wait_live(s)
                    for name, step in steps:
                        t = time.monotonic()
                        await step(s, d)
                        timings[name] = time.monotonic() - t
                    d.stop()
                if want("idle"):
                    t = time.monotonic()
                    await self.bench_idle(s)
                    timings["idle"] = time.monotonic() - t
                if want("memory"):
                    t = time.monotonic()
                    await self.bench_memory(s)
                    timings["memory"] = time.monotonic() - t
                self.sizes()
            finally:
                for d in self.daemons:
                    d.stop()
        self.r["machine"]["load_end"] = os.getloadavg()
        self.r["busy_end"] = busiest()
        timings["total"] = time.monotonic() - t_all


def busiest(n: int = 4) -> list[tuple[float, str]]:
    """The processes using the most CPU over one second (top), other machine users included."""
    out = subprocess.run(["top", "-b", "-n", "2", "-d", "1", "-w", "200"], capture_output=True, text=True).stdout
    block = out.split("PID USER")[-1].splitlines()[1:]
    rows = []
    for line in block:
        f = line.split()
        if len(f) >= 12:
            try:
                rows.append((float(f[8]), f"{' '.join(f[11:])[:40]} (pid {f[0]})"))
            except ValueError:
                continue
    rows.sort(key=lambda x: -x[0])
    return [r for r in rows[:n] if r[0] >= 5]


# ------------------------------------------------------------------ massif


def massif_summary(path: Path) -> dict:
    """Peak and final heap of a massif profile; the peak's bytes by the innermost hass_edge
    function (or, outside our code, the outermost frame massif kept)."""
    snaps = []
    cur: dict = {}
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("snapshot="):
            cur = {"tree": None}
            snaps.append(cur)
        elif line.startswith(("mem_heap_B=", "mem_heap_extra_B=", "mem_stacks_B=", "time=")):
            k, v = line.split("=")
            cur[k] = int(v)
        elif line.startswith("heap_tree="):
            cur["kind"] = line.split("=")[1]
            if cur["kind"] in ("peak", "detailed"):
                tree_lines = []
                j = i + 1
                while j < len(lines) and not lines[j].startswith("#"):
                    tree_lines.append(lines[j])
                    j += 1
                cur["tree"] = tree_lines
                i = j - 1
        i += 1
    peak = next((x for x in snaps if x.get("kind") == "peak"), max(snaps, key=lambda x: x.get("mem_heap_B", 0)))
    by_fn: dict[str, int] = {}

    interesting = ("hass_edge::", "bytes::", "tungstenite::", "async_tungstenite::", "rustls", "ureq", "lru::", "zbus", "async_io::", "polling::")

    def walk(k: int, depth: int, owner: str | None, ours: str | None) -> int:
        # a node: "<indent>n<children>: <bytes> <addr>: <fn> (<file>)"; its children are
        # its callers, so walking down goes outward from malloc.
        line = peak["tree"][k]
        m = re.match(r"^(\s*)n(\d+): (\d+) (.*)$", line)
        children, size, rest = int(m.group(2)), int(m.group(3)), m.group(4)
        fn = re.sub(r"^0x[0-9A-F]+: ", "", rest)
        fn = re.sub(r" \(in [^)]*\)$| \([^)]*:\d+\)$", "", fn)
        if not fn.startswith("in ") and fn.startswith(interesting):
            owner = owner or shorten(fn)
            if fn.startswith("hass_edge::"):
                ours = ours or shorten(fn)
        k += 1
        if children == 0 or depth > 60:
            key = owner or shorten(fn)
            if owner and ours and owner != ours:
                key = f"{owner} ← {ours}"
            by_fn[key] = by_fn.get(key, 0) + size
            while k < len(peak["tree"]) and len(peak["tree"][k]) - len(peak["tree"][k].lstrip()) > len(m.group(1)):
                k += 1
            return k
        for _ in range(children):
            k = walk(k, depth + 1, owner, ours)
        return k

    if peak.get("tree"):
        try:
            walk(0, 0, None, None)
        except (AttributeError, IndexError):
            pass
    top = sorted(by_fn.items(), key=lambda kv: -kv[1])[:10]
    return {
        "peak_heap": peak.get("mem_heap_B", 0) + peak.get("mem_heap_extra_B", 0),
        "peak_heap_useful": peak.get("mem_heap_B", 0),
        "peak_at": peak.get("time", 0) / max(1, snaps[-1].get("time", 1)),
        "top": top,
    }


# ------------------------------------------------------------------ perf


_PERF: bool | None = None


def perf_works() -> bool:
    global _PERF
    if _PERF is None:
        _PERF = bool(shutil.which("perf")) and subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-o", "/dev/null", "true"], capture_output=True).returncode == 0
    return _PERF


def perf_summary(data: Path) -> dict:
    """Kernel/user split and the top user-space symbols of a cpu-clock profile."""
    def report(*sort: str) -> list[tuple[float, str]]:
        out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--stdio", "-g", "none", "--sort", ",".join(sort)], capture_output=True, text=True).stdout
        rows = []
        for line in out.splitlines():
            m = re.match(r"^\s+([\d.]+)%\s+(.*\S)\s*$", line)
            if m:
                rows.append((float(m.group(1)), m.group(2)))
        return rows
    dsos = report("dso")
    kernel = sum(p for p, name in dsos if "kernel" in name)
    syms = [(p, re.sub(r"^\[\.\]\s+", "", name)) for p, name in report("sym") if name.startswith("[.]")][:8]
    return {"kernel_pct": kernel, "dsos": dsos[:5], "user_top": [(p, shorten(n)) for p, n in syms]}


# ------------------------------------------------------------------ callgrind


def callgrind_total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no total in {path}")


def callgrind_self_costs(path: Path) -> dict[str, int]:
    out = subprocess.run(["callgrind_annotate", "--threshold=100", str(path)], capture_output=True, text=True).stdout
    costs: dict[str, int] = {}
    for line in out.splitlines():
        m = re.match(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S.*)$", line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        name = re.sub(r"\s*\[[^\]]*\]$", "", m.group(2))
        name = re.sub(r"^(\?\?\?|[^:]*\.(c|S|rs)):", "", name)
        costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def callgrind_hot(short: Path, long: Path, events: int, top: int = 15) -> list[tuple[float, float, str]]:
    """Per-event hot spots: self cost of each function in the long run minus the short run
    (the set-up cancels), as (percent, Ir per event, short name)."""
    a, b = callgrind_self_costs(short), callgrind_self_costs(long)
    diff = {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b)}
    total = sum(diff.values())
    ranked = sorted(diff.items(), key=lambda kv: -kv[1])[:top]
    return [(100 * v / total, v / events, shorten(k)) for k, v in ranked]


def shorten(name: str) -> str:
    name = re.sub(r"::h[0-9a-f]{16}$", "", name)
    name = re.sub(r"<[^<>]*(<[^<>]*(<[^<>]*>[^<>]*)*>[^<>]*)*>", "<…>", name) if len(name) > 90 else name
    return name[:110]


# ------------------------------------------------------------------ report


def fmt_ms(x: float) -> str:
    return f"{x:.3f} ms" if x < 1 else f"{x:.2f} ms"


def fmt_n(x: float) -> str:
    return f"{x:,.0f}"


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def rows(r: dict) -> list[tuple[str, str, str, str, str]]:
    """(measure, hass-edge, HA, ratio, goal) rows."""
    out = []
    reads = r.get("reads")
    if reads:
        for conns, x in reads["by_conns"].items():
            e, h = x["edge"], x["ha"]
            ratio = e["rps"] / h["rps"]
            out.append((f"GET /api/states/{{entity_id}}, {conns} conn: req/s", fmt_n(e["rps"]), fmt_n(h["rps"]), f"{ratio:.1f}×", f"≥ 20× — {verdict(ratio >= 20)}"))
            out.append((f"  … p50 latency", fmt_ms(e["p50_ms"]), fmt_ms(h["p50_ms"]), f"1/{h['p50_ms'] / e['p50_ms']:.1f}", ""))
            cpu = h["server_cpu_us_per_req"] / e["server_cpu_us_per_req"]
            out.append((f"  … server CPU per request", f"{e['server_cpu_us_per_req']:.1f} µs", f"{h['server_cpu_us_per_req']:.0f} µs", f"1/{cpu:.1f}", ""))
            r99 = h["p99_ms"] / e["p99_ms"]
            out.append((f"  … p99 latency", fmt_ms(e["p99_ms"]), fmt_ms(h["p99_ms"]), f"1/{r99:.1f}", f"≤ 1/10 — {verdict(r99 >= 10)}"))
            n = x.get("nginx")
            if n:
                out.append((f"  … nginx, same JSON as a static file (1 worker, same core): req/s / p99", f"{fmt_n(n['rps'])} / {fmt_ms(n['p99_ms'])}", "—", f"edge/nginx {e['rps'] / n['rps']:.2f}×", ""))
            if int(conns) > 1 and e["client_cpu_pct"] > 0:
                ceiling = e["rps"] / (e["client_cpu_pct"] / 100)
                out.append((f"  … wrk's own ceiling on its core (req/s at 100 % of it)", fmt_n(ceiling), "—", f"20× HA = {fmt_n(20 * h['rps'])}", ""))
    ing = r.get("ingest")
    if ing:
        eps = ing["mixed_events_per_sec"]
        out.append(("Ingest in-process (mixed frames): events per CPU-second", fmt_n(eps), "—", "—", f"≥ 300,000 — {verdict(eps >= 300000)}"))
        out.append(("  … events per wall-clock second (shared core)", fmt_n(ing["mixed_wall_events_per_sec"]), "—", "—", ""))
        out.append(("  … ns/event (mixed / single / coalesced)", f"{ing['mixed_ns_per_event']:.0f} / {ing['single_ns_per_event']:.0f} / {ing['coalesced_ns_per_event']:.0f}", "—", "—", ""))
        out.append(("  … instructions/event (callgrind)", fmt_n(ing["ir_per_event"]), "—", "—", ""))
    e2e = r.get("ingest_e2e")
    if e2e:
        out.append(("Ingest end to end: HA's change rate", "—", f"{e2e['ha_rate']:,.0f}/s", "—", ""))
        out.append(("  … hass-edge CPU (% of one core)", f"{e2e['edge_cpu_pct']:.2f} %", f"{e2e['ha_cpu_pct']:.0f} %", f"1/{e2e['ha_cpu_pct'] / max(e2e['edge_cpu_pct'], 0.01):.0f}", f"≤ 5 % — {verdict(e2e['edge_cpu_pct'] <= 5)}"))
        out.append(("  … events lost (states ≠ HA's at the end)", f"{e2e['differ'] + e2e['extra']} (reconnects {e2e['reconnects']:.0f})", "—", "—", f"0 — {verdict(e2e['lost'] == 0 and e2e['reconnects'] == 0)}"))
    f = r.get("freshness")
    if f:
        out.append(("Freshness p50 / p99: HA's own WS client", "—", f"{f['ha_ws']['p50']:.2f} / {f['ha_ws']['p99']:.2f} ms", "—", ""))
        out.append(("  … our SSE /api/stream", f"{f['sse']['p50']:.2f} / {f['sse']['p99']:.2f} ms", "—", f"{f['sse_minus_ws']['p50']:+.2f} / {f['sse_minus_ws']['p99']:+.2f} ms", f"p99 ≤ +5 ms — {verdict(f['sse_minus_ws']['p99'] <= 5)}"))
        out.append(("  … our GET (tight poll)", f"{f['get']['p50']:.2f} / {f['get']['p99']:.2f} ms", f"(WS {f['ha_ws_b']['p50']:.2f} / {f['ha_ws_b']['p99']:.2f})", f"{f['get_minus_ws']['p50']:+.2f} / {f['get_minus_ws']['p99']:+.2f} ms", f"p99 ≤ +5 ms — {verdict(f['get_minus_ws']['p99'] <= 5)}"))
    m = r.get("memory")
    if m:
        for row in m["rows"]:
            n = row["entities"]
            goal = ""
            if n == 1000:
                goal = f"RSS ≤ 5 MiB — {verdict(row['rss_kib'] <= 5 * 1024)}"
            elif n == 20000:
                goal = f"peak ≤ 32 MiB — {verdict(row['hwm_kib'] <= 32 * 1024)}"
            out.append((f"RSS / peak, {n:,} entities ({row['tracked']:,} tracked)", f"{mib(row['rss_kib'])} / {mib(row['hwm_kib'])}", mib(row["ha_rss_kib"]), f"1/{row['ha_rss_kib'] / row['rss_kib']:.0f}", goal))
            out.append(("  … RssAnon (heap, stacks) / RssFile (binary, libc)", f"{mib(row['anon_kib'])} / {mib(row['file_kib'])}", "—", "—", ""))
            out.append(("  … PSS / USS (private pages only)", f"{mib(row['pss_kib'])} / {mib(row['uss_kib'])}", "—", "—", ""))
            out.append(("  … RSS / peak after one GET /api/states (whole list)", f"{mib(row['rss_after_list_kib'])} / {mib(row['hwm_after_list_kib'])}", "—", "—", ""))
    idle = r.get("idle")
    if idle:
        out.append((f"Idle: CPU per minute ({idle['seconds']:.0f} s window)", f"{idle['cpu_ms_per_min']:.1f} ms", "—", "—", f"≤ 30 ms — {verdict(idle['cpu_ms_per_min'] <= 30)}"))
        per = ", ".join(f"{k} {v}" for k, v in idle.get("by_thread", {}).items())
        out.append((f"  … wake-ups/s (context switches; {per})", f"{idle['wakeups_per_s']:.2f}", "—", "—", f"≤ 1 — {verdict(idle['wakeups_per_s'] <= 1)}"))
        out.append(("  … events received in the window", f"{idle['events']:.0f}", "—", "—", ""))
    hl = r.get("ha_load")
    if hl:
        out.append(("HA REST requests/h, 10 entities polled every 10 s", fmt_n(hl["per_hour_at_10s"]), fmt_n(hl["direct_per_hour"]), "—", f"0 — {verdict(hl['rest_requests'] == 0)}"))
    sz = r.get("sizes")
    if sz:
        out.append(("Stripped binary x86_64", f"{sz['x86_64'] / 1e6:.2f} MB", "—", "—", ""))
        if "aarch64" in sz:
            out.append(("Stripped binary aarch64", f"{sz['aarch64'] / 1e6:.2f} MB", "—", "—", ""))
        for deb in sz["debs"]:
            out.append((f".deb {deb['name']}", f"{deb['bytes'] / 1e6:.2f} MB", "—", "—", ""))
    return out


def table(r: dict) -> str:
    head = ("Measure", "hass-edge", "Home Assistant", "ratio", "goal")
    body = rows(r)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(x) + " |" for x in body]
    return "\n".join(lines)


def plain_table(r: dict) -> str:
    head = ("Measure", "hass-edge", "Home Assistant", "ratio", "goal")
    body = [head] + rows(r)
    widths = [max(len(row[i]) for row in body) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in body)


def generated_section(r: dict) -> str:
    m = r["machine"]
    t = r["timings"]
    la = lambda x: " ".join(f"{v:.2f}" for v in x)
    lines = [
        f"Run: {m['date']}{' — **smoke run** (short windows, not figures to quote)' if r['smoke'] else ''}; "
        f"`bench/run.sh{' --smoke' if r['smoke'] else ''}` took {t['total'] / 60:.1f} min of measuring (+ build).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; load average {la(m['load_start'])} at the start, "
        f"{la(m['load_end'])} at the end (the machine is shared: other engineers' builds and tests ran alongside, "
        "so absolute figures are pessimistic; the ratios against HA come from the same minutes). "
        f"Home Assistant {r['ha_version']} (the test peer, tests/ha-peer), {m['rustc']}, hass-edge release build (fat LTO, opt-level s)"
        + (", run with the packaged unit's environment (" + ", ".join(f"`{k}={v}`" for k, v in r.get("unit_env", {}).items()) + ")" if r.get("unit_env") else "") + ".",
        "",
        "Busiest processes (% of one core over 1 s, top) at the start: " + (", ".join(f"{c} {p:.0f} %" for p, c in r.get("busy_start", [])) or "none")
        + "; at the end: " + (", ".join(f"{c} {p:.0f} %" for p, c in r.get("busy_end", [])) or "none") + ".",
        "",
        table(r),
    ]
    rp = r.get("reads_profile")
    if rp:
        x = r["reads"]["by_conns"]
        e16 = x.get(16, x.get("16"))
        runs = e16["edge"].get("runs", 1)
        each = "; ".join(f"{c} conn: hass-edge " + " / ".join(f"{v:.3f}" for v in x[c]["edge"].get("p99_each_ms", [])) + ", HA " + " / ".join(f"{v:.3f}" for v in x[c]["ha"].get("p99_each_ms", []))
                         for c in x)
        lines += ["", f"Reads: wrk (one thread, keep-alive) pinned to one core, the server to the other; each figure is the median of {runs} run(s) "
                  f"of {r['reads']['seconds'] / runs:.0f} s (p99 of each run in ms, {each})."]
        lines += ["", f"Reads, 16 connections: hass-edge used {e16['edge']['server_cpu_pct']:.0f} % of its core ({e16['edge']['server_cpu_us_per_req']:.1f} µs CPU per request), "
                  f"wrk {e16['edge']['client_cpu_pct']:.0f} % of its core; HA used {e16['ha']['server_cpu_pct']:.0f} % ({e16['ha']['server_cpu_us_per_req']:.0f} µs per request). "
                  f"`perf record -e cpu-clock` of hass-edge during that run: {rp['kernel_pct']:.0f} % of its samples in the kernel (loopback TCP, epoll); top user-space symbols: "
                  + ", ".join(f"`{n}` {p:.1f} %" for p, n in rp["user_top"][:6]) + "."]
    for n, ms in (r.get("massif") or {}).items():
        lines += ["", f"Heap of hass-edge synced with {int(n):,} entities (valgrind massif, until 2 s after the sync): peak {ms['peak_heap'] / 1048576:.2f} MiB "
                  f"({ms['peak_heap_useful'] / 1048576:.2f} MiB requested, the rest malloc overhead) at {ms.get('peak_at', 0):.0%} of the run. "
                  "Bytes live at the peak by the innermost interesting frame of the allocation's stack (ours, or `bytes`/`tungstenite`/… then ← ours; "
                  "decoded states are allocated in `Session::handle_message` and then moved into the store; LTO inlines the executor's tasks into `main`):", ""]
        lines += ["| bytes | function |", "|---:|---|"] + [f"| {b:,} | `{name}` |" for name, b in ms["top"]]
    ing = r.get("ingest")
    if ing and ing.get("hot"):
        lines += ["", f"Where the instructions of one event go (callgrind, self cost per function, {ing['callgrind_events'] * 3:,}-event run minus {ing['callgrind_events']:,}-event run):", ""]
        lines += ["| share | Ir/event | function |", "|---:|---:|---|"]
        lines += [f"| {p:.1f} % | {ir:,.0f} | `{name}` |" for p, ir, name in ing["hot"]]
    lines += ["", "Time per section (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items() if k != "total")]
    return "\n".join(lines)


BEGIN, END = "<!-- bench/run.sh: begin generated -->", "<!-- bench/run.sh: end generated -->"


def write_markdown(path: Path, r: dict) -> None:
    section = f"{BEGIN}\n{generated_section(r)}\n{END}"
    if path.exists() and BEGIN in path.read_text():
        text = path.read_text()
        pre, _, rest = text.partition(BEGIN)
        _, _, post = rest.partition(END)
        path.write_text(pre + section + post)
    else:
        path.write_text("# Benchmarks\n\nThe section below is written by `bench/run.sh`; text outside its markers is kept.\n\n" + section + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--work", required=True)
    ap.add_argument("--peer", required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--ingest")
    ap.add_argument("--repo", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--port-base", type=int, default=18222)
    ap.add_argument("--port-max", type=int, default=18240)
    ap.add_argument("--aarch64", action="append")
    ap.add_argument("--deb-dir", action="append")
    ap.add_argument("--build-seconds", type=float, default=0)
    ap.add_argument("--only", help="comma-separated sections to run (development): ingest,reads,freshness,ha_load,ingest_e2e,idle,memory")
    args = ap.parse_args()
    h = Harness(args)
    asyncio.run(h.run())
    h.r["timings"]["build"] = args.build_seconds
    (Path(args.work) / "results.json").write_text(json.dumps(h.r, indent=1, default=str))
    print(plain_table(h.r))
    print(f"\nload average at start {h.r['machine']['load_start']}, at end {h.r['machine']['load_end']}; total {h.r['timings']['total']:.0f} s")
    write_markdown(Path(args.out), h.r)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
