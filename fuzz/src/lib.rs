//! Fuzz harness for hass-edge: see [`drive`]. The targets in `fuzz_targets/` are one-liners
//! over it.
#![forbid(unsafe_code)]

pub mod drive;
