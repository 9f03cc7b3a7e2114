//! The push stream, `GET /api/stream`: Server-Sent Events (WHATWG HTML §9.2) with one
//! `event: state_changed` per change to a tracked entity, `data:` in HA's `state_changed`
//! shape `{"entity_id", "old_state", "new_state"}` (`new_state: null` on removal).
//!
//! Each client has a bounded queue ([`CLIENT_QUEUE`] events); a client that falls that far
//! behind is disconnected and counted, so a stuck reader can never grow our memory. At most
//! [`MAX_STREAM_CLIENTS`] streams at once. A `:` comment every [`KEEPALIVE`] keeps proxies and
//! browsers from timing the stream out.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Serialize;
use smol::Timer;
use smol::channel::{Receiver, Sender, TrySendError, bounded};
use smol::future::FutureExt;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::TcpStream;

use crate::deadline::Deadline;
use crate::entity::EntityState;
use crate::shutdown::Shutdown;
use crate::store::Change;

/// Most concurrent stream clients; more get 503.
pub const MAX_STREAM_CLIENTS: usize = 64;
/// Events queued per client before it is disconnected as too slow.
pub const CLIENT_QUEUE: usize = 256;
/// Period of `:` keep-alive comments.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// A write that takes longer than this disconnects the client.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which entities a client wants: entries ending in `.` or `*` are prefixes, others exact ids.
#[derive(Debug, Clone, Default)]
pub struct Selection(Vec<String>);

impl Selection {
    /// Parses `?entity_id=light.,switch.kitchen` (comma-separated; empty = everything).
    pub fn parse(list: &str) -> Selection {
        Selection(
            list.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }

    /// Whether `entity_id` is selected.
    pub fn matches(&self, entity_id: &str) -> bool {
        self.0.is_empty()
            || self.0.iter().any(|s| match s.strip_suffix('*') {
                Some(prefix) => entity_id.starts_with(prefix),
                None if s.ends_with('.') => entity_id.starts_with(s.as_str()),
                None => entity_id == s,
            })
    }
}

#[derive(Debug)]
struct Client {
    /// Registry key.
    id: u64,
    /// What it wants.
    selection: Selection,
    /// Its queue.
    tx: Sender<Rc<str>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Connected clients.
    clients: RefCell<Vec<Client>>,
    /// Next client id.
    next_id: Cell<u64>,
    /// Clients disconnected for falling behind.
    dropped_slow: Cell<u64>,
    /// Events queued in total.
    sent: Cell<u64>,
}

/// The registry of stream clients. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Broadcast(Rc<Inner>);

/// One client's end: its queue, removed from the registry on drop.
#[derive(Debug)]
pub struct Subscription {
    /// Its queue.
    pub rx: Receiver<Rc<str>>,
    id: u64,
    registry: Broadcast,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.registry
            .0
            .clients
            .borrow_mut()
            .retain(|c| c.id != self.id);
    }
}

#[derive(Serialize)]
struct Event<'a> {
    entity_id: &'a str,
    old_state: Option<&'a EntityState>,
    new_state: Option<&'a EntityState>,
}

/// Formats one SSE `state_changed` event.
pub fn format_event(
    entity_id: &str,
    old_state: Option<&EntityState>,
    new_state: Option<&EntityState>,
) -> String {
    let data = serde_json::to_string(&Event {
        entity_id,
        old_state,
        new_state,
    })
    .unwrap_or_default();
    format!("event: state_changed\ndata: {data}\n\n")
}

impl Broadcast {
    /// Registers a client, or `None` when [`MAX_STREAM_CLIENTS`] are connected.
    pub fn subscribe(&self, selection: Selection) -> Option<Subscription> {
        let mut clients = self.0.clients.borrow_mut();
        if clients.len() >= MAX_STREAM_CLIENTS {
            return None;
        }
        let id = self.0.next_id.get();
        self.0.next_id.set(id + 1);
        let (tx, rx) = bounded(CLIENT_QUEUE);
        clients.push(Client { id, selection, tx });
        Some(Subscription {
            rx,
            id,
            registry: self.clone(),
        })
    }

    /// Queues `changes` for every client that selects them; each event is serialised once.
    /// Clients whose queue is full are disconnected.
    pub fn publish(&self, changes: &[Change]) {
        let mut clients = self.0.clients.borrow_mut();
        if clients.is_empty() {
            return;
        }
        for change in changes {
            let mut text: Option<Rc<str>> = None;
            clients.retain(|c| {
                if !c.selection.matches(&change.entity_id) {
                    return true;
                }
                let t = text.get_or_insert_with(|| {
                    format_event(
                        &change.entity_id,
                        change.old_state.as_deref(),
                        change.new_state.as_deref(),
                    )
                    .into()
                });
                match c.tx.try_send(t.clone()) {
                    Ok(()) => {
                        self.0.sent.set(self.0.sent.get() + 1);
                        true
                    }
                    Err(TrySendError::Full(_)) => {
                        log::warn!(
                            "stream client {} fell {CLIENT_QUEUE} events behind; disconnecting it",
                            c.id
                        );
                        self.0.dropped_slow.set(self.0.dropped_slow.get() + 1);
                        false
                    }
                    Err(TrySendError::Closed(_)) => false,
                }
            });
        }
    }

