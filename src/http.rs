//! The local HTTP/1.1 API (RFC 9112): httparse for request heads, a small responder,
//! keep-alive and pipelining, `HEAD`, and caps on everything a client controls: header size
//! and count (431), body size (413), connections (a slot per connection: the one idle
//! longest, or a request trickling in, makes room for a newcomer; 503 when none can), idle
//! and slow clients (timeouts), and a `Host` check before anything else ([`Handler::admit`]).
//! Errors are JSON bodies `{"message": …}`, the shape HA's REST API uses.
//!
//! A leaf: it knows requests, responses, limits and keep-alive, and hands each request to a
//! [`Handler`] (the routes, `api.rs`); a body produced in pieces (a long list, an event
//! stream) is a [`Pieces`] writer, whatever it holds.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use serde_json::json;
use smol::future::FutureExt;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::{TcpListener, TcpStream};
use smol::{LocalExecutor, Timer};

use crate::deadline::Deadline;
use crate::shutdown::Shutdown;

/// Concurrent connections. At the cap a new connection takes the slot of the connection idle
/// longest, or of a request arriving for over [`SLOW_REQUEST`] (`Slots` in this module); only
/// when there is none is it answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 512;
/// Largest request head (request line + headers), bytes.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 48;
/// Largest request body, bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// A kept-alive connection with no request in progress is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A started request must arrive completely within this long (slow-loris guard); a new
/// connection's first request must also start within this long of the accept, or the
/// connection is closed (a connection that says nothing holds a slot for at most this).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Kernel send buffer of a close-delimited (event stream) response, bytes. Linux autotunes
/// a socket's buffer up to 4 MiB (`net.ipv4.tcp_wmem`): a stream client that stops reading
/// made the daemon copy that much into the kernel for each such client before its writes
/// blocked, which with 63 of them cost most of a core (measured, RELIABILITY.md `starve`).
/// An event is a few KiB; this holds dozens, and a stalled client blocks at once.
pub const STREAM_SEND_BUFFER: usize = 64 * 1024;
/// At [`MAX_CONNECTIONS`] with no idle connection, a request still arriving after this long
/// (its head or body incomplete) gives its slot to a new connection and is answered 408. A
/// request sent whole arrives in milliseconds; this is for clients that trickle.
pub const SLOW_REQUEST: Duration = Duration::from_secs(1);
/// A response must be written within this long.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed request: what the handlers need.
#[derive(Debug)]
pub struct Request {
    /// Method, upper case.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Decoded query pairs.
    pub query: Vec<(String, String)>,
    /// `Authorization` header value.
    pub authorization: Option<String>,
    /// `Origin` header value.
    pub origin: Option<String>,
    /// `Host` header value.
    pub host: Option<String>,
    /// `Content-Type` header value.
    pub content_type: Option<String>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of a query parameter.
    pub fn query_value(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether a boolean query flag is set (`true`, `1`, or present without a value).
    pub fn flag(&self, name: &str) -> bool {
        matches!(self.query_value(name), Some("" | "1" | "true" | "yes"))
    }
}

/// A response under construction.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Extra headers (Content-Type/Length and Connection are added when written).
    pub headers: Vec<(&'static str, String)>,
    /// The body (omitted on HEAD, but its length is still announced).
    pub body: Body,
    /// Content type of `body`.
    pub content_type: &'static str,
}

/// A body written in pieces as it is produced: a long list serialised 64 KiB at a time
/// (built whole, a 20,000-entity `/api/states` of ~15 MB was held twice over), or an event
/// stream that runs until the client leaves.
pub trait Pieces {
    /// The whole length in bytes (sent as `Content-Length`), or `None` for a body that runs
    /// until the connection closes (RFC 9112 §6.3, item 8): the connection is then not
    /// kept alive, input from the client is read and dropped so that a client that went
    /// away is noticed at once, and shutdown ends the body.
    fn length(&self) -> Option<usize>;

    /// Appends the next piece to `buf`; resolves `false` once the body is complete (`buf`
    /// may then hold the last piece).
    fn next<'a>(&'a mut self, buf: &'a mut Vec<u8>) -> Pin<Box<dyn Future<Output = bool> + 'a>>;

    /// Resolves when a close-delimited body gives up on its client (an event stream whose
    /// client was disconnected for falling behind), even while a piece is being written: the
    /// write is abandoned and the connection reset, rather than left blocked on a client
    /// that stopped reading until [`WRITE_TIMEOUT`]. The default never resolves.
    fn abandoned(&self) -> Pin<Box<dyn Future<Output = ()> + '_>> {
        Box::pin(std::future::pending())
    }
}

/// A response body.
pub enum Body {
    /// Bytes, written as they are.
    Bytes(Vec<u8>),
    /// Produced while it is written (see [`Pieces`]).
    Pieces(Box<dyn Pieces>),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Body::Pieces(p) => write!(f, "Pieces(length {:?})", p.length()),
        }
    }
}

