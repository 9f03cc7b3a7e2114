//! Configuration: the TOML file, `HASS_EDGE_<SECTION>_<KEY>` environment overrides, and
//! validation into a [`Config`] the rest of the daemon can trust.
//!
//! Parsing is pure ([`parse_config`] takes the file text and the environment), so it is tested
//! without touching the file system. The shape follows ntpd-rs and greetd: a raw serde layer
//! with `deny_unknown_fields`, then a validated value; every error names the key it is about.
//! A bad config makes the daemon exit with `EX_CONFIG` (78, see sysexits(3)).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::files;

/// Default location of the config file (the Debian package ships it as a conffile).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/hass-edge/config.toml";

/// Prefix of the environment variables that override config keys, e.g. `HASS_EDGE_HA_URL`.
pub const ENV_PREFIX: &str = "HASS_EDGE_";

/// D-Bus well-known name and interface of the daemon (`dbus.rs` serves it, `hass-edge
/// status` asks it).
pub const DBUS_NAME: &str = "io.hassedge.HassEdge1";
/// D-Bus object path of the daemon.
pub const DBUS_PATH: &str = "/io/hassedge/HassEdge1";

/// Exit code for a bad configuration: `EX_CONFIG` from sysexits(3).
pub const EXIT_CONFIG: u8 = 78;

/// Largest token file read (`ha.token_file`, `http.api_token_file`, the systemd credential):
/// 64 KiB. An HA long-lived token is a JWT of about 180 bytes; anything near the limit is not
/// a token, and a larger file is refused from its size before it is read (issue 13).
pub const MAX_TOKEN_FILE_BYTES: u64 = 64 << 10;

/// Largest config file read: 1 MiB, a thousand times a full config with long filter lists.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

/// Default of `http.max_forward_body_bytes`: 1 MiB.
pub const DEFAULT_FORWARD_BODY_BYTES: usize = 1024 * 1024;
/// Upper bound of `http.max_forward_body_bytes`: 64 MiB (a backup upload is larger: upload
/// those to HA directly).
pub const MAX_FORWARD_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Default of `http.max_websocket_clients`: concurrent local WebSocket API sessions (issue 16).
pub const DEFAULT_MAX_WEBSOCKET_CLIENTS: usize = 64;
/// Upper bound of `http.max_websocket_clients`.
pub const MAX_WEBSOCKET_CLIENTS: usize = 1024;

/// Default of `http.websocket_coalesce_ms`: how long the mirror's changes may wait to share
/// one frame to a client that announced `coalesce_messages`.
pub const DEFAULT_WEBSOCKET_COALESCE_MS: u64 = 10;
/// Upper bound of `http.websocket_coalesce_ms`.
pub const MAX_WEBSOCKET_COALESCE_MS: u64 = 1000;

/// How `dashboards.url_paths` names HA's default dashboard, whose `url_path` is `null` in
/// `lovelace/config` and `lovelace_updated` (HA `components/lovelace/const.py`), and which
/// the frontend serves at `/lovelace`. No other dashboard can have this path: HA requires a
/// hyphen in every other one (`lovelace/__init__.py` `_validate_url_slug`).
pub const DEFAULT_DASHBOARD: &str = "lovelace";

/// Most entries in `http.allowed_hosts`.
pub const MAX_ALLOWED_HOSTS: usize = 256;

/// Most entries in each of `dashboards.url_paths`, `dashboards.always`, `dashboards.never`.
pub const MAX_DASHBOARD_LIST: usize = 1024;

/// Sections of the file; env overrides are split as `HASS_EDGE_<SECTION>_<KEY>`.
const SECTIONS: &[&str] = &[
    "ha",
    "filter",
    "cache",
    "reconnect",
    "heartbeat",
    "http",
    "dbus",
    "log",
    "dashboards",
];

/// Keys whose value is a list; from the environment they are comma-separated.
const LIST_KEYS: &[&str] = &[
    "include_prefixes",
    "exclude_domains",
    "cors_origins",
    "allowed_hosts",
    "url_paths",
    "always",
    "never",
];

