//! The per-dashboard entity allowlist (issue 16).
//!
//! HA's frontend subscribes to every entity at load (`get_states` plus an unfiltered
//! `subscribe_entities`), which low-powered kiosks choke on (HA frontend issues #22115,
//! #24166). With `[dashboards] url_paths` set, such a client of the local WebSocket API gets
//! only the entities those dashboards use. This module computes that set, purely:
//!
//! - [`entities_in`] reads one dashboard's config, as HA's WebSocket command
//!   `lovelace/config` returns it ([`config_request`]), in three passes:
//!   1. a walk of the keys that name entities anywhere in the tree (views, sections, cards,
//!      stacks, conditions, badges, header/footer, picture elements, action targets);
//!   2. every string (values and keys) scanned for tokens shaped like entity ids
//!      (`domain.object_id`), kept when the caller knows the id: this catches templates and
//!      markdown (`{{ states('sensor.x') }}`, `states.sensor.x.state`);
//!   3. `custom:auto-entities` filters (thomasloven/lovelace-auto-entities, README "Filters")
//!      expanded against the mirror's states.
//! - [`Allowlist`] is the union over the dashboards, plus `always`, minus `never`.
//!
//! What it must never do is leave out an entity a dashboard shows (the card would stay
//! blank); showing a few more costs little. So every rule that cannot be decided once for
//! the life of the list (an entity's state, a numeric comparison, an area the mirror does not
//! know) counts as "may match": it includes, and never excludes.

use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use serde_json::{Map, Value, json};

use crate::config::{DEFAULT_DASHBOARD, DashboardsConfig, check_entity_pattern};
use crate::entity::{EntityState, valid_entity_id};

/// An entity id or a glob of entity ids from `dashboards.always`/`dashboards.never`: `*`
/// matches any run of characters (`.` included), `?` exactly one; everything else matches
/// itself. Built only from patterns [`check_entity_pattern`] accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityGlob {
    /// The pattern as written in the config.
    pattern: String,
}

impl EntityGlob {
    /// Compiles `pattern`.
    ///
    /// Errors: the reason [`check_entity_pattern`] gives (e.g. "is empty").
    pub fn new(pattern: &str) -> Result<EntityGlob, String> {
        check_entity_pattern(pattern)?;
        Ok(EntityGlob {
            pattern: pattern.to_owned(),
        })
    }

    /// Whether `entity_id` matches the whole pattern.
    pub fn matches(&self, entity_id: &str) -> bool {
        wildcard_match(self.pattern.as_bytes(), entity_id.as_bytes(), true)
    }

    /// Whether the pattern has a wildcard (else it is one entity id).
    pub fn is_wildcard(&self) -> bool {
        self.pattern.contains(['*', '?'])
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }
}

/// Whether `text` matches all of `pattern`, where `*` is any run of bytes and, when
/// `question` is set, `?` any one byte. Linear-time backtracking to the last `*` (the
/// classic two-pointer algorithm): no recursion, no blow-up on `*a*a*a*b`.
fn wildcard_match(pattern: &[u8], text: &[u8], question: bool) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == text[t] || (question && c == b'?') => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The `lovelace/config` command for the dashboard `url_path` as `dashboards.url_paths`
/// writes it ([`DEFAULT_DASHBOARD`] becomes HA's `null`), without the `id` the caller adds.
///
/// Shape: HA `components/lovelace/websocket.py` `websocket_lovelace_config`:
/// `{"type": "lovelace/config", "url_path": null | "dashboard-x", "force": false}`.
pub fn config_request(url_path: &str) -> Value {
    let url_path = (url_path != DEFAULT_DASHBOARD).then_some(url_path);
    json!({"type": "lovelace/config", "url_path": url_path, "force": false})
}

/// The dashboard a `lovelace_updated` event is about, as `dashboards.url_paths` writes it:
/// the event's `data.url_path` (HA `components/lovelace/dashboard.py` fires
/// `{"url_path": null | "dashboard-x"}`), `null` or absent being [`DEFAULT_DASHBOARD`].
pub fn updated_url_path(event_data: &Value) -> &str {
    event_data
        .get("url_path")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_DASHBOARD)
}

