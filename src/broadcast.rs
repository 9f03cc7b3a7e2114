//! The fan-out of changes to push clients (`/api/stream` today, the local WebSocket API
//! next): a registry of clients, each with a [`Selection`] of entities and a queue.
//!
//! One [`Mirror`](crate::mirror::Mirror) update is published as one [`Batch`], shared by
//! every client that selects something in it: a client's queue holds batches, not copies,
//! so a resync that reveals 20,000 changes costs each client one queue entry. Each change is
//! rendered once per kind of client ([`Event::rendered`]), so N clients cost one
//! serialisation, not N.
//!
//! The slow-client rule judges whether a client keeps up over time, not the size of one
//! batch (issue 13): a client whose oldest undelivered batch was published more than
//! [`MAX_BEHIND`] ago, that has more than [`MAX_QUEUED_BYTES`] queued behind that batch, or
//! that has [`MAX_BATCHES`] batches waiting, is disconnected and counted. Each batch's size
//! is estimated once when it is published ([`Batch::bytes`]: its changes, the states they
//! keep alive and their rendering) and charged to every client that queues it. The queues
//! are suffixes of one sequence of shared batches, so whatever the number of stuck readers,
//! they keep alive at most one batch (of any size: a resync) plus [`MAX_QUEUED_BYTES`] —
//! not [`MAX_BEHIND`] of HA's churn, which under a flood of changes was tens of MiB
//! (RELIABILITY.md `starve`, case f). A disconnected client's stream learns it at once
//! ([`Subscription::closed`]), even while its connection is blocked writing to a client
//! that stopped reading. At most [`MAX_CLIENTS`] clients at once.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::{HashSet, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::entity::EntityState;
use crate::store::Change;

/// Most concurrent clients; more are refused.
pub const MAX_CLIENTS: usize = 64;
/// Most concurrent WebSocket API sessions following the mirror ([`Broadcast::subscribe_session`]),
/// counted apart from [`MAX_CLIENTS`]; `http.max_websocket_clients` admits at most this.
pub const MAX_SESSIONS: usize = 1024;
/// A client whose oldest undelivered change is older than this does not keep up and is
/// disconnected. A reader on the same machine drains a 20,000-change resync in well under
/// a second.
pub const MAX_BEHIND: Duration = Duration::from_secs(5);
/// Batches (updates from HA) waiting for one client before it is disconnected, whatever
/// their age.
pub const MAX_BATCHES: usize = 4096;
/// Estimated bytes ([`Batch::bytes`]) queued for one client behind its oldest undelivered
/// batch before it is disconnected, whatever their age. About 1,000 typical changes: a
/// reader that keeps up is never near it; the other event feed (`events.rs`) has the same
/// bound.
pub const MAX_QUEUED_BYTES: usize = 1024 * 1024;

/// Which entities a client wants: entries ending in `.` or `*` are prefixes (`*` is
/// dropped), others exact ids; an empty list selects everything. Indexed, so a match costs
/// one hash lookup per prefix length of the entity id, not one comparison per entry.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Everything is selected (an empty list, or a bare `*`).
    all: bool,
    /// Exact entity ids.
    exact: HashSet<String>,
    /// Prefixes.
    prefixes: HashSet<String>,
    /// The longest prefix, in bytes.
    longest: usize,
}

impl Default for Selection {
    /// Everything.
    fn default() -> Selection {
        Selection::parse("")
    }
}

