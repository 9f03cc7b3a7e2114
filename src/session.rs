//! The Home Assistant WebSocket protocol, sans I/O: feed it text frames and the time, it
//! returns what to send and what happened. One [`Session`] per connection.
//!
//! Sequence (HA developer docs "WebSocket API", and `websocket_api/http.py`, `commands.py`):
//! `auth_required` → `auth` → `auth_ok` | `auth_invalid`; then `supported_features`
//! (`coalesce_messages`, after which a frame may be a JSON array of messages), a subscription
//! to `homeassistant_started` and `get_config`; once HA reports `RUNNING`,
//! `subscribe_entities` (with the server-side filter on HA ≥ 2024.9) and `subscribe_events`
//! for `service_registered` / `service_removed`. The first `subscribe_entities` event is the
//! full snapshot. Ids are strictly increasing per connection (else HA answers `id_reuse`).
//! Heartbeat: an app-level `ping` every interval; no `pong` within the timeout = dead link.

use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::config::Secret;
use crate::entity::{CompressedState, DecodeError, EntityState, StateDiff, Timestamp};

/// How long HA may take to send `auth_required` and answer `auth` (HA itself allows 10 s
/// for the client's `auth`, `websocket_api/const.py` `AUTH_TIMEOUT`).
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Most [`Session::barrier`] pings outstanding at once.
pub const MAX_BARRIERS: usize = 64;

/// First HA release whose `subscribe_entities` accepts `include`/`exclude` (2024.9.0).
const FILTER_SINCE: (u32, u32) = (2024, 9);
/// First HA release with `last_reported` in state objects (2024.4.0).
const LAST_REPORTED_SINCE: (u32, u32) = (2024, 4);

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connected, waiting for `auth_required`.
    AwaitAuthRequired,
    /// `auth` sent.
    Authenticating,
    /// Authenticated; waiting for HA to report `RUNNING`.
    AwaitRunning,
    /// Subscribed; waiting for the first snapshot.
    Syncing,
    /// Snapshot applied; events flow.
    Live,
    /// `auth_invalid` received; the connection is over.
    AuthFailed,
}

/// Something the caller must do or know, in order.
#[derive(Debug)]
pub enum Output {
    /// Send this text frame.
    Send(String),
    /// `auth_required` received from this HA version; `auth` is being sent.
    Authenticating {
        /// `ha_version` from `auth_required`.
        ha_version: String,
    },
    /// `auth_ok`.
    Authenticated,
    /// `auth_invalid`: do not retry soon (HA counts failures toward its IP ban).
    AuthInvalid {
        /// HA's message.
        message: String,
    },
    /// HA is running and the subscriptions are sent.
    Syncing,
    /// The first `subscribe_entities` event: the complete tracked set.
    Snapshot(EntitiesEvent),
    /// A later `subscribe_entities` event.
    Entities(EntitiesEvent),
    /// `last_reported` as HA serialises it at the snapshot, from `get_states` (HA ≥ 2024.4):
    /// `(entity_id, last_updated, last_reported)`, only where the two differ; always right
    /// after the [`Output::Snapshot`] it belongs to. The compressed format has no
    /// `last_reported`, and HA's REST serialises a state lazily, so a state re-reported
    /// before anyone read it shows a later `last_reported` than its `last_updated`.
    /// `get_states` reads (and caches) the same JSON REST serves. Apply a row only while
    /// the state's `last_updated` is still the row's (a later change moves both).
    LastReported(Vec<(String, Timestamp, Timestamp)>),
    /// A `service_registered` / `service_removed` event (the event type).
    ServicesChanged(String),
    /// HA's core config (`get_config`'s result, a JSON object, as HA sent it): asked once
    /// the session is live and again on every `core_config_updated`; `GET /api/config`
    /// serves it (HA `websocket_api/commands.py` `handle_get_config` and REST
    /// `APIConfigView` both answer `hass.config.as_dict()`).
    Config(String),
    /// An event of a type asked for with [`Session::set_event_types`] (for `/api/stream`):
    /// its type and its JSON as HA sent it.
    Event {
        /// `event_type`.
        event_type: String,
        /// The event object.
        json: String,
    },
    /// A command failed; logged and counted, the session goes on.
    CommandFailed {
        /// The command.
        command: &'static str,
        /// HA's error code.
        code: String,
        /// HA's message.
        message: String,
    },
    /// The `pong` of a [`Session::barrier`]: everything HA sent on this link before it has
    /// been handed out (HA answers a connection's messages in order).
    Barrier(u64),
    /// The connection must be dropped and re-established.
    Disconnect(&'static str),
}

/// A decoded `subscribe_entities` event. Entries that failed to decode carry the error, so
/// the caller drops that entity (and only that one) and counts it.
#[derive(Debug, Default)]
pub struct EntitiesEvent {
    /// `a`: full states, added or replaced; already in the `Rc` the store keeps, so a
    /// 20,000-entity snapshot is not held twice on its way in.
    pub added: Vec<(String, Result<Rc<EntityState>, DecodeError>)>,
    /// `c`: diffs.
    pub changed: Vec<(String, Result<StateDiff, DecodeError>)>,
    /// `r`: removed entity ids.
    pub removed: Vec<String>,
}

impl EntitiesEvent {
    /// Number of entity updates in the event.
    pub fn len(&self) -> usize {
        self.added.len() + self.changed.len() + self.removed.len()
    }

