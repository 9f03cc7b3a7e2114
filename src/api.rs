//! The API routes: what each path answers, in HA's JSON shapes. Transport (parsing, limits,
//! keep-alive) is [`crate::http`]'s. The README's "HTTP API" section is the reference.
//!
//! - `GET /api/states`, `GET /api/states/{entity_id}` (`?refresh=true`): states, JSON-equal to
//!   HA's; `X-Cache: hit|miss|stale` and `Age` (seconds, RFC 9111 §5.1).
//! - `GET /api/services`; `POST /api/services/{domain}/{service}`: HA's REST, passed through
//!   (the service list cached until HA registers or removes a service).
//! - `GET /api/stream`: Server-Sent Events (see [`crate::sse`]).
//! - `GET /health`, `GET /status`, `GET /metrics`.
//!
//! With `http.api_token_file` set, everything but `/health` and CORS preflights needs
//! `Authorization: Bearer <token>` (or `?access_token=` on `/api/stream`, since browsers'
//! `EventSource` cannot send headers). CORS (Fetch standard) for `http.cors_origins` only.
//! Every route answers `HEAD` where it answers `GET`; a wrong method gets 405 with `Allow`.

use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::entity::{EntityState, Timestamp};
use crate::http::{Request, Response};
use crate::hub::{Hub, LinkState, Read, valid_entity_id};
use crate::sse::{Selection, Subscription};

