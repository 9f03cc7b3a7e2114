//! The WebSocket link to Home Assistant: connect (TCP, TLS, WebSocket handshake, each with a
//! timeout), drive a [`Session`], apply what it yields to the [`Hub`], and reconnect with
//! exponential back-off and jitter. Reading never waits on anything slow: HA drops a client
//! that lets 4096 messages pile up (HA `websocket_api/http.py` `MAX_PENDING_MSG`).

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::tungstenite::{Message, client::IntoClientRequest};
use smol::Timer;
use smol::future::FutureExt;
use smol::net::TcpStream;
use smol::stream::StreamExt;

use crate::config::Secret;
use crate::hub::{Counters, Hub, LinkState};
use crate::session::{Output, Session};
use crate::shutdown::Shutdown;
use crate::store::Change;

/// Budget for TCP connect + TLS + WebSocket upgrade.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest message accepted from HA. A 15k-entity snapshot is ~5 MB; leave head-room.
const MAX_MESSAGE: usize = 32 * 1024 * 1024;
/// tungstenite's read buffer: allocated once at this size, and the most read per syscall.
const READ_BUFFER: usize = 16 * 1024;

/// A request to the link task.
#[derive(Debug, Clone)]
pub enum Command {
    /// Take a fresh snapshot (D-Bus `Resync()`); reconnects if the link is down.
    Resync,
    /// The HA-side filter changed (config reload): resubscribe with it.
    Resubscribe,
    /// URL, token or CA changed (config reload): reconnect with the new settings.
    Reconnect(Box<LinkSettings>),
}

/// What a connection needs that may change on reload.
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

/// How often one rejected token is tried again before hass-edge waits for a new one. HA
/// counts every `auth_invalid` toward its IP ban (`http.login_attempts_threshold`, e.g. 5)
/// and forgets the count only on a successful login (HA `components/http/ban.py`), so any
/// fixed retry period would end in a ban: 1 + 2 retries stays below a threshold of 5.
pub const SAME_TOKEN_RETRIES: u32 = 2;

/// Receives the changes each HA event made to tracked entities (SSE, D-Bus signals).
pub type ChangeSink = Rc<dyn Fn(&[Change])>;

/// How a connection ended.
enum End {
    /// Shutdown requested; a Close frame was sent.
    Shutdown,
    /// HA refused the token.
    AuthInvalid(String),
    /// Lost or failed; `synced` tells whether it got as far as a snapshot.
    Lost { reason: String, synced: bool },
    /// Asked to reconnect with new settings.
    Reconnect(Box<LinkSettings>),
}

/// Back-off before attempt `attempt` (1-based): 2^attempt s plus 0–10 % jitter, at most
/// `max_delay`. `jitter` is in `0.0..1.0`.
pub fn backoff_delay(attempt: u32, max_delay: Duration, jitter: f64) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.min(20));
    base.mul_f64(1.0 + 0.1 * jitter.clamp(0.0, 1.0))
        .min(max_delay)
}