    /// Whether the event carries nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A frame that could not be understood. Counted and logged; the session goes on.
#[derive(Debug, thiserror::Error)]
#[error("malformed message from Home Assistant: {0}")]
pub struct FrameError(pub String);

/// Ids of the commands whose answers matter.
#[derive(Debug, Default)]
struct Ids {
    states: u64,
    features: u64,
    started: u64,
    config: u64,
    entities: u64,
    registered: u64,
    removed: u64,
    /// `subscribe_events` for `core_config_updated`.
    config_updated: u64,
    /// The latest `get_config` asked for the [`Output::Config`] copy.
    config_copy: u64,
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    /// The long-lived access token.
    token: Secret,
    /// The `include`/`exclude` keys for `subscribe_entities`, when filtering.
    ha_filter: Option<Value>,
    /// Whether the filter was sent with the current subscription.
    filter_sent: bool,
    /// `subscribe_entities` waits for the `get_states` answer; `Some(with_filter)` until sent.
    entities_after_states: Option<bool>,
    /// Ping period.
    heartbeat_interval: Duration,
    /// Pong deadline.
    heartbeat_timeout: Duration,
    /// Where we are.
    phase: Phase,
    /// Next message id (HA requires them strictly increasing).
    next_id: u64,
    /// From `auth_required`.
    ha_version: Option<String>,
    /// Ids of pending commands.
    ids: Ids,
    /// The first entities event is still to come.
    snapshot_pending: bool,
    /// `last_reported` rows from `get_states` that arrived before the snapshot they belong
    /// to; handed out right after it.
    last_reported: Option<Vec<(String, Timestamp, Timestamp)>>,
    /// Outstanding ping id and when it was sent.
    ping: Option<(u64, Instant)>,
    /// Ids of the outstanding [`Session::barrier`] pings, at most [`MAX_BARRIERS`].
    barriers: Vec<u64>,
    /// When to send the next ping.
    next_ping: Instant,
    /// When the connection was made (auth deadline).
    connected_at: Instant,
    /// `subscribe_events` held for stream clients: event type (`"*"`: all) → id.
    extra_events: std::collections::BTreeMap<String, u64>,
    /// The event types last asked for ([`Session::set_event_types`]), subscribed once live.
    wanted_events: std::collections::BTreeSet<String>,
}

#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    id: Option<u64>,
    ha_version: Option<String>,
    message: Option<String>,
    success: Option<bool>,
    #[serde(borrow)]
    result: Option<&'a RawValue>,
    error: Option<HaError>,
    #[serde(borrow)]
    event: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct HaError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Entries of a JSON object as raw values, in order.
struct RawPairs<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for RawPairs<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = RawPairs<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object keyed by entity_id")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawPairs<'a>, A::Error> {
                let mut v = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(e) = map.next_entry::<String, &'de RawValue>()? {
                    v.push(e);
                }
                Ok(RawPairs(v))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntitiesEvent<'a> {
    #[serde(borrow, default)]
    a: Option<RawPairs<'a>>,
    #[serde(borrow, default)]
    c: Option<RawPairs<'a>>,
    #[serde(default)]
    r: Vec<String>,
}

/// The oldest Home Assistant release hass-edge supports: the oldest the test suites run
/// against (`tests/ha-peer/VERSIONS.md`).
pub const OLDEST_SUPPORTED_HA: &str = "2024.3.3";
/// The newest Home Assistant release the test suites run against.
pub const NEWEST_TESTED_HA: &str = "2026.11.0";

/// A warning for an HA `version` outside what is supported and tested, naming both
/// versions; `None` within the range (by release month; patch releases of a tested month
/// count as tested) or for a version that does not parse.
pub fn ha_version_warning(version: &str) -> Option<String> {
    let v = parse_ha_version(version)?;
    let oldest = parse_ha_version(OLDEST_SUPPORTED_HA)?;
    let newest = parse_ha_version(NEWEST_TESTED_HA)?;
    if v < oldest {
        Some(format!(
            "Home Assistant {version} is older than the oldest supported release, {OLDEST_SUPPORTED_HA}; \
             hass-edge may misread what it sends"
        ))
    } else if v > newest {
        Some(format!(
            "Home Assistant {version} is newer than any release hass-edge was tested with \
             (newest tested: {NEWEST_TESTED_HA}); report anything that looks wrong"
        ))
    } else {
        None
    }
}

/// Parses `"2024.3.3"`, `"2025.4.0b1"`, `"2024.10.0.dev0"` into (year, month).
pub fn parse_ha_version(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split('.');
    let year = parts.next()?.parse().ok()?;
    let month: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((year, month.parse().ok()?))
}

impl Session {
    /// A session for a connection made at `now`.
    pub fn new(
        token: Secret,
        ha_filter: Option<Value>,
        heartbeat_interval: Duration,
        heartbeat_timeout: Duration,
        now: Instant,
    ) -> Session {
        Session {
            token,
            ha_filter,
            filter_sent: false,
            entities_after_states: None,
            heartbeat_interval,
            heartbeat_timeout,
            phase: Phase::AwaitAuthRequired,
            next_id: 1,
            ha_version: None,
            ids: Ids::default(),
            snapshot_pending: false,
            last_reported: None,
            ping: None,
            barriers: Vec::new(),
            next_ping: now + heartbeat_interval,
            connected_at: now,
            extra_events: std::collections::BTreeMap::new(),
            wanted_events: std::collections::BTreeSet::new(),
        }
    }

    /// Where the session is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// HA's version, once `auth_required` arrived.
    pub fn ha_version(&self) -> Option<&str> {
        self.ha_version.as_deref()
    }

    /// Subscriptions this connection holds with HA: `homeassistant_started` once
    /// authenticated, then the entities and the two service events (0 before `auth_ok`).
    pub fn subscriptions(&self) -> u32 {
        let i = &self.ids;
        let own = [
            i.started,
            i.entities,
            i.registered,
            i.removed,
            i.config_updated,
        ]
        .iter()
        .filter(|id| **id != 0)
        .count();
        (own + self.extra_events.len()) as u32
    }

    /// Whether the subscription was made with the server-side filter.
    pub fn filter_sent(&self) -> bool {
        self.filter_sent
    }

    fn version_at_least(&self, since: (u32, u32)) -> bool {
        self.ha_version
            .as_deref()
            .and_then(parse_ha_version)
            .is_some_and(|v| v >= since)
    }

