//! The daemon: builds the hub, starts the HA link, the HTTP API and the systemd reporters on
//! one smol `LocalExecutor`, and owns the lifecycle — signals, reload (SIGHUP) and shutdown
//! (SIGTERM/SIGINT: Close frame to HA, stop accepting, exit within 2 s).

use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use async_signal::{Signal, Signals};
use smol::future::FutureExt;
use smol::stream::StreamExt;
use smol::{LocalExecutor, Timer};

use crate::config::{Config, ConfigError};
use crate::filter::EntityFilter;
use crate::ha::{self, ChangeSink, Command, LinkSettings};
use crate::hub::{Hub, LinkState};
use crate::persist::{self, SavePolicy};
use crate::rest::RestClient;
use crate::store::Change;
use crate::tls::{Roots, TlsError};
use crate::{dbus, http, logging, notify, shutdown};

/// How long shutdown may take before we exit anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Bad config or token (exit 78).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Bad TLS setup, e.g. `ha.ca_file` (exit 78).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The HTTP listener could not be bound.
    #[error("failed to listen on {addr} (http.listen): {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Signal handling could not be set up.
    #[error("failed to install signal handlers: {0}")]
    Signals(std::io::Error),
    /// `reconnect.max_attempts` used up.
    #[error("{0}")]
    GaveUp(String),
}

impl AppError {
    /// The process exit code: 78 (EX_CONFIG) for config problems, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Config(_) | AppError::Tls(_) => crate::config::EXIT_CONFIG,
            _ => 1,
        }
    }
}

/// Where the config came from, for reloads.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The file.
    pub path: PathBuf,
    /// Whether the path was given on the command line (a missing file is then an error).
    pub given: bool,
}

/// The WebSocket settings and the REST client for `config`, from one load of the TLS roots
/// (the system store is read once, and the DER copies are dropped once both clients hold
/// what they need).
fn ha_clients(config: &Config) -> Result<(LinkSettings, RestClient), AppError> {
    let token = config.read_token()?;
    // Roots only for an https HA: parsed, the system store is ~300 KiB that a plain-http
    // HA on the LAN (HA's default) never uses.
    let roots = if config.ha.url.starts_with("https://") {
        Some(Roots::load(config.ha.ca_file.as_deref())?)
    } else {
        None
    };
    let rest = RestClient::new(&config.ha.url, token.clone(), roots.as_ref());
    let tls = roots.as_ref().map(Roots::client_config).transpose()?;
    let settings = LinkSettings {
        websocket_url: config.ha.websocket_url.clone(),
        token,
        tls,
    };
    Ok((settings, rest))
}

/// Runs the daemon until SIGTERM/SIGINT. Blocks the calling thread.
///
/// Errors: see [`AppError`]; config and TLS problems are found before anything starts.
pub fn run(config: Config, source: ConfigSource) -> Result<(), AppError> {
    let (settings, rest) = ha_clients(&config)?;
    let listener =
        std::net::TcpListener::bind(config.http.listen).map_err(|source| AppError::Bind {
            addr: config.http.listen,
            source,
        })?;
    let listener = smol::net::TcpListener::try_from(listener).map_err(|source| AppError::Bind {
        addr: config.http.listen,
        source,
    })?;
    let signals =
        Signals::new([Signal::Term, Signal::Int, Signal::Hup]).map_err(AppError::Signals)?;
    log::info!(
        "hass-edge {} listening on http://{}, Home Assistant at {}",
        env!("CARGO_PKG_VERSION"),
        config.http.listen,
        config.ha.url
    );
    let api_token = config.read_api_token()?;
    let hub = Rc::new(Hub::new(Rc::new(config), rest));
    *hub.api_token.borrow_mut() = api_token;
    restore(&hub);
    let executor = Rc::new(LocalExecutor::new());
    // A task, not `run`'s own future: `run` polls its future on every wake-up of the
    // executor, and the daemon's polled its signal socket each time (one recvfrom per HTTP
    // request); a task is polled only when its own waker fires.
    let main = executor.spawn(daemon(
        hub,
        settings,
        listener,
        signals,
        source,
        executor.clone(),
    ));
    smol::block_on(executor.run(main))
}

