//! `/api/websocket`: the local WebSocket API's I/O (issue 16). One task per client runs a
//! [`LocalSession`] (the protocol, sans I/O) over the upgraded connection, the mirror's
//! changes ([`Hub::subscribe_session`]) and, when the client's commands need HA, a link of
//! its own to HA's WebSocket API ([`UpLink`]).
//!
//! - **Upgrade** (RFC 6455 §4.2): a `GET` with `Upgrade: websocket`, `Sec-WebSocket-Key`
//!   and version 13 gets `101` with `Sec-WebSocket-Accept`; else 400. Beyond
//!   `http.max_websocket_clients` sessions: 503 before the upgrade. The `Origin` rule is the
//!   routes' (`api.rs`, 403 before this).
//! - **Auth**: HA's handshake; 10 s for the `auth` message (HA `AUTH_TIMEOUT`). hass-edge's
//!   API token is a [`Mode::Edge`] session. Any other token is HA's to judge, and HA's
//!   verdict is the client's: the one the local routes keep (`Hub::ha_accepts`, one REST
//!   check per token until it expires), or, when that cannot be had (rate-limited), a link
//!   to HA authenticated with it. The session's link carries its forwarded commands, under
//!   that user's permissions ([`Mode::User`]); it is opened at the first one. A token
//!   HA refuses is refused, in every mode, as HA would (a client checking its credentials
//!   must learn they are wrong). In the loopback-open mode (no API token), any token while
//!   HA is away gets an Edge session. With an API token set and HA away, a non-API token gets no
//!   verdict: the connection closes and the client retries (an `auth_invalid` would make
//!   HA's frontend forget its login).
//! - **Forwarded commands** go on the session's link under ids of its own; HA's answers
//!   come back under the client's. An Edge session opens its link (with hass-edge's HA
//!   token) at its first forwarded command. When the link drops, the commands waiting for
//!   an answer get `home_assistant_error`; open subscriptions are made again on the next
//!   link without the client noticing (the new result is not passed on); without any, the
//!   link is made again at the next forwarded command. While HA is away a forwarded command
//!   is answered `home_assistant_error` at once. When HA refuses a user's token on a new
//!   link (HA's frontend tokens last 30 minutes; an established link outlives them), the
//!   session ends, so the client connects again with a fresh token.
//! - **Cached answers**: `get_services` and the registry lists HA's frontend asks for at
//!   every load ([`CACHED`]) are kept from HA's first answer until HA's matching
//!   `*_updated` event (one subscription on the shared link) or a new link.
//! - **Limits**: a message over [`MAX_MESSAGE_BYTES`] closes the connection; a client that
//!   falls behind the mirror (`broadcast.rs`'s rule: 5 s, 1 MiB or 4,096 updates) or takes
//!   longer than [`WRITE_TIMEOUT`] to take a frame is disconnected and counted, as HA
//!   disconnects a client 4,096 messages behind (`websocket_api/const.py`
//!   `MAX_PENDING_MSG`); nobody else waits for it.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::protocol::frame::FrameHeader;
use async_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use async_tungstenite::tungstenite::{Message, Utf8Bytes};
use serde_json::{Map, Value};
use smol::Timer;
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use smol::stream::StreamExt;

use crate::allowlist::Dashboards;
use crate::broadcast::Subscription;
use crate::config::Secret;
use crate::dashboards::Allowlist;
use crate::deadline::Deadline;
use crate::entity::EntityState;
use crate::http::{Exchange, Response};
use crate::hub::Hub;
use crate::piecewise::Piecewise;
use crate::status::WsApiStatus;
use crate::uplink::{LinkError, UpLink};
use crate::ws_api::{self, Action, LocalSession, MAX_MESSAGE_BYTES, Mode, View};

/// Time for the client's `auth` message (HA `websocket_api/http.py`: 10 s).
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client may take to accept one frame before it is disconnected as too slow.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between attempts to make a session's link again while it holds
/// subscriptions; the first wait is 1 s, doubling.
pub const MAX_RELINK_DELAY: Duration = Duration::from_secs(30);
/// Most answers a session's link waits for at once; beyond, a command is refused with
/// `home_assistant_error` (nothing a client does grows hass-edge's memory without bound).
pub const MAX_PENDING: usize = 1024;
/// Most bytes of a session's commands hass-edge keeps (the JSON of its forwarded
/// subscriptions, made again on a new link, and of the commands waiting for the link being
/// opened); beyond, a command that would be kept is refused with `home_assistant_error`.
/// HA takes commands up to [`MAX_MESSAGE_BYTES`] each; a dashboard's subscriptions are a few
/// hundred bytes each.
pub const MAX_KEPT_BYTES: usize = 256 * 1024;
/// Commands of one frame (HA's array form) answered before the session lets the others run.
const COMMANDS_PER_TURN: usize = 64;
/// Longest a session waits for HA's rate limit on token checks ([`crate::ha_tokens`]) before
/// it ends without a verdict (the client connects again later).
const TOKEN_CHECK_WAIT: Duration = Duration::from_secs(10);

/// Argument-less commands whose answers are cached, and the HA events that end them.
pub const CACHED: &[(&str, &[&str])] = &[
    ("get_services", &["service_registered", "service_removed"]),
    (
        "config/entity_registry/list_for_display",
        &["entity_registry_updated"],
    ),
    ("config/device_registry/list", &["device_registry_updated"]),
    ("config/area_registry/list", &["area_registry_updated"]),
    ("config/floor_registry/list", &["floor_registry_updated"]),
    ("config/label_registry/list", &["label_registry_updated"]),
];

/// The local WebSocket API: its counters and shared caches. One per daemon.
#[derive(Debug)]
pub struct WsApi {
    hub: Rc<Hub>,
    counters: Counters,
    cache: RefCell<HashMap<&'static str, Rc<str>>>,
    /// HA's events that end cached answers, once something is cached; and the link's
    /// `last_connected` when it was made (a new link ends every cached answer).
    invalidations: RefCell<Option<(crate::events::Receiver, Option<std::time::SystemTime>)>>,
    /// The dashboards' allowlist (`[dashboards]`), kept current by [`WsApi::run`].
    dashboards: Dashboards,
    /// Where the tick grid starts (see [`WsApi::tick`]).
    ticks_from: Instant,
    /// Whether a session waits for the next tick, and the event that says so to the ticker.
    tick_wanted: (Cell<bool>, event_listener::Event),
    /// Notified at every tick a session waited for.
    ticked: event_listener::Event,
    /// Buffers for the pieces of large messages, shared by the sessions.
    pieces: Pieces,
}

#[derive(Debug, Default)]
struct Counters {
    open: Cell<usize>,
    total: Cell<u64>,
    forwarded: Cell<u64>,
    links_open: Cell<usize>,
    slow_dropped: Cell<u64>,
    auth_failures: Cell<u64>,
    refused_full: Cell<u64>,
    /// Forwarded commands refused over [`MAX_PENDING`] or [`MAX_KEPT_BYTES`].
    commands_refused: Cell<u64>,
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    Client(String),
    Slow(&'static str),
    Shutdown,
}

impl WsApi {
    /// Until shutdown: keeps the dashboards' allowlist current (see [`Dashboards::run`]) and
    /// runs the tick for the sessions waiting for it (`WsApi::tick`); spawned once by the
    /// app.
    pub async fn run(&self, shutdown: crate::shutdown::Shutdown) {
        let ticks = async {
            loop {
                let wanted = self.tick_wanted.1.listen();
                if !self.tick_wanted.0.get() {
                    wanted.await;
                    continue;
                }
                let at = self.next_tick(Instant::now()).unwrap_or_else(Instant::now);
                Timer::at(at).await;
                self.tick_wanted.0.set(false);
                self.ticked.notify(usize::MAX);
            }
        };
        self.dashboards.run(&self.hub, shutdown).or(ticks).await;
    }

