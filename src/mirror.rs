//! HA's state as this Pi mirrors it: the [`Store`] of tracked entities, the [`EntityFilter`]
//! that decides what is tracked, and the counters of what HA sent. [`Mirror::apply`] is the
//! one step that turns what HA sent (a snapshot, a compressed `subscribe_entities` event, a
//! `state_changed` event, a service call's answer) into store updates and the list of
//! [`Change`]s watchers see. The link, the golden replay, the fuzz driver and the ingest
//! benchmark all call it; nothing else writes HA's pushes into the store.
//!
//! Pure: no I/O, no clock; every call takes `now`.

use std::collections::HashSet;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::config::CacheConfig;
use crate::entity::{EntityState, Timestamp, valid_entity_id};
use crate::filter::EntityFilter;
use crate::session::{EntitiesEvent, Output};
use crate::store::{Change, Lookup, Store, StoreStats};

/// Invalid entity ids remembered as already logged (each is logged once; past this many,
/// new ones are counted but not logged).
const LOGGED_INVALID_IDS: usize = 256;

/// How often at most the "tracked entities evicted" warning is repeated.
const EVICTION_WARNING_PERIOD: Duration = Duration::from_secs(3600);

/// Something HA sent that changes the mirror.
#[derive(Debug)]
pub enum Update {
    /// The first `subscribe_entities` event of a subscription: the complete tracked set.
    /// Tracked entities absent from it are removed (deleted in HA while we were away).
    Snapshot(EntitiesEvent),
    /// A later `subscribe_entities` event (`a` added/replaced, `c` diffs, `r` removed); see
    /// HA `websocket_api/messages.py` `_state_diff_event`.
    Entities(EntitiesEvent),
    /// A `state_changed` event (HA `core.py` `EventStateChangedData`): the full new state,
    /// `None` when the entity was removed.
    StateChanged {
        /// The entity.
        entity_id: String,
        /// Its new state; `None` on removal.
        new_state: Option<EntityState>,
    },
    /// The states HA returned for a service call (`POST /api/services/…` answer, HA
    /// `components/api/__init__.py` `APIDomainServicesView`): written at once so the next
    /// read reflects the call before the subscription's event arrives.
    CallResult(Vec<EntityState>),
    /// `last_reported` rows from `get_states` (see [`Output::LastReported`]); not a change
    /// for watchers.
    LastReported(Vec<(String, Timestamp, Timestamp)>),
}

impl TryFrom<Output> for Update {
    /// Outputs that are not updates of the mirror come back unchanged, for the caller.
    type Error = Output;

    fn try_from(output: Output) -> Result<Update, Output> {
        match output {
            Output::Snapshot(event) => Ok(Update::Snapshot(event)),
            Output::Entities(event) => Ok(Update::Entities(event)),
            Output::LastReported(rows) => Ok(Update::LastReported(rows)),
            other => Err(other),
        }
    }
}

/// What one [`Mirror::apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Changes to tracked entities, in order, for watchers (SSE, D-Bus signals, the saver).
    pub changes: Vec<Change>,
    /// Entity updates in the input (each `a`, `c`, `r` entry or state).
    pub received: u64,
    /// Updates applied to the store.
    pub applied: u64,
    /// Updates ignored because the filter does not track the entity.
    pub filtered_out: u64,
    /// Entries that could not be decoded or applied (their entity was dropped).
    pub decode_errors: u64,
    /// Entries refused for an invalid entity id.
    pub invalid_entity_ids: u64,
    /// The input was a snapshot: the mirror is now live.
    pub snapshot: bool,
}

/// Totals since start of what HA sent, as [`Mirror::apply`] counted it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MirrorCounters {
    /// Entity updates received (snapshots included).
    pub events_received: u64,
    /// Updates applied to the store.
    pub events_applied: u64,
    /// Updates ignored because the filter does not track the entity.
    pub events_filtered_out: u64,
    /// Entity entries that could not be decoded or applied.
    pub decode_errors: u64,
    /// Entries whose entity id is not one HA itself would make (HA `core.py`
    /// `valid_entity_id`): never stored, served or put on the bus.
    pub invalid_entity_ids: u64,
    /// Entities in HA's last snapshot that the filter left out.
    pub snapshot_filtered_out: u64,
    /// Bumped whenever tracked states change (the warm-start saver compares it).
    pub generation: u64,
}

