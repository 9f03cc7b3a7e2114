//! Logging: `log` + `env_logger` on stderr. Under systemd (`JOURNAL_STREAM` set, see
//! systemd.exec(5)) each line starts with the sd-daemon(3) priority (`<3>` error, `<4>`
//! warning, `<6>` info, `<7>` debug) so `journalctl -p` filters by it, and without a
//! timestamp (journald adds its own).

use std::io::Write;

use log::{Level, LevelFilter};

/// Starts logging at `level` (from `[log] level`) unless `RUST_LOG` is set, which wins.
/// Our crate logs at `level`; dependencies at most at `info`, so `debug` stays readable.
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
    // These crates log frame payloads and request headers at debug/trace: the `auth` frame
    // and the `Authorization` header carry the HA token, which must never reach a log.
    for noisy in ["tungstenite", "async_tungstenite", "ureq", "ureq_proto"] {
        builder.filter_module(noisy, LevelFilter::Info);
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
    // A second init (tests) is harmless.
    if builder.try_init().is_ok() && from_env.is_none() {
        set_level(level);
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
