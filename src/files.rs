//! Reading a file the daemon was given by path (the state file, the token files, the config
//! file) so that no path can freeze it (issue 13, item 5): a FIFO, a socket, a device or a
//! directory is refused by its type, and a file larger than the caller's limit is refused by
//! its size, both before a single byte is read.
//!
//! Why each step is there:
//! - `open(2)` with `O_NONBLOCK`: opening a FIFO for reading blocks until a writer appears
//!   (fifo(7)), forever if none does, and the daemon has one thread. With `O_NONBLOCK` the
//!   open returns at once; a regular file ignores the flag (open(2): "has no effect for
//!   regular files"). `O_NOCTTY` keeps a terminal from becoming our controlling terminal.
//! - `stat(2)` on the path first: a device is refused without being opened at all (opening
//!   some has effects: `/dev/watchdog` arms the watchdog).
//! - `fstat(2)` on the opened descriptor as well: what is checked is what is read, even if
//!   the path was replaced between the `stat` and the `open`.
//! - Refusing anything but a regular file: a character device such as `/dev/zero` never ends,
//!   a FIFO or socket ends when a peer says so, a directory cannot be read.
//! - The size limit from `st_size` before reading, and the read itself bounded by it (the
//!   file may grow after the `fstat`).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// `O_NONBLOCK` on Linux for every architecture the daemon is built for (x86_64, aarch64,
/// armv7; `asm-generic/fcntl.h`: `00004000`). Written as a literal: `libc` is not a direct
/// dependency and this is the only flag needed.
const O_NONBLOCK: i32 = 0o4000;

/// `O_NOCTTY` on the same architectures (`asm-generic/fcntl.h`: `00000400`).
const O_NOCTTY: i32 = 0o400;

/// What kind of file system object a path named, as `fstat(2)`'s `st_mode` says
/// (inode(7), "The file type and mode").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `S_IFREG`: the only kind [`read_regular`] reads.
    Regular,
    /// `S_IFDIR`.
    Directory,
    /// `S_IFIFO`: a named pipe (mkfifo(1)).
    Fifo,
    /// `S_IFSOCK`: a Unix socket.
    Socket,
    /// `S_IFCHR`, e.g. `/dev/zero` or a terminal.
    CharDevice,
    /// `S_IFBLK`, e.g. a disk.
    BlockDevice,
    /// `S_IFLNK`: seen only when a path is examined without following it.
    Symlink,
    /// Anything else.
    Other,
}

impl FileKind {
    /// The kind of `file_type`.
    pub fn of(file_type: std::fs::FileType) -> FileKind {
        if file_type.is_file() {
            FileKind::Regular
        } else if file_type.is_dir() {
            FileKind::Directory
        } else if file_type.is_fifo() {
            FileKind::Fifo
        } else if file_type.is_socket() {
            FileKind::Socket
        } else if file_type.is_char_device() {
            FileKind::CharDevice
        } else if file_type.is_block_device() {
            FileKind::BlockDevice
        } else if file_type.is_symlink() {
            FileKind::Symlink
        } else {
            FileKind::Other
        }
    }
}

impl fmt::Display for FileKind {
    /// With its article, to fit "… is a FIFO (named pipe), not a regular file".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Regular => "a regular file",
            FileKind::Directory => "a directory",
            FileKind::Fifo => "a FIFO (named pipe)",
            FileKind::Socket => "a socket",
            FileKind::CharDevice => "a character device",
            FileKind::BlockDevice => "a block device",
            FileKind::Symlink => "a symbolic link",
            FileKind::Other => "of an unknown file type",
        })
    }
}

/// Why [`read_regular`] refused or failed. Every message names the path.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// `open(2)`, `fstat(2)` or `read(2)` failed; `source.kind()` is `NotFound` for a
    /// missing file.
    #[error("failed to read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The path is not a regular file; nothing was read.
    #[error("refusing to read {path}: it is {kind}, not a regular file")]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: FileKind,
    },
    /// The file is larger than the caller's limit; nothing (or nothing beyond the limit)
    /// was read.
    #[error("refusing to read {path}: {bytes} bytes, more than the {limit}-byte limit")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size, in bytes (at least `limit + 1` when it grew while being read).
        bytes: u64,
        /// The limit, in bytes.
        limit: u64,
    },
}

impl ReadError {
    /// Whether the file does not exist (a normal case for the state file at first start).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    /// The reason alone, without the path, for callers whose own message names it:
    /// `"it is a FIFO (named pipe), not a regular file"`, `"70000 bytes, more than the
    /// 65536-byte limit"`, or the OS error (`"Permission denied (os error 13)"`).
    pub fn reason(&self) -> String {
        match self {
            ReadError::Io { source, .. } => source.to_string(),
            ReadError::NotRegular { kind, .. } => format!("it is {kind}, not a regular file"),
            ReadError::TooLarge { bytes, limit, .. } => {
                format!("{bytes} bytes, more than the {limit}-byte limit")
            }
        }
    }
}

