//! Warm start (issue #7): the tracked states saved to a file, so dashboards are not blank
//! after a restart or reboot while Home Assistant is unreachable.
//!
//! This module owns the state file: its format ([`encode`], [`decode`]), the crash-safe
//! write ([`save`]), the careful read ([`load`]) and the write policy that spares the SD card
//! ([`SavePolicy`]). `encode`, `decode` and `SavePolicy` are pure; `save` and `load` do
//! blocking file I/O and are meant to run at start, every `interval` and at a clean stop.
//!
//! # Format (version 1)
//!
//! Two lines of UTF-8 JSON, each ending in `\n`:
//!
//! ```text
//! {"format":"hass-edge-states","version":1,"saved_at_us":1763812345123456,"count":2,"length":812,"crc32":3735928559}
//! [{"entity_id":"light.kitchen","state":"on",…},{…}]
//! ```
//!
//! - line 1, the header (at most [`MAX_HEADER_BYTES`]): `format` is always
//!   `"hass-edge-states"`; `version` is [`FORMAT_VERSION`]; `saved_at_us` is the wall-clock
//!   time of the save in whole microseconds since the Unix epoch (UTC, may be negative);
//!   `count` is the number of states in the body; `length` is the body's size in bytes,
//!   without its final `\n`; `crc32` is the CRC-32 (IEEE 802.3, the zlib/PNG one) of
//!   `saved_at_us` (i64), `count` (u64) and `length` (u64) as little-endian bytes followed by
//!   the body, so a damaged header is caught as well as a damaged body.
//! - line 2, the body: a JSON array of states exactly as HA's `GET /api/states` returns them
//!   (see [`EntityState`]), sorted as the caller passed them. `tail -n +2 states.json | jq`
//!   reads it.
//!
//! [`decode`] is strict: any file that is not exactly this (torn, foreign, damaged, newer) is
//! rejected as a whole, never half-used.
//!
//! # Size on disk
//!
//! Measured with the 61 recorded states in
//! `tests/fixtures/{2024.3.3,2025.4.4}/get_states_result.json` (test `fixture_states_size`):
//! **about 370 bytes per state** on average (340 for HA 2024.3; 395 for HA 2025.4, which adds
//! `last_reported`; 274 to 641 bytes each), plus a header of about 120 bytes. These are
//! simple entities (helpers, `sun.sun`, a few sensors); weather, media players or sensors
//! with long attribute lists take 1 to 2 KB. One save of N entities writes about `370 × N`
//! bytes; at the default 900 s interval that is at most 96 saves a day, about `36 KB × N` a
//! day (36 MB/day for 1,000 entities) while states keep changing, and nothing while none
//! change. The file system adds its journal and block rounding on top.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::entity::EntityState;
use crate::files::{self, FileKind, ReadError};

/// The `format` value of every state file.
pub const FORMAT_NAME: &str = "hass-edge-states";

/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u64 = 1;

/// Longest header line accepted, in bytes without its `\n` (a real one is about 120).
pub const MAX_HEADER_BYTES: usize = 256;

/// Largest state file [`save`] writes and [`load`] reads: 32 MiB, about 90,000 states of
/// 370 bytes, 4.5× the largest home measured (20,000 entities, 7.4 MB).
///
/// Derived from the memory the unit allows (`MemoryMax=128M`, packaging/systemd): a load
/// holds the file's bytes and the parsed states at once, and the states take about twice
/// their size on disk (README "Measured": 13.7 MiB of RSS beyond the binary for 20,000
/// states, 7.4 MB on disk), so a file of this size peaks near 3 × 32 = 96 MiB, which still
/// fits. [`load`] refuses a larger file from its size before reading any of it (issue 13:
/// a 2 GiB file used to be read up to 256 MiB first); [`save`] refuses to write one, as
/// it could not be read back.
pub const MAX_FILE_BYTES: u64 = 32 << 20;

/// What a state file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    /// When the states were saved (wall clock, truncated to whole microseconds).
    pub saved_at: SystemTime,
    /// The states, in the order they were saved.
    pub states: Vec<EntityState>,
}

/// Why the bytes of a state file were rejected by [`decode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The file ends early: a torn write or a truncated copy.
    #[error("truncated: {0}")]
    Truncated(String),
    /// Not a hass-edge state file (no header line, not JSON, another `format`).
    #[error("not a hass-edge state file: {0}")]
    Foreign(String),
    /// A later hass-edge wrote it, in a format this one does not know.
    #[error(
        "written by a newer hass-edge (format version {0}); this one reads version {FORMAT_VERSION}"
    )]
    NewerVersion(u64),
    /// The checksum does not match: the header or the body was damaged.
    #[error("checksum mismatch: header says crc32 {expected:#010x}, content has {actual:#010x}")]
    Checksum {
        /// CRC-32 in the header.
        expected: u32,
        /// CRC-32 of the content.
        actual: u32,
    },
    /// The header's `count` differs from the number of states in the body.
    #[error("header says {expected} states, body holds {actual}")]
    Count {
        /// `count` in the header.
        expected: u64,
        /// States in the body.
        actual: u64,
    },
    /// A header or body of the wrong shape, or bytes after the body.
    #[error("malformed: {0}")]
    Malformed(String),
    /// Larger than [`MAX_FILE_BYTES`].
    #[error("{bytes} bytes, more than the {limit}-byte limit")]
    TooLarge {
        /// Size of the file, in bytes.
        bytes: u64,
        /// [`MAX_FILE_BYTES`].
        limit: u64,
    },
}

