//! HA events other than `state_changed` for `/api/stream` clients (issue 15): HA's stream
//! sends every event on its bus (`components/api` `APIEventStream`, `?restrict=` narrows
//! it), while the mirror only knows state changes. While a stream client wants other event
//! types, the link holds an upstream `subscribe_events` for them ([`Feed::wanted`]), and
//! each event HA sends is rendered once (`data: <HA's event JSON>\n\n`) and queued for the
//! clients that asked for its type.
//!
//! Bounds: [`MAX_CLIENTS`] receivers; a receiver more than [`MAX_QUEUED`] events or
//! [`MAX_QUEUED_BYTES`] behind is dropped (its stream ends, as HA's own stream does for a
//! client that stops reading) and counted.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashSet, VecDeque};
use std::rc::{Rc, Weak};

use event_listener::Event;

/// Most receivers at once (one per stream client that wants other events).
pub const MAX_CLIENTS: usize = 64;
/// Most events queued for one receiver.
pub const MAX_QUEUED: usize = 1024;
/// Most bytes queued for one receiver.
pub const MAX_QUEUED_BYTES: usize = 1024 * 1024;

/// Which event types a receiver wants: `None` for all (HA's stream without `?restrict=`).
pub type Types = Option<HashSet<String>>;

#[derive(Debug)]
struct Client {
    types: Types,
    queue: RefCell<VecDeque<Rc<str>>>,
    bytes: Cell<usize>,
    closed: Cell<bool>,
    ready: Event,
}

/// The fan-out of HA events to stream clients.
#[derive(Debug, Default)]
pub struct Feed {
    clients: RefCell<Vec<Weak<Client>>>,
    /// Wakes the link when [`Feed::wanted`] may have changed.
    changed: Event,
    /// Goes up with every change of the receivers (see [`Feed::generation`]).
    generation: Cell<u64>,
    dropped_slow: Cell<u64>,
}

/// One client's queue; dropping it unsubscribes.
#[derive(Debug)]
pub struct Receiver {
    client: Rc<Client>,
    feed: Weak<Feed>,
}

impl Feed {
    /// A receiver of the events of `types`, or `None` at [`MAX_CLIENTS`].
    pub fn subscribe(self: &Rc<Feed>, types: Types) -> Option<Receiver> {
        let mut clients = self.clients.borrow_mut();
        clients.retain(|c| c.strong_count() > 0);
        if clients.len() >= MAX_CLIENTS {
            return None;
        }
        let client = Rc::new(Client {
            types,
            queue: RefCell::new(VecDeque::new()),
            bytes: Cell::new(0),
            closed: Cell::new(false),
            ready: Event::new(),
        });
        clients.push(Rc::downgrade(&client));
        drop(clients);
        self.generation.set(self.generation.get() + 1);
        self.changed.notify(usize::MAX);
        Some(Receiver {
            client,
            feed: Rc::downgrade(self),
        })
    }

    /// The event types the link must subscribe to now: `"*"` for all, else the union of
    /// the receivers' types.
    pub fn wanted(&self) -> BTreeSet<String> {
        let mut wanted = BTreeSet::new();
        for c in self.clients.borrow().iter().filter_map(Weak::upgrade) {
            match &c.types {
                None => {
                    wanted.clear();
                    wanted.insert("*".to_owned());
                    return wanted;
                }
                Some(types) => wanted.extend(types.iter().cloned()),
            }
        }
        wanted
    }

    /// Resolves when [`Feed::wanted`] may have changed. A waiter that is not always
    /// listening compares [`Feed::generation`] too.
    pub fn listen(&self) -> event_listener::EventListener {
        self.changed.listen()
    }

