//! A fake Home Assistant for faults a real one cannot produce on demand.
//!
//! It serves the WebSocket API (`GET /api/websocket`) and the REST read
//! (`GET /api/states/<entity_id>`) on one port, as HA does, and speaks the protocol of one
//! recorded HA version (`tests/fixtures/<version>/`): the recorded `auth_required`,
//! `auth_ok`, `auth_invalid` (then Close 1000), `get_config` (RUNNING), `pong` and result
//! frames with the client's ids echoed; `get_states` (the map, as REST serves it); `id_reuse` for ids that do not increase; the
//! `subscribe_entities` snapshot and events built from its own entity map in HA's compressed
//! format (with HA's server-side `include`/`exclude` filter from 2024.9, and 2024.3.3's
//! `invalid_format` refusal of it).
//!
//! The test drives it from its own thread: change the entity map (quietly, or pushed to the
//! live subscribers as a real `c`/`a`/`r` event), push raw frames, stop answering pings,
//! drop or close every connection, refuse new ones; and it observes what the daemon did:
//! sessions, auth attempts with times, pings, REST requests, protocol errors and a transcript
//! (printed when a test fails).
//!
//! It runs on its own thread with a smol `LocalExecutor`; the state is shared behind a
//! `Mutex` that is never held across an `.await`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Message;
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use serde_json::{Map, Value, json};
use smol::channel::{Receiver, Sender};
use smol::future::FutureExt;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::{TcpListener, TcpStream};
use smol::stream::StreamExt;
use smol::{LocalExecutor, Timer};

use super::fixtures::{self, Fixtures};

/// The token the fake accepts (distinctive, so a leak into a log is easy to find).
pub const TOKEN: &str = "fake-ha-token.Zq3xW9-long-lived-access-token";

/// The HA user behind changes the fake makes (as a REST/UI caller would be).
pub const USER_ID: &str = "5d0c1f2a9b8e4c7d8a6b5c4d3e2f1a0b";

/// Largest HTTP request head the fake reads.
const MAX_HEAD: usize = 16 * 1024;

/// Bound on the transcript kept for failure reports.
const TRANSCRIPT_LINES: usize = 4000;

/// How one WebSocket session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client sent a Close frame (its code).
    ClientClosed(Option<u16>),
    /// The client's TCP connection ended without a Close frame.
    ClientGone(String),
    /// [`FakeHa::drop_all`]: the fake dropped TCP without a Close frame.
    DroppedByFake,
    /// The fake sent a Close frame (after `auth_invalid`, or [`FakeHa::close_all`]).
    ClosedByFake(u16),
    /// The fake was shut down.
    FakeStopped,
}

/// What the fake knows about one WebSocket session.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// 1-based, in connection order.
    pub number: usize,
    /// When the WebSocket handshake completed.
    pub opened: Instant,
    /// `auth_ok` was sent.
    pub authenticated: bool,
    /// The id of the live `subscribe_entities` subscription, if any.
    pub subscription: Option<u64>,
    /// The `include`/`exclude` keys of that subscription, as sent.
    pub ha_filter: Option<Value>,
    /// Whether the client enabled `coalesce_messages`.
    pub coalescing: bool,
    /// App-level `ping` messages received.
    pub pings: usize,
    /// Protocol-level Pong frames received (answers to [`FakeHa::push_burst`]'s ping).
    pub protocol_pongs: usize,
    /// `get_states` commands answered.
    pub get_states: usize,
    /// Pings on this session go unanswered ([`FakeHa::mute_pongs`]).
    pub pongs_muted: bool,
    /// Whether the client sent a Close frame.
    pub client_sent_close: bool,
    /// How and when it ended; `None` while open.
    pub ended: Option<(Instant, SessionEnd)>,
}

/// One `auth` message.
#[derive(Debug, Clone)]
pub struct AuthAttempt {
    /// When it arrived.
    pub at: Instant,
    /// Whether the token was right.
    pub accepted: bool,
    /// Which of the accepted tokens it was: 0 for [`TOKEN`], n for the n-th of
    /// [`FakeHa::accept_token`]; `None` when refused.
    pub token_index: Option<usize>,
}

/// One REST request.
#[derive(Debug, Clone)]
pub struct RestRequest {
    /// When it arrived.
    pub at: Instant,
    /// Method.
    pub method: String,
    /// Path (with query).
    pub path: String,
    /// Whether it carried `Authorization: Bearer <TOKEN>`.
    pub authorized: bool,
    /// The status answered.
    pub status: u16,
    /// The request's headers, names in lower case, in order.
    pub headers: Vec<(String, String)>,
}

enum Command {
    Frame(String),
    /// Encoded frames written to the TCP stream in one write (see [`FakeHa::push_burst`]).
    Raw(Vec<u8>),
    Drop,
    Close(u16),
}

/// HA's entity filter (`helpers/entityfilter.py`, `_generate_filter_from_sets_and_pattern_lists`).
#[derive(Debug, Clone, Default)]
struct HaFilter {
    include_domains: Vec<String>,
    include_globs: Vec<String>,
    include_entities: Vec<String>,
    exclude_domains: Vec<String>,
    exclude_globs: Vec<String>,
    exclude_entities: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// `fnmatch` for the `*` and `?` that entity globs use.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match (pattern.first(), text.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob_match(&pattern[1..], text) || (!text.is_empty() && glob_match(pattern, &text[1..]))
        }
        (Some(b'?'), Some(_)) => glob_match(&pattern[1..], &text[1..]),
        (Some(p), Some(t)) if p == t => glob_match(&pattern[1..], &text[1..]),
        _ => false,
    }
}

