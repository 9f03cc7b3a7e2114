// Home Assistant's own frontend in Chromium through hass-edge (issue 15). Debian's Chromium, driven by
// playwright-core, talks only to BASE (hass-edge); the checks of what reached HA use HA's REST and
// WebSocket APIs directly with the peer's admin token (Node and ha_helper.py, never the browser).
// Started by run.sh, one scenario per run; everything comes in the environment:
//
//   SCENARIO     password: log in on HA's login page with the peer's user and password
//                trusted:  no password: HA's trusted_networks provider logs the browser in, because
//                          hass-edge tells HA the client's address (X-Forwarded-For: ::1; HA trusts
//                          X-Forwarded-For from 127.0.0.1 and logs in ::1 without a password)
//                no-xff:   the control of trusted: the same with hass-edge's x_forwarded_for off must
//                          end on HA's password form (HA sees hass-edge's 127.0.0.1), and nothing more
//                api-token: password, with hass-edge's http.api_token_file set (a kiosk on a LAN
//                          address must have one): the frontend sends no hass-edge token, only HA's own
//                dashboard: password, with hass-edge's [dashboards] url_paths = ["lovelace"] (HA's default
//                          dashboard, saved by run.sh with the entities DASH_ENTITIES): the entity data
//                          the page receives holds only those, compared with the same page loaded from
//                          HA directly; an edit of the dashboard in HA reveals a new entity without a
//                          reload; HA stopped and started under the open page; a non-admin user gets
//                          HA's unauthorized; a WebSocket from a foreign origin is refused; /status
//                read-only: password, with http.allow_service_calls = false: the login works (HA's
//                          /auth/* flow), the dashboard shows, a REST write from the page is refused
//                          (403), and the switch (a WebSocket call_service in a session with the
//                          user's own HA token) is HA's to allow, as on HA directly (issue 16)
//   BASE         where the browser goes, e.g. http://127.0.0.1:41234 or http://[::1]:41234 (hass-edge)
//   HA_RESTART   1 = restart HA under the open dashboard (needs PEER_SCRIPT, HA_PEER_DIR)
//   ASSETS       cold|warm: hass-edge's asset directory (beside its state file) is empty / was filled
//                by an earlier scenario's browser; checked against the X-Cache of the assets
//   EDGE_API_TOKEN_FILE  hass-edge's API token, when it has one (api-token; also for /metrics)
//   CLIENT_ADDR  the address HA must record for the login (default 127.0.0.1, trusted: ::1)
//   HA_URL, HA_TOKEN_FILE, HA_PY   the peer: its URL, admin token, and the Python that runs ha_helper.py
//   DIRECT       1 = BASE is HA itself (a control run of this script, not a test of hass-edge):
//                the "nothing went to HA directly" check is skipped
//   DASHBOARD, VIEW   the dashboard made by `ha_helper.py setup` (edge-test, 0)
//   DASH_ENTITIES     dashboard: the entities card's entity ids (comma-separated)
//   HA_VERSION, HA_PORT, PEER_START_ARGS   dashboard: to start the stopped peer again (ha-peer.sh start)
//   OUT_DIR, PROFILE_DIR, CHROMIUM
import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { createServer, request as httpRequest } from 'node:http';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import {
  CHROMIUM_FLAGS as FLAGS, TestFailure, check, entityIdsOf, envReader, fail, failureText, onInterrupt, raw,
} from '../lib/harness.mjs';

const env = envReader('frontend: FAIL', 'tests/frontend/run.sh');
const SCENARIO = env('SCENARIO');
const BASE = env('BASE').replace(/\/+$/, '');
const HA_URL = env('HA_URL').replace(/\/+$/, '');
const HA_TOKEN_FILE = env('HA_TOKEN_FILE');
const HA_TOKEN = readFileSync(HA_TOKEN_FILE, 'utf8').trim();
const HA_PY = env('HA_PY');
const DIRECT = process.env.DIRECT === '1';
const DASHBOARD = env('DASHBOARD', 'edge-test');
const VIEW = env('VIEW', '0');
const OUT_DIR = env('OUT_DIR');
const PROFILE_DIR = env('PROFILE_DIR');
const CHROMIUM = env('CHROMIUM', '/usr/bin/chromium');
const USER = 'edge';                     // tests/ha-peer/peer.py ONBOARD_USER
const PASSWORD = 'edge-tester-password';
const STEP_TIMEOUT = 20_000;             // any one wait
const RUN_TIMEOUT = process.env.SCENARIO === 'dashboard' ? 240_000 : 150_000; // the whole scenario
if (!['password', 'api-token', 'dashboard', 'trusted', 'no-xff', 'read-only'].includes(SCENARIO)) {
  console.error(`frontend: FAIL: SCENARIO must be password, api-token, dashboard, trusted, no-xff or read-only, not ${SCENARIO}`);
  process.exit(2);
}
const tag = `frontend[${SCENARIO}]`;
const PASSWORD_LOGIN = ['password', 'api-token', 'dashboard', 'read-only'].includes(SCENARIO);
const EDGE_API_TOKEN = process.env.EDGE_API_TOKEN_FILE ? readFileSync(process.env.EDGE_API_TOKEN_FILE, 'utf8').trim() : '';
const t0 = Date.now();
const log = (msg) => console.log(`${tag}: ${msg} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const baseUrl = new URL(BASE);
const haUrl = new URL(HA_URL);
const CLIENT_ID = `${BASE}/`; // what HA's frontend sends as client_id: its own origin

// ---------- Home Assistant, directly (Node side, never the browser; raw() is harness.mjs's) ----------
// GET without Accept-Encoding: HA answers the plain bytes (what the browser's decoded body must be)
function rawBytes(url) {
  return new Promise((resolve, reject) => {
    const req = httpRequest(url, { method: 'GET', timeout: 10_000 }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${url}: timed out`)));
    req.on('error', reject);
    req.end();
  });
}
async function haState(id) {
  const r = await raw('GET', `${HA_URL}/api/states/${id}`, { Authorization: `Bearer ${HA_TOKEN}` });
  check(r.status === 200, `Home Assistant GET /api/states/${id}: HTTP ${r.status} ${r.body.slice(0, 200)}`);
  return JSON.parse(r.body);
}
// hass-edge's request counters: forwarded requests (any status) and WebSocket tunnels (101).
async function edgeCounts() {
  const r = await raw('GET', `${BASE}/metrics`, EDGE_API_TOKEN ? { Authorization: `Bearer ${EDGE_API_TOKEN}` } : {});
  check(r.status === 200, `hass-edge GET /metrics: HTTP ${r.status} ${r.body.slice(0, 200)}`);
  const sum = (re) => r.body.split('\n').filter((l) => re.test(l)).reduce((a, l) => a + Number(l.split(' ').pop()), 0);
  return {
    forwarded: sum(/^hass_edge_http_requests_total\{route="forward",/),
    tunnels: sum(/^hass_edge_http_requests_total\{route="tunnel",status="101"\}/),
    sessions: sum(/^hass_edge_websocket_sessions_total /), // hass-edge's own /api/websocket (issue 16)
  };
}
function helper(...args) {
  return new Promise((resolve, reject) => {
    execFile(HA_PY, [new URL('./ha_helper.py', import.meta.url).pathname, ...args,
      '--url', HA_URL, '--token-file', HA_TOKEN_FILE], { timeout: 30_000 }, (err, stdout, stderr) => {
      if (err) reject(new TestFailure(`ha_helper.py ${args[0]}: ${(stderr || err.message).trim()}`));
      else resolve(JSON.parse(stdout));
    });
  });
}
// Poll fn (async, truthy = done) every 100 ms, at most `ms`.
async function until(what, fn, ms = STEP_TIMEOUT) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      if (e instanceof TestFailure) throw e;
      last = String(e.message ?? e).split('\n')[0];
    }
    if (Date.now() > deadline) fail(`timed out (${ms / 1000} s) waiting until ${what}${last ? ` (last: ${last})` : ''}`);
    await sleep(100);
  }
}

// ---------- the browser and what it did on the network ----------
let context;
let page;
const requests = [];   // every HTTP request of the context (pages and workers)
const sockets = [];    // every WebSocket
const consoleLines = [];
const pageErrors = []; // { t, line }
const hitBodies = []; // { t, url, body } of assets hass-edge answered from its disk cache
const isAsset = (u) => /^\/(frontend_latest|frontend_es5|static)\//.test(new URL(u).pathname);
const ASSETS = process.env.ASSETS ?? ''; // cold: hass-edge's asset directory is empty; warm: an earlier browser filled it
const authAnswers = []; // HA's answers to the login requests, as the page got them
let restartWindow = null; // { from, to } ms after t0 while HA restarted (HA_RESTART=1)
const duringRestart = (t) => restartWindow !== null && t >= restartWindow.from && t <= restartWindow.to;

