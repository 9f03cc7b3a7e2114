//! The state the I/O parts share on the executor thread: the [`Mirror`], the REST
//! read-through (single-flight, breaker, service-list cache), the fan-out of changes to push
//! clients, the link's state and the counters. Single-threaded (`Rc`/`RefCell`, never held
//! across an `.await`); its fields are private, and callers use its methods, so its rules
//! hold whoever calls. The app owns it and hands it to the link, the HTTP API, D-Bus and
//! the systemd reporters; those read it through one [`Status`] snapshot.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use event_listener::{Event, EventListener};
use smol::Timer;
use smol::channel::{Receiver, Sender};
use smol::future::FutureExt;
use smol::lock::OnceCell;

use crate::broadcast::{Broadcast, Selection, Subscription};
use crate::bucket::Bucket;
use crate::config::{Config, Secret, same_secret};
use crate::entity::EntityState;
use crate::events::{Feed, Receiver as EventReceiver, Types};
use crate::filter::EntityFilter;
use crate::ha_tokens::{Known, Verdicts};
use crate::mirror::{Applied, Mirror, Update};
use crate::rest::{RestClient, RestError};
use crate::status::{ForwardStatus, Link, LinkCounters, LinkState, Status, StreamCounters};
use crate::store::{Change, Lookup};

/// After HA's REST API was unreachable, expired states are served stale without asking HA
/// again for this long, so readers do not each wait out a connect timeout.
const REST_BREAKER: Duration = Duration::from_secs(5);

/// Bound on remembered REST call times (for "calls in the last hour" in the status line).
const REST_HISTORY: usize = 4096;

/// REST reads of entities the mirror does not hold, on average per second: a stranger
/// reading made-up ids must not turn into a flood of requests to HA (issue 13, item 3).
const REST_READS_PER_SECOND: f64 = 10.0;
/// Reads allowed at once above the average (a dashboard loading a page of entities).
const REST_READ_BURST: f64 = 50.0;
/// How often at most the "reads limited" warning is logged.
const LIMITED_WARNING_PERIOD: Duration = Duration::from_secs(60);

/// Commands queued to the link before senders wait (or, for [`Hub::caught_up`], give up).
const COMMAND_QUEUE: usize = 64;
/// Longest a [`CaughtUp`] waits for the link's `pong`.
pub const CAUGHT_UP_TIMEOUT: Duration = Duration::from_secs(2);

/// A request to the link task.
#[derive(Debug, Clone)]
pub enum Command {
    /// Take a fresh snapshot (D-Bus `Resync()`); reconnects if the link is down.
    Resync,
    /// The HA-side filter changed (config reload): resubscribe with it.
    Resubscribe,
    /// URL, token or CA changed (config reload): reconnect with the new settings.
    Reconnect(Box<LinkSettings>),
    /// Say (by closing or sending on the channel) once the link has handed out everything
    /// HA sent before now ([`crate::session::Session::barrier`]); the channel is dropped
    /// unanswered when the link is not authenticated or goes down first.
    Barrier(smol::channel::Sender<()>),
}

/// What a connection to HA needs that may change on reload.
#[derive(Clone)]
pub struct LinkSettings {
    /// `ws://…/api/websocket` or `wss://…`.
    pub websocket_url: String,
    /// The access token.
    pub token: Secret,
    /// TLS config for `wss` (`None` for `ws`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for LinkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSettings")
            .field("websocket_url", &self.websocket_url)
            .finish_non_exhaustive()
    }
}

/// Where forwarded requests go (`proxy.rs`): HA's base URL, the token hass-edge forwards
/// with, and the TLS config for an `https` HA.
#[derive(Clone)]
pub struct Upstream {
    /// `ha.url` without a trailing `/`, e.g. `http://homeassistant.local:8123`.
    pub url: String,
    /// hass-edge's HA token.
    pub token: Secret,
    /// TLS config for `https` (`None` for `http`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// HA's verdict on a token presented to a local route ([`Hub::ha_accepts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenCheck {
    /// HA accepts it.
    Accepted,
    /// HA refuses it.
    Refused,
    /// Too many new tokens checked just now (try again in a second).
    Limited,
    /// HA could not be asked.
    Unreachable,
}