/// A close-delimited body with nothing in it: the answer to `HEAD` on an event stream,
/// whose headers are written and nothing else.
#[derive(Debug)]
pub struct NoPieces;

impl Pieces for NoPieces {
    fn length(&self) -> Option<usize> {
        None
    }

    fn next<'a>(&'a mut self, _: &'a mut Vec<u8>) -> Pin<Box<dyn Future<Output = bool> + 'a>> {
        Box::pin(std::future::ready(false))
    }
}

/// The size of the pieces a [`Pieces`] body should produce: one write each.
pub const CHUNK: usize = 64 * 1024;
/// The size of the pieces of a live event stream: events queued since the last write. A
/// piece waits in the daemon while the client's socket is full, so for 63 clients that stop
/// reading this is held 63 times; with a [`STREAM_SEND_BUFFER`] as the kernel's part, 16 KiB
/// is still a handful of writes a second for the fastest HA.
pub const STREAM_PIECE: usize = 16 * 1024;

impl Response {
    /// A JSON response.
    pub fn json(status: u16, body: Vec<u8>) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Body::Bytes(body),
            content_type: "application/json",
        }
    }

    /// A response whose body is produced as it is written.
    pub fn pieces(status: u16, content_type: &'static str, body: Box<dyn Pieces>) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Body::Pieces(body),
            content_type,
        }
    }

    /// An error in HA's shape: `{"message": …}`.
    pub fn error(status: u16, message: impl std::fmt::Display) -> Response {
        Response::json(
            status,
            json!({"message": message.to_string()})
                .to_string()
                .into_bytes(),
        )
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }
}

/// A request the handler forwards itself (see [`Handler::forwards`]): its head as received,
/// the client's address, and the connection, whose remaining body the handler reads with
/// [`Exchange::read_body`] and whose response it writes with [`Exchange::write`].
pub struct Exchange<'a> {
    /// The parsed head.
    pub head: Head,
    /// The head's bytes as the client sent them (request line and headers, up to and
    /// including the blank line).
    pub raw_head: Vec<u8>,
    /// The client's address.
    pub peer: std::net::SocketAddr,
    /// Body bytes of this request still to be read (`Content-Length` minus what was read).
    pub body_left: usize,
    stream: &'a mut TcpStream,
    buffered: &'a mut Vec<u8>,
    deadline: &'a mut Deadline,
    shutdown: &'a Shutdown,
    slot: &'a Slot,
}

impl std::fmt::Debug for Exchange<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("head", &self.head)
            .field("peer", &self.peer)
            .field("body_left", &self.body_left)
            .finish_non_exhaustive()
    }
}

impl<'a> Exchange<'a> {
    /// Reads the next piece of the body into `out` (at most [`CHUNK`] bytes, appended):
    /// `Ok(0)` once the body is complete. The body must arrive within [`REQUEST_TIMEOUT`] of
    /// the head (`TimedOut`); EOF before it is complete is `UnexpectedEof`.
    pub async fn read_body(&mut self, out: &mut Vec<u8>) -> std::io::Result<usize> {
        if self.body_left == 0 {
            return Ok(0);
        }
        if self.buffered.is_empty() {
            match fill(
                self.stream,
                self.buffered,
                self.deadline,
                Wait::Request(self.slot),
                self.shutdown,
            )
            .await?
            {
                Some(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Some(_) => {}
                None => return Err(std::io::ErrorKind::TimedOut.into()),
            }
        }
        let n = self.buffered.len().min(self.body_left).min(CHUNK);
        out.extend_from_slice(&self.buffered[..n]);
        self.buffered.drain(..n);
        self.body_left -= n;
        if self.body_left == 0 {
            self.slot.set(SlotState::Busy);
        }
        Ok(n)
    }

    /// Writes `bytes` to the client within [`WRITE_TIMEOUT`].
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        write_timed(self.stream, bytes).await
    }

    /// Writes `response` whole (the forwarder's own answers: 403, 502, 503).
    pub async fn respond(&mut self, response: Response, keep_alive: bool) -> std::io::Result<()> {
        let head = self.head.method == "HEAD";
        write_response(self.stream, response, head, keep_alive, None).await
    }

    /// The connection itself, for a tunnel after `101 Switching Protocols`; bytes the client
    /// sent after the head come first from [`Exchange::take_buffered`].
    pub fn stream(&mut self) -> &mut TcpStream {
        self.stream
    }

    /// Bytes already read from the client past the head and body (a tunnel's first bytes).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(self.buffered)
    }

    /// Resolves when the daemon shuts down.
    pub fn shutdown(&self) -> &Shutdown {
        self.shutdown
    }

    /// The connection, the bytes already read past the head (see
    /// [`Exchange::take_buffered`]) and the shutdown signal, for a handler that speaks
    /// another protocol on the connection from now on (a WebSocket after its `101`).
    pub fn into_parts(self) -> (&'a mut TcpStream, Vec<u8>, &'a Shutdown) {
        (self.stream, std::mem::take(self.buffered), self.shutdown)
    }
}

