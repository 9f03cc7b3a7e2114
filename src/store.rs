//! The state store: an LRU-bounded map from `entity_id` to the last known state, with the
//! freshness rules of issue #2 §4. Pure: no I/O, every call takes `now`.
//!
//! - Entries pushed by the live subscription are authoritative (fresh, `Age: 0`) while it is
//!   live; once it goes down they age out `ttl` after the moment it went down.
//! - Entries fetched over REST expire `ttl` after the fetch; cached 404s after `negative_ttl`.
//! - An expired entry is still handed back as `stale`, so the caller can serve it when HA
//!   cannot be reached rather than fail.
//! - `invalidate` mode drops an entry on every event instead of applying it.
//! - Read-through entries of entities the subscription does not hold (REST reads of
//!   untracked ids, cached 404s) live in their own LRU of [`READ_THROUGH_ENTRIES`], so no
//!   number of reads of made-up ids can evict a tracked state (issue 13, item 3).

use std::collections::HashSet;
use std::rc::Rc;
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::config::CacheMode;
use crate::entity::{DecodeError, EntityState, StateDiff, Timestamp};
use crate::filter::EntityFilter;

/// Bound on read-through entries (REST reads of ids the subscription does not hold, and
/// cached 404s), apart from `max_entities`.
pub const READ_THROUGH_ENTRIES: usize = 1024;

/// Where an entry came from; decides how long it stays fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From the `subscribe_entities` stream (snapshot or event).
    Pushed,
    /// From a REST read-through.
    Rest,
    /// Loaded from an earlier run (warm start): stale until HA confirms it.
    Restored,
}

/// A cached value: a state, or HA's 404 for the id.
#[derive(Debug, Clone)]
pub enum Cached {
    /// HA had this state.
    State(Rc<EntityState>),
    /// HA answered 404 (negative cache).
    NotFound,
}

#[derive(Debug, Clone)]
struct Entry {
    /// The value.
    value: Cached,
    /// Its origin.
    origin: Origin,
    /// When it was last known to be current.
    at: Instant,
}

/// The answer to [`Store::lookup`].
#[derive(Debug, Clone)]
pub enum Lookup {
    /// A fresh state; `age` is how long since it was known current (0 when pushed and live).
    Hit {
        /// The state.
        state: Rc<EntityState>,
        /// Time since it was last known current.
        age: Duration,
    },
    /// A fresh cached 404.
    NotFound {
        /// Time since HA said so.
        age: Duration,
    },
    /// Nothing fresh: fetch from HA; serve `stale` (if any) when HA cannot be reached.
    Miss {
        /// The expired state, if one is kept.
        stale: Option<(Rc<EntityState>, Duration)>,
    },
}

/// A change to a tracked entity, for watchers (SSE, D-Bus signals): `None` = absent.
#[derive(Debug, Clone)]
pub struct Change {
    /// The entity.
    pub entity_id: String,
    /// The state before.
    pub old_state: Option<Rc<EntityState>>,
    /// The state after; `None` when the entity was removed.
    pub new_state: Option<Rc<EntityState>>,
}

/// Counters kept by the store. All are totals since start except `entities`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Lookups answered fresh from the store (states and cached 404s).
    pub hits: u64,
    /// Lookups that needed HA.
    pub misses: u64,
    /// Expired states served because HA could not be reached.
    pub stale_serves: u64,
    /// Entries pushed out by the LRU bound.
    pub evictions: u64,
    /// Of those, tracked states (pushed by the subscription or restored): the tracked set
    /// is larger than `max_entities`, so `/api/states` lacks some until they are pushed again.
    pub tracked_evictions: u64,
    /// Events that could not be applied (the entry was dropped instead).
    pub failed_updates: u64,
}