    /// Completes at the next tick.
    ///
    /// The tick is the grid on which a client that takes coalesced frames gets the mirror's
    /// changes after its first: once a session has written changes, it reads the mirror
    /// again at the next multiple of `http.websocket_coalesce_ms` (counted from the API's
    /// start). A steady stream of changes goes in one frame per tick, one write and one
    /// wake-up per client, not one each; the first change after a quiet tick goes at once.
    /// One timer serves every session ([`WsApi::run`]): a timer per session cost a reactor
    /// turn per session and tick (async-io wakes its poller for every timer set), more than
    /// the writes it saved.
    async fn tick(&self) {
        let ticked = self.ticked.listen();
        if !self.tick_wanted.0.replace(true) {
            self.tick_wanted.1.notify(1);
        }
        ticked.await;
    }

    /// The API over `hub`.
    pub fn new(hub: Rc<Hub>) -> WsApi {
        WsApi {
            hub,
            counters: Counters::default(),
            cache: RefCell::new(HashMap::new()),
            invalidations: RefCell::new(None),
            dashboards: Dashboards::default(),
            ticks_from: Instant::now(),
            tick_wanted: (Cell::new(false), event_listener::Event::new()),
            ticked: event_listener::Event::new(),
            pieces: Pieces::default(),
        }
    }

    /// The first instant of the tick grid after `now` ([`WsApi::tick`]); `None` when
    /// coalescing is off (`http.websocket_coalesce_ms = 0`).
    fn next_tick(&self, now: Instant) -> Option<Instant> {
        let tick = self.hub.config().http.websocket_coalesce.as_nanos();
        if tick == 0 {
            return None;
        }
        let ticks = now.saturating_duration_since(self.ticks_from).as_nanos() / tick + 1;
        let since = u64::try_from(ticks * tick).unwrap_or(u64::MAX);
        Some(self.ticks_from + Duration::from_nanos(since))
    }

    /// The counters for `/status`, `/metrics` and D-Bus.
    pub fn status(&self) -> WsApiStatus {
        let c = &self.counters;
        WsApiStatus {
            sessions_open: c.open.get(),
            sessions_total: c.total.get(),
            forwarded_commands: c.forwarded.get(),
            links_open: c.links_open.get(),
            slow_clients_dropped: c.slow_dropped.get(),
            auth_failures: c.auth_failures.get(),
            refused_full: c.refused_full.get(),
            commands_refused: c.commands_refused.get(),
        }
    }

    /// Serves one `/api/websocket` upgrade request to its end. Resolves to `false`: the
    /// connection is never reused for HTTP.
    pub async fn serve(&self, mut x: Exchange<'_>) -> std::io::Result<bool> {
        let key = websocket_key(&x.raw_head);
        let Some(key) = key else {
            let response = Response::error(
                400,
                "a WebSocket handshake needs Sec-WebSocket-Key and Sec-WebSocket-Version: 13",
            );
            x.respond(response, false).await?;
            return Ok(false);
        };
        let max = self.hub.config().http.max_websocket_clients;
        if self.counters.open.get() >= max {
            self.counters
                .refused_full
                .set(self.counters.refused_full.get() + 1);
            let response = Response::error(
                503,
                "too many WebSocket clients (http.max_websocket_clients)",
            );
            x.respond(response, false).await?;
            return Ok(false);
        }
        // Counted from here, before anything is awaited, so that upgrades arriving together
        // cannot pass the limit; uncounted however the session ends (also when dropped).
        let _open = OpenSession::new(self);
        let accept = async_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nDate: {}\r\n\r\n",
            crate::http::http_date()
        );
        x.write(head.as_bytes()).await?;
        let (stream, early, shutdown) = x.into_parts();
        // Clients send small commands: a 1 KiB read buffer is what an idle session keeps.
        let config = WebSocketConfig::default()
            .read_buffer_size(1024)
            .max_message_size(Some(MAX_MESSAGE_BYTES))
            .max_frame_size(Some(MAX_MESSAGE_BYTES))
            .write_buffer_size(0)
            .max_write_buffer_size(4 * 1024 * 1024);
        let mut client = WebSocketStream::from_raw_socket(
            Prefixed {
                // Usually empty, but with the HTTP reader's capacity: not kept for the session.
                early: if early.is_empty() { Vec::new() } else { early },
                at: 0,
                readable: stream.clone().into(),
                may_read: true,
                inner: stream,
            },
            Role::Server,
            Some(config),
        )
        .await;
        let c = &self.counters;
        let end = self.session(&mut client, shutdown).await;
        match &end {
            End::Slow(why) => {
                c.slow_dropped.set(c.slow_dropped.get() + 1);
                log::warn!("WebSocket client dropped: {why}");
            }
            End::Client(why) => log::debug!("WebSocket session ended: {why}"),
            End::Shutdown => {}
        }
        if !matches!(end, End::Slow(_)) {
            let close = async { client.close(None).await.is_ok() };
            close
                .or(async {
                    Timer::after(Duration::from_secs(1)).await;
                    false
                })
                .await;
        }
        Ok(false)
    }