    fn command(&mut self, mut body: Value, out: &mut Vec<Output>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        body["id"] = json!(id);
        out.push(Output::Send(body.to_string()));
        id
    }

    /// Handles one text frame (a message, or an array of messages with coalescing).
    ///
    /// Errors: [`FrameError`] for a frame that is not HA's JSON; nothing is applied from it
    /// (messages of an array before the bad one are applied).
    pub fn handle_frame(
        &mut self,
        text: &str,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Result<(), FrameError> {
        let bad = |e: serde_json::Error| FrameError(e.to_string());
        if text.trim_start().starts_with('[') {
            let messages: Vec<&RawValue> = serde_json::from_str(text).map_err(bad)?;
            for m in messages {
                let msg: Incoming<'_> = serde_json::from_str(m.get()).map_err(bad)?;
                self.handle_message(msg, now, out)?;
            }
            Ok(())
        } else {
            let msg: Incoming<'_> = serde_json::from_str(text).map_err(bad)?;
            self.handle_message(msg, now, out)
        }
    }

    fn handle_message(
        &mut self,
        msg: Incoming<'_>,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Result<(), FrameError> {
        match msg.kind {
            "auth_required" if self.phase == Phase::AwaitAuthRequired => {
                let ha_version = msg.ha_version.unwrap_or_default();
                self.ha_version = Some(ha_version.clone());
                self.phase = Phase::Authenticating;
                out.push(Output::Authenticating { ha_version });
                let auth = json!({"type": "auth", "access_token": self.token.expose()});
                out.push(Output::Send(auth.to_string()));
            }
            "auth_ok" if self.phase == Phase::Authenticating => {
                self.phase = Phase::AwaitRunning;
                self.next_ping = now + self.heartbeat_interval;
                out.push(Output::Authenticated);
                self.ids.features = self.command(
                    json!({"type": "supported_features", "features": {"coalesce_messages": 1}}),
                    out,
                );
                self.ids.started = self.command(
                    json!({"type": "subscribe_events", "event_type": "homeassistant_started"}),
                    out,
                );
                self.ids.config = self.command(json!({"type": "get_config"}), out);
            }
            "auth_invalid" => {
                self.phase = Phase::AuthFailed;
                out.push(Output::AuthInvalid {
                    message: msg.message.unwrap_or_default(),
                });
            }
            "pong" if self.ping.is_some_and(|(id, _)| Some(id) == msg.id) => self.ping = None,
            "pong" if msg.id.is_some_and(|id| self.barriers.contains(&id)) => {
                let id = msg.id.unwrap_or_default();
                self.barriers.retain(|b| *b != id);
                out.push(Output::Barrier(id));
            }
            "result" => self.handle_result(msg, out)?,
            "event" => self.handle_event(msg, out)?,
            // Anything else (e.g. an `auth_required` out of order) carries nothing we use.
            _ => {}
        }
        Ok(())
    }

    fn handle_result(
        &mut self,
        msg: Incoming<'_>,
        out: &mut Vec<Output>,
    ) -> Result<(), FrameError> {
        let Some(id) = msg.id else {
            return Err(FrameError("result without id".into()));
        };
        if msg.success == Some(true) {
            if id == self.ids.states && id != 0 {
                let rows = msg
                    .result
                    .map(|r| serde_json::from_str::<ReportedRows>(r.get()))
                    .transpose()
                    .map_err(|e| FrameError(format!("get_states result: {e}")))?
                    .map(|r| r.0)
                    .unwrap_or_default();
                if self.snapshot_pending {
                    self.last_reported = Some(rows);
                } else {
                    out.push(Output::LastReported(rows));
                }
                self.subscribe_after_states(out);
                return Ok(());
            }
            if id == self.ids.config_copy && id != 0 {
                if let Some(r) = msg.result.filter(|r| r.get().starts_with('{')) {
                    out.push(Output::Config(r.get().to_owned()));
                }
                return Ok(());
            }
            if id == self.ids.config && self.phase == Phase::AwaitRunning {
                #[derive(Deserialize)]
                struct CoreConfig {
                    state: Option<String>,
                }
                let cfg: CoreConfig = msg
                    .result
                    .map(|r| serde_json::from_str(r.get()))
                    .transpose()
                    .map_err(|e| FrameError(format!("get_config result: {e}")))?
                    .unwrap_or(CoreConfig { state: None });
                // Older HA without `state` in get_config answers only once it is up.
                if cfg.state.as_deref().is_none_or(|s| s == "RUNNING") {
                    self.subscribe(out);
                }
            }
            return Ok(());
        }
        let err = msg.error.unwrap_or(HaError {
            code: String::new(),
            message: String::new(),
        });
        if id == self.ids.entities {
            if self.filter_sent && err.code == "invalid_format" {
                // HA before 2024.9 rejects include/exclude; subscribe without (we filter anyway).
                out.push(Output::CommandFailed {
                    command: "subscribe_entities (filtered)",
                    code: err.code,
                    message: err.message,
                });
                self.ids.entities = self.subscribe_entities(false, out);
                return Ok(());
            }
            out.push(Output::CommandFailed {
                command: "subscribe_entities",
                code: err.code,
                message: err.message,
            });
            out.push(Output::Disconnect("subscribe_entities failed"));
            return Ok(());
        }
        if id == self.ids.states && id != 0 {
            out.push(Output::CommandFailed {
                command: "get_states",
                code: err.code,
                message: err.message,
            });
            self.subscribe_after_states(out);
            return Ok(());
        }
        let command = match id {
            i if i == self.ids.features => "supported_features",
            i if i == self.ids.started => "subscribe_events homeassistant_started",
            i if i == self.ids.config => "get_config",
            i if i == self.ids.registered => "subscribe_events service_registered",
            i if i == self.ids.removed => "subscribe_events service_removed",
            _ => "command",
        };
        out.push(Output::CommandFailed {
            command,
            code: err.code,
            message: err.message,
        });
        // Only while it is awaited: a late error reusing the id once HA runs is not a reason
        // to drop a working connection.
        if id == self.ids.config && self.phase == Phase::AwaitRunning {
            out.push(Output::Disconnect("get_config failed"));
        }
        Ok(())
    }

    fn handle_event(&mut self, msg: Incoming<'_>, out: &mut Vec<Output>) -> Result<(), FrameError> {
        let (Some(id), Some(event)) = (msg.id, msg.event) else {
            return Err(FrameError("event without id or body".into()));
        };
        if id == self.ids.entities && id != 0 {
            let ev = self.decode_entities(event)?;
            if self.snapshot_pending {
                self.snapshot_pending = false;
                self.phase = Phase::Live;
                out.push(Output::Snapshot(ev));
                let wanted = std::mem::take(&mut self.wanted_events);
                self.set_event_types(&wanted, out);
                if let Some(rows) = self.last_reported.take() {
                    out.push(Output::LastReported(rows));
                }
            } else {
                out.push(Output::Entities(ev));
            }
        } else if id == self.ids.started && self.phase == Phase::AwaitRunning {
            self.subscribe(out);
        } else if id == self.ids.registered || id == self.ids.removed {
            let kind = if id == self.ids.registered {
                "service_registered"
            } else {
                "service_removed"
            };
            out.push(Output::ServicesChanged(kind.into()));
        } else if id == self.ids.config_updated && id != 0 {
            self.ids.config_copy = self.command(json!({"type": "get_config"}), out);
        } else if self.extra_events.values().any(|&e| e == id) {
            #[derive(Deserialize)]
            struct Kind<'a> {
                #[serde(borrow)]
                event_type: std::borrow::Cow<'a, str>,
            }
            let kind: Kind<'_> = serde_json::from_str(event.get())
                .map_err(|e| FrameError(format!("subscribed event: {e}")))?;
            out.push(Output::Event {
                event_type: kind.event_type.into_owned(),
                json: event.get().to_owned(),
            });
        }
        // Events of an old subscription (before a resubscribe) are ignored.
        Ok(())
    }