/// Runs the link until `shutdown` resolves. Returns `Err` only when `max_attempts` is used up.
pub async fn run(
    hub: Rc<Hub>,
    mut settings: LinkSettings,
    commands: smol::channel::Receiver<Command>,
    on_change: ChangeSink,
    shutdown: Shutdown,
) -> Result<(), String> {
    let mut attempts: u32 = 0;
    // Failures of the current token (see SAME_TOKEN_RETRIES).
    let mut token_failures: u32 = 0;
    loop {
        if token_failures > SAME_TOKEN_RETRIES {
            // Hold: re-read the token every max_delay; try again only once it changed.
            let max_delay = hub.config.borrow().reconnect.max_delay;
            // Read first: a borrow held across the pause below would make a reload's
            // borrow_mut panic.
            let token = hub.config.borrow().read_token();
            match token {
                Ok(token) if token != settings.token => {
                    log::info!("the access token changed; trying it");
                    settings.token = token.clone();
                    hub.replace_rest_token(token);
                    token_failures = 0;
                }
                _ => {
                    match pause(max_delay, &commands, &shutdown).await {
                        Wake::Command(Command::Reconnect(new)) => {
                            settings = *new;
                            token_failures = 0;
                        }
                        Wake::Shutdown => return Ok(()),
                        _ => {}
                    }
                    continue;
                }
            }
        }
        hub.update_link(|l| l.state = LinkState::Connecting);
        let end = connect_and_run(&hub, &settings, &commands, &on_change, &shutdown).await;
        let (max_attempts, max_delay) = {
            let c = hub.config.borrow();
            (c.reconnect.max_attempts, c.reconnect.max_delay)
        };
        let delay = match end {
            End::Shutdown => return Ok(()),
            End::Reconnect(new) => {
                settings = *new;
                hub.link_lost("reconnecting with new settings");
                attempts = 0;
                token_failures = 0;
                continue;
            }
            End::AuthInvalid(message) => {
                Counters::add(&hub.counters.auth_failures, 1);
                Counters::add(&hub.counters.reconnects, 1);
                attempts = attempts.saturating_add(1);
                token_failures += 1;
                let delay = max_delay.mul_f64(1.0 + 0.1 * fastrand::f64());
                if token_failures > SAME_TOKEN_RETRIES {
                    log::error!(
                        "Home Assistant rejected the access token {token_failures} times ({message}); not sending it again (HA would ban this address): write a valid token and restart or reload hass-edge"
                    );
                } else {
                    log::error!(
                        "Home Assistant rejected the access token ({message}); next attempt in {}s",
                        delay.as_secs()
                    );
                }
                hub.link_lost(&format!("auth_invalid: {message}"));
                hub.update_link(|l| {
                    l.state = LinkState::AuthFailed;
                    l.reconnect_attempts = attempts;
                });
                delay
            }
            End::Lost { reason, synced } => {
                Counters::add(&hub.counters.reconnects, 1);
                if synced {
                    attempts = 0;
                    token_failures = 0;
                }
                attempts = attempts.saturating_add(1);
                let delay = backoff_delay(attempts, max_delay, fastrand::f64());
                log::warn!(
                    "connection to Home Assistant lost: {reason}; attempt {attempts} in {:.1}s",
                    delay.as_secs_f64()
                );
                hub.link_lost(&reason);
                hub.update_link(|l| {
                    l.state = LinkState::Backoff;
                    l.reconnect_attempts = attempts;
                });
                delay
            }
        };
        if max_attempts > 0 && attempts >= max_attempts {
            return Err(format!(
                "gave up after {attempts} failed attempts to reach Home Assistant (reconnect.max_attempts)"
            ));
        }
        // Wait out the back-off; a Resync or new settings cut it short.
        match pause(delay, &commands, &shutdown).await {
            Wake::Command(Command::Reconnect(new)) => settings = *new,
            Wake::Shutdown => return Ok(()),
            _ => {}
        }
    }
}

/// Waits `delay`, or until a command arrives or shutdown starts, whichever is first.
async fn pause(
    delay: Duration,
    commands: &smol::channel::Receiver<Command>,
    shutdown: &Shutdown,
) -> Wake {
    async {
        Timer::after(delay).await;
        Wake::Timer
    }
    .or(async { commands.recv().await.map_or(Wake::Timer, Wake::Command) })
    .or(async {
        shutdown.wait().await;
        Wake::Shutdown
    })
    .await
}

/// Opens TCP (+TLS) and upgrades to a WebSocket.
async fn open(settings: &LinkSettings) -> Result<Ws, String> {
    let request = settings
        .websocket_url
        .as_str()
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let uri = request.uri().clone();
    let host = uri
        .host()
        .ok_or("the URL has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tls = uri.scheme_str() == Some("wss");
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
    tcp.set_nodelay(true).ok();
    let stream: Box<dyn Stream> = if tls {
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("server name {host}: {e}"))?;
        let tls = settings.tls.clone().ok_or("wss URL without a TLS config")?;
        let connector = futures_rustls::TlsConnector::from(tls);
        Box::new(
            connector
                .connect(name, tcp)
                .await
                .map_err(|e| tls_error(&host, &e))?,
        )
    } else {
        Box::new(tcp)
    };
    let stream = Counted {
        inner: stream,
        held: Vec::new(),
        head_matched: 0,
        read: 0,
    };
    let (ws, _) = async_tungstenite::client_async_with_config(request, stream, Some(ws_config()))
        .await
        .map_err(|e| format!("WebSocket handshake: {e}"))?;
    Ok(ws)
}

