//! One status snapshot, built once by the hub ([`crate::hub::Hub::status`]) and rendered four
//! ways: `GET /status` ([`Status::to_json`]), `GET /metrics` (`metrics.rs`), the D-Bus
//! properties (`dbus.rs`) and the sd_notify `STATUS=` line ([`Status::line`]). Each rule —
//! live, serving stale, the totals — is written here once.
//!
//! Pure: a plain struct of values; nothing here reads a clock or a socket.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::config::Config;
use crate::entity::Timestamp;
use crate::mirror::MirrorCounters;
use crate::store::StoreStats;

/// The state of the link to HA, as `/status`, `/health`, D-Bus and sd_notify report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Opening TCP/TLS/WebSocket.
    Connecting,
    /// Auth handshake under way.
    Authenticating,
    /// Authenticated; waiting for HA to run or for the snapshot.
    Syncing,
    /// Snapshot loaded, events flowing.
    Live,
    /// Waiting before the next attempt.
    Backoff,
    /// HA refused the token; retrying only every `max_delay_seconds`.
    AuthFailed,
    /// Shutting down.
    Stopping,
}

impl LinkState {
    /// The lower-case name used in every interface.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Authenticating => "authenticating",
            LinkState::Syncing => "syncing",
            LinkState::Live => "live",
            LinkState::Backoff => "backoff",
            LinkState::AuthFailed => "auth_failed",
            LinkState::Stopping => "stopping",
        }
    }
}

/// What is known about the link to HA.
#[derive(Debug, Clone)]
pub struct Link {
    /// Current state.
    pub state: LinkState,
    /// From `auth_required`, once seen.
    pub ha_version: Option<String>,
    /// Failed attempts since the last successful sync.
    pub reconnect_attempts: u32,
    /// When the last connection was made.
    pub last_connected: Option<SystemTime>,
    /// When the last connection ended.
    pub last_disconnected: Option<SystemTime>,
    /// Why the last connection ended or failed.
    pub last_error: Option<String>,
    /// Active subscriptions on the current connection.
    pub subscriptions: u32,
    /// Whether the HA-side filter is in use on the current subscription.
    pub ha_filter_active: bool,
}

impl Default for Link {
    fn default() -> Link {
        Link {
            state: LinkState::Connecting,
            ha_version: None,
            reconnect_attempts: 0,
            last_connected: None,
            last_disconnected: None,
            last_error: None,
            subscriptions: 0,
            ha_filter_active: false,
        }
    }
}

/// Totals of the link's own events (since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Connections lost or failed (each leads to a reconnect attempt).
    pub reconnects: u64,
    /// `auth_invalid` answers.
    pub auth_failures: u64,
    /// HA commands that failed.
    pub command_errors: u64,
    /// `service_registered` / `service_removed` events.
    pub service_events: u64,
}

/// Push-stream clients (`/api/stream`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamCounters {
    /// Connected now.
    pub clients: usize,
    /// Disconnected for falling behind (total).
    pub dropped_slow: u64,
    /// Events queued to clients (total).
    pub sent: u64,
}

/// Everything the status renderers show, at one moment.
#[derive(Debug, Clone)]
pub struct Status {
    /// The config in force (never holds the token itself, only its file's path).
    pub config: Rc<Config>,
    /// Daemon start (wall clock).
    pub started: SystemTime,
    /// Time since start.
    pub uptime: Duration,
    /// The link.
    pub link: Link,
    /// The link's totals.
    pub link_counters: LinkCounters,
    /// What HA sent, as the mirror counted it.
    pub mirror: MirrorCounters,
    /// The store's counters.
    pub store: StoreStats,
    /// Entries in the store (tracked, REST-fetched and cached 404s).
    pub entries: usize,
    /// Tracked entities.
    pub tracked: usize,
    /// Whether the subscription is live (pushed states current).
    pub store_live: bool,
    /// When HA last sent an entity update (wall clock).
    pub last_event: Option<SystemTime>,
    /// HA REST requests by outcome (`ok`, `not_found`, `unreachable`, `error_status`,
    /// `bad_body`).
    pub rest_requests: BTreeMap<&'static str, u64>,
    /// HA REST requests in the last hour.
    pub rest_last_hour: usize,
    /// Reads refused by the read-through budget, HA not asked (total).
    pub rest_reads_limited: u64,
    /// Local HTTP requests by (route label, status).
    pub http_requests: BTreeMap<(&'static str, u16), u64>,
    /// Push-stream clients.
    pub stream: StreamCounters,
    /// Warm start: how many states were loaded from disk, and when they were saved.
    pub warm_start: Option<(usize, SystemTime)>,
    /// Forwarding to HA.
    pub forwarding: ForwardStatus,
}

/// What the layers above the hub report (`api.rs` gathers it): forwarding to HA now
/// (`proxy.rs`, `assets.rs`, `events.rs`: open forwards and tunnels, the frontend asset
/// cache, the stream clients of HA's other events), the local WebSocket API, and the HTTP
/// transport's refusals and evictions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardStatus {
    /// Requests being forwarded now.
    pub forwards_open: usize,
    /// WebSocket tunnels open now.
    pub tunnels_open: usize,
    /// Assets answered from disk (total).
    pub asset_hits: u64,
    /// Assets asked of HA (total).
    pub asset_misses: u64,
    /// Asset files kept now.
    pub asset_files: usize,
    /// Bytes of asset files kept now.
    pub asset_bytes: u64,
    /// Stream clients of HA's other events now.
    pub event_clients: usize,
    /// Such clients dropped for falling behind (total).
    pub event_clients_dropped: u64,
    /// The local WebSocket API.
    pub websocket_api: WsApiStatus,
    /// The local HTTP transport.
    pub http: HttpStatus,
}

