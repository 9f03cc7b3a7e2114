//! End to end against a REAL Home Assistant on 127.0.0.1, started by `tests/ha-peer/ha-peer.sh`
//! (`scripts/test.sh` does it for 2024.3.3 and 2025.4.4 and passes `HA_PEER_DIR`). Built only
//! with `--features e2e`; run with `--test-threads=1` (tests restart and stop the peer).
//!
//! Each test starts the real daemon binary against the peer and checks what a user sees:
//! states equal to HA's, changes visible at once, filters, resync after an HA restart,
//! auth failures without a retry storm, service calls and the push stream, the services
//! cache, Prometheus metrics, D-Bus on a private bus, sd_notify, reload.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

// ---------------------------------------------------------------- the HA peer

struct Peer {
    dir: PathBuf,
    script: PathBuf,
    url: String,
    token: String,
    version: String,
}

fn peer() -> Peer {
    let dir = PathBuf::from(
        std::env::var("HA_PEER_DIR")
            .expect("HA_PEER_DIR must name a running ha-peer dir (run scripts/test.sh)"),
    );
    let script = std::env::var("HA_PEER_SCRIPT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ha-peer/ha-peer.sh")
        });
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .unwrap_or_else(|e| panic!("{}/{f}: {e}", dir.display()))
            .trim()
            .to_owned()
    };
    let p = Peer {
        url: read("url"),
        token: read("token"),
        version: read("version"),
        dir,
        script,
    };
    p.run(&["wait-running"]);
    p
}

impl Peer {
    fn run(&self, args: &[&str]) {
        let (cmd, rest) = args.split_first().unwrap();
        let mut all = vec![*cmd, self.dir.to_str().unwrap()];
        all.extend_from_slice(rest);
        let status = Command::new("bash")
            .arg(&self.script)
            .args(&all)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "ha-peer.sh {all:?} failed");
    }

    fn start(&self) {
        let port = self.url.rsplit(':').next().unwrap().to_owned();
        let status = Command::new("bash")
            .arg(&self.script)
            .args(["start", &self.version, self.dir.to_str().unwrap(), &port])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "ha-peer.sh start failed");
    }

    fn get(&self, path: &str) -> (u16, Value) {
        http(
            "GET",
            &format!("{}{path}", self.url),
            Some(&self.token),
            None,
        )
        .into_json()
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        http(
            "POST",
            &format!("{}{path}", self.url),
            Some(&self.token),
            Some(body.to_string()),
        )
        .into_json()
    }

    fn states(&self) -> BTreeMap<String, Value> {
        let (status, list) = self.get("/api/states");
        assert_eq!(status, 200);
        list.as_array()
            .unwrap()
            .iter()
            .map(|s| (s["entity_id"].as_str().unwrap().to_owned(), s.clone()))
            .collect()
    }
}

// ---------------------------------------------------------------- HTTP

struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Answer {
    fn into_json(self) -> (u16, Value) {
        let v = serde_json::from_str(&self.body).unwrap_or(Value::String(self.body));
        (self.status, v)
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent()
}

fn http(method: &str, url: &str, token: Option<&str>, body: Option<String>) -> Answer {
    let agent = agent();
    let auth = token.map(|t| format!("Bearer {t}"));
    let result = match (method, body) {
        ("GET", _) => {
            let mut r = agent.get(url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        (_, body) => {
            let mut r = agent.post(url).content_type("application/json");
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.send(body.unwrap_or_default())
        }
    };
    let mut response = result.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                v.to_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    Answer {
        status,
        headers,
        body,
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(what: &str, deadline: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {deadline:?} waiting for: {what}");
}

// ---------------------------------------------------------------- the daemon

struct Daemon {
    child: Option<Child>,
    base: String,
    log: PathBuf,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "hass-edge-e2e-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct Options<'a> {
    /// `ha.url` instead of the peer's.
    url: Option<String>,
    /// `ha.ca_file`.
    ca_file: Option<&'a Path>,
    extra: &'a str,
    token: Option<&'a str>,
    env: Vec<(&'a str, String)>,
    /// A command that sets up and then `exec`s the daemon (its arguments follow), so that
    /// the child's pid is the daemon's.
    wrapper: Vec<String>,
}

impl Daemon {
    fn start(peer: &Peer, opts: Options<'_>) -> Daemon {
        let dir = TempDir::new();
        let token_file = dir.0.join("token");
        std::fs::write(&token_file, opts.token.unwrap_or(&peer.token)).unwrap();
        let port = free_port();
        let config = dir.0.join("config.toml");
        let base_toml = format!(
            "[ha]\nurl = \"{}\"\ntoken_file = \"{}\"\n{}[http]\nlisten = \"127.0.0.1:{port}\"\n{}\n",
            opts.url.as_deref().unwrap_or(&peer.url),
            token_file.display(),
            opts.ca_file
                .map(|p| format!("ca_file = \"{}\"\n", p.display()))
                .unwrap_or_default(),
            opts.extra
        );
        let mut text = base_toml;
        if !text.contains("[dbus]") {
            text.push_str("[dbus]\nbus = \"none\"\n");
        }
        if !text.contains("[cache]") {
            text.push_str(&format!(
                "[cache]\nstate_file = \"{}\"\n",
                dir.0.join("states.json").display()
            ));
        }
        std::fs::write(&config, text).unwrap();
        let log = dir.0.join("daemon.log");
        let mut cmd = match opts.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(env!("CARGO_BIN_EXE_hass-edge"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_hass-edge")),
        };
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null());
        cmd.stderr(std::fs::File::create(&log).unwrap());
        for (k, _) in std::env::vars().filter(|(k, _)| {
            k.starts_with("HASS_EDGE_") || k == "NOTIFY_SOCKET" || k.starts_with("WATCHDOG_")
        }) {
            cmd.env_remove(k);
        }
        for (k, v) in opts.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        Daemon {
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        }
    }

    fn config_path(&self) -> PathBuf {
        self._dir.0.join("config.toml")
    }

    fn get(&self, path: &str) -> Answer {
        http("GET", &format!("{}{path}", self.base), None, None)
    }

    fn json(&self, path: &str) -> (u16, Value) {
        self.get(path).into_json()
    }

    /// `/status`, or `Null` while the daemon is not listening yet.
    fn status_when_listening(&self) -> (u16, Value) {
        match std::net::TcpStream::connect(self.base.trim_start_matches("http://")) {
            Ok(_) => self.json("/status"),
            Err(_) => (0, Value::Null),
        }
    }

    fn wait_live(&self) {
        let deadline = Duration::from_secs(60);
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if std::net::TcpStream::connect(self.base.trim_start_matches("http://")).is_ok()
                && self.get("/health").status == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "daemon not live within {deadline:?}; log:\n{}",
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").body;
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn tracked_ids(&self) -> BTreeSet<String> {
        let (status, list) = self.json("/api/states");
        assert_eq!(status, 200);
        list.as_array()
            .unwrap()
            .iter()
            .map(|s| s["entity_id"].as_str().unwrap().to_owned())
            .collect()
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
    }

    /// SIGTERM; returns the exit code and how long it took.
    fn stop(&mut self) -> (Option<i32>, Duration) {
        let t = Instant::now();
        self.signal("TERM");
        let mut child = self.child.take().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status.code(), t.elapsed());
            }
            if t.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                return (None, t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- daemon log ----\n{}", self.log_text());
        }
    }
}

/// Entities the default filter tracks (it excludes media_player, camera, automation).
fn tracked_by_default(entity_id: &str) -> bool {
    !["media_player.", "camera.", "automation."]
        .iter()
        .any(|d| entity_id.starts_with(d))
}

/// Waits until every entity HA has (and we track) reads back JSON-equal from us, and our
/// list holds exactly those.
fn assert_mirrors_ha(peer: &Peer, daemon: &Daemon) {
    let mut last_diff = String::new();
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        let ha = peer.states();
        let ours: BTreeMap<String, Value> = daemon
            .json("/api/states")
            .1
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["entity_id"].as_str().unwrap().to_owned(), s.clone()))
            .collect();
        let want: BTreeMap<&String, &Value> =
            ha.iter().filter(|(id, _)| tracked_by_default(id)).collect();
        let diff: Vec<&String> = want
            .iter()
            .filter(|(id, s)| ours.get(**id) != Some(**s))
            .map(|(id, _)| *id)
            .collect();
        let extra: Vec<&String> = ours.keys().filter(|id| !want.contains_key(id)).collect();
        if diff.is_empty() && extra.is_empty() {
            // And one by one through the single-entity route.
            for (id, s) in &want {
                let a = daemon.get(&format!("/api/states/{id}"));
                assert_eq!(a.status, 200, "{id}");
                assert_eq!(
                    a.headers.get("x-cache").map(String::as_str),
                    Some("hit"),
                    "{id}"
                );
                assert_eq!(&serde_json::from_str::<Value>(&a.body).unwrap(), *s, "{id}");
            }
            return;
        }
        last_diff = format!("differ: {diff:?}; extra: {extra:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("our states never matched HA's: {last_diff}");
}

fn set_number(peer: &Peer, entity_id: &str, value: f64) {
    let (s, _) = peer.post(
        "/api/services/input_number/set_value",
        json!({"entity_id": entity_id, "value": value}),
    );
    assert_eq!(s, 200);
}

// ---------------------------------------------------------------- issue 2

#[test]
fn states_mirror_ha_after_random_changes() {
    let peer = peer();
    let daemon = Daemon::start(&peer, Options::default());
    daemon.wait_live();
    assert_mirrors_ha(&peer, &daemon);
    let mut rng = fastrand::Rng::with_seed(7);
    let modes = ["home", "away", "night", "vacation"];
    for i in 0..40 {
        match rng.u8(0..5) {
            0 => assert_eq!(
                peer.post(
                    "/api/services/input_boolean/toggle",
                    json!({"entity_id": "input_boolean.kitchen"})
                )
                .0,
                200
            ),
            1 => set_number(
                &peer,
                "input_number.living_temp",
                rng.i32(-20..50) as f64 / 2.0,
            ),
            2 => assert_eq!(
                peer.post(
                    "/api/services/input_select/select_option",
                    json!({"entity_id": "input_select.house_mode", "option": modes[rng.usize(..4)]})
                )
                .0,
                200
            ),
            3 => {
                let attrs = json!({"unit_of_measurement": "W", "friendly_name": format!("E2E {i}"), "rand": rng.u32(..)});
                let s = peer
                    .post(
                        &format!("/api/states/sensor.e2e_{}", rng.u8(0..4)),
                        json!({"state": rng.u32(..1000).to_string(), "attributes": attrs}),
                    )
                    .0;
                assert!(s == 200 || s == 201);
            }
            _ => set_number(&peer, "input_number.kitchen_brightness", rng.u8(..) as f64),
        }
    }
    assert_mirrors_ha(&peer, &daemon);
    assert_eq!(
        daemon.metric("hass_edge_ha_rest_requests_total"),
        0.0,
        "tracked reads never went to HA"
    );
}

/// A list several times the daemon's write chunk (~190 KB here; 20,000 entities make
/// ~15 MB) is written in pieces: it must still equal HA's, carry an exact Content-Length,
/// and leave a keep-alive connection framed for the next request.
#[test]
fn a_long_states_list_is_whole_and_exactly_framed() {
    let peer = peer();
    let ids: Vec<String> = (0..300)
        .map(|i| format!("sensor.e2e_long_list_{i:03}"))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let attrs = json!({"friendly_name": format!("Long list {i}"), "note": "é\"\\ ".repeat(100), "n": i});
        let s = peer
            .post(
                &format!("/api/states/{id}"),
                json!({"state": i.to_string(), "attributes": attrs}),
            )
            .0;
        assert!(s == 200 || s == 201, "{id}: {s}");
    }
    let daemon = Daemon::start(&peer, Options::default());
    daemon.wait_live();
    assert_mirrors_ha(&peer, &daemon);

    // HEAD, GET and /health pipelined on one connection.
    let addr = daemon.base.trim_start_matches("http://").to_owned();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::io::Write::write_all(&mut conn, b"HEAD /api/states HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /api/states HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    let mut rest = &raw[..];
    let mut next = |with_body: bool| -> (String, Vec<u8>) {
        let end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head")
            + 4;
        let head = String::from_utf8(rest[..end].to_vec()).unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("Content-Length")
            .trim()
            .parse()
            .unwrap();
        let body_len = if with_body { length } else { 0 };
        let body = rest[end..end + body_len].to_vec();
        rest = &rest[end + body_len..];
        (head, body)
    };
    let (head_only, none) = next(false);
    let (get_head, body) = next(true);
    let (health, health_body) = next(true);
    assert!(none.is_empty());
    let announced = |h: &str| {
        h.lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map(str::to_owned)
    };
    assert_eq!(
        announced(&head_only),
        announced(&get_head),
        "HEAD announces the GET's length"
    );
    assert!(
        body.len() > 3 * 64 * 1024,
        "the list spans several chunks: {} bytes",
        body.len()
    );
    let list: Value =
        serde_json::from_slice(&body).expect("the streamed list is one JSON document");
    assert_eq!(list, daemon.json("/api/states").1);
    let listed: BTreeSet<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["entity_id"].as_str())
        .collect();
    assert!(
        ids.iter().all(|id| listed.contains(id.as_str())),
        "every new sensor is listed"
    );
    assert!(
        health.starts_with("HTTP/1.1 200"),
        "the next pipelined request is answered: {health}"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&health_body).unwrap()["status"],
        "live"
    );
    assert!(
        rest.is_empty(),
        "nothing after the last response: {} bytes",
        rest.len()
    );

    // The same list as the stream's snapshot (also written in pieces), then a live event.
    let mut stream = open_stream(&daemon, "?entity_id=sensor.e2e_long_list_*&snapshot=1");
    let seen = std::cell::RefCell::new(BTreeSet::new());
    let first = read_sse_until(
        &mut stream,
        |v| {
            let mut seen = seen.borrow_mut();
            seen.insert(v["entity_id"].as_str().unwrap_or("").to_owned());
            seen.len() == ids.len()
        },
        Duration::from_secs(10),
    );
    assert!(
        first["old_state"].is_null(),
        "snapshot events have no old state"
    );
    assert_eq!(
        seen.into_inner().into_iter().collect::<Vec<_>>(),
        ids,
        "the snapshot lists exactly the selection"
    );
    assert_eq!(
        peer.post(
            "/api/states/sensor.e2e_long_list_007",
            json!({"state": "live"})
        )
        .0,
        200
    );
    let live = read_sse_until(
        &mut stream,
        |v| v["new_state"]["state"] == "live",
        Duration::from_secs(10),
    );
    assert_eq!(live["entity_id"], "sensor.e2e_long_list_007");

    for id in &ids {
        let url = format!("{}/api/states/{id}", peer.url);
        let r = agent()
            .delete(&url)
            .header("Authorization", &format!("Bearer {}", peer.token))
            .call()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "DELETE {id}");
    }
}

#[test]
fn change_in_ha_shows_through_us_within_50ms() {
    let peer = peer();
    let daemon = Daemon::start(&peer, Options::default());
    daemon.wait_live();
    let mut delays = Vec::new();
    for _ in 0..20 {
        let before: Value =
            serde_json::from_str(&daemon.get("/api/states/input_boolean.kitchen").body).unwrap();
        let (s, _) = peer.post(
            "/api/services/input_boolean/toggle",
            json!({"entity_id": "input_boolean.kitchen"}),
        );
        assert_eq!(s, 200);
        // HA has applied the change when its REST call returns; from here we measure.
        let t = Instant::now();
        loop {
            let now: Value =
                serde_json::from_str(&daemon.get("/api/states/input_boolean.kitchen").body)
                    .unwrap();
            if now["state"] != before["state"] {
                delays.push(t.elapsed());
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "change never showed");
        }
    }
    delays.sort();
    let (p50, max) = (delays[delays.len() / 2], delays[delays.len() - 1]);
    println!(
        "HA {} → hass-edge GET visibility over 20 toggles: p50 {p50:?}, max {max:?}",
        peer.version
    );
    assert!(
        p50 <= Duration::from_millis(50),
        "median visibility {p50:?} > 50 ms"
    );
}

#[test]
fn excluded_domains_are_not_tracked_but_answer_via_rest() {
    let peer = peer();
    // Trace logging everywhere: the token still must not appear (auth frame, REST header).
    let daemon = Daemon::start(
        &peer,
        Options {
            env: vec![("RUST_LOG", "trace".into())],
            ..Default::default()
        },
    );
    daemon.wait_live();
    let automation = peer
        .states()
        .into_keys()
        .find(|id| id.starts_with("automation."))
        .expect("the peer has an automation");
    assert!(!daemon.tracked_ids().contains(&automation));
    let first = daemon.get(&format!("/api/states/{automation}"));
    assert_eq!(first.status, 200);
    assert_eq!(first.headers["x-cache"], "miss");
    let (_, ha) = peer.get(&format!("/api/states/{automation}"));
    assert_eq!(serde_json::from_str::<Value>(&first.body).unwrap(), ha);
    let second = daemon.get(&format!("/api/states/{automation}"));
    assert_eq!(second.headers["x-cache"], "hit", "cached for ttl_seconds");
    let missing = daemon.get("/api/states/sensor.does_not_exist_e2e");
    assert_eq!(missing.status, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&missing.body).unwrap(),
        json!({"message": "Entity not found."})
    );
    let again = daemon.get("/api/states/sensor.does_not_exist_e2e");
    assert_eq!(
        (again.status, again.headers["x-cache"].as_str()),
        (404, "hit"),
        "404 cached"
    );
    assert_eq!(daemon.metric("hass_edge_ha_rest_requests_total"), 2.0);
    let refreshed = daemon.get(&format!("/api/states/{automation}?refresh=true"));
    assert_eq!(refreshed.headers["x-cache"], "miss");
    assert_eq!(daemon.metric("hass_edge_ha_rest_requests_total"), 3.0);
    let log = daemon.log_text();
    assert!(
        !log.contains(&peer.token),
        "the HA token appears in the log"
    );
}

