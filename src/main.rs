//! `hass-edge`: parse the command line, load the config, start logging, run, map the error to
//! an exit code.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use hass_edge::app::{self, ConfigSource};
use hass_edge::config::{Config, DEFAULT_CONFIG_PATH, EXIT_CONFIG};
use hass_edge::logging;

const USAGE: &str = "\
Usage:
  hass-edge [--config PATH]                run the daemon
  hass-edge check-config [--config PATH]   validate the config and print the effective one
  hass-edge status [--json] [--session]    ask the running daemon over D-Bus
                                           (exit 0 live, 3 not live, 4 not running)
  hass-edge --version | --help

Config: /etc/hass-edge/config.toml unless --config is given; every key can be
overridden by HASS_EDGE_<SECTION>_<KEY> (e.g. HASS_EDGE_HA_URL). Exit codes:
0 ok, 1 runtime failure, 2 bad usage, 78 bad config.";

enum Mode {
    Run,
    CheckConfig,
    Status,
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("hass-edge: {message}\n\n{USAGE}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut mode = Mode::Run;
    let mut config_path: Option<PathBuf> = None;
    let (mut json, mut session) = (false, false);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => match args.next() {
                Some(p) => config_path = Some(p.into()),
                None => return usage_error("--config needs a path"),
            },
            s if s.starts_with("--config=") => config_path = Some(s["--config=".len()..].into()),
            "check-config" => mode = Mode::CheckConfig,
            "status" => mode = Mode::Status,
            "--json" if matches!(mode, Mode::Status) => json = true,
            "--session" if matches!(mode, Mode::Status) => session = true,
            "--version" | "-V" => {
                println!("hass-edge {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage_error(&format!("unexpected argument {other:?}")),
        }
    }
    if let Mode::Status = mode {
        return ExitCode::from(hass_edge::status_cli::run(json, session));
    }
    let source = ConfigSource {
        given: config_path.is_some(),
        path: config_path.unwrap_or_else(|| DEFAULT_CONFIG_PATH.into()),
    };
    let config = match Config::load(&source.path, source.given) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hass-edge: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Mode::CheckConfig = mode {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    logging::init(&config.log.level);
    match app::run(config, source) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}
