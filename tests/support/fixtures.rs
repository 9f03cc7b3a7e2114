//! Frames recorded from real Home Assistant (`tests/fixtures/<version>/`, see the README there)
//! and the pieces of HA's data formats the fake needs to speak like HA: ISO timestamps,
//! compressed states and compressed diffs (HA `websocket_api/messages.py`,
//! `compressed_state_dict_add` and `_state_diff`), reproduced from the recordings.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// The HA versions we have recordings of.
pub const VERSIONS: [&str; 2] = ["2024.3.3", "2025.4.4"];

/// Domains the daemon's default `[filter]` excludes (`exclude_domains`).
pub const DEFAULT_EXCLUDED_DOMAINS: [&str; 3] = ["media_player", "camera", "automation"];

/// The recordings of one HA version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixtures {
    /// `"2024.3.3"` or `"2025.4.4"`.
    pub version: &'static str,
}

fn version_tuple(v: &str) -> (u32, u32) {
    let mut parts = v.split('.');
    let year = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let month = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (year, month)
}

impl Fixtures {
    /// The recordings of `version` (one of [`VERSIONS`]).
    pub fn new(version: &'static str) -> Fixtures {
        assert!(VERSIONS.contains(&version), "no recordings of HA {version}");
        Fixtures { version }
    }

    /// A fixture file's text, without the trailing newline.
    pub fn text(&self, name: &str) -> String {
        let path = format!(
            "{}/tests/fixtures/{}/{name}",
            env!("CARGO_MANIFEST_DIR"),
            self.version
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        text.trim_end().to_owned()
    }

    /// A one-frame fixture, parsed.
    pub fn json(&self, name: &str) -> Value {
        serde_json::from_str(&self.text(name))
            .unwrap_or_else(|e| panic!("{}/{name}: {e}", self.version))
    }

    /// The frames of a `.jsonl` fixture, verbatim.
    pub fn lines(&self, name: &str) -> Vec<String> {
        self.text(name)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// A recorded frame with its `id` replaced by `id` (HA echoes the client's ids).
    pub fn frame_with_id(&self, name: &str, id: u64) -> String {
        with_id(&self.text(name), id)
    }

    /// HA ≥ 2024.4 puts `last_reported` in full state objects (not in compressed ones).
    pub fn has_last_reported(&self) -> bool {
        version_tuple(self.version) >= (2024, 4)
    }

    /// HA ≥ 2024.9 accepts `include`/`exclude` on `subscribe_entities`.
    pub fn has_ha_filter(&self) -> bool {
        version_tuple(self.version) >= (2024, 9)
    }

    /// HA 2025 sends `lc`/`lu` with the full float precision of `time.time()`, finer than the
    /// microseconds of its ISO strings (e.g. `1795349248.2285292` for `.228529`); 2024.3.3
    /// sends exactly the microseconds. The fake reproduces that, so the daemon must round.
    pub fn sub_microsecond_floats(&self) -> bool {
        version_tuple(self.version) >= (2025, 1)
    }

    /// HA's full state objects at the moment of the recorded `subscribe_entities` snapshot,
    /// in the snapshot's order: an entity's first `state_changed` `old_state`, else its
    /// `get_states` object (checked equal to the recorded snapshot by
    /// `fake_ha_speaks_like_the_recordings`). As recorded, three 2025.4.4 entities carry a
    /// `last_reported` later than their `last_updated` (re-reported without a change; the
    /// compressed format cannot say so, `get_states` and REST do — HA-FACTS, core #181392).
    pub fn initial_states(&self) -> Vec<Value> {
        let snapshot = self.json("subscribe_entities_initial.json");
        let get_states = self.json("get_states_result.json");
        let by_id: BTreeMap<&str, &Value> = get_states["result"]
            .as_array()
            .expect("get_states result is a list")
            .iter()
            .map(|s| (s["entity_id"].as_str().unwrap(), s))
            .collect();
        let mut first_old: BTreeMap<String, Value> = BTreeMap::new();
        for (entity_id, old, _) in self.state_changed() {
            first_old.entry(entity_id).or_insert(old);
        }
        snapshot["event"]["a"]
            .as_object()
            .expect("snapshot has an `a` map")
            .keys()
            .map(|id| match first_old.get(id) {
                Some(old) if !old.is_null() => old.clone(),
                _ => (*by_id
                    .get(id.as_str())
                    .unwrap_or_else(|| panic!("{id} not in get_states")))
                .clone(),
            })
            .collect()
    }

    /// The recorded `state_changed` events: `(entity_id, old_state, new_state)`, `null` for
    /// created/removed.
    pub fn state_changed(&self) -> Vec<(String, Value, Value)> {
        self.lines("state_changed_events.jsonl")
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                let d = &v["event"]["data"];
                (
                    d["entity_id"].as_str().unwrap().to_owned(),
                    d["old_state"].clone(),
                    d["new_state"].clone(),
                )
            })
            .collect()
    }

