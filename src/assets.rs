//! HA's frontend assets kept on the Pi (issue 15): files under `/frontend_latest/`,
//! `/frontend_es5/` and `/static/` with content-hashed names, which HA serves with
//! `Cache-Control: public, max-age=…` (`components/http/static.py` `CACHE_HEADERS`, 31 days),
//! are kept in a directory beside the state file, so that a kiosk reload after a reboot of
//! the Pi, or while HA is slow or away, does not wait on HA for them.
//!
//! - What: a `200` answer to a `GET` of such a path whose `Cache-Control` says `public` (or
//!   nothing private) with `max-age` > 0 and neither `no-store` nor `no-cache`, with a
//!   `Content-Length` (HA's static files have one). Kept until `max-age` runs out; HA's
//!   `Vary: Accept-Encoding` is honoured by keeping the gzip and the plain answer apart.
//! - Bound: [`AssetCache::new`]'s byte budget (`http.asset_cache_mib`), least recently used
//!   first out, and at most [`MAX_ENTRIES`] files.
//! - Layout: `NAME` (the body) and `NAME.head` (status line fields and headers as JSON),
//!   written as `*.tmp` and renamed into place (a crash leaves no half file under a real
//!   name); `NAME` is the path with `/` as `~`, prefixed `gz-` or `id-`. Files are written
//!   and read off the executor thread (`smol::fs`).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lru::LruCache;
use serde::{Deserialize, Serialize};
use smol::io::AsyncWriteExt;

/// Most files kept.
pub const MAX_ENTRIES: usize = 8192;
/// Largest single asset kept, bytes (HA's largest chunks are a few MiB).
pub const MAX_ASSET_BYTES: u64 = 16 * 1024 * 1024;

/// Path prefixes whose files may be kept.
const PREFIXES: &[&str] = &["/frontend_latest/", "/frontend_es5/", "/static/"];

/// A kept answer's head.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Head {
    /// HA's headers (end-to-end only), in order.
    pub headers: Vec<(String, String)>,
    /// Body length, bytes.
    pub length: u64,
    /// When it stops being fresh, seconds since the epoch.
    pub expires: u64,
}

/// A kept asset found fresh.
#[derive(Debug)]
pub struct Hit {
    /// Its head.
    pub head: Head,
    /// The body file.
    pub body: PathBuf,
}

/// Counters, for `/status` and `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub struct AssetStats {
    /// Answered from the directory.
    pub hits: u64,
    /// Asked of HA (and kept when HA allowed it).
    pub misses: u64,
    /// Files kept now.
    pub entries: usize,
    /// Bytes kept now.
    pub bytes: u64,
}

/// The directory and its index.
#[derive(Debug)]
pub struct AssetCache {
    dir: PathBuf,
    budget: u64,
    index: RefCell<LruCache<String, u64>>,
    stats: RefCell<AssetStats>,
}

/// The cache key of a request: the file name under the directory, or `None` when the path
/// is not one to keep (not under `PREFIXES`, no hashed name, or odd characters).
pub fn key(path: &str, accepts_gzip: bool) -> Option<String> {
    let rest = PREFIXES.iter().find_map(|p| path.strip_prefix(p))?;
    let ok_chars = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'-' | b'_'));
    if !ok_chars || path.contains("..") || path.len() > 200 || rest.is_empty() {
        return None;
    }
    let name = rest.rsplit('/').next()?;
    // A content hash: a part between the name and the extension of 8+ characters with a
    // digit or with both cases (`app.3a6b2c1f.js`, `10045.ghLCOdDCk9E.js`,
    // `onboarding.0-2TaPtd8oU.js`, and base64url hashes without a digit such as
    // `27311.XovrrMgb-ys.js`; not `core.frontend.js`).
    let parts: Vec<&str> = name.split('.').collect();
    let hashed = parts.len() >= 3
        && parts[1..parts.len() - 1].iter().any(|part| {
            part.len() >= 8
                && (part.bytes().any(|b| b.is_ascii_digit())
                    || (part.bytes().any(|b| b.is_ascii_uppercase())
                        && part.bytes().any(|b| b.is_ascii_lowercase())))
        });
    hashed.then(|| {
        format!(
            "{}-{}",
            if accepts_gzip { "gz" } else { "id" },
            path.trim_start_matches('/').replace('/', "~")
        )
    })
}

