//! Reload (SIGHUP) against the real daemon and fake HAs: a new HA URL reconnects to the new
//! HA; a cache-limit change applies in place without reconnecting; a config that does not
//! parse is refused and the old one stays in force.

mod support;

use std::time::Duration;

use support::{Daemon, DaemonOptions, FakeHa, deadline, wait_until};

fn rewrite(daemon: &Daemon, edit: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(&daemon.config_path).unwrap();
    std::fs::write(&daemon.config_path, edit(text)).unwrap();
    daemon.signal("HUP");
}

#[test]
fn a_new_ha_url_reconnects_to_the_new_ha() {
    let first = FakeHa::start("2024.3.3");
    let second = FakeHa::start("2025.4.4");
    let daemon = Daemon::start_with(&first, DaemonOptions::default());
    daemon.wait_live();
    assert_eq!(
        daemon.get("/status").json()["home_assistant"]["version"],
        "2024.3.3"
    );
    rewrite(&daemon, |t| t.replace(&first.url(), &second.url()));
    wait_until("the daemon follows the new URL", deadline(), || {
        let s = daemon.get("/status").json();
        if s["home_assistant"]["version"] == "2025.4.4" && s["connection"]["state"] == "live" {
            Ok(())
        } else {
            Err(s["connection"].to_string())
        }
    });
    assert_eq!(second.subscribed_sessions(), 1);
    // The entity set now is the second HA's (its backup sensors exist only on 2025.4.4).
    wait_until("the new snapshot", deadline(), || {
        let r = daemon.get("/api/states/sensor.backup_backup_manager_state");
        if r.status == 200 && r.header("X-Cache") == Some("hit") {
            Ok(())
        } else {
            Err(r.status.to_string())
        }
    });
}

#[test]
fn cache_limits_apply_in_place_and_a_broken_config_is_refused() {
    let fake = FakeHa::start("2025.4.4");
    let daemon = Daemon::start_with(&fake, DaemonOptions::default());
    daemon.wait_live();
    let tracked = daemon.get("/status").json()["store"]["tracked"]
        .as_u64()
        .unwrap();
    assert!(tracked > 5);
    rewrite(&daemon, |t| {
        assert!(
            t.contains("[cache]\n"),
            "the harness writes a [cache] table"
        );
        t.replacen("[cache]\n", "[cache]\nmax_entities = 5\n", 1)
    });
    wait_until("the LRU bound shrinks the store", deadline(), || {
        let s = daemon.get("/status").json();
        if s["store"]["entities"].as_u64() == Some(5) {
            Ok(())
        } else {
            Err(s["store"].to_string())
        }
    });
    assert_eq!(daemon.get("/status").json()["cache"]["max_entities"], 5);
    assert!(
        daemon.get("/status").json()["store"]["evictions"]
            .as_u64()
            .unwrap()
            >= tracked - 5
    );
    // The evicted ones were tracked states: counted apart, and the log says what to do.
    assert!(
        daemon.get("/status").json()["store"]["tracked_evictions"]
            .as_u64()
            .unwrap()
            >= tracked - 5
    );
    let metrics = daemon.get("/metrics").text();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("hass_edge_cache_tracked_evictions_total "))
        .expect("the metric is exported");
    assert!(
        line.rsplit(' ').next().unwrap().parse::<u64>().unwrap() >= tracked - 5,
        "{line}"
    );
    wait_until("the warning", deadline(), || {
        if daemon.log().contains("raise max_entities") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    assert_eq!(fake.sessions().len(), 1, "no reconnect for a cache change");

    rewrite(&daemon, |t| format!("{t}\nthis is not toml ["));
    wait_until("the refusal is logged", deadline(), || {
        if daemon.log().contains("reload rejected") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(daemon.health().unwrap().0, 200);
    assert_eq!(
        daemon.get("/status").json()["cache"]["max_entities"],
        5,
        "the old config stays in force"
    );
    assert_eq!(fake.sessions().len(), 1);
}

/// While a rejected token is held (no more attempts until it changes), a reload must apply
/// like any other: the hold keeps waiting without holding on to the config, so the daemon
/// neither dies nor stops picking up a corrected token afterwards.
#[test]
fn a_reload_while_a_rejected_token_is_held_applies() {
    let max_delay = 2;
    let fake = FakeHa::start("2025.4.4");
    let daemon = Daemon::start_with(
        &fake,
        DaemonOptions::default().token("not-the-right-token").set(
            "reconnect",
            "max_delay_seconds",
            max_delay,
        ),
    );
    wait_until(
        "the token is held after its retries",
        Duration::from_secs(30),
        || {
            let n = fake.auth_attempts().len() as u32;
            if n > hass_edge::ha::SAME_TOKEN_RETRIES {
                Ok(())
            } else {
                Err(format!("{n} attempts"))
            }
        },
    );
    // Past the back-off after the last attempt: the link is now in the hold.
    std::thread::sleep(Duration::from_millis(max_delay * 1000 + 700));
    rewrite(&daemon, |t| {
        t.replacen("[cache]\n", "[cache]\nmax_entities = 7\n", 1)
    });
    wait_until("the reload applies", deadline(), || {
        if daemon.log().contains("reload done") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    assert_eq!(daemon.get("/status").json()["cache"]["max_entities"], 7);
    assert_eq!(daemon.health().unwrap().1["status"], "auth_failed");

    std::fs::write(daemon.dir.path.join("token"), support::fake_ha::TOKEN).unwrap();
    daemon.wait_live();
}
