//! One connection to Home Assistant: connect (TCP, TLS, WebSocket handshake, within
//! [`CONNECT_TIMEOUT`]), drive a [`Session`], and apply what it yields to the hub's mirror
//! (through [`Update`]). Reading never waits on anything slow: HA drops a client that lets
//! 4096 messages pile up (HA `websocket_api/http.py` `MAX_PENDING_MSG`).

use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::tungstenite::{Message, client::IntoClientRequest};
use smol::Timer;
use smol::future::FutureExt;
use smol::net::TcpStream;
use smol::stream::StreamExt;

use super::read_buffer::{Counted, Release};
use crate::deadline::Deadline;
use crate::hub::{Command, Hub, LinkSettings};
use crate::mirror::Update;
use crate::session::{Output, Session, ha_version_warning};
use crate::shutdown::Shutdown;
use crate::status::LinkState;

/// Budget for TCP connect + TLS + WebSocket upgrade.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest message accepted from HA. A 15k-entity snapshot is ~5 MB; leave head-room.
const MAX_MESSAGE: usize = 32 * 1024 * 1024;
/// tungstenite's read buffer: allocated once at this size, and the most read per syscall.
const READ_BUFFER: usize = 16 * 1024;
/// Most bytes queued for HA and not yet written (our frames are small: auth, commands,
/// pongs); a peer that stops reading gets disconnected instead of growing our memory.
const MAX_WRITE_BUFFER: usize = 1024 * 1024;

/// How a connection ended.
pub(super) enum End {
    /// Shutdown requested; a Close frame was sent.
    Shutdown,
    /// HA refused the token.
    AuthInvalid(String),
    /// Lost or failed; `synced` tells whether it got as far as a snapshot.
    Lost { reason: String, synced: bool },
    /// Asked to reconnect with new settings.
    Reconnect(Box<LinkSettings>),
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
    let stream = Counted::before_handshake(stream);
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
        // A peer that stops reading while it sends pings would otherwise grow the queue of
        // pongs without bound; past this the write fails and the connection is dropped.
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
}

/// The WebSocket to HA, over a stream that counts what tungstenite reads.
type Ws = async_tungstenite::WebSocketStream<Counted<Box<dyn Stream>>>;

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
    /// Stream clients want other HA event types now.
    EventTypes,
    Shutdown,
}

