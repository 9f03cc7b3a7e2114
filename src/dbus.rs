//! Status over D-Bus for control panels: name and interface `io.hassedge.HassEdge1` at
//! `/io/hassedge/HassEdge1` (zbus, on our smol executor: zbus' own executor is ticked by a
//! task of ours, `internal_executor(false)`).
//!
//! Read-only properties, each announced with `org.freedesktop.DBus.Properties.PropertiesChanged`:
//! link properties (`Connection`, `Connected`, `HaVersion`, `ReconnectAttempts`,
//! `Subscriptions`) at once, counters at most once per second. Methods `GetState(s) -> s`
//! (HA's state JSON, as `GET /api/states/<id>`; error `io.hassedge.HassEdge1.Error.NotFound`),
//! `ListEntities() -> as`, `Resync()`. Signal `EntityChanged(s entity_id, s state)` when
//! `[dbus] entity_signals = true`. The HA token is never exposed.
//!
//! zbus interface objects must be `Send + Sync`, so the object holds a copy of the
//! properties and forwards method calls over a channel to the executor thread, where the
//! hub lives.
//!
//! One long-lived task owns the bus connection ([`start`]). A bus that is not there at start,
//! or one that drops us later (a restarted `dbus-daemon`, or a bus daemon that disconnects a
//! client for a message it refuses), is retried in the background with back-off — 1 s
//! doubling to 30 s, plus 0–10 % jitter — and on each new connection the object is served
//! again, the name claimed again and every property announced again. The method-call
//! channel, the signal queue and the hub's change hook are made once and outlive
//! connections; HTTP never waits for any of this.
//!
//! A D-Bus string may not contain a NUL byte (D-Bus specification, "Basic types": a STRING
//! "must not contain the nul byte"), and `dbus-daemon` disconnects a client that sends one.
//! Entity ids, states and HA's version come from the network, so every such string is
//! checked before it goes out; the ones with a NUL are left out, counted and logged.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smol::channel::{Receiver, Sender, bounded};
use smol::future::FutureExt;
use smol::{LocalExecutor, Timer};
use zbus::object_server::SignalEmitter;

use crate::config::{DBUS_NAME as NAME, DBUS_PATH as PATH, DbusBus};
use crate::entity::valid_entity_id;
use crate::hub::{Hub, Read};
use crate::shutdown::Shutdown;
use crate::status::{LinkState, Status, epoch_micros};
use crate::store::Change;

/// Counters are announced at most this often.
const COUNTER_PERIOD: Duration = Duration::from_secs(1);
/// `EntityChanged` signals queued before new ones are dropped (and counted).
const SIGNAL_QUEUE: usize = 1024;
/// Method calls waiting for the executor thread (zbus' side waits while it is full).
const CALL_QUEUE: usize = 64;
/// One connection attempt (connect, authenticate, `Hello`, `RequestName`) may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The wait before the first retry after a failed attempt or a lost connection; it doubles
/// with every further failure, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Distinct strings with a NUL that are each warned about once; past this, at debug level.
const NUL_WARNED_MAX: usize = 256;

/// D-Bus errors of this interface (`io.hassedge.HassEdge1.Error.*`).
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "io.hassedge.HassEdge1.Error")]
pub enum Error {
    /// A zbus failure.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The entity is unknown to HA (or not a valid entity id).
    NotFound(String),
    /// HA could not be asked and nothing is known.
    Unavailable(String),
}

/// The property values, as last announced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Props {
    /// `connecting|authenticating|syncing|live|backoff|auth_failed|stopping`.
    pub connection: String,
    /// Live and synced.
    pub connected: bool,
    /// HA's version, empty until known (or when it holds a NUL byte, which D-Bus cannot carry).
    pub ha_version: String,
    /// Failed attempts since the last sync.
    pub reconnect_attempts: u32,
    /// Active subscriptions.
    pub subscriptions: u32,
    /// Entities kept fresh by the subscription.
    pub tracked_entities: u32,
    /// Entity updates received.
    pub events_received: u64,
    /// Entity updates filtered out.
    pub events_filtered_out: u64,
    /// Reads answered from the store.
    pub cache_hits: u64,
    /// Reads that needed HA.
    pub cache_misses: u64,
    /// HA REST requests made.
    pub ha_rest_requests: u64,
    /// Last entity update, µs since the epoch (0 = none yet).
    pub last_event_time: u64,
    /// Daemon start, µs since the epoch.
    pub start_time: u64,
    /// Daemon version.
    pub version: String,
    /// States are served but not live (HA unreachable, or restored from disk at start).
    pub serving_stale: bool,
    /// Local WebSocket API sessions open now.
    pub websocket_sessions: u32,
    /// WebSocket API commands forwarded to HA.
    pub websocket_forwarded_commands: u64,
    /// WebSocket API sessions dropped for falling behind.
    pub websocket_slow_clients_dropped: u64,
    /// WebSocket API tokens HA refused.
    pub websocket_auth_failures: u64,
}