    async fn session<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut WebSocketStream<S>,
        shutdown: &crate::shutdown::Shutdown,
    ) -> End {
        let mut session = LocalSession::new();
        let version = self.ha_version();
        let mut deadline = Deadline::new(Instant::now());
        let mut outgoing = Outgoing::default();
        outgoing.push(LocalSession::auth_required(&version));
        if let Err(e) = flush(
            client,
            &mut deadline,
            &session,
            &mut outgoing,
            None,
            &self.pieces,
        )
        .await
        {
            return e;
        }
        // The auth phase.
        let first = async { Some(client.next().await) }
            .or(async {
                Timer::after(AUTH_TIMEOUT).await;
                None
            })
            .or(async {
                shutdown.wait().await;
                None
            })
            .await;
        let text = match first {
            Some(Some(Ok(Message::Text(text)))) => text,
            None if shutdown.is_triggered() => return End::Shutdown,
            None => return End::Client("no auth message within 10 s".into()),
            Some(other) => return End::Client(format!("auth phase: {other:?}")),
        };
        let mut actions = Vec::new();
        session.handle_text(&text, &self.view(), &mut actions);
        let mut link: Option<UpLink> = None;
        let mut token: Option<Secret> = None;
        let mut pending = Vec::new();
        for action in std::mem::take(&mut actions) {
            match action {
                Action::Authorize(presented) => match Box::pin(self.authorize(&presented)).await {
                    Verdict::Accept(mode, up) => {
                        if mode == Mode::User {
                            token = Some(Secret::new(presented));
                        }
                        if up.is_some() {
                            let open = &self.counters.links_open;
                            open.set(open.get() + 1);
                        }
                        link = up.map(|l| *l);
                        session.authorized(mode, &self.ha_version(), &mut pending);
                    }
                    // No verdict from HA: no answer either.
                    Verdict::Unknown => return End::Client("HA could not judge the token".into()),
                    Verdict::Refuse => {
                        self.counters
                            .auth_failures
                            .set(self.counters.auth_failures.get() + 1);
                        session.refused(&mut pending);
                    }
                },
                other => pending.push(other),
            }
        }
        let mut state = Running {
            counters: &self.counters,
            link,
            token,
            relink_at: None,
            relink_delay: Duration::from_secs(1),
            subs: BTreeMap::new(),
            routes: HashMap::new(),
            next_id: 0,
            changes: None,
            end: None,
            opening: None,
            queued: Vec::new(),
            renew_on_open: false,
            tick_wait: false,
            allowlist: (self.dashboards.generation(), self.dashboards.current()),
            held: None,
        };
        let mut outgoing = Outgoing::default();
        // `take_changes` for this session: whether there were changes; a failed write ends
        // the session.
        macro_rules! take_changes {
            ($first:expr) => {
                match self
                    .take_changes(
                        client,
                        &mut deadline,
                        &mut state,
                        &session,
                        $first,
                        &mut outgoing,
                    )
                    .await
                {
                    Ok(any) => any,
                    Err(e) => return e,
                }
            };
        }
        // The auth phase's answer is the first turn's work; every session that ends (a
        // refused token, a malformed message) ends through `state.end` after its last words.
        let mut first = Some(pending);
        loop {
            let wake = match first.take() {
                Some(actions) => Wake::Auth(actions),
                None => self.wait(client, &mut state, shutdown).await,
            };
            // What the client or HA sent may be ready again at once, turn after turn (a client
            // sending as fast as it can): the session lets the others run after each such turn.
            let from_peer = matches!(wake, Wake::Client(_) | Wake::Link(_));
            // Whether the mirror's changes are being written (the next ones wait for the tick).
            let mut with_changes = matches!(wake, Wake::Changes(Some(_)));
            match wake {
                Wake::Auth(actions) => self.act(&mut state, actions, &mut outgoing).await,
                Wake::Tick => {
                    with_changes = take_changes!(None);
                }
                Wake::Shutdown => return End::Shutdown,
                Wake::Client(None) => return End::Client("client went away".into()),
                Wake::Client(Some(Err(e))) => return End::Client(format!("client: {e}")),
                Wake::Client(Some(Ok(message))) => match message {
                    Message::Text(text) => {
                        // Changes that came before the command go first (also those waiting
                        // for the tick): its answer (a snapshot) may already hold them.
                        take_changes!(None);
                        let mut actions = Vec::new();
                        let messages = session.split(&text, &mut actions);
                        self.act(&mut state, std::mem::take(&mut actions), &mut outgoing)
                            .await;
                        // A frame may hold thousands of commands (HA's array form): past
                        // `CHANGES_HELD` bytes of answers, or an answer that goes in pieces,
                        // what is answered is written before the next command is read, and
                        // every `COMMANDS_PER_TURN` the others run.
                        let mut held = 0;
                        for (n, message) in messages.into_iter().enumerate() {
                            if state.end.is_some() {
                                break;
                            }
                            let before = outgoing.texts.len();
                            session.handle_raw(message, &self.view(), &mut actions);
                            self.act(&mut state, std::mem::take(&mut actions), &mut outgoing)
                                .await;
                            held += outgoing.texts[before.min(outgoing.texts.len())..]
                                .iter()
                                .map(String::len)
                                .sum::<usize>();
                            if held >= CHANGES_HELD || !outgoing.pieced.is_empty() {
                                let changes = state.changes.as_ref();
                                if let Err(e) = Box::pin(flush(
                                    client,
                                    &mut deadline,
                                    &session,
                                    &mut outgoing,
                                    changes,
                                    &self.pieces,
                                ))
                                .await
                                {
                                    return e;
                                }
                                held = 0;
                            }
                            if n % COMMANDS_PER_TURN == COMMANDS_PER_TURN - 1 {
                                smol::future::yield_now().await;
                            }
                        }
                    }
                    Message::Close(_) => return End::Client("client closed".into()),
                    Message::Binary(_) => {
                        return End::Client("binary messages are not supported".into());
                    }
                    _ => {}
                },
                Wake::Changes(None) => {
                    return End::Slow("fell behind the mirror's changes");
                }
                Wake::Changes(Some(first)) => {
                    take_changes!(Some(first));
                }
                Wake::Link(Some(Ok(Message::Text(text)))) => {
                    let mut answers = Outgoing::default();
                    if self.link_message(&mut state, &text, &mut answers) {
                        // A service call's result: HA sent the call's state changes before
                        // it, so a client subscribed on this connection had them first. Here
                        // they come by the mirror's link: the result is held until the mirror
                        // holds them (at most `hub::CAUGHT_UP_TIMEOUT`), and they go first,
                        // as from HA; a `get_states` after the result reads them too. The
                        // session goes on meanwhile (local answers, changes), but reads no
                        // more from its link, so HA's later messages stay behind the result.
                        state.held = Some(Box::new(Held {
                            answers,
                            caught_up: self.hub.caught_up(),
                        }));
                    } else {
                        outgoing.append(answers);
                    }
                }
                Wake::CaughtUp => {
                    take_changes!(None);
                    if let Some(held) = state.held.take() {
                        outgoing.append(held.answers);
                    }
                }
                // HA's Close (a restart; tungstenite has answered it): the link is dropped at
                // once. HA's server (aiohttp) waits for the client to close the connection
                // after the Close handshake, and would hold up its stop for 10 s.
                Wake::Link(Some(Ok(Message::Close(_)))) | Wake::Link(Some(Err(_)) | None) => {
                    self.link_lost(&mut state, &mut outgoing)
                }
                Wake::Link(Some(Ok(_))) => {}
                Wake::Relink => self.relink(&mut state),
                Wake::Opened(result) => {
                    Box::pin(self.opened(&mut state, result, &mut outgoing)).await;
                }
                Wake::Allowlist => {
                    take_changes!(None);
                    let now = self.dashboards.current();
                    let before = std::mem::replace(
                        &mut state.allowlist,
                        (self.dashboards.generation(), now.clone()),
                    );
                    let allows = |l: &Option<Rc<Allowlist>>, id: &str| {
                        l.as_ref().is_none_or(|l| l.allows(id))
                    };
                    let (mut added, mut removed) = (Vec::new(), Vec::new());
                    for s in self.hub.tracked_states().0 {
                        match (allows(&before.1, &s.entity_id), allows(&now, &s.entity_id)) {
                            (false, true) => added.push(s),
                            (true, false) => removed.push(s.entity_id.clone()),
                            _ => {}
                        }
                    }
                    session.reveal(&added, &removed, &mut outgoing.texts);
                }
            }
            // Follow the mirror from the turn the first local subscription was answered: its
            // snapshot and the subscription are taken in the same turn, so nothing falls
            // between them.
            if session.has_local_subscriptions() && state.changes.is_none() {
                state.changes = self.hub.subscribe_session();
                if state.changes.is_none() {
                    return End::Slow("no room for another session in the fan-out");
                }
            }
            // A client that takes coalesced frames (HA's frontend and
            // home-assistant-js-websocket announce `coalesce_messages`) and was just written the
            // mirror's changes reads the mirror again at the next tick ([`WsApi::tick`]): under
            // a steady stream of changes, the ones of a tick go in one frame, with one write
            // and one wake-up.
            if with_changes && session.coalesce() && !outgoing.is_empty() {
                state.tick_wait = !self.hub.config().http.websocket_coalesce.is_zero();
            }
            if let Err(e) = flush(
                client,
                &mut deadline,
                &session,
                &mut outgoing,
                state.changes.as_ref(),
                &self.pieces,
            )
            .await
            {
                return e;
            }
            if let Some(end) = state.end.take() {
                return end;
            }
            if from_peer {
                smol::future::yield_now().await;
            }
        }
    }

    /// Renders for the client `first` and the mirror's changes waiting in the session's
    /// subscription, oldest first, also those held for the tick (the wait ends); whether
    /// there were any. What is rendered stays in `outgoing`, but past [`CHANGES_HELD`] bytes
    /// (a resync's thousands of changes) it is written first, so that a session never
    /// holds a resync rendered whole.
    async fn take_changes<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut WebSocketStream<S>,
        deadline: &mut Deadline,
        state: &mut Running<'_>,
        session: &LocalSession,
        first: Option<Rc<crate::broadcast::Event>>,
        outgoing: &mut Outgoing,
    ) -> Result<bool, End> {
        state.tick_wait = false;
        let mut events: Vec<_> = first.into_iter().collect();
        if let Some(sub) = state.changes.as_mut() {
            while let Some(e) = sub.try_recv() {
                events.push(e);
            }
        }
        let view = self.view();
        let mut held = 0;
        for chunk in events.chunks(64) {
            let before = outgoing.texts.len();
            session.changes(chunk, &view, &mut outgoing.texts);
            held += outgoing.texts[before..]
                .iter()
                .map(String::len)
                .sum::<usize>();
            if held >= CHANGES_HELD {
                // Boxed: rare, and its state would make every session's future bigger.
                let changes = state.changes.as_ref();
                Box::pin(flush(
                    client,
                    deadline,
                    session,
                    outgoing,
                    changes,
                    &self.pieces,
                ))
                .await?;
                held = 0;
            }
        }
        Ok(!events.is_empty())
    }

    /// Waits for the next thing to do.
    async fn wait<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut WebSocketStream<S>,
        state: &mut Running<'_>,
        shutdown: &crate::shutdown::Shutdown,
    ) -> Wake {
        let listener = self.dashboards.listen();
        if state.allowlist.0 != self.dashboards.generation() {
            return Wake::Allowlist;
        }
        let Running {
            link,
            relink_at,
            changes,
            tick_wait,
            opening,
            held,
            ..
        } = state;
        let opened = async {
            match opening.as_mut() {
                Some(o) => Wake::Opened(o.await),
                None => std::future::pending().await,
            }
        };
        let waiting_for_tick = *tick_wait;
        let tick = async {
            if waiting_for_tick {
                self.tick().await;
                Wake::Tick
            } else {
                std::future::pending().await
            }
        };
        let from_client = async { Wake::Client(client.next().await) };
        // Until the tick, the mirror's changes wait in the subscription (it is not polled).
        let from_mirror = async {
            match changes.as_mut() {
                Some(sub) if !waiting_for_tick => Wake::Changes(sub.recv().await),
                _ => std::future::pending().await,
            }
        };
        // While a result is held for the mirror, the link's later messages wait behind it.
        let from_link = async {
            match link.as_mut() {
                Some(l) if held.is_none() => Wake::Link(l.recv().await),
                _ => std::future::pending().await,
            }
        };
        let caught_up = async {
            match held.as_ref() {
                Some(h) => {
                    h.caught_up.wait().await;
                    Wake::CaughtUp
                }
                None => std::future::pending().await,
            }
        };
        let relink = async {
            match relink_at {
                Some(at) => {
                    Timer::at(*at).await;
                    Wake::Relink
                }
                None => std::future::pending().await,
            }
        };
        let stop = async {
            shutdown.wait().await;
            Wake::Shutdown
        };
        let allowlist = async {
            listener.await;
            Wake::Allowlist
        };
        stop.or(from_client)
            .or(opened)
            .or(tick)
            .or(from_link)
            .or(caught_up)
            .or(from_mirror)
            .or(relink)
            .or(allowlist)
            .await
    }

    /// Carries out the session's actions; [`Action::Close`] sets `state.end` (the session
    /// ends once what came before it is written).
    async fn act(&self, state: &mut Running<'_>, actions: Vec<Action>, outgoing: &mut Outgoing) {
        for action in actions {
            match action {
                Action::Send(text) => outgoing.push(text),
                Action::SendPiecewise(message) => outgoing.push_piecewise(message, &self.pieces),
                Action::Close(why) => {
                    state.end = Some(End::Client(why.into()));
                    return;
                }
                // Only in the auth phase, handled there.
                Action::Authorize(_) => {}
                Action::Forward {
                    client_id,
                    command,
                    subscription,
                } => {
                    let kind = command
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    let cache = (command.len() == 1)
                        .then(|| CACHED.iter().find(|(k, _)| *k == kind).map(|(k, _)| *k))
                        .flatten();
                    if cache.is_some() {
                        self.watch_invalidations();
                    }
                    // Boxed: opening a link is rare, and its state would make every session
                    // future bigger.
                    Box::pin(self.forward(
                        state,
                        client_id,
                        command,
                        subscription,
                        cache,
                        outgoing,
                    ))
                    .await;
                }
                Action::Unsubscribe {
                    client_id,
                    subscription,
                } => {
                    let up = state.subs.get(&subscription).map(|s| s.upstream_id);
                    match (up, state.link.as_mut()) {
                        (Some(up_sub), Some(link)) => {
                            state.subs.remove(&subscription);
                            let mut command = Map::new();
                            command.insert("type".into(), "unsubscribe_events".into());
                            command.insert("subscription".into(), up_sub.into());
                            state.next_id += 1;
                            let id = state.next_id;
                            state.routes.insert(
                                id,
                                Route {
                                    client_id,
                                    subscription: false,
                                    cache: None,
                                    again: false,
                                    service_call: false,
                                    unsubscribe: true,
                                },
                            );
                            if link.send(id, &command).await.is_err() {
                                self.link_lost(state, outgoing);
                            }
                        }
                        (Some(_), None) => {
                            // HA is away: the subscription ends here; nothing to undo there.
                            state.subs.remove(&subscription);
                            outgoing.push(ws_api::result_raw(client_id, "null"));
                        }
                        (None, _) => outgoing.push(ws_api::error(
                            client_id,
                            "not_found",
                            "Subscription not found.",
                        )),
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        state: &mut Running<'_>,
        client_id: u64,
        command: Map<String, Value>,
        subscription: bool,
        cache: Option<&'static str>,
        outgoing: &mut Outgoing,
    ) {
        let away = |outgoing: &mut Outgoing| {
            outgoing.push(ws_api::error(
                client_id,
                "home_assistant_error",
                "Home Assistant is not reachable from hass-edge",
            ))
        };
        // Kept: a subscription (made again on a new link) or a command waiting for the link.
        let kept = subscription || state.link.is_none();
        let bytes = if kept {
            serde_json::to_vec(&command).map_or(0, |v| v.len())
        } else {
            0
        };
        let refusal = if state.routes.len() + state.queued.len() >= MAX_PENDING {
            Some("too many commands waiting for Home Assistant")
        } else if kept && state.kept_bytes() + bytes > MAX_KEPT_BYTES {
            Some("too many bytes of this session's commands kept for Home Assistant")
        } else {
            None
        };
        if let Some(message) = refusal {
            let refused = &self.counters.commands_refused;
            refused.set(refused.get() + 1);
            outgoing.push(ws_api::error(client_id, "home_assistant_error", message));
            return;
        }
        if state.link.is_none() {
            // An Edge session's first forward, or any session's first after HA came back:
            // the link is opened beside the session (its local answers do not wait for HA's
            // handshake), and the command goes when it is up.
            if state.opening.is_none() && !self.start_opening(state) {
                return away(outgoing);
            }
            state.queued.push(Queued {
                client_id,
                command,
                bytes,
                subscription,
                cache,
            });
            return;
        }
        let Some(link) = state.link.as_mut() else {
            return away(outgoing);
        };
        state.next_id += 1;
        let id = state.next_id;
        self.counters
            .forwarded
            .set(self.counters.forwarded.get() + 1);
        if link.send(id, &command).await.is_err() {
            self.link_lost(state, outgoing);
            return away(outgoing);
        }
        state.routes.insert(
            id,
            Route {
                client_id,
                subscription,
                cache,
                again: false,
                service_call: command.get("type").and_then(Value::as_str) == Some("call_service"),
                unsubscribe: false,
            },
        );
        if subscription {
            state.subs.insert(
                client_id,
                Sub {
                    upstream_id: id,
                    command,
                    bytes,
                    answered: false,
                },
            );
        }
    }

    /// A message from the session's link: passed to the client under its id.
    /// Passes HA's messages on the session's link to the client, under the client's ids;
    /// `true` when one is the successful result of a `call_service`.
    fn link_message(
        &self,
        state: &mut Running<'_>,
        frame: &Utf8Bytes,
        outgoing: &mut Outgoing,
    ) -> bool {
        let text = frame.as_str();
        // The frame, shared by the large messages in it (written from it, not copied).
        let mut shared: Option<Rc<dyn AsRef<str>>> = None;
        let mut service_called = false;
        let messages: Vec<&serde_json::value::RawValue> = if text.trim_start().starts_with('[') {
            serde_json::from_str(text).unwrap_or_default()
        } else {
            serde_json::from_str(text)
                .map(|m| vec![m])
                .unwrap_or_default()
        };
        for raw in messages {
            let Ok(head) = serde_json::from_str::<Head<'_>>(raw.get()) else {
                continue;
            };
            let Some(route) = state.routes.get(&head.id) else {
                continue;
            };
            let client_id = route.client_id;
            let is_result = head.kind == "result";
            if is_result {
                let success = head.success.unwrap_or(false);
                service_called |= route.service_call && success;
                let again = route.again;
                let keep = route.subscription && success;
                let cache = route.cache;
                if !keep {
                    state.routes.remove(&head.id);
                    if route_was_sub(&state.subs, client_id, head.id) {
                        state.subs.remove(&client_id);
                    }
                } else {
                    if let Some(r) = state.routes.get_mut(&head.id) {
                        r.again = false;
                    }
                    if let Some(s) = state.subs.get_mut(&client_id) {
                        s.answered = true;
                    }
                }
                if again {
                    if !success {
                        log::warn!(
                            "a forwarded subscription was not made again after HA came back"
                        );
                    }
                    continue;
                }
                if let (Some(kind), true, Some(result)) = (cache, success, head.result) {
                    self.store_cached(kind, result.get());
                }
            }
            // A large answer (a registry list, history) keeps the frame and goes in pieces
            // from it, with the client's id in front of HA's `{"id":N,`.
            let large = if raw.get().len() > PIECE {
                let prefix = format!(r#"{{"id":{},"#, head.id);
                // `raw` borrows from `text` (serde_json's borrowed `RawValue`).
                let start = (raw.get().as_ptr() as usize).checked_sub(text.as_ptr() as usize);
                start
                    .filter(|_| raw.get().starts_with(&prefix))
                    .and_then(|start| {
                        let frame = shared.get_or_insert_with(|| Rc::new(frame.clone()));
                        Piecewise::text(
                            format!(r#"{{"id":{client_id},"#),
                            frame.clone(),
                            start + prefix.len()..start + raw.get().len(),
                            "",
                        )
                    })
            } else {
                None
            };
            match large {
                Some(message) => outgoing.push_piecewise(message, &self.pieces),
                None => outgoing.push(with_id(raw.get(), head.id, client_id)),
            }
        }
        service_called
    }

    /// The session's link dropped: waiting commands get `home_assistant_error`;
    /// subscriptions wait for the next link.
    fn link_lost(&self, state: &mut Running<'_>, outgoing: &mut Outgoing) {
        if state.link.take().is_some() {
            self.counters
                .links_open
                .set(self.counters.links_open.get().saturating_sub(1));
        }
        // Every command the client still waits on HA's result for: plain ones, and
        // subscriptions not yet answered (those end here; answered ones are made again).
        // An unsubscribe waiting for HA's answer succeeded: the subscription died with the
        // link, and it is no longer among the ones made again.
        let mut waiting: Vec<(u64, bool)> = state
            .routes
            .values()
            .filter(|r| !r.again)
            .map(|r| (r.client_id, r.unsubscribe))
            .filter(|(c, _)| state.subs.get(c).is_none_or(|s| !s.answered))
            .collect();
        waiting.sort_unstable();
        for (client_id, unsubscribe) in waiting {
            state.subs.remove(&client_id);
            outgoing.push(if unsubscribe {
                ws_api::result_raw(client_id, "null")
            } else {
                ws_api::error(
                    client_id,
                    "home_assistant_error",
                    "the connection to Home Assistant was lost",
                )
            });
        }
        state.routes.clear();
        if !state.subs.is_empty() {
            state.relink_at = Some(Instant::now() + state.relink_delay);
        }
    }

    /// Makes the link again (beside the session), to re-send its subscriptions.
    fn relink(&self, state: &mut Running<'_>) {
        state.relink_at = None;
        if state.subs.is_empty() {
            return;
        }
        state.renew_on_open = true;
        if state.opening.is_none() && !self.start_opening(state) {
            state.renew_on_open = false;
        }
    }

    /// Starts opening the session's link with its token (the user's, or hass-edge's HA
    /// token); `false` when no HA is configured. Tried even while the shared link waits out
    /// its back-off: HA may be back already, and while it is down its refused port answers
    /// at once.
    fn start_opening(&self, state: &mut Running<'_>) -> bool {
        let Some(upstream) = self.hub.upstream() else {
            return false;
        };
        let token = state
            .token
            .clone()
            .unwrap_or_else(|| upstream.token.clone());
        state.opening = Some(Box::pin(async move {
            UpLink::open(&upstream, &token).await.map(Box::new)
        }));
        true
    }

    /// The session's link is open, or could not be made: the commands that waited for it go,
    /// or get `home_assistant_error`; a renewal re-sends the subscriptions first.
    async fn opened(
        &self,
        state: &mut Running<'_>,
        result: Result<Box<UpLink>, LinkError>,
        outgoing: &mut Outgoing,
    ) {
        state.opening = None;
        let queued = std::mem::take(&mut state.queued);
        let renew = std::mem::take(&mut state.renew_on_open);
        match result {
            Ok(mut link) => {
                if renew {
                    state.relink_delay = Duration::from_secs(1);
                    let subs: Vec<(u64, Map<String, Value>)> = state
                        .subs
                        .iter()
                        .map(|(c, s)| (*c, s.command.clone()))
                        .collect();
                    for (client_id, command) in subs {
                        state.next_id += 1;
                        let id = state.next_id;
                        if link.send(id, &command).await.is_err() {
                            break;
                        }
                        state.routes.insert(
                            id,
                            Route {
                                client_id,
                                subscription: true,
                                cache: None,
                                again: true,
                                service_call: false,
                                unsubscribe: false,
                            },
                        );
                        if let Some(s) = state.subs.get_mut(&client_id) {
                            s.upstream_id = id;
                        }
                    }
                    log::info!("WebSocket session: link to HA made again; subscriptions renewed");
                }
                self.counters
                    .links_open
                    .set(self.counters.links_open.get() + 1);
                state.link = Some(*link);
                for q in queued {
                    self.forward(
                        state,
                        q.client_id,
                        q.command,
                        q.subscription,
                        q.cache,
                        outgoing,
                    )
                    .await;
                }
                return;
            }
            Err(LinkError::Refused(message)) => {
                // The user's token expired (HA's frontend tokens last 30 min; an open link
                // outlives them): end the session, so the client connects again with a
                // fresh token and makes its subscriptions again.
                log::info!(
                    "WebSocket session: HA no longer takes the session's token ({message}); closing it"
                );
                state.end = Some(End::Client("HA refused the session's token".into()));
            }
            Err(LinkError::Unreachable(e)) => {
                log::warn!("WebSocket session: no link to HA: {e}");
                if renew {
                    state.relink_delay = (state.relink_delay * 2).min(MAX_RELINK_DELAY);
                    state.relink_at = Some(Instant::now() + state.relink_delay);
                }
            }
        }
        for q in queued {
            outgoing.push(ws_api::error(
                q.client_id,
                "home_assistant_error",
                "Home Assistant is not reachable from hass-edge",
            ));
        }
    }

    /// Decides a presented token (see the module docs).
    async fn authorize(&self, presented: &str) -> Verdict {
        if self.hub.is_api_token(presented) {
            return Verdict::Accept(Mode::Edge, None);
        }
        let open = !self.hub.has_api_token();
        // HA's verdict as the local routes keep it (`ha_tokens.rs`): one REST check per token,
        // kept until the token expires, so a fleet of panels reconnecting at once costs HA one
        // check, and the session's link waits for its first forwarded command.
        // Past the rate limit of those checks the session waits for its turn, at most
        // `TOKEN_CHECK_WAIT`, and then ends without a verdict: opening a link with the token
        // instead would let a stream of made-up tokens reach HA as fast as it comes (HA logs
        // each, and with `ip_ban_enabled` bans the address they come from: hass-edge's own).
        let until = Instant::now() + TOKEN_CHECK_WAIT;
        loop {
            match self.hub.ha_accepts(presented).await {
                crate::hub::TokenCheck::Accepted => return Verdict::Accept(Mode::User, None),
                crate::hub::TokenCheck::Refused => return Verdict::Refuse,
                crate::hub::TokenCheck::Limited if Instant::now() < until => {
                    Timer::after(Duration::from_millis(250)).await;
                }
                crate::hub::TokenCheck::Limited => {
                    log::warn!("WebSocket session: too many new tokens to check; ended unjudged");
                    return Verdict::Unknown;
                }
                crate::hub::TokenCheck::Unreachable => break,
            }
        }
        let Some(upstream) = self.hub.upstream() else {
            return if open {
                Verdict::Accept(Mode::Edge, None)
            } else {
                Verdict::Unknown
            };
        };
        match UpLink::open(&upstream, &Secret::new(presented.to_owned())).await {
            Ok(link) => Verdict::Accept(Mode::User, Some(Box::new(link))),
            Err(LinkError::Unreachable(_)) if open => Verdict::Accept(Mode::Edge, None),
            Err(LinkError::Refused(message)) => {
                log::info!("WebSocket session: HA refused the client's token: {message}");
                Verdict::Refuse
            }
            Err(LinkError::Unreachable(e)) => {
                log::warn!("WebSocket session: HA could not judge a token: {e}");
                Verdict::Unknown
            }
        }
    }

    fn view(&self) -> SessionView<'_> {
        SessionView { api: self }
    }

    fn ha_version(&self) -> String {
        self.hub
            .link()
            .ha_version
            .unwrap_or_else(|| "unknown".to_owned())
    }

    /// Starts following the events that end cached answers (once).
    fn watch_invalidations(&self) {
        let mut inv = self.invalidations.borrow_mut();
        if inv.is_none() {
            let types: HashSet<String> = CACHED
                .iter()
                .flat_map(|(_, events)| events.iter().map(|e| (*e).to_owned()))
                .collect();
            if let Some(receiver) = self.hub.subscribe_events(Some(types)) {
                *inv = Some((receiver, self.hub.link().last_connected));
            }
        }
    }

    /// Applies the queued invalidations; whether cached answers may be used.
    fn invalidate(&self) -> bool {
        let mut inv = self.invalidations.borrow_mut();
        let Some((receiver, connected)) = inv.as_mut() else {
            self.cache.borrow_mut().clear();
            return false;
        };
        let link = self.hub.link();
        if link.last_connected != *connected || link.state != crate::status::LinkState::Live {
            // A new link: events may have been missed.
            *connected = link.last_connected;
            self.cache.borrow_mut().clear();
            if link.state != crate::status::LinkState::Live {
                return false;
            }
        }
        loop {
            match receiver.try_recv() {
                Ok(Some(text)) => {
                    let event_type = event_type_of(&text);
                    let mut cache = self.cache.borrow_mut();
                    for (kind, events) in CACHED {
                        if events.contains(&event_type.as_str()) {
                            cache.remove(kind);
                        }
                    }
                }
                Ok(None) => return true,
                Err(()) => {
                    self.cache.borrow_mut().clear();
                    *inv = None;
                    return false;
                }
            }
        }
    }

    fn store_cached(&self, kind: &'static str, result: &str) {
        if self.invalidate() {
            self.cache.borrow_mut().insert(kind, Rc::from(result));
        }
    }
}

/// One open session in the counters, for as long as it lives.
struct OpenSession<'a>(&'a WsApi);

impl<'a> OpenSession<'a> {
    fn new(api: &'a WsApi) -> OpenSession<'a> {
        let c = &api.counters;
        c.open.set(c.open.get() + 1);
        c.total.set(c.total.get() + 1);
        api.hub.notify_changed();
        OpenSession(api)
    }
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        let c = &self.0.counters;
        c.open.set(c.open.get().saturating_sub(1));
        self.0.hub.notify_changed();
    }
}

/// What hass-edge makes of a presented token.
enum Verdict {
    /// A session in this mode, with the link HA accepted a user's token on.
    Accept(Mode, Option<Box<UpLink>>),
    /// HA refused it: `auth_invalid`.
    Refuse,
    /// HA could not be asked: no answer at all.
    Unknown,
}

fn route_was_sub(subs: &BTreeMap<u64, Sub>, client_id: u64, upstream_id: u64) -> bool {
    subs.get(&client_id)
        .is_some_and(|s| s.upstream_id == upstream_id)
}

/// `event_type` of an SSE-rendered event from [`crate::events`] (`data: {…}\n\n`).
fn event_type_of(text: &str) -> String {
    #[derive(serde::Deserialize)]
    struct E {
        event_type: String,
    }
    let json = text.trim().strip_prefix("data: ").unwrap_or(text);
    serde_json::from_str::<E>(json)
        .map(|e| e.event_type)
        .unwrap_or_default()
}

/// The fields of HA's message a link routes by.
#[derive(serde::Deserialize)]
struct Head<'a> {
    id: u64,
    #[serde(rename = "type")]
    kind: &'a str,
    success: Option<bool>,
    #[serde(borrow)]
    result: Option<&'a serde_json::value::RawValue>,
}

/// `message` (HA's JSON text, id `from`) with the id `to`. HA writes `{"id":N,` first
/// (`messages.py`); anything else is re-serialised.
fn with_id(message: &str, from: u64, to: u64) -> String {
    let prefix = format!(r#"{{"id":{from},"#);
    if let Some(rest) = message.strip_prefix(&prefix) {
        return format!(r#"{{"id":{to},{rest}"#);
    }
    // Events serialised once for every connection carry the id last.
    let suffix = format!(r#","id":{from}}}"#);
    if let Some(rest) = message.strip_suffix(&suffix) {
        return format!(r#"{rest},"id":{to}}}"#);
    }
    match serde_json::from_str::<Map<String, Value>>(message) {
        Ok(mut m) => {
            m.insert("id".into(), to.into());
            Value::Object(m).to_string()
        }
        Err(_) => message.to_owned(),
    }
}

/// A forwarded command waiting for (or, for a subscription, past) its result.
#[derive(Debug)]
struct Route {
    client_id: u64,
    subscription: bool,
    cache: Option<&'static str>,
    /// Re-sent after a new link: its result is not passed on.
    again: bool,
    /// A `call_service`: its result waits for the mirror to hold the call's effects.
    service_call: bool,
    /// An `unsubscribe_events` of a forwarded subscription: if the link drops before HA's
    /// answer, the subscription ended with it, and the client is told so (success).
    unsubscribe: bool,
}

/// A session's link being opened ([`UpLink::open`]).
type Opening = Pin<Box<dyn Future<Output = Result<Box<UpLink>, LinkError>>>>;

/// A forwarded command waiting for the session's link.
#[derive(Debug)]
struct Queued {
    client_id: u64,
    command: Map<String, Value>,
    /// The length of `command`'s JSON (see [`MAX_KEPT_BYTES`]).
    bytes: usize,
    subscription: bool,
    cache: Option<&'static str>,
}

/// A forwarded subscription, kept to be made again on a new link.
#[derive(Debug)]
struct Sub {
    upstream_id: u64,
    command: Map<String, Value>,
    /// The length of `command`'s JSON (see [`MAX_KEPT_BYTES`]).
    bytes: usize,
    /// The client has HA's result to it (a renewal's is not passed on).
    answered: bool,
}

/// A session's state beyond the protocol.
struct Running<'a> {
    counters: &'a Counters,
    link: Option<UpLink>,
    /// The user's token ([`Mode::User`]); `None` for hass-edge's.
    token: Option<Secret>,
    relink_at: Option<Instant>,
    relink_delay: Duration,
    /// Forwarded subscriptions by the client's id.
    subs: BTreeMap<u64, Sub>,
    /// Forwarded commands by the link's id.
    routes: HashMap<u64, Route>,
    next_id: u64,
    changes: Option<Subscription>,
    /// Set when the session must end after this turn's messages are written.
    end: Option<End>,
    /// The session's link being opened.
    opening: Option<Opening>,
    /// Forwarded commands waiting for the link being opened.
    queued: Vec<Queued>,
    /// The link being opened is a renewal: its subscriptions are sent again first.
    renew_on_open: bool,
    /// Whether the mirror's changes are next read at the tick (`false`: as they come).
    tick_wait: bool,
    /// The allowlist this session's unfiltered subscriptions last showed, and its generation.
    allowlist: (u64, Option<Rc<Allowlist>>),
    /// A service call's result (and what came with it) held until the mirror caught up
    /// (boxed: rare, and every session's state would carry its size).
    held: Option<Box<Held>>,
}

/// What [`Running::held`] holds: HA's answers from one frame of the session's link, written
/// once `caught_up` resolves.
struct Held {
    answers: Outgoing,
    caught_up: crate::hub::CaughtUp,
}

impl Running<'_> {
    /// The bytes of commands kept: subscriptions and commands waiting for the link.
    fn kept_bytes(&self) -> usize {
        let subs: usize = self.subs.values().map(|s| s.bytes).sum();
        subs + self.queued.iter().map(|q| q.bytes).sum::<usize>()
    }
}

impl Drop for Running<'_> {
    /// The session's link goes with it.
    fn drop(&mut self) {
        if self.link.is_some() {
            let open = &self.counters.links_open;
            open.set(open.get().saturating_sub(1));
        }
    }
}

enum Wake {
    /// The auth phase's actions (the first turn).
    Auth(Vec<Action>),
    Client(Option<Result<Message, async_tungstenite::tungstenite::Error>>),
    Changes(Option<Rc<crate::broadcast::Event>>),
    Link(Option<Result<Message, async_tungstenite::tungstenite::Error>>),
    Relink,
    Opened(Result<Box<UpLink>, LinkError>),
    Allowlist,
    Tick,
    /// The mirror caught up with a held service call's result ([`Running::held`]).
    CaughtUp,
    Shutdown,
}

/// What a session's answers come from.
struct SessionView<'a> {
    api: &'a WsApi,
}

impl View for SessionView<'_> {
    fn states(&self) -> Vec<Rc<EntityState>> {
        let mut states = self.api.hub.tracked_states().0;
        if let Some(list) = self.api.dashboards.current() {
            states.retain(|s| list.allows(&s.entity_id));
        }
        states
    }
    fn shows(&self, entity_id: &str) -> bool {
        self.api.hub.follows(entity_id) && self.api.dashboards.allows(entity_id)
    }
    fn state(&self, entity_id: &str) -> Option<Rc<EntityState>> {
        self.api.hub.followed_state(entity_id)
    }
    fn follows(&self, entity_id: &str) -> bool {
        self.api.hub.follows(entity_id)
    }
    fn ha_config(&self) -> Option<Rc<str>> {
        self.api.hub.ha_config()
    }
    fn cached(&self, command_type: &str) -> Option<Rc<str>> {
        if !self.api.invalidate() {
            return None;
        }
        self.api.cache.borrow().get(command_type).cloned()
    }
    fn read_only(&self) -> bool {
        !self.api.hub.config().http.allow_service_calls
    }
}