impl Selection {
    /// Parses a comma-separated list such as `light.,switch.kitchen,sensor.temp*`.
    pub fn parse(list: &str) -> Selection {
        let mut s = Selection {
            all: false,
            exact: HashSet::new(),
            prefixes: HashSet::new(),
            longest: 0,
        };
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let prefix = match entry.strip_suffix('*') {
                Some(p) => Some(p),
                None if entry.ends_with('.') => Some(entry),
                None => None,
            };
            match prefix {
                Some("") => s.all = true,
                Some(p) => {
                    s.longest = s.longest.max(p.len());
                    s.prefixes.insert(p.to_owned());
                }
                None => {
                    s.exact.insert(entry.to_owned());
                }
            }
        }
        s.all |= s.exact.is_empty() && s.prefixes.is_empty();
        s
    }

    /// Nothing: a stream that only keeps alive (HA's `?restrict=` without `state_changed`).
    pub fn none() -> Selection {
        Selection {
            all: false,
            exact: HashSet::new(),
            prefixes: HashSet::new(),
            longest: 0,
        }
    }

    /// Whether `entity_id` is selected.
    pub fn matches(&self, entity_id: &str) -> bool {
        self.all
            || self.exact.contains(entity_id)
            || (1..=self.longest.min(entity_id.len()))
                .any(|n| entity_id.is_char_boundary(n) && self.prefixes.contains(&entity_id[..n]))
    }
}

/// One change as queued to clients.
#[derive(Debug)]
pub struct Event {
    /// The change.
    pub change: Change,
    /// Its wire forms, each rendered by the first client of its [`Render`] kind.
    rendered: [OnceCell<Box<str>>; RENDER_KINDS],
}

/// The wire forms of a change, one per kind of client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Render {
    /// `/api/stream`'s SSE message.
    Sse = 0,
    /// HA's `state_changed` event object (the WebSocket API's `subscribe_events`).
    StateChanged = 1,
    /// HA's compressed `subscribe_entities` event (`{"a"|"c"|"r": …}`).
    Compressed = 2,
}

const RENDER_KINDS: usize = 3;

impl Event {
    /// An event outside any batch, for unit tests of renderers.
    #[cfg(test)]
    pub fn for_tests(change: Change) -> Event {
        Event {
            change,
            rendered: Default::default(),
        }
    }

    /// The change rendered by `render`, once for all clients of the `kind`.
    pub fn rendered(&self, kind: Render, render: impl FnOnce(&Change) -> String) -> &str {
        self.rendered[kind as usize].get_or_init(|| render(&self.change).into_boxed_str())
    }
}

/// The changes of one update, shared by every client that selects one of them.
#[derive(Debug)]
pub struct Batch {
    /// The changes, in order.
    events: Vec<Rc<Event>>,
    /// When it was published.
    at: Instant,
    /// Estimated heap bytes it keeps alive, rendering included ([`change_bytes`]).
    bytes: usize,
}

