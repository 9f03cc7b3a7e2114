//! `sse_selection`: see `hass_edge_fuzz::drive::sse_selection`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hass_edge_fuzz::drive::sse_selection(data));
