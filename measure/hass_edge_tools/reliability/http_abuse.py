"""Abuse of the local HTTP API (issue #6), with hass-edge live against the real HA peer.

A probe in a separate process keeps ONE keep-alive connection, opened before any abuse, and
sends `GET /health` back to back (a 2 ms pause between requests) for the whole run; its
latencies are reported per phase (p50/p99/max; the goal is p99 <= 10 ms). A second probe
opens a fresh connection every 0.5 s, to show what a newcomer gets (200; 503 only when every
connection is in a request).

Phases:
 1. idle: --idle (default 1000) connections opened and left silent. hass-edge's cap is 512
    (http.rs MAX_CONNECTIONS); at the cap each newcomer closes the connection idle longest,
    never-spoken ones first: the oldest silent ones are closed (evicted, counted), none is
    answered 503, a newcomer is served and the probe's connection (opened before, kept alive)
    keeps answering. Then (unless --short) the held ones are kept until hass-edge closes them
    itself: a new connection's first request must start within 10 s (REQUEST_TIMEOUT).
 2. malformed: --malformed (default 10000) bad requests, --concurrency at a time: random
    bytes, huge headers, too many headers, bad/huge/conflicting Content-Length, chunked, a
    short body, non-origin targets, NUL bytes, slowloris (one byte a second; 408 after 10 s).
    Each must be refused with the expected 4xx or closed; never a 5xx, never a hang.
 3. stream: a `/api/stream` client that never reads (4 KiB receive buffer) while HA changes
    state fast: hass-edge must drop it (hass_edge_sse_clients_dropped_total) and not grow.
Nothing may crash; RSS (VmRSS/VmHWM) is printed before/after and must stay bounded.

usage: python3 -m hass_edge_tools.reliability.http_abuse [--short] [--idle N] [--malformed N] [--concurrency C] [--keep-peer]
"""
import argparse
import asyncio
import multiprocessing as mp
import random
import socket
import sys
import time

from hass_edge_tools.client import Http
from hass_edge_tools.procfs import fmt_mem
from hass_edge_tools.reliability.common import make_daemon, make_peer, PORT_BASE, Report, stop_all, VERSION
from hass_edge_tools.stats import pct, spread

CAP = 512
REQUEST_TIMEOUT = 10


# ------------------------------------------------------------------ probes (own processes)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Reads one HTTP response with Content-Length; returns (status, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for l in lines[1:]:
        k, _, v = l.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return status, body


def keepalive_probe(port: int, out, stop, ready) -> None:
    """One connection, sequential GET /health; sends [(t, ms, status)] back on stop."""
    rows = []
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ready.set()
    req = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    while not stop.is_set():
        t = time.time()
        t0 = time.perf_counter()
        try:
            sock.sendall(req)
            status, _ = read_response(sock)
        except OSError as e:
            rows.append((t, -1.0, f"error {e}"))
            break
        rows.append((t, (time.perf_counter() - t0) * 1000, status))
        time.sleep(0.002)
    out.send(rows)


def newcomer_probe(port: int, out, stop) -> None:
    """A fresh connection every 0.5 s: [(t, status or error)]."""
    rows = []
    while not stop.is_set():
        t = time.time()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.settimeout(5)
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                status, _ = read_response(s)
            rows.append((t, status))
        except OSError as e:
            rows.append((t, f"error {type(e).__name__}"))
        time.sleep(0.5)
    out.send(rows)


# ------------------------------------------------------------------ malformed requests