impl Batch {
    /// Estimated heap bytes the batch keeps alive while queued, rendering included.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Fixed cost of one state beyond its strings: the struct, its allocations' headers, and in
/// the rendering its keys, timestamps and context (about 200 bytes of JSON).
const STATE_OVERHEAD: usize = 320;
/// Fixed cost of one queued change beyond its states: the [`Event`], the `Rc`, the entity id
/// allocation, and the rendering's envelope.
const CHANGE_OVERHEAD: usize = 256;

/// Estimated heap bytes one queued change keeps alive: its states (the old one is held by
/// the change alone once the store replaced it) and, once a client rendered it, the text,
/// which is about as long again. Cheap: attributes are kept as JSON text, so no state is
/// serialised to count it.
fn change_bytes(c: &Change) -> usize {
    fn state(s: Option<&EntityState>) -> usize {
        s.map_or(0, |s| {
            STATE_OVERHEAD
                + s.entity_id.len()
                + s.state.len()
                + s.attributes.get().len()
                + s.context.id.len()
                + s.context.parent_id.as_ref().map_or(0, String::len)
                + s.context.user_id.as_ref().map_or(0, String::len)
        })
    }
    CHANGE_OVERHEAD
        + c.entity_id.len()
        + 2 * (state(c.old_state.as_deref()) + state(c.new_state.as_deref()))
}

/// A client's half shared with the registry.
#[derive(Debug)]
struct Client {
    /// Registry key.
    id: u64,
    /// What it wants.
    selection: Selection,
    /// A WebSocket API session ([`MAX_SESSIONS`]) rather than a stream ([`MAX_CLIENTS`]).
    session: bool,
    /// Batches not yet read, oldest first.
    queue: RefCell<VecDeque<Rc<Batch>>>,
    /// The sum of [`Batch::bytes`] over `queue`.
    queued_bytes: Cell<usize>,
    /// Disconnected by the registry (too slow).
    closed: Cell<bool>,
    /// Wakes the reader.
    wake: event_listener::Event,
    /// Notified once, when the registry disconnects the client ([`Subscription::closed`]);
    /// apart from `wake`, which every publish notifies.
    gone: event_listener::Event,
}

#[derive(Debug, Default)]
struct Inner {
    /// Connected clients.
    clients: RefCell<Vec<Rc<Client>>>,
    /// Next client id.
    next_id: Cell<u64>,
    /// Clients disconnected for falling behind.
    dropped_slow: Cell<u64>,
    /// Events queued in total (one per client and selected change).
    sent: Cell<u64>,
}

/// The registry of clients. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Broadcast(Rc<Inner>);

/// One client's end: its queue and its place in the batch being read; removed from the
/// registry on drop.
#[derive(Debug)]
pub struct Subscription {
    client: Rc<Client>,
    /// The batch being read and the next index in it.
    current: Option<(Rc<Batch>, usize)>,
    registry: Broadcast,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let id = self.client.id;
        self.registry.0.clients.borrow_mut().retain(|c| c.id != id);
    }
}

impl Subscription {
    /// The next selected change, if one is queued; `None` also once disconnected.
    pub fn try_recv(&mut self) -> Option<Rc<Event>> {
        if self.client.closed.get() {
            return None;
        }
        loop {
            if let Some((batch, i)) = &mut self.current {
                while let Some(e) = batch.events.get(*i) {
                    *i += 1;
                    if self.client.selection.matches(&e.change.entity_id) {
                        return Some(e.clone());
                    }
                }
            }
            let next = self.client.queue.borrow_mut().pop_front()?;
            let left = self.client.queued_bytes.get() - next.bytes;
            self.client.queued_bytes.set(left);
            self.current = Some((next, 0));
        }
    }

    /// The next selected change; `None` once the registry disconnected this client.
    pub async fn recv(&mut self) -> Option<Rc<Event>> {
        loop {
            if let Some(e) = self.try_recv() {
                return Some(e);
            }
            if self.client.closed.get() {
                return None;
            }
            let listener = self.client.wake.listen();
            if self.client.closed.get() || !self.client.queue.borrow().is_empty() {
                continue;
            }
            listener.await;
        }
    }

    /// Whether the registry disconnected this client (too slow).
    pub fn is_closed(&self) -> bool {
        self.client.closed.get()
    }

    /// Resolves once the registry disconnected this client (too slow). Woken by that alone,
    /// not by every publish: a stream waits on it while its connection is blocked writing to
    /// a client that stopped reading, and ends the connection then rather than when the
    /// write times out.
    pub async fn closed(&self) {
        loop {
            if self.client.closed.get() {
                return;
            }
            let listener = self.client.gone.listen();
            if self.client.closed.get() {
                return;
            }
            listener.await;
        }
    }

    /// Estimated bytes queued for this client and not read yet ([`Batch::bytes`]).
    pub fn queued_bytes(&self) -> usize {
        self.client.queued_bytes.get()
    }
}

impl Broadcast {
    /// Registers a stream client, or `None` when [`MAX_CLIENTS`] are connected.
    pub fn subscribe(&self, selection: Selection) -> Option<Subscription> {
        self.register(selection, false)
    }

    /// Registers a WebSocket API session, or `None` when [`MAX_SESSIONS`] are connected.
    pub fn subscribe_session(&self, selection: Selection) -> Option<Subscription> {
        self.register(selection, true)
    }

