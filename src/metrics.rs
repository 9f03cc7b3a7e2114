//! `GET /metrics`: Prometheus text exposition format 0.0.4 (prometheus.io "Exposition
//! formats"), names `hass_edge_*`, base units, `_total` counters. Rendered on request from
//! one [`Status`] snapshot; nothing is kept for it in between. Pure.

use std::fmt::Write as _;
use std::time::UNIX_EPOCH;

use crate::status::Status;

/// Content type of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = write!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        let _ = writeln!(self.0, "{name} {value}");
    }
}

/// Escapes a label value (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every metric.
pub fn render(status: &Status) -> String {
    let (m, stats, l) = (&status.mirror, &status.store, &status.link_counters);
    let (entries, tracked) = (status.entries, status.tracked);
    let link = &status.link;
    let mut o = Out(String::with_capacity(4096));

    o.family(
        "hass_edge_build_info",
        "gauge",
        "Build information; always 1.",
    );
    let _ = writeln!(
        o.0,
        "hass_edge_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let start = status
        .started
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    o.single(
        "hass_edge_start_time_seconds",
        "gauge",
        "Start time of the daemon since the Unix epoch.",
        start,
    );
    o.single(
        "hass_edge_connection_up",
        "gauge",
        "1 while the subscription to Home Assistant is live and synced.",
        u8::from(status.live()),
    );
    o.single(
        "hass_edge_reconnect_attempts",
        "gauge",
        "Failed connection attempts since the last successful sync.",
        link.reconnect_attempts,
    );
    o.single(
        "hass_edge_reconnects_total",
        "counter",
        "Connections to Home Assistant lost or failed.",
        l.reconnects,
    );
    o.single(
        "hass_edge_auth_failures_total",
        "counter",
        "auth_invalid answers from Home Assistant.",
        l.auth_failures,
    );
    o.single(
        "hass_edge_subscriptions",
        "gauge",
        "Active subscriptions on the current connection.",
        link.subscriptions,
    );

    o.single(
        "hass_edge_events_received_total",
        "counter",
        "Entity updates received from Home Assistant (snapshots included).",
        m.events_received,
    );
    o.single(
        "hass_edge_events_applied_total",
        "counter",
        "Entity updates applied to the store.",
        m.events_applied,
    );
    o.single(
        "hass_edge_events_filtered_out_total",
        "counter",
        "Entity updates ignored because the filter does not track the entity.",
        m.events_filtered_out,
    );
    o.single(
        "hass_edge_decode_errors_total",
        "counter",
        "Frames or entity entries from Home Assistant that could not be decoded.",
        m.decode_errors,
    );
    o.single(
        "hass_edge_invalid_entity_ids_total",
        "counter",
        "Entity entries from Home Assistant refused for an invalid entity id.",
        m.invalid_entity_ids,
    );
    o.single(
        "hass_edge_service_events_total",
        "counter",
        "service_registered and service_removed events.",
        l.service_events,
    );

    o.single(
        "hass_edge_entities_tracked",
        "gauge",
        "Entities kept fresh by the subscription.",
        tracked,
    );
    o.single(
        "hass_edge_cache_entries",
        "gauge",
        "Entries in the store, REST-fetched and negative ones included.",
        entries,
    );
    o.single(
        "hass_edge_cache_hits_total",
        "counter",
        "Reads answered fresh from the store.",
        stats.hits,
    );
    o.single(
        "hass_edge_cache_misses_total",
        "counter",
        "Reads that needed Home Assistant.",
        stats.misses,
    );
    o.single(
        "hass_edge_cache_stale_serves_total",
        "counter",
        "Expired states served because Home Assistant could not be reached.",
        stats.stale_serves,
    );
    o.single(
        "hass_edge_cache_evictions_total",
        "counter",
        "Entries evicted by the max_entities bound.",
        stats.evictions,
    );
    o.single(
        "hass_edge_cache_tracked_evictions_total",
        "counter",
        "Tracked states evicted by the max_entities bound (the tracked set does not fit).",
        stats.tracked_evictions,
    );
    o.single(
        "hass_edge_cache_failed_updates_total",
        "counter",
        "Events that could not be applied; the entry was dropped.",
        stats.failed_updates,
    );

    o.family(
        "hass_edge_ha_rest_requests_total",
        "counter",
        "Requests to Home Assistant's REST API by outcome.",
    );
    for outcome in ["ok", "not_found", "unreachable", "error_status", "bad_body"] {
        let n = status.rest_requests.get(outcome).copied().unwrap_or(0);
        let _ = writeln!(
            o.0,
            "hass_edge_ha_rest_requests_total{{outcome=\"{outcome}\"}} {n}"
        );
    }

    o.single(
        "hass_edge_ha_rest_reads_limited_total",
        "counter",
        "Reads of entities Home Assistant does not push refused by the read-through budget.",
        status.rest_reads_limited,
    );

    o.family(
        "hass_edge_http_requests_total",
        "counter",
        "Local API requests by route and status.",
    );
    for ((route, status), n) in status.http_requests.iter() {
        let _ = writeln!(
            o.0,
            "hass_edge_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
            label(route)
        );
    }
    o.single(
        "hass_edge_http_hosts_refused_total",
        "counter",
        "Local API requests refused (421) for a Host that is not one of hass-edge's names (http.allowed_hosts).",
        status.forwarding.http.hosts_refused,
    );
    o.single(
        "hass_edge_http_connections_evicted_total",
        "counter",
        "Idle local API connections closed (or trickling requests answered 408) to make room for a new one at the connection cap.",
        status.forwarding.http.connections_evicted,
    );
    o.single(
        "hass_edge_sse_clients",
        "gauge",
        "Connected /api/stream clients.",
        status.stream.clients,
    );
    o.single(
        "hass_edge_sse_clients_dropped_total",
        "counter",
        "Stream clients disconnected for falling behind.",
        status.stream.dropped_slow,
    );
    o.single(
        "hass_edge_sse_events_total",
        "counter",
        "Events queued to stream clients.",
        status.stream.sent,
    );
    let f = &status.forwarding;
    o.single(
        "hass_edge_forwards_open",
        "gauge",
        "Requests being forwarded to Home Assistant now.",
        f.forwards_open,
    );
    o.single(
        "hass_edge_tunnels_open",
        "gauge",
        "WebSocket tunnels to Home Assistant open now.",
        f.tunnels_open,
    );
    o.single(
        "hass_edge_asset_cache_hits_total",
        "counter",
        "Frontend assets answered from disk.",
        f.asset_hits,
    );
    o.single(
        "hass_edge_asset_cache_misses_total",
        "counter",
        "Frontend assets asked of Home Assistant.",
        f.asset_misses,
    );
    o.single(
        "hass_edge_asset_cache_files",
        "gauge",
        "Frontend asset files kept on disk.",
        f.asset_files,
    );
    o.single(
        "hass_edge_asset_cache_bytes",
        "gauge",
        "Bytes of frontend asset files kept on disk.",
        f.asset_bytes,
    );
    o.single(
        "hass_edge_event_stream_clients",
        "gauge",
        "Stream clients of Home Assistant's other events.",
        f.event_clients,
    );
    o.single(
        "hass_edge_event_stream_clients_dropped_total",
        "counter",
        "Stream clients of Home Assistant's other events dropped for falling behind.",
        f.event_clients_dropped,
    );
    let w = &f.websocket_api;
    o.single(
        "hass_edge_websocket_sessions",
        "gauge",
        "Local WebSocket API sessions open now.",
        w.sessions_open,
    );
    o.single(
        "hass_edge_websocket_sessions_total",
        "counter",
        "Local WebSocket API sessions since start.",
        w.sessions_total,
    );
    o.single(
        "hass_edge_websocket_forwarded_commands_total",
        "counter",
        "WebSocket API commands forwarded to Home Assistant.",
        w.forwarded_commands,
    );
    o.single(
        "hass_edge_websocket_links",
        "gauge",
        "WebSocket API sessions' own links to Home Assistant open now.",
        w.links_open,
    );
    o.single(
        "hass_edge_websocket_slow_clients_dropped_total",
        "counter",
        "WebSocket API sessions dropped for falling behind.",
        w.slow_clients_dropped,
    );
    o.single(
        "hass_edge_websocket_auth_failures_total",
        "counter",
        "WebSocket API tokens Home Assistant refused.",
        w.auth_failures,
    );
    o.single(
        "hass_edge_websocket_refused_total",
        "counter",
        "WebSocket API upgrades refused at http.max_websocket_clients.",
        w.refused_full,
    );
    o.single(
        "hass_edge_websocket_commands_refused_total",
        "counter",
        "WebSocket API commands refused: too many waiting or kept for Home Assistant in the session.",
        w.commands_refused,
    );
    o.0
}
