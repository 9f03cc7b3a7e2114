//! Issue 13, item 5 and two of its smaller findings, against the real binary:
//! - a FIFO (or a device, a directory, a 2 GiB file) given as the state file or a token file
//!   must neither freeze the daemon nor make it read more than its limit: the state file is
//!   skipped (moved aside only when it is a regular file), a token file is a config error
//!   (exit 78) at start and a rejected reload later;
//! - the HA token never reaches the log, whatever `RUST_LOG` says;
//! - a refused `ha.url` never shows its password, neither in `check-config` nor in the log.

mod support;

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::daemon::{TempDir, command, free_port, run_to_exit, slowdown};
use support::fake_ha::TOKEN;
use support::{Daemon, DaemonOptions, FakeHa, deadline, http_client, wait_until};

/// Long enough for a daemon that should exit at once to do so on a loaded machine; a daemon
/// blocked on a FIFO is still running after it (the old behaviour).
fn exit_timeout() -> Duration {
    Duration::from_secs(15) * slowdown()
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

fn quoted(path: &Path) -> String {
    format!("\"{}\"", path.display())
}

/// Waits until the daemon's log holds `needle`.
fn wait_log(daemon: &Daemon, needle: &str) -> String {
    wait_until(&format!("the log to say {needle:?}"), deadline(), || {
        let log = daemon.log();
        if log.contains(needle) {
            Ok(log)
        } else {
            Err(log.lines().last().unwrap_or_default().to_owned())
        }
    })
}

/// The config of `daemon` with `key = value` set in `[section]` (replacing an earlier value).
fn rewrite_config(daemon: &Daemon, section: &str, key: &str, value: &str) {
    let text = std::fs::read_to_string(&daemon.config_path).unwrap();
    let mut out = String::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.starts_with('[') {
            current = line.trim_matches(['[', ']']).to_owned();
            out.push_str(line);
            out.push('\n');
            if current == section {
                out.push_str(&format!("{key} = {value}\n"));
            }
            continue;
        }
        if current == section && line.split('=').next().map(str::trim) == Some(key) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(
        out.contains(&format!("{key} = {value}")),
        "no [{section}] in {text}"
    );
    std::fs::write(&daemon.config_path, out).unwrap();
}

#[test]
fn a_fifo_as_state_file_is_skipped_and_left_in_place() {
    let fake = FakeHa::start("2025.4.4");
    let dir = TempDir::new("fifo-state");
    let fifo = dir.path.join("states.json");
    mkfifo(&fifo);
    let daemon = Daemon::start_with(
        &fake,
        DaemonOptions::default().set("cache", "state_file", quoted(&fifo)),
    );
    // Before the fix the daemon blocked in open(2) for ever: no /health, no SIGTERM.
    daemon.wait_live();
    let log = daemon.log();
    assert!(
        log.contains(&format!(
            "state file {} is a FIFO (named pipe), not a regular file",
            fifo.display()
        )),
        "{log}"
    );
    let kind = std::fs::symlink_metadata(&fifo).unwrap().file_type();
    assert!(kind.is_fifo(), "the FIFO was replaced: {kind:?}");
    assert!(
        !dir.path.join("states.json.corrupt").exists(),
        "moved aside"
    );
}

#[test]
fn a_device_as_state_file_is_not_read_nor_renamed() {
    let fake = FakeHa::start("2024.3.3");
    let dir = TempDir::new("device-state");
    let link = dir.path.join("states.json");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    let daemon = Daemon::start_with(
        &fake,
        DaemonOptions::default().set("cache", "state_file", quoted(&link)),
    );
    daemon.wait_live();
    let log = daemon.log();
    assert!(
        log.contains("is a character device, not a regular file"),
        "{log}"
    );
    // Before the fix: 256 MiB of zeros read, then the path renamed to states.json.corrupt.
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("/dev/zero"));
    assert!(!dir.path.join("states.json.corrupt").exists());
    let hwm = peak_rss_kib(daemon.pid());
    assert!(hwm < 64 * 1024, "VmHWM {hwm} KiB: the device was read");
}

/// `VmHWM` of `pid`, in KiB (proc(5)).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"))
}

#[test]
fn an_oversized_state_file_is_refused_before_it_is_read() {
    let fake = FakeHa::start("2025.4.4");
    let dir = TempDir::new("large-state");
    let path = dir.path.join("states.json");
    // Sparse: 2 GiB to fstat(2), nothing on disk.
    std::fs::File::create(&path)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let daemon = Daemon::start_with(
        &fake,
        DaemonOptions::default().set("cache", "state_file", quoted(&path)),
    );
    daemon.wait_live();
    let log = daemon.log();
    assert!(
        log.contains("2147483648 bytes, more than the 33554432-byte limit"),
        "{log}"
    );
    // A regular file is moved aside, as any other unusable state file.
    let aside = dir.path.join("states.json.corrupt");
    assert_eq!(std::fs::metadata(&aside).unwrap().len(), 2 << 30);
    // Before the fix, 256 MiB of it were read first (VmHWM ≈ 266 MB).
    let hwm = peak_rss_kib(daemon.pid());
    assert!(hwm < 64 * 1024, "VmHWM {hwm} KiB: the file was read");
}