/// What the transport hands each request to: the routes.
pub trait Handler {
    /// Answers `request`.
    fn handle<'a>(&'a self, request: &'a Request) -> Pin<Box<dyn Future<Output = Response> + 'a>>;

    /// Whether the request with `head` is forwarded by [`Handler::forward`] rather than
    /// answered by [`Handler::handle`]; decided on the head alone, before any body is read.
    /// `Some(limit)`: forwarded, with a body of at most `limit` bytes (413 beyond);
    /// `None` (the default): answered locally, body at most [`MAX_BODY_BYTES`].
    fn forwards(&self, _head: &Head) -> Option<usize> {
        None
    }

    /// Forwards one request: reads its body, writes the whole response. Resolves to whether
    /// the connection may serve another request (the body was read to its end and the
    /// response was framed). The default closes the connection.
    fn forward<'a>(
        &'a self,
        _exchange: Exchange<'a>,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<bool>> + 'a>> {
        Box::pin(std::future::ready(Ok(false)))
    }

    /// Checks a request's head before anything else is done with it (nothing of its body
    /// read, no `100 Continue` sent, nothing forwarded): `Err(response)` refuses it, the
    /// response is written and the connection closed. The handler counts its own refusals
    /// ([`Handler::refused`] is not called for them). The default admits every request.
    fn admit(&self, _head: &Head) -> Result<(), Response> {
        Ok(())
    }

    /// The transport refused a request itself with `status` (malformed or over a limit:
    /// 400, 408, 411, 413, 431; or 503 over [`MAX_CONNECTIONS`] with no idle connection),
    /// for counting.
    fn refused(&self, status: u16);

    /// The transport closed an idle connection, or answered 408 to a request arriving for
    /// over [`SLOW_REQUEST`], to make room for a new one at [`MAX_CONNECTIONS`], for
    /// counting (the 408 is also passed to [`Handler::refused`]).
    fn evicted(&self);
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        421 => "Misdirected Request",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// Serves `handler` on `listener` until `shutdown`. Each connection is a task on `executor`.
pub async fn serve<H: Handler + 'static>(
    listener: TcpListener,
    handler: Rc<H>,
    executor: Rc<LocalExecutor<'static>>,
    shutdown: Shutdown,
) {
    let slots = Rc::new(Slots::default());
    loop {
        let accepted = async { Some(listener.accept().await) }
            .or(async {
                shutdown.wait().await;
                None
            })
            .await;
        let (mut stream, peer) = match accepted {
            None => return,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                // EMFILE and friends: back off briefly instead of spinning (mini-redis does the same).
                log::warn!("accept failed: {e}");
                Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        stream.set_nodelay(true).ok();
        // A connect flood keeps the listener always ready: let the other tasks run.
        smol::future::yield_now().await;
        let (slot, evicted) = match Slots::take(&slots, Instant::now()) {
            Some(taken) => taken,
            None => {
                handler.refused(503);
                let r = Response::error(
                    503,
                    "too many connections, none of them idle; try again in a second",
                )
                .with_header("Retry-After", "1");
                executor
                    .spawn(async move {
                        let _ = write_response(&mut stream, r, false, false, None).await;
                    })
                    .detach();
                continue;
            }
        };
        if evicted {
            handler.evicted();
        }
        let (handler, shutdown) = (handler.clone(), shutdown.clone());
        executor
            .spawn(async move {
                // `slot` is released when this task ends, however it ends.
                if let Err(e) = connection(stream, peer, &*handler, &shutdown, &slot).await {
                    log::debug!("HTTP connection ended: {e}");
                }
            })
            .detach();
    }
}

/// The [`MAX_CONNECTIONS`] connection slots, and which connections are idle: waiting for
/// the first byte of a request, either a new connection's first (since the accept) or the
/// next one on a kept-alive connection (since the last response).
///
/// At the cap, a new connection takes the slot of the one idle longest, never-spoken
/// connections first, and that connection is closed (with nothing in flight on it: a client
/// sees an idle keep-alive connection closed, RFC 9112 §9.6). Refusing the newcomer instead
/// let one local process that opens 512 connections and sends nothing keep every other
/// client out (all of them share 127.0.0.1, so a share per address would not help). With
/// none idle, the slot of the request that has been arriving longest, for at least
/// [`SLOW_REQUEST`] (a head or body sent a byte at a time, the same attack one step on), is
/// taken: that client is answered 408. Only when no connection is either (requests being
/// answered, event streams, WebSocket sessions, which have limits of their own) is the
/// newcomer answered 503.
///
/// One small entry per connection (its state and, while idle, the waker that closes it);
/// the vector keeps its largest size, at most [`MAX_CONNECTIONS`] entries and the few
/// evicted in the same turn of the executor.
#[derive(Debug, Default)]
struct Slots {
    /// The entries, indexed by [`Slot::index`]; freed ones are reused.
    entries: RefCell<Vec<Entry>>,
    /// Indexes of free entries.
    free: RefCell<Vec<usize>>,
    /// Entries taken and not evicted: what counts against [`MAX_CONNECTIONS`].
    open: std::cell::Cell<usize>,
}

/// One connection's entry in [`Slots`].
#[derive(Debug)]
struct Entry {
    /// What the connection is doing.
    state: SlotState,
    /// Wakes the connection's idle wait when it is evicted.
    waker: Option<Waker>,
}

/// What a connection is doing, as far as [`Slots`] cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// No connection.
    Free,
    /// A request in progress, a response being written, a stream or a WebSocket session.
    Busy,
    /// Waiting for a request's first byte since `since`; `spoken`: after a request (a
    /// kept-alive connection), rather than a new connection's first.
    Idle { spoken: bool, since: Instant },
    /// Receiving a request (its head, or a body) that started at `since`.
    Receiving { since: Instant },
    /// Closed to make room for a newcomer; the slot is no longer counted.
    Evicted,
}

