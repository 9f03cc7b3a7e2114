"""No peer may starve the one executor thread (issue 13, "the general guarantee, measured").

While one peer, upstream or local, sends or withholds as fast as it can, hass-edge must keep
answering `/health` (p99 <= 10 ms), fire its timers on time (+-100 ms), exit within 2 s of
SIGTERM, and keep its RSS bounded (VmHWM <= 32 MiB plus the largest frame accepted in the
case; VmRSS back below 2x the steady state once the case ends).

Every case runs its own hass-edge (the real binary) and measures the same things:
- /health latency: a separate process holds one keep-alive connection, opened before the
  case, and sends `GET /health` every 20 ms for the whole flood (p50/p99/max; 503 counts,
  only the time matters). The same process asks an idle hass-edge (the control, whose HA is
  a closed port) just as often: what the shared machine itself costs a request;
- a timer of the daemon, observed from outside: upstream the 10 s auth timeout
  (session.rs AUTH_TIMEOUT) or the heartbeat (`[heartbeat] interval_seconds = 2`,
  `timeout_seconds = 3`: the ping 2 s after `auth_ok`, the disconnect 3 s after an
  unanswered ping); locally the SSE `data: ping` keep-alive (sse.rs KEEPALIVE, 15 s) seen by
  a well-behaved `/api/stream` client whose selection never changes;
- SIGTERM to exit, sent while the flood runs (it is started again after the RSS "after"
  reading, and SIGTERM goes 1 s after hass-edge's counters show it going);
- RSS from /proc/PID/status: steady (before the flood), peak (VmHWM, and VmRSS sampled every
  0.2 s), after (polled for up to 10 s once the flood stopped, until below 2x steady);
- where the CPU went during the flood (CpuShare): hass-edge's on-CPU time and its time
  runnable but waiting for a CPU (schedstat), the flood's processes' CPU, the machine's busy
  share and run queue: a daemon that is slow and one that is starved by the load generator
  on the same cores look the same from the probe. `--nice N` runs the hass-edge under test
  at nice N, to measure the latter (a diagnostic; the report's figures use 0).

Upstream cases (a raw fake HA in this file: no real HA can do this on demand):
 a. frames (events) as fast as it can, never `auth_required`;
 b. `auth_required`, `auth_ok`, then events as fast as it can, pings never answered;
 c. WebSocket pings as fast as it can, never reading a byte.
Local cases (hass-edge live against the real HA peer, tests/ha-peer):
 d. one HTTP connection pipelining `GET /api/states/<id>` as fast as it can;
 e. 500 keep-alive connections sending requests back to back;
 f. 63 `/api/stream` clients that never read (with the observer: the cap of 64; dropped
    ones are replaced every 0.5 s) while HA changes states as fast as it can (16 concurrent
    REST writers, flood.py's);
 g. `GET /api/states/<made-up id>`: 10,000 distinct ids as fast as possible, then more.

Results: common.Report's JSON (with the table as its `markdown`) for reliability.sh's report;
`python3 -m hass_edge_tools.reliability.report --merge DIR RELIABILITY.md starve` puts only
this section into an existing report.

usage: python3 -m hass_edge_tools.reliability.starve [--short] [--upstream S] [--local S] [--only a,b,…]
       [--conns N] [--sinks N] [--nice N] [--keep-peer]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time

from hass_edge_tools.daemon import free_port
from hass_edge_tools.machine import describe
from hass_edge_tools.procfs import proc_cpu_seconds, proc_mem, stat_cpu_seconds
from hass_edge_tools.reliability.common import ensure_venv, make_daemon, make_peer, PORT_BASE, Report, VERSION
from hass_edge_tools.reliability.flood import flood_writer_process
from hass_edge_tools.reliability.http_abuse import read_response
from hass_edge_tools.stats import pct

P99_GOAL_MS = 10.0
TIMER_GOAL_S = 0.1
TERM_GOAL_S = 2.0
RSS_BASE_MIB = 32.0
AUTH_TIMEOUT = 10.0
HB_INTERVAL = 2.0
HB_TIMEOUT = 3.0
KEEPALIVE = 15.0
PROBE_PERIOD = 0.02
# Case e's connections and case f's never-reading stream clients (--conns, --sinks change
# them, to find out how the figures depend on them).
CONNS = 500
SINKS = 63
# The nice value of the hass-edge under test (--nice, a diagnostic: 0 for the report).
NICE = 0
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# ------------------------------------------------------------------ raw WebSocket (RFC 6455)


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked (server) frame."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x80 | opcode, 127]) + struct.pack(">Q", n)
    return head + payload


def ws_upgrade(s: socket.socket) -> bool:
    """Reads the request head and answers 101 (RFC 6455 §4.2.2); False when it is not an upgrade."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            return False
        head += chunk
    key = b""
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    if not key:
        return False
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    s.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    return True


