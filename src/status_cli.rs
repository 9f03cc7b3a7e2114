//! `hass-edge status [--json] [--session]`: asks the running daemon over D-Bus and prints a
//! short summary, like `systemctl status`. Exit codes: 0 live, 3 running but not live, 4 not
//! running / unknown. This is not an init script's `status` action, where LSB's 3 means "not
//! running" (LSB Core "Init Script Actions"): 3 is kept for "up but not serving live states"
//! because scripts already test for it, and 4 ("unknown") is what a caller gets when the
//! daemon cannot be asked at all; README and hass-edge(8) say so.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use smol::future::FutureExt;
use zbus::zvariant::OwnedValue;

use crate::config::{DBUS_NAME as NAME, DBUS_PATH as PATH};
use crate::entity::Timestamp;

/// Exit code: the daemon is live.
pub const EXIT_LIVE: u8 = 0;
/// Exit code: running but not live.
pub const EXIT_NOT_LIVE: u8 = 3;
/// Exit code: not running (or not reachable on the bus).
pub const EXIT_NOT_RUNNING: u8 = 4;

async fn fetch(session: bool) -> Result<HashMap<String, OwnedValue>, String> {
    let conn = if session {
        zbus::Connection::session().await
    } else {
        zbus::Connection::system().await
    }
    .map_err(|e| {
        format!(
            "cannot connect to the {} bus: {e}",
            if session { "session" } else { "system" }
        )
    })?;
    let proxy = zbus::fdo::PropertiesProxy::builder(&conn)
        .destination(NAME)
        .and_then(|b| b.path(PATH))
        .map_err(|e| e.to_string())?
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let iface = zbus::names::InterfaceName::try_from(NAME).map_err(|e| e.to_string())?;
    proxy.get_all(iface).await.map_err(|e| match e {
        zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_) => {
            "hass-edge is not running".to_string()
        }
        e => e.to_string(),
    })
}

fn to_json(props: &HashMap<String, OwnedValue>) -> Value {
    let mut m = Map::new();
    for (k, v) in props {
        let j = if let Ok(s) = String::try_from(v.clone()) {
            json!(s)
        } else if let Ok(b) = bool::try_from(v) {
            json!(b)
        } else if let Ok(n) = u32::try_from(v) {
            json!(n)
        } else if let Ok(n) = u64::try_from(v) {
            json!(n)
        } else {
            Value::Null
        };
        m.insert(k.clone(), j);
    }
    Value::Object(m)
}

fn when(micros: u64) -> String {
    if micros == 0 {
        return "never".into();
    }
    let t = Timestamp(micros as i64);
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64;
    let ago = Duration::from_micros(now.saturating_sub(micros)).as_secs();
    format!("{t} ({ago}s ago)")
}

/// Renders the human summary from the property map (as JSON).
pub fn render(p: &Value) -> String {
    let s = |k: &str| p[k].as_str().unwrap_or("?").to_owned();
    let n = |k: &str| p[k].as_u64().unwrap_or(0);
    let connection = s("Connection");
    let headline = match connection.as_str() {
        "live" => "Connected".to_string(),
        "auth_failed" => "Auth failed".to_string(),
        "stopping" => "Stopping".to_string(),
        other => format!("Disconnected ({other}, retry {})", n("ReconnectAttempts")),
    };
    let dot = if connection == "live" { "●" } else { "○" };
    format!(
        "{dot} hass-edge {} — {headline}\n     Home Assistant: {}\n         Connection: {connection} (reconnect attempts {}, subscriptions {})\n           Entities: {} tracked\n             Events: {} received, {} filtered out; last {}\n              Cache: {} hits, {} misses; {} HA REST requests\n              Since: {}\n",
        s("Version"),
        if s("HaVersion").is_empty() {
            "unknown".into()
        } else {
            s("HaVersion")
        },
        n("ReconnectAttempts"),
        n("Subscriptions"),
        n("TrackedEntities"),
        n("EventsReceived"),
        n("EventsFilteredOut"),
        when(n("LastEventTime")),
        n("CacheHits"),
        n("CacheMisses"),
        n("HaRestRequests"),
        when(n("StartTime")),
    )
}

/// Runs the command; returns the exit code.
pub fn run(json_output: bool, session: bool) -> u8 {
    let result = smol::block_on(fetch(session).or(async {
        smol::Timer::after(Duration::from_secs(5)).await;
        Err("no answer from the bus within 5 s".to_string())
    }));
    match result {
        Ok(props) => {
            let p = to_json(&props);
            let live = p["Connection"] == "live";
            if json_output {
                println!("{p}");
            } else {
                print!("{}", render(&p));
            }
            if live { EXIT_LIVE } else { EXIT_NOT_LIVE }
        }
        Err(e) => {
            if json_output {
                println!("{}", json!({"Connection": "not_running", "error": e}));
            } else {
                println!("○ hass-edge — Stopped\n     {e}");
            }
            EXIT_NOT_RUNNING
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_the_state() {
        let p = json!({"Connection": "backoff", "ReconnectAttempts": 3, "Version": "0.1.0", "HaVersion": "2024.3.3", "TrackedEntities": 412});
        let text = render(&p);
        assert!(text.contains("Disconnected (backoff, retry 3)"), "{text}");
        assert!(text.contains("412 tracked"), "{text}");
        assert!(render(&json!({"Connection": "live"})).contains("Connected"));
        assert!(render(&json!({"Connection": "auth_failed"})).contains("Auth failed"));
    }
}
