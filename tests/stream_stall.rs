//! An `/api/stream` client that stops reading must cost the daemon little and briefly
//! (issue 13: no queue may be filled by a stranger; RELIABILITY.md `starve`, case f). Two
//! rules, against the real binary and the fake HA:
//!
//! - the broadcast drops such a client once more than `MAX_QUEUED_BYTES` of changes wait
//!   for it, not only once its oldest change is `MAX_BEHIND` (5 s) old: under a flood of
//!   changes, 5 s of them held for 63 such clients took the daemon to 49 MiB;
//! - once dropped, its connection is reset at once, although the daemon's write to it is
//!   blocked (the client reads nothing): it used to wait for the write timeout (10 s),
//!   holding the piece and the batch it was writing, while a new client took its place.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::daemon::slowdown;
use support::{Daemon, FakeHa, deadline, wait_until};

fn metric(daemon: &Daemon, name: &str) -> f64 {
    let text = daemon.get("/metrics").text();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_stream_client_that_stops_reading_is_dropped_by_bytes_and_reset_at_once() {
    let fake = FakeHa::start("2025.4.4");
    let daemon = Daemon::start(&fake);
    daemon.wait_live();
    // Asks for everything and never reads a byte.
    let mut stalled = TcpStream::connect(daemon.addr).unwrap();
    stalled
        .write_all(b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    wait_until(
        "the stream client is registered",
        deadline(),
        || match metric(&daemon, "hass_edge_sse_clients") {
            1.0 => Ok(()),
            n => Err(format!("{n} clients")),
        },
    );
    // 250 changes with 20 KB of attributes: ~5 MB, far more than the socket buffers
    // (64 KiB sent, the client's unread window) and the 1 MiB budget, sent within a second
    // or so, long before the oldest of them is MAX_BEHIND old.
    let big = "x".repeat(20_000);
    let start = Instant::now();
    for i in 0..250 {
        let new = fake.next_state("sensor.living_temperature", |s| {
            s["state"] = i.to_string().into();
            s["attributes"]["padding"] = big.clone().into();
        });
        fake.push_change(new);
    }
    let pushed = start.elapsed();
    wait_until(
        "the stalled client to be dropped",
        deadline(),
        || match metric(&daemon, "hass_edge_sse_clients_dropped_total") {
            1.0 => Ok(()),
            n => Err(format!("{n} dropped")),
        },
    );
    let dropped = start.elapsed();
    assert!(
        dropped < hass_edge::broadcast::MAX_BEHIND,
        "dropped {dropped:?} after the first change (pushed in {pushed:?}): by the byte \
         budget, not by age"
    );
    // The daemon's write to it was blocked; the connection is reset now, not after the
    // write timeout (a FIN would wait behind the unread data, so it could not be seen).
    let reset = wait_until(
        "the dropped client's connection to be reset",
        Duration::from_secs(3) * slowdown(),
        || match stalled.take_error() {
            Ok(Some(e)) => Ok(e),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(reset.kind(), std::io::ErrorKind::ConnectionReset, "{reset}");
    assert!(
        start.elapsed() < hass_edge::http::WRITE_TIMEOUT,
        "reset {:?} after the first change",
        start.elapsed()
    );
    assert_eq!(
        daemon.health().unwrap().0,
        200,
        "everyone else is unaffected"
    );
    assert_eq!(metric(&daemon, "hass_edge_sse_clients"), 0.0);
}