/// The store. See the module docs for the rules.
#[derive(Debug)]
pub struct Store {
    /// Entries of entities the subscription pushed (or that were restored from disk), least
    /// recently used first out; bounded by `max_entities`.
    entries: LruCache<String, Entry>,
    /// Read-through entries of other ids (REST reads, cached 404s); bounded by
    /// [`READ_THROUGH_ENTRIES`].
    fetched: LruCache<String, Entry>,
    /// Update or invalidate on events.
    mode: CacheMode,
    /// Life of REST entries, and of pushed ones while the subscription is down.
    ttl: Duration,
    /// Life of a cached 404.
    negative_ttl: Duration,
    /// When the subscription went down; `None` while it is live.
    down_since: Option<Instant>,
    /// Counters.
    stats: StoreStats,
}

impl Store {
    /// An empty store; the subscription counts as down since `now`.
    pub fn new(
        mode: CacheMode,
        max_entities: usize,
        ttl: Duration,
        negative_ttl: Duration,
        now: Instant,
    ) -> Store {
        let cap =
            std::num::NonZeroUsize::new(max_entities.max(1)).unwrap_or(std::num::NonZeroUsize::MIN);
        // `LruCache::new` allocates its table for `cap` up front (278 KiB at the default
        // 10,000); an unbounded cache resized to `cap` grows its table with its contents.
        let mut entries = LruCache::unbounded();
        entries.resize(cap);
        let mut fetched = LruCache::unbounded();
        fetched.resize(
            std::num::NonZeroUsize::new(READ_THROUGH_ENTRIES)
                .unwrap_or(std::num::NonZeroUsize::MIN),
        );
        Store {
            entries,
            fetched,
            mode,
            ttl,
            negative_ttl,
            down_since: Some(now),
            stats: StoreStats::default(),
        }
    }

    /// Changes the limits in place (config reload); shrinking evicts the least recently used.
    pub fn reconfigure(
        &mut self,
        mode: CacheMode,
        max_entities: usize,
        ttl: Duration,
        negative_ttl: Duration,
    ) {
        let cap =
            std::num::NonZeroUsize::new(max_entities.max(1)).unwrap_or(std::num::NonZeroUsize::MIN);
        let (before, tracked_before) = (self.entries.len(), self.tracked_len());
        self.entries.resize(cap);
        self.stats.evictions += (before - self.entries.len()) as u64;
        self.stats.tracked_evictions += (tracked_before - self.tracked_len()) as u64;
        self.mode = mode;
        self.ttl = ttl;
        self.negative_ttl = negative_ttl;
    }

    /// Marks the subscription live (after a snapshot): pushed entries are authoritative.
    pub fn set_live(&mut self) {
        self.down_since = None;
    }

    /// Marks the subscription down at `now`: pushed entries start to age.
    pub fn set_down(&mut self, now: Instant) {
        self.down_since.get_or_insert(now);
    }

    /// Whether the subscription is live.
    pub fn is_live(&self) -> bool {
        self.down_since.is_none()
    }

    /// Counters.
    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    /// Number of entries (states and cached 404s).
    pub fn len(&self) -> usize {
        self.entries.len() + self.fetched.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.fetched.is_empty()
    }

    /// Number of entities pushed by the subscription (or restored from disk).
    pub fn tracked_len(&self) -> usize {
        self.entries
            .iter()
            .filter(|(_, e)| e.origin != Origin::Rest)
            .count()
    }

    fn age_and_fresh(&self, e: &Entry, now: Instant) -> (Duration, bool) {
        match (e.origin, &e.value) {
            (Origin::Pushed, _) => match self.down_since {
                None => (Duration::ZERO, true),
                Some(down) => {
                    let age = now.saturating_duration_since(e.at.max(down));
                    (age, age < self.ttl)
                }
            },
            (Origin::Restored, _) => (now.saturating_duration_since(e.at), false),
            (Origin::Rest, Cached::NotFound) => {
                let age = now.saturating_duration_since(e.at);
                (age, age < self.negative_ttl)
            }
            (Origin::Rest, Cached::State(_)) => {
                let age = now.saturating_duration_since(e.at);
                (age, age < self.ttl)
            }
        }
    }

