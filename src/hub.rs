//! The state the I/O parts share on the executor thread: the store, the filter, the link to
//! HA, counters, and the REST read-through. Single-threaded (`Rc`/`RefCell`, never held
//! across an `.await`), owned by the app and handed to the subscriber, the HTTP API and the
//! status reporters.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use event_listener::Event;
use smol::lock::OnceCell;

use crate::config::{Config, Secret};
use crate::entity::EntityState;
use crate::filter::EntityFilter;
use crate::rest::{RestClient, RestError};
use crate::session::EntitiesEvent;
use crate::sse::Broadcast;
use crate::store::{Change, Lookup, Store};

/// After HA's REST API was unreachable, expired states are served stale without asking HA
/// again for this long, so readers do not each wait out a connect timeout.
const REST_BREAKER: Duration = Duration::from_secs(5);

/// Bound on remembered REST call times (for "calls in the last hour" in the status line).
const REST_HISTORY: usize = 4096;

/// The state of the link to HA, as `/status`, `/health`, D-Bus and sd_notify report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Opening TCP/TLS/WebSocket.
    Connecting,
    /// Auth handshake under way.
    Authenticating,
    /// Authenticated; waiting for HA to run or for the snapshot.
    Syncing,
    /// Snapshot loaded, events flowing.
    Live,
    /// Waiting before the next attempt.
    Backoff,
    /// HA refused the token; retrying only every `max_delay_seconds`.
    AuthFailed,
    /// Shutting down.
    Stopping,
}

impl LinkState {
    /// The lower-case name used in every interface.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Authenticating => "authenticating",
            LinkState::Syncing => "syncing",
            LinkState::Live => "live",
            LinkState::Backoff => "backoff",
            LinkState::AuthFailed => "auth_failed",
            LinkState::Stopping => "stopping",
        }
    }
}

/// What is known about the link to HA.
#[derive(Debug, Clone)]
pub struct Link {
    /// Current state.
    pub state: LinkState,
    /// From `auth_required`, once seen.
    pub ha_version: Option<String>,
    /// Failed attempts since the last successful sync.
    pub reconnect_attempts: u32,
    /// When the last connection was made.
    pub last_connected: Option<SystemTime>,
    /// When the last connection ended.
    pub last_disconnected: Option<SystemTime>,
    /// Why the last connection ended or failed.
    pub last_error: Option<String>,
    /// Active subscriptions on the current connection.
    pub subscriptions: u32,
    /// Whether the HA-side filter is in use on the current subscription.
    pub ha_filter_active: bool,
}

