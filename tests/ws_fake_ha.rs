//! The local WebSocket API (`/api/websocket`, issue 16) against the daemon binary and the
//! fake HA, for what a real HA cannot produce on demand: 64 + 1 clients, an oversized
//! message, a client that never reads, id reuse and malformed messages, HA dropping the
//! link in the middle of a forwarded command, a foreign `Origin`, and HA's verdict on a
//! token that is not hass-edge's. The real clients (home-assistant-js-websocket,
//! hass-client, HA's frontend) are in `tests/wsclients` and `tests/frontend`.
//!
//! The client here is tungstenite's blocking one over a `std::net::TcpStream` with a read
//! timeout, so a test that waits for something that never comes fails instead of hanging.

mod support;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::http::HeaderValue;
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::tungstenite::{self, Message, WebSocket};
use serde_json::{Value, json};

use support::daemon::{DaemonOptions, TempDir};
use support::http_client::Response;
use support::{Daemon, FakeHa, deadline, wait_until};

/// hass-edge's API token in the tests that configure one.
const API_TOKEN: &str = "kiosk-ws-token-0123456789abcdef";

/// HA's `auth_invalid` text for a refused token (`auth.py`).
const INVALID_TOKEN: &str = "Invalid access token or password";

/// A WebSocket API client: one connection, HA's messages one at a time (a coalesced frame,
/// a JSON array, is split).
struct Client {
    ws: WebSocket<TcpStream>,
    /// Messages of a coalesced frame not yet returned.
    queued: std::collections::VecDeque<Value>,
}

/// How a wait for a message ended without one.
#[derive(Debug)]
enum Gone {
    /// Nothing within the time given.
    Timeout,
    /// The server closed the connection (a Close frame, EOF or a reset); how, for failure
    /// messages.
    Closed(#[allow(dead_code)] String),
}

impl Client {
    /// Opens `/api/websocket` with `headers` (`Name: value`); `Err` with the HTTP status when
    /// the upgrade is refused.
    fn open(daemon: &Daemon, headers: &[&str]) -> Result<Client, u16> {
        let stream = TcpStream::connect(daemon.addr).expect("connect to the daemon");
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client::open_on(stream, daemon, headers)
    }

    fn open_on(stream: TcpStream, daemon: &Daemon, headers: &[&str]) -> Result<Client, u16> {
        let mut request = format!("ws://{}/api/websocket", daemon.addr)
            .into_client_request()
            .unwrap();
        for h in headers {
            let (name, value) = h.split_once(':').expect("Name: value");
            let name: tungstenite::http::HeaderName = name.trim().parse().unwrap();
            request
                .headers_mut()
                .insert(name, HeaderValue::from_str(value.trim()).unwrap());
        }
        // Big answers (`get_states`) are fine; what the daemon accepts is not this side's limit.
        let config = WebSocketConfig::default().max_message_size(Some(64 << 20));
        match tungstenite::client::client_with_config(request, stream, Some(config)) {
            Ok((ws, _)) => Ok(Client {
                ws,
                queued: Default::default(),
            }),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                Err(r.status().as_u16())
            }
            Err(e) => panic!("WebSocket handshake with the daemon: {e}"),
        }
    }

    /// Opens a session and authenticates with `token`; returns the client and the verdict
    /// message (`auth_ok` or `auth_invalid`).
    fn auth(daemon: &Daemon, token: &str) -> (Client, Value) {
        let mut c = Client::open(daemon, &[]).expect("the upgrade is accepted");
        let required = c.recv();
        assert_eq!(required["type"], "auth_required", "{required}");
        c.send(json!({"type": "auth", "access_token": token}));
        let verdict = c.recv();
        (c, verdict)
    }

    /// A session that got `auth_ok` with `token`.
    fn authed(daemon: &Daemon, token: &str) -> Client {
        let (c, verdict) = Client::auth(daemon, token);
        assert_eq!(verdict["type"], "auth_ok", "{verdict}");
        c
    }

    fn send(&mut self, message: Value) {
        self.send_text(message.to_string());
    }

    fn send_text(&mut self, text: String) {
        self.ws
            .send(Message::text(text))
            .unwrap_or_else(|e| panic!("send to the daemon: {e}"));
    }

    /// The next message within `timeout`.
    fn next(&mut self, timeout: Duration) -> Result<Value, Gone> {
        if let Some(v) = self.queued.pop_front() {
            return Ok(v);
        }
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Gone::Timeout);
            }
            self.ws.get_mut().set_read_timeout(Some(left)).unwrap();
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    let v: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("not JSON from the daemon ({e}): {text}"));
                    match v {
                        Value::Array(list) => {
                            self.queued.extend(list);
                            if let Some(v) = self.queued.pop_front() {
                                return Ok(v);
                            }
                        }
                        v => return Ok(v),
                    }
                }
                Ok(Message::Close(frame)) => return Err(Gone::Closed(format!("Close {frame:?}"))),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(Gone::Closed(e.to_string())),
            }
        }
    }

    /// The next message; fails after [`deadline`].
    fn recv(&mut self) -> Value {
        self.next(deadline())
            .unwrap_or_else(|e| panic!("no message from the daemon: {e:?}"))
    }

    /// Reads until a message with `id` (and, for subscriptions, `type`) comes; returns it.
    fn recv_id(&mut self, id: u64, kind: &str) -> Value {
        loop {
            let m = self.recv();
            if m["id"] == id && m["type"] == kind {
                return m;
            }
        }
    }

    /// Reads until the server closes the connection; fails if it is still open after
    /// [`deadline`]. Returns the messages read before.
    fn closed(&mut self) -> Vec<Value> {
        let end = Instant::now() + deadline();
        let mut seen = Vec::new();
        loop {
            match self.next(end.saturating_duration_since(Instant::now())) {
                Ok(m) => seen.push(m),
                Err(Gone::Closed(_)) => return seen,
                Err(Gone::Timeout) => panic!("the connection is still open; read {seen:?}"),
            }
        }
    }

    /// A ping answered: the session is alive (events of its subscriptions are skipped).
    fn ping(&mut self, id: u64) {
        self.send(json!({"id": id, "type": "ping"}));
        let answer = loop {
            let m = self.recv();
            if m["id"] == id && m["type"] != "event" {
                break m;
            }
        };
        assert_eq!(answer, json!({"id": id, "type": "pong"}));
    }
}

fn with_api_token(dir: &TempDir) -> DaemonOptions {
    let path = dir.write("api-token", &format!("{API_TOKEN}\n"));
    DaemonOptions::default().set("http", "api_token_file", format!("\"{}\"", path.display()))
}

fn live_with(options: DaemonOptions) -> (FakeHa, Daemon) {
    let fake = FakeHa::start("2025.4.4");
    let daemon = Daemon::start_with(&fake, options);
    daemon.wait_live();
    (fake, daemon)
}