async fn daemon(
    hub: Rc<Hub>,
    settings: LinkSettings,
    listener: smol::net::TcpListener,
    mut signals: Signals,
    source: ConfigSource,
    executor: Rc<LocalExecutor<'static>>,
) -> Result<(), AppError> {
    let (trigger, shutdown) = shutdown::channel();
    let token = std::cell::RefCell::new(settings.token.clone());
    let (commands_tx, commands_rx) = smol::channel::bounded::<Command>(8);
    let (bus, entity_signals) = {
        let c = hub.config.borrow();
        (c.dbus.bus, c.dbus.entity_signals)
    };
    let signals_sink = dbus::start(
        hub.clone(),
        bus,
        entity_signals,
        commands_tx.clone(),
        &executor,
        shutdown.clone(),
    )
    .await;
    let on_change: ChangeSink = {
        let hub = hub.clone();
        Rc::new(move |changes: &[Change]| {
            hub.stream.publish(changes);
            if let Some(sink) = &signals_sink {
                sink.publish(changes);
            }
        })
    };

    let http_task = executor.spawn(http::serve(
        listener,
        hub.clone(),
        executor.clone(),
        shutdown.clone(),
    ));
    let save_task = executor.spawn(save_states(hub.clone(), shutdown.clone()));
    let link_task = executor.spawn(ha::run(
        hub.clone(),
        settings,
        commands_rx,
        on_change.clone(),
        shutdown.clone(),
    ));
    let _status_task = executor.spawn(report_status(hub.clone()));
    let _watchdog_task = notify::watchdog_period().map(|period| {
        executor.spawn(async move {
            // Runs on the executor thread: if the event loop hangs, the pings stop and
            // systemd restarts us (WatchdogSec=, systemd.service(5)).
            loop {
                notify::watchdog();
                Timer::after(period).await;
            }
        })
    });

    // Signals, until a stop signal or the link gives up.
    let mut link_task = Some(link_task);
    let outcome = loop {
        enum Wake {
            Signal(Option<std::io::Result<Signal>>),
            LinkDone(Result<(), String>),
        }
        let link = link_task
            .as_mut()
            .expect("the link task runs until the loop ends");
        let wake = async { Wake::Signal(signals.next().await) }
            .or(async { Wake::LinkDone(link.await) })
            .await;
        match wake {
            Wake::Signal(Some(Ok(Signal::Hup))) => {
                reload(&hub, &source, &token, &commands_tx, &on_change).await
            }
            Wake::Signal(Some(Ok(sig))) => {
                log::info!("received {sig:?}, shutting down");
                break Ok(());
            }
            Wake::Signal(_) => break Ok(()),
            Wake::LinkDone(result) => {
                link_task = None;
                break result.map_err(AppError::GaveUp);
            }
        }
    };

    notify::stopping();
    hub.update_link(|l| l.state = LinkState::Stopping);
    trigger.trigger();
    let finish = async {
        if let Some(link) = link_task {
            let _ = link.await;
        }
        http_task.await;
        save_task.await;
    };
    let in_time = async {
        finish.await;
        true
    }
    .or(async {
        Timer::after(SHUTDOWN_GRACE).await;
        false
    })
    .await;
    if !in_time {
        log::warn!(
            "shutdown took longer than {}s; exiting anyway",
            SHUTDOWN_GRACE.as_secs()
        );
    }
    if let Err(e) = &outcome {
        log::error!("{e}");
    }
    log::info!("stopped");
    outcome
}

/// Warm start: loads the states saved by an earlier run (if `cache.persist`), keeps those the
/// current filter tracks, and puts them in the store as stale until HA's snapshot replaces
/// them. A missing file is normal; a bad one is moved aside by [`persist::load`] and logged.
fn restore(hub: &Hub) {
    let config = hub.config.borrow().clone();
    if !config.cache.persist {
        return;
    }
    let saved = match persist::load(&config.cache.state_file) {
        Ok(Some(saved)) => saved,
        Ok(None) => return,
        Err(e) => {
            log::warn!("warm start skipped: {e}");
            return;
        }
    };
    let age = SystemTime::now()
        .duration_since(saved.saved_at)
        .unwrap_or_default();
    let saved_at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
    let filter = hub.filter.borrow();
    let mut store = hub.store.borrow_mut();
    let mut kept = 0;
    for state in saved
        .states
        .into_iter()
        .filter(|s| filter.tracks(&s.entity_id))
    {
        store.insert_restored(state, saved_at);
        kept += 1;
    }
    let loaded = store.tracked_len();
    log::info!(
        "warm start: {loaded} states from {} (saved {}s ago; {} left out by the filter or max_entities), stale until Home Assistant answers",
        config.cache.state_file.display(),
        age.as_secs(),
        kept - loaded.min(kept)
    );
    hub.restored.set(Some((loaded, saved.saved_at)));
}

/// Saves the tracked states at most every `persist_interval_seconds` and only after a
/// change (SD-card wear), and once more at a clean stop. Only while live: states are then
/// current, so the file's time is honest about their age.
async fn save_states(hub: Rc<Hub>, shutdown: shutdown::Shutdown) {
    let (enabled, interval) = {
        let c = hub.config.borrow();
        (c.cache.persist, c.cache.persist_interval)
    };
    if !enabled {
        return;
    }
    let mut policy = SavePolicy::new(interval, Instant::now());
    let mut seen = hub.generation.get();
    loop {
        let listener = hub.states_changed.listen();
        if hub.generation.get() != seen {
            seen = hub.generation.get();
            policy.mark_changed();
        }
        let stopping = shutdown.is_triggered();
        let live = hub.store.borrow().is_live();
        if live && (policy.due(Instant::now()) || (stopping && policy.pending())) {
            let mark = policy.mark();
            let bytes = persist::encode(&hub.store.borrow().tracked_states(), SystemTime::now());
            let path = hub.config.borrow().cache.state_file.clone();
            let written = smol::unblock(move || persist::write_file(&path, &bytes)).await;
            match written {
                Ok(n) => {
                    log::debug!("saved {n} bytes of states");
                    policy.saved_through(mark, Instant::now());
                }
                Err(e) => {
                    log::error!(
                        "failed to save states (retrying in {}s): {e}",
                        interval.as_secs()
                    );
                    policy.failed(Instant::now());
                }
            }
        }
        if stopping {
            return;
        }
        let due = policy.next_due();
        async {
            match due {
                Some(at) if live => {
                    Timer::at(at).await;
                }
                _ => listener.await,
            }
        }
        .or(async {
            shutdown.wait().await;
        })
        .await;
    }
}

