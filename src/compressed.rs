//! HA's compressed state format for `subscribe_entities` (issue 16), rendered from the mirror.