/// `GET path` with hass-edge's API token.
fn get_authorized(daemon: &Daemon, path: &str) -> Response {
    let mut c = daemon.connect();
    c.request(
        "GET",
        path,
        &[
            &format!("Authorization: Bearer {API_TOKEN}"),
            "Connection: close",
        ],
    )
    .unwrap()
}

/// `/status`'s `websocket_api` section.
fn ws_status(daemon: &Daemon) -> Value {
    let r = get_authorized(daemon, "/status");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["websocket_api"].clone()
}

/// A WebSocket upgrade request, raw, with `extra` header lines; the response.
fn upgrade_raw(daemon: &Daemon, extra: &[&str]) -> Response {
    let mut headers = vec![
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ];
    headers.extend_from_slice(extra);
    daemon
        .connect()
        .request("GET", "/api/websocket", &headers)
        .unwrap()
}

/// The limit on sessions, at a small `http.max_websocket_clients` and at the default (64):
/// one more is answered 503 before any upgrade and counted; once a session leaves, a new
/// client is admitted.
#[test]
fn one_client_beyond_the_limit_gets_503_before_the_upgrade() {
    for max in [Some(4), None] {
        let dir = TempDir::new("ws-limit");
        let mut options = with_api_token(&dir);
        if let Some(max) = max {
            options = options.set("http", "max_websocket_clients", max);
        }
        let (_fake, daemon) = live_with(options);
        let max = max.unwrap_or(64);
        let mut clients: Vec<Client> = (0..max)
            .map(|_| Client::authed(&daemon, API_TOKEN))
            .collect();
        assert_eq!(ws_status(&daemon)["sessions_open"], max, "max {max}");
        let r = upgrade_raw(&daemon, &[]);
        assert_eq!(r.status, 503, "client {} of {max}: {}", max + 1, r.text());
        assert!(r.header("Sec-WebSocket-Accept").is_none(), "{r:?}");
        let status = ws_status(&daemon);
        assert_eq!(status["refused_full"], 1, "{status}");
        // The others are unaffected.
        clients[0].ping(1);
        clients[max - 1].ping(1);
        // One leaves: room for one more.
        let mut leaving = clients.pop().unwrap();
        leaving.ws.close(None).unwrap();
        let _ = leaving.closed();
        wait_until("the session to end", deadline(), || {
            let open = ws_status(&daemon)["sessions_open"].clone();
            if open == max - 1 {
                Ok(())
            } else {
                Err(format!("{open} open"))
            }
        });
        let mut again = Client::authed(&daemon, API_TOKEN);
        again.ping(1);
        assert_eq!(upgrade_raw(&daemon, &[]).status, 503, "full again");
        assert_eq!(ws_status(&daemon)["refused_full"], 2);
        assert_eq!(daemon.health().unwrap().0, 200);
    }
}

/// A message of exactly 1 MiB is read (HA's answer comes); one byte more closes the
/// connection, and the daemon and its other sessions go on.
#[test]
fn a_message_over_one_mib_closes_the_connection() {
    let dir = TempDir::new("ws-big");
    let (_fake, daemon) = live_with(with_api_token(&dir));
    let mut other = Client::authed(&daemon, API_TOKEN);
    other.send(json!({"id": 1, "type": "subscribe_entities"}));
    assert_eq!(other.recv_id(1, "result")["success"], true);
    let mut c = Client::authed(&daemon, API_TOKEN);
    // JSON allows trailing whitespace: a ping padded to the size wanted.
    let padded = |id: u64, size: usize| {
        let mut text = json!({"id": id, "type": "ping"}).to_string();
        text.push_str(&" ".repeat(size - text.len()));
        text
    };
    c.send_text(padded(1, 1024 * 1024));
    assert_eq!(c.recv(), json!({"id": 1, "type": "pong"}), "1 MiB is taken");
    c.send_text(padded(2, 1024 * 1024 + 1));
    let before_close = c.closed();
    assert!(
        !before_close.iter().any(|m| m["id"] == 2),
        "the oversized message was answered: {before_close:?}"
    );
    assert_eq!(daemon.health().unwrap().0, 200);
    other.ping(2);
    let mut fresh = Client::authed(&daemon, API_TOKEN);
    fresh.ping(1);
}

