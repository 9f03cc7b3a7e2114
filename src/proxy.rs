//! Forwarding to Home Assistant (issue 15): every request hass-edge does not answer itself
//! goes to HA — any path and method, the frontend included — and HA's answer comes back,
//! streamed both ways and never held whole. A WebSocket handshake (`Upgrade`, RFC 9110
//! §7.8) becomes a tunnel once HA answers `101`.
//!
//! One request per upstream connection (`Connection: close`): no pool to go stale, and a
//! connect to HA on the LAN costs far less than the request. Hop-by-hop headers are dropped
//! both ways (RFC 9110 §7.6.1: `Connection` and the fields it names, `Keep-Alive`,
//! `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`); the body is framed
//! anew for the client: HA's `Content-Length` kept, anything else sent chunked (RFC 9112
//! §7.1) to HTTP/1.1 clients and close-delimited to HTTP/1.0 ones.
//!
//! Who decides what a request may do (credentials, read-only mode, cross-site rules) is the
//! caller's ([`crate::api`]); this module carries out a [`Plan`].
//!
//! Limits: [`CONNECT_TIMEOUT`], [`ANSWER_TIMEOUT`], [`BODY_IDLE_TIMEOUT`],
//! [`MAX_FORWARDS`] requests and [`MAX_TUNNELS`] tunnels at once (503 beyond), a response
//! head of at most [`MAX_RESPONSE_HEAD`] bytes (502 beyond). HA unreachable: 502 at once in
//! HA's error shape `{"message": …}`.

use std::cell::Cell;
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Duration;

use smol::Timer;
use smol::future::FutureExt;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::TcpStream;

use crate::assets::{AssetCache, AssetWriter, Hit};
use crate::http::{CHUNK, Exchange, Response};
use crate::hub::Upstream;
use crate::status::ForwardStatus;

/// Budget for TCP connect (+ TLS handshake) to HA.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Budget from the request sent until HA's response head (a template render or a history
/// query can take a while; nothing HA answers takes longer).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest pause between two pieces of a response body (a camera stream sends a frame a
/// second; a stalled HA must not hold a client forever).
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Requests forwarded at once; more are answered 503.
pub const MAX_FORWARDS: usize = 64;
/// WebSocket tunnels open at once; more are answered 503 (HA's frontend opens one per tab).
pub const MAX_TUNNELS: usize = 64;
/// Largest response head accepted from HA, bytes.
pub const MAX_RESPONSE_HEAD: usize = 32 * 1024;
/// Most headers in a response from HA.
const MAX_RESPONSE_HEADERS: usize = 64;
/// Largest answer kept to update the store after a write ([`Capture`]), bytes.
pub const MAX_CAPTURE: usize = 4 * 1024 * 1024;

/// Hop-by-hop fields (RFC 9110 §7.6.1), plus those this module sets itself.
const DROPPED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "content-length",
    "host",
    "expect",
];

/// Dropped from requests only: what a client must not say about itself.
const DROPPED_FROM_REQUESTS: &[&str] = &[
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

/// Which credentials the forwarded request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials {
    /// The client's own, unchanged (`Authorization`, cookies, an `/auth/*` flow): HA
    /// decides.
    Client,
    /// hass-edge's HA token replaces whatever `Authorization` the client sent (its hass-edge
    /// API token, which never reaches HA).
    Ours,
    /// None: the client's `Authorization` (hass-edge's API token) is removed.
    Stripped,
}

/// What to write into the store from HA's answer to a forwarded write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capture {
    /// `POST /api/states/{entity_id}`: the answer is the new state.
    State,
    /// `DELETE /api/states/{entity_id}`: the entity is gone.
    Removed(String),
    /// `POST /api/services/{domain}/{service}`: the changed states (a list, or
    /// `{"changed_states": […], "service_response": …}` with `?return_response`).
    ServiceCall,
}

/// How to forward one request.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Which credentials go to HA.
    pub credentials: Credentials,
    /// Send `X-Forwarded-For`/`-Proto`/`-Host` (config `http.x_forwarded_for`).
    pub forwarded_headers: bool,
    /// A write whose answer updates the store. Its request goes without `Accept-Encoding`:
    /// the answer must be readable here, not gzip.
    pub capture: Option<Capture>,
    /// Headers added to HA's answer, replacing HA's own of the same names (CORS for an
    /// allowed origin).
    pub response_headers: Vec<(&'static str, String)>,
    /// For a WebSocket tunnel: what to do when the client authenticates with hass-edge's
    /// API token.
    pub ws_auth: Option<WsAuth>,
}

