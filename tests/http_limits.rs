//! The local HTTP API's transport limits, against the real daemon binary with a live fake
//! Home Assistant behind it: error statuses and shapes (404, 405 + `Allow`, 400, 411, 413,
//! 421, 431, 408, 503), `HEAD`, keep-alive, pipelining, idle and slow clients, the `Host`
//! check against DNS rebinding, and the connection slots (idle ones make room). Every test ends by
//! checking that the daemon still answers `/health` 200 and that its subscription still
//! carries changes — a misbehaving client must not hurt anyone else.

mod support;

use std::time::{Duration, Instant};

use hass_edge::http::{
    MAX_BODY_BYTES, MAX_CONNECTIONS, MAX_HEAD_BYTES, MAX_HEADERS, REQUEST_TIMEOUT, SLOW_REQUEST,
};
use serde_json::{Value, json};
use support::daemon::{DaemonOptions, slowdown};
use support::http_client::{Conn, Response, request};
use support::{Daemon, FakeHa, deadline, wait_until};

fn live() -> (FakeHa, Daemon) {
    let fake = FakeHa::start("2025.4.4");
    let daemon = Daemon::start(&fake);
    daemon.wait_live();
    (fake, daemon)
}

/// `/health` is 200 and a change pushed by HA still reaches the store, on the same session.
fn assert_unaffected(fake: &FakeHa, daemon: &Daemon) {
    let (status, body) = daemon.health().expect("/health answers");
    assert_eq!(status, 200, "{body}");
    let new = fake.next_state("input_boolean.kitchen", |s| {
        s["state"] = if s["state"] == "on" {
            "off".into()
        } else {
            "on".into()
        };
    });
    assert_eq!(
        fake.push_change(new.clone()),
        1,
        "the subscription is still there"
    );
    wait_until("a pushed change to show", deadline(), || {
        let r = daemon.get("/api/states/input_boolean.kitchen");
        if r.status == 200 && r.json() == new && r.header("X-Cache") == Some("hit") {
            Ok(())
        } else {
            Err(format!("{} {}", r.status, r.text()))
        }
    });
    assert_eq!(fake.sessions().len(), 1, "no reconnect");
}

/// Sends raw bytes on a fresh connection and reads one response.
fn raw(daemon: &Daemon, bytes: &[u8]) -> Response {
    let mut c = daemon.connect();
    c.send(bytes).unwrap_or_else(|e| {
        panic!(
            "send {:?}: {e}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
        )
    });
    c.read_response(false).unwrap_or_else(|e| {
        panic!(
            "response to {:?}: {e}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
        )
    })
}

