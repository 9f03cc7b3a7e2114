//! The push stream, `GET /api/stream`: Server-Sent Events (WHATWG HTML §9.2) in HA's own
//! format (`components/api/__init__.py` `APIEventStream`), so a page written for HA works
//! unchanged: unnamed `data:` messages (an `EventSource`'s `onmessage`), `data: ping` when
//! the stream opens and as the keep-alive, and one message per change to a tracked entity
//! with HA's event envelope:
//! `{"event_type":"state_changed","data":{"entity_id","old_state","new_state"},
//! "origin":"LOCAL","time_fired","context"}` (`new_state: null` on removal). `time_fired` and
//! `context` are the new state's `last_updated` and `context`, as HA fires them
//! (`core.py` `async_set_internal`); for a removal, the time hass-edge learnt of it and the
//! old state's context.
//!
//! An [`EventStream`] is the response body: the snapshot first (when asked for), then the
//! client's [`Subscription`] from [`crate::broadcast`], which bounds its queue and the
//! number of clients. `data: ping` every [`KEEPALIVE`] keeps proxies and browsers from
//! timing the stream out (HA sends it every 50 s).

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Serialize;
use smol::future::FutureExt;

use crate::broadcast::{Render, Subscription};
use crate::deadline::Deadline;
use crate::entity::{Context, EntityState, Timestamp};
use crate::events::Receiver as EventReceiver;
use crate::http::{CHUNK, Pieces, STREAM_PIECE};
use crate::store::Change;

/// Period of `:` keep-alive comments.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

#[derive(Serialize)]
struct Data<'a> {
    entity_id: &'a str,
    old_state: Option<&'a EntityState>,
    new_state: Option<&'a EntityState>,
}

/// HA's event envelope (`core.py` `Event.as_dict`), in its key order.
#[derive(Serialize)]
struct Envelope<'a> {
    event_type: &'static str,
    data: Data<'a>,
    origin: &'static str,
    time_fired: Timestamp,
    context: Option<&'a Context>,
}

/// The keep-alive message, and the first one of every stream (HA `STREAM_PING_PAYLOAD`).
pub const PING: &[u8] = b"data: ping\n\n";

/// Formats one SSE message carrying a `state_changed` event in HA's envelope.
pub fn format_event(
    entity_id: &str,
    old_state: Option<&EntityState>,
    new_state: Option<&EntityState>,
) -> String {
    format!(
        "data: {}\n\n",
        state_changed_json(entity_id, old_state, new_state)
    )
}

/// HA's `state_changed` event object (`core.py` `Event.as_dict`, key order kept):
/// `{"event_type":"state_changed","data":{"entity_id","old_state","new_state"},
/// "origin":"LOCAL","time_fired","context"}`; the body of an SSE message and of a
/// WebSocket API `subscribe_events` event.
pub fn state_changed_json(
    entity_id: &str,
    old_state: Option<&EntityState>,
    new_state: Option<&EntityState>,
) -> String {
    let (time_fired, context) = match (new_state, old_state) {
        (Some(new), _) => (new.last_updated, Some(&new.context)),
        (None, old) => (Timestamp::now(), old.map(|o| &o.context)),
    };
    serde_json::to_string(&Envelope {
        event_type: "state_changed",
        data: Data {
            entity_id,
            old_state,
            new_state,
        },
        origin: "LOCAL",
        time_fired,
        context,
    })
    .unwrap_or_default()
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
    /// HA's other events, when the client wants some.
    others: Option<EventReceiver>,
    /// When the next keep-alive is due; one lazily re-armed timer (a fresh `Timer` per event
    /// would wake the reactor each time).
    keepalive: Deadline,
}

impl EventStream {
    /// A stream that sends `first` as events, then what `subscription` receives.
    pub fn new(
        mut first: Vec<Rc<EntityState>>,
        subscription: Subscription,
        others: Option<EventReceiver>,
    ) -> EventStream {
        first.reverse();
        EventStream {
            first,
            opened: false,
            subscription,
            others,
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
                buf.extend_from_slice(PING);
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
                Other(Option<Rc<str>>),
                KeepAlive,
            }
            let subscription = &mut self.subscription;
            let others = &mut self.others;
            let keepalive = &mut self.keepalive;
            let wake = async { Wake::Event(subscription.recv().await) }
                .or(async {
                    match others {
                        Some(r) => Wake::Other(r.recv().await),
                        None => std::future::pending().await,
                    }
                })
                .or(async {
                    keepalive.elapsed().await;
                    Wake::KeepAlive
                })
                .await;
            match wake {
                Wake::Other(Some(text)) => {
                    buf.extend_from_slice(text.as_bytes());
                }
                // Fell behind on HA's events: end the stream, as for state changes.
                Wake::Other(None) => return false,
                Wake::Event(Some(event)) => {
                    buf.extend_from_slice(event.rendered(Render::Sse, format_change).as_bytes());
                    // Batch whatever else is queued into one write.
                    while let Some(more) = self.subscription.try_recv() {
                        buf.extend_from_slice(more.rendered(Render::Sse, format_change).as_bytes());
                        if buf.len() > STREAM_PIECE {
                            break;
                        }
                    }
                }
                Wake::KeepAlive => buf.extend_from_slice(PING),
                // Disconnected by the broadcast (too slow): end the stream.
                Wake::Event(None) => return false,
            }
            self.keepalive.set(Instant::now() + KEEPALIVE);
            true
        })
    }

    fn abandoned(&self) -> Pin<Box<dyn Future<Output = ()> + '_>> {
        // Dropped by the broadcast for falling behind: end now, even mid-write.
        Box::pin(self.subscription.closed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_has_envelope() {
        let new: EntityState = serde_json::from_str(
            r#"{"entity_id":"light.a","state":"on","attributes":{},"last_changed":"2024-03-20T10:00:00.000001+00:00","last_updated":"2024-03-20T10:00:00.000002+00:00","context":{"id":"01HSC","parent_id":null,"user_id":null}}"#,
        )
        .unwrap();
        let e = format_event("light.a", None, Some(&new));
        let json = e
            .strip_prefix("data: ")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["event_type", "data", "origin", "time_fired", "context"]
        );
        assert_eq!(v["event_type"], "state_changed");
        assert_eq!(v["time_fired"], "2024-03-20T10:00:00.000002+00:00");
        assert_eq!(v["context"]["id"], "01HSC");
        assert_eq!(v["data"]["old_state"], serde_json::Value::Null);
        assert_eq!(v["data"]["new_state"]["state"], "on");
        // A removal: new_state null, the old state's context.
        let e = format_event("light.a", Some(&new), None);
        let v: serde_json::Value =
            serde_json::from_str(e.trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(v["data"]["new_state"], serde_json::Value::Null);
        assert_eq!(v["context"]["id"], "01HSC");
    }
}