impl Props {
    /// The property values of `status`.
    pub fn of(status: &Status) -> Props {
        let (m, link) = (&status.mirror, &status.link);
        Props {
            connection: link.state.as_str().into(),
            connected: status.live(),
            // Empty rather than a string D-Bus cannot carry (see the module docs).
            ha_version: link
                .ha_version
                .clone()
                .filter(|v| !v.contains('\0'))
                .unwrap_or_default(),
            reconnect_attempts: link.reconnect_attempts,
            subscriptions: link.subscriptions,
            tracked_entities: u32::try_from(status.tracked).unwrap_or(u32::MAX),
            events_received: m.events_received,
            events_filtered_out: m.events_filtered_out,
            cache_hits: status.store.hits,
            cache_misses: status.store.misses,
            ha_rest_requests: status.rest_total(),
            last_event_time: epoch_micros(status.last_event),
            start_time: epoch_micros(Some(status.started)),
            version: env!("CARGO_PKG_VERSION").into(),
            serving_stale: status.serving_stale(),
            websocket_sessions: u32::try_from(status.forwarding.websocket_api.sessions_open)
                .unwrap_or(u32::MAX),
            websocket_forwarded_commands: status.forwarding.websocket_api.forwarded_commands,
            websocket_slow_clients_dropped: status.forwarding.websocket_api.slow_clients_dropped,
            websocket_auth_failures: status.forwarding.websocket_api.auth_failures,
        }
    }
}

/// A method call forwarded to the executor thread.
#[derive(Debug)]
pub(crate) enum Call {
    GetState(String, Sender<Result<String, Error>>),
    ListEntities(Sender<Vec<String>>),
    Resync,
}

/// The exported object. In its own module because zbus' macro adds public helpers (signal
/// emitters) without docs; every D-Bus member below is documented.
#[allow(missing_docs)]
mod object {
    use super::*;

    /// The exported object.
    #[derive(Debug)]
    pub(super) struct HassEdge {
        /// Values served to `Get`/`GetAll`.
        pub(super) props: Arc<Mutex<Props>>,
        /// To the executor thread.
        pub(super) calls: Sender<Call>,
    }

    impl HassEdge {
        fn props(&self) -> Props {
            self.props.lock().map(|p| p.clone()).unwrap_or_default()
        }

