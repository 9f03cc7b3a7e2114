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

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use serde_json::Value;

use crate::broadcast::Selection;
use crate::entity::{EntityState, valid_entity_id};
use crate::http::{CHUNK, Handler, Pieces, Request, Response};
use crate::hub::{Hub, Read};
use crate::sse::EventStream;

/// The routes, served by [`crate::http::serve`].
#[derive(Debug)]
pub struct Api {
    /// What the routes answer from.
    hub: Rc<Hub>,
}

impl Api {
    /// The routes over `hub`.
    pub fn new(hub: Rc<Hub>) -> Api {
        Api { hub }
    }
}

impl Handler for Api {
    fn handle<'a>(&'a self, request: &'a Request) -> Pin<Box<dyn Future<Output = Response> + 'a>> {
        Box::pin(async move {
            let (route, response) = handle(&self.hub, request).await;
            self.hub.count_http(route, response.status);
            response
        })
    }

    fn refused(&self, status: u16) {
        let label = if status == 503 { "overload" } else { "invalid" };
        self.hub.count_http(label, status);
    }
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
        "/api/stream" => r("/api/stream", "GET, HEAD, OPTIONS", false),
        p if p.starts_with("/api/states/") => {
            r("/api/states/{entity_id}", "GET, HEAD, OPTIONS", false)
        }
        p if p.starts_with("/api/services/") => {
            r("/api/services/{domain}/{service}", "POST, OPTIONS", false)
        }
        _ => None,
    }
}

fn authorized(hub: &Hub, request: &Request, allow_query: bool) -> bool {
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
    hub.api_token_accepts(presented)
}

/// Whether a request's `Origin` (RFC 6454) may use the API: absent (not from a browser's
/// cross-site request), listed in `http.cors_origins`, or our own (`http://` + `Host`).
fn origin_allowed(request: &Request, cors_allowed: bool) -> bool {
    let Some(origin) = request.origin.as_deref() else {
        return true;
    };
    cors_allowed
        || request
            .host
            .as_deref()
            .and_then(|host| origin.strip_prefix("http://").map(|o| o == host))
            .unwrap_or(false)
}

/// Whether a `Content-Type` is JSON (`application/json`, parameters allowed; RFC 8259 §11).
fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|t| {
        t.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    })
}

/// Routes `request`; returns the route label (for metrics) and the response.
pub async fn handle(hub: &Hub, request: &Request) -> (&'static str, Response) {
    let config = hub.config();
    let cors_origin = request
        .origin
        .as_deref()
        .filter(|o| config.http.cors_origins.iter().any(|allowed| allowed == o))
        .map(str::to_owned);
    let (label, mut response) = route_request(hub, request, cors_origin.is_some()).await;
    if let Some(origin) = cors_origin {
        response
            .headers
            .push(("Access-Control-Allow-Origin", origin));
        response
            .headers
            .push(("Access-Control-Expose-Headers", "X-Cache, Age".into()));
    }
    if !config.http.cors_origins.is_empty() {
        response.headers.push(("Vary", "Origin".into()));
    }
    (label, response)
}

