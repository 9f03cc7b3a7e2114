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
//! - [`entity_id`] (issue 13): `hass_edge::entity::valid_entity_id` on any text (an id it
//!   accepts is safe as a D-Bus string and in a URL path), and the text as an entity id
//!   inside HA frames (added, changed, removed) to a live mirror, which must store only ids
//!   that `valid_entity_id` accepts.
//! - [`sse_selection`] (issue 13): `hass_edge::broadcast::Selection::parse` + `matches`
//!   against a naive reference ([`reference_matches`]) on any list and ids.
//! - [`state_file`] (issue 13): `hass_edge::persist::decode` on any bytes, and
//!   `persist::load` / `files::read_regular` on the bytes as a regular file, through a
//!   symbolic link, and on a FIFO, a socket, a directory and a device, none of which may be
//!   read, waited on or moved.
//! - [`ws_session`] (issue 16): `hass_edge::ws_api::LocalSession`, the local WebSocket API's
//!   session, driven through auth and then any client frames and mirror changes against a
//!   small fake `View`, with HA's message shapes and id rules checked on everything it does.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hass_edge::config::{Config, Secret};
use hass_edge::filter::EntityFilter;
use hass_edge::mirror::{Mirror, Update};
use hass_edge::session::{Output, Phase, Session};
use hass_edge::store::Change;
use serde_json::{Map, Value};

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
    // The body's limits depend on where the request goes (`http::body_refusal`): a local
    // route's, or a forwarded one's (`http.max_forward_body_bytes`, its default and its
    // upper bound).
    for limit in [
        hass_edge::http::MAX_BODY_BYTES,
        hass_edge::config::DEFAULT_FORWARD_BODY_BYTES,
        hass_edge::config::MAX_FORWARD_BODY_BYTES,
    ] {
        match hass_edge::http::body_refusal(&head, limit) {
            Some(r) => assert!(matches!(r.status, 411 | 413), "refusal {}", r.status),
            None => assert!(head.content_length <= limit && !head.chunked),
        }
    }
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
        assert_stored_ids_valid(&self.mirror);
    }
}

/// Whether [`assert_stored_ids_valid`] is enforced: `true` since `src/mirror.rs` validates
/// the ids HA sends (8fd9b5d). Before that, the mirror stored all 15 bad ids of the
/// `hand-bad-id-*` seeds of `ha_frame` and of the `entity_id` seeds (NUL, newline, quotes,
/// `..`, `/`, 10 KB), and this check failed on each.
pub const STORED_IDS_MUST_BE_VALID: bool = true;

/// Issue 13, item 4: whatever HA sends, the mirror stores (and so persists, serves over
/// HTTP and SSE and sends over D-Bus) only ids of HA's shape. See
/// [`STORED_IDS_MUST_BE_VALID`].
fn assert_stored_ids_valid(mirror: &Mirror) {
    if !STORED_IDS_MUST_BE_VALID {
        return;
    }
    for state in mirror.tracked_states() {
        assert!(
            hass_edge::entity::valid_entity_id(&state.entity_id),
            "the mirror stored the invalid entity id {:?}",
            state.entity_id
        );
    }
}