impl HaFilter {
    fn from_request(msg: &Value) -> HaFilter {
        let (i, e) = (&msg["include"], &msg["exclude"]);
        HaFilter {
            include_domains: strings(&i["domains"]),
            include_globs: strings(&i["entity_globs"]),
            include_entities: strings(&i["entities"]),
            exclude_domains: strings(&e["domains"]),
            exclude_globs: strings(&e["entity_globs"]),
            exclude_entities: strings(&e["entities"]),
        }
    }

    fn passes(&self, entity_id: &str) -> bool {
        let domain = entity_id.split_once('.').map_or(entity_id, |(d, _)| d);
        let glob = |globs: &[String]| {
            globs
                .iter()
                .any(|g| glob_match(g.as_bytes(), entity_id.as_bytes()))
        };
        let in_list = |l: &[String]| l.iter().any(|x| x == entity_id);
        let include_de =
            self.include_domains.iter().any(|d| d == domain) || glob(&self.include_globs);
        let exclude = in_list(&self.exclude_entities)
            || self.exclude_domains.iter().any(|d| d == domain)
            || glob(&self.exclude_globs);
        let have_include = !(self.include_domains.is_empty()
            && self.include_globs.is_empty()
            && self.include_entities.is_empty());
        let have_exclude = !(self.exclude_domains.is_empty()
            && self.exclude_globs.is_empty()
            && self.exclude_entities.is_empty());
        match (have_include, have_exclude) {
            (false, false) => true,
            (true, false) => in_list(&self.include_entities) || include_de,
            (false, true) => !exclude,
            // With include domains/globs, HA ignores the exclude domains (HA-FACTS).
            (true, true) if !(self.include_domains.is_empty() && self.include_globs.is_empty()) => {
                in_list(&self.include_entities)
                    || (include_de
                        && !in_list(&self.exclude_entities)
                        && !glob(&self.exclude_globs))
            }
            (true, true) if !(self.exclude_domains.is_empty() && self.exclude_globs.is_empty()) => {
                in_list(&self.include_entities) || !exclude
            }
            (true, true) => in_list(&self.include_entities),
        }
    }
}

struct Conn {
    info: SessionInfo,
    filter: Option<HaFilter>,
    tx: Sender<Command>,
}

struct State {
    fixtures: Fixtures,
    token: String,
    /// Full HA state objects by entity id, in HA's order.
    entities: Map<String, Value>,
    conns: Vec<Conn>,
    auth_attempts: Vec<AuthAttempt>,
    rest: Vec<RestRequest>,
    tcp_accepts: usize,
    refused: usize,
    refusing: bool,
    rest_delay: Duration,
    protocol_errors: Vec<String>,
    transcript: VecDeque<String>,
    started: Instant,
    context_counter: u64,
    /// Every message received after `auth_ok`: (session number, message).
    commands: Vec<(usize, Value)>,
    /// Tokens accepted besides `token` (an HA user's, [`FakeHa::accept_token`]).
    other_tokens: Vec<String>,
    /// Command types whose next arrival drops its connection unanswered
    /// ([`FakeHa::drop_on_next`]).
    drop_next: Vec<String>,
    /// Command types whose next arrival is recorded and left for the test to answer
    /// ([`FakeHa::answer_next_by_hand`]).
    by_hand: Vec<String>,
}

impl State {
    fn note(&mut self, line: String) {
        if self.transcript.len() == TRANSCRIPT_LINES {
            self.transcript.pop_front();
        }
        let t = self.started.elapsed().as_secs_f64();
        let mut line = line;
        if line.len() > 400 {
            let mut cut = 400;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push('…');
        }
        self.transcript.push_back(format!("{t:8.3}s {line}"));
    }

    /// 0 for `token`, n for the n-th other token accepted; `None` for any other.
    fn token_index(&self, token: &str) -> Option<usize> {
        if token == self.token {
            return Some(0);
        }
        self.other_tokens
            .iter()
            .position(|t| t == token)
            .map(|i| i + 1)
    }

    fn protocol_error(&mut self, conn: usize, what: String) {
        self.note(format!("#{conn} PROTOCOL ERROR {what}"));
        self.protocol_errors.push(format!("session {conn}: {what}"));
    }

    fn conn(&mut self, number: usize) -> &mut Conn {
        &mut self.conns[number - 1]
    }

    /// The event body for `new`: a `c` diff when the entity exists, an `a` entry when not.
    fn change_body(&self, new: &Value) -> Value {
        let id = new["entity_id"].as_str().expect("entity_id");
        let sub_micro = self.fixtures.sub_microsecond_floats();
        match self.entities.get(id) {
            Some(old) => json!({"c": {id: fixtures::state_diff(old, new, sub_micro)}}),
            None => json!({"a": {id: fixtures::compressed_state(new, sub_micro)}}),
        }
    }

    /// Sends an event body to every live subscriber whose filter passes `entity_id` (all of
    /// them when `None`). Returns how many got it.
    fn broadcast(&mut self, entity_id: Option<&str>, body: &Value) -> usize {
        let mut sent = 0;
        let mut notes = Vec::new();
        for c in &self.conns {
            let (Some(sub), None) = (c.info.subscription, &c.info.ended) else {
                continue;
            };
            if let (Some(id), Some(f)) = (entity_id, &c.filter)
                && !f.passes(id)
            {
                continue;
            }
            let frame = event_frame(body, sub);
            notes.push(format!("#{} -> {frame}", c.info.number));
            if c.tx.try_send(Command::Frame(frame)).is_ok() {
                sent += 1;
            }
        }
        for n in notes {
            self.note(n);
        }
        sent
    }

    fn next_context_id(&mut self) -> String {
        // ULID-shaped (26 Crockford base32 characters), unique per fake.
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        self.context_counter += 1;
        let mut n = (fixtures::now_micros() as u128) << 40 | self.context_counter as u128;
        let mut id = [b'0'; 26];
        for c in id.iter_mut().rev() {
            *c = ALPHABET[(n % 32) as usize];
            n /= 32;
        }
        String::from_utf8(id.to_vec()).unwrap()
    }
}

