//! The local WebSocket API session, sans I/O (issue 16): one [`LocalSession`] per client of
//! hass-edge's `/api/websocket`. Feed it the client's text frames and the mirror's changes;
//! it answers what the mirror can answer in HA's exact shapes and says what must go to HA.
//!
//! Protocol (HA developer docs "WebSocket API"; `websocket_api/http.py`, `auth.py`,
//! `connection.py`, `commands.py`, `messages.py`):
//! - Auth phase: `{"type":"auth_required","ha_version"}` → the client's
//!   `{"type":"auth","access_token"}` → `auth_ok` | `auth_invalid` (then the connection is
//!   closed). A malformed auth message is `auth_invalid` with HA's "Auth message incorrectly
//!   formatted" text; a frame that is not JSON ends the connection.
//! - Command phase: a frame holds one message or a JSON array of them. Each must be an object
//!   with a positive integer `id` and a string `type` (else `invalid_format`, "Message
//!   incorrectly formatted."), and ids must increase (else `id_reuse`, "Identifier values
//!   have to increase.").
//! - Answered here: `ping` (`pong`), `supported_features` (`coalesce_messages`: the server
//!   may then put several messages in one frame as a JSON array), `get_states`, `get_config`,
//!   `subscribe_entities` (HA's compressed format: the result, an `a` event with every
//!   selected state, then one `a`/`c`/`r` event per change), `subscribe_events` for
//!   `state_changed`, `unsubscribe_events` of those. A command is answered here only when it
//!   has exactly the fields HA's schema allows; anything else (other commands, other
//!   fields, `include`/`exclude` filters, ids the mirror does not follow) is forwarded, so
//!   HA's own validation and error text answer it.
//! - Forwarded ([`Action::Forward`]): the I/O side sends it to HA under a fresh id and
//!   passes HA's answers back under the client's. With hass-edge's own token
//!   ([`Mode::Edge`]) in read-only mode (`http.allow_service_calls = false`), nothing is
//!   forwarded: HA's `unauthorized` error instead. Answers cached by the I/O side (the
//!   registry lists the frontend asks for at every load, `get_services`) are served from
//!   [`View::cached`] first.
//! - Bounded: one session answers at most [`MAX_LOCAL_SUBSCRIPTIONS`] subscriptions from the
//!   mirror, selecting at most [`MAX_LOCAL_IDS`] entity ids in all; a subscription past either
//!   is forwarded, so HA serves it (and HA's limits, and the I/O side's bound on forwarded
//!   commands, apply). A client cannot make every change cost the thread more than that.

use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;

use serde_json::{Map, Value};

use crate::broadcast::{Event, Render};
use crate::entity::{EntityState, valid_entity_id};
use crate::piecewise::{Form, Piecewise};
use crate::store::Change;

/// Largest message a client may send; a bigger one closes the connection.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Most subscriptions (`subscribe_entities`, `subscribe_events` for `state_changed`) one
/// session has answered from the mirror at once; more are forwarded to HA. Each local
/// subscription renders every change it selects on the executor thread, so without a bound
/// one client could multiply the cost of every change without limit. HA's frontend and
/// `home-assistant-js-websocket` hold one.
pub const MAX_LOCAL_SUBSCRIPTIONS: usize = 16;

/// Most entity ids the local `subscribe_entities` of one session select in all (each is
/// held as a string for the life of the subscription); a subscription that would pass it is
/// forwarded to HA.
pub const MAX_LOCAL_IDS: usize = 4096;

/// Who the session acts as, decided from the `auth` message's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// hass-edge's API token (or any token in the loopback-open mode): forwarded commands
    /// go with hass-edge's HA token.
    Edge,
    /// An HA user's own token, accepted by HA: forwarded commands go on a link of the
    /// client's own, so HA enforces that user's permissions.
    User,
}

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// `auth_required` sent; waiting for `auth`.
    AwaitAuth,
    /// `auth` received; waiting for [`LocalSession::authorized`] or
    /// [`LocalSession::refused`].
    Authorizing,
    /// `auth_ok` sent.
    Ready(Mode),
    /// The connection is over.
    Closed,
}

/// What the I/O side must do, in order.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Send this message (one JSON object) to the client.
    Send(String),
    /// Send this message, which may be large (many states, a cached registry list):
    /// rendered piece by piece as it is written ([`Piecewise`]).
    SendPiecewise(Piecewise),
    /// The client presented this token: decide, then call [`LocalSession::authorized`] or
    /// [`LocalSession::refused`].
    Authorize(String),
    /// Send `command` to HA under a fresh id; HA's answers go back under `client_id`.
    Forward {
        /// The client's id.
        client_id: u64,
        /// The command without its `id`.
        command: Map<String, Value>,
        /// Whether the command opens a subscription (events follow its result), to be
        /// re-established after a reconnect to HA.
        subscription: bool,
    },
    /// The client unsubscribes (`unsubscribe_events`, message `client_id`) from its
    /// forwarded subscription `subscription`: map both ids and forward, or answer HA's
    /// `not_found` when there is no such subscription.
    Unsubscribe {
        /// The id of the `unsubscribe_events` message.
        client_id: u64,
        /// The client's id of the subscription.
        subscription: u64,
    },
    /// Close the connection; the reason is for the log.
    Close(&'static str),
}

