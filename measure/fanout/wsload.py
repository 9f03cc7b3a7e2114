"""One process of WebSocket clients for the fan-out benchmark (issue 16): stdlib only, a bare
RFC 6455 client on asyncio.Protocol, so that 200 clients at 1,000 changes/s cost as little as
Python can make them.

Each client does HA's handshake (`auth_required` → `auth` → `auth_ok`), announces
`coalesce_messages` (as HA's frontend does; `--no-coalesce` leaves it out) and then either
  - `--mode subscribe`: an unfiltered `subscribe_entities`; once the initial `a` event is in,
    it only counts: every `"+":` in the byte stream is one entity change delivered (frames
    from the server are unmasked and we offer no compression, so the JSON is in the stream
    as sent). Frame headers are still walked (cheap: one header per frame) to answer pings;
    the payloads are never decoded. Every `--sample-ms` per client, the chunk that arrives
    is searched for `"lc":<float>` (HA's time of setting the state) and `"s":"<float>"` (the
    load generator's time, which is the state) to sample the delivery latency;
  - `--mode states`: `get_states`; done when its result is complete (the connect storm).

Every `--probe-every`-th client (and the first) is a probe: it reads as soon as data arrives
and samples the latency. The others read in batches: after each read they pause reading for
`--batch-ms`, so that one read takes many frames (a read per frame is what costs a Python
client most). The server does not notice: its writes land in the socket buffer as before
(20 ms of 1,000 changes/s is a few KiB), so its CPU and its coalescing are unchanged.

Driven over stdin/stdout, one JSON line per command: `connect` (all clients; `--stagger N`
at most N handshakes at once, 0 = all at once), `reset` (zero counters and samples),
`report`, `close`. The token comes from $WSLOAD_TOKEN (not argv: ps shows argv).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import sys
import time
from urllib.parse import urlsplit

PLUS = b'"+":'
LC = re.compile(rb'"lc":(\d+(?:\.\d+)?)[,}]')
STATE = re.compile(rb'"s":"(\d+\.\d+)"')
MAX_SAMPLES = 60_000


def frame(text: str, opcode: int = 0x1) -> bytes:
    """A masked client frame. The mask key is zero: legal (RFC 6455 §5.3 asks for an
    unpredictable key against proxy cache poisoning, not an issue on loopback) and it spares
    the XOR in Python."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