/// One unmasked server frame (RFC 6455 §5.2): FIN, `opcode`, the payload length, the payload.
fn encode_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => v.push(n as u8),
        n if n <= 0xffff => {
            v.push(126);
            v.extend((n as u16).to_be_bytes());
        }
        n => {
            v.push(127);
            v.extend((n as u64).to_be_bytes());
        }
    }
    v.extend_from_slice(payload);
    v
}

/// `{"type":"event","event":…,"id":…}`, HA's key order for events.
fn event_frame(body: &Value, id: u64) -> String {
    format!(r#"{{"type":"event","event":{body},"id":{id}}}"#)
}

fn result_ok(id: u64) -> String {
    format!(r#"{{"id":{id},"type":"result","success":true,"result":null}}"#)
}

fn result_error(id: u64, code: &str, message: &str) -> String {
    json!({"id": id, "type": "result", "success": false, "error": {"code": code, "message": message}}).to_string()
}

/// The fake. Stops (and closes every socket) when dropped.
pub struct FakeHa {
    addr: SocketAddr,
    fixtures: Fixtures,
    shared: Arc<Mutex<State>>,
    stop: Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for FakeHa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeHa")
            .field("addr", &self.addr)
            .field("version", &self.fixtures.version)
            .finish()
    }
}

impl FakeHa {
    /// Starts a fake of HA `version` on `127.0.0.1:0`, holding the recorded entities
    /// ([`Fixtures::initial_states`]).
    pub fn start(version: &'static str) -> FakeHa {
        let fixtures = Fixtures::new(version);
        let mut entities = Map::new();
        for s in fixtures.initial_states() {
            entities.insert(s["entity_id"].as_str().unwrap().to_owned(), s);
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fake HA");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(State {
            fixtures,
            token: TOKEN.to_owned(),
            entities,
            conns: Vec::new(),
            auth_attempts: Vec::new(),
            rest: Vec::new(),
            tcp_accepts: 0,
            refused: 0,
            refusing: false,
            rest_delay: Duration::ZERO,
            protocol_errors: Vec::new(),
            transcript: VecDeque::new(),
            started: Instant::now(),
            context_counter: 0,
            commands: Vec::new(),
            other_tokens: Vec::new(),
            drop_next: Vec::new(),
            by_hand: Vec::new(),
        }));
        let (stop, stop_rx) = smol::channel::bounded::<()>(1);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fake-ha-{version}"))
            .spawn(move || {
                let executor = Rc::new(LocalExecutor::new());
                let listener = TcpListener::try_from(listener).expect("async listener");
                smol::block_on(executor.run(accept_loop(
                    listener,
                    thread_shared,
                    executor.clone(),
                    stop_rx,
                )));
            })
            .expect("spawn the fake HA thread");
        FakeHa {
            addr,
            fixtures,
            shared,
            stop,
            thread: Some(thread),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The recorded version this fake speaks.
    pub fn version(&self) -> &'static str {
        self.fixtures.version
    }

    /// Its recordings.
    pub fn fixtures(&self) -> Fixtures {
        self.fixtures
    }

    /// `http://127.0.0.1:<port>`, for `ha.url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    // ---- the entity map ------------------------------------------------------------------

    /// The full state of `entity_id`, as HA's REST would answer it.
    pub fn entity(&self, entity_id: &str) -> Option<Value> {
        self.state().entities.get(entity_id).cloned()
    }

    /// Every entity's full state.
    pub fn entities(&self) -> Vec<Value> {
        self.state().entities.values().cloned().collect()
    }

    /// The entities the daemon's default filter tracks, sorted by entity id (the order of
    /// the daemon's `/api/states`).
    pub fn tracked_entities(&self) -> Vec<Value> {
        let mut v: Vec<Value> = self
            .entities()
            .into_iter()
            .filter(|s| fixtures::tracked_by_default(s["entity_id"].as_str().unwrap()))
            .collect();
        v.sort_by(|a, b| a["entity_id"].as_str().cmp(&b["entity_id"].as_str()));
        v
    }

    /// Sets an entity in the map without telling anyone (a change while nobody listens).
    pub fn set_entity(&self, state: Value) {
        let id = state["entity_id"].as_str().expect("entity_id").to_owned();
        let mut st = self.state();
        st.note(format!("map: set {id}"));
        st.entities.insert(id, state);
    }

    /// Removes an entity from the map without telling anyone.
    pub fn remove_entity(&self, entity_id: &str) {
        let mut st = self.state();
        st.note(format!("map: remove {entity_id}"));
        st.entities.shift_remove(entity_id);
    }

    /// What HA would hold after a user changed `entity_id` now: `edit` changes `state` and/or
    /// `attributes`; the times and the context follow HA's rules (`last_changed` moves only
    /// with the state; `last_reported` = `last_updated`; a new context with the user's id).
    /// Not applied: pass it to [`FakeHa::push_change`] or [`FakeHa::set_entity`].
    pub fn next_state(&self, entity_id: &str, edit: impl FnOnce(&mut Value)) -> Value {
        let old = self
            .entity(entity_id)
            .unwrap_or_else(|| panic!("the fake has no {entity_id}"));
        let mut new = old.clone();
        edit(&mut new);
        let now = Self::tick(&old);
        if new["state"] != old["state"] {
            new["last_changed"] = now.clone().into();
        }
        new["last_updated"] = now.clone().into();
        if new.get("last_reported").is_some() {
            new["last_reported"] = now.into();
        }
        let context_id = self.state().next_context_id();
        new["context"] = json!({"id": context_id, "parent_id": null, "user_id": USER_ID});
        new
    }

    /// A new entity as HA would create it now (REST `POST /api/states/<id>` by a user).
    pub fn new_entity(&self, entity_id: &str, state: &str, attributes: Value) -> Value {
        let now = fixtures::iso_from_micros(fixtures::now_micros());
        let context_id = self.state().next_context_id();
        let mut m = Map::new();
        m.insert("entity_id".into(), entity_id.into());
        m.insert("state".into(), state.into());
        m.insert("attributes".into(), attributes);
        m.insert("last_changed".into(), now.clone().into());
        if self.fixtures.has_last_reported() {
            m.insert("last_reported".into(), now.clone().into());
        }
        m.insert("last_updated".into(), now.into());
        m.insert(
            "context".into(),
            json!({"id": context_id, "parent_id": null, "user_id": USER_ID}),
        );
        Value::Object(m)
    }

    /// A timestamp strictly after the old state's (the recorded ones may lie in the future).
    fn tick(old: &Value) -> String {
        let prev = old["last_updated"]
            .as_str()
            .map(fixtures::micros_from_iso)
            .unwrap_or(0);
        fixtures::iso_from_micros(fixtures::now_micros().max(prev + 1_000))
    }

    /// Applies `new` to the map and pushes it to the live subscribers as HA would: a `c` diff
    /// when the entity exists, an `a` entry when it is new. Returns how many subscribers
    /// got the event.
    pub fn push_change(&self, new: Value) -> usize {
        let id = new["entity_id"].as_str().expect("entity_id").to_owned();
        let mut st = self.state();
        let body = st.change_body(&new);
        st.entities.insert(id.clone(), new);
        st.broadcast(Some(&id), &body)
    }

    /// Applies the changes in `news` to the map and writes their events to every live
    /// subscriber (filters ignored) in one TCP write, each its own frame, with a protocol
    /// Ping right behind the first: the daemon reads frames that follow a large one in the
    /// same read. Returns how many subscribers got them.
    pub fn push_burst(&self, news: Vec<Value>) -> usize {
        let mut st = self.state();
        let bodies: Vec<Value> = news
            .into_iter()
            .map(|new| {
                let body = st.change_body(&new);
                st.entities.insert(
                    new["entity_id"].as_str().expect("entity_id").to_owned(),
                    new,
                );
                body
            })
            .collect();
        let mut sent = 0;
        for c in &st.conns {
            let (Some(sub), None) = (c.info.subscription, &c.info.ended) else {
                continue;
            };
            let mut raw = Vec::new();
            for (i, body) in bodies.iter().enumerate() {
                raw.extend(encode_frame(0x1, event_frame(body, sub).as_bytes()));
                if i == 0 {
                    raw.extend(encode_frame(0x9, b"fake-ha"));
                }
            }
            sent += usize::from(c.tx.try_send(Command::Raw(raw)).is_ok());
        }
        st.note(format!("burst of {} events", bodies.len()));
        sent
    }

    /// Removes `entity_id` from the map and pushes an `r` event.
    pub fn push_remove(&self, entity_id: &str) -> usize {
        let mut st = self.state();
        st.entities.shift_remove(entity_id);
        st.broadcast(Some(entity_id), &json!({"r": [entity_id]}))
    }

    /// The `c` entry that turns the map's state of the entity into `new` (for composing
    /// events by hand); the map is not changed.
    pub fn diff_to(&self, new: &Value) -> Value {
        let st = self.state();
        let id = new["entity_id"].as_str().unwrap();
        let old = st
            .entities
            .get(id)
            .unwrap_or_else(|| panic!("the fake has no {id}"));
        fixtures::state_diff(old, new, st.fixtures.sub_microsecond_floats())
    }

    /// Sends an event body verbatim (wrapped as `{"type":"event","event":…,"id":<sub>}`) to
    /// every live subscriber; the map is not changed.
    pub fn push_event(&self, body: Value) -> usize {
        self.state().broadcast(None, &body)
    }

    /// Sends the text `frame(subscription_id)` to every live subscriber; the map is not
    /// changed.
    pub fn push_frame(&self, frame: impl Fn(u64) -> String) -> usize {
        let mut st = self.state();
        let mut sent = 0;
        let mut notes = Vec::new();
        for c in &st.conns {
            if let (Some(sub), None) = (c.info.subscription, &c.info.ended) {
                let text = frame(sub);
                notes.push(format!("#{} -> {text}", c.info.number));
                sent += usize::from(c.tx.try_send(Command::Frame(text)).is_ok());
            }
        }
        for n in notes {
            st.note(n);
        }
        sent
    }

    // ---- faults --------------------------------------------------------------------------

    fn end_all(&self, make: impl Fn() -> Command, what: &str) {
        let open: Vec<usize> = {
            let mut st = self.state();
            st.note(format!("fault: {what}"));
            let open: Vec<usize> = st
                .conns
                .iter()
                .filter(|c| c.info.ended.is_none())
                .map(|c| c.info.number)
                .collect();
            for &n in &open {
                let _ = st.conn(n).tx.try_send(make());
            }
            open
        };
        // Return once they are gone, so later map changes cannot reach the old sessions.
        super::wait_until(
            &format!("the fake to end sessions {open:?} ({what})"),
            Duration::from_secs(10),
            || {
                let st = self.state();
                let still: Vec<usize> = open
                    .iter()
                    .copied()
                    .filter(|&n| st.conns[n - 1].info.ended.is_none())
                    .collect();
                if still.is_empty() {
                    Ok(())
                } else {
                    Err(format!("still open: {still:?}"))
                }
            },
        );
    }

    /// Drops every WebSocket connection without a Close frame (HA 2024.3.3 on restart).
    pub fn drop_all(&self) {
        self.end_all(
            || Command::Drop,
            "drop every connection without a Close frame",
        );
    }

    /// Sends a Close frame with `code` on every WebSocket connection (HA 2025.4.4 on
    /// restart sends 1000).
    pub fn close_all(&self, code: u16) {
        self.end_all(
            || Command::Close(code),
            &format!("close every connection with {code}"),
        );
    }

    /// What the recorded version does on restart: 2024.3.3 drops TCP, 2025.4.4 sends Close
    /// 1000 (fixtures README).
    pub fn restart_like_ha(&self) {
        if self.version() == "2024.3.3" {
            self.drop_all()
        } else {
            self.close_all(1000)
        }
    }

    /// While set, new TCP connections are accepted and closed at once (HA down).
    pub fn set_refusing(&self, refusing: bool) {
        let mut st = self.state();
        st.note(format!("fault: refusing = {refusing}"));
        st.refusing = refusing;
    }

    /// Pings on the currently open sessions go unanswered (the TCP connection stays up).
    pub fn mute_pongs(&self) {
        let mut st = self.state();
        st.note("fault: pongs muted on the open sessions".into());
        for c in st.conns.iter_mut().filter(|c| c.info.ended.is_none()) {
            c.info.pongs_muted = true;
        }
    }

    /// Accepts `token` too (WebSocket auth and REST), as HA accepts each user's token;
    /// returns its index in [`AuthAttempt::token_index`].
    pub fn accept_token(&self, token: &str) -> usize {
        let mut st = self.state();
        st.note("another token accepted".into());
        st.other_tokens.push(token.to_owned());
        st.other_tokens.len()
    }

    /// The next command of type `kind` (on any session) is not answered: its connection is
    /// dropped without a Close frame right after it arrives (HA dying mid-command). Once.
    pub fn drop_on_next(&self, kind: &str) {
        let mut st = self.state();
        st.note(format!("fault: drop the connection at the next {kind:?}"));
        st.drop_next.push(kind.to_owned());
    }

    /// The next command of type `kind` (on any session) is recorded in [`FakeHa::commands`]
    /// and not answered: the test answers it with [`FakeHa::send_to`] when it chooses (HA
    /// busy with a service call). Once.
    pub fn answer_next_by_hand(&self, kind: &str) {
        let mut st = self.state();
        st.note(format!("the next {kind:?} is answered by the test"));
        st.by_hand.push(kind.to_owned());
    }

    /// Sends the text `frame` on session `number` (1-based, see [`SessionInfo::number`]).
    /// Returns whether the session was open.
    pub fn send_to(&self, number: usize, frame: String) -> bool {
        let mut st = self.state();
        st.note(format!("#{number} -> {frame}"));
        let conn = st.conns.get(number.wrapping_sub(1));
        conn.is_some_and(|c| c.info.ended.is_none() && c.tx.try_send(Command::Frame(frame)).is_ok())
    }

    /// Delays every REST answer by `delay`.
    pub fn set_rest_delay(&self, delay: Duration) {
        self.state().rest_delay = delay;
    }

    // ---- observations --------------------------------------------------------------------

    /// Every WebSocket session so far.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.state().conns.iter().map(|c| c.info.clone()).collect()
    }

    /// Sessions that reached a live subscription.
    pub fn subscribed_sessions(&self) -> usize {
        self.state()
            .conns
            .iter()
            .filter(|c| c.info.subscription.is_some())
            .count()
    }

    /// Every message received after `auth_ok`, with its session number, in arrival order.
    pub fn commands(&self) -> Vec<(usize, Value)> {
        self.state().commands.clone()
    }

    /// Every `auth` message so far.
    pub fn auth_attempts(&self) -> Vec<AuthAttempt> {
        self.state().auth_attempts.clone()
    }

    /// Every REST request so far.
    pub fn rest_requests(&self) -> Vec<RestRequest> {
        self.state().rest.clone()
    }

    /// REST requests for `GET /api/states/<entity_id>`.
    pub fn rest_reads_of(&self, entity_id: &str) -> usize {
        let path = format!("/api/states/{entity_id}");
        self.state().rest.iter().filter(|r| r.path == path).count()
    }

    /// TCP connections refused while [`FakeHa::set_refusing`] was on.
    pub fn refused(&self) -> usize {
        self.state().refused
    }

    /// Every TCP connection accepted.
    pub fn tcp_accepts(&self) -> usize {
        self.state().tcp_accepts
    }

    /// What the daemon did that HA would object to (`id_reuse`, unknown commands, …).
    pub fn protocol_errors(&self) -> Vec<String> {
        self.state().protocol_errors.clone()
    }

    /// The frames and faults so far, one per line.
    pub fn transcript(&self) -> String {
        self.state()
            .transcript
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for FakeHa {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- fake HA {} transcript (last {TRANSCRIPT_LINES} lines) ----\n{}\n---- end of fake HA transcript ----",
                self.fixtures.version,
                self.transcript()
            );
        }
        self.stop.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Mutex<State>>,
    executor: Rc<LocalExecutor<'static>>,
    stop: Receiver<()>,
) {
    loop {
        let accepted = async { Some(listener.accept().await) }
            .or(async {
                let _ = stop.recv().await;
                None
            })
            .await;
        let stream = match accepted {
            None => return,
            Some(Ok((stream, _))) => stream,
            Some(Err(_)) => {
                Timer::after(Duration::from_millis(20)).await;
                continue;
            }
        };
        {
            let mut st = lock(&shared);
            st.tcp_accepts += 1;
            if st.refusing {
                st.refused += 1;
                st.note("refused a connection".into());
                drop(stream);
                continue;
            }
        }
        let (shared, stop) = (shared.clone(), stop.clone());
        executor
            .spawn(async move {
                let stop2 = stop.clone();
                handle_tcp(stream, shared, stop2)
                    .or(async {
                        let _ = stop.recv().await;
                    })
                    .await;
            })
            .detach();
    }
}

