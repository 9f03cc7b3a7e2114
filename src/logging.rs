//! Logging: `log` + `env_logger` on stderr. Under systemd (`JOURNAL_STREAM` set, see
//! systemd.exec(5)) each line starts with the sd-daemon(3) priority (`<3>` error, `<4>`
//! warning, `<6>` info, `<7>` debug) so `journalctl -p` filters by it, and without a
//! timestamp (journald adds its own).
//!
//! Secrets never reach the log, whatever `RUST_LOG` says (issue 13): env_logger's logger is
//! wrapped in [`Guard`], which
//! - drops records above [`CLAMPED`]'s level from the crates that print WebSocket frames,
//!   HTTP headers or TLS records at debug/trace (the `auth` frame and the `Authorization`
//!   header carry the tokens). A `filter_module` clamp in env_logger is not enough: a more
//!   specific directive such as `RUST_LOG=tungstenite::protocol=trace` overrides it;
//! - as a last line of defence, replaces every registered secret ([`redact`]) in a formatted
//!   message with `[redacted]`.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::{Mutex, PoisonError};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::config::Secret;

/// Crates whose records above the given level are dropped whatever `RUST_LOG` says, and why:
/// tungstenite and async-tungstenite log every frame at trace (the `auth` frame holds the
/// HA token); ureq and ureq-proto log requests with their headers (`Authorization: Bearer`)
/// at debug/trace; rustls logs handshake records and certificates at trace (its debug
/// lines — cipher suite, ALPN, name checks — stay available for `ha.ca_file` problems).
/// zbus is not clamped: no token crosses D-Bus.
pub const CLAMPED: &[(&str, LevelFilter)] = &[
    ("tungstenite", LevelFilter::Info),
    ("async_tungstenite", LevelFilter::Info),
    ("ureq", LevelFilter::Info),
    ("ureq_proto", LevelFilter::Info),
    ("rustls", LevelFilter::Debug),
];

/// Shortest value [`redact`] registers, in bytes: a shorter one would also blank out
/// ordinary words. HA long-lived tokens are about 180 bytes, API tokens at least 16.
pub const MIN_SECRET_BYTES: usize = 8;

/// Most secrets remembered; the oldest is forgotten first. A token is registered at start
/// and at each reload or rotation, so this covers many rotations in one run.
pub const MAX_SECRETS: usize = 16;

/// What a registered secret is replaced with in a log message.
pub const REDACTED: &str = "[redacted]";

/// The registered secrets. A `Mutex`, not a thread-local: records may come from
/// `smol::unblock` threads too.
static SECRETS: Registry = Registry(Mutex::new(Vec::new()));

/// Secret values, newest last, at most [`MAX_SECRETS`].
#[derive(Debug)]
struct Registry(Mutex<Vec<String>>);

impl Registry {
    /// Adds `value` unless it is shorter than [`MIN_SECRET_BYTES`] or already known.
    fn add(&self, value: &str) {
        if value.len() < MIN_SECRET_BYTES {
            return;
        }
        let mut secrets = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if secrets.iter().any(|s| s == value) {
            return;
        }
        if secrets.len() >= MAX_SECRETS {
            secrets.remove(0);
        }
        secrets.push(value.to_owned());
    }

    /// `message` with every secret replaced by [`REDACTED`]; `None` when it holds none (the
    /// common case, which then costs no copy).
    fn scrub(&self, message: &str) -> Option<String> {
        let secrets = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Option<String> = None;
        for secret in secrets.iter() {
            let text = out.as_deref().unwrap_or(message);
            if text.contains(secret.as_str()) {
                out = Some(text.replace(secret.as_str(), REDACTED));
            }
        }
        out
    }
}

/// Registers `secret` so that its value is replaced with [`REDACTED`] in every log message
/// from now on. Call it wherever a token is read (start, reload, the re-read during the
/// auth hold). Values shorter than [`MIN_SECRET_BYTES`] are not registered; at most
/// [`MAX_SECRETS`] are kept (the oldest forgotten first); registering one twice is harmless.
pub fn redact(secret: &Secret) {
    SECRETS.add(secret.expose());
}

/// Whether `target` belongs to `krate` (the crate itself or one of its modules).
fn in_crate(target: &str, krate: &str) -> bool {
    target
        .strip_prefix(krate)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
}

/// Whether a record of `level` from `target` is dropped by [`CLAMPED`].
pub fn clamped(target: &str, level: Level) -> bool {
    CLAMPED
        .iter()
        .any(|(krate, max)| level > *max && in_crate(target, krate))
}

/// The logger installed by [`init`]: `inner` (env_logger's) behind the [`CLAMPED`] filter
/// and the secret scrubber.
#[derive(Debug)]
pub struct Guard<L> {
    /// env_logger's logger (filters by `RUST_LOG` or `[log] level`, formats, writes).
    inner: L,
}

impl<L: Log> Guard<L> {
    /// Wraps `inner`.
    pub fn new(inner: L) -> Guard<L> {
        Guard { inner }
    }
}