/// A WebSocket tunnel's client may authenticate (HA's in-band `auth` message,
/// `websocket_api/auth.py`) with hass-edge's API token. Passed on as it is, HA would refuse
/// it and count a failed login against hass-edge's address (HA's `ip_ban_enabled` bans it
/// after a few). So the token is swapped for hass-edge's HA token, or, in read-only mode,
/// the client is answered `auth_invalid` by hass-edge and nothing reaches HA.
#[derive(Clone)]
pub struct WsAuth {
    /// hass-edge's API token.
    pub api_token: crate::config::Secret,
    /// Swap it for hass-edge's HA token (`false`: refuse, read-only mode).
    pub swap: bool,
}

impl std::fmt::Debug for WsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsAuth")
            .field("swap", &self.swap)
            .finish_non_exhaustive()
    }
}

/// How a forward ended, for counting and for the store.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The status sent to the client (HA's, or ours: 502/503/504).
    pub status: u16,
    /// Whether the connection may serve another request.
    pub keep_alive: bool,
    /// HA's answer to a [`Capture`] write, when it was 2xx and at most [`MAX_CAPTURE`].
    pub captured: Option<Vec<u8>>,
    /// A WebSocket tunnel was opened (and has now closed).
    pub tunnel: bool,
}

/// Counts of forwards in flight, shared by every connection, and the frontend assets kept
/// on disk.
#[derive(Debug, Default)]
pub struct Proxy {
    forwards: Cell<usize>,
    tunnels: Cell<usize>,
    assets: Option<AssetCache>,
}

/// Decrements a gauge when dropped.
struct Slot<'a>(&'a Cell<usize>);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

fn take_slot(gauge: &Cell<usize>, max: usize) -> Option<Slot<'_>> {
    (gauge.get() < max).then(|| {
        gauge.set(gauge.get() + 1);
        Slot(gauge)
    })
}

/// A byte stream to HA (plain TCP or TLS).
/// A byte stream to HA: plain TCP or TLS.
pub trait Stream: smol::io::AsyncRead + smol::io::AsyncWrite + Unpin {}
impl<T: smol::io::AsyncRead + smol::io::AsyncWrite + Unpin> Stream for T {}

/// HA's address, split from `ha.url`.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    tls: bool,
    host: String,
    port: u16,
    /// `host[:port]` as written in the URL (the `Host` HA expects).
    authority: String,
    /// Path prefix without a trailing `/` (usually empty).
    prefix: String,
}

fn target(url: &str) -> Result<Target, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err("ha.url is neither http:// nor https://".into());
    };
    let (authority, prefix) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("bad port in {authority}"))?,
        ),
        _ => (authority, if tls { 443 } else { 80 }),
    };
    Ok(Target {
        tls,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
        authority: authority.to_owned(),
        prefix: prefix.trim_end_matches('/').to_owned(),
    })
}

/// Opens a connection to HA (`upstream.url`, TLS for `https`) within [`CONNECT_TIMEOUT`],
/// and gives the URL of HA's WebSocket API on it (`ws://host:port/prefix/api/websocket`,
/// the scheme only for the handshake's request line and `Host`).
///
/// Errors: the URL, connect, TLS or the timeout, as text for the log.
pub async fn connect_websocket(upstream: &Upstream) -> Result<(Box<dyn Stream>, String), String> {
    let target = target(&upstream.url)?;
    let stream = connect(upstream, &target).await?;
    let scheme = if target.tls { "wss" } else { "ws" };
    Ok((
        stream,
        format!(
            "{scheme}://{}{}/api/websocket",
            target.authority, target.prefix
        ),
    ))
}

/// Opens a connection to HA within [`CONNECT_TIMEOUT`].
async fn connect(upstream: &Upstream, target: &Target) -> Result<Box<dyn Stream>, String> {
    let open = async {
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| format!("connect to {}:{}: {e}", target.host, target.port))?;
        tcp.set_nodelay(true).ok();
        if !target.tls {
            return Ok(Box::new(tcp) as Box<dyn Stream>);
        }
        let name = rustls::pki_types::ServerName::try_from(target.host.clone())
            .map_err(|e| format!("server name {}: {e}", target.host))?;
        let tls = upstream
            .tls
            .clone()
            .ok_or("https URL without a TLS config")?;
        let stream = futures_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", target.host))?;
        Ok(Box::new(stream) as Box<dyn Stream>)
    };
    open.or(async {
        Timer::after(CONNECT_TIMEOUT).await;
        Err(format!(
            "no connection to {} within {}s",
            target.authority,
            CONNECT_TIMEOUT.as_secs()
        ))
    })
    .await
}

