//! The dashboards' allowlist kept current (issue 16): what `[dashboards]` lists, read from HA.
//! [`Dashboards::run`] fetches each dashboard's `lovelace/config` and HA's states on a link
//! of its own ([`UpLink`], hass-edge's HA token) and computes the [`Allowlist`]
//! (`dashboards.rs`, pure); the local WebSocket API (`ws_server.rs`) serves it.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::Value;
use smol::Timer;
use smol::future::FutureExt;

use crate::dashboards::{Allowlist, DashboardEntities};
use crate::entity::EntityState;
use crate::hub::Hub;
use crate::uplink::UpLink;

/// How often the dashboards' allowlist is computed again without a reason.
pub const DASHBOARDS_REFRESH: Duration = Duration::from_secs(300);
/// Least time between two reads of the dashboards that `lovelace_updated` events ask for:
/// each read opens a link and fetches every state and config, and anyone who may fire events
/// in HA can fire that one as often as they like.
pub const UPDATE_GAP: Duration = Duration::from_secs(3);

/// `data` of an SSE-rendered `lovelace_updated` event.
fn lovelace_event_data(text: &str) -> Value {
    let json = text.trim().strip_prefix("data: ").unwrap_or(text);
    serde_json::from_str::<Value>(json)
        .map(|mut e| e["data"].take())
        .unwrap_or(Value::Null)
}

/// The allowlist now, and who waits for the next one.
#[derive(Debug, Default)]
pub struct Dashboards {
    /// The allowlist (`[dashboards]`), once computed; `None` without one.
    current: RefCell<Option<Rc<Allowlist>>>,
    /// Goes up with every new allowlist.
    generation: Cell<u64>,
    /// Notified with every new allowlist.
    changed: event_listener::Event,
}

impl Dashboards {
    /// Keeps the dashboards' allowlist (`[dashboards]`, issue 16) current until shutdown:
    /// fetches each dashboard's `lovelace/config` and HA's states on a link of its own (with
    /// hass-edge's HA token) whenever the shared link connects, the section changes on
    /// reload, or HA fires `lovelace_updated` for one of them; also every
    /// [`DASHBOARDS_REFRESH`], for `auto-entities` filters over entities that came since. The
    /// mirror also tracks every listed entity ([`Hub::track_also`]). A failed fetch keeps the
    /// last list and is tried again after 30 s.
    pub async fn run(&self, hub: &Hub, shutdown: crate::shutdown::Shutdown) {
        let mut updates: Option<crate::events::Receiver> = None;
        let mut fetched_for: Option<(
            Option<std::time::SystemTime>,
            crate::config::DashboardsConfig,
        )> = None;
        let mut due = Instant::now();
        // When the dashboards were last read: an update is read `UPDATE_GAP` after it at the
        // soonest.
        let mut read_at: Option<Instant> = None;
        let soon = |read_at: Option<Instant>| {
            let now = Instant::now();
            read_at.map_or(now, |at| (at + UPDATE_GAP).max(now))
        };
        let mut dashboards: BTreeMap<String, DashboardEntities> = BTreeMap::new();
        loop {
            if shutdown.is_triggered() {
                return;
            }
            let changed = hub.listen_changed();
            let config = hub.config();
            let wanted = &config.dashboards;
            let link = hub.link();
            if !wanted.enabled() {
                updates = None;
                fetched_for = None;
                dashboards.clear();
                if self.current.borrow().is_some() {
                    self.set(None);
                    hub.track_also(Default::default()).await;
                }
            } else if link.state == crate::status::LinkState::Live {
                if updates.is_none() {
                    let types = HashSet::from(["lovelace_updated".to_owned()]);
                    updates = hub.subscribe_events(Some(types));
                }
                let mut stale = fetched_for
                    .as_ref()
                    .is_none_or(|(at, cfg)| *at != link.last_connected || cfg != wanted);
                if let Some(receiver) = updates.as_mut() {
                    loop {
                        match receiver.try_recv() {
                            Ok(Some(text)) => {
                                let data = lovelace_event_data(&text);
                                let url_path = crate::dashboards::updated_url_path(&data);
                                if wanted.url_paths.iter().any(|p| p == url_path) {
                                    due = due.min(soon(read_at));
                                }
                            }
                            Ok(None) => break,
                            Err(()) => {
                                // Events were lost: read again (as soon as an update may).
                                updates = None;
                                due = due.min(soon(read_at));
                                break;
                            }
                        }
                    }
                }
                stale |= Instant::now() >= due;
                if stale {
                    read_at = Some(Instant::now());
                    match Self::fetch(hub, wanted).await {
                        Ok((fetched, known)) => {
                            dashboards = fetched;
                            let list = Allowlist::new(dashboards.values(), wanted);
                            log::info!(
                                "dashboards {}: {} entities listed{}",
                                wanted.url_paths.join(", "),
                                list.len(),
                                if list.allows_everything() {
                                    " (a generated dashboard shows every entity)"
                                } else {
                                    ""
                                }
                            );
                            let _ = known;
                            if self.current.borrow().as_deref() != Some(&list) {
                                let also = if list.allows_everything() {
                                    Default::default()
                                } else {
                                    list.entity_ids().map(str::to_owned).collect()
                                };
                                self.set(Some(Rc::new(list)));
                                hub.track_also(also).await;
                            }
                            fetched_for = Some((link.last_connected, wanted.clone()));
                            due = Instant::now() + DASHBOARDS_REFRESH;
                        }
                        Err(e) => {
                            log::warn!(
                                "could not read the dashboards from HA: {e}; trying again in 30 s"
                            );
                            due = Instant::now() + Duration::from_secs(30);
                            fetched_for = Some((link.last_connected, wanted.clone()));
                        }
                    }
                    continue;
                }
            }
            // The refresh timer runs only while there is something to refresh.
            let refresh = wanted.enabled() && link.state == crate::status::LinkState::Live;
            let next_update = async {
                match updates.as_mut() {
                    Some(r) => {
                        // Put back as "stale" on the next turn: peek by receiving.
                        let text = r.recv().await;
                        Some(text)
                    }
                    None => std::future::pending().await,
                }
            };
            let woke = async {
                changed.await;
                None
            }
            .or(next_update)
            .or(async {
                if refresh {
                    Timer::at(due).await;
                } else {
                    std::future::pending::<()>().await;
                }
                None
            })
            .or(async {
                shutdown.wait().await;
                None
            })
            .await;
            // Never a busy turn: whatever woke us, let the others run first.
            smol::future::yield_now().await;
            if let Some(Some(text)) = woke {
                let data = lovelace_event_data(&text);
                let url_path = crate::dashboards::updated_url_path(&data);
                if wanted.url_paths.iter().any(|p| p == url_path) {
                    due = due.min(soon(read_at));
                }
            }
        }
    }