/// The answer to a read of one entity.
#[derive(Debug, Clone)]
pub enum Read {
    /// A current state; `cache` is `hit` (from the store) or `miss` (fetched now).
    Fresh {
        /// The state.
        state: Rc<EntityState>,
        /// Time since it was known current.
        age: Duration,
        /// `"hit"` or `"miss"`.
        cache: &'static str,
    },
    /// HA could not be reached; the last known state.
    Stale {
        /// The state.
        state: Rc<EntityState>,
        /// Time since it was known current.
        age: Duration,
    },
    /// HA says the entity does not exist (possibly cached).
    NotFound {
        /// `"hit"` or `"miss"`.
        cache: &'static str,
    },
    /// HA could not answer and nothing is known.
    Failed(RestError),
    /// Too many reads of entities the mirror does not hold (see `REST_READS_PER_SECOND`);
    /// HA was not asked.
    Limited,
}

type Fetch = Result<Option<EntityState>, RestError>;

/// Receives the changes each update made to tracked entities (D-Bus `EntityChanged`).
pub type ChangeHook = Rc<dyn Fn(&[Change])>;

/// See the module docs.
pub struct Hub {
    /// The config in force (replaced on reload).
    config: RefCell<Rc<Config>>,
    /// HA's state as mirrored here.
    mirror: RefCell<Mirror>,
    /// Entity ids tracked whatever `[filter]` says ([`Hub::track_also`]).
    also_tracked: RefCell<std::collections::BTreeSet<String>>,
    /// The link to HA.
    link: RefCell<Link>,
    /// The link's totals.
    link_counters: Cell<LinkCounters>,
    /// When HA last sent an entity update (wall clock).
    last_event: Cell<Option<SystemTime>>,
    /// Start time (monotonic).
    started: Instant,
    /// Start time (wall clock).
    started_wall: SystemTime,
    /// Fired whenever something reported in status outputs changes.
    changed: Event,
    /// Fired whenever tracked states change (the warm-start saver).
    states_changed: Event,
    /// Push clients (`/api/stream`).
    broadcast: Broadcast,
    /// Other watchers of changes (D-Bus signals).
    change_hooks: RefCell<Vec<ChangeHook>>,
    /// Warm start: how many states were loaded from disk and when they were saved.
    restored: Cell<Option<(usize, SystemTime)>>,
    /// The token local API clients must present (`http.api_token_file`).
    api_token: RefCell<Option<Secret>>,
    /// Commands to the link task.
    commands: (Sender<Command>, Receiver<Command>),
    /// HA's service list, fetched once and dropped on `service_registered`/`service_removed`.
    services: RefCell<Rc<OnceCell<Rc<str>>>>,
    /// REST client (replaced when a reload changes HA's URL, token or CA).
    rest: RefCell<RestClient>,
    /// Where forwarded requests go; `None` until the app sets it.
    upstream: RefCell<Option<Rc<Upstream>>>,
    /// HA's core config as HA last sent it (`GET /api/config`); `None` until then.
    ha_config: RefCell<Option<Rc<str>>>,
    /// HA's verdicts on tokens presented to the local routes.
    ha_tokens: RefCell<Verdicts>,
    /// Token checks under way, and the event each one's end notifies ([`Hub::ha_accepts`]).
    token_checks: (Cell<usize>, event_listener::Event),
    /// HA's other events, for stream clients that want them.
    events: Rc<Feed>,
    /// Reads the forwarder's gauges (see [`Hub::set_forward_probe`]).
    forward_probe: RefCell<Option<Box<dyn Fn() -> ForwardStatus>>>,
    /// In-flight REST reads by entity id: concurrent misses share one request.
    inflight: RefCell<HashMap<String, Rc<OnceCell<Fetch>>>>,
    /// Until when REST is considered down (see [`REST_BREAKER`]).
    rest_down_until: Cell<Option<Instant>>,
    /// Times of recent REST requests (bounded).
    rest_history: RefCell<VecDeque<Instant>>,
    /// Budget of REST reads.
    rest_reads: Cell<Bucket>,
    /// Reads refused by the budget (total), and when that was last logged.
    rest_reads_limited: Cell<(u64, Option<Instant>)>,
    /// HA REST requests by outcome.
    rest_requests: RefCell<BTreeMap<&'static str, u64>>,
    /// Local HTTP requests by (route, status).
    http_requests: RefCell<BTreeMap<(&'static str, u16), u64>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("link", &self.link)
            .field("mirror", &self.mirror)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub for `config`, with an empty mirror and the link `connecting`.
    pub fn new(config: Rc<Config>, rest: RestClient) -> Hub {
        let now = Instant::now();
        Hub {
            mirror: RefCell::new(Mirror::new(
                &config.cache,
                EntityFilter::new(&config.filter),
                now,
            )),
            also_tracked: RefCell::default(),
            config: RefCell::new(config),
            link: RefCell::new(Link::default()),
            link_counters: Cell::new(LinkCounters::default()),
            last_event: Cell::new(None),
            started: now,
            started_wall: SystemTime::now(),
            changed: Event::new(),
            states_changed: Event::new(),
            broadcast: Broadcast::default(),
            change_hooks: RefCell::new(Vec::new()),
            restored: Cell::new(None),
            api_token: RefCell::new(None),
            commands: smol::channel::bounded(COMMAND_QUEUE),
            services: RefCell::new(Rc::new(OnceCell::new())),
            rest: RefCell::new(rest),
            upstream: RefCell::new(None),
            ha_config: RefCell::new(None),
            ha_tokens: RefCell::new(Verdicts::new(now)),
            token_checks: (Cell::new(0), event_listener::Event::new()),
            events: Rc::new(Feed::default()),
            forward_probe: RefCell::new(None),
            inflight: RefCell::new(HashMap::new()),
            rest_down_until: Cell::new(None),
            rest_history: RefCell::new(VecDeque::new()),
            rest_reads: Cell::new(Bucket::full(REST_READS_PER_SECOND, REST_READ_BURST, now)),
            rest_reads_limited: Cell::new((0, None)),
            rest_requests: RefCell::new(BTreeMap::new()),
            http_requests: RefCell::new(BTreeMap::new()),
        }
    }

    // ------------------------------------------------------------------ config

    /// The config in force.
    pub fn config(&self) -> Rc<Config> {
        self.config.borrow().clone()
    }

    /// Puts `new` in force in place (reload): the filter (tracked entities it no longer
    /// covers are removed and announced) and the cache limits. Returns whether the filter
    /// changed (the link must then resubscribe). HA's URL, token and the listener are the
    /// caller's.
    pub fn reconfigure(&self, new: Config) -> bool {
        let removed = {
            let mut mirror = self.mirror.borrow_mut();
            let filter =
                EntityFilter::new(&new.filter).with_also(self.also_tracked.borrow().clone());
            let removed = mirror.set_filter(filter);
            mirror.reconfigure(&new.cache);
            removed
        };
        *self.config.borrow_mut() = Rc::new(new);
        let filter_changed = removed.is_some();
        if let Some(changes) = removed {
            self.announce(&changes);
        }
        self.warn_evictions();
        self.changed.notify(usize::MAX);
        filter_changed
    }

    /// Tracks the entity ids `also` whatever `[filter]` says (the dashboards' allowlist,
    /// issue 16). When that changes what is tracked, the link subscribes again for a fresh
    /// snapshot (entities newly tracked are only in a snapshot).
    pub async fn track_also(&self, also: std::collections::BTreeSet<String>) {
        if *self.also_tracked.borrow() == also {
            return;
        }
        *self.also_tracked.borrow_mut() = also.clone();
        let config = self.config();
        let filter = EntityFilter::new(&config.filter).with_also(also);
        let removed = self.mirror.borrow_mut().set_filter(filter);
        if let Some(changes) = removed {
            self.announce(&changes);
            self.changed.notify(usize::MAX);
            // Without `[filter]` everything is tracked already.
            if config.filter.enabled {
                self.command(Command::Resubscribe).await;
            }
        }
    }

    /// The server-side filter for `subscribe_entities` (see [`EntityFilter::ha_filter`]).
    pub fn ha_filter(&self) -> Option<serde_json::Value> {
        self.mirror.borrow().filter().ha_filter()
    }

    /// Sets the token local API clients must present (`None`: open).
    pub fn set_api_token(&self, token: Option<Secret>) {
        *self.api_token.borrow_mut() = token;
    }

    /// Whether `presented` opens the local API: always when no API token is configured,
    /// else when it equals the token (compared in time independent of where they differ).
    pub fn api_token_accepts(&self, presented: Option<&str>) -> bool {
        let token = self.api_token.borrow();
        let Some(token) = token.as_ref() else {
            return true;
        };
        presented.is_some_and(|p| same_secret(p.trim().as_bytes(), token.expose().as_bytes()))
    }

    // ------------------------------------------------------------------ link

    /// The link.
    pub fn link(&self) -> Link {
        self.link.borrow().clone()
    }

    /// The link state.
    pub fn link_state(&self) -> LinkState {
        self.link.borrow().state
    }

    /// Updates the link and wakes status reporters.
    pub fn update_link(&self, f: impl FnOnce(&mut Link)) {
        f(&mut self.link.borrow_mut());
        self.changed.notify(usize::MAX);
    }

    /// Updates the link's totals.
    pub fn count_link(&self, f: impl FnOnce(&mut LinkCounters)) {
        let mut c = self.link_counters.get();
        f(&mut c);
        self.link_counters.set(c);
        self.changed.notify(usize::MAX);
    }

    /// Marks the subscription down: pushed states start to age.
    pub fn link_lost(&self, reason: &str) {
        self.mirror.borrow_mut().link_down(Instant::now());
        self.update_link(|l| {
            l.last_disconnected = Some(SystemTime::now());
            l.last_error = Some(reason.to_owned());
            l.subscriptions = 0;
        });
    }

    /// Queues a command for the link (waits while `COMMAND_QUEUE` are pending).
    pub async fn command(&self, command: Command) {
        let _ = self.commands.0.send(command).await;
    }

    /// Resolves once the mirror holds everything HA sent on its link before this call: a
    /// `ping` on the link, whose `pong` HA queues after what it queued before (HA answers a
    /// connection's messages in order). A service call's state changes are sent to HA's
    /// subscribers while the call runs and its result after, so once a result has arrived
    /// (on another connection), this makes the mirror hold the call's effects — what the
    /// REST write path gets from HA's answer. At once when the link is not live or the
    /// command queue is full; at most [`CAUGHT_UP_TIMEOUT`]. [`Hub::caught_up`] asks now and
    /// waits later, so that the caller can go on with other work meanwhile.
    pub fn caught_up(&self) -> CaughtUp {
        let asked = (self.link.borrow().state == LinkState::Live)
            .then(|| {
                let (said, heard) = smol::channel::bounded(1);
                self.commands.0.try_send(Command::Barrier(said)).ok()?;
                Some((heard, Instant::now() + CAUGHT_UP_TIMEOUT))
            })
            .flatten();
        CaughtUp { asked }
    }

    /// Asks the link for a fresh snapshot (D-Bus `Resync()`); dropped when one is queued.
    pub fn request_resync(&self) {
        let _ = self.commands.0.try_send(Command::Resync);
    }

    /// The link's end of the command queue.
    pub fn commands(&self) -> Receiver<Command> {
        self.commands.1.clone()
    }

    // ------------------------------------------------------------------ mirror

    /// Applies what HA sent (see [`Mirror::apply`]) and hands the changes to push clients
    /// and change hooks; wakes the saver and the status reporters.
    pub fn apply(&self, update: Update) -> Applied {
        let applied = self.mirror.borrow_mut().apply(update, Instant::now());
        if applied.received > 0 {
            self.last_event.set(Some(SystemTime::now()));
        }
        if !applied.changes.is_empty() || applied.snapshot {
            self.warn_evictions();
            self.states_changed.notify(usize::MAX);
        }
        self.announce(&applied.changes);
        self.changed.notify(usize::MAX);
        applied
    }

    /// Counts a frame from HA that could not be decoded.
    pub fn count_decode_error(&self) {
        self.mirror.borrow_mut().count_decode_error();
        self.changed.notify(usize::MAX);
    }

    /// Warm start: puts states saved by an earlier run (at `saved_at`, wall clock) in the
    /// mirror, stale until HA's snapshot replaces them. Returns how many are tracked.
    pub fn restore(&self, states: Vec<EntityState>, saved_at: SystemTime) -> usize {
        let age = SystemTime::now()
            .duration_since(saved_at)
            .unwrap_or_default();
        let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let loaded = self.mirror.borrow_mut().restore(states, at);
        self.restored.set(Some((loaded, saved_at)));
        loaded
    }

    /// Whether the mirror follows `entity_id` (`filter`).
    pub fn follows(&self, entity_id: &str) -> bool {
        self.mirror.borrow().filter().tracks(entity_id)
    }

    /// The state of a followed entity ([`Hub::follows`]), if the subscription has delivered
    /// it (a REST copy does not count: the subscription's event for it may still come, and a
    /// WebSocket client would see the entity appear twice).
    pub fn followed_state(&self, entity_id: &str) -> Option<Rc<EntityState>> {
        let mirror = self.mirror.borrow();
        if mirror.filter().tracks(entity_id) {
            mirror.peek_tracked(entity_id)
        } else {
            None
        }
    }

    /// The tracked states, sorted by entity id, and whether they are live (else stale).
    pub fn tracked_states(&self) -> (Vec<Rc<EntityState>>, bool) {
        let mirror = self.mirror.borrow();
        (mirror.tracked_states(), mirror.is_live())
    }

    /// The tracked states to save (warm start) when they are current: `None` while the
    /// subscription is not live (the file's time would not be honest about their age).
    pub fn states_to_save(&self) -> Option<Vec<Rc<EntityState>>> {
        let mirror = self.mirror.borrow();
        mirror.is_live().then(|| mirror.tracked_states())
    }

    /// Bumped whenever tracked states change; see [`Hub::listen_states`].
    pub fn generation(&self) -> u64 {
        self.mirror.borrow().counters().generation
    }

    /// Resolves at the next change of tracked states.
    pub fn listen_states(&self) -> EventListener {
        self.states_changed.listen()
    }

    /// Resolves at the next change of anything the status shows.
    pub fn listen_changed(&self) -> EventListener {
        self.changed.listen()
    }

    /// Logs a warning when `max_entities` has evicted tracked states (at most once an hour).
    fn warn_evictions(&self) {
        let warning = self.mirror.borrow_mut().eviction_warning(Instant::now());
        if let Some(evicted) = warning {
            let max = self.config.borrow().cache.max_entities;
            log::warn!(
                "{evicted} tracked entities evicted by [cache] max_entities = {max}: the tracked set does not fit, so lists are incomplete \
                 and reads of evicted entities go to Home Assistant; raise max_entities or narrow [filter]"
            );
        }
    }

    /// Hands `changes` to push clients and change hooks.
    fn announce(&self, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        self.broadcast.publish(changes, Instant::now());
        let hooks = self.change_hooks.borrow().clone();
        for hook in hooks {
            hook(changes);
        }
    }

    /// Registers a push client for `selection`, or `None` at the client cap.
    pub fn subscribe(&self, selection: Selection) -> Option<Subscription> {
        self.broadcast.subscribe(selection)
    }

    /// A WebSocket API session's queue of the mirror's changes (at most
    /// [`crate::broadcast::MAX_SESSIONS`] at once; counted apart from the streams).
    pub fn subscribe_session(&self) -> Option<Subscription> {
        self.broadcast.subscribe_session(Selection::default())
    }

    /// A stream client's queue of HA's other events of `types` (see [`crate::events`]);
    /// `None` at the client cap.
    pub fn subscribe_events(&self, types: Types) -> Option<EventReceiver> {
        self.events.subscribe(types)
    }

    /// The event types stream clients want now (`"*"`: all).
    pub fn wanted_event_types(&self) -> std::collections::BTreeSet<String> {
        self.events.wanted()
    }

    /// Resolves when [`Hub::wanted_event_types`] may have changed.
    pub fn listen_event_types(&self) -> EventListener {
        self.events.listen()
    }

    /// Goes up whenever [`Hub::wanted_event_types`] may have changed.
    pub fn event_types_generation(&self) -> u64 {
        self.events.generation()
    }

    /// Passes one of HA's events (from the link) to the stream clients that want it.
    pub fn publish_event(&self, event_type: &str, json: &str) {
        self.events.publish(event_type, json);
    }

    /// Adds a watcher of every change (D-Bus `EntityChanged`).
    pub fn add_change_hook(&self, hook: ChangeHook) {
        self.change_hooks.borrow_mut().push(hook);
    }

    // ------------------------------------------------------------------ read-through

    /// Reads one entity: from the store when fresh, else from HA's REST API (concurrent
    /// misses for one entity share one request), else the stale copy when HA cannot be
    /// reached. `refresh` bypasses the store. `entity_id` must be valid (it goes in a URL).
    pub async fn read_state(&self, entity_id: &str, refresh: bool) -> Read {
        let stale = if refresh {
            None
        } else {
            match self.mirror.borrow_mut().lookup(entity_id, Instant::now()) {
                Lookup::Hit { state, age } => {
                    // Wakes the D-Bus counter announcer (coalesced to once a second there).
                    self.changed.notify(usize::MAX);
                    return Read::Fresh {
                        state,
                        age,
                        cache: "hit",
                    };
                }
                Lookup::NotFound { .. } => return Read::NotFound { cache: "hit" },
                Lookup::Miss { stale } => stale,
            }
        };
        if let (Some((state, age)), Some(until)) = (&stale, self.rest_down_until.get())
            && Instant::now() < until
        {
            self.mirror.borrow_mut().note_stale_serve();
            return Read::Stale {
                state: state.clone(),
                age: *age,
            };
        }
        // A read that joins one in flight costs HA nothing; a new one takes from the budget.
        if !self.inflight.borrow().contains_key(entity_id) && !self.take_read(entity_id) {
            return match stale {
                Some((state, age)) => {
                    self.mirror.borrow_mut().note_stale_serve();
                    Read::Stale { state, age }
                }
                None => Read::Limited,
            };
        }
        match self.fetch(entity_id).await {
            Ok(Some(state)) => Read::Fresh {
                state: Rc::new(state),
                age: Duration::ZERO,
                cache: "miss",
            },
            Ok(None) => Read::NotFound { cache: "miss" },
            Err(e) => match stale {
                Some((state, age)) => {
                    log::debug!("serving {entity_id} stale: {e}");
                    self.mirror.borrow_mut().note_stale_serve();
                    Read::Stale { state, age }
                }
                None => Read::Failed(e),
            },
        }
    }

    /// Takes one REST read from the budget; counts and (at most once a minute) logs a refusal.
    fn take_read(&self, entity_id: &str) -> bool {
        let now = Instant::now();
        let mut bucket = self.rest_reads.get();
        let ok = bucket.take(now);
        self.rest_reads.set(bucket);
        if !ok {
            let (n, logged) = self.rest_reads_limited.get();
            let log_now = logged.is_none_or(|t| now.duration_since(t) >= LIMITED_WARNING_PERIOD);
            if log_now {
                log::warn!(
                    "reads of entities Home Assistant does not push are limited to {REST_READS_PER_SECOND}/s \
                     (burst {REST_READ_BURST}); refusing {entity_id} and others ({} refused so far)",
                    n + 1
                );
            }
            self.rest_reads_limited
                .set((n + 1, if log_now { Some(now) } else { logged }));
            self.changed.notify(usize::MAX);
        }
        ok
    }

    /// HA rejected our token: every REST call would be another 401 toward HA's IP ban.
    fn auth_failed(&self) -> Option<RestError> {
        (self.link_state() == LinkState::AuthFailed).then(|| RestError::Status {
            status: 401,
            message: "Home Assistant rejected the access token (see /status)".into(),
        })
    }

    async fn fetch(&self, entity_id: &str) -> Fetch {
        if let Some(e) = self.auth_failed() {
            return Err(e);
        }
        let cell = self
            .inflight
            .borrow_mut()
            .entry(entity_id.to_owned())
            .or_default()
            .clone();
        let result = cell
            .get_or_init(|| async {
                let rest = self.rest();
                let id = entity_id.to_owned();
                let result = smol::unblock(move || rest.get_state(&id)).await;
                self.record_rest(&result);
                match &result {
                    Ok(state) => self.mirror.borrow_mut().insert_fetched(
                        entity_id,
                        state.clone(),
                        Instant::now(),
                    ),
                    Err(e) => log::warn!("REST read of {entity_id} failed: {e}"),
                }
                result
            })
            .await
            .clone();
        let mut inflight = self.inflight.borrow_mut();
        if inflight
            .get(entity_id)
            .is_some_and(|c| Rc::ptr_eq(c, &cell))
        {
            inflight.remove(entity_id);
        }
        result
    }

    /// Counts a REST request by outcome and remembers when it happened.
    fn record_rest<T>(&self, result: &Result<Option<T>, RestError>) {
        let outcome = match result {
            Ok(Some(_)) => "ok",
            Ok(None) => "not_found",
            Err(e) => e.outcome(),
        };
        let now = Instant::now();
        if matches!(result, Err(RestError::Unreachable(_))) {
            self.rest_down_until.set(Some(now + REST_BREAKER));
        } else {
            self.rest_down_until.set(None);
        }
        *self.rest_requests.borrow_mut().entry(outcome).or_default() += 1;
        let mut history = self.rest_history.borrow_mut();
        if history.len() == REST_HISTORY {
            history.pop_front();
        }
        history.push_back(now);
        drop(history);
        self.changed.notify(usize::MAX);
    }

    /// HA REST requests made in the last hour (capped at the remembered history).
    fn rest_calls_last_hour(&self) -> usize {
        let now = Instant::now();
        self.rest_history
            .borrow()
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < Duration::from_secs(3600))
            .count()
    }