    /// HA's own full state of every entity the recorded events touched, after the last one
    /// (`None` = removed).
    pub fn final_states(&self) -> BTreeMap<String, Option<Value>> {
        self.state_changed()
            .into_iter()
            .map(|(id, _, new)| (id, (!new.is_null()).then_some(new)))
            .collect()
    }
}

/// `frame` with its top-level `id` replaced (key order kept).
pub fn with_id(frame: &str, id: u64) -> String {
    let mut v: Value = serde_json::from_str(frame).unwrap_or_else(|e| panic!("{e}: {frame}"));
    v["id"] = id.into();
    v.to_string()
}

/// Whether the daemon's default filter tracks `entity_id`.
pub fn tracked_by_default(entity_id: &str) -> bool {
    let domain = entity_id.split_once('.').map_or(entity_id, |(d, _)| d);
    !DEFAULT_EXCLUDED_DOMAINS.contains(&domain)
}

// ---- timestamps -------------------------------------------------------------------------
// Deliberately independent of `hass_edge::entity::Timestamp`: the fake HA is a test oracle,
// and sharing the daemon's conversion would let one bug hide itself on both sides.

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

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

/// Microseconds since the epoch of HA's ISO form `YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00`.
pub fn micros_from_iso(iso: &str) -> i64 {
    let n = |r: std::ops::Range<usize>| -> i64 {
        iso[r]
            .parse()
            .unwrap_or_else(|_| panic!("bad timestamp {iso}"))
    };
    assert!(iso.ends_with("+00:00"), "HA prints UTC: {iso}");
    let days = days_from_civil(n(0..4), n(5..7), n(8..10));
    let secs = ((days * 24 + n(11..13)) * 60 + n(14..16)) * 60 + n(17..19);
    let micros = if iso.as_bytes()[19] == b'.' {
        n(20..26)
    } else {
        0
    };
    secs * 1_000_000 + micros
}

/// Python's `datetime.isoformat()` in UTC: no fraction when it is zero.
pub fn iso_from_micros(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let base = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    );
    if frac == 0 {
        format!("{base}+00:00")
    } else {
        format!("{base}.{frac:06}+00:00")
    }
}

/// Now, in whole microseconds since the epoch.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// The float epoch seconds HA sends for an ISO timestamp. With `sub_micro`, a deterministic
/// offset of about ±0.2 µs stands in for HA 2025's extra float digits (it rounds back to
/// the same microsecond, as HA's own `datetime.fromtimestamp` does).
pub fn epoch_float(iso: &str, sub_micro: bool) -> Value {
    let micros = micros_from_iso(iso);
    let mut f = micros as f64 / 1e6;
    if sub_micro {
        f += if micros % 2 == 0 { 2e-7 } else { -2e-7 };
    }
    json!(f)
}

// ---- compressed format ------------------------------------------------------------------

/// A full state's context in the compressed form: the bare id when it has neither parent
/// nor user, else the whole object, nulls included (as recorded:
/// `{"id":…,"parent_id":null,"user_id":…}`).
pub fn compressed_context(ctx: &Value) -> Value {
    if ctx["parent_id"].is_null() && ctx["user_id"].is_null() {
        ctx["id"].clone()
    } else {
        json!({"id": ctx["id"], "parent_id": ctx["parent_id"], "user_id": ctx["user_id"]})
    }
}