def malformed(kind: str, rng: random.Random) -> tuple[bytes, bool, set]:
    """(bytes to send, half-close after sending, acceptable outcomes). Outcomes are status
    codes or "closed"."""
    closed = "closed"
    if kind == "random":
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2048))), True, {400, 431, closed}
    if kind == "huge_header":
        return b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * rng.randint(9000, 70000) + b"\r\n\r\n", False, {431, closed}
    if kind == "many_headers":
        return b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(rng.randint(49, 200))) + b"\r\n", False, {431}
    if kind == "bad_length":
        return b"POST /api/services/light/turn_on HTTP/1.1\r\nContent-Length: " + rng.choice([b"abc", b"-1", b"1e3", b"", b"99999999999999999999999"]) + b"\r\n\r\n", False, {400}
    if kind == "huge_length":
        # Over any body limit: hass-edge's routes take 64 KiB, forwarded requests (service
        # calls are) http.max_forward_body_bytes, at most 64 MiB.
        return b"POST /api/services/light/turn_on HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % rng.randint(2**26 + 1, 10**12), False, {413}
    if kind == "conflicting_length":
        return b"POST /api/services/a/b HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc", False, {400}
    if kind == "chunked":
        return b"POST /api/services/a/b HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", False, {411}
    if kind == "short_body":
        # Not JSON by its Content-Type: refused (415) before the body is awaited; or, waited
        # for, the body never completes.
        return b"POST /api/services/a/b HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"x\":", True, {closed, 415}
    if kind == "absolute_target":
        return b"GET http://127.0.0.1/health HTTP/1.1\r\n\r\n", False, {400}
    if kind == "nul":
        return b"GET /hea\x00lth HTTP/1.1\r\nX: \x00\x01\r\n\r\n", False, {400}
    if kind == "bad_method":
        return b"G(T /health HTTP/1.1\r\n\r\n", False, {400}
    if kind == "bad_version":
        return b"GET /health HTTP/9.9\r\n\r\n", False, {400}
    if kind == "huge_line":
        return b"GET /" + b"a" * rng.randint(9000, 40000) + b" HTTP/1.1\r\n\r\n", False, {431, closed}
    raise ValueError(kind)


KINDS = ["random", "huge_header", "many_headers", "bad_length", "huge_length", "conflicting_length", "chunked", "short_body",
         "absolute_target", "nul", "bad_method", "bad_version", "huge_line"]


async def one_malformed(port: int, kind: str, rng: random.Random) -> tuple[str, object, float]:
    data, half_close, ok = malformed(kind, rng)
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    except (OSError, asyncio.TimeoutError) as e:
        return kind, f"connect {type(e).__name__}", 0.0
    outcome: object
    try:
        try:
            writer.write(data)
            await writer.drain()
            if half_close:
                writer.write_eof()
        except OSError:
            pass  # the server may refuse and close while we are still sending
        try:
            head = await asyncio.wait_for(reader.read(4096), REQUEST_TIMEOUT + 5)
        except (ConnectionResetError, BrokenPipeError):
            head = b""
        if head.startswith(b"HTTP/1.1 "):
            outcome = int(head[9:12])
        elif not head:
            outcome = "closed"
        else:
            outcome = f"garbage {head[:20]!r}"
        if outcome not in ok:
            outcome = f"unexpected {outcome}"
    except asyncio.TimeoutError:
        outcome = "unexpected hang"
    finally:
        writer.close()
    return kind, outcome, time.monotonic() - t0