/// Monotonic counters (totals since start).
#[derive(Debug, Default)]
pub struct Counters {
    /// Entity updates received from HA (each `a`, `c`, `r` entry, snapshots included).
    pub events_received: Cell<u64>,
    /// Updates applied to the store.
    pub events_applied: Cell<u64>,
    /// Updates ignored because the filter does not track the entity.
    pub events_filtered_out: Cell<u64>,
    /// Frames or entity entries from HA that could not be decoded.
    pub decode_errors: Cell<u64>,
    /// `service_registered` / `service_removed` events.
    pub service_events: Cell<u64>,
    /// Connections lost or failed (each leads to a reconnect attempt).
    pub reconnects: Cell<u64>,
    /// `auth_invalid` answers.
    pub auth_failures: Cell<u64>,
    /// HA commands that failed.
    pub command_errors: Cell<u64>,
    /// HA REST requests by outcome (`ok`, `not_found`, `unreachable`, …).
    pub rest_requests: RefCell<BTreeMap<&'static str, u64>>,
    /// Local HTTP requests by (route, status).
    pub http_requests: RefCell<BTreeMap<(&'static str, u16), u64>>,
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(cell: &Cell<u64>, n: u64) {
        cell.set(cell.get().saturating_add(n));
    }

    /// Total HA REST requests.
    pub fn rest_total(&self) -> u64 {
        self.rest_requests.borrow().values().sum()
    }
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
}

type Fetch = Result<Option<EntityState>, RestError>;

/// The shared state. See the module docs.
#[derive(Debug)]
pub struct Hub {
    /// The config in force (replaced on reload).
    pub config: RefCell<Rc<Config>>,
    /// The filter in force.
    pub filter: RefCell<EntityFilter>,
    /// The store.
    pub store: RefCell<Store>,
    /// The link to HA.
    pub link: RefCell<Link>,
    /// Counters.
    pub counters: Counters,
    /// Entities in HA's last snapshot that the filter left out.
    pub snapshot_filtered_out: Cell<u64>,
    /// `tracked_evictions` when last warned about, and when (see [`Hub::warn_tracked_evictions`]).
    tracked_evictions_warned: Cell<(u64, Option<Instant>)>,
    /// When HA last sent an entity update (wall clock).
    pub last_event: Cell<Option<SystemTime>>,
    /// Start time (monotonic).
    pub started: Instant,
    /// Start time (wall clock).
    pub started_wall: SystemTime,
    /// Fired whenever something reported in status outputs changes.
    pub changed: Event,
    /// `/api/stream` clients.
    pub stream: Broadcast,
    /// Bumped whenever tracked states change (for the warm-start saver).
    pub generation: Cell<u64>,
    /// Fired with [`Hub::generation`].
    pub states_changed: Event,
    /// Warm start: how many states were loaded from disk and when they were saved.
    pub restored: Cell<Option<(usize, SystemTime)>>,
    /// The token local API clients must present (`http.api_token_file`).
    pub api_token: RefCell<Option<Secret>>,
    /// HA's service list, fetched once and dropped on `service_registered`/`service_removed`.
    services: RefCell<Rc<OnceCell<Rc<str>>>>,
    /// REST client (replaced when a reload changes HA's URL, token or CA).
    rest: RefCell<RestClient>,
    /// In-flight REST reads by entity id: concurrent misses share one request.
    inflight: RefCell<HashMap<String, Rc<OnceCell<Fetch>>>>,
    /// Until when REST is considered down (see [`REST_BREAKER`]).
    rest_down_until: Cell<Option<Instant>>,
    /// Times of recent REST requests (bounded).
    rest_history: RefCell<VecDeque<Instant>>,
}

impl Hub {
    /// A hub for `config`, with an empty store and the link `connecting`.
    pub fn new(config: Rc<Config>, rest: RestClient) -> Hub {
        let now = Instant::now();
        let c = &config.cache;
        Hub {
            filter: RefCell::new(EntityFilter::new(&config.filter)),
            store: RefCell::new(Store::new(
                c.mode,
                c.max_entities,
                c.ttl,
                c.negative_ttl,
                now,
            )),
            config: RefCell::new(config),
            link: RefCell::new(Link {
                state: LinkState::Connecting,
                ha_version: None,
                reconnect_attempts: 0,
                last_connected: None,
                last_disconnected: None,
                last_error: None,
                subscriptions: 0,
                ha_filter_active: false,
            }),
            counters: Counters::default(),
            snapshot_filtered_out: Cell::new(0),
            tracked_evictions_warned: Cell::new((0, None)),
            last_event: Cell::new(None),
            started: now,
            started_wall: SystemTime::now(),
            changed: Event::new(),
            stream: Broadcast::default(),
            generation: Cell::new(0),
            states_changed: Event::new(),
            restored: Cell::new(None),
            api_token: RefCell::new(None),
            services: RefCell::new(Rc::new(OnceCell::new())),
            rest: RefCell::new(rest),
            inflight: RefCell::new(HashMap::new()),
            rest_down_until: Cell::new(None),
            rest_history: RefCell::new(VecDeque::new()),
        }
    }

    /// Updates the link and wakes status reporters.
    pub fn update_link(&self, f: impl FnOnce(&mut Link)) {
        f(&mut self.link.borrow_mut());
        self.changed.notify(usize::MAX);
    }

    /// The link state.
    pub fn link_state(&self) -> LinkState {
        self.link.borrow().state
    }

    /// Applies the first event of a subscription: it replaces the tracked set.
    pub fn apply_snapshot(&self, event: EntitiesEvent) -> Vec<Change> {
        let now = Instant::now();
        let filter = self.filter.borrow();
        let c = &self.counters;
        Counters::add(&c.events_received, event.len() as u64);
        let mut states = Vec::with_capacity(event.added.len());
        let mut filtered_out = 0u64;
        for (entity_id, state) in event.added {
            if !filter.tracks(&entity_id) {
                filtered_out += 1;
                continue;
            }
            match state {
                Ok(s) => states.push(s),
                Err(e) => {
                    Counters::add(&c.decode_errors, 1);
                    log::warn!("dropping {entity_id} from the snapshot: {e}");
                }
            }
        }
        Counters::add(&c.events_filtered_out, filtered_out);
        Counters::add(&c.events_applied, states.len() as u64);
        self.snapshot_filtered_out.set(filtered_out);
        let mut store = self.store.borrow_mut();
        let changes = store.replace_tracked(states, now);
        store.set_live();
        drop(store);
        self.last_event.set(Some(SystemTime::now()));
        self.bump_generation();
        changes
    }

