//! Which `Host` names the local API answers: the guard against DNS rebinding.
//!
//! A page on an attacker's domain can have its name resolve to 127.0.0.1 once it has loaded
//! (DNS rebinding). The browser then sends that page's requests to hass-edge as
//! same-origin: `Host: rebind.attacker.example:8124`, and for a write a matching `Origin`,
//! or none at all for a read. Neither `Origin` nor CORS tells such a request from one of a
//! page hass-edge served; its `Host` does, because an attacker's page always carries the
//! attacker's name. So every request is refused unless its `Host` names this machine in a
//! way no attacker's DNS can: an IP literal, `localhost` (and `*.localhost`, which RFC 6761
//! §6.3 reserves for loopback), the machine's own host name (and `<hostname>.local`, its
//! mDNS name, RFC 6762), or a name the operator listed in `http.allowed_hosts`. The same
//! rule as geth's `--http.vhosts` and Transmission's `rpc-host-whitelist` (CVE-2018-5702).
//!
//! Pure but for [`machine_name`], which asks the kernel once at start.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Whether the local API answers a request with `Host: host` (RFC 9110 §7.2: `uri-host
/// [":" port]`; the port is ignored). `machine` is this machine's host name (lower case,
/// see [`machine_name`]), `allowed` the names of `http.allowed_hosts` (lower case, without
/// a trailing dot, as config.rs keeps them).
///
/// Allowed: an empty `Host` (RFC 9112 §3.2 allows one for a target without authority; no
/// browser sends it), an IPv4 literal, an IPv6 literal in brackets, `localhost` and names
/// ending in `.localhost`, `machine` and `machine.local`, and the `allowed` names. Names
/// compare case-insensitively, with one trailing dot (a fully qualified name) ignored.
/// Anything else, or a `Host` that does not parse, is refused.
pub fn host_allowed(host: &str, machine: Option<&str>, allowed: &[String]) -> bool {
    if host.is_empty() {
        return true;
    }
    if let Some(rest) = host.strip_prefix('[') {
        // An IP-literal (RFC 3986 §3.2.2): `[v6]`, then an optional port.
        return rest
            .split_once(']')
            .is_some_and(|(literal, after)| literal.parse::<Ipv6Addr>().is_ok() && port_ok(after));
    }
    let (name, after) = host.find(':').map_or((host, ""), |i| host.split_at(i));
    if !port_ok(after) {
        return false;
    }
    let name = normalize(name);
    if name.is_empty() {
        return false;
    }
    name.parse::<Ipv4Addr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
        || machine.is_some_and(|m| name == m || name.strip_suffix(".local") == Some(m))
        || allowed.contains(&name)
}

/// `""` or `":"` followed by digits (RFC 3986 §3.2.3: `port = *DIGIT`).
fn port_ok(after: &str) -> bool {
    after.is_empty()
        || after
            .strip_prefix(':')
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

/// A host name as it is compared: lower case, without one trailing dot.
pub fn normalize(name: &str) -> String {
    let name = name.strip_suffix('.').unwrap_or(name);
    name.to_ascii_lowercase()
}

/// Whether `name` can be an entry of `http.allowed_hosts`: a DNS name (RFC 1123 §2.1
/// labels of letters, digits, `-` and `_`, 1 to 63 characters each, 253 in all, one
/// trailing dot allowed), without scheme, port or path.
pub fn valid_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// This machine's host name (uname(2) `nodename`), lower case; `None` when it is empty,
/// `(none)` or not a valid name. Read once at start: a later `hostname` change needs a
/// restart (or an `http.allowed_hosts` entry).
pub fn machine_name() -> Option<String> {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_str().ok()?;
    (valid_name(name) && name != "(none)").then(|| normalize(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_host_may_be() {
        let allowed = vec!["kiosk.lan".to_owned()];
        let ok = |h: &str| host_allowed(h, Some("pi"), &allowed);
        for good in [
            "",
            "127.0.0.1",
            "127.0.0.1:8124",
            "192.168.1.20:8124",
            "[::1]",
            "[::1]:8124",
            "localhost",
            "LOCALHOST:8124",
            "localhost.",
            "kiosk.localhost:3000",
            "pi",
            "Pi:8124",
            "pi.local",
            "pi.local.:8124",
            "kiosk.lan",
            "KIOSK.LAN:80",
        ] {
            assert!(ok(good), "{good:?} should be allowed");
        }
        for bad in [
            "rebind.attacker.example:8124",
            "rebind.attacker.example",
            "127.0.0.1.nip.io",
            "localhost.attacker.example",
            "attackerlocalhost",
            "pi.attacker.example",
            "pi.lan",
            "x",
            "::1",
            "[::1",
            "[::1]x",
            "[not-v6]",
            "127.0.0.1:80x",
            "127.0.0.1:8124:1",
            ":8124",
            "kiosk.lan.attacker.example",
        ] {
            assert!(!ok(bad), "{bad:?} should be refused");
        }
        // Without a known host name, only the fixed rules and the list.
        assert!(!host_allowed("pi", None, &[]));
        assert!(!host_allowed("local", None, &[]));
    }

    #[test]
    fn allowed_host_names() {
        for good in [
            "kiosk.lan",
            "pi",
            "my-pi.example.com.",
            "a_b.lan",
            "10.0.0.1",
        ] {
            assert!(valid_name(good), "{good:?}");
        }
        for bad in [
            "",
            ".",
            "http://kiosk.lan",
            "kiosk.lan:8124",
            "kiosk.lan/x",
            "*.lan",
            "a..b",
            "[::1]",
            "kiosk lan",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(!valid_name(&"a".repeat(64)));
    }
}