/// The local HTTP transport's own totals (`http.rs`, `hosts.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HttpStatus {
    /// Requests refused 421 for their `Host` (the DNS-rebinding guard, `http.allowed_hosts`).
    pub hosts_refused: u64,
    /// Idle connections closed, or trickling requests answered 408, to make room for a new
    /// one at `MAX_CONNECTIONS` (total).
    pub connections_evicted: u64,
}

/// The local WebSocket API (`ws_server.rs`, issue 16).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WsApiStatus {
    /// Sessions open now.
    pub sessions_open: usize,
    /// Sessions since start.
    pub sessions_total: u64,
    /// Commands forwarded to HA (total).
    pub forwarded_commands: u64,
    /// Sessions' own links to HA open now.
    pub links_open: usize,
    /// Sessions dropped for falling behind (total).
    pub slow_clients_dropped: u64,
    /// Tokens HA refused (total).
    pub auth_failures: u64,
    /// Upgrades refused at `http.max_websocket_clients` (total).
    pub refused_full: u64,
    /// Commands refused for what the session already has waiting or kept for HA
    /// (`ws_server::MAX_PENDING`, `ws_server::MAX_KEPT_BYTES`; total).
    pub commands_refused: u64,
}

impl Status {
    /// Live and synced: the subscription is up and its snapshot applied.
    pub fn live(&self) -> bool {
        self.link.state == LinkState::Live
    }

    /// Tracked states are served but not live (HA unreachable, or restored from disk at
    /// start): `X-Cache: stale`, `/health` 503.
    pub fn serving_stale(&self) -> bool {
        !self.store_live && self.tracked > 0
    }

    /// HA REST requests in total.
    pub fn rest_total(&self) -> u64 {
        self.rest_requests.values().sum()
    }