/// Runs one connection until it ends (see [`End`]).
pub(super) async fn run(
    hub: &Rc<Hub>,
    settings: &LinkSettings,
    commands: &smol::channel::Receiver<Command>,
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
        let c = hub.config();
        (c.heartbeat.interval, c.heartbeat.timeout)
    };
    let mut session = Session::new(
        settings.token.clone(),
        hub.ha_filter(),
        interval,
        timeout,
        Instant::now(),
    );
    let mut out = Vec::new();
    // Kept until the session is live, then subscribed with the snapshot.
    session.set_event_types(&hub.wanted_event_types(), &mut out);
    // The generation of the wanted set last given to the session: a change made while this
    // task was not listening (it yields between frames) is seen by comparing, not lost.
    let mut types_seen = hub.event_types_generation();
    let mut synced = false;
    let mut release = Release::default();
    let mut timer = Deadline::new(Instant::now());
    // As last reported to the hub.
    let mut subscriptions = 0;
    // Outstanding [`Command::Barrier`]s: the ping's id and whom to tell. Dropped with the
    // connection, which answers them too.
    let mut barriers: Vec<(u64, smol::channel::Sender<()>)> = Vec::new();
    loop {
        timer.set(
            session
                .next_wakeup()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
        );
        // The socket is polled last: a peer that keeps it always readable must not keep
        // shutdown, commands or the session's timers (auth timeout, heartbeat) from being
        // seen. `or` polls in order and stops at the first ready future.
        let event_types = hub.listen_event_types();
        let types_changed = hub.event_types_generation() != types_seen;
        let wake = async {
            if types_changed {
                return Wake::EventTypes;
            }
            shutdown.wait().await;
            Wake::Shutdown
        }
        .or(async { commands.recv().await.map_or(Wake::Timer, Wake::Command) })
        .or(async {
            event_types.await;
            Wake::EventTypes
        })
        .or(async {
            timer.elapsed().await;
            Wake::Timer
        })
        .or(async { Wake::Frame(ws.next().await) })
        .await;
        let now = Instant::now();
        if let Wake::Frame(Some(Ok(message))) = &wake {
            release.saw(message);
        }
        match wake {
            Wake::Frame(Some(Ok(Message::Text(text)))) => {
                if let Err(e) = session.handle_frame(text.as_str(), now, &mut out) {
                    hub.count_decode_error();
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
            Wake::EventTypes => {
                types_seen = hub.event_types_generation();
                session.set_event_types(&hub.wanted_event_types(), &mut out);
            }
            Wake::Command(Command::Resync) => {
                log::info!("resync requested: taking a fresh snapshot");
                session.resubscribe(hub.ha_filter(), &mut out);
            }
            Wake::Command(Command::Resubscribe) => session.resubscribe(hub.ha_filter(), &mut out),
            Wake::Command(Command::Barrier(said)) => {
                // Unauthenticated or too many outstanding: `said` is dropped, unanswered.
                if let Some(id) = session.barrier(&mut out) {
                    barriers.push((id, said));
                }
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
            let output = match Update::try_from(output) {
                Ok(update) => {
                    let snapshot = matches!(update, Update::Snapshot(_));
                    let received = match &update {
                        Update::Snapshot(event) => event.added.len(),
                        _ => 0,
                    };
                    let applied = hub.apply(update);
                    if snapshot {
                        synced = true;
                        log::info!(
                            "live: snapshot of {received} entities, {} tracked, {} changed since last sync",
                            hub.status().tracked,
                            applied.changes.len()
                        );
                        // Known only now: on HA >= 2024.4 the subscription goes out after get_states.
                        let filtered = session.filter_sent();
                        hub.update_link(|l| {
                            l.ha_filter_active = filtered;
                            l.state = LinkState::Live;
                            l.reconnect_attempts = 0;
                            l.last_error = None;
                        });
                    }
                    continue;
                }
                Err(output) => output,
            };
            match output {
                Output::Send(text) => {
                    if let Err(e) = ws.send(Message::text(text)).await {
                        return lost(format!("send failed: {e}"), synced);
                    }
                }
                Output::Authenticating { ha_version } => {
                    log::info!("Home Assistant {ha_version}: authenticating");
                    // Once per version seen, not on every reconnect.
                    if hub.link().ha_version.as_deref() != Some(&ha_version)
                        && let Some(warning) = ha_version_warning(&ha_version)
                    {
                        log::warn!("{warning}");
                    }
                    hub.update_link(|l| l.ha_version = Some(ha_version));
                }
                Output::Authenticated => {
                    log::info!("authenticated; waiting for Home Assistant to run");
                    hub.update_link(|l| l.state = LinkState::Syncing);
                }
                Output::AuthInvalid { message } => return End::AuthInvalid(message),
                Output::Syncing => {
                    let filtered = session.filter_sent();
                    hub.update_link(|l| {
                        l.state = LinkState::Syncing;
                        l.ha_filter_active = filtered;
                    });
                }
                Output::Config(config) => hub.set_ha_config(config),
                Output::Barrier(id) => barriers.retain(|(b, said)| {
                    if *b == id {
                        let _ = said.try_send(());
                    }
                    *b != id
                }),
                Output::Event { event_type, json } => hub.publish_event(&event_type, &json),
                Output::ServicesChanged(kind) => {
                    hub.count_link(|c| c.service_events += 1);
                    hub.invalidate_services();
                    log::debug!("{kind}");
                }
                Output::CommandFailed {
                    command,
                    code,
                    message,
                } => {
                    hub.count_link(|c| c.command_errors += 1);
                    log::warn!("Home Assistant refused {command}: {code}: {message}");
                }
                Output::Disconnect(reason) => return lost(reason.into(), synced),
                Output::Snapshot(_) | Output::Entities(_) | Output::LastReported(_) => {}
            }
        }
        if session.subscriptions() != subscriptions {
            subscriptions = session.subscriptions();
            hub.update_link(|l| l.subscriptions = subscriptions);
        }
        ws = release.maybe(ws, ws_config()).await;
        // One frame at a time: a peer that sends as fast as it can would otherwise keep this
        // task running and starve HTTP, D-Bus and signals on the one executor thread.
        smol::future::yield_now().await;
    }
}
