//! A Home Assistant that sends frames as fast as it can must not freeze the daemon (issue 13,
//! item 1): on one executor thread, a socket that is always readable used to keep the link
//! task running, so `/health` went unanswered, the 10 s auth timeout fired after 31 s and
//! SIGTERM waited 25 s; a peer that also stopped reading grew the daemon by 5 MB/s of
//! queued pongs. A raw peer (no real HA can do this on demand) floods after the WebSocket
//! upgrade; the real daemon binary must stay responsive and bounded.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::handshake::derive_accept_key;
use support::daemon::DaemonOptions;
use support::http_client::Conn;
use support::{Daemon, wait_until};

/// What the raw peer does after the upgrade.
#[derive(Clone, Copy, PartialEq)]
enum Flood {
    /// Event frames, never `auth_required`.
    BeforeAuth,
    /// `auth_required`, then (after the `auth`) `auth_ok`, then event frames for a
    /// subscription nobody made; what the daemon sends is read and dropped.
    AfterAuth,
    /// Pings, and never a byte read: every pong the daemon queues stays with it.
    PingsNoRead,
}

struct Peer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// When the daemon's side of the last connection ended (EOF or error on the peer).
    ended: Arc<std::sync::Mutex<Option<Instant>>>,
    /// When the last connection was accepted.
    accepted: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![0x80 | opcode, payload.len() as u8];
    f.extend_from_slice(payload);
    f
}

/// Reads an HTTP request head and answers the WebSocket upgrade (RFC 6455 §4.2.2).
fn upgrade(s: &mut TcpStream) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let key = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-key"))
        })
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    write!(
        s,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    )
}

fn start_peer(mode: Flood) -> Peer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ended = Arc::new(std::sync::Mutex::new(None));
    let accepted = Arc::new(std::sync::Mutex::new(None));
    let (stop2, ended2, accepted2) = (stop.clone(), ended.clone(), accepted.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stop2.load(Ordering::Relaxed) {
                return;
            }
            let Ok(mut s) = conn else { continue };
            if upgrade(&mut s).is_err() {
                continue;
            }
            *accepted2.lock().unwrap() = Some(Instant::now());
            let (stop3, ended3) = (stop2.clone(), ended2.clone());
            std::thread::spawn(move || {
                let _ = serve(&mut s, mode, &stop3);
                *ended3.lock().unwrap() = Some(Instant::now());
            });
        }
    });
    Peer {
        addr,
        stop,
        ended,
        accepted,
    }
}

