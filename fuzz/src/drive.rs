//! What each fuzz target does with its input, in plain functions so that the stable test
//! `tests/fuzz_regressions.rs` (which compiles this file with `#[path]`) replays the seeds
//! and every saved finding through exactly the same code path as libFuzzer does.
//!
//! Every function must be free of panics for any input; the invariants checked with
//! `assert!` are ones a user would notice if broken (a state served as an empty body, a
//! body length beyond the limit the daemon promises).
//!
//! - [`http_request`]: `hass_edge::http::parse_head`, then what `http.rs` `read_request`
//!   and `api.rs` do with a complete head: split the target at `?`, decode the query with
//!   `form_urlencoded::parse`, read the flags and `entity_id` selections, check entity ids.
//! - [`ha_frame`]: a [`Session`] driven to `Live` with frames recorded from real HA
//!   (`tests/fixtures/<version>/`, as `tests/golden_replay.rs` does), then the input as one
//!   text frame; every output goes through [`Mirror::apply`] as the link's do, every change
//!   is formatted as the SSE event `sse.rs` would send, and every stored state is serialised.
//! - [`config`]: `hass_edge::config::parse_config(text, [])`, and on success what
//!   `check-config` and the filter do with the result.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hass_edge::config::{Config, Secret};
use hass_edge::filter::EntityFilter;
use hass_edge::mirror::{Mirror, Update};
use hass_edge::session::{Output, Phase, Session};
use hass_edge::store::Change;
use serde_json::Value;

// ------------------------------------------------------------------------ http_request

/// Bytes as a request arriving on the local API.
pub fn http_request(data: &[u8]) {
    let parsed = match hass_edge::http::parse_head(data) {
        Ok(Some(parsed)) => parsed,
        // More bytes needed, or a refusal (400/411/413/431): the daemon writes the error.
        Ok(None) => return,
        Err(response) => {
            assert!(
                matches!(response.status, 400 | 411 | 413 | 431),
                "refusal with status {}",
                response.status
            );
            return;
        }
    };
    let (head, head_len) = parsed;
    assert!(
        head_len <= data.len(),
        "head length {head_len} beyond the {} bytes given",
        data.len()
    );
    assert!(head_len <= hass_edge::http::MAX_HEAD_BYTES);
    assert!(head.content_length <= hass_edge::http::MAX_BODY_BYTES);
    assert!(head.target.starts_with('/'));
    // As `read_request` builds the `Request`.
    let (path, query) = head.target.split_once('?').unwrap_or((&head.target, ""));
    let query: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let value = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    // As `api.rs` reads it: `?refresh=`, `?snapshot=`, `?entity_id=` selections, the id in
    // `/api/states/{entity_id}` and the `{domain}/{service}` of a service call.
    let _ = matches!(value("refresh"), Some("" | "1" | "true" | "yes"));
    let selection = hass_edge::broadcast::Selection::parse(value("entity_id").unwrap_or(""));
    let _ = selection.matches("light.kitchen");
    if let Some(id) = path.strip_prefix("/api/states/")
        && hass_edge::entity::valid_entity_id(id)
    {
        assert!(id.is_ascii() && id.contains('.'));
    }
    if let Some(rest) = path.strip_prefix("/api/services/") {
        let _ = rest.split_once('/');
    }
}

// ------------------------------------------------------------------------ ha_frame

/// The recorded frames that bring a session to `Live`: `(version, auth_required, auth_ok,
/// get_config result, first subscribe_entities event, get_states result)`.
struct Recording {
    version: &'static str,
    auth_required: &'static str,
    auth_ok: &'static str,
    get_config: &'static str,
    snapshot: &'static str,
    get_states: &'static str,
}

const RECORDINGS: [Recording; 2] = [
    Recording {
        version: "2024.3.3",
        auth_required: include_str!("../../tests/fixtures/2024.3.3/auth_required.json"),
        auth_ok: include_str!("../../tests/fixtures/2024.3.3/auth_ok.json"),
        get_config: include_str!("../../tests/fixtures/2024.3.3/get_config_result.json"),
        snapshot: include_str!("../../tests/fixtures/2024.3.3/subscribe_entities_initial.json"),
        get_states: include_str!("../../tests/fixtures/2024.3.3/get_states_result.json"),
    },
    Recording {
        version: "2025.4.4",
        auth_required: include_str!("../../tests/fixtures/2025.4.4/auth_required.json"),
        auth_ok: include_str!("../../tests/fixtures/2025.4.4/auth_ok.json"),
        get_config: include_str!("../../tests/fixtures/2025.4.4/get_config_result.json"),
        snapshot: include_str!("../../tests/fixtures/2025.4.4/subscribe_entities_initial.json"),
        get_states: include_str!("../../tests/fixtures/2025.4.4/get_states_result.json"),
    },
];

/// The id seeds give the entity subscription: what `subscribe_entities` gets on a fresh
/// connection to HA 2024.3.3 (after `supported_features` 1, `subscribe_events
/// homeassistant_started` 2, `get_config` 3). On HA ≥ 2024.4 `get_states` goes first and
/// takes 4; [`ha_frame`] maps `"id":4` in the input to that session's subscription id, so the
/// same seeds reach the subscription on both versions.
pub const ENTITIES_ID: u64 = 4;