async function cleanup() {
  if (context) {
    const c = context;
    context = undefined;
    await Promise.race([c.close().catch(() => {}), sleep(5000)]);
  }
}
const signals = onInterrupt(tag, cleanup);
const watchdog = setTimeout(() => {
  console.error(`${tag}: FAIL: the whole scenario took more than ${RUN_TIMEOUT / 1000} s`);
  dumpNetwork();
  cleanup().finally(() => process.exit(1));
}, RUN_TIMEOUT);

function recordNetwork() {
  context.on('request', (r) => {
    requests.push({ t: Date.now() - t0, method: r.method(), url: r.url(), type: r.resourceType(), status: null, failure: null, req: r });
  });
  const entry = (r) => requests.find((e) => e.req === r);
  context.on('requestfinished', async (r) => {
    const e = entry(r);
    if (!e) return;
    const resp = await r.response().catch(() => null);
    e.status = resp ? resp.status() : 'no response';
    // hass-edge's asset cache (X-Cache: hit = answered from its disk); a few hits' bodies are
    // kept to compare with HA's own bytes
    if (resp && isAsset(r.url())) {
      e.xcache = (await resp.allHeaders().catch(() => ({})))['x-cache'] ?? null;
      if (e.xcache === 'hit' && hitBodies.length < 400) {
        const body = await resp.body().catch(() => null);
        if (body) hitBodies.push({ t: e.t, url: r.url(), body });
      }
    }
  });
  // HA's answers to the login requests, read as soon as they arrive (a navigation right after one
  // can take its body away: then it is kept as null, and HA's own record decides, see main()).
  context.on('response', async (resp) => {
    const path = new URL(resp.url()).pathname;
    if (!(path === '/auth/providers' || path.startsWith('/auth/login_flow') || path === '/auth/token')) return;
    const a = { method: resp.request().method(), path, status: resp.status(), body: null };
    authAnswers.push(a);
    let body = null;
    try { body = JSON.parse(await resp.text()); } catch { /* gone with a navigation, or not JSON */ }
    // never keep a token: of /auth/token's answer only the field names and the provider
    if (body && path === '/auth/token') body = { fields: Object.keys(body), ha_auth_provider: body.ha_auth_provider };
    a.body = body;
  });
  context.on('requestfailed', (r) => {
    const e = entry(r);
    if (e) e.failure = r.failure()?.errorText ?? 'failed';
  });
}
function watchPage(p) {
  p.on('console', (m) => consoleLines.push(`[${m.type()}] ${m.text()}`));
  p.on('pageerror', (e) => {
    const line = `[pageerror] ${Date.now() - t0} ms ${p.url()} ${e?.name}: ${e?.message} ${e?.stack ?? ''}`;
    consoleLines.push(line);
    pageErrors.push({ t: Date.now() - t0, line });
  });
  p.on('websocket', (ws) => {
    // entity data: the entity ids in it and its bytes (see entityIdsOf); added: subscribe_entities'
    // `a` events (time, ids)
    const s = { t: Date.now() - t0, url: ws.url(), page: p, received: 0, sent: 0, closed: false, error: null, firstIn: [], types: new Map(), errors: [],
      bytes: 0, entityBytes: 0, entityIds: new Set(), added: [] };
    sockets.push(s);
    const messages = (payload) => { try { return [JSON.parse(String(payload))].flat(); } catch { return []; } };
    ws.on('framereceived', (f) => {
      s.received += 1;
      s.bytes += Buffer.byteLength(String(f.payload));
      if (s.firstIn.length < 3) s.firstIn.push(String(f.payload).slice(0, 120));
      for (const m of messages(f.payload)) {
        if (m && m.type === 'result' && m.success === false) s.errors.push(`${s.types.get(m.id) ?? `id ${m.id}`}: ${m.error?.code}`);
        const ids = entityIdsOf(m, s.types);
        if (!ids) continue;
        s.entityBytes += Buffer.byteLength(JSON.stringify(m));
        for (const id of ids) s.entityIds.add(id);
        if (m.event?.a) s.added.push({ t: Date.now() - t0, ids: Object.keys(m.event.a) });
      }
    });
    ws.on('framesent', (f) => {
      s.sent += 1;
      for (const m of messages(f.payload)) if (m && m.id !== undefined) s.types.set(m.id, m.type);
    });
    ws.on('close', () => { s.closed = true; });
    ws.on('socketerror', (err) => { s.error = String(err); });
  });
}
const fmtReq = (e) => `${String(e.t).padStart(6)} ms ${e.method.padEnd(4)} ${e.status ?? '…'}${e.xcache ? ` X-Cache:${e.xcache}` : ''}${e.failure ? ` FAILED ${e.failure}` : ''} ${e.type} ${e.url}`;
function dumpNetwork() {
  const lines = [...requests.map(fmtReq), ...sockets.map((s) => `${String(s.t).padStart(6)} ms WS   ${s.url} received ${s.received} sent ${s.sent}${s.closed ? ' closed' : ' open'}${s.error ? ` error ${s.error}` : ''}`)];
  const file = join(OUT_DIR, `frontend-${SCENARIO}-requests.txt`);
  try { writeFileSync(file, `${lines.join('\n')}\n`); } catch { /* OUT_DIR gone */ }
  return file;
}

// ---------- the dashboard, read from the DOM (Playwright's CSS pierces HA's open shadow roots) ----------
// A row's switch, found as a screen reader would: by role and accessible name, which HA's
// ha-entity-toggle gives its switch — "Toggle Kitchen on" / "Toggle Kitchen off" (the action; HA
// 2024.3) or "Toggle Kitchen" (HA 2026.11). Its aria-checked is the state it shows.
const reEscape = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
const rowSwitch = (name) => page.getByRole('switch', { name: new RegExp(`^Toggle ${reEscape(name)}(?: on| off)?$`) });
// What a person clicks: the switch as drawn, the ha-switch around that input. (HA 2026.11's
// ha-switch, a Web Awesome switch, lays its thumb over the visually hidden input, so a click aimed
// at the input itself is refused by Playwright as intercepted; 2024.3's mwc-switch takes it either way.)
const rowToggle = (name) => page.locator('ha-switch').filter({ has: rowSwitch(name) });
async function shown(names) {
  const out = {};
  for (const n of names) {
    const c = await rowSwitch(n).getAttribute('aria-checked', { timeout: 2000 });
    out[n] = c === 'true' ? 'on' : c === 'false' ? 'off' : `aria-checked=${c}`;
  }
  out.card = (await page.locator('hui-entity-card .info .value').textContent({ timeout: 2000 })).trim().toLowerCase();
  return out;
}
// What a person would see when it goes wrong: the URL, the title and the text of the main parts,
// collected through the shadow roots (innerText does not enter them).
async function pageState() {
  if (!page) return 'no page';
  try {
    return JSON.stringify(await page.evaluate(() => {
      const texts = [];
      const walk = (node, depth) => {
        if (depth > 40 || texts.join(' ').length > 1500) return;
        for (const child of node.childNodes) {
          if (child.nodeType === Node.TEXT_NODE) {
            const t = child.textContent.trim();
            if (t && !['STYLE', 'SCRIPT'].includes(child.parentNode?.nodeName)) texts.push(t);
          } else if (child.nodeType === Node.ELEMENT_NODE) {
            if (/^(MWC|HA)-LIST-ITEM$/.test(child.nodeName)) continue; // e.g. the 60 languages of the login page
            if (child.shadowRoot) walk(child.shadowRoot, depth + 1);
            walk(child, depth + 1);
          }
        }
      };
      walk(document.body, 0);
      return { url: location.href, title: document.title, text: texts.join(' | ').slice(0, 1500) };
    }));
  } catch (e) {
    return `unreadable: ${String(e.message ?? e).split('\n')[0]}`;
  }
}

async function screenshot(name) {
  const file = join(OUT_DIR, `frontend-${SCENARIO}-${name}.png`);
  await page.screenshot({ path: file, timeout: 10_000 });
  log(`screenshot: ${file}`);
}

