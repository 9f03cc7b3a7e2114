//! `entity_id`: see `hass_edge_fuzz::drive::entity_id`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hass_edge_fuzz::drive::entity_id(data));
