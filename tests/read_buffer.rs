//! tungstenite keeps the capacity of the largest frame it read for the life of the
//! connection (tungstenite-rs#480): after HA's 9 MB snapshot at 20,000 entities the daemon
//! held 9 MB for nothing. `ha::read_buffer` rebuilds the WebSocket around the same stream
//! once the buffer is provably empty. This test counts the heap with a counting allocator:
//! after a large frame the memory is held without the release and given back with it, and
//! the rebuilt WebSocket still reads the next frame (nothing was lost).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicIsize, Ordering};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Message;
use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use hass_edge::ha::read_buffer::{Counted, Release};
use smol::stream::StreamExt;

/// Bytes allocated and not freed, all threads.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const LARGE: usize = 8 * 1024 * 1024;
const MIB: isize = 1024 * 1024;

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(32 * 1024 * 1024))
        .max_frame_size(Some(32 * 1024 * 1024))
}

/// An unmasked text frame as a server sends it (RFC 6455 §5.2).
fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 65535 => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// Reads a large frame then a small one; returns the heap held after the large frame
/// (message dropped) minus before it, and checks the small frame arrives whole.
fn held_after_large_frame(release: bool) -> isize {
    let (client, mut server) = UnixStream::pair().unwrap();
    smol::block_on(async {
        let client = smol::Async::new(client).unwrap();
        let mut ws = WebSocketStream::from_raw_socket(
            Counted::after_handshake(client),
            Role::Client,
            Some(config()),
        )
        .await;
        // As HA sends a snapshot: the large frame and the next one back to back, so the
        // read that ends the large frame also takes the start of the next.
        let writer = std::thread::spawn(move || {
            let mut bytes = text_frame(&vec![b'x'; LARGE]);
            bytes.extend_from_slice(&text_frame(&[b'y'; 200]));
            server.write_all(&bytes).unwrap();
            server
        });
        let before = LIVE.load(Ordering::Relaxed);
        let mut releaser = Release::default();
        for len in [LARGE, 200] {
            let message = ws.next().await.unwrap().unwrap();
            assert_eq!(message.len(), len);
            releaser.saw(&message);
            drop(message);
            if release {
                ws = releaser.maybe(ws, config()).await;
            }
        }
        let mut server = writer.join().unwrap();
        let held = LIVE.load(Ordering::Relaxed) - before;
        server.write_all(&text_frame(b"{\"after\":1}")).unwrap();
        let next = ws.next().await.unwrap().unwrap();
        assert_eq!(
            next,
            Message::text("{\"after\":1}"),
            "the next frame is whole"
        );
        held
    })
}

#[test]
fn a_large_frames_buffer_is_given_back() {
    let kept = held_after_large_frame(false);
    let released = held_after_large_frame(true);
    eprintln!(
        "heap held after an 8 MiB frame: {} KiB without the release, {} KiB with it",
        kept / 1024,
        released / 1024
    );
    assert!(
        kept >= 7 * MIB,
        "without the release tungstenite keeps the frame's buffer ({kept} bytes): the workaround would be moot"
    );
    assert!(
        released < MIB,
        "with the release the buffer is given back ({released} bytes still held)"
    );
}