async fn route_request(
    hub: &Hub,
    request: &Request,
    cors_allowed: bool,
) -> (&'static str, Response) {
    let path = request.path.as_str();
    let Some(route) = route(path) else {
        return (
            "unknown",
            Response::error(404, format!("no route for {path}")),
        );
    };
    let full = |r: Response| (route.label, r);
    let method = request.method.as_str();
    // A browser sends `Origin` with every cross-site request it makes without a preflight
    // (a form, `fetch(…, {mode: "no-cors"})`, a simple GET): any page open in the kiosk
    // could otherwise call services or fill the read-through cache (issue 13, item 6). Such
    // a request is refused before anything is done; a page served from our own origin, or
    // one in `http.cors_origins`, is let through.
    if method != "OPTIONS" && !origin_allowed(request, cors_allowed) {
        return full(Response::error(
            403,
            "origin not allowed (http.cors_origins)",
        ));
    }
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
    // Only JSON bodies: a browser sends text/plain and form bodies cross-site without a
    // preflight.
    if method == "POST" && !request.body.is_empty() && !is_json(request.content_type.as_deref()) {
        return full(Response::error(
            415,
            "the body must be sent as Content-Type: application/json",
        ));
    }
    if !route.open && !authorized(hub, request, route.label == "/api/stream") {
        return full(
            Response::error(401, "missing or wrong API token (Authorization: Bearer …)")
                .with_header("WWW-Authenticate", "Bearer"),
        );
    }
    let response = match route.label {
        "/health" => health(hub),
        "/status" => Response::json(200, hub.status().to_json().to_string().into_bytes()),
        "/metrics" => {
            let mut r = Response::json(200, crate::metrics::render(&hub.status()).into_bytes());
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
        "/api/stream" if method == "HEAD" => {
            Response::pieces(200, "text/event-stream", Box::new(crate::http::NoPieces))
                .with_header("Cache-Control", "no-cache")
        }
        "/api/stream" => stream(hub, request),
        _ => Response::error(404, format!("no route for {path}")),
    };
    full(response)
}

/// `GET /health`: 200 when the subscription is live and synced, 503 otherwise:
/// `{"status":"live","websocket":{"connected":true,"reconnect_attempts":0,"subscriptions":4}}`.
pub fn health(hub: &Hub) -> Response {
    let link = hub.link();
    let live = link.state == crate::status::LinkState::Live;
    let body = serde_json::json!({
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
        Read::Limited => Response::error(
            429,
            "too many reads of entities Home Assistant does not push; try again in a second",
        )
        .with_header("Retry-After", "1"),
    }
}

/// `GET /api/states`: every tracked entity, HA's list shape.
pub fn states(hub: &Hub) -> Response {
    let (states, live) = hub.tracked_states();
    let cache = if live { "hit" } else { "stale" };
    Response::pieces(200, "application/json", Box::new(JsonList::new(states)))
        .with_header("X-Cache", cache)
}

/// A JSON array of states (HA's `GET /api/states` shape), serialised [`CHUNK`] bytes at a
/// time while it is written. The `Rc`s are a snapshot: updates made while it is written
/// replace the store's `Rc`s, not these.
#[derive(Debug)]
struct JsonList {
    /// The states, reversed (popped in order).
    states: Vec<Rc<EntityState>>,
    /// The whole length, counted up front for `Content-Length`.
    length: usize,
    /// Whether `[` has been written.
    opened: bool,
}

impl JsonList {
    fn new(mut states: Vec<Rc<EntityState>>) -> JsonList {
        let mut n = Count(0);
        for s in &states {
            // Serializing a state into a counter cannot fail.
            let _ = serde_json::to_writer(&mut n, &**s);
        }
        let length = n.0 + states.len().saturating_sub(1) + 2;
        states.reverse();
        JsonList {
            states,
            length,
            opened: false,
        }
    }
}

impl Pieces for JsonList {
    fn length(&self) -> Option<usize> {
        Some(self.length)
    }

    fn next<'a>(&'a mut self, buf: &'a mut Vec<u8>) -> Pin<Box<dyn Future<Output = bool> + 'a>> {
        if !self.opened {
            self.opened = true;
            buf.push(b'[');
        } else if !self.states.is_empty() {
            buf.push(b',');
        }
        while let Some(s) = self.states.pop() {
            // Serializing into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *buf, &*s);
            if buf.len() >= CHUNK {
                break;
            }
            if !self.states.is_empty() {
                buf.push(b',');
            }
        }
        let done = self.states.is_empty();
        if done {
            buf.push(b']');
        }
        Box::pin(std::future::ready(!done))
    }
}

/// An `io::Write` that only counts.
struct Count(usize);

impl std::io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
    if !hub.config().http.allow_service_calls {
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

/// `GET /api/stream`: Server-Sent Events (see [`crate::sse`]).
fn stream(hub: &Hub, request: &Request) -> Response {
    let selection = Selection::parse(request.query_value("entity_id").unwrap_or(""));
    let first: Vec<Rc<EntityState>> = if request.flag("snapshot") {
        let (mut states, _) = hub.tracked_states();
        states.retain(|s| selection.matches(&s.entity_id));
        states
    } else {
        Vec::new()
    };
    match hub.subscribe(selection) {
        Some(subscription) => Response::pieces(
            200,
            "text/event-stream",
            Box::new(EventStream::new(first, subscription)),
        )
        .with_header("Cache-Control", "no-cache")
        .with_header("X-Accel-Buffering", "no"),
        None => Response::error(
            503,
            format!(
                "too many stream clients (at most {})",
                crate::broadcast::MAX_CLIENTS
            ),
        )
        .with_header("Retry-After", "5"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        assert!(is_json(Some("application/json")));
        assert!(is_json(Some("Application/JSON; charset=utf-8")));
        for other in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
        ] {
            assert!(!is_json(other), "{other:?}");
        }
    }

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
}