    /// Connected clients.
    pub fn clients(&self) -> usize {
        self.0.clients.borrow().len()
    }

    /// Clients disconnected for falling behind (total).
    pub fn dropped_slow(&self) -> u64 {
        self.0.dropped_slow.get()
    }

    /// Events queued to clients (total).
    pub fn sent(&self) -> u64 {
        self.0.sent.get()
    }
}

/// Writes the stream to `stream` until the client goes away, falls behind, or shutdown.
/// `head` is the HTTP response head; `first` are states sent as events before live ones
/// (the snapshot), formatted [`crate::http::CHUNK`] bytes at a time as they are written, so
/// that a 20,000-entity snapshot is never held as one ~15 MB string.
pub async fn serve(
    mut stream: TcpStream,
    head: String,
    first: Vec<Rc<EntityState>>,
    subscription: Subscription,
    shutdown: &Shutdown,
) -> std::io::Result<()> {
    let write = |stream: &mut TcpStream, bytes: Vec<u8>| {
        let mut s = stream.clone();
        async move {
            async { s.write_all(&bytes).await.and(s.flush().await) }
                .or(async {
                    Timer::after(WRITE_TIMEOUT).await;
                    Err(std::io::ErrorKind::TimedOut.into())
                })
                .await
        }
    };
    let mut opening = head.into_bytes();
    opening.extend_from_slice(b"retry: 2000\n\n");
    for s in first {
        opening.extend_from_slice(format_event(&s.entity_id, None, Some(&s)).as_bytes());
        if opening.len() >= crate::http::CHUNK {
            write(&mut stream, std::mem::take(&mut opening)).await?;
            smol::future::yield_now().await;
        }
    }
    write(&mut stream, opening).await?;
    // Anything the client sends after the request (or EOF) is read and dropped, so a closed
    // browser tab is noticed at once instead of at the next failed write.
    let mut reader = stream.clone();
    let closed = async move {
        let mut sink = [0u8; 512];
        loop {
            match reader.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let closed = std::pin::pin!(closed);
    let mut closed = closed;
    // One lazily re-armed timer: a fresh `Timer` per event would wake the reactor each time.
    let mut keepalive = Deadline::new(Instant::now() + KEEPALIVE);
    enum Wake {
        Event(Option<Rc<str>>),
        KeepAlive,
        Stop,
    }
    loop {
        let wake = async { Wake::Event(subscription.rx.recv().await.ok()) }
            .or(async {
                keepalive.elapsed().await;
                Wake::KeepAlive
            })
            .or(async {
                (&mut closed).await;
                Wake::Stop
            })
            .or(async {
                shutdown.wait().await;
                Wake::Stop
            })
            .await;
        match wake {
            Wake::Event(Some(first)) => {
                // Batch whatever else is queued into one write.
                let mut bytes = first.as_bytes().to_vec();
                while let Ok(more) = subscription.rx.try_recv() {
                    bytes.extend_from_slice(more.as_bytes());
                    if bytes.len() > 64 * 1024 {
                        break;
                    }
                }
                write(&mut stream, bytes).await?;
            }
            Wake::KeepAlive => write(&mut stream, b": keep-alive\n\n".to_vec()).await?,
            Wake::Event(None) | Wake::Stop => return Ok(()),
        }
        keepalive.set(Instant::now() + KEEPALIVE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(id: &str) -> Change {
        Change {
            entity_id: id.into(),
            old_state: None,
            new_state: None,
        }
    }

    #[test]
    fn selection_prefixes_and_exact_ids() {
        let s = Selection::parse("light., switch.kitchen,sensor.temp*");
        assert!(s.matches("light.a"));
        assert!(s.matches("switch.kitchen"));
        assert!(!s.matches("switch.kitchen_2"));
        assert!(s.matches("sensor.temperature"));
        assert!(!s.matches("sensor.humidity"));
        assert!(Selection::parse("").matches("anything.x"));
    }

    #[test]
    fn slow_client_is_dropped_not_buffered() {
        let b = Broadcast::default();
        let slow = b.subscribe(Selection::default()).unwrap();
        let other = b.subscribe(Selection::parse("light.")).unwrap();
        for _ in 0..CLIENT_QUEUE + 1 {
            b.publish(&[change("switch.x")]);
        }
        assert_eq!(b.clients(), 1, "the full client was disconnected");
        assert_eq!(b.dropped_slow(), 1);
        assert_eq!(
            slow.rx.len(),
            CLIENT_QUEUE,
            "its queue never grew past the bound"
        );
        assert!(other.rx.is_empty(), "the other client selected nothing");
        drop(other);
        assert_eq!(b.clients(), 0);
    }

    #[test]
    fn client_cap() {
        let b = Broadcast::default();
        let subs: Vec<_> = (0..MAX_STREAM_CLIENTS)
            .map(|_| b.subscribe(Selection::default()).unwrap())
            .collect();
        assert!(b.subscribe(Selection::default()).is_none());
        drop(subs);
        assert!(b.subscribe(Selection::default()).is_some());
    }

    #[test]
    fn removal_event_has_null_new_state() {
        let e = format_event("light.a", None, None);
        assert_eq!(
            e,
            "event: state_changed\ndata: {\"entity_id\":\"light.a\",\"old_state\":null,\"new_state\":null}\n\n"
        );
    }
}
