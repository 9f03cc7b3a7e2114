//! Home Assistant state objects and the compressed format of `subscribe_entities`.
//!
//! [`EntityState`] serialises to exactly the JSON that HA's `GET /api/states/<entity_id>`
//! returns (HA `core.py` `State.as_dict`): `entity_id`, `state`, `attributes`,
//! `last_changed`, `last_reported` (HA ≥ 2024.4), `last_updated`, `context`
//! `{id, parent_id, user_id}`. Timestamps are kept as whole microseconds since the epoch
//! and printed like Python's `datetime.isoformat()` in UTC.
//!
//! The compressed format (HA `websocket_api/messages.py`, `_state_diff` and
//! `compressed_state_dict_add`): a full state is `{s, a, c, lc, lu?}` with `lc`/`lu` float epoch
//! seconds (`lu` omitted when equal to `lc`) and `c` either a context id string or an object;
//! a diff is `{"+": {s?, a?, c?, lc?|lu?}, "-": {"a": [names]}}`.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// An error decoding or applying HA's data. Never fatal: the entity is dropped and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// A point in time: whole microseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

/// Years 1970..=9999 keep every timestamp printable in four digits, as Python prints them.
const MAX_MICROS: i64 = 253_402_300_799_999_999;

impl Timestamp {
    /// Converts HA's float epoch seconds (`lc`, `lu`), rounding to the nearest microsecond as
    /// Python's `datetime.fromtimestamp` does, so the printed value equals HA's REST output.
    ///
    /// Errors: not finite, negative, or beyond year 9999.
    pub fn from_epoch_seconds(seconds: f64) -> Result<Timestamp, DecodeError> {
        if !seconds.is_finite() || !(0.0..=(MAX_MICROS / 1_000_000) as f64).contains(&seconds) {
            return Err(DecodeError(format!("timestamp {seconds} is out of range")));
        }
        // Split first: the fraction of an f64 is exact, so rounding it cannot carry an error
        // from the integer part (a float near 1.8e9 s has ~0.24 µs resolution).
        let whole = seconds.trunc();
        let micros = ((seconds - whole) * 1e6).round_ties_even() as i64;
        Ok(Timestamp(whole as i64 * 1_000_000 + micros))
    }

    /// Parses HA's REST form, `YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00`.
    ///
    /// Errors: any other shape (HA always prints UTC with a `+00:00` offset).
    pub fn parse_iso(text: &str) -> Result<Timestamp, DecodeError> {
        let err = || DecodeError(format!("timestamp {text:?} is not HA's ISO 8601 UTC form"));
        let b = text.as_bytes();
        let (head, tail) = text.split_at_checked(19).ok_or_else(err)?;
        let num = |r: std::ops::Range<usize>| -> Result<i64, DecodeError> {
            let s = head.get(r).ok_or_else(err)?;
            if !s.bytes().all(|c| c.is_ascii_digit()) {
                return Err(err());
            }
            s.parse().map_err(|_| err())
        };
        if b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
            return Err(err());
        }
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&month)
            || !(1..=31).contains(&day)
            || hour > 23
            || minute > 59
            || second > 59
        {
            return Err(err());
        }
        let (fraction, offset) = match tail.strip_prefix('.') {
            Some(rest) => rest.split_at_checked(6).ok_or_else(err)?,
            None => ("", tail),
        };
        if offset != "+00:00" || !fraction.bytes().all(|c| c.is_ascii_digit()) {
            return Err(err());
        }
        let micros: i64 = if fraction.is_empty() {
            0
        } else {
            fraction.parse().map_err(|_| err())?
        };
        let days = days_from_civil(year, month, day);
        Ok(Timestamp(
            ((days * 24 + hour) * 60 + minute) * 60_000_000 + second * 1_000_000 + micros,
        ))
    }

    /// Now, from the system clock.
    pub fn now() -> Timestamp {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        Timestamp(i64::try_from(micros).unwrap_or(MAX_MICROS).min(MAX_MICROS))
    }

    /// Seconds since the epoch as a float (for `LastEventTime`-style outputs and comparisons).
    pub fn as_epoch_seconds(self) -> f64 {
        self.0 as f64 / 1e6
    }

    /// Writes the ISO form into `buf` and returns its length (at most 32 bytes).
    fn format(self, buf: &mut [u8; 32]) -> usize {
        let secs = self.0.div_euclid(1_000_000);
        let micros = self.0.rem_euclid(1_000_000);
        let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (y, m, d) = civil_from_days(days);
        let mut w = Writer { buf, len: 0 };
        w.digits(y, 4);
        w.byte(b'-');
        w.digits(m, 2);
        w.byte(b'-');
        w.digits(d, 2);
        w.byte(b'T');
        w.digits(sod / 3600, 2);
        w.byte(b':');
        w.digits(sod / 60 % 60, 2);
        w.byte(b':');
        w.digits(sod % 60, 2);
        // Python's isoformat() omits the fraction entirely when it is zero.
        if micros != 0 {
            w.byte(b'.');
            w.digits(micros, 6);
        }
        for &c in b"+00:00" {
            w.byte(c);
        }
        w.len
    }
}