/// The request head sent to HA.
fn request_head(
    x: &Exchange<'_>,
    upstream: &Upstream,
    target: &Target,
    plan: &Plan,
) -> Result<Vec<u8>, String> {
    let mut headers = [httparse::EMPTY_HEADER; crate::http::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(&x.raw_head).map_err(|e| e.to_string())?;
    let named_by_connection: Vec<String> = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| {
            String::from_utf8_lossy(h.value)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut out = Vec::with_capacity(x.raw_head.len() + 256);
    let _ = write!(
        Writer(&mut out),
        "{} {}{} HTTP/1.1\r\nHost: {}\r\n",
        x.head.method,
        target.prefix,
        x.head.target,
        target.authority
    );
    let mut upgrade_value = None;
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if name == "upgrade" {
            upgrade_value = Some(h.value);
        }
        let drop = DROPPED.contains(&name.as_str())
            || DROPPED_FROM_REQUESTS.contains(&name.as_str())
            || (name != "upgrade" && named_by_connection.contains(&name))
            || (name == "authorization" && plan.credentials != Credentials::Client)
            || (name == "accept-encoding" && plan.capture.is_some());
        if drop {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if plan.credentials == Credentials::Ours {
        let _ = write!(
            Writer(&mut out),
            "Authorization: Bearer {}\r\n",
            upstream.token.expose()
        );
    }
    if plan.forwarded_headers {
        // HA reads one address (forwarded.py); a v4-mapped v6 peer is sent as plain IPv4.
        let ip = match x.peer.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        };
        let _ = write!(
            Writer(&mut out),
            "X-Forwarded-For: {ip}\r\nX-Forwarded-Proto: http\r\n"
        );
        if let Some(host) = x.head.host.as_deref().filter(|h| !h.is_empty()) {
            let _ = write!(Writer(&mut out), "X-Forwarded-Host: {host}\r\n");
        }
    }
    if x.head.content_length > 0 || matches!(x.head.method.as_str(), "POST" | "PUT" | "PATCH") {
        let _ = write!(
            Writer(&mut out),
            "Content-Length: {}\r\n",
            x.head.content_length
        );
    }
    match upgrade_value.filter(|_| x.head.upgrade) {
        Some(value) => {
            out.extend_from_slice(b"Connection: Upgrade\r\nUpgrade: ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n\r\n");
        }
        None => out.extend_from_slice(b"Connection: close\r\n\r\n"),
    }
    Ok(out)
}

/// `fmt::Write` into a byte vector.
struct Writer<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// HA's response head, as read.
struct ResponseHead {
    status: u16,
    reason: String,
    /// End-to-end headers, in order.
    headers: Vec<(String, Vec<u8>)>,
    framing: Framing,
    /// The `Content-Length` HA announced for a body it did not send (the answer to a
    /// `HEAD`), passed on as it is.
    announced: Option<u64>,
    /// Bytes read past the head.
    rest: Vec<u8>,
}

/// How HA's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    Close,
}

/// Reads HA's response head (skipping interim 1xx answers other than 101).
async fn read_response_head(
    up: &mut Box<dyn Stream>,
    method: &str,
) -> Result<ResponseHead, String> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let status = resp.code.unwrap_or(502);
                if (100..200).contains(&status) && status != 101 {
                    buf.drain(..n);
                    continue;
                }
                let mut framing = Framing::Close;
                let mut connection_named: Vec<String> = Vec::new();
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("connection") {
                        connection_named.extend(
                            String::from_utf8_lossy(h.value)
                                .split(',')
                                .map(|t| t.trim().to_ascii_lowercase()),
                        );
                    }
                }
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        framing = Framing::Chunked;
                    } else if h.name.eq_ignore_ascii_case("content-length")
                        && framing != Framing::Chunked
                    {
                        let v = std::str::from_utf8(h.value).unwrap_or("").trim();
                        framing = Framing::Length(
                            v.parse()
                                .map_err(|_| format!("bad Content-Length from HA: {v:?}"))?,
                        );
                    }
                }
                let announced = match framing {
                    Framing::Length(n) if method == "HEAD" => Some(n),
                    _ => None,
                };
                if method == "HEAD" || status == 204 || status == 304 || status == 101 {
                    framing = Framing::None;
                }
                let headers = resp
                    .headers
                    .iter()
                    .filter(|h| {
                        let name = h.name.to_ascii_lowercase();
                        let hop = DROPPED.contains(&name.as_str())
                            || connection_named.contains(&name)
                            || name == "date";
                        // A 101 keeps the handshake's own fields.
                        !hop || (status == 101 && (name == "upgrade" || name == "connection"))
                    })
                    .map(|h| (h.name.to_owned(), h.value.to_vec()))
                    .collect();
                let reason = resp.reason.unwrap_or("").to_owned();
                return Ok(ResponseHead {
                    status,
                    reason,
                    headers,
                    framing,
                    announced,
                    rest: buf[n..].to_vec(),
                });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(format!("response head over {MAX_RESPONSE_HEAD} bytes"));
            }
            Err(e) => return Err(format!("malformed response: {e}")),
        }
        let mut chunk = [0u8; 4096];
        let n = up.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("HA closed the connection before answering".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Decodes HA's body into its data, piece by piece.
struct BodyReader {
    framing: Framing,
    /// Bytes read, not yet decoded.
    buf: Vec<u8>,
    /// Data left in the current chunk (chunked) or in the body (length).
    left: u64,
    /// Chunked: the CRLF after a chunk's data is still to come.
    crlf: bool,
    /// Chunked: the last chunk was read; trailers follow.
    trailers: bool,
    done: bool,
}

impl BodyReader {
    fn new(framing: Framing, rest: Vec<u8>) -> BodyReader {
        let left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        BodyReader {
            done: framing == Framing::None || left == 0 && matches!(framing, Framing::Length(_)),
            framing,
            buf: rest,
            left,
            crlf: false,
            trailers: false,
        }
    }

    /// Appends the next data to `out`; `Ok(false)` once the body is complete.
    async fn next(&mut self, up: &mut Box<dyn Stream>, out: &mut Vec<u8>) -> Result<bool, String> {
        loop {
            if self.done {
                return Ok(false);
            }
            let progressed = match self.framing {
                Framing::None => {
                    self.done = true;
                    return Ok(false);
                }
                Framing::Length(_) | Framing::Close => {
                    if self.buf.is_empty() {
                        false
                    } else {
                        let n = match self.framing {
                            Framing::Length(_) => (self.left.min(self.buf.len() as u64)) as usize,
                            _ => self.buf.len(),
                        };
                        out.extend(self.buf.drain(..n));
                        if let Framing::Length(_) = self.framing {
                            self.left -= n as u64;
                            self.done = self.left == 0;
                        }
                        return Ok(true);
                    }
                }
                Framing::Chunked => self.decode_chunked(out)?,
            };
            if progressed {
                return Ok(!self.done || !out.is_empty());
            }
            let mut chunk = vec![0u8; CHUNK.min(16 * 1024)];
            let n = async { up.read(&mut chunk).await.map_err(|e| e.to_string()) }
                .or(async {
                    Timer::after(BODY_IDLE_TIMEOUT).await;
                    Err(format!(
                        "HA sent nothing for {}s mid-body",
                        BODY_IDLE_TIMEOUT.as_secs()
                    ))
                })
                .await?;
            if n == 0 {
                if self.framing == Framing::Close {
                    self.done = true;
                    return Ok(false);
                }
                return Err("HA closed the connection mid-body".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Chunked (RFC 9112 §7.1): moves decoded data into `out`; whether anything moved or
    /// the body ended.
    fn decode_chunked(&mut self, out: &mut Vec<u8>) -> Result<bool, String> {
        let mut progressed = false;
        loop {
            if self.left > 0 {
                if self.buf.is_empty() {
                    return Ok(progressed);
                }
                let n = self.left.min(self.buf.len() as u64) as usize;
                out.extend(self.buf.drain(..n));
                self.left -= n as u64;
                if self.left == 0 {
                    self.crlf = true;
                }
                progressed = true;
                continue;
            }
            if self.crlf {
                if self.buf.len() < 2 {
                    return Ok(progressed);
                }
                if &self.buf[..2] != b"\r\n" {
                    return Err("malformed chunked body from HA".into());
                }
                self.buf.drain(..2);
                self.crlf = false;
            }
            if self.trailers {
                // After the last chunk: trailer lines (dropped) up to an empty line.
                match self.buf.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        self.buf.drain(..2);
                        self.done = true;
                        return Ok(true);
                    }
                    Some(end) => {
                        self.buf.drain(..end + 2);
                        continue;
                    }
                    None if self.buf.len() < 8 * 1024 => return Ok(progressed),
                    None => return Err("trailers from HA too long".into()),
                }
            }
            match httparse::parse_chunk_size(&self.buf) {
                Ok(httparse::Status::Complete((used, 0))) => {
                    self.buf.drain(..used);
                    self.trailers = true;
                }
                Ok(httparse::Status::Complete((used, size))) => {
                    self.buf.drain(..used);
                    self.left = size;
                }
                Ok(httparse::Status::Partial) if self.buf.len() < 1024 => return Ok(progressed),
                _ => return Err("malformed chunk size from HA".into()),
            }
        }
    }
}

impl Proxy {
    /// A proxy that keeps HA's frontend assets in `assets` (see [`crate::assets`]).
    pub fn new(assets: Option<AssetCache>) -> Proxy {
        Proxy {
            assets,
            ..Proxy::default()
        }
    }

    /// The asset-cache key of a `GET`/`HEAD`, or `None`.
    fn asset_key(&self, x: &Exchange<'_>) -> Option<String> {
        self.assets.as_ref()?;
        if !matches!(x.head.method.as_str(), "GET" | "HEAD") {
            return None;
        }
        let mut headers = [httparse::EMPTY_HEADER; crate::http::MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(&x.raw_head).ok()?;
        let gzip = req.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("accept-encoding")
                && String::from_utf8_lossy(h.value)
                    .split(',')
                    .any(|e| e.split(';').next().unwrap_or("").trim() == "gzip")
        });
        crate::assets::key(x.head.path(), gzip)
    }

    /// Open forwards and tunnels, and the asset cache's counters.
    pub fn status(&self) -> ForwardStatus {
        let assets = self
            .assets
            .as_ref()
            .map(AssetCache::stats)
            .unwrap_or_default();
        ForwardStatus {
            forwards_open: self.forwards.get(),
            tunnels_open: self.tunnels.get(),
            asset_hits: assets.hits,
            asset_misses: assets.misses,
            asset_files: assets.entries,
            asset_bytes: assets.bytes,
            ..ForwardStatus::default()
        }
    }

    /// Forwards the request of `x` to `upstream` as `plan` says and writes HA's answer.
    ///
    /// Errors: only the client's socket's (HA's failures are answered 502/504 in HA's error
    /// shape; a failure mid-body closes the client's connection, the only honest signal
    /// once the head is out).
    pub async fn forward(
        &self,
        mut x: Exchange<'_>,
        upstream: Option<Rc<Upstream>>,
        plan: Plan,
    ) -> std::io::Result<Outcome> {
        let client_11 = !x.raw_head.windows(8).any(|w| w == b"HTTP/1.0");
        let slot = if x.head.upgrade {
            take_slot(&self.tunnels, MAX_TUNNELS)
        } else {
            take_slot(&self.forwards, MAX_FORWARDS)
        };
        let Some(_slot) = slot else {
            return reply(
                &mut x,
                Response::error(503, "too many requests forwarded to Home Assistant at once")
                    .with_header("Retry-After", "1"),
            )
            .await;
        };
        // A kept frontend asset needs no HA at all.
        let asset_key = self.asset_key(&x);
        if let (Some(key), Some(assets)) = (&asset_key, &self.assets)
            && let Some(hit) = assets.lookup(key).await
        {
            return serve_hit(&mut x, hit, &plan.response_headers).await;
        }
        let Some(upstream) = upstream else {
            return reply(
                &mut x,
                Response::error(502, "Home Assistant is not configured"),
            )
            .await;
        };
        let target = match target(&upstream.url) {
            Ok(t) => t,
            Err(e) => return reply(&mut x, Response::error(502, e)).await,
        };
        let head = match request_head(&x, &upstream, &target, &plan) {
            Ok(h) => h,
            Err(e) => return reply(&mut x, Response::error(400, e)).await,
        };
        let mut up = match connect(&upstream, &target).await {
            Ok(up) => up,
            Err(e) => {
                log::debug!("forward {} {}: {e}", x.head.method, x.head.path());
                return reply(
                    &mut x,
                    Response::error(502, format!("Home Assistant is unreachable: {e}")),
                )
                .await;
            }
        };
        // The request: head, then the body as it arrives from the client.
        let sent = async {
            up.write_all(&head).await?;
            let mut piece = Vec::with_capacity(CHUNK.min(16 * 1024));
            loop {
                piece.clear();
                if x.read_body(&mut piece).await? == 0 {
                    break;
                }
                up.write_all(&piece).await?;
            }
            up.flush().await
        }
        .await;
        if let Err(e) = sent {
            if x.body_left > 0 {
                // The client's body did not arrive: nothing more can be read on it.
                return Err(e);
            }
            return reply(
                &mut x,
                Response::error(502, format!("Home Assistant is unreachable: {e}")),
            )
            .await;
        }
        let answered = async { read_response_head(&mut up, &x.head.method).await }
            .or(async {
                Timer::after(ANSWER_TIMEOUT).await;
                Err("timeout".into())
            })
            .await;
        let response = match answered {
            Ok(r) => r,
            Err(e) if e == "timeout" => {
                return reply(
                    &mut x,
                    Response::error(
                        504,
                        format!(
                            "Home Assistant did not answer within {}s",
                            ANSWER_TIMEOUT.as_secs()
                        ),
                    ),
                )
                .await;
            }
            Err(e) => {
                return reply(
                    &mut x,
                    Response::error(502, format!("bad answer from Home Assistant: {e}")),
                )
                .await;
            }
        };
        if response.status == 101 && x.head.upgrade {
            let auth = plan.ws_auth.map(|a| (a, upstream.token.clone()));
            return self.tunnel(x, up, response, auth).await;
        }
        let mut response = response;
        let writer = match (&asset_key, &self.assets, response.framing) {
            (Some(key), Some(assets), Framing::Length(n))
                if response.status == 200 && x.head.method == "GET" =>
            {
                assets.writer(key, &response.headers, Some(n)).await
            }
            _ => None,
        };
        for (name, value) in plan.response_headers {
            response
                .headers
                .retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            response.headers.push((name.to_owned(), value.into_bytes()));
        }
        let keep = writer.map(|w| (w, self.assets.as_ref().expect("a writer has a cache")));
        relay(x, up, response, client_11, plan.capture.is_some(), keep).await
    }

    /// After `101`: the head to the client, then bytes both ways until either side closes
    /// or the daemon shuts down.
    async fn tunnel(
        &self,
        mut x: Exchange<'_>,
        up: Box<dyn Stream>,
        response: ResponseHead,
        auth: Option<(WsAuth, crate::config::Secret)>,
    ) -> std::io::Result<Outcome> {
        let mut out = client_head(&response, None, false);
        out.extend_from_slice(b"\r\n");
        x.write(&out).await?;
        if !response.rest.is_empty() {
            x.write(&response.rest).await?;
        }
        let early = x.take_buffered();
        let shutdown = x.shutdown().clone();
        let client = x.stream().clone();
        let (mut up_read, mut up_write) = smol::io::split(up);
        let (mut client_read, mut client_write) = (client.clone(), client.clone());
        let to_ha = async {
            // The client's first frame is its `auth` message: looked at when hass-edge's API
            // token may be in it, then passed on (perhaps rewritten) with what follows.
            let first = match &auth {
                Some((ws_auth, ha_token)) => match first_frame(&mut client_read, early).await {
                    Some(frame) => match rewrite_auth(&frame, ws_auth, ha_token) {
                        Auth::Pass => frame,
                        Auth::Swapped(frame) => frame,
                        Auth::Refuse => {
                            let mut c = client.clone();
                            let _ = c.write_all(&refusal_frames()).await;
                            let _ = c.flush().await;
                            return;
                        }
                    },
                    None => return,
                },
                None => early,
            };
            if !first.is_empty()
                && (up_write.write_all(&first).await.is_err() || up_write.flush().await.is_err())
            {
                return;
            }
            pump(&mut client_read, &mut up_write).await;
        };
        let to_client = pump(&mut up_read, &mut client_write);
        to_ha
            .or(to_client)
            .or(async {
                shutdown.wait().await;
            })
            .await;
        Ok(Outcome {
            status: 101,
            keep_alive: false,
            captured: None,
            tunnel: true,
        })
    }
}

/// The most a client's first WebSocket frame may be for hass-edge to look into it (an
/// `auth` message is ~300 bytes); a larger one is passed on as it is.
const MAX_AUTH_FRAME: usize = 16 * 1024;

/// Reads until `buf` (what the client already sent) holds the client's first complete
/// frame (RFC 6455 §5.2), or [`MAX_AUTH_FRAME`] bytes; returns the bytes read, `None` when
/// the client went away.
async fn first_frame(client: &mut TcpStream, mut buf: Vec<u8>) -> Option<Vec<u8>> {
    loop {
        match frame_len(&buf) {
            Some(_) => return Some(buf),
            None if buf.len() >= MAX_AUTH_FRAME => return Some(buf),
            None => {}
        }
        let mut chunk = [0u8; 4096];
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The length of the complete frame at the start of `buf`, if it is all there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let (&b1, rest) = buf.get(1).zip(buf.get(2..))?;
    let (len, header) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as u64,
            4,
        ),
        127 => (u64::from_be_bytes(rest.get(..8)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let header = header + if b1 & 0x80 != 0 { 4 } else { 0 };
    let total = usize::try_from(len).ok()?.checked_add(header)?;
    (buf.len() >= total).then_some(total)
}

enum Auth {
    Pass,
    Swapped(Vec<u8>),
    Refuse,
}

/// Looks at the client's first frame: a masked, final text frame holding HA's `auth`
/// message with hass-edge's API token is swapped or refused ([`WsAuth`]); anything else
/// passes as it is.
fn rewrite_auth(buf: &[u8], ws_auth: &WsAuth, ha_token: &crate::config::Secret) -> Auth {
    let Some(total) = frame_len(buf) else {
        return Auth::Pass;
    };
    let (b0, b1) = (buf[0], buf[1]);
    if b0 != 0x81 || b1 & 0x80 == 0 {
        return Auth::Pass;
    }
    let header = match b1 & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let mask: [u8; 4] = match buf[header..header + 4].try_into() {
        Ok(m) => m,
        Err(_) => return Auth::Pass,
    };
    let payload: Vec<u8> = buf[header + 4..total]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    let Ok(mut message) = serde_json::from_slice::<serde_json::Value>(&payload) else {
        return Auth::Pass;
    };
    let is_ours = message["type"] == "auth"
        && message["access_token"].as_str().is_some_and(|t| {
            crate::config::same_secret(t.as_bytes(), ws_auth.api_token.expose().as_bytes())
        });
    if !is_ours {
        return Auth::Pass;
    }
    if !ws_auth.swap {
        return Auth::Refuse;
    }
    message["access_token"] = serde_json::Value::String(ha_token.expose().to_owned());
    let payload = message.to_string().into_bytes();
    let mut frame = Vec::with_capacity(payload.len() + 14 + buf.len() - total);
    frame.push(0x81);
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    // What the client sent after its first frame follows unchanged.
    frame.extend_from_slice(&buf[total..]);
    Auth::Swapped(frame)
}

/// HA's answer to a refused `auth` (`websocket_api/auth.py`), then a Close frame: sent by
/// hass-edge itself, unmasked as a server's frames are.
fn refusal_frames() -> Vec<u8> {
    let text = br#"{"type":"auth_invalid","message":"hass-edge is read-only (http.allow_service_calls = false): its API token opens no WebSocket session"}"#;
    let mut out = vec![0x81, 126];
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text);
    out.extend_from_slice(&[0x88, 0x02, 0x03, 0xe8]); // Close, 1000
    out
}

/// Copies until EOF or an error, yielding between pieces so one busy tunnel cannot starve
/// the thread.
async fn pump<R, W>(from: &mut R, to: &mut W)
where
    R: smol::io::AsyncRead + Unpin,
    W: smol::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() || to.flush().await.is_err() {
            break;
        }
        smol::future::yield_now().await;
    }
    let _ = to.close().await;
}

/// Our own answer to a forwarded request (403, 502, 503, 504); the client's body, if it
/// was not read, makes the connection unusable for another request.
async fn reply(x: &mut Exchange<'_>, response: Response) -> std::io::Result<Outcome> {
    let status = response.status;
    let keep_alive = x.body_left == 0 && x.head.keep_alive;
    x.respond(response, keep_alive).await?;
    Ok(Outcome {
        status,
        keep_alive,
        ..Outcome::default()
    })
}

/// Answers from a kept asset: HA's headers as kept, `X-Cache: hit`, the body from disk.
async fn serve_hit(
    x: &mut Exchange<'_>,
    hit: Hit,
    extra: &[(&'static str, String)],
) -> std::io::Result<Outcome> {
    let keep_alive = x.head.keep_alive && x.body_left == 0;
    let mut out = Vec::with_capacity(1024);
    let _ = write!(
        Writer(&mut out),
        "HTTP/1.1 200 OK\r\nDate: {}\r\n",
        crate::http::http_date()
    );
    for (name, value) in &hit.head.headers {
        if !extra.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            let _ = write!(Writer(&mut out), "{name}: {value}\r\n");
        }
    }
    for (name, value) in extra {
        let _ = write!(Writer(&mut out), "{name}: {value}\r\n");
    }
    let _ = write!(
        Writer(&mut out),
        "X-Cache: hit\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        hit.head.length,
        if keep_alive { "keep-alive" } else { "close" }
    );
    x.write(&out).await?;
    if x.head.method != "HEAD" {
        // The length was checked against the file just now; a file cut short after that
        // (a disk error) ends the connection instead of misframing it.
        let mut file = smol::fs::File::open(&hit.body).await?;
        let mut buf = vec![0u8; CHUNK];
        let mut left = hit.head.length;
        while left > 0 {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let n = n.min(left as usize);
            x.write(&buf[..n]).await?;
            left -= n as u64;
            smol::future::yield_now().await;
        }
    }
    Ok(Outcome {
        status: 200,
        keep_alive,
        captured: None,
        tunnel: false,
    })
}

/// The response head for the client, without the final blank line.
fn client_head(response: &ResponseHead, length: Option<u64>, chunked: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    let _ = write!(
        Writer(&mut out),
        "HTTP/1.1 {} {}\r\nDate: {}\r\n",
        response.status,
        response.reason,
        crate::http::http_date()
    );
    for (name, value) in &response.headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(length) = length {
        let _ = write!(Writer(&mut out), "Content-Length: {length}\r\n");
    }
    if chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    out
}

/// Writes HA's answer to the client, reframed, and keeps a copy for `capture`.
async fn relay(
    mut x: Exchange<'_>,
    mut up: Box<dyn Stream>,
    response: ResponseHead,
    client_11: bool,
    capture: bool,
    mut keep: Option<(AssetWriter, &AssetCache)>,
) -> std::io::Result<Outcome> {
    let status = response.status;
    let head_only = x.head.method == "HEAD";
    let (length, chunked) = match response.framing {
        Framing::None if head_only => (response.announced, false),
        Framing::None => (None, false),
        Framing::Length(n) => (Some(n), false),
        Framing::Chunked | Framing::Close => (None, client_11),
    };
    let keep_alive = x.head.keep_alive
        && (response.framing != Framing::Close && response.framing != Framing::Chunked || chunked);
    let mut out = client_head(&response, length, chunked && !head_only);
    out.extend_from_slice(if keep_alive {
        b"Connection: keep-alive\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    });
    let mut captured = (capture && (200..300).contains(&status)).then(Vec::new);
    let mut reader = BodyReader::new(response.framing, response.rest);
    let mut data = Vec::with_capacity(16 * 1024);
    let mut head_sent = false;
    loop {
        data.clear();
        let more = match reader.next(&mut up, &mut data).await {
            Ok(more) => more,
            Err(e) => {
                log::debug!("forward {} {}: {e}", x.head.method, x.head.path());
                if let Some((w, _)) = keep.take() {
                    w.abandon().await;
                }
                // Once the head is out, closing is the only signal left.
                if !head_sent {
                    x.respond(
                        Response::error(502, format!("bad answer from Home Assistant: {e}")),
                        false,
                    )
                    .await?;
                }
                return Ok(Outcome {
                    status: 502,
                    keep_alive: false,
                    ..Outcome::default()
                });
            }
        };
        if let Some((w, _)) = keep.as_mut()
            && !data.is_empty()
            && !w.write(&data).await
            && let Some((w, _)) = keep.take()
        {
            w.abandon().await;
        }
        if let Some(c) = captured.as_mut() {
            if c.len() + data.len() <= MAX_CAPTURE {
                c.extend_from_slice(&data);
            } else {
                captured = None;
            }
        }
        if !data.is_empty() {
            if chunked {
                let _ = write!(Writer(&mut out), "{:x}\r\n", data.len());
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
            } else {
                out.extend_from_slice(&data);
            }
        }
        if !more {
            if chunked && !head_only {
                out.extend_from_slice(b"0\r\n\r\n");
            }
            if !out.is_empty() {
                x.write(&out).await?;
            }
            if let Some((w, assets)) = keep.take() {
                assets.commit(w).await;
            }
            break;
        }
        if out.len() >= 16 * 1024 {
            x.write(&out).await?;
            head_sent = true;
            out.clear();
            smol::future::yield_now().await;
        }
    }
    Ok(Outcome {
        status,
        keep_alive,
        captured,
        tunnel: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = target("http://homeassistant.local:8123").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.prefix.as_str()),
            (false, "homeassistant.local", 8123, "")
        );
        let t = target("https://[::1]/ha").unwrap();
        assert_eq!(
            (
                t.tls,
                t.host.as_str(),
                t.port,
                t.authority.as_str(),
                t.prefix.as_str()
            ),
            (true, "::1", 443, "[::1]", "/ha")
        );
        assert!(target("ftp://x").is_err());
    }

    fn decode(framing: Framing, wire: &[u8]) -> Result<Vec<u8>, String> {
        smol::block_on(async {
            let mut empty: Box<dyn Stream> = Box::new(smol::io::Cursor::new(Vec::new()));
            let mut r = BodyReader::new(framing, wire.to_vec());
            let mut out = Vec::new();
            while r.next(&mut empty, &mut out).await? {}
            Ok(out)
        })
    }

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(
            decode(
                Framing::Chunked,
                b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
            )
            .unwrap(),
            b"hello world"
        );
        assert_eq!(
            decode(Framing::Chunked, b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n").unwrap(),
            b"abc"
        );
        // Cut short: an error, never a silently short body passed on as complete.
        assert!(decode(Framing::Chunked, b"5\r\nhel").is_err());
        assert!(decode(Framing::Chunked, b"zz\r\n").is_err());
        assert_eq!(decode(Framing::Length(3), b"abcdef").unwrap(), b"abc");
        assert!(decode(Framing::Length(10), b"abc").is_err());
        assert_eq!(decode(Framing::Close, b"xyz").unwrap(), b"xyz");
    }
}
