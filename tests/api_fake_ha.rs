//! The local API beyond plain reads, against the real daemon binary and the fake HA: the
//! push stream (selection, snapshot, removals, resync after a reconnect, a client that never
//! reads, the client cap), REST single-flight, the API token, CORS, `allow_service_calls`,
//! `/status`, and the config rule for non-loopback listeners.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::daemon::{DaemonOptions, TempDir, command, run_to_exit};
use support::{Daemon, FakeHa, deadline, wait_until};

fn live_with(options: DaemonOptions) -> (FakeHa, Daemon) {
    let fake = FakeHa::start("2025.4.4");
    let daemon = Daemon::start_with(&fake, options);
    daemon.wait_live();
    (fake, daemon)
}

fn metric(daemon: &Daemon, name: &str) -> f64 {
    let text = daemon.get("/metrics").text();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An SSE client reading `data:` lines.
struct Stream(BufReader<TcpStream>);

impl Stream {
    fn open(daemon: &Daemon, query: &str, headers: &str) -> (u16, Stream) {
        let mut s = TcpStream::connect(daemon.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        write!(
            s,
            "GET /api/stream{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n"
        )
        .unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        let end = Instant::now() + deadline();
        while line.is_empty() && Instant::now() < end {
            let _ = r.read_line(&mut line);
        }
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, Stream(r))
    }

    /// The next `state_changed` payload, or `None` after `wait` without one.
    fn next(&mut self, wait: Duration) -> Option<Value> {
        let end = Instant::now() + wait;
        let mut line = String::new();
        while Instant::now() < end {
            line.clear();
            match self.0.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) => {
                    // HA's format: `data: ping`, and events in HA's envelope.
                    if let Some(data) = line.strip_prefix("data: ").filter(|d| d.trim() != "ping") {
                        let event: Value = serde_json::from_str(data.trim()).unwrap();
                        assert_eq!(event["event_type"], "state_changed", "{event}");
                        return Some(event["data"].clone());
                    }
                }
                Err(_) => {}
            }
        }
        None
    }
}

fn toggled(fake: &FakeHa, entity_id: &str) -> Value {
    fake.next_state(entity_id, |s| {
        s["state"] = if s["state"] == "on" {
            "off".into()
        } else {
            "on".into()
        }
    })
}

#[test]
fn stream_selects_snapshots_and_reports_removals() {
    let (fake, daemon) = live_with(DaemonOptions::default());
    let (status, mut stream) = Stream::open(
        &daemon,
        "?entity_id=light.,input_boolean.kitchen&snapshot=true",
        "",
    );
    assert_eq!(status, 200);
    // The snapshot: every matching tracked state, as a creation (old_state null).
    let mut snapshot = Vec::new();
    while let Some(ev) = stream.next(Duration::from_millis(500)) {
        assert!(ev["old_state"].is_null());
        snapshot.push(ev["entity_id"].as_str().unwrap().to_owned());
    }
    snapshot.sort();
    assert_eq!(snapshot, ["input_boolean.kitchen", "light.kitchen"]);
    // Live changes, narrowed to the selection.
    let old = fake.entity("input_boolean.kitchen").unwrap();
    fake.push_change(toggled(&fake, "sensor.living_temperature"));
    let new = toggled(&fake, "input_boolean.kitchen");
    fake.push_change(new.clone());
    let ev = stream.next(deadline()).expect("an event");
    assert_eq!(
        ev["entity_id"], "input_boolean.kitchen",
        "sensor.* was not selected"
    );
    assert_eq!(ev["old_state"], old);
    assert_eq!(ev["new_state"], new);
    fake.push_remove("light.kitchen");
    let ev = stream.next(deadline()).expect("a removal");
    assert_eq!(ev["entity_id"], "light.kitchen");
    assert!(ev["new_state"].is_null());
}

