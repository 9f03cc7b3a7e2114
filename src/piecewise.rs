//! Messages rendered a piece at a time as they are written: a list of states (`GET
//! /api/states`, the WebSocket API's `get_states` result and `subscribe_entities`' first event)
//! or a shared text (a cached answer, a frame received from HA). With 10,000 entities such a
//! message is megabytes; rendering it whole for every client that asks, and holding it while
//! a slow client reads, would cost that much per client. One writer serves the REST list
//! ([`crate::api`]) and the WebSocket messages ([`crate::ws_api`], [`crate::ws_server`]).

use std::ops::Range;
use std::rc::Rc;

use crate::entity::EntityState;

/// How each state of a [`Piecewise`] message is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// HA's state JSON ([`EntityState::to_json`]): `get_states`' result.
    Json,
    /// `"<entity_id>":<compressed state>` ([`crate::compressed::write_initial_entry`]):
    /// `subscribe_entities`' first event.
    Compressed,
}

impl Form {
    /// Writes `state` in this form to `out` (a `Vec` or a counter, which cannot fail);
    /// `entry` is scratch space for the compressed form, reused across states.
    fn write(self, state: &EntityState, entry: &mut String, out: &mut impl std::io::Write) {
        match self {
            Form::Json => drop(serde_json::to_writer(out, state)),
            Form::Compressed => {
                entry.clear();
                crate::compressed::write_initial_entry(entry, state);
                drop(out.write_all(entry.as_bytes()));
            }
        }
    }
}

/// The middle of a [`Piecewise`] message.
enum Body {
    /// States separated by commas, each written in the [`Form`].
    States(Vec<Rc<EntityState>>, Form),
    /// A range of a text kept anyway, without a copy of it — a cached answer every session
    /// sends, a frame received from HA — copied a piece at a time. The range is on
    /// character boundaries ([`Piecewise::text`] checks).
    Text(Rc<dyn AsRef<str>>, Range<usize>),
}

impl Body {
    fn text(&self) -> Option<&str> {
        match self {
            Body::States(..) => None,
            Body::Text(text, range) => (**text).as_ref().get(range.clone()),
        }
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::States(states, form) => write!(f, "States({} states, {form:?})", states.len()),
            Body::Text(_, range) => write!(f, "Text({range:?})"),
        }
    }
}

impl PartialEq for Body {
    fn eq(&self, other: &Body) -> bool {
        match (self, other) {
            (Body::States(a, f), Body::States(b, g)) => a == b && f == g,
            (Body::Text(..), Body::Text(..)) => self.text() == other.text(),
            _ => false,
        }
    }
}

/// A message that may be large — `get_states`' result, `subscribe_entities`' first event, a
/// cached registry list — rendered a piece at a time as it is written
/// ([`Piecewise::write_piece`]), so that a session never holds the whole text: with 10,000
/// entities it is megabytes, for every client that asks, and a client that does not read
/// would keep it for the write timeout. The text is `head`, the body, `tail`.
#[derive(Debug, PartialEq)]
pub struct Piecewise {
    head: String,
    body: Body,
    tail: &'static str,
}

impl Piecewise {
    /// `head`, `states` separated by commas, each in `form`, then `tail`.
    pub fn states(
        head: String,
        states: Vec<Rc<EntityState>>,
        form: Form,
        tail: &'static str,
    ) -> Piecewise {
        let body = Body::States(states, form);
        Piecewise { head, body, tail }
    }

    /// `head`, the whole of `text` (shared, not copied), then `tail`.
    pub fn shared(head: String, text: Rc<dyn AsRef<str>>, tail: &'static str) -> Piecewise {
        let range = 0..(*text).as_ref().len();
        let body = Body::Text(text, range);
        Piecewise { head, body, tail }
    }