/// Bytes of rendered changes a session holds before writing them (see `take_changes`).
const CHANGES_HELD: usize = 256 * 1024;

/// Bytes of a [`Piecewise`] message rendered at a time: the most a session holds of one
/// (a state or a character more at most).
const PIECE: usize = 64 * 1024;

/// Piece buffers kept for reuse; a piece buffer that grew past twice [`PIECE`] (a state of
/// megabytes) is not kept.
const PIECES_KEPT: usize = 4;

/// Buffers for the pieces of [`Piecewise`] messages, reused by every session (one executor
/// thread). A session writing a large message usually finishes it in one turn, so a few
/// serve all. Allocating a 64 KiB buffer for every large message of every session, between
/// the sessions' own small long-lived allocations, left glibc's heap fragmented: 200
/// sessions that each took a 250 KB snapshot kept 3 KiB more RSS each after the buffers were
/// freed.
#[derive(Debug, Default)]
struct Pieces(RefCell<Vec<Vec<u8>>>);

impl Pieces {
    fn take(&self) -> Vec<u8> {
        self.0
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(PIECE + PIECE / 16))
    }

    fn give(&self, mut buffer: Vec<u8>) {
        let mut kept = self.0.borrow_mut();
        if kept.len() < PIECES_KEPT && buffer.capacity() <= 2 * PIECE {
            buffer.clear();
            kept.push(buffer);
        }
    }
}