/// What a route answers: a whole response, or a stream that takes over the connection.
#[derive(Debug)]
pub enum Reply {
    /// A complete response.
    Full(Response),
    /// `text/event-stream`: the extra headers, events to send first, and the subscription.
    Stream {
        /// CORS headers.
        headers: Vec<(&'static str, String)>,
        /// The snapshot (`?snapshot=1`), already narrowed to the selection: sent as events
        /// before live ones, formatted as it is written (see [`crate::sse::serve`]).
        first: Vec<Rc<EntityState>>,
        /// The client's queue.
        subscription: Subscription,
    },
}

/// A route: its metrics label and the methods it takes.
struct Route {
    label: &'static str,
    allow: &'static str,
    open: bool,
}

fn route(path: &str) -> Option<Route> {
    let r = |label, allow, open| Some(Route { label, allow, open });
    match path {
        "/health" => r("/health", "GET, HEAD, OPTIONS", true),
        "/status" => r("/status", "GET, HEAD, OPTIONS", false),
        "/metrics" => r("/metrics", "GET, HEAD, OPTIONS", false),
        "/api/" | "/api" => r("/api/", "GET, HEAD, OPTIONS", false),
        "/api/states" => r("/api/states", "GET, HEAD, OPTIONS", false),
        "/api/services" => r("/api/services", "GET, HEAD, OPTIONS", false),
        "/api/stream" => r("/api/stream", "GET, OPTIONS", false),
        p if p.starts_with("/api/states/") => {
            r("/api/states/{entity_id}", "GET, HEAD, OPTIONS", false)
        }
        p if p.starts_with("/api/services/") => {
            r("/api/services/{domain}/{service}", "POST, OPTIONS", false)
        }
        _ => None,
    }
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(hub: &Hub, request: &Request, allow_query: bool) -> bool {
    let token = hub.api_token.borrow();
    let Some(token) = token.as_ref() else {
        return true;
    };
    let presented = request
        .authorization
        .as_deref()
        .and_then(|h| h.strip_prefix("Bearer "))
        .or_else(|| {
            if allow_query {
                request.query_value("access_token")
            } else {
                None
            }
        });
    presented.is_some_and(|p| same_secret(p.trim().as_bytes(), token.expose().as_bytes()))
}

/// Routes `request`; returns the route label (for metrics) and the reply.
pub async fn handle(hub: &Hub, request: &Request) -> (&'static str, Reply) {
    let cors_origin = request
        .origin
        .as_deref()
        .filter(|o| {
            hub.config
                .borrow()
                .http
                .cors_origins
                .iter()
                .any(|allowed| allowed == o)
        })
        .map(str::to_owned);
    let (label, response) = route_request(hub, request, cors_origin.is_some()).await;
    let cors = |mut headers: Vec<(&'static str, String)>| {
        if let Some(origin) = &cors_origin {
            headers.push(("Access-Control-Allow-Origin", origin.clone()));
            headers.push(("Access-Control-Expose-Headers", "X-Cache, Age".into()));
        }
        if !hub.config.borrow().http.cors_origins.is_empty() {
            headers.push(("Vary", "Origin".into()));
        }
        headers
    };
    let reply = match response {
        Reply::Full(mut r) => {
            r.headers = cors(std::mem::take(&mut r.headers));
            Reply::Full(r)
        }
        Reply::Stream {
            headers,
            first,
            subscription,
        } => Reply::Stream {
            headers: cors(headers),
            first,
            subscription,
        },
    };
    (label, reply)
}

async fn route_request(hub: &Hub, request: &Request, cors_allowed: bool) -> (&'static str, Reply) {
    let path = request.path.as_str();
    let Some(route) = route(path) else {
        return (
            "unknown",
            Reply::Full(Response::error(404, format!("no route for {path}"))),
        );
    };
    let full = |r: Response| (route.label, Reply::Full(r));
    let method = request.method.as_str();
    if method == "OPTIONS" {
        // A CORS preflight (Fetch standard §4.8): no credentials are sent with it.
        if request.origin.is_some() && !cors_allowed {
            return full(Response::error(
                403,
                "origin not allowed (http.cors_origins)",
            ));
        }
        let mut r = Response::json(204, Vec::new()).with_header("Allow", route.allow);
        if cors_allowed {
            r = r
                .with_header("Access-Control-Allow-Methods", route.allow)
                .with_header(
                    "Access-Control-Allow-Headers",
                    "Authorization, Content-Type",
                )
                .with_header("Access-Control-Max-Age", "600");
        }
        return full(r);
    }
    let method_ok = match method {
        "HEAD" => route.allow.contains("HEAD"),
        m => route.allow.split(", ").any(|a| a == m),
    };
    if !method_ok {
        return full(
            Response::error(405, format!("{method} is not allowed on {}", route.label))
                .with_header("Allow", route.allow),
        );
    }
    if !route.open && !authorized(hub, request, route.label == "/api/stream") {
        return full(
            Response::error(401, "missing or wrong API token (Authorization: Bearer …)")
                .with_header("WWW-Authenticate", "Bearer"),
        );
    }
    let response = match route.label {
        "/health" => health(hub),
        "/status" => Response::json(200, status(hub).to_string().into_bytes()),
        "/metrics" => {
            let mut r = Response::json(200, crate::metrics::render(hub).into_bytes());
            r.content_type = crate::metrics::CONTENT_TYPE;
            r
        }
        "/api/" => Response::json(200, br#"{"message":"API running."}"#.to_vec()),
        "/api/states" => states(hub),
        "/api/states/{entity_id}" => {
            state(hub, &path["/api/states/".len()..], request.flag("refresh")).await
        }
        "/api/services" => services(hub).await,
        "/api/services/{domain}/{service}" => {
            call_service(hub, &path["/api/services/".len()..], &request.body).await
        }
        "/api/stream" => return (route.label, stream(hub, request)),
        _ => Response::error(404, format!("no route for {path}")),
    };
    full(response)
}

/// `GET /health`: 200 when the subscription is live and synced, 503 otherwise.
pub fn health(hub: &Hub) -> Response {
    let link = hub.link.borrow();
    let live = link.state == LinkState::Live;
    let body = json!({
        "status": link.state.as_str(),
        "websocket": {
            "connected": live,
            "reconnect_attempts": link.reconnect_attempts,
            "subscriptions": link.subscriptions,
        },
    });
    Response::json(if live { 200 } else { 503 }, body.to_string().into_bytes())
}

fn iso(t: Option<SystemTime>) -> Value {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| Value::String(Timestamp(d.as_micros() as i64).to_string()))
        .unwrap_or(Value::Null)
}

/// `GET /status`: everything an operator wants on one page (never the token).
pub fn status(hub: &Hub) -> Value {
    let link = hub.link.borrow().clone();
    let config = hub.config.borrow().clone();
    let (stats, entities, tracked) = {
        let store = hub.store.borrow();
        (store.stats(), store.len(), store.tracked_len())
    };
    let c = &hub.counters;
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": hub.started.elapsed().as_secs(),
        "started": iso(Some(hub.started_wall)),
        "home_assistant": {
            "url": config.ha.url,
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
            "last_event": iso(hub.last_event.get()),
        },
        "filter": config.filter,
        "cache": config.cache,
        "store": {
            "entities": entities,
            "tracked": tracked,
            "filtered_out_of_last_snapshot": hub.snapshot_filtered_out.get(),
            "hits": stats.hits,
            "misses": stats.misses,
            "stale_serves": stats.stale_serves,
            "evictions": stats.evictions,
            "tracked_evictions": stats.tracked_evictions,
            "failed_updates": stats.failed_updates,
        },
        "events": {
            "received": c.events_received.get(),
            "applied": c.events_applied.get(),
            "filtered_out": c.events_filtered_out.get(),
            "decode_errors": c.decode_errors.get(),
            "service_events": c.service_events.get(),
        },
        "ha_rest_requests": {
            "total": c.rest_total(),
            "last_hour": hub.rest_calls_last_hour(),
            "by_outcome": *c.rest_requests.borrow(),
        },
        "stream_clients": hub.stream.clients(),
        // Warm start: states loaded from disk are served stale (X-Cache: stale, Age from the
        // save) until HA's snapshot replaces them.
        "warm_start": hub.restored.get().map(|(n, at)| json!({"restored": n, "saved_at": iso(Some(at))})),
        "serving_stale": !hub.store.borrow().is_live() && tracked > 0,
    })
}