/// The entities one dashboard uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DashboardEntities {
    /// These entity ids (sorted).
    Listed(BTreeSet<String>),
    /// The dashboard, or one of its views, is generated by the frontend from all entities (a
    /// `strategy`, e.g. HA's auto-generated default dashboard): it may show any entity, so
    /// the allowlist cannot trim. The caller also uses this when `lovelace/config` answers
    /// `config_not_found`, which is how HA reports an auto-generated default dashboard.
    Generated,
}

/// The entities the dashboard `config` uses: the result of `lovelace/config` for it (an
/// object with `views`, each with `cards`, `sections`, `badges`, …).
///
/// - `states`: the states auto-entities filters are matched against (the mirror's).
/// - `known`: whether an id found in free text (templates, markdown, any string) is a real
///   entity; ids under entity keys (`entity`, `entities`, `entity_id`, …) are kept
///   whenever they are shaped as entity ids, so an entity that is unavailable right now
///   still counts.
///
/// Not expanded (their literal entity ids are still found by the text scan):
/// auto-entities `filter.template`; the `area`, `device`, `label`, `integration` options
/// and the like, which need HA's registries: a filter using them includes whatever its other
/// options allow.
pub fn entities_in(
    config: &Value,
    states: &[Rc<EntityState>],
    known: &dyn Fn(&str) -> bool,
) -> DashboardEntities {
    let generated = config.get("strategy").is_some()
        || config
            .get("views")
            .and_then(Value::as_array)
            .is_some_and(|views| views.iter().any(|v| v.get("strategy").is_some()));
    if generated {
        return DashboardEntities::Generated;
    }
    let mut walk = Walk {
        found: BTreeSet::new(),
        states,
        by_id: states
            .iter()
            .map(|s| (s.entity_id.as_str(), &**s))
            .collect(),
        known,
    };
    walk.value(config);
    DashboardEntities::Listed(walk.found)
}

/// Keys whose value names entities: a string, a list of strings, or (for `entity_id` in
/// service data and action targets) a comma-separated string, as HA's `comp_entity_ids`.
/// `camera_image`/`image_entity`: picture-glance, picture-entity, picture-elements.
const ENTITY_KEYS: &[&str] = &[
    "entity",
    "entities",
    "entity_id",
    "camera_image",
    "image_entity",
];

/// Lists of entities given as strings or objects (`entities` of an entities/glance card,
/// view and heading `badges`).
const ENTITY_LISTS: &[&str] = &["entities", "badges"];

/// One pass over one dashboard config.
struct Walk<'a> {
    /// The entity ids found so far.
    found: BTreeSet<String>,
    /// The mirror's states, for auto-entities filters.
    states: &'a [Rc<EntityState>],
    /// The same by id, for `group` filters.
    by_id: BTreeMap<&'a str, &'a EntityState>,
    /// Whether an id found in free text is a real entity.
    known: &'a dyn Fn(&str) -> bool,
}