/// A config for `run_to_exit`: a fake HA URL that is never reached, and `keys` appended.
fn config_file(dir: &TempDir, token_file: &Path, extra: &str) -> PathBuf {
    dir.write(
        "config.toml",
        &format!(
            "[ha]\nurl = \"http://127.0.0.1:9\"\ntoken_file = {}\n[cache]\nstate_file = {}\n\
             [dbus]\nbus = \"none\"\n{extra}",
            quoted(token_file),
            quoted(&dir.path.join("states.json")),
        ),
    )
}

#[test]
fn token_files_that_are_fifos_or_too_large_are_config_errors() {
    let dir = TempDir::new("token-files");
    let fifo = dir.path.join("token-fifo");
    mkfifo(&fifo);
    let good = dir.write("token", TOKEN);
    let large = dir.write("large-token", &"a".repeat(1 << 20));
    let port = free_port();
    for (token_file, extra, want) in [
        (
            fifo.clone(),
            String::new(),
            format!(
                "failed to read the Home Assistant token from {}: it is a FIFO (named pipe), not a regular file",
                fifo.display()
            ),
        ),
        (
            large.clone(),
            String::new(),
            format!(
                "failed to read the Home Assistant token from {}: 1048576 bytes, more than the 65536-byte limit",
                large.display()
            ),
        ),
        (
            good.clone(),
            format!(
                "[http]\nlisten = \"127.0.0.1:{port}\"\napi_token_file = {}\n",
                quoted(&fifo)
            ),
            format!(
                "{}: http.api_token_file: it is a FIFO (named pipe), not a regular file",
                fifo.display()
            ),
        ),
        (
            good.clone(),
            format!(
                "[http]\nlisten = \"127.0.0.1:{port}\"\napi_token_file = {}\n",
                quoted(&dir.path)
            ),
            "http.api_token_file: it is a directory, not a regular file".to_owned(),
        ),
    ] {
        let config = config_file(&dir, &token_file, &extra);
        // Before the fix the FIFO cases blocked in open(2) and this timed out.
        let run = run_to_exit(
            command(&["--config", config.to_str().unwrap()]),
            &dir,
            exit_timeout(),
        );
        assert_eq!(run.status.code(), Some(78), "{want}\n{}", run.stderr);
        assert!(
            run.stderr.contains(&want),
            "want {want:?} in:\n{}",
            run.stderr
        );
    }
    // The config file itself.
    let run = run_to_exit(
        command(&["check-config", "--config", fifo.to_str().unwrap()]),
        &dir,
        exit_timeout(),
    );
    assert_eq!(run.status.code(), Some(78), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("it is a FIFO (named pipe), not a regular file"),
        "{}",
        run.stderr
    );
}

