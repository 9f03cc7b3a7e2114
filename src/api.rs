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
//! Every request's `Host` is checked first ([`Handler::admit`], `hosts.rs`): a name that is
//! not this machine's (DNS rebinding) is answered 421 before anything else is done.
//!
//! With `http.api_token_file` set, everything but `/health` and CORS preflights needs
//! `Authorization: Bearer <token>` (or `?access_token=` on `/api/stream`, since browsers'
//! `EventSource` cannot send headers). CORS (Fetch standard) for `http.cors_origins` only.
//! Every route answers `HEAD` where it answers `GET`; a wrong method gets 405 with `Allow`.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::broadcast::Selection;
use crate::entity::{EntityState, valid_entity_id};
use crate::http::{CHUNK, Exchange, Handler, Head, Pieces, Request, Response};
use crate::hub::{Hub, Read, TokenCheck};
use crate::mirror::Update;
use crate::piecewise::{Form, Piecewise};
use crate::proxy::{Capture, Credentials, Plan, Proxy, WsAuth};
use crate::sse::EventStream;
use crate::status::HttpStatus;
use crate::ws_server::WsApi;

/// The routes, served by [`crate::http::serve`].
#[derive(Debug)]
pub struct Api {
    /// What the routes answer from.
    hub: Rc<Hub>,
    /// Requests the routes do not answer go to HA through this.
    proxy: Rc<Proxy>,
    /// `/api/websocket`.
    ws: Rc<WsApi>,
    /// This machine's host name, read once at start (`hosts.rs`).
    machine: Option<String>,
    /// The transport's totals, for `/status` and `/metrics`.
    counters: Rc<Cell<HttpStatus>>,
    /// When a refused `Host` was last logged (at most one line a minute).
    host_logged: Cell<Option<Instant>>,
}

/// How often a refused `Host` is logged at most.
const HOST_LOG_INTERVAL: Duration = Duration::from_secs(60);

impl Api {
    /// The routes over `hub`. With `http.forward` and `http.asset_cache_mib` > 0, HA's
    /// frontend assets are kept in `assets/` beside `cache.state_file` (its directory is
    /// listed now, blocking: call at start).
    pub fn new(hub: Rc<Hub>) -> Api {
        let config = hub.config();
        let assets = (config.http.forward && config.http.asset_cache_mib > 0)
            .then(|| config.cache.state_file.parent())
            .flatten()
            .map(|dir| {
                crate::assets::AssetCache::new(
                    dir.join("assets"),
                    config.http.asset_cache_mib * 1024 * 1024,
                )
            });
        let proxy = Rc::new(Proxy::new(assets));
        let ws = Rc::new(WsApi::new(hub.clone()));
        let (weak, weak_ws) = (Rc::downgrade(&proxy), Rc::downgrade(&ws));
        let counters = Rc::new(Cell::new(HttpStatus::default()));
        let weak_counters = Rc::downgrade(&counters);
        hub.set_forward_probe(Box::new(move || {
            let mut status = weak.upgrade().map(|p| p.status()).unwrap_or_default();
            status.websocket_api = weak_ws.upgrade().map(|w| w.status()).unwrap_or_default();
            status.http = weak_counters.upgrade().map(|c| c.get()).unwrap_or_default();
            status
        }));
        let machine = crate::hosts::machine_name();
        log::debug!(
            "the local API answers Host names: IP addresses, localhost, {}http.allowed_hosts",
            machine
                .as_deref()
                .map(|m| format!("{m}, {m}.local, "))
                .unwrap_or_default()
        );
        Api {
            hub,
            proxy,
            ws,
            machine,
            counters,
            host_logged: Cell::new(None),
        }
    }

    /// Adds to the transport's totals.
    fn count(&self, add: impl FnOnce(&mut HttpStatus)) {
        let mut c = self.counters.get();
        add(&mut c);
        self.counters.set(c);
    }
}

impl Api {
    /// The WebSocket API's background work until shutdown (see [`WsApi::run`]); spawned once
    /// by the app.
    pub async fn run_websocket(&self, shutdown: crate::shutdown::Shutdown) {
        self.ws.run(shutdown).await;
    }
}

