"""1. Reads: GET /api/states/<entity_id> from wrk against hass-edge, HA's own REST API (with
its token, ha_auth.lua) and nginx serving the same JSON from a file (the machine's floor);
wrk on one core, the servers on the other; at 1 and 16 connections."""
from __future__ import annotations

import asyncio
import os
import re
import resource
import shutil
import subprocess
from pathlib import Path

import aiohttp

from hass_edge_tools.bench.harness import Harness, log
from hass_edge_tools.bench.profiles import perf_summary, perf_works
from hass_edge_tools.daemon import Daemon
from hass_edge_tools.procfs import pin, proc_cpu_seconds


READ_ENTITY = "sensor.living_temperature"


def wrk(url: str, conns: int, seconds: float, lua: Path | None, token: str | None, server: int, profile: Path | None = None) -> dict:
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


def wrk_median(h: Harness, url: str, conns: int, seconds: float, lua: Path | None, token: str | None, server: int) -> dict:
    """`wrk` in three runs of `seconds` / 3 (one in a smoke), each figure the median of
    the runs: one burst of a neighbour's activity on the shared machine moves a 1 %
    tail of one run by an order of magnitude."""
    runs = 1 if h.smoke else 3
    results = [wrk(url, conns, seconds / runs, lua, token, server) for _ in range(runs)]
    out = {k: sorted(r[k] for r in results)[runs // 2] for k in ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_req", "server_cpu_pct", "client_cpu_pct")}
    out["non2xx"] = sum(r["non2xx"] for r in results)
    out["errors"] = "; ".join(r["errors"] for r in results if r["errors"])
    out["runs"] = runs
    out["p99_each_ms"] = [r["p99_ms"] for r in results]
    return out


async def measure(h: Harness, s: aiohttp.ClientSession, d: Daemon) -> None:
    log("1. reads: wrk against hass-edge and HA")
    seconds = h.dur(12, 2)
    async with s.get(f"{d.base}/api/states/{READ_ENTITY}") as r:
        assert r.status == 200 and r.headers.get("X-Cache") == "hit", f"{READ_ENTITY} is not a cache hit: {r.status} {r.headers}"
    lua = Path(__file__).with_name("ha_auth.lua")
    hass = h.peer.pid()
    pin(d.pid, "0")
    pin(hass, "0")
    res = {}
    nginx = await start_nginx(h, s, d)
    try:
        for conns in (1, 16):
            edge = wrk_median(h, f"{d.base}/api/states/{READ_ENTITY}", conns, seconds, None, None, d.pid)
            if conns == 16 and perf_works():
                # A separate run: sampling at 1 kHz would itself stretch the measured tail.
                prof = h.work / "perf.reads.data"
                wrk(f"{d.base}/api/states/{READ_ENTITY}", conns, min(seconds, 3), None, None, d.pid, prof)
                if prof.exists():
                    h.r["reads_profile"] = perf_summary(prof)
            ha = wrk_median(h, f"{h.peer.url}/api/states/{READ_ENTITY}", conns, seconds, lua, h.peer.token, hass)
            for name, x in (("edge", edge), ("ha", ha)):
                if x["non2xx"]:
                    raise RuntimeError(f"{name}: {x['non2xx']} non-2xx answers to wrk")
            res[conns] = {"edge": edge, "ha": ha}
            if nginx:
                res[conns]["nginx"] = wrk_median(h, nginx[1], conns, seconds, None, None, nginx[0].pid)
            log(f"   c={conns}: edge {edge['rps']:.0f} req/s p99 {edge['p99_ms']:.3f} ms ({edge['server_cpu_pct']:.0f} % CPU, {edge['server_cpu_us_per_req']:.1f} µs/req; wrk {edge['client_cpu_pct']:.0f} %); "
                f"HA {ha['rps']:.0f} req/s p99 {ha['p99_ms']:.3f} ms ({ha['server_cpu_pct']:.0f} % CPU, {ha['server_cpu_us_per_req']:.0f} µs/req)"
                + (f"; nginx {res[conns]['nginx']['rps']:.0f} req/s p99 {res[conns]['nginx']['p99_ms']:.3f} ms" if nginx else ""))
    finally:
        pin(d.pid, "0-1")
        pin(hass, "0-1")
        if nginx:
            nginx[0].terminate()
            nginx[0].wait()
    h.r["reads"] = {"seconds": max(1, round(seconds)), "entity": READ_ENTITY, "by_conns": res}


async def start_nginx(h: Harness, s: aiohttp.ClientSession, d: Daemon) -> tuple[subprocess.Popen, str] | None:
    """The machine's floor for the same work: nginx (one worker, pinned to the servers'
    core) serving the entity's JSON, as hass-edge answers it, from a static file; `None`
    without nginx. (process, url)."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not binary:
        log("   nginx not installed: no floor reference")
        return None
    root = h.work / "nginx"
    root.mkdir(exist_ok=True)
    async with s.get(f"{d.base}/api/states/{READ_ENTITY}") as r:
        (root / "state.json").write_bytes(await r.read())
    port = h.next_port()
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
    h.r["nginx_version"] = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr.strip().replace("nginx version: ", "")
    return proc, url
