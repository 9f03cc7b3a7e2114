//! The per-dashboard entity allowlist (issue 16).