/// An error saving or loading the state file. The messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A file-system call failed (permissions, missing or read-only directory, full disk).
    /// [`load`] leaves the file where it is; [`save`] leaves the old file in place.
    #[error("failed to {action} {path}: {source}")]
    Io {
        /// What was being done, e.g. `"read state file"`.
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file could not be used and was moved aside to `moved_to` (`None` when that move
    /// failed too). The caller starts with an empty store.
    #[error("state file {path} is unusable ({error}); {}", moved_note(.moved_to))]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// Where it is now: `<path>.corrupt`.
        moved_to: Option<PathBuf>,
        /// Why it was rejected.
        error: FormatError,
    },
    /// The path is not a regular file (a FIFO, socket, device or directory, possibly behind
    /// a symbolic link). [`load`] neither reads nor moves it (renaming a device node or a
    /// FIFO someone else uses would be worse than ignoring it); the caller starts with an
    /// empty store, and the next [`save`] renames a fresh file over the name (a directory
    /// there makes that save fail and be logged).
    #[error("state file {path} is {kind}, not a regular file; not reading it (left in place)")]
    NotRegular {
        /// The state file.
        path: PathBuf,
        /// What it is, as fstat(2) says.
        kind: FileKind,
    },
    /// The encoded states exceed [`MAX_FILE_BYTES`]; nothing was written.
    #[error("not saving {path}: {bytes} bytes exceed the {limit}-byte limit")]
    TooLarge {
        /// The state file.
        path: PathBuf,
        /// Size of the encoded states, in bytes.
        bytes: u64,
        /// [`MAX_FILE_BYTES`].
        limit: u64,
    },
}

/// Serialises `states` and `saved_at` to the on-disk format (see the module docs): a header
/// line, then the states as one JSON array of HA REST objects.
///
/// `saved_at` is stored in whole microseconds (truncated). Never fails: a state that could not
/// be serialised (it cannot happen with `EntityState`'s string-keyed maps) is logged and left
/// out, and `count` only covers what was written.
pub fn encode(states: &[Rc<EntityState>], saved_at: SystemTime) -> Vec<u8> {
    let mut body = Vec::with_capacity(states.len() * 320 + 2);
    body.push(b'[');
    let mut count: u64 = 0;
    for state in states {
        let mark = body.len();
        if count > 0 {
            body.push(b',');
        }
        if let Err(e) = serde_json::to_writer(&mut body, &**state) {
            log::error!("not saving the state of {}: {e}", state.entity_id);
            body.truncate(mark);
            continue;
        }
        count += 1;
    }
    body.push(b']');

    let saved_at_us = micros_since_epoch(saved_at);
    let length = body.len() as u64;
    let crc = checksum(saved_at_us, count, length, &body);
    // Written by hand: the fields are a constant and numbers, so there is nothing to escape
    // and nothing that can fail. `decode` reads it back with serde.
    let header = format!(
        "{{\"format\":\"{FORMAT_NAME}\",\"version\":{FORMAT_VERSION},\"saved_at_us\":{saved_at_us},\
         \"count\":{count},\"length\":{length},\"crc32\":{crc}}}\n"
    );
    let mut out = Vec::with_capacity(header.len() + body.len() + 1);
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&body);
    out.push(b'\n');
    out
}

/// The version-1 header, read strictly once `format` and `version` are known to match.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    // Checked before; listed so that `deny_unknown_fields` accepts them.
    #[allow(dead_code)]
    format: String,
    #[allow(dead_code)]
    version: u64,
    saved_at_us: i64,
    count: u64,
    length: u64,
    crc32: u32,
}

