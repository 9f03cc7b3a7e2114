//! Fuzz regressions on stable: every seed of the cargo-fuzz targets (`fuzz/seeds/<target>/`)
//! and every input a fuzzer ever found (`tests/fuzz_regressions/<target>/`) goes through the
//! same code the fuzz target runs (`fuzz/src/drive.rs`, compiled here as a module), and must
//! not panic. The `ha_frame` target also gets every recorded HA frame in `tests/fixtures/`
//! directly, so new recordings are covered without regenerating seeds.
//!
//! `FUZZ_REPLAY_CORPUS=1 cargo test --test fuzz_regressions` also replays the corpus a local
//! `fuzz/run.sh` grew. A finding is added by copying the artifact (`fuzz/artifacts/<target>/crash-…`) into
//! `tests/fuzz_regressions/<target>/` under a name that says what it hit.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

#[allow(dead_code)]
#[path = "../fuzz/src/drive.rs"]
mod drive;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Files directly in `dir` (none when it does not exist), sorted; dotfiles (`.gitkeep`) skipped.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    v.sort();
    v
}

/// Runs `target` on each input; returns the names of those that panicked.
fn replay(inputs: &[(String, Vec<u8>)], target: fn(&[u8])) -> Vec<String> {
    let mut failed = Vec::new();
    for (name, bytes) in inputs {
        if catch_unwind(AssertUnwindSafe(|| target(bytes))).is_err() {
            failed.push(name.clone());
        }
    }
    failed
}

/// Seeds and saved findings of one target; with `FUZZ_REPLAY_CORPUS=1` also the corpus a
/// local `fuzz/run.sh` grew (`fuzz/corpus/<target>/`, not in git).
fn saved_inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut inputs = Vec::new();
    let mut dirs = vec![
        root().join("fuzz/seeds").join(target),
        root().join("tests/fuzz_regressions").join(target),
    ];
    if std::env::var_os("FUZZ_REPLAY_CORPUS").is_some_and(|v| v == "1") {
        dirs.push(root().join("fuzz/corpus").join(target));
    }
    for dir in dirs {
        for f in files(&dir) {
            let bytes = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            inputs.push((
                f.strip_prefix(root()).unwrap_or(&f).display().to_string(),
                bytes,
            ));
        }
    }
    inputs
}

fn check(target: &str, run: fn(&[u8]), extra: Vec<(String, Vec<u8>)>, min_inputs: usize) {
    let mut inputs = saved_inputs(target);
    inputs.extend(extra);
    assert!(
        inputs.len() >= min_inputs,
        "{target}: only {} inputs; are fuzz/seeds/{target}/ and tests/fuzz_regressions/{target}/ there?",
        inputs.len()
    );
    let failed = replay(&inputs, run);
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs panicked: {failed:#?}",
        failed.len(),
        inputs.len()
    );
}

#[test]
fn http_request_inputs_do_not_panic() {
    check("http_request", drive::http_request, Vec::new(), 5);
}

#[test]
fn config_inputs_do_not_panic() {
    check("config", drive::config, Vec::new(), 3);
}

#[test]
fn ha_frame_inputs_do_not_panic() {
    // Every recorded frame as it is, and with the subscription id the live session uses.
    let mut extra = Vec::new();
    for version in ["2024.3.3", "2025.4.4"] {
        for f in files(&root().join("tests/fixtures").join(version)) {
            let text =
                std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            let name = f.strip_prefix(root()).unwrap_or(&f).display().to_string();
            extra.push((name.clone(), text.clone().into_bytes()));
            for (i, line) in text.lines().enumerate() {
                extra.push((format!("{name}:{}", i + 1), line.as_bytes().to_vec()));
                if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(line)
                    && v.get("id").is_some()
                {
                    v["id"] = drive::ENTITIES_ID.into();
                    extra.push((
                        format!("{name}:{} (id {})", i + 1, drive::ENTITIES_ID),
                        v.to_string().into_bytes(),
                    ));
                }
            }
        }
    }
    check("ha_frame", drive::ha_frame_all_versions, extra, 50);
}

#[test]
fn entity_id_inputs_do_not_panic() {
    check("entity_id", drive::entity_id, Vec::new(), 10);
}

#[test]
fn sse_selection_inputs_agree_with_the_reference() {
    // The reference itself, on README's example and the edge cases it names.
    let list = "light.,switch.kitchen,sensor.temp*";
    for (id, want) in [
        ("light.kitchen", true),
        ("switch.kitchen", true),
        ("switch.kitchen_2", false),
        ("sensor.temperature", true),
        ("sensor.humidity", false),
    ] {
        assert_eq!(drive::reference_matches(list, id), want, "{id}");
    }
    assert!(drive::reference_matches(" , ", "anything.at_all"));
    check("sse_selection", drive::sse_selection, Vec::new(), 5);
}

#[test]
fn state_file_inputs_do_not_panic() {
    check("state_file", drive::state_file, Vec::new(), 10);
    // The good seed reaches the path where a file is used, not only the refusals.
    let good = std::fs::read(root().join("fuzz/seeds/state_file/regular-good")).unwrap();
    let saved = hass_edge::persist::decode(&good[1..]).expect("the good seed decodes");
    assert_eq!(saved.states.len(), 1);
}

#[test]
fn ws_session_inputs_keep_has_rules() {
    check("ws_session", drive::ws_session, Vec::new(), 10);
}