/// How long HA lets its answer be kept: `max-age` of a `Cache-Control` that allows shared
/// caching (RFC 9111 §5.2.2), else `None`.
pub fn max_age(cache_control: Option<&str>) -> Option<Duration> {
    let cc = cache_control?.to_ascii_lowercase();
    let mut age = None;
    for directive in cc.split(',').map(str::trim) {
        match directive {
            "no-store" | "no-cache" | "private" => return None,
            d => {
                if let Some(v) = d.strip_prefix("max-age=") {
                    age = v.trim_matches('"').parse::<u64>().ok();
                }
            }
        }
    }
    age.filter(|&a| a > 0).map(Duration::from_secs)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl AssetCache {
    /// A cache in `dir` of at most `budget` bytes; the files already there are indexed
    /// (oldest first out). The directory is made when the first asset is kept. Blocking
    /// (a directory listing, at start).
    pub fn new(dir: PathBuf, budget: u64) -> AssetCache {
        let cache = AssetCache {
            dir,
            budget,
            index: RefCell::new(LruCache::unbounded()),
            stats: RefCell::new(AssetStats::default()),
        };
        let mut found: Vec<(SystemTime, String, u64)> = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&cache.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Ok(meta) = entry.metadata() else { continue };
                if name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                } else if !name.ends_with(".head") && meta.is_file() {
                    let at = meta.modified().unwrap_or(UNIX_EPOCH);
                    found.push((at, name, meta.len()));
                }
            }
        }
        found.sort();
        for (_, name, size) in found {
            cache.index.borrow_mut().put(name, size);
        }
        cache.evict();
        cache
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Counters now.
    pub fn stats(&self) -> AssetStats {
        let mut s = *self.stats.borrow();
        let index = self.index.borrow();
        s.entries = index.len();
        s.bytes = index.iter().map(|(_, &b)| b).sum();
        s
    }

    /// The kept answer for `key`, when there is one and it is still fresh.
    pub async fn lookup(&self, key: &str) -> Option<Hit> {
        if self.index.borrow_mut().get(key).is_none() {
            self.stats.borrow_mut().misses += 1;
            return None;
        }
        let body = self.dir.join(key);
        let head = smol::fs::read(self.dir.join(format!("{key}.head")))
            .await
            .ok()
            .and_then(|b| serde_json::from_slice::<Head>(&b).ok());
        let size = smol::fs::metadata(&body).await.ok().map(|m| m.len());
        match head {
            Some(head) if Some(head.length) == size && head.expires > now_secs() => {
                self.stats.borrow_mut().hits += 1;
                Some(Hit { head, body })
            }
            _ => {
                self.forget(key).await;
                self.stats.borrow_mut().misses += 1;
                None
            }
        }
    }

    /// Starts keeping an answer being relayed: `None` when HA's answer may not be kept.
    pub async fn writer(
        &self,
        key: &str,
        headers: &[(String, Vec<u8>)],
        length: Option<u64>,
    ) -> Option<AssetWriter> {
        let length = length.filter(|&l| l > 0 && l <= MAX_ASSET_BYTES.min(self.budget))?;
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let age = max_age(header("cache-control").as_deref())?;
        if header("set-cookie").is_some() {
            return None;
        }
        let head = Head {
            headers: headers
                .iter()
                .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
                .collect(),
            length,
            expires: now_secs() + age.as_secs(),
        };
        if let Err(e) = smol::fs::create_dir_all(&self.dir).await {
            log::warn!("cannot keep frontend assets in {}: {e}", self.dir.display());
            return None;
        }
        let tmp = self
            .dir
            .join(format!("{key}.{:08x}.tmp", fastrand::u32(..)));
        let file = smol::fs::File::create(&tmp).await.ok()?;
        Some(AssetWriter {
            key: key.to_owned(),
            tmp,
            file,
            head,
            written: 0,
        })
    }

    /// Puts a completely written asset in place and under the budget.
    pub async fn commit(&self, mut w: AssetWriter) {
        let ok = w.written == w.head.length && w.file.flush().await.is_ok() && {
            drop(w.file);
            let body = self.dir.join(&w.key);
            let head = serde_json::to_vec(&w.head).unwrap_or_default();
            let head_tmp = self.dir.join(format!("{}.head.tmp", w.key));
            smol::fs::write(&head_tmp, head).await.is_ok()
                && smol::fs::rename(&w.tmp, &body).await.is_ok()
                && smol::fs::rename(&head_tmp, self.dir.join(format!("{}.head", w.key)))
                    .await
                    .is_ok()
        };
        if !ok {
            let _ = smol::fs::remove_file(&w.tmp).await;
            return;
        }
        self.index.borrow_mut().put(w.key, w.head.length);
        self.evict();
    }

    /// Drops a kept asset.
    async fn forget(&self, key: &str) {
        self.index.borrow_mut().pop(key);
        let _ = smol::fs::remove_file(self.dir.join(key)).await;
        let _ = smol::fs::remove_file(self.dir.join(format!("{key}.head"))).await;
    }

    /// Removes least recently used files until under the budget and [`MAX_ENTRIES`].
    fn evict(&self) {
        let mut index = self.index.borrow_mut();
        let mut total: u64 = index.iter().map(|(_, &b)| b).sum();
        while total > self.budget || index.len() > MAX_ENTRIES {
            let Some((key, size)) = index.pop_lru() else {
                break;
            };
            total -= size;
            let (body, head) = (self.dir.join(&key), self.dir.join(format!("{key}.head")));
            // On the blocking pool: an SD card may take its time.
            smol::unblock(move || {
                let _ = std::fs::remove_file(body);
                let _ = std::fs::remove_file(head);
            })
            .detach();
        }
    }
}

