"""A small keep-alive HTTP/1.1 client (http.client) for one host on loopback."""
from __future__ import annotations

import http.client
import json
import re


class Http:
    """One keep-alive connection to `base` (http://127.x.x.x:port), re-opened once when the
    server closed it; `token` becomes an `Authorization: Bearer` header."""

    def __init__(self, base: str, token: str | None = None, timeout: float = 30.0):
        m = re.match(r"http://([^:/]+):(\d+)", base)
        assert m, base
        self.host, self.port = m.group(1), int(m.group(2))
        assert self.host.startswith("127.") or self.host == "localhost", "loopback only"
        self.token = token
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: object = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
        h = dict(headers or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                self.conn.request(method, path, body=data, headers=h)
                r = self.conn.getresponse()
                payload = r.read()
                hdrs = {k.lower(): v for k, v in r.getheaders()}
                if hdrs.get("connection", "").lower() == "close":
                    self.close()
                return r.status, hdrs, payload
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        status, _, payload = self.request(method, path, body)
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload.decode(errors="replace")

    def get(self, path: str) -> tuple[int, object]:
        return self.json("GET", path)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