    /// Appends the next piece to `out`, until `out` holds at least `limit` bytes (a state
    /// or a character more at most) or the message ends. `*next` counts what is written of
    /// the body (states, or bytes of shared text); `head` goes first when it is 0. Pieces
    /// end between states or characters, so each is whole UTF-8. Returns whether the
    /// message is complete. Bytes, not a `String`: the JSON of a state is serialised
    /// straight into `out`, which a `String` would not allow without a check of every write.
    pub fn write_piece(&self, next: &mut usize, out: &mut Vec<u8>, limit: usize) -> bool {
        if *next == 0 {
            out.extend_from_slice(self.head.as_bytes());
        }
        match &self.body {
            Body::States(states, form) => {
                let mut entry = String::new();
                while let Some(state) = states.get(*next) {
                    if *next > 0 {
                        out.push(b',');
                    }
                    form.write(state, &mut entry, out);
                    *next += 1;
                    if out.len() >= limit && *next < states.len() {
                        return false;
                    }
                }
            }
            Body::Text(..) => {
                let text = self.body.text().unwrap_or_default();
                if *next < text.len() {
                    let room = limit.saturating_sub(out.len()).max(1);
                    let mut end = next.saturating_add(room).min(text.len());
                    while !text.is_char_boundary(end) {
                        end += 1;
                    }
                    out.extend_from_slice(&text.as_bytes()[*next..end]);
                    *next = end;
                    if end < text.len() {
                        return false;
                    }
                }
            }
        }
        out.extend_from_slice(self.tail.as_bytes());
        true
    }

    /// `head`, the `range` of `text`, `tail`: a message made of a text kept anyway (a frame
    /// received from HA) without copying it. `None` when `range` is not on character
    /// boundaries of `text`.
    pub fn text(
        head: String,
        text: Rc<dyn AsRef<str>>,
        range: Range<usize>,
        tail: &'static str,
    ) -> Option<Piecewise> {
        let body = Body::Text(text, range);
        body.text()?;
        Some(Piecewise { head, body, tail })
    }

    /// The whole text.
    pub fn whole(&self) -> String {
        let mut out = Vec::new();
        self.write_piece(&mut 0, &mut out, usize::MAX);
        // Every piece is whole UTF-8 (see `write_piece`).
        String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into())
    }

    /// The length of the whole text in bytes (for `Content-Length`), counted without
    /// keeping it: HA's JSON of each state is serialised into a counter.
    pub fn rendered_len(&self) -> usize {
        let body = match &self.body {
            Body::States(states, form) => {
                let mut count = Count(states.len().saturating_sub(1));
                let mut entry = String::new();
                for state in states {
                    form.write(state, &mut entry, &mut count);
                }
                count.0
            }
            Body::Text(_, range) => range.len(),
        };
        self.head.len() + body + self.tail.len()
    }
}

/// An `io::Write` that only counts.
struct Count(usize);

impl std::io::Write for Count {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(entity_id: &str, value: &str) -> Rc<EntityState> {
        let json = format!(
            r#"{{"entity_id":"{entity_id}","state":"{value}","attributes":{{"friendly_name":"Ké \"q\" \u00e9😀"}},"last_changed":"2024-03-01T10:00:00+00:00","last_updated":"2024-03-01T10:00:00+00:00","context":{{"id":"c","parent_id":null,"user_id":null}}}}"#
        );
        Rc::new(serde_json::from_str(&json).unwrap())
    }

    #[test]
    fn a_list_of_states_is_ha_json_whole_and_in_pieces() {
        let states: Vec<_> = (0..40)
            .map(|i| state(&format!("sensor.s{i}"), &i.to_string()))
            .collect();
        let m = Piecewise::states("[".into(), states.clone(), Form::Json, "]");
        let expected = format!(
            "[{}]",
            states
                .iter()
                .map(|s| s.to_json())
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_eq!(m.whole(), expected);
        assert_eq!(m.rendered_len(), expected.len());
        let (mut next, mut joined, mut count) = (0, Vec::new(), 0);
        loop {
            let mut piece = Vec::new();
            let done = m.write_piece(&mut next, &mut piece, 300);
            count += 1;
            assert!(
                std::str::from_utf8(&piece).is_ok(),
                "piece {count} is not whole UTF-8"
            );
            joined.extend_from_slice(&piece);
            if done {
                break;
            }
        }
        assert_eq!(String::from_utf8(joined).unwrap(), expected);
        assert!(count > 5, "{count} pieces");
    }

    #[test]
    fn an_empty_list_is_head_and_tail() {
        let m = Piecewise::states("[".into(), Vec::new(), Form::Json, "]");
        assert_eq!(m.whole(), "[]");
        assert_eq!(m.rendered_len(), 2);
    }

    #[test]
    fn a_shared_text_is_written_whole() {
        let text: Rc<dyn AsRef<str>> = Rc::new(String::from(r#"[{"a":"é"}]"#));
        let m = Piecewise::shared("{\"result\":".into(), text, "}");
        assert_eq!(m.whole(), r#"{"result":[{"a":"é"}]}"#);
        assert_eq!(m.rendered_len(), m.whole().len());
    }
}