impl Handler for Api {
    /// The DNS-rebinding guard (`hosts.rs`): a `Host` that is not one of this machine's
    /// names is answered 421 Misdirected Request (RFC 9110 §15.5.20: this server will not
    /// answer for that name), whatever the route or method; nothing is forwarded.
    fn admit(&self, head: &Head) -> Result<(), Response> {
        let Some(host) = head.host.as_deref() else {
            return Ok(());
        };
        let config = self.hub.config();
        if crate::hosts::host_allowed(host, self.machine.as_deref(), &config.http.allowed_hosts) {
            return Ok(());
        }
        self.hub.count_http("host", 421);
        self.count(|c| c.hosts_refused += 1);
        let now = Instant::now();
        if self
            .host_logged
            .get()
            .is_none_or(|at| now.duration_since(at) >= HOST_LOG_INTERVAL)
        {
            self.host_logged.set(Some(now));
            log::warn!(
                "refused a request for Host {host:?} (421): not an IP address, localhost or this machine's name; \
                 a name of this machine must be listed in http.allowed_hosts (a web page on another name may be \
                 a DNS rebinding attack); at most one such line a minute"
            );
        }
        Err(Response::error(
            421,
            format!(
                "hass-edge does not answer for Host {host:?}: only IP addresses, localhost, this machine's host name{} \
                 and the names in http.allowed_hosts are (a guard against DNS rebinding); add the name to \
                 http.allowed_hosts in hass-edge's config to use it",
                self.machine
                    .as_deref()
                    .map(|m| format!(" ({m}, {m}.local)"))
                    .unwrap_or_default()
            ),
        ))
    }

    fn evicted(&self) {
        self.count(|c| c.connections_evicted += 1);
    }

    fn handle<'a>(&'a self, request: &'a Request) -> Pin<Box<dyn Future<Output = Response> + 'a>> {
        Box::pin(async move {
            let (route, response) = handle(&self.hub, request).await;
            self.hub.count_http(route, response.status);
            response
        })
    }

    fn forwards(&self, head: &Head) -> Option<usize> {
        let config = self.hub.config();
        let path = head.path();
        // hass-edge's own routes answer every method (405 for those they do not take),
        // except the writes to HA's API that share their paths.
        let write = write_capture(&head.method, path);
        // HA's config is served once the link has it; before, HA answers.
        let unknown_config = path == "/api/config" && self.hub.ha_config().is_none();
        if !head.upgrade && write.is_none() && !unknown_config && route(path).is_some() {
            return None;
        }
        // Writes to HA's own API are always forwarded; the rest only with `http.forward`.
        (config.http.forward || write.is_some()).then_some(config.http.max_forward_body_bytes)
    }

    fn forward<'a>(
        &'a self,
        exchange: Exchange<'a>,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<bool>> + 'a>> {
        // Each way boxed alone: a WebSocket session (days long) holds only its own state.
        match way(&self.hub, &exchange.head) {
            Way::Refuse(response) => Box::pin(refuse(&self.hub, exchange, response)),
            Way::LocalWebSocket => {
                self.hub.count_http("/api/websocket", 101);
                Box::pin(self.ws.serve(exchange))
            }
            Way::Forward {
                path,
                credentials,
                capture,
            } => Box::pin(forward(
                &self.hub,
                &self.proxy,
                exchange,
                path,
                credentials,
                capture,
            )),
        }
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
        "/api/config" => r("/api/config", "GET, HEAD, OPTIONS", false),
        "/api/states" => r("/api/states", "GET, HEAD, OPTIONS", false),
        "/api/services" => r("/api/services", "GET, HEAD, OPTIONS", false),
        "/api/stream" => r("/api/stream", "GET, HEAD, OPTIONS", false),
        // Their writes (POST, DELETE) are forwarded to HA (`write_capture`); the preflight
        // names them too ([`preflight_methods`]).
        p if p.starts_with("/api/states/") => {
            r("/api/states/{entity_id}", "GET, HEAD, OPTIONS", false)
        }
        p if p.starts_with("/api/services/") => {
            r("/api/services/{domain}/{service}", "OPTIONS", false)
        }
        _ => None,
    }
}

/// Whether a request may use a local route: hass-edge's API token (or any, in the
/// loopback-open mode), or a token HA accepts (checked once, [`Hub::ha_accepts`]). The
/// refusal is 401, or 429/502 when HA could not be asked.
async fn authorized(hub: &Hub, request: &Request, allow_query: bool) -> Result<(), Response> {
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
    if hub.api_token_accepts(presented) {
        return Ok(());
    }
    let unauthorized = || {
        Response::error(401, "missing or wrong API token (Authorization: Bearer …)")
            .with_header("WWW-Authenticate", "Bearer")
    };
    let Some(token) = presented.map(str::trim).filter(|t| !t.is_empty()) else {
        return Err(unauthorized());
    };
    match hub.ha_accepts(token).await {
        TokenCheck::Accepted => Ok(()),
        TokenCheck::Refused => Err(unauthorized()),
        TokenCheck::Limited => Err(Response::error(
            429,
            "too many new tokens to check with Home Assistant; try again in a second",
        )
        .with_header("Retry-After", "1")),
        TokenCheck::Unreachable => Err(Response::error(
            502,
            "the token is not hass-edge's, and Home Assistant could not be asked about it",
        )),
    }
}