/// `GET /api/states/{entity_id}`.
pub async fn state(hub: &Hub, entity_id: &str, refresh: bool) -> Response {
    if !valid_entity_id(entity_id) {
        return Response::error(
            400,
            format!("invalid entity_id {entity_id:?}: expected <domain>.<object_id>"),
        );
    }
    match hub.read_state(entity_id, refresh).await {
        Read::Fresh { state, age, cache } => Response::json(200, state.to_json().into_bytes())
            .with_header("X-Cache", cache)
            .with_header("Age", age.as_secs().to_string()),
        Read::Stale { state, age } => Response::json(200, state.to_json().into_bytes())
            .with_header("X-Cache", "stale")
            .with_header("Age", age.as_secs().to_string()),
        Read::NotFound { cache } => {
            Response::error(404, "Entity not found.").with_header("X-Cache", cache)
        }
        Read::Failed(e) => Response::error(502, e),
    }
}

/// `GET /api/states`: every tracked entity, HA's list shape.
pub fn states(hub: &Hub) -> Response {
    let store = hub.store.borrow();
    let cache = if store.is_live() { "hit" } else { "stale" };
    Response::states(200, store.tracked_states()).with_header("X-Cache", cache)
}

/// `GET /api/services`.
async fn services(hub: &Hub) -> Response {
    match hub.services().await {
        Ok(list) => Response::json(200, list.as_bytes().to_vec()),
        Err(e) => Response::error(502, e),
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// `POST /api/services/{domain}/{service}`.
async fn call_service(hub: &Hub, rest: &str, body: &[u8]) -> Response {
    if !hub.config.borrow().http.allow_service_calls {
        return Response::error(
            403,
            "service calls are disabled (http.allow_service_calls = false)",
        );
    }
    let Some((domain, service)) = rest
        .split_once('/')
        .filter(|(d, s)| valid_name(d) && valid_name(s))
    else {
        return Response::error(
            400,
            format!("invalid service path {rest:?}: expected <domain>/<service>"),
        );
    };
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".to_vec()
    } else {
        body.to_vec()
    };
    if !matches!(serde_json::from_slice::<Value>(&body), Ok(Value::Object(_))) {
        return Response::error(400, "the body must be a JSON object of service_data fields");
    }
    match hub.call_service(domain, service, body).await {
        // HA answers some errors as plain text; keep the JSON error shape.
        Ok((status, text)) if !text.starts_with(['[', '{']) => Response::error(status, text),
        Ok((status, text)) => Response::json(status, text.into_bytes()),
        Err(e) => Response::error(502, e),
    }
}

/// `GET /api/stream`.
fn stream(hub: &Hub, request: &Request) -> Reply {
    let selection = Selection::parse(request.query_value("entity_id").unwrap_or(""));
    let first: Vec<Rc<EntityState>> = if request.flag("snapshot") {
        let mut states = hub.store.borrow().tracked_states();
        states.retain(|s| selection.matches(&s.entity_id));
        states
    } else {
        Vec::new()
    };
    match hub.stream.subscribe(selection) {
        Some(subscription) => Reply::Stream {
            headers: Vec::new(),
            first,
            subscription,
        },
        None => Reply::Full(
            Response::error(
                503,
                format!(
                    "too many stream clients (at most {})",
                    crate::sse::MAX_STREAM_CLIENTS
                ),
            )
            .with_header("Retry-After", "5"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_methods() {
        assert_eq!(
            route("/api/states/light.a").unwrap().label,
            "/api/states/{entity_id}"
        );
        assert!(route("/health").unwrap().open);
        assert!(!route("/metrics").unwrap().open);
        assert!(route("/nope").is_none());
        assert!(
            route("/api/services/light/turn_on")
                .unwrap()
                .allow
                .contains("POST")
        );
    }

    #[test]
    fn secret_comparison() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