impl Slots {
    /// A slot for a connection accepted `now`, idle (nothing read yet): a free one, or the
    /// slot of the connection idle longest, which is evicted (`true`). `None` when all
    /// [`MAX_CONNECTIONS`] are taken and none is idle.
    fn take(slots: &Rc<Slots>, now: Instant) -> Option<(Slot, bool)> {
        let mut entries = slots.entries.borrow_mut();
        let mut evicted = false;
        if slots.open.get() >= MAX_CONNECTIONS {
            let oldest = entries
                .iter()
                .enumerate()
                .filter_map(|(i, e)| match e.state {
                    SlotState::Idle { spoken, since } => Some(((u8::from(spoken), since), i)),
                    SlotState::Receiving { since }
                        if now.saturating_duration_since(since) >= SLOW_REQUEST =>
                    {
                        Some(((2, since), i))
                    }
                    _ => None,
                })
                .min()?
                .1;
            let victim = &mut entries[oldest];
            victim.state = SlotState::Evicted;
            if let Some(waker) = victim.waker.take() {
                waker.wake();
            }
            slots.open.set(slots.open.get() - 1);
            evicted = true;
        }
        let entry = Entry {
            state: SlotState::Idle {
                spoken: false,
                since: now,
            },
            waker: None,
        };
        let index = match slots.free.borrow_mut().pop() {
            Some(i) => {
                entries[i] = entry;
                i
            }
            None => {
                entries.push(entry);
                entries.len() - 1
            }
        };
        slots.open.set(slots.open.get() + 1);
        let slot = Slot {
            slots: slots.clone(),
            index,
        };
        Some((slot, evicted))
    }
}

/// A connection's hold on its entry in [`Slots`]; released on drop.
#[derive(Debug)]
struct Slot {
    /// The slots.
    slots: Rc<Slots>,
    /// This connection's entry.
    index: usize,
}

impl Slot {
    /// Sets the state, unless the connection was evicted.
    fn set(&self, state: SlotState) {
        let mut entries = self.slots.entries.borrow_mut();
        let entry = &mut entries[self.index];
        if entry.state != SlotState::Evicted {
            entry.state = state;
        }
    }

    /// Whether the connection was evicted (it must then close).
    fn is_evicted(&self) -> bool {
        self.slots.entries.borrow()[self.index].state == SlotState::Evicted
    }

