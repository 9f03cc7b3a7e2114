//! Gives tungstenite's read buffer back after a large message.
//!
//! tungstenite reads a frame into one `BytesMut` that never shrinks: after HA's snapshot
//! (447 KB for `get_states` at 1,000 entities, ≈ 9 MB at 20,000) the connection held that
//! much for its whole life (tungstenite-rs#480). It has no call to shrink it, so the
//! WebSocket is rebuilt around the same stream once its buffer is provably empty:
//! [`Counted`] counts the bytes tungstenite read, [`Release`] the frames it returned.

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Message;
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use smol::io::{AsyncRead, AsyncWrite};

/// A stream that counts the WebSocket bytes tungstenite reads through it (see [`Release`]).
/// During the upgrade it hands on nothing past the end of the HTTP response head, so that
/// no frame byte is read by the handshake (which would pass it on uncounted).
pub struct Counted<S> {
    /// The stream.
    inner: S,
    /// Bytes read from `inner` and not handed on yet (only around the end of the head).
    held: Vec<u8>,
    /// How much of `\r\n\r\n` the bytes handed on end with; 4 once the head is through.
    head_matched: u8,
    /// Bytes handed on after the response head.
    read: u64,
}

impl<S> std::fmt::Debug for Counted<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted")
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

impl<S> Counted<S> {
    /// Wraps a stream on which the HTTP upgrade is still to come: nothing past the end of
    /// the response head is handed on during the handshake.
    pub fn before_handshake(inner: S) -> Counted<S> {
        Counted {
            inner,
            held: Vec::new(),
            head_matched: 0,
            read: 0,
        }
    }

    /// Wraps a stream that carries WebSocket frames from its first byte.
    pub fn after_handshake(inner: S) -> Counted<S> {
        Counted {
            head_matched: 4,
            ..Counted::before_handshake(inner)
        }
    }

    /// Bytes handed on after the response head.
    pub fn read(&self) -> u64 {
        self.read
    }
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

/// Frees tungstenite's read buffer after a large message: the WebSocket is rebuilt
/// (`into_inner` + `from_raw_socket`) once its buffer is provably empty, i.e. the frames
/// tungstenite returned add up to at least the bytes it read (headers counted at their
/// minimal size, so the sum is a lower bound of what it consumed). Not right after a ping,
/// whose pong tungstenite sends on its next read.
#[derive(Debug, Default)]
pub struct Release {
    /// Minimal wire size of every frame returned so far.
    framed: u64,
    /// A message larger than [`RELEASE_ABOVE`] came since the last rebuild.
    pending: bool,
    /// The last message was a ping.
    after_ping: bool,
}

/// Messages larger than this (bytes) have their buffer released.
pub const RELEASE_ABOVE: usize = 64 * 1024;

impl Release {
    /// Notes a message tungstenite returned.
    pub fn saw(&mut self, message: &Message) {
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
    pub async fn maybe<S>(
        &mut self,
        ws: WebSocketStream<Counted<S>>,
        config: WebSocketConfig,
    ) -> WebSocketStream<Counted<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if !self.pending || self.after_ping || ws.get_ref().read() != self.framed {
            return ws;
        }
        self.pending = false;
        log::debug!("releasing the WebSocket read buffer after a large message");
        WebSocketStream::from_raw_socket(
            ws.into_inner(),
            async_tungstenite::tungstenite::protocol::Role::Client,
            Some(config),
        )
        .await
    }
}
