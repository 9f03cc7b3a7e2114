//! The local WebSocket API session, sans I/O (issue 16).