/// `sse.rs` formats each change once for all stream clients.
fn publish(changes: &[Change]) {
    for c in changes {
        let event = hass_edge::sse::format_change(c);
        let data = event
            .strip_prefix("data: ")
            .and_then(|d| d.strip_suffix("\n\n"))
            .filter(|d| !d.contains('\n'));
        let parsed = data.map(serde_json::from_str::<Value>);
        assert!(
            matches!(&parsed, Some(Ok(Value::Object(o))) if o["event_type"] == "state_changed"),
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
    // Issue 13: `check-config` prints the URL and the daemon logs it; it must hold no
    // user info (a password).
    assert!(
        !config.ha.url.contains('@') && !ws.contains('@'),
        "ha.url {:?} with user info accepted",
        config.ha.url
    );
}

// ------------------------------------------------------------------------ entity_id

/// Bytes as an entity id (lossily as UTF-8: HA's frames are JSON text). Checks what
/// `valid_entity_id` promises the rest of the daemon, then sends the id to a live mirror in
/// an added state, a diff and a removal, as [`ha_frame`] does with whole frames.
pub fn entity_id(data: &[u8]) {
    let id = String::from_utf8_lossy(data);
    let id = id.as_ref();
    if hass_edge::entity::valid_entity_id(id) {
        // A D-Bus string is UTF-8 without NUL (D-Bus specification, "Basic types"); an
        // id with a NUL made the bus daemon drop our connection (issue 13, item 4).
        assert!(!id.contains('\0'), "valid id with NUL: {id:?}");
        // Used unescaped in HA's REST paths (`/api/states/{entity_id}`) and in JSON.
        assert!(id.len() <= 255, "valid id of {} bytes", id.len());
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.'),
            "valid id with other characters: {id:?}"
        );
        assert_eq!(id.matches('.').count(), 1, "{id:?}");
        assert!(!id.contains(".."), "{id:?}");
    }
    let json_id = serde_json::to_string(id).expect("a string serialises");
    let frames = [
        format!(
            r#"{{"id":4,"type":"event","event":{{"a":{{{json_id}:{{"s":"on","a":{{"friendly_name":"x"}},"c":"01C","lc":1795349249.5}}}}}}}}"#
        ),
        format!(
            r#"{{"id":4,"type":"event","event":{{"c":{{{json_id}:{{"+":{{"s":"off","lu":1795349250.5}}}}}}}}}}"#
        ),
        format!(r#"{{"id":4,"type":"event","event":{{"r":[{json_id}]}}}}"#),
    ];
    // One live session per input (the set-up dominates): add, change, remove in turn.
    let rec = &RECORDINGS[data.len() % 2];
    let mut live = Live::new(rec, &default_filter());
    for frame in frames {
        let frame = frame.replace("\"id\":4,", &format!("\"id\":{},", live.entities_id));
        let mut out = Vec::new();
        let _ = live.session.handle_frame(&frame, live.now, &mut out);
        live.apply(out, true);
        live.serve_all();
    }
}

// ------------------------------------------------------------------------ sse_selection

/// What README promises for `?entity_id=`: comma-separated entries, white space around each
/// trimmed, empty ones ignored; an entry ending in `*` is a prefix (that one `*` stripped),
/// one ending in `.` is a prefix, any other is an exact id; no entry selects everything.
/// Written as plainly as possible, to judge [`hass_edge::broadcast::Selection`]'s index.
pub fn reference_matches(list: &str, entity_id: &str) -> bool {
    reference_matches_entries(&reference_entries(list), entity_id)
}

/// The entries of `list` as [`reference_matches`] reads them: split at `,`, trimmed, empty
/// ones dropped.
fn reference_entries(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect()
}

/// [`reference_matches`] on entries already split (the fuzzer tries hundreds of ids per list).
fn reference_matches_entries(entries: &[&str], entity_id: &str) -> bool {
    if entries.is_empty() {
        return true;
    }
    for entry in entries {
        if let Some(prefix) = entry.strip_suffix('*') {
            if entity_id.starts_with(prefix) {
                return true;
            }
        } else if entry.ends_with('.') {
            if entity_id.starts_with(entry) {
                return true;
            }
        } else if entity_id == *entry {
            return true;
        }
    }
    false
}

/// Bytes (lossily as UTF-8) as `<selection list>\n<id>\n<id>…`. Every id, and ids made from
/// each entry (itself, one character shorter, one longer, with and without its `*`), must be
/// matched as [`reference_matches`] says.
pub fn sse_selection(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (list, ids) = text.split_once('\n').unwrap_or((&text, ""));
    let selection = hass_edge::broadcast::Selection::parse(list);
    let mut candidates: Vec<String> = ids.split('\n').map(str::to_owned).collect();
    for entry in list.split(',').take(64) {
        let entry = entry.trim();
        let bare = entry.trim_end_matches('*');
        let mut shorter = bare.to_owned();
        shorter.pop();
        candidates.extend([
            entry.to_owned(),
            bare.to_owned(),
            shorter,
            format!("{bare}x"),
            format!("{bare}.x"),
            format!("{entry}_"),
        ]);
    }
    candidates.extend(["light.kitchen".to_owned(), String::new()]);
    let entries = reference_entries(list);
    for id in &candidates {
        assert_eq!(
            selection.matches(id),
            reference_matches_entries(&entries, id),
            "selection {list:?} on {id:?}"
        );
    }
}

// ------------------------------------------------------------------------ state_file

/// The kinds of path [`state_file`] offers `load`.
const STATE_FILE_KINDS: u8 = 7;

/// A private directory with one FIFO and one listening socket, made once per process.
fn special_files() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hass-edge-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("dir")).expect("create the fuzz temp dir");
        let made = std::process::Command::new("mkfifo")
            .arg(dir.join("fifo"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(made, "mkfifo in {}", dir.display());
        let listener = std::os::unix::net::UnixListener::bind(dir.join("sock"))
            .expect("bind a socket in the fuzz temp dir");
        // Kept for the life of the process, so the socket stays a listening one.
        std::mem::forget(listener);
        std::os::unix::fs::symlink(dir.join("fifo"), dir.join("link-to-fifo")).ok();
        std::os::unix::fs::symlink("/dev/null", dir.join("link-to-null")).ok();
        dir
    })
}