impl Walk<'_> {
    fn value(&mut self, value: &Value) {
        match value {
            Value::String(s) => self.scan(s),
            Value::Array(items) => items.iter().for_each(|v| self.value(v)),
            Value::Object(map) => self.object(map),
            _ => {}
        }
    }

    fn object(&mut self, map: &Map<String, Value>) {
        let auto_entities = map.get("type").and_then(Value::as_str) == Some("custom:auto-entities");
        for (key, value) in map {
            self.scan(key);
            if auto_entities && key == "filter" {
                // Interpreted, not scanned: an excluded id named in it is not a use.
                self.auto_entities(value);
                continue;
            }
            if ENTITY_KEYS.contains(&key.as_str()) {
                self.named(value);
            }
            if ENTITY_LISTS.contains(&key.as_str())
                && let Some(items) = value.as_array()
            {
                items.iter().for_each(|v| self.named(v));
            }
            self.value(value);
        }
    }

    /// A value under an entity key: an id, a comma-separated list of ids, or a list of them.
    fn named(&mut self, value: &Value) {
        match value {
            Value::String(s) => {
                for id in s.split(',').map(str::trim) {
                    if valid_entity_id(id) {
                        self.found.insert(id.to_owned());
                    }
                }
            }
            Value::Array(items) => items
                .iter()
                .filter(|v| v.is_string())
                .for_each(|v| self.named(v)),
            _ => {}
        }
    }

    /// Every `domain.object_id` in `text` that `known` accepts. A run of id characters with
    /// several dots (`states.sensor.x.state`) yields each adjacent pair of its segments.
    fn scan(&mut self, text: &str) {
        let is_id_byte = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
        for run in text.split(|c: char| !(c.is_ascii() && (is_id_byte(c as u8) || c == '.'))) {
            if !run.contains('.') {
                continue;
            }
            let segments: Vec<&str> = run.split('.').collect();
            for pair in segments.windows(2) {
                let id = format!("{}.{}", pair[0], pair[1]);
                if valid_entity_id(&id) && !self.found.contains(&id) && (self.known)(&id) {
                    self.found.insert(id);
                }
            }
        }
    }

    /// `filter: {include: [..], exclude: [..], template: ".."}` of an auto-entities card:
    /// every state that some include filter may match and no exclude filter surely matches
    /// (auto-entities README "How it works").
    fn auto_entities(&mut self, filter: &Value) {
        if let Some(template) = filter.get("template").and_then(Value::as_str) {
            self.scan(template);
        }
        let list = |key: &str| {
            filter
                .get(key)
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice)
        };
        let (include, exclude) = (list("include"), list("exclude"));
        if include.is_empty() {
            return;
        }
        for state in self.states {
            let candidate = Candidate {
                state,
                attributes: OnceCell::new(),
            };
            let included = include
                .iter()
                .map(|f| self.filter_match(f, &candidate))
                .max()
                .unwrap_or(Match::No);
            if included == Match::No {
                continue;
            }
            if exclude
                .iter()
                .any(|f| self.filter_match(f, &candidate) == Match::Yes)
            {
                continue;
            }
            self.found.insert(state.entity_id.clone());
        }
    }

    /// Whether `entity` fulfils every option of one auto-entities filter (an object). A key
    /// may carry a suffix to repeat an option (`state 1`, `state 2`); `options` and `sort`
    /// are not conditions; an entry with `type` is a special row, not an entity.
    fn filter_match(&self, filter: &Value, entity: &Candidate<'_>) -> Match {
        let Some(options) = filter.as_object() else {
            return Match::No;
        };
        if options.contains_key("type") {
            return Match::No;
        }
        let mut result = Match::Yes;
        for (key, pattern) in options {
            let option = key.split_whitespace().next().unwrap_or("");
            let m = match option {
                "options" | "sort" => continue,
                "domain" => text_match(pattern, entity.domain()),
                "entity_id" => text_match(pattern, &entity.state.entity_id),
                "name" => text_match(pattern, &entity.name()),
                "attributes" => match pattern.as_object() {
                    Some(wanted) => wanted
                        .iter()
                        .map(|(name, p)| attribute_match(name, p, entity))
                        .min()
                        .unwrap_or(Match::Yes),
                    None => Match::No,
                },
                "group" => self.group_match(pattern, entity),
                "not" => self.filter_match(pattern, entity).not(),
                "or" => pattern.as_array().map_or(Match::No, |fs| {
                    fs.iter()
                        .map(|f| self.filter_match(f, entity))
                        .max()
                        .unwrap_or(Match::No)
                }),
                "and" => pattern.as_array().map_or(Match::No, |fs| {
                    fs.iter()
                        .map(|f| self.filter_match(f, entity))
                        .min()
                        .unwrap_or(Match::Yes)
                }),
                // `state` changes while the list stands; `area`, `device`, `label`,
                // `integration`, `last_changed`… need what the mirror does not hold.
                _ => Match::Maybe,
            };
            result = result.min(m);
            if result == Match::No {
                break;
            }
        }
        result
    }

    /// `group: group.x`: whether the entity is a member (the group's `entity_id` attribute).
    fn group_match(&self, pattern: &Value, entity: &Candidate<'_>) -> Match {
        let Some(group) = pattern.as_str().and_then(|g| self.by_id.get(g)) else {
            return Match::Maybe;
        };
        let members = group
            .attributes
            .to_map()
            .ok()
            .and_then(|mut m| m.remove("entity_id"));
        match members {
            Some(Value::Array(ids)) => {
                let member = ids
                    .iter()
                    .any(|id| id.as_str() == Some(&entity.state.entity_id));
                if member { Match::Yes } else { Match::No }
            }
            _ => Match::Maybe,
        }
    }
}