fn lock(shared: &Mutex<State>) -> MutexGuard<'_, State> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads a request head; returns it and the bytes read after it.
async fn read_head(stream: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Some((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = async { stream.read(&mut chunk).await.ok() }
            .or(async {
                Timer::at(deadline).await;
                None
            })
            .await?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn handle_tcp(mut stream: TcpStream, shared: Arc<Mutex<State>>, stop: Receiver<()>) {
    let Some((head, rest)) = read_head(&mut stream).await else {
        return;
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(&head), Ok(httparse::Status::Complete(_))) {
        let _ = respond(&mut stream, 400, "text/plain", "400: Bad Request").await;
        return;
    }
    let method = req.method.unwrap_or("").to_owned();
    let path = req.path.unwrap_or("").to_owned();
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
    };
    let upgrade = header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let all_headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).trim().to_owned(),
            )
        })
        .collect();
    let ws_key = header("sec-websocket-key");
    if path == "/api/websocket" && upgrade {
        let Some(key) = ws_key else {
            let _ = respond(&mut stream, 400, "text/plain", "400: Bad Request").await;
            return;
        };
        websocket(stream, &key, rest, shared, stop).await;
    } else {
        rest_request(stream, &method, &path, all_headers, &shared).await;
    }
}

async fn stream_big(stream: &mut TcpStream, n: usize) -> std::io::Result<()> {
    stream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await?;
    let piece = vec![b'x'; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(piece.len());
        stream.write_all(format!("{k:x}\r\n").as_bytes()).await?;
        stream.write_all(&piece[..k]).await?;
        stream.write_all(b"\r\n").await?;
        left -= k;
    }
    stream.write_all(b"0\r\n\r\n").await?;
    stream.flush().await
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Unknown",
    };
    let text = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(text.as_bytes()).await?;
    stream.flush().await
}