        async fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> Call) -> Result<T, Error> {
            let (tx, rx) = bounded(1);
            self.calls
                .send(make(tx))
                .await
                .map_err(|_| Error::Unavailable("hass-edge is stopping".into()))?;
            rx.recv()
                .await
                .map_err(|_| Error::Unavailable("hass-edge is stopping".into()))
        }
    }

    #[zbus::interface(name = "io.hassedge.HassEdge1")]
    impl HassEdge {
        /// The state JSON of `entity_id`, the same as `GET /api/states/<entity_id>`.
        async fn get_state(&self, entity_id: String) -> Result<String, Error> {
            self.ask(|tx| Call::GetState(entity_id, tx)).await?
        }

        /// The tracked entity ids, sorted.
        async fn list_entities(&self) -> Result<Vec<String>, Error> {
            self.ask(Call::ListEntities).await
        }

        /// Takes a fresh snapshot from HA (reconnecting if the link is down).
        async fn resync(&self) -> Result<(), Error> {
            self.calls
                .send(Call::Resync)
                .await
                .map_err(|_| Error::Unavailable("hass-edge is stopping".into()))
        }

        /// A tracked entity changed (only with `[dbus] entity_signals = true`); `state` is the
        /// state JSON, or empty when the entity was removed.
        #[zbus(signal)]
        pub(super) async fn entity_changed(
            emitter: &SignalEmitter<'_>,
            entity_id: &str,
            state: &str,
        ) -> zbus::Result<()>;

        /// `connecting|authenticating|syncing|live|backoff|auth_failed|stopping`.
        #[zbus(property)]
        fn connection(&self) -> String {
            self.props().connection
        }
        /// Live and synced.
        #[zbus(property)]
        fn connected(&self) -> bool {
            self.props().connected
        }
        /// HA's version (empty until known).
        #[zbus(property)]
        fn ha_version(&self) -> String {
            self.props().ha_version
        }
        /// Failed attempts since the last sync.
        #[zbus(property)]
        fn reconnect_attempts(&self) -> u32 {
            self.props().reconnect_attempts
        }
        /// Active subscriptions to HA.
        #[zbus(property)]
        fn subscriptions(&self) -> u32 {
            self.props().subscriptions
        }
        /// Entities kept fresh by the subscription.
        #[zbus(property)]
        fn tracked_entities(&self) -> u32 {
            self.props().tracked_entities
        }
        /// Entity updates received.
        #[zbus(property)]
        fn events_received(&self) -> u64 {
            self.props().events_received
        }
        /// Entity updates filtered out.
        #[zbus(property)]
        fn events_filtered_out(&self) -> u64 {
            self.props().events_filtered_out
        }
        /// Reads answered from the store.
        #[zbus(property)]
        fn cache_hits(&self) -> u64 {
            self.props().cache_hits
        }
        /// Reads that needed HA.
        #[zbus(property)]
        fn cache_misses(&self) -> u64 {
            self.props().cache_misses
        }
        /// HA REST requests made.
        #[zbus(property)]
        fn ha_rest_requests(&self) -> u64 {
            self.props().ha_rest_requests
        }
        /// Last entity update, µs since the epoch (0 = none).
        #[zbus(property)]
        fn last_event_time(&self) -> u64 {
            self.props().last_event_time
        }
        /// Daemon start, µs since the epoch.
        #[zbus(property)]
        fn start_time(&self) -> u64 {
            self.props().start_time
        }
        /// Daemon version.
        #[zbus(property)]
        fn version(&self) -> String {
            self.props().version
        }
        /// States are served but not live (HA unreachable, or restored from disk at start).
        #[zbus(property)]
        fn serving_stale(&self) -> bool {
            self.props().serving_stale
        }
        /// Local WebSocket API sessions open now.
        #[zbus(property)]
        fn websocket_sessions(&self) -> u32 {
            self.props().websocket_sessions
        }
        /// WebSocket API commands forwarded to HA.
        #[zbus(property)]
        fn websocket_forwarded_commands(&self) -> u64 {
            self.props().websocket_forwarded_commands
        }
        /// WebSocket API sessions dropped for falling behind.
        #[zbus(property)]
        fn websocket_slow_clients_dropped(&self) -> u64 {
            self.props().websocket_slow_clients_dropped
        }
        /// WebSocket API tokens HA refused.
        #[zbus(property)]
        fn websocket_auth_failures(&self) -> u64 {
            self.props().websocket_auth_failures
        }
    }
}
use object::HassEdge;

/// Strings kept off the bus because they hold a NUL byte: counted, and each logged once.
#[derive(Debug, Default)]
struct NulFilter {
    /// Strings left out so far.
    refused: Cell<u64>,
    /// Subjects already warned about (at most [`NUL_WARNED_MAX`], each cut to 80 characters),
    /// so that a bad id in every `ListEntities` answer is logged once, not once per call.
    warned: RefCell<HashSet<String>>,
}

impl NulFilter {
    /// Whether `value` may go on the bus. When it holds a NUL it may not: counts it and logs
    /// "leaving out `what` `subject`" (at warn level the first time for `subject`).
    fn admits(&self, value: &str, what: &str, subject: &str) -> bool {
        if !value.contains('\0') {
            return true;
        }
        let refused = self.refused.get() + 1;
        self.refused.set(refused);
        let shown: String = subject.chars().take(80).collect();
        let mut warned = self.warned.borrow_mut();
        let first = warned.len() < NUL_WARNED_MAX && warned.insert(shown.clone());
        if first {
            log::warn!(
                "D-Bus: leaving out {what} {shown:?}: a D-Bus string cannot hold a NUL byte \
                 ({refused} left out in all)"
            );
        } else {
            log::debug!(
                "D-Bus: leaving out {what} {shown:?} (NUL byte; {refused} left out in all)"
            );
        }
        false
    }
}

/// `text` with every NUL written as `\0`, for error messages that quote what HA said.
fn scrub(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\\0")
    } else {
        text
    }
}

/// What the D-Bus side shares between the change hook, the method calls and the connection
/// task; on the executor thread, made once.
#[derive(Debug, Default)]
struct Shared {
    /// A connection is up and the object served: only then are signals worth queueing.
    on_bus: Cell<bool>,
    /// `EntityChanged` signals dropped because the queue was full.
    dropped: Cell<u64>,
    /// The queue overflowed and has not drained to half since (one warning per overflow).
    overflowing: Cell<bool>,
    /// Strings with a NUL, kept off the bus.
    nul: NulFilter,
}

