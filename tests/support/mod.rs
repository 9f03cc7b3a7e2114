//! Shared helpers for the integration tests that run the real `hass-edge` binary against a
//! fake Home Assistant replaying frames recorded from real HA (`tests/fixtures/`):
//!
//! - [`fake_ha`]: the fake HA (WebSocket + REST on one port) and its fault controls;
//! - [`daemon`]: starts the binary with a config and token file, kills it on drop;
//! - [`http_client`]: a tiny HTTP/1.1 client (keep-alive, pipelining, raw bytes);
//! - [`fixtures`]: the recordings, and HA's compressed state format.
//!
//! Include with `mod support;`. Each test binary uses a different part, hence the
//! `dead_code` allowance.
#![allow(dead_code)]

pub mod daemon;
pub mod fake_ha;
pub mod fixtures;
pub mod http_client;

use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use daemon::{Daemon, DaemonOptions};
#[allow(unused_imports)] // not every test crate talks to the fake HA
pub use fake_ha::FakeHa;

/// The usual deadline for something the daemon should do "soon": generous, because the
/// machine may be loaded (2 cores, tests in parallel), and longer under an emulator.
pub fn deadline() -> Duration {
    Duration::from_secs(20) * daemon::slowdown()
}

/// Polls `probe` every 50 ms until it returns `Ok`, and returns that value; fails after
/// `timeout` naming `what` and the last observation (`Err` text).
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) if start.elapsed() >= timeout => {
                panic!("timed out after {timeout:?} waiting for {what}; last observation: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