struct Writer<'a> {
    buf: &'a mut [u8; 32],
    len: usize,
}

impl Writer<'_> {
    fn byte(&mut self, c: u8) {
        self.buf[self.len] = c;
        self.len += 1;
    }
    fn digits(&mut self, mut v: i64, width: usize) {
        for i in (0..width).rev() {
            self.buf[self.len + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        self.len += width;
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 32];
        let n = self.format(&mut buf);
        f.write_str(std::str::from_utf8(&buf[..n]).map_err(|_| fmt::Error)?)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 32];
        let n = self.format(&mut buf);
        // The buffer only ever holds ASCII digits and punctuation.
        s.serialize_str(std::str::from_utf8(&buf[..n]).unwrap_or_default())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Timestamp::parse_iso(&text).map_err(de::Error::custom)
    }
}

/// HA's float `raw` if it still rounds to `t`, else `t` as Python's `datetime.timestamp()`
/// gives it for a microsecond datetime: `timedelta.total_seconds()`, i.e. the integer
/// microseconds divided by 10**6, correctly rounded — which is what one IEEE division of the
/// exactly representable microseconds (< 2**53) by 1e6 gives.
fn trusted(raw: Option<f64>, t: Timestamp) -> f64 {
    match raw {
        Some(f) if Timestamp::from_epoch_seconds(f) == Ok(t) => f,
        _ => t.as_epoch_seconds(),
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
/// Howard Hinnant, "chrono-Compatible Low-Level Date Algorithms", `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) → days since 1970-01-01; the inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// HA's `Context`: what caused a state (HA `core.py` `Context.as_dict`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    /// ULID of the context.
    pub id: String,
    /// The context that caused this one, if any.
    pub parent_id: Option<String>,
    /// The HA user behind the change, if any.
    pub user_id: Option<String>,
}

/// An entity's attributes, kept as the JSON object text HA sent (compact, HA's key order).
///
/// Stored as text rather than a parsed map: a parsed `serde_json::Map` costs about three
/// times the text (a hash table, a heap string per key, a `Value` per entry), and the text is
/// what every read serialises anyway. Attribute diffs (`subscribe_entities` `c` with `a` or
/// `-`) parse, patch and re-serialise it ([`Attributes::patch`]).
///
/// Equality is textual: two texts that differ only in formatting compare unequal, which at
/// worst reports a change that was not one; it never hides a real change.
#[derive(Clone)]
pub struct Attributes(Box<RawValue>);

impl Attributes {
    /// The JSON text of the object.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// The attributes as a map, in HA's order.
    ///
    /// Errors: never for a value built by this type (it holds a JSON object); kept a
    /// `Result` so a broken invariant is a dropped entity, not a panic.
    pub fn to_map(&self) -> Result<Map<String, Value>, DecodeError> {
        serde_json::from_str(self.get()).map_err(|e| DecodeError(format!("attributes: {e}")))
    }

    /// Builds the text of `map`.
    pub fn from_map(map: &Map<String, Value>) -> Attributes {
        // A map of JSON values always serialises; the fallback is an empty object.
        Attributes(serde_json::value::to_raw_value(map).unwrap_or_else(|_| Self::empty_raw()))
    }

    /// Sets `add` (in place, or appended in order) and removes `remove`, as HA's frontend
    /// applies a diff (`home-assistant-js-websocket` `entities.ts`).
    ///
    /// Errors: see [`Attributes::to_map`].
    pub fn patch(
        &mut self,
        add: Option<Map<String, Value>>,
        remove: &[String],
    ) -> Result<(), DecodeError> {
        if add.as_ref().is_none_or(Map::is_empty) && remove.is_empty() {
            return Ok(());
        }
        let mut map = self.to_map()?;
        for (k, v) in add.into_iter().flatten() {
            map.insert(k, v);
        }
        for k in remove {
            map.shift_remove(k);
        }
        *self = Attributes::from_map(&map);
        Ok(())
    }

    fn empty_raw() -> Box<RawValue> {
        // "{}" is valid JSON, so the fallback (`null`) is never taken.
        RawValue::from_string("{}".to_owned()).unwrap_or_default()
    }
}

impl Default for Attributes {
    fn default() -> Attributes {
        Attributes(Self::empty_raw())
    }
}

impl PartialEq for Attributes {
    fn eq(&self, other: &Attributes) -> bool {
        self.get() == other.get()
    }
}

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

impl Serialize for Attributes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Attributes {
    /// Accepts a JSON object only (HA's attributes are always one).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        if !raw.get().trim_start().starts_with('{') {
            return Err(de::Error::invalid_type(
                de::Unexpected::Other("non-object attributes"),
                &"a JSON object",
            ));
        }
        Ok(Attributes(raw))
    }
}