/// tungstenite's settings for the link. It allocates `read_buffer_size` up front (128 KiB by
/// default) and reads at most that much per syscall; HA's frames are a few KiB apart from
/// the snapshots.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// The WebSocket to HA, over a stream that counts what tungstenite reads.
type Ws = async_tungstenite::WebSocketStream<Counted<Box<dyn Stream>>>;

/// A stream that counts the WebSocket bytes tungstenite reads through it (see [`Release`]).
/// During the upgrade it hands on nothing past the end of the HTTP response head, so that
/// no frame byte is read by the handshake (which would pass it on uncounted).
struct Counted<S> {
    inner: S,
    /// Bytes read from `inner` and not handed on yet (only around the end of the head).
    held: Vec<u8>,
    /// How much of `\r\n\r\n` the bytes handed on end with; 4 once the head is through.
    head_matched: u8,
    /// Bytes handed on after the response head.
    read: u64,
}

impl<S: smol::io::AsyncRead + Unpin> smol::io::AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.held.is_empty() {
            if this.head_matched == 4 {
                let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
                if let std::task::Poll::Ready(Ok(n)) = &polled {
                    this.read += *n as u64;
                }
                return polled;
            }
            let mut chunk = [0u8; 1024];
            let n =
                std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut chunk))?;
            if n == 0 {
                return std::task::Poll::Ready(Ok(0));
            }
            this.held.extend_from_slice(&chunk[..n]);
        }
        let mut n = this.held.len().min(buf.len());
        if this.head_matched < 4 {
            for (i, b) in this.held[..n].iter().enumerate() {
                this.head_matched = match (this.head_matched, b) {
                    (2, b'\r') => 3,
                    (_, b'\r') => 1,
                    (1, b'\n') => 2,
                    (3, b'\n') => 4,
                    _ => 0,
                };
                if this.head_matched == 4 {
                    n = i + 1;
                    break;
                }
            }
        } else {
            this.read += n as u64;
        }
        buf[..n].copy_from_slice(&this.held[..n]);
        this.held.drain(..n);
        std::task::Poll::Ready(Ok(n))
    }
}

impl<S: smol::io::AsyncWrite + Unpin> smol::io::AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// Frees tungstenite's read buffer after a large message.
///
/// tungstenite reads a frame into one `BytesMut` that never shrinks: after HA's snapshot
/// (447 KB for `get_states` at 1,000 entities, ≈ 9 MB at 20,000) the connection held that
/// much for its whole life (tungstenite-rs#480). It has no call to shrink it, so the
/// WebSocket is rebuilt around the same stream (`into_inner` + `from_raw_socket`) once its
/// buffer is provably empty: the frames tungstenite returned add up to at least the bytes
/// it read (headers counted at their minimal size, so the sum is a lower bound of what it
/// consumed). Not right after a ping, whose pong tungstenite sends on its next read.
#[derive(Debug, Default)]
struct Release {
    /// Minimal wire size of every frame returned so far.
    framed: u64,
    /// A message larger than [`RELEASE_ABOVE`] came since the last rebuild.
    pending: bool,
    /// The last message was a ping.
    after_ping: bool,
}

/// Messages larger than this (bytes) have their buffer released.
const RELEASE_ABOVE: usize = 4 * READ_BUFFER;

impl Release {
    fn saw(&mut self, message: &Message) {
        let payload = message.len();
        // RFC 6455 §5.2: 2 bytes, plus 2 or 8 of extended length; server frames are unmasked.
        let header = 2 + if payload > 65535 {
            8
        } else if payload > 125 {
            2
        } else {
            0
        };
        self.framed += (header + payload) as u64;
        self.pending |= payload > RELEASE_ABOVE;
        self.after_ping = matches!(message, Message::Ping(_));
    }