/// Where `EntityChanged` signals go: a bounded queue (1024 signals) to the connection
/// task. Made once at start; it outlives connections.
#[derive(Debug, Clone)]
pub struct SignalSink {
    /// To the connection task.
    tx: Sender<(String, String)>,
    /// The on-bus flag, the drop counter and the NUL filter.
    shared: Rc<Shared>,
}

impl SignalSink {
    /// Queues an `EntityChanged(entity_id, state JSON)` for each of `changes` (`state` empty
    /// on removal). Off the bus nothing is queued: nobody can receive a signal then, and
    /// D-Bus signals are not replayed later. When the queue is full the signal is dropped
    /// and counted (a warning per overflow, then debug lines); an id or state with a NUL
    /// byte is left out, counted and logged.
    pub fn publish(&self, changes: &[Change]) {
        let s = &self.shared;
        if !s.on_bus.get() {
            return;
        }
        for c in changes {
            if !s
                .nul
                .admits(&c.entity_id, "EntityChanged for", &c.entity_id)
            {
                continue;
            }
            let state = c
                .new_state
                .as_ref()
                .map(|s| s.to_json())
                .unwrap_or_default();
            if !s
                .nul
                .admits(&state, "EntityChanged with the state of", &c.entity_id)
            {
                continue;
            }
            match self.tx.try_send((c.entity_id.clone(), state)) {
                Ok(()) => {
                    // Room again only once half drained: a queue that hovers at full warns
                    // once, not once per signal.
                    if s.overflowing.get() && self.tx.len() <= SIGNAL_QUEUE / 2 {
                        s.overflowing.set(false);
                        log::info!(
                            "D-Bus: the signal queue has room again ({} EntityChanged dropped in all)",
                            s.dropped.get()
                        );
                    }
                }
                Err(_) => {
                    let dropped = s.dropped.get() + 1;
                    s.dropped.set(dropped);
                    if s.overflowing.replace(true) {
                        log::debug!(
                            "D-Bus: signal queue full; dropping EntityChanged for {:?}",
                            c.entity_id
                        );
                    } else {
                        log::warn!(
                            "D-Bus: signal queue full ({SIGNAL_QUEUE} waiting); dropping \
                             EntityChanged signals until it drains ({dropped} dropped in all)"
                        );
                    }
                }
            }
        }
    }
}

/// Serves the D-Bus side in the background until shutdown, and returns at once: HTTP never
/// waits for the bus. `DbusBus::None` does nothing.
///
/// One long-lived task connects to `bus` (`system` or `session`, as zbus'
/// `connection::Builder::system`/`session` find it), serves the object at
/// `/io/hassedge/HassEdge1` and claims `io.hassedge.HassEdge1`, then watches the
/// connection with zbus' `Connection::closed` ("Waits until the connection is closed …
/// when the remote peer disconnects, an I/O error occurs on the socket", zbus ≥ 5.18).
/// A bus that is missing at start is logged once at error level and retried at debug
/// level; a lost connection is logged as a warning. Either way the next attempt comes after
/// 1 s, doubling to 30 s, plus 0–10 % jitter; a new connection is logged
/// ("reconnected"), serves the object, claims the name and announces every property again.
/// Shutdown announces `Connection = stopping` and ends the task, also mid-wait or
/// mid-attempt.
///
/// With `entity_signals`, a change hook is added to `hub` (once, for the daemon's life) that
/// queues `EntityChanged` signals through a [`SignalSink`].
pub async fn start(
    hub: Rc<Hub>,
    bus: DbusBus,
    entity_signals: bool,
    executor: &Rc<LocalExecutor<'static>>,
    shutdown: Shutdown,
) {
    if bus == DbusBus::None {
        return;
    }
    let shared = Rc::new(Shared::default());
    let (calls_tx, calls_rx) = bounded::<Call>(CALL_QUEUE);
    let (sig_tx, sig_rx) = bounded(SIGNAL_QUEUE);
    if entity_signals {
        let sink = SignalSink {
            tx: sig_tx,
            shared: shared.clone(),
        };
        hub.add_change_hook(Rc::new(move |changes: &[Change]| sink.publish(changes)));
    } else {
        drop(sig_tx);
    }
    let props = Props::of(&hub.status());
    let service = Service {
        hub,
        bus,
        served: Arc::new(Mutex::new(props.clone())),
        calls: calls_tx,
        signals: sig_rx,
        shared,
        executor: executor.clone(),
        shutdown,
        announced: props,
        last_counters: Instant::now(),
    };
    executor.spawn(service.run(calls_rx)).detach();
}