#[test]
fn stream_reports_what_a_resync_revealed() {
    let (fake, daemon) = live_with(DaemonOptions::default());
    let (_, mut stream) = Stream::open(&daemon, "?entity_id=input_boolean.", "");
    fake.set_refusing(true);
    fake.drop_all();
    daemon.wait_health(503);
    // While we are away: one entity changes, one is deleted.
    let changed = toggled(&fake, "input_boolean.kitchen");
    fake.set_entity(changed.clone());
    fake.remove_entity("input_boolean.garage_open");
    fake.set_refusing(false);
    daemon.wait_live();
    let mut seen = std::collections::BTreeMap::new();
    while let Some(ev) = stream.next(Duration::from_secs(2)) {
        seen.insert(
            ev["entity_id"].as_str().unwrap().to_owned(),
            ev["new_state"].clone(),
        );
    }
    assert_eq!(
        seen.get("input_boolean.kitchen"),
        Some(&changed),
        "{seen:?}"
    );
    assert_eq!(
        seen.get("input_boolean.garage_open"),
        Some(&Value::Null),
        "{seen:?}"
    );
}

#[test]
fn a_stream_client_that_never_reads_is_dropped_not_buffered() {
    let (fake, daemon) = live_with(DaemonOptions::default());
    // Connects, asks for everything, and never reads a byte.
    let mut idle = TcpStream::connect(daemon.addr).unwrap();
    idle.write_all(b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    wait_until("the stream client is registered", deadline(), || {
        if metric(&daemon, "hass_edge_sse_clients") == 1.0 {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    });
    let rss_before = daemon.rss_kib();
    // Large attributes fill the socket buffers quickly; then the client falls behind, and
    // once its oldest change has waited longer than the broadcast allows it is dropped.
    let big = "x".repeat(4000);
    let start = Instant::now();
    for i in 0.. {
        let new = fake.next_state("sensor.living_temperature", |s| {
            s["state"] = i.to_string().into();
            s["attributes"]["padding"] = big.clone().into();
        });
        fake.push_change(new);
        if metric(&daemon, "hass_edge_sse_clients_dropped_total") >= 1.0
            || start.elapsed() > hass_edge::broadcast::MAX_BEHIND + deadline()
        {
            break;
        }
        if i >= 2000 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    wait_until(
        "the slow client is disconnected and counted",
        deadline(),
        || {
            let dropped = metric(&daemon, "hass_edge_sse_clients_dropped_total");
            let clients = metric(&daemon, "hass_edge_sse_clients");
            if dropped >= 1.0 && clients == 0.0 {
                Ok(())
            } else {
                Err(format!("dropped {dropped}, clients {clients}"))
            }
        },
    );
    let rss_after = daemon.rss_kib();
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert_eq!(
        daemon.health().unwrap().0,
        200,
        "everyone else is unaffected"
    );
    assert_eq!(
        fake.sessions().len(),
        1,
        "the subscription was never disturbed"
    );
}

#[test]
fn stream_clients_are_capped() {
    let (_fake, daemon) = live_with(DaemonOptions::default());
    let streams: Vec<Stream> = (0..hass_edge::broadcast::MAX_CLIENTS)
        .map(|_| {
            let (status, s) = Stream::open(&daemon, "", "");
            assert_eq!(status, 200);
            s
        })
        .collect();
    let (status, _) = Stream::open(&daemon, "", "");
    assert_eq!(status, 503);
    drop(streams);
    wait_until("a slot frees up", deadline(), || {
        match Stream::open(&daemon, "", "").0 {
            200 => Ok(()),
            s => Err(s.to_string()),
        }
    });
}

#[test]
fn concurrent_misses_share_one_ha_request() {
    let (fake, daemon) = live_with(DaemonOptions::default());
    fake.set_rest_delay(Duration::from_millis(500));
    let id = fake
        .entities()
        .into_iter()
        .map(|s| s["entity_id"].as_str().unwrap().to_owned())
        .find(|id| id.starts_with("automation."))
        .unwrap();
    let threads: Vec<_> = (0..10)
        .map(|_| {
            let addr = daemon.addr;
            let path = format!("/api/states/{id}");
            std::thread::spawn(move || support::http_client::fetch(addr, "GET", &path).unwrap())
        })
        .collect();
    for t in threads {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json(), fake.entity(&id).unwrap());
    }
    assert_eq!(
        fake.rest_reads_of(&id),
        1,
        "ten concurrent misses, one HA request"
    );
}

fn with_api_token() -> (TempDir, String, DaemonOptions) {
    let dir = TempDir::new("api-token");
    let token = "kiosk-token-0123456789abcdef".to_string();
    let path = dir.write("api-token", &format!("{token}\n"));
    let options = DaemonOptions::default()
        .set("http", "api_token_file", format!("\"{}\"", path.display()))
        .set("http", "cors_origins", "[\"http://kiosk.local:8080\"]")
        .set("http", "allow_service_calls", "false");
    (dir, token, options)
}

#[test]
fn api_token_guards_everything_but_health() {
    let (_dir, token, options) = with_api_token();
    let (_fake, daemon) = live_with(options);
    for path in [
        "/api/states",
        "/api/states/light.kitchen",
        "/status",
        "/metrics",
        "/api/services",
    ] {
        let r = daemon.get(path);
        assert_eq!(r.status, 401, "{path} without a token");
        assert_eq!(r.header("WWW-Authenticate"), Some("Bearer"));
        assert!(r.json()["message"].is_string());
    }
    assert_eq!(daemon.get("/health").status, 200, "/health stays open");
    let mut conn = daemon.connect();
    let ok = conn
        .request(
            "GET",
            "/api/states/light.kitchen",
            &[&format!("Authorization: Bearer {token}")],
        )
        .unwrap();
    assert_eq!(ok.status, 200);
    let wrong = conn
        .request(
            "GET",
            "/api/states/light.kitchen",
            &["Authorization: Bearer kiosk-token-0123456789abcdeX"],
        )
        .unwrap();
    assert_eq!(wrong.status, 401);
    // EventSource cannot send headers: the stream also takes ?access_token=.
    assert_eq!(Stream::open(&daemon, "", "").0, 401);
    assert_eq!(
        Stream::open(&daemon, &format!("?access_token={token}"), "").0,
        200
    );
    // …but only the stream does.
    assert_eq!(
        daemon
            .get(&format!("/api/states/light.kitchen?access_token={token}"))
            .status,
        401
    );
    let status = conn
        .request(
            "GET",
            "/status",
            &[&format!("Authorization: Bearer {token}")],
        )
        .unwrap()
        .json();
    assert!(
        !status.to_string().contains(&token),
        "the API token is not echoed"
    );
    assert!(
        !status.to_string().contains(support::fake_ha::TOKEN),
        "nor the HA token"
    );
}

#[test]
fn cors_only_for_configured_origins_and_service_calls_can_be_disabled() {
    let (_dir, token, options) = with_api_token();
    let (_fake, daemon) = live_with(options);
    let mut conn = daemon.connect();
    let pre = conn
        .request(
            "OPTIONS",
            "/api/states/light.kitchen",
            &[
                "Origin: http://kiosk.local:8080",
                "Access-Control-Request-Method: GET",
                "Access-Control-Request-Headers: authorization",
            ],
        )
        .unwrap();
    assert_eq!(pre.status, 204, "a preflight needs no token");
    assert_eq!(
        pre.header("Access-Control-Allow-Origin"),
        Some("http://kiosk.local:8080")
    );
    assert!(
        pre.header("Access-Control-Allow-Headers")
            .unwrap()
            .contains("Authorization")
    );
    let bad = conn
        .request(
            "OPTIONS",
            "/api/states/light.kitchen",
            &[
                "Origin: http://evil.example",
                "Access-Control-Request-Method: GET",
            ],
        )
        .unwrap();
    assert_eq!(bad.status, 403);
    assert_eq!(bad.header("Access-Control-Allow-Origin"), None);
    let auth = format!("Authorization: Bearer {token}");
    let get = conn
        .request(
            "GET",
            "/api/states/light.kitchen",
            &[&auth, "Origin: http://kiosk.local:8080"],
        )
        .unwrap();
    assert_eq!(
        get.header("Access-Control-Allow-Origin"),
        Some("http://kiosk.local:8080")
    );
    assert!(
        get.header("Access-Control-Expose-Headers")
            .unwrap()
            .contains("X-Cache")
    );
    let other = conn
        .request(
            "GET",
            "/api/states/light.kitchen",
            &[&auth, "Origin: http://evil.example"],
        )
        .unwrap();
    assert_eq!(other.header("Access-Control-Allow-Origin"), None);
    assert_eq!(other.status, 403, "a foreign origin is refused");
    let mut raw = daemon.connect();
    raw.send(format!("POST /api/services/input_boolean/toggle HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}").as_bytes()).unwrap();
    let r = raw.read_response(false).unwrap();
    assert_eq!(r.status, 403, "allow_service_calls = false");
}

#[test]
fn status_reports_link_filters_cache_and_counters() {
    let (_fake, daemon) = live_with(DaemonOptions::default());
    daemon.get("/api/states/light.kitchen");
    let s = daemon.get("/status").json();
    assert_eq!(s["connection"]["state"], "live");
    assert_eq!(s["home_assistant"]["version"], "2025.4.4");
    assert!(
        s["home_assistant"]["url"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:")
    );
    assert_eq!(
        s["filter"]["exclude_domains"],
        json!(["media_player", "camera", "automation"])
    );
    assert_eq!(s["cache"]["mode"], "update");
    assert_eq!(s["cache"]["ttl_seconds"], 30);
    assert!(s["store"]["tracked"].as_u64().unwrap() > 10);
    assert!(s["store"]["hits"].as_u64().unwrap() >= 1);
    assert_eq!(s["ha_rest_requests"]["total"], 0);
    assert_eq!(
        s["connection"]["ha_side_filter"], true,
        "2025.4.4 gets the filter"
    );
    assert!(!s.to_string().contains(support::fake_ha::TOKEN));
}

#[test]
fn non_loopback_listen_without_api_token_is_refused() {
    let dir = TempDir::new("listen");
    let config = dir.write(
        "config.toml",
        "[http]\nlisten = \"0.0.0.0:18999\"\n[dbus]\nbus = \"none\"\n",
    );
    let finished = run_to_exit(
        command(&["--config", config.to_str().unwrap()]),
        &dir,
        Duration::from_secs(20),
    );
    assert_eq!(finished.status.code(), Some(78));
    assert!(
        finished.stderr.contains("http.api_token_file"),
        "{}",
        finished.stderr
    );
}

/// A compressed state (HA `websocket_api/messages.py` `_state_diff_event`, key `a`).
fn compressed(state: &str) -> Value {
    json!({"s": state, "a": {"friendly_name": "burst"}, "c": "01HBURST0000000000000000000", "lc": 1_700_000_000.0})
}

/// Issue 13, item 2: one HA event carrying 300 changes (more than the old 256-slot queue)
/// reaches every stream client whole, and nobody is disconnected.
#[test]
fn a_burst_of_300_changes_reaches_every_stream_client() {
    let (fake, daemon) = live_with(DaemonOptions::default());
    let (_, mut all) = Stream::open(&daemon, "", "");
    let (_, mut lights) = Stream::open(&daemon, "?entity_id=light.burst_*", "");
    let added: serde_json::Map<String, Value> = (0..300)
        .map(|i| (format!("light.burst_{i}"), compressed("on")))
        .collect();
    assert_eq!(fake.push_event(json!({"a": added})), 1);
    for (name, stream) in [("all", &mut all), ("lights", &mut lights)] {
        let mut got = Vec::new();
        while got.len() < 300 {
            match stream.next(deadline()) {
                Some(ev) => got.push(ev["entity_id"].as_str().unwrap().to_owned()),
                None => break,
            }
        }
        assert_eq!(got.len(), 300, "{name}: every change of the burst");
        assert_eq!(got[299], "light.burst_299");
    }
    assert_eq!(metric(&daemon, "hass_edge_sse_clients_dropped_total"), 0.0);
    assert_eq!(metric(&daemon, "hass_edge_sse_clients"), 2.0);
}

/// Issue 13, item 3: reads of made-up (valid) ids never evict tracked states, are limited
/// towards HA, and leave the mirror whole and live.
#[test]
fn reads_of_made_up_ids_cannot_wipe_the_mirror() {
    let (fake, daemon) = live_with(DaemonOptions::default().set("cache", "max_entities", 50));
    let before = daemon.get("/api/states").json();
    let tracked = before.as_array().unwrap().len();
    assert!(tracked > 5, "the fixture tracks several entities");
    let mut conn = daemon.connect();
    let (mut limited, mut not_found) = (0, 0);
    for i in 0..2000 {
        let r = conn
            .request("GET", &format!("/api/states/light.made_up_{i}"), &[])
            .unwrap();
        match r.status {
            404 => not_found += 1,
            429 => limited += 1,
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    eprintln!("2,000 reads of made-up ids: {not_found} asked HA (404), {limited} limited (429)");
    assert!(
        limited > 1500,
        "the read-through budget held: {limited} limited"
    );
    assert!(
        fake.rest_requests().len() < 200,
        "HA received {} REST calls",
        fake.rest_requests().len()
    );
    assert_eq!(
        daemon.get("/api/states").json(),
        before,
        "every tracked state is still there"
    );
    assert_eq!(daemon.health().unwrap().0, 200);
    let s = daemon.get("/status").json();
    assert_eq!(s["store"]["tracked_evictions"], 0);
    assert!(s["ha_rest_requests"]["reads_limited"].as_u64().unwrap() >= limited);
    // HA's next change still reaches a stream client.
    let (_, mut stream) = Stream::open(&daemon, "?entity_id=input_boolean.kitchen", "");
    let new = toggled(&fake, "input_boolean.kitchen");
    fake.push_change(new.clone());
    let ev = stream.next(deadline()).expect("the change is streamed");
    assert_eq!(ev["new_state"], new);
}

/// Issue 13, item 6: a page on another origin cannot call a service, whatever it sends.
#[test]
fn cross_site_requests_cannot_call_services() {
    let (fake, daemon) = live_with(DaemonOptions::default());
    let before = fake.entity("input_boolean.kitchen").unwrap();
    let body = r#"{"entity_id":"input_boolean.kitchen"}"#;
    let post = |headers: &str| {
        let mut c = daemon.connect();
        c.send(format!("POST /api/services/input_boolean/toggle HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Content-Length: {}\r\n\r\n{body}", body.len()).as_bytes()).unwrap();
        c.read_response(false).unwrap()
    };
    // A form or a `no-cors` fetch: text/plain from a foreign origin.
    let r = post("Origin: http://evil.example\r\nContent-Type: text/plain\r\n");
    assert_eq!(r.status, 403, "{}", r.text());
    // Even with a JSON content type (a preflight would have been refused).
    let r = post("Origin: http://evil.example\r\nContent-Type: application/json\r\n");
    assert_eq!(r.status, 403, "{}", r.text());
    // No origin (not a browser) but not JSON either.
    let r = post("Content-Type: text/plain\r\n");
    assert_eq!(r.status, 415, "{}", r.text());
    assert_eq!(
        fake.entity("input_boolean.kitchen").unwrap(),
        before,
        "no service ran"
    );
    assert!(
        fake.rest_requests()
            .iter()
            .all(|r| !r.path.contains("/api/services/"))
    );
    // The same call as a client means it (JSON, no foreign origin) reaches HA.
    post("Content-Type: application/json\r\n");
    assert!(
        fake.rest_requests()
            .iter()
            .any(|r| r.method == "POST" && r.path == "/api/services/input_boolean/toggle"),
        "the call went to HA"
    );
}
