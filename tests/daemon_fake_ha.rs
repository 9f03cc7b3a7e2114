//! The real daemon binary against a fake Home Assistant that replays frames recorded from
//! real HA 2024.3.3 and 2025.4.4 (`tests/fixtures/`), for the faults a real HA cannot
//! produce on demand: dropped and refused connections, missing pongs, coalesced bursts,
//! malformed frames, a rejected token. Each test checks what a user of the local API (or
//! systemd) would notice. See `tests/support/` for the fake and the harness.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::daemon::slowdown;
use support::fake_ha::{SessionEnd, TOKEN};
use support::fixtures::{self, Fixtures, VERSIONS};
use support::{Daemon, DaemonOptions, FakeHa, deadline, wait_until};

/// Starts a fake HA of `version` and a daemon against it; returns once the daemon is live.
fn live(version: &'static str, options: DaemonOptions) -> (FakeHa, Daemon) {
    let fake = FakeHa::start(version);
    let daemon = Daemon::start_with(&fake, options);
    daemon.wait_live();
    (fake, daemon)
}

fn listed_ids(daemon: &Daemon) -> Vec<String> {
    let r = daemon.get("/api/states");
    assert_eq!(r.status, 200, "/api/states: {}", r.text());
    r.json()
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s["entity_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until the tracked list holds exactly `want` (no read-through side effects while
/// waiting), then checks `GET /api/states/<id>` answers it from the store.
fn wait_for_state(daemon: &Daemon, want: &Value) {
    let id = want["entity_id"].as_str().unwrap();
    wait_until(
        &format!("/api/states to hold HA's new state of {id}"),
        deadline(),
        || {
            let list = daemon.get("/api/states").json();
            match list
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["entity_id"] == id)
            {
                Some(s) if s == want => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    );
    let r = daemon.get(&format!("/api/states/{id}"));
    assert_eq!(r.status, 200, "{id}: {}", r.text());
    assert_eq!(r.json(), *want, "{id}");
    assert_eq!(
        (r.header("X-Cache"), r.header("Age")),
        (Some("hit"), Some("0")),
        "{id} is tracked: served from the store"
    );
}

/// Waits until `/api/states` lists exactly the fake's tracked entities, objects included.
fn wait_for_list_equal_to_fake(daemon: &Daemon, fake: &FakeHa) {
    wait_until(
        "/api/states to equal HA's tracked states",
        deadline(),
        || {
            let want = Value::Array(fake.tracked_entities());
            let got = daemon.get("/api/states").json();
            if got == want {
                Ok(())
            } else {
                let ids = |v: &Value| -> BTreeSet<String> {
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(|s| s["entity_id"].as_str().unwrap().to_owned())
                        .collect()
                };
                let (g, w) = (ids(&got), ids(&want));
                let differing: Vec<&Value> = want
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|s| !got.as_array().unwrap().contains(s))
                    .collect();
                Err(format!(
                    "only in daemon: {:?}; only in HA: {:?}; differing: {differing:?}",
                    g.difference(&w).collect::<Vec<_>>(),
                    w.difference(&g).collect::<Vec<_>>()
                ))
            }
        },
    );
}

fn assert_not_found_via_rest(daemon: &Daemon, fake: &FakeHa, id: &str) {
    let before = fake.rest_reads_of(id);
    let r = daemon.get(&format!("/api/states/{id}"));
    assert_eq!(r.status, 404, "{id}: {}", r.text());
    assert_eq!(
        r.json(),
        json!({"message": "Entity not found."}),
        "HA's 404 shape"
    );
    assert_eq!(r.header("X-Cache"), Some("miss"), "{id}: asked HA");
    assert_eq!(fake.rest_reads_of(id), before + 1, "{id}: one REST read");
}

// ---- the fake itself ----------------------------------------------------------------------

/// The fake is only worth something if it says what HA said: its snapshot of the recorded
/// states equals HA's recorded snapshot, and its diffs equal HA's recorded events for the
/// same changes (floats compared at the microsecond, the resolution of HA's REST output).
#[test]
fn fake_ha_speaks_like_the_recordings() {
    for version in VERSIONS {
        let f = Fixtures::new(version);
        let sub_micro = f.sub_microsecond_floats();
        let recorded = f.json("subscribe_entities_initial.json")["event"]["a"].clone();
        let states = f.initial_states();
        assert_eq!(states.len(), recorded.as_object().unwrap().len());
        for s in &states {
            let id = s["entity_id"].as_str().unwrap();
            assert_eq!(
                fixtures::round_floats_to_micros(&fixtures::compressed_state(s, sub_micro)),
                fixtures::round_floats_to_micros(&recorded[id]),
                "{version}: compressed {id}"
            );
        }
        let normalise = |mut v: Value| {
            if let Some(removed) = v.pointer_mut("/-/a").and_then(Value::as_array_mut) {
                removed.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
            }
            fixtures::round_floats_to_micros(&v)
        };
        let events = f.lines("subscribe_entities_events.jsonl");
        let changes = f.state_changed();
        assert_eq!(
            events.len(),
            changes.len(),
            "{version}: one subscribe_entities event per state_changed"
        );
        for (line, (id, old, new)) in events.iter().zip(changes) {
            let event = serde_json::from_str::<Value>(line).unwrap()["event"].clone();
            let ours = match (old.is_null(), new.is_null()) {
                (true, _) => json!({"a": {&id: fixtures::compressed_state(&new, sub_micro)}}),
                (_, true) => json!({"r": [&id]}),
                _ => json!({"c": {&id: normalise(fixtures::state_diff(&old, &new, sub_micro))}}),
            };
            let theirs = match event.get("c") {
                Some(c) => json!({"c": {&id: normalise(c[&id].clone())}}),
                None => event.clone(),
            };
            assert_eq!(
                fixtures::round_floats_to_micros(&ours),
                fixtures::round_floats_to_micros(&theirs),
                "{version}: event for {id}"
            );
        }
    }
}

// ---- 1. snapshot, diffs, removals -----------------------------------------------------------

fn snapshot_diffs_and_removals(version: &'static str) {
    let (fake, daemon) = live(version, DaemonOptions::default());

    // Every tracked entity reads back exactly as HA's REST would answer it, from the store —
    // `last_reported` included, which the compressed snapshot lacks (HA >= 2024.4 re-reports
    // some states without an event; the daemon asks `get_states` right after the snapshot).
    let tracked = fake.tracked_entities();
    assert!(tracked.len() >= 25, "the recordings hold many entities");
    let re_reported = tracked
        .iter()
        .filter(|s| {
            s.get("last_reported")
                .is_some_and(|r| *r != s["last_updated"])
        })
        .count();
    assert_eq!(
        re_reported > 0,
        fake.fixtures().has_last_reported(),
        "2025.4.4 recorded re-reported states"
    );
    wait_for_list_equal_to_fake(&daemon, &fake);
    for want in &tracked {
        let id = want["entity_id"].as_str().unwrap();
        let r = daemon.get(&format!("/api/states/{id}"));
        assert_eq!(r.status, 200, "{version} {id}: {}", r.text());
        assert_eq!(
            r.json(),
            *want,
            "{version}: {id} differs from HA's state object"
        );
        assert_eq!(r.header("X-Cache"), Some("hit"), "{version} {id}");
        assert_eq!(
            r.header("Age"),
            Some("0"),
            "{version} {id}: pushed and live means current"
        );
    }
    assert!(
        fake.rest_requests().is_empty(),
        "tracked reads never ask HA: {:?}",
        fake.rest_requests()
    );
    // The list is exactly the tracked ones (the default filter drops automation.*).
    let list = daemon.get("/api/states");
    assert_eq!(list.status, 200);
    assert_eq!(
        list.json(),
        Value::Array(tracked.clone()),
        "{version}: /api/states"
    );
    assert!(
        !listed_ids(&daemon)
            .iter()
            .any(|id| id.starts_with("automation."))
    );

    // A `c` diff: state, attributes added/changed/removed, a user's context.
    let light = fake.next_state("light.kitchen", |s| {
        s["state"] = "on".into();
        s["attributes"]["color_mode"] = "brightness".into();
        s["attributes"]["brightness"] = 200.into();
        s["attributes"]
            .as_object_mut()
            .unwrap()
            .shift_remove("supported_features");
    });
    assert_eq!(fake.push_change(light.clone()), 1, "one live subscriber");
    wait_for_state(&daemon, &light);
    // An attribute-only change (`lu`: last_changed stays).
    let temp = fake.next_state("sensor.living_temperature", |s| {
        s["attributes"]["friendly_name"] = "Living room".into()
    });
    assert_eq!(
        temp["last_changed"],
        fake.entity("sensor.living_temperature").unwrap()["last_changed"]
    );
    fake.push_change(temp.clone());
    wait_for_state(&daemon, &temp);
    // An `a`: a new entity.
    let added = fake.new_entity(
        "sensor.pushed_later",
        "17",
        json!({"unit_of_measurement": "W", "friendly_name": "Pushed later"}),
    );
    fake.push_change(added.clone());
    wait_for_state(&daemon, &added);
    // An `r`: gone from the list, and a read asks HA, which says 404.
    fake.push_remove("input_boolean.garage_open");
    wait_until(
        "input_boolean.garage_open to leave /api/states",
        deadline(),
        || {
            let ids = listed_ids(&daemon);
            if ids.iter().any(|i| i == "input_boolean.garage_open") {
                Err(format!("{ids:?}"))
            } else {
                Ok(())
            }
        },
    );
    assert_not_found_via_rest(&daemon, &fake, "input_boolean.garage_open");

    wait_for_list_equal_to_fake(&daemon, &fake);
    let r = daemon.get("/api/states/input_boolean.kitchen");
    assert_eq!(
        (r.header("X-Cache"), r.header("Age")),
        (Some("hit"), Some("0"))
    );
    assert_eq!(
        fake.protocol_errors(),
        Vec::<String>::new(),
        "the daemon spoke HA's protocol"
    );
    assert_eq!(fake.sessions().len(), 1, "no reconnects");
    assert!(
        !daemon.log().contains(TOKEN),
        "the debug log never shows the token"
    );
}

#[test]
fn snapshot_diffs_and_removals_2024_3_3() {
    snapshot_diffs_and_removals("2024.3.3");
}

#[test]
fn snapshot_diffs_and_removals_2025_4_4() {
    snapshot_diffs_and_removals("2025.4.4");
}

// ---- 2. excluded domains read through REST; 404s are cached ---------------------------------

fn excluded_domain_reads_through_rest(version: &'static str) {
    let (fake, daemon) = live(version, DaemonOptions::default());
    let id = "automation.doorbell_sets_message";
    let want = fake.entity(id).expect("the recordings have an automation");
    assert!(!listed_ids(&daemon).contains(&id.to_owned()));

    let r = daemon.get(&format!("/api/states/{id}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), want);
    assert_eq!(r.header("X-Cache"), Some("miss"));
    assert_eq!(fake.rest_reads_of(id), 1);
    let r = daemon.get(&format!("/api/states/{id}"));
    assert_eq!(
        (r.status, r.header("X-Cache")),
        (200, Some("hit")),
        "the REST answer is cached"
    );
    assert_eq!(r.json(), want);
    assert_eq!(fake.rest_reads_of(id), 1, "no second REST read");

    let unknown = "sensor.does_not_exist";
    assert_not_found_via_rest(&daemon, &fake, unknown);
    let r = daemon.get(&format!("/api/states/{unknown}"));
    assert_eq!(
        (r.status, r.header("X-Cache")),
        (404, Some("hit")),
        "HA's 404 is cached: {}",
        r.text()
    );
    assert_eq!(r.json(), json!({"message": "Entity not found."}));
    assert_eq!(
        fake.rest_reads_of(unknown),
        1,
        "no second REST read within negative_ttl"
    );
    assert!(
        fake.rest_requests().iter().all(|r| r.authorized),
        "REST reads carry the token"
    );

    // Live events for an excluded domain are not tracked either (HA before 2024.9 sends
    // them: it has no server-side filter).
    let session = &fake.sessions()[0];
    if fake.fixtures().has_ha_filter() {
        let filter = session
            .ha_filter
            .as_ref()
            .expect("the server-side filter is used from HA 2024.9");
        assert!(
            filter["exclude"]["domains"]
                .as_array()
                .unwrap()
                .contains(&json!("automation")),
            "{filter}"
        );
    } else {
        assert!(
            session.ha_filter.is_none(),
            "HA 2024.3.3 refuses include/exclude"
        );
    }
    let new_automation = fake.new_entity(
        "automation.added_later",
        "on",
        json!({"friendly_name": "Added later"}),
    );
    fake.push_change(new_automation);
    let marker = fake.next_state("input_boolean.kitchen", |s| s["state"] = "on".into());
    fake.push_change(marker.clone());
    wait_for_state(&daemon, &marker);
    assert!(!listed_ids(&daemon).contains(&"automation.added_later".to_owned()));
    assert_eq!(fake.protocol_errors(), Vec::<String>::new());
}

#[test]
fn excluded_domain_reads_through_rest_2024_3_3() {
    excluded_domain_reads_through_rest("2024.3.3");
}

#[test]
fn excluded_domain_reads_through_rest_2025_4_4() {
    excluded_domain_reads_through_rest("2025.4.4");
}

// ---- 3. a rejected token ---------------------------------------------------------------------

#[test]
fn rejected_token_reports_auth_failed_and_retries_slowly() {
    let max_delay = 3;
    let fake = FakeHa::start("2025.4.4");
    let daemon = Daemon::start_with(
        &fake,
        DaemonOptions::default().token("not-the-right-token").set(
            "reconnect",
            "max_delay_seconds",
            max_delay,
        ),
    );
    wait_until("/health 503 auth_failed", deadline(), || {
        match daemon.health() {
            Ok((503, body)) if body["status"] == "auth_failed" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    // It keeps trying (a rotated token would be picked up), but at most once per
    // max_delay: every failed auth counts toward HA's IP ban.
    let attempts = wait_until("3 auth attempts", Duration::from_secs(40), || {
        let a = fake.auth_attempts();
        if a.len() >= 3 {
            Ok(a)
        } else {
            Err(format!("{} so far", a.len()))
        }
    });
    assert!(attempts.iter().all(|a| !a.accepted));
    for pair in attempts.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(max_delay * 1000 - 100),
            "auth retried after {gap:?}, max_delay is {max_delay}s: {attempts:?}"
        );
    }
    let (status, body) = daemon.health().unwrap();
    assert_eq!(
        (status, body["status"].as_str()),
        (503, Some("auth_failed")),
        "{body}"
    );
    assert_eq!(fake.subscribed_sessions(), 0);
    for s in fake.sessions().iter().filter(|s| s.ended.is_some()) {
        assert_eq!(
            s.ended.as_ref().unwrap().1,
            SessionEnd::ClosedByFake(1000),
            "HA closes with 1000 after auth_invalid"
        );
    }
    assert!(
        !daemon.log().contains("not-the-right-token"),
        "the token stays out of the log"
    );

    // HA forgets failed logins only after a success: after 1 + SAME_TOKEN_RETRIES rejections
    // the same token is not sent again (a fourth and fifth would get this address banned).
    assert_eq!(attempts.len() as u32, 1 + hass_edge::ha::SAME_TOKEN_RETRIES);
    std::thread::sleep(Duration::from_secs(max_delay * 3));
    assert_eq!(
        fake.auth_attempts().len(),
        attempts.len(),
        "no attempt with the rejected token after the retries"
    );
    // REST would be a 401 too, which HA also counts: none is made.
    let r = daemon.get("/api/states/automation.doorbell_sets_message");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(fake.rest_requests().len(), 0);

    // A new (valid) token in the file is picked up at the next check, without a restart.
    std::fs::write(daemon.dir.path.join("token"), support::fake_ha::TOKEN).unwrap();
    daemon.wait_live();
}

// ---- large frames ----------------------------------------------------------------------------

/// After a frame larger than its read buffer (a snapshot, a huge attribute) the daemon frees
/// the buffer by rebuilding the WebSocket around the same TCP stream. Nothing around it may
/// be lost: the frames HA wrote right behind the large one (read with it), and the protocol
/// ping between them, whose pong tungstenite only sends on its next read.
fn large_frames_lose_nothing(version: &'static str) {
    let fake = FakeHa::start(version);
    for i in 0..150 {
        fake.set_entity(fake.new_entity(
            &format!("sensor.large_{i:03}"),
            &i.to_string(),
            json!({"friendly_name": format!("Large {i}"), "blob": "x".repeat(600)}),
        ));
    }
    let daemon = Daemon::start_with(&fake, DaemonOptions::default());
    daemon.wait_live();
    wait_for_list_equal_to_fake(&daemon, &fake);
    wait_until("the snapshot's buffer to be released", deadline(), || {
        if daemon.log().contains("releasing the WebSocket read buffer") {
            Ok(())
        } else {
            Err("no release logged".into())
        }
    });
    for round in 0..3 {
        let mut news = vec![fake.next_state("sensor.large_000", |s| {
            s["attributes"]["blob"] = json!(format!("{round}").repeat(200_000))
        })];
        for i in 1..60 {
            news.push(fake.next_state(&format!("sensor.large_{i:03}"), |s| {
                s["state"] = json!(format!("round {round}"))
            }));
        }
        assert_eq!(fake.push_burst(news), 1);
        wait_for_list_equal_to_fake(&daemon, &fake);
        let pongs = fake.sessions()[0].protocol_pongs;
        wait_until(
            "the ping behind the large frame to be answered",
            deadline(),
            || {
                if fake.sessions()[0].protocol_pongs > round {
                    Ok(())
                } else {
                    Err(format!("{pongs} pongs"))
                }
            },
        );
    }
    assert_eq!(
        fake.sessions().len(),
        1,
        "one session throughout: no frame was lost or cut"
    );
    assert!(
        fake.protocol_errors().is_empty(),
        "{:?}",
        fake.protocol_errors()
    );
    let releases = daemon
        .log()
        .matches("releasing the WebSocket read buffer")
        .count();
    assert!(
        releases >= 2,
        "the snapshot's and a burst's buffers were released ({releases})"
    );
}

#[test]
fn large_frames_lose_nothing_2024_3_3() {
    large_frames_lose_nothing("2024.3.3");
}

#[test]
fn large_frames_lose_nothing_2025_4_4() {
    large_frames_lose_nothing("2025.4.4");
}

// ---- 4. coalesced frames -----------------------------------------------------------------------

/// HA packs many messages into one JSON-array frame under load (`coalesce_messages`). The
/// recorded events, packed that way, must all apply: every entity ends up as HA's own
/// recorded `state_changed` `new_state`.
fn coalesced_frames_apply_in_full(version: &'static str) {
    let (fake, daemon) = live(version, DaemonOptions::default());
    assert!(
        fake.sessions()[0].coalescing,
        "the daemon asks for coalesce_messages"
    );
    let f = fake.fixtures();
    let finals = f.final_states();
    for (id, state) in &finals {
        match state {
            Some(s) => fake.set_entity(s.clone()),
            None => fake.remove_entity(id),
        }
    }
    let events = f.lines("subscribe_entities_events.jsonl");
    for chunk in events.chunks(8) {
        let sent = fake.push_frame(|sub| {
            format!(
                "[{}]",
                chunk
                    .iter()
                    .map(|e| fixtures::with_id(e, sub))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        });
        assert_eq!(sent, 1);
    }
    for (id, state) in &finals {
        if !fixtures::tracked_by_default(id) {
            continue;
        }
        match state {
            Some(s) => wait_for_state(&daemon, s),
            None => {
                wait_until(&format!("{id} to be gone"), deadline(), || {
                    if listed_ids(&daemon).contains(id) {
                        Err("still listed".into())
                    } else {
                        Ok(())
                    }
                });
                assert_not_found_via_rest(&daemon, &fake, id);
            }
        }
    }
    wait_for_list_equal_to_fake(&daemon, &fake);
    assert_eq!(fake.sessions().len(), 1);
}

#[test]
fn coalesced_frames_apply_in_full_2024_3_3() {
    coalesced_frames_apply_in_full("2024.3.3");
}

#[test]
fn coalesced_frames_apply_in_full_2025_4_4() {
    coalesced_frames_apply_in_full("2025.4.4");
}

// ---- 5. HA restarts; changes while the daemon was away ---------------------------------------

fn resyncs_after_ha_restart(version: &'static str) {
    let (fake, daemon) = live(
        version,
        DaemonOptions::default().set("reconnect", "max_delay_seconds", 1),
    );
    let kitchen_before = daemon.get("/api/states/input_boolean.kitchen").json();

    fake.set_refusing(true);
    fake.restart_like_ha();
    let body = daemon.wait_health(503);
    assert!(
        ["backoff", "connecting"].contains(&body["status"].as_str().unwrap()),
        "{body}"
    );
    // While HA is away, the last known states are still served; the list says stale.
    let r = daemon.get("/api/states/input_boolean.kitchen");
    assert_eq!((r.status, r.json()), (200, kitchen_before));
    assert_eq!(daemon.get("/api/states").header("X-Cache"), Some("stale"));

    // Meanwhile in HA: one entity deleted, one changed, one created.
    fake.remove_entity("input_boolean.garage_open");
    let kitchen = fake.next_state("input_boolean.kitchen", |s| s["state"] = "on".into());
    fake.set_entity(kitchen.clone());
    let created = fake.new_entity(
        "sensor.created_while_away",
        "3",
        json!({"friendly_name": "Created while away"}),
    );
    fake.set_entity(created.clone());

    wait_until("the daemon to retry while HA refuses", deadline(), || {
        let n = fake.refused();
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} refused"))
        }
    });
    assert_eq!(daemon.health().unwrap().0, 503, "not live while HA is down");

    fake.set_refusing(false);
    daemon.wait_live();
    wait_for_list_equal_to_fake(&daemon, &fake);
    wait_for_state(&daemon, &kitchen);
    wait_for_state(&daemon, &created);
    assert_not_found_via_rest(&daemon, &fake, "input_boolean.garage_open");

    let sessions = fake.sessions();
    let expected_end = if version == "2024.3.3" {
        SessionEnd::DroppedByFake
    } else {
        SessionEnd::ClosedByFake(1000)
    };
    assert_eq!(
        sessions[0].ended.as_ref().map(|e| e.1.clone()),
        Some(expected_end)
    );
    assert_eq!(fake.subscribed_sessions(), 2, "one resync");
    assert_eq!(fake.protocol_errors(), Vec::<String>::new());
}

#[test]
fn resyncs_after_ha_restart_2024_3_3() {
    resyncs_after_ha_restart("2024.3.3");
}

#[test]
fn resyncs_after_ha_restart_2025_4_4() {
    resyncs_after_ha_restart("2025.4.4");
}

// ---- 6. a half-open connection: no pong ------------------------------------------------------

#[test]
fn missing_pong_opens_a_new_connection() {
    let options = DaemonOptions::default()
        .set("heartbeat", "interval_seconds", 1)
        .set("heartbeat", "timeout_seconds", 1)
        .set("reconnect", "max_delay_seconds", 1);
    let (fake, daemon) = live("2024.3.3", options);
    // Answered pings keep the connection.
    wait_until("3 answered pings", deadline(), || {
        let s = fake.sessions();
        if s[0].pings >= 3 {
            Ok(())
        } else {
            Err(format!("{} pings", s[0].pings))
        }
    });
    assert_eq!(
        fake.sessions().len(),
        1,
        "answered pings never cause a reconnect"
    );

    let muted_at = Instant::now();
    fake.mute_pongs();
    // interval + timeout + back-off is about 3 s.
    wait_until(
        "a new subscribed session after pongs stopped",
        Duration::from_secs(15) * slowdown(),
        || {
            let n = fake.subscribed_sessions();
            if n >= 2 {
                Ok(())
            } else {
                Err(format!(
                    "{n} subscribed sessions; {:?}",
                    fake.sessions().last().map(|s| &s.ended)
                ))
            }
        },
    );
    let sessions = fake.sessions();
    let (ended_at, end) = sessions[0]
        .ended
        .clone()
        .expect("the silent session was given up");
    assert!(
        matches!(end, SessionEnd::ClientClosed(_) | SessionEnd::ClientGone(_)),
        "the daemon (not the fake) ended the silent session: {end:?}"
    );
    assert!(ended_at > muted_at);
    daemon.wait_live();
}

// ---- 7. malformed frames ---------------------------------------------------------------------

fn malformed_frames_are_survived(version: &'static str) {
    let (fake, daemon) = live(version, DaemonOptions::default());
    let light = fake.next_state("light.kitchen", |s| s["state"] = "on".into());
    let good_diff = fake.diff_to(&light);
    let good_add = fake.new_entity("sensor.good_add", "1", json!({}));
    // Entities that get a bad entry: HA still has them as they were.
    let spoiled = [
        "input_boolean.kitchen",
        "switch.coffee_maker",
        "sensor.living_temperature",
    ];
    let before: Vec<Value> = spoiled.iter().map(|id| fake.entity(id).unwrap()).collect();

    fake.push_frame(|_| "this is not JSON".into());
    fake.push_frame(|sub| format!(r#"[{{"type":"event","event":{{"c":{{}}}},"id":{sub}}},"#));
    fake.push_frame(|sub| format!(r#"{{"type":"event","event":{{"x":1}},"id":{sub}}}"#));
    // Bad entries next to good ones: a diff of the wrong type, a diff that cannot be
    // applied (a negative time), a full state without its required keys.
    fake.set_entity(light.clone());
    fake.push_event(json!({"c": {
        "input_boolean.kitchen": {"+": {"s": 5}},
        "light.kitchen": good_diff,
        "switch.coffee_maker": {"+": {"s": "on", "lc": -5.0}},
    }}));
    fake.set_entity(good_add.clone());
    let sub_micro = fake.fixtures().sub_microsecond_floats();
    fake.push_event(json!({"a": {
        "sensor.bad_add": {"s": "1"},
        "sensor.living_temperature": {"s": "22.0"},
        "sensor.good_add": fixtures::compressed_state(&good_add, sub_micro),
    }}));

    wait_for_state(&daemon, &light);
    wait_for_state(&daemon, &good_add);
    let ids = listed_ids(&daemon);
    assert!(
        !ids.contains(&"sensor.bad_add".to_owned()),
        "an undecodable add is not listed"
    );
    for (id, old) in spoiled.iter().zip(before) {
        assert!(
            !ids.contains(&id.to_string()),
            "{id}: an entity with a bad update is dropped, not kept stale"
        );
        let r = daemon.get(&format!("/api/states/{id}"));
        assert_eq!(
            (r.status, r.header("X-Cache")),
            (200, Some("miss")),
            "{id}: read through HA instead: {}",
            r.text()
        );
        assert_eq!(r.json(), old, "{id}");
    }

    // The link carries on: same session, later events apply.
    let cover = fake.next_state("cover.garage_door", |s| s["state"] = "open".into());
    fake.push_change(cover.clone());
    wait_for_state(&daemon, &cover);
    assert_eq!(daemon.health().unwrap().0, 200);
    assert_eq!(
        fake.sessions().len(),
        1,
        "malformed frames do not cost the connection"
    );
}

#[test]
fn malformed_frames_are_survived_2024_3_3() {
    malformed_frames_are_survived("2024.3.3");
}

#[test]
fn malformed_frames_are_survived_2025_4_4() {
    malformed_frames_are_survived("2025.4.4");
}

// ---- 8. SIGTERM ------------------------------------------------------------------------------

#[test]
fn sigterm_closes_the_websocket_and_exits_zero() {
    let (fake, mut daemon) = live("2025.4.4", DaemonOptions::default());
    // A keep-alive client idling on the API must not hold shutdown up.
    let mut idle = daemon.connect();
    assert_eq!(idle.request("GET", "/health", &[]).unwrap().status, 200);

    let sent = Instant::now();
    daemon.signal("TERM");
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .expect("hass-edge exits on SIGTERM");
    let took = sent.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    // The daemon's own bound is 2 s; 1 s more for process teardown on a loaded machine.
    assert!(
        took < Duration::from_secs(2) + Duration::from_secs(1) * slowdown(),
        "took {took:?} to exit"
    );
    wait_until(
        "HA to receive a Close frame",
        Duration::from_secs(5),
        || {
            let s = fake.sessions();
            if s[0].client_sent_close {
                Ok(())
            } else {
                Err(format!("{:?}", s[0].ended))
            }
        },
    );
    assert!(
        idle.closed_by_server(Duration::from_secs(5)),
        "the idle API connection is closed"
    );
}

// ---- 9. configuration errors -----------------------------------------------------------------

#[test]
fn bad_config_exits_78_naming_the_key() {
    let dir = support::daemon::TempDir::new("config");
    let token = dir.write("token", "tok\n");
    let base = format!(
        "[ha]\nurl = \"http://127.0.0.1:9\"\ntoken_file = \"{}\"\n",
        token.display()
    );
    let listen = format!("\"127.0.0.1:{}\"", support::daemon::free_port());
    let cases = [
        ("[cache]\nmax_entities = 0\n", "cache.max_entities"),
        ("[cache]\nmax_entitys = 5\n", "max_entitys"),
        ("[cachee]\nttl_seconds = 5\n", "cachee"),
        (
            "[heartbeat]\ntimeout_seconds = 0\n",
            "heartbeat.timeout_seconds",
        ),
        (
            "[reconnect]\nmax_delay_seconds = \"soon\"\n",
            "max_delay_seconds",
        ),
    ];
    for (i, (section, key)) in cases.iter().enumerate() {
        let config = dir.write(
            &format!("bad{i}.toml"),
            &format!("{base}{section}\n[http]\nlisten = {listen}\n"),
        );
        for args in [
            vec!["--config", config.to_str().unwrap()],
            vec!["check-config", "--config", config.to_str().unwrap()],
        ] {
            let out = support::daemon::run_to_exit(
                support::daemon::command(&args),
                &dir,
                Duration::from_secs(10),
            );
            assert_eq!(out.status.code(), Some(78), "{section:?} {args:?}: {out:?}");
            assert!(
                out.stderr.contains(key),
                "{section:?}: stderr names {key}: {}",
                out.stderr
            );
        }
    }
    // An environment override is checked like the file.
    let good = dir.write("good.toml", &format!("{base}[http]\nlisten = {listen}\n"));
    let mut cmd = support::daemon::command(&["--config", good.to_str().unwrap()]);
    cmd.env("HASS_EDGE_CACHE_MAX_ENTITIES", "0");
    let out = support::daemon::run_to_exit(cmd, &dir, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(out.stderr.contains("cache.max_entities"), "{}", out.stderr);
    // A missing or empty token file is a config error naming the file.
    for (name, token_file) in [
        ("missing", dir.path.join("no-such-token")),
        ("empty", dir.write("empty-token", "\n")),
    ] {
        let config = dir.write(&format!("{name}.toml"), &format!("[ha]\nurl = \"http://127.0.0.1:9\"\ntoken_file = \"{}\"\n[http]\nlisten = {listen}\n", token_file.display()));
        let out = support::daemon::run_to_exit(
            support::daemon::command(&["--config", config.to_str().unwrap()]),
            &dir,
            Duration::from_secs(10),
        );
        assert_eq!(out.status.code(), Some(78), "{name} token: {out:?}");
        assert!(
            out.stderr.contains(token_file.to_str().unwrap()),
            "{name} token: stderr names the file: {}",
            out.stderr
        );
    }
}

#[test]
fn check_config_prints_the_effective_config_but_never_the_token() {
    let dir = support::daemon::TempDir::new("check-config");
    let secret = "s3cr3t-token-value.do-not-print";
    let token = dir.write("token", &format!("{secret}\n"));
    let config = dir.write(
        "config.toml",
        &format!("[ha]\nurl = \"http://192.0.2.7:8123\"\ntoken_file = \"{}\"\n\n[cache]\nmax_entities = 123\n", token.display()),
    );
    let mut cmd = support::daemon::command(&["check-config", "--config", config.to_str().unwrap()]);
    cmd.env("HASS_EDGE_CACHE_TTL_SECONDS", "7");
    let out = support::daemon::run_to_exit(cmd, &dir, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    for expected in [
        format!("token_file = \"{}\"", token.display()),
        "url = \"http://192.0.2.7:8123\"".to_owned(),
        "max_entities = 123".to_owned(),
        "ttl_seconds = 7".to_owned(),
        "max_delay_seconds = 60".to_owned(),
        "listen = \"127.0.0.1:8124\"".to_owned(),
    ] {
        assert!(
            out.stdout.contains(&expected),
            "check-config shows {expected:?}:\n{}",
            out.stdout
        );
    }
    assert!(
        !out.stdout.contains(secret) && !out.stderr.contains(secret),
        "the token is never printed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
}

/// What `check-config` prints is a config the daemon accepts, and means the same: an
/// operator can save it as `/etc/hass-edge/config.toml`.
#[test]
fn check_config_output_is_itself_a_valid_config() {
    let dir = support::daemon::TempDir::new("check-config-roundtrip");
    let token = dir.write("token", "tok\n");
    let config = dir.write(
        "config.toml",
        &format!(
            "[ha]\nurl = \"http://192.0.2.7:8123\"\ntoken_file = \"{}\"\n",
            token.display()
        ),
    );
    let first = support::daemon::run_to_exit(
        support::daemon::command(&["check-config", "--config", config.to_str().unwrap()]),
        &dir,
        Duration::from_secs(10),
    );
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    let saved = dir.write("effective.toml", &first.stdout);
    let second = support::daemon::run_to_exit(
        support::daemon::command(&["check-config", "--config", saved.to_str().unwrap()]),
        &dir,
        Duration::from_secs(10),
    );
    assert_eq!(
        second.status.code(),
        Some(0),
        "the printed config is refused: {}",
        second.stderr
    );
    assert_eq!(second.stdout, first.stdout, "and means the same");
}