/// Bytes as a state file: `decode` on them must agree with `load` on them as a regular file
/// (directly and through a symbolic link), a file over `files::read_regular`'s limit must be
/// refused, and `load` on a FIFO, socket, directory or device must return at once (libFuzzer's
/// `-timeout` catches a hang), neither reading nor moving it. The first byte picks the kind
/// of path; the second the size limit given to `read_regular`.
pub fn state_file(data: &[u8]) {
    use hass_edge::files::{FileKind, ReadError, read_regular};
    use hass_edge::persist::{self, PersistError};

    let decoded = persist::decode(data);
    if let Ok(saved) = &decoded {
        // What decodes re-encodes to a file that decodes to the same states.
        let states: Vec<std::rc::Rc<_>> =
            saved.states.iter().cloned().map(std::rc::Rc::new).collect();
        let again = persist::decode(&persist::encode(&states, saved.saved_at))
            .expect("an encoded file decodes");
        assert_eq!(again, *saved);
    }
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let dir = special_files();
    let special = |name: &str, want: FileKind| {
        let path = dir.join(name);
        match persist::load(&path) {
            Err(PersistError::NotRegular { kind, .. }) => assert_eq!(kind, want, "{name}"),
            other => panic!("load({name}) gave {other:?}"),
        }
        assert!(
            std::fs::symlink_metadata(&path).is_ok(),
            "{name} was moved or removed"
        );
        assert!(!persist::corrupt_path(&path).exists(), "{name} moved aside");
    };
    match kind % STATE_FILE_KINDS {
        0 | 1 => {
            // A regular file holding the rest, read directly or through a symbolic link.
            let path = dir.join("states.json");
            std::fs::write(&path, rest).expect("write the temp state file");
            let link = dir.join("link-to-states");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&path, &link).expect("symlink");
            let target = if kind % STATE_FILE_KINDS == 0 {
                &path
            } else {
                &link
            };
            let limit = u64::from(rest.first().copied().unwrap_or(0)) * 4;
            match read_regular(target, limit) {
                Ok(bytes) => assert!(bytes == rest && rest.len() as u64 <= limit),
                Err(ReadError::TooLarge { bytes, .. }) => {
                    assert!(rest.len() as u64 > limit && bytes == rest.len() as u64)
                }
                Err(e) => panic!("read_regular on a regular file: {e}"),
            }
            let loaded = persist::load(target);
            match (&persist::decode(rest), loaded) {
                (Ok(want), Ok(Some(got))) => assert_eq!(*want, got),
                (
                    Err(want),
                    Err(PersistError::Corrupt {
                        error, moved_to, ..
                    }),
                ) => {
                    assert_eq!(*want, error);
                    assert!(moved_to.is_some(), "a regular file is moved aside");
                }
                (want, got) => panic!("decode says {want:?}, load says {got:?}"),
            }
            let _ = std::fs::remove_file(persist::corrupt_path(target));
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(&link);
        }
        2 => special("fifo", FileKind::Fifo),
        3 => special("link-to-fifo", FileKind::Fifo),
        4 => special("sock", FileKind::Socket),
        5 => special("dir", FileKind::Directory),
        _ => special("link-to-null", FileKind::CharDevice),
    }
}

