//! Runs the real `hass-edge` binary: a config file and a token file in a private temporary
//! directory, HTTP on a free loopback port, `RUST_LOG=debug` to a log file that is printed
//! when the test fails, no inherited `HASS_EDGE_*` (or systemd) variables; killed on drop.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::fake_ha::{FakeHa, TOKEN};
use super::http_client::{self, Conn, Response};
use super::{deadline, wait_until};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_hass-edge");

/// Lines of the daemon's log printed when a test fails.
const LOG_TAIL: usize = 400;

/// A directory under the system temp dir, removed on drop (kept when the test failed).
#[derive(Debug)]
pub struct TempDir {
    /// Its path.
    pub path: PathBuf,
}

impl TempDir {
    /// A new, empty directory.
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "hass-edge-test-{tag}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        TempDir { path }
    }

    /// Writes `name` in the directory; returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, contents).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("(kept {} for inspection)", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The command that runs target binaries when cross-testing: `EDGE_TEST_RUNNER`, e.g.
/// `qemu-aarch64-static -L /usr/aarch64-linux-gnu` (`scripts/test.sh aarch64`; there is no
/// binfmt_misc to run them directly).
pub fn runner() -> Vec<String> {
    std::env::var("EDGE_TEST_RUNNER")
        .map(|r| r.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// How much slower than native the daemon runs: 5 under an emulating runner, else 1. Scales
/// the few bounds that are about time.
pub fn slowdown() -> u32 {
    if runner().is_empty() { 1 } else { 5 }
}

/// A `hass-edge` command with a clean environment: no `HASS_EDGE_*` overrides, no systemd
/// credentials, notify socket or journal stream from whoever runs the tests.
pub fn command(args: &[&str]) -> Command {
    let runner = runner();
    let mut cmd = match runner.split_first() {
        Some((program, runner_args)) => {
            let mut c = Command::new(program);
            c.args(runner_args).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    cmd.args(args);
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        if n.starts_with("HASS_EDGE_") {
            cmd.env_remove(&name);
        }
    }
    for name in [
        "CREDENTIALS_DIRECTORY",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "JOURNAL_STREAM",
        "LISTEN_FDS",
        "LISTEN_PID",
    ] {
        cmd.env_remove(name);
    }
    cmd.env("RUST_LOG", "debug");
    cmd.stdin(Stdio::null());
    cmd
}

/// The outcome of a command run to its end.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

/// Runs `cmd` to its end (output to files in `dir`, so nothing blocks on a full pipe);
/// kills it and fails when it is still running after `timeout` (e.g. a config that should
/// have been refused started the daemon).
pub fn run_to_exit(mut cmd: Command, dir: &TempDir, timeout: Duration) -> Finished {
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    let (out_path, err_path) = (
        dir.path.join(format!("run{n}.stdout")),
        dir.path.join(format!("run{n}.stderr")),
    );
    cmd.stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let mut child = cmd.spawn().expect("spawn hass-edge");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "hass-edge {cmd:?} still running after {timeout:?}\nstderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Finished {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

/// A free loopback port (bound and released; the daemon binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Config keys for a daemon, as raw TOML values by section.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Contents of the token file.
    pub token: String,
    /// `section -> key -> raw TOML value`.
    pub keys: BTreeMap<String, BTreeMap<String, String>>,
}

impl Default for DaemonOptions {
    /// The right token; reconnect back-off capped at 2 s so tests recover quickly; no D-Bus
    /// (parallel daemons would compete for the bus name on a machine that has a bus);
    /// debug logs.
    fn default() -> Self {
        DaemonOptions {
            token: TOKEN.to_owned(),
            keys: BTreeMap::new(),
        }
        .set("reconnect", "max_delay_seconds", 2)
        .set("dbus", "bus", "\"none\"")
        .set("log", "level", "\"debug\"")
    }
}

impl DaemonOptions {
    /// Sets `section.key` to the raw TOML `value` (strings need their quotes).
    pub fn set(mut self, section: &str, key: &str, value: impl Display) -> Self {
        self.keys
            .entry(section.to_owned())
            .or_default()
            .insert(key.to_owned(), value.to_string());
        self
    }

    /// Uses `token` as the token file's contents.
    pub fn token(mut self, token: &str) -> Self {
        self.token = token.to_owned();
        self
    }

    fn render(&self, ha_url: &str, dir: &Path, token_file: &Path, port: u16) -> String {
        let mut keys = self.keys.clone();
        let ha = keys.entry("ha".into()).or_default();
        ha.entry("url".into())
            .or_insert_with(|| format!("\"{ha_url}\""));
        ha.entry("token_file".into())
            .or_insert_with(|| format!("\"{}\"", token_file.display()));
        // Warm-start state stays private to this daemon (the default is a system path).
        let state_file = dir.join("states.json");
        keys.entry("cache".into())
            .or_default()
            .entry("state_file".into())
            .or_insert_with(|| format!("\"{}\"", state_file.display()));
        keys.entry("http".into())
            .or_default()
            .entry("listen".into())
            .or_insert_with(|| format!("\"127.0.0.1:{port}\""));
        let mut text = String::new();
        for (section, kv) in &keys {
            text.push_str(&format!("[{section}]\n"));
            for (k, v) in kv {
                text.push_str(&format!("{k} = {v}\n"));
            }
            text.push('\n');
        }
        text
    }
}

/// A running daemon. Killed (SIGKILL) on drop; its log is printed if the test failed.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    /// Where its HTTP API listens.
    pub addr: SocketAddr,
    /// Its config file.
    pub config_path: PathBuf,
    /// The token it was given.
    pub token: String,
    log_path: PathBuf,
    /// Exit status, once it exited.
    exited: Option<ExitStatus>,
    /// Declared last: dropped after the child is killed.
    pub dir: TempDir,
}

impl Daemon {
    /// Starts a daemon against `fake` with [`DaemonOptions::default`].
    pub fn start(fake: &FakeHa) -> Daemon {
        Daemon::start_with(fake, DaemonOptions::default())
    }

    /// Starts a daemon against `fake`; returns once its HTTP port accepts connections.
    pub fn start_with(fake: &FakeHa, options: DaemonOptions) -> Daemon {
        Daemon::start_at(&fake.url(), options)
    }

    /// Starts a daemon against the HA at `ha_url` (e.g. a raw peer for faults the fake
    /// cannot produce); returns once its HTTP port accepts connections.
    pub fn start_at(ha_url: &str, options: DaemonOptions) -> Daemon {
        let dir = TempDir::new("daemon");
        let token_path = dir.write("token", &format!("{}\n", options.token));
        let log_path = dir.path.join("daemon.log");
        for attempt in 1..=3 {
            let port = free_port();
            let config_path = dir.write(
                "config.toml",
                &options.render(ha_url, &dir.path, &token_path, port),
            );
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .unwrap();
            let mut cmd = command(&["--config", config_path.to_str().unwrap()]);
            cmd.stdout(log.try_clone().unwrap()).stderr(log);
            let mut child = cmd.spawn().expect("spawn hass-edge");
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let start = Instant::now();
            let exited = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Daemon {
                        child: Some(child),
                        addr,
                        config_path,
                        token: options.token.clone(),
                        log_path,
                        exited: None,
                        dir,
                    };
                }
                if start.elapsed() > deadline() {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "hass-edge did not listen on {addr} within {:?}:\n{}",
                        deadline(),
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            // Someone else took the port between our probe and the daemon's bind: retry.
            if attempt < 3 && log.contains("failed to listen") {
                continue;
            }
            panic!("hass-edge exited at start ({exited}):\n{log}");
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon is running").id()
    }

    /// The process's resident memory now (`VmRSS` of /proc/PID/status, proc(5)), KiB; 0
    /// once it is gone.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()));
        status
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// One request on a fresh connection; panics on I/O errors.
    pub fn get(&self, path: &str) -> Response {
        self.fetch("GET", path)
    }

    /// `method path` on a fresh connection; panics on I/O errors.
    pub fn fetch(&self, method: &str, path: &str) -> Response {
        http_client::fetch(self.addr, method, path)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A fresh connection for keep-alive, pipelining and raw requests.
    pub fn connect(&self) -> Conn {
        Conn::connect(self.addr)
            .unwrap_or_else(|e| panic!("connect to the daemon at {}: {e}", self.addr))
    }

    /// `GET /health`: status and body.
    pub fn health(&self) -> std::io::Result<(u16, Value)> {
        let r = http_client::fetch(self.addr, "GET", "/health")?;
        let body = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        Ok((r.status, body))
    }

    /// Waits until `/health` answers `status` (e.g. 200 once live).
    pub fn wait_health(&self, status: u16) -> Value {
        wait_until(
            &format!("/health to answer {status}"),
            deadline(),
            || match self.health() {
                Ok((s, body)) if s == status => Ok(body),
                Ok((s, body)) => Err(format!("{s} {body}")),
                Err(e) => Err(e.to_string()),
            },
        )
    }

    /// Waits until the subscription is live (`/health` 200).
    pub fn wait_live(&self) {
        let body = self.wait_health(200);
        assert_eq!(body["status"], "live", "/health 200 says live: {body}");
    }

    /// Sends `signal` (e.g. `"TERM"`) to the daemon.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits up to `timeout` for the daemon to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.exited {
                return Some(s);
            }
            if let Some(s) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                self.exited = Some(s);
                return Some(s);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.wait_exit(Duration::ZERO).is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL)..];
            eprintln!(
                "---- hass-edge log (last {} of {} lines, {}) ----\n{}\n---- end of hass-edge log ----",
                tail.len(),
                lines.len(),
                self.log_path.display(),
                tail.join("\n")
            );
        }
    }
}