/// See the module docs.
#[derive(Debug)]
pub struct Mirror {
    /// Tracked states, REST read-through entries and cached 404s.
    store: Store,
    /// What is tracked.
    filter: EntityFilter,
    /// Totals.
    counters: MirrorCounters,
    /// Tracked evictions when last warned about, and when.
    evictions_warned: (u64, Option<Instant>),
    /// Invalid entity ids already logged (bounded by [`LOGGED_INVALID_IDS`]).
    logged_invalid: HashSet<String>,
}

impl Mirror {
    /// An empty mirror; the subscription counts as down since `now`.
    pub fn new(cache: &CacheConfig, filter: EntityFilter, now: Instant) -> Mirror {
        Mirror {
            store: Store::new(
                cache.mode,
                cache.max_entities,
                cache.ttl,
                cache.negative_ttl,
                now,
            ),
            filter,
            counters: MirrorCounters::default(),
            evictions_warned: (0, None),
            logged_invalid: HashSet::new(),
        }
    }

    /// Applies `update`. Undecodable entries drop their entity (so the next read goes to
    /// HA) and are counted and logged; entities the filter does not track are counted and
    /// ignored, so a `state_changed` for an untracked entity never enters the store.
    pub fn apply(&mut self, update: Update, now: Instant) -> Applied {
        let mut a = Applied::default();
        match update {
            Update::Snapshot(event) => self.snapshot(event, now, &mut a),
            Update::Entities(event) => self.entities(event, now, &mut a),
            Update::StateChanged {
                entity_id,
                new_state,
            } => {
                a.received = 1;
                if !self.valid(&entity_id, &mut a) {
                } else if !self.filter.tracks(&entity_id) {
                    a.filtered_out = 1;
                } else {
                    a.applied = 1;
                    a.changes.extend(match new_state {
                        Some(state) => self.store.upsert_pushed(state, now),
                        None => self.store.remove(&entity_id),
                    });
                }
            }
            Update::CallResult(mut states) => {
                states.retain(|s| self.valid(&s.entity_id, &mut a));
                a.changes = self.store.apply_call_result(states, &self.filter, now);
            }
            Update::LastReported(rows) => {
                for (entity_id, last_updated, last_reported) in rows {
                    self.store
                        .set_last_reported(&entity_id, last_updated, last_reported);
                }
            }
        }
        let c = &mut self.counters;
        c.events_received += a.received;
        c.events_applied += a.applied;
        c.events_filtered_out += a.filtered_out;
        c.decode_errors += a.decode_errors;
        c.invalid_entity_ids += a.invalid_entity_ids;
        if !a.changes.is_empty() || a.snapshot {
            c.generation += 1;
        }
        a
    }

    fn snapshot(&mut self, event: EntitiesEvent, now: Instant, a: &mut Applied) {
        a.received = event.len() as u64;
        a.snapshot = true;
        let mut states = Vec::with_capacity(event.added.len());
        for (entity_id, state) in event.added {
            if !self.valid(&entity_id, a) {
                continue;
            }
            if !self.filter.tracks(&entity_id) {
                a.filtered_out += 1;
                continue;
            }
            match state {
                Ok(s) => states.push(s),
                Err(e) => {
                    a.decode_errors += 1;
                    log::warn!("dropping {entity_id} from the snapshot: {e}");
                }
            }
        }
        a.applied = states.len() as u64;
        self.counters.snapshot_filtered_out = a.filtered_out;
        a.changes = self.store.replace_tracked(states, now);
        self.store.set_live();
    }

