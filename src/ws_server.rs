//! `/api/websocket`: the local WebSocket API's I/O (issue 16).