/// `ha.ca_file` goes through the same guard: a FIFO there used to hang start-up in open(2).
#[test]
fn a_fifo_as_ca_file_is_a_config_error() {
    let dir = TempDir::new("ca-fifo");
    let fifo = dir.path.join("ca.pem");
    mkfifo(&fifo);
    let token = dir.write("token", TOKEN);
    let config = dir.write(
        "config.toml",
        &format!(
            "[ha]\nurl = \"https://127.0.0.1:9\"\ntoken_file = {}\nca_file = {}\n[cache]\nstate_file = {}\n[dbus]\nbus = \"none\"\n",
            quoted(&token),
            quoted(&fifo),
            quoted(&dir.path.join("states.json")),
        ),
    );
    let run = run_to_exit(
        command(&["--config", config.to_str().unwrap()]),
        &dir,
        exit_timeout(),
    );
    assert_eq!(run.status.code(), Some(78), "{}", run.stderr);
    assert!(
        run.stderr.contains("ha.ca_file") && run.stderr.contains("FIFO"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_reload_with_a_fifo_token_or_a_url_with_a_password_is_rejected() {
    let fake = FakeHa::start("2025.4.4");
    let daemon = Daemon::start(&fake);
    daemon.wait_live();
    let dir = TempDir::new("reload-fifo");
    let fifo = dir.path.join("api-token");
    mkfifo(&fifo);

    // A FIFO as the API token: before the fix the reload blocked the one thread for ever.
    rewrite_config(&daemon, "http", "api_token_file", &quoted(&fifo));
    daemon.signal("HUP");
    let log = wait_log(&daemon, "reload rejected");
    assert!(
        log.contains("http.api_token_file: it is a FIFO (named pipe), not a regular file"),
        "{log}"
    );
    let (status, _) = daemon.health().expect("/health answers after the reload");
    assert_eq!(status, 200);
    assert_eq!(
        daemon.get("/api/states").status,
        200,
        "no API token in force"
    );

    // A URL with a password: rejected without showing it.
    let text = std::fs::read_to_string(&daemon.config_path)
        .unwrap()
        .replace("api_token_file", "# api_token_file");
    std::fs::write(&daemon.config_path, text).unwrap();
    rewrite_config(&daemon, "ha", "url", "\"ftp://kiosk:s3cr3t-pw@ha.local\"");
    daemon.signal("HUP");
    wait_until("a second rejected reload", deadline(), || {
        let n = daemon.log().matches("reload rejected").count();
        if n >= 2 { Ok(()) } else { Err(format!("{n}")) }
    });
    let log = daemon.log();
    assert!(log.contains("invalid config key ha.url"), "{log}");
    assert!(
        !log.contains("s3cr3t"),
        "the password is in the log:\n{log}"
    );
    assert!(log.contains("ftp://***@ha.local"), "{log}");
}

#[test]
fn check_config_never_shows_the_password_of_a_refused_url() {
    let dir = TempDir::new("url-userinfo");
    let token = dir.write("token", TOKEN);
    for url in [
        "ftp://kiosk:s3cr3t-pw@ha.local:8123",
        "http://kiosk:s3cr3t-pw@ha local:8123",
        "kiosk:s3cr3t-pw@ha.local:8123",
        "http://kiosk:s3cr3t/pw@ha.local",
        "http://kiosk:s3cr3t-pw@ha.local:8123",
    ] {
        let config = config_file(&dir, &token, "").to_str().unwrap().to_owned();
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("url = \"http://127.0.0.1:9\"", &format!("url = \"{url}\""));
        std::fs::write(&config, text).unwrap();
        let from_file = run_to_exit(
            command(&["check-config", "--config", &config]),
            &dir,
            exit_timeout(),
        );
        let mut from_env = command(&["check-config", "--config", &config]);
        from_env.env("HASS_EDGE_HA_URL", url);
        let from_env = run_to_exit(from_env, &dir, exit_timeout());
        for run in [from_file, from_env] {
            assert_eq!(run.status.code(), Some(78), "{url}: {}", run.stderr);
            assert!(run.stderr.contains("ha.url"), "{url}: {}", run.stderr);
            let all = format!("{}{}", run.stdout, run.stderr);
            assert!(!all.contains("s3cr3t"), "{url}: password shown:\n{all}");
        }
    }
}

/// The daemon with `RUST_LOG=rust_log`, against `fake`, until it is live, has made a REST
/// read-through (its `Authorization` header holds the token) and stopped; returns its
/// stderr.
fn log_of_a_run_with(fake: &FakeHa, rust_log: &str) -> String {
    let dir = TempDir::new("trace");
    let token = dir.write("token", &format!("{TOKEN}\n"));
    let port = free_port();
    let config = dir.write(
        "config.toml",
        &format!(
            "[ha]\nurl = \"{}\"\ntoken_file = {}\n[cache]\nstate_file = {}\n[http]\n\
             listen = \"127.0.0.1:{port}\"\n[dbus]\nbus = \"none\"\n[reconnect]\n\
             max_delay_seconds = 2\n",
            fake.url(),
            quoted(&token),
            quoted(&dir.path.join("states.json")),
        ),
    );
    let log_path = dir.path.join("stderr.log");
    let mut cmd = command(&["--config", config.to_str().unwrap()]);
    cmd.env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    let mut child = cmd.spawn().expect("spawn hass-edge");
    let addr = ([127, 0, 0, 1], port).into();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_until(
        "the daemon to be live",
        deadline(),
        || match http_client::fetch(addr, "GET", "/health") {
            Ok(r) if r.status == 200 => Ok(()),
            Ok(r) => Err(format!("{}", r.status)),
            Err(e) => Err(format!("{e}; {}", log().lines().last().unwrap_or_default())),
        },
    );
    // A miss goes to HA's REST API with `Authorization: Bearer <token>`.
    let r = http_client::fetch(addr, "GET", "/api/states/sensor.not_in_the_mirror").unwrap();
    assert!(matches!(r.status, 200 | 404), "{}", r.status);
    assert!(fake.rest_reads_of("sensor.not_in_the_mirror") >= 1);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let stopped = wait_until("the daemon to stop", deadline(), || {
        child
            .try_wait()
            .unwrap()
            .ok_or_else(|| "running".to_owned())
    });
    assert!(stopped.success(), "{stopped}\n{}", log());
    log()
}

#[test]
fn the_token_is_never_logged_whatever_rust_log_says() {
    let fake = FakeHa::start("2025.4.4");
    for rust_log in [
        "trace",
        "tungstenite::protocol=trace",
        "tungstenite=trace,async_tungstenite=trace,ureq=trace,ureq_proto=trace,rustls=trace",
    ] {
        let log = log_of_a_run_with(&fake, rust_log);
        assert!(
            log.contains("DEBUG") || !rust_log.starts_with("trace"),
            "RUST_LOG={rust_log} logged no debug lines:\n{log}"
        );
        assert!(
            !log.contains(TOKEN),
            "RUST_LOG={rust_log}: the token is in the log:\n{log}"
        );
    }
}