/// Parses and verifies the bytes of a state file: header shape, `format`, `version`, body
/// length, checksum, body shape (an array of HA states) and `count`, in that order.
///
/// Errors: a [`FormatError`] naming the first check that failed. Never returns part of the
/// states: the file is used whole or not at all.
pub fn decode(bytes: &[u8]) -> Result<Saved, FormatError> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(FormatError::TooLarge {
            bytes: bytes.len() as u64,
            limit: MAX_FILE_BYTES,
        });
    }
    if bytes.is_empty() {
        return Err(FormatError::Truncated("the file is empty".into()));
    }
    let window = &bytes[..bytes.len().min(MAX_HEADER_BYTES + 1)];
    let Some(newline) = window.iter().position(|&b| b == b'\n') else {
        // A torn first write can stop inside the header; anything else is someone else's file.
        let magic = format!("{{\"format\":\"{FORMAT_NAME}\"");
        let magic = magic.as_bytes();
        let torn_header = bytes.len() <= MAX_HEADER_BYTES
            && (bytes.starts_with(magic) || magic.starts_with(bytes));
        return Err(if torn_header {
            FormatError::Truncated("the header line is incomplete".into())
        } else {
            FormatError::Foreign(format!(
                "no header line in the first {MAX_HEADER_BYTES} bytes"
            ))
        });
    };
    let (line, rest) = (&bytes[..newline], &bytes[newline + 1..]);

    // `format` and `version` first, leniently, so that a newer header of another shape is
    // reported as newer rather than as malformed.
    let fields: Map<String, Value> = serde_json::from_slice(line)
        .map_err(|e| FormatError::Foreign(format!("the first line is not a JSON object ({e})")))?;
    match fields.get("format") {
        Some(Value::String(f)) if f == FORMAT_NAME => {}
        Some(other) => {
            return Err(FormatError::Foreign(format!(
                "format is {other}, not \"{FORMAT_NAME}\""
            )));
        }
        None => return Err(FormatError::Foreign("the header has no \"format\"".into())),
    }
    match fields.get("version").and_then(Value::as_u64) {
        Some(FORMAT_VERSION) => {}
        Some(v) if v > FORMAT_VERSION => return Err(FormatError::NewerVersion(v)),
        _ => {
            let v = fields
                .get("version")
                .map_or_else(|| "missing".to_owned(), Value::to_string);
            return Err(FormatError::Malformed(format!(
                "version is {v}, not a known version"
            )));
        }
    }
    let header: Header = serde_json::from_value(Value::Object(fields))
        .map_err(|e| FormatError::Malformed(format!("header: {e}")))?;

    // The body and its final newline, nothing more.
    let have = rest.len() as u64;
    if have < header.length.saturating_add(1) {
        return Err(FormatError::Truncated(format!(
            "the body has {have} of {} bytes",
            header.length.saturating_add(1)
        )));
    }
    if have > header.length + 1 {
        return Err(FormatError::Malformed(format!(
            "{} unexpected bytes after the body",
            have - header.length - 1
        )));
    }
    // `length < have <= MAX_FILE_BYTES`, so it fits a usize.
    let (body, end) = rest.split_at(header.length as usize);
    if end != b"\n" {
        return Err(FormatError::Malformed(
            "the body does not end with a newline".into(),
        ));
    }
    let actual = checksum(header.saved_at_us, header.count, header.length, body);
    if actual != header.crc32 {
        return Err(FormatError::Checksum {
            expected: header.crc32,
            actual,
        });
    }
    let states: Vec<EntityState> = serde_json::from_slice(body).map_err(|e| {
        FormatError::Malformed(format!("the body is not a JSON array of HA states ({e})"))
    })?;
    if states.len() as u64 != header.count {
        return Err(FormatError::Count {
            expected: header.count,
            actual: states.len() as u64,
        });
    }
    let saved_at = time_from_micros(header.saved_at_us).ok_or_else(|| {
        FormatError::Malformed(format!(
            "saved_at_us {} is out of range",
            header.saved_at_us
        ))
    })?;
    Ok(Saved { saved_at, states })
}

/// Writes `states` to `path` so that a crash or power loss at any moment leaves either the
/// old file or the new one, never a mix: the bytes go to `<path>.tmp` in the same directory
/// (created fresh, mode 0600, any stale one removed first), which is fsynced, renamed over
/// `path`, and then the directory is fsynced so the rename itself is durable.
///
/// Returns the number of bytes written. Blocks until the data is on disk (both fsyncs).
///
/// Errors: [`PersistError::Io`] naming the step and file (missing or read-only directory,
/// full disk; the old file is then untouched, the temp file removed when possible),
/// [`PersistError::TooLarge`] beyond [`MAX_FILE_BYTES`].
pub fn save(
    path: &Path,
    states: &[Rc<EntityState>],
    saved_at: SystemTime,
) -> Result<u64, PersistError> {
    write_file(path, &encode(states, saved_at))
}

/// The I/O half of [`save`], for a caller that encodes on its own thread (states are `Rc`)
/// and writes elsewhere: writes already-[`encode`]d `bytes` to `path` crash-safely. Same
/// steps, result and errors as [`save`].
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<u64, PersistError> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(PersistError::TooLarge {
            path: path.to_owned(),
            bytes: bytes.len() as u64,
            limit: MAX_FILE_BYTES,
        });
    }
    let tmp = temp_path(path);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };

    // A temp file left by a crash may have another owner or mode; `create_new` below then
    // makes a fresh 0600 file and refuses to follow a symlink planted at that name.
    match fs::remove_file(&tmp) {
        Ok(()) => log::debug!(
            "removed {} left over from an interrupted save",
            tmp.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove stale temp file", &tmp)(e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create temp file", &tmp))?;
    let written = file
        .write_all(bytes)
        .map_err(io_err("write temp file", &tmp))
        .and_then(|()| file.sync_all().map_err(io_err("fsync temp file", &tmp)))
        .and_then(|()| fs::rename(&tmp, path).map_err(io_err("rename temp file over", path)));
    if let Err(e) = written {
        // The old file is intact; do not leave a half-written copy taking space.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // Without this the rename may be lost at power loss (ext4 `data=ordered` usually keeps
    // it, other file systems need it): see rename(2) and fsync(2), "fsync on the directory".
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))?;
    Ok(bytes.len() as u64)
}

