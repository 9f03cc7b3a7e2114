// Kiosk load (issue 15): how long HA's own dashboard takes to show in a fresh Chromium, directly
// against Home Assistant and through hass-edge (cold and warm asset directory), with HA fast and
// with HA slow (a delaying relay in front of it). A measurement, not a test: it prints figures.
// Started by measure/kiosk/run.sh, which sets everything in the environment:
//
//   HA_URL, HA_TOKEN_FILE, HA_PY, HA_VERSION  the peer (tests/ha-peer); ha_helper.py setup already ran
//   EDGE_BIN      hass-edge's binary          WORK   a temporary directory (profiles, configs, states)
//   RUNS          runs per scenario (5)       DELAY_MS  the relay's delay per answer (200)
//   SCENARIOS     default "ha edge-cold edge-warm ha-slow edge-slow-cold edge-slow-warm"
//   CHROMIUM, PW_REQUIRE_FROM (a package.json beside a node_modules with playwright-core), OUT_DIR,
//   EDGE_NOTE (optional: a word on the binary, printed with the figures)
//
// Each run: a FRESH Chromium profile (empty HTTP cache, no service worker), logged in by HA tokens
// put into localStorage.hassTokens before the page's scripts run (the tokens come from HA's own
// login flow, done once per origin over HTTP with the peer's user and password, directly against
// HA); then `goto <base>/edge-test/0` and two times from the navigation's start (performance.now()
// in the page): the Kitchen row of the dashboard's entities card shows HA's state of
// input_boolean.kitchen (its switch's aria-checked), and the page's `load` event.
import { spawn, execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync, readdirSync, existsSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { cpus } from 'node:os';

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined || v === '') { console.error(`kiosk: environment variable ${name} is not set (use measure/kiosk/run.sh)`); process.exit(2); }
  return v;
};
const HA_URL = env('HA_URL').replace(/\/+$/, '');
const HA_TOKEN = readFileSync(env('HA_TOKEN_FILE'), 'utf8').trim();
const HA_VERSION = env('HA_VERSION', '?');
const EDGE_BIN = env('EDGE_BIN');
const WORK = env('WORK');
const OUT_DIR = env('OUT_DIR');
const RUNS = Number(env('RUNS', '5'));
const DELAY_MS = Number(env('DELAY_MS', '200'));
const CHROMIUM = env('CHROMIUM', '/usr/bin/chromium');
const SCENARIOS = env('SCENARIOS', 'ha edge-cold edge-warm ha-slow edge-slow-cold edge-slow-warm').split(/\s+/).filter(Boolean);
const { chromium } = createRequire(env('PW_REQUIRE_FROM'))('playwright-core');
const USER = 'edge';                    // tests/ha-peer/peer.py's user
const PASSWORD = 'edge-tester-password';
const DASHBOARD = '/edge-test/0';       // tests/frontend/ha_helper.py setup
const KITCHEN = 'Kitchen';              // input_boolean.kitchen's friendly name, a row of the entities card
const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--disable-quic'];
const RUN_TIMEOUT = 60_000;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const say = (m) => console.log(`kiosk: ${m}`);

const KNOWN = {
  ha: { target: 'ha', slow: false, assets: null, label: 'HA directly' },
  'edge-cold': { target: 'edge', slow: false, assets: 'cold', label: 'hass-edge, cold' },
  'edge-warm': { target: 'edge', slow: false, assets: 'warm', label: 'hass-edge, warm' },
  'ha-slow': { target: 'ha', slow: true, assets: null, label: `HA directly, HA slow (+${DELAY_MS} ms)` },
  'edge-slow-cold': { target: 'edge', slow: true, assets: 'cold', label: `hass-edge, cold, HA slow (+${DELAY_MS} ms)` },
  'edge-slow-warm': { target: 'edge', slow: true, assets: 'warm', label: `hass-edge, warm, HA slow (+${DELAY_MS} ms)` },
};
for (const s of SCENARIOS) if (!KNOWN[s]) { console.error(`kiosk: unknown scenario ${s} (${Object.keys(KNOWN).join(', ')})`); process.exit(2); }

