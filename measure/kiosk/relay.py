"""A delaying TCP relay in front of Home Assistant, for measure/kiosk (issue 15): "HA slow".

    python3 relay.py --listen 127.0.0.1:0 --target 127.0.0.1:18165 --delay-ms 200

Prints its port on stdout ("port N") once it listens. Every connection is relayed to the target
byte for byte; the first bytes of every answer (server-to-client data that follows data from the
client: an HTTP response, a WebSocket reply) are held for --delay-ms before they are passed on.
So each request/response exchange takes DELAY longer, whoever asks (the browser directly, or
hass-edge), as if HA were busy or far away; data already flowing (the rest of a body) is not
delayed again. Loopback only.
"""

import argparse
import asyncio
import signal


async def pump(reader, writer, on_data=None):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if on_data is not None:
                await on_data()
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def handle(creader, cwriter, target, delay):
    try:
        sreader, swriter = await asyncio.open_connection(*target)
    except OSError:
        cwriter.close()
        return
    state = {"asked": False}  # the client sent something not yet answered

    async def client_data():
        state["asked"] = True

    async def server_data():
        if state["asked"]:
            state["asked"] = False
            await asyncio.sleep(delay)

    await asyncio.gather(pump(creader, swriter, client_data), pump(sreader, cwriter, server_data))


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--target", required=True)
    ap.add_argument("--delay-ms", type=float, default=200)
    a = ap.parse_args()
    lh, lp = a.listen.rsplit(":", 1)
    th, tp = a.target.rsplit(":", 1)
    delay = a.delay_ms / 1000
    server = await asyncio.start_server(lambda r, w: handle(r, w, (th, int(tp)), delay), lh, int(lp))
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