class Client(asyncio.Protocol):
    def __init__(self, fleet: "Fleet", index: int):
        self.fleet = fleet
        self.index = index
        self.transport = None
        self.phase = "http"  # http → frames (handshake) → count | done | failed | closed
        self.buf = bytearray()
        self.done = asyncio.get_running_loop().create_future()
        self.events = 0
        self.tail = b""
        self.skip = 0  # payload bytes of the current frame still to come (count phase)
        self.partial = b""  # a frame header split across chunks (count phase)
        self.next_sample = 0.0
        self.probe = index % fleet.probe_every == 0
        self.error = ""
        self.t_done = 0.0

    # ---------------------------------------------------------------- transport
    def connection_made(self, transport):
        self.transport = transport
        f = self.fleet
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET {f.path} HTTP/1.1\r\nHost: {f.host}:{f.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def connection_lost(self, exc):
        if self.phase == "count":
            self.fleet.closed += 1
        if not self.done.done():
            self.fail(f"connection lost in phase {self.phase}: {exc}")
        self.phase = "closed"

    def fail(self, why: str) -> None:
        self.error = why
        self.phase = "failed"
        if not self.done.done():
            self.done.set_result(False)
        if self.transport:
            self.transport.close()

    def send(self, obj) -> None:
        self.transport.write(frame(json.dumps(obj, separators=(",", ":"))))

    # ---------------------------------------------------------------- receive
    def data_received(self, data: bytes) -> None:
        if self.phase == "count":
            self.count(data)
            if not self.probe and self.phase == "count":
                self.transport.pause_reading()
                self.fleet.loop.call_later(self.fleet.batch_s, self.resume)
            return
        self.buf += data
        if self.phase == "http":
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buf[: self.buf.find(b"\r\n")])
            if b" 101 " not in status:
                self.fail(status.decode(errors="replace"))
                return
            del self.buf[: end + 4]
            self.phase = "frames"
        while self.phase == "frames":
            got = self.next_frame()
            if got is None:
                return
            opcode, payload = got
            if opcode == 0x9:
                self.transport.write(frame(payload.decode(errors="replace"), 0xA))
            elif opcode == 0x8:
                self.fail(f"closed by the server: {payload[:2].hex()} {payload[2:].decode(errors='replace')}")
            elif opcode in (0x1, 0x0):
                self.on_text(payload)
        if self.phase == "count" and self.buf:
            rest = bytes(self.buf)
            self.buf.clear()
            self.count(rest)

    def resume(self) -> None:
        if self.phase == "count":
            self.transport.resume_reading()

    def next_frame(self):
        b = self.buf
        if len(b) < 2:
            return None
        n = b[1] & 0x7F
        h = 2
        if n == 126:
            if len(b) < 4:
                return None
            n, h = int.from_bytes(b[2:4], "big"), 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, h = int.from_bytes(b[2:10], "big"), 10
        if len(b) < h + n:
            return None
        opcode = b[0] & 0x0F
        payload = bytes(b[h : h + n])
        del b[: h + n]
        return opcode, payload

    def on_text(self, payload: bytes) -> None:
        f = self.fleet
        if b'"auth_required"' in payload:
            self.send({"type": "auth", "access_token": f.token})
        elif b'"auth_invalid"' in payload:
            self.fail("auth_invalid")
        elif b'"auth_ok"' in payload:
            if f.coalesce:
                self.send({"id": 1, "type": "supported_features", "features": {"coalesce_messages": 1}})
            if f.mode == "subscribe":
                self.send({"id": 2, "type": "subscribe_entities"})
            else:
                self.send({"id": 2, "type": "get_states"})
        elif b'"id":2,"type":"result"' in payload and b'"success":false' in payload:
            self.fail(payload[:300].decode(errors="replace"))
        elif f.mode == "subscribe" and b'"event":{"a":' in payload:
            self.phase = "count"
            self.t_done = time.monotonic()
            self.next_sample = self.t_done + random.random() * f.sample_s
            self.done.set_result(True)
        elif f.mode == "states" and b'"id":2,"type":"result"' in payload:
            self.phase = "done"
            self.t_done = time.monotonic()
            self.done.set_result(True)
            self.transport.close()

    def count(self, data: bytes) -> None:
        """The hot path: count entity changes, walk frame headers for pings, sometimes sample."""
        self.events += data.count(PLUS)
        if self.tail:
            self.events += (self.tail + data[:3]).count(PLUS)
        self.tail = data[-3:]
        f = self.fleet
        if self.probe and f.sampling:
            now = time.monotonic()
            if now >= self.next_sample:
                self.next_sample = now + f.sample_s
                wall = time.time()
                if len(f.lat_set) < MAX_SAMPLES:
                    f.lat_set.extend(wall - float(m) for m in LC.findall(data))
                if len(f.lat_post) < MAX_SAMPLES:
                    f.lat_post.extend(wall - float(m) for m in STATE.findall(data))
        # Frame headers: only control frames matter (ping → pong, close).
        if self.partial:
            data = self.partial + data
            self.partial = b""
        size = len(data)
        pos = self.skip
        if pos >= size:
            self.skip = pos - size
            return
        while pos < size:
            if size - pos < 2:
                self.partial = data[pos:]
                self.skip = 0
                return
            b0 = data[pos]
            n = data[pos + 1] & 0x7F
            h = 2
            if n == 126:
                if size - pos < 4:
                    self.partial = data[pos:]
                    self.skip = 0
                    return
                n, h = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
            elif n == 127:
                if size - pos < 10:
                    self.partial = data[pos:]
                    self.skip = 0
                    return
                n, h = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
            op = b0 & 0x0F
            if op >= 0x8:
                if pos + h + n > size:
                    self.partial = data[pos:]
                    self.skip = 0
                    return
                if op == 0x9:
                    self.transport.write(frame(data[pos + h : pos + h + n].decode(errors="replace"), 0xA))
                elif op == 0x8:
                    self.phase = "closed"
                    self.fleet.closed += 1
                    self.transport.close()
                    return
            pos += h + n
        self.skip = pos - size