/// Rewrites a recorded frame's `id` (the recordings come from other sessions). Cached: the
/// ids a fresh session uses are always the same, and re-serialising the recordings on every
/// input would cost more than the input itself.
fn with_id(frame: &'static str, id: u64) -> &'static str {
    static CACHE: Mutex<Vec<(usize, u64, &'static str)>> = Mutex::new(Vec::new());
    let key = frame.as_ptr() as usize;
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, s)) = cache.iter().find(|(k, i, _)| *k == key && *i == id) {
        return s;
    }
    let mut v: Value = serde_json::from_str(frame).expect("fixture frames are JSON");
    v["id"] = id.into();
    let s: &'static str = Box::leak(v.to_string().into_boxed_str());
    cache.push((key, id, s));
    s
}

/// The id of the command of type `kind` among the frames the session asked to send.
fn sent_id(out: &[Output], kind: &str) -> Option<u64> {
    out.iter().find_map(|o| match o {
        Output::Send(text) => {
            let v: Value = serde_json::from_str(text).ok()?;
            (v["type"] == kind).then(|| v["id"].as_u64()).flatten()
        }
        _ => None,
    })
}

/// A session + mirror as the daemon holds them once live.
struct Live {
    session: Session,
    mirror: Mirror,
    now: Instant,
    /// The last message id sent to HA (ids must strictly increase, else HA answers `id_reuse`).
    last_id: u64,
    /// The id of the entity subscription.
    entities_id: u64,
}

impl Live {
    fn new(rec: &'static Recording, filter: &EntityFilter) -> Live {
        let now = Instant::now();
        let secs = Duration::from_secs;
        let mut live = Live {
            session: Session::new(
                Secret::new("fuzz-token"),
                filter.ha_filter(),
                secs(30),
                secs(10),
                now,
            ),
            mirror: Mirror::new(
                &hass_edge::config::parse_config("", Vec::<(String, String)>::new())
                    .expect("the default config parses")
                    .cache,
                filter.clone(),
                now,
            ),
            now,
            last_id: 0,
            entities_id: 0,
        };
        let mut out = Vec::new();
        for frame in [rec.auth_required.trim(), rec.auth_ok.trim()] {
            live.feed_setup(frame, &mut out);
        }
        let config_id = sent_id(&out, "get_config").expect("get_config sent after auth_ok");
        live.feed_setup(with_id(rec.get_config, config_id), &mut out);
        // HA >= 2024.4: get_states first; subscribe_entities is sent once it is answered.
        if let Some(states_id) = sent_id(&out, "get_states") {
            live.feed_setup(with_id(rec.get_states, states_id), &mut out);
        }
        let entities_id =
            sent_id(&out, "subscribe_entities").expect("subscribe_entities sent once RUNNING");
        live.entities_id = entities_id;
        live.feed_setup(with_id(rec.snapshot, entities_id), &mut out);
        assert_eq!(
            live.session.phase(),
            Phase::Live,
            "{}: the recorded snapshot makes the session live",
            rec.version
        );
        live
    }

    fn feed_setup(&mut self, frame: &str, out: &mut Vec<Output>) {
        let start = out.len();
        self.session
            .handle_frame(frame, self.now, out)
            .expect("recorded frames decode");
        let new: Vec<Output> = out.drain(start..).collect();
        for o in &new {
            if let Output::Send(text) = o {
                out.push(Output::Send(text.clone()));
            }
        }
        self.apply(new, false);
    }

    /// What the link does with each output (the mirror step, [`Mirror::apply`]), and what
    /// HA requires of the frames we send. With `publish_changes` the changes are formatted as
    /// SSE events (skipped while setting up, to keep the fuzzer fast; golden_replay.rs covers
    /// the recorded frames).
    fn apply(&mut self, outputs: Vec<Output>, publish_changes: bool) {
        for output in outputs {
            let output = match Update::try_from(output) {
                Ok(update) => {
                    let applied = self.mirror.apply(update, self.now);
                    if publish_changes {
                        publish(&applied.changes);
                    }
                    continue;
                }
                Err(output) => output,
            };
            if let Output::Send(text) = output {
                // What we send HA must be JSON with a fresh, larger id (only `auth` has none).
                let v: Value = serde_json::from_str(&text).expect("frames we send are JSON");
                assert!(v.get("type").is_some_and(Value::is_string));
                match v["id"].as_u64() {
                    Some(id) => {
                        assert!(
                            id > self.last_id,
                            "id {id} sent after id {}: HA would answer id_reuse",
                            self.last_id
                        );
                        self.last_id = id;
                    }
                    None => {
                        assert_eq!(v["type"], "auth", "only auth goes without an id: {text}")
                    }
                }
            }
        }
    }