/// What a turn writes to the client, in order: messages, and among them now and then a large
/// one (many states, a cached registry list: [`Piecewise`]), rendered as it is written.
#[derive(Debug, Default)]
struct Outgoing {
    texts: Vec<String>,
    /// Each with the number of `texts` that go before it, its first piece (in a buffer of
    /// [`Pieces`]), and the point of the body the next piece starts at.
    pieced: Vec<(usize, Piecewise, Vec<u8>, usize)>,
}

impl Outgoing {
    fn push(&mut self, text: String) {
        self.texts.push(text);
    }

    /// A [`Piecewise`] message: one that fits in a [`PIECE`] joins the others as text; a
    /// bigger one is kept with its first piece, and the rest is rendered while it is written.
    fn push_piecewise(&mut self, message: Piecewise, pieces: &Pieces) {
        let (mut first, mut next) = (pieces.take(), 0);
        if message.write_piece(&mut next, &mut first, PIECE) {
            // Whole UTF-8, as every piece (`Piecewise::write_piece`).
            self.texts
                .push(String::from_utf8_lossy(&first).into_owned());
            pieces.give(first);
        } else {
            self.pieced.push((self.texts.len(), message, first, next));
        }
    }

    fn is_empty(&self) -> bool {
        self.texts.is_empty() && self.pieced.is_empty()
    }