/// Whether a request's `Origin` (RFC 6454) may use the API: absent (not from a browser's
/// cross-site request), listed in `http.cors_origins`, or our own (`http://` + `Host`).
/// "Our own" is safe only because the `Host` was checked first ([`Handler::admit`]): a page
/// on a rebound attacker's name never gets here.
fn origin_allowed(origin: Option<&str>, host: Option<&str>, cors_origins: &[String]) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    cors_origins.iter().any(|o| o == origin)
        || host
            .and_then(|host| origin.strip_prefix("http://").map(|o| o == host))
            .unwrap_or(false)
}

/// The methods a route takes, with the writes to HA that share its path (answered by HA
/// through the forwarder): what a CORS preflight allows.
fn preflight_methods(label: &str) -> &'static str {
    match label {
        "/api/states/{entity_id}" => "GET, HEAD, POST, DELETE, OPTIONS",
        "/api/services/{domain}/{service}" => "POST, OPTIONS",
        "/health" | "/status" | "/metrics" | "/api/" | "/api/config" | "/api/states"
        | "/api/services" | "/api/stream" => "GET, HEAD, OPTIONS",
        _ => "OPTIONS",
    }
}

/// The store update a forwarded write's answer carries (see [`Capture`]).
fn write_capture(method: &str, path: &str) -> Option<Capture> {
    match method {
        "POST" if path.starts_with("/api/services/") => Some(Capture::ServiceCall),
        "POST" if path.starts_with("/api/states/") => Some(Capture::State),
        "DELETE" => path
            .strip_prefix("/api/states/")
            .filter(|id| valid_entity_id(id))
            .map(|id| Capture::Removed(id.to_owned())),
        _ => None,
    }
}

/// What becomes of a request hass-edge does not answer itself (issue 15), decided before
/// any of it is carried out, so that each way allocates only its own state: a WebSocket
/// session lasts for days, and should not hold a forwarder's.
enum Way {
    /// Refused before anything is sent.
    Refuse(Response),
    /// HA's WebSocket API, served here (issue 16).
    LocalWebSocket,
    /// To HA, by [`forward`].
    Forward {
        path: String,
        credentials: Credentials,
        capture: Option<Capture>,
    },
}

/// Decides the [`Way`] of a request hass-edge does not answer itself (issue 15).
///
/// A foreign `Origin` is refused (403) before anything is sent, as on the local routes.
/// Credentials: a request with its own (an `Authorization` that is not hass-edge's API
/// token, an `/auth/*` login flow, a signed `authSig` path) goes as it came, and HA
/// decides. One with hass-edge's API token — or, in the loopback-open mode (no
/// `http.api_token_file`), one with none — goes with hass-edge's HA token, under the rules
/// that guard that token: a body must be JSON (415). Any other request goes without
/// credentials (the API token is never passed on). Read-only mode
/// (`http.allow_service_calls = false`) forwards only `GET`/`HEAD`/`OPTIONS`, whoever asks
/// (403), and HA's login flow (`/auth/*`), which changes nothing in the house.
fn way(hub: &Hub, head: &Head) -> Way {
    let config = hub.config();
    let path = head.path().to_owned();
    let bearer = head
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "));
    let presents_ours = bearer.is_some_and(|t| hub.is_api_token(t));
    let query = head.target.split_once('?').map_or("", |(_, q)| q);
    let own_credentials = (head.authorization.is_some() && !presents_ours)
        || path.starts_with("/auth/")
        || form_urlencoded::parse(query.as_bytes()).any(|(k, _)| k == "authSig");
    let origin_ok = origin_allowed(
        head.origin.as_deref(),
        head.host.as_deref(),
        &config.http.cors_origins,
    );
    let credentials = if own_credentials {
        Credentials::Client
    } else if (presents_ours || !hub.has_api_token()) && !head.upgrade {
        Credentials::Ours
    } else {
        Credentials::Stripped
    };
    let reading = matches!(head.method.as_str(), "GET" | "HEAD" | "OPTIONS");
    if !origin_ok {
        Way::Refuse(Response::error(
            403,
            "origin not allowed (http.cors_origins)",
        ))
    } else if credentials == Credentials::Ours
        && head.content_length > 0
        && !is_json(head.content_type.as_deref())
    {
        Way::Refuse(Response::error(
            415,
            "the body must be sent as Content-Type: application/json",
        ))
    } else if !reading && !path.starts_with("/auth/") && !config.http.allow_service_calls {
        Way::Refuse(Response::error(
            403,
            "writes through hass-edge are disabled (http.allow_service_calls = false)",
        ))
    } else if path == "/api/websocket" && head.upgrade && head.method == "GET" {
        Way::LocalWebSocket
    } else {
        let capture = write_capture(&head.method, &path);
        Way::Forward {
            path,
            credentials,
            capture,
        }
    }
}