#[test]
fn ha_restart_resyncs_and_removed_entities_vanish() {
    let peer = peer();
    let daemon = Daemon::start(
        &peer,
        Options {
            extra: "[reconnect]\nmax_delay_seconds = 2",
            ..Default::default()
        },
    );
    daemon.wait_live();
    let (s, _) = peer.post("/api/states/sensor.e2e_ephemeral", json!({"state": "1"}));
    assert!(s == 200 || s == 201);
    wait_until(
        "the ephemeral entity is tracked",
        Duration::from_secs(5),
        || daemon.tracked_ids().contains("sensor.e2e_ephemeral"),
    );
    let reconnects = daemon.metric("hass_edge_reconnects_total");
    // REST-created entities do not survive an HA restart: after it, ours must vanish too.
    peer.run(&["restart"]);
    wait_until("a reconnect", Duration::from_secs(60), || {
        daemon.metric("hass_edge_reconnects_total") > reconnects
    });
    daemon.wait_live();
    wait_until(
        "the ephemeral entity is gone",
        Duration::from_secs(10),
        || !daemon.tracked_ids().contains("sensor.e2e_ephemeral"),
    );
    assert_eq!(daemon.get("/api/states/sensor.e2e_ephemeral").status, 404);
    assert_mirrors_ha(&peer, &daemon);
}

#[test]
fn bad_token_reports_auth_failed_without_retry_storm() {
    let peer = peer();
    let daemon = Daemon::start(
        &peer,
        Options {
            token: Some("not-a-valid-token"),
            extra: "[reconnect]\nmax_delay_seconds = 3",
            ..Default::default()
        },
    );
    wait_until("auth_failed", Duration::from_secs(20), || {
        std::net::TcpStream::connect(daemon.base.trim_start_matches("http://")).is_ok()
            && daemon.json("/health").1["status"] == "auth_failed"
    });
    let (status, health) = daemon.json("/health");
    assert_eq!(status, 503);
    assert_eq!(health["websocket"]["connected"], false);
    std::thread::sleep(Duration::from_secs(7));
    let attempts = daemon.metric("hass_edge_auth_failures_total");
    // One at start, then at most one per max_delay (3 s, +10 % jitter): ≤ 3 in ~7 s.
    assert!(
        (1.0..=3.0).contains(&attempts),
        "{attempts} auth attempts in ~7 s"
    );
    assert!(
        !daemon.log_text().contains(&peer.token),
        "the real token never appears in logs"
    );
}