/// `GET /api/states/<entity_id>` as HA answers it (rest_samples.json): the state, 404
/// `{"message":"Entity not found."}`, or 401 `401: Unauthorized` without the right token.
async fn rest_request(
    mut stream: TcpStream,
    method: &str,
    path: &str,
    headers: Vec<(String, String)>,
    shared: &Mutex<State>,
) {
    let authorization = headers
        .iter()
        .find(|(n, _)| n == "authorization")
        .map(|(_, v)| v.as_str());
    let delay = lock(shared).rest_delay;
    if !delay.is_zero() {
        Timer::after(delay).await;
    }
    // `GET /fake/big/<bytes>`: a large body, chunked, written as it is produced (as HA's
    // aiohttp streams a big answer), for the forwarder's streaming tests.
    let big = path
        .strip_prefix("/fake/big/")
        .and_then(|n| n.parse::<usize>().ok());
    let (status, content_type, body) = {
        let mut st = lock(shared);
        let authorized = authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .is_some_and(|t| st.token_index(t).is_some());
        let (status, content_type, body) = if let Some(n) = big.filter(|_| authorized) {
            (200, "application/octet-stream", format!("{n}"))
        } else if !authorized {
            (401, "text/plain", "401: Unauthorized".to_owned())
        } else if path == "/api/" && method == "GET" {
            (
                200,
                "application/json",
                r#"{"message":"API running."}"#.to_owned(),
            )
        } else if let Some(id) = path
            .strip_prefix("/api/states/")
            .filter(|_| method == "GET")
        {
            match st.entities.get(id) {
                Some(state) => (200, "application/json", state.to_string()),
                None => (
                    404,
                    "application/json",
                    r#"{"message":"Entity not found."}"#.to_owned(),
                ),
            }
        } else if method != "GET" && path.starts_with("/api/states/") {
            (405, "text/plain", "405: Method Not Allowed".to_owned())
        } else {
            (404, "text/plain", "404: Not Found".to_owned())
        };
        st.note(format!(
            "REST {method} {path} (authorized: {authorized}) -> {status}"
        ));
        st.rest.push(RestRequest {
            at: Instant::now(),
            method: method.to_owned(),
            path: path.to_owned(),
            authorized,
            status,
            headers,
        });
        (status, content_type, body)
    };
    if let (Some(n), 200) = (big, status) {
        let _ = stream_big(&mut stream, n).await;
        return;
    }
    let _ = respond(&mut stream, status, content_type, &body).await;
}

