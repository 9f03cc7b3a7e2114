//! The import structure of `src/` (issue 12): modules sit in layers, and a module imports
//! only from layers below its own, so there is no cycle and nothing low knows anything high.
//! The HTTP transport in particular imports no route, hub or stream module. A new module
//! must be given a layer here; a new import that breaks the order fails this test.

use std::collections::BTreeMap;
use std::path::Path;

/// Bottom first. Pure parts first (no sockets, no clock), then the transports and clients,
/// the shared hub and the stream body, the services that serve it, and the wiring.
const LAYERS: &[&[&str]] = &[
    // Leaf helpers that import nothing of the crate: reading a file without blocking on it;
    // which `Host` names are ours.
    &["files", "hosts"],
    // Primitives: the HA entity model, config, timers, shutdown, systemd glue.
    &[
        "entity", "config", "deadline", "shutdown", "notify", "tls", "bucket",
    ],
    // Log glue: knows the secrets (`config::Secret`) it must never print.
    &["logging"],
    // Pure protocol and rules.
    &[
        "filter",
        "session",
        "persist",
        "ha_tokens",
        "compressed",
        "dashboards",
    ],
    // Messages rendered a piece at a time: a states list in HA's JSON or compressed form.
    &["piecewise"],
    &["store"],
    // The one "apply what HA sent" step.
    &["mirror"],
    // The status snapshot and its pure renderers.
    &["status"],
    // Transports and clients; none imports another.
    &["http", "rest", "broadcast", "metrics", "assets", "events"],
    // Shared state, and the push-stream body.
    &["hub", "sse"],
    // Forwarding to HA: carries out what the routes decided.
    &["proxy", "ws_api"],
    // A connection to HA's WebSocket API with a given token.
    &["uplink"],
    // The dashboards' allowlist kept current.
    &["allowlist"],
    // The local WebSocket API's I/O: sessions, their links to HA, the shared caches.
    &["ws_server"],
    // What serves the hub to the world; none imports another.
    &["api", "dbus", "ha", "status_cli"],
    // Wiring and lifecycle.
    &["app"],
];

/// The top-level `crate::` modules a source text refers to (comments and doc comments
/// skipped), including the members of grouped imports such as `use crate::{a, b::C};`.
fn crate_refs(text: &str) -> Vec<String> {
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut refs = Vec::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Items at depth 1 of the group: the first path segment of each.
            let (mut depth, mut item_start) = (1, true);
            let mut ident = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => {
                        if !ident.is_empty() {
                            refs.push(std::mem::take(&mut ident));
                        }
                        item_start = true;
                        continue;
                    }
                    _ => {}
                }
                if depth == 1 && item_start {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        ident.push(c);
                    } else if !ident.is_empty() {
                        refs.push(std::mem::take(&mut ident));
                        item_start = false;
                    }
                }
            }
            if !ident.is_empty() {
                refs.push(ident);
            }
        } else {
            let ident: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            refs.push(ident);
        }
    }
    refs
}

/// Module name → the modules it imports, for every file under `src/` (a directory module
/// counts as one module).
fn imports() -> BTreeMap<String, Vec<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut visit = |module: String, path: &Path| {
        let text = std::fs::read_to_string(path).unwrap();
        let refs = map.entry(module.clone()).or_default();
        for r in crate_refs(&text) {
            if r != module && !refs.contains(&r) {
                refs.push(r);
            }
        }
    };
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            for inner in std::fs::read_dir(&path).unwrap() {
                visit(name.clone(), &inner.unwrap().path());
            }
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            visit(name, &path);
        }
    }
    map
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

#[test]
fn every_import_points_to_a_lower_layer() {
    let mut errors = Vec::new();
    for (module, refs) in imports() {
        let Some(own) = layer_of(&module) else {
            errors.push(format!("src/{module} has no layer in tests/layers.rs"));
            continue;
        };
        for r in refs {
            match layer_of(&r) {
                Some(l) if l < own => {}
                Some(l) => errors.push(format!(
                    "{module} (layer {own}) imports {r} (layer {l}): only lower layers may be imported"
                )),
                None => errors.push(format!("{module} imports {r}, which has no layer")),
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn the_http_transport_knows_no_route_hub_or_stream() {
    let imports = imports();
    let http = &imports["http"];
    for forbidden in [
        "api",
        "hub",
        "sse",
        "broadcast",
        "entity",
        "store",
        "mirror",
    ] {
        assert!(
            !http.contains(&forbidden.to_string()),
            "http.rs imports {forbidden}"
        );
    }
}

#[test]
fn grouped_imports_are_seen() {
    let refs = crate_refs(
        "use crate::{dbus, ha::{self, X}, http};\n// use crate::hidden;\nlet x = crate::notify::ready;",
    );
    assert_eq!(refs, ["dbus", "ha", "http", "notify"]);
}
