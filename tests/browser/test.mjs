// The real-browser test of hass-edge (issue #3): Debian Chromium, driven by playwright-core,
// loads the kiosk page from one origin and talks to hass-edge on another (CORS + preflight),
// follows the SSE stream while Home Assistant changes, and checks the auth and CORS refusals.
// Started by run.sh, which starts hass-edge and the page server and passes everything in env:
//
//   API_BASE        hass-edge, e.g. http://127.0.0.1:41234
//   PAGE_BASE       the allowed page origin (in http.cors_origins), e.g. http://localhost:41235
//   OTHER_BASE      the same page server under an origin NOT in cors_origins, e.g. http://127.0.0.1:41235
//   API_TOKEN_FILE  hass-edge's API token        HA_URL, HA_TOKEN_FILE  the real HA peer
//   OUT_DIR         where browser-stream.png goes  PROFILE_DIR  a fresh, empty Chromium profile
//   CHROMIUM        default /usr/bin/chromium
import { readFileSync } from 'node:fs';
import { isDeepStrictEqual } from 'node:util';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { CHROMIUM_FLAGS as FLAGS, check, envReader, fail, failureText, onInterrupt, raw } from '../lib/harness.mjs';

const env = envReader('browser: FAIL', 'tests/browser/run.sh');
const API = env('API_BASE');
const PAGE = env('PAGE_BASE');
const OTHER = env('OTHER_BASE');
const API_TOKEN = readFileSync(env('API_TOKEN_FILE'), 'utf8').trim();
const HA_URL = env('HA_URL').replace(/\/+$/, '');
const HA_TOKEN = readFileSync(env('HA_TOKEN_FILE'), 'utf8').trim();
const OUT_DIR = env('OUT_DIR');
const PROFILE_DIR = env('PROFILE_DIR');
const CHROMIUM = env('CHROMIUM', '/usr/bin/chromium');
const STEP_TIMEOUT = 15_000;

const t0 = Date.now();
const log = (msg) => console.log(`browser: ${msg}`);

// ---------- plain HTTP helpers (Node side, not the browser; raw() is harness.mjs's) ----------
async function ha(method, path, body) {
  const r = await raw(method, `${HA_URL}${path}`, { Authorization: `Bearer ${HA_TOKEN}`, 'Content-Type': 'application/json' }, body && JSON.stringify(body));
  check(r.status >= 200 && r.status < 300, `Home Assistant ${method} ${path}: HTTP ${r.status} ${r.body.slice(0, 200)}`);
  return JSON.parse(r.body);
}
async function metric(route, status) {
  const r = await raw('GET', `${API}/metrics`, { Authorization: `Bearer ${API_TOKEN}` });
  check(r.status === 200, `GET /metrics: HTTP ${r.status}`);
  const line = r.body.split('\n').find((l) => l.startsWith(`hass_edge_http_requests_total{route="${route}",status="${status}"}`));
  return line ? Number(line.split(' ').pop()) : 0;
}

// ---------- the browser ----------
let context;
let page;
const consoleLines = [];

async function cleanup() {
  if (context) {
    const c = context;
    context = undefined;
    await Promise.race([c.close().catch(() => {}), new Promise((r) => setTimeout(r, 5000))]);
  }
}
const signals = onInterrupt('browser', cleanup);
const watchdog = setTimeout(() => { console.error('browser: FAIL: the whole test took more than 120 s'); cleanup().finally(() => process.exit(1)); }, 120_000);

const kiosk = (fn, arg) => page.evaluate(fn, arg);
async function waitFor(what, fn, arg) {
  try {
    await page.waitForFunction(fn, arg, { timeout: STEP_TIMEOUT, polling: 50 });
  } catch (e) {
    fail(`timed out (${STEP_TIMEOUT / 1000} s) waiting until ${what}`);
  }
}
const shown = (entityId) => page.locator(`.tile[data-entity="${entityId}"] [data-field="state"]`).textContent();

