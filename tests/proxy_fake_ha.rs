//! Forwarding to HA (issue 15), against the daemon binary and the fake HA: what reaches HA
//! with which credentials, what comes back, and the limits. The real HA's side (its
//! frontend, its client libraries) is in `tests/clients` and `tests/frontend`; here is what
//! needs a peer we can look inside (the headers HA received) or one that misbehaves.

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use support::daemon::{DaemonOptions, TempDir, free_port};
use support::fake_ha::TOKEN;
use support::http_client::Response;
use support::{Daemon, FakeHa};

const API_TOKEN: &str = "kiosk-token-0123456789abcdef";

fn live_with(options: DaemonOptions) -> (FakeHa, Daemon) {
    let fake = FakeHa::start("2025.4.4");
    let daemon = Daemon::start_with(&fake, options);
    daemon.wait_live();
    (fake, daemon)
}

fn with_api_token(dir: &TempDir) -> DaemonOptions {
    let path = dir.write("api-token", &format!("{API_TOKEN}\n"));
    DaemonOptions::default().set("http", "api_token_file", format!("\"{}\"", path.display()))
}

fn send(daemon: &Daemon, method: &str, path: &str, headers: &[&str]) -> Response {
    let mut c = daemon.connect();
    let mut all = headers.to_vec();
    all.push("Connection: close");
    c.request(method, path, &all).unwrap()
}

/// The `Authorization` HA received with the last request to `path`.
fn authorization_seen(fake: &FakeHa, path: &str) -> Option<String> {
    let requests = fake.rest_requests();
    let r = requests
        .iter()
        .rev()
        .find(|r| r.path == path)
        .unwrap_or_else(|| panic!("{path} never reached HA: {requests:?}"));
    r.headers
        .iter()
        .find(|(n, _)| n == "authorization")
        .map(|(_, v)| v.clone())
}

/// hass-edge's API token is swapped for its HA token; an HA user's own token goes as it
/// came and HA's 401 comes back; a request without credentials goes without; the API
/// token itself never reaches HA.
#[test]
fn credentials_reach_ha_as_the_rules_say() {
    let dir = TempDir::new("proxy-creds");
    let (fake, daemon) = live_with(with_api_token(&dir));
    let ours = format!("Authorization: Bearer {API_TOKEN}");
    let r = send(&daemon, "GET", "/api/error_log", &[&ours]);
    assert_eq!(r.status, 404, "the fake's answer: {}", r.text());
    assert_eq!(
        authorization_seen(&fake, "/api/error_log"),
        Some(format!("Bearer {TOKEN}")),
        "hass-edge's API token is replaced by its HA token"
    );
    // An HA user's token (not ours): passed on unchanged, HA decides.
    let user = "Authorization: Bearer some-ha-user-token";
    let r = send(&daemon, "GET", "/api/history/period", &[user]);
    assert_eq!(r.status, 401, "HA's verdict comes back");
    assert_eq!(r.text(), "401: Unauthorized", "HA's own body");
    assert_eq!(
        authorization_seen(&fake, "/api/history/period"),
        Some("Bearer some-ha-user-token".into())
    );
    // No credentials while an API token is configured: forwarded with none.
    let r = send(&daemon, "GET", "/frontend_latest/app.js", &[]);
    assert_eq!(r.status, 401);
    assert_eq!(authorization_seen(&fake, "/frontend_latest/app.js"), None);
    // A wrong token is an HA user's token as far as hass-edge knows: HA refuses it.
    let r = send(
        &daemon,
        "GET",
        "/api/config/x",
        &["Authorization: Bearer wrong"],
    );
    assert_eq!(r.status, 401);
    for r in fake.rest_requests() {
        for (_, v) in &r.headers {
            assert!(!v.contains(API_TOKEN), "the API token reached HA: {r:?}");
        }
    }
}