    /// Appends `later`'s messages after these.
    fn append(&mut self, later: Outgoing) {
        let at = self.texts.len();
        self.pieced.extend(
            later
                .pieced
                .into_iter()
                .map(|(i, message, first, next)| (at + i, message, first, next)),
        );
        self.texts.extend(later.texts);
    }
}

/// Writes the outgoing messages: one frame each, or one array frame when the client
/// coalesces (HA `http.py` `_writer`); a [`Piecewise`] message as a fragmented message of
/// its own (RFC 6455 §5.4: a text frame, continuation frames, the last one final), each
/// piece rendered into the same buffer once the one before is written.
async fn flush<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut WebSocketStream<S>,
    deadline: &mut Deadline,
    session: &LocalSession,
    outgoing: &mut Outgoing,
    changes: Option<&Subscription>,
    pieces: &Pieces,
) -> Result<(), End> {
    let mut from = 0;
    for (at, message, mut piece, mut next) in std::mem::take(&mut outgoing.pieced) {
        write_texts(
            client,
            deadline,
            session,
            &outgoing.texts[from..at],
            changes,
        )
        .await?;
        from = at;
        // The first piece is never the last one: the message goes on after it.
        let (mut opcode, mut last) = (Data::Text, false);
        loop {
            // The header apart: the piece is written from its buffer, not copied.
            let head = frame_head(opcode, last, piece.len(), 0);
            send(client, deadline, &head, changes).await?;
            send(client, deadline, &piece, changes).await?;
            if last {
                break;
            }
            piece.clear();
            last = message.write_piece(&mut next, &mut piece, PIECE);
            opcode = Data::Continue;
        }
        pieces.give(piece);
    }
    let result = write_texts(client, deadline, session, &outgoing.texts[from..], changes).await;
    outgoing.texts.clear();
    result
}

