"""ws_hold: hass-edge's memory while WebSocket clients ask for many states and never read.

For each binary and each kind of request: start hass-edge against the HA peer with an API
token, open CLIENTS WebSocket sessions (4 KiB receive buffers), have each send one
`get_states` or `subscribe_entities` and then read nothing, and print the daemon's VmRSS and
VmHWM (KiB) before, 3 s and 7 s into the hold. Standard library only.
"""

import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HA = open(os.path.join(os.environ["HA_PEER_DIR"], "url")).read().strip()
HA_TOKEN = open(os.path.join(os.environ["HA_PEER_DIR"], "token")).read().strip()
ENTITIES = int(os.environ.get("ENTITIES", "5000"))
CLIENTS = int(os.environ.get("CLIENTS", "64"))
KINDS = os.environ.get("KINDS", "get_states subscribe_entities").split()
PORT = int(os.environ.get("EDGE_PORT", "18390"))
API_TOKEN = "ws-hold-api-token-" + base64.b16encode(os.urandom(8)).decode()


def ha(method, path, body=None):
    req = urllib.request.Request(
        HA + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {HA_TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def populate():
    have = {s["entity_id"] for s in ha("GET", "/api/states")}
    filler = "x" * 500
    made = 0
    for i in range(ENTITIES):
        entity_id = f"sensor.mem_{i:05d}"
        if entity_id not in have:
            ha("POST", f"/api/states/{entity_id}",
               {"state": str(i), "attributes": {"friendly_name": f"Mem {i}", "filler": filler}})
            made += 1
    return len(have) + made


def mem(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])
    return out


def frame(text):
    """A masked client text frame (RFC 6455 §5.2)."""
    b = text.encode()
    mask = os.urandom(4)
    if len(b) < 126:
        head = bytes([0x81, 0x80 | len(b)])
    else:
        head = bytes([0x81, 0x80 | 126]) + len(b).to_bytes(2, "big")
    return head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(b))


def until(s, marker):
    buf = b""
    while marker not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError(f"closed before {marker!r}: {buf[:200]!r}")
        buf += chunk


def session(kind):
    s = socket.create_connection(("127.0.0.1", PORT))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        f"GET /api/websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    until(s, b"auth_required")
    s.sendall(frame(json.dumps({"type": "auth", "access_token": API_TOKEN})))
    until(s, b"auth_ok")
    s.sendall(frame(json.dumps({"id": 1, "type": kind})))
    return s


def run(binary, kind, work):
    config = os.path.join(work, "config.toml")
    with open(os.path.join(work, "api_token"), "w") as f:
        f.write(API_TOKEN)
    with open(config, "w") as f:
        f.write(
            f'[ha]\nurl = "{HA}"\ntoken_file = "{os.environ["HA_PEER_DIR"]}/token"\n'
            f'[http]\nlisten = "127.0.0.1:{PORT}"\napi_token_file = "{work}/api_token"\n'
            f"max_websocket_clients = {max(CLIENTS, 1)}\n"
            f'[cache]\npersist = false\n[log]\nlevel = "warn"\n'
        )
    log = open(os.path.join(work, "daemon.log"), "w")
    daemon = subprocess.Popen([binary, "--config", config], stdout=log, stderr=log)
    try:
        for _ in range(100):
            if daemon.poll() is not None:
                raise RuntimeError(f"hass-edge exited with {daemon.returncode}")
            try:
                r = urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health")
                if r.status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError("hass-edge did not become live")
        before = mem(daemon.pid)
        held = [session(kind) for _ in range(CLIENTS)]
        time.sleep(3)
        at3 = mem(daemon.pid)
        time.sleep(4)
        at7 = mem(daemon.pid)
        for s in held:
            s.close()
        return before, at3, at7
    except Exception:
        log.flush()
        sys.stderr.write(open(os.path.join(work, "daemon.log")).read()[-3000:])
        raise
    finally:
        daemon.terminate()
        daemon.wait(10)


def main():
    states = populate()
    print(f"ws_hold: {states} states in HA, {CLIENTS} clients that ask and never read")
    print("| binary | request | RSS before | RSS at 3 s | RSS at 7 s | HWM | HWM − before |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="ws-hold-") as work:
        os.chmod(work, 0o700)
        for binary in sys.argv[1:]:
            for kind in KINDS:
                before, at3, at7 = run(binary, kind, work)
                print(
                    f"| {binary} | {kind} | {before['VmRSS']:,} KiB | {at3['VmRSS']:,} KiB | "
                    f"{at7['VmRSS']:,} KiB | {at7['VmHWM']:,} KiB | "
                    f"{at7['VmHWM'] - before['VmHWM']:,} KiB |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
