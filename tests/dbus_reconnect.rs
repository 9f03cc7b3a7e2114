//! D-Bus outlives its bus (issue 13, item 4): the real `hass-edge` binary against the fake HA,
//! on a private `dbus-daemon` listening at a `unix:path=` in a temporary directory.
//!
//! - The bus daemon is killed and a new one started at the same address: hass-edge owns
//!   `io.hassedge.HassEdge1` again within seconds, answers `GetState` and `Connection`, and its
//!   log says it reconnected. HTTP answers while the bus is gone.
//! - hass-edge started before any bus exists gains the name once the bus comes up (one error
//!   line, then quiet retries).
//! - An entity id with a NUL byte (which a D-Bus string may not hold, D-Bus specification
//!   "Basic types": "must not contain the nul byte") never reaches the bus: the bus daemon
//!   has no reason to drop us, so the name keeps its owner.
//! - A client with hundreds of calls in flight at once slows only itself: HTTP is still
//!   answered within 500 ms (it waited 4–9 s before zbus' ticker let the others run).
//!
//! The address handed to hass-edge carries no `guid=`: a restarted bus has a new GUID, and a
//! client must not insist on the old one.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::daemon::{self, TempDir};
use support::http_client::{self, Response};
use support::{FakeHa, deadline, wait_until};

const NAME: &str = "io.hassedge.HassEdge1";
const PATH: &str = "/io/hassedge/HassEdge1";

/// A private session bus daemon, killed on drop.
struct Bus {
    /// `unix:path=…`, without the GUID.
    address: String,
    /// Where it listens.
    socket: PathBuf,
    /// The `dbus-daemon --nofork` process.
    child: Option<Child>,
}