    fn decode_entities(&self, event: &RawValue) -> Result<EntitiesEvent, FrameError> {
        let raw: RawEntitiesEvent<'_> = serde_json::from_str(event.get())
            .map_err(|e| FrameError(format!("subscribe_entities event: {e}")))?;
        let with_last_reported = self.version_at_least(LAST_REPORTED_SINCE);
        let added = raw
            .a
            .map(|p| p.0)
            .unwrap_or_default()
            .into_iter()
            .map(|(id, v)| {
                let state = serde_json::from_str::<CompressedState>(v.get())
                    .map_err(|e| DecodeError(format!("compressed state of {id}: {e}")))
                    .and_then(|c| EntityState::from_compressed(&id, c, with_last_reported))
                    .map(Rc::new);
                (id, state)
            });
        let changed = raw
            .c
            .map(|p| p.0)
            .unwrap_or_default()
            .into_iter()
            .map(|(id, v)| {
                let diff = serde_json::from_str::<StateDiff>(v.get())
                    .map_err(|e| DecodeError(format!("diff of {id}: {e}")));
                (id, diff)
            });
        Ok(EntitiesEvent {
            added: added.collect(),
            changed: changed.collect(),
            removed: raw.r,
        })
    }

    fn subscribe(&mut self, out: &mut Vec<Output>) {
        self.phase = Phase::Syncing;
        out.push(Output::Syncing);
        let with_filter = self.ha_filter.is_some() && self.version_at_least(FILTER_SINCE);
        self.start_entities(with_filter, out);
    }

    /// `service_registered` / `service_removed`, once per connection, after the entities.
    fn subscribe_services(&mut self, out: &mut Vec<Output>) {
        if self.ids.registered == 0 {
            self.ids.registered = self.command(
                json!({"type": "subscribe_events", "event_type": "service_registered"}),
                out,
            );
            self.ids.removed = self.command(
                json!({"type": "subscribe_events", "event_type": "service_removed"}),
                out,
            );
            self.ids.config_updated = self.command(
                json!({"type": "subscribe_events", "event_type": "core_config_updated"}),
                out,
            );
            self.ids.config_copy = self.command(json!({"type": "get_config"}), out);
        }
    }

    /// Sends a `ping` whose `pong` ([`Output::Barrier`] with the id returned) comes after
    /// everything HA queued on this link before it read the ping: e.g. the state changes of
    /// a service call whose result another connection has just received (HA sends a
    /// service's state changes to subscribers while the call runs, its result after).
    /// `None` when the session is not authenticated or [`MAX_BARRIERS`] are outstanding.
    pub fn barrier(&mut self, out: &mut Vec<Output>) -> Option<u64> {
        let authenticated = matches!(
            self.phase,
            Phase::AwaitRunning | Phase::Syncing | Phase::Live
        );
        if !authenticated || self.barriers.len() >= MAX_BARRIERS {
            return None;
        }
        let id = self.command(json!({"type": "ping"}), out);
        self.barriers.push(id);
        Some(id)
    }

    /// Holds upstream `subscribe_events` for exactly `wanted` (`"*"`: all types), for the
    /// stream clients' events: subscribes what is new, unsubscribes what is no longer
    /// wanted. Before the session is live the set is kept and subscribed with the snapshot.
    pub fn set_event_types(
        &mut self,
        wanted: &std::collections::BTreeSet<String>,
        out: &mut Vec<Output>,
    ) {
        self.wanted_events.clone_from(wanted);
        if self.phase != Phase::Live {
            return;
        }
        let gone: Vec<String> = self
            .extra_events
            .keys()
            .filter(|t| !wanted.contains(*t))
            .cloned()
            .collect();
        for t in gone {
            if let Some(id) = self.extra_events.remove(&t) {
                self.command(
                    json!({"type": "unsubscribe_events", "subscription": id}),
                    out,
                );
            }
        }
        for t in wanted {
            if !self.extra_events.contains_key(t) {
                let body = if t == "*" {
                    json!({"type": "subscribe_events"})
                } else {
                    json!({"type": "subscribe_events", "event_type": t})
                };
                let id = self.command(body, out);
                self.extra_events.insert(t.clone(), id);
            }
        }
    }