impl From<Map<String, Value>> for Attributes {
    fn from(map: Map<String, Value>) -> Attributes {
        Attributes::from_map(&map)
    }
}

/// One entity's state, as HA's REST API returns it.
///
/// Equality compares what HA's REST API shows (every field but [`EntityState::epoch`]): the
/// same state seen once through `subscribe_entities` (with HA's floats) and once through REST
/// (without) is one state, not a change.
#[derive(Debug, Clone, Deserialize)]
pub struct EntityState {
    /// `<domain>.<object_id>`.
    pub entity_id: String,
    /// The state string (`"on"`, `"21.5"`, `"unavailable"`, …).
    pub state: String,
    /// Attributes, in HA's order.
    #[serde(default)]
    pub attributes: Attributes,
    /// When `state` last changed.
    pub last_changed: Timestamp,
    /// When HA last wrote the state (HA ≥ 2024.4); `None` for older HA, which omits the key.
    #[serde(default)]
    pub last_reported: Option<Timestamp>,
    /// When the state or attributes last changed.
    pub last_updated: Timestamp,
    /// What caused the last update.
    pub context: Context,
    /// HA's own float seconds for `last_changed`/`last_updated`, when they came from HA's
    /// compressed format; used only to print `lc`/`lu` again exactly as HA does
    /// (`crate::compressed`). Not part of the REST JSON, the state file or equality.
    #[serde(skip)]
    pub epoch: EpochSeconds,
}

/// The float epoch seconds HA printed as `lc`/`lu` (HA `core.py` `State.last_changed_timestamp`,
/// `last_updated_timestamp`). HA ≥ 2024.4 keeps the raw `time.time()` float of the update
/// (sub-microsecond, e.g. `1795349249.7111537`), while [`Timestamp`] keeps whole
/// microseconds, so the float cannot be recomputed from it; `None` = unknown (a state from
/// REST or the state file), and then `datetime.timestamp()` of the microsecond time is what HA
/// would print (see [`EntityState::last_changed_epoch`]).
///
/// A float is only trusted while it still rounds to the [`Timestamp`] beside it, so code that
/// sets `last_changed`/`last_updated` directly and leaves a float behind gets the microsecond
/// rendering, never a stale time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EpochSeconds {
    /// `lc` as HA sent it.
    pub last_changed: Option<f64>,
    /// `lu` as HA sent it (or `lc`, when HA omitted `lu` because the two are equal).
    pub last_updated: Option<f64>,
}

impl PartialEq for EntityState {
    fn eq(&self, other: &EntityState) -> bool {
        // Destructured so that a new field must be placed here on purpose.
        let EntityState {
            entity_id,
            state,
            attributes,
            last_changed,
            last_reported,
            last_updated,
            context,
            epoch: _,
        } = self;
        *entity_id == other.entity_id
            && *state == other.state
            && *attributes == other.attributes
            && *last_changed == other.last_changed
            && *last_reported == other.last_reported
            && *last_updated == other.last_updated
            && *context == other.context
    }
}