    fn register(&self, selection: Selection, session: bool) -> Option<Subscription> {
        let mut clients = self.0.clients.borrow_mut();
        let limit = if session { MAX_SESSIONS } else { MAX_CLIENTS };
        if clients.iter().filter(|c| c.session == session).count() >= limit {
            return None;
        }
        let id = self.0.next_id.get();
        self.0.next_id.set(id + 1);
        let client = Rc::new(Client {
            id,
            selection,
            session,
            queue: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            closed: Cell::new(false),
            wake: event_listener::Event::new(),
            gone: event_listener::Event::new(),
        });
        clients.push(client.clone());
        Some(Subscription {
            client,
            current: None,
            registry: self.clone(),
        })
    }

    /// Queues `changes`, published at `now`, for every client that selects any of them.
    /// Clients that do not keep up (see the module docs) are disconnected and counted.
    pub fn publish(&self, changes: &[Change], now: Instant) {
        let mut clients = self.0.clients.borrow_mut();
        if clients.is_empty() || changes.is_empty() {
            return;
        }
        let batch = Rc::new(Batch {
            events: changes
                .iter()
                .map(|c| {
                    Rc::new(Event {
                        change: c.clone(),
                        rendered: Default::default(),
                    })
                })
                .collect(),
            at: now,
            bytes: changes.iter().map(change_bytes).sum(),
        });
        clients.retain(|c| {
            let selected = batch
                .events
                .iter()
                .filter(|e| c.selection.matches(&e.change.entity_id))
                .count();
            if selected == 0 {
                return true;
            }
            let mut queue = c.queue.borrow_mut();
            let behind = queue.front().map_or(Duration::ZERO, |oldest| {
                now.saturating_duration_since(oldest.at)
            });
            // Bytes queued behind the oldest batch, this one included: one batch, however
            // large (a resync), is always taken.
            let behind_bytes = queue.front().map_or(0, |oldest| {
                c.queued_bytes.get() - oldest.bytes + batch.bytes
            });
            if behind > MAX_BEHIND || queue.len() >= MAX_BATCHES || behind_bytes > MAX_QUEUED_BYTES
            {
                log::warn!(
                    "stream client {} is {:.1} s, {} updates and {} KiB behind; disconnecting it",
                    c.id,
                    behind.as_secs_f64(),
                    queue.len(),
                    c.queued_bytes.get() / 1024
                );
                queue.clear();
                c.queued_bytes.set(0);
                c.closed.set(true);
                c.wake.notify(usize::MAX);
                c.gone.notify(usize::MAX);
                self.0.dropped_slow.set(self.0.dropped_slow.get() + 1);
                return false;
            }
            c.queued_bytes.set(c.queued_bytes.get() + batch.bytes);
            queue.push_back(batch.clone());
            self.0.sent.set(self.0.sent.get() + selected as u64);
            c.wake.notify(usize::MAX);
            true
        });
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

    fn drain(s: &mut Subscription) -> Vec<String> {
        std::iter::from_fn(|| s.try_recv())
            .map(|e| e.change.entity_id.clone())
            .collect()
    }

    #[test]
    fn selection_prefixes_and_exact_ids() {
        let s = Selection::parse("light., switch.kitchen,sensor.temp*");
        assert!(s.matches("light.a"));
        assert!(s.matches("switch.kitchen"));
        assert!(!s.matches("switch.kitchen_2"));
        assert!(s.matches("sensor.temperature"));
        assert!(!s.matches("sensor.humidity"));
        assert!(!s.matches("light"));
        assert!(Selection::parse("").matches("anything.x"));
        assert!(Selection::parse(" , *").matches("anything.x"));
        assert!(!Selection::parse("ä.*").matches("äb"), "char boundaries");
        assert!(Selection::parse("ä*").matches("äb"));
    }

    #[test]
    fn a_large_batch_reaches_every_client_whole() {
        let b = Broadcast::default();
        let t = Instant::now();
        let mut all = b.subscribe(Selection::default()).unwrap();
        let mut lights = b.subscribe(Selection::parse("light.")).unwrap();
        let changes: Vec<Change> = (0..20_000)
            .map(|i| {
                change(&format!(
                    "{}.e{i}",
                    if i % 2 == 0 { "light" } else { "switch" }
                ))
            })
            .collect();
        b.publish(&changes, t);
        b.publish(&[change("light.last")], t + Duration::from_millis(10));
        assert_eq!(b.dropped_slow(), 0);
        assert_eq!(drain(&mut all).len(), 20_001);
        let got = drain(&mut lights);
        assert_eq!(got.len(), 10_001);
        assert!(got.iter().all(|id| id.starts_with("light.")));
        assert_eq!(b.sent(), 30_002);
    }

    #[test]
    fn a_client_that_does_not_keep_up_is_dropped_not_buffered() {
        let b = Broadcast::default();
        let t = Instant::now();
        let mut slow = b.subscribe(Selection::default()).unwrap();
        let mut reader = b.subscribe(Selection::default()).unwrap();
        let other = b.subscribe(Selection::parse("light.")).unwrap();
        let mut at = t;
        while at - t <= MAX_BEHIND {
            b.publish(&[change("switch.x")], at);
            assert_eq!(drain(&mut reader).len(), 1, "a reader that keeps up stays");
            at += Duration::from_millis(500);
        }
        b.publish(&[change("switch.x")], at);
        assert_eq!(
            b.clients(),
            2,
            "the client behind for over {MAX_BEHIND:?} was dropped"
        );
        assert_eq!(b.dropped_slow(), 1);
        assert!(slow.is_closed());
        assert!(slow.try_recv().is_none(), "its queue is gone");
        assert!(!reader.is_closed());
        assert!(other.client.queue.borrow().is_empty(), "nothing selected");
        drop(other);
        assert_eq!(b.clients(), 1);
    }

    #[test]
    fn queued_batches_are_bounded_whatever_their_age() {
        let b = Broadcast::default();
        let t = Instant::now();
        let stuck = b.subscribe(Selection::default()).unwrap();
        for _ in 0..=MAX_BATCHES {
            b.publish(&[change("switch.x")], t);
        }
        assert!(stuck.is_closed());
        assert!(stuck.client.queue.borrow().is_empty());
    }

    /// A change of `id` whose new state carries `padding` bytes of attributes.
    fn big_change(id: &str, padding: usize) -> Change {
        let state: EntityState = serde_json::from_value(serde_json::json!({
            "entity_id": id, "state": "on",
            "attributes": {"padding": "x".repeat(padding)},
            "last_changed": "2024-03-20T10:00:00.000001+00:00",
            "last_updated": "2024-03-20T10:00:00.000001+00:00",
            "context": {"id": "01HSC", "parent_id": null, "user_id": null},
        }))
        .unwrap();
        Change {
            entity_id: id.into(),
            old_state: None,
            new_state: Some(Rc::new(state)),
        }
    }

    #[test]
    fn batch_bytes_count_states_and_their_rendering() {
        let small = change_bytes(&change("light.a"));
        let big = change_bytes(&big_change("light.a", 10_000));
        assert!(small < 400, "{small}");
        assert!(
            (20_000..21_500).contains(&big),
            "the attributes twice (held, rendered): {big}"
        );
    }

    #[test]
    fn a_client_that_stops_reading_is_dropped_by_bytes_long_before_max_behind() {
        let b = Broadcast::default();
        let t = Instant::now();
        let stuck = b.subscribe(Selection::default()).unwrap();
        let mut reader = b.subscribe(Selection::default()).unwrap();
        // 10 KB of attributes: ~20 KB a change; the budget is reached after ~50 of them,
        // published within 50 ms, a hundredth of MAX_BEHIND.
        let mut published = 0;
        while !stuck.is_closed() {
            b.publish(
                &[big_change("sensor.x", 10_000)],
                t + Duration::from_millis(published),
            );
            published += 1;
            assert_eq!(drain(&mut reader).len(), 1, "a reader that keeps up stays");
            assert!(published < 200, "never dropped");
        }
        let per_change = change_bytes(&big_change("sensor.x", 10_000));
        assert_eq!(
            published as usize,
            MAX_QUEUED_BYTES / per_change + 2,
            "dropped at the first batch past the budget behind the oldest one"
        );
        assert_eq!(b.dropped_slow(), 1);
        assert_eq!(b.clients(), 1);
        assert!(!reader.is_closed());
        assert_eq!(stuck.queued_bytes(), 0, "its queue is released");
        assert_eq!(reader.queued_bytes(), 0);
    }

    #[test]
    fn one_batch_over_the_byte_budget_is_taken_whole() {
        let b = Broadcast::default();
        let t = Instant::now();
        let mut reader = b.subscribe(Selection::default()).unwrap();
        // A resync: 2,000 changes of ~2.5 KB, 5 MB in one batch, then live changes.
        let resync: Vec<Change> = (0..2000)
            .map(|i| big_change(&format!("sensor.e{i}"), 1000))
            .collect();
        b.publish(&resync, t);
        assert!(reader.queued_bytes() > MAX_QUEUED_BYTES);
        b.publish(&[change("light.a")], t + Duration::from_millis(1));
        assert!(
            !reader.is_closed(),
            "what follows a large batch is taken too"
        );
        assert_eq!(drain(&mut reader).len(), 2001);
        assert_eq!(reader.queued_bytes(), 0);
        assert_eq!(b.dropped_slow(), 0);
    }

    #[test]
    fn closed_resolves_when_the_registry_drops_the_client() {
        let b = Broadcast::default();
        let t = Instant::now();
        let stuck = b.subscribe(Selection::default()).unwrap();
        smol::block_on(async {
            let b2 = b.clone();
            let publish = async move {
                // Publishes wake readers, not `closed`: it resolves only on the drop.
                for i in 0..=MAX_BATCHES {
                    b2.publish(&[change("switch.x")], t);
                    if i % 512 == 0 {
                        smol::future::yield_now().await;
                    }
                }
            };
            smol::future::zip(stuck.closed(), publish).await;
        });
        assert!(stuck.is_closed());
    }

    #[test]
    fn client_cap() {
        let b = Broadcast::default();
        let subs: Vec<_> = (0..MAX_CLIENTS)
            .map(|_| b.subscribe(Selection::default()).unwrap())
            .collect();
        assert!(b.subscribe(Selection::default()).is_none());
        drop(subs);
        assert!(b.subscribe(Selection::default()).is_some());
    }

    #[test]
    fn one_rendering_shared_by_all_clients() {
        let b = Broadcast::default();
        let (mut x, mut y) = (
            b.subscribe(Selection::default()).unwrap(),
            b.subscribe(Selection::default()).unwrap(),
        );
        b.publish(&[change("light.a")], Instant::now());
        let (ex, ey) = (x.try_recv().unwrap(), y.try_recv().unwrap());
        assert!(Rc::ptr_eq(&ex, &ey));
        let calls = Cell::new(0);
        for e in [&ex, &ey] {
            let text = e.rendered(Render::Sse, |c| {
                calls.set(calls.get() + 1);
                c.entity_id.clone()
            });
            assert_eq!(text, "light.a");
        }
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn recv_wakes_on_publish_and_ends_when_dropped() {
        let b = Broadcast::default();
        let mut s = b.subscribe(Selection::default()).unwrap();
        smol::block_on(async {
            let b2 = b.clone();
            let publish = async move {
                smol::future::yield_now().await;
                b2.publish(&[change("light.a")], Instant::now());
            };
            let (got, ()) = smol::future::zip(s.recv(), publish).await;
            assert_eq!(got.unwrap().change.entity_id, "light.a");
        });
    }
}