    /// `GET /status`: everything an operator wants on one page (never the token).
    pub fn to_json(&self) -> Value {
        let link = &self.link;
        let (m, s) = (&self.mirror, &self.store);
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.uptime.as_secs(),
            "started": iso(Some(self.started)),
            "home_assistant": {
                "url": self.config.ha.url,
                "version": link.ha_version,
            },
            "connection": {
                "state": link.state.as_str(),
                "reconnect_attempts": link.reconnect_attempts,
                "last_connected": iso(link.last_connected),
                "last_disconnected": iso(link.last_disconnected),
                "last_error": link.last_error,
                "subscriptions": link.subscriptions,
                "ha_side_filter": link.ha_filter_active,
                "last_event": iso(self.last_event),
            },
            "filter": self.config.filter,
            "cache": self.config.cache,
            "store": {
                "entities": self.entries,
                "tracked": self.tracked,
                "filtered_out_of_last_snapshot": m.snapshot_filtered_out,
                "hits": s.hits,
                "misses": s.misses,
                "stale_serves": s.stale_serves,
                "evictions": s.evictions,
                "tracked_evictions": s.tracked_evictions,
                "failed_updates": s.failed_updates,
            },
            "events": {
                "received": m.events_received,
                "applied": m.events_applied,
                "filtered_out": m.events_filtered_out,
                "decode_errors": m.decode_errors,
                "invalid_entity_ids": m.invalid_entity_ids,
                "service_events": self.link_counters.service_events,
            },
            "ha_rest_requests": {
                "total": self.rest_total(),
                "last_hour": self.rest_last_hour,
                "by_outcome": self.rest_requests,
                "reads_limited": self.rest_reads_limited,
            },
            "stream_clients": self.stream.clients,
            "forwarding": {
                "forwards_open": self.forwarding.forwards_open,
                "tunnels_open": self.forwarding.tunnels_open,
                "asset_cache": {
                    "hits": self.forwarding.asset_hits,
                    "misses": self.forwarding.asset_misses,
                    "files": self.forwarding.asset_files,
                    "bytes": self.forwarding.asset_bytes,
                },
                "event_clients": self.forwarding.event_clients,
                "event_clients_dropped": self.forwarding.event_clients_dropped,
            },
            "websocket_api": {
                "sessions_open": self.forwarding.websocket_api.sessions_open,
                "sessions_total": self.forwarding.websocket_api.sessions_total,
                "forwarded_commands": self.forwarding.websocket_api.forwarded_commands,
                "links_open": self.forwarding.websocket_api.links_open,
                "slow_clients_dropped": self.forwarding.websocket_api.slow_clients_dropped,
                "auth_failures": self.forwarding.websocket_api.auth_failures,
                "refused_full": self.forwarding.websocket_api.refused_full,
                "commands_refused": self.forwarding.websocket_api.commands_refused,
            },
            "http": {
                "hosts_refused": self.forwarding.http.hosts_refused,
                "connections_evicted": self.forwarding.http.connections_evicted,
            },
            "warm_start": self.warm_start.map(|(n, at)| json!({"restored": n, "saved_at": iso(Some(at))})),
            "serving_stale": self.serving_stale(),
        })
    }

    /// The one-line summary for `systemctl status` (sd_notify `STATUS=`, systemd
    /// `sd_notify(3)`), e.g. `live: HA 2025.4.4, 412 entities tracked (2,031 filtered out),
    /// 0 HA REST calls in the last hour`.
    pub fn line(&self) -> String {
        let link = &self.link;
        let version = link.ha_version.as_deref().unwrap_or("?");
        match link.state {
            LinkState::Live => format!(
                "live: HA {version}, {} entities tracked ({} filtered out), {} HA REST calls in the last hour",
                thousands(self.tracked as u64),
                thousands(self.mirror.snapshot_filtered_out),
                thousands(self.rest_last_hour as u64)
            ),
            LinkState::Backoff => format!(
                "backoff: retry {} after: {}",
                link.reconnect_attempts,
                link.last_error.as_deref().unwrap_or("connection lost")
            ),
            LinkState::AuthFailed => format!(
                "auth_failed: Home Assistant rejected the access token; waiting for a valid one (checked every {}s)",
                self.config.reconnect.max_delay.as_secs()
            ),
            state => format!("{}: {}", state.as_str(), self.config.ha.url),
        }
    }
}

/// Microseconds since the Unix epoch (0 for `None`), as D-Bus timestamps are given.
pub fn epoch_micros(t: Option<SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_micros() as u64)
}

/// ISO 8601 with microseconds, HA's timestamp format; JSON `null` for `None`.
fn iso(t: Option<SystemTime>) -> Value {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| Value::String(Timestamp(d.as_micros() as i64).to_string()))
        .unwrap_or(Value::Null)
}

/// Formats a count with thousands separators: `2031` → `2,031`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: LinkState, tracked: usize, store_live: bool) -> Status {
        Status {
            config: Rc::new(
                crate::config::parse_config("", Vec::<(String, String)>::new()).unwrap(),
            ),
            started: UNIX_EPOCH,
            uptime: Duration::ZERO,
            link: Link {
                state,
                ha_version: Some("2025.4.4".into()),
                ..Link::default()
            },
            link_counters: LinkCounters::default(),
            mirror: MirrorCounters {
                snapshot_filtered_out: 2031,
                ..Default::default()
            },
            store: StoreStats::default(),
            entries: tracked,
            tracked,
            store_live,
            last_event: None,
            rest_requests: BTreeMap::from([("ok", 2), ("unreachable", 1)]),
            rest_last_hour: 3,
            rest_reads_limited: 0,
            http_requests: BTreeMap::new(),
            stream: StreamCounters::default(),
            warm_start: None,
            forwarding: ForwardStatus::default(),
        }
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(412), "412");
        assert_eq!(thousands(2031), "2,031");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn one_rule_for_live_and_stale() {
        let s = status(LinkState::Live, 412, true);
        assert!(s.live() && !s.serving_stale());
        assert_eq!(
            s.line(),
            "live: HA 2025.4.4, 412 entities tracked (2,031 filtered out), 3 HA REST calls in the last hour"
        );
        let s = status(LinkState::Backoff, 412, false);
        assert!(!s.live() && s.serving_stale());
        assert_eq!(s.to_json()["serving_stale"], true);
        assert_eq!(s.to_json()["ha_rest_requests"]["total"], 3);
        assert!(
            s.line()
                .starts_with("backoff: retry 0 after: connection lost")
        );
        assert!(!status(LinkState::Syncing, 0, false).serving_stale());
    }
}