/// The wait before attempt number `failures + 1`, where `failures` ≥ 1 counts the failed
/// attempts (a lost connection counts as one) since the last connection: [`RETRY_FIRST`]
/// doubled per further failure, capped at [`RETRY_MAX`], plus `jitter` (0.0–1.0) × 10 %, so
/// that the clients of a restarted bus daemon do not all come back at the same instant.
fn retry_delay(failures: u32, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    let base = RETRY_FIRST.saturating_mul(1 << doublings).min(RETRY_MAX);
    base.mul_f64(1.0 + jitter.clamp(0.0, 1.0) / 10.0)
}

/// How a connection's service ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The bus closed the connection (or it broke): try again.
    Lost,
    /// Shutdown.
    Stop,
}

/// The long-lived D-Bus task: what outlives a connection, and the connection loop.
struct Service {
    /// Where the states and the status live.
    hub: Rc<Hub>,
    /// Which bus.
    bus: DbusBus,
    /// The property values zbus serves to `Get`/`GetAll` (shared with each connection's object).
    served: Arc<Mutex<Props>>,
    /// Cloned into each connection's object; [`serve_calls`] holds the other end.
    calls: Sender<Call>,
    /// Queued `EntityChanged` signals (closed at once when entity signals are off).
    signals: Receiver<(String, String)>,
    /// Shared with the signal sink and the method calls.
    shared: Rc<Shared>,
    /// Runs the zbus ticker of each connection, and the method calls.
    executor: Rc<LocalExecutor<'static>>,
    /// Ends everything.
    shutdown: Shutdown,
    /// What clients were last told, to emit `PropertiesChanged` for differences only.
    announced: Props,
    /// When counters were last announced (at most once per [`COUNTER_PERIOD`]).
    last_counters: Instant,
}

impl Service {
    /// Connects, serves, and reconnects with back-off until shutdown.
    async fn run(mut self, calls: Receiver<Call>) {
        let _calls_task =
            self.executor
                .spawn(serve_calls(self.hub.clone(), calls, self.shared.clone()));
        let bus = bus_name(self.bus);
        // Failed attempts since the last connection (a lost connection counts as one).
        let mut failures: u32 = 0;
        // Whether a connection was ever made: only a bus missing from the start is an error;
        // failures after a loss were announced by the loss's warning.
        let mut ever_connected = false;
        // When the last connection was lost.
        let mut lost_at: Option<Instant> = None;
        loop {
            let attempt = async { Some(self.connect().await) }
                .or(async {
                    self.shutdown.wait().await;
                    None
                })
                .await;
            let delay = match attempt {
                None => return,
                Some(Ok(conn)) => {
                    match lost_at.take() {
                        Some(at) => log::info!(
                            "D-Bus: reconnected to the {bus} bus after {:.1}s; {NAME} is ours again",
                            at.elapsed().as_secs_f64()
                        ),
                        None if failures > 0 => log::info!(
                            "D-Bus: the {bus} bus is up now; {NAME} on it after {failures} failed attempts"
                        ),
                        None => log::info!("D-Bus: {NAME} on the {bus} bus"),
                    }
                    ever_connected = true;
                    if self.serve(conn).await == Ended::Stop {
                        return;
                    }
                    failures = 1;
                    lost_at = Some(Instant::now());
                    let delay = retry_delay(failures, fastrand::f64());
                    log::warn!(
                        "D-Bus: lost the connection to the {bus} bus ({NAME} is gone); \
                         reconnecting in {:.1}s",
                        delay.as_secs_f64()
                    );
                    delay
                }
                Some(Err(e)) => {
                    failures = failures.saturating_add(1);
                    let delay = retry_delay(failures, fastrand::f64());
                    if failures == 1 && !ever_connected {
                        log::error!(
                            "D-Bus ({bus} bus) unavailable: {e}; retrying in the background \
                             (HTTP is not affected)"
                        );
                    } else {
                        log::debug!(
                            "D-Bus: the {bus} bus is still unavailable ({e}); next attempt in {:.1}s",
                            delay.as_secs_f64()
                        );
                    }
                    delay
                }
            };
            let stop = async {
                Timer::after(delay).await;
                false
            }
            .or(async {
                self.shutdown.wait().await;
                true
            })
            .await;
            if stop {
                return;
            }
        }
    }