/// What one client message makes the session do.
enum Reply {
    Send(String),
    /// Drop the TCP connection without a Close frame ([`FakeHa::drop_on_next`]).
    Drop,
    /// Send a Close frame with this code (then wait for the client to go).
    Close(u16),
}

/// Per-session protocol state that only the session task needs.
struct Protocol {
    number: usize,
    authenticated: bool,
    last_id: u64,
}

async fn websocket(
    mut stream: TcpStream,
    key: &str,
    rest: Vec<u8>,
    shared: Arc<Mutex<State>>,
    stop: Receiver<()>,
) {
    let accept = derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let mut ws = WebSocketStream::from_partially_read(stream, rest, Role::Server, None).await;
    let (tx, rx) = smol::channel::unbounded::<Command>();
    let (number, hello) = {
        let mut st = lock(&shared);
        let number = st.conns.len() + 1;
        st.conns.push(Conn {
            info: SessionInfo {
                number,
                opened: Instant::now(),
                authenticated: false,
                subscription: None,
                ha_filter: None,
                coalescing: false,
                pings: 0,
                protocol_pongs: 0,
                get_states: 0,
                pongs_muted: false,
                client_sent_close: false,
                ended: None,
            },
            filter: None,
            tx,
        });
        let hello = st.fixtures.text("auth_required.json");
        st.note(format!("#{number} connected"));
        st.note(format!("#{number} -> {hello}"));
        (number, hello)
    };
    let mut proto = Protocol {
        number,
        authenticated: false,
        last_id: 0,
    };
    let end = session_loop(&mut ws, hello, &mut proto, &shared, &rx, &stop).await;
    let mut st = lock(&shared);
    st.note(format!("#{number} ended: {end:?}"));
    st.conn(number).info.ended = Some((Instant::now(), end));
}