def ws_read_frames(s: socket.socket, on_frame) -> None:
    """Parses the client's (masked) frames until EOF or an error; on_frame(opcode, payload)."""
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return
        buf += chunk
        while len(buf) >= 2:
            op, n, i = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, i = struct.unpack(">H", buf[2:4])[0], 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, i = struct.unpack(">Q", buf[2:10])[0], 10
            mask = b""
            if buf[1] & 0x80:
                if len(buf) < i + 4:
                    break
                mask, i = buf[i:i + 4], i + 4
            if len(buf) < i + n:
                break
            payload = buf[i:i + n]
            if mask:
                payload = bytes(b ^ mask[k & 3] for k, b in enumerate(payload))
            buf = buf[i + n:]
            on_frame(op, payload)


# ------------------------------------------------------------------ the fake HA (own process)


def fake_ha(mode: str, port_out, flooding, events, stop) -> None:
    """A raw WebSocket peer on a free port (sent through `port_out`). While `flooding` is set,
    every connection is upgraded and flooded according to `mode` (a, b, c); while it is clear,
    new connections are closed at once and live ones are cut. Puts (kind, conn, monotonic
    time) on `events`: upgraded, auth_ok, ping (the daemon's heartbeat), ended (the daemon
    closed or reset), cut (we did)."""
    lst = socket.create_server(("127.0.0.1", 0))
    lst.settimeout(0.1)
    port_out.send(lst.getsockname()[1])
    live: dict[int, socket.socket] = {}
    cutting: set[int] = set()
    lock = threading.Lock()
    event_frame = ws_frame(1, b'{"type":"event","id":987654,"event":{"a":{}}}')
    burst_unit = ws_frame(9, b"p") if mode == "c" else event_frame
    burst = burst_unit * (65536 // len(burst_unit))

    def serve(n: int, s: socket.socket) -> None:
        done = threading.Event()

        def end(how: str) -> None:
            with lock:
                if done.is_set():
                    return
                done.set()
                events.put(("cut" if n in cutting else how, n, time.monotonic()))

        try:
            if not ws_upgrade(s):
                s.close()
                return
        except OSError:
            return
        events.put(("upgraded", n, time.monotonic()))
        authed = threading.Event()

        def reader() -> None:
            def on_frame(op: int, payload: bytes) -> None:
                if op != 1:
                    return
                try:
                    msg = json.loads(payload)
                except ValueError:
                    return
                if msg.get("type") == "auth":
                    authed.set()
                elif msg.get("type") == "ping":
                    events.put(("ping", n, time.monotonic()))

            try:
                ws_read_frames(s, on_frame)
            except OSError:
                pass
            end("ended")

        try:
            if mode == "b":
                s.sendall(ws_frame(1, b'{"type":"auth_required","ha_version":"2025.4.4"}'))
            if mode != "c":  # c never reads a byte
                threading.Thread(target=reader, daemon=True).start()
            if mode == "b":
                if not authed.wait(15):
                    raise OSError("no auth")
                s.sendall(ws_frame(1, b'{"type":"auth_ok","ha_version":"2025.4.4"}'))
                events.put(("auth_ok", n, time.monotonic()))
            while not done.is_set():
                s.sendall(burst)
        except OSError:
            pass
        end("ended")
        with lock:
            live.pop(n, None)
        s.close()

    count = 0
    while not stop.is_set():
        if not flooding.is_set():
            with lock:
                for n, s in list(live.items()):
                    cutting.add(n)
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        try:
            s, _ = lst.accept()
        except socket.timeout:
            continue
        if not flooding.is_set():
            s.close()
            continue
        count += 1
        with lock:
            live[count] = s
        threading.Thread(target=serve, args=(count, s), daemon=True).start()


# ------------------------------------------------------------------ local floods (own processes)


def health_probe(ports: list[int], period: float, out, stop, ready) -> None:
    """One keep-alive connection to each of `ports`; every `period` s a `GET /health` to each in
    turn (spread evenly over the period). Sends [(t, ms, status, port index)] on stop. A request
    with no answer within 5 s counts as 5000 ms and its connection is re-opened."""
    rows = []
    req = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    def connect(port: int) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    socks = [connect(p) for p in ports]
    ready.set()
    nxt = time.monotonic()
    step = period / len(ports)
    while not stop.is_set():
        for k, port in enumerate(ports):
            t = time.monotonic()
            try:
                socks[k].sendall(req)
                status, _ = read_response(socks[k])
                rows.append((t, (time.monotonic() - t) * 1000, status, k))
            except OSError as e:
                rows.append((t, (time.monotonic() - t) * 1000, f"error {type(e).__name__}", k))
                socks[k].close()
                try:
                    socks[k] = connect(port)
                except OSError:
                    pass
            nxt += step
            time.sleep(max(0.0, nxt - time.monotonic()))
    out.send(rows)


def sse_observer(port: int, out, stop, ready) -> None:
    """A well-behaved /api/stream client whose selection never changes: sends back the
    monotonic times of the response head and of each `: keep-alive`."""
    times = []
    s = socket.create_connection(("127.0.0.1", port), timeout=1)
    s.sendall(b"GET /api/stream?entity_id=sensor.starve_never_changes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    buf = b""
    head = None
    ready.set()
    while not stop.is_set():
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not chunk:
            break
        now = time.monotonic()
        buf += chunk
        if head is None and b"\r\n\r\n" in buf:
            head = now
            buf = buf.split(b"\r\n\r\n", 1)[1]
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            # HA's format (sse.rs): `data: ping` when the stream opens (not a keep-alive:
            # it comes with the head) and every KEEPALIVE after.
            if block.strip() == b"data: ping" and head is not None and now - head > 1.0:
                times.append(now)
    out.send({"head": head, "keepalives": times})


def pipeline_flood(port: int, path: bytes, stop, out) -> None:
    """One connection: a writer pipelines requests as fast as the socket takes them, a reader
    drains the answers. Sends {requests sent, answers read}."""
    s = socket.create_connection(("127.0.0.1", port))
    req = b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    batch = req * 64
    answers = [0]
    sent = 0

    def reader() -> None:
        tail = b""
        while True:
            try:
                chunk = s.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            data = tail + chunk
            answers[0] += data.count(b"HTTP/1.1 ")
            tail = data[-8:]

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        while not stop.is_set():
            s.sendall(batch)
            sent += 64
    except OSError:
        pass
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    t.join(2)
    s.close()
    out.send({"sent": sent, "answered": answers[0]})


async def keep_alive_client(port: int, next_path, host: str, stop, tally: dict) -> None:
    """One keep-alive connection sending `GET next_path()` as soon as the last request is
    answered, until `stop`; counts answers by status (and errors by type) in `tally`, and
    reconnects after an error or `Connection: close`."""
    reader = writer = None
    while not stop.is_set():
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {next_path()} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            st = head[9:12].decode()
            tally[st] = tally.get(st, 0) + 1
            if b"connection: close" in head.lower():
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError) as e:
            tally[type(e).__name__] = tally.get(type(e).__name__, 0) + 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.05)
    if writer is not None:
        writer.close()