/// Writes `texts`: one frame each, or one array frame when the client coalesces (HA
/// `http.py` `_writer`).
async fn write_texts<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut WebSocketStream<S>,
    deadline: &mut Deadline,
    session: &LocalSession,
    texts: &[String],
    changes: Option<&Subscription>,
) -> Result<(), End> {
    if session.coalesce() && texts.len() > 1 {
        let len = texts.iter().map(|m| m.len() + 1).sum::<usize>() + 1;
        let mut frame = frame_head(Data::Text, true, len, len);
        frame.push(b'[');
        for (i, m) in texts.iter().enumerate() {
            if i > 0 {
                frame.push(b',');
            }
            frame.extend_from_slice(m.as_bytes());
        }
        frame.push(b']');
        return send(client, deadline, &frame, changes).await;
    }
    for m in texts {
        send(client, deadline, &text_frame(m), changes).await?;
    }
    Ok(())
}

/// An unmasked, final text frame carrying `payload` (RFC 6455 §5.2).
fn text_frame(payload: &str) -> Vec<u8> {
    let mut frame = frame_head(Data::Text, true, payload.len(), payload.len());
    frame.extend_from_slice(payload.as_bytes());
    frame
}

/// The header of an unmasked frame whose payload is `len` bytes (formatted by tungstenite's
/// [`FrameHeader`]), in a buffer with room for `room` more bytes (the payload, when it is
/// copied behind the header).
fn frame_head(opcode: Data, is_final: bool, len: usize, room: usize) -> Vec<u8> {
    let header = FrameHeader {
        is_final,
        opcode: OpCode::Data(opcode),
        ..FrameHeader::default()
    };
    let mut frame = Vec::with_capacity(header.len(len as u64) + room);
    // Writing into a Vec cannot fail.
    let _ = header.format(len as u64, &mut frame);
    frame
}