impl Serialize for EntityState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(6 + usize::from(self.last_reported.is_some())))?;
        m.serialize_entry("entity_id", &self.entity_id)?;
        m.serialize_entry("state", &self.state)?;
        m.serialize_entry("attributes", &self.attributes)?;
        m.serialize_entry("last_changed", &self.last_changed)?;
        if let Some(r) = &self.last_reported {
            m.serialize_entry("last_reported", r)?;
        }
        m.serialize_entry("last_updated", &self.last_updated)?;
        m.serialize_entry("context", &self.context)?;
        m.end()
    }
}

impl EntityState {
    /// The JSON text of this state (HA's REST shape).
    pub fn to_json(&self) -> String {
        // Serialising a map of strings and JSON values cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `last_changed` as float epoch seconds, as HA prints it in `lc`: HA's own float when
    /// known ([`EpochSeconds`]), else the float of the whole microseconds.
    pub fn last_changed_epoch(&self) -> f64 {
        trusted(self.epoch.last_changed, self.last_changed)
    }

    /// `last_updated` as float epoch seconds, as HA prints it in `lu` (see
    /// [`EntityState::last_changed_epoch`]).
    pub fn last_updated_epoch(&self) -> f64 {
        trusted(self.epoch.last_updated, self.last_updated)
    }

    /// Builds the full state from a compressed one (`subscribe_entities` `a` entry).
    /// `with_last_reported` is true for HA ≥ 2024.4, whose REST output carries
    /// `last_reported`; the compressed format omits it, and on every change HA sets it equal
    /// to `last_updated` (see HA-FACTS, core issue #181392).
    ///
    /// Errors: a timestamp out of range.
    pub fn from_compressed(
        entity_id: &str,
        c: CompressedState,
        with_last_reported: bool,
    ) -> Result<EntityState, DecodeError> {
        let last_changed = Timestamp::from_epoch_seconds(c.lc)?;
        let last_updated = match c.lu {
            Some(lu) => Timestamp::from_epoch_seconds(lu)?,
            None => last_changed,
        };
        Ok(EntityState {
            entity_id: entity_id.to_owned(),
            state: c.s,
            attributes: c.a,
            last_changed,
            last_reported: with_last_reported.then_some(last_updated),
            last_updated,
            context: c.c.into_context(),
            epoch: EpochSeconds {
                last_changed: Some(c.lc),
                last_updated: Some(c.lu.unwrap_or(c.lc)),
            },
        })
    }

    /// Applies a `subscribe_entities` `c` diff in place, as HA's frontend does
    /// (`home-assistant-js-websocket` `entities.ts` `processEvent`).
    ///
    /// Errors: a timestamp out of range; the state is then partly changed, so the caller must
    /// drop it (apply to a copy, or remove the entry on error).
    pub fn apply_diff(&mut self, diff: StateDiff) -> Result<(), DecodeError> {
        if let Some(add) = diff.add {
            if let Some(s) = add.s {
                self.state = s;
            }
            if let Some(c) = add.c {
                c.apply_to(&mut self.context);
            }
            // `lc` in a diff means last_updated = last_changed (HA `_state_diff`).
            if let Some(lc) = add.lc {
                let t = Timestamp::from_epoch_seconds(lc)?;
                self.last_changed = t;
                self.last_updated = t;
                self.epoch = EpochSeconds {
                    last_changed: Some(lc),
                    last_updated: Some(lc),
                };
            } else if let Some(lu) = add.lu {
                self.last_updated = Timestamp::from_epoch_seconds(lu)?;
                // HA ≥ 2024.4 builds the new State with the old `last_changed` datetime, so
                // from now on it prints `lc` as that datetime's `.timestamp()` (whole
                // microseconds), not the raw float it sent before (HA `core.py`
                // `State.__init__` caches the raw float only when last_changed ==
                // last_updated). HA 2024.3 always printed the microsecond float.
                self.epoch = EpochSeconds {
                    last_changed: None,
                    last_updated: Some(lu),
                };
            }
            if self.last_reported.is_some() {
                self.last_reported = Some(self.last_updated);
            }
            self.attributes
                .patch(add.a, diff.remove.as_ref().map_or(&[], |r| &r.a))?;
        } else if let Some(remove) = &diff.remove {
            self.attributes.patch(None, &remove.a)?;
        }
        Ok(())
    }
}

/// A full compressed state: `{s, a, c, lc, lu?}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressedState {
    /// State.
    pub s: String,
    /// Attributes.
    #[serde(default)]
    pub a: Attributes,
    /// Context.
    pub c: ContextPatch,
    /// `last_changed`, epoch seconds.
    pub lc: f64,
    /// `last_updated`, epoch seconds, when it differs from `lc`.
    #[serde(default)]
    pub lu: Option<f64>,
}