    /// Looks `entity_id` up and counts a hit or a miss. Marks the entry recently used.
    pub fn lookup(&mut self, entity_id: &str, now: Instant) -> Lookup {
        let found = match self.entries.get(entity_id) {
            Some(e) => Some(e.clone()),
            None => self.fetched.get(entity_id).cloned(),
        };
        let Some(e) = found else {
            self.stats.misses += 1;
            return Lookup::Miss { stale: None };
        };
        let (age, fresh) = self.age_and_fresh(&e, now);
        match (fresh, e.value) {
            (true, Cached::State(state)) => {
                self.stats.hits += 1;
                Lookup::Hit { state, age }
            }
            (true, Cached::NotFound) => {
                self.stats.hits += 1;
                Lookup::NotFound { age }
            }
            (false, Cached::State(state)) => {
                self.stats.misses += 1;
                Lookup::Miss {
                    stale: Some((state, age)),
                }
            }
            (false, Cached::NotFound) => {
                self.stats.misses += 1;
                Lookup::Miss { stale: None }
            }
        }
    }

    /// Counts an expired state served because HA could not be reached.
    pub fn note_stale_serve(&mut self) {
        self.stats.stale_serves += 1;
    }

    /// A tracked state (pushed or restored), without touching LRU order or counters: what
    /// the subscription has delivered, never a REST copy (which may come before the
    /// subscription's own event for the entity, and would then be announced twice).
    pub fn peek_tracked(&self, entity_id: &str) -> Option<Rc<EntityState>> {
        Self::state_of(self.entries.peek(entity_id).cloned())
    }

    /// A tracked or REST-fetched state without touching LRU order or counters (D-Bus
    /// `GetState`).
    pub fn peek(&self, entity_id: &str) -> Option<Rc<EntityState>> {
        let entry = self
            .entries
            .peek(entity_id)
            .or_else(|| self.fetched.peek(entity_id));
        match entry {
            Some(Entry {
                value: Cached::State(s),
                ..
            }) => Some(s.clone()),
            _ => None,
        }
    }

    /// Stores the result of a REST read-through (`None` = HA said 404).
    /// A pushed entry that is fresh wins: the subscription is at least as new as the fetch.
    /// The state of an entity the subscription holds replaces its entry in place; anything
    /// else (untracked ids, 404s) goes to the read-through LRU, so it never evicts a
    /// tracked state.
    pub fn insert_fetched(&mut self, entity_id: &str, state: Option<EntityState>, now: Instant) {
        let held = self.entries.peek(entity_id);
        if let Some(e) = held
            && e.origin == Origin::Pushed
            && self.age_and_fresh(e, now).1
        {
            return;
        }
        let entry = Entry {
            value: match state {
                Some(s) => Cached::State(Rc::new(s)),
                None => Cached::NotFound,
            },
            origin: Origin::Rest,
            at: now,
        };
        if held.is_some() && matches!(entry.value, Cached::State(_)) {
            // The key is present: no eviction.
            self.put(entity_id.to_owned(), entry);
            return;
        }
        if held.is_some() {
            // HA says it is gone; the 404 is a read-through entry like any other.
            self.entries.pop(entity_id);
        }
        if self
            .fetched
            .push(entity_id.to_owned(), entry)
            .is_some_and(|(k, _)| k != entity_id)
        {
            self.stats.evictions += 1;
        }
    }

    /// Loads states saved by an earlier run; they stay stale (never fresh) until the first
    /// snapshot replaces them. `saved_at` is when they were last known current.
    pub fn insert_restored(&mut self, state: EntityState, saved_at: Instant) {
        let id = state.entity_id.clone();
        self.put(
            id,
            Entry {
                value: Cached::State(Rc::new(state)),
                origin: Origin::Restored,
                at: saved_at,
            },
        );
    }

    fn put(&mut self, entity_id: String, entry: Entry) -> Option<Entry> {
        match self.entries.push(entity_id, entry) {
            Some((k, old)) if self.entries.contains(&k) => Some(old),
            Some((_, evicted)) => {
                self.stats.evictions += 1;
                if evicted.origin != Origin::Rest {
                    self.stats.tracked_evictions += 1;
                }
                None
            }
            None => None,
        }
    }

