// harness.mjs — what the Node harnesses share: tests/browser/test.mjs, tests/frontend/test.mjs and
// measure/kiosk (common.mjs, entities.mjs). Imported by relative path
// (`import { raw } from '../lib/harness.mjs'`); it imports only Node's own modules, so it needs no
// node_modules of its own and none of the importing folder's (each harness loads playwright-core
// itself). The shell side is tests/lib.sh, the Python side tests/lib/ha_ws.py.
import { request as httpRequest } from 'node:http';

// envReader(tag, runner): env(NAME[, FALLBACK]), the value of environment variable NAME (FALLBACK
// when unset or empty); without either it prints "TAG: environment variable NAME is not set (start
// this through RUNNER)" and exits 2.
export function envReader(tag, runner) {
  return (name, fallback) => {
    const v = process.env[name] ?? fallback;
    if (v === undefined || v === '') {
      console.error(`${tag}: environment variable ${name} is not set (start this through ${runner})`);
      process.exit(2);
    }
    return v;
  };
}

// The flags Chromium needs on this machine (see /work/.library/env/machines/rust.md).
export const CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--disable-quic'];

// ---------- the tests' verdicts ----------
// A check that failed: its message is the whole story (no stack printed).
export class TestFailure extends Error {}
export function fail(msg) { throw new TestFailure(msg); }
export function check(cond, msg) { if (!cond) fail(msg); }
// What to print for an error E that ended a test: a TestFailure's message; anything else's message
// and its first 3 stack frames (Playwright's errors append Chromium's whole stderr, "Browser logs:",
// which is cut off).
export function failureText(e) {
  if (e instanceof TestFailure) return e.message;
  return `${String(e.message ?? e).split('\nBrowser logs:')[0]}\n${(e.stack ?? '').split('\n').filter((l) => l.trim().startsWith('at ')).slice(0, 3).join('\n')}`;
}
// onInterrupt(tag, cleanup): on SIGINT or SIGTERM, prints "TAG: interrupted (SIG); closing
// Chromium", awaits cleanup() and exits 130. Returns an object whose `interrupted` turns true then
// (a test's catch must then wait for that exit instead of reporting a failure).
export function onInterrupt(tag, cleanup) {
  const state = { interrupted: false };
  for (const sig of ['SIGINT', 'SIGTERM']) {
    process.on(sig, async () => {
      state.interrupted = true;
      console.error(`${tag}: interrupted (${sig}); closing Chromium`);
      await cleanup();
      process.exit(130);
    });
  }
  return state;
}

// ---------- plain HTTP (Node side, never the browser) ----------
// raw(METHOD, URL, HEADERS, BODY): one request (10 s limit); resolves to { status, headers, body }
// with the body as text, whatever the status.
export function raw(method, url, headers = {}, body) {
  return new Promise((resolve, reject) => {
    const req = httpRequest(url, { method, headers, timeout: 10_000 }, (res) => {
      let data = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { data += c; });
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: data }));
    });
    req.on('timeout', () => req.destroy(new Error(`${method} ${url}: timed out`)));
    req.on('error', reject);
    if (body) req.write(body);
    req.end();
  });
}

// ---------- HA's WebSocket messages ----------
// The entity ids of a message that carries entity data, as HA's frontend gets it: a
// subscribe_entities event (HA websocket_api/messages.py: `a` added, `c` changed, `r` removed), a
// state_changed event, or a get_states result (TYPES: the client's id -> command type); else null.
export function entityIdsOf(m, types) {
  if (!m || typeof m !== 'object') return null;
  const e = m.event;
  if (m.type === 'event' && e && (e.a || e.c || e.r)) return [...Object.keys(e.a ?? {}), ...Object.keys(e.c ?? {}), ...(e.r ?? [])];
  if (m.type === 'event' && e?.event_type === 'state_changed') return [e.data?.entity_id];
  if (m.type === 'result' && types.get(m.id) === 'get_states' && Array.isArray(m.result)) return m.result.map((x) => x.entity_id);
  return null;
}