// ------------------------------------------------------------------------ ws_session

/// The states the fake [`FuzzView`] holds (HA's REST shape), and the canned changes a
/// `!` line picks from by byte.
const WS_STATES: [&str; 4] = [
    r#"{"entity_id":"light.kitchen","state":"on","attributes":{"friendly_name":"Kitchen","brightness":255},"last_changed":"2026-11-22T12:07:28+00:00","last_reported":"2026-11-22T12:07:29.500000+00:00","last_updated":"2026-11-22T12:07:28.000001+00:00","context":{"id":"01C1","parent_id":null,"user_id":null}}"#,
    r#"{"entity_id":"switch.fan","state":"off","attributes":{},"last_changed":"2026-11-22T12:07:28+00:00","last_updated":"2026-11-22T12:07:28+00:00","context":{"id":"01C2","parent_id":"01P","user_id":"u1"}}"#,
    r#"{"entity_id":"sensor.noisy_1","state":"21.5","attributes":{"unit_of_measurement":"°C","x":[1,{"y":null}]},"last_changed":"2026-11-22T12:07:28+00:00","last_updated":"2026-11-22T12:07:30+00:00","context":{"id":"01C3","parent_id":null,"user_id":null}}"#,
    r#"{"entity_id":"input_boolean.quote\"d","state":"on\n\u0000","attributes":{"a\"b":"\u2028"},"last_changed":"1970-01-01T00:00:00+00:00","last_updated":"9999-12-31T23:59:59.999999+00:00","context":{"id":"","parent_id":null,"user_id":null}}"#,
];

/// A small mirror as one client may see it: `sensor.noisy*` is outside the dashboards'
/// allowlist (`shows`), `camera.*` is not followed (subscriptions to it are forwarded);
/// `get_services` and the area registry are cached.
struct FuzzView {
    states: Vec<std::rc::Rc<hass_edge::entity::EntityState>>,
    read_only: bool,
    has_config: bool,
}

