//! Placeholder replaced by the benchmark work (issue #6); prints nothing yet.
fn main() {}