/// A `c` diff: `{"+": {…}, "-": {"a": […]}}`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateDiff {
    /// Added or changed fields.
    #[serde(rename = "+", default)]
    pub add: Option<DiffAdd>,
    /// Removed attributes.
    #[serde(rename = "-", default)]
    pub remove: Option<DiffRemove>,
}

/// The `+` part of a diff.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffAdd {
    /// New state.
    pub s: Option<String>,
    /// Added or changed attributes.
    pub a: Option<Map<String, Value>>,
    /// Changed context fields.
    pub c: Option<ContextPatch>,
    /// New `last_changed` (and `last_updated`), epoch seconds.
    pub lc: Option<f64>,
    /// New `last_updated`, epoch seconds.
    pub lu: Option<f64>,
}

/// The `-` part of a diff.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffRemove {
    /// Names of removed attributes.
    #[serde(default)]
    pub a: Vec<String>,
}

/// A compressed context: a bare id string, or an object with the fields that are set
/// (full state) or that changed (diff). `None` = key absent; `Some(None)` = `null`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContextPatch {
    /// New id.
    pub id: Option<String>,
    /// New parent id.
    pub parent_id: Option<Option<String>>,
    /// New user id.
    pub user_id: Option<Option<String>>,
}

impl ContextPatch {
    fn apply_to(self, ctx: &mut Context) {
        if let Some(id) = self.id {
            ctx.id = id;
        }
        if let Some(p) = self.parent_id {
            ctx.parent_id = p;
        }
        if let Some(u) = self.user_id {
            ctx.user_id = u;
        }
    }

    fn into_context(self) -> Context {
        let mut ctx = Context::default();
        self.apply_to(&mut ctx);
        ctx
    }
}

impl<'de> Deserialize<'de> for ContextPatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ContextPatch;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a context id string or a context object")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ContextPatch, E> {
                Ok(ContextPatch {
                    id: Some(v.to_owned()),
                    ..Default::default()
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ContextPatch, A::Error> {
                let mut p = ContextPatch::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "id" => p.id = Some(map.next_value()?),
                        "parent_id" => p.parent_id = Some(map.next_value()?),
                        "user_id" => p.user_id = Some(map.next_value()?),
                        other => {
                            return Err(de::Error::unknown_field(
                                other,
                                &["id", "parent_id", "user_id"],
                            ));
                        }
                    }
                }
                Ok(p)
            }
        }
        d.deserialize_any(V)
    }
}