    /// Goes up whenever a receiver comes or goes ([`Feed::wanted`] may have changed).
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    /// Queues HA's event (`event_type`, its JSON as HA sent it) for every receiver that
    /// wants it; `state_changed` is not passed on (the mirror sends those).
    pub fn publish(&self, event_type: &str, event_json: &str) {
        if event_type == "state_changed" {
            return;
        }
        let mut rendered: Option<Rc<str>> = None;
        for c in self.clients.borrow().iter().filter_map(Weak::upgrade) {
            if c.closed.get() || c.types.as_ref().is_some_and(|t| !t.contains(event_type)) {
                continue;
            }
            let text = rendered
                .get_or_insert_with(|| Rc::from(format!("data: {event_json}\n\n")))
                .clone();
            let bytes = c.bytes.get() + text.len();
            if c.queue.borrow().len() >= MAX_QUEUED || bytes > MAX_QUEUED_BYTES {
                c.closed.set(true);
                c.queue.borrow_mut().clear();
                c.bytes.set(0);
                self.dropped_slow.set(self.dropped_slow.get() + 1);
                log::warn!("an event stream client fell behind on HA's events; dropped");
            } else {
                c.bytes.set(bytes);
                c.queue.borrow_mut().push_back(text);
            }
            c.ready.notify(1);
        }
    }

    /// Receivers now.
    pub fn clients(&self) -> usize {
        self.clients
            .borrow()
            .iter()
            .filter(|c| c.strong_count() > 0)
            .count()
    }

    /// Receivers dropped for falling behind (total).
    pub fn dropped_slow(&self) -> u64 {
        self.dropped_slow.get()
    }
}

impl Receiver {
    /// The next queued event without waiting: `Ok(None)` when none is queued, `Err(())`
    /// once dropped for falling behind (events were lost).
    #[allow(clippy::result_unit_err)]
    pub fn try_recv(&mut self) -> Result<Option<Rc<str>>, ()> {
        if self.client.closed.get() {
            return Err(());
        }
        let text = self.client.queue.borrow_mut().pop_front();
        if let Some(text) = &text {
            self.client
                .bytes
                .set(self.client.bytes.get().saturating_sub(text.len()));
        }
        Ok(text)
    }

    /// The next rendered event; `None` once dropped for falling behind.
    pub async fn recv(&mut self) -> Option<Rc<str>> {
        loop {
            if self.client.closed.get() {
                return None;
            }
            if let Some(text) = self.client.queue.borrow_mut().pop_front() {
                self.client
                    .bytes
                    .set(self.client.bytes.get().saturating_sub(text.len()));
                return Some(text);
            }
            let listener = self.client.ready.listen();
            if self.client.closed.get() || !self.client.queue.borrow().is_empty() {
                continue;
            }
            listener.await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(feed) = self.feed.upgrade() {
            // The client's Weak goes dead with this Rc; the link re-reads `wanted`.
            feed.generation.set(feed.generation.get() + 1);
            feed.changed.notify(usize::MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_routed_and_wanted() {
        let feed = Rc::new(Feed::default());
        assert!(feed.wanted().is_empty());
        let g0 = feed.generation();
        let mut doorbell = feed
            .subscribe(Some(HashSet::from(["doorbell".to_owned()])))
            .unwrap();
        assert_eq!(feed.wanted(), BTreeSet::from(["doorbell".to_owned()]));
        assert!(
            feed.generation() > g0,
            "a watcher that was not listening sees the change"
        );
        let all = feed.subscribe(None).unwrap();
        assert_eq!(feed.wanted(), BTreeSet::from(["*".to_owned()]));
        let g1 = feed.generation();
        drop(all);
        assert!(feed.generation() > g1);
        assert_eq!(feed.wanted(), BTreeSet::from(["doorbell".to_owned()]));
        feed.publish("state_changed", "{}");
        feed.publish("call_service", r#"{"event_type":"call_service"}"#);
        feed.publish("doorbell", r#"{"event_type":"doorbell"}"#);
        let got = smol::block_on(doorbell.recv()).unwrap();
        assert_eq!(&*got, "data: {\"event_type\":\"doorbell\"}\n\n");
        drop(doorbell);
        assert!(feed.wanted().is_empty());
    }

    #[test]
    fn a_client_that_falls_behind_is_dropped() {
        let feed = Rc::new(Feed::default());
        let mut r = feed.subscribe(None).unwrap();
        for _ in 0..=MAX_QUEUED {
            feed.publish("x", "{}");
        }
        assert_eq!(smol::block_on(r.recv()), None);
        assert_eq!(feed.dropped_slow(), 1);
    }
}