    /// Rebuilds `ws` if a large message left its buffer grown and the buffer is empty now.
    async fn maybe(&mut self, ws: Ws) -> Ws {
        if !self.pending || self.after_ping || ws.get_ref().read != self.framed {
            return ws;
        }
        self.pending = false;
        log::debug!("releasing the WebSocket read buffer after a large message");
        async_tungstenite::WebSocketStream::from_raw_socket(
            ws.into_inner(),
            async_tungstenite::tungstenite::protocol::Role::Client,
            Some(ws_config()),
        )
        .await
    }
}

/// The message for a failed TLS handshake, with the fix for the common self-signed case:
/// `openssl req -x509` (the recipe in HA's docs) marks the certificate `CA:TRUE`, which
/// webpki refuses as a server's own certificate (`CaUsedAsEndEntity`, rustls/webpki#205).
fn tls_error(host: &str, e: &std::io::Error) -> String {
    let text = e.to_string();
    if text.contains("CaUsedAsEndEntity") {
        format!(
            "TLS with {host}: {text}: HA's certificate is a CA certificate (CA:TRUE, what `openssl req -x509` makes by default); \
             make it with `-addext basicConstraints=critical,CA:FALSE`, or sign it with a CA and put that CA in ha.ca_file"
        )
    } else {
        format!("TLS with {host}: {text}")
    }
}

/// A byte stream the WebSocket can run over (plain TCP or TLS).
pub trait Stream: smol::io::AsyncRead + smol::io::AsyncWrite + Unpin {}
impl<T: smol::io::AsyncRead + smol::io::AsyncWrite + Unpin> Stream for T {}

enum Wake {
    Frame(Option<Result<Message, async_tungstenite::tungstenite::Error>>),
    Timer,
    Command(Command),
    Shutdown,
}