/// Formats a count with thousands separators: `2031` → `2,031`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The one-line summary for `systemctl status` (sd_notify `STATUS=`).
pub fn status_line(hub: &Hub) -> String {
    let link = hub.link.borrow();
    let version = link.ha_version.as_deref().unwrap_or("?");
    match link.state {
        LinkState::Live => format!(
            "live: HA {version}, {} entities tracked ({} filtered out), {} HA REST calls in the last hour",
            thousands(hub.store.borrow().tracked_len() as u64),
            thousands(hub.snapshot_filtered_out.get()),
            thousands(hub.rest_calls_last_hour() as u64)
        ),
        LinkState::Backoff => format!(
            "backoff: retry {} after: {}",
            link.reconnect_attempts,
            link.last_error.as_deref().unwrap_or("connection lost")
        ),
        LinkState::AuthFailed => {
            let every = hub.config.borrow().reconnect.max_delay.as_secs();
            format!(
                "auth_failed: Home Assistant rejected the access token; waiting for a valid one (checked every {every}s)"
            )
        }
        state => format!("{}: {}", state.as_str(), hub.config.borrow().ha.url),
    }
}

/// Sends `READY=1` once live, and `STATUS=` whenever the line changes (coalesced).
async fn report_status(hub: Rc<Hub>) {
    let mut ready = false;
    let mut last = String::new();
    loop {
        let listener = hub.changed.listen();
        let line = status_line(&hub);
        if !ready && hub.link_state() == LinkState::Live {
            notify::ready(&line);
            ready = true;
            last = line;
        } else if line != last {
            notify::status(&line);
            last = line;
        }
        listener.await;
        // Coalesce bursts (an event storm) into at most two updates per second.
        Timer::after(Duration::from_millis(500)).await;
    }
}

/// SIGHUP: re-read the config and apply what can change in place (systemd `ExecReload=`).
async fn reload(
    hub: &Rc<Hub>,
    source: &ConfigSource,
    token: &std::cell::RefCell<crate::config::Secret>,
    commands: &smol::channel::Sender<Command>,
    on_change: &ChangeSink,
) {
    notify::reloading();
    log::info!("reloading {}", source.path.display());
    let result = Config::load(&source.path, source.given)
        .map_err(AppError::from)
        .and_then(|new| {
            let old = hub.config.borrow().clone();
            // The token is re-read too: a rotated token means a new connection.
            let (settings, rest) = ha_clients(&new)?;
            let relink = new.ha != old.ha || settings.token != *token.borrow();
            let api_token = new.read_api_token()?;
            Ok((new, relink.then_some((settings, rest)), api_token))
        });
    match result {
        Err(e) => log::error!("reload rejected, the old config stays in force: {e}"),
        Ok((new, settings, api_token)) => {
            *hub.api_token.borrow_mut() = api_token;
            let old = hub.config.borrow().clone();
            if new.http != old.http {
                log::warn!("http.listen changed; it takes effect at the next restart");
            }
            logging::set_level(&new.log.level);
            let filter = EntityFilter::new(&new.filter);
            let filter_changed = *hub.filter.borrow() != filter;
            if filter_changed {
                let changes = hub.store.borrow_mut().retain_tracked(&filter);
                *hub.filter.borrow_mut() = filter;
                on_change(&changes);
            }
            let c = &new.cache;
            hub.store
                .borrow_mut()
                .reconfigure(c.mode, c.max_entities, c.ttl, c.negative_ttl);
            *hub.config.borrow_mut() = Rc::new(new);
            hub.warn_tracked_evictions();
            if let Some((settings, rest)) = settings {
                log::info!("Home Assistant settings changed: reconnecting");
                hub.set_rest(rest);
                *token.borrow_mut() = settings.token.clone();
                let _ = commands.send(Command::Reconnect(Box::new(settings))).await;
            } else if filter_changed {
                log::info!("filter changed: resubscribing for a fresh snapshot");
                let _ = commands.send(Command::Resubscribe).await;
            }
            log::info!("reload done");
        }
    }
    hub.changed.notify(usize::MAX);
    notify::ready(&status_line(hub));
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(412), "412");
        assert_eq!(thousands(2031), "2,031");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
