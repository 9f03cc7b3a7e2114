//! The API routes: what each path answers, in HA's JSON shapes. Transport (parsing, limits,
//! keep-alive) is [`crate::http`]'s.
//!
//! - `GET /api/states` — the tracked entities (HA's list shape), sorted by `entity_id`.
//! - `GET /api/states/{entity_id}` — one state, JSON-equal to HA's `GET /api/states/…`;
//!   headers `X-Cache: hit|miss|stale` and `Age` (seconds, RFC 9111 §5.1). `?refresh=true`
//!   bypasses the store. 404 `{"message": "Entity not found."}` as HA; 502 when HA cannot be
//!   reached and nothing is known.
//! - `GET /health` — 200 when the subscription is live and synced, else 503.
//!
//! Every route also answers `HEAD`; a wrong method gets 405 with `Allow`.

use serde_json::json;

use crate::http::{Request, Response};
use crate::hub::{Hub, LinkState, Read, valid_entity_id};

/// Routes `request`; returns the route label (for metrics) and the response.
pub async fn handle(hub: &Hub, request: &Request) -> (&'static str, Response) {
    let path = request.path.as_str();
    let get = matches!(request.method.as_str(), "GET" | "HEAD");
    let (route, allow) = match path {
        "/health" => ("/health", "GET, HEAD"),
        "/api/states" => ("/api/states", "GET, HEAD"),
        p if p.starts_with("/api/states/") => ("/api/states/{entity_id}", "GET, HEAD"),
        _ => return ("unknown", Response::error(404, format!("no route for {path}"))),
    };
    if !get {
        let r = Response::error(405, format!("{} is not allowed on {route}", request.method)).with_header("Allow", allow);
        return (route, r);
    }
    let response = match route {
        "/health" => health(hub),
        "/api/states" => states(hub),
        _ => state(hub, &path["/api/states/".len()..], request.flag("refresh")).await,
    };
    (route, response)
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

/// `GET /api/states/{entity_id}`.
pub async fn state(hub: &Hub, entity_id: &str, refresh: bool) -> Response {
    if !valid_entity_id(entity_id) {
        return Response::error(400, format!("invalid entity_id {entity_id:?}: expected <domain>.<object_id>"));
    }
    match hub.read_state(entity_id, refresh).await {
        Read::Fresh { state, age, cache } => Response::json(200, state.to_json().into_bytes())
            .with_header("X-Cache", cache)
            .with_header("Age", age.as_secs().to_string()),
        Read::Stale { state, age } => Response::json(200, state.to_json().into_bytes())
            .with_header("X-Cache", "stale")
            .with_header("Age", age.as_secs().to_string()),
        Read::NotFound { cache } => Response::error(404, "Entity not found.").with_header("X-Cache", cache),
        Read::Failed(e) => Response::error(502, e),
    }
}

/// `GET /api/states`: every tracked entity, HA's list shape.
pub fn states(hub: &Hub) -> Response {
    let states = hub.store.borrow().tracked_states();
    let live = hub.store.borrow().is_live();
    let body = serde_json::to_vec(&states).unwrap_or_default();
    Response::json(200, body).with_header("X-Cache", if live { "hit" } else { "stale" })
}