/// Reads the state file at `path`, without ever blocking on it or reading more than
/// [`MAX_FILE_BYTES`] (see [`files::read_regular`]: open(2) with `O_NONBLOCK`, fstat(2),
/// then a bounded read).
///
/// Returns `Ok(None)` when it does not exist (first start). A regular file that [`decode`]
/// rejects (torn, damaged, foreign, newer version, larger than [`MAX_FILE_BYTES`], the
/// latter judged from its size before reading) is logged as a warning naming the file and
/// the reason, moved aside to `<path>.corrupt` (replacing an older one) for inspection, and
/// reported as [`PersistError::Corrupt`]; the caller starts with an empty store and the
/// next [`save`] writes a fresh file.
///
/// Errors: [`PersistError::NotRegular`] when `path` is a directory, FIFO, socket or device
/// (logged as a warning, never read, never moved); [`PersistError::Io`] when the file exists
/// but cannot be read (permissions, a parent that is not a directory); the file is left
/// where it is.
pub fn load(path: &Path) -> Result<Option<Saved>, PersistError> {
    let bytes = match files::read_regular(path, MAX_FILE_BYTES) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.is_not_found() => return Ok(None),
        Err(ReadError::NotRegular { kind, .. }) => {
            let e = PersistError::NotRegular {
                path: path.to_owned(),
                kind,
            };
            log::warn!("{e}; starting with an empty cache");
            return Err(e);
        }
        // Judged like an oversized file read whole: corrupt, moved aside below.
        Err(ReadError::TooLarge { bytes, limit, .. }) => {
            Err(FormatError::TooLarge { bytes, limit })
        }
        Err(ReadError::Io { source, .. }) => {
            return Err(PersistError::Io {
                action: "read state file",
                path: path.to_owned(),
                source,
            });
        }
    };
    match bytes.and_then(|bytes| decode(&bytes)) {
        Ok(saved) => Ok(Some(saved)),
        Err(error) => {
            let aside = corrupt_path(path);
            let moved_to = match fs::rename(path, &aside) {
                Ok(()) => {
                    log::warn!(
                        "state file {} is unusable ({error}); moved it to {} and starting with an empty cache",
                        path.display(),
                        aside.display()
                    );
                    Some(aside)
                }
                Err(e) => {
                    log::error!(
                        "state file {} is unusable ({error}) and could not be moved to {}: {e}; starting with an empty cache",
                        path.display(),
                        aside.display()
                    );
                    None
                }
            };
            Err(PersistError::Corrupt {
                path: path.to_owned(),
                moved_to,
                error,
            })
        }
    }
}

/// `<path>.tmp`: where [`save`] writes before the rename. One may be left by a crash; it is
/// never read, and the next save replaces it.
pub fn temp_path(path: &Path) -> PathBuf {
    with_suffix(path, ".tmp")
}

/// `<path>.corrupt`: where [`load`] moves a file it rejected.
pub fn corrupt_path(path: &Path) -> PathBuf {
    with_suffix(path, ".corrupt")
}

/// Makes a `map_err` closure for an I/O step of [`write_file`].
fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PersistError + use<> {
    let path = path.to_owned();
    move |source| PersistError::Io {
        action,
        path,
        source,
    }
}