impl hass_edge::ws_api::View for FuzzView {
    fn states(&self) -> Vec<std::rc::Rc<hass_edge::entity::EntityState>> {
        self.states
            .iter()
            .filter(|s| self.shows(&s.entity_id))
            .cloned()
            .collect()
    }
    fn shows(&self, entity_id: &str) -> bool {
        !entity_id.starts_with("sensor.noisy") && self.follows(entity_id)
    }
    fn state(&self, entity_id: &str) -> Option<std::rc::Rc<hass_edge::entity::EntityState>> {
        self.states
            .iter()
            .find(|s| s.entity_id == entity_id)
            .cloned()
    }
    fn follows(&self, entity_id: &str) -> bool {
        !entity_id.starts_with("camera.")
    }
    fn ha_config(&self) -> Option<std::rc::Rc<str>> {
        self.has_config
            .then(|| std::rc::Rc::from(r#"{"version":"2025.4.4","components":["light"]}"#))
    }
    fn cached(&self, command_type: &str) -> Option<std::rc::Rc<str>> {
        match command_type {
            "get_services" => Some(std::rc::Rc::from(r#"{"light":{"turn_on":{}}}"#)),
            "config/area_registry/list" => Some(std::rc::Rc::from("[]")),
            _ => None,
        }
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
}

fn ws_state(json: &str) -> Option<std::rc::Rc<hass_edge::entity::EntityState>> {
    serde_json::from_str(json).ok().map(std::rc::Rc::new)
}

/// The changes of a `!` line: the rest as JSON `[[entity_id, old|null, new|null,
/// [lc, lu]?], …]` with states in HA's REST shape (and HA's floats for the new one), or,
/// when it is not that, one canned change per byte.
fn ws_changes(rest: &[u8]) -> Vec<Change> {
    if let Ok(Value::Array(list)) = serde_json::from_slice::<Value>(rest) {
        let mut changes = Vec::new();
        for item in list.iter().take(64) {
            let Some(item) = item.as_array() else {
                continue;
            };
            let Some(entity_id) = item.first().and_then(Value::as_str) else {
                continue;
            };
            let state = |v: Option<&Value>| -> Option<hass_edge::entity::EntityState> {
                let mut v = v?.clone();
                if let Value::Object(m) = &mut v {
                    m.insert("entity_id".into(), entity_id.into());
                }
                serde_json::from_value(v).ok()
            };
            let old = state(item.get(1));
            let mut new = state(item.get(2));
            if let (Some(new), Some(Value::Array(epoch))) = (new.as_mut(), item.get(3)) {
                new.epoch.last_changed = epoch.first().and_then(Value::as_f64);
                new.epoch.last_updated = epoch.get(1).and_then(Value::as_f64);
            }
            changes.push(Change {
                entity_id: entity_id.to_owned(),
                old_state: old.map(std::rc::Rc::new),
                new_state: new.map(std::rc::Rc::new),
            });
        }
        return changes;
    }
    let states: Vec<_> = WS_STATES.iter().filter_map(|s| ws_state(s)).collect();
    rest.iter()
        .take(64)
        .map(|&b| {
            let s = &states[usize::from(b) % states.len()];
            let mut changed = (**s).clone();
            changed.state = format!("{}{}", s.state, b);
            if b & 0x40 != 0 {
                changed.attributes = serde_json::from_str(r#"{"friendly_name":"Renamed","new":1}"#)
                    .expect("attributes parse");
            }
            changed.last_updated = hass_edge::entity::Timestamp(s.last_updated.0 + 1_000_001);
            let (old, new) = match b >> 6 {
                0 => (Some(s.clone()), Some(std::rc::Rc::new(changed))),
                1 => (None, Some(s.clone())),
                2 => (Some(s.clone()), None),
                _ => (Some(s.clone()), Some(s.clone())),
            };
            Change {
                entity_id: s.entity_id.clone(),
                old_state: old,
                new_state: new,
            }
        })
        .collect()
}

/// What the fuzzer's model expects of one session: the subscriptions answered locally, and
/// the last id the session gave the I/O side to forward or unsubscribe.
#[derive(Default)]
struct WsModel {
    /// Ids of the client's subscriptions answered from the mirror, still open, and whether
    /// each is an unfiltered `subscribe_entities` (the ones the allowlist applies to).
    local: BTreeMap<u64, bool>,
    /// The last `client_id` of a `Forward` or `Unsubscribe`.
    last_forwarded: u64,
    /// A `Close` was produced.
    closed: bool,
}

/// Checks one message sent to the client: JSON, one of HA's message types, and an id as HA
/// gives it. `frame_ids`: the ids of the messages in the frame being answered (`None`
/// outside a frame: the auth verdict, the mirror's changes).
fn ws_check_sent(text: &str, frame_ids: Option<&[u64]>) -> Value {
    let v: Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("message to the client is not JSON ({e}): {text:?}"));
    let kind = v["type"]
        .as_str()
        .unwrap_or_else(|| panic!("no type: {text}"));
    match kind {
        "auth_ok" | "auth_invalid" | "auth_required" => {
            assert!(v.get("id").is_none(), "{text}");
            return v;
        }
        "result" | "pong" | "event" => {}
        other => panic!("message type {other:?} is not one HA sends: {text}"),
    }
    let invalid_format = kind == "result"
        && v["success"] == false
        && v["error"]["code"] == "invalid_format"
        && v["error"]["message"] == "Message incorrectly formatted.";
    if kind == "result" {
        assert!(v["success"].is_boolean(), "result without success: {text}");
        if v["success"] == false {
            assert!(
                v["error"]["code"].is_string() && v["error"]["message"].is_string(),
                "error without code and message: {text}"
            );
        }
    }
    if invalid_format {
        // HA echoes whatever `id` the message had (`connection.py`), or 0 for a non-object.
        return v;
    }
    let id = v["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("{kind} without an integer id: {text}"));
    assert!(id > 0, "id 0 outside invalid_format: {text}");
    if let Some(ids) = frame_ids {
        assert!(
            ids.contains(&id),
            "answer for id {id}, which the frame did not carry: {text}"
        );
    }
    v
}

/// The object messages of a frame by id (the first of each id: a later one is `id_reuse`).
fn ws_frame_messages(text: &str) -> Vec<(u64, Map<String, Value>)> {
    let mut out: Vec<(u64, Map<String, Value>)> = Vec::new();
    let mut add = |v: Value| {
        if let Value::Object(m) = v
            && let Some(id) = m.get("id").and_then(Value::as_u64)
            && !out.iter().any(|(i, _)| *i == id)
        {
            out.push((id, m));
        }
    };
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Array(list)) => list.into_iter().for_each(&mut add),
        Ok(v) => add(v),
        Err(_) => {}
    }
    out
}

/// The bytes as a local WebSocket API session (`hass_edge::ws_api::LocalSession`, issue 16)
/// against a small fake mirror. Layout: the first byte holds flags (bit 0: the token is an HA
/// user's, [`Mode::User`](hass_edge::ws_api::Mode), else hass-edge's own; bit 1: read-only;
/// bit 2: the token is refused; bit 3: no `get_config` yet; bit 4: a frame arrives before the
/// verdict); then `\n`-separated text frames, the first in the auth phase. A line starting
/// with `!` is not a frame but a batch of mirror changes ([`ws_changes`]) handed to
/// `changes()`; one starting with `~` is a change of the dashboards' allowlist handed to
/// `reveal()` (per byte: a canned state added, or with the high bit its id removed). Lines that are not UTF-8 are dropped (tungstenite refuses such text frames).
///
/// Checks: no panic; every message to the client is JSON of one of HA's types, with an
/// integer id the frame carried (or HA's `invalid_format` shape with the id it was given);
/// the ids forwarded or unsubscribed strictly increase; nothing is forwarded with
/// hass-edge's token in read-only mode; forwarded commands carry a type and no id; change
/// events go only to open local subscriptions, an allowlist change only to unfiltered
/// `subscribe_entities` ones (one `a` and one `r` event each); after `Close` nothing more
/// comes.
pub fn ws_session(data: &[u8]) {
    use hass_edge::ws_api::{Action, LocalSession, Mode, Phase};
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mode = if flags & 1 != 0 {
        Mode::User
    } else {
        Mode::Edge
    };
    let view = FuzzView {
        states: WS_STATES.iter().filter_map(|s| ws_state(s)).collect(),
        read_only: flags & 2 != 0,
        has_config: flags & 8 == 0,
    };
    assert_eq!(
        view.states.len(),
        WS_STATES.len(),
        "the canned states parse"
    );
    ws_check_sent(&LocalSession::auth_required("2025.4.4"), None);
    let mut session = LocalSession::new();
    let mut model = WsModel::default();
    let broadcast = hass_edge::broadcast::Broadcast::default();
    let mut feed = broadcast
        .subscribe_session(hass_edge::broadcast::Selection::default())
        .expect("one session fits");
    for line in rest.split(|&b| b == b'\n') {
        if let Some(changes) = line.strip_prefix(b"!") {
            // Events made the way the daemon makes them: published, then read from the
            // session's subscription.
            broadcast.publish(&ws_changes(changes), Instant::now());
            let mut events = Vec::new();
            while let Some(e) = feed.try_recv() {
                events.push(e);
            }
            let mut msgs = Vec::new();
            session.changes(&events, &view, &mut msgs);
            if model.closed {
                // The I/O side has stopped reading the mirror for this session by then.
                continue;
            }
            assert_eq!(
                session.has_local_subscriptions(),
                !model.local.is_empty(),
                "has_local_subscriptions disagrees with the subscriptions answered: {:?}",
                model.local
            );
            for m in &msgs {
                let v = ws_check_sent(m, None);
                assert_eq!(v["type"], "event", "{m}");
                let id = v["id"].as_u64().unwrap_or_default();
                assert!(
                    model.local.contains_key(&id),
                    "change event for {id}, not an open local subscription ({:?}): {m}",
                    model.local
                );
            }
            continue;
        }
        if let Some(picks) = line.strip_prefix(b"~") {
            let (mut added, mut removed) = (Vec::new(), Vec::new());
            for &b in picks.iter().take(16) {
                let s = &view.states[usize::from(b & 0x7f) % view.states.len()];
                if b & 0x80 == 0 {
                    added.push(s.clone());
                } else {
                    removed.push(s.entity_id.clone());
                }
            }
            let mut msgs = Vec::new();
            session.reveal(&added, &removed, &mut msgs);
            if model.closed {
                continue;
            }
            let unfiltered = model.local.values().filter(|u| **u).count();
            let want =
                unfiltered * (usize::from(!added.is_empty()) + usize::from(!removed.is_empty()));
            assert_eq!(msgs.len(), want, "{msgs:?} for {:?}", model.local);
            for m in &msgs {
                let v = ws_check_sent(m, None);
                assert_eq!(v["type"], "event", "{m}");
                let id = v["id"].as_u64().unwrap_or_default();
                assert_eq!(
                    model.local.get(&id),
                    Some(&true),
                    "allowlist change for {id}, not an unfiltered subscribe_entities: {m}"
                );
                let event = v["event"].as_object().expect("an event object");
                if let Some(a) = event.get("a") {
                    assert_eq!(
                        a.as_object().map(|a| a.len()),
                        Some(
                            added
                                .iter()
                                .map(|s| &s.entity_id)
                                .collect::<std::collections::HashSet<_>>()
                                .len()
                        ),
                        "{m}"
                    );
                } else {
                    assert_eq!(
                        event["r"].as_array().map(Vec::len),
                        Some(removed.len()),
                        "{m}"
                    );
                }
            }
            continue;
        }
        let Ok(text) = std::str::from_utf8(line) else {
            continue;
        };
        let phase_before = session.phase();
        let mut out = Vec::new();
        session.handle_text(text, &view, &mut out);
        // A message of many states is checked whole, after checking that its pieces (at a
        // size the input picks) make exactly that text.
        let out: Vec<Action> = out
            .into_iter()
            .map(|a| match a {
                Action::SendPiecewise(m) => {
                    let whole = m.whole();
                    let limit = 1 + usize::from(flags >> 4) * 64;
                    let (mut next, mut joined) = (0, Vec::new());
                    loop {
                        let upto = joined.len() + limit;
                        if m.write_piece(&mut next, &mut joined, upto) {
                            break;
                        }
                    }
                    assert_eq!(
                        joined,
                        whole.as_bytes(),
                        "the pieces of a message are not the message"
                    );
                    assert_eq!(m.rendered_len(), whole.len(), "a message's counted length");
                    Action::Send(whole)
                }
                a => a,
            })
            .collect();
        if model.closed {
            assert!(
                out.is_empty(),
                "after Close, frame {text:?} produced {out:?}"
            );
            assert_eq!(session.phase(), Phase::Closed);
            continue;
        }
        let messages = ws_frame_messages(text);
        let ids: Vec<u64> = messages.iter().map(|(id, _)| *id).collect();
        let mut authorize = None;
        if let Some(i) = out.iter().position(|a| matches!(a, Action::Close(_))) {
            assert_eq!(i, out.len() - 1, "actions after Close: {out:?}");
            assert_eq!(session.phase(), Phase::Closed);
        }
        if phase_before == Phase::Authorizing {
            assert!(out.is_empty(), "answered before the verdict: {out:?}");
        }
        for action in &out {
            match action {
                Action::Send(t) => {
                    let v = ws_check_sent(t, Some(&ids));
                    if phase_before == Phase::AwaitAuth {
                        assert_eq!(v["type"], "auth_invalid", "{t}");
                        continue;
                    }
                    assert!(v["type"] != "auth_ok" && v["type"] != "auth_invalid", "{t}");
                    // A subscription answered here opens; an unsubscribe answered here
                    // ends one.
                    if v["type"] == "result" && v["success"] == true {
                        let id = v["id"].as_u64().unwrap_or_default();
                        let m = &messages
                            .iter()
                            .find(|(i, _)| *i == id)
                            .expect("id checked")
                            .1;
                        match m.get("type").and_then(Value::as_str) {
                            Some("subscribe_entities") => {
                                // HA: an empty list is no selection.
                                let unfiltered = m
                                    .get("entity_ids")
                                    .is_none_or(|e| e.as_array().is_some_and(Vec::is_empty));
                                model.local.insert(id, unfiltered);
                                assert!(
                                    model.local.len() <= hass_edge::ws_api::MAX_LOCAL_SUBSCRIPTIONS,
                                    "more local subscriptions than the bound: {:?}",
                                    model.local
                                );
                            }
                            Some("subscribe_events") => {
                                model.local.insert(id, false);
                                assert!(
                                    model.local.len() <= hass_edge::ws_api::MAX_LOCAL_SUBSCRIPTIONS,
                                    "more local subscriptions than the bound: {:?}",
                                    model.local
                                );
                            }
                            Some("unsubscribe_events") => {
                                let sub = m.get("subscription").and_then(Value::as_u64);
                                assert!(
                                    sub.is_some_and(|s| model.local.remove(&s).is_some()),
                                    "unsubscribe {id} answered here, of no local subscription: {t}"
                                );
                            }
                            _ => {}
                        }
                    }
                }
                Action::Authorize(token) => {
                    assert_eq!(
                        phase_before,
                        Phase::AwaitAuth,
                        "Authorize after the auth phase"
                    );
                    assert_eq!(session.phase(), Phase::Authorizing);
                    authorize = Some(token.clone());
                }
                Action::Forward {
                    client_id,
                    command,
                    subscription,
                } => {
                    assert!(
                        matches!(phase_before, Phase::Ready(_)),
                        "forwarded in {phase_before:?}"
                    );
                    assert!(
                        !(mode == Mode::Edge && view.read_only),
                        "forwarded with hass-edge's token in read-only mode: {command:?}"
                    );
                    assert!(
                        *client_id > model.last_forwarded,
                        "forwarded id {client_id} after {}: the link would map ids out of order",
                        model.last_forwarded
                    );
                    model.last_forwarded = *client_id;
                    assert!(
                        ids.contains(client_id),
                        "forwarded id {client_id} not in the frame"
                    );
                    assert!(
                        !command.contains_key("id"),
                        "forwarded with its id: {command:?}"
                    );
                    let kind = command.get("type").and_then(Value::as_str);
                    assert!(kind.is_some_and(|k| !k.is_empty()), "no type: {command:?}");
                    assert_eq!(
                        *subscription,
                        hass_edge::ws_api::opens_subscription(kind.unwrap_or_default())
                    );
                }
                Action::Unsubscribe {
                    client_id,
                    subscription,
                } => {
                    assert!(
                        !(mode == Mode::Edge && view.read_only),
                        "unsubscribe forwarded with hass-edge's token in read-only mode"
                    );
                    assert!(
                        *client_id > model.last_forwarded,
                        "unsubscribe id {client_id} after {}",
                        model.last_forwarded
                    );
                    model.last_forwarded = *client_id;
                    assert!(ids.contains(client_id));
                    assert!(
                        !model.local.contains_key(subscription),
                        "unsubscribe of local subscription {subscription} sent to HA"
                    );
                }
                Action::Close(_) => model.closed = true,
                Action::SendPiecewise(_) => panic!("made whole above"),
            }
        }
        if phase_before == Phase::AwaitAuth && !model.closed {
            assert!(
                authorize.is_some(),
                "the auth phase ended without a verdict asked: {out:?}"
            );
            // Optionally a frame that arrives before the verdict: HA reads nothing then.
            if flags & 16 != 0 {
                let mut early = Vec::new();
                session.handle_text(r#"{"id":1,"type":"ping"}"#, &view, &mut early);
                assert!(early.is_empty(), "answered before the verdict: {early:?}");
            }
            let mut out = Vec::new();
            if flags & 4 != 0 {
                session.refused(&mut out);
                assert_eq!(out.len(), 2, "{out:?}");
                assert!(
                    matches!(&out[0], Action::Send(t) if ws_check_sent(t, None)["type"] == "auth_invalid")
                );
                assert!(matches!(out[1], Action::Close(_)));
                model.closed = true;
            } else {
                session.authorized(mode, "2025.4.4", &mut out);
                assert!(
                    matches!(&out[..], [Action::Send(t)] if ws_check_sent(t, None)["type"] == "auth_ok"),
                    "{out:?}"
                );
                assert_eq!(session.phase(), Phase::Ready(mode));
            }
        }
        if model.closed {
            assert_eq!(session.phase(), Phase::Closed);
        }
    }
}
