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
use std::rc::Rc;
/// Counters are announced at most this often.
const COUNTER_PERIOD: Duration = Duration::from_secs(1);
/// `EntityChanged` signals queued before new ones are dropped (and counted).
const SIGNAL_QUEUE: usize = 1024;

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
    /// HA's version, empty until known.
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
}

impl Props {
    /// The property values of `status`.
    pub fn of(status: &Status) -> Props {
        let (m, link) = (&status.mirror, &status.link);
        Props {
            connection: link.state.as_str().into(),
            connected: status.live(),
            ha_version: link.ha_version.clone().unwrap_or_default(),
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
    }
}
use object::HassEdge;

/// Where `EntityChanged` signals go: a bounded queue to the D-Bus task.
#[derive(Debug, Clone)]
pub struct SignalSink {
    tx: Sender<(String, String)>,
}

impl SignalSink {
    /// Queues signals for `changes`; drops them when the bus cannot keep up.
    pub fn publish(&self, changes: &[Change]) {
        for c in changes {
            let state = c
                .new_state
                .as_ref()
                .map(|s| s.to_json())
                .unwrap_or_default();
            if self.tx.try_send((c.entity_id.clone(), state)).is_err() {
                log::debug!(
                    "D-Bus signal queue full; dropping EntityChanged for {}",
                    c.entity_id
                );
            }
        }
    }
}

/// Connects to the bus, claims the name, and serves until shutdown. Returns the sink for
/// `EntityChanged` when entity signals are on. Errors are logged; the daemon goes on
/// without D-Bus (HTTP keeps working).
pub async fn start(
    hub: Rc<Hub>,
    bus: DbusBus,
    entity_signals: bool,
    executor: &Rc<LocalExecutor<'static>>,
    shutdown: Shutdown,
) {
    let props = Arc::new(Mutex::new(Props::of(&hub.status())));
    let (calls_tx, calls_rx) = bounded::<Call>(64);
    let object = HassEdge {
        props: props.clone(),
        calls: calls_tx,
    };
    let builder = match bus {
        DbusBus::None => return,
        DbusBus::System => zbus::connection::Builder::system(),
        DbusBus::Session => zbus::connection::Builder::session(),
    };
    let conn = match async {
        builder?
            .internal_executor(false)
            .serve_at(PATH, object)?
            .name(NAME)?
            .build()
            .await
    }
    .or(async {
        // The builder itself ticks zbus' executor while it connects.
        Timer::after(Duration::from_secs(10)).await;
        Err(zbus::Error::Failure(
            "timed out connecting to the bus".into(),
        ))
    })
    .await
    {
        Ok(c) => c,
        Err(e) => {
            log::error!("D-Bus ({bus:?} bus) unavailable, continuing without it: {e}");
            return;
        }
    };
    log::info!("D-Bus: {NAME} on the {bus:?} bus");
    let ticker = conn.clone();
    executor
        .spawn(async move {
            loop {
                ticker.executor().tick().await
            }
        })
        .detach();
    executor.spawn(serve_calls(hub.clone(), calls_rx)).detach();
    let (sig_tx, sig_rx) = bounded(SIGNAL_QUEUE);
    if entity_signals {
        let sink = SignalSink { tx: sig_tx };
        hub.add_change_hook(Rc::new(move |changes: &[Change]| sink.publish(changes)));
    } else {
        drop(sig_tx);
    }
    executor
        .spawn(announce(hub, conn, props, sig_rx, shutdown))
        .detach();
}

async fn serve_calls(hub: Rc<Hub>, calls: Receiver<Call>) {
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
                            Ok(state.to_json())
                        }
                        Read::NotFound { .. } => Err(Error::NotFound(format!(
                            "{entity_id} is not known to Home Assistant"
                        ))),
                        Read::Failed(e) => Err(Error::Unavailable(e.to_string())),
                    }
                };
                let _ = reply.try_send(answer);
            }
            Call::ListEntities(reply) => {
                let ids = hub
                    .tracked_states()
                    .0
                    .iter()
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

/// Emits `PropertiesChanged` for every property that differs between `old` and `new`.
async fn emit_changes(
    object: &HassEdge,
    e: &SignalEmitter<'_>,
    old: &Props,
    new: &Props,
) -> zbus::Result<()> {
    macro_rules! each {
        ($($field:ident => $signal:ident),* $(,)?) => {
            $(if old.$field != new.$field {
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
        serving_stale => serving_stale_changed,
    );
    Ok(())
}

/// Keeps the exported properties in step with the hub and emits `PropertiesChanged`:
/// link properties at once, counters at most once per [`COUNTER_PERIOD`].
async fn announce(
    hub: Rc<Hub>,
    conn: zbus::Connection,
    props: Arc<Mutex<Props>>,
    signals: Receiver<(String, String)>,
    shutdown: Shutdown,
) {
    let iface = match conn.object_server().interface::<_, HassEdge>(PATH).await {
        Ok(i) => i,
        Err(e) => {
            log::error!("D-Bus: cannot find our own object: {e}");
            return;
        }
    };
    let emitter = iface.signal_emitter().clone();
    let mut announced = props.lock().map(|p| p.clone()).unwrap_or_default();
    let mut last_counters = Instant::now() - COUNTER_PERIOD;
    loop {
        let listener = hub.listen_changed();
        let now = Props::of(&hub.status());
        let counters_due = last_counters.elapsed() >= COUNTER_PERIOD;
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
                ..announced.clone()
            }
        };
        if next != announced {
            if let Ok(mut p) = props.lock() {
                *p = next.clone();
            }
            if let Err(err) = emit_changes(&*iface.get().await, &emitter, &announced, &next).await {
                log::warn!("D-Bus: PropertiesChanged failed: {err}");
            }
            if counters_due {
                last_counters = Instant::now();
            }
            announced = next;
        }
        let pending = announced != now;
        enum Wake {
            Changed,
            Signal(Option<(String, String)>),
            Stop,
        }
        let wake = async {
            if pending {
                Timer::at(last_counters + COUNTER_PERIOD).await;
            } else {
                listener.await;
            }
            Wake::Changed
        }
        .or(async {
            match signals.recv().await {
                Ok(signal) => Wake::Signal(Some(signal)),
                // No sender (entity_signals = false): never wake for signals.
                Err(_) => std::future::pending().await,
            }
        })
        .or(async {
            shutdown.wait().await;
            Wake::Stop
        })
        .await;
        match wake {
            Wake::Changed | Wake::Signal(None) => {}
            Wake::Signal(Some((entity_id, state))) => {
                if let Err(err) = HassEdge::entity_changed(&emitter, &entity_id, &state).await {
                    log::debug!("D-Bus: EntityChanged failed: {err}");
                }
            }
            Wake::Stop => {
                // Announce `stopping` before the name goes away.
                let stopping = Props {
                    connection: LinkState::Stopping.as_str().into(),
                    connected: false,
                    ..announced.clone()
                };
                if let Ok(mut p) = props.lock() {
                    *p = stopping.clone();
                }
                let _ = emit_changes(&*iface.get().await, &emitter, &announced, &stopping).await;
                return;
            }
        }
    }
}