    fn state_of(entry: Option<Entry>) -> Option<Rc<EntityState>> {
        match entry {
            Some(Entry {
                value: Cached::State(s),
                origin: Origin::Pushed | Origin::Restored,
                ..
            }) => Some(s),
            _ => None,
        }
    }

    /// Replaces the tracked set with a snapshot (the first `subscribe_entities` event): tracked
    /// entities absent from it are removed (deleted in HA while we were away). Returns what
    /// changed, for watchers. States may come shared (`Rc`, as the session decodes them, so
    /// that a snapshot is not copied on its way in) or owned.
    pub fn replace_tracked<S: Into<Rc<EntityState>>>(
        &mut self,
        states: Vec<S>,
        now: Instant,
    ) -> Vec<Change> {
        let states: Vec<Rc<EntityState>> = states.into_iter().map(Into::into).collect();
        let ids: HashSet<&str> = states.iter().map(|s| s.entity_id.as_str()).collect();
        let gone: Vec<String> = self
            .entries
            .iter()
            .filter(|(id, e)| e.origin != Origin::Rest && !ids.contains(id.as_str()))
            .map(|(id, _)| id.clone())
            .collect();
        let mut changes = Vec::new();
        for id in gone {
            if let Some(old) = Self::state_of(self.entries.pop_entry(&id).map(|(_, e)| e)) {
                changes.push(Change {
                    entity_id: id,
                    old_state: Some(old),
                    new_state: None,
                });
            }
        }
        for state in states {
            if let Some(c) = self.upsert(state, now, true) {
                changes.push(c);
            }
        }
        changes
    }

    /// Applies a full state pushed by the subscription (`a`). In invalidate mode the entry is
    /// dropped instead. Returns the change, if any.
    pub fn upsert_pushed(
        &mut self,
        state: impl Into<Rc<EntityState>>,
        now: Instant,
    ) -> Option<Change> {
        let state = state.into();
        if self.mode == CacheMode::Invalidate {
            return self.remove(&state.entity_id);
        }
        self.upsert(state, now, false)
    }

    fn upsert(&mut self, new: Rc<EntityState>, now: Instant, snapshot: bool) -> Option<Change> {
        let id = new.entity_id.clone();
        self.fetched.pop(&id);
        let old = Self::state_of(self.put(
            id.clone(),
            Entry {
                value: Cached::State(new.clone()),
                origin: Origin::Pushed,
                at: now,
            },
        ));
        if snapshot && old.as_deref() == Some(&*new) {
            return None;
        }
        Some(Change {
            entity_id: id,
            old_state: old,
            new_state: Some(new),
        })
    }

    /// Applies a `c` diff to a pushed entry. If the entry is not a pushed one (absent,
    /// evicted, fetched over REST) or the diff fails, the entry is dropped so the next read
    /// goes to HA: a half-applied or unverifiable state is never kept.
    ///
    /// Errors: the diff's [`DecodeError`] (the entry has been removed and counted).
    pub fn apply_diff(
        &mut self,
        entity_id: &str,
        diff: StateDiff,
        now: Instant,
    ) -> Result<Option<Change>, DecodeError> {
        if self.mode == CacheMode::Invalidate {
            return Ok(self.remove(entity_id));
        }
        let Some(entry) = self.entries.peek_mut(entity_id) else {
            // A REST copy of an id the subscription did not hold would predate this diff.
            self.fetched.pop(entity_id);
            return Ok(None);
        };
        let (Origin::Pushed, Cached::State(state)) = (entry.origin, &mut entry.value) else {
            // A REST copy may predate this diff: applying it could miss earlier changes.
            self.entries.pop(entity_id);
            return Ok(None);
        };
        let old = state.clone();
        let mut new = (*old).clone();
        match new.apply_diff(diff) {
            Ok(()) if new == *old => {
                // Already current (e.g. written from a service call's answer): no change.
                entry.at = now;
                Ok(None)
            }
            Ok(()) => {
                let new = Rc::new(new);
                *state = new.clone();
                entry.at = now;
                self.entries.promote(entity_id);
                Ok(Some(Change {
                    entity_id: entity_id.to_owned(),
                    old_state: Some(old),
                    new_state: Some(new),
                }))
            }
            Err(e) => {
                self.stats.failed_updates += 1;
                self.entries.pop(entity_id);
                Err(e)
            }
        }
    }