/// Writes one whole frame, or a part of one (see [`text_frame`], [`frame_head`]) within [`WRITE_TIMEOUT`] (the session's one
/// [`Deadline`], not a timer per write), or until the fan-out drops the session for falling
/// behind (`changes`): a client that stopped reading is let go then, not 10 s later.
///
/// The frame goes to the socket itself, after whatever tungstenite holds (a pong, a close)
/// is written: tungstenite's own write path copies every frame into a buffer that keeps the
/// capacity of the largest frame it ever wrote, for the life of the connection; an idle
/// session would keep a snapshot's worth (250 KB at 1,000 entities), or with frames cut into
/// pieces, a piece's worth. This way a session keeps no write buffer at all.
async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut WebSocketStream<S>,
    deadline: &mut Deadline,
    frame: &[u8],
    changes: Option<&Subscription>,
) -> Result<(), End> {
    deadline.set(Instant::now() + WRITE_TIMEOUT);
    let write = async {
        futures_util::SinkExt::flush(client)
            .await
            .map_err(|e| End::Client(format!("write: {e}")))?;
        client
            .get_mut()
            .write_all(frame)
            .await
            .map_err(|e| End::Client(format!("write: {e}")))
    };
    write
        .or(async {
            deadline.elapsed().await;
            Err(End::Slow("took no frame for 10 s"))
        })
        .or(async {
            match changes {
                Some(c) => c.closed().await,
                None => std::future::pending().await,
            }
            Err(End::Slow("fell behind the mirror's changes"))
        })
        .await
}

/// `Sec-WebSocket-Key` of a version-13 handshake (RFC 6455 §4.2.1).
fn websocket_key(raw_head: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(raw_head).ok()?;
    let get = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    (get("Sec-WebSocket-Version")? == "13")
        .then(|| get("Sec-WebSocket-Key").map(str::to_owned))
        .flatten()
        .filter(|k| !k.is_empty())
}

/// The client's connection with the bytes read past the head first.
struct Prefixed<S> {
    early: Vec<u8>,
    at: usize,
    /// The socket's reactor source, to wait for readability without a read.
    readable: std::sync::Arc<smol::Async<std::net::TcpStream>>,
    /// Whether a read may find bytes: `false` after a read found none, until the reactor
    /// reports the socket readable. A session's task is woken by the mirror far more often
    /// than by its client, and every wake-up polls the client's stream: without this, each
    /// was a `recv` failing with EAGAIN (2.4 per delivered change at 50 sessions, measured
    /// with `strace -c`).
    may_read: bool,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.at < self.early.len() {
            let n = buf.len().min(self.early.len() - self.at);
            buf[..n].copy_from_slice(&self.early[self.at..self.at + n]);
            self.at += n;
            if self.at == self.early.len() {
                self.early = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(n));
        }
        if !self.may_read {
            std::task::ready!(self.readable.poll_readable(cx))?;
            self.may_read = true;
        }
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if read.is_pending() {
            // The read registered the waker with the reactor.
            self.may_read = false;
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}