// ---------- the scenario ----------
async function main() {
  const since = new Date(Date.now() - 2000).toISOString();
  const names = {};
  for (const id of ['input_boolean.kitchen', 'light.kitchen']) names[id] = (await haState(id)).attributes.friendly_name;
  const rowNames = Object.values(names);
  check(new Set(rowNames).size === 2 && rowNames.every(Boolean), `friendly names in HA: ${JSON.stringify(names)}`);

  if (SCENARIO === 'api-token') {
    // hass-edge's token mode is on: its own routes refuse a request without the API token
    const bare = await raw('GET', `${BASE}/api/states/light.kitchen`);
    check(bare.status === 401, `hass-edge GET /api/states/light.kitchen without a token: HTTP ${bare.status}, expected 401 (api_token_file set)`);
    const withToken = await raw('GET', `${BASE}/api/states/light.kitchen`, { Authorization: `Bearer ${EDGE_API_TOKEN}` });
    check(withToken.status === 200, `hass-edge GET /api/states/light.kitchen with its API token: HTTP ${withToken.status}`);
    log('hass-edge has an API token: its own routes answer 401 without it, 200 with it');
  }
  const counts0 = DIRECT ? null : await edgeCounts();
  context = await chromium.launchPersistentContext(PROFILE_DIR, {
    executablePath: CHROMIUM, headless: true, args: FLAGS, viewport: { width: 1280, height: 800 }, timeout: 30_000,
  });
  recordNetwork();
  // An unhandled rejection with a plain object reaches Playwright as "Object": log its content.
  // HA's own answer "unknown_command" to a WebSocket command of the frontend (the peer has no
  // default_config, so some integrations the frontend asks are not loaded; it happens without
  // hass-edge too) is logged, not counted as a JavaScript error: the commands are listed below.
  await context.addInitScript(() => window.addEventListener('unhandledrejection', (e) => {
    let reason;
    try { reason = JSON.stringify(e.reason); } catch { reason = String(e.reason); }
    if (e.reason && e.reason.code === 'unknown_command') {
      e.preventDefault();
      console.info(`tolerated unhandledrejection: ${reason}`);
    } else {
      console.error(`unhandledrejection: ${reason}`);
    }
  }));
  page = context.pages()[0] ?? await context.newPage();
  watchPage(page);
  context.on('page', watchPage);
  log(`Chromium ${context.browser()?.version() ?? ''} started; opening ${BASE}/${DIRECT ? ' (DIRECT: HA itself, a control run)' : ''}`);

  // 1. Log in.
  const resp = await page.goto(`${BASE}/`, { waitUntil: 'commit', timeout: STEP_TIMEOUT });
  check(resp && resp.status() < 400, `GET ${BASE}/: HTTP ${resp?.status()}`);
  if (SCENARIO === 'no-xff') {
    // Without X-Forwarded-For HA sees hass-edge (127.0.0.1), not a trusted network: the password form.
    await until('HA\'s login page shows the username field', () => page.locator('input[name="username"]').isVisible());
    const p = await until('HA\'s answer to GET /auth/providers has been read', () => authAnswers.find((a) => a.path === '/auth/providers' && a.body), 5000);
    const offered = p.body.providers.map((x) => x.type);
    check(JSON.stringify(offered) === '["homeassistant"]', `without X-Forwarded-For HA offered ${JSON.stringify(offered)}, expected only homeassistant`);
    await sleep(1500); // nothing must log the browser in by itself
    check(new URL(page.url()).pathname === '/auth/authorize', `without X-Forwarded-For the page went on to ${page.url()}`);
    check(authAnswers.every((a) => a.path !== '/auth/token'), 'without X-Forwarded-For the browser got a token');
    await screenshot('login');
    log(`without X-Forwarded-For HA offers only ${offered.join(', ')}: the password form, as it must (the control of the trusted scenario)`);
    return;
  }
  if (PASSWORD_LOGIN) {
    await until('HA\'s login page shows the username field', () => page.locator('input[name="username"]').isVisible());
    check(new URL(page.url()).pathname === '/auth/authorize', `the login page is at ${page.url()}, expected ${BASE}/auth/authorize`);
    await screenshot('login');
    await page.locator('input[name="username"]').fill(USER, { timeout: STEP_TIMEOUT });
    await page.locator('input[name="password"]').fill(PASSWORD, { timeout: STEP_TIMEOUT });
    await page.getByRole('button', { name: /log in/i }).click({ timeout: STEP_TIMEOUT });
    log(`logged in as ${USER} on HA's login page`);
  }
  await until(`the frontend is logged in and shows its sidebar (${SCENARIO === 'trusted' ? 'no password typed' : 'after the password'})`,
    async () => {
      if (SCENARIO === 'trusted') {
        // Without the client's address in X-Forwarded-For, HA sees hass-edge's 127.0.0.1, offers
        // only the password form, and nothing else would happen: say so at once.
        const p = authAnswers.find((a) => a.path === '/auth/providers' && a.body);
        if (p && p.body.providers?.[0]?.type !== 'trusted_networks') {
          fail(`HA's login page offers ${JSON.stringify(p.body.providers?.map((x) => x.type))}, not trusted_networks first: HA did not see the browser at ${env('CLIENT_ADDR', '::1')} (X-Forwarded-For missing or wrong?)`);
        }
      }
      return !new URL(page.url()).pathname.startsWith('/auth/') && (await page.locator('ha-sidebar').count()) > 0;
    });
  check(new URL(page.url()).origin === baseUrl.origin, `after the login the page is at ${page.url()}, not on ${BASE}`);
  const flows = authAnswers.filter((a) => a.path.startsWith('/auth/login_flow'));
  const providersAnswer = authAnswers.find((a) => a.path === '/auth/providers');
  check(providersAnswer && providersAnswer.status === 200,
    `GET /auth/providers: ${providersAnswer ? `HTTP ${providersAnswer.status} ${JSON.stringify(providersAnswer.body)}` : 'not seen'}`);
  // (its body can be gone when the login navigates away at once, as trusted_networks does:
  // then HA's own record of the login, below, decides)
  const providers = providersAnswer.body ? providersAnswer.body.providers.map((p) => p.type) : null;
  const wanted = SCENARIO === 'trusted' ? 'trusted_networks' : 'homeassistant';
  check(flows.length >= 1 && flows.every((a) => a.status === 200), `the login flow requests: ${JSON.stringify(flows).slice(0, 600)}`);
  if (SCENARIO === 'trusted') {
    check(providers === null || providers[0] === 'trusted_networks', `HA offered the providers ${JSON.stringify(providers)} to the browser: trusted_networks is not first, so HA did not see the browser at a trusted network address`);
    // trusted_networks with allow_bypass_login and one user: the first POST creates the login, no form
    check(flows.length === 1, `the trusted_networks login took ${flows.length} login-flow requests (expected 1: no form): ${JSON.stringify(flows).slice(0, 600)}`);
  } else {
    check(flows.length === 2, `the password login took ${flows.length} login-flow requests (expected 2: the form, then username and password): ${JSON.stringify(flows).slice(0, 600)}`);
  }
  const lastFlow = flows[flows.length - 1].body;
  check(lastFlow === null || (lastFlow.type === 'create_entry' && lastFlow.handler?.[0] === wanted),
    `the login flow ended with ${JSON.stringify(lastFlow).slice(0, 400)}, expected create_entry by ${wanted}`);
  const token = authAnswers.find((a) => a.path === '/auth/token');
  check(token && token.status === 200, `POST /auth/token: ${token ? `HTTP ${token.status} ${JSON.stringify(token.body)}` : 'not seen'}`);
  check(!token.body || token.body.ha_auth_provider === wanted, `POST /auth/token says ha_auth_provider ${token.body?.ha_auth_provider}, expected ${wanted}`);
  // What HA itself recorded for this login: the provider, and the client address it saw.
  const logins = await helper('tokens', '--client-id', CLIENT_ID, '--since', since);
  check(logins.length === 1, `HA has ${logins.length} refresh tokens for client_id ${CLIENT_ID} since ${since}, expected 1: ${JSON.stringify(logins)}`);
  const wantIp = env('CLIENT_ADDR', SCENARIO === 'trusted' ? '::1' : '127.0.0.1');
  check(logins[0].auth_provider_type === wanted, `HA's refresh token of this login has auth_provider_type ${logins[0].auth_provider_type}, expected ${wanted}`);
  check(logins[0].last_used_ip === wantIp, `HA saw this login from ${logins[0].last_used_ip}, expected ${wantIp}`);
  log(`logged in: HA's ${logins[0].auth_provider_type} provider (offered: ${providers ? providers.join(', ') : 'answer gone with the navigation'}; ${flows.length} login-flow request(s)), HA saw the client at ${logins[0].last_used_ip}`);
  if (SCENARIO === 'dashboard') return dashboard(since);

  // 2. The dashboard, reached as a person would: its entry in the sidebar.
  const link = page.locator(`ha-sidebar a[href="/${DASHBOARD}"]`);
  await until(`the sidebar lists the dashboard /${DASHBOARD}`, () => link.isVisible());
  await link.click({ timeout: STEP_TIMEOUT });
  await until(`the page is at /${DASHBOARD}/${VIEW}`, () => new URL(page.url()).pathname === `/${DASHBOARD}/${VIEW}`);
  await until('the entities card shows both toggle rows and the entity card its state',
    async () => (await rowSwitch(names['input_boolean.kitchen']).count()) === 1 && (await rowSwitch(names['light.kitchen']).count()) === 1
      && (await page.locator('hui-entity-card .info .value').count()) === 1);

  const truth = async () => ({ ib: (await haState('input_boolean.kitchen')).state, light: (await haState('light.kitchen')).state });
  const matches = async (want) => {
    const s = await shown(rowNames);
    return s[names['input_boolean.kitchen']] === want.ib && s[names['light.kitchen']] === want.light && s.card === want.light ? s : false;
  };
  const start = await truth();
  check(['on', 'off'].includes(start.ib) && start.light === start.ib, `HA reports input_boolean.kitchen = ${start.ib}, light.kitchen = ${start.light}`);
  await until(`the dashboard shows HA's states (${JSON.stringify(start)})`, () => matches(start), 10_000);
  log(`dashboard /${DASHBOARD}/${VIEW} shows ${JSON.stringify(await shown(rowNames))}, as HA reports`);

  if (SCENARIO === 'read-only') {
    // http.allow_service_calls = false: a forwarded REST write is refused whoever sends it
    // (issue 15); a WebSocket session with the user's own HA token is HA's to govern (issue 16),
    // so the switch's call_service works for this admin user as on HA directly.
    const want = start.ib === 'on' ? 'off' : 'on';
    const tClick = Date.now();
    await rowToggle(names['input_boolean.kitchen']).click({ timeout: STEP_TIMEOUT });
    let after = start;
    for (let i = 0; i < 50 && after.ib !== want; i++) {
      await sleep(100);
      after = await truth();
    }
    if (after.ib !== start.ib) {
      await raw('POST', `${HA_URL}/api/services/input_boolean/turn_${start.ib}`, { Authorization: `Bearer ${HA_TOKEN}`, 'Content-Type': 'application/json' },
        JSON.stringify({ entity_id: 'input_boolean.kitchen' })); // put HA back
    }
    const set = await page.evaluate(async () => {
      try {
        await document.querySelector('home-assistant').hass.callApi('POST', 'states/input_text.last_message', { state: 'read-only?' });
        return 'written';
      } catch (e) {
        return `${e?.status_code}: ${e?.body?.message}`;
      }
    });
    check(set.startsWith('403'), `read-only hass-edge: the frontend's POST /api/states/input_text.last_message was ${set}, expected 403`);
    check(after.ib === want, `read-only hass-edge (http.allow_service_calls = false): the page's switch did not change HA — input_boolean.kitchen still ${after.ib} ${Date.now() - tClick} ms after the click; a session with the user's own HA token is HA's to govern (README, read-only mode)`);
    log(`read-only: a REST write got ${set}; the switch (the user's own session) changed HA to ${after.ib}`);
    return;
  }

  // 3. Toggle in the page; the change must reach HA and come back to the page.
  const flip = (s) => (s === 'on' ? 'off' : 'on');
  const toggle = async (from, why) => {
    const want = { ib: flip(from.ib), light: flip(from.light) };
    const tClick = Date.now();
    await rowToggle(names['input_boolean.kitchen']).click({ timeout: STEP_TIMEOUT });
    await until(`HA reports input_boolean.kitchen = ${want.ib} and light.kitchen = ${want.light} after the click (${why})`,
      async () => { const t = await truth(); return t.ib === want.ib && t.light === want.light; });
    const inHa = Date.now() - tClick;
    await until(`the page shows ${JSON.stringify(want)} after the click (${why})`, () => matches(want));
    log(`${why}: clicked ${names['input_boolean.kitchen']} → HA has ${want.ib} after ${inHa} ms, the page shows it (light too) after ${Date.now() - tClick} ms`);
    return want;
  };
  const flipped = await toggle(start, 'toggle');
  await screenshot('dashboard');

  // 4. A cold load of the dashboard's own URL (stored login), then toggle back from there.
  await page.goto(`${BASE}/${DASHBOARD}/${VIEW}`, { waitUntil: 'commit', timeout: STEP_TIMEOUT });
  await until(`the reloaded /${DASHBOARD}/${VIEW} shows ${JSON.stringify(flipped)}`, async () => new URL(page.url()).pathname === `/${DASHBOARD}/${VIEW}` && matches(flipped));
  log(`reloaded ${BASE}/${DASHBOARD}/${VIEW}: still logged in, shows ${JSON.stringify(flipped)}`);
  await toggle(flipped, 'toggle back after the reload');
  check(JSON.stringify(await truth()) === JSON.stringify(start), 'HA did not end where it started');

  // 4b. The frontend's own REST client (hass.callApi: its HA access token, refreshed as needed),
  //     as Developer tools' "Set state" and "Events" and Settings' "Check configuration" use it:
  //     through hass-edge with the frontend's own credentials.
  const ID = 'input_text.last_message';
  const original = await haState(ID);
  const callApi = (method, path, body) => page.evaluate(async ([m, p, b]) => {
    try {
      return { ok: true, result: await document.querySelector('home-assistant').hass.callApi(m, p, b) };
    } catch (e) {
      return { ok: false, error: JSON.stringify(e) ?? String(e), status: e?.status_code ?? e?.status };
    }
  }, [method, path, body]);
  const events = await callApi('GET', 'events');
  check(events.ok && Array.isArray(events.result) && events.result.some((e) => e.event === 'state_changed'),
    `hass.callApi GET /api/events through hass-edge: ${JSON.stringify(events).slice(0, 300)}`);
  const value = `set by the frontend through hass-edge ${Date.now()}`;
  const set = await callApi('POST', `states/${ID}`, { state: value, attributes: original.attributes });
  check(set.ok && set.result?.state === value, `hass.callApi POST /api/states/${ID} ("Set state") through hass-edge: ${JSON.stringify(set).slice(0, 300)}`);
  check((await haState(ID)).state === value, `after "Set state" through hass-edge HA reports ${ID} = ${(await haState(ID)).state}`);
  const local = await raw('GET', `${BASE}/api/states/${ID}`, EDGE_API_TOKEN ? { Authorization: `Bearer ${EDGE_API_TOKEN}` } : {});
  if (!DIRECT) {
    check(local.status === 200 && JSON.parse(local.body).state === value,
      `hass-edge's own GET /api/states/${ID} right after the frontend's "Set state": HTTP ${local.status} ${local.body.slice(0, 200)} (X-Cache ${local.headers['x-cache']})`);
  }
  const checked = await callApi('POST', 'config/core/check_config');
  check(checked.ok && checked.result?.result === 'valid', `hass.callApi POST /api/config/core/check_config through hass-edge: ${JSON.stringify(checked).slice(0, 300)}`);
  const restore = await raw('POST', `${HA_URL}/api/states/${ID}`, { Authorization: `Bearer ${HA_TOKEN}`, 'Content-Type': 'application/json' },
    JSON.stringify({ state: original.state, attributes: original.attributes }));
  check(restore.status === 200 || restore.status === 201, `restoring ${ID} in HA: HTTP ${restore.status}`);
  log(`the frontend's REST client through ${DIRECT ? 'HA itself' : 'hass-edge'}: GET /api/events (${events.result.length} event types), "Set state" POST /api/states/${ID} (HA has it${DIRECT ? '' : `, hass-edge's own route too: X-Cache ${local.headers['x-cache']}`}), POST /api/config/core/check_config: ${checked.result.result}`);

  // 5. (HA_RESTART=1) Home Assistant restarts under the open dashboard, as after an update: the
  //    frontend must notice (its WebSocket through hass-edge closes), reconnect through hass-edge,
  //    and follow HA again — a change made in HA, and a click in the page.
  if (process.env.HA_RESTART === '1') {
    const socketsBefore = sockets.length;
    // the page's live WebSocket: the last one opened (an earlier page's socket went with its page)
    const live = sockets[sockets.length - 1];
    check(live && !live.closed && live.received >= 3, `before the restart the page has no open WebSocket: ${JSON.stringify(live && { url: live.url, closed: live.closed, received: live.received })}`);
    const tRestart = Date.now();
    await new Promise((resolve, reject) => {
      execFile('bash', [env('PEER_SCRIPT'), 'restart', env('HA_PEER_DIR')], { timeout: 150_000 }, (err, _out, stderr) => {
        if (err) reject(new TestFailure(`ha-peer.sh restart failed: ${(stderr || err.message).trim().split('\n').slice(-5).join(' | ')}`));
        else resolve();
      });
    });
    restartWindow = { from: tRestart - t0, to: Date.now() - t0 };
    log(`HA restarted (homeassistant.restart) and RUNNING again after ${Date.now() - tRestart} ms`);
    if (DIRECT) {
      // HA itself closes the frontend's WebSocket when it stops; the frontend reconnects
      check(live.closed, `the frontend's WebSocket to HA is still open after HA restarted: ${JSON.stringify({ url: live.url, closed: live.closed, received: live.received })}`);
      await until(`the frontend reconnected to ${BASE} (a new WebSocket with auth_ok)`,
        () => sockets.slice(socketsBefore).some((x) => x.url === `${baseUrl.protocol === 'https:' ? 'wss' : 'ws'}://${baseUrl.host}/api/websocket` && x.received >= 3 && !x.closed), 30_000);
      log(`the frontend reconnected to ${BASE} ${Date.now() - tRestart} ms after the restart began (${sockets.length - socketsBefore} new WebSocket(s))`);
    } else {
      // hass-edge serves /api/websocket itself (issue 16): the page's session outlives HA's
      // restart (its subscriptions are served from the mirror; its own link to HA is made again)
      check(!live.closed && sockets.length === socketsBefore, `the frontend's WebSocket to hass-edge closed while HA restarted (issue 16: local sessions stay open): ${JSON.stringify({ url: live.url, closed: live.closed, received: live.received, opened_since: sockets.length - socketsBefore })}`);
      log('the frontend\'s WebSocket to hass-edge stayed open across HA\'s restart');
      // The page never saw HA go: a command it sends before hass-edge is connected to HA again
      // (its back-off: up to 2^n s after HA is back) is answered home_assistant_error at once
      // (issue 16: "Forwarded commands made while HA is down get an immediate
      // home_assistant_error"). So: hass-edge live again (/health 200) and the page's session's
      // own link to HA made again (/status websocket_api.links_open ≥ 1) before the click.
      const auth = EDGE_API_TOKEN ? { Authorization: `Bearer ${EDGE_API_TOKEN}` } : {};
      await until('hass-edge is connected to HA again (/health 200) and the page\'s session has its link to HA again (/status websocket_api.links_open ≥ 1)', async () => {
        if ((await raw('GET', `${BASE}/health`)).status !== 200) return false;
        const st = JSON.parse((await raw('GET', `${BASE}/status`, auth)).body);
        return ((st.websocket_api ?? st.forwarding?.websocket_api)?.links_open ?? 0) >= 1;
      }, 30_000);
      log(`hass-edge and the page's session are connected to HA again ${Date.now() - tRestart} ms after the restart began (HA was RUNNING after ${restartWindow.to - restartWindow.from} ms)`);
      restartWindow.to = Date.now() - t0; // what the page asked until now may have met HA away
    }
    const afterRestart = await truth(); // input_boolean.kitchen has initial: false
    await until(`the dashboard shows HA's states after the restart (${JSON.stringify(afterRestart)})`, () => matches(afterRestart), 30_000);
    const clicked = await toggle(afterRestart, 'toggle after HA restarted');
    // and a change made in HA itself reaches the page over the new subscription
    const r = await raw('POST', `${HA_URL}/api/services/input_boolean/toggle`, { Authorization: `Bearer ${HA_TOKEN}`, 'Content-Type': 'application/json' }, JSON.stringify({ entity_id: 'input_boolean.kitchen' }));
    check(r.status === 200, `HA POST /api/services/input_boolean/toggle: HTTP ${r.status}`);
    const back = { ib: flip(clicked.ib), light: flip(clicked.light) };
    await until(`the page shows HA's own change ${JSON.stringify(back)} after the restart`, () => matches(back));
    log(`after the restart: the page follows a click (${JSON.stringify(clicked)}) and a change made in HA (${JSON.stringify(back)})`);
  }

  // 6. The network: everything through BASE, nothing broken (but what was asked while HA restarted).
  await sleep(500); // late responses land in the log
  const netFile = dumpNetwork();
  const web = requests.filter((e) => /^(https?|wss?):/.test(e.url));
  const allUrls = [...web.map((e) => e.url), ...sockets.map((s) => s.url)];
  const toHa = allUrls.filter((u) => { const x = new URL(u); return x.port === haUrl.port && ['127.0.0.1', 'localhost', haUrl.hostname].includes(x.hostname); });
  const elsewhere = allUrls.filter((u) => new URL(u).host !== baseUrl.host);
  if (!DIRECT) {
    check(toHa.length === 0, `${toHa.length} request(s) went to HA's port ${haUrl.port} directly: ${toHa.slice(0, 5).join(' ')}`);
  }
  check(elsewhere.length === 0, `${elsewhere.length} request(s) went elsewhere than ${baseUrl.host}: ${elsewhere.slice(0, 5).join(' ')}`);
  const wsUrl = `${baseUrl.protocol === 'https:' ? 'wss' : 'ws'}://${baseUrl.host}/api/websocket`;
  const tunnels = sockets.filter((s) => s.url === wsUrl);
  const opened = tunnels.filter((s) => s.received >= 1);
  check(tunnels.length >= 1, `no WebSocket to ${wsUrl} (sockets: ${JSON.stringify(sockets)})`);
  const wsFailed = tunnels.filter((s) => (s.error || s.received === 0) && !duringRestart(s.t));
  check(wsFailed.length === 0, `WebSocket(s) failed: ${JSON.stringify(wsFailed.map(({ types, ...rest }) => rest))}`);
  check(tunnels.some((s) => s.received >= 5), `no WebSocket to ${wsUrl} carried HA's answers (frames received: ${tunnels.map((s) => s.received).join(', ')})`);
  const broken = web.filter((e) => !duringRestart(e.t) && ((e.failure && e.failure !== 'net::ERR_ABORTED') || (typeof e.status === 'number' && e.status >= 400)));
  check(broken.length === 0, `${broken.length} request(s) failed or got an HTTP error: ${broken.slice(0, 8).map(fmtReq).join(' | ')}`);
  const unanswered = web.filter((e) => e.status === null && !e.failure && !duringRestart(e.t));
  check(unanswered.length === 0, `${unanswered.length} request(s) never answered: ${unanswered.slice(0, 8).map(fmtReq).join(' | ')}`);
  // While HA restarts, a chunk the frontend asks for gets hass-edge's 502 (a refused connection
  // would do the same without hass-edge) and its import fails — also later: Chromium keeps the
  // failed module for the page's life. Those errors are listed, not counted.
  const failedInRestart = new Set(web.filter((e) => duringRestart(e.t) && (e.failure || (typeof e.status === 'number' && e.status >= 400))).map((e) => e.url));
  const fromRestart = (e) => duringRestart(e.t)
    || [...failedInRestart].some((u) => e.line.includes(`Failed to fetch dynamically imported module: ${u}`));
  const jsErrors = pageErrors.filter((e) => !fromRestart(e));
  check(jsErrors.length === 0, `JavaScript errors in the page: ${jsErrors.map((e) => e.line).join(' | ').slice(0, 1500)}`);
  const jsErrorsInRestart = pageErrors.filter(fromRestart);
  if (jsErrorsInRestart.length) log(`JavaScript errors while HA restarted (not counted): ${jsErrorsInRestart.map((e) => e.line.slice(0, 300)).join(' | ')}`);
  const aborted = web.filter((e) => e.failure === 'net::ERR_ABORTED').length;
  let counted = '';
  let assetNote = '';
  if (!DIRECT) {
    // hass-edge itself forwarded and tunnelled them (its counters; the browser's own cache may
    // spare some requests, so forwards are at least 1 per answered document, not equal). A
    // tunnel is counted when it ends: close the browser first, then every tunnel must end.
    const docs = web.filter((e) => e.type === 'document' && typeof e.status === 'number').length;
    await cleanup();
    // issue 16: every one was a session of hass-edge's own WebSocket API, none a tunnel to HA
    const counts = await edgeCounts();
    check(counts.sessions - counts0.sessions === opened.length && counts.tunnels === counts0.tunnels,
      `the browser opened ${opened.length} WebSocket(s) to ${wsUrl}; hass-edge counted ${counts.sessions - counts0.sessions} session(s) of its own WebSocket API and ${counts.tunnels - counts0.tunnels} tunnel(s) to HA (expected ${opened.length} and 0)`);
    const fwd = counts.forwarded - counts0.forwarded;
    check(fwd >= docs && fwd >= 1, `hass-edge counted ${fwd} forwarded request(s), the browser loaded ${docs} document(s) through it`);
    // The asset cache, as the browser got it
    const assets = web.filter((e) => isAsset(e.url) && e.status === 200);
    const hits = assets.filter((e) => e.xcache === 'hit');
    // an asset whose earlier request the browser aborted (a navigation) while hass-edge relayed it
    const abortedBefore = (url, t) => web.some((e) => e.url === url && e.t < t && e.failure === 'net::ERR_ABORTED');
    // (no check that a cold directory answers nothing before the browser asked HA: the browser's
    // log misses requests of a page that navigated away, e.g. "/" loading chunks right before
    // it goes to the login page, and those fill the directory too)
    if (ASSETS === 'warm') {
      // the frontend's first scripts, which every earlier browser loaded whole, come from the disk
      const first = assets.filter((e) => /^\/frontend_latest\/(core|app|authorize)\.[^/]+\.js$/.test(new URL(e.url).pathname));
      check(first.length >= 2 && first.every((e) => e.xcache === 'hit'),
        `hass-edge's asset directory was filled by an earlier browser, yet the frontend's first scripts did not come from it: ${first.map((e) => `${new URL(e.url).pathname} X-Cache ${e.xcache}`).join(', ') || 'none loaded'}`);
    }
    // compare with HA's bytes: every hit kept while the browser had aborted its first request
    // (was the file written whole?), and 5 others
    const afterAbort = hitBodies.filter((h) => abortedBefore(h.url, h.t));
    const seenUrls = new Set();
    const compare = [...afterAbort.slice(0, 20), ...hitBodies.filter((h) => !afterAbort.includes(h)).slice(0, 5)]
      .filter((h) => !seenUrls.has(h.url) && seenUrls.add(h.url));
    for (const h of compare) {
      const direct = await rawBytes(h.url.replace(baseUrl.origin, HA_URL));
      check(direct.status === 200 && Buffer.compare(direct.body, h.body) === 0,
        `${h.url} from hass-edge's asset cache (${h.body.length} bytes as the browser decoded them) differs from HA's own (HTTP ${direct.status}, ${direct.body.length} bytes)`);
    }
    assetNote = `; assets: ${hits.length} of ${assets.length} from hass-edge's disk cache (X-Cache: hit)${compare.length ? `, ${compare.length} of them byte-equal to HA's (${afterAbort.length ? `${new Set(afterAbort.map((h) => h.url)).size} first asked for by a request the browser aborted` : 'none written from an aborted request'})` : ''}`;
    counted = `; hass-edge counted ${fwd} forwards and ${opened.length} WebSocket API session(s) of its own (no tunnel)`;
  }
  const refused = [...new Set(sockets.flatMap((s) => s.errors))];
  if (refused.length) log(`WebSocket commands of the frontend that HA refused (also without hass-edge: the peer has no default_config): ${refused.join(', ')}`);
  const inRestart = restartWindow ? `; while HA restarted: ${web.filter((e) => duringRestart(e.t)).map((e) => e.status ?? e.failure).join(',') || 'no'} HTTP, ${tunnels.filter((x) => duringRestart(x.t)).map((x) => (x.received ? 'open' : x.error ?? 'failed')).join(',') || 'no'} WebSocket attempts` : '';
  log(`network: ${web.length} HTTP requests and ${sockets.length} WebSocket(s), all to ${baseUrl.host}${DIRECT ? ' (HA itself)' : `, none to HA's port ${haUrl.port}`}; ${tunnels.map((s) => s.received).join('+')} WebSocket frames received; no HTTP error${aborted ? `; ${aborted} aborted by navigation` : ''}${counted}${assetNote}${inRestart} (list: ${netFile})`);
}

// ---------- the dashboard scenario (issue 16: hass-edge's own /api/websocket, trimmed per dashboard) ----------
const NONADMIN = { user: 'frontend-nonadmin', password: 'frontend-nonadmin-password-1', name: 'Frontend non-admin' }; // ha_helper.py NONADMIN_NAME
const ADDED = 'input_select.house_mode'; // the entity card the edit adds (not in DASH_ENTITIES)
// The text of the dashboard's cards (entities card rows, entity cards), through their shadow
// roots, with each switch as [switch on|off]: what a person sees of the states.
const cardsText = (p) => p.evaluate(() => {
  const cards = [];
  const find = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.localName === 'hui-entities-card' || el.localName === 'hui-entity-card') cards.push(el);
      if (el.shadowRoot) find(el.shadowRoot);
    }
  };
  find(document);
  const text = (node) => {
    const out = [];
    const walk = (n) => {
      for (const c of n.childNodes) {
        if (c.nodeType === Node.TEXT_NODE) {
          const t = c.textContent.trim();
          if (t && !['STYLE', 'SCRIPT'].includes(c.parentNode?.nodeName)) out.push(t);
        } else if (c.nodeType === Node.ELEMENT_NODE) {
          if (c.getAttribute('role') === 'switch') out.push(`[switch ${c.getAttribute('aria-checked') === 'true' ? 'on' : 'off'}]`);
          if (c.shadowRoot) walk(c.shadowRoot);
          walk(c);
        }
      }
    };
    walk(node.shadowRoot ?? node);
    return out.join(' ');
  };
  return cards.map((c) => `${c.localName}: ${text(c)}`).join(' || ');
});
// A WebSocket to URL opened by the page P's own script (so with P's Origin): its first message,
// or how it ended. Closed again at once.
const probeSocket = (p, url) => p.evaluate((u) => new Promise((resolve) => {
  const events = [];
  const ws = new WebSocket(u);
  const done = () => resolve(events);
  ws.onopen = () => events.push('open');
  ws.onmessage = (e) => { events.push(`message ${String(e.data).slice(0, 100)}`); ws.close(); done(); };
  ws.onerror = () => events.push('error');
  ws.onclose = (e) => { events.push(`close ${e.code}`); done(); };
  setTimeout(() => { events.push('no answer in 10 s'); done(); }, 10_000);
}), url);
async function edgeStatus() {
  const r = await raw('GET', `${BASE}/status`);
  check(r.status === 200, `hass-edge GET /status: HTTP ${r.status} ${r.body.slice(0, 200)}`);
  const st = JSON.parse(r.body);
  const w = st.websocket_api ?? st.forwarding?.websocket_api;
  check(w && typeof w === 'object', `hass-edge's /status has no websocket_api object: ${r.body.slice(0, 600)}`);
  return { w, tunnelsOpen: st.forwarding?.tunnels_open };
}
// HA's login page in P (user and password), until the frontend shows its sidebar
async function logIn(p, user, password) {
  await until(`HA's login page at ${new URL(p.url()).origin} shows the username field`, () => p.locator('input[name="username"]').isVisible());
  await p.locator('input[name="username"]').fill(user, { timeout: STEP_TIMEOUT });
  await p.locator('input[name="password"]').fill(password, { timeout: STEP_TIMEOUT });
  await p.getByRole('button', { name: /log in/i }).click({ timeout: STEP_TIMEOUT });
  await until(`the frontend at ${new URL(p.url()).origin} is logged in as ${user} and shows its sidebar`,
    async () => !new URL(p.url()).pathname.startsWith('/auth/') && (await p.locator('ha-sidebar').count()) > 0);
}
const peer = (...args) => new Promise((resolve, reject) => {
  execFile('bash', [env('PEER_SCRIPT'), ...args], { timeout: 150_000 }, (err, _out, stderr) => {
    if (err) reject(new TestFailure(`ha-peer.sh ${args[0]} failed: ${(stderr || err.message).trim().split('\n').slice(-5).join(' | ')}`));
    else resolve();
  });
});
const haUp = () => raw('GET', `${HA_URL}/api/`, { Authorization: `Bearer ${HA_TOKEN}` }).then((r) => r.status === 200, () => false);

