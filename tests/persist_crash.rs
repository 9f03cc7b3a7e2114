//! Warm start (issue #7): `kill -9` in the middle of a save never leaves a state file that
//! `load` rejects or reads partly.
//!
//! The test re-runs its own binary as a child (selected by `--exact crash_writer_child` and
//! the `HASS_EDGE_PERSIST_CRASH_DIR` variable) that writes two large generations of states,
//! A and B, alternately in a tight loop (encoded once, then `persist::write_file`, the I/O
//! half of `persist::save`); the parent SIGKILLs it at random moments and then loads the
//! file, which must be all of A or all of B every time. A kill is a process crash, not a
//! power loss: it checks the temp-file-and-rename protocol, not the fsyncs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hass_edge::entity::{Context, EntityState, Timestamp};
use hass_edge::persist::{self, decode, encode, load, save, temp_path, write_file};
use serde_json::{Map, Value};

/// Set in the child: the directory to write `states.json` in.
const WRITER_ENV: &str = "HASS_EDGE_PERSIST_CRASH_DIR";
/// States per generation natively; about 580 bytes each, so about 11.7 MB per save.
const STATES_NATIVE: usize = 20_000;

/// States per generation: fewer under an emulating runner (qemu takes ~8 s to load 20,000),
/// where the same temp-file-and-rename protocol is checked on a smaller file.
fn states_per_generation() -> usize {
    if std::env::var_os("EDGE_TEST_RUNNER").is_some() {
        STATES_NATIVE / 10
    } else {
        STATES_NATIVE
    }
}
/// Kills to do at least, and kills that must land between the temp file's creation and the
/// rename (kills go on until both are reached, up to `MAX_KILLS`).
const MIN_KILLS: usize = 30;
const MIN_MID_WRITE: usize = 10;
const MAX_KILLS: usize = 60;

/// Generation `tag` (`'A'` or `'B'`): same entities, different states, attributes and times.
fn generation(tag: char) -> (Vec<Rc<EntityState>>, SystemTime) {
    let base: i64 = if tag == 'A' {
        1_763_800_000_000_000
    } else {
        1_763_900_000_000_000
    };
    let states = (0..states_per_generation())
        .map(|i| {
            let mut attributes = Map::new();
            attributes.insert("generation".into(), Value::String(tag.to_string()));
            attributes.insert(
                "friendly_name".into(),
                Value::String(format!("Crash test power meter {i}")),
            );
            attributes.insert("unit_of_measurement".into(), Value::String("W".into()));
            attributes.insert("device_class".into(), Value::String("power".into()));
            attributes.insert("state_class".into(), Value::String("measurement".into()));
            attributes.insert(
                "padding".into(),
                Value::String(format!("{tag}").repeat(120)),
            );
            let t = Timestamp(base + i as i64 * 1_000);
            Rc::new(EntityState {
                entity_id: format!("sensor.crash_test_power_{i:05}"),
                state: format!("{tag}{i}.5"),
                attributes: attributes.into(),
                last_changed: t,
                last_reported: Some(t),
                last_updated: t,
                context: Context {
                    id: format!("01JCRASH{tag}{i:018}"),
                    parent_id: None,
                    user_id: None,
                },
                epoch: Default::default(),
            })
        })
        .collect();
    (states, UNIX_EPOCH + Duration::from_micros(base as u64))
}

/// This test binary again, through `EDGE_TEST_RUNNER` (e.g. `qemu-aarch64-static -L …` when
/// cross-testing: there is no binfmt_misc to run it directly).
fn writer_command() -> Command {
    let exe = std::env::current_exe().unwrap();
    let runner = std::env::var("EDGE_TEST_RUNNER").unwrap_or_default();
    let mut parts = runner.split_whitespace();
    match parts.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(parts).arg(exe);
            c
        }
        None => Command::new(exe),
    }
}