    /// One attempt: connects to the bus, serves the object and claims the name, within
    /// [`CONNECT_TIMEOUT`]. The object is registered before the name is requested, so a
    /// client that sees the name can call at once.
    async fn connect(&self) -> zbus::Result<zbus::Connection> {
        if let Ok(mut p) = self.served.lock() {
            *p = Props::of(&self.hub.status());
        }
        let object = HassEdge {
            props: self.served.clone(),
            calls: self.calls.clone(),
        };
        let builder = match self.bus {
            DbusBus::System => zbus::connection::Builder::system()?,
            DbusBus::Session => zbus::connection::Builder::session()?,
            DbusBus::None => return Err(zbus::Error::Failure("no bus configured".into())),
        };
        builder
            .internal_executor(false)
            .serve_at(PATH, object)?
            .name(NAME)?
            .build()
            .or(async {
                // The builder itself ticks zbus' executor while it connects.
                Timer::after(CONNECT_TIMEOUT).await;
                Err(zbus::Error::Failure(format!(
                    "no answer from the bus within {}s",
                    CONNECT_TIMEOUT.as_secs()
                )))
            })
            .await
    }

    /// Serves one connection until it closes or shutdown: drives zbus' executor, announces
    /// every property, then keeps them in step and emits the queued signals.
    async fn serve(&mut self, conn: zbus::Connection) -> Ended {
        // Without zbus' internal thread, this task is what runs the connection's socket
        // reader and object server (zbus `Connection::executor`). Dropped (cancelled) with
        // the connection.
        let ticker = {
            let conn = conn.clone();
            self.executor.spawn(async move {
                loop {
                    conn.executor().tick().await;
                    // A tick that finds more to do at once (a client with many calls in
                    // flight) would run on without ever letting the others run.
                    smol::future::yield_now().await;
                }
            })
        };
        let iface = match conn.object_server().interface::<_, HassEdge>(PATH).await {
            Ok(i) => i,
            Err(e) => {
                // Cannot happen: the builder served it. Treated as a broken connection.
                log::error!("D-Bus: cannot find our own object: {e}");
                return Ended::Lost;
            }
        };
        let emitter = iface.signal_emitter().clone();
        // Clients of a new connection (or of a restarted bus) know nothing yet: tell them
        // every value, not just what changed.
        let now = Props::of(&self.hub.status());
        if let Ok(mut p) = self.served.lock() {
            *p = now.clone();
        }
        if let Err(err) = emit_changes(&*iface.get().await, &emitter, None, &now).await {
            log::debug!("D-Bus: PropertiesChanged failed: {err}");
        }
        self.announced = now;
        self.last_counters = Instant::now();
        self.shared.on_bus.set(true);
        let ended = self.announce(&conn, &iface, &emitter).await;
        self.shared.on_bus.set(false);
        // Signals queued for this connection can no longer reach anyone.
        while self.signals.try_recv().is_ok() {}
        drop(ticker);
        ended
    }