/// The end of a session the fake closed, once the client has closed TCP too (or at `until`).
/// As HA does (aiohttp's server): after its Close and the client's answer, HA waits for the
/// client to close the connection; a client that answers Close and keeps TCP open holds up
/// HA's stop until aiohttp's timeout (10 s).
async fn client_gone(
    ws: &mut WebSocketStream<TcpStream>,
    end: SessionEnd,
    until: Instant,
) -> SessionEnd {
    if matches!(end, SessionEnd::ClosedByFake(_)) {
        let mut buf = [0u8; 256];
        async { while let Ok(1..) = ws.get_mut().read(&mut buf).await {} }
            .or(async {
                Timer::at(until).await;
            })
            .await;
    }
    end
}

async fn session_loop(
    ws: &mut WebSocketStream<TcpStream>,
    hello: String,
    proto: &mut Protocol,
    shared: &Mutex<State>,
    commands: &Receiver<Command>,
    stop: &Receiver<()>,
) -> SessionEnd {
    enum Wake {
        Frame(Option<Result<Message, async_tungstenite::tungstenite::Error>>),
        Command(Option<Command>),
        Stop,
        CloseTimeout,
    }
    if ws.send(Message::text(hello)).await.is_err() {
        return SessionEnd::ClientGone("could not send auth_required".into());
    }
    // Set once the fake sent a Close: the end to report once the client has gone.
    let mut closing: Option<(SessionEnd, Instant)> = None;
    loop {
        let close_deadline = closing.as_ref().map(|(_, d)| *d);
        let wake = async { Wake::Frame(ws.next().await) }
            .or(async {
                if closing.is_some() {
                    std::future::pending::<()>().await;
                }
                Wake::Command(commands.recv().await.ok())
            })
            .or(async {
                let _ = stop.recv().await;
                Wake::Stop
            })
            .or(async {
                match close_deadline {
                    Some(d) => Timer::at(d).await,
                    None => std::future::pending().await,
                };
                Wake::CloseTimeout
            })
            .await;
        match wake {
            Wake::Frame(Some(Ok(Message::Text(text)))) => {
                if closing.is_some() {
                    continue;
                }
                let replies = handle_message(proto, text.as_str(), shared);
                for reply in replies {
                    match reply {
                        Reply::Send(frame) => {
                            if let Err(e) = ws.send(Message::text(frame)).await {
                                return SessionEnd::ClientGone(format!("send failed: {e}"));
                            }
                        }
                        Reply::Drop => return SessionEnd::DroppedByFake,
                        Reply::Close(code) => {
                            let _ = ws
                                .close(Some(CloseFrame {
                                    code: CloseCode::from(code),
                                    reason: "".into(),
                                }))
                                .await;
                            closing = Some((
                                SessionEnd::ClosedByFake(code),
                                Instant::now() + Duration::from_secs(5),
                            ));
                        }
                    }
                }
            }
            Wake::Frame(Some(Ok(Message::Close(frame)))) => {
                let code = frame.map(|f| u16::from(f.code));
                let mut st = lock(shared);
                st.note(format!("#{} <- Close {code:?}", proto.number));
                st.conn(proto.number).info.client_sent_close = true;
                drop(st);
                if closing.is_none() {
                    // tungstenite queues the reply; keep polling so it is flushed.
                    closing = Some((
                        SessionEnd::ClientClosed(code),
                        Instant::now() + Duration::from_secs(5),
                    ));
                }
            }
            Wake::Frame(Some(Ok(Message::Pong(_)))) => {
                lock(shared).conn(proto.number).info.protocol_pongs += 1
            }
            Wake::Frame(Some(Ok(_))) => {}
            Wake::Frame(Some(Err(e))) => {
                return match closing {
                    Some((end, until)) => client_gone(ws, end, until).await,
                    None => SessionEnd::ClientGone(e.to_string()),
                };
            }
            Wake::Frame(None) | Wake::CloseTimeout => {
                return match closing {
                    Some((end, until)) => client_gone(ws, end, until).await,
                    None => SessionEnd::ClientGone("end of stream".into()),
                };
            }
            Wake::Command(Some(Command::Frame(frame))) => {
                if let Err(e) = ws.send(Message::text(frame)).await {
                    return SessionEnd::ClientGone(format!("send failed: {e}"));
                }
            }
            Wake::Command(Some(Command::Raw(bytes))) => {
                // tungstenite's own buffer is flushed after every send: the bytes go out whole.
                if let Err(e) = ws.get_mut().write_all(&bytes).await {
                    return SessionEnd::ClientGone(format!("write failed: {e}"));
                }
            }
            Wake::Command(Some(Command::Drop)) => return SessionEnd::DroppedByFake,
            Wake::Command(Some(Command::Close(code))) => {
                let _ = ws
                    .close(Some(CloseFrame {
                        code: CloseCode::from(code),
                        reason: "".into(),
                    }))
                    .await;
                closing = Some((
                    SessionEnd::ClosedByFake(code),
                    Instant::now() + Duration::from_secs(5),
                ));
            }
            Wake::Command(None) | Wake::Stop => return SessionEnd::FakeStopped,
        }
    }
}