    /// Starts the entity subscription. On HA ≥ 2024.4 it first asks `get_states` for
    /// `last_reported` ([`Output::LastReported`]) and sends `subscribe_entities` only once
    /// that is answered. The WebSocket read buffer keeps the capacity of the largest frame
    /// it held: asked together, HA coalesces the `get_states` answer and the snapshot into one
    /// frame (≈ 15 MB at 20,000 entities); asked after the snapshot, the answer grew the
    /// buffer again by doubling. One after the other, the buffer is the larger of the two.
    fn start_entities(&mut self, with_filter: bool, out: &mut Vec<Output>) {
        self.last_reported = None;
        self.snapshot_pending = true;
        if self.version_at_least(LAST_REPORTED_SINCE) {
            self.ids.entities = 0;
            self.ids.states = self.command(json!({"type": "get_states"}), out);
            self.entities_after_states = Some(with_filter);
        } else {
            self.ids.entities = self.subscribe_entities(with_filter, out);
            self.subscribe_services(out);
        }
    }

    /// Sends the `subscribe_entities` that waited for `get_states` (answered or failed).
    fn subscribe_after_states(&mut self, out: &mut Vec<Output>) {
        if let Some(with_filter) = self.entities_after_states.take() {
            self.ids.entities = self.subscribe_entities(with_filter, out);
            self.subscribe_services(out);
        }
    }

    fn subscribe_entities(&mut self, with_filter: bool, out: &mut Vec<Output>) -> u64 {
        let mut body = json!({"type": "subscribe_entities"});
        if let (true, Some(Value::Object(filter))) = (with_filter, &self.ha_filter) {
            for (k, v) in filter {
                body[k] = v.clone();
            }
        }
        self.filter_sent = with_filter;
        self.snapshot_pending = true;
        self.command(body, out)
    }

    /// Drops the current entity subscription and makes a new one (with `ha_filter`), whose
    /// first event is a fresh snapshot. Used by D-Bus `Resync()` and by a config reload that
    /// changed the server-side filter. A no-op before HA is running.
    pub fn resubscribe(&mut self, ha_filter: Option<Value>, out: &mut Vec<Output>) {
        self.ha_filter = ha_filter;
        if !matches!(self.phase, Phase::Syncing | Phase::Live) {
            return;
        }
        let old = self.ids.entities;
        if old != 0 {
            self.command(
                json!({"type": "unsubscribe_events", "subscription": old}),
                out,
            );
        }
        self.phase = Phase::Syncing;
        out.push(Output::Syncing);
        let with_filter = self.ha_filter.is_some() && self.version_at_least(FILTER_SINCE);
        self.start_entities(with_filter, out);
    }

    /// Runs the timers: sends a ping when due; asks to disconnect when the pong or the auth
    /// handshake is overdue. Call at [`Session::next_wakeup`] (earlier is harmless).
    pub fn poll_timers(&mut self, now: Instant, out: &mut Vec<Output>) {
        match self.phase {
            Phase::AwaitAuthRequired | Phase::Authenticating => {
                if now >= self.connected_at + AUTH_TIMEOUT {
                    out.push(Output::Disconnect("authentication timed out"));
                }
            }
            Phase::AuthFailed => {}
            Phase::AwaitRunning | Phase::Syncing | Phase::Live => {
                if let Some((_, sent)) = self.ping {
                    if now >= sent + self.heartbeat_timeout {
                        out.push(Output::Disconnect("no pong within the heartbeat timeout"));
                    }
                } else if now >= self.next_ping {
                    let id = self.command(json!({"type": "ping"}), out);
                    self.ping = Some((id, now));
                    self.next_ping = now + self.heartbeat_interval;
                }
            }
        }
    }

    /// When [`Session::poll_timers`] next has something to do.
    pub fn next_wakeup(&self) -> Option<Instant> {
        match self.phase {
            Phase::AwaitAuthRequired | Phase::Authenticating => {
                Some(self.connected_at + AUTH_TIMEOUT)
            }
            Phase::AuthFailed => None,
            _ => Some(match self.ping {
                Some((_, sent)) => sent + self.heartbeat_timeout,
                None => self.next_ping,
            }),
        }
    }
}

/// The rows of a `get_states` answer whose `last_reported` differs from `last_updated`,
/// decoded without keeping the rest (at 20,000 entities the answer is ≈ 9 MB).
struct ReportedRows(Vec<(String, Timestamp, Timestamp)>);