impl Bus {
    /// Starts `dbus-daemon` listening on `socket`; returns once it printed its address
    /// (it listens by then).
    fn start(socket: &Path) -> Bus {
        let address = format!("unix:path={}", socket.display());
        let mut child = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .arg(format!("--address={address}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon must be installed");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .expect("read dbus-daemon's address");
        assert!(
            line.starts_with(&address),
            "dbus-daemon printed {line:?}, expected {address}"
        );
        Bus {
            address,
            socket: socket.to_owned(),
            child: Some(child),
        }
    }

    /// Kills the bus daemon (SIGKILL: nothing is said to the clients, the socket just closes).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `busctl --address=… args`: stdout on success, stdout + stderr otherwise.
    fn busctl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("busctl")
            .arg(format!("--address={}", self.address))
            .args(args)
            .output()
            .expect("busctl must be installed");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(stdout + &String::from_utf8_lossy(&out.stderr))
        }
    }

    /// The unique name that owns `io.hassedge.HassEdge1`.
    fn owner(&self) -> Result<String, String> {
        self.busctl(&[
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "GetNameOwner",
            "s",
            NAME,
        ])
    }

    /// A property of our object, as busctl prints it (`s "live"`).
    fn property(&self, name: &str) -> Result<String, String> {
        self.busctl(&["get-property", NAME, PATH, NAME, name])
    }

    /// `GetState(entity_id)`: the state JSON.
    fn get_state(&self, entity_id: &str) -> Result<Value, String> {
        let out = self.busctl(&[
            "--json=short",
            "call",
            NAME,
            PATH,
            NAME,
            "GetState",
            "s",
            entity_id,
        ])?;
        let reply: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        let text = reply["data"][0].as_str().ok_or(out.clone())?;
        serde_json::from_str(text).map_err(|e| format!("{e}: {text}"))
    }

    /// `ListEntities()`.
    fn list_entities(&self) -> Result<Vec<String>, String> {
        let out = self.busctl(&["--json=short", "call", NAME, PATH, NAME, "ListEntities"])?;
        let reply: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        serde_json::from_value(reply["data"][0].clone()).map_err(|e| format!("{e}: {out}"))
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The real binary with `[dbus] bus = "session"` and `DBUS_SESSION_BUS_ADDRESS` set to a
/// private bus (the shared harness keeps D-Bus off and has no per-daemon environment).
/// Killed on drop; its log is printed when the test failed.
struct Edge {
    child: Option<Child>,
    addr: std::net::SocketAddr,
    log_path: PathBuf,
    /// Declared last: dropped after the child is killed.
    _dir: TempDir,
}

impl Edge {
    fn start(fake: &FakeHa, bus_address: &str, entity_signals: bool) -> Edge {
        let dir = TempDir::new("dbus-reconnect");
        let token = dir.write("token", &format!("{}\n", support::fake_ha::TOKEN));
        let port = daemon::free_port();
        let config = dir.write(
            "config.toml",
            &format!(
                "[ha]\nurl = \"{}\"\ntoken_file = \"{}\"\n\
                 [cache]\nstate_file = \"{}\"\n\
                 [http]\nlisten = \"127.0.0.1:{port}\"\n\
                 [reconnect]\nmax_delay_seconds = 2\n\
                 [dbus]\nbus = \"session\"\nentity_signals = {entity_signals}\n\
                 [log]\nlevel = \"debug\"\n",
                fake.url(),
                token.display(),
                dir.path.join("states.json").display(),
            ),
        );
        let log_path = dir.path.join("daemon.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = daemon::command(&["--config", config.to_str().unwrap()]);
        cmd.env("DBUS_SESSION_BUS_ADDRESS", bus_address)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("spawn hass-edge");
        let edge = Edge {
            child: Some(child),
            addr: ([127, 0, 0, 1], port).into(),
            log_path,
            _dir: dir,
        };
        edge.wait_http(200);
        edge
    }

    /// Sends SIGTERM; returns the exit status (fails when it takes longer than `within`).
    fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "hass-edge still running {within:?} after SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn get(&self, path: &str) -> std::io::Result<Response> {
        http_client::fetch(self.addr, "GET", path)
    }

    /// Waits until `/health` answers `status` (200: live and synced).
    fn wait_http(&self, status: u16) {
        wait_until(&format!("/health {status}"), deadline(), || {
            match self.get("/health") {
                Ok(r) if r.status == status => Ok(()),
                Ok(r) => Err(format!("{} {}", r.status, r.text())),
                Err(e) => Err(e.to_string()),
            }
        });
    }

    /// The log lines at `level` (env_logger's `ERROR`, `WARN`, …) that mention D-Bus.
    fn dbus_lines(&self, level: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(&format!(" {level} ")) && l.contains("D-Bus"))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- hass-edge log ({}) ----\n{}\n---- end of hass-edge log ----",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// Some tracked entity of the fake, and its state JSON over HTTP.
fn an_entity(fake: &FakeHa, edge: &Edge) -> (String, Value) {
    let id = fake.tracked_entities()[0]["entity_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let via_http = edge.get(&format!("/api/states/{id}")).unwrap().json();
    (id, via_http)
}

/// Waits until the name is owned and the object answers `Connection` = live and `GetState`
/// with the HTTP API's JSON; returns the owner's unique name.
fn wait_served(bus: &Bus, entity_id: &str, via_http: &Value, within: Duration) -> String {
    wait_until("hass-edge serves its object on the bus", within, || {
        let owner = bus.owner()?;
        let connection = bus.property("Connection")?;
        if !connection.contains("\"live\"") {
            return Err(format!("Connection = {connection}"));
        }
        let via_dbus = bus.get_state(entity_id)?;
        if via_dbus != *via_http {
            return Err(format!("GetState {via_dbus} != HTTP {via_http}"));
        }
        Ok(owner)
    })
}

/// The time a reconnect may take: the first retry comes 1 s (+ jitter) after the loss; the
/// rest is slack for a loaded machine (2 cores, tests in parallel) or an emulator.
fn reconnect_within() -> Duration {
    Duration::from_secs(10) * daemon::slowdown()
}

#[test]
fn a_restarted_bus_daemon_gets_the_name_back() {
    let fake = FakeHa::start("2025.4.4");
    let dir = TempDir::new("bus");
    let socket = dir.path.join("bus");
    let mut bus = Bus::start(&socket);
    let edge = Edge::start(&fake, &bus.address, false);
    edge.wait_http(200);
    let (entity_id, via_http) = an_entity(&fake, &edge);
    let first_owner = wait_served(&bus, &entity_id, &via_http, deadline());

    // The bus goes away: HTTP does not notice.
    bus.kill();
    assert_eq!(edge.get("/health").unwrap().status, 200);
    assert_eq!(
        edge.get(&format!("/api/states/{entity_id}"))
            .unwrap()
            .json(),
        via_http
    );

    // A new bus daemon at the same address: the name comes back by itself.
    let bus = Bus::start(&bus.socket);
    let second_owner = wait_served(&bus, &entity_id, &via_http, reconnect_within());
    assert_ne!(
        first_owner, second_owner,
        "a new connection, a new unique name"
    );
    let log = edge.log();
    assert!(
        edge.dbus_lines("WARN").iter().any(|l| l.contains("lost")),
        "the log says the connection was lost:\n{log}"
    );
    assert!(
        edge.dbus_lines("INFO")
            .iter()
            .any(|l| l.contains("reconnected")),
        "the log says it reconnected:\n{log}"
    );

    // And again: the back-off started over after the successful reconnect.
    let mut bus = bus;
    bus.kill();
    let bus = Bus::start(&bus.socket);
    wait_served(&bus, &entity_id, &via_http, reconnect_within());
    assert!(
        edge.dbus_lines("ERROR").is_empty(),
        "a lost bus is a warning, not an error:\n{}",
        edge.log()
    );

    // Waiting to reconnect does not hold up a stop.
    let mut bus = bus;
    bus.kill();
    let mut edge = edge;
    let status = edge.terminate(Duration::from_secs(5) * daemon::slowdown());
    assert!(status.success(), "{status}\n{}", edge.log());
}

#[test]
fn a_bus_that_starts_later_gets_the_name() {
    let fake = FakeHa::start("2025.4.4");
    let dir = TempDir::new("bus");
    let socket = dir.path.join("bus");
    let address = format!("unix:path={}", socket.display());
    let edge = Edge::start(&fake, &address, false);
    edge.wait_http(200);
    // No bus yet, and HTTP serves. Retries come 1 s and 3 s (+ jitter) after the first
    // attempt; give them time to happen before the bus appears.
    std::thread::sleep(Duration::from_millis(3500) * daemon::slowdown());
    assert_eq!(edge.get("/health").unwrap().status, 200);

    let bus = Bus::start(&socket);
    let (entity_id, via_http) = an_entity(&fake, &edge);
    // Retries double from 1 s up to 30 s; the next one is at most ~4.4 s away.
    let within = reconnect_within() + Duration::from_secs(5);
    wait_served(&bus, &entity_id, &via_http, within);
    // One error line for the missing bus, then retries at debug level only.
    let retries = edge
        .dbus_lines("DEBUG")
        .iter()
        .filter(|l| l.contains("still unavailable"))
        .count();
    assert!(
        retries >= 1,
        "retries are logged at debug level:\n{}",
        edge.log()
    );
    assert_eq!(edge.dbus_lines("ERROR").len(), 1, "{}", edge.log());
}

#[test]
fn an_entity_id_with_a_nul_never_reaches_the_bus() {
    let fake = FakeHa::start("2025.4.4");
    let dir = TempDir::new("bus");
    let bus = Bus::start(&dir.path.join("bus"));
    let edge = Edge::start(&fake, &bus.address, true);
    edge.wait_http(200);
    let (entity_id, via_http) = an_entity(&fake, &edge);
    let owner = wait_served(&bus, &entity_id, &via_http, deadline());

    // With entity_signals = true, a change is sent as EntityChanged on arrival; ListEntities
    // sends every tracked id.
    let bad = "light.nul\u{0}byte";
    fake.push_change(fake.new_entity(bad, "on", json!({})));
    let good = fake.new_entity("light.after_the_nul", "on", json!({}));
    fake.push_change(good);
    wait_until("the change after it is applied", deadline(), || {
        let r = edge
            .get("/api/states/light.after_the_nul")
            .map_err(|e| e.to_string())?;
        if r.status == 200 {
            Ok(())
        } else {
            Err(r.text())
        }
    });
    // The HTTP answer may have come from a REST read-through while the subscription's frames
    // were still queued: the bus lists the entity once the mirror has applied them.
    let ids = wait_until(
        "ListEntities to list the change after it",
        deadline(),
        || {
            let ids = bus.list_entities().map_err(|e| e.to_string())?;
            if ids.iter().any(|id| id == "light.after_the_nul") {
                Ok(ids)
            } else {
                Err(format!("{ids:?}"))
            }
        },
    );
    assert!(ids.iter().all(|id| !id.contains('\0')), "{ids:?}");
    assert_eq!(bus.get_state(&entity_id).unwrap(), via_http);
    // Still the same connection: the bus daemon never had a reason to drop us.
    assert_eq!(bus.owner().unwrap(), owner, "{}", edge.log());
    assert!(
        edge.dbus_lines("WARN").iter().all(|l| !l.contains("lost")),
        "{}",
        edge.log()
    );
}

/// A local client that calls hass-edge over D-Bus as fast as it can (many calls in flight at
/// once) slows only itself: HTTP clients are still answered promptly. zbus' executor runs on
/// hass-edge's one thread, ticked by a task of hass-edge's; a tick that always finds more to
/// do must still let the others run.
#[test]
fn a_client_flooding_the_bus_does_not_starve_http() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let fake = FakeHa::start("2025.4.4");
    let dir = TempDir::new("bus-flood");
    let bus = Bus::start(&dir.path.join("bus"));
    let edge = Edge::start(&fake, &bus.address, false);
    let (entity_id, via_http) = an_entity(&fake, &edge);
    wait_served(&bus, &entity_id, &via_http, deadline());
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let flood = {
        let (address, stop, answered) = (bus.address.clone(), stop.clone(), answered.clone());
        std::thread::spawn(move || {
            smol::block_on(async {
                let conn = zbus::connection::Builder::address(address.as_str())
                    .unwrap()
                    .build()
                    .await
                    .expect("connect to the bus");
                let ex = smol::LocalExecutor::new();
                let callers: Vec<_> = (0..256)
                    .map(|_| {
                        let (conn, stop, answered) = (conn.clone(), stop.clone(), answered.clone());
                        ex.spawn(async move {
                            while !stop.load(Ordering::Relaxed) {
                                let reply = conn
                                    .call_method(
                                        Some(NAME),
                                        PATH,
                                        Some("org.freedesktop.DBus.Properties"),
                                        "Get",
                                        &(NAME, "Connection"),
                                    )
                                    .await;
                                if reply.is_err() {
                                    break;
                                }
                                answered.fetch_add(1, Ordering::Relaxed);
                            }
                        })
                    })
                    .collect();
                ex.run(async {
                    for c in callers {
                        c.await;
                    }
                })
                .await;
            })
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let asked = std::time::Instant::now();
        let r = edge.get("/health").expect("/health answered");
        assert_eq!(r.status, 200);
        worst = worst.max(asked.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    let calls = answered.load(Ordering::Relaxed);
    let bound = Duration::from_millis(500) * daemon::slowdown();
    assert!(
        worst < bound,
        "/health waited {worst:?} (bound {bound:?}) while a D-Bus client flooded ({calls} calls answered)"
    );
    assert!(calls > 0, "the flooding client got no answers");
    eprintln!("{calls} D-Bus calls answered in the flood; /health at worst {worst:?}");
}