    /// Reads each dashboard's config and HA's states over a link of its own.
    async fn fetch(
        hub: &Hub,
        wanted: &crate::config::DashboardsConfig,
    ) -> Result<(BTreeMap<String, DashboardEntities>, usize), String> {
        let upstream = hub.upstream().ok_or("no HA configured")?;
        let mut link = UpLink::open(&upstream, &upstream.token)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let states = link
            .call(1, &serde_json::json!({"type": "get_states"}))
            .await?;
        let states: Vec<Rc<EntityState>> = match states.get("result") {
            Some(list) => serde_json::from_value::<Vec<EntityState>>(list.clone())
                .map_err(|e| format!("get_states: {e}"))?
                .into_iter()
                .map(Rc::new)
                .collect(),
            None => return Err("get_states failed".into()),
        };
        let known: HashSet<&str> = states.iter().map(|s| s.entity_id.as_str()).collect();
        let mut out = BTreeMap::new();
        for (i, url_path) in wanted.url_paths.iter().enumerate() {
            let request = crate::dashboards::config_request(url_path);
            let answer = link.call(2 + i as u64, &request).await?;
            let entities = if answer["success"] == true {
                crate::dashboards::entities_in(&answer["result"], &states, &|id| known.contains(id))
            } else if answer["error"]["code"] == "config_not_found" {
                DashboardEntities::Generated
            } else {
                return Err(format!(
                    "lovelace/config {url_path}: {}",
                    answer["error"]["message"].as_str().unwrap_or("failed")
                ));
            };
            out.insert(url_path.clone(), entities);
        }
        Ok((out, known.len()))
    }

    fn set(&self, list: Option<Rc<Allowlist>>) {
        *self.current.borrow_mut() = list;
        self.generation.set(self.generation.get() + 1);
        self.changed.notify(usize::MAX);
    }

    /// The allowlist now, if any.
    pub fn current(&self) -> Option<Rc<Allowlist>> {
        self.current.borrow().clone()
    }

    /// Whether a client restricted to the allowlist gets `entity_id` (everything without one).
    pub fn allows(&self, entity_id: &str) -> bool {
        self.current
            .borrow()
            .as_ref()
            .is_none_or(|l| l.allows(entity_id))
    }

    /// Goes up with every new allowlist.
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    /// Resolves at the next new allowlist; a waiter compares [`Dashboards::generation`] too.
    pub fn listen(&self) -> event_listener::EventListener {
        self.changed.listen()
    }
}