/// Answers a refused forward; whether the connection stays open.
async fn refuse(hub: &Hub, mut x: Exchange<'_>, response: Response) -> std::io::Result<bool> {
    let status = response.status;
    let keep_alive = x.body_left == 0 && x.head.keep_alive;
    x.respond(response, keep_alive).await?;
    hub.count_http("forward", status);
    Ok(keep_alive)
}

/// Forwards a request to HA ([`Way::Forward`]); whether the connection stays open.
async fn forward(
    hub: &Hub,
    proxy: &Proxy,
    x: Exchange<'_>,
    path: String,
    credentials: Credentials,
    capture: Option<Capture>,
) -> std::io::Result<bool> {
    let config = hub.config();
    // An allowed cross-origin page reads HA's answer as it reads ours.
    let cors = x
        .head
        .origin
        .as_deref()
        .filter(|o| config.http.cors_origins.iter().any(|a| a == o))
        .map(|o| {
            vec![
                ("Access-Control-Allow-Origin", o.to_owned()),
                ("Vary", "Origin".to_owned()),
            ]
        })
        .unwrap_or_default();
    let ws_auth = hub
        .api_token()
        .filter(|_| x.head.upgrade)
        .map(|api_token| WsAuth {
            api_token,
            swap: config.http.allow_service_calls,
        });
    let plan = Plan {
        credentials,
        forwarded_headers: config.http.x_forwarded_for,
        capture: capture.clone(),
        response_headers: cors,
        ws_auth,
    };
    let outcome = Box::pin(proxy.forward(x, hub.upstream(), plan)).await?;
    hub.count_http(
        if outcome.tunnel { "tunnel" } else { "forward" },
        outcome.status,
    );
    if let (Some(capture), Some(body)) = (capture, outcome.captured) {
        apply_write(hub, &capture, &path, &body);
    }
    Ok(outcome.keep_alive)
}

