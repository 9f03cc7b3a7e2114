//! The push stream, `GET /api/stream`: Server-Sent Events (WHATWG HTML §9.2) with one
//! `event: state_changed` per change to a tracked entity, `data:` in HA's `state_changed`
//! shape `{"entity_id", "old_state", "new_state"}` (`new_state: null` on removal).
//!
//! An [`EventStream`] is the response body: the snapshot first (when asked for), then the
//! client's [`Subscription`] from [`crate::broadcast`], which bounds its queue and the
//! number of clients. A `:` comment every [`KEEPALIVE`] keeps proxies and browsers from
//! timing the stream out.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Serialize;
use smol::future::FutureExt;

use crate::broadcast::Subscription;
use crate::deadline::Deadline;
use crate::entity::EntityState;
use crate::http::{CHUNK, Pieces};
use crate::store::Change;

/// Period of `:` keep-alive comments.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

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

/// [`format_event`] for a [`Change`].
pub fn format_change(change: &Change) -> String {
    format_event(
        &change.entity_id,
        change.old_state.as_deref(),
        change.new_state.as_deref(),
    )
}

/// The body of `/api/stream`: `retry:`, the snapshot (formatted [`CHUNK`] bytes at a time,
/// so a 20,000-entity snapshot is never held as one ~15 MB string), then live events and
/// keep-alives until the client leaves. Close-delimited.
#[derive(Debug)]
pub struct EventStream {
    /// States still to send as events before live ones (`old_state: null`), reversed.
    first: Vec<Rc<EntityState>>,
    /// Whether `retry:` has been sent.
    opened: bool,
    /// The client's queue.
    subscription: Subscription,
    /// When the next keep-alive is due; one lazily re-armed timer (a fresh `Timer` per event
    /// would wake the reactor each time).
    keepalive: Deadline,
}

impl EventStream {
    /// A stream that sends `first` as events, then what `subscription` receives.
    pub fn new(mut first: Vec<Rc<EntityState>>, subscription: Subscription) -> EventStream {
        first.reverse();
        EventStream {
            first,
            opened: false,
            subscription,
            keepalive: Deadline::new(Instant::now() + KEEPALIVE),
        }
    }
}

impl Pieces for EventStream {
    fn length(&self) -> Option<usize> {
        None
    }

    fn next<'a>(&'a mut self, buf: &'a mut Vec<u8>) -> Pin<Box<dyn Future<Output = bool> + 'a>> {
        Box::pin(async move {
            if !self.opened {
                self.opened = true;
                buf.extend_from_slice(b"retry: 2000\n\n");
            }
            if !self.first.is_empty() {
                while let Some(s) = self.first.pop() {
                    buf.extend_from_slice(format_event(&s.entity_id, None, Some(&s)).as_bytes());
                    if buf.len() >= CHUNK {
                        break;
                    }
                }
                return true;
            }
            if !buf.is_empty() {
                return true;
            }
            enum Wake {
                Event(Option<Rc<crate::broadcast::Event>>),
                KeepAlive,
            }
            let subscription = &mut self.subscription;
            let keepalive = &mut self.keepalive;
            let wake = async { Wake::Event(subscription.recv().await) }
                .or(async {
                    keepalive.elapsed().await;
                    Wake::KeepAlive
                })
                .await;
            match wake {
                Wake::Event(Some(event)) => {
                    buf.extend_from_slice(event.rendered(format_change).as_bytes());
                    // Batch whatever else is queued into one write.
                    while let Some(more) = self.subscription.try_recv() {
                        buf.extend_from_slice(more.rendered(format_change).as_bytes());
                        if buf.len() > CHUNK {
                            break;
                        }
                    }
                }
                Wake::KeepAlive => buf.extend_from_slice(b": keep-alive\n\n"),
                // Disconnected by the broadcast (too slow): end the stream.
                Wake::Event(None) => return false,
            }
            self.keepalive.set(Instant::now() + KEEPALIVE);
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_event_has_null_new_state() {
        let e = format_event("light.a", None, None);
        assert_eq!(
            e,
            "event: state_changed\ndata: {\"entity_id\":\"light.a\",\"old_state\":null,\"new_state\":null}\n\n"
        );
    }
}
