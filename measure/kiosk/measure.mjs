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
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cpus } from 'node:os';
import {
  env, HA_URL, HA_VERSION, OUT_DIR, DELAY_MS, sleep, say, median, fmtMs, fmtKB, loadavg,
  haState, freePort, tokensFor, startRelay, Edge, openProfile, browserVersion, runMain,
} from './common.mjs';

const RUNS = Number(env('RUNS', '5'));
const SCENARIOS = env('SCENARIOS', 'ha edge-cold edge-warm ha-slow edge-slow-cold edge-slow-warm').split(/\s+/).filter(Boolean);
const DASHBOARD = '/edge-test/0';       // tests/frontend/ha_helper.py setup
const KITCHEN = 'Kitchen';              // input_boolean.kitchen's friendly name, a row of the entities card
const RUN_TIMEOUT = 60_000;

const KNOWN = {
  ha: { target: 'ha', slow: false, assets: null, label: 'HA directly' },
  'edge-cold': { target: 'edge', slow: false, assets: 'cold', label: 'hass-edge, cold' },
  'edge-warm': { target: 'edge', slow: false, assets: 'warm', label: 'hass-edge, warm' },
  'ha-slow': { target: 'ha', slow: true, assets: null, label: `HA directly, HA slow (+${DELAY_MS} ms)` },
  'edge-slow-cold': { target: 'edge', slow: true, assets: 'cold', label: `hass-edge, cold, HA slow (+${DELAY_MS} ms)` },
  'edge-slow-warm': { target: 'edge', slow: true, assets: 'warm', label: `hass-edge, warm, HA slow (+${DELAY_MS} ms)` },
};
for (const s of SCENARIOS) if (!KNOWN[s]) { console.error(`kiosk: unknown scenario ${s} (${Object.keys(KNOWN).join(', ')})`); process.exit(2); }

// ---------- one measured load ----------
async function load(base, tokens, tag) {
  const { context, close } = await openProfile(base, tokens);
  try {
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
    await close();
  }
}

// ---------- the run ----------

async function main() {
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

await runMain(main);
