//! In-process ingest benchmark (issue #6 §2a): recorded Home Assistant frames, scaled up to
//! a realistic installation, go through [`Session::handle_frame`] and [`Hub::apply`] exactly
//! as the link applies them (the mirror step: filter, store, counters; then the change
//! fan-out to `/api/stream`), at full speed on the calling thread. No sockets, no executor.
//!
//! The stream is synthesised from `tests/fixtures/<version>/`: every entity of
//! `subscribe_entities_initial.json` is copied `--copies` times (`light.kitchen` →
//! `light.kitchen_7`, with its attributes), and the recorded `subscribe_entities_events.jsonl`
//! "scene" (toggles, number changes, an attribute-only `lu` diff, `-` attribute removal, an
//! entity added and removed, automation updates the default filter drops) is replayed over
//! and over, each time on a different copy, with fresh context ids, numeric states that move
//! and timestamps that go forward. Messages are framed the way HA sends them to a client with
//! `coalesce_messages`: `single` (one message per frame, a quiet HA), `coalesced` (JSON arrays
//! of 1–40 messages, HA under load) or `mixed` (about half of the events in arrays, the
//! default).
//!
//! An "event" is one entity update (an `a`, `c` or `r` entry), as the daemon's
//! `hass_edge_events_received_total` counts them.
//!
//! ```text
//! cargo bench --bench ingest -- [--version 2025.4.4] [--entities 1000] [--events 20000]
//!                                [--frames mixed|single|coalesced|all] [--seconds 2] [--rounds 5]
//!                                [--passes N]
//! ```
//! `--passes N` replays the stream exactly N times and reports no timing: for
//! `valgrind --tool=callgrind` (measure/bench.sh runs it with two pass counts and divides the
//! difference in instructions by the difference in events, which cancels the set-up).
//! Rates are given per second of CPU time of the benchmark thread (`/proc/thread-self/schedstat`,
//! so a shared machine does not count against it) and per wall-clock second.
//! The last line is machine-readable: `RESULT key=value …`.

use std::hint::black_box;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hass_edge::config::{Secret, parse_config};
use hass_edge::hub::Hub;
use hass_edge::mirror::Update as MirrorUpdate;
use hass_edge::rest::RestClient;
use hass_edge::session::{Output, Phase, Session};
use serde_json::{Map, Value, json};

/// Ids our session assigns: supported_features 1, homeassistant_started 2, get_config 3,
/// then subscribe_entities 4 on HA 2024.3.3, or get_states 4 and subscribe_entities 5 on
/// HA >= 2024.4 (see `session.rs`).
const CONFIG_ID: u64 = 3;

fn entities_id(version: &str) -> u64 {
    if version.starts_with("2024.3") { 4 } else { 5 }
}
/// Largest coalesced array: 2025.4.4 packed up to ~40 messages per frame under load.
const MAX_COALESCED: usize = 40;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    Single,
    Coalesced,
    Mixed,
}

impl Framing {
    fn name(self) -> &'static str {
        match self {
            Framing::Single => "single",
            Framing::Coalesced => "coalesced",
            Framing::Mixed => "mixed",
        }
    }
}

#[derive(Debug)]
struct Args {
    version: String,
    entities: usize,
    events: usize,
    framings: Vec<Framing>,
    seconds: f64,
    rounds: usize,
    passes: Option<usize>,
}

fn parse_args() -> Args {
    let mut a = Args {
        version: "2025.4.4".into(),
        entities: 1000,
        events: 20_000,
        framings: vec![Framing::Mixed],
        seconds: 2.0,
        rounds: 5,
        passes: None,
    };
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it
    // (and with libtest flags such as `--test-threads=2`): then a short smoke is enough.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        a.seconds = 0.2;
        a.rounds = 1;
        a.events = 2_000;
    }
    let mut it = args.into_iter();
    let usage = "usage: ingest [--version V] [--entities N] [--events N] [--frames mixed|single|coalesced|all] [--seconds S] [--rounds N] [--passes N]";
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .unwrap_or_else(|| panic!("{name} needs a value\n{usage}"))
        };
        match arg.as_str() {
            "--version" => a.version = value("--version"),
            "--entities" => a.entities = value("--entities").parse().expect("--entities: a number"),
            "--events" => a.events = value("--events").parse().expect("--events: a number"),
            "--seconds" => a.seconds = value("--seconds").parse().expect("--seconds: a number"),
            "--rounds" => a.rounds = value("--rounds").parse().expect("--rounds: a number"),
            "--passes" => a.passes = Some(value("--passes").parse().expect("--passes: a number")),
            "--frames" => {
                a.framings = match value("--frames").as_str() {
                    "single" => vec![Framing::Single],
                    "coalesced" => vec![Framing::Coalesced],
                    "mixed" => vec![Framing::Mixed],
                    "all" => vec![Framing::Mixed, Framing::Single, Framing::Coalesced],
                    other => panic!("unknown --frames {other}\n{usage}"),
                }
            }
            "--bench" => {}
            // libtest flags from `cargo test -- …` mean nothing here.
            libtest
                if libtest.starts_with("--test-threads")
                    || ["--nocapture", "--quiet", "-q", "--test"].contains(&libtest) => {}
            "--help" | "-h" => {
                println!("{usage}");
                std::process::exit(0);
            }
            other => panic!("unexpected argument {other:?}\n{usage}"),
        }
    }
    a.rounds = a.rounds.max(1);
    a
}