/// Whether `entity_id` has HA's shape `<domain>.<object_id>` (lower-case letters, digits,
/// `_`; see HA `core.py` `valid_entity_id`). Checked before an id goes into a URL.
pub fn valid_entity_id(entity_id: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    entity_id.len() <= 255
        && entity_id
            .split_once('.')
            .is_some_and(|(d, o)| ok(d) && ok(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_id_shape() {
        assert!(valid_entity_id("light.kitchen_2"));
        for bad in [
            "light",
            "light.",
            ".x",
            "Light.x",
            "light.x/../y",
            "light.x.y",
            "light.x%2F",
            "light.ä",
        ] {
            assert!(!valid_entity_id(bad), "{bad}");
        }
    }

    use serde_json::json;

    #[test]
    fn timestamps_print_like_python_isoformat() {
        let t = Timestamp::from_epoch_seconds(1795349248.2321684).unwrap();
        assert_eq!(t.to_string(), "2026-11-22T12:07:28.232168+00:00");
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00+00:00");
        assert_eq!(
            Timestamp(951_782_400_000_001).to_string(),
            "2000-02-29T00:00:00.000001+00:00"
        );
        assert_eq!(
            Timestamp::from_epoch_seconds(1795349249.7111537)
                .unwrap()
                .to_string(),
            "2026-11-22T12:07:29.711154+00:00"
        );
    }

    #[test]
    fn iso_parse_is_the_inverse_of_print() {
        for micros in [
            0i64,
            1,
            999_999,
            1_795_349_248_232_168,
            951_782_400_000_001,
            4_102_444_799_999_999,
        ] {
            let t = Timestamp(micros);
            assert_eq!(Timestamp::parse_iso(&t.to_string()).unwrap(), t, "{t}");
        }
        for bad in [
            "",
            "2026-11-22",
            "2026-11-22T12:07:28+01:00",
            "2026-13-22T12:07:28+00:00",
            "2026-11-22T12:07:28.12+00:00",
            "2026-11-22 12:07:28+00:00",
            "２026-11-22T12:07:28+00:00",
        ] {
            assert!(Timestamp::parse_iso(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn out_of_range_float_timestamps_are_errors() {
        for bad in [f64::NAN, f64::INFINITY, -1.0, 1e13] {
            assert!(Timestamp::from_epoch_seconds(bad).is_err(), "{bad}");
        }
    }

    fn kitchen() -> EntityState {
        let c: CompressedState = serde_json::from_value(json!({
            "s": "off", "a": {"editable": false, "icon": "mdi:silverware-fork-knife", "friendly_name": "Kitchen"},
            "c": "01M81JEY78B7FCFR6JQCQ75JW6", "lc": 1795349248.2321684
        }))
        .unwrap();
        EntityState::from_compressed("input_boolean.kitchen", c, true).unwrap()
    }

    #[test]
    fn compressed_state_expands_to_ha_rest_json() {
        // HA 2025.4.4's REST answer for the same entity (ha-captures rest_samples.json).
        let rest = r#"{"entity_id":"input_boolean.kitchen","state":"off","attributes":{"editable":false,"icon":"mdi:silverware-fork-knife","friendly_name":"Kitchen"},"last_changed":"2026-11-22T12:07:28.232168+00:00","last_reported":"2026-11-22T12:07:28.232168+00:00","last_updated":"2026-11-22T12:07:28.232168+00:00","context":{"id":"01M81JEY78B7FCFR6JQCQ75JW6","parent_id":null,"user_id":null}}"#;
        assert_eq!(kitchen().to_json(), rest, "byte-equal, key order included");
        let parsed: EntityState = serde_json::from_str(rest).unwrap();
        assert_eq!(parsed, kitchen());
    }

    #[test]
    fn old_ha_has_no_last_reported() {
        let c: CompressedState = serde_json::from_value(
            json!({"s": "on", "c": {"id": "x", "user_id": "u"}, "lc": 1.5, "lu": 2.0}),
        )
        .unwrap();
        let s = EntityState::from_compressed("light.a", c, false).unwrap();
        let v: Value = serde_json::from_str(&s.to_json()).unwrap();
        assert!(v.get("last_reported").is_none());
        assert_eq!(v["last_changed"], "1970-01-01T00:00:01.500000+00:00");
        assert_eq!(v["last_updated"], "1970-01-01T00:00:02+00:00");
        assert_eq!(
            v["context"],
            json!({"id": "x", "parent_id": null, "user_id": "u"})
        );
        assert_eq!(v["attributes"], json!({}));
    }

    #[test]
    fn diff_changes_state_context_times_and_attributes() {
        let mut s = kitchen();
        let d: StateDiff = serde_json::from_value(json!({
            "+": {"s": "on", "lc": 1795349249.7111537, "c": {"user_id": "46a6", "id": "01M81JEZ"}, "a": {"brightness": 128}},
            "-": {"a": ["icon"]}
        }))
        .unwrap();
        s.apply_diff(d).unwrap();
        assert_eq!(s.state, "on");
        assert_eq!(
            s.last_changed.to_string(),
            "2026-11-22T12:07:29.711154+00:00"
        );
        assert_eq!(s.last_updated, s.last_changed);
        assert_eq!(s.last_reported, Some(s.last_updated));
        assert_eq!(
            s.context,
            Context {
                id: "01M81JEZ".into(),
                parent_id: None,
                user_id: Some("46a6".into())
            }
        );
        assert_eq!(
            serde_json::to_value(&s.attributes).unwrap(),
            json!({"editable": false, "friendly_name": "Kitchen", "brightness": 128})
        );

        // An attribute-only change: `lu` moves last_updated, last_changed stays; a bare
        // context string replaces only the id.
        let d: StateDiff = serde_json::from_value(
            json!({"+": {"lu": 1795349250.1226685, "c": "01NEW", "a": {"brightness": 200}}}),
        )
        .unwrap();
        s.apply_diff(d).unwrap();
        assert_eq!(
            s.last_changed.to_string(),
            "2026-11-22T12:07:29.711154+00:00"
        );
        assert_eq!(
            s.last_updated.to_string(),
            "2026-11-22T12:07:30.122669+00:00"
        );
        assert_eq!(s.context.id, "01NEW");
        assert_eq!(
            s.context.user_id.as_deref(),
            Some("46a6"),
            "a string context keeps user_id"
        );
        assert_eq!(s.attributes.to_map().unwrap()["brightness"], 200);
    }

    #[test]
    fn ha_floats_are_kept_for_lc_lu_but_not_compared_or_serialised() {
        let mut s = kitchen();
        assert_eq!(
            s.last_changed_epoch(),
            1795349248.2321684,
            "HA's float, not µs"
        );
        let rest: EntityState = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(rest.epoch, EpochSeconds::default(), "not in the REST JSON");
        assert_eq!(rest, s, "equality ignores the floats");
        assert_eq!(
            rest.last_changed_epoch(),
            1795349248.232168,
            "datetime.timestamp()"
        );

        // An `lu` diff: HA ≥ 2024.4 then prints lc from the old datetime (whole µs).
        let d: StateDiff =
            serde_json::from_value(json!({"+": {"lu": 1795349250.1226685}})).unwrap();
        s.apply_diff(d).unwrap();
        assert_eq!(s.last_updated_epoch(), 1795349250.1226685);
        assert_eq!(s.last_changed_epoch(), 1795349248.232168);
        // An `lc` diff sets both.
        let d: StateDiff =
            serde_json::from_value(json!({"+": {"lc": 1795349251.7111537}})).unwrap();
        s.apply_diff(d).unwrap();
        assert_eq!(s.last_changed_epoch(), 1795349251.7111537);
        assert_eq!(s.last_updated_epoch(), 1795349251.7111537);
        // A float that no longer matches its timestamp is dropped.
        s.last_updated = Timestamp(5);
        assert_eq!(s.last_updated_epoch(), 5e-6);
    }

    #[test]
    fn attributes_keep_ha_text_and_patch_in_place() {
        let mut a: Attributes = serde_json::from_str(r#"{"b":1,"a":"x","c":[1,2]}"#).unwrap();
        assert_eq!(
            a.get(),
            r#"{"b":1,"a":"x","c":[1,2]}"#,
            "HA's text and key order, untouched"
        );
        let add = serde_json::from_str(r#"{"a":"y","d":0.1}"#).unwrap();
        a.patch(Some(add), &["b".to_owned()]).unwrap();
        assert_eq!(
            a.get(),
            r#"{"a":"y","c":[1,2],"d":0.1}"#,
            "changed in place, new appended, removed dropped"
        );
        assert_eq!(Attributes::default().get(), "{}");
        assert_ne!(a, Attributes::default());
    }

    #[test]
    fn malformed_compressed_data_is_an_error_not_a_panic() {
        for bad in [
            json!({"s": 1, "c": "x", "lc": 1.0}),
            json!({"s": "on", "lc": 1.0}),
            json!({"s": "on", "c": 5, "lc": 1.0}),
            json!({"s": "on", "c": {"idd": "x"}, "lc": 1.0}),
            json!({"s": "on", "c": "x", "lc": 1.0, "zz": 1}),
            json!({"s": "on", "c": "x", "lc": 1.0, "a": [1]}),
            json!({"s": "on", "c": "x", "lc": 1.0, "a": "x"}),
        ] {
            assert!(
                serde_json::from_value::<CompressedState>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        assert!(serde_json::from_value::<StateDiff>(json!({"+": {"s": ["x"]}})).is_err());
        // The same from text (the daemon's path): attributes must be an object.
        assert!(
            serde_json::from_str::<CompressedState>(r#"{"s":"on","c":"x","lc":1.0,"a":null}"#)
                .is_err()
        );
        assert!(
            serde_json::from_str::<EntityState>(
                &kitchen()
                    .to_json()
                    .replace(r#""attributes":{"#, r#""attributes":[{"#)
                    .replace(r#"},"last_changed""#, r#"}],"last_changed""#)
            )
            .is_err()
        );
        let mut s = kitchen();
        let d: StateDiff = serde_json::from_value(json!({"+": {"lc": -5.0}})).unwrap();
        assert!(s.apply_diff(d).is_err());
    }
}