// ---------------------------------------------------------------- issue 3

fn read_sse_until(
    reader: &mut BufReader<std::net::TcpStream>,
    want: impl Fn(&Value) -> bool,
    deadline: Duration,
) -> Value {
    let end = Instant::now() + deadline;
    let mut line = String::new();
    while Instant::now() < end {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => panic!("stream closed"),
            Ok(_) => {
                // HA's format: `data: ping`, and events in HA's envelope.
                if let Some(data) = line.strip_prefix("data: ").filter(|d| d.trim() != "ping") {
                    let event: Value = serde_json::from_str(data.trim()).unwrap();
                    let v = event["data"].clone();
                    if want(&v) {
                        return v;
                    }
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("{e}"),
        }
    }
    panic!("no matching SSE event within {deadline:?}");
}

fn open_stream(daemon: &Daemon, query: &str) -> BufReader<std::net::TcpStream> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(daemon.base.trim_start_matches("http://")).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    write!(
        s,
        "GET /api/stream{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    r
}

/// A TLS-terminating proxy in front of the peer (HA behind nginx, or with its own
/// `ssl_certificate`); killed on drop.
struct TlsProxy {
    child: Child,
    url: String,
    cert: PathBuf,
    _dir: TempDir,
}

impl TlsProxy {
    /// `ca` = `CA:TRUE`, what `openssl req -x509` (and HA's self-signed recipe) makes by
    /// default; webpki refuses that as a server's certificate.
    fn start(peer: &Peer, ca: bool) -> TlsProxy {
        let dir = TempDir::new();
        let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
        let status = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
            ])
            .args([
                "-subj",
                "/CN=hass-edge e2e",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .args(if ca {
                [].as_slice()
            } else {
                ["-addext", "basicConstraints=critical,CA:FALSE"].as_slice()
            })
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl (apt install openssl)");
        assert!(status.success(), "openssl req failed");
        let port = free_port();
        let upstream = peer.url.rsplit(':').next().unwrap().to_owned();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ha-peer/tls_proxy.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args([port.to_string(), upstream])
            .arg(&cert)
            .arg(&key)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ready", "tls_proxy.py did not start");
        TlsProxy {
            child,
            url: format!("https://127.0.0.1:{port}"),
            cert,
            _dir: dir,
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HA over https with a self-signed certificate: trusted through `ha.ca_file`, the
/// subscription (wss) and the REST read-through both work; without it, the daemon reports
/// the certificate problem instead of going live, and never falls back to plain text.
#[test]
fn https_ha_with_a_private_ca_works_and_an_unknown_ca_is_refused() {
    let peer = peer();
    let proxy = TlsProxy::start(&peer, false);
    let daemon = Daemon::start(
        &peer,
        Options {
            url: Some(proxy.url.clone()),
            ca_file: Some(&proxy.cert),
            ..Default::default()
        },
    );
    daemon.wait_live();
    assert_mirrors_ha(&peer, &daemon);
    let automation = peer
        .states()
        .into_keys()
        .find(|id| id.starts_with("automation."))
        .expect("the peer has an automation");
    let read = daemon.get(&format!("/api/states/{automation}"));
    assert_eq!(
        (read.status, read.headers["x-cache"].as_str()),
        (200, "miss"),
        "REST read-through over https: {}",
        read.body
    );
    assert_eq!(
        serde_json::from_str::<Value>(&read.body).unwrap(),
        peer.get(&format!("/api/states/{automation}")).1
    );
    assert_eq!(
        daemon.json("/status").1["home_assistant"]["url"],
        proxy.url.as_str()
    );

    let untrusted = Daemon::start(
        &peer,
        Options {
            url: Some(proxy.url.clone()),
            ..Default::default()
        },
    );
    wait_until(
        "the untrusted certificate to be reported",
        Duration::from_secs(20),
        || {
            let (_, status) = untrusted.status_when_listening();
            status["connection"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("TLS") && e.to_lowercase().contains("certificate"))
        },
    );
    assert_eq!(
        untrusted.get("/health").status,
        503,
        "not live without a trusted certificate"
    );

    // HA's self-signed recipe (CA:TRUE): refused, and the error says how to fix it.
    let ca_proxy = TlsProxy::start(&peer, true);
    let refused = Daemon::start(
        &peer,
        Options {
            url: Some(ca_proxy.url.clone()),
            ca_file: Some(&ca_proxy.cert),
            ..Default::default()
        },
    );
    wait_until(
        "the CA-as-server certificate to be explained",
        Duration::from_secs(20),
        || {
            let (_, status) = refused.status_when_listening();
            status["connection"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("basicConstraints=critical,CA:FALSE"))
        },
    );
}

#[test]
fn service_call_through_us_changes_ha_our_get_and_the_stream() {
    let peer = peer();
    let daemon = Daemon::start(&peer, Options::default());
    daemon.wait_live();
    let mut stream = open_stream(&daemon, "?entity_id=input_boolean.kitchen,light.");
    let before = peer.get("/api/states/input_boolean.kitchen").1["state"]
        .as_str()
        .unwrap()
        .to_owned();
    let a = http(
        "POST",
        &format!("{}/api/services/input_boolean/toggle", daemon.base),
        None,
        Some(json!({"entity_id": "input_boolean.kitchen"}).to_string()),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let changed: Value = serde_json::from_str(&a.body).unwrap();
    assert!(
        changed
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["entity_id"] == "input_boolean.kitchen"),
        "HA's changed states are returned: {changed}"
    );
    let now_ha = peer.get("/api/states/input_boolean.kitchen").1;
    assert_ne!(now_ha["state"], before.as_str(), "HA changed");
    // Our very next read reflects the call (written from HA's answer, not waiting for the event).
    let ours: Value =
        serde_json::from_str(&daemon.get("/api/states/input_boolean.kitchen").body).unwrap();
    assert_eq!(ours["state"], now_ha["state"]);
    let ev = read_sse_until(
        &mut stream,
        |v| v["entity_id"] == "input_boolean.kitchen",
        Duration::from_secs(5),
    );
    assert_eq!(ev["old_state"]["state"], before.as_str());
    assert_eq!(ev["new_state"]["state"], now_ha["state"]);
    read_sse_until(
        &mut stream,
        |v| v["entity_id"] == "light.kitchen",
        Duration::from_secs(5),
    );
    // Errors come back as HA sent them: status, content type and body.
    let bad = http(
        "POST",
        &format!("{}/api/services/nope/nothing", daemon.base),
        None,
        Some("{}".into()),
    );
    let direct = http(
        "POST",
        &format!("{}/api/services/nope/nothing", peer.url),
        Some(&peer.token),
        Some("{}".into()),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert_eq!(
        (bad.status, &bad.body, bad.headers.get("content-type")),
        (
            direct.status,
            &direct.body,
            direct.headers.get("content-type")
        ),
        "HA's own answer"
    );
}

#[test]
fn script_reload_fires_service_registered_and_our_service_list_follows() {
    let peer = peer();
    let daemon = Daemon::start(&peer, Options::default());
    daemon.wait_live();
    let has = |list: &Value, service: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .any(|d| d["domain"] == "script" && d["services"].get(service).is_some())
    };
    let (s, list) = daemon.json("/api/services");
    assert_eq!(s, 200);
    let name = format!("e2e_added_{}", fastrand::u32(..));
    assert!(!has(&list, &name));
    let scripts = peer.dir.join("scripts.yaml");
    let mut text = std::fs::read_to_string(&scripts).unwrap();
    text.push_str(&format!(
        "\n{name}:\n  alias: E2E added\n  sequence:\n    - delay: 0\n"
    ));
    std::fs::write(&scripts, text).unwrap();
    let events = daemon.metric("hass_edge_service_events_total");
    assert_eq!(peer.post("/api/services/script/reload", json!({})).0, 200);
    wait_until(
        "service_registered reaches us",
        Duration::from_secs(10),
        || daemon.metric("hass_edge_service_events_total") > events,
    );
    wait_until(
        "our /api/services lists the new script",
        Duration::from_secs(10),
        || has(&daemon.json("/api/services").1, &name),
    );
}

#[test]
fn metrics_pass_promtool() {
    let peer = peer();
    let daemon = Daemon::start(&peer, Options::default());
    daemon.wait_live();
    daemon.get("/api/states/light.kitchen");
    daemon.get("/nope");
    let text = daemon.get("/metrics").body;
    assert!(text.contains("hass_edge_connection_up 1"));
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------- issue 4

struct Bus {
    address: String,
    pid: i32,
}

impl Bus {
    fn start() -> Bus {
        let out = Command::new("dbus-daemon")
            .args(["--session", "--print-address=1", "--print-pid=1", "--fork"])
            .output()
            .expect("dbus-daemon must be installed");
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        let address = lines.next().unwrap().to_owned();
        let pid = lines.next().unwrap().trim().parse().unwrap();
        Bus { address, pid }
    }

    fn busctl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("busctl")
            .arg(format!("--address={}", self.address))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    fn status(&self, json: bool) -> (i32, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hass-edge"));
        cmd.args(["status", "--session"])
            .env("DBUS_SESSION_BUS_ADDRESS", &self.address);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
    }
}

#[test]
fn dbus_properties_methods_signals_and_status_command() {
    let peer = peer();
    let bus = Bus::start();
    let mut daemon = Daemon::start(
        &peer,
        Options {
            extra: "[dbus]\nbus = \"session\"\nentity_signals = true\n[reconnect]\nmax_delay_seconds = 2",
            env: vec![("DBUS_SESSION_BUS_ADDRESS", bus.address.clone())],
            ..Default::default()
        },
    );
    daemon.wait_live();
    let obj = [
        "io.hassedge.HassEdge1",
        "/io/hassedge/HassEdge1",
        "io.hassedge.HassEdge1",
    ];
    wait_until("the name is on the bus", Duration::from_secs(5), || {
        bus.busctl(&["get-property", obj[0], obj[1], obj[2], "Connection"])
            .1
            .contains("\"live\"")
    });
    let (_, v) = bus.busctl(&["get-property", obj[0], obj[1], obj[2], "HaVersion"]);
    assert!(v.contains(&peer.version), "{v}");
    let (_, v) = bus.busctl(&["introspect", obj[0], obj[1]]);
    for member in [
        ".GetState",
        ".ListEntities",
        ".Resync",
        ".EntityChanged",
        ".TrackedEntities",
        ".LastEventTime",
    ] {
        assert!(v.contains(member), "introspection lists {member}: {v}");
    }
    // GetState answers the same JSON as the HTTP API.
    let (ok, v) = bus.busctl(&[
        "--json=short",
        "call",
        obj[0],
        obj[1],
        obj[2],
        "GetState",
        "s",
        "light.kitchen",
    ]);
    assert!(ok, "{v}");
    let via_dbus: Value = serde_json::from_str(
        serde_json::from_str::<Value>(&v).unwrap()["data"][0]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let via_http: Value =
        serde_json::from_str(&daemon.get("/api/states/light.kitchen").body).unwrap();
    assert_eq!(via_dbus, via_http);
    let (ok, v) = bus.busctl(&[
        "call",
        obj[0],
        obj[1],
        obj[2],
        "GetState",
        "s",
        "light.does_not_exist",
    ]);
    assert!(!ok && v.contains("not known"), "{v}");
    let (ok, v) = bus.busctl(&[
        "--json=short",
        "call",
        obj[0],
        obj[1],
        obj[2],
        "ListEntities",
    ]);
    assert!(ok && v.contains("light.kitchen"), "{v}");
    assert!(
        !v.contains("automation."),
        "excluded domains are not listed"
    );
    assert_eq!(bus.status(false).0, 0);
    assert!(bus.status(false).1.contains("Connected"));
    let usage = Command::new(env!("CARGO_BIN_EXE_hass-edge"))
        .args(["status", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(
        usage.status.code(),
        Some(2),
        "bad usage prints help and exits 2"
    );
    assert!(String::from_utf8_lossy(&usage.stderr).contains("Usage:"));

    // EntityChanged(entity_id, state JSON) for a tracked change ([dbus] entity_signals = true).
    let mut signals = Command::new("dbus-monitor")
        .args([
            "--address",
            &bus.address,
            "type='signal',interface='io.hassedge.HassEdge1',member='EntityChanged'",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("dbus-monitor");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        peer.post(
            "/api/services/input_boolean/toggle",
            json!({"entity_id": "input_boolean.kitchen"})
        )
        .0,
        200
    );
    let now_ha = peer.get("/api/states/input_boolean.kitchen").1;
    std::thread::sleep(Duration::from_millis(700));
    let _ = signals.kill();
    let mut text = String::new();
    signals
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let _ = signals.wait();
    assert!(text.contains("member=EntityChanged"), "{text}");
    assert!(text.contains("string \"input_boolean.kitchen\""), "{text}");
    assert!(
        text.contains(&format!(
            "\\\"state\\\":\\\"{}\\\"",
            now_ha["state"].as_str().unwrap()
        )) || text.contains(&format!(
            "\"state\":\"{}\"",
            now_ha["state"].as_str().unwrap()
        )),
        "the state JSON rides along: {text}"
    );

    // PropertiesChanged for Connection when HA goes away and when it is back.
    let mut monitor = Command::new("dbus-monitor")
        .args(["--address", &bus.address, "type='signal',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged',path='/io/hassedge/HassEdge1'"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("dbus-monitor");
    std::thread::sleep(Duration::from_millis(300));
    peer.run(&["stop"]);
    wait_until("not live", Duration::from_secs(30), || {
        daemon.get("/health").status == 503
    });
    let (code, text) = bus.status(false);
    assert_eq!(code, 3, "running but not live: {text}");
    assert!(text.contains("Disconnected"), "{text}");
    peer.start();
    daemon.wait_live();
    wait_until("D-Bus says live again", Duration::from_secs(10), || {
        bus.busctl(&["get-property", obj[0], obj[1], obj[2], "Connection"])
            .1
            .contains("\"live\"")
    });
    std::thread::sleep(Duration::from_millis(300));
    let _ = monitor.kill();
    let mut seen = String::new();
    monitor
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut seen)
        .unwrap();
    let _ = monitor.wait();
    let connection_values: Vec<&str> = seen
        .lines()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0].contains("string \"Connection\""))
        .filter_map(|w| w[1].split('"').nth(1))
        .collect();
    assert!(
        connection_values.iter().any(|v| *v != "live"),
        "a PropertiesChanged announced the loss: {connection_values:?}"
    );
    assert_eq!(
        connection_values.last(),
        Some(&"live"),
        "and the return: {connection_values:?}"
    );
    assert!(!seen.contains(&peer.token));

    let (code, _) = daemon.stop();
    assert_eq!(code, Some(0));
    assert_eq!(bus.status(false).0, 4, "not running");
    assert!(bus.status(true).1.contains("not_running"));
}

struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn new() -> Notify {
        let path = std::env::temp_dir().join(format!(
            "hass-edge-notify-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Notify { socket, path }
    }

    /// Messages received until `deadline` or until one satisfies `stop`.
    fn collect(&self, deadline: Duration, stop: impl Fn(&str) -> bool) -> Vec<(Instant, String)> {
        let mut got = Vec::new();
        let end = Instant::now() + deadline;
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = stop(&m);
                got.push((Instant::now(), m));
                if done {
                    break;
                }
            }
        }
        got
    }
}

impl Drop for Notify {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn assert_path(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

#[test]
fn sd_notify_ready_status_watchdog_reload_stopping() {
    let peer = peer();
    let notify = Notify::new();
    let mut daemon = Daemon::start(
        &peer,
        Options {
            env: vec![
                ("NOTIFY_SOCKET", assert_path(&notify.path)),
                ("WATCHDOG_USEC", "1000000".into()),
            ],
            ..Default::default()
        },
    );
    let start = notify.collect(Duration::from_secs(30), |m| m.contains("READY=1"));
    let ready = start
        .iter()
        .find(|(_, m)| m.contains("READY=1"))
        .unwrap_or_else(|| panic!("no READY=1: {start:?}"));
    assert!(ready.1.contains("STATUS=live: HA "), "{}", ready.1);
    assert!(ready.1.contains("entities tracked"), "{}", ready.1);
    assert_eq!(
        daemon.get("/health").status,
        200,
        "READY only once live and listening"
    );
    // Watchdog pings at half of WATCHDOG_USEC (0.5 s): ~6 in 3 s.
    let window = notify.collect(Duration::from_secs(3), |_| false);
    let pings = window
        .iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .count();
    assert!((4..=8).contains(&pings), "{pings} watchdog pings in 3 s");
    daemon.signal("HUP");
    let reload = notify.collect(Duration::from_secs(10), |m| m.contains("READY=1"));
    let texts: Vec<&str> = reload.iter().map(|(_, m)| m.as_str()).collect();
    let reloading = texts
        .iter()
        .position(|m| m.contains("RELOADING=1"))
        .unwrap_or_else(|| panic!("{texts:?}"));
    assert!(texts[reloading].contains("MONOTONIC_USEC="), "{texts:?}");
    assert!(
        texts[reloading..].iter().any(|m| m.contains("READY=1")),
        "{texts:?}"
    );
    daemon.signal("TERM");
    let stop = notify.collect(Duration::from_secs(5), |m| m.contains("STOPPING=1"));
    assert!(
        stop.iter().any(|(_, m)| m.contains("STOPPING=1")),
        "{stop:?}"
    );
    let (code, took) = daemon.stop();
    assert_eq!(code, Some(0));
    assert!(took <= Duration::from_secs(3), "stopped in {took:?}");
}

#[test]
fn reload_applies_a_filter_without_reconnecting_and_refuses_a_bad_config() {
    let peer = peer();
    let daemon = Daemon::start(&peer, Options::default());
    daemon.wait_live();
    assert!(daemon.tracked_ids().contains("light.kitchen"));
    let connected_at = daemon.json("/status").1["connection"]["last_connected"].clone();
    let config = daemon.config_path();
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{original}[filter]\nexclude_domains = [\"light\", \"automation\"]\n"),
    )
    .unwrap();
    daemon.signal("HUP");
    wait_until("light.* dropped", Duration::from_secs(10), || {
        !daemon.tracked_ids().contains("light.kitchen")
    });
    wait_until(
        "live again after the resubscribe",
        Duration::from_secs(10),
        || daemon.get("/health").status == 200,
    );
    let status = daemon.json("/status").1;
    assert_eq!(
        status["connection"]["last_connected"], connected_at,
        "no reconnect"
    );
    assert_eq!(daemon.metric("hass_edge_reconnects_total"), 0.0);
    assert_eq!(
        status["filter"]["exclude_domains"],
        json!(["light", "automation"])
    );
    // Automations were excluded before and still are: the new list was applied as a whole.
    assert!(
        !daemon
            .tracked_ids()
            .iter()
            .any(|id| id.starts_with("automation."))
    );

    // Widening again brings light.* back (a fresh snapshot, still no reconnect).
    std::fs::write(&config, &original).unwrap();
    daemon.signal("HUP");
    wait_until("light.kitchen back", Duration::from_secs(10), || {
        daemon.tracked_ids().contains("light.kitchen")
    });

    // A bad config is refused; the old one stays in force and the daemon keeps running.
    assert!(
        original.contains("[cache]\n"),
        "the harness writes a [cache] table"
    );
    std::fs::write(
        &config,
        original.replacen("[cache]\n", "[cache]\nmax_entitys = 5\n", 1),
    )
    .unwrap();
    daemon.signal("HUP");
    wait_until("the refusal is logged", Duration::from_secs(10), || {
        daemon.log_text().contains("reload rejected")
    });
    assert!(
        daemon.log_text().contains("max_entitys"),
        "the error names the key"
    );
    assert_eq!(daemon.get("/health").status, 200);
    assert!(daemon.tracked_ids().contains("light.kitchen"));
    assert_eq!(daemon.metric("hass_edge_reconnects_total"), 0.0);
}

// ---------------------------------------------------------------- issue 7

#[test]
fn warm_start_serves_saved_states_stale_until_ha_is_back() {
    let peer = peer();
    let dir = TempDir::new();
    let state_file = dir.0.join("states.json");
    let cache = format!(
        "[cache]\nstate_file = \"{}\"\n[reconnect]\nmax_delay_seconds = 2",
        state_file.display()
    );
    let mut first = Daemon::start(
        &peer,
        Options {
            extra: &cache,
            ..Default::default()
        },
    );
    first.wait_live();
    let before: Value = serde_json::from_str(&first.get("/api/states/light.kitchen").body).unwrap();
    assert_eq!(first.stop().0, Some(0));
    let saved_at = Instant::now();
    assert!(state_file.exists(), "states saved at a clean stop");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&state_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "readable only by the service user");
    assert!(
        !std::fs::read_to_string(&state_file)
            .unwrap()
            .contains(&peer.token),
        "no secrets in the file"
    );

    // Restart with HA down: the last known states are served, marked stale, with their age.
    peer.run(&["stop"]);
    std::thread::sleep(Duration::from_secs(2));
    let second = Daemon::start(
        &peer,
        Options {
            extra: &cache,
            ..Default::default()
        },
    );
    wait_until("HTTP up", Duration::from_secs(10), || {
        std::net::TcpStream::connect(second.base.trim_start_matches("http://")).is_ok()
    });
    let a = second.get("/api/states/light.kitchen");
    assert_eq!(a.status, 200, "{}", second.log_text());
    assert_eq!(a.headers["x-cache"], "stale");
    let age: u64 = a.headers["age"].parse().unwrap();
    assert!(
        age >= 2 && age <= saved_at.elapsed().as_secs() + 1,
        "Age {age}"
    );
    assert_eq!(serde_json::from_str::<Value>(&a.body).unwrap(), before);
    assert_eq!(second.get("/health").status, 503, "not live");
    let status = second.json("/status").1;
    assert_eq!(status["serving_stale"], true);
    assert!(status["warm_start"]["restored"].as_u64().unwrap() > 10);
    assert_eq!(second.get("/api/states").headers["x-cache"], "stale");

    // HA back: the snapshot replaces them; stale markers are gone and we match HA.
    peer.start();
    second.wait_live();
    assert_eq!(
        second.get("/api/states/light.kitchen").headers["x-cache"],
        "hit"
    );
    assert_eq!(second.json("/status").1["serving_stale"], false);
    assert_mirrors_ha(&peer, &second);
}

#[test]
fn corrupt_or_unwritable_state_files_never_stop_the_daemon() {
    let peer = peer();
    let dir = TempDir::new();
    let file = dir.0.join("states.json");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", b"{\"format\":\"hass-edge-states\",\"version\":1,\"saved_at_us\":1,\"count\":3,\"length\":900,\"crc32\":1}\n[{\"entity_id\":\"light.k".to_vec()),
        ("random bytes", (0..4096).map(|_| fastrand::u8(..)).collect()),
        ("wrong shape", br#"{"states": {"light.kitchen": "on"}}"#.to_vec()),
        ("future version", b"{\"format\":\"hass-edge-states\",\"version\":99,\"saved_at_us\":1,\"count\":0,\"length\":2,\"crc32\":0}\n[]\n".to_vec()),
    ];
    for (name, bytes) in cases {
        std::fs::write(&file, &bytes).unwrap();
        let _ = std::fs::remove_file(dir.0.join("states.json.corrupt"));
        let extra = format!("[cache]\nstate_file = \"{}\"", file.display());
        let daemon = Daemon::start(
            &peer,
            Options {
                extra: &extra,
                ..Default::default()
            },
        );
        daemon.wait_live();
        assert!(
            dir.0.join("states.json.corrupt").exists(),
            "{name}: moved aside"
        );
        let log = daemon.log_text();
        assert!(
            log.contains("states.json"),
            "{name}: the log names the file:\n{log}"
        );
        assert!(
            daemon.json("/status").1["warm_start"].is_null(),
            "{name}: nothing loaded"
        );
        assert_mirrors_ha(&peer, &daemon);
    }
    // An unwritable state directory (its parent is a regular file): logged, still syncs.
    let blocker = dir.0.join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let extra = format!(
        "[cache]\nstate_file = \"{}/states.json\"",
        blocker.display()
    );
    let mut daemon = Daemon::start(
        &peer,
        Options {
            extra: &extra,
            ..Default::default()
        },
    );
    daemon.wait_live();
    assert_eq!(
        daemon.stop().0,
        Some(0),
        "a failed save at stop is not a failure to stop"
    );
    assert!(
        daemon.log_text().contains("failed to save states"),
        "{}",
        daemon.log_text()
    );
}

/// A full disk: the state directory is a tmpfs (in a private mount namespace of the daemon,
/// needs root) just large enough for the file saved by an earlier run. Saving again fails
/// with ENOSPC: logged, the earlier file is left whole, no temp file remains, the daemon
/// stays live and stops cleanly.
#[test]
fn a_full_disk_keeps_the_old_state_file_whole() {
    let peer = peer();
    let dir = TempDir::new();
    let seed = dir.0.join("seed.json");
    let extra = format!("[cache]\nstate_file = \"{}\"", seed.display());
    let mut first = Daemon::start(
        &peer,
        Options {
            extra: &extra,
            ..Default::default()
        },
    );
    first.wait_live();
    assert_eq!(first.stop().0, Some(0));
    let seed_bytes = std::fs::read(&seed).expect("the first run saved its states");

    let mount_point = dir.0.join("full");
    std::fs::create_dir(&mount_point).unwrap();
    // The file plus one page: a second copy (the temp file of the next save) cannot fit.
    let size = (seed_bytes.len() / 4096 + 2) * 4096;
    let script = "mount -t tmpfs -o size=\"$2\",mode=0755 tmpfs \"$0\" && cp \"$1\" \"$0/states.json\" && shift 2 && exec \"$@\"";
    let wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        mount_point.display().to_string(),
        seed.display().to_string(),
        size.to_string(),
    ])
    .collect();
    let state_file = mount_point.join("states.json");
    let extra = format!(
        "[cache]\nstate_file = \"{}\"\npersist_interval_seconds = 1",
        state_file.display()
    );
    let mut daemon = Daemon::start(
        &peer,
        Options {
            extra: &extra,
            wrapper,
            ..Default::default()
        },
    );
    daemon.wait_live();
    assert!(
        daemon.json("/status").1["warm_start"]["restored"]
            .as_u64()
            .unwrap()
            > 10,
        "the seed was loaded from the tmpfs"
    );
    set_number(&peer, "input_number.kitchen_brightness", 77.0);
    wait_until("the failed save is logged", Duration::from_secs(20), || {
        daemon.log_text().contains("failed to save states")
    });
    let log = daemon.log_text();
    assert!(
        log.contains("No space left on device"),
        "the log says why:\n{log}"
    );
    // The daemon's view of its state directory (its mount namespace) through /proc.
    let inside = PathBuf::from(format!(
        "/proc/{}/root{}",
        daemon.pid(),
        mount_point.display()
    ));
    assert_eq!(
        std::fs::read(inside.join("states.json")).unwrap(),
        seed_bytes,
        "the earlier file is whole"
    );
    let left: Vec<_> = std::fs::read_dir(&inside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["states.json"], "no temp file left behind");
    assert_eq!(daemon.get("/health").status, 200, "still live");
    assert_eq!(daemon.stop().0, Some(0));
}

// ---------------------------------------------------------------- issue 15: HA's frontend

/// HA's frontend assets (content-hashed, `Cache-Control: public, max-age=…`) are kept on
/// the Pi: the first read goes to HA, the next is answered from disk (`X-Cache: hit`) with
/// HA's bytes and headers, and another hass-edge on the same state directory serves them
/// while HA cannot be reached at all (a kiosk reload after a reboot, HA away).
#[test]
fn frontend_assets_are_kept_and_served_while_ha_is_away() {
    let peer = peer();
    let shared = TempDir::new();
    let state = format!(
        "[cache]\nstate_file = \"{}\"\n",
        shared.0.join("states.json").display()
    );
    let login = http(
        "GET",
        &format!(
            "{}/auth/authorize?response_type=code&client_id=http://kiosk/&redirect_uri=http://kiosk/",
            peer.url
        ),
        None,
        None,
    );
    let start = login
        .body
        .find("/frontend_latest/")
        .expect("HA's login page loads a frontend asset");
    let rest = &login.body[start..];
    let asset = &rest[..rest.find('"').unwrap()];
    let direct = http("GET", &format!("{}{asset}", peer.url), None, None);
    assert_eq!(direct.status, 200, "{asset}");
    let daemon = Daemon::start(
        &peer,
        Options {
            extra: &state,
            ..Default::default()
        },
    );
    daemon.wait_live();
    let first = daemon.get(asset);
    assert_eq!(first.status, 200);
    assert_eq!(first.headers.get("x-cache"), None, "the first read is HA's");
    let second = daemon.get(asset);
    assert_eq!(
        second.headers.get("x-cache").map(String::as_str),
        Some("hit")
    );
    assert_eq!(second.body, direct.body, "HA's bytes");
    for h in ["content-type", "cache-control", "etag", "last-modified"] {
        assert_eq!(second.headers.get(h), direct.headers.get(h), "{h}");
    }
    drop(daemon);
    // HA unreachable: a closed port.
    let away = Daemon::start(
        &peer,
        Options {
            url: Some(format!("http://127.0.0.1:{}", free_port())),
            extra: &state,
            ..Default::default()
        },
    );
    wait_until("hass-edge answers", Duration::from_secs(10), || {
        std::net::TcpStream::connect(away.base.trim_start_matches("http://")).is_ok()
    });
    let r = away.get(asset);
    assert_eq!(r.status, 200, "the kept asset is served while HA is away");
    assert_eq!(r.body, direct.body);
    assert_eq!(away.get("/manifest.json").status, 502, "nothing else is");
}

/// The raw `data:` lines of an SSE stream (HA's or ours) until one holds `needle`.
fn sse_line_with(reader: &mut BufReader<std::net::TcpStream>, needle: &str) -> String {
    let end = Instant::now() + Duration::from_secs(10);
    let mut line = String::new();
    while Instant::now() < end {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => panic!("stream closed"),
            Ok(_) if line.starts_with("data: ") && line.contains(needle) => {
                return line.trim_end().to_owned();
            }
            _ => {}
        }
    }
    panic!("no event with {needle:?} within 10 s");
}

/// `/api/stream` in HA's format: an event HA fires reaches a hass-edge client that asked
/// for its type (`?restrict=`) byte for byte as HA's own stream sends it; an unrestricted
/// stream carries it too, next to the mirror's `state_changed`; and the upstream
/// subscription for it ends when the last client leaves.
#[test]
fn api_stream_carries_has_events_as_ha_does() {
    use std::io::Write;
    let peer = peer();
    let daemon = Daemon::start(&peer, Options::default());
    daemon.wait_live();
    let mut ours = open_stream(&daemon, "?restrict=hass_edge_probe");
    let mut all = open_stream(&daemon, "");
    let mut theirs = {
        let addr = peer.url.trim_start_matches("http://").to_owned();
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        write!(
            s,
            "GET /api/stream?restrict=hass_edge_probe HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
            peer.token
        )
        .unwrap();
        BufReader::new(s)
    };
    let subscriptions =
        || daemon.get("/health").into_json().1["websocket"]["subscriptions"].clone();
    // One upstream subscription for all the streams' other events ("*" covers the type).
    wait_until(
        "hass-edge subscribes to HA's events",
        Duration::from_secs(10),
        || subscriptions() == serde_json::json!(6),
    );
    let marker = format!("probe-{}", fastrand::u64(..));
    let (status, _) = peer.post(
        "/api/events/hass_edge_probe",
        serde_json::json!({ "marker": marker }),
    );
    assert_eq!(status, 200);
    let mine = sse_line_with(&mut ours, &marker);
    let has = sse_line_with(&mut theirs, &marker);
    assert_eq!(mine, has, "the same message as HA's own stream");
    assert_eq!(sse_line_with(&mut all, &marker), has);
    // The unrestricted stream also has the mirror's state changes.
    let before = peer.get("/api/states/input_boolean.kitchen").1["state"].clone();
    peer.post(
        "/api/services/input_boolean/toggle",
        serde_json::json!({"entity_id": "input_boolean.kitchen"}),
    );
    let line = sse_line_with(
        &mut all,
        "{\"event_type\":\"state_changed\",\"data\":{\"entity_id\":\"input_boolean.kitchen\"",
    );
    let event: Value = serde_json::from_str(line.trim_start_matches("data: ")).unwrap();
    assert_eq!(event["event_type"], "state_changed");
    assert_eq!(event["data"]["old_state"]["state"], before);
    // Nothing of `state_changed` on a stream restricted to another type.
    drop((ours, all));
    peer.post(
        "/api/services/input_boolean/toggle",
        serde_json::json!({"entity_id": "input_boolean.kitchen"}),
    );
    wait_until(
        "the upstream subscription for the stream's events is ended",
        Duration::from_secs(10),
        || subscriptions() == serde_json::json!(5),
    );
}