/// A client that subscribes and then never reads, while the mirror changes fast, is
/// disconnected and counted; a client that reads gets every change, in order, and `/health`
/// answers throughout.
#[test]
fn a_client_that_never_reads_is_dropped_and_the_others_get_every_change() {
    let dir = TempDir::new("ws-slow");
    let (fake, daemon) = live_with(with_api_token(&dir));
    fake.push_change(fake.new_entity("sensor.flood", "0", json!({"friendly_name": "Flood"})));
    // In the mirror (the tracked list, not a read-through to HA) before the snapshot is taken.
    wait_until("the mirror to hold sensor.flood", deadline(), || {
        let states = get_authorized(&daemon, "/api/states").json();
        let ids: Vec<&str> = states
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["entity_id"].as_str())
            .collect();
        if ids.contains(&"sensor.flood") {
            Ok(())
        } else {
            Err(format!("{} states", ids.len()))
        }
    });
    let mut reader = Client::authed(&daemon, API_TOKEN);
    reader.send(json!({"id": 1, "type": "subscribe_entities", "entity_ids": ["sensor.flood"]}));
    assert_eq!(reader.recv_id(1, "result")["success"], true);
    let snapshot = reader.recv_id(1, "event");
    assert_eq!(
        snapshot["event"]["a"]["sensor.flood"]["s"], "0",
        "{snapshot}"
    );
    // The stuck client: a small receive buffer, so the daemon's writes block soon.
    let stream = TcpStream::connect(daemon.addr).unwrap();
    rustix::net::sockopt::set_socket_recv_buffer_size(&stream, 4096).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut stuck = Client::open_on(stream, &daemon, &[]).expect("upgrade");
    assert_eq!(stuck.recv()["type"], "auth_required");
    stuck.send(json!({"type": "auth", "access_token": API_TOKEN}));
    assert_eq!(stuck.recv()["type"], "auth_ok");
    stuck.send(json!({"id": 1, "type": "subscribe_entities"}));
    assert_eq!(stuck.recv_id(1, "result")["success"], true);
    // From here `stuck` reads nothing.

    const CHANGES: usize = 4000;
    let padding = "x".repeat(2048);
    let reading = std::thread::spawn(move || {
        let mut states = Vec::new();
        while states.len() < CHANGES {
            match reader.next(deadline()) {
                Ok(m) if m["id"] == 1 && m["type"] == "event" => {
                    if let Some(s) = m["event"]["c"]["sensor.flood"]["+"]["s"].as_str() {
                        states.push(s.parse::<usize>().unwrap());
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("the reading client after {} changes: {e:?}", states.len()),
            }
        }
        (reader, states)
    });
    let mut slowest_health = Duration::ZERO;
    for i in 1..=CHANGES {
        let new = fake.next_state("sensor.flood", |s| {
            s["state"] = i.to_string().into();
            s["attributes"]["padding"] = format!("{i}{padding}").into();
        });
        fake.push_change(new);
        if i % 200 == 0 {
            let start = Instant::now();
            assert_eq!(daemon.health().unwrap().0, 200);
            slowest_health = slowest_health.max(start.elapsed());
        }
    }
    let (mut reader, states) = reading.join().expect("the reading client");
    assert_eq!(
        states,
        (1..=CHANGES).collect::<Vec<_>>(),
        "every change, once, in order"
    );
    // Dropped once its writes block for the write timeout (10 s), or it falls behind.
    let status = wait_until("the stuck client to be dropped", deadline(), || {
        let s = ws_status(&daemon);
        if s["slow_clients_dropped"] == 1 && s["sessions_open"] == 1 {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    });
    eprintln!("slowest /health during the flood: {slowest_health:?}; {status}");
    // A liveness bound, not a timing goal: nothing waited for the stuck client.
    assert!(
        slowest_health < Duration::from_secs(2) * support::daemon::slowdown(),
        "/health took {slowest_health:?} during the flood"
    );
    reader.ping(2);
    drop(stuck);
}

/// HA's id rules and error shapes (`websocket_api/connection.py`), through the socket: an id
/// that does not increase is `id_reuse`, a message without a proper id or type is
/// `invalid_format` (echoing the id it had), and the session goes on; a frame that is not
/// JSON ends it.
#[test]
fn id_reuse_and_malformed_messages_get_has_errors() {
    let dir = TempDir::new("ws-ids");
    let (fake, daemon) = live_with(with_api_token(&dir));
    let commands = fake.commands().len();
    let mut c = Client::authed(&daemon, API_TOKEN);
    c.ping(5);
    let reuse = |id: u64| {
        json!({"id": id, "type": "result", "success": false,
               "error": {"code": "id_reuse", "message": "Identifier values have to increase."}})
    };
    let invalid = |id: Value| {
        json!({"id": id, "type": "result", "success": false,
               "error": {"code": "invalid_format", "message": "Message incorrectly formatted."}})
    };
    c.send(json!({"id": 5, "type": "ping"}));
    assert_eq!(c.recv(), reuse(5));
    c.send(json!({"id": 3, "type": "get_states"}));
    assert_eq!(c.recv(), reuse(3));
    c.send(json!({"id": "6", "type": "ping"}));
    assert_eq!(c.recv(), invalid(json!("6")));
    c.send(json!({"id": 6}));
    assert_eq!(c.recv(), invalid(json!(6)));
    c.send(json!({"type": "ping"}));
    assert_eq!(c.recv(), invalid(Value::Null));
    c.send(json!([1]));
    assert_eq!(c.recv(), invalid(json!(0)));
    // None of it went to HA: no link of the session's own, and nothing like it on the
    // mirror's (whose startup may still be sending its own commands, e.g. a second
    // `get_config` once live: counting them raced).
    let mirror = fake.commands().first().map(|(session, _)| *session);
    let after: Vec<(usize, Value)> = fake.commands().into_iter().skip(commands).collect();
    assert!(
        after.iter().all(|(session, m)| Some(*session) == mirror
            && m["type"] != "ping"
            && m["type"] != "get_states"),
        "{after:?}"
    );
    c.ping(6);
    c.send_text("{\"id\":7,".into());
    let seen = c.closed();
    assert!(
        seen.is_empty(),
        "answered a frame that is not JSON: {seen:?}"
    );
    assert_eq!(daemon.health().unwrap().0, 200);
}

/// HA drops the session's link while a forwarded command waits for its answer: the client
/// gets `home_assistant_error` for it at once; its forwarded subscription is made again on
/// the next link, its result swallowed, and HA's events on it reach the client under the
/// client's id. `kind` is the command HA dies on.
fn upstream_drop_mid_forward(kind: &str, command: Value) {
    let dir = TempDir::new("ws-drop");
    let (fake, daemon) = live_with(with_api_token(&dir));
    let mut c = Client::authed(&daemon, API_TOKEN);
    c.send(json!({"id": 1, "type": "subscribe_events", "event_type": "lovelace_updated"}));
    let result = c.recv();
    assert_eq!(
        result,
        json!({"id": 1, "type": "result", "success": true, "result": null}),
        "HA's result under the client's id"
    );
    let subscribed_on = |fake: &FakeHa| -> Vec<(usize, u64)> {
        fake.commands()
            .iter()
            .filter(|(_, m)| {
                m["type"] == "subscribe_events" && m["event_type"] == "lovelace_updated"
            })
            .map(|(n, m)| (*n, m["id"].as_u64().unwrap()))
            .collect()
    };
    let first = subscribed_on(&fake);
    assert_eq!(first.len(), 1, "one link, one subscription: {first:?}");
    let (link, _) = first[0];
    // HA dies on the next command.
    fake.drop_on_next(kind);
    let mut command = command;
    command["id"] = 2.into();
    c.send(command);
    // At once: the drop is seen as it happens (not after a heartbeat or a timeout).
    let prompt = Duration::from_secs(5) * support::daemon::slowdown();
    let answer = c
        .next(prompt)
        .unwrap_or_else(|e| panic!("no answer to the command HA died on within {prompt:?}: {e:?}"));
    assert_eq!(answer["id"], 2, "{answer}");
    assert_eq!(answer["success"], false, "{answer}");
    assert_eq!(answer["error"]["code"], "home_assistant_error", "{answer}");
    // The subscription is made again on a new link; the client sees no second result.
    let (relink, upstream_id) = wait_until("the subscription made again", deadline(), || {
        let subs = subscribed_on(&fake);
        match subs.get(1) {
            Some(&s) => Ok(s),
            None => Err(format!("{subs:?}")),
        }
    });
    assert_ne!(relink, link, "made on a new link");
    assert!(
        !fake
            .commands()
            .iter()
            .any(|(n, m)| *n == relink && m["type"] == kind),
        "the command HA died on was sent again: {:?}",
        fake.commands()
    );
    match c.next(Duration::from_millis(500)) {
        Err(Gone::Timeout) => {}
        other => panic!("the client noticed the new link: {other:?}"),
    }
    // HA's event on the new subscription reaches the client under its id.
    let event = json!({"event_type": "lovelace_updated", "data": {"url_path": null, "mode": "storage"},
                       "origin": "LOCAL", "time_fired": "2026-11-22T12:07:28.000000+00:00",
                       "context": {"id": "01JCTX", "parent_id": null, "user_id": null}});
    assert!(fake.send_to(
        relink,
        json!({"id": upstream_id, "type": "event", "event": event}).to_string()
    ));
    let got = c.recv();
    assert_eq!(got, json!({"id": 1, "type": "event", "event": event}));
    c.ping(3);
}

/// A client that piles up subscriptions: the first `MAX_LOCAL_SUBSCRIPTIONS` (16) are
/// answered from the mirror, the next goes to HA on the session's link and HA's answer comes
/// back under the client's id; a change then costs the daemon 16 local events for it, not one
/// per subscription the client asked for.
#[test]
fn subscriptions_past_the_local_bound_are_served_by_ha() {
    const LOCAL: u64 = 16;
    let dir = TempDir::new("ws-subs");
    let (fake, daemon) = live_with(with_api_token(&dir));
    let mut c = Client::authed(&daemon, API_TOKEN);
    for id in 1..=LOCAL {
        c.send(json!({"id": id, "type": "subscribe_events", "event_type": "state_changed"}));
        assert_eq!(c.recv_id(id, "result")["success"], true);
    }
    let before = fake.commands().len();
    c.send(json!({"id": LOCAL + 1, "type": "subscribe_events", "event_type": "state_changed"}));
    let result = c.recv_id(LOCAL + 1, "result");
    assert_eq!(result["success"], true, "{result}");
    let upstream: Vec<Value> = fake.commands()[before..]
        .iter()
        .filter(|(_, m)| m["type"] == "subscribe_events" && m["event_type"] == "state_changed")
        .map(|(_, m)| m.clone())
        .collect();
    assert_eq!(upstream.len(), 1, "the 17th went to HA: {upstream:?}");
    let entity_id = fake
        .entities()
        .iter()
        .filter_map(|e| e["entity_id"].as_str().map(str::to_owned))
        .find(|id| id.starts_with("light."))
        .expect("the fake has a light");
    fake.push_change(fake.next_state(&entity_id, |s| s["state"] = "edge-test".into()));
    let mut local = std::collections::BTreeSet::new();
    while local.len() < LOCAL as usize {
        let m = c.recv();
        if m["type"] == "event" && m["event"]["data"]["entity_id"] == entity_id.as_str() {
            assert!(local.insert(m["id"].as_u64().unwrap()), "twice: {m}");
        }
    }
    assert_eq!(
        local,
        (1..=LOCAL).collect(),
        "one event per local subscription"
    );
    c.ping(LOCAL + 2);
}

/// HA drops the session's link while an `unsubscribe_events` of a forwarded subscription
/// waits for its answer: the subscription died with the link, so the client gets success
/// (not an error for a subscription that is gone), and only its other subscription is made
/// again on the next link.
#[test]
fn an_unsubscribe_cut_off_by_an_upstream_drop_succeeds() {
    let dir = TempDir::new("ws-unsub");
    let (fake, daemon) = live_with(with_api_token(&dir));
    let mut c = Client::authed(&daemon, API_TOKEN);
    for (id, event_type) in [(1, "lovelace_updated"), (2, "edge_test_event")] {
        c.send(json!({"id": id, "type": "subscribe_events", "event_type": event_type}));
        assert_eq!(c.recv_id(id, "result")["success"], true);
    }
    let subscribed = |fake: &FakeHa, event_type: &str| -> Vec<usize> {
        fake.commands()
            .iter()
            .filter(|(_, m)| m["type"] == "subscribe_events" && m["event_type"] == event_type)
            .map(|(n, _)| *n)
            .collect()
    };
    fake.drop_on_next("unsubscribe_events");
    c.send(json!({"id": 3, "type": "unsubscribe_events", "subscription": 1}));
    let answer = c.recv_id(3, "result");
    assert_eq!(
        answer,
        json!({"id": 3, "type": "result", "success": true, "result": null})
    );
    wait_until("the other subscription made again", deadline(), || {
        let made = subscribed(&fake, "edge_test_event");
        if made.len() == 2 {
            Ok(())
        } else {
            Err(format!("{made:?}"))
        }
    });
    c.ping(4);
    assert_eq!(
        subscribed(&fake, "lovelace_updated").len(),
        1,
        "the ended subscription was made again: {:?}",
        fake.commands()
    );
}

/// A service call's result is held until the mirror holds what HA sent before it (a ping on
/// the mirror's link, at most 2 s), so that the call's state changes reach the client first,
/// as they would from HA. The session goes on meanwhile: a `ping` sent while the result is
/// held is answered at once, before the result. Here the mirror's link never gets its pong,
/// so the result waits the whole 2 s.
#[test]
fn a_result_held_for_the_mirror_does_not_stop_the_session() {
    let dir = TempDir::new("ws-held");
    let (fake, daemon) = live_with(with_api_token(&dir));
    let mut c = Client::authed(&daemon, API_TOKEN);
    fake.answer_next_by_hand("call_service");
    c.send(
        json!({"id": 1, "type": "call_service", "domain": "light", "service": "turn_on",
                  "service_data": {"entity_id": "light.kitchen"}}),
    );
    let (link, upstream_id) = wait_until("the call forwarded", deadline(), || {
        let calls: Vec<(usize, u64)> = fake
            .commands()
            .iter()
            .filter(|(_, m)| m["type"] == "call_service")
            .map(|(n, m)| (*n, m["id"].as_u64().unwrap()))
            .collect();
        calls
            .first()
            .copied()
            .ok_or(format!("{:?}", fake.commands()))
    });
    fake.mute_pongs();
    let context = json!({"id": "01JHELDCTX", "parent_id": null, "user_id": null});
    let answered = Instant::now();
    assert!(
        fake.send_to(
            link,
            json!({"id": upstream_id, "type": "result", "success": true,
               "result": {"context": context}})
            .to_string()
        )
    );
    // The result reaches the daemon and is held.
    std::thread::sleep(Duration::from_millis(300));
    c.send(json!({"id": 2, "type": "ping"}));
    let prompt = Duration::from_secs(1) * support::daemon::slowdown();
    let first = c
        .next(prompt)
        .unwrap_or_else(|e| panic!("no answer to the ping within {prompt:?}: {e:?}"));
    assert_eq!(
        first,
        json!({"id": 2, "type": "pong"}),
        "the ping waited behind the held result"
    );
    let result = c.recv();
    assert_eq!(
        result,
        json!({"id": 1, "type": "result", "success": true, "result": {"context": context}})
    );
    assert!(
        answered.elapsed() >= Duration::from_millis(1_500),
        "the result was not held for the mirror: it came {:?} after HA's",
        answered.elapsed()
    );
}

/// A client frame as a browser sends it (masked, RFC 6455 §5.3; the mask is zero, so the
/// payload stands as it is): one text frame of `payload` (under 126 bytes).
fn masked_text_frame(payload: &str, out: &mut Vec<u8>) {
    assert!(payload.len() < 126);
    out.extend_from_slice(&[0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0]);
    out.extend_from_slice(payload.as_bytes());
}

/// A client that sends as fast as it can (pings, whose pongs it reads and drops) slows only
/// itself: while it floods, another session's ping and `/health` are answered promptly. (A
/// red-team finding: the session never let the others run while its client had more to
/// read, so nobody else was served for as long as the flood lasted.)
#[test]
fn a_client_flooding_its_session_does_not_starve_the_others() {
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = TempDir::new("ws-flood");
    let (_fake, daemon) = live_with(with_api_token(&dir));
    let flooder = Client::authed(&daemon, API_TOKEN);
    let mut other = Client::authed(&daemon, API_TOKEN);
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer = flooder.ws.get_ref().try_clone().unwrap();
    let mut reader = flooder.ws.get_ref().try_clone().unwrap();
    reader
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let (stop_r, stop_w) = (stop.clone(), stop.clone());
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut read = 0usize;
        while !stop_r.load(Ordering::Relaxed) {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => read += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        read
    });
    let flood = std::thread::spawn(move || {
        let (mut id, mut sent) = (1000u64, 0u64);
        let mut batch = Vec::new();
        while !stop_w.load(Ordering::Relaxed) {
            batch.clear();
            for _ in 0..500 {
                id += 1;
                masked_text_frame(&format!(r#"{{"id":{id},"type":"ping"}}"#), &mut batch);
            }
            if writer.write_all(&batch).is_err() {
                break;
            }
            sent += 500;
        }
        sent
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut worst = Duration::ZERO;
    for i in 0..5 {
        let asked = Instant::now();
        other.ping(10 + i);
        worst = worst.max(asked.elapsed());
        let asked = Instant::now();
        let (status, _) = daemon.health().expect("/health answered");
        assert_eq!(status, 200);
        worst = worst.max(asked.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().unwrap();
    let read = drain.join().unwrap();
    let bound = Duration::from_secs(2) * support::daemon::slowdown();
    assert!(
        worst < bound,
        "another client waited {worst:?} (bound {bound:?}) while one session was flooded \
         ({sent} pings sent, {read} bytes of answers read)"
    );
    assert!(read > 0, "the flooding client got no answers at all");
}

/// One frame of 10,000 `get_states` (HA's array form): the answers are written as they are
/// made, so a client that does not read holds up its own session, not the daemon's memory;
/// read later, every answer is there, in order. (A red-team finding: every answer was
/// rendered before the first was written — tens of MB for one small frame.)
#[test]
fn a_frame_of_many_commands_is_answered_as_the_client_reads() {
    // Under an emulator (the aarch64 stage) a fifth, for time: order and completeness are
    // checked the same, but only the native count is large enough that rendering every
    // answer first (the old way) breaks the memory bound.
    let commands = 10_000 / u64::from(support::daemon::slowdown());
    let dir = TempDir::new("ws-array");
    let (_fake, daemon) = live_with(with_api_token(&dir));
    let mut c = Client::authed(&daemon, API_TOKEN);
    c.send(json!({"id": 1, "type": "get_states"}));
    let states = c.recv_id(1, "result")["result"].as_array().unwrap().len();
    let frame: Vec<Value> = (2..commands + 2)
        .map(|id| json!({"id": id, "type": "get_states"}))
        .collect();
    let before = daemon.rss_kib();
    c.send(Value::Array(frame));
    // The client reads nothing for a while.
    std::thread::sleep(Duration::from_secs(2));
    let during = daemon.rss_kib();
    let (status, _) = daemon.health().expect("/health answered");
    assert_eq!(status, 200, "another client is served meanwhile");
    for id in 2..commands + 2 {
        let answer = c.recv();
        assert_eq!(answer["id"], id, "answers in order, none lost");
        assert_eq!(answer["success"], true, "{answer}");
        assert_eq!(answer["result"].as_array().map(Vec::len), Some(states));
    }
    let grew = during.saturating_sub(before);
    eprintln!("the daemon grew by {grew} KiB while the answers waited");
    assert!(
        grew < 16 * 1024,
        "the daemon grew by {grew} KiB while the client did not read the answers to one frame"
    );
}

/// A session keeps at most 256 KiB of commands for HA (its forwarded subscriptions, made
/// again on a new link): one more is refused with HA's `home_assistant_error`, counted, and
/// never sent; once a subscription ends, there is room again. (A red-team finding: 1 MiB
/// kept per subscription, up to 1,024 of them per session.)
#[test]
fn a_session_keeps_at_most_256_kib_of_commands() {
    let dir = TempDir::new("ws-kept");
    let (fake, daemon) = live_with(with_api_token(&dir));
    let mut c = Client::authed(&daemon, API_TOKEN);
    let big = |n: u32| format!("edge_big_{n}_{}", "x".repeat(150 * 1024));
    c.send(json!({"id": 1, "type": "subscribe_events", "event_type": big(1)}));
    assert_eq!(c.recv_id(1, "result")["success"], true);
    c.send(json!({"id": 2, "type": "subscribe_events", "event_type": big(2)}));
    let refused = c.recv_id(2, "result");
    assert_eq!(refused["success"], false, "{refused}");
    assert_eq!(
        refused["error"]["code"], "home_assistant_error",
        "{refused}"
    );
    assert_eq!(ws_status(&daemon)["commands_refused"], 1);
    let sent_upstream = |n: u32| {
        fake.commands()
            .iter()
            .any(|(_, m)| m["event_type"].as_str() == Some(big(n).as_str()))
    };
    assert!(!sent_upstream(2), "the refused command went to HA");
    c.send(json!({"id": 3, "type": "unsubscribe_events", "subscription": 1}));
    assert_eq!(c.recv_id(3, "result")["success"], true);
    c.send(json!({"id": 4, "type": "subscribe_events", "event_type": big(4)}));
    assert_eq!(c.recv_id(4, "result")["success"], true, "room again");
    assert!(sent_upstream(4));
}

/// Tokens that are neither hass-edge's nor known go to HA no faster than REST's token checks
/// (a burst of 10, then 2 a second): past the limit a session waits its turn, and no link is
/// opened with a made-up token. (A red-team finding: past the limit each was tried on a link
/// of its own, as fast as they came; HA logs each, and with `ip_ban_enabled` bans the address
/// they come from, hass-edge's.)
#[test]
fn made_up_tokens_reach_ha_no_faster_than_the_token_check_limit() {
    const TOKENS: usize = 16;
    let dir = TempDir::new("ws-tokens");
    let (fake, daemon) = live_with(with_api_token(&dir));
    let refused_ws_auth =
        |fake: &FakeHa| fake.auth_attempts().iter().filter(|a| !a.accepted).count();
    let checks = |fake: &FakeHa| {
        fake.rest_requests()
            .iter()
            .filter(|r| r.path == "/api/" && !r.authorized)
            .count()
    };
    let started = Instant::now();
    let verdicts: Vec<String> = std::thread::scope(|s| {
        let daemon = &daemon;
        let handles: Vec<_> = (0..TOKENS)
            .map(|i| {
                s.spawn(move || {
                    let mut c = Client::open(daemon, &[]).expect("the upgrade is accepted");
                    assert_eq!(c.recv()["type"], "auth_required");
                    c.send(json!({"type": "auth", "access_token": format!("made-up-token-{i}-0123456789")}));
                    match c.next(Duration::from_secs(20)) {
                        Ok(m) => m["type"].as_str().unwrap_or_default().to_owned(),
                        Err(Gone::Closed(_)) => "closed unjudged".to_owned(),
                        Err(Gone::Timeout) => "no answer".to_owned(),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let took = started.elapsed().as_secs_f64();
    assert!(
        verdicts
            .iter()
            .all(|v| v == "auth_invalid" || v == "closed unjudged"),
        "{verdicts:?}"
    );
    assert_eq!(
        refused_ws_auth(&fake),
        0,
        "links opened with made-up tokens ({verdicts:?})"
    );
    let asked = checks(&fake);
    let allowed = 10 + (2.0 * took).ceil() as usize + 1;
    assert!(
        asked <= allowed,
        "{asked} token checks reached HA in {took:.1} s (at most {allowed})"
    );
    assert_eq!(
        verdicts.iter().filter(|v| *v == "auth_invalid").count(),
        asked,
        "each token HA judged got HA's verdict: {verdicts:?}"
    );
}

/// `lovelace_updated` events for a configured dashboard make hass-edge read the dashboards
/// again, but at most once every 3 s: each read opens a link and fetches every state, and
/// anyone who may fire events in HA may fire that one as often as they like. (A red-team
/// finding: 200 events, 143 reads in 2.4 s.)
#[test]
fn a_stream_of_dashboard_updates_is_read_at_most_every_3_s() {
    let dir = TempDir::new("ws-lovelace");
    let (fake, daemon) =
        live_with(with_api_token(&dir).set("dashboards", "url_paths", r#"["lovelace"]"#));
    let sessions = |fake: &FakeHa| fake.sessions().len();
    // The events' subscription on the mirror's link, and the first read of the dashboards.
    let (link, sub) = wait_until("the dashboards' event subscription", deadline(), || {
        fake.commands()
            .iter()
            .find(|(_, m)| {
                m["type"] == "subscribe_events"
                    && m["event_type"]
                        .as_str()
                        .is_none_or(|t| t == "lovelace_updated")
            })
            .map(|(n, m)| (*n, m["id"].as_u64().unwrap()))
            .ok_or(format!("{:?}", fake.commands()))
    });
    wait_until("the first read of the dashboards", deadline(), || {
        if sessions(&fake) >= 2 {
            Ok(())
        } else {
            Err(format!("{} sessions", sessions(&fake)))
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let before = sessions(&fake);
    let sent_at = Instant::now();
    for n in 0..50 {
        let event = json!({"event_type": "lovelace_updated", "data": {"url_path": null, "mode": "storage"},
                           "origin": "LOCAL", "time_fired": "2026-11-22T12:07:28.000000+00:00",
                           "context": {"id": format!("01JCTX{n}"), "parent_id": null, "user_id": null}});
        assert!(fake.send_to(
            link,
            json!({"id": sub, "type": "event", "event": event}).to_string()
        ));
    }
    std::thread::sleep(Duration::from_secs(4).saturating_sub(sent_at.elapsed()));
    let reads = sessions(&fake) - before;
    assert!(
        (1..=2).contains(&reads),
        "50 updates in a burst: {reads} reads of the dashboards within 4 s (the update is \
         read, and at most once more)"
    );
    drop(daemon);
}

/// HA closing its connections (a restart: 2025.4 and later send Close 1000) gets hass-edge's
/// Close at once on every link, the sessions' own links too: HA waits up to 10 s for it
/// before it goes on with its stop (the helper that ran HA 2026.11's frontend through
/// hass-edge saw HA's restarts take 19 s instead of 6 s).
#[test]
fn a_close_from_ha_is_answered_on_every_link() {
    let dir = TempDir::new("ws-close");
    let (fake, daemon) = live_with(with_api_token(&dir));
    let mut c = Client::authed(&daemon, API_TOKEN);
    c.send(json!({"id": 1, "type": "subscribe_events", "event_type": "lovelace_updated"}));
    assert_eq!(c.recv_id(1, "result")["success"], true);
    let open = fake.sessions().iter().filter(|s| s.ended.is_none()).count();
    assert!(open >= 2, "the mirror's link and the session's: {open}");
    let closed_at = Instant::now();
    fake.close_all(1000);
    let ends = wait_until("every link closed", deadline(), || {
        let sessions = fake.sessions();
        let ended: Vec<_> = sessions.iter().filter_map(|s| s.ended.clone()).collect();
        if ended.len() >= open {
            Ok(ended)
        } else {
            Err(format!("{sessions:?}"))
        }
    });
    let prompt = Duration::from_secs(2) * support::daemon::slowdown();
    for (at, how) in &ends {
        assert!(
            at.saturating_duration_since(closed_at) < prompt,
            "a link answered HA's Close only after {:?} ({how:?})",
            at.saturating_duration_since(closed_at)
        );
    }
    drop(daemon);
}

/// An entity HA has made but whose `a` event has not reached the mirror yet, read meanwhile
/// over REST (a read-through): a `subscribe_entities` for it must not show the REST copy in
/// its snapshot, or the subscription's `a` event that follows shows the entity a second time
/// (HA never sends an entity twice). The client sees it appear once.
#[test]
fn a_rest_copy_never_makes_an_entity_appear_twice() {
    let dir = TempDir::new("ws-rest-copy");
    let (fake, daemon) = live_with(with_api_token(&dir));
    let new = fake.new_entity("light.rest_first", "on", json!({}));
    fake.set_entity(new.clone());
    let r = get_authorized(&daemon, "/api/states/light.rest_first");
    assert_eq!(r.status, 200, "the read-through: {}", r.text());
    let mut c = Client::authed(&daemon, API_TOKEN);
    c.send(json!({"id": 1, "type": "subscribe_entities", "entity_ids": ["light.rest_first"]}));
    assert_eq!(c.recv_id(1, "result")["success"], true);
    let mut seen = 0;
    let snapshot = c.recv_id(1, "event");
    seen += usize::from(snapshot["event"]["a"].get("light.rest_first").is_some());
    // HA's `a` for it now (the fake announces an entity as new only if its map lacks it).
    fake.remove_entity("light.rest_first");
    fake.push_change(new);
    // Everything until a quiet second: the entity's `a`, if the snapshot lacked it.
    let quiet = Duration::from_secs(1) * support::daemon::slowdown();
    while let Ok(m) = c.next(quiet) {
        if m["id"] == 1 && m["type"] == "event" {
            seen += usize::from(m["event"]["a"].get("light.rest_first").is_some());
        }
    }
    assert_eq!(seen, 1, "light.rest_first appeared {seen} times");
}

/// A `get_states` and a `subscribe_entities` snapshot far over the 64 KiB the daemon renders
/// at a time come whole (as one message, written as a fragmented one) and equal to the
/// mirror's states; asked in one coalesced frame between two pings, everything comes back in
/// order.
#[test]
fn big_answers_come_whole_and_in_order() {
    let dir = TempDir::new("ws-big");
    let (fake, daemon) = live_with(with_api_token(&dir));
    let filler = "x".repeat(400);
    for i in 0..600 {
        fake.push_change(fake.new_entity(
            &format!("sensor.big_{i:03}"),
            &i.to_string(),
            json!({"friendly_name": format!("Big {i}"), "filler": filler}),
        ));
    }
    let listed = wait_until("the mirror to hold them", deadline(), || {
        let r = get_authorized(&daemon, "/api/states");
        let list: Value = serde_json::from_str(&r.text()).map_err(|e| e.to_string())?;
        let n = list.as_array().map_or(0, Vec::len);
        if list
            .as_array()
            .is_some_and(|l| l.iter().any(|s| s["entity_id"] == "sensor.big_599"))
        {
            Ok(list)
        } else {
            Err(format!("{n} states"))
        }
    });
    let mut c = Client::authed(&daemon, API_TOKEN);
    c.send(json!({"id": 1, "type": "supported_features", "features": {"coalesce_messages": 1}}));
    assert_eq!(c.recv_id(1, "result")["success"], true);
    c.send_text(
        json!([
            {"id": 2, "type": "ping"},
            {"id": 3, "type": "get_states"},
            {"id": 4, "type": "subscribe_entities"},
            {"id": 5, "type": "ping"},
        ])
        .to_string(),
    );
    let got: Vec<Value> = (0..5).map(|_| c.recv()).collect();
    let kinds: Vec<(u64, &str)> = got
        .iter()
        .map(|m| (m["id"].as_u64().unwrap(), m["type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            (2, "pong"),
            (3, "result"),
            (4, "result"),
            (4, "event"),
            (5, "pong")
        ]
    );
    let states = got[1]["result"].as_array().unwrap();
    assert!(
        got[1].to_string().len() > 4 * 64 * 1024,
        "big enough to need pieces"
    );
    assert_eq!(
        &got[1]["result"], &listed,
        "get_states is the mirror's list"
    );
    let snapshot = got[3]["event"]["a"].as_object().unwrap();
    assert_eq!(snapshot.len(), states.len());
    assert_eq!(snapshot["sensor.big_599"]["a"]["filler"], filler.as_str());
    // A large answer from HA to a forwarded command (a `get_states` with a field the mirror
    // does not answer; the fake answers it whatever its fields) comes whole, under the
    // client's id.
    c.send(json!({"id": 6, "type": "get_states", "edge_test": true}));
    let forwarded = c.recv_id(6, "result");
    assert!(
        fake.commands()
            .iter()
            .any(|(_, m)| m["type"] == "get_states" && m["edge_test"] == true),
        "forwarded"
    );
    let from_ha = forwarded["result"].as_array().expect("HA's list");
    assert_eq!(from_ha.len(), fake.entities().len());
    assert!(forwarded.to_string().len() > 4 * 64 * 1024);
    assert!(from_ha.iter().any(
        |s| s["entity_id"] == "sensor.big_599" && s["attributes"]["filler"] == filler.as_str()
    ));
    c.ping(7);
}

/// HA comes back with 600 entities changed (0.5 KB each): the resync's diffs, far more than
/// the 256 KiB a session holds rendered, reach a subscribed client whole — every entity's
/// new state exactly once — while the session writes them in parts.
#[test]
fn a_large_resync_reaches_the_client_whole() {
    let dir = TempDir::new("ws-resync");
    let (fake, daemon) = live_with(with_api_token(&dir));
    let ids: Vec<String> = (0..600).map(|i| format!("sensor.many_{i:03}")).collect();
    for id in &ids {
        let filler = "x".repeat(400);
        fake.push_change(fake.new_entity(id, "old", json!({"filler": filler})));
    }
    wait_until("the mirror to hold them", deadline(), || {
        let r = get_authorized(&daemon, "/api/states");
        if r.text().contains(r#""entity_id":"sensor.many_599""#) {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    let mut c = Client::authed(&daemon, API_TOKEN);
    c.send(json!({"id": 1, "type": "subscribe_entities"}));
    assert_eq!(c.recv_id(1, "result")["success"], true);
    let snapshot = c.recv_id(1, "event");
    assert_eq!(snapshot["event"]["a"]["sensor.many_599"]["s"], "old");
    // While the link is down, every one of them changes, attributes included.
    for id in &ids {
        let new = fake.next_state(id, |s| {
            s["state"] = "new".into();
            s["attributes"]["filler"] = "y".repeat(400).into();
        });
        fake.set_entity(new);
    }
    fake.restart_like_ha();
    let mut seen = std::collections::HashMap::new();
    while seen.len() < ids.len() {
        let m = c
            .next(deadline())
            .unwrap_or_else(|e| panic!("{} of {} new states, then {e:?}", seen.len(), ids.len()));
        if m["id"] == 1 && m["type"] == "event" {
            for (id, diff) in m["event"]["c"].as_object().into_iter().flatten() {
                if diff["+"]["s"] == "new" {
                    assert_eq!(diff["+"]["a"]["filler"], "y".repeat(400).as_str(), "{id}");
                    *seen.entry(id.clone()).or_insert(0) += 1;
                }
            }
        }
    }
    c.ping(2);
    assert!(seen.values().all(|&n| n == 1), "a change came twice");
}

/// An unknown command (forwarded, no subscription) when HA drops.
#[test]
fn upstream_drop_mid_forward_answers_the_waiting_command() {
    upstream_drop_mid_forward(
        "fake/never_answered",
        json!({"type": "fake/never_answered", "x": 1}),
    );
}

/// `render_template` (forwarded, opens a subscription) when HA drops before its result.
/// (Failed at 1233078: the client got nothing for it, and HA's result on the next link was
/// swallowed as a renewal's.)
#[test]
fn upstream_drop_mid_forward_answers_a_waiting_subscription() {
    upstream_drop_mid_forward(
        "render_template",
        json!({"type": "render_template", "template": "{{ states('light.kitchen') }}"}),
    );
}

/// The `Origin` rule: a foreign page is refused 403 before the upgrade; a listed origin
/// and hass-edge's own are upgraded.
#[test]
fn a_foreign_origin_is_refused_before_the_upgrade() {
    let (_fake, daemon) = live_with(DaemonOptions::default().set(
        "http",
        "cors_origins",
        r#"["http://kiosk.local:8080"]"#,
    ));
    let r = upgrade_raw(&daemon, &["Origin: http://evil.example"]);
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.header("Sec-WebSocket-Accept").is_none(), "{r:?}");
    assert!(matches!(
        Client::open(&daemon, &["Origin: http://evil.example"]),
        Err(403)
    ));
    let own = format!("Origin: http://{}", daemon.addr);
    for origin in ["Origin: http://kiosk.local:8080", own.as_str()] {
        let mut c =
            Client::open(&daemon, &[origin]).unwrap_or_else(|status| panic!("{origin}: {status}"));
        assert_eq!(c.recv()["type"], "auth_required", "{origin}");
    }
    let status = daemon.get("/status").json();
    assert_eq!(status["websocket_api"]["sessions_total"], 2, "{status}");
}

/// With an API token: the API token gets `auth_ok` without asking HA anything; any other
/// token is HA's to judge (its verdict as the local routes keep it, one `GET /api/` with
/// that token), and HA's refusal is the client's `auth_invalid` (counted); a token HA
/// accepts gets `auth_ok`, and the session's forwarded commands go on a link of its own,
/// authenticated with that token.
#[test]
fn tokens_are_judged_by_hass_edge_or_by_ha() {
    let dir = TempDir::new("ws-auth");
    let (fake, daemon) = live_with(with_api_token(&dir));
    let asked = |fake: &FakeHa| {
        fake.rest_requests()
            .iter()
            .filter(|r| r.path == "/api/")
            .map(|r| (r.authorized, r.status))
            .collect::<Vec<_>>()
    };
    let sessions = fake.sessions().len();
    let attempts = fake.auth_attempts().len();
    let mut ours = Client::authed(&daemon, API_TOKEN);
    ours.ping(1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        fake.sessions().len(),
        sessions,
        "no WebSocket to HA for the API token"
    );
    assert_eq!(fake.auth_attempts().len(), attempts);
    assert_eq!(asked(&fake), vec![], "HA was not asked about the API token");

    let (mut refused, verdict) = Client::auth(&daemon, "not-a-token-ha-knows");
    assert_eq!(
        verdict,
        json!({"type": "auth_invalid", "message": INVALID_TOKEN})
    );
    let _ = refused.closed();
    assert_eq!(
        asked(&fake),
        vec![(false, 401)],
        "HA judged the other token"
    );
    assert_eq!(ws_status(&daemon)["auth_failures"], 1);
    // The API token never reached HA, in any form.
    for r in fake.rest_requests() {
        assert!(
            !r.headers.iter().any(|(_, v)| v.contains(API_TOKEN)),
            "{r:?}"
        );
    }

    // A token HA accepts (a user's, not hass-edge's): HA's verdict; the session's commands
    // go on a link of its own, authenticated with that token.
    let user_token = "ha-user-token.9c1d-access-token";
    let index = fake.accept_token(user_token);
    let mut user = Client::authed(&daemon, user_token);
    assert_eq!(asked(&fake), vec![(false, 401), (true, 200)]);
    user.send(json!({"id": 1, "type": "fake/forwarded"}));
    let answer = user.recv();
    assert_eq!(
        answer["error"]["code"], "unknown_command",
        "HA's answer: {answer}"
    );
    let all = fake.sessions();
    assert_eq!(all.len(), sessions + 1, "one link, for the user's session");
    let link = all.last().unwrap();
    assert!(link.authenticated);
    let last = fake.auth_attempts().last().unwrap().clone();
    assert_eq!(
        last.token_index,
        Some(index),
        "the link used the user's token"
    );
    assert!(
        fake.commands()
            .iter()
            .any(|(n, m)| *n == link.number && m["type"] == "fake/forwarded"),
        "{:?}",
        fake.commands()
    );
    assert_eq!(ws_status(&daemon)["auth_failures"], 1);
}

/// `http.websocket_coalesce_ms` for a client that announced `coalesce_messages` (as HA's
/// frontend does): a change after a quiet spell comes at once, in a frame of its own; the
/// changes that follow it within the tick come together, in one array frame (HA's coalesced
/// shape), in order. A client that did not announce it gets one frame per change.
#[test]
fn a_coalescing_client_gets_the_changes_of_a_tick_in_one_frame() {
    let dir = TempDir::new("ws-tick");
    // The longest tick: the 5 quick changes below cannot straddle more than one tick edge.
    let options = with_api_token(&dir).set("http", "websocket_coalesce_ms", 1000);
    let (fake, daemon) = live_with(options);
    fake.push_change(fake.new_entity("sensor.tick", "0", json!({})));
    // The list is the mirror's (`/api/states/sensor.tick` could be a REST read-through
    // answered before the subscription's event for it).
    wait_until("the mirror to hold sensor.tick", deadline(), || {
        let r = get_authorized(&daemon, "/api/states");
        if r.status == 200 && r.text().contains(r#""entity_id":"sensor.tick""#) {
            Ok(())
        } else {
            Err(r.status.to_string())
        }
    });
    let subscribe = |coalesce: bool| {
        let mut c = Client::authed(&daemon, API_TOKEN);
        if coalesce {
            c.send(json!({"id": 1, "type": "supported_features", "features": {"coalesce_messages": 1}}));
            assert_eq!(c.recv_id(1, "result")["success"], true);
        }
        c.send(json!({"id": 2, "type": "subscribe_entities", "entity_ids": ["sensor.tick"]}));
        assert_eq!(c.recv_id(2, "result")["success"], true);
        assert_eq!(c.recv_id(2, "event")["event"]["a"]["sensor.tick"]["s"], "0");
        c
    };
    let mut coalescing = subscribe(true);
    let mut plain = subscribe(false);
    // The frames a client reads until it has seen state `last`: for each, its states.
    let frames_until = |c: &mut Client, last: &str| -> Vec<Vec<String>> {
        let end = Instant::now() + deadline();
        let mut frames = Vec::new();
        loop {
            assert!(Instant::now() < end, "no state {last} in {frames:?}");
            let text = match c.ws.read() {
                Ok(Message::Text(text)) => text,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => panic!("read: {e}"),
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            let messages = match v {
                Value::Array(list) => list,
                one => vec![one],
            };
            let states: Vec<String> = messages
                .iter()
                .map(|m| {
                    assert_eq!((&m["id"], &m["type"]), (&json!(2), &json!("event")), "{m}");
                    // A diff, or whole again (`a`) if the link was made again meanwhile.
                    let e = &m["event"];
                    e["c"]["sensor.tick"]["+"]["s"]
                        .as_str()
                        .or(e["a"]["sensor.tick"]["s"].as_str())
                        .unwrap_or_else(|| panic!("a state of sensor.tick: {m}"))
                        .to_owned()
                })
                .collect();
            let done = states.iter().any(|s| s == last);
            frames.push(states);
            if done {
                return frames;
            }
        }
    };
    let set = |i: u32| {
        let new = fake.next_state("sensor.tick", |s| s["state"] = i.to_string().into());
        fake.push_change(new);
    };
    set(1);
    assert_eq!(
        frames_until(&mut coalescing, "1"),
        [["1"]],
        "the first change at once"
    );
    for i in 2..=6 {
        set(i);
    }
    let frames = frames_until(&mut coalescing, "6");
    let states: Vec<String> = frames.concat();
    assert_eq!(
        states,
        ["2", "3", "4", "5", "6"],
        "every change once, in order"
    );
    assert!(
        frames.len() <= 2 && frames.iter().any(|f| f.len() >= 2),
        "the changes of a tick share a frame: {frames:?}"
    );
    let plain_frames = frames_until(&mut plain, "6");
    assert!(
        plain_frames.iter().all(|f| f.len() == 1),
        "one frame per change without coalesce_messages: {plain_frames:?}"
    );
    assert_eq!(plain_frames.concat(), ["1", "2", "3", "4", "5", "6"]);
}