async function dashboard(since) {
  const allow = env('DASH_ENTITIES').split(',');
  const wsUrl = `ws://${baseUrl.host}/api/websocket`;
  const nameOf = {};
  for (const id of [...allow, ADDED]) nameOf[id] = (await haState(id)).attributes.friendly_name;
  const toggles = allow.filter((id) => /^(input_boolean|light|switch)\./.test(id));
  const sensors = allow.filter((id) => id.startsWith('sensor.'));
  // the dashboard as HA reports it: each toggle's state, each sensor's state in the card's text
  const shows = async (p) => {
    const out = {};
    for (const id of toggles) {
      const c = await rowSwitch(nameOf[id]).getAttribute('aria-checked', { timeout: 2000 }).catch(() => null);
      out[id] = c === 'true' ? 'on' : c === 'false' ? 'off' : `aria-checked=${c}`;
    }
    const text = await cardsText(p);
    for (const id of sensors) out[id] = text.includes(nameOf[id]) && text.includes((await haState(id)).state) ? 'shown' : 'missing';
    return out;
  };
  const truth = async () => {
    const out = {};
    for (const id of toggles) out[id] = (await haState(id)).state;
    for (const id of sensors) out[id] = 'shown';
    return out;
  };
  const matches = async (want) => { const s = await shows(page); return JSON.stringify(s) === JSON.stringify(want) ? s : false; };
  const edgeSocket = () => sockets.filter((s) => s.url === wsUrl && s.page === page && s.received >= 1).pop();

  // D1. After the login the frontend is on the default dashboard, /lovelace/0, made of DASH_ENTITIES.
  //     (HA 2026.11 too: its frontend opens the default panel, which HA set to `lovelace` when it
  //     made the saved config the dashboard `lovelace` at its start; run.sh restarts it for that.
  //     Without one, 2026.11 opens its generated home dashboard /home/overview instead.)
  await until('the page is on HA\'s default dashboard /lovelace/0', () => new URL(page.url()).pathname === '/lovelace/0');
  const start = await truth();
  await until(`the default dashboard shows HA's states ${JSON.stringify(start)}`, () => matches(start));
  await sleep(1000); // anything more the page gets at load has arrived
  const live = edgeSocket();
  check(live && !live.closed, `the page has no open WebSocket to ${wsUrl}: ${JSON.stringify(sockets.map((s) => ({ url: s.url, received: s.received, closed: s.closed })))}`);
  const haAll = JSON.parse((await raw('GET', `${HA_URL}/api/states`, { Authorization: `Bearer ${HA_TOKEN}` })).body).map((x) => x.entity_id);
  const got = [...live.entityIds].sort();
  check(JSON.stringify(got) === JSON.stringify([...allow].sort()),
    `the entity data the page received through hass-edge (get_states, subscribe_entities a/c/r, state_changed) holds ${JSON.stringify(got)}; the dashboard's allowlist is ${JSON.stringify([...allow].sort())} (HA has ${haAll.length} entities)`);
  const edgeLoad = { ids: got.length, entityBytes: live.entityBytes, bytes: live.bytes, frames: live.received };
  log(`the default dashboard shows ${JSON.stringify(await shows(page))}; the page received entity data of ${got.length} entities (the allowlist; HA has ${haAll.length}): ${edgeLoad.entityBytes} bytes of entity data in ${edgeLoad.bytes} bytes of ${edgeLoad.frames} frames`);

  // D2. /status while the page is open: its WebSocket is a session of hass-edge's own API with a
  //     link of its own to HA (the user's token), not a tunnel.
  {
    const { w, tunnelsOpen } = await edgeStatus();
    check(w.sessions_total > 0 && w.sessions_open >= 1 && w.links_open >= 1 && (tunnelsOpen === undefined || tunnelsOpen === 0),
      `hass-edge's /status while the page is open: websocket_api ${JSON.stringify(w)}, forwarding.tunnels_open ${tunnelsOpen} (expected sessions_total > 0, sessions_open ≥ 1, links_open ≥ 1, no tunnel)`);
    log(`/status while the page is open: websocket_api ${JSON.stringify(w)}, tunnels_open ${tunnelsOpen}`);
  }

  // D3. The same page loaded from HA directly (a second tab, logged in on HA's origin): HA sends it every entity.
  const direct = await context.newPage();
  let directLoad;
  try {
    await direct.goto(`${HA_URL}/`, { waitUntil: 'commit', timeout: STEP_TIMEOUT });
    await logIn(direct, USER, PASSWORD);
    await until('the direct page is on /lovelace/0 and shows the entities card',
      async () => { const text = await cardsText(direct); return new URL(direct.url()).pathname === '/lovelace/0' && allow.every((id) => text.includes(nameOf[id])); });
    await sleep(1000);
    const ds = sockets.filter((s) => s.page === direct && s.url === `ws://${haUrl.host}/api/websocket` && s.received >= 1).pop();
    check(ds, `the page loaded from HA has no WebSocket to HA: ${JSON.stringify(sockets.map((s) => s.url))}`);
    directLoad = { ids: ds.entityIds.size, entityBytes: ds.entityBytes, bytes: ds.bytes, frames: ds.received };
  } finally {
    await direct.close().catch(() => {});
  }
  check(directLoad.ids >= haAll.length - 2 && directLoad.ids > edgeLoad.ids && directLoad.entityBytes > edgeLoad.entityBytes,
    `the same dashboard loaded from HA directly: entity data of ${directLoad.ids} entities, ${directLoad.entityBytes} bytes; through hass-edge ${edgeLoad.ids} entities, ${edgeLoad.entityBytes} bytes`);
  log(`entity data at load: through hass-edge ${edgeLoad.entityBytes} bytes (${edgeLoad.ids} entities; all frames ${edgeLoad.bytes} bytes in ${edgeLoad.frames}), from HA directly ${directLoad.entityBytes} bytes (${directLoad.ids} entities; all frames ${directLoad.bytes} bytes in ${directLoad.frames}): ${(directLoad.entityBytes / Math.max(1, edgeLoad.entityBytes)).toFixed(1)}× less`);
  await page.bringToFront();

  // D4. A toggle reaches HA and comes back; the state changes it causes outside the allowlist
  //     (binary_sensor.kitchen_occupied follows input_boolean.kitchen) do not reach the page.
  const flip = (s) => (s === 'on' ? 'off' : 'on');
  const kitchen = toggles[0];
  const tClick = Date.now();
  await rowToggle(nameOf[kitchen]).click({ timeout: STEP_TIMEOUT });
  await until(`HA reports ${kitchen} = ${flip(start[kitchen])} after the click`, async () => (await haState(kitchen)).state === flip(start[kitchen]));
  const toggled = await truth();
  await until(`the page shows ${JSON.stringify(toggled)} after the click`, () => matches(toggled));
  log(`toggle: clicked ${nameOf[kitchen]} → HA and the page have ${JSON.stringify(toggled)} after ${Date.now() - tClick} ms`);
  await sleep(1000);
  const extra = [...live.entityIds].filter((id) => !allow.includes(id));
  check(extra.length === 0, `after the toggle the page received entity data of ${JSON.stringify(extra)}, outside the allowlist`);

  // D5. An admin command works for the admin (the control of D9).
  const sendWs = (p, msg) => p.evaluate(async (m) => {
    try {
      const r = await document.querySelector('home-assistant').hass.connection.sendMessagePromise(m);
      return { ok: true, n: Array.isArray(r) ? r.length : null };
    } catch (e) {
      return { ok: false, code: e?.code, message: e?.message };
    }
  }, msg);
  const adminList = await sendWs(page, { type: 'config/auth/list' });
  check(adminList.ok && adminList.n >= 1, `config/auth/list from the admin's page through hass-edge: ${JSON.stringify(adminList)}`);

  // D6. The dashboard edited in HA (directly, admin token): an entity card of ADDED. The frontend
  //     is told (lovelace_updated, its own subscription through hass-edge) and offers "Refresh",
  //     which reads the config again over the same WebSocket; hass-edge recomputes the allowlist
  //     and sends ADDED as an `a` event into the open subscription.
  check(!live.entityIds.has(ADDED), `${ADDED} reached the page before the edit`);
  const docs = () => requests.filter((e) => e.type === 'document').length;
  const docsBefore = docs();
  const tEdit = Date.now() - t0;
  const wantAdded = (await haState(ADDED)).state.toLowerCase();
  await helper('lovelace', '--entities', allow.join(','), '--entity-card', ADDED);
  let refreshed = false;
  await until(`the page shows the new entity card of ${ADDED} with HA's state "${wantAdded}" (without a reload)`, async () => {
    const btn = page.locator('ha-toast').getByRole('button', { name: /refresh/i });
    if ((await btn.count()) > 0 && await btn.first().isVisible()) {
      await btn.first().click({ timeout: 2000 }).catch(() => {});
      refreshed = true;
    }
    const v = page.locator('hui-entity-card .info .value');
    if ((await v.count()) !== 1) return false;
    return (await v.textContent({ timeout: 2000 })).trim().toLowerCase() === wantAdded;
  }, 30_000);
  const addedEvent = live.added.find((a) => a.t >= tEdit && a.ids.includes(ADDED));
  check(addedEvent, `${ADDED} came to the page without an \`a\` event in its subscribe_entities after the edit (a events since: ${JSON.stringify(live.added.filter((a) => a.t >= tEdit))})`);
  check(docs() === docsBefore && !live.closed && edgeSocket() === live,
    `the edit needed a page load or a new WebSocket (${docs() - docsBefore} document(s), WebSocket ${live.closed ? 'closed' : 'open'})`);
  log(`edited in HA: the page shows ${ADDED} = "${wantAdded}" ${Date.now() - t0 - tEdit} ms after the save (${refreshed ? 'after the frontend\'s own "Refresh"' : 'at once'}); it came as an \`a\` event ${addedEvent.t - tEdit} ms after the save, same WebSocket, no page load`);

  // D7. HA stopped and started under the open page: the cards keep their states while HA is away,
  //     the page's WebSocket to hass-edge stays open, and a change made in HA afterwards shows.
  const before = await cardsText(page);
  check(!/unavailable|not available/i.test(before), `the cards before HA stops: ${before}`);
  const tStop = Date.now();
  await peer('stop', env('HA_PEER_DIR'));
  let samples = [];
  try {
    check(!(await haUp()), 'HA still answers after ha-peer.sh stop');
    for (let i = 0; i < 10; i++) {
      samples.push(await cardsText(page));
      await sleep(300);
    }
  } finally {
    await peer('start', env('HA_VERSION'), env('HA_PEER_DIR'), env('HA_PORT'), ...(process.env.PEER_START_ARGS ? process.env.PEER_START_ARGS.split(' ') : []));
  }
  const tStarted = Date.now();
  const changed = samples.filter((x) => x !== before);
  check(changed.length === 0, `while HA was down the cards changed: before "${before}", then ${JSON.stringify([...new Set(changed)]).slice(0, 800)}`);
  check(!live.closed, 'the page\'s WebSocket to hass-edge closed while HA was down (issue 16: local subscriptions stay open)');
  log(`HA stopped for ${tStarted - tStop} ms (${samples.length} looks at the cards while it was down: unchanged, "${before.slice(0, 160)}…"), started again`);
  const afterStart = await truth(); // input_boolean.* have initial: in HA's config
  await until(`the page shows HA's states after HA's start (${JSON.stringify(afterStart)})`, () => matches(afterStart), 45_000);
  const other = toggles.find((id) => id.startsWith('input_boolean.') && id !== kitchen) ?? kitchen;
  const r = await raw('POST', `${HA_URL}/api/services/input_boolean/toggle`, { Authorization: `Bearer ${HA_TOKEN}`, 'Content-Type': 'application/json' }, JSON.stringify({ entity_id: other }));
  check(r.status === 200, `HA POST /api/services/input_boolean/toggle: HTTP ${r.status}`);
  const changedInHa = await truth();
  await until(`the page shows HA's own change ${JSON.stringify(changedInHa)} after HA's start`, () => matches(changedInHa), 30_000);
  check(!live.closed && edgeSocket() === live, 'the change after HA\'s start came over a new WebSocket: the page\'s session did not survive HA\'s stop');
  log(`after HA's start the page shows its states (${Date.now() - tStarted} ms) and HA's own change of ${other}, over the same WebSocket`);

  // D8. A page from another origin opens a WebSocket to hass-edge: refused before the upgrade (403);
  //     the same script from hass-edge's own origin gets auth_required.
  const own = await probeSocket(page, wsUrl);
  check(own[0] === 'open' && /"type":"auth_required"/.test(own[1] ?? ''), `a WebSocket opened by the page on hass-edge's own origin: ${JSON.stringify(own)}`);
  const server = createServer((_req, res) => { res.writeHead(200, { 'Content-Type': 'text/html' }); res.end('<!doctype html><title>foreign</title><p>a page of another origin'); });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const foreignOrigin = `http://127.0.0.1:${server.address().port}`;
  const foreign = await context.newPage();
  const foreignConsole = [];
  foreign.on('console', (m) => foreignConsole.push(m.text()));
  let refused;
  try {
    await foreign.goto(`${foreignOrigin}/`, { timeout: STEP_TIMEOUT });
    refused = await probeSocket(foreign, wsUrl);
    await sleep(300);
  } finally {
    await foreign.close().catch(() => {});
    server.close();
  }
  check(!refused.includes('open') && !refused.some((e) => e.startsWith('message')) && refused.some((e) => e.startsWith('close')),
    `a WebSocket to ${wsUrl} from a page of ${foreignOrigin}: ${JSON.stringify(refused)} (expected refused, no auth_required)`);
  const said403 = foreignConsole.find((l) => /403/.test(l));
  check(said403, `Chromium did not report the foreign page's WebSocket refused with 403: ${JSON.stringify(foreignConsole)}`);
  log(`a WebSocket from ${foreignOrigin}: ${refused.join(', ')} (Chromium: "${said403}"); from hass-edge's own origin: ${own[0]}, auth_required`);

  // D9. A non-admin user logged in through hass-edge: HA's unauthorized on an admin command (the
  //     session's link to HA carries that user's token).
  await helper('nonadmin', '--username', NONADMIN.user, '--password', NONADMIN.password);
  try {
    await page.evaluate(() => localStorage.clear()); // log out: the stored login goes
    await page.goto(`${BASE}/`, { waitUntil: 'commit', timeout: STEP_TIMEOUT });
    await logIn(page, NONADMIN.user, NONADMIN.password);
    const who = await until('the frontend knows its user', () => page.evaluate(() => {
      const h = document.querySelector('home-assistant')?.hass;
      return h?.user && { name: h.user.name, is_admin: h.user.is_admin, socket: h.connection?.socket?.url };
    }));
    check(who.name === NONADMIN.name && who.is_admin === false && who.socket === wsUrl, `the frontend's user and socket: ${JSON.stringify(who)}`);
    const denied = await sendWs(page, { type: 'config/auth/list' });
    check(!denied.ok && denied.code === 'unauthorized', `config/auth/list from the non-admin's page through hass-edge: ${JSON.stringify(denied)} (expected HA's unauthorized)`);
    const s = edgeSocket();
    check(s && s !== live && s.errors.includes('config/auth/list: unauthorized'), `the non-admin's WebSocket received no unauthorized result for config/auth/list: ${JSON.stringify(s && s.errors)}`);
    const { w } = await edgeStatus();
    check(w.links_open >= 1, `/status while the non-admin's page is open: ${JSON.stringify(w)}`);
    log(`non-admin ${NONADMIN.user} (${who.name}, is_admin ${who.is_admin}) through ${who.socket}: config/auth/list → ${denied.code} ("${denied.message}"), as the admin got a list of ${adminList.n} users`);
  } finally {
    await helper('nonadmin', '--delete').catch((e) => console.error(`${tag}: could not delete the non-admin user: ${e.message}`));
  }
  dumpNetwork();
}