fn fixture(version: &str, name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/{version}/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn with_id(frame: &str, id: u64) -> String {
    let mut v: Value = serde_json::from_str(frame).expect("fixture frame is JSON");
    v["id"] = id.into();
    v.to_string()
}

/// A context id shaped like HA's (26-character ULID), unique per `n`.
fn ulid(n: u64) -> String {
    format!("01M81J{n:020}")
}

/// One entity update of the recorded scene, before renaming.
#[derive(Clone)]
enum Update {
    Add(String, Value),
    Change(String, Value),
    Remove(String),
}

/// The synthetic stream: the snapshot frame and the event frames (already id-rewritten).
struct Stream {
    snapshot: String,
    frames: Vec<String>,
    events: usize,
    tracked_entities: usize,
    snapshot_entities: usize,
    arrays: usize,
    bytes: usize,
}

/// Moves every epoch-seconds timestamp in a compressed state or diff forward by `shift`.
fn shift_times(v: &mut Value, shift: f64) {
    if let Value::Object(m) = v {
        for key in ["lc", "lu"] {
            if let Some(t) = m.get(key).and_then(Value::as_f64) {
                m.insert(key.into(), json!(t + shift));
            }
        }
    }
}

/// Gives a compressed state or diff a fresh context id (string or object form kept).
fn new_context(v: &mut Value, id: String) {
    if let Some(c) = v.get_mut("c") {
        match c {
            Value::String(s) => *s = id,
            Value::Object(m) => {
                m.insert("id".into(), Value::String(id));
            }
            _ => {}
        }
    }
}

/// Numeric states move, so a replayed change is a real change (HA sends nothing otherwise).
fn vary_state(v: &mut Value, n: u64) {
    if let Some(Value::String(s)) = v.get_mut("s")
        && let Ok(x) = s.parse::<f64>()
    {
        *s = format!("{:.1}", x + (n % 97) as f64 / 10.0);
    }
}

fn renamed(entity_id: &str, copy: usize) -> String {
    format!("{entity_id}_{copy}")
}

fn build_stream(
    version: &str,
    entities: usize,
    events: usize,
    framing: Framing,
    seed: u64,
) -> Stream {
    let initial: Value = serde_json::from_str(&fixture(version, "subscribe_entities_initial.json"))
        .expect("initial snapshot");
    let templates: Map<String, Value> = initial["event"]["a"]
        .as_object()
        .expect("snapshot `a`")
        .clone();
    let copies = entities.div_ceil(templates.len()).max(1);
    let mut snapshot = Map::new();
    for copy in 0..copies {
        for (id, state) in &templates {
            let mut s = state.clone();
            new_context(&mut s, ulid((copy * templates.len()) as u64));
            snapshot.insert(renamed(id, copy), s);
        }
    }
    let excluded = |id: &str| {
        ["media_player.", "camera.", "automation."]
            .iter()
            .any(|d| id.starts_with(d))
    };
    let tracked_entities = snapshot.keys().filter(|id| !excluded(id)).count();
    let snapshot_entities = snapshot.len();
    let snapshot_frame =
        json!({"id": entities_id(version), "type": "event", "event": {"a": snapshot}}).to_string();

    // The recorded scene, one update per entry.
    let mut scene = Vec::new();
    for line in fixture(version, "subscribe_entities_events.jsonl").lines() {
        let v: Value = serde_json::from_str(line).expect("event line");
        let ev = &v["event"];
        for (id, s) in ev.get("a").and_then(Value::as_object).into_iter().flatten() {
            scene.push(Update::Add(id.clone(), s.clone()));
        }
        for (id, d) in ev.get("c").and_then(Value::as_object).into_iter().flatten() {
            scene.push(Update::Change(id.clone(), d.clone()));
        }
        for id in ev.get("r").and_then(Value::as_array).into_iter().flatten() {
            scene.push(Update::Remove(id.as_str().expect("entity id").to_owned()));
        }
    }
    assert!(!scene.is_empty(), "the fixture has events");

    let mut rng = fastrand::Rng::with_seed(seed);
    let mut messages = Vec::with_capacity(events);
    let mut n: u64 = 0;
    let mut replay: u64 = 0;
    while messages.len() < events {
        let copy = rng.usize(..copies);
        replay += 1;
        let shift = replay as f64 * 10.0;
        for update in &scene {
            if messages.len() == events {
                break;
            }
            n += 1;
            let event = match update {
                Update::Add(id, s) => {
                    let mut s = s.clone();
                    shift_times(&mut s, shift);
                    new_context(&mut s, ulid(n));
                    vary_state(&mut s, n);
                    json!({"a": {renamed(id, copy): s}})
                }
                Update::Change(id, d) => {
                    let mut d = d.clone();
                    if let Some(plus) = d.get_mut("+") {
                        shift_times(plus, shift);
                        new_context(plus, ulid(n));
                        vary_state(plus, n);
                    }
                    json!({"c": {renamed(id, copy): d}})
                }
                Update::Remove(id) => json!({"r": [renamed(id, copy)]}),
            };
            messages.push(
                json!({"type": "event", "event": event, "id": entities_id(version)}).to_string(),
            );
        }
    }

    // Framing, as HA's `websocket_api/http.py` writer does with coalesce_messages.
    let mut frames = Vec::new();
    let mut arrays = 0;
    let mut i = 0;
    while i < messages.len() {
        let coalesce = match framing {
            Framing::Single => false,
            Framing::Coalesced => true,
            // About half the events in arrays: an array holds ~20 messages on average.
            Framing::Mixed => rng.usize(..21) == 0,
        };
        let k = if coalesce {
            rng.usize(1..=MAX_COALESCED).min(messages.len() - i)
        } else {
            1
        };
        if coalesce && k > 1 {
            frames.push(format!("[{}]", messages[i..i + k].join(",")));
            arrays += 1;
        } else {
            frames.push(messages[i].clone());
        }
        i += k;
    }
    let bytes = frames.iter().map(String::len).sum();
    Stream {
        snapshot: snapshot_frame,
        frames,
        events,
        tracked_entities,
        snapshot_entities,
        arrays,
        bytes,
    }
}

/// A hub as the daemon builds it from the default config (filter excludes media_player,
/// camera, automation; update mode; 10,000 entries), and a session brought to `Syncing` with
/// the recorded handshake.
fn daemon_state(version: &str) -> (Rc<Hub>, Session) {
    let config = parse_config(
        "[ha]\nurl = \"http://127.0.0.1:9\"\n[dbus]\nbus = \"none\"\n",
        Vec::new(),
    )
    .expect("bench config");
    let rest = RestClient::new(&config.ha.url, Secret::new("bench"), None);
    let hub = Rc::new(Hub::new(Rc::new(config), rest));
    let t = Instant::now();
    let secs = Duration::from_secs;
    let mut session = Session::new(Secret::new("bench"), hub.ha_filter(), secs(30), secs(10), t);
    let mut out = Vec::new();
    for frame in [
        fixture(version, "auth_required.json"),
        fixture(version, "auth_ok.json"),
        with_id(&fixture(version, "get_config_result.json"), CONFIG_ID),
    ] {
        session
            .handle_frame(frame.trim(), t, &mut out)
            .expect("handshake frame");
    }
    assert_eq!(
        session.phase(),
        Phase::Syncing,
        "the recorded handshake reaches the subscription"
    );
    if entities_id(version) != 4 {
        // HA >= 2024.4: get_states (4) is answered before subscribe_entities goes out.
        session
            .handle_frame(
                &with_id(&fixture(version, "get_states_result.json"), 4),
                t,
                &mut out,
            )
            .expect("get_states frame");
    }
    let asked = out.iter().any(|o| matches!(o, Output::Send(t) if t.contains("\"subscribe_entities\"") && t.contains(&format!("\"id\":{}", entities_id(version)))));
    assert!(
        asked,
        "{version}: subscribe_entities has id {}",
        entities_id(version)
    );
    (hub, session)
}

/// What the link does with the session's outputs (sending frames aside): every mirror
/// update goes through `Hub::apply`, the fan-out to `/api/stream` included.
fn apply(hub: &Hub, out: &mut Vec<Output>) {
    for output in out.drain(..) {
        if let Ok(update) = MirrorUpdate::try_from(output) {
            hub.apply(update);
        }
    }
}

/// Feeds every frame once, as the link task does (one `Instant::now()` per frame).
#[inline(never)]
fn pass(hub: &Hub, session: &mut Session, frames: &[String], out: &mut Vec<Output>) {
    for frame in frames {
        if session
            .handle_frame(black_box(frame), Instant::now(), out)
            .is_err()
        {
            hub.count_decode_error();
        }
        apply(hub, out);
    }
}

fn ready(version: &str, stream: &Stream) -> (Rc<Hub>, Session) {
    let (hub, mut session) = daemon_state(version);
    let mut out = Vec::new();
    session
        .handle_frame(&stream.snapshot, Instant::now(), &mut out)
        .expect("snapshot frame");
    apply(&hub, &mut out);
    assert_eq!(session.phase(), Phase::Live);
    (hub, session)
}

fn check(hub: &Hub, events: u64) {
    let status = hub.status();
    assert_eq!(
        status.mirror.decode_errors, 0,
        "every synthetic frame decodes"
    );
    assert_eq!(
        status.store.failed_updates, 0,
        "every synthetic diff applies"
    );
    assert_eq!(
        status.mirror.events_received, events,
        "the hub counted every entity update"
    );
}

/// Time this thread has spent on a CPU (`/proc/thread-self/schedstat`, first field, ns), so a
/// rate per CPU second can be given besides the wall-clock one when the machine is shared.
/// `None` where the file does not exist (not Linux, or no schedstats).
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace()
        .next()?
        .parse()
        .ok()
        .map(Duration::from_nanos)
}

fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n);
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn main() {
    let args = parse_args();
    let mut results = Vec::new();
    for &framing in &args.framings {
        let stream = build_stream(&args.version, args.entities, args.events, framing, 0x5eed);
        eprintln!(
            "ingest[{}]: HA {} fixtures, {} entities in the snapshot ({} tracked), {} events in {} frames ({} coalesced arrays, {:.1} MB)",
            framing.name(),
            args.version,
            stream.snapshot_entities,
            stream.tracked_entities,
            stream.events,
            stream.frames.len(),
            stream.arrays,
            stream.bytes as f64 / 1e6
        );
        let (hub, mut session) = ready(&args.version, &stream);
        let base = hub.status().mirror.events_received;
        let mut out = Vec::new();
        if let Some(passes) = args.passes {
            for _ in 0..passes {
                pass(&hub, &mut session, &stream.frames, &mut out);
            }
            let events = (passes * stream.events) as u64;
            check(&hub, base + events);
            println!(
                "RESULT frames={} passes={passes} events={events}",
                framing.name()
            );
            continue;
        }
        // Warm-up pass (page faults, allocator pools), then timed rounds of whole passes.
        pass(&hub, &mut session, &stream.frames, &mut out);
        let (mut rates, mut cpu_rates) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            let (mut events, start, cpu0) = (0u64, Instant::now(), thread_cpu());
            loop {
                pass(&hub, &mut session, &stream.frames, &mut out);
                events += stream.events as u64;
                if start.elapsed().as_secs_f64() >= args.seconds {
                    break;
                }
            }
            rates.push(events as f64 / start.elapsed().as_secs_f64());
            if let (Some(a), Some(b)) = (cpu0, thread_cpu()) {
                cpu_rates.push(events as f64 / (b - a).as_secs_f64());
            }
        }
        let total = hub.status().mirror.events_received - base;
        check(&hub, base + total);
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let wall = median(&mut rates);
        let cpu = median(&mut cpu_rates);
        println!(
            "ingest[{}]: {} events/s per CPU second ({:.0} ns/event), {} events/s wall clock; median of {} rounds of {:.1} s; {} tracked entities; applied {}, filtered out {}",
            framing.name(),
            thousands(cpu),
            1e9 / cpu,
            thousands(wall),
            rates.len(),
            args.seconds,
            hub.status().tracked,
            hub.status().mirror.events_applied,
            hub.status().mirror.events_filtered_out,
        );
        results.push(format!(
            "{0}_events_per_sec={1:.0} {0}_ns_per_event={2:.1} {0}_wall_events_per_sec={3:.0}",
            framing.name(),
            cpu,
            1e9 / cpu,
            wall
        ));
    }
    if !results.is_empty() {
        println!(
            "RESULT entities={} events={} {}",
            args.entities,
            args.events,
            results.join(" ")
        );
    }
}