fn moved_note(moved_to: &Option<PathBuf>) -> String {
    match moved_to {
        Some(to) => format!("moved it to {}", to.display()),
        None => "could not move it aside".to_owned(),
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Whole microseconds since the epoch, truncated toward the past; saturates beyond ±292,000
/// years.
fn micros_since_epoch(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => {
            let d = e.duration();
            // Before the epoch: round toward the past, as for positive times.
            let us = d.as_micros() + u128::from(d.subsec_nanos() % 1000 != 0);
            i64::try_from(us).map(|us| -us).unwrap_or(i64::MIN)
        }
    }
}

fn time_from_micros(us: i64) -> Option<SystemTime> {
    let d = Duration::from_micros(us.unsigned_abs());
    if us >= 0 {
        UNIX_EPOCH.checked_add(d)
    } else {
        UNIX_EPOCH.checked_sub(d)
    }
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320) lookup table, built at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn crc32(parts: &[&[u8]]) -> u32 {
    let mut c = !0u32;
    for part in parts {
        for &b in *part {
            c = CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
        }
    }
    !c
}

/// The `crc32` header field: covers the header's numbers as well as the body.
fn checksum(saved_at_us: i64, count: u64, length: u64, body: &[u8]) -> u32 {
    crc32(&[
        &saved_at_us.to_le_bytes(),
        &count.to_le_bytes(),
        &length.to_le_bytes(),
        body,
    ])
}

/// When to save: at most once per `interval`, and only when something changed since the
/// last successful save. Pure: every call takes `now`; the caller does the writing.
///
/// The first save is due `interval` after [`SavePolicy::new`], so a crash-looping daemon
/// does not write on every start; save at a clean stop when [`SavePolicy::pending`].
/// A failed save is retried `interval` later, not in a tight loop.
#[derive(Debug, Clone)]
pub struct SavePolicy {
    /// Minimum time between two writes (config `persist_interval_seconds`, default 900 s).
    interval: Duration,
    /// Earliest moment of the next write; `None` when `interval` runs past the clock's range.
    not_before: Option<Instant>,
    /// Number of [`SavePolicy::mark_changed`] calls so far.
    changes: u64,
    /// The value of `changes` covered by the last successful save.
    saved_changes: u64,
}

/// The changes a snapshot covers, from [`SavePolicy::mark`]; for saves that finish after
/// more changes may have arrived (see [`SavePolicy::saved_through`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeMark(u64);

impl SavePolicy {
    /// A policy that allows the first save `interval` after `now`.
    pub fn new(interval: Duration, now: Instant) -> Self {
        SavePolicy {
            interval,
            not_before: now.checked_add(interval),
            changes: 0,
            saved_changes: 0,
        }
    }

    /// Records that the store changed (any state, any entity) and needs saving.
    pub fn mark_changed(&mut self) {
        self.changes += 1;
    }

    /// Whether something changed since the last successful save.
    pub fn pending(&self) -> bool {
        self.changes != self.saved_changes
    }

    /// Whether to save now: something changed and `interval` has passed since the last save
    /// (or failed save, or [`SavePolicy::new`]).
    pub fn due(&self, now: Instant) -> bool {
        self.pending() && self.not_before.is_some_and(|t| now >= t)
    }

    /// When the next save will be due if nothing else happens, for the caller's timer: `None`
    /// while nothing changed (or when `interval` runs past the clock's range). May be in the
    /// past: then it is due now.
    pub fn next_due(&self) -> Option<Instant> {
        if self.pending() {
            self.not_before
        } else {
            None
        }
    }

    /// A mark of the changes seen so far; take it with the snapshot being saved.
    pub fn mark(&self) -> ChangeMark {
        ChangeMark(self.changes)
    }

    /// Records a successful save at `now` of everything marked so far. Use it when the
    /// snapshot was taken in the same step (no change can arrive in between).
    pub fn saved(&mut self, now: Instant) {
        self.saved_through(self.mark(), now);
    }

    /// Records a successful save at `now` of the snapshot taken at `mark`; changes marked
    /// after it stay pending for the next save.
    pub fn saved_through(&mut self, mark: ChangeMark, now: Instant) {
        self.saved_changes = mark.0;
        self.not_before = now.checked_add(self.interval);
    }

    /// Records a failed save at `now`: the changes stay pending and the next attempt is due
    /// `interval` later.
    pub fn failed(&mut self, now: Instant) {
        self.not_before = now.checked_add(self.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_763_812_345;

    /// A directory under the system temp dir, removed on drop.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(name: &str) -> TestDir {
            let dir = std::env::temp_dir()
                .join(format!("hass-edge-persist-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TestDir(dir)
        }
        fn file(&self) -> PathBuf {
            self.0.join("states.json")
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The `result` arrays of the recorded `get_states` answers, as raw JSON.
    fn fixture_json() -> Vec<(&'static str, Vec<Value>)> {
        let files = [
            (
                "2024.3.3",
                include_str!("../tests/fixtures/2024.3.3/get_states_result.json"),
            ),
            (
                "2025.4.4",
                include_str!("../tests/fixtures/2025.4.4/get_states_result.json"),
            ),
        ];
        files
            .into_iter()
            .map(|(v, text)| {
                let msg: Value = serde_json::from_str(text).unwrap();
                (v, msg["result"].as_array().unwrap().clone())
            })
            .collect()
    }

    fn fixture_states() -> Vec<Rc<EntityState>> {
        fixture_json()
            .into_iter()
            .flat_map(|(_, states)| states)
            .map(|v| Rc::new(serde_json::from_value(v).unwrap()))
            .collect()
    }

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    /// A version-1 file around any `body`, with a correct checksum unless the caller breaks it.
    fn frame(format: &str, version: u64, count: u64, body: &[u8]) -> Vec<u8> {
        let len = body.len() as u64;
        let crc = checksum(0, count, len, body);
        let mut out = format!(
            "{{\"format\":\"{format}\",\"version\":{version},\"saved_at_us\":0,\"count\":{count},\"length\":{len},\"crc32\":{crc}}}\n"
        )
        .into_bytes();
        out.extend_from_slice(body);
        out.push(b'\n');
        out
    }

    /// Checks `bytes` are rejected by `decode` and, through `load`, moved to `.corrupt`
    /// (replacing an older one) with nothing returned.
    fn assert_rejected(bytes: &[u8], what: &str) -> FormatError {
        let err = decode(bytes).expect_err(what);
        let dir = TestDir::new(&format!("reject-{}", what.replace(' ', "-")));
        let path = dir.file();
        fs::write(&path, bytes).unwrap();
        fs::write(corrupt_path(&path), b"an older rejected file").unwrap();
        match load(&path) {
            Err(PersistError::Corrupt {
                error,
                moved_to: Some(to),
                ..
            }) => {
                assert_eq!(error, err, "{what}");
                assert_eq!(to, corrupt_path(&path));
            }
            other => panic!("{what}: expected Corrupt, got {other:?}"),
        }
        assert!(!path.exists(), "{what}: the rejected file is moved away");
        assert_eq!(
            fs::read(corrupt_path(&path)).unwrap(),
            bytes,
            "{what}: .corrupt holds the rejected file"
        );
        assert!(
            load(&path).unwrap().is_none(),
            "{what}: the next start is a cold start"
        );
        err
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
        assert_eq!(crc32(&[b"1234", b"56789"]), 0xCBF4_3926);
        assert_eq!(crc32(&[]), 0);
    }

    #[test]
    fn round_trip_keeps_ha_json_and_saved_at_to_the_microsecond() {
        let states = fixture_states();
        let expected_json: Vec<Value> = fixture_json().into_iter().flat_map(|(_, s)| s).collect();
        let bytes = encode(&states, at(T, 123_456_789));
        let saved = decode(&bytes).unwrap();
        assert_eq!(saved.saved_at, at(T, 123_456_000));
        let got: Vec<Value> = saved
            .states
            .iter()
            .map(|s| serde_json::to_value(s).unwrap())
            .collect();
        assert_eq!(got, expected_json, "states come back as the same HA JSON");

        // Through the file, and an empty store too.
        let dir = TestDir::new("round-trip");
        let n = save(&dir.file(), &states, at(T, 0)).unwrap();
        assert_eq!(n, fs::metadata(dir.file()).unwrap().len());
        assert_eq!(
            load(&dir.file()).unwrap().unwrap(),
            Saved {
                saved_at: at(T, 0),
                states: states.iter().map(|s| (**s).clone()).collect()
            }
        );
        save(&dir.file(), &[], at(T + 1, 0)).unwrap();
        assert_eq!(
            load(&dir.file()).unwrap().unwrap(),
            Saved {
                saved_at: at(T + 1, 0),
                states: vec![]
            }
        );
        assert!(
            !temp_path(&dir.file()).exists(),
            "no temp file after a successful save"
        );
    }

    #[test]
    fn saved_at_before_the_epoch_round_trips() {
        let t = UNIX_EPOCH - Duration::new(5, 1_500);
        let saved = decode(&encode(&[], t)).unwrap();
        assert_eq!(saved.saved_at, UNIX_EPOCH - Duration::new(5, 2_000));
    }

    #[test]
    fn fixture_states_size() {
        // Backs the "bytes per state" figure in the module docs (README: bytes/day).
        let mut total = (0, 0);
        for (version, json) in fixture_json() {
            let states: Vec<Rc<EntityState>> = json
                .into_iter()
                .map(|v| Rc::new(serde_json::from_value(v).unwrap()))
                .collect();
            let bytes = encode(&states, at(T, 123_456_000));
            let header = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
            let per_state = (bytes.len() - header) / states.len();
            println!(
                "HA {version}: {} states, {} bytes, header {header}, {per_state} bytes/state",
                states.len(),
                bytes.len()
            );
            total = (total.0 + states.len(), total.1 + bytes.len() - header);
            assert!(
                (300..=450).contains(&per_state),
                "module docs say 340 and 395 bytes/state, measured {per_state}"
            );
            assert!(
                header <= 130,
                "module docs say a header of about 120 bytes, measured {header}"
            );
        }
        let mean = total.1 / total.0;
        println!("mean: {mean} bytes/state");
        assert!(
            (350..=390).contains(&mean),
            "module docs say about 370 bytes/state, measured {mean}"
        );
    }

    #[test]
    fn torn_files_are_rejected_and_moved_aside() {
        let bytes = encode(&fixture_states(), at(T, 0));
        let header = bytes.iter().position(|&b| b == b'\n').unwrap();
        for cut in [
            1,
            20,
            header,
            header + 1,
            header + 2,
            bytes.len() / 2,
            bytes.len() - 2,
            bytes.len() - 1,
        ] {
            let err = assert_rejected(&bytes[..cut], &format!("cut at {cut}"));
            assert!(
                matches!(err, FormatError::Truncated(_)),
                "cut at {cut}: {err}"
            );
        }
        assert!(matches!(
            assert_rejected(b"", "empty"),
            FormatError::Truncated(_)
        ));
    }

    #[test]
    fn random_bytes_are_rejected() {
        let mut rng = fastrand::Rng::with_seed(7);
        for len in [1, 100, 4096] {
            let junk: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            let err = assert_rejected(&junk, &format!("{len} random bytes"));
            assert!(
                matches!(err, FormatError::Foreign(_) | FormatError::Truncated(_)),
                "{err}"
            );
        }
    }

    #[test]
    fn json_of_the_wrong_shape_is_rejected() {
        // Someone's copy of HA's REST answer, and other JSON files.
        let err = assert_rejected(
            br#"[{"entity_id":"light.a","state":"on"}]"#,
            "HA REST array",
        );
        assert!(matches!(err, FormatError::Foreign(_)), "{err}");
        let err = assert_rejected(b"{\"a\":1}\n[]\n", "another JSON object");
        assert!(matches!(err, FormatError::Foreign(_)), "{err}");
        let err = assert_rejected(b"[1,2]\n[]\n", "a JSON array header");
        assert!(matches!(err, FormatError::Foreign(_)), "{err}");
        // A correct frame (checksum included) around a body that is not HA states.
        let err = assert_rejected(
            &frame(FORMAT_NAME, 1, 1, br#"[{"entity_id":"light.a"}]"#),
            "states missing fields",
        );
        assert!(matches!(err, FormatError::Malformed(_)), "{err}");
        let err = assert_rejected(
            &frame(FORMAT_NAME, 1, 1, br#"{"light.a":"on"}"#),
            "a body that is an object",
        );
        assert!(matches!(err, FormatError::Malformed(_)), "{err}");
        // Header fields of the wrong type, or unknown ones.
        let ok = encode(&[], at(T, 0));
        let text = String::from_utf8(ok).unwrap();
        let bad = text.replace("\"count\":0", "\"count\":\"0\"");
        assert!(matches!(
            assert_rejected(bad.as_bytes(), "count as a string"),
            FormatError::Malformed(_)
        ));
        let bad = text.replace("{\"format\"", "{\"extra\":1,\"format\"");
        assert!(matches!(
            assert_rejected(bad.as_bytes(), "unknown header key"),
            FormatError::Malformed(_)
        ));
        // Bytes after the body.
        let mut long = text.into_bytes();
        long.extend_from_slice(b"[]\n");
        assert!(matches!(
            assert_rejected(&long, "trailing data"),
            FormatError::Malformed(_)
        ));
    }

    #[test]
    fn wrong_format_and_newer_version_are_rejected_with_a_clear_message() {
        let err = assert_rejected(&frame("other-tool", 1, 0, b"[]"), "wrong format");
        assert!(matches!(err, FormatError::Foreign(_)), "{err}");
        let err = assert_rejected(&frame(FORMAT_NAME, 2, 0, b"[]"), "version 2");
        assert_eq!(err, FormatError::NewerVersion(2));
        assert!(
            err.to_string()
                .contains("written by a newer hass-edge (format version 2)"),
            "{err}"
        );
        // A newer header may have other fields: still reported as newer, not as malformed.
        let err = assert_rejected(
            b"{\"format\":\"hass-edge-states\",\"version\":7,\"zstd\":true}\n\x28\xb5\x2f\xfd",
            "version 7",
        );
        assert_eq!(err, FormatError::NewerVersion(7));
        let err = assert_rejected(&frame(FORMAT_NAME, 0, 0, b"[]"), "version 0");
        assert!(matches!(err, FormatError::Malformed(_)), "{err}");
    }

    #[test]
    fn damaged_content_fails_the_checksum() {
        let bytes = encode(&fixture_states(), at(T, 0));
        let text = String::from_utf8(bytes).unwrap();
        // A flipped state that keeps the JSON valid and the length unchanged.
        let pos = text.find("\"state\":\"off\"").unwrap() + 9;
        let mut damaged = text.clone().into_bytes();
        damaged[pos] = b'0';
        assert!(matches!(
            assert_rejected(&damaged, "body bit flip"),
            FormatError::Checksum { .. }
        ));
        // The header's numbers are covered too.
        let damaged = text.replacen(
            &format!("\"saved_at_us\":{T}"),
            &format!("\"saved_at_us\":{}", T + 1),
            1,
        );
        assert!(matches!(
            assert_rejected(damaged.as_bytes(), "saved_at damaged"),
            FormatError::Checksum { .. }
        ));
    }

    #[test]
    fn count_mismatch_is_rejected() {
        let state = fixture_states()[0].to_json();
        let body = format!("[{state}]");
        let err = assert_rejected(
            &frame(FORMAT_NAME, 1, 2, body.as_bytes()),
            "count 2 for 1 state",
        );
        assert_eq!(
            err,
            FormatError::Count {
                expected: 2,
                actual: 1
            }
        );
        assert!(
            decode(&frame(FORMAT_NAME, 1, 1, body.as_bytes())).is_ok(),
            "the same frame with the right count is fine"
        );
    }

    #[test]
    fn missing_file_is_a_cold_start() {
        let dir = TestDir::new("missing");
        assert!(load(&dir.file()).unwrap().is_none());
        assert!(
            load(&dir.0.join("no-such-dir/states.json"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn unreadable_file_is_an_io_error_and_stays_in_place() {
        // Permission bits do not stop root; a parent that is a regular file stops anyone.
        let dir = TestDir::new("unreadable");
        fs::write(dir.0.join("regular"), b"x").unwrap();
        let path = dir.0.join("regular/states.json");
        match load(&path) {
            Err(e @ PersistError::Io { .. }) => {
                assert!(e.to_string().contains("failed to read state file"), "{e}")
            }
            other => panic!("expected Io, got {other:?}"),
        }
        assert_eq!(fs::read(dir.0.join("regular")).unwrap(), b"x", "untouched");
    }

    /// Issue 13, item 5: a FIFO used to block `load` (and so the daemon's start) for ever;
    /// a device was read up to 256 MiB and then renamed. Neither is read nor moved now.
    #[test]
    fn non_regular_files_are_refused_at_once_and_left_in_place() {
        let dir = TestDir::new("not-regular");
        let fifo = dir.0.join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let zero = dir.0.join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let subdir = dir.0.join("dir");
        fs::create_dir(&subdir).unwrap();
        let sock = dir.0.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        for (path, kind, name) in [
            (&fifo, FileKind::Fifo, "a FIFO (named pipe)"),
            (&zero, FileKind::CharDevice, "a character device"),
            (&subdir, FileKind::Directory, "a directory"),
            (&sock, FileKind::Socket, "a socket"),
        ] {
            let e = load(path).unwrap_err();
            assert!(
                matches!(&e, PersistError::NotRegular { kind: k, .. } if *k == kind),
                "{}: {e:?}",
                path.display()
            );
            let text = e.to_string();
            assert!(
                text.contains(&path.display().to_string()) && text.contains(name),
                "{text}"
            );
            assert!(
                fs::symlink_metadata(path).is_ok(),
                "{} moved",
                path.display()
            );
            assert!(!corrupt_path(path).exists(), "{} moved", path.display());
        }
        assert_eq!(fs::read_link(&zero).unwrap(), Path::new("/dev/zero"));
    }

    #[test]
    fn oversized_file_is_refused_by_its_size_and_moved_aside() {
        let dir = TestDir::new("oversized");
        // Sparse: 2 GiB on paper and nothing on disk; refused from fstat's size.
        File::create(dir.file()).unwrap().set_len(2 << 30).unwrap();
        match load(&dir.file()) {
            Err(PersistError::Corrupt {
                error: FormatError::TooLarge { bytes, limit },
                moved_to: Some(to),
                ..
            }) => {
                assert_eq!((bytes, limit), (2 << 30, MAX_FILE_BYTES));
                assert_eq!(to, corrupt_path(&dir.file()));
            }
            other => panic!("expected Corrupt(TooLarge), got {other:?}"),
        }
        assert!(!dir.file().exists());
        assert_eq!(
            fs::metadata(corrupt_path(&dir.file())).unwrap().len(),
            2 << 30
        );
    }

    #[test]
    fn unwritable_locations_are_errors() {
        let dir = TestDir::new("unwritable");
        let states = fixture_states();
        // A parent that is a regular file (stops root too), and a missing directory.
        let regular = dir.0.join("regular");
        fs::write(&regular, b"x").unwrap();
        for path in [
            regular.join("states.json"),
            dir.0.join("missing/states.json"),
        ] {
            let err = save(&path, &states, at(T, 0)).unwrap_err();
            assert!(matches!(err, PersistError::Io { .. }), "{err}");
            assert!(
                err.to_string()
                    .contains(&temp_path(&path).display().to_string()),
                "names the file: {err}"
            );
        }
        assert!(matches!(
            load(&regular.join("states.json")),
            Err(PersistError::Io { .. })
        ));
        // A directory at the path: the old "file" stays, the temp file is cleaned up.
        fs::create_dir(dir.file()).unwrap();
        fs::write(dir.file().join("inside"), b"x").unwrap();
        let err = save(&dir.file(), &states, at(T, 0)).unwrap_err();
        assert!(
            matches!(
                err,
                PersistError::Io {
                    action: "rename temp file over",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!temp_path(&dir.file()).exists());
        assert!(dir.file().join("inside").exists());
    }

    #[test]
    fn file_is_created_mode_0600_even_over_looser_leftovers() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TestDir::new("mode");
        let path = dir.file();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        save(&path, &fixture_states(), at(T, 0)).unwrap();
        assert_eq!(mode(&path), 0o600);
        // An older file and a stale temp file that are world-readable.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(temp_path(&path), b"half a file").unwrap();
        fs::set_permissions(temp_path(&path), fs::Permissions::from_mode(0o666)).unwrap();
        save(&path, &fixture_states(), at(T + 1, 0)).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(!temp_path(&path).exists());
        assert_eq!(load(&path).unwrap().unwrap().saved_at, at(T + 1, 0));
    }

    #[test]
    fn error_messages_name_the_file_and_reason() {
        let dir = TestDir::new("messages");
        fs::write(dir.file(), frame(FORMAT_NAME, 3, 0, b"[]")).unwrap();
        let msg = load(&dir.file()).unwrap_err().to_string();
        println!("{msg}");
        assert!(msg.contains(&dir.file().display().to_string()), "{msg}");
        assert!(
            msg.contains("written by a newer hass-edge (format version 3)"),
            "{msg}"
        );
        assert!(msg.contains(".corrupt"), "{msg}");
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn policy_does_not_write_when_nothing_changed() {
        let t0 = Instant::now();
        let mut p = SavePolicy::new(secs(900), t0);
        assert!(!p.due(t0 + secs(100_000)));
        assert_eq!(p.next_due(), None);
        p.mark_changed();
        assert!(p.due(t0 + secs(900)));
        p.saved(t0 + secs(900));
        assert!(!p.pending());
        assert!(!p.due(t0 + secs(100_000)), "saved, nothing new");
        assert_eq!(p.next_due(), None);
    }

    #[test]
    fn policy_writes_at_most_once_per_interval_over_a_busy_hour() {
        let t0 = Instant::now();
        let interval = secs(900);
        let mut p = SavePolicy::new(interval, t0);
        let mut writes: Vec<Duration> = Vec::new();
        // A change every 10 ms of simulated time for an hour, checking after each one.
        for tick in 1..=360_000u64 {
            let now = t0 + Duration::from_millis(tick * 10);
            p.mark_changed();
            if p.due(now) {
                writes.push(now - t0);
                p.saved(now);
            }
        }
        assert!(
            writes.len() <= 5,
            "{} writes in an hour: {writes:?}",
            writes.len()
        );
        assert_eq!(writes, [secs(900), secs(1800), secs(2700), secs(3600)]);
        assert!(writes.windows(2).all(|w| w[1] - w[0] >= interval));
    }

    #[test]
    fn policy_retries_a_failed_write_after_the_interval() {
        let t0 = Instant::now();
        let mut p = SavePolicy::new(secs(900), t0);
        p.mark_changed();
        assert!(!p.due(t0 + secs(899)));
        assert_eq!(p.next_due(), Some(t0 + secs(900)));
        p.failed(t0 + secs(900));
        assert!(!p.due(t0 + secs(901)), "no tight retry loop");
        assert!(!p.due(t0 + secs(1799)));
        assert!(p.due(t0 + secs(1800)), "changes stay pending");
        assert_eq!(p.next_due(), Some(t0 + secs(1800)));
        p.saved(t0 + secs(1800));
        assert!(!p.pending());
    }

    #[test]
    fn policy_keeps_changes_that_arrive_during_a_save() {
        let t0 = Instant::now();
        let mut p = SavePolicy::new(secs(900), t0);
        p.mark_changed();
        let mark = p.mark();
        p.mark_changed(); // arrives while the snapshot is being written
        p.saved_through(mark, t0 + secs(900));
        assert!(p.pending());
        assert!(!p.due(t0 + secs(1799)));
        assert!(p.due(t0 + secs(1800)));
    }

    #[test]
    fn policy_survives_an_interval_beyond_the_clock() {
        let t0 = Instant::now();
        let mut p = SavePolicy::new(Duration::MAX, t0);
        p.mark_changed();
        assert!(!p.due(t0 + secs(10_000_000)));
        assert_eq!(p.next_due(), None);
        p.failed(t0);
        p.saved(t0);
        assert!(!p.pending());
    }
}