/// Attributes that describe what an entity is rather than what it is doing, so a filter on
/// them is decided once; a filter on any other attribute "may match".
const STATIC_ATTRIBUTES: &[&str] = &[
    "device_class",
    "unit_of_measurement",
    "state_class",
    "friendly_name",
    "icon",
    "source_type",
    "supported_features",
];

/// One `attributes:` entry of a filter. Object paths (`hs_color:1`) and dynamic attributes
/// may match.
fn attribute_match(name: &str, pattern: &Value, entity: &Candidate<'_>) -> Match {
    if !STATIC_ATTRIBUTES.contains(&name) {
        return Match::Maybe;
    }
    match (entity.attribute(name), pattern) {
        (None, _) => Match::No,
        (Some(Value::String(value)), _) => text_match(pattern, value),
        (Some(value), Value::String(_)) => text_match(pattern, &value.to_string()),
        (Some(value), _) if value == pattern => Match::Yes,
        (Some(_), _) => Match::No,
    }
}

/// One string option of auto-entities against `value` (auto-entities README "Matching
/// rules"): `*` wildcards, `/regex/`, numeric comparisons (`"<= 50"`), else equality. What
/// this cannot decide exactly (a JavaScript regex, a comparison, a match that holds only
/// ignoring case) may match.
fn text_match(pattern: &Value, value: &str) -> Match {
    let pattern = match pattern {
        Value::String(p) => p.as_str(),
        Value::Number(_) | Value::Bool(_) => {
            return if *pattern.to_string() == *value {
                Match::Yes
            } else {
                Match::No
            };
        }
        _ => return Match::No,
    };
    let regex = pattern.len() >= 2 && pattern.starts_with('/') && pattern.ends_with('/');
    let comparison = pattern.starts_with(['<', '>', '=', '!']);
    if regex || comparison {
        return Match::Maybe;
    }
    let exact = if pattern.contains('*') {
        if pattern.contains(['?', '+', '(', ')', '[', ']', '{', '}', '|', '^', '$', '\\']) {
            return Match::Maybe;
        }
        |p: &str, v: &str| wildcard_match(p.as_bytes(), v.as_bytes(), false)
    } else {
        |p: &str, v: &str| p == v
    };
    if exact(pattern, value) {
        Match::Yes
    } else if exact(&pattern.to_lowercase(), &value.to_lowercase()) {
        Match::Maybe
    } else {
        Match::No
    }
}

/// The answer of a filter for an entity, ordered so that "and" is `min` and "or" `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Match {
    /// Surely not.
    No,
    /// Cannot be decided for the life of the list (depends on state, or on what is unknown).
    Maybe,
    /// Surely.
    Yes,
}

impl Match {
    fn not(self) -> Match {
        match self {
            Match::No => Match::Yes,
            Match::Maybe => Match::Maybe,
            Match::Yes => Match::No,
        }
    }
}

/// A state under test, its attributes parsed once, when a filter first needs them.
struct Candidate<'a> {
    /// The state.
    state: &'a EntityState,
    /// Its attributes (empty when they do not parse).
    attributes: OnceCell<Map<String, Value>>,
}

