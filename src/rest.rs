//! Home Assistant's REST API (ureq, blocking): the read-through for states the subscription
//! does not hold. Callers run it off the executor thread (`smol::unblock`); every request has
//! a global timeout. See HA developer docs "REST API": `GET /api/states/<entity_id>` answers
//! the state object or 404 `{"message": "Entity not found."}`.

use std::time::Duration;

use crate::config::Secret;
use crate::entity::EntityState;
use crate::tls::Roots;

/// Whole-request budget: connect, TLS, send, and read the body.
pub const REST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest body read from HA for one state (attributes can be large, not this large).
const MAX_STATE_BODY: u64 = 4 * 1024 * 1024;

/// A failed REST request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RestError {
    /// HA could not be reached (connect, TLS, timeout, reset).
    #[error("Home Assistant is unreachable: {0}")]
    Unreachable(String),
    /// HA answered with an error status (401, 500, …); the body's message if any.
    #[error("Home Assistant answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// HA's `message`, or the body.
        message: String,
    },
    /// HA's answer was not the expected JSON.
    #[error("unexpected answer from Home Assistant: {0}")]
    BadBody(String),
}

impl RestError {
    /// The metrics label for this outcome.
    pub fn outcome(&self) -> &'static str {
        match self {
            RestError::Unreachable(_) => "unreachable",
            RestError::Status { .. } => "error_status",
            RestError::BadBody(_) => "bad_body",
        }
    }
}

/// A REST client bound to one HA and token. Cheap to clone (the agent is shared).
#[derive(Clone)]
pub struct RestClient {
    /// Connection pool, TLS config and timeouts.
    agent: ureq::Agent,
    /// `ha.url` without a trailing `/`.
    base: String,
    /// `Bearer` token.
    token: Secret,
}

impl std::fmt::Debug for RestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl RestClient {
    /// A client for `base` (e.g. `http://127.0.0.1:8123`).
    pub fn new(base: &str, token: Secret, roots: Option<&Roots>) -> RestClient {
        let mut config = ureq::Agent::config_builder()
            .timeout_global(Some(REST_TIMEOUT))
            .http_status_as_error(false)
            .user_agent(concat!("hass-edge/", env!("CARGO_PKG_VERSION")))
            .max_idle_connections(4);
        match roots {
            Some(roots) => config = config.tls_config(roots.ureq_tls()),
            // A plain-http HA: without roots ureq has no TLS provider and would panic on a
            // redirect to https; HA's API never redirects, so refuse redirects instead.
            None => config = config.max_redirects(0),
        }
        let agent = config.build().new_agent();
        RestClient {
            agent,
            base: base.trim_end_matches('/').to_owned(),
            token,
        }
    }

    /// The same client (pool, TLS, timeouts) with another token.
    pub fn with_token(&self, token: Secret) -> RestClient {
        RestClient {
            agent: self.agent.clone(),
            base: self.base.clone(),
            token,
        }
    }

    /// Whether HA accepts this client's token: `GET /api/` answers 200 with a valid token,
    /// 401 without (HA `components/http/auth.py`). Blocking.
    ///
    /// Errors: HA unreachable, or another status.
    pub fn token_accepted(&self) -> Result<bool, RestError> {
        let (status, body) = self.get(&format!("{}/api/", self.base))?;
        match status {
            200 => Ok(true),
            401 | 403 => Ok(false),
            status => Err(status_error(status, &body)),
        }
    }

    /// `GET /api/states/<entity_id>`: `Ok(None)` on HA's 404. Blocking.
    ///
    /// `entity_id` must already be validated (it becomes part of the path).
    pub fn get_state(&self, entity_id: &str) -> Result<Option<EntityState>, RestError> {
        let url = format!("{}/api/states/{entity_id}", self.base);
        let (status, body) = self.get(&url)?;
        match status {
            200 => serde_json::from_str(&body)
                .map(Some)
                .map_err(|e| RestError::BadBody(e.to_string())),
            404 => Ok(None),
            status => Err(status_error(status, &body)),
        }
    }

    /// `GET /api/services`: HA's list of domains and their services, as raw JSON. Blocking.
    pub fn get_services(&self) -> Result<String, RestError> {
        let (status, body) = self.get(&format!("{}/api/services", self.base))?;
        match status {
            200 if body.trim_start().starts_with('[') => Ok(body),
            200 => Err(RestError::BadBody(
                "expected a JSON list of services".into(),
            )),
            status => Err(status_error(status, &body)),
        }
    }

    /// Performs one `GET` and reads the body (bounded). Blocking. (Writes go through the
    /// forwarder, `proxy.rs`, with HA's answer streamed back as it is.)
    pub(crate) fn get(&self, url: &str) -> Result<(u16, String), RestError> {
        let auth = format!("Bearer {}", self.token.expose());
        let result = self.agent.get(url).header("Authorization", &auth).call();
        // ureq's errors name the URL and cause, never the headers: the token stays out.
        let mut response = result.map_err(|e| RestError::Unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_STATE_BODY)
            .read_to_string()
            .map_err(|e| RestError::Unreachable(format!("reading the answer: {e}")))?;
        Ok((status, body))
    }
}

/// Builds a [`RestError::Status`] from HA's `{"message": …}` body (or the raw text).
pub(crate) fn status_error(status: u16, body: &str) -> RestError {
    #[derive(serde::Deserialize)]
    struct Message {
        message: String,
    }
    let message = serde_json::from_str::<Message>(body)
        .map(|m| m.message)
        .unwrap_or_else(|_| body.chars().take(200).collect());
    RestError::Status { status, message }
}