impl<'de> Deserialize<'de> for ReportedRows {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Row {
            entity_id: String,
            last_updated: Timestamp,
            last_reported: Option<Timestamp>,
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ReportedRows;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of state objects")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ReportedRows, A::Error> {
                let mut rows = Vec::new();
                while let Some(r) = seq.next_element::<Row>()? {
                    if let Some(reported) = r.last_reported.filter(|t| *t != r.last_updated) {
                        rows.push((r.entity_id, r.last_updated, reported));
                    }
                }
                Ok(ReportedRows(rows))
            }
        }
        d.deserialize_seq(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Duration = Duration::from_secs(30);
    const HB_TIMEOUT: Duration = Duration::from_secs(10);

    fn session(t0: Instant, filter: Option<Value>) -> Session {
        Session::new(Secret::new("tok"), filter, HB, HB_TIMEOUT, t0)
    }

    fn sent(out: &[Output]) -> Vec<Value> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(s) => Some(serde_json::from_str(s).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn feed(s: &mut Session, frame: &str, t: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        s.handle_frame(frame, t, &mut out).unwrap();
        out
    }

    /// Drives a session to the point where subscribe_entities was sent; returns its id.
    fn to_syncing(s: &mut Session, version: &str, t: Instant) -> Vec<Value> {
        let out = feed(
            s,
            &format!(r#"{{"type":"auth_required","ha_version":"{version}"}}"#),
            t,
        );
        assert_eq!(sent(&out), [json!({"type": "auth", "access_token": "tok"})]);
        let out = feed(s, r#"{"type":"auth_ok","ha_version":"x"}"#, t);
        let cmds = sent(&out);
        assert_eq!(cmds[0]["type"], "supported_features");
        assert_eq!(cmds[0]["features"]["coalesce_messages"], 1);
        let config_id = cmds[2]["id"].as_u64().unwrap();
        let out = feed(
            s,
            &format!(
                r#"{{"id":{config_id},"type":"result","success":true,"result":{{"state":"RUNNING"}}}}"#
            ),
            t,
        );
        assert_eq!(s.phase(), Phase::Syncing);
        sent(&out)
    }

    #[test]
    fn stream_event_types_are_held_while_wanted() {
        let t = Instant::now();
        let mut s = session(t, None);
        let mut out = Vec::new();
        // Asked before the session is live: kept, sent with the snapshot.
        s.set_event_types(&["doorbell".to_owned()].into(), &mut out);
        assert!(sent(&out).is_empty());
        to_syncing(&mut s, "2024.3.3", t);
        let out = feed(&mut s, r#"{"id":4,"type":"event","event":{"a":{}}}"#, t);
        let cmds = sent(&out);
        assert_eq!(
            cmds,
            [json!({"id": 9, "type": "subscribe_events", "event_type": "doorbell"})]
        );
        let out = feed(
            &mut s,
            r#"{"id":9,"type":"event","event":{"event_type":"doorbell","data":{},"origin":"LOCAL","time_fired":"x","context":{}}}"#,
            t,
        );
        assert!(
            matches!(&out[..], [Output::Event { event_type, json }] if event_type == "doorbell" && json.starts_with("{\"event_type\":\"doorbell\""))
        );
        // All types instead: the new one, and the old one ended.
        let mut out = Vec::new();
        s.set_event_types(&["*".to_owned()].into(), &mut out);
        assert_eq!(
            sent(&out),
            [
                json!({"id": 10, "type": "unsubscribe_events", "subscription": 9}),
                json!({"id": 11, "type": "subscribe_events"}),
            ]
        );
        let mut out = Vec::new();
        s.set_event_types(&Default::default(), &mut out);
        assert_eq!(
            sent(&out),
            [json!({"id": 12, "type": "unsubscribe_events", "subscription": 11})]
        );
    }

    #[test]
    fn full_handshake_with_increasing_ids() {
        let t = Instant::now();
        let mut s = session(t, None);
        let cmds = to_syncing(&mut s, "2024.3.3", t);
        let kinds: Vec<&str> = cmds.iter().map(|c| c["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "subscribe_entities",
                "subscribe_events",
                "subscribe_events",
                "subscribe_events",
                "get_config"
            ]
        );
        assert_eq!(cmds[1]["event_type"], "service_registered");
        assert_eq!(cmds[3]["event_type"], "core_config_updated");
        let ids: Vec<u64> = cmds.iter().map(|c| c["id"].as_u64().unwrap()).collect();
        assert_eq!(
            ids,
            [4, 5, 6, 7, 8],
            "ids continue after the three setup commands"
        );
        // The config copy for `GET /api/config`, and a fresh one on `core_config_updated`.
        let out = feed(
            &mut s,
            r#"{"id":8,"type":"result","success":true,"result":{"version":"2024.3.3"}}"#,
            t,
        );
        assert!(matches!(&out[..], [Output::Config(c)] if c == r#"{"version":"2024.3.3"}"#));
        let out = feed(
            &mut s,
            r#"{"id":7,"type":"event","event":{"event_type":"core_config_updated"}}"#,
            t,
        );
        assert_eq!(sent(&out), [json!({"id": 9, "type": "get_config"})]);
        let out = feed(
            &mut s,
            r#"{"id":4,"type":"event","event":{"a":{"light.a":{"s":"on","c":"x","lc":1.0}}}}"#,
            t,
        );
        assert!(matches!(&out[..], [Output::Snapshot(ev)] if ev.added.len() == 1));
        assert_eq!(s.phase(), Phase::Live);
        let out = feed(
            &mut s,
            r#"{"type":"event","event":{"c":{"light.a":{"+":{"s":"off"}}}},"id":4}"#,
            t,
        );
        assert!(matches!(&out[..], [Output::Entities(ev)] if ev.changed.len() == 1));
    }

    #[test]
    fn waits_for_running_before_subscribing() {
        let t = Instant::now();
        let mut s = session(t, None);
        feed(
            &mut s,
            r#"{"type":"auth_required","ha_version":"2025.4.4"}"#,
            t,
        );
        feed(&mut s, r#"{"type":"auth_ok"}"#, t);
        let out = feed(
            &mut s,
            r#"{"id":3,"type":"result","success":true,"result":{"state":"STARTING"}}"#,
            t,
        );
        assert!(sent(&out).is_empty());
        assert_eq!(s.phase(), Phase::AwaitRunning);
        let out = feed(
            &mut s,
            r#"{"id":2,"type":"event","event":{"event_type":"homeassistant_started"}}"#,
            t,
        );
        // HA >= 2024.4: get_states (for last_reported) first; the subscription waits for it.
        assert_eq!(sent(&out).len(), 1);
        assert_eq!(sent(&out)[0]["type"], "get_states");
        let out = feed(
            &mut s,
            r#"{"id":4,"type":"result","success":true,"result":[]}"#,
            t,
        );
        assert_eq!(sent(&out)[0]["type"], "subscribe_entities");
    }

    #[test]
    fn filter_sent_only_to_ha_that_supports_it() {
        let t = Instant::now();
        let filter = Some(json!({"exclude": {"domains": ["camera"]}}));
        let mut old = session(t, filter.clone());
        let cmds = to_syncing(&mut old, "2024.3.3", t);
        assert!(cmds[0].get("exclude").is_none());
        let mut new = session(t, filter);
        to_syncing(&mut new, "2025.4.4", t);
        let cmds = sent(&feed(
            &mut new,
            r#"{"id":4,"type":"result","success":true,"result":[]}"#,
            t,
        ));
        assert_eq!(cmds[0]["type"], "subscribe_entities");
        assert_eq!(cmds[0]["exclude"]["domains"][0], "camera");
        // If HA rejects it anyway, we fall back to an unfiltered subscription.
        let out = feed(
            &mut new,
            r#"{"id":5,"type":"result","success":false,"error":{"code":"invalid_format","message":"extra keys"}}"#,
            t,
        );
        let resent = sent(&out);
        assert_eq!(resent.last().unwrap()["type"], "subscribe_entities");
        assert!(resent.last().unwrap().get("exclude").is_none());
        assert!(resent.last().unwrap()["id"].as_u64().unwrap() > 7);
    }

    #[test]
    fn auth_invalid_is_reported() {
        let t = Instant::now();
        let mut s = session(t, None);
        feed(
            &mut s,
            r#"{"type":"auth_required","ha_version":"2024.3.3"}"#,
            t,
        );
        let out = feed(
            &mut s,
            r#"{"type":"auth_invalid","message":"Invalid access token or password"}"#,
            t,
        );
        assert!(
            matches!(&out[..], [Output::AuthInvalid { message }] if message.contains("Invalid"))
        );
        assert_eq!(s.phase(), Phase::AuthFailed);
    }

    #[test]
    fn coalesced_arrays_are_split() {
        let t = Instant::now();
        let mut s = session(t, None);
        let cmds = to_syncing(&mut s, "2025.4.4", t);
        // HA >= 2024.4: get_states (id 4) alone; subscribe_entities (id 5) once it is answered,
        // so that HA cannot coalesce the two largest messages of a sync into one frame. The
        // rows are held until the snapshot, then only differing ones are handed out.
        assert_eq!(cmds.len(), 1);
        assert_eq!(
            (cmds[0]["type"].as_str(), cmds[0]["id"].as_u64()),
            (Some("get_states"), Some(4))
        );
        let row = |id: &str, reported: &str| {
            format!(
                r#"{{"entity_id":"{id}","state":"x","attributes":{{}},"last_changed":"2026-11-24T20:08:36+00:00","last_reported":"{reported}","last_updated":"2026-11-24T20:08:36+00:00","context":{{"id":"x","parent_id":null,"user_id":null}}}}"#
            )
        };
        let out = feed(
            &mut s,
            &format!(
                r#"{{"id":4,"type":"result","success":true,"result":[{},{}]}}"#,
                row("sun.sun", "2026-11-24T20:08:37.500000+00:00"),
                row("light.a", "2026-11-24T20:08:36+00:00")
            ),
            t,
        );
        let kinds: Vec<String> = sent(&out)
            .iter()
            .map(|c| format!("{} {}", c["id"], c["type"].as_str().unwrap()))
            .collect();
        assert_eq!(
            kinds,
            [
                "5 subscribe_entities",
                "6 subscribe_events",
                "7 subscribe_events",
                "8 subscribe_events",
                "9 get_config"
            ]
        );
        assert!(
            out.iter().all(|o| matches!(o, Output::Send(_))),
            "rows held until the snapshot: {out:?}"
        );
        let out = feed(
            &mut s,
            r#"[{"id":5,"type":"result","success":true,"result":null},{"id":5,"type":"event","event":{"a":{}}},{"id":6,"type":"event","event":{"event_type":"service_registered"}}]"#,
            t,
        );
        let [
            Output::Snapshot(_),
            Output::LastReported(rows),
            Output::ServicesChanged(k),
        ] = &out[..]
        else {
            panic!("{out:?}")
        };
        assert_eq!(k, "service_registered");
        assert_eq!(
            rows.len(),
            1,
            "light.a's last_reported equals its last_updated: {rows:?}"
        );
        assert_eq!(rows[0].0, "sun.sun");
        assert_eq!(rows[0].2.to_string(), "2026-11-24T20:08:37.500000+00:00");
    }

    #[test]
    fn a_late_error_on_get_configs_id_does_not_disconnect() {
        let t = Instant::now();
        let mut s = session(t, None);
        to_syncing(&mut s, "2024.3.3", t);
        let out = feed(
            &mut s,
            r#"{"id":3,"type":"result","success":false,"error":{"code":"unknown_error","message":"late"}}"#,
            t,
        );
        assert!(
            !out.iter().any(|o| matches!(o, Output::Disconnect(_))),
            "{out:?}"
        );
        assert_eq!(s.phase(), Phase::Syncing);
    }

    #[test]
    fn get_config_failing_while_awaited_disconnects() {
        let t = Instant::now();
        let mut s = session(t, None);
        feed(
            &mut s,
            r#"{"type":"auth_required","ha_version":"2024.3.3"}"#,
            t,
        );
        feed(&mut s, r#"{"type":"auth_ok","ha_version":"x"}"#, t);
        let out = feed(
            &mut s,
            r#"{"id":3,"type":"result","success":false,"error":{"code":"unknown_error","message":"no"}}"#,
            t,
        );
        assert!(
            out.iter().any(|o| matches!(o, Output::Disconnect(_))),
            "{out:?}"
        );
    }

    #[test]
    fn a_failed_get_states_still_subscribes() {
        let t = Instant::now();
        let mut s = session(t, None);
        to_syncing(&mut s, "2025.4.4", t);
        let out = feed(
            &mut s,
            r#"{"id":4,"type":"result","success":false,"error":{"code":"unknown_error","message":"boom"}}"#,
            t,
        );
        assert!(
            matches!(
                &out[0],
                Output::CommandFailed {
                    command: "get_states",
                    ..
                }
            ),
            "{out:?}"
        );
        assert_eq!(sent(&out)[0]["type"], "subscribe_entities");
        let out = feed(
            &mut s,
            r#"{"id":5,"type":"event","event":{"a":{"light.a":{"s":"on","c":"x","lc":1.0}}}}"#,
            t,
        );
        assert!(
            matches!(&out[..], [Output::Snapshot(ev)] if ev.added.len() == 1),
            "no rows to hand out: {out:?}"
        );
        assert_eq!(s.phase(), Phase::Live);
    }

    #[test]
    fn heartbeat_pings_and_detects_missing_pong() {
        let t = Instant::now();
        let mut s = session(t, None);
        to_syncing(&mut s, "2024.3.3", t);
        let mut out = Vec::new();
        s.poll_timers(t + HB - Duration::from_millis(1), &mut out);
        assert!(out.is_empty());
        s.poll_timers(t + HB, &mut out);
        let ping = sent(&out);
        assert_eq!(ping[0]["type"], "ping");
        let id = ping[0]["id"].as_u64().unwrap();
        out.clear();
        feed(&mut s, &format!(r#"{{"id":{id},"type":"pong"}}"#), t + HB);
        s.poll_timers(t + HB + HB_TIMEOUT, &mut out);
        assert!(out.is_empty(), "pong answered: nothing to do");
        s.poll_timers(t + HB * 2, &mut out);
        assert_eq!(sent(&out)[0]["type"], "ping");
        out.clear();
        s.poll_timers(t + HB * 2 + HB_TIMEOUT, &mut out);
        assert!(matches!(&out[..], [Output::Disconnect(_)]));
    }

    #[test]
    fn a_barrier_is_a_ping_whose_pong_comes_after_what_ha_sent_before() {
        let t = Instant::now();
        let mut s = session(t, None);
        let mut out = Vec::new();
        assert_eq!(s.barrier(&mut out), None, "not authenticated yet");
        to_syncing(&mut s, "2025.4.4", t);
        let id = s.barrier(&mut out).expect("a barrier once authenticated");
        assert_eq!(sent(&out), [json!({"type": "ping", "id": id})]);
        // What HA sent before the pong is handed out before the barrier.
        let out = feed(
            &mut s,
            &format!(
                r#"[{{"id":7,"type":"event","event":{{"c":{{}}}}}},{{"id":{id},"type":"pong"}}]"#
            ),
            t,
        );
        assert!(
            matches!(out.last(), Some(Output::Barrier(b)) if *b == id),
            "{out:?}"
        );
        // Once only; a pong for an unknown id is nothing.
        let again = feed(&mut s, &format!(r#"{{"id":{id},"type":"pong"}}"#), t);
        assert!(again.is_empty(), "{again:?}");
        let mut out = Vec::new();
        let ids: Vec<_> = (0..MAX_BARRIERS + 1).map(|_| s.barrier(&mut out)).collect();
        assert!(ids[..MAX_BARRIERS].iter().all(Option::is_some));
        assert_eq!(
            ids[MAX_BARRIERS], None,
            "at most {MAX_BARRIERS} outstanding"
        );
    }

    #[test]
    fn auth_timeout() {
        let t = Instant::now();
        let mut s = session(t, None);
        let mut out = Vec::new();
        s.poll_timers(t + AUTH_TIMEOUT, &mut out);
        assert!(matches!(&out[..], [Output::Disconnect(_)]));
    }

    #[test]
    fn bad_entities_are_isolated() {
        let t = Instant::now();
        let mut s = session(t, None);
        to_syncing(&mut s, "2024.3.3", t);
        let out = feed(
            &mut s,
            r#"{"id":4,"type":"event","event":{"a":{"light.ok":{"s":"on","c":"x","lc":1.0},"light.bad":{"s":5}}}}"#,
            t,
        );
        let Output::Snapshot(ev) = &out[0] else {
            panic!()
        };
        assert!(ev.added[0].1.is_ok());
        assert!(ev.added[1].1.is_err());
        let mut out = Vec::new();
        assert!(s.handle_frame("{not json", t, &mut out).is_err());
        assert!(
            s.handle_frame(r#"{"id":4,"type":"event","event":{"x":1}}"#, t, &mut out)
                .is_err()
        );
    }

    #[test]
    fn versions_outside_the_tested_range_are_named() {
        assert!(ha_version_warning("2024.3.3").is_none());
        assert!(ha_version_warning("2025.4.4").is_none());
        assert!(
            ha_version_warning("2026.11.2").is_none(),
            "a patch of a tested month"
        );
        let old = ha_version_warning("2023.12.4").unwrap();
        assert!(
            old.contains("2023.12.4") && old.contains(OLDEST_SUPPORTED_HA),
            "{old}"
        );
        let new = ha_version_warning("2027.1.0b1").unwrap();
        assert!(
            new.contains("2027.1.0b1") && new.contains(NEWEST_TESTED_HA),
            "{new}"
        );
        assert!(ha_version_warning("garbage").is_none());
    }

    #[test]
    fn version_parsing() {
        assert_eq!(parse_ha_version("2024.3.3"), Some((2024, 3)));
        assert_eq!(parse_ha_version("2024.10.0b1"), Some((2024, 10)));
        assert_eq!(parse_ha_version("2025.4.0.dev20250301"), Some((2025, 4)));
        assert_eq!(parse_ha_version("garbage"), None);
    }
}