/// A configuration error. The message always names the key or file it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read, is not a regular file, or is larger than
    /// [`MAX_CONFIG_FILE_BYTES`] (see [`files::read_regular`]).
    #[error("failed to read config file {path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why, e.g. "it is a FIFO (named pipe), not a regular file".
        message: String,
    },
    /// The TOML did not parse, or a key is unknown or of the wrong type.
    #[error("invalid config{origin}: {message}")]
    Syntax {
        /// Where the text came from (` in /etc/…` or empty).
        origin: String,
        /// What toml/serde said, which names the key.
        message: String,
    },
    /// A key has a value of the right type but outside its range.
    #[error("invalid config key {key}: {message}")]
    Invalid {
        /// `section.key`.
        key: String,
        /// What is wrong with the value.
        message: String,
    },
    /// The token could not be read (it lives in its own file, never in the config).
    #[error("failed to read the Home Assistant token from {path}: {message}")]
    Token {
        /// The file that was tried.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// The file as written: every key optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    ha: RawHa,
    filter: RawFilter,
    cache: RawCache,
    reconnect: RawReconnect,
    heartbeat: RawHeartbeat,
    http: RawHttp,
    dbus: RawDbus,
    log: RawLog,
    dashboards: RawDashboards,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHa {
    url: String,
    token_file: PathBuf,
    ca_file: PathBuf,
}

impl Default for RawHa {
    fn default() -> Self {
        RawHa {
            url: "http://homeassistant.local:8123".into(),
            token_file: "/etc/hass-edge/token".into(),
            ca_file: PathBuf::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawFilter {
    enabled: bool,
    include_prefixes: Vec<String>,
    exclude_domains: Vec<String>,
}

impl Default for RawFilter {
    fn default() -> Self {
        RawFilter {
            enabled: true,
            include_prefixes: Vec::new(),
            exclude_domains: vec!["media_player".into(), "camera".into(), "automation".into()],
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCache {
    mode: CacheMode,
    max_entities: u64,
    ttl_seconds: u64,
    negative_ttl_seconds: u64,
    persist: bool,
    state_file: PathBuf,
    persist_interval_seconds: u64,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            mode: CacheMode::Update,
            max_entities: 10_000,
            ttl_seconds: 30,
            negative_ttl_seconds: 30,
            persist: true,
            state_file: "/var/lib/hass-edge/states.json".into(),
            persist_interval_seconds: 900,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawReconnect {
    max_attempts: u64,
    max_delay_seconds: u64,
}

impl Default for RawReconnect {
    fn default() -> Self {
        RawReconnect {
            max_attempts: 0,
            max_delay_seconds: 60,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHeartbeat {
    interval_seconds: u64,
    timeout_seconds: u64,
}

impl Default for RawHeartbeat {
    fn default() -> Self {
        RawHeartbeat {
            interval_seconds: 30,
            timeout_seconds: 10,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHttp {
    listen: String,
    api_token_file: PathBuf,
    allow_service_calls: bool,
    cors_origins: Vec<String>,
    allowed_hosts: Vec<String>,
    forward: bool,
    x_forwarded_for: bool,
    max_forward_body_bytes: usize,
    asset_cache_mib: u64,
    max_websocket_clients: usize,
    websocket_coalesce_ms: u64,
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            listen: "127.0.0.1:8124".into(),
            api_token_file: PathBuf::new(),
            allow_service_calls: true,
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            forward: true,
            x_forwarded_for: false,
            max_forward_body_bytes: DEFAULT_FORWARD_BODY_BYTES,
            asset_cache_mib: 64,
            max_websocket_clients: DEFAULT_MAX_WEBSOCKET_CLIENTS,
            websocket_coalesce_ms: DEFAULT_WEBSOCKET_COALESCE_MS,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDashboards {
    url_paths: Vec<String>,
    always: Vec<String>,
    never: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDbus {
    bus: DbusBus,
    entity_signals: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
        }
    }
}

/// What an HA event does to the store (`[cache] mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Events write the new state into the store.
    Update,
    /// Events drop the entity; the next read goes to HA's REST API.
    Invalidate,
}

/// Which D-Bus bus to serve status on (`[dbus] bus`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DbusBus {
    /// The system bus (needs the policy file the package installs).
    #[default]
    System,
    /// The user's session bus (development, tests).
    Session,
    /// No D-Bus.
    None,
}

/// `[dbus]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DbusConfig {
    /// Which bus.
    pub bus: DbusBus,
    /// Emit `EntityChanged(entity_id, state)` for tracked entities.
    pub entity_signals: bool,
}

/// The validated configuration. Printed by `check-config` (it holds no secrets: the token
/// lives in its own file and only the path is kept here).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// `[ha]`: where Home Assistant is.
    pub ha: HaConfig,
    /// `[filter]`: which entities are tracked.
    pub filter: FilterConfig,
    /// `[cache]`: the state store.
    pub cache: CacheConfig,
    /// `[reconnect]`: back-off after a lost connection.
    pub reconnect: ReconnectConfig,
    /// `[heartbeat]`: detection of half-open connections.
    pub heartbeat: HeartbeatConfig,
    /// `[http]`: the local API.
    pub http: HttpConfig,
    /// `[dbus]`: status for control panels.
    pub dbus: DbusConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[dashboards]`: the per-dashboard entity allowlist of the local WebSocket API.
    pub dashboards: DashboardsConfig,
}

/// `[ha]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HaConfig {
    /// Base URL (`http://host:port`, optionally with a path prefix), without a trailing `/`.
    pub url: String,
    /// The WebSocket URL derived from `url`: `ws`/`wss` + `<path>/api/websocket`. Not printed
    /// by `check-config`, whose output must itself be a valid config.
    #[serde(skip_serializing)]
    pub websocket_url: String,
    /// File holding the long-lived access token.
    pub token_file: PathBuf,
    /// Extra CA certificate (PEM) added to the system roots; `None` when empty.
    pub ca_file: Option<PathBuf>,
}

/// `[filter]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FilterConfig {
    /// `false` tracks every entity.
    pub enabled: bool,
    /// Entity-id prefixes to keep (empty = all); applied after `exclude_domains`.
    pub include_prefixes: Vec<String>,
    /// Domains never tracked.
    pub exclude_domains: Vec<String>,
}

/// `[cache]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CacheConfig {
    /// See [`CacheMode`].
    pub mode: CacheMode,
    /// LRU bound on the number of entries (≥ 1).
    pub max_entities: usize,
    /// Life of REST-fetched entries, and of pushed ones while the subscription is down.
    #[serde(rename = "ttl_seconds", serialize_with = "as_seconds")]
    pub ttl: Duration,
    /// Life of a cached 404 from HA.
    #[serde(rename = "negative_ttl_seconds", serialize_with = "as_seconds")]
    pub negative_ttl: Duration,
    /// Keep the tracked states across restarts (warm start).
    pub persist: bool,
    /// Where they are kept (the unit's `StateDirectory`).
    pub state_file: PathBuf,
    /// At most one write per this interval while running (SD-card wear), and only after a change.
    #[serde(rename = "persist_interval_seconds", serialize_with = "as_seconds")]
    pub persist_interval: Duration,
}

/// `[reconnect]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReconnectConfig {
    /// Attempts before giving up; 0 = forever.
    pub max_attempts: u32,
    /// Cap of the exponential back-off, and the retry period after `auth_invalid`.
    #[serde(rename = "max_delay_seconds", serialize_with = "as_seconds")]
    pub max_delay: Duration,
}

/// `[heartbeat]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeartbeatConfig {
    /// Period of app-level `ping` messages.
    #[serde(rename = "interval_seconds", serialize_with = "as_seconds")]
    pub interval: Duration,
    /// How long to wait for the `pong` before declaring the connection dead.
    #[serde(rename = "timeout_seconds", serialize_with = "as_seconds")]
    pub timeout: Duration,
}

/// `[http]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HttpConfig {
    /// Address the local API listens on.
    pub listen: SocketAddr,
    /// File with the bearer token clients must send; `None` = no API auth (loopback only).
    pub api_token_file: Option<PathBuf>,
    /// `false` answers `POST /api/services/…` with 403.
    pub allow_service_calls: bool,
    /// Browser origins allowed by CORS (exact `scheme://host[:port]`).
    pub cors_origins: Vec<String>,
    /// Host names the local API answers besides IP literals, `localhost` (`*.localhost`)
    /// and the machine's own name (`hosts.rs`, the DNS-rebinding guard): lower case, no
    /// trailing dot, at most [`MAX_ALLOWED_HOSTS`]. A request with any other `Host` is
    /// answered 421.
    pub allowed_hosts: Vec<String>,
    /// Whether requests hass-edge does not answer itself are forwarded to HA (`true`), or
    /// answered 404 (`false`). See `proxy.rs`.
    pub forward: bool,
    /// Whether forwarded requests carry `X-Forwarded-For`/`X-Forwarded-Proto` with the real
    /// client. HA refuses any request with `X-Forwarded-For` (400) unless its `http:` has
    /// `use_x_forwarded_for: true` and lists hass-edge in `trusted_proxies`
    /// (`homeassistant/components/http/forwarded.py`), so this is off by default.
    pub x_forwarded_for: bool,
    /// Largest request body forwarded to HA, bytes (413 beyond).
    pub max_forward_body_bytes: usize,
    /// Budget of the frontend asset cache (`assets.rs`), MiB, in `assets/` beside
    /// `cache.state_file`; 0 turns it off.
    pub asset_cache_mib: u64,
    /// Most concurrent local WebSocket API sessions (`/api/websocket`, issue 16); one more is
    /// answered 503 before the upgrade. 1..=[`MAX_WEBSOCKET_CLIENTS`].
    pub max_websocket_clients: usize,
    /// How long the mirror's changes may wait to share one frame to a local WebSocket client
    /// that announced `coalesce_messages` (HA's frontend does): after a session was written
    /// changes, it reads the mirror again at the next multiple of this (`ws_server.rs`). Zero:
    /// every change goes as it comes. 0..=[`MAX_WEBSOCKET_COALESCE_MS`] ms.
    #[serde(rename = "websocket_coalesce_ms", serialize_with = "as_millis")]
    pub websocket_coalesce: Duration,
}

/// `[dashboards]` (issue 16): which entities an unfiltered `get_states`/`subscribe_entities`
/// of a local WebSocket client gets. The allowlist is the union of the entities the
/// dashboards in `url_paths` use, plus `always`, minus `never` (`dashboards.rs` builds it).
/// With `url_paths` empty there is no allowlist.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DashboardsConfig {
    /// Lovelace dashboard url paths (`"dashboard-kiosk"`); [`DEFAULT_DASHBOARD`]
    /// (`"lovelace"`) is HA's default dashboard (`url_path: null`). No duplicates.
    pub url_paths: Vec<String>,
    /// Entity ids or globs (`*` any run of characters, `?` one) always allowed, checked by
    /// [`check_entity_pattern`].
    pub always: Vec<String>,
    /// Entity ids or globs never allowed; wins over the dashboards and `always`.
    pub never: Vec<String>,
}

impl DashboardsConfig {
    /// Whether an allowlist is configured (`url_paths` is not empty).
    pub fn enabled(&self) -> bool {
        !self.url_paths.is_empty()
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogConfig {
    /// `error|warn|info|debug|trace|off`; `RUST_LOG` overrides.
    pub level: String,
}

fn as_seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Config {
    /// Reads and parses `path`, applying overrides from the process environment.
    ///
    /// Errors: [`ConfigError::Read`] when the file cannot be read, is not a regular file
    /// (a FIFO is refused, not waited on) or is larger than [`MAX_CONFIG_FILE_BYTES`] (a
    /// missing file at the default path is not an error: defaults and the environment
    /// apply), or is not UTF-8; otherwise as [`parse_config`].
    pub fn load(path: &Path, path_was_given: bool) -> Result<Config, ConfigError> {
        let read_error = |message: String| ConfigError::Read {
            path: path.to_owned(),
            message,
        };
        let text = match files::read_regular(path, MAX_CONFIG_FILE_BYTES) {
            Ok(bytes) => String::from_utf8(bytes)
                .map_err(|e| read_error(format!("not UTF-8 text ({})", e.utf8_error())))?,
            Err(e) if e.is_not_found() && !path_was_given => String::new(),
            Err(e) => return Err(read_error(e.reason())),
        };
        let env = std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX));
        parse_config(&text, env).map_err(|e| match e {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                origin: format!(" in {}", path.display()),
                message,
            },
            other => other,
        })
    }

    /// Renders the effective config as TOML, as `check-config` prints it.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// Reads the local API token from `http.api_token_file`, if set (as `read_token_file`:
    /// a regular file of at most [`MAX_TOKEN_FILE_BYTES`], never waited on).
    ///
    /// Errors: [`ConfigError::Token`] naming the file and the key: unreadable, not a regular
    /// file, too large, or not one token of at least 16 characters.
    pub fn read_api_token(&self) -> Result<Option<Secret>, ConfigError> {
        let Some(path) = &self.http.api_token_file else {
            return Ok(None);
        };
        let text = read_token_file(path).map_err(|message| ConfigError::Token {
            path: path.clone(),
            message: format!("http.api_token_file: {message}"),
        })?;
        let token = text.trim();
        if token.len() < 16 || token.chars().any(|c| c.is_control() || c == ' ') {
            return Err(ConfigError::Token { path: path.clone(), message: "http.api_token_file must hold one token of at least 16 characters without white space".into() });
        }
        Ok(Some(Secret(token.to_owned())))
    }

    /// Reads the HA token: `$CREDENTIALS_DIRECTORY/ha-token` when systemd passed it
    /// (`LoadCredential=`, see systemd.exec(5) "Credentials"), else `ha.token_file`.
    /// Surrounding white space is trimmed. Read as `read_token_file` does: a regular file
    /// of at most [`MAX_TOKEN_FILE_BYTES`], never waited on.
    ///
    /// Errors: [`ConfigError::Token`] naming the file, when it is unreadable, not a regular
    /// file (a FIFO, socket, device or directory), too large, not UTF-8, empty, or holds
    /// white space or control characters inside the token.
    pub fn read_token(&self) -> Result<Secret, ConfigError> {
        let path = std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(|dir| Path::new(&dir).join("ha-token"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| self.ha.token_file.clone());
        let text = read_token_file(&path).map_err(|message| ConfigError::Token {
            path: path.clone(),
            message,
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(ConfigError::Token {
                path,
                message: "the file is empty".into(),
            });
        }
        if token.chars().any(|c| c.is_control() || c == ' ') {
            return Err(ConfigError::Token {
                path,
                message: "the token contains white space or control characters".into(),
            });
        }
        Ok(Secret(token.to_owned()))
    }
}

/// The text of a token file: [`files::read_regular`] with [`MAX_TOKEN_FILE_BYTES`] (so a
/// FIFO is refused at once instead of blocking the daemon's one thread), as UTF-8.
///
/// Errors: the reason alone (the caller names the file), e.g. "it is a FIFO (named pipe),
/// not a regular file".
fn read_token_file(path: &Path) -> Result<String, String> {
    let bytes = files::read_regular(path, MAX_TOKEN_FILE_BYTES).map_err(|e| e.reason())?;
    String::from_utf8(bytes).map_err(|_| "the file is not UTF-8 text".to_owned())
}

/// A secret (the HA token). Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that must send it (the `auth` message, the REST header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Compares secrets in time independent of where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Parses config text plus `HASS_EDGE_*` overrides (`(name, value)` pairs) into a [`Config`].
///
/// An override value is read as a TOML value when it parses as one (`true`, `42`,
/// `["a", "b"]`), else as a string; list keys also accept `a,b,c`.
///
/// Errors: [`ConfigError::Syntax`] for bad TOML, unknown keys (from the file or the
/// environment) and wrong types; [`ConfigError::Invalid`] for out-of-range values.
pub fn parse_config(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    // toml's messages quote the offending line, which may hold a URL with a password.
    let syntax = |message: String| ConfigError::Syntax {
        origin: String::new(),
        message: strip_userinfo_in(&message),
    };
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| syntax(e.to_string()))?;
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let split = SECTIONS.iter().find_map(|s| {
            rest.strip_prefix(s)
                .and_then(|r| r.strip_prefix('_'))
                .map(|key| (*s, key.to_owned()))
        });
        let Some((section, key)) = split.filter(|(_, k)| !k.is_empty()) else {
            return Err(syntax(format!(
                "environment variable {name} does not name a config key (expected {ENV_PREFIX}<SECTION>_<KEY> with SECTION one of {})",
                SECTIONS.join(", ")
            )));
        };
        let entry = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(section_table) = entry.as_table_mut() else {
            return Err(syntax(format!("{section} must be a table")));
        };
        section_table.insert(key.clone(), env_value(&key, &value));
    }
    let raw: RawConfig = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| syntax(e.to_string()))?;
    validate(raw)
}

fn env_value(key: &str, value: &str) -> toml::Value {
    if let Ok(t) = format!("v = {value}").parse::<toml::Table>()
        && let Some(v) = t.get("v")
    {
        return v.clone();
    }
    if LIST_KEYS.contains(&key) {
        let items = value.split(',').map(str::trim).filter(|s| !s.is_empty());
        return toml::Value::Array(items.map(|s| toml::Value::String(s.into())).collect());
    }
    toml::Value::String(value.to_owned())
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: strip_userinfo_in(&message.into()),
    }
}

/// `url` as it may be shown in an error or a log line: the userinfo of its authority
/// (`user:pass@`, RFC 3986 §3.2.1) replaced by `***@`. Works on text that is not a valid
/// URL too (no scheme, spaces, another scheme): everything between the end of the scheme's
/// `://` (or the start, without one) and the last `@` is hidden, so a password holding `/`,
/// `?` or `#` does not leak either; a path with an `@` may be hidden with it, which costs
/// nothing in an error message.
pub fn strip_userinfo(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url[start..].rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &url[start + at..]),
        None => url.to_owned(),
    }
}