impl Candidate<'_> {
    fn domain(&self) -> &str {
        self.state
            .entity_id
            .split_once('.')
            .map_or("", |(domain, _)| domain)
    }

    /// The name the frontend shows: `friendly_name`, else the object id with spaces for
    /// underscores (HA frontend `computeStateName`).
    fn name(&self) -> String {
        match self.attribute("friendly_name").and_then(Value::as_str) {
            Some(name) => name.to_owned(),
            None => self
                .state
                .entity_id
                .split_once('.')
                .map_or("", |(_, object_id)| object_id)
                .replace('_', " "),
        }
    }

    fn attribute(&self, name: &str) -> Option<&Value> {
        self.attributes
            .get_or_init(|| self.state.attributes.to_map().unwrap_or_default())
            .get(name)
    }
}

/// Which entities an unfiltered `get_states`/`subscribe_entities` of a local WebSocket
/// client gets: the union of the dashboards' entities, plus `dashboards.always`, minus
/// `dashboards.never` (which wins over everything). Equality tells a caller whether a
/// recompute (on `lovelace_updated`, a reload) changed anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist {
    /// A dashboard is [`DashboardEntities::Generated`]: every entity not in `never`.
    everything: bool,
    /// The dashboards' entities and the literal ids of `always`, without those `never` matches.
    entities: BTreeSet<String>,
    /// The wildcard patterns of `always`.
    always: Vec<EntityGlob>,
    /// All of `never`.
    never: Vec<EntityGlob>,
}

