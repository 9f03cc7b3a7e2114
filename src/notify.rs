//! sd_notify(3) messages to systemd: `READY=1`, `STATUS=…`, `RELOADING=1`, `STOPPING=1`,
//! `WATCHDOG=1`. Every call is a no-op outside systemd (no `NOTIFY_SOCKET`). Failures are
//! logged at debug level: a daemon must not stop because its supervisor went away.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        log::debug!("sd_notify failed: {e}");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STATUS=<line>`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `RELOADING=1` + `MONOTONIC_USEC` (systemd ≥ 253 wants the timestamp, see sd_notify(3)).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// `WATCHDOG=1`.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// The ping period when systemd's watchdog is on for this process: half `WATCHDOG_USEC`
/// (sd_watchdog_enabled(3) recommends pinging at half the timeout).
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .map(|d| d / 2)
        .filter(|d| !d.is_zero())
}
