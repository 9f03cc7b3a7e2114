//! A connection to HA's WebSocket API on behalf of one client of the local WebSocket API
//! (issue 16), or of the dashboards' allowlist: TCP (+TLS) to `ha.url`, HA's handshake
//! (`auth_required` → `auth` → `auth_ok` | `auth_invalid`, HA developer docs "WebSocket API")
//! with a given token, then commands under ids the caller chooses. The shared link that feeds
//! the mirror is `ha/`'s; this one carries what only HA can answer.

use std::time::Duration;

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::tungstenite::{Message, client::IntoClientRequest};
use serde_json::{Map, Value};
use smol::Timer;
use smol::future::FutureExt;
use smol::stream::StreamExt;

use crate::config::Secret;
use crate::proxy::Stream;

/// Time for HA to answer the handshake and `auth`, and a command made with [`UpLink::call`].
pub const LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message accepted from HA (a big registry list).
const MAX_UPSTREAM_MESSAGE: usize = 32 * 1024 * 1024;

/// Why a link to HA could not be made.
#[derive(Debug)]
pub enum LinkError {
    /// HA answered `auth_invalid`.
    Refused(String),
    /// No answer: connect, TLS, handshake or timeout.
    Unreachable(String),
}

/// A connection to HA's WebSocket API, authenticated with a given token.
pub struct UpLink {
    ws: WebSocketStream<Box<dyn Stream>>,
}

impl std::fmt::Debug for UpLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpLink").finish_non_exhaustive()
    }
}

impl UpLink {
    /// Connects, and authenticates with `token` (HA's handshake), within [`LINK_TIMEOUT`].
    pub async fn open(
        upstream: &crate::hub::Upstream,
        token: &Secret,
    ) -> Result<UpLink, LinkError> {
        let open = async {
            let (stream, url) = crate::proxy::connect_websocket(upstream)
                .await
                .map_err(LinkError::Unreachable)?;
            let request = url
                .into_client_request()
                .map_err(|e| LinkError::Unreachable(e.to_string()))?;
            let config = WebSocketConfig::default()
                .read_buffer_size(4096)
                .max_message_size(Some(MAX_UPSTREAM_MESSAGE))
                .max_frame_size(Some(MAX_UPSTREAM_MESSAGE))
                .write_buffer_size(0)
                .max_write_buffer_size(1024 * 1024);
            let (mut ws, _) =
                async_tungstenite::client_async_with_config(request, stream, Some(config))
                    .await
                    .map_err(|e| LinkError::Unreachable(format!("handshake: {e}")))?;
            let expect = |m: Option<Result<Message, _>>| match m {
                Some(Ok(Message::Text(t))) => serde_json::from_str::<Value>(&t)
                    .map_err(|e| LinkError::Unreachable(e.to_string())),
                other => Err(LinkError::Unreachable(format!("{other:?}"))),
            };
            let required = expect(ws.next().await)?;
            if required["type"] != "auth_required" {
                return Err(LinkError::Unreachable("no auth_required".into()));
            }
            let auth = serde_json::json!({"type": "auth", "access_token": token.expose()});
            ws.send(Message::text(auth.to_string()))
                .await
                .map_err(|e| LinkError::Unreachable(e.to_string()))?;
            let verdict = expect(ws.next().await)?;
            match verdict["type"].as_str() {
                Some("auth_ok") => Ok(UpLink { ws }),
                Some("auth_invalid") => Err(LinkError::Refused(
                    verdict["message"].as_str().unwrap_or_default().to_owned(),
                )),
                _ => Err(LinkError::Unreachable("no verdict".into())),
            }
        };
        // Boxed: the handshake's state (TLS, HTTP upgrade) is large, and inline it would make
        // every idle session that might open a link that much bigger.
        Box::pin(open)
            .or(async {
                Timer::after(LINK_TIMEOUT).await;
                Err(LinkError::Unreachable("HA did not answer in time".into()))
            })
            .await
    }

    /// Sends `command` as `id` and waits for its result (other messages are skipped).
    ///
    /// Errors: the link dropped, or no result within [`LINK_TIMEOUT`].
    pub async fn call(&mut self, id: u64, command: &Value) -> Result<Value, String> {
        let Some(fields) = command.as_object() else {
            return Err("not a command".into());
        };
        self.send(id, fields)
            .await
            .map_err(|()| "the link to HA dropped".to_owned())?;
        let wait = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        let Ok(message) = serde_json::from_str::<Value>(&text) else {
                            continue;
                        };
                        if message["id"] == id && message["type"] == "result" {
                            return Ok(message);
                        }
                    }
                    Some(Ok(_)) => {}
                    other => return Err(format!("the link to HA ended: {other:?}")),
                }
            }
        };
        wait.or(async {
            Timer::after(LINK_TIMEOUT).await;
            Err("HA did not answer in time".to_owned())
        })
        .await
    }

    /// Sends `command` (without its id) as message `id`.
    ///
    /// Errors: the link is gone.
    #[allow(clippy::result_unit_err)]
    pub async fn send(&mut self, id: u64, command: &Map<String, Value>) -> Result<(), ()> {
        let mut message = Map::with_capacity(command.len() + 1);
        message.insert("id".into(), id.into());
        for (k, v) in command {
            message.insert(k.clone(), v.clone());
        }
        self.ws
            .send(Message::text(Value::Object(message).to_string()))
            .await
            .map_err(|_| ())
    }

    /// The next message from HA; `None` or an error once the link is gone.
    pub async fn recv(&mut self) -> Option<Result<Message, async_tungstenite::tungstenite::Error>> {
        self.ws.next().await
    }
}