def hammer_flood(port: int, conns: int, paths: list[str], stop, out) -> None:
    """`conns` keep-alive connections, each sending its next request as soon as the last one
    is answered (connection k starts at paths[k] and walks the list). Sends {status: count}."""

    async def run() -> dict:
        tally: dict[str, int] = {}

        def walker(k: int):
            i = itertools.count(k)
            return lambda: paths[next(i) % len(paths)]

        await asyncio.gather(*(keep_alive_client(port, walker(k), "127.0.0.1", stop, tally) for k in range(conns)))
        return tally

    out.send(asyncio.run(run()))


def sse_sinks(port: int, n: int, stop, out) -> None:
    """`n` /api/stream clients (every change, 4 KiB receive buffer) that never read. A client
    that hass-edge dropped cannot tell (its FIN waits behind the unread data), so every 0.5 s
    the gauge `hass_edge_sse_clients` says how many are left, and new ones fill the cap again
    (the dropped sockets stay open until the end). Sends {opened, refills}."""
    from hass_edge_tools.client import Http
    from hass_edge_tools.daemon import parse_metrics

    def open_one() -> socket.socket | None:
        try:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            return s
        except OSError:
            return None

    socks = [open_one() for _ in range(n)]
    refills = 0
    http = Http(f"http://127.0.0.1:{port}", timeout=5)
    while not stop.wait(0.5):
        try:
            status, _, body = http.request("GET", "/metrics")
            clients = parse_metrics(body.decode()).get("hass_edge_sse_clients", 0)
        except OSError:
            continue
        missing = int(n + 1 - clients)  # + 1: the observer
        if missing > 0 and len(socks) < 4000:
            refills += 1
            socks += [open_one() for _ in range(missing)]
    for s in socks:
        if s:
            s.close()
    http.close()
    out.send({"stream clients opened": len(socks), "refills": refills})


def made_up_reads(port: int, first: int, conns: int, stop, out) -> None:
    """GET /api/states/sensor.starve_madeup_<i> for i = first, first+1, … over `conns`
    keep-alive connections until stopped. Sends {status: count, "ids": distinct ids read}."""
    counter = itertools.count(first)
    paths_done = [0]

    def next_path() -> str:
        paths_done[0] += 1
        return f"/api/states/sensor.starve_madeup_{next(counter)}"

    async def run() -> dict:
        tally: dict[str, int] = {}
        await asyncio.gather(*(keep_alive_client(port, next_path, "127.0.0.1", stop, tally) for _ in range(conns)))
        tally["ids"] = paths_done[0]
        return tally

    out.send(asyncio.run(run()))


# ------------------------------------------------------------------ one case