    /// Writes the states a service call returned (HA's answer to `POST /api/services/…`),
    /// so the next read reflects the call before the subscription's event arrives. Tracked
    /// entities become pushed entries unless the store already holds a newer update;
    /// untracked ones are cached like a REST read.
    pub fn apply_call_result(
        &mut self,
        states: Vec<EntityState>,
        filter: &EntityFilter,
        now: Instant,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        for state in states {
            if !filter.tracks(&state.entity_id) {
                self.insert_fetched(&state.entity_id.clone(), Some(state), now);
                continue;
            }
            if self.mode == CacheMode::Invalidate {
                changes.extend(self.remove(&state.entity_id));
                continue;
            }
            let newer_known = matches!(
                self.entries.peek(&state.entity_id),
                Some(Entry { value: Cached::State(s), origin: Origin::Pushed, .. }) if s.last_updated > state.last_updated || **s == state
            );
            if !newer_known {
                changes.extend(self.upsert(Rc::new(state), now, false));
            }
        }
        changes
    }

    /// Sets `last_reported` of a pushed state whose `last_updated` still matches (see
    /// `session::Output::LastReported`). Not a change for watchers: HA fires no
    /// `state_changed` for a re-report either.
    pub fn set_last_reported(
        &mut self,
        entity_id: &str,
        last_updated: Timestamp,
        last_reported: Timestamp,
    ) {
        if let Some(Entry {
            value: Cached::State(state),
            origin: Origin::Pushed,
            ..
        }) = self.entries.peek_mut(entity_id)
            && state.last_updated == last_updated
            && state.last_reported.is_some_and(|r| r != last_reported)
        {
            Rc::make_mut(state).last_reported = Some(last_reported);
        }
    }

    /// Removes an entity (`r` event, or a failed decode). Returns the change if it was tracked.
    pub fn remove(&mut self, entity_id: &str) -> Option<Change> {
        self.fetched.pop(entity_id);
        let old = Self::state_of(self.entries.pop(entity_id))?;
        Some(Change {
            entity_id: entity_id.to_owned(),
            old_state: Some(old),
            new_state: None,
        })
    }

    /// Counts an event that could not be decoded and drops its entity.
    pub fn drop_undecodable(&mut self, entity_id: &str) -> Option<Change> {
        self.stats.failed_updates += 1;
        self.remove(entity_id)
    }

    /// The tracked states (pushed or restored), sorted by entity id.
    pub fn tracked_states(&self) -> Vec<Rc<EntityState>> {
        let mut v: Vec<Rc<EntityState>> = self
            .entries
            .iter()
            .filter(|(_, e)| e.origin != Origin::Rest)
            .filter_map(|(_, e)| match &e.value {
                Cached::State(s) => Some(s.clone()),
                Cached::NotFound => None,
            })
            .collect();
        v.sort_unstable_by(|a, b| a.entity_id.cmp(&b.entity_id));
        v
    }