    fn entities(&mut self, mut event: EntitiesEvent, now: Instant, a: &mut Applied) {
        a.received = event.len() as u64;
        event.added.retain(|(id, _)| self.valid(id, a));
        event.changed.retain(|(id, _)| self.valid(id, a));
        event.removed.retain(|id| self.valid(id, a));
        let (store, filter) = (&mut self.store, &self.filter);
        for (entity_id, state) in event.added {
            if !filter.tracks(&entity_id) {
                a.filtered_out += 1;
                continue;
            }
            a.changes.extend(match state {
                Ok(s) => {
                    a.applied += 1;
                    store.upsert_pushed(s, now)
                }
                Err(e) => {
                    a.decode_errors += 1;
                    log::warn!("dropping {entity_id}: {e}");
                    store.drop_undecodable(&entity_id)
                }
            });
        }
        for (entity_id, diff) in event.changed {
            if !filter.tracks(&entity_id) {
                a.filtered_out += 1;
                continue;
            }
            a.changes
                .extend(match diff.map(|d| store.apply_diff(&entity_id, d, now)) {
                    Ok(Ok(change)) => {
                        a.applied += 1;
                        change
                    }
                    Ok(Err(e)) => {
                        a.decode_errors += 1;
                        log::warn!("dropping {entity_id}: cannot apply the change: {e}");
                        store.remove(&entity_id)
                    }
                    Err(e) => {
                        a.decode_errors += 1;
                        log::warn!("dropping {entity_id}: {e}");
                        store.drop_undecodable(&entity_id)
                    }
                });
        }
        for entity_id in event.removed {
            if !filter.tracks(&entity_id) {
                a.filtered_out += 1;
                continue;
            }
            a.applied += 1;
            a.changes.extend(store.remove(&entity_id));
        }
    }

    /// Whether `entity_id` has HA's shape; an invalid one is counted in `a` and logged once.
    fn valid(&mut self, entity_id: &str, a: &mut Applied) -> bool {
        if valid_entity_id(entity_id) {
            return true;
        }
        a.invalid_entity_ids += 1;
        if self.logged_invalid.len() < LOGGED_INVALID_IDS
            && self.logged_invalid.insert(entity_id.to_owned())
        {
            let shown: String = entity_id.chars().take(80).collect();
            log::warn!(
                "ignoring an entity with an invalid id from Home Assistant: {shown:?}{} ({} bytes)",
                if shown.len() < entity_id.len() {
                    "…"
                } else {
                    ""
                },
                entity_id.len()
            );
        }
        false
    }

    /// Counts a frame from HA that could not be decoded at all (the session's error).
    pub fn count_decode_error(&mut self) {
        self.counters.decode_errors += 1;
    }

    /// Puts states saved by an earlier run in the store, stale until HA's snapshot replaces
    /// them; those the filter does not track are left out. Returns how many are tracked now
    /// (`max_entities` may have left some out).
    pub fn restore(&mut self, states: Vec<EntityState>, saved_at: Instant) -> usize {
        for state in states {
            if valid_entity_id(&state.entity_id) && self.filter.tracks(&state.entity_id) {
                self.store.insert_restored(state, saved_at);
            }
        }
        self.store.tracked_len()
    }

    /// Uses a new filter (config reload). Returns the removals of entities no longer
    /// tracked, or `None` when the filter is the same.
    pub fn set_filter(&mut self, filter: EntityFilter) -> Option<Vec<Change>> {
        if filter == self.filter {
            return None;
        }
        let changes = self.store.retain_tracked(&filter);
        self.filter = filter;
        if !changes.is_empty() {
            self.counters.generation += 1;
        }
        Some(changes)
    }

    /// Applies new cache limits (config reload).
    pub fn reconfigure(&mut self, cache: &CacheConfig) {
        self.store.reconfigure(
            cache.mode,
            cache.max_entities,
            cache.ttl,
            cache.negative_ttl,
        );
    }

    /// The subscription went down at `now`: pushed states start to age.
    pub fn link_down(&mut self, now: Instant) {
        self.store.set_down(now);
    }