    /// What `/api/states`, `/api/states/{id}` and `/api/stream?snapshot=1` serve.
    fn serve_all(&mut self) {
        let states = self.mirror.tracked_states();
        let list = serde_json::to_vec(&states).expect("a state list serialises");
        let parsed: Value = serde_json::from_slice(&list).expect("/api/states is JSON");
        let ids: Vec<&str> = parsed
            .as_array()
            .expect("/api/states is a list")
            .iter()
            .filter_map(|s| s["entity_id"].as_str())
            .collect();
        assert_eq!(
            ids.len(),
            states.len(),
            "every state in /api/states has its entity_id"
        );
        for state in &states {
            // `/api/states/{entity_id}`: the same bytes as in the list (serialised alike).
            let text = state.to_json();
            assert!(
                text.starts_with("{\"entity_id\":") && text.ends_with('}'),
                "state of {} serialised as {text:?}",
                state.entity_id
            );
            assert!(
                self.mirror.filter().tracks(&state.entity_id),
                "{} is stored but not tracked",
                state.entity_id
            );
            let _ = self.mirror.lookup(&state.entity_id, self.now);
        }
    }
}

/// `sse.rs` formats each change once for all stream clients.
fn publish(changes: &[Change]) {
    for c in changes {
        let event = hass_edge::sse::format_change(c);
        let data = event
            .strip_prefix("event: state_changed\ndata: ")
            .and_then(|d| d.strip_suffix("\n\n"));
        let parsed = data.map(serde_json::from_str::<Value>);
        assert!(
            matches!(parsed, Some(Ok(Value::Object(_)))),
            "SSE event for {} is not one JSON object: {event:?}",
            c.entity_id
        );
    }
}

/// Bytes as one WebSocket text frame from HA on a live connection. The input's length
/// picks the recorded HA version (even: 2024.3.3, no `last_reported`, no `get_states`;
/// odd: 2025.4.4), which halves the set-up cost per input; the fuzzer reaches
/// both by adding a byte, and [`ha_frame_all_versions`] (the regression test) runs both.
/// Input that is not UTF-8 is dropped (tungstenite refuses such text frames).
pub fn ha_frame(data: &[u8]) {
    ha_frame_on(&RECORDINGS[data.len() % 2], data);
}

/// [`ha_frame`] on every recorded HA version.
pub fn ha_frame_all_versions(data: &[u8]) {
    for rec in &RECORDINGS {
        ha_frame_on(rec, data);
    }
}

fn ha_frame_on(rec: &'static Recording, data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let filter = default_filter();
    let mut live = Live::new(rec, &filter);
    let mapped;
    let text = if live.entities_id == ENTITIES_ID {
        text
    } else {
        let id = live.entities_id;
        mapped = text
            .replace("\"id\":4,", &format!("\"id\":{id},"))
            .replace("\"id\":4}", &format!("\"id\":{id}}}"));
        mapped.as_str()
    };
    let mut out = Vec::new();
    // An error is counted and logged by the daemon; whatever came before it is applied.
    let _ = live.session.handle_frame(text, live.now, &mut out);
    live.apply(out, true);
    // The timers run after every frame in the daemon.
    let mut out = Vec::new();
    let later = live.now + Duration::from_secs(31);
    live.session.poll_timers(later, &mut out);
    let _ = live.session.next_wakeup();
    live.apply(out, true);
    live.serve_all();
}

/// The filter of a default config (excludes `media_player`, `camera`, `automation`).
fn default_filter() -> EntityFilter {
    static FILTER: std::sync::OnceLock<EntityFilter> = std::sync::OnceLock::new();
    FILTER
        .get_or_init(|| {
            let config = hass_edge::config::parse_config("", Vec::<(String, String)>::new())
                .expect("the default config is valid");
            EntityFilter::new(&config.filter)
        })
        .clone()
}

// ------------------------------------------------------------------------ config

/// Bytes as the config file's text (not UTF-8: `Config::load` fails reading it first).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = hass_edge::config::parse_config(text, Vec::<(String, String)>::new()) else {
        return;
    };
    check_valid(&config);
}

/// What the daemon does with a config that parsed: `check-config` prints it, the filter is
/// built and its HA-side form sent.
fn check_valid(config: &Config) {
    let toml = config.to_toml();
    assert!(
        !toml.starts_with("# cannot render config"),
        "a valid config must render: {toml}"
    );
    let filter = EntityFilter::new(&config.filter);
    let _ = filter.tracks("light.kitchen");
    if let Some(v) = filter.ha_filter() {
        assert!(v.is_object());
    }
    assert!(config.cache.max_entities >= 1);
    assert!(config.heartbeat.interval >= Duration::from_secs(1));
    let ws = &config.ha.websocket_url;
    assert!(ws.starts_with("ws://") || ws.starts_with("wss://"), "{ws}");
    // The derived URLs are what the WebSocket and REST clients will parse; a config that
    // validates must not yield one they refuse (that would surface only at connect time).
    assert!(
        ws.parse::<ureq::http::Uri>().is_ok(),
        "ha.url {:?} gives an unusable WebSocket URL {ws:?}",
        config.ha.url
    );
    assert!(
        config.ha.url.parse::<ureq::http::Uri>().is_ok(),
        "ha.url {:?} does not round-trip",
        config.ha.url
    );
}