/// An error response in HA's shape: JSON `{"message": "…"}`.
fn assert_error(r: &Response, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    assert_eq!(r.header("Content-Type"), Some("application/json"), "{what}");
    assert!(
        r.json()["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {}",
        r.text()
    );
}

/// With `http.forward = false`, a path hass-edge does not serve is its own 404.
#[test]
fn unknown_route_is_404_with_a_json_message() {
    let fake = FakeHa::start("2025.4.4");
    let daemon = Daemon::start_with(
        &fake,
        DaemonOptions::default().set("http", "forward", false),
    );
    daemon.wait_live();
    for path in ["/nope", "/api/statesX", "/api/state/light.kitchen", "/"] {
        assert_error(&daemon.get(path), 404, path);
    }
    assert!(
        fake.rest_requests().is_empty(),
        "unknown routes never reach HA"
    );
    assert_unaffected(&fake, &daemon);
}

/// By default a path hass-edge does not serve goes to HA, and HA's answer comes back as
/// HA sent it (status, content type, body), with hass-edge's HA token.
#[test]
fn unknown_route_is_forwarded_to_ha() {
    let (fake, daemon) = live();
    for path in ["/nope", "/api/statesX", "/"] {
        let r = daemon.get(path);
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert_eq!(r.text(), "404: Not Found", "{path}: HA's own body");
        assert_eq!(r.header("Content-Type"), Some("text/plain"), "{path}");
        assert!(r.header("Date").is_some(), "{path}: Date on every response");
    }
    let seen: Vec<(String, bool)> = fake
        .rest_requests()
        .iter()
        .map(|r| (r.path.clone(), r.authorized))
        .collect();
    assert_eq!(
        seen,
        [("/nope", true), ("/api/statesX", true), ("/", true)]
            .map(|(p, a)| (p.to_owned(), a))
            .to_vec()
    );
    assert_unaffected(&fake, &daemon);
}

#[test]
fn wrong_method_is_405_with_allow() {
    let (fake, daemon) = live();
    for (method, path) in [
        ("POST", "/api/states"),
        ("PUT", "/api/states"),
        ("POST", "/health"),
        ("DELETE", "/status"),
    ] {
        let mut c = daemon.connect();
        let r = c
            .request(method, path, &["Content-Length: 0", "Connection: close"])
            .unwrap();
        assert_error(&r, 405, &format!("{method} {path}"));
        let allow = r
            .header("Allow")
            .unwrap_or_else(|| panic!("{method} {path}: 405 without Allow"));
        let methods: Vec<&str> = allow.split(',').map(str::trim).collect();
        assert!(
            methods.contains(&"GET") && methods.contains(&"HEAD") && !methods.contains(&method),
            "{method} {path}: Allow: {allow}"
        );
    }
    assert!(
        fake.rest_requests().is_empty(),
        "a wrong method on hass-edge's own routes is never passed to HA: {:?}",
        fake.rest_requests()
    );
    assert!(fake.entity("light.kitchen").is_some());
    assert_unaffected(&fake, &daemon);
}

#[test]
fn malformed_requests_are_400() {
    let (fake, daemon) = live();
    for bytes in [
        &b"GET /health HTTP/1.1 extra\r\n\r\n"[..],
        b"GET\t/health\tHTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not HTTP at all\r\n\r\n",
        b"GET health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: ten\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET /health HTTP/1.1\r\nBad Header: x\r\n\r\n",
    ] {
        assert_error(&raw(&daemon, bytes), 400, &String::from_utf8_lossy(bytes));
    }
    assert_unaffected(&fake, &daemon);
}

#[test]
fn invalid_entity_id_is_404_and_never_reaches_ha() {
    let (fake, daemon) = live();
    for path in [
        "/api/states/Light.X",
        "/api/states/light",
        "/api/states/light.",
        "/api/states/light.kitchen/../../config",
        "/api/states/light.x%2F..%2Fconfig",
        "/api/states/light.k%C3%BCche",
    ] {
        // HA's own answer for an id it does not hold, malformed or not.
        let r = daemon.get(path);
        assert_error(&r, 404, path);
        assert_eq!(r.json()["message"], "Entity not found.", "{path}");
    }
    assert!(
        fake.rest_requests().is_empty(),
        "invalid ids never go into an HA URL: {:?}",
        fake.rest_requests()
    );
    assert_unaffected(&fake, &daemon);
}

#[test]
fn oversized_request_heads_are_431() {
    let (fake, daemon) = live();
    // A head that never ends, exactly at the limit (all of it is read before the answer).
    let mut head = b"GET /health HTTP/1.1\r\nX-Filler: ".to_vec();
    head.resize(MAX_HEAD_BYTES, b'a');
    assert_error(
        &raw(&daemon, &head),
        431,
        "a head of MAX_HEAD_BYTES without its end",
    );
    // Too many headers, in a head well under the byte limit.
    let mut many = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n".to_owned();
    for i in 0..MAX_HEADERS + 10 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert!(many.len() < MAX_HEAD_BYTES);
    assert_error(&raw(&daemon, many.as_bytes()), 431, "too many headers");
    assert_unaffected(&fake, &daemon);
}

/// A complete head over the limit, sent in one go as a client would. The daemon stops
/// reading at the limit, so unread bytes remain when it closes the connection.
#[test]
fn a_complete_head_over_the_limit_is_answered_431() {
    let (fake, daemon) = live();
    let big = request(
        "GET",
        "/health",
        &[&format!("X-Big: {}", "b".repeat(MAX_HEAD_BYTES + 1024))],
    );
    for attempt in 0..20 {
        let mut c = daemon.connect();
        c.send(big.as_bytes()).unwrap();
        match c.read_response(false) {
            Ok(r) => assert_error(&r, 431, "a complete head over the limit"),
            Err(e) => panic!(
                "attempt {attempt}: no 431 but {e} (connection reset: the daemon closed with unread input)"
            ),
        }
    }
    assert_unaffected(&fake, &daemon);
}

#[test]
fn request_body_limits_413_and_411() {
    let (fake, daemon) = live();
    let too_big = request(
        "POST",
        "/api/states",
        &[&format!("Content-Length: {}", MAX_BODY_BYTES + 1)],
    );
    assert_error(
        &raw(&daemon, too_big.as_bytes()),
        413,
        "Content-Length over the limit",
    );
    let chunked = request("POST", "/api/states", &["Transfer-Encoding: chunked"]);
    assert_error(&raw(&daemon, chunked.as_bytes()), 411, "chunked body");
    // A body within the limit is read whole: the next request on the connection is parsed
    // from where the body ends, not from inside it.
    let body = "GET /api/states/light.kitchen HTTP/1.1\r\n\r\n".repeat(10);
    let mut c = daemon.connect();
    c.send_request(
        "POST",
        "/api/states",
        &[&format!("Content-Length: {}", body.len())],
    )
    .unwrap();
    c.send(body.as_bytes()).unwrap();
    assert_error(&c.read_response(false).unwrap(), 405, "POST with a body");
    let r = c.request("GET", "/health", &[]).unwrap();
    assert_eq!(
        r.status,
        200,
        "the body was not taken for requests: {}",
        r.text()
    );
    assert!(fake.rest_requests().is_empty());
    assert_unaffected(&fake, &daemon);
}

#[test]
fn head_announces_the_length_but_sends_no_body() {
    let (fake, daemon) = live();
    let mut c = daemon.connect();
    for path in [
        "/api/states/input_boolean.kitchen",
        "/api/states",
        "/health",
    ] {
        let get = c.request("GET", path, &[]).unwrap();
        assert_eq!(get.status, 200, "{path}");
        let head = c.request("HEAD", path, &[]).unwrap();
        assert_eq!(head.status, 200, "HEAD {path}");
        assert_eq!(
            head.header("Content-Length"),
            Some(get.body.len().to_string().as_str()),
            "HEAD {path} announces GET's length"
        );
        assert_eq!(
            head.header("Content-Type"),
            get.header("Content-Type"),
            "HEAD {path}"
        );
        assert!(
            c.pending().is_empty(),
            "HEAD {path} sent body bytes: {:?}",
            String::from_utf8_lossy(c.pending())
        );
    }
    let head = c
        .request("HEAD", "/api/states/input_boolean.kitchen", &[])
        .unwrap();
    assert_eq!(
        (head.header("X-Cache"), head.header("Age")),
        (Some("hit"), Some("0"))
    );
    // Had a body followed any HEAD answer, this response would not parse.
    let r = c.request("GET", "/health", &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(c.pending().is_empty());
    assert_unaffected(&fake, &daemon);
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let (fake, daemon) = live();
    let mut c = daemon.connect();
    let kitchen = fake.entity("input_boolean.kitchen").unwrap();
    for _ in 0..3 {
        let r = c
            .request("GET", "/api/states/input_boolean.kitchen", &[])
            .unwrap();
        assert_eq!((r.status, r.json()), (200, kitchen.clone()));
        assert_eq!(
            r.header("Connection")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("keep-alive")
        );
    }
    let r = c.request("GET", "/health", &["Connection: close"]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("Connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("close")
    );
    assert!(
        c.closed_by_server(Duration::from_secs(10)),
        "closed after Connection: close"
    );
    // HTTP/1.0 without keep-alive: one request per connection.
    let mut c = daemon.connect();
    c.send(b"GET /health HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(c.read_response(false).unwrap().status, 200);
    assert!(
        c.closed_by_server(Duration::from_secs(10)),
        "HTTP/1.0 closes after the response"
    );
    assert_unaffected(&fake, &daemon);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (fake, daemon) = live();
    // Reads that go to HA take a while; the ones behind them must still come after.
    fake.set_rest_delay(Duration::from_millis(300));
    let kitchen = fake.entity("input_boolean.kitchen").unwrap();
    let automation = fake.entity("automation.doorbell_sets_message").unwrap();
    let mut batch = String::new();
    batch.push_str(&request("GET", "/api/states/sensor.not_there", &[]));
    batch.push_str(&request("GET", "/api/states/input_boolean.kitchen", &[]));
    batch.push_str(&request("HEAD", "/api/states/input_boolean.kitchen", &[]));
    batch.push_str(&request(
        "GET",
        "/api/states/automation.doorbell_sets_message",
        &[],
    ));
    batch.push_str(&request("GET", "/health", &[]));
    let mut c = daemon.connect();
    c.send(batch.as_bytes()).unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!(
        (r.status, r.json()),
        (404, json!({"message": "Entity not found."})),
        "1st: the unknown entity"
    );
    let r = c.read_response(false).unwrap();
    assert_eq!(
        (r.status, r.json()),
        (200, kitchen.clone()),
        "2nd: the kitchen"
    );
    let r = c.read_response(true).unwrap();
    assert_eq!(
        (r.status, r.header("Content-Length")),
        (200, Some(kitchen.to_string().len().to_string().as_str())),
        "3rd: HEAD"
    );
    let r = c.read_response(false).unwrap();
    assert_eq!(
        (r.status, r.json(), r.header("X-Cache")),
        (200, automation, Some("miss")),
        "4th: read through HA"
    );
    let r = c.read_response(false).unwrap();
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, Value::from("live")),
        "5th: /health"
    );
    assert!(c.pending().is_empty());
    fake.set_rest_delay(Duration::ZERO);
    assert_unaffected(&fake, &daemon);
}

#[test]
fn idle_and_half_sent_clients_do_not_block_others() {
    let (fake, daemon) = live();
    let idle: Vec<Conn> = (0..50).map(|_| daemon.connect()).collect();
    let half: Vec<Conn> = (0..20)
        .map(|_| {
            let mut c = daemon.connect();
            c.send(b"GET /api/states HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .unwrap();
            c
        })
        .collect();
    for _ in 0..5 {
        let started = Instant::now();
        let (status, body) = daemon.health().expect("/health answers");
        assert_eq!(status, 200, "{body}");
        // A blocked accept loop would show as the 10 s request timeout or worse.
        assert!(
            started.elapsed() < Duration::from_secs(5) * slowdown(),
            "/health took {:?} with idle clients",
            started.elapsed()
        );
    }
    assert_unaffected(&fake, &daemon);
    drop((idle, half));
}

#[test]
fn a_stalled_request_gets_408_but_a_slow_one_is_served() {
    let (fake, daemon) = live();
    let mut stalled = daemon.connect();
    let sent = Instant::now();
    stalled
        .send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    // A client that sends its head in pieces, well within the timeout, is served.
    let mut slow = daemon.connect();
    for piece in [
        &b"GET /heal"[..],
        b"th HTTP/1.1\r\nHo",
        b"st: 127.0.0.1\r\n",
        b"\r\n",
    ] {
        slow.send(piece).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(slow.read_response(false).unwrap().status, 200);

    let r = stalled
        .read_response(false)
        .expect("an answer, not a silent close");
    assert_error(&r, 408, "a head that stopped half way");
    assert!(
        sent.elapsed() >= REQUEST_TIMEOUT - Duration::from_millis(200),
        "408 after only {:?}",
        sent.elapsed()
    );
    assert!(
        stalled.closed_by_server(Duration::from_secs(10)),
        "the stalled connection is closed"
    );
    assert_unaffected(&fake, &daemon);
}

/// At the cap, a newcomer takes the slot of the connection idle longest: kept-alive
/// clients that finished a request make room (the oldest is closed, and counted). With
/// every slot holding a request that is still arriving, the newcomer gets 503 with
/// `Retry-After` for [`SLOW_REQUEST`]; after that the request arriving longest gives way
/// (408), so trickling a byte on each connection does not keep others out either.
#[test]
fn connections_over_the_cap_make_room_and_503_only_for_fresh_requests() {
    let (fake, daemon) = live();
    // Fill the cap with keep-alive clients, each seen to be admitted (a 200, not a 503).
    let mut open: Vec<Conn> = (0..MAX_CONNECTIONS)
        .map(|i| {
            let mut c = daemon.connect();
            let r = c
                .request("GET", "/health", &[])
                .unwrap_or_else(|e| panic!("client {i}: {e}"));
            assert_eq!(
                r.status,
                200,
                "client {i} of {MAX_CONNECTIONS} is admitted: {}",
                r.text()
            );
            c
        })
        .collect();
    let r = daemon.get("/status");
    assert_eq!(
        r.status,
        200,
        "a newcomer over the cap is served: {}",
        r.text()
    );
    assert!(
        open[0].closed_by_server(Duration::from_secs(5)),
        "the connection idle longest made room"
    );
    assert_eq!(r.json()["http"]["connections_evicted"], 1, "{}", r.text());
    // The others are still served.
    let r = open[MAX_CONNECTIONS - 1]
        .request("GET", "/health", &[])
        .unwrap();
    assert_eq!(r.status, 200);
    drop(open);

    // Every slot holds a request that started just now: nothing to evict yet, so the
    // newcomer gets 503. (Checked only if this ran within SLOW_REQUEST, as it does but on a
    // machine many times slower than usual.)
    let sent = Instant::now();
    let mut trickling: Vec<Conn> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let mut c = daemon.connect();
            c.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = daemon.connect();
    let r = extra
        .read_response(false)
        .expect("an answer, not a silent close");
    if sent.elapsed() < SLOW_REQUEST {
        assert_error(&r, 503, "one connection over the cap, none idle");
        assert!(r.header("Retry-After").is_some(), "503 says when to retry");
        assert!(extra.closed_by_server(Duration::from_secs(10)));
    }
    // Requests still arriving after SLOW_REQUEST (the same attack, a byte sent on each) give
    // way, oldest first, with a 408.
    std::thread::sleep((SLOW_REQUEST + Duration::from_millis(300)).saturating_sub(sent.elapsed()));
    let started = Instant::now();
    let (status, body) = daemon.health().expect("/health answers");
    assert_eq!(status, 200, "a newcomer past trickling requests: {body}");
    assert!(
        started.elapsed() < Duration::from_secs(3) * slowdown(),
        "a newcomer past trickling requests took {:?}",
        started.elapsed()
    );
    let r = trickling[0]
        .read_response(false)
        .expect("the oldest trickling request is answered, not dropped");
    assert_error(&r, 408, "the oldest trickling request gave way");
    assert!(
        sent.elapsed() < REQUEST_TIMEOUT,
        "before its own timeout ({:?})",
        sent.elapsed()
    );
    drop(trickling);
    assert_unaffected(&fake, &daemon);
}

/// Red-team case e_slots: one local process opened 512 connections and sent nothing; every
/// other client got 503 for the 60 s they were held, again each time they were reopened.
/// Now a newcomer is answered promptly (the silent ones make room, oldest first, counted),
/// and a connection that sends nothing is closed after [`REQUEST_TIMEOUT`].
#[test]
fn silent_connections_do_not_keep_others_out() {
    let (fake, daemon) = live();
    let mut silent: Vec<Conn> = (0..MAX_CONNECTIONS).map(|_| daemon.connect()).collect();
    let opened = Instant::now();
    // Newcomers that stay connected (keep-alive), so that each needs a slot of its own.
    let mut newcomers = Vec::new();
    for i in 0..5 {
        let started = Instant::now();
        let mut c = daemon.connect();
        let r = c
            .request("GET", "/api/states/input_boolean.kitchen", &[])
            .unwrap_or_else(|e| panic!("newcomer {i}: {e}"));
        newcomers.push(c);
        assert_eq!(
            r.status,
            200,
            "newcomer {i} with {MAX_CONNECTIONS} silent connections open: {}",
            r.text()
        );
        // Behaviour a user notices, not a benchmark: answered, not left waiting for a slot.
        assert!(
            started.elapsed() < Duration::from_secs(3) * slowdown(),
            "newcomer {i} took {:?}",
            started.elapsed()
        );
    }
    // One more newcomer, kept alive for both requests.
    let mut c = daemon.connect();
    let status = c.request("GET", "/status", &[]).unwrap().json();
    assert_eq!(
        status["http"]["connections_evicted"], 6,
        "each of the 6 newcomers evicted one silent connection: {status}"
    );
    let metrics = c.request("GET", "/metrics", &[]).unwrap().text();
    assert!(
        metrics.contains("hass_edge_http_connections_evicted_total 6"),
        "{metrics}"
    );
    // The silent connections opened first were the ones closed.
    for (i, c) in silent.iter_mut().take(6).enumerate() {
        assert!(
            c.closed_by_server(Duration::from_secs(2)),
            "silent connection {i} (among the oldest) was closed"
        );
    }
    assert!(
        opened.elapsed() < REQUEST_TIMEOUT,
        "checked before the request timeout closed them all ({:?})",
        opened.elapsed()
    );
    drop((silent, newcomers, c));
    assert_unaffected(&fake, &daemon);
}

/// A new connection's first request must start within [`REQUEST_TIMEOUT`] (it was given
/// the 60 s idle timeout); a kept-alive connection between requests keeps the longer one.
#[test]
fn a_silent_connection_is_closed_after_the_request_timeout() {
    let (fake, daemon) = live();
    let mut kept = daemon.connect();
    assert_eq!(kept.request("GET", "/health", &[]).unwrap().status, 200);
    let mut silent = daemon.connect();
    let opened = Instant::now();
    assert!(
        silent.closed_by_server(REQUEST_TIMEOUT + Duration::from_secs(5) * slowdown()),
        "a connection that sends nothing is closed within {REQUEST_TIMEOUT:?} (+5 s)"
    );
    assert!(
        opened.elapsed() >= REQUEST_TIMEOUT - Duration::from_millis(500),
        "closed after only {:?}",
        opened.elapsed()
    );
    assert!(
        silent.pending().is_empty(),
        "closed without an answer: nothing was asked"
    );
    let r = kept.request("GET", "/health", &[]).unwrap();
    assert_eq!(
        r.status, 200,
        "a kept-alive connection idle for longer than the request timeout is still served"
    );
    assert_unaffected(&fake, &daemon);
}

/// A request with `Host: host` and the given header lines and body, on a fresh connection.
fn with_host(
    daemon: &Daemon,
    method: &str,
    path: &str,
    host: &str,
    extra: &[&str],
    body: &str,
) -> Response {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for h in extra {
        text.push_str(h);
        text.push_str("\r\n");
    }
    if !body.is_empty() {
        text.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    text.push_str("\r\n");
    text.push_str(body);
    let mut c = daemon.connect();
    c.send(text.as_bytes()).unwrap();
    c.read_response(method == "HEAD")
        .unwrap_or_else(|e| panic!("{method} {path} with Host {host}: {e}"))
}

/// Red-team case: DNS rebinding. A page on an attacker's name, rebound to 127.0.0.1, sends
/// `Host: <its name>` and, for a write, the matching `Origin`, which passed as hass-edge's
/// own origin: in the default loopback-open mode `POST /api/services/lock/unlock` reached
/// HA with hass-edge's token. Now any `Host` that is not an IP literal, `localhost`, the
/// machine's name or in `http.allowed_hosts` is answered 421 before anything runs, on every
/// way in (local routes, the stream, the WebSocket API, the forward to HA), and counted.
#[test]
fn rebinding_host_is_refused_before_anything_runs() {
    let fake = FakeHa::start("2025.4.4");
    let daemon = Daemon::start_with(
        &fake,
        DaemonOptions::default().set("http", "allowed_hosts", "[\"kiosk.lan\"]"),
    );
    daemon.wait_live();
    let port = daemon.addr.port();
    let evil = format!("rebind.attacker.example:{port}");
    let origin = format!("Origin: http://{evil}");
    let json = "Content-Type: application/json";
    let unlock = r#"{"entity_id":"lock.front_door"}"#;
    let upgrade = [
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ];
    let refused: Vec<(&str, &str, Vec<&str>, &str)> = vec![
        (
            "POST",
            "/api/services/lock/unlock",
            vec![&origin, json],
            unlock,
        ),
        ("GET", "/api/states", vec![], ""),
        ("GET", "/api/states/input_boolean.kitchen", vec![], ""),
        ("GET", "/api/stream", vec![], ""),
        ("GET", "/api/websocket", upgrade.to_vec(), ""),
        ("GET", "/api/config/core", vec![], ""),
        ("GET", "/", vec![], ""),
        ("OPTIONS", "/api/states", vec![&origin], ""),
        ("GET", "/status", vec![], ""),
    ];
    for (method, path, extra, body) in &refused {
        let r = with_host(&daemon, method, path, &evil, extra, body);
        assert_error(&r, 421, &format!("{method} {path} with Host {evil}"));
        let message = r.json()["message"].as_str().unwrap().to_owned();
        assert!(
            message.contains(&evil) && message.contains("http.allowed_hosts"),
            "the answer names the Host and the key that allows it: {message}"
        );
    }
    assert!(
        fake.rest_requests().is_empty(),
        "nothing reached HA: {:?}",
        fake.rest_requests()
    );
    let refused_n = refused.len();
    let status = daemon.get("/status").json();
    assert_eq!(status["http"]["hosts_refused"], refused_n, "{status}");
    let metrics = daemon.get("/metrics").text();
    assert!(
        metrics.contains(&format!("hass_edge_http_hosts_refused_total {refused_n}")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "hass_edge_http_requests_total{{route=\"host\",status=\"421\"}} {refused_n}"
        )),
        "{metrics}"
    );

    // This machine's names, loopback names and the configured ones are answered, the write
    // with its own origin included.
    let machine = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();
    let mut good = vec![
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_owned(),
        format!("localhost:{port}"),
        format!("LocalHost.:{port}"),
        format!("kiosk.localhost:{port}"),
        format!("[::1]:{port}"),
        format!("kiosk.lan:{port}"),
        "KIOSK.lan".to_owned(),
    ];
    if hass_edge::hosts::valid_name(&machine) {
        good.push(format!("{machine}:{port}"));
        good.push(format!("{machine}.local:{port}"));
    }
    for host in &good {
        let r = with_host(
            &daemon,
            "GET",
            "/api/states/input_boolean.kitchen",
            host,
            &[],
            "",
        );
        assert_eq!(r.status, 200, "Host {host}: {}", r.text());
        let r = with_host(&daemon, "GET", "/api/", host, &[], "");
        assert_eq!(r.status, 200, "Host {host}: {}", r.text());
    }
    let own = format!("localhost:{port}");
    let r = with_host(
        &daemon,
        "POST",
        "/api/services/input_boolean/toggle",
        &own,
        &[&format!("Origin: http://{own}"), json],
        r#"{"entity_id":"input_boolean.kitchen"}"#,
    );
    // The fake HA has no such service (404): what matters is that the call reached it.
    assert_eq!(
        r.status,
        404,
        "a write from our own origin, HA's answer: {}",
        r.text()
    );
    assert!(
        fake.rest_requests()
            .iter()
            .any(|r| r.path == "/api/services/input_boolean/toggle" && r.authorized),
        "the write from a page of our own went through"
    );
    // HTTP/1.0 without Host is answered as before.
    let r = raw(&daemon, b"GET /api/ HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    let status = daemon.get("/status").json();
    assert_eq!(
        status["http"]["hosts_refused"], refused_n,
        "the allowed ones were not counted: {status}"
    );
    assert_unaffected(&fake, &daemon);
}

/// Issue 13, HTTP details: `HEAD /api/stream` answers the stream's headers, `Expect:
/// 100-continue` gets its interim answer before the body is sent, HTTP/1.1 without `Host`
/// is 400 (RFC 9112 §3.2), and a signed `Content-Length` is 400 (RFC 9110 §8.6: 1*DIGIT).
#[test]
fn http_details_head_stream_expect_host_and_signed_length() {
    let (fake, daemon) = live();
    let mut c = daemon.connect();
    let head = c.request("HEAD", "/api/stream", &[]).unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("Content-Type"), Some("text/event-stream"));
    assert!(head.body.is_empty());

    let mut c = daemon.connect();
    let body = br#"{"entity_id":"input_boolean.kitchen"}"#;
    c.send(
        format!(
            "POST /api/services/input_boolean/toggle HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let interim = c.read_response(true).unwrap();
    assert_eq!(interim.status, 100, "100 Continue before the body is sent");
    c.send(body).unwrap();
    let r = c.read_response(false).unwrap();
    assert_ne!(r.status, 100);
    assert!(
        fake.rest_requests()
            .iter()
            .any(|r| r.path == "/api/services/input_boolean/toggle"),
        "the call went through once the body came"
    );

    assert_error(
        &raw(&daemon, b"GET /health HTTP/1.1\r\n\r\n"),
        400,
        "HTTP/1.1 without Host",
    );
    assert_error(
        &raw(
            &daemon,
            b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ),
        400,
        "two Host headers",
    );
    let r = raw(&daemon, b"GET /health HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 200, "HTTP/1.0 needs no Host");
    assert_error(
        &raw(
            &daemon,
            b"POST /api/services/a/b HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: +2\r\n\r\n{}",
        ),
        400,
        "Content-Length: +2",
    );
    assert_unaffected(&fake, &daemon);
}