impl<L: Log> Log for Guard<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        !clamped(metadata.target(), metadata.level()) && self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // Formatted once here to look for secrets; a message without any goes on as it came.
        let mut message = String::new();
        if write!(message, "{}", record.args()).is_err() {
            return;
        }
        match SECRETS.scrub(&message) {
            None => self.inner.log(record),
            Some(clean) => self.inner.log(
                &Record::builder()
                    .metadata(record.metadata().clone())
                    .args(format_args!("{clean}"))
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Starts logging at `level` (from `[log] level`) unless `RUST_LOG` is set, which wins.
/// Our crate logs at `level`; dependencies at most at `info`, so `debug` stays readable.
/// Whatever the filter, [`CLAMPED`] and [`redact`] apply.
pub fn init(level: &str) {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let mut builder = env_logger::Builder::new();
    let from_env = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
    match &from_env {
        Some(spec) => {
            builder.parse_filters(spec);
        }
        None => {
            builder
                .filter_level(LevelFilter::Info)
                .filter_module("hass_edge", LevelFilter::Trace);
        }
    }
    builder.format(move |f, record| {
        if journal {
            let priority = match record.level() {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                Level::Debug | Level::Trace => 7,
            };
            writeln!(f, "<{priority}>{}", record.args())
        } else {
            let ts = f.timestamp_millis();
            writeln!(f, "{ts} {:<5} {}", record.level(), record.args())
        }
    });
    let logger = builder.build();
    let max = logger.filter();
    // A second init (tests) is harmless.
    if log::set_boxed_logger(Box::new(Guard::new(logger))).is_ok() {
        log::set_max_level(max);
        if from_env.is_none() {
            set_level(level);
        }
    }
}

/// Changes the level at run time (config reload); ignored when `RUST_LOG` rules.
pub fn set_level(level: &str) {
    if std::env::var_os("RUST_LOG").is_some_and(|v| !v.is_empty()) {
        return;
    }
    let filter = level.parse().unwrap_or(LevelFilter::Info);
    log::set_max_level(filter);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what reaches it, formatted, and enables everything.
    #[derive(Debug, Default)]
    struct Capture(Mutex<Vec<String>>);

    impl Log for Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &Record<'_>) {
            self.0.lock().unwrap().push(format!(
                "{} {} {}",
                record.level(),
                record.target(),
                record.args()
            ));
        }
        fn flush(&self) {}
    }

    fn emit(guard: &Guard<Capture>, target: &str, level: Level, message: &str) {
        guard.log(
            &Record::builder()
                .target(target)
                .level(level)
                .args(format_args!("{message}"))
                .build(),
        );
    }

    #[test]
    fn frame_and_header_crates_are_clamped_whatever_the_inner_filter_allows() {
        let guard = Guard::new(Capture::default());
        for (target, level) in [
            ("tungstenite::protocol", Level::Trace),
            ("tungstenite", Level::Debug),
            ("async_tungstenite", Level::Trace),
            ("ureq::unversioned::transport", Level::Debug),
            ("ureq_proto::client", Level::Trace),
            ("rustls::client::tls13", Level::Trace),
        ] {
            emit(&guard, target, level, "frame");
            assert!(!guard.enabled(&Metadata::builder().target(target).level(level).build()));
        }
        for (target, level) in [
            ("tungstenite::protocol", Level::Info),
            ("rustls::client::hs", Level::Debug),
            ("hass_edge::ha::connection", Level::Trace),
            // Only the crate and its modules: another crate with the same prefix is not it.
            ("ureqx", Level::Trace),
        ] {
            emit(&guard, target, level, "kept");
        }
        let seen = guard.inner.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                "INFO tungstenite::protocol kept",
                "DEBUG rustls::client::hs kept",
                "TRACE hass_edge::ha::connection kept",
                "TRACE ureqx kept",
            ]
        );
    }

    #[test]
    fn registered_secrets_are_replaced_in_every_message() {
        let guard = Guard::new(Capture::default());
        let token = Secret::new("unit-test-secret.eyJhbGciOiJIUzI1NiJ9");
        emit(
            &guard,
            "hass_edge",
            Level::Info,
            "before: unit-test-secret.eyJhbGciOiJIUzI1NiJ9",
        );
        redact(&token);
        redact(&token);
        redact(&Secret::new("short"));
        emit(
            &guard,
            "hass_edge::ha",
            Level::Debug,
            r#"sending {"type":"auth","access_token":"unit-test-secret.eyJhbGciOiJIUzI1NiJ9"} twice: unit-test-secret.eyJhbGciOiJIUzI1NiJ9"#,
        );
        emit(&guard, "hass_edge", Level::Info, "a short word stays");
        let seen = guard.inner.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                "INFO hass_edge before: unit-test-secret.eyJhbGciOiJIUzI1NiJ9",
                r#"DEBUG hass_edge::ha sending {"type":"auth","access_token":"[redacted]"} twice: [redacted]"#,
                "INFO hass_edge a short word stays",
            ]
        );
        let secrets = SECRETS.0.lock().unwrap();
        assert_eq!(
            secrets
                .iter()
                .filter(|s| s.as_str() == token.expose())
                .count(),
            1
        );
        assert!(!secrets.iter().any(|s| s == "short"));
    }

    #[test]
    fn the_registry_is_bounded() {
        let registry = Registry(Mutex::new(Vec::new()));
        for i in 0..MAX_SECRETS + 5 {
            registry.add(&format!("bounded-secret-{i:04}"));
        }
        let secrets = registry.0.lock().unwrap();
        assert!(secrets.len() <= MAX_SECRETS);
        assert!(
            secrets.iter().any(|s| s == "bounded-secret-0020"),
            "newest kept"
        );
        assert!(
            !secrets.iter().any(|s| s == "bounded-secret-0000"),
            "oldest gone"
        );
    }
}