    /// How many tracked states were evicted by `max_entities` since the last warning, when a
    /// warning is due (at most once an hour): the tracked set does not fit, so lists miss
    /// entities and their reads go to HA.
    pub fn eviction_warning(&mut self, now: Instant) -> Option<u64> {
        let evicted = self.store.stats().tracked_evictions;
        let (warned, at) = self.evictions_warned;
        if evicted == warned {
            return None;
        }
        if at.is_some_and(|t| now.duration_since(t) < EVICTION_WARNING_PERIOD) {
            return None;
        }
        self.evictions_warned = (evicted, Some(now));
        Some(evicted - warned)
    }

    /// The filter in force.
    pub fn filter(&self) -> &EntityFilter {
        &self.filter
    }

    /// Totals of what HA sent.
    pub fn counters(&self) -> MirrorCounters {
        self.counters
    }

    /// The store's counters.
    pub fn stats(&self) -> StoreStats {
        self.store.stats()
    }

    /// Whether the subscription is live (pushed states are current).
    pub fn is_live(&self) -> bool {
        self.store.is_live()
    }

    /// Tracked states are served while not live (HA unreachable, or restored at start).
    pub fn serving_stale(&self) -> bool {
        !self.store.is_live() && self.store.tracked_len() > 0
    }

    /// Entries in the store (tracked, REST-fetched and cached 404s).
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// Tracked entities.
    pub fn tracked_len(&self) -> usize {
        self.store.tracked_len()
    }

    /// The tracked states, sorted by entity id.
    pub fn tracked_states(&self) -> Vec<Rc<EntityState>> {
        self.store.tracked_states()
    }

    /// A tracked state (see [`Store::peek_tracked`]).
    pub fn peek_tracked(&self, entity_id: &str) -> Option<Rc<EntityState>> {
        self.store.peek_tracked(entity_id)
    }

    /// A tracked or cached state, without touching the LRU order or counters.
    pub fn peek(&self, entity_id: &str) -> Option<Rc<EntityState>> {
        self.store.peek(entity_id)
    }

    /// A read of one entity (see [`Store::lookup`]).
    pub fn lookup(&mut self, entity_id: &str, now: Instant) -> Lookup {
        self.store.lookup(entity_id, now)
    }

    /// Caches a REST read: a state, or `None` for HA's 404.
    pub fn insert_fetched(&mut self, entity_id: &str, state: Option<EntityState>, now: Instant) {
        self.store.insert_fetched(entity_id, state, now);
    }

    /// Counts a stale serve.
    pub fn note_stale_serve(&mut self) {
        self.store.note_stale_serve();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CacheMode, FilterConfig};
    use crate::entity::StateDiff;
    use crate::store::tests::state;
    use serde_json::json;

    fn cache(max_entities: usize) -> CacheConfig {
        CacheConfig {
            mode: CacheMode::Update,
            max_entities,
            ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(10),
            persist: false,
            state_file: "/nonexistent".into(),
            persist_interval: Duration::from_secs(900),
        }
    }

    fn filter(exclude_domains: &[&str]) -> EntityFilter {
        EntityFilter::new(&FilterConfig {
            enabled: true,
            include_prefixes: Vec::new(),
            exclude_domains: exclude_domains.iter().map(|d| d.to_string()).collect(),
        })
    }

    fn added(states: &[(&str, &str)]) -> EntitiesEvent {
        EntitiesEvent {
            added: states
                .iter()
                .map(|(id, s)| (id.to_string(), Ok(Rc::new(state(id, s)))))
                .collect(),
            ..Default::default()
        }
    }

    fn diff(s: &str) -> StateDiff {
        serde_json::from_value(json!({"+": {"s": s, "lu": 2.0}})).unwrap()
    }

    fn ids(m: &Mirror) -> Vec<String> {
        m.tracked_states()
            .iter()
            .map(|s| s.entity_id.clone())
            .collect()
    }

