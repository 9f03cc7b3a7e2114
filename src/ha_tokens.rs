//! Verdicts on HA tokens presented to hass-edge's own routes (issue 15): with
//! `http.api_token_file` set, a local route takes hass-edge's API token or any token HA
//! accepts. HA is asked once per token (`GET /api/` with it: 200 or 401, HA developer docs
//! "REST API"); the verdict is kept, bounded, so that a dashboard's reads cost HA nothing:
//!
//! - accepted: until the token expires (the `exp` claim of HA's JWT access tokens, RFC 7519
//!   §4.1.4), at most [`ACCEPTED_FOR`] (a revoked refresh token ends its access tokens in
//!   HA; this bounds how long hass-edge may lag behind);
//! - refused: for [`REFUSED_FOR`];
//! - new tokens go to HA at most [`CHECKS_PER_SECOND`] a second (bursts of [`CHECK_BURST`]),
//!   so a stranger trying tokens can neither flood HA nor fill the cache with more than
//!   [`MAX_VERDICTS`] entries (least recently used go first).
//!
//! Tokens are kept as keyed hashes (SipHash with a per-process random key), never as text.

use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroUsize;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use lru::LruCache;

use crate::bucket::Bucket;

/// Most verdicts kept.
pub const MAX_VERDICTS: usize = 256;
/// Longest an accepted token is trusted without asking HA again.
pub const ACCEPTED_FOR: Duration = Duration::from_secs(300);
/// How long a refused token stays refused without asking HA again.
pub const REFUSED_FOR: Duration = Duration::from_secs(60);
/// New tokens checked with HA per second, on average.
pub const CHECKS_PER_SECOND: f64 = 2.0;
/// New tokens checked at once above the average.
pub const CHECK_BURST: f64 = 10.0;

/// What is known of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// HA accepted it, and the verdict still holds.
    Accepted,
    /// HA refused it, and the verdict still holds.
    Refused,
    /// Not known (or the verdict ran out): ask HA.
    Unknown,
}

/// The verdicts, their bound and the budget of checks.
#[derive(Debug)]
pub struct Verdicts {
    cache: LruCache<u64, (bool, Instant)>,
    key: RandomState,
    budget: Bucket,
}

impl Verdicts {
    /// No verdicts, a full budget.
    pub fn new(now: Instant) -> Verdicts {
        Verdicts {
            cache: LruCache::new(NonZeroUsize::new(MAX_VERDICTS).expect("non-zero")),
            key: RandomState::new(),
            budget: Bucket::full(CHECKS_PER_SECOND, CHECK_BURST, now),
        }
    }

    fn hash(&self, token: &str) -> u64 {
        self.key.hash_one(token)
    }

    /// What is known of `token` now.
    pub fn lookup(&mut self, token: &str, now: Instant) -> Known {
        let h = self.hash(token);
        match self.cache.get(&h) {
            Some(&(accepted, until)) if now < until => {
                if accepted {
                    Known::Accepted
                } else {
                    Known::Refused
                }
            }
            Some(_) => {
                self.cache.pop(&h);
                Known::Unknown
            }
            None => Known::Unknown,
        }
    }

    /// Takes one check from the budget: `false` when HA has been asked enough for now.
    pub fn may_check(&mut self, now: Instant) -> bool {
        self.budget.take(now)
    }

    /// Keeps HA's verdict on `token` (see the module docs for how long).
    pub fn record(&mut self, token: &str, accepted: bool, now: Instant) {
        let until = if accepted {
            let left = jwt_expiry(token)
                .map(|exp| {
                    exp.duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
                })
                .unwrap_or(ACCEPTED_FOR);
            now + left.min(ACCEPTED_FOR)
        } else {
            now + REFUSED_FOR
        };
        let h = self.hash(token);
        self.cache.put(h, (accepted, until));
    }

    /// Verdicts kept now.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether none are kept.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

/// The `exp` claim of a JWT (`header.payload.signature`, base64url without padding,
/// RFC 7519 §4.1.4), unverified: only ever used to trust a token HA accepted for less long.
pub fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<f64>,
    }
    let exp = serde_json::from_slice::<Claims>(&bytes).ok()?.exp?;
    (exp.is_finite() && exp >= 0.0).then(|| UNIX_EPOCH + Duration::from_secs_f64(exp.min(1e11)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: u64) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.sig",
            b64(r#"{"alg":"HS256","typ":"JWT"}"#),
            b64(&format!(r#"{{"iss":"abc","iat":1,"exp":{exp}}}"#))
        )
    }

    #[test]
    fn verdicts_hold_for_their_time() {
        let t = Instant::now();
        let mut v = Verdicts::new(t);
        assert_eq!(v.lookup("a", t), Known::Unknown);
        v.record("a", true, t);
        v.record("b", false, t);
        assert_eq!(v.lookup("a", t + Duration::from_secs(10)), Known::Accepted);
        assert_eq!(v.lookup("b", t + Duration::from_secs(10)), Known::Refused);
        assert_eq!(v.lookup("b", t + REFUSED_FOR), Known::Unknown);
        assert_eq!(v.lookup("a", t + ACCEPTED_FOR), Known::Unknown);
        // A JWT that expires in 20 s is trusted for 20 s, not 5 minutes.
        let soon = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 20;
        let token = jwt(soon);
        assert!(jwt_expiry(&token).is_some());
        v.record(&token, true, t);
        assert_eq!(
            v.lookup(&token, t + Duration::from_secs(15)),
            Known::Accepted
        );
        assert_eq!(
            v.lookup(&token, t + Duration::from_secs(25)),
            Known::Unknown
        );
        // An expired one is not trusted at all.
        let old = jwt(1_000);
        v.record(&old, true, t);
        assert_eq!(v.lookup(&old, t), Known::Unknown);
        assert_eq!(jwt_expiry("not-a-jwt"), None);
    }

    #[test]
    fn the_cache_and_the_checks_are_bounded() {
        let t = Instant::now();
        let mut v = Verdicts::new(t);
        for i in 0..MAX_VERDICTS * 4 {
            v.record(&format!("stranger-{i}"), false, t);
        }
        assert_eq!(v.len(), MAX_VERDICTS);
        let allowed = (0..100).filter(|_| v.may_check(t)).count();
        assert_eq!(allowed, CHECK_BURST as usize);
        assert!(v.may_check(t + Duration::from_secs(1)), "refilled");
    }
}