async def slowloris(port: int) -> object:
    """One byte a second; hass-edge must answer 408 within REQUEST_TIMEOUT (+ slack)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    data = b"GET /health HTTP/1.1\r\nX-Slow: " + b"s" * 100
    try:
        for b in data:
            writer.write(bytes([b]))
            await writer.drain()
            try:
                head = await asyncio.wait_for(reader.read(4096), 1.0)
                took = time.monotonic() - t0
                if head.startswith(b"HTTP/1.1 408") and took <= REQUEST_TIMEOUT + 2:
                    return 408
                return f"unexpected {head[:16]!r} after {took:.1f}s"
            except asyncio.TimeoutError:
                continue
        return "unexpected: never cut off"
    except OSError as e:
        return f"unexpected {type(e).__name__}"
    finally:
        writer.close()


# ------------------------------------------------------------------ phases


async def idle_phase(r, daemon, n_idle: int, short: bool, marks: dict) -> None:
    r.tried(f"1. {n_idle} silent connections (cap {CAP})")
    marks["idle_start"] = time.time()
    conns = []
    for _ in range(n_idle):
        try:
            conns.append((time.monotonic(), await asyncio.open_connection("127.0.0.1", daemon.port)))
        except OSError as e:
            conns.append((time.monotonic(), e))
    await asyncio.sleep(1.0)
    held, evicted, rejected, other = [], [], 0, []

    async def classify(index: int, opened: float, c) -> None:
        nonlocal rejected
        if isinstance(c, Exception):
            other.append(str(c))
            return
        reader, writer = c
        try:
            data = await asyncio.wait_for(reader.read(4096), 0.2)
        except asyncio.TimeoutError:
            held.append((opened, reader, writer))
            return
        except ConnectionResetError:
            data = b""
        except OSError as e:
            other.append(str(e))
            return
        if not data:
            evicted.append(index)
        elif data.startswith(b"HTTP/1.1 503"):
            rejected += 1
        else:
            other.append(repr(data[:30]))
        writer.close()

    await asyncio.gather(*(classify(i, t, c) for i, (t, c) in enumerate(conns)))
    r.figure("1. silent connections held / closed to make room / answered 503 / other",
             f"{len(held)} / {len(evicted)} / {rejected} / {len(other)}")
    r.check(len(held) <= CAP - 1, f"at most {CAP} connections in service ({len(held)} silent + the probe)")
    r.check(len(evicted) >= n_idle - CAP, f"the silent connections beyond the cap made room ({len(evicted)} >= {n_idle - CAP} closed)")
    r.check(not evicted or max(evicted) < n_idle - len(held), "the ones closed were the oldest")
    r.check(rejected == 0, f"none answered 503: silent connections make room ({rejected})")
    r.check(not other, f"no connection failed otherwise ({other[:3]})")
    st = await asyncio.to_thread(fresh_status, daemon.port)
    r.check(st == 200, f"a newcomer is served while {len(held)} silent connections are held (got {st})")
    await asyncio.sleep(2)
    marks["idle_held_end"] = time.time()
    if short:
        for _, _, w in held:
            w.close()
        await asyncio.sleep(1)
    else:
        r.tried(f"1b. hold the silent connections until hass-edge closes them ({REQUEST_TIMEOUT}s for a first request)")
        closed_at = []

        async def wait_closed(opened: float, reader) -> None:
            try:
                data = await asyncio.wait_for(reader.read(1), REQUEST_TIMEOUT + 15)
                if not data:
                    closed_at.append(time.monotonic() - opened)
            except (asyncio.TimeoutError, OSError):
                pass

        await asyncio.gather(*(wait_closed(t, rd) for t, rd, _ in held))
        r.check(len(closed_at) == len(held), f"hass-edge closed all {len(held)} silent connections itself ({len(closed_at)} closed within {REQUEST_TIMEOUT + 15}s)")
        if closed_at:
            r.figure("1b. silent connection closed by hass-edge, seconds after it was opened", spread(closed_at))
            r.check(min(closed_at) >= REQUEST_TIMEOUT - 1 and max(closed_at) <= REQUEST_TIMEOUT + 5, f"closed after the {REQUEST_TIMEOUT}s first-request timeout, not before or much after")
        for _, _, w in held:
            w.close()
    marks["idle_end"] = time.time()
    st = await asyncio.to_thread(fresh_status, daemon.port)
    r.check(st == 200, f"newcomers get 200 once the silent connections are gone (got {st})")


def fresh_status(port: int) -> object:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return read_response(s)[0]
    except OSError as e:
        return f"error {e}"


async def malformed_phase(r, daemon, total: int, concurrency: int, marks: dict) -> None:
    n_slow = min(100, max(4, total // 100))
    r.tried(f"2. {total} malformed/oversized requests ({len(KINDS)} kinds + slowloris x{n_slow}), {concurrency} at a time")
    marks["malformed_start"] = time.time()
    rng = random.Random(6)
    sem = asyncio.Semaphore(concurrency)
    tally: dict[str, dict[str, int]] = {}
    bad: list[str] = []
    durations: list[float] = []

    async def run(i: int) -> None:
        async with sem:
            kind, outcome, took = await one_malformed(daemon.port, KINDS[i % len(KINDS)], rng)
            durations.append(took)
            tally.setdefault(kind, {})
            tally[kind][str(outcome)] = tally[kind].get(str(outcome), 0) + 1
            if isinstance(outcome, str) and (outcome.startswith("unexpected") or outcome.startswith("connect") or outcome.startswith("garbage")):
                bad.append(f"{kind}: {outcome}")

    slow = [asyncio.get_running_loop().create_task(slowloris(daemon.port)) for _ in range(n_slow)]
    await asyncio.gather(*(run(i) for i in range(total - n_slow)))
    slow_results = await asyncio.gather(*slow)
    tally["slowloris"] = {}
    for s in slow_results:
        tally["slowloris"][str(s)] = tally["slowloris"].get(str(s), 0) + 1
        if s != 408:
            bad.append(f"slowloris: {s}")
    marks["malformed_end"] = time.time()
    for kind, outcomes in tally.items():
        print(f"   {kind:18s} {outcomes}")
    r.figure("2. outcomes by kind", "; ".join(f"{k}: " + ", ".join(f"{o} x{n}" for o, n in v.items()) for k, v in tally.items()))
    r.figure("2. malformed requests sent", sum(sum(o.values()) for o in tally.values()))
    r.figure("2. time per malformed request", spread(durations, "s", 3))
    r.check(not bad, f"every malformed request refused with the expected 4xx or closed; none hung ({len(bad)} not: {bad[:4]})")


async def stream_phase(r, daemon, peer, marks: dict, changes: int) -> None:
    r.tried(f"3. /api/stream client that never reads, while HA makes {changes} state changes")
    marks["stream_start"] = time.time()
    before = daemon.metrics()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", daemon.port))
    sock.sendall(b"GET /api/stream?snapshot=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await asyncio.sleep(0.5)
    clients = daemon.metrics().get("hass_edge_sse_clients", 0)
    r.check(clients >= 1, f"the stream client is registered ({clients:.0f})")
    big = "x" * 2000

    def churn() -> int:
        h = Http(peer.url, peer.token)
        ok = 0
        for i in range(changes):
            ok += h.json("POST", f"/api/states/sensor.abuse_{i % 50}", {"state": str(i), "attributes": {"pad": big}})[0] in (200, 201)
        for k in range(50):
            h.json("DELETE", f"/api/states/sensor.abuse_{k}")
        h.close()
        return ok

    mem_before = daemon.mem()
    ok = await asyncio.to_thread(churn)
    # Give hass-edge its write timeout (10 s) to give up on the client.
    t0 = time.monotonic()
    dropped = 0.0
    while time.monotonic() - t0 < 20:
        m = daemon.metrics()
        dropped = m.get("hass_edge_sse_clients_dropped_total", 0) - before.get("hass_edge_sse_clients_dropped_total", 0)
        if m.get("hass_edge_sse_clients", 0) == 0:
            break
        await asyncio.sleep(0.5)
    m = daemon.metrics()
    marks["stream_end"] = time.time()
    r.figure("3. state changes made in HA", ok)
    r.figure("3. stream clients dropped as slow", f"{dropped:.0f}; clients now {m.get('hass_edge_sse_clients', 0):.0f}")
    r.check(m.get("hass_edge_sse_clients", 0) == 0, "the non-reading stream client was disconnected")
    r.figure("3. memory before/after the stream phase", f"{fmt_mem(mem_before)} -> {fmt_mem(daemon.mem())}")
    sock.close()


def latencies(rows, start: float, end: float) -> list[float]:
    return [ms for t, ms, st in rows if start <= t <= end and st == 200]


async def main_async(args) -> int:
    r = Report("http_abuse")
    peer = make_peer(f"http-abuse-{VERSION}", PORT_BASE + 5)
    r.tried(f"start HA {VERSION} on {peer.url}")
    await asyncio.to_thread(peer.start)
    daemon = make_daemon("http-abuse-daemon", peer.url, peer.token, log_level="warn")
    daemon.start()
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    ready = ctx.Event()
    ka_rx, ka_tx = ctx.Pipe(False)
    nc_rx, nc_tx = ctx.Pipe(False)
    probes = []
    try:
        t = await asyncio.to_thread(daemon.wait_live, 60)
        if not r.check(t is not None, "hass-edge goes live"):
            raise RuntimeError("hass-edge did not go live:\n" + daemon.log_text()[-2000:])
        mem0 = daemon.mem()
        r.figure("memory before", fmt_mem(mem0))
        probes = [ctx.Process(target=keepalive_probe, args=(daemon.port, ka_tx, stop, ready)),
                  ctx.Process(target=newcomer_probe, args=(daemon.port, nc_tx, stop))]
        for p in probes:
            p.start()
        await asyncio.to_thread(ready.wait, 10)
        marks = {"base_start": time.time()}
        await asyncio.sleep(3)
        marks["base_end"] = time.time()
        await idle_phase(r, daemon, args.idle, args.short, marks)
        await malformed_phase(r, daemon, args.malformed, args.concurrency, marks)
        await stream_phase(r, daemon, peer, marks, args.changes)
        stop.set()
        ka = await asyncio.to_thread(ka_rx.recv)
        nc = await asyncio.to_thread(nc_rx.recv)
        errors = [row for row in ka if row[2] != 200]
        r.check(not errors, f"the probe's keep-alive connection answered 200 every time ({len(ka)} requests; {errors[:2]})")
        for name, (a, b) in {"baseline": ("base_start", "base_end"), "idle flood": ("idle_start", "idle_held_end"),
                             "idle hold until timeout": ("idle_held_end", "idle_end"),
                             "malformed flood": ("malformed_start", "malformed_end"), "stream + HA churn": ("stream_start", "stream_end")}.items():
            lat = latencies(ka, marks[a], marks[b])
            if not lat:
                continue
            fig = f"n={len(lat)} p50 {pct(lat, 50):.2f} ms, p99 {pct(lat, 99):.2f} ms, max {max(lat):.2f} ms"
            r.figure(f"/health latency, {name}", fig)
            if name != "baseline":
                r.check(pct(lat, 99) <= 10.0, f"/health p99 <= 10 ms during the {name} ({pct(lat, 99):.2f} ms)")
        statuses: dict[str, int] = {}
        for _, st in nc:
            statuses[str(st)] = statuses.get(str(st), 0) + 1
        r.figure("newcomer probe outcomes (every 0.5 s)", statuses)
        r.check(daemon.alive(), "hass-edge did not crash")
        st = fresh_status(daemon.port)
        r.check(st == 200, f"/health on a fresh connection at the end: {st}")
        mem1 = daemon.mem()
        r.figure("memory after", fmt_mem(mem1))
        r.check(mem1.get("VmRSS", 0) <= mem0.get("VmRSS", 0) + 32 * 1024 and mem1.get("VmHWM", 0) <= 128 * 1024,
                f"RSS bounded: VmRSS {mem0.get('VmRSS', 0) / 1024:.1f} -> {mem1.get('VmRSS', 0) / 1024:.1f} MiB (<= +32 MiB), VmHWM {mem1.get('VmHWM', 0) / 1024:.1f} MiB (<= 128 MiB)")
        status, _, body = daemon.http.request("GET", "/metrics")
        invalid = {}
        for line in body.decode().splitlines():
            if line.startswith("hass_edge_http_requests_total{") and ('route="invalid"' in line or 'route="overload"' in line):
                invalid[line.split("{", 1)[1].split("}", 1)[0]] = int(float(line.rsplit(" ", 1)[1]))
        r.figure("hass-edge's own count of refused requests (hass_edge_http_requests_total)", invalid)
        log = daemon.log_text()
        r.check("panicked" not in log, "no panic in hass-edge's log")
    finally:
        stop.set()
        for p in probes:
            p.join(10)
            if p.is_alive():
                p.kill()
        await asyncio.to_thread(stop_all, r, daemon, peer, args.keep_peer)
    return r.finish()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true", help="small counts, no wait for the idle timeout")
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--malformed", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--changes", type=int, default=3000)
    ap.add_argument("--keep-peer", action="store_true")
    args = ap.parse_args()
    if args.short:
        args.idle = min(args.idle, 600)
        args.malformed = min(args.malformed, 1000)
        args.changes = min(args.changes, 1000)
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