async fn connect_and_run(
    hub: &Rc<Hub>,
    settings: &LinkSettings,
    commands: &smol::channel::Receiver<Command>,
    on_change: &ChangeSink,
    shutdown: &Shutdown,
) -> End {
    let lost = |reason: String, synced: bool| End::Lost { reason, synced };
    let opened = async { Some(open(settings).await) }
        .or(async {
            Timer::after(CONNECT_TIMEOUT).await;
            Some(Err(format!(
                "no connection within {}s",
                CONNECT_TIMEOUT.as_secs()
            )))
        })
        .or(async {
            shutdown.wait().await;
            None
        })
        .await;
    let mut ws = match opened {
        None => return End::Shutdown,
        Some(Ok(ws)) => ws,
        Some(Err(e)) => return lost(e, false),
    };
    log::info!("connected to {}", settings.websocket_url);
    hub.update_link(|l| {
        l.state = LinkState::Authenticating;
        l.last_connected = Some(SystemTime::now());
    });

    let (interval, timeout) = {
        let c = hub.config.borrow();
        (c.heartbeat.interval, c.heartbeat.timeout)
    };
    let ha_filter = hub.filter.borrow().ha_filter();
    let mut session = Session::new(
        settings.token.clone(),
        ha_filter,
        interval,
        timeout,
        Instant::now(),
    );
    let mut out = Vec::new();
    let mut synced = false;
    let mut release = Release::default();
    loop {
        let deadline = session
            .next_wakeup()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let wake = async { Wake::Frame(ws.next().await) }
            .or(async {
                Timer::at(deadline).await;
                Wake::Timer
            })
            .or(async { commands.recv().await.map_or(Wake::Timer, Wake::Command) })
            .or(async {
                shutdown.wait().await;
                Wake::Shutdown
            })
            .await;
        let now = Instant::now();
        if let Wake::Frame(Some(Ok(message))) = &wake {
            release.saw(message);
        }
        match wake {
            Wake::Frame(Some(Ok(Message::Text(text)))) => {
                if let Err(e) = session.handle_frame(text.as_str(), now, &mut out) {
                    Counters::add(&hub.counters.decode_errors, 1);
                    log::warn!("{e}");
                }
            }
            Wake::Frame(Some(Ok(Message::Close(frame)))) => {
                let why = frame
                    .map(|f| format!("{} {}", f.code, f.reason))
                    .unwrap_or_default();
                return lost(
                    format!("Home Assistant closed the connection {why}")
                        .trim_end()
                        .to_owned(),
                    synced,
                );
            }
            // Protocol pings are answered by tungstenite; binary frames carry nothing for us.
            Wake::Frame(Some(Ok(_))) => {}
            Wake::Frame(Some(Err(e))) => return lost(format!("WebSocket error: {e}"), synced),
            Wake::Frame(None) => return lost("connection closed".into(), synced),
            Wake::Timer => session.poll_timers(now, &mut out),
            Wake::Command(Command::Resync) => {
                log::info!("resync requested: taking a fresh snapshot");
                session.resubscribe(hub.filter.borrow().ha_filter(), &mut out);
            }
            Wake::Command(Command::Resubscribe) => {
                session.resubscribe(hub.filter.borrow().ha_filter(), &mut out)
            }
            Wake::Command(Command::Reconnect(new)) => {
                let _ = ws.close(None).await;
                return End::Reconnect(new);
            }
            Wake::Shutdown => {
                // A clean Close (RFC 6455 §5.5.1), bounded so a dead peer cannot hold us up.
                let _ = ws
                    .close(None)
                    .or(async {
                        Timer::after(Duration::from_millis(500)).await;
                        Ok(())
                    })
                    .await;
                return End::Shutdown;
            }
        }
        for output in out.drain(..) {
            match output {
                Output::Send(text) => {
                    if let Err(e) = ws.send(Message::text(text)).await {
                        return lost(format!("send failed: {e}"), synced);
                    }
                }
                Output::Authenticating { ha_version } => {
                    log::info!("Home Assistant {ha_version}: authenticating");
                    hub.update_link(|l| l.ha_version = Some(ha_version));
                }
                Output::Authenticated => {
                    log::info!("authenticated; waiting for Home Assistant to run");
                    hub.update_link(|l| {
                        l.state = LinkState::Syncing;
                        l.subscriptions = 1;
                    });
                }
                Output::AuthInvalid { message } => return End::AuthInvalid(message),
                Output::Syncing => {
                    let filtered = session.filter_sent();
                    hub.update_link(|l| {
                        l.state = LinkState::Syncing;
                        l.subscriptions = 4;
                        l.ha_filter_active = filtered;
                    });
                }
                Output::Snapshot(event) => {
                    let n = event.added.len();
                    let changes = hub.apply_snapshot(event);
                    synced = true;
                    let tracked = hub.store.borrow().tracked_len();
                    log::info!(
                        "live: snapshot of {n} entities, {tracked} tracked, {} changed since last sync",
                        changes.len()
                    );
                    // Known only now: on HA >= 2024.4 the subscription goes out after get_states.
                    let filtered = session.filter_sent();
                    hub.update_link(|l| {
                        l.ha_filter_active = filtered;
                        l.state = LinkState::Live;
                        l.reconnect_attempts = 0;
                        l.last_error = None;
                    });
                    on_change(&changes);
                }
                Output::Entities(event) => {
                    let changes = hub.apply_entities(event);
                    if !changes.is_empty() {
                        on_change(&changes);
                    }
                }
                Output::LastReported(rows) => {
                    let mut store = hub.store.borrow_mut();
                    for (entity_id, last_updated, last_reported) in rows {
                        store.set_last_reported(&entity_id, last_updated, last_reported);
                    }
                }
                Output::ServicesChanged(kind) => {
                    Counters::add(&hub.counters.service_events, 1);
                    hub.invalidate_services();
                    log::debug!("{kind}");
                    hub.changed.notify(usize::MAX);
                }
                Output::CommandFailed {
                    command,
                    code,
                    message,
                } => {
                    Counters::add(&hub.counters.command_errors, 1);
                    log::warn!("Home Assistant refused {command}: {code}: {message}");
                }
                Output::Disconnect(reason) => return lost(reason.into(), synced),
            }
        }
        ws = release.maybe(ws).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_bounded_jitter_and_cap() {
        let max = Duration::from_secs(60);
        assert_eq!(backoff_delay(1, max, 0.0), Duration::from_secs(2));
        assert_eq!(backoff_delay(3, max, 0.0), Duration::from_secs(8));
        assert_eq!(backoff_delay(3, max, 1.0), Duration::from_millis(8800));
        assert_eq!(backoff_delay(6, max, 0.5), max);
        assert_eq!(backoff_delay(40, max, 0.0), max);
    }
}