/// `text` with the userinfo of every `scheme://…` URL in it replaced by `***@` (as
/// [`strip_userinfo`], a URL ending at white space or a quote). For messages that quote
/// config text, such as toml's, which show the offending line.
pub fn strip_userinfo_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`'))
            .unwrap_or(tail.len());
        let (url, after) = tail.split_at(end);
        match url.rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&url[at..]);
            }
            None => out.push_str(url),
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

fn positive_seconds(key: &str, value: u64) -> Result<Duration, ConfigError> {
    // One day is far beyond any sensible value and keeps Instant arithmetic safe.
    match value {
        0 => Err(invalid(key, "must be at least 1")),
        v if v > 86_400 => Err(invalid(key, "must be at most 86400 (one day)")),
        v => Ok(Duration::from_secs(v)),
    }
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let (url, websocket_url) = ha_urls(&raw.ha.url)?;
    if raw.ha.token_file.as_os_str().is_empty() {
        return Err(invalid("ha.token_file", "must not be empty"));
    }
    let ca_file = (!raw.ha.ca_file.as_os_str().is_empty()).then_some(raw.ha.ca_file);

    for (i, p) in raw.filter.include_prefixes.iter().enumerate() {
        if p.is_empty() {
            return Err(invalid(
                "filter.include_prefixes",
                format!("entry {i} is empty"),
            ));
        }
    }
    for (i, d) in raw.filter.exclude_domains.iter().enumerate() {
        if d.is_empty() || d.contains('.') {
            return Err(invalid(
                "filter.exclude_domains",
                format!("entry {i} ({d:?}) is not a domain (no dots, e.g. \"camera\")"),
            ));
        }
    }

    if raw.cache.persist && raw.cache.state_file.file_name().is_none() {
        return Err(invalid(
            "cache.state_file",
            "must name a file when cache.persist is true",
        ));
    }
    let max_entities = match raw.cache.max_entities {
        0 => return Err(invalid("cache.max_entities", "must be at least 1")),
        n if n > 10_000_000 => {
            return Err(invalid("cache.max_entities", "must be at most 10000000"));
        }
        n => n as usize,
    };
    let max_attempts = u32::try_from(raw.reconnect.max_attempts)
        .map_err(|_| invalid("reconnect.max_attempts", "too large"))?;
    let heartbeat = HeartbeatConfig {
        interval: positive_seconds("heartbeat.interval_seconds", raw.heartbeat.interval_seconds)?,
        timeout: positive_seconds("heartbeat.timeout_seconds", raw.heartbeat.timeout_seconds)?,
    };
    let listen: SocketAddr = raw.http.listen.parse().map_err(|_| {
        invalid(
            "http.listen",
            format!(
                "{:?} is not an IP:port address, e.g. \"127.0.0.1:8124\"",
                raw.http.listen
            ),
        )
    })?;
    let api_token_file =
        (!raw.http.api_token_file.as_os_str().is_empty()).then_some(raw.http.api_token_file);
    if api_token_file.is_none() && !listen.ip().is_loopback() {
        return Err(invalid(
            "http.api_token_file",
            format!(
                "must be set when http.listen ({listen}) is not a loopback address: anyone on the network could otherwise call Home Assistant services"
            ),
        ));
    }
    for origin in &raw.http.cors_origins {
        let ok = (origin.starts_with("http://") || origin.starts_with("https://"))
            && !origin.ends_with('/')
            && !origin.contains(char::is_whitespace)
            // A browser's Origin never holds user info (RFC 6454 §6.1).
            && !origin.contains('@');
        if !ok {
            return Err(invalid(
                "http.cors_origins",
                format!(
                    "{origin:?} is not an origin like \"http://kiosk.local:8080\" (scheme://host[:port], no path)"
                ),
            ));
        }
    }
    if raw.http.allowed_hosts.len() > MAX_ALLOWED_HOSTS {
        return Err(invalid(
            "http.allowed_hosts",
            format!(
                "{} names, at most {MAX_ALLOWED_HOSTS}",
                raw.http.allowed_hosts.len()
            ),
        ));
    }
    let mut allowed_hosts = Vec::with_capacity(raw.http.allowed_hosts.len());
    for name in &raw.http.allowed_hosts {
        if !crate::hosts::valid_name(name) {
            return Err(invalid(
                "http.allowed_hosts",
                format!(
                    "{name:?} is not a host name like \"kiosk.lan\" (no scheme, port, path or wildcard)"
                ),
            ));
        }
        allowed_hosts.push(crate::hosts::normalize(name));
    }
    let max_forward_body_bytes = raw.http.max_forward_body_bytes;
    if !(1024..=MAX_FORWARD_BODY_BYTES).contains(&max_forward_body_bytes) {
        return Err(invalid(
            "http.max_forward_body_bytes",
            format!("{max_forward_body_bytes} is outside 1024..={MAX_FORWARD_BODY_BYTES}"),
        ));
    }
    if raw.http.asset_cache_mib > 4096 {
        return Err(invalid(
            "http.asset_cache_mib",
            format!("{} is over 4096 (MiB)", raw.http.asset_cache_mib),
        ));
    }
    let max_websocket_clients = raw.http.max_websocket_clients;
    if !(1..=MAX_WEBSOCKET_CLIENTS).contains(&max_websocket_clients) {
        return Err(invalid(
            "http.max_websocket_clients",
            format!("{max_websocket_clients} is outside 1..={MAX_WEBSOCKET_CLIENTS}"),
        ));
    }
    if raw.http.websocket_coalesce_ms > MAX_WEBSOCKET_COALESCE_MS {
        return Err(invalid(
            "http.websocket_coalesce_ms",
            format!(
                "{} is over {MAX_WEBSOCKET_COALESCE_MS} (ms)",
                raw.http.websocket_coalesce_ms
            ),
        ));
    }
    let dashboards = validate_dashboards(raw.dashboards)?;
    let level = raw.log.level.to_ascii_lowercase();
    if !["off", "error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
        return Err(invalid(
            "log.level",
            format!(
                "{:?} is not one of off, error, warn, info, debug, trace",
                raw.log.level
            ),
        ));
    }

    Ok(Config {
        ha: HaConfig {
            url,
            websocket_url,
            token_file: raw.ha.token_file,
            ca_file,
        },
        filter: FilterConfig {
            enabled: raw.filter.enabled,
            include_prefixes: raw.filter.include_prefixes,
            exclude_domains: raw.filter.exclude_domains,
        },
        cache: CacheConfig {
            mode: raw.cache.mode,
            max_entities,
            ttl: positive_seconds("cache.ttl_seconds", raw.cache.ttl_seconds)?,
            negative_ttl: positive_seconds(
                "cache.negative_ttl_seconds",
                raw.cache.negative_ttl_seconds,
            )?,
            persist: raw.cache.persist,
            state_file: raw.cache.state_file,
            persist_interval: positive_seconds(
                "cache.persist_interval_seconds",
                raw.cache.persist_interval_seconds,
            )?,
        },
        reconnect: ReconnectConfig {
            max_attempts,
            max_delay: positive_seconds(
                "reconnect.max_delay_seconds",
                raw.reconnect.max_delay_seconds,
            )?,
        },
        heartbeat,
        http: HttpConfig {
            listen,
            api_token_file,
            allow_service_calls: raw.http.allow_service_calls,
            cors_origins: raw.http.cors_origins,
            allowed_hosts,
            forward: raw.http.forward,
            x_forwarded_for: raw.http.x_forwarded_for,
            max_forward_body_bytes,
            asset_cache_mib: raw.http.asset_cache_mib,
            max_websocket_clients,
            websocket_coalesce: Duration::from_millis(raw.http.websocket_coalesce_ms),
        },
        dbus: DbusConfig {
            bus: raw.dbus.bus,
            entity_signals: raw.dbus.entity_signals,
        },
        log: LogConfig { level },
        dashboards,
    })
}

/// Checks `[dashboards]`: url paths shaped as HA accepts them, patterns as
/// [`check_entity_pattern`], bounded lists, and no `always`/`never` without dashboards.
fn validate_dashboards(raw: RawDashboards) -> Result<DashboardsConfig, ConfigError> {
    for (key, list) in [
        ("dashboards.url_paths", &raw.url_paths),
        ("dashboards.always", &raw.always),
        ("dashboards.never", &raw.never),
    ] {
        if list.len() > MAX_DASHBOARD_LIST {
            return Err(invalid(
                key,
                format!("{} entries, at most {MAX_DASHBOARD_LIST}", list.len()),
            ));
        }
    }
    for (i, path) in raw.url_paths.iter().enumerate() {
        // HA's dashboard url paths are slugs with `-` as separator and at least one hyphen
        // (`lovelace/__init__.py` `_validate_url_slug`); the default one has none.
        let slug = !path.is_empty()
            && path
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !(path == DEFAULT_DASHBOARD || slug && path.contains('-')) {
            return Err(invalid(
                "dashboards.url_paths",
                format!(
                    "entry {i} ({path:?}) is not a dashboard url path: \"{DEFAULT_DASHBOARD}\" for the default dashboard, else the path HA shows after the host, e.g. \"dashboard-kiosk\" (lower-case letters, digits and at least one -)"
                ),
            ));
        }
        if raw.url_paths[..i].contains(path) {
            return Err(invalid(
                "dashboards.url_paths",
                format!("entry {i} ({path:?}) is listed twice"),
            ));
        }
    }
    for (key, list) in [
        ("dashboards.always", &raw.always),
        ("dashboards.never", &raw.never),
    ] {
        for (i, pattern) in list.iter().enumerate() {
            check_entity_pattern(pattern)
                .map_err(|why| invalid(key, format!("entry {i} ({pattern:?}) {why}")))?;
        }
        if !list.is_empty() && raw.url_paths.is_empty() {
            return Err(invalid(
                key,
                "is set but dashboards.url_paths is empty: there is no allowlist to change",
            ));
        }
    }
    Ok(DashboardsConfig {
        url_paths: raw.url_paths,
        always: raw.always,
        never: raw.never,
    })
}

/// Whether `pattern` is an entity id or a glob of entity ids, as `dashboards.always` and
/// `dashboards.never` take them: HA's entity id characters (lower-case ASCII letters,
/// digits, `_`, `.`; see HA `core.py` `valid_entity_id`) plus the wildcards `*` (any run of
/// characters, `.` included) and `?` (one character). Without a wildcard it must be a whole
/// entity id, `<domain>.<object_id>`.
///
/// Errors: why it is not, as the end of a sentence ("is not …").
pub fn check_entity_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("is empty".into());
    }
    if let Some(c) = pattern.chars().find(|&c| {
        !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '*' | '?'))
    }) {
        return Err(format!(
            "holds {c:?}: entity ids and globs use only lower-case letters, digits, _ and ., with * and ? as wildcards (e.g. \"sensor.kitchen_*\", \"*_battery\")"
        ));
    }
    let wildcard = pattern.contains(['*', '?']);
    let whole_id = pattern.split_once('.').is_some_and(|(domain, object_id)| {
        !domain.is_empty() && !object_id.is_empty() && !object_id.contains('.')
    });
    if !wildcard && !whole_id {
        return Err(
            "is not an entity id (<domain>.<object_id>, e.g. \"light.kitchen\") and has no wildcard".into(),
        );
    }
    Ok(())
}

/// Splits `ha.url` into the REST base and the WebSocket URL (`/api/websocket`, see HA's
/// `websocket_api/const.py` `URL`).
///
/// Errors name `ha.url` and show the value without its userinfo ([`strip_userinfo`]): a
/// password in a refused URL must not reach `check-config`'s output or the log.
fn ha_urls(url: &str) -> Result<(String, String), ConfigError> {
    let key = "ha.url";
    let shown = strip_userinfo(url);
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|e| invalid(key, format!("{shown:?} is not a URL: {e}")))?;
    let ws_scheme = match uri.scheme_str() {
        Some("http") => "ws",
        Some("https") => "wss",
        _ => {
            return Err(invalid(
                key,
                format!("{shown:?} must start with http:// or https://"),
            ));
        }
    };
    let Some(authority) = uri.authority() else {
        return Err(invalid(key, format!("{shown:?} has no host")));
    };
    // An `@` anywhere: `http://user:pw/x@host` parses as host `user`, "port" `pw`, path
    // `/x@host`, and would be printed by check-config and logged as the HA URL. HA's base
    // URL has no use for an `@`.
    if url.contains('@') {
        return Err(invalid(
            key,
            format!("{shown:?} must not contain user info (user:password@) or an @"),
        ));
    }
    if authority.port().is_some() && authority.port_u16().is_none() {
        return Err(invalid(
            key,
            format!("{shown:?} has a port that is not a number"),
        ));
    }
    if uri.query().is_some() || authority.as_str().contains('@') {
        return Err(invalid(key, "must not contain a query or user info"));
    }
    let path = uri.path().trim_end_matches('/');
    let base = format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("http"),
        authority,
        path
    );
    let ws = format!("{ws_scheme}://{authority}{path}/api/websocket");
    Ok((base, ws))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_comparison() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        parse_config(text, Vec::new())
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.ha.url, "http://homeassistant.local:8123");
        assert_eq!(
            c.ha.websocket_url,
            "ws://homeassistant.local:8123/api/websocket"
        );
        assert_eq!(c.ha.token_file, PathBuf::from("/etc/hass-edge/token"));
        assert_eq!(c.ha.ca_file, None);
        assert!(c.filter.enabled);
        assert!(c.filter.include_prefixes.is_empty());
        assert_eq!(
            c.filter.exclude_domains,
            ["media_player", "camera", "automation"]
        );
        assert_eq!(c.cache.mode, CacheMode::Update);
        assert_eq!(c.cache.max_entities, 10_000);
        assert_eq!(c.cache.ttl, Duration::from_secs(30));
        assert_eq!(c.cache.negative_ttl, Duration::from_secs(30));
        assert!(c.cache.persist);
        assert_eq!(
            c.cache.state_file,
            PathBuf::from("/var/lib/hass-edge/states.json")
        );
        assert_eq!(c.cache.persist_interval, Duration::from_secs(900));
        assert_eq!(c.reconnect.max_attempts, 0);
        assert_eq!(c.reconnect.max_delay, Duration::from_secs(60));
        assert_eq!(c.heartbeat.interval, Duration::from_secs(30));
        assert_eq!(c.heartbeat.timeout, Duration::from_secs(10));
        assert_eq!(c.http.listen, "127.0.0.1:8124".parse().unwrap());
        assert_eq!(c.log.level, "info");
        assert_eq!(
            c.dbus,
            DbusConfig {
                bus: DbusBus::System,
                entity_signals: false
            }
        );
        assert!(c.http.allow_service_calls);
        assert_eq!(c.http.api_token_file, None);
    }

    #[test]
    fn https_url_with_path_derives_wss() {
        let c = parse("[ha]\nurl = \"https://ha.example:8443/proxy/\"\n").unwrap();
        assert_eq!(c.ha.url, "https://ha.example:8443/proxy");
        assert_eq!(
            c.ha.websocket_url,
            "wss://ha.example:8443/proxy/api/websocket"
        );
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let e = parse("[cache]\nmax_entitys = 5\n").unwrap_err().to_string();
        assert!(e.contains("max_entitys"), "{e}");
        let e = parse("[cachee]\n").unwrap_err().to_string();
        assert!(e.contains("cachee"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = parse("[cache]\nttl_seconds = \"thirty\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ttl_seconds"), "{e}");
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        for (text, key) in [
            ("[cache]\nmax_entities = 0", "cache.max_entities"),
            (
                "[heartbeat]\ntimeout_seconds = 0",
                "heartbeat.timeout_seconds",
            ),
            ("[http]\nlisten = \"localhost\"", "http.listen"),
            ("[ha]\nurl = \"ftp://x\"", "ha.url"),
            ("[ha]\nurl = \"not a url\"", "ha.url"),
            ("[log]\nlevel = \"loud\"", "log.level"),
            (
                "[filter]\nexclude_domains = [\"light.kitchen\"]",
                "filter.exclude_domains",
            ),
            ("[cache]\nmode = \"sometimes\"", "mode"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn environment_overrides_file() {
        let c = parse_config(
            "[ha]\nurl = \"http://a:1\"\n",
            env(&[
                ("HASS_EDGE_HA_URL", "http://127.0.0.1:8123"),
                ("HASS_EDGE_CACHE_MAX_ENTITIES", "50"),
                ("HASS_EDGE_FILTER_ENABLED", "false"),
                ("HASS_EDGE_FILTER_INCLUDE_PREFIXES", "light., switch."),
                ("HASS_EDGE_FILTER_EXCLUDE_DOMAINS", "[\"camera\"]"),
                ("HASS_EDGE_CACHE_MODE", "invalidate"),
            ]),
        )
        .unwrap();
        assert_eq!(c.ha.url, "http://127.0.0.1:8123");
        assert_eq!(c.cache.max_entities, 50);
        assert!(!c.filter.enabled);
        assert_eq!(c.filter.include_prefixes, ["light.", "switch."]);
        assert_eq!(c.filter.exclude_domains, ["camera"]);
        assert_eq!(c.cache.mode, CacheMode::Invalidate);
    }

    #[test]
    fn unknown_environment_key_is_rejected_by_name() {
        let e = parse_config("", env(&[("HASS_EDGE_HA_URLL", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("url"), "{e}");
        let e = parse_config("", env(&[("HASS_EDGE_NOPE", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("HASS_EDGE_NOPE"), "{e}");
    }

    #[test]
    fn printed_config_shows_token_path_and_durations_in_seconds() {
        let c = parse("[ha]\ntoken_file = \"/run/secret/tok\"\n").unwrap();
        let text = c.to_toml();
        assert_eq!(
            parse(&text).unwrap(),
            c,
            "the printed config parses back to the same config"
        );
        assert!(text.contains("token_file = \"/run/secret/tok\""), "{text}");
        assert!(text.contains("ttl_seconds = 30"), "{text}");
    }

    #[test]
    fn non_loopback_listen_needs_an_api_token() {
        let e = parse("[http]\nlisten = \"0.0.0.0:8124\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.api_token_file"), "{e}");
        let c = parse(
            "[http]\nlisten = \"0.0.0.0:8124\"\napi_token_file = \"/etc/hass-edge/api-token\"",
        )
        .unwrap();
        assert_eq!(
            c.http.api_token_file,
            Some(PathBuf::from("/etc/hass-edge/api-token"))
        );
        assert!(parse("[http]\nlisten = \"[::1]:8124\"").is_ok());
    }

    #[test]
    fn cors_origins_must_be_origins() {
        assert!(parse("[http]\ncors_origins = [\"http://kiosk.local:8080\"]").is_ok());
        for bad in ["kiosk.local", "http://kiosk.local/", "*"] {
            let e = parse(&format!("[http]\ncors_origins = [\"{bad}\"]"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("http.cors_origins"), "{e}");
        }
    }

    /// `http.allowed_hosts` (the DNS-rebinding guard, hosts.rs): host names only, kept lower
    /// case without a trailing dot; from the environment as a comma-separated list.
    #[test]
    fn allowed_hosts_are_host_names() {
        assert!(parse("").unwrap().http.allowed_hosts.is_empty());
        let c = parse("[http]\nallowed_hosts = [\"Kiosk.LAN\", \"pi.example.com.\"]").unwrap();
        assert_eq!(c.http.allowed_hosts, ["kiosk.lan", "pi.example.com"]);
        let c = parse_config(
            "",
            env(&[("HASS_EDGE_HTTP_ALLOWED_HOSTS", "kiosk.lan, hall.lan")]),
        )
        .unwrap();
        assert_eq!(c.http.allowed_hosts, ["kiosk.lan", "hall.lan"]);
        for bad in [
            "http://kiosk.lan",
            "kiosk.lan:8124",
            "*.lan",
            "",
            "kiosk.lan/",
        ] {
            let e = parse(&format!("[http]\nallowed_hosts = [\"{bad}\"]"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("http.allowed_hosts"), "{bad:?}: {e}");
        }
        let many: Vec<String> = (0..=MAX_ALLOWED_HOSTS)
            .map(|i| format!("\"h{i}.lan\""))
            .collect();
        let e = parse(&format!("[http]\nallowed_hosts = [{}]", many.join(",")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.allowed_hosts"), "{e}");
    }

    /// Issue 13: a refused `ha.url` was echoed with its password.
    #[test]
    fn refused_urls_are_shown_without_userinfo() {
        for url in [
            "ftp://user:s3cr3t-pw@host",
            "http://user:s3cr3t-pw@ho st:8123",
            "user:s3cr3t-pw@host:8123",
            "http://user:s3cr3t/pw@host",
            "https://user:s3cr3t-pw@",
            "http://user:s3cr3t-pw@host?x=1",
            "http://user:s3cr3t-pw@host",
        ] {
            for e in [
                parse(&format!("[ha]\nurl = \"{url}\"")).unwrap_err(),
                parse_config("", env(&[("HASS_EDGE_HA_URL", url)])).unwrap_err(),
            ] {
                let text = e.to_string();
                assert!(text.contains("ha.url"), "{url}: {text}");
                assert!(!text.contains("s3cr3t"), "{url}: {text}");
            }
        }
        // toml quotes the offending line; the URL on it is shown without its password.
        for text in [
            "[ha]\nurl = \"ftp://user:s3cr3t-pw@host\nx",
            "[ha]\nurll = \"http://user:s3cr3t-pw@host\"",
            "[http]\ncors_origins = [\"http://u:s3cr3t-pw@kiosk\"]",
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(!e.contains("s3cr3t"), "{text}: {e}");
        }
    }

    #[test]
    fn userinfo_is_stripped_and_nothing_else() {
        assert_eq!(strip_userinfo("ftp://u:p@host/x"), "ftp://***@host/x");
        assert_eq!(strip_userinfo("u:p@host"), "***@host");
        assert_eq!(strip_userinfo("http://host:8123/x"), "http://host:8123/x");
        assert_eq!(strip_userinfo(""), "");
        assert_eq!(
            strip_userinfo_in("a \"http://u:p@h\" and wss://x@y/z, ok://"),
            "a \"http://***@h\" and wss://***@y/z, ok://"
        );
        assert_eq!(strip_userinfo_in("no url"), "no url");
    }

    #[test]
    fn websocket_client_cap_defaults_and_bounds() {
        assert_eq!(parse("").unwrap().http.max_websocket_clients, 64);
        let c = parse("[http]\nmax_websocket_clients = 1").unwrap();
        assert_eq!(c.http.max_websocket_clients, 1);
        for bad in ["0", "1025"] {
            let e = parse(&format!("[http]\nmax_websocket_clients = {bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("http.max_websocket_clients"), "{e}");
        }
    }

    #[test]
    fn websocket_coalescing_defaults_to_10_ms_and_is_bounded() {
        let ms = |c: Config| c.http.websocket_coalesce.as_millis();
        assert_eq!(ms(parse("").unwrap()), 10);
        assert_eq!(ms(parse("[http]\nwebsocket_coalesce_ms = 0").unwrap()), 0);
        assert_eq!(
            ms(parse("[http]\nwebsocket_coalesce_ms = 1000").unwrap()),
            1000
        );
        for bad in ["1001", "-1", "\"10\""] {
            let e = parse(&format!("[http]\nwebsocket_coalesce_ms = {bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("websocket_coalesce_ms"), "{e}");
        }
    }

    #[test]
    fn dashboards_absent_means_no_allowlist() {
        let c = parse("").unwrap();
        assert_eq!(c.dashboards, DashboardsConfig::default());
        assert!(!c.dashboards.enabled());
        assert!(!parse("[dashboards]\n").unwrap().dashboards.enabled());
    }

    #[test]
    fn dashboards_section_is_read_and_printed_back() {
        let c = parse(
            "[dashboards]\nurl_paths = [\"lovelace\", \"dashboard-kiosk\"]\nalways = [\"sun.sun\", \"sensor.kitchen_*\"]\nnever = [\"*_battery\", \"sensor.?x\"]",
        )
        .unwrap();
        assert!(c.dashboards.enabled());
        assert_eq!(c.dashboards.url_paths, ["lovelace", "dashboard-kiosk"]);
        assert_eq!(c.dashboards.always, ["sun.sun", "sensor.kitchen_*"]);
        assert_eq!(c.dashboards.never, ["*_battery", "sensor.?x"]);
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        // A reload compares whole configs: a changed list is a changed config.
        let d = parse("[dashboards]\nurl_paths = [\"lovelace\", \"dashboard-kiosk\"]\nalways = [\"sun.sun\"]\nnever = [\"*_battery\", \"sensor.?x\"]").unwrap();
        assert_ne!(c, d);
        let e = parse_config(
            "",
            env(&[
                ("HASS_EDGE_DASHBOARDS_URL_PATHS", "lovelace, dashboard-hall"),
                ("HASS_EDGE_DASHBOARDS_NEVER", "light.*"),
            ]),
        )
        .unwrap();
        assert_eq!(e.dashboards.url_paths, ["lovelace", "dashboard-hall"]);
        assert_eq!(e.dashboards.never, ["light.*"]);
    }

    #[test]
    fn bad_dashboards_entries_name_the_key() {
        for (text, key) in [
            ("url_paths = [\"Kiosk\"]", "dashboards.url_paths"),
            ("url_paths = [\"kiosk\"]", "dashboards.url_paths"),
            ("url_paths = [\"/dashboard-kiosk\"]", "dashboards.url_paths"),
            ("url_paths = [\"\"]", "dashboards.url_paths"),
            (
                "url_paths = [\"dash-a\", \"dash-a\"]",
                "dashboards.url_paths",
            ),
            (
                "url_paths = [\"lovelace\"]\nalways = [\"Light.x\"]",
                "dashboards.always",
            ),
            (
                "url_paths = [\"lovelace\"]\nalways = [\"light\"]",
                "dashboards.always",
            ),
            (
                "url_paths = [\"lovelace\"]\nnever = [\"sensor.[ab]\"]",
                "dashboards.never",
            ),
            (
                "url_paths = [\"lovelace\"]\nnever = [\"\"]",
                "dashboards.never",
            ),
            (
                "url_paths = [\"lovelace\"]\nnever = [\"a.b.c\"]",
                "dashboards.never",
            ),
            ("always = [\"sun.sun\"]", "dashboards.always"),
            ("never = [\"sun.sun\"]", "dashboards.never"),
            ("url_path = [\"lovelace\"]", "url_path"),
        ] {
            let e = parse(&format!("[dashboards]\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn entity_patterns() {
        for good in [
            "light.kitchen",
            "sensor.kitchen_*",
            "*_battery",
            "*",
            "sensor.t?",
        ] {
            assert_eq!(check_entity_pattern(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "light",
            "light.",
            ".x",
            "a.b.c",
            "light.Kitchen",
            "light kitchen",
        ] {
            assert!(check_entity_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_debug_is_redacted() {
        assert_eq!(
            format!("{:?}", Secret::new("abc.def")),
            "Secret(<redacted>)"
        );
    }
}