impl Allowlist {
    /// Builds the list from each dashboard's entities (one [`entities_in`] per entry of
    /// `dashboards.url_paths`) and `config`'s `always`/`never`. Patterns are taken as
    /// validated by the config; one that does not compile is left out.
    pub fn new<'a>(
        dashboards: impl IntoIterator<Item = &'a DashboardEntities>,
        config: &DashboardsConfig,
    ) -> Allowlist {
        let globs = |patterns: &[String]| -> Vec<EntityGlob> {
            patterns
                .iter()
                .filter_map(|p| EntityGlob::new(p).ok())
                .collect()
        };
        let (always, never) = (globs(&config.always), globs(&config.never));
        let mut everything = false;
        let mut entities = BTreeSet::new();
        for dashboard in dashboards {
            match dashboard {
                DashboardEntities::Listed(ids) => entities.extend(ids.iter().cloned()),
                DashboardEntities::Generated => everything = true,
            }
        }
        let (literal, always): (Vec<_>, Vec<_>) =
            always.into_iter().partition(|g| !g.is_wildcard());
        entities.extend(literal.into_iter().map(|g| g.pattern));
        entities.retain(|id| !never.iter().any(|g| g.matches(id)));
        Allowlist {
            everything,
            entities,
            always,
            never,
        }
    }

    /// Whether a client restricted to the allowlist gets `entity_id`.
    pub fn allows(&self, entity_id: &str) -> bool {
        !self.never.iter().any(|g| g.matches(entity_id))
            && (self.everything
                || self.entities.contains(entity_id)
                || self.always.iter().any(|g| g.matches(entity_id)))
    }

    /// How many entity ids are listed (the dashboards' and `always`'s literal ids, less
    /// `never`); ids admitted only by an `always` glob or by a generated dashboard are not
    /// counted. For `/status` and the log.
    pub fn len(&self) -> usize {
        self.entities.len()
    }

    /// Whether no entity id is listed (see [`Allowlist::len`]).
    pub fn is_empty(&self) -> bool {
        self.entities.is_empty()
    }

    /// Whether a generated dashboard makes every entity but `never` allowed.
    pub fn allows_everything(&self) -> bool {
        self.everything
    }

    /// The listed entity ids, sorted (see [`Allowlist::len`]).
    pub fn entity_ids(&self) -> impl Iterator<Item = &str> {
        self.entities.iter().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(entity_id: &str, state: &str, attributes: Value) -> Rc<EntityState> {
        let json = json!({
            "entity_id": entity_id,
            "state": state,
            "attributes": attributes,
            "last_changed": "2025-01-01T00:00:00+00:00",
            "last_updated": "2025-01-01T00:00:00+00:00",
            "context": {"id": "01JGXZ0000000000000000000", "parent_id": null, "user_id": null},
        });
        Rc::new(serde_json::from_value(json).unwrap())
    }

    /// The mirror the fixtures are read against.
    fn mirror() -> Vec<Rc<EntityState>> {
        let plain = |id: &str| state(id, "on", json!({}));
        let named = |id: &str, name: &str| state(id, "off", json!({"friendly_name": name}));
        let battery = |id: &str| state(id, "80", json!({"device_class": "battery"}));
        vec![
            plain("light.living_ceiling"),
            plain("light.hall_a"),
            named("light.bedroom_lamp", "Bedroom lamp"),
            named("light.kitchen", "Kitchen"),
            plain("light.porch_1"),
            named("switch.bedroom_fan", "Bedroom fan"),
            named("sensor.bedroom_temperature", "Bedroom temperature"),
            battery("sensor.door_battery"),
            battery("sensor.phone_battery"),
            state(
                "sensor.tablet_battery",
                "50",
                json!({"unit_of_measurement": "%"}),
            ),
            plain("sensor.outdoor_humidity"),
            plain("sensor.washer_status"),
            plain("binary_sensor.dryer_running"),
            plain("alarm_control_panel.home"),
            plain("sensor.unrelated"),
            state(
                "group.upstairs",
                "on",
                json!({"entity_id": ["light.bedroom_lamp", "switch.bedroom_fan"]}),
            ),
        ]
    }

    fn listed(config: &Value, states: &[Rc<EntityState>]) -> BTreeSet<String> {
        let known = |id: &str| states.iter().any(|s| s.entity_id == id);
        match entities_in(config, states, &known) {
            DashboardEntities::Listed(ids) => ids,
            DashboardEntities::Generated => panic!("not a generated dashboard"),
        }
    }

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    /// Every way a card names an entity in the fixture is found, and nothing else: a miss
    /// would leave a card blank on the kiosk, an extra would stream what nobody shows.
    #[test]
    fn kiosk_dashboard_lists_exactly_its_entities() {
        let config: Value =
            serde_json::from_str(include_str!("../tests/fixtures/lovelace/kiosk.json")).unwrap();
        let states = mirror();
        let expected = set(&[
            // View badges, a string and an object.
            "person.anna",
            "sensor.outdoor_temperature",
            // A template in the view header's markdown.
            "sensor.outdoor_humidity",
            // Heading badge, tiles, an action target, a visibility condition.
            "sensor.living_co2",
            "light.living_ceiling",
            "cover.living_blind",
            "script.movie_mode",
            "input_boolean.guest_mode",
            // Entities card in a vertical stack: string, objects, attribute row, buttons row,
            // a header's service_data (comma-separated), a graph footer.
            "climate.hallway",
            "sensor.hallway_temperature",
            "climate.bedroom",
            "lock.front_door",
            "light.hall_a",
            "light.hall_b",
            "sensor.hallway_humidity",
            // Horizontal stack: gauge, conditional's condition and card.
            "sensor.power_usage",
            "sensor.rain_rate",
            "weather.home",
            // Markdown templates: `states.x.y.state` and `is_state("x.y", …)`.
            "sensor.washer_status",
            "binary_sensor.dryer_running",
            // Picture elements: camera_image, an element, a list entity_id in data.
            "camera.garden",
            "binary_sensor.garage_door",
            "switch.garden_pump",
            // History graph.
            "sensor.boiler_flow",
            "sensor.boiler_return",
            // Auto-entities: its own entities, every light but the excluded porch (their
            // state may change), batteries by device_class less the excluded phone, and
            // "Bedroom *" names outside sensor.
            "switch.christmas_tree",
            "light.bedroom_lamp",
            "light.kitchen",
            "sensor.door_battery",
            "switch.bedroom_fan",
            // Glance, and a template in card_mod.
            "sun.sun",
            "alarm_control_panel.home",
        ]);
        let found = listed(&config, &states);
        let missing: Vec<_> = expected.difference(&found).collect();
        let extra: Vec<_> = found.difference(&expected).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "missing {missing:?}, extra {extra:?}"
        );
    }

    #[test]
    fn free_text_keeps_only_known_ids() {
        let config = json!({"views": [{"cards": [{"type": "markdown",
            "content": "{{ states('sensor.washer_status') }} sensor.made_up light.toggle 3.14 Sensor.Washer_status"}]}]});
        assert_eq!(listed(&config, &mirror()), set(&["sensor.washer_status"]));
    }

    #[test]
    fn entity_keys_count_even_when_unknown_but_must_be_entity_ids() {
        let config = json!({"views": [{"cards": [
            {"type": "tile", "entity": "light.not_in_mirror"},
            {"type": "button", "tap_action": {"action": "call-service", "service": "light.turn_off",
                "target": {"entity_id": "all"}}},
            {"type": "entities", "entities": ["Not an id", {"entity": "bad id"}]}
        ]}]});
        assert_eq!(listed(&config, &mirror()), set(&["light.not_in_mirror"]));
    }

    #[test]
    fn auto_entities_filters() {
        let card = |filter: Value| {
            json!({"views": [{"cards": [{"type": "custom:auto-entities",
                "card": {"type": "entities"}, "filter": filter}]}]})
        };
        let states = mirror();
        let run = |filter: Value| listed(&card(filter), &states);
        // Everything but a domain.
        let all_but_sensors = run(json!({"include": [{}], "exclude": [{"domain": "sensor"}]}));
        assert!(all_but_sensors.contains("group.upstairs"));
        assert!(!all_but_sensors.iter().any(|id| id.starts_with("sensor.")));
        // Group members; repeated options with a suffix.
        assert_eq!(
            run(json!({"include": [{"group": "group.upstairs"}]})),
            set(&["light.bedroom_lamp", "switch.bedroom_fan"])
        );
        assert_eq!(
            run(json!({"include": [{"domain 1": "light", "entity_id 2": "*_lamp"}]})),
            set(&["light.bedroom_lamp"])
        );
        // or/and.
        assert_eq!(
            run(
                json!({"include": [{"or": [{"entity_id": "light.kitchen"}, {"entity_id": "switch.*"}]}]})
            ),
            set(&["light.kitchen", "switch.bedroom_fan"])
        );
        // Undecidable options include and never exclude: a regex, a comparison, area, a
        // dynamic attribute, a match that holds only ignoring case.
        let lights = set(&[
            "light.living_ceiling",
            "light.hall_a",
            "light.bedroom_lamp",
            "light.kitchen",
            "light.porch_1",
        ]);
        for undecided in [
            json!({"name": "/[Kk]itchen/"}),
            json!({"state": "> 3"}),
            json!({"area": "Kitchen"}),
            json!({"attributes": {"brightness": "> 100"}}),
            json!({"name": "kitchen"}),
        ] {
            let mut include = undecided.clone();
            include["domain"] = json!("light");
            let included = run(json!({"include": [include]}));
            assert!(included.contains("light.kitchen"), "{undecided}");
            let kept =
                run(json!({"include": [{"domain": "light"}], "exclude": [undecided.clone()]}));
            assert_eq!(kept, lights, "{undecided} must not exclude");
        }
        // A `not` of an undecidable option stays undecidable.
        let kept =
            run(json!({"include": [{"domain": "light"}], "exclude": [{"not": {"state": "on"}}]}));
        assert_eq!(kept, lights);
        // Static attributes are decided: exact, missing, number.
        assert_eq!(
            run(json!({"include": [{"attributes": {"unit_of_measurement": "%"}}]})),
            set(&["sensor.tablet_battery"])
        );
        // No include: nothing.
        assert_eq!(run(json!({"exclude": [{"domain": "light"}]})), set(&[]));
    }

    #[test]
    fn strategy_dashboards_cannot_be_listed() {
        let states = mirror();
        let known = |_: &str| true;
        for config in [
            json!({"strategy": {"type": "original-states"}}),
            json!({"views": [{"cards": []}, {"strategy": {"type": "areas"}}]}),
        ] {
            assert_eq!(
                entities_in(&config, &states, &known),
                DashboardEntities::Generated
            );
        }
    }

    #[test]
    fn globs() {
        let g = |p: &str| EntityGlob::new(p).unwrap();
        assert!(g("sensor.kitchen_*").matches("sensor.kitchen_temperature"));
        assert!(g("sensor.kitchen_*").matches("sensor.kitchen_"));
        assert!(!g("sensor.kitchen_*").matches("sensor.kitche"));
        assert!(g("*_battery").matches("sensor.phone_battery"));
        assert!(!g("*_battery").matches("sensor.phone_battery_level"));
        assert!(g("*.*_*").matches("a.b_c"));
        assert!(g("sensor.t?").matches("sensor.t1"));
        assert!(!g("sensor.t?").matches("sensor.t12"));
        assert!(g("light.kitchen").matches("light.kitchen"));
        assert!(!g("light.kitchen").matches("light.kitchen_2"));
        assert!(g("*a*a*a*b").matches(&format!("x.{}b", "a".repeat(1000))));
        assert!(!g("*a*a*a*b").matches(&format!("x.{}", "a".repeat(1000))));
        assert!(EntityGlob::new("Light.x").is_err());
        assert!(!g("light.kitchen").is_wildcard());
    }

    #[test]
    fn allowlist_is_union_plus_always_minus_never() {
        let config = DashboardsConfig {
            url_paths: vec!["lovelace".into(), "dashboard-hall".into()],
            always: vec![
                "sun.sun".into(),
                "sensor.kitchen_*".into(),
                "light.hidden".into(),
            ],
            never: vec!["*_battery".into(), "light.hidden".into()],
        };
        let a = DashboardEntities::Listed(set(&["light.kitchen", "sensor.door_battery"]));
        let b = DashboardEntities::Listed(set(&["light.hall", "sensor.kitchen_battery"]));
        let list = Allowlist::new([&a, &b], &config);
        for allowed in [
            "light.kitchen",
            "light.hall",
            "sun.sun",
            "sensor.kitchen_temperature",
        ] {
            assert!(list.allows(allowed), "{allowed}");
        }
        for refused in [
            "sensor.door_battery",
            "sensor.kitchen_battery",
            "light.hidden",
            "light.other",
        ] {
            assert!(!list.allows(refused), "{refused}");
        }
        assert_eq!(list.len(), 3);
        assert_eq!(
            list.entity_ids().collect::<Vec<_>>(),
            ["light.hall", "light.kitchen", "sun.sun"]
        );
        assert!(!list.allows_everything());
        // A recompute that finds the same entities is equal; one that differs is not.
        assert_eq!(list, Allowlist::new([&b, &a], &config));
        let c = DashboardEntities::Listed(set(&["light.porch"]));
        assert_ne!(list, Allowlist::new([&a, &c], &config));
        // A generated dashboard allows all but `never`.
        let all = Allowlist::new([&a, &DashboardEntities::Generated], &config);
        assert!(all.allows("light.other") && !all.allows("sensor.door_battery"));
    }

    #[test]
    fn requests_and_events_name_the_default_dashboard_null() {
        assert_eq!(
            config_request("lovelace"),
            json!({"type": "lovelace/config", "url_path": null, "force": false})
        );
        assert_eq!(
            config_request("dashboard-hall")["url_path"],
            "dashboard-hall"
        );
        assert_eq!(updated_url_path(&json!({"url_path": null})), "lovelace");
        assert_eq!(updated_url_path(&json!({})), "lovelace");
        assert_eq!(
            updated_url_path(&json!({"url_path": "dashboard-hall"})),
            "dashboard-hall"
        );
    }
}