    /// Drops tracked entries the filter no longer tracks (config reload, warm start).
    pub fn retain_tracked(&mut self, filter: &EntityFilter) -> Vec<Change> {
        let gone: Vec<String> = self
            .entries
            .iter()
            .filter(|(id, e)| e.origin != Origin::Rest && !filter.tracks(id))
            .map(|(id, _)| id.clone())
            .collect();
        gone.iter().filter_map(|id| self.remove(id)).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::entity::Context;
    use serde_json::json;

    const TTL: Duration = Duration::from_secs(30);
    const NEG: Duration = Duration::from_secs(10);

    /// A state with fixed times and context, for tests.
    pub(crate) fn state(id: &str, s: &str) -> EntityState {
        EntityState {
            entity_id: id.into(),
            state: s.into(),
            attributes: Default::default(),
            last_changed: Timestamp(1),
            last_reported: None,
            last_updated: Timestamp(1),
            context: Context {
                id: "c".into(),
                ..Default::default()
            },
            epoch: Default::default(),
        }
    }

    fn store(max: usize, t0: Instant) -> Store {
        Store::new(CacheMode::Update, max, TTL, NEG, t0)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn hit_state(l: Lookup) -> String {
        match l {
            Lookup::Hit { state, .. } => state.state.clone(),
            other => panic!("expected a hit, got {other:?}"),
        }
    }

    #[test]
    fn pushed_entries_are_fresh_while_live_and_age_out_after_going_down() {
        let t0 = Instant::now();
        let mut s = store(10, t0);
        s.replace_tracked(vec![state("light.a", "on")], t0);
        s.set_live();
        assert_eq!(
            hit_state(s.lookup("light.a", t0 + secs(3600))),
            "on",
            "live: no expiry"
        );
        s.set_down(t0 + secs(3600));
        assert!(
            matches!(s.lookup("light.a", t0 + secs(3610)), Lookup::Hit { age, .. } if age == secs(10))
        );
        match s.lookup("light.a", t0 + secs(3631)) {
            Lookup::Miss {
                stale: Some((st, age)),
            } => {
                assert_eq!(st.state, "on");
                assert_eq!(age, secs(31));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.stats().hits, 2);
        assert_eq!(s.stats().misses, 1);
    }

    #[test]
    fn rest_entries_and_404s_expire_after_their_ttl() {
        let t0 = Instant::now();
        let mut s = store(10, t0);
        s.set_live();
        s.insert_fetched("sensor.x", Some(state("sensor.x", "1")), t0);
        s.insert_fetched("sensor.gone", None, t0);
        assert!(
            matches!(s.lookup("sensor.x", t0 + secs(29)), Lookup::Hit { age, .. } if age == secs(29))
        );
        assert!(matches!(
            s.lookup("sensor.x", t0 + secs(30)),
            Lookup::Miss { stale: Some(_) }
        ));
        assert!(matches!(
            s.lookup("sensor.gone", t0 + secs(9)),
            Lookup::NotFound { .. }
        ));
        assert!(matches!(
            s.lookup("sensor.gone", t0 + secs(10)),
            Lookup::Miss { stale: None }
        ));
        assert!(matches!(
            s.lookup("sensor.never", t0),
            Lookup::Miss { stale: None }
        ));
        assert_eq!(s.tracked_len(), 0, "REST entries are not tracked");
    }

    #[test]
    fn snapshot_replaces_the_tracked_set_and_reports_changes() {
        let t0 = Instant::now();
        let mut s = store(10, t0);
        s.replace_tracked(vec![state("light.a", "on"), state("light.b", "off")], t0);
        s.insert_fetched("sensor.untracked", Some(state("sensor.untracked", "5")), t0);
        let changes = s.replace_tracked(vec![state("light.a", "on"), state("light.c", "on")], t0);
        let mut summary: Vec<(String, bool, bool)> = changes
            .iter()
            .map(|c| {
                (
                    c.entity_id.clone(),
                    c.old_state.is_some(),
                    c.new_state.is_some(),
                )
            })
            .collect();
        summary.sort();
        assert_eq!(
            summary,
            [
                ("light.b".to_string(), true, false),
                ("light.c".to_string(), false, true)
            ],
            "unchanged light.a is not reported"
        );
        let ids: Vec<String> = s
            .tracked_states()
            .iter()
            .map(|s| s.entity_id.clone())
            .collect();
        assert_eq!(ids, ["light.a", "light.c"]);
        assert!(
            s.peek("sensor.untracked").is_some(),
            "REST entries survive a snapshot"
        );
        assert!(
            s.peek_tracked("sensor.untracked").is_none(),
            "a REST entry is not a tracked state"
        );
        assert_eq!(s.peek_tracked("light.c").unwrap().state, "on");
        // A REST copy of an id the subscription has not delivered yet, then its `a`.
        s.insert_fetched("light.d", Some(state("light.d", "on")), t0);
        assert!(s.peek_tracked("light.d").is_none());
        let c = s.upsert_pushed(state("light.d", "on"), t0).unwrap();
        assert!(c.old_state.is_none(), "new to watchers");
        assert_eq!(s.peek_tracked("light.d").unwrap().state, "on");
    }

    #[test]
    fn lru_bound_evicts_least_recently_used_and_counts() {
        let t0 = Instant::now();
        let mut s = store(2, t0);
        s.set_live();
        s.upsert_pushed(state("a.1", "x"), t0);
        s.upsert_pushed(state("a.2", "x"), t0);
        s.lookup("a.1", t0);
        s.upsert_pushed(state("a.3", "x"), t0);
        assert_eq!(s.len(), 2);
        assert!(s.peek("a.2").is_none(), "a.2 was least recently used");
        assert!(s.peek("a.1").is_some());
        assert_eq!(s.stats().evictions, 1);
        assert_eq!(s.stats().tracked_evictions, 1, "a.2 was a tracked state");
        s.upsert_pushed(state("a.4", "x"), t0);
        assert_eq!(s.stats().tracked_evictions, 2);
        s.reconfigure(CacheMode::Update, 1, TTL, NEG);
        assert_eq!(s.len(), 1);
        assert_eq!(
            (s.stats().evictions, s.stats().tracked_evictions),
            (3, 3),
            "the shrink dropped one tracked state"
        );
    }

    #[test]
    fn read_through_entries_never_evict_tracked_states() {
        let t0 = Instant::now();
        let mut s = store(3, t0);
        s.set_live();
        s.upsert_pushed(state("a.1", "x"), t0);
        s.upsert_pushed(state("a.2", "x"), t0);
        // A stranger reads many made-up ids: HA answers 404 or a state for each.
        for i in 0..READ_THROUGH_ENTRIES + 10 {
            let id = format!("light.made_up_{i}");
            let state = (i % 2 == 0).then(|| state(&id, "on"));
            s.insert_fetched(&id, state, t0);
        }
        assert_eq!(s.tracked_len(), 2, "no tracked state was evicted");
        assert_eq!(s.stats().tracked_evictions, 0);
        assert_eq!(
            s.len(),
            2 + READ_THROUGH_ENTRIES,
            "the read-through LRU is bounded"
        );
        assert_eq!(s.stats().evictions, 10);
        assert!(matches!(s.lookup("a.1", t0), Lookup::Hit { .. }));
        // A pushed state takes its id out of the read-through LRU.
        let last = format!("light.made_up_{}", READ_THROUGH_ENTRIES + 8);
        s.upsert_pushed(state(&last, "off"), t0);
        assert_eq!(s.len(), 3 + READ_THROUGH_ENTRIES - 1);
        assert_eq!(s.peek(&last).unwrap().state, "off");
        // A 404 for a tracked id (deleted in HA while we were down) leaves the tracked set.
        s.set_down(t0);
        s.insert_fetched("a.1", None, t0 + TTL * 2);
        assert!(s.tracked_states().iter().all(|st| st.entity_id != "a.1"));
        assert!(matches!(
            s.lookup("a.1", t0 + TTL * 2),
            Lookup::NotFound { .. }
        ));
    }

    #[test]
    fn diffs_apply_to_pushed_entries_only() {
        let t0 = Instant::now();
        let mut s = store(10, t0);
        s.set_live();
        s.upsert_pushed(state("light.a", "off"), t0);
        let diff = |v| serde_json::from_value::<StateDiff>(v).unwrap();
        let c = s
            .apply_diff("light.a", diff(json!({"+": {"s": "on"}})), t0)
            .unwrap()
            .unwrap();
        assert_eq!(c.old_state.unwrap().state, "off");
        assert_eq!(c.new_state.unwrap().state, "on");
        assert_eq!(hit_state(s.lookup("light.a", t0)), "on");

        // A diff for an entity we only have from REST drops it: the copy may be older.
        s.insert_fetched("sensor.r", Some(state("sensor.r", "1")), t0);
        assert!(
            s.apply_diff("sensor.r", diff(json!({"+": {"s": "2"}})), t0)
                .unwrap()
                .is_none()
        );
        assert!(s.peek("sensor.r").is_none());

        // A diff that fails leaves no half-applied state behind.
        assert!(
            s.apply_diff("light.a", diff(json!({"+": {"s": "x", "lc": -1.0}})), t0)
                .is_err()
        );
        assert!(s.peek("light.a").is_none());
        assert_eq!(s.stats().failed_updates, 1);
    }

    #[test]
    fn call_result_is_written_unless_newer_is_known() {
        let t0 = Instant::now();
        let mut s = store(10, t0);
        s.set_live();
        let all = EntityFilter::track_all();
        let mut newer = state("light.b", "on");
        newer.last_updated = Timestamp(10);
        s.upsert_pushed(newer, t0);
        let changes = s.apply_call_result(
            vec![state("light.a", "on"), state("light.b", "off")],
            &all,
            t0,
        );
        assert_eq!(changes.len(), 1, "light.b already holds a newer update");
        assert_eq!(hit_state(s.lookup("light.a", t0)), "on");
        assert_eq!(hit_state(s.lookup("light.b", t0)), "on");
        // The subscription's diff for the same change is then a no-op, not a second change.
        let diff = serde_json::from_value::<StateDiff>(json!({"+": {"s": "on"}})).unwrap();
        assert!(s.apply_diff("light.a", diff, t0).unwrap().is_none());
    }

    #[test]
    fn invalidate_mode_drops_on_events() {
        let t0 = Instant::now();
        let mut s = Store::new(CacheMode::Invalidate, 10, TTL, NEG, t0);
        s.replace_tracked(vec![state("light.a", "off"), state("light.b", "off")], t0);
        s.set_live();
        assert_eq!(hit_state(s.lookup("light.a", t0)), "off");
        s.apply_diff("light.a", StateDiff::default(), t0).unwrap();
        assert!(matches!(
            s.lookup("light.a", t0),
            Lookup::Miss { stale: None }
        ));
        s.upsert_pushed(state("light.b", "on"), t0);
        assert!(s.peek("light.b").is_none());
    }

    #[test]
    fn fresh_pushed_state_wins_over_a_racing_rest_fetch() {
        let t0 = Instant::now();
        let mut s = store(10, t0);
        s.set_live();
        s.upsert_pushed(state("light.a", "on"), t0);
        s.insert_fetched("light.a", Some(state("light.a", "off")), t0);
        assert_eq!(hit_state(s.lookup("light.a", t0)), "on");
    }

    #[test]
    fn restored_entries_are_stale_until_the_snapshot() {
        let t0 = Instant::now();
        let mut s = store(10, t0);
        s.insert_restored(state("light.a", "on"), t0);
        s.insert_restored(state("light.gone", "on"), t0);
        assert!(
            matches!(s.lookup("light.a", t0 + secs(5)), Lookup::Miss { stale: Some((_, age)) } if age == secs(5))
        );
        s.replace_tracked(vec![state("light.a", "off")], t0 + secs(6));
        s.set_live();
        assert_eq!(hit_state(s.lookup("light.a", t0 + secs(6))), "off");
        assert!(s.peek("light.gone").is_none());
    }

    #[test]
    fn retain_tracked_applies_a_new_filter() {
        let t0 = Instant::now();
        let mut s = store(10, t0);
        s.replace_tracked(vec![state("light.a", "on"), state("camera.b", "idle")], t0);
        let f = EntityFilter::new(&crate::config::FilterConfig {
            enabled: true,
            include_prefixes: vec![],
            exclude_domains: vec!["camera".into()],
        });
        let gone = s.retain_tracked(&f);
        assert_eq!(gone.len(), 1);
        assert!(s.peek("camera.b").is_none());
    }
}