/// Floods until the daemon goes away or the test ends.
fn serve(s: &mut TcpStream, mode: Flood, stop: &AtomicBool) -> std::io::Result<()> {
    let event = frame(1, br#"{"type":"event","id":987654,"event":{"a":{}}}"#);
    let mut burst = Vec::new();
    let unit = if mode == Flood::PingsNoRead {
        frame(9, b"p")
    } else {
        event
    };
    while burst.len() < 64 * 1024 {
        burst.extend_from_slice(&unit);
    }
    if mode == Flood::AfterAuth {
        s.write_all(&frame(
            1,
            br#"{"type":"auth_required","ha_version":"2025.4.4"}"#,
        ))?;
        // The daemon's auth frame (masked, small): wait for it, then say yes.
        let mut buf = [0u8; 4096];
        if s.read(&mut buf)? == 0 {
            return Ok(());
        }
        s.write_all(&frame(1, br#"{"type":"auth_ok","ha_version":"2025.4.4"}"#))?;
        let mut reader = s.try_clone()?;
        std::thread::spawn(move || {
            let mut sink = [0u8; 4096];
            while matches!(reader.read(&mut sink), Ok(1..)) {}
        });
    } else {
        // Notice the daemon closing even while our writes block.
        let mut probe = s.try_clone()?;
        if mode == Flood::BeforeAuth {
            std::thread::spawn(move || {
                let mut sink = [0u8; 4096];
                while matches!(probe.read(&mut sink), Ok(1..)) {}
                let _ = probe.shutdown(std::net::Shutdown::Both);
            });
        }
    }
    while !stop.load(Ordering::Relaxed) {
        s.write_all(&burst)?;
    }
    Ok(())
}

fn options() -> DaemonOptions {
    DaemonOptions::default()
        .set("log", "level", "\"info\"")
        .set("reconnect", "max_delay_seconds", 60)
}

/// Every `/health` within `for_how_long` answers within 2 s (503 while not live).
fn health_keeps_answering(daemon: &Daemon, for_how_long: Duration) -> Duration {
    let start = Instant::now();
    let mut worst = Duration::ZERO;
    while start.elapsed() < for_how_long {
        let t = Instant::now();
        let mut c = Conn::connect(daemon.addr).expect("connect");
        c.stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let r = c
            .request("GET", "/health", &[])
            .unwrap_or_else(|e| panic!("/health did not answer within 2 s: {e}"));
        assert!(matches!(r.status, 200 | 503), "{}", r.status);
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    worst
}

#[test]
fn a_peer_flooding_before_auth_required_cannot_freeze_the_daemon() {
    let peer = start_peer(Flood::BeforeAuth);
    let mut daemon = Daemon::start_at(&format!("http://{}", peer.addr), options());
    wait_until("the peer to be connected", support::deadline(), || {
        peer.accepted.lock().unwrap().ok_or("not yet".to_owned())
    });
    let worst = health_keeps_answering(&daemon, Duration::from_secs(3));
    eprintln!("slowest /health during the flood: {worst:?}");
    // The 10 s auth timeout fires although frames never stop coming.
    let accepted = peer.accepted.lock().unwrap().unwrap();
    wait_until(
        "the auth timeout to drop the peer",
        Duration::from_secs(20),
        || {
            peer.ended
                .lock()
                .unwrap()
                .ok_or("still connected".to_owned())
        },
    );
    let after = peer.ended.lock().unwrap().unwrap() - accepted;
    eprintln!("auth timeout fired after {after:?}");
    assert!(
        after < Duration::from_secs(13),
        "the 10 s auth timeout fired after {after:?}"
    );
    // The socket is dropped before the reason is logged: the line may trail the close.
    wait_until("the timeout to be logged", Duration::from_secs(5), || {
        if daemon.log().contains("authentication timed out") {
            Ok(())
        } else {
            Err(daemon.log())
        }
    });
    // SIGTERM is acted on at once, during a flood of the next connection too.
    wait_until("a new connection", Duration::from_secs(20), || {
        let a = peer.accepted.lock().unwrap().unwrap();
        if a > accepted {
            Ok(())
        } else {
            Err("not reconnected".into())
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(5));
    eprintln!("SIGTERM to exit: {:?}", t.elapsed());
    assert!(
        status.is_some_and(|s| s.success()),
        "no clean exit within 5 s of SIGTERM: {status:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn a_peer_flooding_after_auth_cannot_freeze_the_daemon() {
    let peer = start_peer(Flood::AfterAuth);
    let mut daemon = Daemon::start_at(&format!("http://{}", peer.addr), options());
    wait_until("the peer to be connected", support::deadline(), || {
        peer.accepted.lock().unwrap().ok_or("not yet".to_owned())
    });
    let worst = health_keeps_answering(&daemon, Duration::from_secs(4));
    eprintln!("slowest /health during the flood: {worst:?}");
    let status = daemon.get("/status").json();
    assert_eq!(status["home_assistant"]["version"], "2025.4.4");
    let t = Instant::now();
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(5));
    assert!(
        status.is_some_and(|s| s.success()),
        "no clean exit within 5 s of SIGTERM: {status:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn a_peer_that_pings_and_never_reads_cannot_grow_the_daemon() {
    let peer = start_peer(Flood::PingsNoRead);
    let daemon = Daemon::start_at(&format!("http://{}", peer.addr), options());
    wait_until("the peer to be connected", support::deadline(), || {
        peer.accepted.lock().unwrap().ok_or("not yet".to_owned())
    });
    let start = daemon.rss_kib();
    let mut peak = start;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(8) {
        peak = peak.max(daemon.rss_kib());
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("RSS {start} KiB at the start of the flood, peak {peak} KiB over 8 s");
    assert!(
        peak < start + 16 * 1024,
        "RSS grew from {start} KiB to {peak} KiB while the peer did not read"
    );
    let (status, _) = daemon.health().expect("/health answers");
    assert_eq!(status, 503);
}