class Fleet:
    def __init__(self, args):
        u = urlsplit(args.url)
        self.host, self.port, self.path = u.hostname, u.port or 80, u.path or "/api/websocket"
        self.token = os.environ["WSLOAD_TOKEN"]
        self.mode = args.mode
        self.n = args.clients
        self.coalesce = args.coalesce
        self.sample_s = args.sample_ms / 1000
        self.sampling = args.sample_ms > 0
        self.stagger = args.stagger
        self.probe_every = max(1, args.probe_every)
        self.batch_s = args.batch_ms / 1000
        self.loop = None
        self.clients: list[Client] = []
        self.closed = 0
        self.lat_set: list[float] = []
        self.lat_post: list[float] = []

    async def connect(self, timeout: float) -> dict:
        loop = self.loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(self.stagger) if self.stagger else None

        async def one(i: int) -> Client:
            c = Client(self, i)
            self.clients.append(c)
            try:
                if gate:
                    async with gate:
                        await loop.create_connection(lambda: c, self.host, self.port)
                        await asyncio.wait_for(asyncio.shield(c.done), timeout)
                else:
                    await loop.create_connection(lambda: c, self.host, self.port)
                    await asyncio.wait_for(asyncio.shield(c.done), timeout)
            except (OSError, asyncio.TimeoutError) as e:
                c.fail(f"{type(e).__name__}: {e}")
            return c

        t0 = time.monotonic()
        done = await asyncio.gather(*(one(i) for i in range(self.n)))
        ok = [c for c in done if c.done.done() and c.done.result()]
        errors = sorted({c.error for c in done if c.error})[:5]
        return {
            "ok": len(ok),
            "failed": self.n - len(ok),
            "errors": errors,
            "t_start": t0,
            "t_last": max((c.t_done for c in ok), default=0.0),
            "t_all": [c.t_done for c in ok] if self.mode == "states" else [],
        }

    def reset(self) -> dict:
        for c in self.clients:
            c.events = 0
        self.closed = 0
        self.lat_set.clear()
        self.lat_post.clear()
        return {"ok": 1}

    def report(self) -> dict:
        counting = [c for c in self.clients if c.phase in ("count", "closed")]
        return {
            "events": [c.events for c in counting],
            "closed": self.closed,
            "lat_set": self.lat_set,
            "lat_post": self.lat_post,
        }

    def close(self) -> dict:
        for c in self.clients:
            if c.transport and not c.transport.is_closing():
                c.transport.close()
        return {"ok": 1}


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--mode", choices=("subscribe", "states"), default="subscribe")
    p.add_argument("--no-coalesce", dest="coalesce", action="store_false")
    p.add_argument("--sample-ms", type=float, default=50)
    p.add_argument("--stagger", type=int, default=10)
    p.add_argument("--probe-every", type=int, default=10)
    p.add_argument("--batch-ms", type=float, default=20)
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args()
    fleet = Fleet(args)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(obj) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"pid": os.getpid()})
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "close":
            reply(fleet.close())
            await asyncio.sleep(0.2)
            return
        if line == "connect":
            reply(await fleet.connect(args.timeout))
        elif line == "reset":
            reply(fleet.reset())
        elif line == "report":
            reply(fleet.report())
        else:
            reply({"error": f"unknown command {line!r}"})


if __name__ == "__main__":
    asyncio.run(main())