class Case:
    """What one case measured, and its row in the table."""

    def __init__(self, key: str, what: str):
        self.key, self.what = key, what
        self.health: list[tuple[float, float, object]] = []
        # The same probe's requests to an idle hass-edge (the control) at the same time: what
        # the machine itself (load, the flooder's CPU) costs a request.
        self.control: list[tuple[float, float, object]] = []
        self.timer_name = ""
        self.timer_errors: list[float] = []  # fired - due, seconds
        self.timer_detail = ""
        self.term: float | None = None
        self.exit_code: int | None = None
        self.steady = self.peak_rss = self.hwm = self.after = 0  # kB
        self.after_s: float | None = None  # seconds until VmRSS < 2x steady after the flood
        self.largest_frame = 0  # bytes
        self.load = 0.0
        self.t0 = 0.0  # monotonic start of the flood
        self.cpu = 0.0  # hass-edge's CPU during the flood, in cores
        self.share: CpuShare | None = None  # where the CPU went during the flood
        self.runq: list[int] = []  # procs_running, sampled every 0.2 s during the flood
        self.flood = ""
        self.extra_checks: list[tuple[bool, str]] = []

    def p(self, q: float) -> float:
        return pct([ms for _, ms, _ in self.health], q)

    @property
    def rss_bound_kb(self) -> float:
        return RSS_BASE_MIB * 1024 + self.largest_frame / 1024

    def goals(self) -> dict[str, bool]:
        lat = [ms for _, ms, _ in self.health]
        return {
            "p99": bool(lat) and pct(lat, 99) <= P99_GOAL_MS,
            "timer": bool(self.timer_errors) and max(abs(e) for e in self.timer_errors) <= TIMER_GOAL_S,
            "term": self.term is not None and self.term <= TERM_GOAL_S and self.exit_code == 0,
            "rss": self.hwm > 0 and self.hwm <= self.rss_bound_kb and 0 < self.after < 2 * self.steady,
        }


def mark(ok: bool) -> str:
    return "PASS" if ok else "**MISS**"


class Measure:
    """Runs the probe, the RSS sampler and (locally) the SSE observer around one daemon."""

    def __init__(self, ctx, daemon, control, observer: bool):
        self.ctx, self.daemon = ctx, daemon
        self.stop = ctx.Event()
        self.rx, tx = ctx.Pipe(False)
        ready = ctx.Event()
        self.procs = [ctx.Process(target=health_probe, args=([daemon.port, control.port], PROBE_PERIOD, tx, self.stop, ready))]
        self.obs_rx = None
        obs_ready = ctx.Event()
        if observer:
            self.obs_rx, otx = ctx.Pipe(False)
            self.procs.append(ctx.Process(target=sse_observer, args=(daemon.port, otx, self.stop, obs_ready)))
        for p in self.procs:
            p.start()
        ready.wait(10)
        if observer:
            obs_ready.wait(10)
        self.peak = 0
        self._sampling = True
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()

    def _sample(self) -> None:
        self.runq: list[int] = []
        while self._sampling:
            self.peak = max(self.peak, proc_mem(self.daemon.pid).get("VmRSS", 0))
            self.runq.append(procs_running())
            time.sleep(0.2)

    def finish(self) -> tuple[list, dict | None]:
        self._sampling = False
        self.stop.set()
        rows = self.rx.recv()
        obs = self.obs_rx.recv() if self.obs_rx else None
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        return rows, obs


def rss_after(daemon, steady: int, limit: float = 10.0) -> tuple[int, float | None]:
    """VmRSS once the flood stopped: polled every 0.2 s until below 2x `steady` (kB), at most
    `limit` s; (the last reading, seconds it took or None)."""
    t0 = time.monotonic()
    while True:
        rss = proc_mem(daemon.pid).get("VmRSS", 0)
        if 0 < rss < 2 * steady:
            return rss, time.monotonic() - t0
        if time.monotonic() - t0 >= limit:
            return rss, None
        time.sleep(0.2)


def sigterm(daemon) -> tuple[float | None, int | None]:
    """SIGTERM now; (seconds to exit, exit code); SIGKILL after 10 s."""
    t0 = time.monotonic()
    daemon.proc.send_signal(15)
    try:
        daemon.proc.wait(10)
        took = time.monotonic() - t0
    except subprocess.TimeoutExpired:
        took = None
        daemon.proc.kill()
        daemon.proc.wait()
    daemon.stop()  # closes its log and client
    return took, daemon.proc.returncode


class CpuShare:
    """Where the CPU went during a flood, to tell a slow daemon from a starved one: hass-edge's
    on-CPU time and its time runnable but waiting for a CPU (the sum over its threads of
    /proc/<pid>/task/*/schedstat fields 1 and 2), the flood's processes' CPU (utime + stime),
    and the machine's busy share (/proc/stat). `start` at the flood's start, `stop` at its
    end."""

    def __init__(self, daemon_pid: int, flood_pids: list[int]):
        self.pid, self.flood_pids = daemon_pid, flood_pids
        self.on = self.wait = self.flood = self.busy = 0.0

    @staticmethod
    def _sched(pid: int) -> tuple[float, float]:
        on = wait = 0
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                try:
                    f = open(f"/proc/{pid}/task/{task}/schedstat").read().split()
                    on, wait = on + int(f[0]), wait + int(f[1])
                except (OSError, IndexError, ValueError):
                    continue
        except OSError:
            pass
        return on / 1e9, wait / 1e9

    @staticmethod
    def _machine() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]

    def _read(self):
        # The flood's processes from /proc/<pid>/stat, which keeps the time of threads that
        # ended (the fake HA's end with their connection).
        return self._sched(self.pid), sum(stat_cpu_seconds(p) for p in self.flood_pids), self._machine(), time.monotonic()

    def start(self) -> None:
        self._a = self._read()

    def stop(self) -> None:
        (on0, w0), f0, (t0, i0), m0 = self._a
        (on1, w1), f1, (t1, i1), m1 = self._read()
        el = max(1e-6, m1 - m0)
        self.on, self.wait, self.flood = (on1 - on0) / el, (w1 - w0) / el, (f1 - f0) / el
        self.busy = 1 - (i1 - i0) / max(1, t1 - t0)

    def text(self, runq: list[int]) -> str:
        rq = sorted(runq)
        q = f"; run queue (procs_running) median {rq[len(rq) // 2]}, p90 {rq[int(len(rq) * 0.9)]}" if rq else ""
        return (f"hass-edge used {self.on * 100:.0f}% of a core and waited for a CPU (runnable, not running) "
                f"{self.wait * 100:.0f}% of the time; the flood's processes used {self.flood * 100:.0f}% of a core; "
                f"machine busy {self.busy * 100:.0f}% of {os.cpu_count()} cores{q}")