/// Handles one text frame from the client, as HA's `websocket_api` would.
fn handle_message(proto: &mut Protocol, text: &str, shared: &Mutex<State>) -> Vec<Reply> {
    let mut st = lock(shared);
    let n = proto.number;
    st.note(format!(
        "#{n} <- {}",
        if text.contains("access_token") {
            r#"{"type":"auth","access_token":"<redacted>"}"#
        } else {
            text
        }
    ));
    let mut out = Vec::new();
    let mut send = |st: &mut State, frame: String| {
        st.note(format!("#{n} -> {frame}"));
        out.push(Reply::Send(frame));
    };
    let Ok(msg) = serde_json::from_str::<Value>(text) else {
        st.protocol_error(n, format!("not JSON: {text}"));
        return out;
    };
    let kind = msg["type"].as_str().unwrap_or("");
    if !proto.authenticated {
        // HA `websocket_api/auth.py`: the first message must be `auth`.
        let token = msg["access_token"].as_str();
        let token_index = token
            .and_then(|t| st.token_index(t))
            .filter(|_| kind == "auth");
        let accepted = token_index.is_some();
        if kind != "auth" {
            st.protocol_error(n, format!("first message is not auth: {text}"));
        }
        st.auth_attempts.push(AuthAttempt {
            at: Instant::now(),
            accepted,
            token_index,
        });
        if accepted {
            proto.authenticated = true;
            st.conn(n).info.authenticated = true;
            let ok = st.fixtures.text("auth_ok.json");
            send(&mut st, ok);
        } else {
            let invalid = st.fixtures.text("auth_invalid.json");
            send(&mut st, invalid);
            st.note(format!("#{n} -> Close 1000"));
            out.push(Reply::Close(1000));
        }
        return out;
    }
    st.commands.push((n, msg.clone()));
    if let Some(i) = st.drop_next.iter().position(|k| k == kind) {
        st.drop_next.remove(i);
        st.note(format!("#{n} dropped at {kind:?}, unanswered"));
        out.push(Reply::Drop);
        return out;
    }
    if let Some(i) = st.by_hand.iter().position(|k| k == kind) {
        st.by_hand.remove(i);
        st.note(format!("#{n} {kind:?} left for the test to answer"));
        return out;
    }
    let Some(id) = msg["id"].as_u64() else {
        st.protocol_error(n, format!("message without an id: {text}"));
        send(
            &mut st,
            result_error(0, "invalid_format", "Message incorrectly formatted."),
        );
        return out;
    };
    if id <= proto.last_id {
        // HA `websocket_api/connection.py`: ids must increase per connection.
        st.protocol_error(n, format!("id {id} after {}", proto.last_id));
        send(
            &mut st,
            result_error(id, "id_reuse", "Identifier values have to increase."),
        );
        return out;
    }
    proto.last_id = id;
    match kind {
        "supported_features" => {
            st.conn(n).info.coalescing = msg["features"]["coalesce_messages"] == 1;
            let frame = st
                .fixtures
                .frame_with_id("supported_features_result.json", id);
            send(&mut st, frame);
        }
        "subscribe_events" => send(&mut st, result_ok(id)),
        "get_states" => {
            // Every state, as REST serves it (HA applies no subscription filter here).
            st.conn(n).info.get_states += 1;
            let states: Vec<&Value> = st.entities.values().collect();
            let frame = format!(
                r#"{{"id":{id},"type":"result","success":true,"result":{}}}"#,
                serde_json::to_string(&states).unwrap()
            );
            send(&mut st, frame);
        }
        "get_config" => {
            let frame = st.fixtures.frame_with_id("get_config_result.json", id);
            send(&mut st, frame);
        }
        "ping" => {
            st.conn(n).info.pings += 1;
            if st.conn(n).info.pongs_muted {
                st.note(format!("#{n} (pong withheld)"));
            } else {
                let frame = st.fixtures.frame_with_id("pong.json", id);
                send(&mut st, frame);
            }
        }
        "subscribe_entities" => {
            let has_filter = msg.get("include").is_some() || msg.get("exclude").is_some();
            let unknown: Vec<&String> = msg
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| {
                    !["id", "type", "entity_ids", "include", "exclude"].contains(&k.as_str())
                })
                .collect();
            if !unknown.is_empty() {
                let m = format!("extra keys not allowed @ data['{}']", unknown[0]);
                send(&mut st, result_error(id, "invalid_format", &m));
                return out;
            }
            if has_filter && !st.fixtures.has_ha_filter() {
                // 2024.3.3 (subscribe_entities_filtered_result.json): refused, no subscription.
                let m = "extra keys not allowed @ data['exclude']. Got …\nextra keys not allowed @ data['include']. Got …";
                send(&mut st, result_error(id, "invalid_format", m));
                return out;
            }
            let filter = has_filter.then(|| HaFilter::from_request(&msg));
            let sub_micro = st.fixtures.sub_microsecond_floats();
            let mut snapshot = Map::new();
            for (entity_id, state) in &st.entities {
                if filter.as_ref().is_none_or(|f| f.passes(entity_id)) {
                    snapshot.insert(
                        entity_id.clone(),
                        fixtures::compressed_state(state, sub_micro),
                    );
                }
            }
            let conn = st.conn(n);
            conn.info.subscription = Some(id);
            conn.info.ha_filter =
                has_filter.then(|| json!({"include": msg["include"], "exclude": msg["exclude"]}));
            conn.filter = filter;
            let result = st
                .fixtures
                .frame_with_id("subscribe_entities_result.json", id);
            send(&mut st, result);
            send(&mut st, event_frame(&json!({"a": snapshot}), id));
        }
        "unsubscribe_events" => {
            let sub = msg["subscription"].as_u64();
            if sub.is_some() && st.conn(n).info.subscription == sub {
                st.conn(n).info.subscription = None;
                st.conn(n).filter = None;
            }
            // Other subscriptions (subscribe_events) are not tracked: HA answers success.
            send(&mut st, result_ok(id));
        }
        other => {
            st.protocol_error(n, format!("unknown command {other:?}"));
            send(
                &mut st,
                result_error(id, "unknown_command", "Unknown command."),
            );
        }
    }
    out
}
