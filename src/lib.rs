//! hass-edge: an edge daemon between Home Assistant and the consumers on a Raspberry Pi.
//!
//! One WebSocket subscription to HA keeps a bounded store of the tracked entities fresh; a
//! local HTTP API answers from it in HA's own JSON shapes. The pure parts (config, filter,
//! entity model, store, protocol session) take plain inputs and `now`; the I/O parts wire them
//! to sockets, systemd and D-Bus.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

pub mod allowlist;
pub mod api;
pub mod app;
pub mod assets;
pub mod broadcast;
pub mod bucket;
pub mod compressed;
pub mod config;
pub mod dashboards;
pub mod dbus;
pub mod deadline;
pub mod entity;
pub mod events;
pub mod files;
pub mod filter;
pub mod ha;
pub mod ha_tokens;
pub mod hosts;
pub mod http;
pub mod hub;
pub mod logging;
pub mod metrics;
pub mod mirror;
pub mod notify;
pub mod persist;
pub mod piecewise;
pub mod proxy;
pub mod rest;
pub mod session;
pub mod shutdown;
pub mod sse;
pub mod status;
pub mod status_cli;
pub mod store;
pub mod tls;
pub mod uplink;
pub mod ws_api;
pub mod ws_server;