// Asserts that the page shows, for each entity, exactly what HA now reports, received over the stream.
async function assertPageMatchesHa(ids, expected, sinceEvent) {
  for (const id of ids) {
    const truth = await ha('GET', `/api/states/${id}`);
    check(truth.state === expected, `HA reports ${id} = ${truth.state}, expected ${expected}`);
    const text = (await shown(id)).trim();
    check(text === truth.state, `the page shows ${id} = "${text}", HA reports "${truth.state}"`);
    const latest = await kiosk((i) => window.kiosk.latest[i], id);
    check(latest.source === 'stream', `${id} on the page came from ${latest.source}, not from the stream`);
    for (const key of ['state', 'last_changed', 'attributes']) {
      check(isDeepStrictEqual(latest.state[key], truth[key]),
        `${id}.${key} from the stream (${JSON.stringify(latest.state[key])}) differs from HA's (${JSON.stringify(truth[key])})`);
    }
    const events = await kiosk(([i, n]) => window.kiosk.events.slice(n).filter((e) => e.entity_id === i), [id, sinceEvent]);
    check(events.length >= 1, `no state_changed event for ${id} arrived`);
    const last = events[events.length - 1];
    check(last.new_state && last.new_state.state === truth.state, `the last state_changed of ${id} says new_state ${last.new_state?.state}`);
    check(last.old_state && last.old_state.state !== truth.state, `the last state_changed of ${id} has old_state ${last.old_state?.state}`);
  }
}