/// What the session answers from: the mirror as this client may see it.
pub trait View {
    /// The states an unfiltered `get_states`/`subscribe_entities` gets: the dashboards'
    /// allowlist when one is configured, else the whole (filtered) mirror.
    fn states(&self) -> Vec<Rc<EntityState>>;
    /// Whether an unfiltered subscription carries `entity_id` (see [`View::states`]).
    fn shows(&self, entity_id: &str) -> bool;
    /// The state of a followed entity, if HA has it.
    fn state(&self, entity_id: &str) -> Option<Rc<EntityState>>;
    /// Whether the mirror follows `entity_id` (its filter, or the dashboards' allowlist):
    /// a subscription to ids it does not follow is forwarded.
    fn follows(&self, entity_id: &str) -> bool;
    /// HA's `get_config` result as JSON text, once the link has it.
    fn ha_config(&self) -> Option<Rc<str>>;
    /// A cached answer (the result's JSON text) to the argument-less command `command_type`.
    fn cached(&self, command_type: &str) -> Option<Rc<str>>;
    /// Whether forwarding with hass-edge's own token is forbidden (read-only mode).
    fn read_only(&self) -> bool;
}

/// A subscription answered from the mirror.
#[derive(Debug, Clone, PartialEq)]
enum LocalSub {
    /// `subscribe_entities`: the selected ids, or `None` for everything [`View::shows`].
    Entities(Option<HashSet<String>>),
    /// `subscribe_events` for `state_changed`.
    StateChanged,
}

/// One client's session.
#[derive(Debug)]
pub struct LocalSession {
    phase: Phase,
    /// The highest id accepted so far.
    last_id: u64,
    /// `coalesce_messages` was announced.
    coalesce: bool,
    /// Subscriptions answered here, by the client's id (ordered: events go out in the order
    /// of the subscriptions, as HA's listeners fire).
    local: BTreeMap<u64, LocalSub>,
}

impl Default for LocalSession {
    fn default() -> LocalSession {
        LocalSession::new()
    }
}

impl LocalSession {
    /// A session in [`Phase::AwaitAuth`]; the I/O side sends [`LocalSession::auth_required`]
    /// first.
    pub fn new() -> LocalSession {
        LocalSession {
            phase: Phase::AwaitAuth,
            last_id: 0,
            coalesce: false,
            local: BTreeMap::new(),
        }
    }

    /// HA's first message (`auth.py` `AUTH_REQUIRED_MESSAGE`).
    pub fn auth_required(ha_version: &str) -> String {
        serde_json::json!({"type": "auth_required", "ha_version": ha_version}).to_string()
    }

    /// Where the session is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the client announced `coalesce_messages`: several messages may then go in one
    /// frame as a JSON array.
    pub fn coalesce(&self) -> bool {
        self.coalesce
    }

    /// Whether any subscription is answered from the mirror (the I/O side then follows
    /// the mirror's changes).
    pub fn has_local_subscriptions(&self) -> bool {
        !self.local.is_empty()
    }

    /// Handles one text frame from the client.
    pub fn handle_text(&mut self, text: &str, view: &dyn View, out: &mut Vec<Action>) {
        if self.phase == Phase::AwaitAuth {
            return self.handle_auth(text, out);
        }
        for message in self.split(text, out) {
            self.handle_raw(message, view, out);
        }
    }