    /// Forgets the cached service list (HA registered or removed a service).
    pub fn invalidate_services(&self) {
        *self.services.borrow_mut() = Rc::new(OnceCell::new());
    }

    /// HA's service list (`GET /api/services` JSON), from the cache or fetched once.
    ///
    /// Errors: the REST failure; nothing is cached then.
    pub async fn services(&self) -> Result<Rc<str>, RestError> {
        if let Some(e) = self.auth_failed() {
            return Err(e);
        }
        let cell = self.services.borrow().clone();
        cell.get_or_try_init(|| async {
            let rest = self.rest();
            let result = smol::unblock(move || rest.get_services()).await;
            self.record_rest(&result.as_ref().map(|_| Some(())).map_err(Clone::clone));
            result.map(Rc::from)
        })
        .await
        .cloned()
    }

    /// The REST client.
    fn rest(&self) -> RestClient {
        self.rest.borrow().clone()
    }

    /// Uses a new token for REST and forwarding (the link found a changed token file).
    pub fn replace_rest_token(&self, token: Secret) {
        let rest = self.rest.borrow().with_token(token.clone());
        *self.rest.borrow_mut() = rest;
        let upstream = self.upstream.borrow().as_deref().cloned();
        if let Some(mut upstream) = upstream {
            upstream.token = token;
            self.set_upstream(upstream);
        }
    }