    /// Logs a warning when the LRU bound has evicted tracked states since the last warning,
    /// at most once an hour: the tracked set does not fit `max_entities`, so `/api/states`
    /// and `ListEntities` miss entities and their reads go to HA's REST API.
    pub fn warn_tracked_evictions(&self) {
        let evicted = self.store.borrow().stats().tracked_evictions;
        let (warned, at) = self.tracked_evictions_warned.get();
        if evicted == warned {
            // The common case, on every applied event: no clock read.
            return;
        }
        let now = Instant::now();
        if at.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(3600)) {
            let max = self.config.borrow().cache.max_entities;
            log::warn!(
                "{} tracked entities evicted by [cache] max_entities = {max}: the tracked set does not fit, so lists are incomplete \
                 and reads of evicted entities go to Home Assistant; raise max_entities or narrow [filter]",
                evicted - warned
            );
            self.tracked_evictions_warned.set((evicted, Some(now)));
        }
    }

    /// Records that tracked states changed: wakes status reporters and the saver.
    pub fn bump_generation(&self) {
        self.warn_tracked_evictions();
        self.generation.set(self.generation.get() + 1);
        self.states_changed.notify(usize::MAX);
        self.changed.notify(usize::MAX);
    }

    /// Applies a later `subscribe_entities` event.
    pub fn apply_entities(&self, event: EntitiesEvent) -> Vec<Change> {
        let now = Instant::now();
        let filter = self.filter.borrow();
        let c = &self.counters;
        Counters::add(&c.events_received, event.len() as u64);
        let mut store = self.store.borrow_mut();
        let mut changes = Vec::new();
        let (mut applied, mut filtered_out) = (0u64, 0u64);
        for (entity_id, state) in event.added {
            if !filter.tracks(&entity_id) {
                filtered_out += 1;
                continue;
            }
            let change = match state {
                Ok(s) => {
                    applied += 1;
                    store.upsert_pushed(s, now)
                }
                Err(e) => {
                    Counters::add(&c.decode_errors, 1);
                    log::warn!("dropping {entity_id}: {e}");
                    store.drop_undecodable(&entity_id)
                }
            };
            changes.extend(change);
        }
        for (entity_id, diff) in event.changed {
            if !filter.tracks(&entity_id) {
                filtered_out += 1;
                continue;
            }
            let change = match diff.map(|d| store.apply_diff(&entity_id, d, now)) {
                Ok(Ok(change)) => {
                    applied += 1;
                    change
                }
                Ok(Err(e)) => {
                    Counters::add(&c.decode_errors, 1);
                    log::warn!("dropping {entity_id}: cannot apply the change: {e}");
                    store.remove(&entity_id)
                }
                Err(e) => {
                    Counters::add(&c.decode_errors, 1);
                    log::warn!("dropping {entity_id}: {e}");
                    store.drop_undecodable(&entity_id)
                }
            };
            changes.extend(change);
        }
        for entity_id in event.removed {
            if !filter.tracks(&entity_id) {
                filtered_out += 1;
                continue;
            }
            applied += 1;
            changes.extend(store.remove(&entity_id));
        }
        drop(store);
        Counters::add(&c.events_applied, applied);
        Counters::add(&c.events_filtered_out, filtered_out);
        self.last_event.set(Some(SystemTime::now()));
        if changes.is_empty() {
            self.changed.notify(usize::MAX);
        } else {
            self.bump_generation();
        }
        changes
    }

    /// Marks the subscription down: pushed states start to age.
    pub fn link_lost(&self, reason: &str) {
        self.store.borrow_mut().set_down(Instant::now());
        self.update_link(|l| {
            l.last_disconnected = Some(SystemTime::now());
            l.last_error = Some(reason.to_owned());
            l.subscriptions = 0;
        });
    }