/// A full state object as a `subscribe_entities` `a` entry: `{s, a, c, lc, lu?}`.
pub fn compressed_state(state: &Value, sub_micro: bool) -> Value {
    let mut m = Map::new();
    m.insert("s".into(), state["state"].clone());
    m.insert("a".into(), state["attributes"].clone());
    m.insert("c".into(), compressed_context(&state["context"]));
    let lc = state["last_changed"].as_str().expect("last_changed");
    let lu = state["last_updated"].as_str().expect("last_updated");
    m.insert("lc".into(), epoch_float(lc, sub_micro));
    if lu != lc {
        m.insert("lu".into(), epoch_float(lu, sub_micro));
    }
    Value::Object(m)
}

/// The `c` entry HA sends when `old` becomes `new` (HA `_state_diff`, key for key, including
/// its quirk that a new attribute whose value is `null` is not sent).
pub fn state_diff(old: &Value, new: &Value, sub_micro: bool) -> Value {
    let mut add = Map::new();
    if old["state"] != new["state"] {
        add.insert("s".into(), new["state"].clone());
    }
    if old["last_changed"] != new["last_changed"] {
        add.insert(
            "lc".into(),
            epoch_float(new["last_changed"].as_str().unwrap(), sub_micro),
        );
    } else if old["last_updated"] != new["last_updated"] {
        add.insert(
            "lu".into(),
            epoch_float(new["last_updated"].as_str().unwrap(), sub_micro),
        );
    }
    let (oc, nc) = (&old["context"], &new["context"]);
    let mut ctx: Option<Value> = None;
    if oc["parent_id"] != nc["parent_id"] {
        ctx = Some(json!({"parent_id": nc["parent_id"]}));
    }
    if oc["user_id"] != nc["user_id"] {
        match &mut ctx {
            Some(c) => c["user_id"] = nc["user_id"].clone(),
            None => ctx = Some(json!({"user_id": nc["user_id"]})),
        }
    }
    if oc["id"] != nc["id"] {
        match &mut ctx {
            Some(c) => c["id"] = nc["id"].clone(),
            None => ctx = Some(nc["id"].clone()),
        }
    }
    if let Some(c) = ctx {
        add.insert("c".into(), c);
    }
    let empty = Map::new();
    let oa = old["attributes"].as_object().unwrap_or(&empty);
    let na = new["attributes"].as_object().unwrap_or(&empty);
    let mut diff = Map::new();
    if oa != na {
        let mut changed = Map::new();
        for (k, v) in na {
            if oa.get(k).unwrap_or(&Value::Null) != v {
                changed.insert(k.clone(), v.clone());
            }
        }
        if !changed.is_empty() {
            add.insert("a".into(), Value::Object(changed));
        }
        let removed: Vec<&String> = oa.keys().filter(|k| !na.contains_key(*k)).collect();
        if !removed.is_empty() {
            diff.insert("-".into(), json!({"a": removed}));
        }
    }
    let mut out = Map::new();
    out.insert("+".into(), Value::Object(add));
    out.extend(diff);
    Value::Object(out)
}

/// The epoch float of `v` rounded to whole microseconds, the way the daemon and HA's REST
/// read it; for comparing compressed states across float noise.
pub fn round_floats_to_micros(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(
                    |(k, v)| match (k.as_str(), v.as_f64().filter(|_| v.is_f64())) {
                        ("lc" | "lu", Some(f)) => {
                            // Split first: the fraction of an f64 is exact (as the daemon does it).
                            let whole = f.trunc();
                            (
                                k.clone(),
                                json!(
                                    whole as i64 * 1_000_000 + ((f - whole) * 1e6).round() as i64
                                ),
                            )
                        }
                        _ => (k.clone(), round_floats_to_micros(v)),
                    },
                )
                .collect(),
        ),
        other => other.clone(),
    }
}