/// An asset being written while it is relayed.
#[derive(Debug)]
pub struct AssetWriter {
    key: String,
    tmp: PathBuf,
    file: smol::fs::File,
    head: Head,
    written: u64,
}

impl AssetWriter {
    /// Appends a piece of the body; `false` (and the file is abandoned by the caller) on an
    /// error or a body longer than announced.
    pub async fn write(&mut self, piece: &[u8]) -> bool {
        self.written += piece.len() as u64;
        self.written <= self.head.length && self.file.write_all(piece).await.is_ok()
    }

    /// Abandons it: the temporary file is removed.
    pub async fn abandon(self) {
        drop(self.file);
        let _ = smol::fs::remove_file(&self.tmp).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hashed_static_files_are_kept() {
        assert_eq!(
            key("/frontend_latest/10045.ghLCOdDCk9E.js", true).as_deref(),
            Some("gz-frontend_latest~10045.ghLCOdDCk9E.js")
        );
        assert!(key("/frontend_latest/app.3a6b2c1f.js", false).is_some());
        // base64url hashes may have no digit (found by measure/kiosk: 12 of the dashboard's
        // chunks were forwarded on every warm load).
        assert!(key("/frontend_latest/27311.XovrrMgb-ys.js", true).is_some());
        assert!(key("/frontend_latest/core.frontend.js", true).is_none());
        assert!(
            key("/frontend_latest/3a6b2c1f4e.js", true).is_none(),
            "no name part"
        );
        assert!(
            key("/static/icons/favicon.ico", true).is_none(),
            "not hashed"
        );
        assert!(key("/api/states", true).is_none());
        assert!(key("/frontend_latest/../secrets.3a6b2c1f.js", true).is_none());
        assert!(key("/frontend_latest/a%2F.3a6b2c1f.js", true).is_none());
    }

    #[test]
    fn cache_control_is_honoured() {
        assert_eq!(
            max_age(Some("public, max-age=2678400")),
            Some(Duration::from_secs(2_678_400))
        );
        assert_eq!(max_age(Some("no-cache")), None);
        assert_eq!(max_age(Some("private, max-age=60")), None);
        assert_eq!(max_age(Some("max-age=0")), None);
        assert_eq!(max_age(None), None);
    }

    #[test]
    fn the_directory_is_bounded_and_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("hass-edge-assets-{}", fastrand::u64(..)));
        smol::block_on(async {
            let cache = AssetCache::new(dir.clone(), 250);
            assert!(!dir.exists(), "made only when an asset is kept");
            let headers = vec![("Cache-Control".to_owned(), b"public, max-age=600".to_vec())];
            for i in 0..4 {
                let k = key(&format!("/frontend_latest/f{i}.abcdef12.js"), true).unwrap();
                let mut w = cache.writer(&k, &headers, Some(100)).await.unwrap();
                assert!(w.write(&[b'a' + i as u8; 100]).await);
                cache.commit(w).await;
            }
            let s = cache.stats();
            assert_eq!((s.entries, s.bytes), (2, 200), "the oldest two went");
            let k3 = key("/frontend_latest/f3.abcdef12.js", true).unwrap();
            let hit = cache.lookup(&k3).await.expect("kept");
            assert_eq!(std::fs::read(hit.body).unwrap(), vec![b'd'; 100]);
            assert!(
                cache
                    .lookup(&key("/frontend_latest/f0.abcdef12.js", true).unwrap())
                    .await
                    .is_none()
            );
            // No Cache-Control, or a short body: not kept.
            let k = key("/frontend_latest/g.abcdef12.js", true).unwrap();
            assert!(cache.writer(&k, &[], Some(10)).await.is_none());
            let mut w = cache.writer(&k, &headers, Some(10)).await.unwrap();
            assert!(w.write(b"short").await);
            cache.commit(w).await;
            assert!(
                cache.lookup(&k).await.is_none(),
                "an incomplete body is not kept"
            );
        });
        // Another process later: the files are still there.
        smol::block_on(async {
            let cache = AssetCache::new(dir.clone(), 250);
            let k3 = key("/frontend_latest/f3.abcdef12.js", true).unwrap();
            assert!(cache.lookup(&k3).await.is_some());
        });
        let _ = std::fs::remove_dir_all(dir);
    }
}
