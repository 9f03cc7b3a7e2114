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

use crate::api::Api;
use crate::config::{Config, ConfigError};
use crate::hub::{Command, Hub, LinkSettings, Upstream};
use crate::persist::{self, SavePolicy};
use crate::rest::RestClient;
use crate::status::LinkState;
use crate::tls::{Roots, TlsError};
use crate::{dbus, ha, http, logging, notify, shutdown};

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
fn ha_clients(config: &Config) -> Result<(LinkSettings, RestClient, Upstream), AppError> {
    let token = config.read_token()?;
    logging::redact(&token);
    // Roots only for an https HA: parsed, the system store is ~300 KiB that a plain-http
    // HA on the LAN (HA's default) never uses.
    let roots = if config.ha.url.starts_with("https://") {
        Some(Roots::load(config.ha.ca_file.as_deref())?)
    } else {
        None
    };
    let rest = RestClient::new(&config.ha.url, token.clone(), roots.as_ref());
    let tls = roots.as_ref().map(Roots::client_config).transpose()?;
    let upstream = Upstream {
        url: config.ha.url.clone(),
        token: token.clone(),
        tls: tls.clone(),
    };
    let settings = LinkSettings {
        websocket_url: config.ha.websocket_url.clone(),
        token,
        tls,
    };
    Ok((settings, rest, upstream))
}

/// Pending connections the kernel queues for the HTTP listener (listen(2) backlog).
pub const LISTEN_BACKLOG: i32 = 1024;

/// Runs the daemon until SIGTERM/SIGINT. Blocks the calling thread.
///
/// Errors: see [`AppError`]; config and TLS problems are found before anything starts.
pub fn run(config: Config, source: ConfigSource) -> Result<(), AppError> {
    let (settings, rest, upstream) = ha_clients(&config)?;
    let listener =
        std::net::TcpListener::bind(config.http.listen).map_err(|source| AppError::Bind {
            addr: config.http.listen,
            source,
        })?;
    // std listens with a backlog of 128; a fleet of panels reconnecting after a power cut
    // (200 WebSocket clients at once, measure/fanout) overflowed it, and each dropped SYN
    // costs its client a 1 s retransmit. The kernel caps it at net.core.somaxconn (4096).
    if let Err(e) = rustix::net::listen(&listener, LISTEN_BACKLOG) {
        log::warn!("could not raise the listen backlog to {LISTEN_BACKLOG}: {e}");
    }
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
    api_token.iter().for_each(logging::redact);
    let hub = Rc::new(Hub::new(Rc::new(config), rest));
    hub.set_api_token(api_token);
    hub.set_upstream(upstream);
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
    let (bus, entity_signals) = {
        let c = hub.config();
        (c.dbus.bus, c.dbus.entity_signals)
    };
    dbus::start(
        hub.clone(),
        bus,
        entity_signals,
        &executor,
        shutdown.clone(),
    )
    .await;

    let api = Rc::new(Api::new(hub.clone()));
    let _websocket_task = executor.spawn({
        let (api, shutdown) = (api.clone(), shutdown.clone());
        async move { api.run_websocket(shutdown).await }
    });
    let http_task = executor.spawn(http::serve(
        listener,
        api,
        executor.clone(),
        shutdown.clone(),
    ));
    let save_task = executor.spawn(save_states(hub.clone(), shutdown.clone()));
    let link_task = executor.spawn(ha::run(hub.clone(), settings, shutdown.clone()));
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
            Wake::Signal(Some(Ok(Signal::Hup))) => reload(&hub, &source, &token).await,
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
    let config = hub.config();
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
    let total = saved.states.len();
    let loaded = hub.restore(saved.states, saved.saved_at);
    log::info!(
        "warm start: {loaded} states from {} (saved {}s ago; {} left out by the filter or max_entities), stale until Home Assistant answers",
        config.cache.state_file.display(),
        age.as_secs(),
        total - loaded.min(total)
    );
}

/// Saves the tracked states at most every `persist_interval_seconds` and only after a
/// change (SD-card wear), and once more at a clean stop. Only while live: states are then
/// current, so the file's time is honest about their age.
async fn save_states(hub: Rc<Hub>, shutdown: shutdown::Shutdown) {
    let (enabled, interval) = {
        let c = hub.config();
        (c.cache.persist, c.cache.persist_interval)
    };
    if !enabled {
        return;
    }
    let mut policy = SavePolicy::new(interval, Instant::now());
    let mut seen = hub.generation();
    loop {
        let listener = hub.listen_states();
        if hub.generation() != seen {
            seen = hub.generation();
            policy.mark_changed();
        }
        let stopping = shutdown.is_triggered();
        let states = hub.states_to_save();
        let live = states.is_some();
        if let Some(states) =
            states.filter(|_| policy.due(Instant::now()) || (stopping && policy.pending()))
        {
            let mark = policy.mark();
            let bytes = persist::encode(&states, SystemTime::now());
            drop(states);
            let path = hub.config().cache.state_file.clone();
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

/// Sends `READY=1` once live, and `STATUS=` whenever the line changes (coalesced).
async fn report_status(hub: Rc<Hub>) {
    let mut ready = false;
    let mut last = String::new();
    loop {
        let listener = hub.listen_changed();
        let status = hub.status();
        let line = status.line();
        if !ready && status.live() {
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
) {
    notify::reloading();
    log::info!("reloading {}", source.path.display());
    let result = Config::load(&source.path, source.given)
        .map_err(AppError::from)
        .and_then(|new| {
            let old = hub.config();
            // The token is re-read too: a rotated token means a new connection.
            let (settings, rest, upstream) = ha_clients(&new)?;
            let relink = new.ha != old.ha || settings.token != *token.borrow();
            let api_token = new.read_api_token()?;
            api_token.iter().for_each(logging::redact);
            Ok((new, relink.then_some((settings, rest, upstream)), api_token))
        });
    match result {
        Err(e) => log::error!("reload rejected, the old config stays in force: {e}"),
        Ok((new, settings, api_token)) => {
            hub.set_api_token(api_token);
            if new.http.listen != hub.config().http.listen {
                log::warn!("http.listen changed; it takes effect at the next restart");
            }
            logging::set_level(&new.log.level);
            let filter_changed = hub.reconfigure(new);
            if let Some((settings, rest, upstream)) = settings {
                log::info!("Home Assistant settings changed: reconnecting");
                hub.set_rest(rest);
                hub.set_upstream(upstream);
                *token.borrow_mut() = settings.token.clone();
                hub.command(Command::Reconnect(Box::new(settings))).await;
            } else if filter_changed {
                log::info!("filter changed: resubscribing for a fresh snapshot");
                hub.command(Command::Resubscribe).await;
            }
            log::info!("reload done");
        }
    }
    hub.notify_changed();
    notify::ready(&hub.status().line());
}