    /// Keeps the exported properties in step with the hub and emits `PropertiesChanged`:
    /// link properties at once, counters at most once per [`COUNTER_PERIOD`]; emits queued
    /// `EntityChanged` signals. Returns when the connection closes or at shutdown (after
    /// announcing `stopping`).
    async fn announce(
        &mut self,
        conn: &zbus::Connection,
        iface: &zbus::object_server::InterfaceRef<HassEdge>,
        emitter: &SignalEmitter<'_>,
    ) -> Ended {
        loop {
            let listener = self.hub.listen_changed();
            let now = Props::of(&self.hub.status());
            let counters_due = self.last_counters.elapsed() >= COUNTER_PERIOD;
            let next = if counters_due {
                now.clone()
            } else {
                Props {
                    connection: now.connection.clone(),
                    connected: now.connected,
                    ha_version: now.ha_version.clone(),
                    reconnect_attempts: now.reconnect_attempts,
                    subscriptions: now.subscriptions,
                    serving_stale: now.serving_stale,
                    websocket_sessions: now.websocket_sessions,
                    ..self.announced.clone()
                }
            };
            if next != self.announced {
                if let Ok(mut p) = self.served.lock() {
                    *p = next.clone();
                }
                if let Err(err) =
                    emit_changes(&*iface.get().await, emitter, Some(&self.announced), &next).await
                {
                    log::warn!("D-Bus: PropertiesChanged failed: {err}");
                }
                if counters_due {
                    self.last_counters = Instant::now();
                }
                self.announced = next;
            }
            let pending = self.announced != now;
            enum Wake {
                Stop,
                Closed,
                Changed,
                Signal((String, String)),
            }
            // Shutdown and a closed connection first: `or` polls in order, and neither may
            // wait behind a stream of changes.
            let wake = async {
                self.shutdown.wait().await;
                Wake::Stop
            }
            .or(async {
                conn.closed().await;
                Wake::Closed
            })
            .or(async {
                if pending {
                    Timer::at(self.last_counters + COUNTER_PERIOD).await;
                } else {
                    listener.await;
                }
                Wake::Changed
            })
            .or(async {
                match self.signals.recv().await {
                    Ok(signal) => Wake::Signal(signal),
                    // No sender (entity_signals = false): never wake for signals.
                    Err(_) => std::future::pending().await,
                }
            })
            .await;
            match wake {
                Wake::Changed => {}
                Wake::Closed => return Ended::Lost,
                Wake::Signal(first) => {
                    // A burst goes out in one wake, not one status snapshot per signal.
                    let mut next = Some(first);
                    let mut sent = 0;
                    while let Some((entity_id, state)) = next.take() {
                        if let Err(err) =
                            HassEdge::entity_changed(emitter, &entity_id, &state).await
                        {
                            log::debug!("D-Bus: EntityChanged failed: {err}");
                        }
                        sent += 1;
                        if sent < 64 {
                            next = self.signals.try_recv().ok();
                        }
                    }
                }
                Wake::Stop => {
                    // Announce `stopping` before the name goes away.
                    let stopping = Props {
                        connection: LinkState::Stopping.as_str().into(),
                        connected: false,
                        ..self.announced.clone()
                    };
                    if let Ok(mut p) = self.served.lock() {
                        *p = stopping.clone();
                    }
                    let _ = emit_changes(
                        &*iface.get().await,
                        emitter,
                        Some(&self.announced),
                        &stopping,
                    )
                    .await;
                    return Ended::Stop;
                }
            }
        }
    }
}

/// `system` or `session`, for log lines.
fn bus_name(bus: DbusBus) -> &'static str {
    match bus {
        DbusBus::System => "system",
        DbusBus::Session => "session",
        DbusBus::None => "no",
    }
}

/// Answers the method calls forwarded by the objects of every connection, on the executor
/// thread; ends when the connection task ends. Strings with a NUL never go back on the bus.
async fn serve_calls(hub: Rc<Hub>, calls: Receiver<Call>, shared: Rc<Shared>) {
    while let Ok(call) = calls.recv().await {
        match call {
            Call::GetState(entity_id, reply) => {
                let answer = if !valid_entity_id(&entity_id) {
                    Err(Error::NotFound(format!(
                        "{entity_id:?} is not an entity id"
                    )))
                } else {
                    match hub.read_state(&entity_id, false).await {
                        Read::Fresh { state, .. } | Read::Stale { state, .. } => {
                            let json = state.to_json();
                            if shared.nul.admits(&json, "the state of", &entity_id) {
                                Ok(json)
                            } else {
                                Err(Error::Unavailable(format!(
                                    "the state of {entity_id} holds a NUL byte, which D-Bus cannot carry"
                                )))
                            }
                        }
                        Read::NotFound { .. } => Err(Error::NotFound(format!(
                            "{entity_id} is not known to Home Assistant"
                        ))),
                        Read::Failed(e) => Err(Error::Unavailable(scrub(e.to_string()))),
                        Read::Limited => Err(Error::Unavailable(
                            "too many reads of entities Home Assistant does not push".into(),
                        )),
                    }
                };
                let _ = reply.try_send(answer);
            }
            Call::ListEntities(reply) => {
                let ids = hub
                    .tracked_states()
                    .0
                    .iter()
                    .filter(|s| {
                        shared
                            .nul
                            .admits(&s.entity_id, "the entity id", &s.entity_id)
                    })
                    .map(|s| s.entity_id.clone())
                    .collect();
                let _ = reply.try_send(ids);
            }
            Call::Resync => {
                log::info!("D-Bus: Resync requested");
                hub.request_resync();
            }
        }
    }
}