    #[test]
    fn snapshot_replaces_the_store_and_removes_ghosts() {
        let t = Instant::now();
        let mut m = Mirror::new(&cache(100), filter(&[]), t);
        m.apply(
            Update::Snapshot(added(&[("light.a", "on"), ("light.ghost", "off")])),
            t,
        );
        let a = m.apply(
            Update::Snapshot(added(&[("light.a", "on"), ("light.b", "off")])),
            t,
        );
        assert!(a.snapshot && m.is_live());
        assert_eq!(ids(&m), ["light.a", "light.b"]);
        let gone: Vec<_> = a.changes.iter().filter(|c| c.new_state.is_none()).collect();
        assert_eq!(gone.len(), 1, "the ghost's removal is announced");
        assert_eq!(gone[0].entity_id, "light.ghost");
        assert!(
            a.changes.iter().all(|c| c.entity_id != "light.a"),
            "an unchanged state is not announced again"
        );
        assert_eq!(m.counters().events_received, 4);
    }

    #[test]
    fn compressed_add_change_remove() {
        let t = Instant::now();
        let mut m = Mirror::new(&cache(100), filter(&[]), t);
        m.apply(Update::Snapshot(added(&[("light.a", "on")])), t);
        let a = m.apply(Update::Entities(added(&[("switch.new", "off")])), t);
        assert_eq!(a.changes.len(), 1);
        assert!(a.changes[0].old_state.is_none());
        let event = EntitiesEvent {
            changed: vec![("light.a".into(), Ok(diff("off")))],
            removed: vec!["switch.new".into()],
            ..Default::default()
        };
        let a = m.apply(Update::Entities(event), t);
        assert_eq!((a.received, a.applied), (2, 2));
        assert_eq!(m.peek("light.a").unwrap().state, "off");
        assert_eq!(a.changes[0].old_state.as_ref().unwrap().state, "on");
        assert!(a.changes[1].new_state.is_none());
        assert_eq!(ids(&m), ["light.a"]);
        let g = m.counters().generation;
        let a = m.apply(Update::Entities(EntitiesEvent::default()), t);
        assert!(a.changes.is_empty());
        assert_eq!(
            m.counters().generation,
            g,
            "nothing changed, nothing to save"
        );
    }

    #[test]
    fn filter_applies_to_snapshots_and_events() {
        let t = Instant::now();
        let mut m = Mirror::new(&cache(100), filter(&["sensor"]), t);
        let a = m.apply(
            Update::Snapshot(added(&[("light.a", "on"), ("sensor.noisy", "1")])),
            t,
        );
        assert_eq!((a.applied, a.filtered_out), (1, 1));
        assert_eq!(m.counters().snapshot_filtered_out, 1);
        let event = EntitiesEvent {
            changed: vec![("sensor.noisy".into(), Ok(diff("2")))],
            ..added(&[("sensor.other", "3")])
        };
        let a = m.apply(Update::Entities(event), t);
        assert_eq!(a.filtered_out, 2);
        assert!(a.changes.is_empty());
        assert_eq!(ids(&m), ["light.a"]);
        assert_eq!(m.counters().events_filtered_out, 3);
        // A reload that stops tracking lights removes them.
        let removed = m.set_filter(filter(&["light"])).unwrap();
        assert_eq!(removed.len(), 1);
        assert!(m.tracked_states().is_empty());
        assert!(m.set_filter(filter(&["light"])).is_none(), "same filter");
    }

    #[test]
    fn max_entities_evictions_are_counted_and_warned_once_an_hour() {
        let t = Instant::now();
        let mut m = Mirror::new(&cache(2), filter(&[]), t);
        m.apply(
            Update::Snapshot(added(&[
                ("light.a", "1"),
                ("light.b", "2"),
                ("light.c", "3"),
            ])),
            t,
        );
        assert_eq!(m.tracked_len(), 2);
        assert_eq!(m.stats().tracked_evictions, 1);
        assert_eq!(m.eviction_warning(t), Some(1));
        m.apply(Update::Entities(added(&[("light.d", "4")])), t);
        assert_eq!(m.eviction_warning(t + Duration::from_secs(60)), None);
        assert_eq!(m.eviction_warning(t + Duration::from_secs(3600)), Some(1));
        assert_eq!(m.eviction_warning(t + Duration::from_secs(7200)), None);
    }