/// Loopback-open mode (no API token): a request without credentials goes with hass-edge's
/// HA token; a foreign Origin is refused before anything is sent; a non-JSON body is 415;
/// read-only mode refuses forwarded writes but not reads.
#[test]
fn loopback_open_mode_guards_the_ha_token() {
    let (fake, daemon) =
        live_with(DaemonOptions::default().set("http", "allow_service_calls", false));
    let r = send(&daemon, "GET", "/api/events", &[]);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(
        authorization_seen(&fake, "/api/events"),
        Some(format!("Bearer {TOKEN}"))
    );
    let before = fake.rest_requests().len();
    let r = send(
        &daemon,
        "GET",
        "/api/events",
        &["Origin: http://evil.example"],
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let r = send(
        &daemon,
        "POST",
        "/api/events/doorbell",
        &["Content-Type: text/plain", "Content-Length: 2"],
    );
    // The body was not read: answered, connection closed.
    assert_eq!(r.status, 415, "{}", r.text());
    let r = send(
        &daemon,
        "POST",
        "/api/events/doorbell",
        &["Content-Type: application/json", "Content-Length: 0"],
    );
    assert_eq!(r.status, 403, "read-only: {}", r.text());
    assert!(r.text().contains("allow_service_calls"), "{}", r.text());
    let r = send(
        &daemon,
        "DELETE",
        "/api/states/light.kitchen",
        &["Content-Length: 0"],
    );
    assert_eq!(r.status, 403, "read-only: {}", r.text());
    assert_eq!(
        fake.rest_requests().len(),
        before,
        "none of the refused requests reached HA"
    );
    // Read-only holds for an HA user's own token too; the login flow still goes.
    let r = send(
        &daemon,
        "POST",
        "/api/events/doorbell",
        &[
            "Authorization: Bearer some-ha-user-token",
            "Content-Type: application/json",
            "Content-Length: 0",
        ],
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(fake.rest_requests().len(), before, "nothing reached HA");
    let r = send(
        &daemon,
        "POST",
        "/auth/login_flow",
        &["Content-Type: application/json", "Content-Length: 0"],
    );
    assert_eq!(r.status, 401, "HA's answer (no credentials): {}", r.text());
    assert_eq!(
        fake.rest_requests().len(),
        before + 1,
        "the login flow went to HA"
    );
}

/// `http.x_forwarded_for`: HA learns the real client; what a client claims is dropped. Off
/// by default (HA answers 400 to X-Forwarded-For it was not told to trust).
#[test]
fn forwarded_headers_name_the_real_client() {
    let (fake, daemon) = live_with(DaemonOptions::default().set("http", "x_forwarded_for", true));
    send(
        &daemon,
        "GET",
        "/api/xff",
        &["X-Forwarded-For: 10.9.9.9", "Forwarded: for=10.9.9.9"],
    );
    let seen = fake
        .rest_requests()
        .into_iter()
        .find(|r| r.path == "/api/xff")
        .unwrap()
        .headers;
    let get = |n: &str| -> Vec<&str> {
        seen.iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(get("x-forwarded-for"), ["127.0.0.1"], "{seen:?}");
    assert_eq!(get("x-forwarded-proto"), ["http"]);
    assert_eq!(get("x-forwarded-host"), ["127.0.0.1"]);
    assert!(get("forwarded").is_empty(), "{seen:?}");
    // Hop-by-hop fields never travel (RFC 9110 §7.6.1).
    assert_eq!(get("connection"), ["close"]);
    assert!(get("keep-alive").is_empty() && get("te").is_empty());

    let (fake, daemon) = live_with(DaemonOptions::default());
    send(&daemon, "GET", "/api/xff", &["X-Forwarded-For: 10.9.9.9"]);
    let seen = fake
        .rest_requests()
        .into_iter()
        .find(|r| r.path == "/api/xff")
        .unwrap()
        .headers;
    assert!(
        !seen.iter().any(|(k, _)| k.starts_with("x-forwarded")),
        "off by default: {seen:?}"
    );
}

/// HA unreachable: 502 in HA's JSON shape, at once.
#[test]
fn ha_unreachable_is_502_at_once() {
    let port = free_port();
    let daemon = Daemon::start_at(
        &format!("http://127.0.0.1:{port}"),
        DaemonOptions::default(),
    );
    let t = Instant::now();
    let r = daemon.get("/api/history/period");
    let took = t.elapsed();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert!(
        r.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("unreachable")),
        "{}",
        r.text()
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

fn vm_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A 32 MiB answer, chunked by HA, is streamed to the client (re-chunked, whole, in
/// order) without being held: the daemon's peak RSS stays within a few MiB, also while a
/// slow client reads it.
#[test]
fn a_large_answer_streams_through_without_being_held() {
    let (_fake, daemon) = live_with(DaemonOptions::default());
    let size = 32 * 1024 * 1024;
    let before = vm_kib(daemon.pid(), "VmHWM:");
    let r = daemon.get(&format!("/fake/big/{size}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Transfer-Encoding"), Some("chunked"));
    assert_eq!(r.body.len(), size, "whole");
    assert!(r.body.iter().all(|&b| b == b'x'));
    // HEAD: HA's head, no body, the connection still in step.
    let mut c = daemon.connect();
    let r = c.request("HEAD", "/api/error_log", &[]).unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(
        r.header("Content-Length"),
        Some("14"),
        "HA's length of '404: Not Found'"
    );
    assert_eq!(c.request("GET", "/health", &[]).unwrap().status, 200);
    // A client that reads slowly: the daemon waits for it instead of buffering.
    let mut s = std::net::TcpStream::connect(daemon.addr).unwrap();
    write!(
        s,
        "GET /fake/big/{size} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut got = 0;
    let mut buf = vec![0u8; 256 * 1024];
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("{e}"),
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(got > size, "all of it arrived ({got} bytes with framing)");
    let after = vm_kib(daemon.pid(), "VmHWM:");
    eprintln!("VmHWM {before} KiB before, {after} KiB after two 32 MiB answers");
    assert!(
        after < before + 8 * 1024,
        "peak RSS grew {} KiB for a 32 MiB answer",
        after - before
    );
    assert_eq!(daemon.health().unwrap().0, 200);
}

/// A WebSocket handshake on `/api/websocket` is served by hass-edge (issue 16): its own
/// `101` and `auth_required` with HA's version, and no connection to HA for it.
#[test]
fn websocket_handshakes_are_served_by_hass_edge() {
    let (fake, daemon) = live_with(DaemonOptions::default());
    let sessions = fake.sessions().len();
    let mut s = std::net::TcpStream::connect(daemon.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /api/websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end && !String::from_utf8_lossy(&got).contains("auth_required") {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
    assert!(
        text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "HA's accept key: {text}"
    );
    assert!(text.contains("auth_required"), "the first frame: {text}");
    assert!(text.contains(r#""ha_version":""#), "HA's version: {text}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        fake.sessions().len(),
        sessions,
        "no connection to HA for it"
    );
    let status = daemon.get("/status").json();
    assert_eq!(status["websocket_api"]["sessions_open"], 1, "{status}");
    assert_eq!(status["forwarding"]["tunnels_open"], 0, "{status}");
    let metrics = daemon.get("/metrics").text();
    assert!(
        metrics.contains("\nhass_edge_websocket_sessions 1\n"),
        "{metrics}"
    );
    // A foreign page cannot open one.
    let mut c = daemon.connect();
    let r = c
        .request(
            "GET",
            "/api/websocket",
            &[
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 13",
                "Origin: http://evil.example",
            ],
        )
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
}

/// With an API token configured, hass-edge's own routes also take any token HA accepts:
/// asked once (`GET /api/`), then from the kept verdict; a refused token is refused again
/// without asking; a flood of made-up tokens asks HA at most the check budget.
#[test]
fn local_routes_take_tokens_ha_accepts_asking_once() {
    let dir = TempDir::new("proxy-ha-tokens");
    let (fake, daemon) = live_with(with_api_token(&dir));
    let asked = |fake: &FakeHa| {
        fake.rest_requests()
            .iter()
            .filter(|r| r.path == "/api/")
            .count()
    };
    let ha_token = format!("Authorization: Bearer {TOKEN}");
    for _ in 0..5 {
        let r = send(&daemon, "GET", "/api/states/light.kitchen", &[&ha_token]);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(asked(&fake), 1, "HA was asked once for five reads");
    for _ in 0..3 {
        let r = send(
            &daemon,
            "GET",
            "/api/states",
            &["Authorization: Bearer not-a-token-ha-knows"],
        );
        assert_eq!(r.status, 401, "{}", r.text());
    }
    assert_eq!(asked(&fake), 2, "a refused token is asked about once");
    let mut limited = 0;
    for i in 0..40 {
        let r = send(
            &daemon,
            "GET",
            "/api/states",
            &[&format!("Authorization: Bearer made-up-{i}")],
        );
        match r.status {
            401 => {}
            429 => limited += 1,
            s => panic!("{s}: {}", r.text()),
        }
    }
    assert!(limited >= 25, "{limited} of 40 made-up tokens were limited");
    assert!(
        asked(&fake) <= 2 + 15,
        "HA was asked {} times",
        asked(&fake)
    );
    // hass-edge's own token never goes to HA to be checked.
    let r = send(
        &daemon,
        "GET",
        "/api/states",
        &[&format!("Authorization: Bearer {API_TOKEN}")],
    );
    assert_eq!(r.status, 200);
    for r in fake.rest_requests() {
        assert!(!r.headers.iter().any(|(_, v)| v.contains(API_TOKEN)));
    }
}

/// A masked client text frame (RFC 6455 §5.3).
fn client_frame(text: &str) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let payload = text.as_bytes();
    let mut f = vec![0x81];
    if payload.len() < 126 {
        f.push(0x80 | payload.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Opens a tunnel and authenticates with `token`; returns everything read from it until
/// `until` shows up or 5 s pass.
fn tunnel_auth(daemon: &Daemon, token: &str, until: &str) -> String {
    let mut s = std::net::TcpStream::connect(daemon.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    write!(
        s,
        "GET /api/websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut sent = false;
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end && !String::from_utf8_lossy(&got).contains(until) {
        if !sent && String::from_utf8_lossy(&got).contains("auth_required") {
            let auth = format!(r#"{{"type":"auth","access_token":"{token}"}}"#);
            s.write_all(&client_frame(&auth)).unwrap();
            sent = true;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// hass-edge's API token in the WebSocket API's `auth` message is hass-edge's to accept: HA
/// never sees it (HA would refuse it and count a failed login against hass-edge's address).
/// An HA user's own token is HA's to judge, on a link of the session's own, and HA's
/// `auth_invalid` is the client's. In read-only mode the API token still gets a session
/// (reads from the mirror), but nothing is forwarded with it.
#[test]
fn the_api_token_never_reaches_ha() {
    let dir = TempDir::new("proxy-ws-auth");
    let (fake, daemon) = live_with(with_api_token(&dir));
    let before = fake.auth_attempts().len();
    let text = tunnel_auth(&daemon, API_TOKEN, "auth_ok");
    assert!(text.contains("auth_ok"), "{text}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fake.auth_attempts().len(), before, "HA saw no attempt");
    // Someone else's token: HA's verdict.
    let asked = |fake: &FakeHa| {
        fake.rest_requests()
            .iter()
            .filter(|r| r.path == "/api/")
            .count()
            + fake.auth_attempts().len()
    };
    let asked_before = asked(&fake);
    let text = tunnel_auth(&daemon, "an-ha-user-token", "auth_invalid");
    assert!(text.contains("auth_invalid"), "{text}");
    assert_eq!(asked(&fake), asked_before + 1, "HA was asked once");
    let status = send(
        &daemon,
        "GET",
        "/status",
        &[&format!("Authorization: Bearer {API_TOKEN}")],
    )
    .json();
    assert_eq!(status["websocket_api"]["auth_failures"], 1, "{status}");
    for r in fake.rest_requests() {
        assert!(!r.headers.iter().any(|(_, v)| v.contains(API_TOKEN)));
    }

    let dir = TempDir::new("proxy-ws-auth-ro");
    let (fake, daemon) = live_with(with_api_token(&dir).set("http", "allow_service_calls", false));
    let before = fake.auth_attempts().len();
    let text = tunnel_auth(&daemon, API_TOKEN, "auth_ok");
    assert!(text.contains("auth_ok"), "{text}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fake.auth_attempts().len(), before, "HA saw no attempt");
}