    /// The messages of a client's frame once commands are taken: the one message, or each of
    /// a JSON array (HA's `connection.py` takes a list as that many messages), as sent, not
    /// yet parsed. Empty in the auth phase (see [`LocalSession::handle_text`]), while the
    /// token is judged and after the end; also when the frame is not JSON, and then the
    /// session ends ([`Action::Close`] in `out`). A caller that answers the messages one at
    /// a time ([`LocalSession::handle_raw`]) can write each answer before reading the next:
    /// one 1 MiB frame holds tens of thousands of `get_states`.
    pub fn split<'t>(
        &mut self,
        text: &'t str,
        out: &mut Vec<Action>,
    ) -> Vec<&'t serde_json::value::RawValue> {
        if !matches!(self.phase, Phase::Ready(_)) {
            return Vec::new();
        }
        let messages = if text.trim_start().starts_with('[') {
            serde_json::from_str(text)
        } else {
            serde_json::from_str(text).map(|m| vec![m])
        };
        messages.unwrap_or_else(|_| {
            self.phase = Phase::Closed;
            out.push(Action::Close("invalid JSON from the client"));
            Vec::new()
        })
    }

    /// Answers one message of [`LocalSession::split`]; nothing unless commands are taken.
    pub fn handle_raw(
        &mut self,
        message: &serde_json::value::RawValue,
        view: &dyn View,
        out: &mut Vec<Action>,
    ) {
        if let Phase::Ready(mode) = self.phase {
            // `split` checked the syntax, so this parse does not fail.
            if let Ok(message) = serde_json::from_str(message.get()) {
                self.handle_message(message, mode, view, out);
            }
        }
    }

    fn handle_auth(&mut self, text: &str, out: &mut Vec<Action>) {
        let Ok(message) = serde_json::from_str::<Value>(text) else {
            self.phase = Phase::Closed;
            out.push(Action::Close("invalid JSON during the auth phase"));
            return;
        };
        // HA's AUTH_MESSAGE_SCHEMA: `type: auth` and one of `access_token`/`api_password`,
        // nothing else. Legacy API passwords are gone from HA; only tokens are taken.
        let token = message.as_object().and_then(|m| {
            let only_known = m.keys().all(|k| k == "type" || k == "access_token");
            (only_known && m.get("type")?.as_str()? == "auth")
                .then(|| m.get("access_token")?.as_str())
                .flatten()
        });
        match token {
            Some(token) => {
                self.phase = Phase::Authorizing;
                out.push(Action::Authorize(token.to_owned()));
            }
            None => {
                self.phase = Phase::Closed;
                out.push(Action::Send(auth_invalid(
                    "Auth message incorrectly formatted: expected an access_token",
                )));
                out.push(Action::Close("malformed auth message"));
            }
        }
    }

    /// The token was accepted: `auth_ok`, and commands are taken from now on.
    pub fn authorized(&mut self, mode: Mode, ha_version: &str, out: &mut Vec<Action>) {
        if self.phase == Phase::Authorizing {
            self.phase = Phase::Ready(mode);
            out.push(Action::Send(
                serde_json::json!({"type": "auth_ok", "ha_version": ha_version}).to_string(),
            ));
        }
    }

    /// The token was refused: HA's `auth_invalid`, then the end.
    pub fn refused(&mut self, out: &mut Vec<Action>) {
        self.phase = Phase::Closed;
        out.push(Action::Send(auth_invalid(
            "Invalid access token or password",
        )));
        out.push(Action::Close("auth_invalid"));
    }

    fn handle_message(
        &mut self,
        message: Value,
        mode: Mode,
        view: &dyn View,
        out: &mut Vec<Action>,
    ) {
        // `connection.py` `async_handle`: an object with a positive integer id and a
        // non-empty string type.
        let valid = message.as_object().and_then(|m| {
            let id = m.get("id")?.as_u64().filter(|&id| id > 0)?;
            let kind = m.get("type")?.as_str().filter(|t| !t.is_empty())?;
            Some((id, kind.to_owned()))
        });
        let Some((id, kind)) = valid else {
            let id = match &message {
                Value::Object(m) => m.get("id").cloned().unwrap_or(Value::Null),
                _ => Value::from(0),
            };
            out.push(Action::Send(error_value(
                id,
                "invalid_format",
                "Message incorrectly formatted.",
            )));
            return;
        };
        if id <= self.last_id {
            out.push(Action::Send(error(
                id,
                "id_reuse",
                "Identifier values have to increase.",
            )));
            return;
        }
        self.last_id = id;
        let Value::Object(mut fields) = message else {
            return;
        };
        fields.remove("id");
        if let Some(answer) = self.local_answer(id, &kind, &fields, view, out) {
            out.push(answer);
            return;
        }
        if fields.len() == 1
            && let Some(cached) = view.cached(&kind)
        {
            // `result_raw` in pieces: the cached text is shared, not copied whole.
            out.push(Action::SendPiecewise(Piecewise::shared(
                format!(r#"{{"id":{id},"type":"result","success":true,"result":"#),
                Rc::new(cached.clone()),
                "}",
            )));
            return;
        }
        if mode == Mode::Edge && view.read_only() {
            out.push(Action::Send(error(id, "unauthorized", "Unauthorized")));
            return;
        }
        if kind == "unsubscribe_events"
            && fields.len() == 2
            && let Some(subscription) = fields.get("subscription").and_then(Value::as_u64)
        {
            out.push(Action::Unsubscribe {
                client_id: id,
                subscription,
            });
            return;
        }
        out.push(Action::Forward {
            client_id: id,
            subscription: opens_subscription(&kind),
            command: fields,
        });
    }

    /// Entity ids held by the local `subscribe_entities` with `entity_ids`.
    fn local_ids(&self) -> usize {
        self.local
            .values()
            .map(|s| match s {
                LocalSub::Entities(Some(ids)) => ids.len(),
                _ => 0,
            })
            .sum()
    }

    /// The answer to a command the mirror answers (`None`: forward it). `fields` is the
    /// message without `id`. May push the first event of a subscription after the result.
    fn local_answer(
        &mut self,
        id: u64,
        kind: &str,
        fields: &Map<String, Value>,
        view: &dyn View,
        out: &mut Vec<Action>,
    ) -> Option<Action> {
        let only = |allowed: &[&str]| fields.keys().all(|k| allowed.contains(&k.as_str()));
        let room = self.local.len() < MAX_LOCAL_SUBSCRIPTIONS;
        let send = |text: String| Some(Action::Send(text));
        match kind {
            "ping" if fields.len() == 1 => send(format!(r#"{{"id":{id},"type":"pong"}}"#)),
            // `construct_result_message` with the states joined.
            "get_states" if fields.len() == 1 => Some(Action::SendPiecewise(Piecewise::states(
                format!(r#"{{"id":{id},"type":"result","success":true,"result":["#),
                view.states(),
                Form::Json,
                "]}",
            ))),
            "get_config" if fields.len() == 1 => {
                view.ha_config().and_then(|c| send(result_raw(id, &c)))
            }
            "supported_features" if only(&["type", "features"]) => {
                let features = fields.get("features")?.as_object()?;
                // HA's schema: `{str: int}`.
                if !features.values().all(|v| v.is_i64() || v.is_u64()) {
                    return None;
                }
                self.coalesce = features.contains_key("coalesce_messages");
                send(result_raw(id, "null"))
            }
            "subscribe_events"
                if room
                    && only(&["type", "event_type"])
                    && fields.get("event_type")?.as_str()? == "state_changed" =>
            {
                self.local.insert(id, LocalSub::StateChanged);
                send(result_raw(id, "null"))
            }
            "unsubscribe_events" if only(&["type", "subscription"]) => {
                let subscription = fields.get("subscription")?.as_u64()?;
                self.local
                    .remove(&subscription)
                    .and_then(|_| send(result_raw(id, "null")))
            }
            "subscribe_entities" if room && only(&["type", "entity_ids"]) => {
                let ids = match fields.get("entity_ids") {
                    None => None,
                    Some(v) => Some(entity_ids(v)?),
                };
                if ids
                    .as_ref()
                    .is_some_and(|ids| self.local_ids() + ids.len() > MAX_LOCAL_IDS)
                {
                    return None;
                }
                let states: Vec<Rc<EntityState>> = match &ids {
                    // HA: an empty list is no selection.
                    Some(ids) if !ids.is_empty() => {
                        if !ids.iter().all(|e| view.follows(e)) {
                            return None;
                        }
                        ids.iter().filter_map(|e| view.state(e)).collect()
                    }
                    _ => view.states(),
                };
                let ids = ids.filter(|i| !i.is_empty());
                self.local.insert(id, LocalSub::Entities(ids));
                // The result first, then the snapshot (`_send_handle_entities_init_response`).
                out.push(Action::Send(result_raw(id, "null")));
                // `write_initial` in pieces.
                Some(Action::SendPiecewise(Piecewise::states(
                    format!(r#"{{"id":{id},"type":"event","event":{{"a":{{"#),
                    states,
                    Form::Compressed,
                    "}}}",
                )))
            }
            _ => None,
        }
    }

    /// What the unfiltered subscriptions show changed (the dashboards' allowlist was
    /// recomputed): `added` appear as HA shows new entities (`a`), `removed` go as HA
    /// shows removed ones (`r`), one event of each per unfiltered `subscribe_entities`.
    pub fn reveal(&self, added: &[Rc<EntityState>], removed: &[String], out: &mut Vec<String>) {
        for (id, sub) in &self.local {
            if *sub != LocalSub::Entities(None) {
                continue;
            }
            if !added.is_empty() {
                let mut event = String::from(r#"{"type":"event","event":"#);
                crate::compressed::write_initial(&mut event, added.iter().map(|s| &**s));
                event.push_str(&format!(r#","id":{id}}}"#));
                out.push(event);
            }
            if !removed.is_empty() {
                let list = serde_json::to_string(removed).unwrap_or_default();
                out.push(format!(
                    r#"{{"type":"event","event":{{"r":{list}}},"id":{id}}}"#
                ));
            }
        }
    }

    /// The messages a batch of mirror changes makes for this client's local subscriptions,
    /// in HA's order (per change, each subscription in order), appended to `out`. Each
    /// change is rendered once for all clients ([`Event::rendered`]).
    pub fn changes(&self, events: &[Rc<Event>], view: &dyn View, out: &mut Vec<String>) {
        if self.local.is_empty() {
            return;
        }
        for event in events {
            let entity_id = event.change.entity_id.as_str();
            for (id, sub) in &self.local {
                let body = match sub {
                    LocalSub::Entities(ids) => {
                        let wanted = match ids {
                            Some(ids) => ids.contains(entity_id),
                            None => view.shows(entity_id),
                        };
                        if !wanted {
                            continue;
                        }
                        event.rendered(Render::Compressed, compressed_event)
                    }
                    LocalSub::StateChanged => {
                        if !view.shows(entity_id) {
                            continue;
                        }
                        event.rendered(Render::StateChanged, |c| {
                            crate::sse::state_changed_json(
                                &c.entity_id,
                                c.old_state.as_deref(),
                                c.new_state.as_deref(),
                            )
                        })
                    }
                };
                if body.is_empty() {
                    continue;
                }
                // HA puts the id last here (`messages.py` `cached_state_diff_message`,
                // `cached_event_message`): the shared part is serialised once.
                out.push(format!(r#"{{"type":"event","event":{body},"id":{id}}}"#));
            }
        }
    }
}

/// HA's compressed event for one change (`messages.py` `_state_diff_event`): `{"r":[id]}`
/// for a removal, `{"a":{id:state}}` for a new entity, `{"c":{id:diff}}` for a change; empty
/// when nothing HA compresses differs (no event).
fn compressed_event(change: &Change) -> String {
    let mut out = String::new();
    let written = crate::compressed::write_event(
        &mut out,
        &change.entity_id,
        change.old_state.as_deref(),
        change.new_state.as_deref(),
    );
    if !written {
        out.clear();
    }
    out
}

/// Whether a forwarded command opens a subscription: HA's `subscribe_*` commands and the
/// ones named otherwise that stream events after their result.
pub fn opens_subscription(kind: &str) -> bool {
    kind.contains("subscribe")
        || matches!(
            kind,
            "render_template" | "history/stream" | "logbook/event_stream" | "trace/subscribe"
        )
}

/// `cv.entity_ids`: a list of entity ids or a comma-separated string, lower-cased; `None`
/// when one is not an entity id (HA's own error then answers it).
fn entity_ids(v: &Value) -> Option<HashSet<String>> {
    let list: Vec<String> = match v {
        Value::String(s) => s.split(',').map(|e| e.trim().to_lowercase()).collect(),
        Value::Array(a) => a
            .iter()
            .map(|e| e.as_str().map(|s| s.trim().to_lowercase()))
            .collect::<Option<_>>()?,
        _ => return None,
    };
    list.iter()
        .all(|e| valid_entity_id(e))
        .then(|| list.into_iter().collect())
}

/// `auth_invalid` (`auth.py` `auth_invalid_message`).
pub fn auth_invalid(message: &str) -> String {
    serde_json::json!({"type": "auth_invalid", "message": message}).to_string()
}

/// A success result whose `result` is the JSON text `result` (`messages.py`
/// `construct_result_message`).
pub fn result_raw(id: u64, result: &str) -> String {
    format!(r#"{{"id":{id},"type":"result","success":true,"result":{result}}}"#)
}

/// An error result (`messages.py` `error_message`).
pub fn error(id: u64, code: &str, message: &str) -> String {
    error_value(Value::from(id), code, message)
}

fn error_value(id: Value, code: &str, message: &str) -> String {
    serde_json::json!({
        "id": id,
        "type": "result",
        "success": false,
        "error": {"code": code, "message": message},
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity::{Context, Timestamp};

    struct Fake {
        states: Vec<Rc<EntityState>>,
        read_only: bool,
        cached: Option<Rc<str>>,
    }

    impl View for Fake {
        fn states(&self) -> Vec<Rc<EntityState>> {
            self.states.clone()
        }
        fn shows(&self, entity_id: &str) -> bool {
            !entity_id.starts_with("sensor.noisy")
        }
        fn state(&self, entity_id: &str) -> Option<Rc<EntityState>> {
            self.states
                .iter()
                .find(|s| s.entity_id == entity_id)
                .cloned()
        }
        fn follows(&self, entity_id: &str) -> bool {
            !entity_id.starts_with("camera.")
        }
        fn ha_config(&self) -> Option<Rc<str>> {
            Some(Rc::from(r#"{"version":"2025.4.4"}"#))
        }
        fn cached(&self, command_type: &str) -> Option<Rc<str>> {
            (command_type == "config/area_registry/list")
                .then(|| self.cached.clone())
                .flatten()
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
    }

    fn state(entity_id: &str, s: &str) -> Rc<EntityState> {
        Rc::new(EntityState {
            entity_id: entity_id.into(),
            state: s.into(),
            attributes: Default::default(),
            last_changed: Timestamp(1_700_000_000_000_000),
            last_reported: None,
            last_updated: Timestamp(1_700_000_000_000_000),
            context: Context {
                id: "01HCTX".into(),
                parent_id: None,
                user_id: None,
            },
            epoch: Default::default(),
        })
    }

    fn view() -> Fake {
        Fake {
            states: vec![state("light.kitchen", "on"), state("switch.fan", "off")],
            read_only: false,
            cached: Some(Rc::from("[]")),
        }
    }

    /// A session past auth in `mode`.
    fn ready(mode: Mode) -> LocalSession {
        let mut s = LocalSession::new();
        let mut out = Vec::new();
        s.handle_text(r#"{"type":"auth","access_token":"t"}"#, &view(), &mut out);
        assert_eq!(out, vec![Action::Authorize("t".into())]);
        out.clear();
        s.authorized(mode, "2025.4.4", &mut out);
        assert_eq!(
            out,
            vec![Action::Send(
                r#"{"type":"auth_ok","ha_version":"2025.4.4"}"#.into()
            )]
        );
        s
    }

    fn sent(s: &mut LocalSession, v: &Fake, text: &str) -> Vec<Action> {
        let mut out = Vec::new();
        s.handle_text(text, v, &mut out);
        out
    }

    /// The messages `s` makes for `switch.fan` turning on.
    fn fan_on(s: &LocalSession, v: &Fake) -> Vec<String> {
        let change = Change {
            entity_id: "switch.fan".into(),
            old_state: Some(state("switch.fan", "off")),
            new_state: Some(state("switch.fan", "on")),
        };
        let mut msgs = Vec::new();
        s.changes(&[Rc::new(Event::for_tests(change))], v, &mut msgs);
        msgs
    }

    fn json(action: &Action) -> Value {
        match action {
            Action::Send(t) => serde_json::from_str(t).unwrap(),
            Action::SendPiecewise(m) => serde_json::from_str(&m.whole()).unwrap(),
            other => panic!("not a Send: {other:?}"),
        }
    }

    #[test]
    fn auth_phase_follows_has_handshake() {
        let mut s = LocalSession::new();
        let out = sent(&mut s, &view(), r#"{"type":"auth","api_password":"x"}"#);
        assert_eq!(json(&out[0])["type"], "auth_invalid");
        assert_eq!(out[1], Action::Close("malformed auth message"));
        assert_eq!(s.phase(), Phase::Closed);
        let mut s = LocalSession::new();
        assert!(matches!(
            sent(&mut s, &view(), "not json")[..],
            [Action::Close(_)]
        ));
        let mut s = LocalSession::new();
        sent(&mut s, &view(), r#"{"type":"auth","access_token":"bad"}"#);
        let mut out = Vec::new();
        s.refused(&mut out);
        assert_eq!(
            json(&out[0]),
            serde_json::json!({"type":"auth_invalid","message":"Invalid access token or password"})
        );
        assert_eq!(s.phase(), Phase::Closed);
        // Commands before the verdict are not taken.
        let mut s = LocalSession::new();
        sent(&mut s, &view(), r#"{"type":"auth","access_token":"t"}"#);
        assert!(sent(&mut s, &view(), r#"{"id":1,"type":"ping"}"#).is_empty());
    }

    #[test]
    fn ids_and_formats_as_has_connection() {
        let mut s = ready(Mode::Edge);
        let v = view();
        assert_eq!(
            json(&sent(&mut s, &v, r#"{"id":5,"type":"ping"}"#)[0]),
            serde_json::json!({"id":5,"type":"pong"})
        );
        let reuse = json(&sent(&mut s, &v, r#"{"id":5,"type":"ping"}"#)[0]);
        assert_eq!(reuse["error"]["code"], "id_reuse");
        assert_eq!(reuse["success"], false);
        for bad in [
            r#"{"id":0,"type":"ping"}"#,
            r#"{"id":"7","type":"ping"}"#,
            r#"{"id":7.5,"type":"ping"}"#,
            r#"{"id":7}"#,
            r#"[1]"#,
        ] {
            let e = json(&sent(&mut s, &v, bad)[0]);
            assert_eq!(e["error"]["code"], "invalid_format", "{bad}");
            assert_eq!(e["error"]["message"], "Message incorrectly formatted.");
        }
        // A batch: each message on its own, in order.
        let out = sent(
            &mut s,
            &v,
            r#"[{"id":8,"type":"ping"},{"id":9,"type":"ping"}]"#,
        );
        assert_eq!(json(&out[0])["id"], 8);
        assert_eq!(json(&out[1])["id"], 9);
        // A frame that is not JSON ends the session (HA: "Received invalid JSON.").
        assert!(matches!(sent(&mut s, &v, "{")[..], [Action::Close(_)]));
    }

    #[test]
    fn local_answers_have_has_shapes() {
        let mut s = ready(Mode::Edge);
        let v = view();
        let states = json(&sent(&mut s, &v, r#"{"id":1,"type":"get_states"}"#)[0]);
        assert_eq!(states["success"], true);
        assert_eq!(states["result"][0]["entity_id"], "light.kitchen");
        assert_eq!(states["result"][1]["state"], "off");
        let config = json(&sent(&mut s, &v, r#"{"id":2,"type":"get_config"}"#)[0]);
        assert_eq!(config["result"]["version"], "2025.4.4");
        let out = sent(
            &mut s,
            &v,
            r#"{"id":3,"type":"supported_features","features":{"coalesce_messages":1}}"#,
        );
        assert_eq!(json(&out[0])["result"], Value::Null);
        assert!(s.coalesce());
        // Cached forwarded answers are served without HA.
        let areas = json(&sent(&mut s, &v, r#"{"id":4,"type":"config/area_registry/list"}"#)[0]);
        assert_eq!(areas["result"], serde_json::json!([]));
    }

    #[test]
    fn subscribe_entities_sends_result_then_snapshot_and_follows_changes() {
        let mut s = ready(Mode::Edge);
        let v = view();
        let out = sent(&mut s, &v, r#"{"id":3,"type":"subscribe_entities"}"#);
        assert_eq!(
            json(&out[0]),
            serde_json::json!({"id":3,"type":"result","success":true,"result":null})
        );
        let snapshot = json(&out[1]);
        assert_eq!(snapshot["type"], "event");
        assert_eq!(snapshot["event"]["a"]["light.kitchen"]["s"], "on");
        assert_eq!(snapshot["event"]["a"]["switch.fan"]["s"], "off");
        assert!(s.has_local_subscriptions());
        // Only the selected ids.
        let out = sent(
            &mut s,
            &v,
            r#"{"id":4,"type":"subscribe_entities","entity_ids":["switch.fan"]}"#,
        );
        let only = json(&out[1]);
        assert_eq!(only["event"]["a"].as_object().unwrap().len(), 1);
        // Ids the mirror does not follow go to HA, as do filters HA validates.
        let out = sent(
            &mut s,
            &v,
            r#"{"id":5,"type":"subscribe_entities","entity_ids":["camera.door"]}"#,
        );
        assert!(matches!(
            &out[..],
            [Action::Forward {
                client_id: 5,
                subscription: true,
                ..
            }]
        ));
        let out = sent(
            &mut s,
            &v,
            r#"{"id":6,"type":"subscribe_entities","include":{"domains":["light"]}}"#,
        );
        assert!(matches!(&out[..], [Action::Forward { client_id: 6, .. }]));
        // A change reaches both local subscriptions that select it, in subscription order.
        let msgs = fan_on(&s, &v);
        assert_eq!(msgs.len(), 2);
        let first: Value = serde_json::from_str(&msgs[0]).unwrap();
        assert_eq!(first["id"], 3);
        assert_eq!(first["event"]["c"]["switch.fan"]["+"]["s"], "on");
        let second: Value = serde_json::from_str(&msgs[1]).unwrap();
        assert_eq!(second["id"], 4);
        // A removal is `r`; an entity the allowlist hides reaches no unfiltered subscription.
        let gone = Change {
            entity_id: "sensor.noisy_1".into(),
            old_state: Some(state("sensor.noisy_1", "1")),
            new_state: None,
        };
        let mut msgs = Vec::new();
        s.changes(&[Rc::new(Event::for_tests(gone))], &v, &mut msgs);
        assert!(msgs.is_empty(), "{msgs:?}");
        let gone = Change {
            entity_id: "light.kitchen".into(),
            old_state: Some(state("light.kitchen", "on")),
            new_state: None,
        };
        s.changes(&[Rc::new(Event::for_tests(gone))], &v, &mut msgs);
        assert_eq!(
            msgs,
            vec![r#"{"type":"event","event":{"r":["light.kitchen"]},"id":3}"#]
        );
    }

    /// The pieces of `message` written `limit` bytes at a time.
    fn pieces(message: &Piecewise, limit: usize) -> Vec<String> {
        let (mut next, mut pieces) = (0, Vec::new());
        loop {
            let mut piece = Vec::new();
            let done = message.write_piece(&mut next, &mut piece, limit);
            pieces.push(String::from_utf8(piece).expect("a piece is whole UTF-8"));
            if done {
                return pieces;
            }
        }
    }

    #[test]
    fn a_message_of_many_states_is_the_same_text_in_pieces() {
        let states: Vec<_> = (0..50)
            .map(|i| state(&format!("sensor.s{i}"), &i.to_string()))
            .collect();
        let v = Fake {
            states: states.clone(),
            read_only: false,
            cached: None,
        };
        let mut s = ready(Mode::Edge);
        let out = sent(&mut s, &v, r#"{"id":1,"type":"get_states"}"#);
        let [Action::SendPiecewise(m)] = &out[..] else {
            panic!("{out:?}")
        };
        let joined: Vec<String> = states.iter().map(|s| s.to_json()).collect();
        let whole = result_raw(1, &format!("[{}]", joined.join(",")));
        assert_eq!(m.whole(), whole);
        let longest = joined.iter().map(String::len).max().unwrap();
        let got = pieces(m, 300);
        assert!(got.len() > 5, "{got:?}");
        for p in &got[..got.len() - 1] {
            assert!((300..300 + longest + 1).contains(&p.len()), "{p}");
        }
        assert_eq!(got.concat(), whole);

        let out = sent(&mut s, &v, r#"{"id":2,"type":"subscribe_entities"}"#);
        let [Action::Send(_), Action::SendPiecewise(m)] = &out[..] else {
            panic!("{out:?}")
        };
        let mut whole = String::from(r#"{"id":2,"type":"event","event":"#);
        crate::compressed::write_initial(&mut whole, states.iter().map(|s| &**s));
        whole.push('}');
        assert_eq!(pieces(m, 300).concat(), whole);
        assert_eq!(pieces(m, usize::MAX), [whole]);
        // A cached answer: the shared text in pieces that end between characters.
        let cached: String = (0..400)
            .map(|i| format!(r#"{{"name":"Küche ☕ {i}"}},"#))
            .collect();
        let cached = format!("[{}]", cached.trim_end_matches(','));
        let with_cache = Fake {
            cached: Some(Rc::from(cached.as_str())),
            ..view()
        };
        let out = sent(
            &mut s,
            &with_cache,
            r#"{"id":3,"type":"config/area_registry/list"}"#,
        );
        let [Action::SendPiecewise(m)] = &out[..] else {
            panic!("{out:?}")
        };
        let whole = result_raw(3, &cached);
        assert_eq!(m.whole(), whole);
        for limit in [1, 7, 300] {
            let got = pieces(m, limit);
            assert!(got.len() > 10, "{limit}: {}", got.len());
            assert_eq!(got.concat(), whole, "{limit}");
        }
        // A range of a received text; one that cuts a character is refused.
        let received = r#"{"id":9,"result":"ü"}"#;
        let text: Rc<dyn AsRef<str>> = Rc::new(String::from(received));
        let m = Piecewise::text(r#"{"id":2,"#.into(), text.clone(), 8..received.len(), "");
        let m = m.unwrap();
        assert_eq!(m.whole(), r#"{"id":2,"result":"ü"}"#);
        assert_eq!(pieces(&m, 1).concat(), m.whole());
        let cut = received.find('ü').unwrap() + 1;
        assert!(Piecewise::text(String::new(), text.clone(), 8..cut, "").is_none());
        assert!(Piecewise::text(String::new(), text, 8..99, "").is_none());
        // No states: head and tail.
        let empty = Fake {
            states: Vec::new(),
            ..view()
        };
        let out = sent(&mut s, &empty, r#"{"id":4,"type":"get_states"}"#);
        assert_eq!(
            json(&out[0]),
            serde_json::json!({"id":4,"type":"result","success":true,"result":[]})
        );
    }

    #[test]
    fn local_subscriptions_are_bounded_and_the_rest_go_to_ha() {
        let mut s = ready(Mode::Edge);
        let v = view();
        for id in 1..=MAX_LOCAL_SUBSCRIPTIONS as u64 {
            let command = if id % 2 == 0 {
                format!(r#"{{"id":{id},"type":"subscribe_entities"}}"#)
            } else {
                format!(r#"{{"id":{id},"type":"subscribe_events","event_type":"state_changed"}}"#)
            };
            assert_eq!(json(&sent(&mut s, &v, &command)[0])["success"], true);
        }
        // Full: both kinds go to HA, which serves them.
        let next = MAX_LOCAL_SUBSCRIPTIONS as u64 + 1;
        for (id, command) in [
            (next, r#""type":"subscribe_entities""#),
            (
                next + 1,
                r#""type":"subscribe_events","event_type":"state_changed""#,
            ),
        ] {
            let out = sent(&mut s, &v, &format!(r#"{{"id":{id},{command}}}"#));
            assert!(
                matches!(&out[..], [Action::Forward { client_id, subscription: true, .. }] if *client_id == id),
                "{out:?}"
            );
        }
        // A change costs one message per local subscription, no more.
        let msgs = fan_on(&s, &v);
        assert_eq!(msgs.len(), MAX_LOCAL_SUBSCRIPTIONS);
        // One ended: room for one again.
        let out = sent(
            &mut s,
            &v,
            &format!(
                r#"{{"id":{},"type":"unsubscribe_events","subscription":1}}"#,
                next + 2
            ),
        );
        assert_eq!(json(&out[0])["success"], true);
        let out = sent(
            &mut s,
            &v,
            &format!(r#"{{"id":{},"type":"subscribe_entities"}}"#, next + 3),
        );
        assert_eq!(json(&out[0])["success"], true);
    }

    #[test]
    fn the_entity_ids_of_local_subscriptions_are_bounded() {
        let mut s = ready(Mode::Edge);
        let v = view();
        let ids = |from: usize, n: usize| -> String {
            let list: Vec<String> = (from..from + n)
                .map(|i| format!(r#""sensor.s{i}""#))
                .collect();
            list.join(",")
        };
        let half = MAX_LOCAL_IDS / 2;
        let out = sent(
            &mut s,
            &v,
            &format!(
                r#"{{"id":1,"type":"subscribe_entities","entity_ids":[{}]}}"#,
                ids(0, half)
            ),
        );
        assert_eq!(json(&out[0])["success"], true);
        // One id past the bound, counted over the session's subscriptions: forwarded.
        let out = sent(
            &mut s,
            &v,
            &format!(
                r#"{{"id":2,"type":"subscribe_entities","entity_ids":[{}]}}"#,
                ids(half, MAX_LOCAL_IDS - half + 1)
            ),
        );
        assert!(
            matches!(&out[..], [Action::Forward { client_id: 2, .. }]),
            "{out:?}"
        );
        // Exactly up to it: answered here.
        let out = sent(
            &mut s,
            &v,
            &format!(
                r#"{{"id":3,"type":"subscribe_entities","entity_ids":[{}]}}"#,
                ids(half, MAX_LOCAL_IDS - half)
            ),
        );
        assert_eq!(json(&out[0])["success"], true);
    }

    #[test]
    fn unsubscribe_and_state_changed_events() {
        let mut s = ready(Mode::Edge);
        let v = view();
        let out = sent(
            &mut s,
            &v,
            r#"{"id":1,"type":"subscribe_events","event_type":"state_changed"}"#,
        );
        assert_eq!(json(&out[0])["success"], true);
        let msgs = fan_on(&s, &v);
        let e: Value = serde_json::from_str(&msgs[0]).unwrap();
        assert_eq!(e["event"]["event_type"], "state_changed");
        assert_eq!(e["event"]["data"]["new_state"]["state"], "on");
        assert_eq!(e["event"]["data"]["old_state"]["state"], "off");
        let out = sent(
            &mut s,
            &v,
            r#"{"id":2,"type":"unsubscribe_events","subscription":1}"#,
        );
        assert_eq!(
            json(&out[0]),
            serde_json::json!({"id":2,"type":"result","success":true,"result":null})
        );
        assert!(!s.has_local_subscriptions());
        // Not ours: the I/O side looks among the forwarded ones.
        let out = sent(
            &mut s,
            &v,
            r#"{"id":3,"type":"unsubscribe_events","subscription":1}"#,
        );
        assert_eq!(
            out,
            vec![Action::Unsubscribe {
                client_id: 3,
                subscription: 1
            }]
        );
        // Other event types go to HA.
        let out = sent(&mut s, &v, r#"{"id":4,"type":"subscribe_events"}"#);
        assert!(matches!(
            &out[..],
            [Action::Forward {
                client_id: 4,
                subscription: true,
                ..
            }]
        ));
    }

    #[test]
    fn read_only_forwards_nothing_with_our_token_but_users_go_to_ha() {
        let v = Fake {
            read_only: true,
            ..view()
        };
        let mut s = ready(Mode::Edge);
        let e = json(
            &sent(
                &mut s,
                &v,
                r#"{"id":1,"type":"call_service","domain":"light","service":"toggle"}"#,
            )[0],
        );
        assert_eq!(e["error"]["code"], "unauthorized");
        // Reads from the mirror still work.
        assert_eq!(
            json(&sent(&mut s, &v, r#"{"id":2,"type":"ping"}"#)[0])["type"],
            "pong"
        );
        let mut s = ready(Mode::User);
        let out = sent(
            &mut s,
            &v,
            r#"{"id":1,"type":"call_service","domain":"light","service":"toggle"}"#,
        );
        match &out[..] {
            [
                Action::Forward {
                    client_id: 1,
                    command,
                    subscription: false,
                },
            ] => {
                assert_eq!(command["domain"], "light");
                assert!(!command.contains_key("id"));
            }
            other => panic!("{other:?}"),
        }
    }
}