def procs_running() -> int:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("procs_running"):
                return int(line.split()[1])
    return 0


def in_window(rows, t0: float, t1: float, k: int) -> list:
    """The probe's rows of port `k` (0: the daemon under test, 1: the control) in [t0, t1]."""
    return [row[:3] for row in rows if t0 <= row[0] <= t1 and row[3] == k]


# ------------------------------------------------------------------ upstream cases


def upstream_case(r: Report, ctx, key: str, seconds: float, control) -> Case:
    what = {"a": "HA floods event frames before `auth_required`",
            "b": "HA floods events after `auth_ok`, never answers a ping",
            "c": "HA floods pings and never reads"}[key]
    case = Case(key, what)
    r.tried(f"{key}. {what}, {seconds:.0f} s")
    port_rx, port_tx = ctx.Pipe(False)
    flooding, stop, events = ctx.Event(), ctx.Event(), ctx.Queue()
    peer = ctx.Process(target=fake_ha, args=(key, port_tx, flooding, events, stop))
    peer.start()
    port = port_rx.recv()
    log: list[tuple] = []

    def drain() -> None:
        while True:
            e = events.get()
            if e is None:
                return
            log.append(e)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    settings = {"heartbeat": {"interval_seconds": int(HB_INTERVAL), "timeout_seconds": int(HB_TIMEOUT)},
                "reconnect": {"max_delay_seconds": 1}, "cache": {"persist": False}}
    daemon = make_daemon(f"starve-{key}", f"http://127.0.0.1:{port}", "starve-token", settings, log_level="warn")
    if NICE:
        daemon.prefix = ["nice", "-n", str(NICE)]
    daemon.start()
    try:
        time.sleep(2)
        case.steady = proc_mem(daemon.pid).get("VmRSS", 0)
        m = Measure(ctx, daemon, control, observer=False)
        t0 = time.monotonic()
        case.load = os.getloadavg()[0]
        cpu0 = proc_cpu_seconds(daemon.pid)
        case.share = CpuShare(daemon.pid, [peer.pid])
        case.share.start()
        rq0 = len(m.runq)
        flooding.set()
        time.sleep(seconds)
        flooding.clear()
        t1 = time.monotonic()
        case.share.stop()
        case.runq = m.runq[rq0:]
        case.cpu = (proc_cpu_seconds(daemon.pid) - cpu0) / (t1 - t0)
        rows, _ = m.finish()
        case.t0 = t0
        case.health = in_window(rows, t0, t1, 0)
        case.control = in_window(rows, t0, t1, 1)
        case.peak_rss = m.peak
        case.hwm = proc_mem(daemon.pid).get("VmHWM", 0)
        case.largest_frame = 64  # every frame the fake sends is < 64 bytes
        case.after, case.after_s = rss_after(daemon, case.steady)
        # The timers, from what the fake saw of each connection that the daemon ended itself.
        conns: dict[int, dict[str, float]] = {}
        for kind, n, t in log:
            conns.setdefault(n, {}).setdefault(kind, t)
        if key in ("a", "c"):
            case.timer_name = "auth timeout (10 s after the upgrade)"
            for c in conns.values():
                if "upgraded" in c and "ended" in c:
                    case.timer_errors.append(c["ended"] - c["upgraded"] - AUTH_TIMEOUT)
        else:
            case.timer_name = f"heartbeat: ping {HB_INTERVAL:.0f} s after auth_ok, disconnect {HB_TIMEOUT:.0f} s after the ping"
            for c in conns.values():
                if "auth_ok" in c and "ping" in c:
                    case.timer_errors.append(c["ping"] - c["auth_ok"] - HB_INTERVAL)
                    if "ended" in c:
                        case.timer_errors.append(c["ended"] - c["ping"] - HB_TIMEOUT)
        upgraded = sum("upgraded" in c for c in conns.values())
        case.flood = f"{upgraded} connections flooded"
        # SIGTERM during the flood: start it again, wait for a connection to be flooded.
        before = len([e for e in log if e[0] == ("auth_ok" if key == "b" else "upgraded")])
        flooding.set()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len([e for e in log if e[0] == ("auth_ok" if key == "b" else "upgraded")]) <= before:
            time.sleep(0.05)
        time.sleep(1)
        flooding_again = len([e for e in log if e[0] == ("auth_ok" if key == "b" else "upgraded")]) > before
        case.extra_checks.append((flooding_again, f"{key}: the flood was running again when SIGTERM was sent"))
        case.term, case.exit_code = sigterm(daemon)
    finally:
        if daemon.alive():
            daemon.stop()
        stop.set()
        flooding.clear()
        peer.join(5)
        if peer.is_alive():
            peer.kill()
        events.put(None)
        drainer.join(2)
    return case