/// The child: writes A and B alternately until killed. Does nothing in a normal test run.
#[test]
fn crash_writer_child() {
    let Some(dir) = std::env::var_os(WRITER_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    // Encoded once, by the parent: in this unoptimised build encoding 10 MB takes ten times
    // longer than writing it, and a kill during encoding tests nothing (`save` is `encode`,
    // which is pure, then `write_file`).
    let [a, b] = ["A.bin", "B.bin"].map(|name| fs::read(dir.join(name)).unwrap());
    let path = dir.join("states.json");
    fs::write(dir.join("ready"), b"").unwrap();
    loop {
        write_file(&path, &a).unwrap();
        write_file(&path, &b).unwrap();
    }
}

/// The writer process; killed on drop, so a failing assertion does not leave it running.
struct Writer(Child);

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Which generation `load` returned; panics on anything else.
fn which(
    path: &Path,
    a: &(Vec<Rc<EntityState>>, SystemTime),
    b: &(Vec<Rc<EntityState>>, SystemTime),
) -> char {
    let saved = match load(path) {
        Ok(Some(saved)) => saved,
        other => panic!("after a kill, load gave {other:?}"),
    };
    for (tag, (states, saved_at)) in [('A', a), ('B', b)] {
        if saved.saved_at == *saved_at {
            assert_eq!(
                saved.states.len(),
                states.len(),
                "generation {tag} is complete"
            );
            assert!(
                saved
                    .states
                    .iter()
                    .zip(states)
                    .all(|(got, want)| got == &**want),
                "generation {tag} has exactly its own states"
            );
            return tag;
        }
    }
    panic!(
        "load gave a file saved at {:?}, neither generation",
        saved.saved_at
    );
}

#[test]
fn kill_9_mid_save_leaves_one_complete_generation() {
    if std::env::var_os(WRITER_ENV).is_some() {
        return;
    }
    let started = Instant::now();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("persist-crash-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("states.json");
    let ready = dir.join("ready");
    let (a, b) = (generation('A'), generation('B'));

    // A file exists before the first kill, as after the daemon's first save.
    let t = Instant::now();
    let bytes = save(&path, &a.0, a.1).unwrap();
    let save_time = t.elapsed();
    let t = Instant::now();
    let encoded = encode(&b.0, b.1);
    let encode_time = t.elapsed();
    let t = Instant::now();
    write_file(&dir.join("timing.json"), &encoded).unwrap();
    let write_time = t.elapsed();
    fs::write(dir.join("A.bin"), encode(&a.0, a.1)).unwrap();
    fs::write(dir.join("B.bin"), &encoded).unwrap();
    let t = Instant::now();
    load(&path).unwrap().unwrap();
    let load_time = t.elapsed();
    println!(
        "{bytes} bytes ({} per state); save {save_time:?} = encode {encode_time:?} + write_file {write_time:?}; load {load_time:?}",
        bytes / states_per_generation() as u64
    );

    let mut rng = fastrand::Rng::new();
    let (mut kills, mut mid_write, mut torn_temps, mut seen) = (0, 0, 0, [0usize; 2]);
    while (kills < MIN_KILLS || mid_write < MIN_MID_WRITE) && kills < MAX_KILLS {
        let _ = fs::remove_file(&ready);
        let mut writer = Writer(
            writer_command()
                .args([
                    "--exact",
                    "crash_writer_child",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(WRITER_ENV, &dir)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let child = &mut writer.0;
        let wait_start = Instant::now();
        while !ready.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the writer exited on its own: {status}");
            }
            assert!(
                wait_start.elapsed() < Duration::from_secs(120),
                "the writer did not start"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // Anywhere in the first few writes: inside one, or between two.
        std::thread::sleep(write_time.mul_f64(rng.f64() * 3.0));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(
            std::os::unix::process::ExitStatusExt::signal(&status) == Some(9),
            "the writer ended by itself: {status}"
        );
        kills += 1;

        let tmp = temp_path(&path);
        if tmp.exists() {
            mid_write += 1;
            // The half-written temp file is exactly what decode exists to refuse.
            let partial = fs::read(&tmp).unwrap();
            if decode(&partial).is_err() {
                torn_temps += 1;
            }
        }
        match which(&path, &a, &b) {
            'A' => seen[0] += 1,
            _ => seen[1] += 1,
        }
        assert!(
            !persist::corrupt_path(&path).exists(),
            "nothing was ever rejected"
        );
    }
    println!(
        "{kills} kills, {mid_write} mid-write (temp file present; {torn_temps} of them torn and rejected by decode), \
         load gave generation A {} times and B {} times, in {:?}",
        seen[0],
        seen[1],
        started.elapsed()
    );
    assert!(kills >= MIN_KILLS);
    assert!(
        mid_write >= MIN_MID_WRITE,
        "only {mid_write} of {kills} kills landed mid-write"
    );
    fs::remove_dir_all(&dir).unwrap();
}
