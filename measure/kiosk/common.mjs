// What measure.mjs (issue 15: assets) and entities.mjs (issue 16: entity data) share: the
// environment run.sh sets, plain HTTP, HA's login flow (tokens for the browser), the delaying relay
// in front of HA, one hass-edge instance (its own config, state file and asset directory), a fresh
// browser profile logged in to HA, and the end of a run. What tests/browser and tests/frontend share
// with these (environment, plain HTTP, Chromium's flags) is in tests/lib/harness.mjs.
//
//   HA_URL, HA_TOKEN_FILE, HA_PY, HA_VERSION  the peer (tests/ha-peer); ha_helper.py setup already ran
//   EDGE_BIN      hass-edge's binary          WORK   a temporary directory (profiles, configs, states)
//   DELAY_MS      the relay's delay per answer (200)
//   CHROMIUM, PW_REQUIRE_FROM (a package.json beside a node_modules with playwright-core), OUT_DIR
import { spawn, execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync, readdirSync, existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { CHROMIUM_FLAGS, envReader, raw } from '../../tests/lib/harness.mjs';

export { raw };
export const env = envReader('kiosk', 'measure/kiosk/run.sh');
export const HA_URL = env('HA_URL').replace(/\/+$/, '');
export const HA_TOKEN = readFileSync(env('HA_TOKEN_FILE'), 'utf8').trim();
export const HA_VERSION = env('HA_VERSION', '?');
export const EDGE_BIN = env('EDGE_BIN');
export const WORK = env('WORK');
export const OUT_DIR = env('OUT_DIR');
export const DELAY_MS = Number(env('DELAY_MS', '200'));
export const CHROMIUM = env('CHROMIUM', '/usr/bin/chromium');
export const { chromium } = createRequire(env('PW_REQUIRE_FROM'))('playwright-core');
const USER = 'edge';                    // tests/ha-peer/peer.py's user
const PASSWORD = 'edge-tester-password';
export const FLAGS = CHROMIUM_FLAGS;
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export const say = (m) => console.log(`kiosk: ${m}`);
export const median = (xs) => { const s = [...xs].sort((a, b) => a - b); const n = s.length; return n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2; };
export const fmtMs = (x) => `${Math.round(x)}`;
export const fmtKB = (x) => `${Math.round(x / 1024)}`;
export const loadavg = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');

// ---------- plain HTTP (Node side; raw() is tests/lib/harness.mjs's) ----------
export const json = async (method, url, headers, body) => {
  const r = await raw(method, url, headers, body);
  if (r.status !== 200) throw new Error(`${method} ${url}: HTTP ${r.status} ${r.body.slice(0, 200)}`);
  return JSON.parse(r.body);
};
export const haState = (id) => json('GET', `${HA_URL}/api/states/${id}`, { Authorization: `Bearer ${HA_TOKEN}` });
export function freePort() {
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
export async function tokensFor(origin) {
  let l = logins.get(origin);
  if (!l || Date.now() - l.at > 15 * 60_000) { l = await login(origin); logins.set(origin, l); } // access tokens live 30 min
  return l.hassTokens;
}
export function forgetLogins() { // the refresh tokens of this run's logins are removed from HA again
  return Promise.all([...logins.keys()].map((origin) => new Promise((resolve) => {
    execFile(env('HA_PY'), [new URL('../../tests/frontend/ha_helper.py', import.meta.url).pathname, 'tokens', '--client-id', `${origin}/`,
      '--delete', '--url', HA_URL, '--token-file', env('HA_TOKEN_FILE')], { timeout: 30_000 }, (err, _o, stderr) => {
      if (err) console.error(`kiosk: could not remove the logins of ${origin}: ${stderr || err.message}`);
      resolve();
    });
  })));
}

// ---------- the relay (HA slow) and the hass-edge instances ----------
export const children = new Set(); // what to SIGTERM at the end
export function startRelay() {
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
export class Edge {
  // EXTRA: more TOML appended to its config (e.g. a [dashboards] section)
  constructor(name, haUrl, port, extra = '') {
    this.name = name; this.haUrl = haUrl; this.port = port; this.base = `http://127.0.0.1:${port}`;
    this.dir = join(WORK, name); mkdirSync(this.dir, { recursive: true });
    this.assets = join(this.dir, 'assets'); this.proc = null;
    this.config = join(this.dir, 'hass-edge.toml');
    this.log = '';
    writeFileSync(this.config, `[ha]\nurl = "${haUrl}"\ntoken_file = "${env('HA_TOKEN_FILE')}"\n\n[http]\nlisten = "127.0.0.1:${port}"\n\n`
      + `[dbus]\nbus = "none"\n\n[cache]\nstate_file = "${join(this.dir, 'states.json')}"\n\n[log]\nlevel = "warn"\n${extra}`);
  }
  async start() {
    const e = { ...process.env };
    for (const k of Object.keys(e)) if (k.startsWith('HASS_EDGE_') || ['NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID'].includes(k)) delete e[k];
    const p = spawn(EDGE_BIN, ['--config', this.config], { env: e, stdio: ['ignore', 'ignore', 'pipe'] });
    p.stderr.on('data', (d) => { this.log = (this.log + d).slice(-4000); });
    children.add(p);
    p.on('exit', () => children.delete(p));
    this.proc = p;
    const deadline = Date.now() + 30_000;
    for (;;) {
      if (p.exitCode !== null) throw new Error(`hass-edge ${this.name} exited at start: ${this.log}`);
      const r = await raw('GET', `${this.base}/health`).catch(() => null);
      if (r && r.status === 200) return;
      if (Date.now() > deadline) throw new Error(`hass-edge ${this.name}: /health not 200 after 30 s: ${r?.status} ${this.log}`);
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

// ---------- a browser profile, and the end of a run ----------
export let browserVersion = ''; // Chromium's, once a profile was opened
// openProfile(base, tokens): Chromium with a FRESH profile (a temporary directory in WORK) whose
// pages at BASE's origin find TOKENS (tokensFor's) in localStorage.hassTokens before their scripts
// run, as after a password login. Returns { context, close }: close() closes Chromium (5 s at most)
// and removes the profile.
export async function openProfile(base, tokens) {
  const profile = mkdtempSync(join(WORK, 'profile-'));
  let context;
  const close = async () => {
    await Promise.race([context?.close().catch(() => {}), sleep(5000)]);
    rmSync(profile, { recursive: true, force: true });
  };
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM, headless: true, args: FLAGS, viewport: { width: 1280, height: 800 }, timeout: 30_000,
    });
    browserVersion ||= context.browser()?.version() ?? '';
    const origin = new URL(base).origin;
    await context.addInitScript(([o, t]) => {
      if (location.origin === o && !localStorage.getItem('hassTokens')) localStorage.setItem('hassTokens', t);
    }, [origin, JSON.stringify(tokens)]);
  } catch (e) {
    await close();
    throw e;
  }
  return { context, close };
}
// runMain(main, atEnd): runs MAIN; whatever it did, SIGTERM to every child, this run's logins
// removed from HA, then ATEND (async); exits 0, or 1 when MAIN threw (printed).
export async function runMain(main, atEnd = async () => {}) {
  let code = 0;
  try {
    await main();
  } catch (e) {
    console.error(`kiosk: FAILED: ${e.stack ?? e}`);
    code = 1;
  } finally {
    for (const p of children) p.kill('SIGTERM');
    await forgetLogins();
    await atEnd();
  }
  process.exit(code);
}