    /// Reads one entity: from the store when fresh, else from HA's REST API (concurrent
    /// misses for one entity share one request), else the stale copy when HA cannot be
    /// reached. `refresh` bypasses the store. `entity_id` must be valid (it goes in a URL).
    pub async fn read_state(&self, entity_id: &str, refresh: bool) -> Read {
        let stale = if refresh {
            None
        } else {
            match self.store.borrow_mut().lookup(entity_id, Instant::now()) {
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
            self.store.borrow_mut().note_stale_serve();
            return Read::Stale {
                state: state.clone(),
                age: *age,
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
                    self.store.borrow_mut().note_stale_serve();
                    Read::Stale { state, age }
                }
                None => Read::Failed(e),
            },
        }
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
                    Ok(state) => self.store.borrow_mut().insert_fetched(
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
    pub fn record_rest<T>(&self, result: &Result<Option<T>, RestError>) {
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
        *self
            .counters
            .rest_requests
            .borrow_mut()
            .entry(outcome)
            .or_default() += 1;
        let mut history = self.rest_history.borrow_mut();
        if history.len() == REST_HISTORY {
            history.pop_front();
        }
        history.push_back(now);
        drop(history);
        self.changed.notify(usize::MAX);
    }

    /// HA REST requests made in the last hour (capped at the remembered history).
    pub fn rest_calls_last_hour(&self) -> usize {
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

    /// Forwards a service call to HA. On success (200, a list of changed states) the states
    /// are written into the store at once and published to watchers. Returns HA's status and
    /// body unchanged.
    ///
    /// Errors: HA unreachable.
    pub async fn call_service(
        &self,
        domain: &str,
        service: &str,
        body: Vec<u8>,
    ) -> Result<(u16, String), RestError> {
        if let Some(e) = self.auth_failed() {
            return Err(e);
        }
        let rest = self.rest();
        let (d, s) = (domain.to_owned(), service.to_owned());
        let result = smol::unblock(move || rest.call_service(&d, &s, &body)).await;
        match &result {
            Ok((200, _)) => self.record_rest::<()>(&Ok(Some(()))),
            Ok((status, body)) => {
                self.record_rest::<()>(&Err(crate::rest::status_error(*status, body)))
            }
            Err(e) => self.record_rest::<()>(&Err(e.clone())),
        }
        if let Ok((200, text)) = &result {
            match serde_json::from_str::<Vec<EntityState>>(text) {
                Ok(states) => {
                    let filter = self.filter.borrow().clone();
                    let changes =
                        self.store
                            .borrow_mut()
                            .apply_call_result(states, &filter, Instant::now());
                    if !changes.is_empty() {
                        self.bump_generation();
                    }
                    self.stream.publish(&changes);
                }
                Err(e) => {
                    log::warn!("could not read the states returned by {domain}.{service}: {e}")
                }
            }
        }
        result
    }

    /// Counts a local HTTP request by route label and status.
    pub fn count_http(&self, route: &'static str, status: u16) {
        *self
            .counters
            .http_requests
            .borrow_mut()
            .entry((route, status))
            .or_default() += 1;
    }

    /// The REST client (for service calls and other pass-through requests).
    pub fn rest(&self) -> RestClient {
        self.rest.borrow().clone()
    }

    /// Uses a new token for REST (the link found a changed token file).
    pub fn replace_rest_token(&self, token: Secret) {
        let rest = self.rest.borrow().with_token(token);
        *self.rest.borrow_mut() = rest;
    }

    /// Replaces the REST client (reload with new HA settings).
    pub fn set_rest(&self, rest: RestClient) {
        *self.rest.borrow_mut() = rest;
    }
}

/// Whether `entity_id` has HA's shape `<domain>.<object_id>` (lower-case letters, digits,
/// `_`; see HA `core.py` `valid_entity_id`). Checked before an id goes into a URL.
pub fn valid_entity_id(entity_id: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    entity_id.len() <= 255
        && entity_id
            .split_once('.')
            .is_some_and(|(d, o)| ok(d) && ok(o))
}

#[cfg(test)]
mod tests {
    use super::valid_entity_id;

    #[test]
    fn entity_id_shape() {
        assert!(valid_entity_id("light.kitchen_2"));
        for bad in [
            "light",
            "light.",
            ".x",
            "Light.x",
            "light.x/../y",
            "light.x.y",
            "light.x%2F",
            "light.ä",
        ] {
            assert!(!valid_entity_id(bad), "{bad}");
        }
    }
}