// ---------- plain HTTP (Node side) ----------
function raw(method, url, headers = {}, body) {
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
const json = async (method, url, headers, body) => {
  const r = await raw(method, url, headers, body);
  if (r.status !== 200) throw new Error(`${method} ${url}: HTTP ${r.status} ${r.body.slice(0, 200)}`);
  return JSON.parse(r.body);
};
const haState = (id) => json('GET', `${HA_URL}/api/states/${id}`, { Authorization: `Bearer ${HA_TOKEN}` });
function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

// HA's login flow over HTTP, directly against HA, for the browser origin ORIGIN: the tokens the
// frontend would have stored after a password login at ORIGIN (client_id = ORIGIN/).
async function login(origin) {
  const clientId = `${origin}/`;
  const jsonPost = (path, body) => json('POST', `${HA_URL}${path}`, { 'Content-Type': 'application/json' }, JSON.stringify(body));
  const flow = await jsonPost('/auth/login_flow', { client_id: clientId, handler: ['homeassistant', null], redirect_uri: `${origin}/?auth_callback=1` });
  const done = await jsonPost(`/auth/login_flow/${flow.flow_id}`, { username: USER, password: PASSWORD, client_id: clientId });
  if (done.type !== 'create_entry') throw new Error(`HA's login flow for ${clientId}: ${JSON.stringify(done)}`);
  const tok = await json('POST', `${HA_URL}/auth/token`, { 'Content-Type': 'application/x-www-form-urlencoded' },
    new URLSearchParams({ grant_type: 'authorization_code', code: done.result, client_id: clientId }).toString());
  return {
    at: Date.now(),
    hassTokens: { hassUrl: origin, clientId, expires: Date.now() + tok.expires_in * 1000, refresh_token: tok.refresh_token,
      access_token: tok.access_token, token_type: tok.token_type, expires_in: tok.expires_in },
  };
}
const logins = new Map(); // origin -> login
async function tokensFor(origin) {
  let l = logins.get(origin);
  if (!l || Date.now() - l.at > 15 * 60_000) { l = await login(origin); logins.set(origin, l); } // access tokens live 30 min
  return l.hassTokens;
}
function forgetLogins() { // the refresh tokens of this run's logins are removed from HA again
  return Promise.all([...logins.keys()].map((origin) => new Promise((resolve) => {
    execFile(env('HA_PY'), [new URL('../../tests/frontend/ha_helper.py', import.meta.url).pathname, 'tokens', '--client-id', `${origin}/`,
      '--delete', '--url', HA_URL, '--token-file', env('HA_TOKEN_FILE')], { timeout: 30_000 }, (err, _o, stderr) => {
      if (err) console.error(`kiosk: could not remove the logins of ${origin}: ${stderr || err.message}`);
      resolve();
    });
  })));
}

// ---------- the relay (HA slow) and the hass-edge instances ----------
const children = new Set();
function startRelay() {
  return new Promise((resolve, reject) => {
    const p = spawn('python3', [new URL('./relay.py', import.meta.url).pathname, '--listen', '127.0.0.1:0',
      '--target', new URL(HA_URL).host, '--delay-ms', String(DELAY_MS)], { stdio: ['ignore', 'pipe', 'inherit'] });
    children.add(p);
    p.on('exit', () => children.delete(p));
    let out = '';
    p.stdout.on('data', (d) => {
      out += d;
      const m = /port (\d+)/.exec(out);
      if (m) resolve({ proc: p, url: `http://127.0.0.1:${m[1]}` });
    });
    p.on('exit', (code) => reject(new Error(`relay.py exited (${code})`)));
  });
}
class Edge {
  constructor(name, haUrl, port) {
    this.name = name; this.haUrl = haUrl; this.port = port; this.base = `http://127.0.0.1:${port}`;
    this.dir = join(WORK, name); mkdirSync(this.dir, { recursive: true });
    this.assets = join(this.dir, 'assets'); this.proc = null;
    this.config = join(this.dir, 'hass-edge.toml');
    writeFileSync(this.config, `[ha]\nurl = "${haUrl}"\ntoken_file = "${env('HA_TOKEN_FILE')}"\n\n[http]\nlisten = "127.0.0.1:${port}"\n\n`
      + `[dbus]\nbus = "none"\n\n[cache]\nstate_file = "${join(this.dir, 'states.json')}"\n\n[log]\nlevel = "warn"\n`);
  }
  async start() {
    const e = { ...process.env };
    for (const k of Object.keys(e)) if (k.startsWith('HASS_EDGE_') || ['NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID'].includes(k)) delete e[k];
    const p = spawn(EDGE_BIN, ['--config', this.config], { env: e, stdio: ['ignore', 'ignore', 'pipe'] });
    let log = '';
    p.stderr.on('data', (d) => { log = (log + d).slice(-4000); });
    children.add(p);
    p.on('exit', () => children.delete(p));
    this.proc = p;
    const deadline = Date.now() + 30_000;
    for (;;) {
      if (p.exitCode !== null) throw new Error(`hass-edge ${this.name} exited at start: ${log}`);
      const r = await raw('GET', `${this.base}/health`).catch(() => null);
      if (r && r.status === 200) return;
      if (Date.now() > deadline) throw new Error(`hass-edge ${this.name}: /health not 200 after 30 s: ${r?.status} ${log}`);
      await sleep(100);
    }
  }
  async stop() {
    const p = this.proc;
    if (!p || p.exitCode !== null) return;
    const gone = new Promise((r) => p.once('exit', r));
    p.kill('SIGTERM');
    if (await Promise.race([gone.then(() => true), sleep(5000).then(() => false)]) === false) { p.kill('SIGKILL'); await gone; }
    this.proc = null;
  }
  emptyAssets() { rmSync(this.assets, { recursive: true, force: true }); }
  assetFiles() { return existsSync(this.assets) ? readdirSync(this.assets).filter((f) => !f.endsWith('.head') && !f.endsWith('.tmp')).length : 0; }
  async counters() {
    const st = await json('GET', `${this.base}/status`);
    const m = await raw('GET', `${this.base}/metrics`);
    const sum = (re) => m.body.split('\n').filter((l) => re.test(l)).reduce((a, l) => a + Number(l.split(' ').pop()), 0);
    const ac = st.forwarding.asset_cache;
    return { hits: ac.hits, misses: ac.misses, files: ac.files, bytes: ac.bytes, forwarded: sum(/^hass_edge_http_requests_total\{route="forward",/) };
  }
}

// ---------- one measured load ----------
let browserVersion = '';
async function load(base, tokens, tag) {
  const profile = mkdtempSync(join(WORK, 'profile-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM, headless: true, args: FLAGS, viewport: { width: 1280, height: 800 }, timeout: 30_000,
  });
  try {
    browserVersion ||= context.browser()?.version() ?? '';
    const origin = new URL(base).origin;
    await context.addInitScript(([o, t]) => {
      if (location.origin === o && !localStorage.getItem('hassTokens')) localStorage.setItem('hassTokens', t);
    }, [origin, JSON.stringify(tokens)]);
    const page = context.pages()[0] ?? await context.newPage();
    // the network as the page's target saw it (CDP): bytes on the wire, X-Cache of each answer
    const cdp = await context.newCDPSession(page);
    const reqs = new Map();
    let wsBytes = 0;
    cdp.on('Network.requestWillBeSent', (e) => { if (!reqs.has(e.requestId)) reqs.set(e.requestId, { url: e.request.url, bytes: 0, xcache: null, status: null, failed: false }); });
    cdp.on('Network.responseReceived', (e) => {
      const r = reqs.get(e.requestId); if (!r) return;
      r.status = e.response.status;
      const h = Object.fromEntries(Object.entries(e.response.headers).map(([k, v]) => [k.toLowerCase(), v]));
      r.xcache = h['x-cache'] ?? null;
      r.cached = e.response.fromDiskCache || e.response.fromServiceWorker || e.response.fromPrefetchCache;
    });
    cdp.on('Network.loadingFinished', (e) => { const r = reqs.get(e.requestId); if (r) r.bytes = e.encodedDataLength; });
    cdp.on('Network.loadingFailed', (e) => { const r = reqs.get(e.requestId); if (r) r.failed = true; });
    cdp.on('Network.webSocketFrameReceived', (e) => { wsBytes += Buffer.byteLength(e.response.payloadData ?? ''); });
    await cdp.send('Network.enable');
    const want = (await haState('input_boolean.kitchen')).state === 'on' ? 'true' : 'false';

    await page.goto(`${base}${DASHBOARD}`, { waitUntil: 'commit', timeout: 30_000 });
    // in the page: every 20 ms, through the open shadow roots, the entities card's Kitchen row
    const shown = await page.waitForFunction(([name, checked]) => {
      const all = (root, sel, out = []) => {
        out.push(...root.querySelectorAll(sel));
        for (const el of root.querySelectorAll('*')) if (el.shadowRoot) all(el.shadowRoot, sel, out);
        return out;
      };
      for (const row of all(document, 'hui-toggle-entity-row')) {
        if (!all(row.shadowRoot ?? row, '.info').some((i) => i.getAttribute('title') === name)) continue;
        const sw = all(row.shadowRoot ?? row, '[role="switch"]')[0];
        if (sw && sw.getAttribute('aria-checked') === checked) return performance.now();
      }
      return false;
    }, [KITCHEN, want], { polling: 20, timeout: RUN_TIMEOUT });
    const shownMs = await shown.jsonValue();
    const loadMs = await (await page.waitForFunction(() => {
      const n = performance.getEntriesByType('navigation')[0];
      return n && n.loadEventStart > 0 ? n.loadEventStart : false;
    }, null, { polling: 20, timeout: RUN_TIMEOUT })).jsonValue();
    // the end of the last HTTP answer the page had before the Kitchen row showed (Resource Timing)
    const lastResponse = await page.evaluate((t) => Math.max(0, ...performance.getEntriesByType('resource')
      .map((e) => e.responseEnd).filter((x) => x <= t)), shownMs);
    const where = await page.evaluate(() => location.pathname);
    if (where !== DASHBOARD) throw new Error(`${tag}: the page ended at ${where}, not ${DASHBOARD}`);
    await sleep(1000); // what is still in flight lands
    const list = [...reqs.values()].filter((r) => /^https?:/.test(r.url));
    const assets = list.filter((r) => /^\/(frontend_latest|frontend_es5|static)\//.test(new URL(r.url).pathname));
    return {
      shown: shownMs, load: loadMs, lastResponse,
      requests: list.length, httpBytes: list.reduce((a, r) => a + r.bytes, 0), wsBytes,
      browserCached: list.filter((r) => r.cached).length,
      assets: assets.length, xhit: assets.filter((r) => r.xcache === 'hit').length,
      failed: list.filter((r) => r.failed).length,
      notFromDisk: list.filter((r) => r.xcache !== 'hit').map((r) => `${r.status} ${new URL(r.url).pathname}`),
    };
  } finally {
    await Promise.race([context.close().catch(() => {}), sleep(5000)]);
    rmSync(profile, { recursive: true, force: true });
  }
}

// ---------- the run ----------
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); const n = s.length; return n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2; };
const fmtMs = (x) => `${Math.round(x)}`;
const fmtKB = (x) => `${Math.round(x / 1024)}`;

async function main() {
  const loadavg = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  const started = new Date();
  const load0 = loadavg();
  const needSlow = SCENARIOS.some((s) => KNOWN[s].slow);
  const relay = needSlow ? await startRelay() : null;
  if (relay) say(`relay in front of HA on ${relay.url} (+${DELAY_MS} ms before the first bytes of every answer)`);
  const edges = {};
  for (const s of SCENARIOS) {
    if (KNOWN[s].target !== 'edge') continue;
    edges[s] = new Edge(s, KNOWN[s].slow ? relay.url : HA_URL, await freePort());
  }
  const baseOf = (s) => (KNOWN[s].target === 'edge' ? edges[s].base : KNOWN[s].slow ? relay.url : HA_URL);
  // The warm directories are filled by an earlier load (not measured) of the same dashboard.
  for (const s of SCENARIOS) {
    if (KNOWN[s].assets !== 'warm') continue;
    const e = edges[s];
    e.emptyAssets();
    await e.start();
    const r = await load(e.base, await tokensFor(e.base), `${s} fill`);
    await e.stop();
    say(`${s}: asset directory filled by an earlier load (not measured: shown ${fmtMs(r.shown)} ms): ${e.assetFiles()} files`);
  }
  const results = Object.fromEntries(SCENARIOS.map((s) => [s, []]));
  // Round robin over the scenarios, so that a change of the machine's load hits them all alike.
  for (let i = 1; i <= RUNS; i++) {
    for (const s of SCENARIOS) {
      const k = KNOWN[s];
      const base = baseOf(s);
      let before = null;
      let edge = null;
      if (k.target === 'edge') {
        edge = edges[s];
        // a freshly started hass-edge for every run; cold: its asset directory emptied first
        if (k.assets === 'cold') edge.emptyAssets();
        await edge.start();
        before = await edge.counters();
      }
      const tokens = await tokensFor(new URL(base).origin);
      const r = await load(base, tokens, `${s} #${i}`);
      if (edge) {
        const after = await edge.counters();
        r.edgeHits = after.hits - before.hits;
        r.edgeMisses = after.misses - before.misses;
        // hass-edge counts an answer from its disk among its forwards (route "forward"): to HA = the rest
        r.edgeToHa = after.forwarded - before.forwarded - r.edgeHits;
        r.filesBefore = before.files;
        await edge.stop();
      }
      results[s].push(r);
      say(`${s} #${i}: shown ${fmtMs(r.shown)} ms (last HTTP answer before it ${fmtMs(r.lastResponse)} ms), load ${fmtMs(r.load)} ms, ${r.requests} requests, ${fmtKB(r.httpBytes)} KiB HTTP + ${fmtKB(r.wsBytes)} KiB WebSocket`
        + (edge ? `; hass-edge: ${r.edgeHits} from disk, ${r.edgeToHa} to HA (asset misses ${r.edgeMisses}; ${r.filesBefore} files before); the browser saw X-Cache: hit on ${r.xhit} of ${r.assets} assets` : '')
        + (r.failed || r.browserCached ? `; ${r.failed} failed, ${r.browserCached} from the browser's cache` : ''));
    }
  }
  if (relay) relay.proc.kill('SIGTERM');
  const load1 = loadavg();

  // ---------- the table ----------
  const rows = [
    '| scenario | Kitchen shown: median / max (ms) | last HTTP answer before it: median (ms) | `load` event: median / max (ms) | HTTP requests | received (KiB, HTTP + WebSocket) | hass-edge: answered from disk / forwarded to HA |',
    '|---|---|---|---|---|---|---|',
  ];
  for (const s of SCENARIOS) {
    const rs = results[s];
    const col = (f) => rs.map(f);
    const edgeCol = KNOWN[s].target === 'edge'
      ? `${median(col((r) => r.edgeHits))} / ${median(col((r) => r.edgeToHa))}` : '—';
    rows.push(`| ${KNOWN[s].label} | ${fmtMs(median(col((r) => r.shown)))} / ${fmtMs(Math.max(...col((r) => r.shown)))} | ${fmtMs(median(col((r) => r.lastResponse)))} `
      + `| ${fmtMs(median(col((r) => r.load)))} / ${fmtMs(Math.max(...col((r) => r.load)))} | ${median(col((r) => r.requests))} `
      + `| ${fmtKB(median(col((r) => r.httpBytes)))} + ${fmtKB(median(col((r) => r.wsBytes)))} | ${edgeCol} |`);
  }
  const cpu = cpus()[0]?.model ?? '?';
  const md = [
    `Run: ${started.toISOString().slice(0, 16).replace('T', ' ')} UTC, ${RUNS} runs per scenario (round robin), each in a fresh Chromium profile.`,
    '',
    `Machine: ${cpu}, ${cpus().length} cores; load average ${load0} at the start, ${load1} at the end (shared machine; everything of this run at nice 10). `
      + `Home Assistant ${HA_VERSION} (tests/ha-peer), Chromium ${browserVersion} (headless, Debian), hass-edge \`--profile fast\`${process.env.EDGE_NOTE ? ` (${process.env.EDGE_NOTE})` : ''}; HA-slow relay: +${DELAY_MS} ms before the first bytes of every answer.`,
    '',
    ...rows,
  ].join('\n');
  console.log(`\n${md}\n`);
  writeFileSync(join(OUT_DIR, 'kiosk.md'), `${md}\n`);
  writeFileSync(join(OUT_DIR, 'kiosk.json'), JSON.stringify({ started, load0, load1, haVersion: HA_VERSION, browserVersion, delayMs: DELAY_MS, runs: RUNS, results }, null, 1));
  say(`figures in ${join(OUT_DIR, 'kiosk.md')} and kiosk.json`);
}

let code = 0;
try {
  await main();
} catch (e) {
  console.error(`kiosk: FAILED: ${e.stack ?? e}`);
  code = 1;
} finally {
  for (const p of children) p.kill('SIGTERM');
  await forgetLogins();
}
process.exit(code);