async function main() {
  const pageUrl = `${PAGE}/index.html?api=${encodeURIComponent(API)}&token=${encodeURIComponent(API_TOKEN)}`;
  const statesPreflights0 = await metric('/api/states/{entity_id}', 204);

  context = await chromium.launchPersistentContext(PROFILE_DIR, {
    executablePath: CHROMIUM,
    headless: true,
    args: FLAGS,
    viewport: { width: 1280, height: 800 },
    timeout: 30_000,
  });
  log(`Chromium ${context.browser()?.version() ?? ''} started (${Date.now() - t0} ms)`.replace('  ', ' '));
  page = context.pages()[0] ?? await context.newPage();
  page.on('console', (m) => consoleLines.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => consoleLines.push(`[pageerror] ${e}`));

  // 1. The page on the allowed origin: initial state over CORS, the stream opens, the auth checks.
  const resp = await page.goto(pageUrl, { waitUntil: 'load' });
  check(resp && resp.ok(), `loading ${PAGE}/index.html: HTTP ${resp?.status()}`);
  await waitFor('the page has read the initial states', () => window.kiosk && window.kiosk.ready);
  const initial = await kiosk(() => window.kiosk.initial);
  for (const id of ['light.kitchen', 'input_boolean.kitchen']) {
    check(initial[id] && !initial[id].error, `the page could not read ${id} through hass-edge: ${JSON.stringify(initial[id])}`);
    const truth = await ha('GET', `/api/states/${id}`);
    const text = (await shown(id)).trim();
    check(text === truth.state, `the page shows the initial ${id} = "${text}", HA reports "${truth.state}"`);
  }
  log(`initial state shown: light.kitchen = ${(await shown('light.kitchen')).trim()}, input_boolean.kitchen = ${(await shown('input_boolean.kitchen')).trim()}`);
  const statesPreflights = (await metric('/api/states/{entity_id}', 204)) - statesPreflights0;
  check(statesPreflights >= 1, 'hass-edge counted no CORS preflight (OPTIONS → 204) for GET /api/states/{entity_id}');
  await kiosk(([n]) => window.kiosk.report('preflight-seen', true, 'preflight answered by hass-edge', `OPTIONS → 204 ×${n} (hass_edge_http_requests_total)`), [statesPreflights]);

  await waitFor('the EventSource is open', () => window.kiosk.streamOpen);
  await waitFor('the page has run its auth checks', () => window.kiosk.checksDone);
  const pageChecks = await kiosk(() => window.kiosk.checks);
  for (const [name, c] of Object.entries(pageChecks)) check(c.ok, `page check "${c.label}" failed: ${c.detail}`);
  log(`stream open; without token: ${['rest-no-token', 'rest-wrong-token', 'stream-no-token', 'rest-query-token'].map((n) => pageChecks[n].detail.split(' ').slice(0, 2).join(' ')).join(', ')}; ${pageChecks['eventsource-no-token'].detail}`);

  // 2. A page on an origin NOT in cors_origins: the browser must refuse to hand it anything.
  const other = await context.newPage();
  other.on('console', (m) => consoleLines.push(`[other ${m.type()}] ${m.text()}`));
  await other.goto(`${OTHER}/index.html`, { waitUntil: 'load' });
  const blocked = await other.evaluate(async ([api, token]) => {
    const attempt = async (url, init) => {
      try {
        const r = await fetch(url, init);
        return `readable: HTTP ${r.status}`;
      } catch (e) {
        return `blocked: ${e.name}`;
      }
    };
    const stream = await new Promise((resolve) => {
      const es = new EventSource(`${api}/api/stream?entity_id=light.kitchen&access_token=${encodeURIComponent(token)}`);
      const done = (v) => { es.close(); resolve(v); };
      es.onopen = () => done('readable: opened');
      es.onerror = () => done(es.readyState === EventSource.CLOSED ? 'blocked: closed' : `error, readyState ${es.readyState}`);
      setTimeout(() => done('no answer in 5 s'), 5000);
    });
    return {
      origin: location.origin,
      preflighted: await attempt(`${api}/api/states/light.kitchen`, { headers: { Authorization: `Bearer ${token}` } }),
      simple: await attempt(`${api}/health`),
      stream,
    };
  }, [API, API_TOKEN]);
  await other.close();
  check(blocked.origin === OTHER, `the second page's origin is ${blocked.origin}, expected ${OTHER}`);
  check(blocked.preflighted.startsWith('blocked'), `from ${OTHER} (not allowed) a fetch with Bearer was ${blocked.preflighted}`);
  check(blocked.simple.startsWith('blocked'), `from ${OTHER} (not allowed) a simple GET /health was ${blocked.simple}`);
  check(blocked.stream.startsWith('blocked'), `from ${OTHER} (not allowed) the EventSource was ${blocked.stream}`);
  // What the browser saw, on the wire: no Access-Control-Allow-Origin for that origin.
  const pre = { Origin: OTHER, 'Access-Control-Request-Method': 'GET', 'Access-Control-Request-Headers': 'authorization' };
  const badPre = await raw('OPTIONS', `${API}/api/states/light.kitchen`, pre);
  check(!('access-control-allow-origin' in badPre.headers), `the preflight from ${OTHER} was answered with Access-Control-Allow-Origin: ${badPre.headers['access-control-allow-origin']}`);
  const badGet = await raw('GET', `${API}/api/states/light.kitchen`, { Origin: OTHER, Authorization: `Bearer ${API_TOKEN}` });
  check(!('access-control-allow-origin' in badGet.headers), `GET from ${OTHER} carried Access-Control-Allow-Origin: ${badGet.headers['access-control-allow-origin']}`);
  const goodPre = await raw('OPTIONS', `${API}/api/states/light.kitchen`, { ...pre, Origin: PAGE });
  check(goodPre.status === 204 && goodPre.headers['access-control-allow-origin'] === PAGE,
    `the preflight from ${PAGE} got HTTP ${goodPre.status}, Access-Control-Allow-Origin ${goodPre.headers['access-control-allow-origin']}`);
  check(/authorization/i.test(goodPre.headers['access-control-allow-headers'] ?? ''), `the preflight from ${PAGE} does not allow the Authorization header`);
  await kiosk(([o, b, s]) => window.kiosk.report('cors-other-origin', true, `origin ${o} (not allowed) is blocked`,
    `fetch: ${b.preflighted} · EventSource: ${b.stream} · preflight HTTP ${s}, no ACAO`), [OTHER, blocked, badPre.status]);
  log(`origin ${OTHER} (not in cors_origins): fetch ${blocked.preflighted}, simple GET ${blocked.simple}, EventSource ${blocked.stream}; its preflight: HTTP ${badPre.status} without Access-Control-Allow-Origin`);

  // 3. Toggle input_boolean.kitchen in Home Assistant itself; the page must follow over the stream.
  const ids = ['input_boolean.kitchen', 'light.kitchen'];
  const before = (await ha('GET', '/api/states/input_boolean.kitchen')).state;
  check(before === 'on' || before === 'off', `input_boolean.kitchen is ${before} in HA`);
  const flipped = before === 'on' ? 'off' : 'on';
  let mark = await kiosk(() => window.kiosk.events.length);
  let tToggle = Date.now();
  await ha('POST', '/api/services/input_boolean/toggle', { entity_id: 'input_boolean.kitchen' });
  await waitFor(`the page shows ${ids.join(' and ')} = ${flipped} from the stream`, ([want, list, n]) => list.every((id) => {
    const l = window.kiosk.latest[id];
    return l && l.source === 'stream' && l.state && l.state.state === want && window.kiosk.events.slice(n).some((e) => e.entity_id === id);
  }), [flipped, ids, mark]);
  const latencyHa = Date.now() - tToggle;
  await assertPageMatchesHa(ids, flipped, mark);
  log(`toggled in HA (${before} → ${flipped}): the page showed both new states from the stream after ${latencyHa} ms; they equal HA's (state, last_changed, attributes)`);
  await kiosk(([a, b, ms]) => window.kiosk.report('stream-ha-toggle', true, `HA toggle ${a} → ${b} arrived over SSE`, `input_boolean + light in ${ms} ms, equal to HA's REST`), [before, flipped, latencyHa]);
  // The picture of issue #3: the change made in HA, shown live by the kiosk.
  await page.waitForTimeout(1300); // let the "fresh" highlight of the new events fade
  const shot = join(OUT_DIR, 'browser-stream.png');
  await page.screenshot({ path: shot, fullPage: true });
  log(`screenshot: ${shot}`);

  // 4. And back through hass-edge: the page's Toggle button POSTs /api/services (CORS preflight with
  //    Content-Type: application/json), hass-edge calls HA, and the stream brings the change back.
  const servicePreflights0 = await metric('/api/services/{domain}/{service}', 204);
  mark = await kiosk(() => window.kiosk.events.length);
  tToggle = Date.now();
  await page.click('#toggle');
  await waitFor('the Toggle button\'s POST answered', () => window.kiosk.toggles.length >= 1);
  const post = (await kiosk(() => window.kiosk.toggles))[0];
  check(post.status === 200, `POST /api/services/input_boolean/toggle from the page: HTTP ${post.status} ${post.body.slice(0, 200)}`);
  await waitFor(`the page shows ${ids.join(' and ')} = ${before} again`, ([want, list, n]) => list.every((id) => {
    const l = window.kiosk.latest[id];
    return l && l.source === 'stream' && l.state && l.state.state === want && window.kiosk.events.slice(n).some((e) => e.entity_id === id);
  }), [before, ids, mark]);
  const latencyPost = Date.now() - tToggle;
  await assertPageMatchesHa(ids, before, mark);
  check((await metric('/api/services/{domain}/{service}', 204)) > servicePreflights0, 'hass-edge counted no preflight for the page\'s POST');
  await kiosk(([b, ms]) => window.kiosk.report('stream-page-toggle', true, 'Toggle button: POST /api/services via hass-edge', `HTTP 200, back to ${b} over SSE in ${ms} ms`), [before, latencyPost]);
  log(`Toggle button on the page: POST via hass-edge → HTTP 200, back to ${before} over the stream after ${latencyPost} ms, equal to HA`);

  // 5. Nothing went wrong behind the scenes, then the picture.
  const finalChecks = await kiosk(() => window.kiosk.checks);
  const bad = Object.values(finalChecks).filter((c) => !c.ok);
  check(bad.length === 0, `page checks failed: ${JSON.stringify(bad)}`);
  const streamErrors = await kiosk(() => window.kiosk.streamErrors);
  check(streamErrors === 0, `the EventSource reported ${streamErrors} error(s) (reconnects) during the test`);
  const pageErrors = consoleLines.filter((l) => l.startsWith('[pageerror]'));
  check(pageErrors.length === 0, `JavaScript errors on the page: ${pageErrors.join('; ')}`);
  // The kiosk page's console holds only the 401s it asked for (the other origin's page logs
  // its CORS refusals, which are expected).
  const unexpected = consoleLines.filter((l) => /^\[(error|warning)\]/.test(l) && !/status of 401 \(Unauthorized\)/.test(l));
  check(unexpected.length === 0, `unexpected console messages on the kiosk page: ${unexpected.join(' | ')}`);
  await page.waitForTimeout(1300);
  const final = join(OUT_DIR, 'browser-final.png');
  await page.screenshot({ path: final, fullPage: true });
  log(`screenshot at the end (HA back to ${before}, all checks): ${final}`);
}

try {
  await main();
  clearTimeout(watchdog);
  await cleanup();
  log(`PASS (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
  process.exit(0);
} catch (e) {
  if (signals.interrupted) await new Promise(() => {}); // the signal handler exits
  console.error(`browser: FAIL: ${failureText(e)}`);
  if (page) {
    const shot = join(OUT_DIR, 'browser-failure.png');
    try {
      await page.screenshot({ path: shot, fullPage: true, timeout: 5000 });
      console.error(`browser: failure screenshot: ${shot}`);
    } catch { /* the browser may be gone */ }
    try {
      console.error(`browser: page state: ${JSON.stringify(await page.evaluate(() => ({ ...window.kiosk, events: window.kiosk.events.length })), null, 0).slice(0, 2000)}`);
    } catch { /* idem */ }
  }
  if (consoleLines.length) console.error(`browser: console:\n  ${consoleLines.slice(-20).join('\n  ')}`);
  clearTimeout(watchdog);
  await cleanup();
  process.exit(1);
}