async function forgetLogin() {
  // This run's login must not stay in HA (each run would add a refresh token to the user).
  try {
    await helper('tokens', '--client-id', CLIENT_ID, '--since', new Date(t0 - 2000).toISOString(), '--delete');
    // dashboard: the login of the page loaded from HA directly, and the non-admin user (a failure
    // may have come before its own removal)
    if (SCENARIO === 'dashboard') {
      await helper('tokens', '--client-id', `${HA_URL}/`, '--since', new Date(t0 - 2000).toISOString(), '--delete');
      await helper('nonadmin', '--delete');
    }
  } catch (e) {
    console.error(`${tag}: could not remove this run's refresh tokens: ${e.message}`);
  }
}

try {
  await main();
  clearTimeout(watchdog);
  await cleanup();
  await forgetLogin();
  log('PASS');
  process.exit(0);
} catch (e) {
  if (signals.interrupted) await new Promise(() => {}); // the signal handler exits
  console.error(`${tag}: FAIL: ${failureText(e)}`);
  if (page) {
    try { await screenshot('failure'); } catch { /* the browser may be gone */ }
    console.error(`${tag}: page state: ${await pageState()}`);
  }
  const netFile = dumpNetwork();
  console.error(`${tag}: last requests (all in ${netFile}):\n  ${[...requests.slice(-25).map(fmtReq), ...sockets.map((s) => `WS ${s.url} received ${s.received} sent ${s.sent}${s.closed ? ' closed' : ''}${s.error ? ` error ${s.error}` : ''} refused: ${s.errors.join(', ') || 'none'} first: ${s.firstIn.join(' / ')}`)].join('\n  ')}`);
  if (authAnswers.length) console.error(`${tag}: login answers: ${JSON.stringify(authAnswers).slice(0, 2000)}`);
  if (consoleLines.length) console.error(`${tag}: console:\n  ${consoleLines.slice(-15).map((l) => l.slice(0, 400)).join('\n  ')}`);
  clearTimeout(watchdog);
  await cleanup();
  await forgetLogin();
  process.exit(1);
}
