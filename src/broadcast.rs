//! The fan-out of changes to push clients (`/api/stream` today, the local WebSocket API
//! next): a registry of clients, each with a [`Selection`] of entities and a bounded queue.
//! A change is wrapped once in an [`Event`] shared by every client that selects it; each
//! kind of client renders it once (see [`Event::rendered`]), so N clients cost one
//! serialisation, not N.
//!
//! Each queue holds at most [`CLIENT_QUEUE`] events; a client that falls that far behind is
//! disconnected and counted, so a stuck reader can never grow our memory. At most
//! [`MAX_CLIENTS`] clients at once.

use std::cell::{Cell, OnceCell, RefCell};
use std::rc::Rc;

use smol::channel::{Receiver, Sender, TrySendError, bounded};

use crate::store::Change;

/// Most concurrent clients; more are refused.
pub const MAX_CLIENTS: usize = 64;
/// Events queued per client before it is disconnected as too slow.
pub const CLIENT_QUEUE: usize = 256;

/// Which entities a client wants: entries ending in `.` or `*` are prefixes, others exact
/// ids; empty selects everything.
#[derive(Debug, Clone, Default)]
pub struct Selection(Vec<String>);

impl Selection {
    /// Parses a comma-separated list such as `light.,switch.kitchen,sensor.temp*`.
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

/// One change as queued to clients.
#[derive(Debug)]
pub struct Event {
    /// The change.
    pub change: Change,
    /// Its wire form, rendered by the first client that needs it.
    rendered: OnceCell<Box<str>>,
}

impl Event {
    /// The change rendered by `render`, once for all clients of one kind.
    pub fn rendered(&self, render: impl FnOnce(&Change) -> String) -> &str {
        self.rendered
            .get_or_init(|| render(&self.change).into_boxed_str())
    }
}

#[derive(Debug)]
struct Client {
    /// Registry key.
    id: u64,
    /// What it wants.
    selection: Selection,
    /// Its queue.
    tx: Sender<Rc<Event>>,
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

/// The registry of clients. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Broadcast(Rc<Inner>);

/// One client's end: its queue; removed from the registry on drop.
#[derive(Debug)]
pub struct Subscription {
    /// Its queue.
    pub rx: Receiver<Rc<Event>>,
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

impl Broadcast {
    /// Registers a client, or `None` when [`MAX_CLIENTS`] are connected.
    pub fn subscribe(&self, selection: Selection) -> Option<Subscription> {
        let mut clients = self.0.clients.borrow_mut();
        if clients.len() >= MAX_CLIENTS {
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

    /// Queues `changes` for every client that selects them. Clients whose queue is full are
    /// disconnected.
    pub fn publish(&self, changes: &[Change]) {
        let mut clients = self.0.clients.borrow_mut();
        if clients.is_empty() {
            return;
        }
        for change in changes {
            let mut event: Option<Rc<Event>> = None;
            clients.retain(|c| {
                if !c.selection.matches(&change.entity_id) {
                    return true;
                }
                let e = event.get_or_insert_with(|| {
                    Rc::new(Event {
                        change: change.clone(),
                        rendered: OnceCell::new(),
                    })
                });
                match c.tx.try_send(e.clone()) {
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
        let (x, y) = (
            b.subscribe(Selection::default()).unwrap(),
            b.subscribe(Selection::default()).unwrap(),
        );
        b.publish(&[change("light.a")]);
        let (ex, ey) = (x.rx.try_recv().unwrap(), y.rx.try_recv().unwrap());
        assert!(Rc::ptr_eq(&ex, &ey));
        let calls = Cell::new(0);
        for e in [&ex, &ey] {
            let text = e.rendered(|c| {
                calls.set(calls.get() + 1);
                c.entity_id.clone()
            });
            assert_eq!(text, "light.a");
        }
        assert_eq!(calls.get(), 1);
    }
}