    /// Sets where forwarded requests go (start, and reload with new HA settings).
    pub fn set_upstream(&self, upstream: Upstream) {
        *self.upstream.borrow_mut() = Some(Rc::new(upstream));
    }

    /// Where forwarded requests go.
    pub fn upstream(&self) -> Option<Rc<Upstream>> {
        self.upstream.borrow().clone()
    }

    /// Keeps HA's core config (the link's `get_config` answer, a JSON object).
    pub fn set_ha_config(&self, config: String) {
        *self.ha_config.borrow_mut() = Some(Rc::from(config));
    }

    /// HA's core config as last received (kept while HA is away: it rarely changes).
    pub fn ha_config(&self) -> Option<Rc<str>> {
        self.ha_config.borrow().clone()
    }

    /// Whether `presented` is hass-edge's own API token (`false` when none is configured).
    pub fn is_api_token(&self, presented: &str) -> bool {
        self.api_token
            .borrow()
            .as_ref()
            .is_some_and(|t| same_secret(presented.trim().as_bytes(), t.expose().as_bytes()))
    }

    /// Whether HA accepts `token` (an HA user's or a long-lived token presented to a local
    /// route): from the kept verdicts, else by asking HA once ([`crate::ha_tokens`]).
    ///
    /// While a check is under way, a token not yet known waits for it once before asking HA
    /// itself: a fleet of panels that reconnect at once with one token costs one check, not
    /// as many as the rate limit lets through.
    pub async fn ha_accepts(&self, token: &str) -> TokenCheck {
        let mut waited = false;
        loop {
            match self.ha_tokens.borrow_mut().lookup(token, Instant::now()) {
                Known::Accepted => return TokenCheck::Accepted,
                Known::Refused => return TokenCheck::Refused,
                Known::Unknown => {}
            }
            if waited || self.token_checks.0.get() == 0 {
                break;
            }
            let ended = self.token_checks.1.listen();
            if self.token_checks.0.get() > 0 {
                ended.await;
            }
            waited = true;
        }
        if !self.ha_tokens.borrow_mut().may_check(Instant::now()) {
            return TokenCheck::Limited;
        }
        /// Counts a check under way; its end (or cancellation) wakes the tokens waiting.
        struct Checking<'a>(&'a (Cell<usize>, event_listener::Event));
        impl Drop for Checking<'_> {
            fn drop(&mut self) {
                self.0.0.set(self.0.0.get() - 1);
                self.0.1.notify(usize::MAX);
            }
        }
        self.token_checks.0.set(self.token_checks.0.get() + 1);
        let _checking = Checking(&self.token_checks);
        let rest = self.rest().with_token(Secret::new(token));
        match smol::unblock(move || rest.token_accepted()).await {
            Ok(accepted) => {
                self.ha_tokens
                    .borrow_mut()
                    .record(token, accepted, Instant::now());
                if accepted {
                    TokenCheck::Accepted
                } else {
                    TokenCheck::Refused
                }
            }
            Err(e) => {
                log::debug!("could not check a token with Home Assistant: {e}");
                TokenCheck::Unreachable
            }
        }
    }

    /// Whether an API token is configured (`false`: the loopback-open mode).
    pub fn has_api_token(&self) -> bool {
        self.api_token.borrow().is_some()
    }

    /// hass-edge's API token, for the forwarder to recognise it inside a WebSocket tunnel's
    /// `auth` message ([`crate::proxy::WsAuth`]); never sent anywhere.
    pub fn api_token(&self) -> Option<Secret> {
        self.api_token.borrow().clone()
    }

    /// Replaces the REST client (reload with new HA settings).
    pub fn set_rest(&self, rest: RestClient) {
        *self.rest.borrow_mut() = rest;
    }

    // ------------------------------------------------------------------ status

    /// Counts a local HTTP request by route label and status.
    pub fn count_http(&self, route: &'static str, status: u16) {
        *self
            .http_requests
            .borrow_mut()
            .entry((route, status))
            .or_default() += 1;
    }

    /// Wakes the status reporters (something they show changed).
    pub fn notify_changed(&self) {
        self.changed.notify(usize::MAX);
    }

    /// Everything the status renderers show, now.
    pub fn status(&self) -> Status {
        let mirror = self.mirror.borrow();
        Status {
            config: self.config(),
            started: self.started_wall,
            uptime: self.started.elapsed(),
            link: self.link(),
            link_counters: self.link_counters.get(),
            mirror: mirror.counters(),
            store: mirror.stats(),
            entries: mirror.len(),
            tracked: mirror.tracked_len(),
            store_live: mirror.is_live(),
            last_event: self.last_event.get(),
            rest_requests: self.rest_requests.borrow().clone(),
            rest_last_hour: self.rest_calls_last_hour(),
            rest_reads_limited: self.rest_reads_limited.get().0,
            http_requests: self.http_requests.borrow().clone(),
            stream: StreamCounters {
                clients: self.broadcast.clients(),
                dropped_slow: self.broadcast.dropped_slow(),
                sent: self.broadcast.sent(),
            },
            warm_start: self.restored.get(),
            forwarding: {
                let mut f = self
                    .forward_probe
                    .borrow()
                    .as_ref()
                    .map(|probe| probe())
                    .unwrap_or_default();
                f.event_clients = self.events.clients();
                f.event_clients_dropped = self.events.dropped_slow();
                f
            },
        }
    }

    /// Registers what reads the forwarder's gauges for [`Hub::status`] (the forwarder
    /// lives above the hub).
    pub fn set_forward_probe(&self, probe: Box<dyn Fn() -> ForwardStatus>) {
        *self.forward_probe.borrow_mut() = Some(probe);
    }
}

/// A [`Hub::caught_up`] asked of the link: [`CaughtUp::wait`] resolves once the mirror holds
/// everything HA sent before it was asked, at the latest [`CAUGHT_UP_TIMEOUT`] after.
#[derive(Debug)]
pub struct CaughtUp {
    /// The link's answer and the deadline; `None` when there is nothing to wait for (the
    /// link was not live or its command queue was full).
    asked: Option<(Receiver<()>, Instant)>,
}

impl CaughtUp {
    /// Resolves as [`Hub::caught_up`] says; at once when nothing was asked. Cancel-safe: a
    /// wait dropped before it resolved can be started again.
    pub async fn wait(&self) {
        if let Some((heard, until)) = &self.asked {
            async {
                let _ = heard.recv().await;
            }
            .or(async {
                Timer::at(*until).await;
            })
            .await;
        }
    }
}
