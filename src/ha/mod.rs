//! The WebSocket link to Home Assistant: [`run`] keeps one connection up (reconnecting with
//! back-off and jitter, holding a rejected token), [`connection`] drives one connection's
//! [`crate::session::Session`] and applies what it yields to the hub's mirror, and
//! [`read_buffer`] gives tungstenite's read buffer back after a large frame.

pub mod connection;
mod link;
pub mod read_buffer;

pub use link::{SAME_TOKEN_RETRIES, backoff_delay, run};