    #[test]
    fn state_changed_for_an_untracked_entity_is_ignored() {
        let t = Instant::now();
        let mut m = Mirror::new(&cache(100), filter(&["sensor"]), t);
        m.apply(Update::Snapshot(added(&[("light.a", "on")])), t);
        let a = m.apply(
            Update::StateChanged {
                entity_id: "sensor.x".into(),
                new_state: Some(state("sensor.x", "5")),
            },
            t,
        );
        assert_eq!(a.filtered_out, 1);
        assert!(a.changes.is_empty());
        assert!(m.peek("sensor.x").is_none());
        let a = m.apply(
            Update::StateChanged {
                entity_id: "light.a".into(),
                new_state: Some(state("light.a", "off")),
            },
            t,
        );
        assert_eq!(a.changes.len(), 1);
        let a = m.apply(
            Update::StateChanged {
                entity_id: "light.a".into(),
                new_state: None,
            },
            t,
        );
        assert!(a.changes[0].new_state.is_none());
        assert!(m.tracked_states().is_empty());
    }

    #[test]
    fn invalid_entity_ids_are_refused_and_counted() {
        let t = Instant::now();
        let mut m = Mirror::new(&cache(100), filter(&[]), t);
        let bad = [
            "light.a\u{0}b",
            "light.a\nb",
            "light.\"q\"",
            "light../x",
            "light/x.y",
            "Light.x",
        ];
        let long = format!("light.{}", "x".repeat(10_000));
        let mut states: Vec<(&str, &str)> = bad.iter().map(|id| (*id, "on")).collect();
        states.push((&long, "on"));
        states.push(("light.ok", "on"));
        let a = m.apply(Update::Snapshot(added(&states)), t);
        assert_eq!(a.invalid_entity_ids, 7);
        assert_eq!(ids(&m), ["light.ok"]);
        let a = m.apply(
            Update::StateChanged {
                entity_id: "light.a\u{0}b".into(),
                new_state: Some(state("light.a\u{0}b", "off")),
            },
            t,
        );
        assert!(a.changes.is_empty());
        let a = m.apply(Update::CallResult(vec![state("switch.\u{0}", "on")]), t);
        assert!(a.changes.is_empty());
        assert_eq!(m.counters().invalid_entity_ids, 9);
        assert_eq!(m.logged_invalid.len(), 8, "each id logged once");
        let restored = m.restore(vec![state("light.x\ny", "on")], t);
        assert_eq!(restored, 1, "only light.ok");
    }

    #[test]
    fn undecodable_entries_drop_their_entity_and_are_counted() {
        let t = Instant::now();
        let mut m = Mirror::new(&cache(100), filter(&[]), t);
        m.apply(Update::Snapshot(added(&[("light.a", "on")])), t);
        let event = EntitiesEvent {
            changed: vec![(
                "light.a".into(),
                Err(crate::entity::DecodeError("bad".into())),
            )],
            ..Default::default()
        };
        let a = m.apply(Update::Entities(event), t);
        assert_eq!(a.decode_errors, 1);
        assert!(a.changes[0].new_state.is_none(), "watchers see it go");
        assert_eq!(m.counters().decode_errors, 1);
        assert!(m.tracked_states().is_empty());
    }

    #[test]
    fn call_results_of_tracked_entities_are_announced() {
        let t = Instant::now();
        let mut m = Mirror::new(&cache(100), filter(&["sensor"]), t);
        m.apply(Update::Snapshot(added(&[("light.a", "off")])), t);
        let mut on = state("light.a", "on");
        on.last_updated = Timestamp(5);
        let a = m.apply(
            Update::CallResult(vec![on, state("sensor.untracked", "1")]),
            t,
        );
        assert_eq!(a.changes.len(), 1);
        assert_eq!(m.peek("light.a").unwrap().state, "on");
        assert_eq!(ids(&m), ["light.a"], "an untracked answer is only cached");
    }
}
