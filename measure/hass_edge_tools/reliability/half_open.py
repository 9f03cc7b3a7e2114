"""Half-open connection (issue #6): a TCP proxy (asyncio, test side) sits between hass-edge
and the real HA peer. The proxy stops forwarding in both directions WITHOUT closing anything
(bytes stay in the kernel buffers, no FIN, no RST: what a dead NAT entry or a pulled cable
looks like). With `[heartbeat] interval_seconds = 5, timeout_seconds = 3` hass-edge must
notice within interval + timeout (+ slack): measured from the freeze to /health turning 503
and to the log line "no pong".

Each round then lets hass-edge back in one of two ways, alternating:
  accept-new:  the frozen connection stays frozen forever; new connections through the
               proxy are forwarded (hass-edge must reconnect without the old one closing);
  unfreeze:    new connections are frozen too (they cannot complete the WebSocket
               handshake) for a while, then everything is unfrozen.
and checks that hass-edge is live again *through the proxy* with states equal to HA's.

usage: python3 -m hass_edge_tools.reliability.half_open [--rounds N] [--slack S] [--keep-peer]
"""
import argparse
import asyncio
import sys
import time

from hass_edge_tools.mirror import wait_mirror
from hass_edge_tools.reliability.common import make_daemon, make_peer, PORT_BASE, Report, stop_all, VERSION
from hass_edge_tools.stats import spread

INTERVAL, TIMEOUT = 5, 3


class Proxy:
    """Forwards 127.0.0.1:port -> HA. `frozen` pauses every pump (old and new connections);
    `freeze_existing()` freezes only the connections open now, forever."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.running = asyncio.Event()
        self.running.set()
        self.connections = 0
        self.open: list[dict] = []
        self.server = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def freeze_all(self) -> None:
        self.running.clear()

    def unfreeze_all(self) -> None:
        self.running.set()

    def freeze_existing(self) -> int:
        n = 0
        for c in self.open:
            if not c["frozen"]:
                c["frozen"] = True
                n += 1
        return n

    async def handle(self, client_r, client_w) -> None:
        self.connections += 1
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        conn = {"frozen": False, "writers": (client_w, up_w)}
        self.open.append(conn)

        async def gate() -> None:
            while conn["frozen"]:
                await asyncio.sleep(3600)
            await self.running.wait()
            while conn["frozen"]:
                await asyncio.sleep(3600)

        async def pump(r, w) -> None:
            try:
                while True:
                    await gate()
                    data = await r.read(65536)
                    if not data:
                        break
                    await gate()
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                if not conn["frozen"]:
                    try:
                        w.close()
                    except OSError:
                        pass

        try:
            await asyncio.gather(pump(client_r, up_w), pump(up_r, client_w))
        except asyncio.CancelledError:
            return
        if conn in self.open and not conn["frozen"]:
            self.open.remove(conn)


async def main_async(args) -> int:
    r = Report("half_open")
    peer = make_peer(f"half-open-{VERSION}", PORT_BASE + 2)
    r.tried(f"start HA {VERSION} on {peer.url}; proxy in front of it")
    await asyncio.to_thread(peer.start)
    proxy = Proxy(peer.port)
    await proxy.start()
    daemon = make_daemon(
        "half-open-daemon",
        f"http://127.0.0.1:{proxy.port}",
        peer.token,
        {"heartbeat": {"interval_seconds": INTERVAL, "timeout_seconds": TIMEOUT}, "reconnect": {"max_delay_seconds": 5}},
    )
    daemon.start()
    try:
        await rounds(r, peer, proxy, daemon, args)
    finally:
        await asyncio.to_thread(stop_all, r, daemon, peer, args.keep_peer)
    return r.finish()


async def rounds(r, peer, proxy, daemon, args) -> None:
    t = await asyncio.to_thread(daemon.wait_live, 60)
    if not r.check(t is not None, "hass-edge goes live through the proxy"):
        return
    limit = INTERVAL + TIMEOUT + args.slack
    r.tried(f"{args.rounds} freezes of a live connection; detection limit {INTERVAL}+{TIMEOUT}+{args.slack} s")
    detect_503, detect_log, reconnect = [], [], []
    problems = []
    for i in range(1, args.rounds + 1):
        mode = "accept-new" if i % 2 else "unfreeze"
        # Freeze at a random point of the ping cycle.
        await asyncio.sleep(1 + (i * 1.7) % INTERVAL)
        log_before = daemon.log_text().count("no pong")
        conns_before = proxy.connections
        t0 = time.monotonic()
        if mode == "accept-new":
            proxy.freeze_existing()
        else:
            proxy.freeze_all()
        t503 = tlog = None
        while time.monotonic() - t0 < limit + 20 and (t503 is None or tlog is None):
            code, body = await asyncio.to_thread(daemon.health)
            now = time.monotonic()
            if t503 is None and code == 503:
                t503 = now - t0
            if tlog is None and daemon.log_text().count("no pong") > log_before:
                tlog = now - t0
            await asyncio.sleep(0.05)
        if t503 is None or tlog is None:
            problems.append(f"round {i}: not detected within {limit + 20:.0f}s (503 at {t503}, log at {tlog})")
            proxy.unfreeze_all()
            continue
        detect_503.append(t503)
        detect_log.append(tlog)
        if mode == "unfreeze":
            # New connection attempts are stuck too; let one or two time out, then thaw.
            await asyncio.sleep(6)
            still_down = (await asyncio.to_thread(daemon.health))[0] == 503
            if not still_down:
                problems.append(f"round {i}: live again while everything was frozen")
            proxy.unfreeze_all()
        t1 = time.monotonic()
        tl = await asyncio.to_thread(daemon.wait_live, 60)
        if tl is None:
            problems.append(f"round {i} ({mode}): not live again within 60 s")
            continue
        reconnect.append(time.monotonic() - t1)
        through = proxy.connections > conns_before
        ok, diff = await asyncio.to_thread(wait_mirror, peer, daemon, 15)
        if not through:
            problems.append(f"round {i}: live again without a new connection through the proxy")
        if ok is None:
            problems.append(f"round {i}: states differ after reconnecting: {diff}")
        print(f"   round {i} ({mode}): 503 after {t503:.2f}s, 'no pong' logged after {tlog:.2f}s, live again {reconnect[-1]:.2f}s after the way was open", flush=True)
    for p in problems:
        print(f"   problem: {p}")
    r.check(not problems, f"{len(detect_503)}/{args.rounds} freezes detected and recovered" + (f" ({problems[0]})" if problems else ""))
    r.check(bool(detect_503) and max(detect_503) <= limit, f"detection (freeze -> /health 503) within {limit}s every time: {spread(detect_503)}")
    r.check(bool(detect_log) and max(detect_log) <= limit, f"detection (freeze -> log 'no pong') within {limit}s every time: {spread(detect_log)}")
    r.figure("freeze -> /health 503", spread(detect_503))
    r.figure("freeze -> 'no pong' in log", spread(detect_log))
    r.figure("way open -> live again", spread(reconnect))
    r.figure("connections through the proxy", proxy.connections)
    r.check(daemon.alive(), "hass-edge still running")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--slack", type=float, default=1.0)
    ap.add_argument("--keep-peer", action="store_true")
    sys.exit(asyncio.run(main_async(ap.parse_args())))


if __name__ == "__main__":
    main()