/// Reads the whole of `path`, which must be a regular file (symbolic links are followed) of
/// at most `limit` bytes. Never blocks on a FIFO, socket or device: see the module docs for
/// the steps (stat(2), open(2) with `O_NONBLOCK | O_NOCTTY`, fstat(2), a bounded read).
///
/// Errors: [`ReadError::NotRegular`] for a directory, FIFO, socket or device (`open(2)` of
/// a socket fails with `ENXIO`; its kind is then taken from `stat(2)` on the path);
/// [`ReadError::TooLarge`] when `st_size > limit`, or when more than `limit` bytes turn up
/// while reading; [`ReadError::Io`] for anything the OS refuses (missing file, permissions).
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let io_err = |source| ReadError::Io {
        path: path.to_owned(),
        source,
    };
    // Refuse what is plainly not a regular file before opening it (see the module docs).
    if let Ok(meta) = std::fs::metadata(path)
        && !meta.is_file()
    {
        return Err(ReadError::NotRegular {
            path: path.to_owned(),
            kind: FileKind::of(meta.file_type()),
        });
    }
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK | O_NOCTTY)
        .open(path)
    {
        Ok(file) => file,
        Err(e) => {
            // A socket cannot be opened at all (open(2), ENXIO): name it for what it is.
            if e.kind() != io::ErrorKind::NotFound
                && let Ok(meta) = std::fs::metadata(path)
                && !meta.is_file()
            {
                return Err(ReadError::NotRegular {
                    path: path.to_owned(),
                    kind: FileKind::of(meta.file_type()),
                });
            }
            return Err(io_err(e));
        }
    };
    let meta = file.metadata().map_err(io_err)?;
    let kind = FileKind::of(meta.file_type());
    if kind != FileKind::Regular {
        return Err(ReadError::NotRegular {
            path: path.to_owned(),
            kind,
        });
    }
    if meta.len() > limit {
        return Err(ReadError::TooLarge {
            path: path.to_owned(),
            bytes: meta.len(),
            limit,
        });
    }
    read_bounded(file, path, limit, meta.len())
}

/// Reads at most `limit + 1` bytes of the opened regular file `file` (of `size` bytes at the
/// `fstat`) and refuses it when it held more than `limit`.
fn read_bounded(file: File, path: &Path, limit: u64, size: u64) -> Result<Vec<u8>, ReadError> {
    // `size <= limit`, and the limit is the caller's bound on memory, so it fits a usize.
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|source| ReadError::Io {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge {
            path: path.to_owned(),
            bytes: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::process::Command;
    use std::time::{Duration, Instant};

    /// A private directory under the temp dir, removed on drop.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(name: &str) -> TestDir {
            let p = std::env::temp_dir().join(format!(
                "hass-edge-files-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TestDir(p)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mkfifo(path: &Path) {
        let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
        assert!(ok, "mkfifo {}", path.display());
    }

    #[test]
    fn a_regular_file_within_the_limit_is_read_whole() {
        let dir = TestDir::new("regular");
        let p = dir.0.join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(read_regular(&p, 10).unwrap(), b"0123456789");
        assert_eq!(read_regular(&p, 1000).unwrap(), b"0123456789");
        std::fs::write(&p, b"").unwrap();
        assert_eq!(read_regular(&p, 0).unwrap(), b"");
        // Through a symbolic link: what counts is the file it points to.
        let link = dir.0.join("link");
        std::fs::write(&p, b"x").unwrap();
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(read_regular(&link, 1).unwrap(), b"x");
    }

    #[test]
    fn a_file_over_the_limit_is_refused_by_its_size() {
        let dir = TestDir::new("large");
        let p = dir.0.join("f");
        // Sparse: 2 GiB on paper, nothing on disk. Refused from fstat, so nothing is read.
        File::create(&p).unwrap().set_len(2 << 30).unwrap();
        let start = Instant::now();
        let e = read_regular(&p, 64 << 20).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(1), "read it anyway?");
        assert!(
            matches!(e, ReadError::TooLarge { bytes, limit, .. } if bytes == 2 << 30 && limit == 64 << 20),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(text.contains(&p.display().to_string()), "{text}");
        assert!(
            text.contains("2147483648 bytes, more than the 67108864-byte limit"),
            "{text}"
        );
    }

    #[test]
    fn a_fifo_is_refused_at_once_and_not_waited_on() {
        let dir = TestDir::new("fifo");
        let p = dir.0.join("fifo");
        mkfifo(&p);
        // Without O_NONBLOCK the open would wait for a writer for ever.
        let e = read_regular(&p, 1024).unwrap_err();
        assert!(
            matches!(
                e,
                ReadError::NotRegular {
                    kind: FileKind::Fifo,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "refusing to read {}: it is a FIFO (named pipe), not a regular file",
                p.display()
            )
        );
        // And through a symbolic link.
        let link = dir.0.join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let e = read_regular(&link, 1024).unwrap_err();
        assert!(
            matches!(
                e,
                ReadError::NotRegular {
                    kind: FileKind::Fifo,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn directories_sockets_and_devices_are_refused_by_kind() {
        let dir = TestDir::new("kinds");
        let sock = dir.0.join("sock");
        let _listener = UnixListener::bind(&sock).unwrap();
        for (path, kind) in [
            (dir.0.clone(), FileKind::Directory),
            (sock, FileKind::Socket),
            (PathBuf::from("/dev/zero"), FileKind::CharDevice),
            (PathBuf::from("/dev/null"), FileKind::CharDevice),
        ] {
            let e = read_regular(&path, 1 << 20).unwrap_err();
            assert!(
                matches!(&e, ReadError::NotRegular { kind: k, .. } if *k == kind),
                "{}: {e:?}",
                path.display()
            );
            assert!(e.reason().starts_with("it is a"), "{}", e.reason());
        }
    }

    #[test]
    fn a_missing_file_is_not_found() {
        let e = read_regular(Path::new("/nonexistent/hass-edge/x"), 10).unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
        assert!(e.to_string().contains("/nonexistent/hass-edge/x"), "{e}");
    }
}
