//! Which entities hass-edge tracks (`[filter]`), and the server-side filter sent to HA.
//!
//! Rule (issue #2 §3): exclude domains first; then, when `include_prefixes` is non-empty,
//! keep only entity ids starting with one of them; `enabled = false` tracks everything.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::config::FilterConfig;

/// A compiled `[filter]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityFilter {
    /// `false` tracks every entity.
    enabled: bool,
    /// Entity-id prefixes to keep; empty keeps all.
    include_prefixes: Vec<String>,
    /// Domains (the part of an entity id before the first `.`) never tracked.
    exclude_domains: Vec<String>,
    /// Entity ids tracked whatever the rules above say: the dashboards' allowlist (issue 16),
    /// so a dashboard served through hass-edge is never blank for an entity `[filter]`
    /// leaves out.
    also: BTreeSet<String>,
}

impl EntityFilter {
    /// Builds the filter from its config section.
    pub fn new(config: &FilterConfig) -> EntityFilter {
        EntityFilter {
            enabled: config.enabled,
            include_prefixes: config.include_prefixes.clone(),
            exclude_domains: config.exclude_domains.clone(),
            also: BTreeSet::new(),
        }
    }

    /// This filter, also tracking the entity ids `also`.
    pub fn with_also(mut self, also: BTreeSet<String>) -> EntityFilter {
        self.also = also;
        self
    }

    /// A filter that tracks everything.
    pub fn track_all() -> EntityFilter {
        EntityFilter {
            enabled: false,
            include_prefixes: Vec::new(),
            exclude_domains: Vec::new(),
            also: BTreeSet::new(),
        }
    }

    /// Whether `entity_id` is tracked.
    pub fn tracks(&self, entity_id: &str) -> bool {
        if !self.enabled || self.also.contains(entity_id) {
            return true;
        }
        let domain = entity_id.split_once('.').map_or(entity_id, |(d, _)| d);
        if self.exclude_domains.iter().any(|d| d == domain) {
            return false;
        }
        self.include_prefixes.is_empty()
            || self
                .include_prefixes
                .iter()
                .any(|p| entity_id.starts_with(p.as_str()))
    }

    /// The `include`/`exclude` keys for a `subscribe_entities` request, or `None` when the
    /// filter keeps everything.
    ///
    /// Shape: HA's `ENTITY_FILTER_SCHEMA` (`homeassistant/helpers/entityfilter.py`), accepted by
    /// `subscribe_entities` from HA 2024.9.0. With include globs present HA ignores exclude
    /// domains, so only the includes are sent then; [`EntityFilter::tracks`] is always applied
    /// on our side as well, which makes the HA-side filter an optimisation, never the rule.
    pub fn ha_filter(&self) -> Option<Value> {
        if !self.enabled {
            return None;
        }
        if !self.include_prefixes.is_empty() {
            // Entity ids only hold [a-z0-9_.], so a prefix never contains glob characters.
            let globs: Vec<String> = self
                .include_prefixes
                .iter()
                .map(|p| format!("{p}*"))
                .collect();
            if self.also.is_empty() {
                return Some(json!({"include": {"entity_globs": globs}}));
            }
            // HA's include-only case: an entity passes when it is listed or matches a glob.
            return Some(json!({"include": {"entity_globs": globs, "entities": self.also}}));
        }
        // Exclude-only with extra entities has no simple HA form: everything comes, and
        // `tracks` decides here.
        if self.exclude_domains.is_empty() || !self.also.is_empty() {
            return None;
        }
        Some(json!({"exclude": {"domains": self.exclude_domains}}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(enabled: bool, include: &[&str], exclude: &[&str]) -> EntityFilter {
        EntityFilter::new(&FilterConfig {
            enabled,
            include_prefixes: include.iter().map(|s| s.to_string()).collect(),
            exclude_domains: exclude.iter().map(|s| s.to_string()).collect(),
        })
    }

    #[test]
    fn dashboards_entities_are_tracked_whatever_the_rules_say() {
        let also = BTreeSet::from(["sensor.outdoor".to_owned()]);
        let f = filter(true, &["light."], &[]).with_also(also.clone());
        assert!(f.tracks("sensor.outdoor"));
        assert!(f.tracks("light.kitchen"));
        assert!(!f.tracks("sensor.indoor"));
        assert_eq!(
            f.ha_filter(),
            Some(json!({"include": {"entity_globs": ["light.*"], "entities": ["sensor.outdoor"]}}))
        );
        // Exclude-only has no HA form with extra entities: everything comes, `tracks` decides.
        let f = filter(true, &[], &["sensor"]).with_also(also);
        assert!(f.tracks("sensor.outdoor"));
        assert!(!f.tracks("sensor.indoor"));
        assert_eq!(f.ha_filter(), None);
        assert_ne!(
            f,
            filter(true, &[], &["sensor"]),
            "a new list is a new filter"
        );
    }

    #[test]
    fn default_excludes_noisy_domains() {
        let f = filter(true, &[], &["media_player", "camera", "automation"]);
        assert!(f.tracks("light.kitchen"));
        assert!(!f.tracks("camera.door"));
        assert!(!f.tracks("automation.night"));
        assert!(
            f.tracks("media_player_like.x"),
            "domain match is exact, not a prefix"
        );
    }

    #[test]
    fn exclude_wins_over_include() {
        let f = filter(
            true,
            &["light.", "sensor.temperature", "camera."],
            &["camera"],
        );
        assert!(f.tracks("light.kitchen"));
        assert!(f.tracks("sensor.temperature_living"));
        assert!(!f.tracks("sensor.humidity"));
        assert!(!f.tracks("camera.door"));
        assert!(!f.tracks("switch.x"));
    }

    #[test]
    fn disabled_tracks_everything() {
        let f = filter(false, &["light."], &["camera"]);
        assert!(f.tracks("camera.door"));
        assert!(f.tracks("switch.x"));
        assert_eq!(f.ha_filter(), None);
    }

    #[test]
    fn ha_filter_shapes() {
        assert_eq!(
            filter(true, &[], &["camera"]).ha_filter(),
            Some(json!({"exclude": {"domains": ["camera"]}}))
        );
        assert_eq!(
            filter(true, &["light.", "sensor.temp"], &["camera"]).ha_filter(),
            Some(json!({"include": {"entity_globs": ["light.*", "sensor.temp*"]}}))
        );
        assert_eq!(filter(true, &[], &[]).ha_filter(), None);
    }
}