/// Emits `PropertiesChanged` for every property that differs between `old` and `new`, or
/// for every property when there is no `old` (a new connection).
async fn emit_changes(
    object: &HassEdge,
    e: &SignalEmitter<'_>,
    old: Option<&Props>,
    new: &Props,
) -> zbus::Result<()> {
    macro_rules! each {
        ($($field:ident => $signal:ident),* $(,)?) => {
            $(if old.is_none_or(|old| old.$field != new.$field) {
                object.$signal(e).await?;
            })*
        };
    }
    each!(
        connection => connection_changed,
        connected => connected_changed,
        ha_version => ha_version_changed,
        reconnect_attempts => reconnect_attempts_changed,
        subscriptions => subscriptions_changed,
        tracked_entities => tracked_entities_changed,
        events_received => events_received_changed,
        events_filtered_out => events_filtered_out_changed,
        cache_hits => cache_hits_changed,
        cache_misses => cache_misses_changed,
        ha_rest_requests => ha_rest_requests_changed,
        last_event_time => last_event_time_changed,
        start_time => start_time_changed,
        version => version_changed,
        serving_stale => serving_stale_changed,
        websocket_sessions => websocket_sessions_changed,
        websocket_forwarded_commands => websocket_forwarded_commands_changed,
        websocket_slow_clients_dropped => websocket_slow_clients_dropped_changed,
        websocket_auth_failures => websocket_auth_failures_changed,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_from_one_second_to_thirty_with_up_to_ten_percent_jitter() {
        let secs = |failures, jitter| retry_delay(failures, jitter).as_secs_f64();
        assert_eq!(secs(1, 0.0), 1.0);
        assert_eq!(secs(2, 0.0), 2.0);
        assert_eq!(secs(3, 0.0), 4.0);
        assert_eq!(secs(5, 0.0), 16.0);
        assert_eq!(secs(6, 0.0), 30.0);
        assert_eq!(secs(u32::MAX, 0.0), 30.0);
        assert!((secs(1, 1.0) - 1.1).abs() < 1e-9);
        assert!((secs(9, 1.0) - 33.0).abs() < 1e-9);
        // Out-of-range jitter is clamped; 0 failures is treated as the first.
        assert_eq!(secs(0, -3.0), 1.0);
        assert!((secs(1, 7.0) - 1.1).abs() < 1e-9);
    }

    #[test]
    fn strings_with_a_nul_are_refused_counted_and_warned_about_once() {
        let nul = NulFilter::default();
        assert!(nul.admits("light.kitchen", "the entity id", "light.kitchen"));
        assert!(nul.admits("", "the entity id", ""));
        let bad = "light.a\0b";
        assert!(!nul.admits(bad, "the entity id", bad));
        assert!(!nul.admits(bad, "the entity id", bad));
        assert_eq!(nul.refused.get(), 2);
        assert_eq!(nul.warned.borrow().len(), 1, "one warning per subject");
        // The warned set is bounded, however many bad ids arrive.
        for i in 0..(NUL_WARNED_MAX + 50) {
            let id = format!("light.x{i}\0");
            assert!(!nul.admits(&id, "the entity id", &id));
        }
        assert_eq!(nul.warned.borrow().len(), NUL_WARNED_MAX);
        assert_eq!(scrub("a\0b".into()), "a\\0b");
        assert_eq!(scrub("ab".into()), "ab");
    }

    #[test]
    fn signals_are_queued_only_on_the_bus_bounded_and_without_nul() {
        let removal = |id: &str| Change {
            entity_id: id.into(),
            old_state: None,
            new_state: None,
        };
        let (tx, rx) = bounded(SIGNAL_QUEUE);
        let sink = SignalSink {
            tx,
            shared: Rc::new(Shared::default()),
        };
        // Off the bus: nobody could hear them, nothing is queued.
        sink.publish(&[removal("light.a")]);
        assert!(rx.is_empty());
        sink.shared.on_bus.set(true);
        sink.publish(&[removal("light.a"), removal("light.b\0c")]);
        assert_eq!(rx.try_recv().ok(), Some(("light.a".into(), String::new())));
        assert!(rx.is_empty(), "the id with a NUL is left out");
        assert_eq!(sink.shared.nul.refused.get(), 1);
        // A full queue drops and counts; it is "overflowing" until half drained.
        let burst: Vec<Change> = (0..SIGNAL_QUEUE + 10)
            .map(|i| removal(&format!("light.x{i}")))
            .collect();
        sink.publish(&burst);
        assert_eq!(rx.len(), SIGNAL_QUEUE);
        assert_eq!(sink.shared.dropped.get(), 10);
        assert!(sink.shared.overflowing.get());
        for _ in 0..SIGNAL_QUEUE / 2 + 1 {
            let _ = rx.try_recv();
        }
        sink.publish(&[removal("light.y")]);
        assert!(!sink.shared.overflowing.get());
    }
}