    /// Resolves once the connection is evicted.
    async fn evicted(&self) {
        std::future::poll_fn(|cx| {
            let mut entries = self.slots.entries.borrow_mut();
            let entry = &mut entries[self.index];
            if entry.state == SlotState::Evicted {
                Poll::Ready(())
            } else {
                if !entry
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    entry.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        })
        .await
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut entries = self.slots.entries.borrow_mut();
        let entry = &mut entries[self.index];
        if entry.state != SlotState::Evicted {
            self.slots.open.set(self.slots.open.get() - 1);
        }
        entry.state = SlotState::Free;
        entry.waker = None;
        self.slots.free.borrow_mut().push(self.index);
    }
}

/// Serves one connection: requests in order until close, error, timeout, eviction (see
/// [`Slots`]) or shutdown.
async fn connection(
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    handler: &dyn Handler,
    shutdown: &Shutdown,
    slot: &Slot,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    // The first request must start within REQUEST_TIMEOUT of the accept.
    let mut deadline = Deadline::new(Instant::now() + REQUEST_TIMEOUT);
    let mut spoken = false;
    loop {
        let parsed = read_request(
            &mut stream,
            &mut buf,
            &mut deadline,
            handler,
            shutdown,
            (slot, spoken),
        )
        .await?;
        spoken = true;
        let (request, consumed, keep_alive) = match parsed {
            Parsed::Request {
                request,
                consumed,
                keep_alive,
            } => (request, consumed, keep_alive),
            Parsed::Forward { head, head_len } => {
                let keep_alive = head.keep_alive;
                let raw_head = buf.drain(..head_len).collect();
                // A forward may be a WebSocket session that lasts for days: meanwhile the
                // read buffer (4 KiB once `fill` has read into it) keeps only what came
                // after the head, usually nothing.
                buf.shrink_to_fit();
                let exchange = Exchange {
                    raw_head,
                    body_left: head.content_length,
                    head,
                    peer,
                    stream: &mut stream,
                    buffered: &mut buf,
                    deadline: &mut deadline,
                    shutdown,
                    slot,
                };
                if !(handler.forward(exchange).await? && keep_alive) || shutdown.is_triggered() {
                    return Ok(());
                }
                smol::future::yield_now().await;
                continue;
            }
            Parsed::Closed => return Ok(()),
            Parsed::Reject(response) => {
                handler.refused(response.status);
                Box::pin(write_response(&mut stream, response, false, false, None)).await?;
                return Ok(());
            }
            Parsed::Refused(response) => {
                Box::pin(write_response(&mut stream, response, false, false, None)).await?;
                return Ok(());
            }
        };
        buf.drain(..consumed);
        let head = request.method == "HEAD";
        let response = handler.handle(&request).await;
        let close_delimited = matches!(&response.body, Body::Pieces(p) if p.length().is_none());
        let keep_alive = keep_alive && !close_delimited && !shutdown.is_triggered();
        // Boxed: inline, the writer's state (1.3 KB) would be part of every connection task for
        // its whole life, also while a WebSocket session runs on it (`-Zprint-type-sizes`).
        Box::pin(write_response(
            &mut stream,
            response,
            head,
            keep_alive,
            Some(shutdown),
        ))
        .await?;
        if !keep_alive {
            return Ok(());
        }
        // A client that pipelines requests as fast as it can would otherwise keep this task
        // running (its socket is always ready) and starve every other task on the thread.
        smol::future::yield_now().await;
    }
}

enum Parsed {
    Request {
        request: Request,
        consumed: usize,
        keep_alive: bool,
    },
    /// For [`Handler::forward`]: the head is `buf[..head_len]`, the body not read yet.
    Forward {
        head: Head,
        head_len: usize,
    },
    Closed,
    /// Refused by the transport: counted with [`Handler::refused`], answered, closed.
    Reject(Response),
    /// Refused by [`Handler::admit`] (which counted it): answered, closed.
    Refused(Response),
}

/// The parts of a request head we keep.
#[derive(Debug)]
pub struct Head {
    /// Method.
    pub method: String,
    /// Request target (path and query).
    pub target: String,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// Body length announced by `Content-Length` (0 when absent).
    pub content_length: usize,
    /// `Authorization` value.
    pub authorization: Option<String>,
    /// `Origin` value.
    pub origin: Option<String>,
    /// `Host` value.
    pub host: Option<String>,
    /// `Content-Type` value.
    pub content_type: Option<String>,
    /// `Expect: 100-continue` was sent: the client waits for an interim 100 before the body
    /// (RFC 9110 §10.1.1).
    pub expect_continue: bool,
    /// The body is sent with `Transfer-Encoding` (chunked): refused with 411.
    pub chunked: bool,
    /// `Upgrade` and `Connection: upgrade` were sent (a WebSocket handshake, RFC 9110 §7.8).
    pub upgrade: bool,
}

impl Head {
    /// The path of the target, without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// Parses a complete head from `buf`: `Ok(Some((head, head_len)))`, `Ok(None)` when more
/// bytes are needed, `Err` with the response (400/431) for a request that must be refused.
/// The body's limits (411, 413) depend on where the request goes: [`body_refusal`]. Pure;
/// the fuzz target `http_request` drives it.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, Response> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(Response::error(
                431,
                format!("request head larger than {MAX_HEAD_BYTES} bytes"),
            ));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Response::error(
                431,
                format!("more than {MAX_HEADERS} headers"),
            ));
        }
        Err(e) => return Err(Response::error(400, format!("malformed request: {e}"))),
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(Response::error(
            431,
            format!("request head larger than {MAX_HEAD_BYTES} bytes"),
        ));
    }
    let mut head = Head {
        method: req.method.unwrap_or("").to_owned(),
        target: req.path.unwrap_or("/").to_owned(),
        keep_alive: req.version != Some(0),
        content_length: 0,
        authorization: None,
        origin: None,
        host: None,
        content_type: None,
        expect_continue: false,
        chunked: false,
        upgrade: false,
    };
    let mut connection_upgrade = false;
    let mut upgrade_header = false;
    let mut hosts = 0;
    let mut content_length = None::<usize>;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            // RFC 9110 §8.6: 1*DIGIT; `parse` would also take a sign.
            let n = match value.parse::<usize>() {
                Ok(n) if value.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(Response::error(400, "invalid Content-Length")),
            };
            if content_length.is_some_and(|c| c != n) {
                return Err(Response::error(400, "conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = true;
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade_header = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            connection_upgrade |= v.split(',').any(|t| t.trim() == "upgrade");
            if v.contains("close") {
                head.keep_alive = false;
            } else if v.contains("keep-alive") {
                head.keep_alive = true;
            }
        } else if h.name.eq_ignore_ascii_case("authorization") {
            head.authorization = Some(value.to_owned());
        } else if h.name.eq_ignore_ascii_case("origin") {
            head.origin = Some(value.to_owned());
        } else if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
            head.host = Some(value.to_owned());
        } else if h.name.eq_ignore_ascii_case("content-type") {
            head.content_type = Some(value.to_owned());
        } else if h.name.eq_ignore_ascii_case("expect") {
            head.expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    head.content_length = content_length.unwrap_or(0);
    head.upgrade = connection_upgrade && upgrade_header;
    // RFC 9112 §3.2: an HTTP/1.1 request without exactly one Host is answered 400.
    if req.version == Some(1) && hosts != 1 {
        return Err(Response::error(
            400,
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    if !head.target.starts_with('/') {
        return Err(Response::error(
            400,
            "request target must be an absolute path",
        ));
    }
    Ok(Some((head, head_len)))
}

/// The answer to a request whose body the transport will not take: 411 for a chunked body
/// (this server reads `Content-Length` bodies only), 413 for one over `limit` bytes.
pub fn body_refusal(head: &Head, limit: usize) -> Option<Response> {
    if head.chunked {
        return Some(Response::error(
            411,
            "chunked request bodies are not supported; send Content-Length",
        ));
    }
    (head.content_length > limit)
        .then(|| Response::error(413, format!("request body larger than {limit} bytes")))
}

/// What a connection waits for in [`fill`], for its slot (see [`Slots`]).
#[derive(Debug, Clone, Copy)]
enum Wait<'a> {
    /// A request's first byte; `spoken`: after a request (kept alive), rather than a new
    /// connection's first. The connection is idle meanwhile: shutdown or an eviction end
    /// the wait as EOF does.
    Idle { slot: &'a Slot, spoken: bool },
    /// The rest of a request (its head or body): an eviction ends the wait as the deadline
    /// does.
    Request(&'a Slot),
}

/// Reads more bytes into `buf` before `deadline`: `Ok(None)` once it has passed (or the
/// connection was evicted mid-request), `Ok(Some(0))` on EOF (or shutdown or an eviction
/// while [`Wait::Idle`]).
async fn fill(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: &mut Deadline,
    wait: Wait<'_>,
    shutdown: &Shutdown,
) -> std::io::Result<Option<usize>> {
    let (slot, idle) = match wait {
        Wait::Idle { slot, spoken } => {
            if spoken {
                // Idle from now. (A new connection was marked idle, never spoken, when it
                // was accepted, and keeps that mark and its time.)
                slot.set(SlotState::Idle {
                    spoken: true,
                    since: Instant::now(),
                });
            }
            (slot, Some(spoken))
        }
        Wait::Request(slot) => (slot, None),
    };
    // Read into the buffer itself, not a stack array: an array would be part of every
    // connection task's state for the task's whole life, also while a WebSocket session or a
    // forward runs on the connection.
    let start = buf.len();
    buf.resize(start + 4096, 0);
    let read_into = &mut buf[start..];
    let n = async {
        if idle == Some(true) {
            // Between keep-alive requests the socket is almost always empty: wait for the
            // reactor first instead of a read that fails with EAGAIN (one syscall of the
            // four a request costs at 16 connections). A new connection's request usually
            // came with it: read at once.
            let source: std::sync::Arc<smol::Async<std::net::TcpStream>> = stream.clone().into();
            source.readable().await?;
        }
        stream.read(read_into).await.map(Some)
    }
    .or(async {
        deadline.elapsed().await;
        Ok(None)
    })
    .or(async {
        slot.evicted().await;
        Ok(None)
    })
    .or(async {
        // Between requests, shutdown closes the connection; mid-request it may finish.
        if idle.is_some() {
            shutdown.wait().await;
            Ok(Some(0))
        } else {
            std::future::pending().await
        }
    })
    .await;
    buf.truncate(start + n.as_ref().ok().copied().flatten().unwrap_or(0));
    if slot.is_evicted() {
        // Its slot is a newcomer's now: whatever came meanwhile is not read.
        buf.truncate(start);
        return Ok(if idle.is_some() { Some(0) } else { None });
    }
    if idle.is_some() && n.as_ref().is_ok_and(|n| n.is_some_and(|n| n > 0)) {
        slot.set(SlotState::Receiving {
            since: Instant::now(),
        });
    }
    n
}

/// Reads one request from `buf` + `stream`. `deadline` is the connection's: idle between
/// requests (`spoken`), it is [`IDLE_TIMEOUT`] from now; before a new connection's first
/// request, as the connection set it ([`REQUEST_TIMEOUT`] from the accept); once a request
/// has started, [`REQUEST_TIMEOUT`] from then. [`Handler::admit`] sees the head first.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: &mut Deadline,
    handler: &dyn Handler,
    shutdown: &Shutdown,
    (slot, spoken): (&Slot, bool),
) -> std::io::Result<Parsed> {
    let mut started = false;
    let (head, head_len) = loop {
        match parse_head(buf) {
            Ok(Some(parsed)) => break parsed,
            Ok(None) => {}
            Err(response) => return Ok(Parsed::Reject(response)),
        }
        let idle = buf.is_empty();
        if idle && shutdown.is_triggered() {
            return Ok(Parsed::Closed);
        }
        if idle && spoken {
            deadline.set(Instant::now() + IDLE_TIMEOUT);
        } else if !idle && !started {
            started = true;
            deadline.set(Instant::now() + REQUEST_TIMEOUT);
            slot.set(SlotState::Receiving {
                since: Instant::now(),
            });
        }
        let wait = if idle {
            Wait::Idle { slot, spoken }
        } else {
            Wait::Request(slot)
        };
        match fill(stream, buf, deadline, wait, shutdown).await? {
            Some(0) => return Ok(Parsed::Closed),
            Some(_) => {}
            None if idle => return Ok(Parsed::Closed),
            None => {
                return Ok(Parsed::Reject(Response::error(
                    408,
                    "request not received in time",
                )));
            }
        }
    };
    // Before anything is done with the request (the Host check, DNS rebinding): nothing is
    // read of its body, answered or forwarded.
    if let Err(refusal) = handler.admit(&head) {
        return Ok(Parsed::Refused(refusal));
    }
    let forward = handler.forwards(&head);
    if let Some(refusal) = body_refusal(&head, forward.unwrap_or(MAX_BODY_BYTES)) {
        return Ok(Parsed::Reject(refusal));
    }
    let needed = head_len + head.content_length;
    if buf.len() < needed && !started {
        deadline.set(Instant::now() + REQUEST_TIMEOUT);
    }
    if buf.len() >= needed {
        // Received whole: from now on the request holds its slot until it is answered.
        slot.set(SlotState::Busy);
    } else if !started {
        slot.set(SlotState::Receiving {
            since: Instant::now(),
        });
    }
    if forward.is_some() {
        if buf.len() < needed && head.expect_continue {
            write_timed(stream, b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        return Ok(Parsed::Forward { head, head_len });
    }
    if buf.len() < needed && head.expect_continue {
        write_timed(stream, b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    while buf.len() < needed {
        match fill(stream, buf, deadline, Wait::Request(slot), shutdown).await? {
            Some(0) => return Ok(Parsed::Closed),
            Some(_) => {}
            None => {
                return Ok(Parsed::Reject(Response::error(
                    408,
                    "request body not received in time",
                )));
            }
        }
    }
    slot.set(SlotState::Busy);
    let (path, query) = head.target.split_once('?').unwrap_or((&head.target, ""));
    let request = Request {
        query: form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect(),
        path: path.to_owned(),
        method: head.method,
        authorization: head.authorization,
        origin: head.origin,
        host: head.host,
        content_type: head.content_type,
        body: buf[head_len..needed].to_vec(),
    };
    Ok(Parsed::Request {
        request,
        consumed: needed,
        keep_alive: head.keep_alive,
    })
}

/// Writes `response`; on `head`, the headers only. Each write must finish within
/// [`WRITE_TIMEOUT`]. A close-delimited [`Pieces`] body runs until it ends, the client goes
/// away, or `shutdown` (when given).
///
/// Errors: the socket's; `TimedOut`; `InvalidData` if a [`Pieces`] body came out longer or
/// shorter than its announced length (the connection is then closed, never left misframed).
async fn write_response(
    stream: &mut TcpStream,
    r: Response,
    head: bool,
    keep_alive: bool,
    shutdown: Option<&Shutdown>,
) -> std::io::Result<()> {
    let length = match &r.body {
        Body::Bytes(b) => Some(b.len()),
        Body::Pieces(p) => p.length(),
    };
    let mut out = String::with_capacity(160);
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nDate: {}\r\nContent-Type: {}\r\n",
        r.status,
        reason(r.status),
        http_date(),
        r.content_type
    );
    if let Some(length) = length {
        let _ = write!(out, "Content-Length: {length}\r\n");
    }
    for (name, value) in &r.headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.push_str(if keep_alive {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    let mut bytes = out.into_bytes();
    let mut pieces = match r.body {
        _ if head => return write_timed(stream, &bytes).await,
        Body::Bytes(body) => {
            bytes.extend_from_slice(&body);
            return write_timed(stream, &bytes).await;
        }
        Body::Pieces(pieces) => pieces,
    };
    let head_len = bytes.len();
    let mut written = 0;
    if length.is_none()
        && let Err(e) =
            rustix::net::sockopt::set_socket_send_buffer_size(&*stream, STREAM_SEND_BUFFER)
    {
        log::debug!("could not cap the send buffer of a stream: {e}");
    }
    // A close-delimited body: what the client sends is read and dropped, so a closed
    // browser tab ends the body at once instead of at the next failed write.
    let mut reader = stream.clone();
    let client_gone = std::pin::pin!(async move {
        if length.is_some() {
            return std::future::pending().await;
        }
        let mut sink = [0u8; 512];
        while let Ok(1..) = reader.read(&mut sink).await {}
    });
    let mut client_gone = client_gone;
    let stop = async {
        match shutdown {
            Some(s) if length.is_none() => s.wait().await,
            _ => std::future::pending().await,
        }
    };
    let stop = std::pin::pin!(stop);
    let mut stop = stop;
    loop {
        let more = async { Some(pieces.next(&mut bytes).await) }
            .or(async {
                (&mut client_gone).await;
                None
            })
            .or(async {
                (&mut stop).await;
                None
            })
            .await;
        let Some(more) = more else {
            return Ok(());
        };
        if !bytes.is_empty() {
            let gave_up = async {
                write_timed(stream, &bytes).await?;
                Ok::<bool, std::io::Error>(false)
            }
            .or(async {
                pieces.abandoned().await;
                Ok(true)
            })
            .await?;
            if gave_up {
                // A client that stopped reading: reset the connection, so that neither this
                // task nor the kernel keeps the unsent data for it (a FIN would wait behind
                // that data until the client reads or the kernel gives up, minutes later).
                if let Err(e) =
                    rustix::net::sockopt::set_socket_linger(&*stream, Some(Duration::ZERO))
                {
                    log::debug!("could not reset an abandoned stream: {e}");
                }
                return Ok(());
            }
            written += bytes.len();
            bytes.clear();
            if length.is_none() && bytes.capacity() > STREAM_PIECE * 2 {
                // A stream may be idle for hours after a burst: keep no burst-sized buffer.
                bytes = Vec::new();
            }
        }
        if !more {
            break;
        }
        // Let the link and other clients run between pieces of a long body.
        smol::future::yield_now().await;
    }
    if let Some(length) = length
        && written - head_len != length
    {
        log::error!(
            "a response body was {} bytes, announced {length}; closing the connection",
            written - head_len
        );
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    Ok(())
}

/// Now as an HTTP date (RFC 9110 §5.6.7, `Date:` on every response, §6.6.1), formatted
/// once per second.
pub fn http_date() -> Rc<str> {
    thread_local! {
        static CACHED: std::cell::RefCell<(u64, Rc<str>)> =
            std::cell::RefCell::new((u64::MAX, Rc::from("")));
    }
    let now = std::time::SystemTime::now();
    let second = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != second {
            *c = (second, Rc::from(httpdate::fmt_http_date(now)));
        }
        c.1.clone()
    })
}

/// Writes and flushes `bytes` within [`WRITE_TIMEOUT`].
async fn write_timed(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    async { stream.write_all(bytes).await.and(stream.flush().await) }
        .or(async {
            Timer::after(WRITE_TIMEOUT).await;
            Err(std::io::ErrorKind::TimedOut.into())
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which connection makes room at the cap: never-spoken idle ones first (oldest first),
    /// then kept-alive idle ones, then requests arriving for over SLOW_REQUEST; none of the
    /// others, and then the newcomer is refused.
    #[test]
    fn the_slot_of_the_longest_idle_is_taken() {
        let slots = Rc::new(Slots::default());
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut held: Vec<Slot> = (0..MAX_CONNECTIONS)
            .map(|i| {
                let (slot, evicted) = Slots::take(&slots, at(i as u64)).unwrap();
                assert!(!evicted);
                slot.set(SlotState::Busy);
                slot
            })
            .collect();
        let now = at(10_000);
        assert!(Slots::take(&slots, now).is_none(), "all busy: refused");
        held[7].set(SlotState::Receiving { since: at(9_500) });
        assert!(
            Slots::take(&slots, now).is_none(),
            "arriving for 0.5 s only"
        );
        held[5].set(SlotState::Receiving { since: at(8_000) });
        held[3].set(SlotState::Idle {
            spoken: true,
            since: at(9_000),
        });
        held[9].set(SlotState::Idle {
            spoken: true,
            since: at(2_000),
        });
        held[300].set(SlotState::Idle {
            spoken: false,
            since: at(300),
        });
        let mut order = Vec::new();
        let mut newcomers = Vec::new();
        for _ in 0..4 {
            let (slot, evicted) = Slots::take(&slots, now).unwrap();
            assert!(evicted);
            order.push(
                held.iter()
                    .position(|s| s.is_evicted() && !order.contains(&s.index))
                    .map(|i| held[i].index)
                    .unwrap(),
            );
            slot.set(SlotState::Busy);
            newcomers.push(slot);
        }
        assert_eq!(
            order,
            [300, 9, 3, 5],
            "never spoken, idle longest, idle, slow request"
        );
        assert!(Slots::take(&slots, now).is_none());
        assert_eq!(slots.open.get(), MAX_CONNECTIONS);
        // An evicted connection's end frees no second slot; a served one's frees one.
        held.truncate(10);
        assert_eq!(slots.open.get(), 10 - 3 + 4, "7 held, 4 newcomers");
        assert!(Slots::take(&slots, now).is_some_and(|(_, evicted)| !evicted));
    }
}