/// Writes HA's answer to a forwarded write into the store, so the next read reflects it
/// before the subscription's event arrives (HA `components/api/__init__.py`:
/// `APIEntityStateView.post` answers the state, `.delete` a message,
/// `APIDomainServicesView.post` the changed states, or `{"changed_states": […],
/// "service_response": …}` with `?return_response`).
fn apply_write(hub: &Hub, capture: &Capture, path: &str, body: &[u8]) {
    let update = match capture {
        Capture::Removed(entity_id) => Update::StateChanged {
            entity_id: entity_id.clone(),
            new_state: None,
        },
        Capture::State => match serde_json::from_slice::<EntityState>(body) {
            Ok(state) => Update::StateChanged {
                entity_id: state.entity_id.clone(),
                new_state: Some(state),
            },
            Err(e) => {
                log::warn!("could not read the state HA answered to POST {path}: {e}");
                return;
            }
        },
        Capture::ServiceCall => {
            // Not an untagged enum: states keep their attributes as raw JSON text, which
            // serde's buffered (untagged) path cannot hand out.
            #[derive(serde::Deserialize)]
            struct WithResponse {
                changed_states: Vec<EntityState>,
            }
            let states = if body.trim_ascii_start().starts_with(b"{") {
                serde_json::from_slice::<WithResponse>(body).map(|w| w.changed_states)
            } else {
                serde_json::from_slice::<Vec<EntityState>>(body)
            };
            match states {
                Ok(states) => Update::CallResult(states),
                Err(e) => {
                    log::warn!("could not read the states HA answered to POST {path}: {e}");
                    return;
                }
            }
        }
    };
    hub.apply(update);
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
    if method != "OPTIONS"
        && !origin_allowed(
            request.origin.as_deref(),
            request.host.as_deref(),
            &hub.config().http.cors_origins,
        )
    {
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
        let methods = preflight_methods(route.label);
        let mut r = Response::json(204, Vec::new()).with_header("Allow", methods);
        if cors_allowed {
            r = r
                .with_header("Access-Control-Allow-Methods", methods)
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
    if !route.open
        && let Err(refusal) = authorized(hub, request, route.label == "/api/stream").await
    {
        return full(refusal);
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
        "/api/config" => match hub.ha_config() {
            Some(config) => Response::json(200, config.as_bytes().to_vec()),
            None => Response::error(503, "Home Assistant's config is not known yet"),
        },
        "/api/states" => states(hub),
        "/api/states/{entity_id}" => {
            state(hub, &path["/api/states/".len()..], request.flag("refresh")).await
        }
        "/api/services" => services(hub).await,
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
        // HA's answer for any id it does not hold, malformed or not.
        return Response::error(404, "Entity not found.");
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

/// A JSON array of states (HA's `GET /api/states` shape), rendered [`CHUNK`] bytes at a
/// time while it is written ([`Piecewise`]). The `Rc`s are a snapshot: updates made while it
/// is written replace the store's `Rc`s, not these.
#[derive(Debug)]
struct JsonList {
    list: Piecewise,
    /// The whole length, counted up front for `Content-Length`.
    length: usize,
    /// What is written of the list ([`Piecewise::write_piece`]).
    next: usize,
}

impl JsonList {
    fn new(states: Vec<Rc<EntityState>>) -> JsonList {
        let list = Piecewise::states("[".into(), states, Form::Json, "]");
        let length = list.rendered_len();
        JsonList {
            list,
            length,
            next: 0,
        }
    }
}

impl Pieces for JsonList {
    fn length(&self) -> Option<usize> {
        Some(self.length)
    }

    fn next<'a>(&'a mut self, buf: &'a mut Vec<u8>) -> Pin<Box<dyn Future<Output = bool> + 'a>> {
        let limit = buf.len() + CHUNK;
        let done = self.list.write_piece(&mut self.next, buf, limit);
        Box::pin(std::future::ready(!done))
    }
}

/// `GET /api/services`.
async fn services(hub: &Hub) -> Response {
    match hub.services().await {
        Ok(list) => Response::json(200, list.as_bytes().to_vec()),
        Err(e) => Response::error(502, e),
    }
}

/// `GET /api/stream`: Server-Sent Events (see [`crate::sse`]).
fn stream(hub: &Hub, request: &Request) -> Response {
    // HA's `?restrict=` (event types): `state_changed` comes from the mirror, other types
    // from HA's bus (crate::events). Without it HA streams every event; hass-edge does too,
    // unless the client used its own `?entity_id=` extension, which asks for entity
    // changes only.
    let restrict: Option<std::collections::HashSet<String>> =
        request.query_value("restrict").map(|r| {
            r.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()
        });
    let state_changes = restrict
        .as_ref()
        .is_none_or(|r| r.contains("state_changed"));
    let other_types: Option<crate::events::Types> = match restrict {
        Some(mut types) => {
            types.remove("state_changed");
            (!types.is_empty()).then_some(Some(types))
        }
        None if request.query_value("entity_id").is_some() => None,
        None => Some(None),
    };
    let selection = if state_changes {
        Selection::parse(request.query_value("entity_id").unwrap_or(""))
    } else {
        Selection::none()
    };
    let first: Vec<Rc<EntityState>> = if request.flag("snapshot") {
        let (mut states, _) = hub.tracked_states();
        states.retain(|s| selection.matches(&s.entity_id));
        states
    } else {
        Vec::new()
    };
    let others = match other_types {
        Some(types) => match hub.subscribe_events(types) {
            Some(r) => Some(r),
            None => {
                return Response::error(
                    503,
                    format!(
                        "too many stream clients of HA's events (at most {})",
                        crate::events::MAX_CLIENTS
                    ),
                )
                .with_header("Retry-After", "5");
            }
        },
        None => None,
    };
    match hub.subscribe(selection) {
        Some(subscription) => Response::pieces(
            200,
            "text/event-stream",
            Box::new(EventStream::new(first, subscription, others)),
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
        // Service calls are forwarded to HA: only the preflight is answered here.
        assert_eq!(
            route("/api/services/light/turn_on").unwrap().allow,
            "OPTIONS"
        );
        assert_eq!(
            write_capture("POST", "/api/services/light/turn_on"),
            Some(Capture::ServiceCall)
        );
        assert_eq!(
            write_capture("DELETE", "/api/states/light.a"),
            Some(Capture::Removed("light.a".into()))
        );
        assert_eq!(write_capture("DELETE", "/api/states/bad"), None);
        assert_eq!(write_capture("GET", "/api/states/light.a"), None);
    }
}