# ------------------------------------------------------------------ local cases


def local_case(r: Report, ctx, key: str, seconds: float, peer, control) -> Case:
    what = {"d": "one HTTP connection pipelines `GET /api/states/<id>` as fast as it can",
            "e": f"{CONNS} keep-alive connections send requests back to back",
            "f": f"{SINKS} `/api/stream` clients never read (with the observer: {SINKS + 1}; a dropped one is replaced) while HA changes states as fast as it can",
            "g": "`GET /api/states/<made-up id>`: 10,000 distinct ids as fast as possible, then more"}[key]
    case = Case(key, what)
    case.timer_name = f"SSE `data: ping` every {KEEPALIVE:.0f} s (observer client)"
    r.tried(f"{key}. {what}, {seconds:.0f} s")
    daemon = make_daemon(f"starve-{key}", peer.url, peer.token, {"cache": {"persist": False}}, log_level="warn")
    if NICE:
        daemon.prefix = ["nice", "-n", str(NICE)]
    daemon.start()
    try:
        if daemon.wait_live(60) is None:
            raise RuntimeError("hass-edge did not go live:\n" + daemon.log_text()[-2000:])
        ids = sorted(daemon.states())
        tracked0 = daemon.metrics().get("hass_edge_entities_tracked", 0)
        m0 = daemon.metrics()
        tm0 = time.monotonic()
        time.sleep(1)
        case.steady = proc_mem(daemon.pid).get("VmRSS", 0)

        def start_flood(secs: float):
            stop = ctx.Event()
            procs = []

            def spawn(target, *args):
                rx, tx = ctx.Pipe(False)
                p = ctx.Process(target=target, args=(*args, tx))
                p.start()
                procs.append((p, rx))

            if key == "d":
                spawn(pipeline_flood, daemon.port, f"/api/states/{ids[0]}".encode(), stop)
            elif key == "e":
                paths = ["/health", "/api/states"] + [f"/api/states/{i}" for i in ids[:50]]
                for k in range(2):
                    spawn(hammer_flood, daemon.port, CONNS // 2 + k * (CONNS % 2), paths, stop)
            elif key == "f":
                spawn(sse_sinks, daemon.port, SINKS, stop)
                time.sleep(0.5)
                spawn(flood_writer_process, peer.url, peer.token, secs, 16, 0)
            elif key == "g":
                spawn(made_up_reads, daemon.port, 0, 32, stop)
            return stop, procs

        def stop_flood(flood, wait: bool = True) -> list:
            """Stops the flood; its processes' results, or (not `wait`) kills them."""
            stop, procs = flood
            stop.set()
            got = []
            for p, rx in procs:
                if not wait:
                    p.kill()
                    p.join()
                    continue
                try:
                    got.append(rx.recv() if rx.poll(60) else "no result")
                except EOFError:
                    got.append(f"{p.name} crashed (exit {p.exitcode})")
                p.join(10)
                if p.is_alive():
                    p.kill()
            return got

        def wait_running(timeout: float = 30) -> bool:
            """Until the flood's processes (spawned: a second or more under load) are at it,
            as hass-edge's own counters show."""
            first = daemon.metrics()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                now = daemon.metrics()
                if key == "f":
                    if now.get("hass_edge_sse_clients", 0) >= SINKS + 1 and now.get("hass_edge_events_received_total", 0) - first.get("hass_edge_events_received_total", 0) >= 100:
                        return True
                elif now.get("hass_edge_http_requests_total", 0) - first.get("hass_edge_http_requests_total", 0) >= 1000:
                    return True
                time.sleep(0.1)
            return False

        m = Measure(ctx, daemon, control, observer=True)
        flood = start_flood(seconds + 3)
        case.extra_checks.append((wait_running(), f"{key}: the flood got going"))
        t0 = time.monotonic()
        case.load = os.getloadavg()[0]
        cpu0 = proc_cpu_seconds(daemon.pid)
        case.share = CpuShare(daemon.pid, [p.pid for p, _ in flood[1]])
        case.share.start()
        rq0 = len(m.runq)
        time.sleep(seconds)
        t1 = time.monotonic()
        case.share.stop()
        case.runq = m.runq[rq0:]
        case.cpu = (proc_cpu_seconds(daemon.pid) - cpu0) / (t1 - t0)
        result = stop_flood(flood)
        rows, obs = m.finish()
        case.t0 = t0
        case.health = in_window(rows, t0, t1, 0)
        case.control = in_window(rows, t0, t1, 1)
        case.peak_rss = m.peak
        case.hwm = proc_mem(daemon.pid).get("VmHWM", 0)
        case.largest_frame = 0  # the HA peer's frames are a few kB; counted in the 32 MiB
        marks = ([obs["head"]] if obs and obs["head"] else []) + (obs["keepalives"] if obs else [])
        case.timer_errors = [b - a - KEEPALIVE for a, b in zip(marks, marks[1:])]
        case.timer_detail = f"{len(case.timer_errors)} keep-alives"
        m1 = daemon.metrics()
        between = time.monotonic() - tm0
        case.flood = "; ".join(json.dumps(x) if isinstance(x, dict) else str(x) for x in result)
        if key == "f":
            dropped = m1.get("hass_edge_sse_clients_dropped_total", 0) - m0.get("hass_edge_sse_clients_dropped_total", 0)
            case.flood += f"; hass-edge dropped {dropped:.0f} slow stream clients"
        if key == "g":
            rest = m1.get("hass_edge_ha_rest_requests_total", 0) - m0.get("hass_edge_ha_rest_requests_total", 0)
            limited = m1.get("hass_edge_ha_rest_reads_limited_total", 0) - m0.get("hass_edge_ha_rest_reads_limited_total", 0)
            tracked1 = m1.get("hass_edge_entities_tracked", 0)
            case.flood += f"; REST requests to HA {rest:.0f} ({rest / seconds:.1f}/s), reads refused by the budget {limited:.0f}; tracked entities {tracked0:.0f} -> {tracked1:.0f}"
            case.extra_checks.append((tracked1 >= tracked0, f"g: no tracked state evicted by the made-up reads ({tracked0:.0f} -> {tracked1:.0f})"))
            # hub.rs: REST_READ_BURST 50, then REST_READS_PER_SECOND 10.
            case.extra_checks.append((rest <= 50 + 10 * between + 1, f"g: REST reads towards HA within the budget, 50 + 10/s ({rest:.0f} in {between:.1f} s)"))
            ids_read = sum(x.get("ids", 0) for x in result if isinstance(x, dict))
            case.extra_checks.append((ids_read >= 10000, f"g: at least 10,000 made-up ids read ({ids_read})"))
        case.after, case.after_s = rss_after(daemon, case.steady)
        # SIGTERM during the flood: start it again, 1 s after it got going.
        flood = start_flood(40)
        case.extra_checks.append((wait_running(), f"{key}: the flood was running again when SIGTERM was sent"))
        time.sleep(1)
        case.term, case.exit_code = sigterm(daemon)
        stop_flood(flood, wait=False)
    finally:
        if daemon.alive():
            daemon.stop()
    return case


# ------------------------------------------------------------------ report


def table(cases: list[Case], commit: str) -> str:
    out = [
        f"Machine: {describe()}, shared with other agents' builds and tests (load not controlled); "
        f"commit {commit}; hass-edge against HA {VERSION} (local cases) or a raw fake HA (upstream cases)"
        + (f"; the hass-edge under test ran at nice {NICE} (--nice, a diagnostic)." if NICE else "."),
        "",
        f"Goals: `/health` p99 <= {P99_GOAL_MS:.0f} ms (a separate keep-alive client, every {PROBE_PERIOD * 1000:.0f} ms); "
        f"timers within +-{TIMER_GOAL_S * 1000:.0f} ms of due; SIGTERM to exit <= {TERM_GOAL_S:.0f} s (exit 0) during the flood; "
        f"RSS: VmHWM <= {RSS_BASE_MIB:.0f} MiB + the largest accepted frame (every frame here < 64 KiB), "
        "VmRSS < 2x steady within 10 s after the case (after = that reading; the time it took in brackets).",
        "",
        "| case | load (1 min) | /health n | p50 / p99 / max ms | p99 | control: idle hass-edge, same probe, same time: p50 / p99 / max ms | timer | late (max abs) | timer | SIGTERM -> exit | exit | RSS steady / peak VmRSS / VmHWM / after MiB | RSS | all |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cases:
        g = c.goals()
        lat = [ms for _, ms, _ in c.health]
        errs = c.timer_errors
        timer = f"{len(errs)} samples: " + ", ".join(f"{e * 1000:+.0f}" for e in errs[:8]) + " ms" if errs else "none observed"
        worst = f"{max(abs(e) for e in errs) * 1000:.0f} ms" if errs else "n/a"
        term = f"{c.term * 1000:.0f} ms" if c.term is not None else "no exit in 10 s"
        rss = f"{c.steady / 1024:.1f} / {c.peak_rss / 1024:.1f} / {c.hwm / 1024:.1f} / {c.after / 1024:.1f} ({'%.1f s' % c.after_s if c.after_s is not None else 'not within 10 s'})"
        lat_s = f"{pct(lat, 50):.2f} / {pct(lat, 99):.2f} / {max(lat):.2f}" if lat else "n/a"
        ctl = [ms for _, ms, _ in c.control]
        ctl_s = f"{pct(ctl, 50):.2f} / {pct(ctl, 99):.2f} / {max(ctl):.2f}" if ctl else "n/a"
        out.append(f"| {c.key}. {c.what} | {c.load:.1f} | {len(lat)} | {lat_s} | {mark(g['p99'])} | {ctl_s} | {c.timer_name}: {timer} | {worst} | {mark(g['timer'])} "
                   f"| {term} | {c.exit_code} | {rss} | {mark(g['rss'])} | {mark(all(g.values()))} |")
    out.append("")
    out.append("What each flood did:")
    out.append("")
    for c in cases:
        share = c.share.text(c.runq) if c.share else f"hass-edge used {c.cpu * 100:.0f}% of a core"
        out.append(f"- {c.key}: {c.flood}; {share}")
    return "\n".join(out)


def main() -> None:
    global CONNS, SINKS, NICE
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true", help="CI smoke: 11 s upstream, 16 s local cases")
    ap.add_argument("--upstream", type=float, default=None, help="seconds of each upstream flood (default 25; >= 11 to see an auth timeout)")
    ap.add_argument("--local", type=float, default=None, help="seconds of each local flood (default 32; >= 16 to see an SSE keep-alive)")
    ap.add_argument("--only", default="a,b,c,d,e,f,g")
    ap.add_argument("--conns", type=int, default=CONNS, help="case e's connections")
    ap.add_argument("--sinks", type=int, default=SINKS, help="case f's never-reading stream clients")
    ap.add_argument("--nice", type=int, default=0, help="run the hass-edge under test at this nice value (a diagnostic: "
                    "how much of a case's latency is waiting for a CPU that the flood's processes hold)")
    ap.add_argument("--keep-peer", action="store_true")
    args = ap.parse_args()
    CONNS, SINKS, NICE = args.conns, args.sinks, args.nice
    up = args.upstream or (11.5 if args.short else 25)
    local = args.local or (16 if args.short else 32)
    ensure_venv()
    only = args.only.split(",")
    ctx = mp.get_context("spawn")
    r = Report("starve")
    commit = subprocess.run(["git", "log", "-1", "--format=%h"], capture_output=True, text=True).stdout.strip()
    cases: list[Case] = []
    peer = None
    # The control: an idle hass-edge (its HA is a closed port), probed alongside each case.
    control = make_daemon("starve-control", f"http://127.0.0.1:{free_port()}", "starve-token", {"cache": {"persist": False}}, log_level="warn")
    control.start()
    try:
        for key in [k for k in "abc" if k in only]:
            cases.append(upstream_case(r, ctx, key, up, control))
        if any(k in only for k in "defg"):
            peer = make_peer(f"starve-{VERSION}", PORT_BASE + 6)
            r.tried(f"start HA {VERSION} on {peer.url}")
            peer.start()
            for key in [k for k in "defg" if k in only]:
                cases.append(local_case(r, ctx, key, local, peer, control))
    except Exception as e:  # report what was measured so far
        r.check(False, f"the run ended early: {type(e).__name__}: {e}")
    finally:
        control.stop()
        if peer and not args.keep_peer:
            peer.stop()
    # The CI smoke (--short) runs on a machine whose load is not ours: there the speed and
    # memory goals are reported, and only what must hold whatever the load (SIGTERM acted on,
    # the timers firing at all, the floods running, the budget) fails the run.
    gate = r.goal if args.short else r.check
    for c in cases:
        g = c.goals()
        lat = [ms for _, ms, _ in c.health]
        gate(g["p99"], f"{c.key}: /health p99 <= {P99_GOAL_MS:.0f} ms ({pct(lat, 99):.2f} ms over {len(lat)} requests)")
        errs = ", ".join(f"{e * 1000:+.0f}" for e in c.timer_errors)
        r.check(bool(c.timer_errors), f"{c.key}: {c.timer_name} observed")
        gate(g["timer"], f"{c.key}: {c.timer_name} within +-{TIMER_GOAL_S * 1000:.0f} ms ({errs or 'none observed'} ms)")
        r.check(g["term"], f"{c.key}: SIGTERM to exit <= {TERM_GOAL_S:.0f} s during the flood ({c.term if c.term is None else round(c.term, 2)} s, exit {c.exit_code})")
        gate(g["rss"], f"{c.key}: RSS bounded: VmHWM {c.hwm / 1024:.1f} MiB <= {c.rss_bound_kb / 1024:.1f} MiB, after {c.after / 1024:.1f} MiB < 2x steady {c.steady / 1024:.1f} MiB within 10 s")
        for ok, text in c.extra_checks:
            r.check(ok, text)
        r.figure(f"{c.key}: flood", c.flood)
        worst = sorted(c.health, key=lambda row: -row[1])[:6]
        over = sum(ms > P99_GOAL_MS for _, ms, _ in c.health)
        r.figure(f"{c.key}: slowest /health (seconds into the flood: ms)", f"{over} of {len(c.health)} over {P99_GOAL_MS:.0f} ms; " + ", ".join(f"{t - c.t0:.1f}s: {ms:.0f}" for t, ms, _ in sorted(worst)))
    r.markdown = table(cases, commit)
    print(r.markdown, flush=True)
    sys.exit(r.finish())


if __name__ == "__main__":
    main()
