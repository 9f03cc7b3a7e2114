// Kiosk load with many entities (issue 16): how long HA's own frontend takes to show a dashboard
// of 20 cards, and how much entity data the page receives, with N sensors in HA (ENTITY_COUNTS,
// default "1000 5000"): directly against Home Assistant, through hass-edge (which serves
// /api/websocket from its mirror), and through hass-edge with `[dashboards] url_paths =
// ["lovelace"]` (an unfiltered subscription gets only the dashboard's entities). A measurement,
// not a test: it prints figures. Started by `measure/kiosk/run.sh entities` (environment: see
// common.mjs), plus:
//
//   ENTITY_COUNTS  "1000 5000"   RUNS  3 (cold + warm pairs per target and count)
//   TARGETS        "ha edge edge-dash"; each also as NAME-slow (through relay.py: +DELAY_MS per answer)
//   CPU_THROTTLE   1 (none); N: each page's CPU N times slower (a kiosk's JavaScript)
//
// One pair: a FRESH Chromium profile (tokens from HA's login flow put into localStorage.hassTokens
// before the page's scripts run) and, for hass-edge, a freshly started hass-edge with an empty
// asset directory (its mirror synced, `/status` store.tracked ≥ HA's states its filter keeps, before the
// load). Load 1 (cold) = `goto <base>/lovelace/0` in a new tab; load 2 (warm) = the same in a new
// tab of the same browser profile after the first tab closed (the browser's HTTP cache, and
// hass-edge's asset directory and registry caches, filled by load 1).
// Times from the navigation's start (performance.now() in the page): "Kitchen shown" = the
// Kitchen row of the last card shows HA's state of input_boolean.kitchen (measure.mjs's
// criterion); "all cards" = that, and each of the 19 sensor entity cards shows a value.
// Counted on the page's /api/websocket until 1 s after both (Playwright `framereceived`, as
// tests/frontend/test.mjs): every frame and its payload bytes; the frames with entity data
// (subscribe_entities events `a`/`c`/`r`, state_changed events, get_states results) and those
// messages' bytes; the entity ids in `a` events.
import { execFile } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cpus } from 'node:os';
import { entityIdsOf } from '../../tests/lib/harness.mjs';
import {
  env, HA_URL, HA_TOKEN, HA_VERSION, OUT_DIR, DELAY_MS, sleep, say, median, fmtMs, fmtKB, loadavg,
  json, haState, freePort, tokensFor, startRelay, Edge, openProfile, browserVersion, runMain,
} from './common.mjs';

const RUNS = Number(env('RUNS', '3'));
const COUNTS = env('ENTITY_COUNTS', '1000 5000').split(/\s+/).filter(Boolean).map(Number);
const TARGETS = env('TARGETS', 'ha edge edge-dash').split(/\s+/).filter(Boolean);
const DASHBOARD = '/lovelace/0';        // entities.py dashboard: HA's default dashboard, view path 0
const KITCHEN = 'Kitchen';              // input_boolean.kitchen's friendly name, a row of the last card
const SENSOR_CARDS = 19;                // entities.py: entity cards of sensor.kiosk_bench_50 … _950
const RUN_TIMEOUT = 60_000;
// CPU_THROTTLE: Chromium's CPU throttling (CDP Emulation.setCPUThrottlingRate) on each page, a
// slower kiosk's JavaScript (e.g. 4 = four times slower); 1 = none
const CPU_THROTTLE = Number(env('CPU_THROTTLE', '1'));
const ENTITIES_PY = new URL('./entities.py', import.meta.url).pathname;

const KIND = {
  ha: { edge: false, dash: false, label: 'HA directly' },
  edge: { edge: true, dash: false, label: 'hass-edge' },
  'edge-dash': { edge: true, dash: true, label: 'hass-edge, `[dashboards]`' },
};
const targetOf = (t) => {
  const slow = t.endsWith('-slow');
  const k = KIND[slow ? t.slice(0, -5) : t];
  if (!k) { console.error(`kiosk: unknown target ${t} (${Object.keys(KIND).join(', ')}, each also NAME-slow)`); process.exit(2); }
  return { ...k, slow, label: slow ? `${k.label}, HA +${DELAY_MS} ms` : k.label };
};
const T = Object.fromEntries(TARGETS.map((t) => [t, targetOf(t)]));

function entitiesPy(...args) {
  return new Promise((resolve, reject) => {
    execFile(env('HA_PY'), [ENTITIES_PY, ...args, '--url', HA_URL, '--token-file', env('HA_TOKEN_FILE')], { timeout: 600_000 },
      (err, stdout, stderr) => (err ? reject(new Error(`entities.py ${args.join(' ')}: ${stderr || err.message}`)) : resolve(JSON.parse(stdout))));
  });
}

// ---------- the page's WebSocket: every frame, and the entity data among them ----------
// (entityIdsOf, the entity ids of a message carrying entity data: tests/lib/harness.mjs)
function watchSockets(page) {
  // cmds: each command the page sent, its type and when it went and its result came (ms since
  // w.t0, set at the goto): which answers the dashboard waited for; authOk: when auth_ok came
  const w = { frames: 0, bytes: 0, entityFrames: 0, entityBytes: 0, aIds: 0, ids: new Set(), sockets: 0, stopped: false,
    t0: Date.now(), cmds: new Map(), authOk: null };
  page.on('websocket', (ws) => {
    if (!new URL(ws.url()).pathname.endsWith('/api/websocket')) return;
    w.sockets += 1;
    const types = new Map();
    const messages = (payload) => { try { return [JSON.parse(String(payload))].flat(); } catch { return []; } };
    const socket = w.sockets;
    ws.on('framesent', (f) => {
      for (const m of messages(f.payload)) {
        if (!m || m.id === undefined) continue;
        types.set(m.id, m.type);
        w.cmds.set(`${socket}/${m.id}`, { type: m.type, sent: Date.now() - w.t0, result: null });
      }
    });
    ws.on('framereceived', (f) => {
      if (w.stopped) return;
      const size = Buffer.byteLength(String(f.payload));
      w.frames += 1;
      w.bytes += size;
      const ms = messages(f.payload);
      let bytes = 0;
      let n = 0;
      for (const m of ms) {
        const c = m?.type === 'result' && w.cmds.get(`${socket}/${m.id}`);
        if (c && c.result === null) c.result = Date.now() - w.t0;
        if (m?.type === 'auth_ok' && w.authOk === null) w.authOk = Date.now() - w.t0;
        const ids = entityIdsOf(m, types);
        if (!ids) continue;
        n += 1;
        bytes += Buffer.byteLength(JSON.stringify(m));
        for (const id of ids) w.ids.add(id);
        if (m.event?.a) w.aIds += Object.keys(m.event.a).length;
      }
      if (!n) return;
      w.entityFrames += 1;
      // a frame of entity messages only: its bytes on the wire; coalesced with others: theirs re-serialized
      w.entityBytes += n === ms.length ? size : bytes;
    });
  });
  return w;
}

// ---------- one load in a browser profile ----------
async function load(context, base, tag) {
  const page = await context.newPage();
  try {
    const cdp = await context.newCDPSession(page);
    const reqs = new Map();
    cdp.on('Network.requestWillBeSent', (e) => { if (!reqs.has(e.requestId)) reqs.set(e.requestId, { url: e.request.url, bytes: 0, cached: false }); });
    cdp.on('Network.responseReceived', (e) => {
      const r = reqs.get(e.requestId);
      if (r) r.cached = e.response.fromDiskCache || e.response.fromServiceWorker || e.response.fromPrefetchCache || e.response.fromMemoryCache;
    });
    cdp.on('Network.requestServedFromCache', (e) => { const r = reqs.get(e.requestId); if (r) r.cached = true; });
    cdp.on('Network.loadingFinished', (e) => { const r = reqs.get(e.requestId); if (r) r.bytes = e.encodedDataLength; });
    await cdp.send('Network.enable');
    if (CPU_THROTTLE > 1) await cdp.send('Emulation.setCPUThrottlingRate', { rate: CPU_THROTTLE });
    const ws = watchSockets(page);
    const want = (await haState('input_boolean.kitchen')).state === 'on' ? 'true' : 'false';

    ws.t0 = Date.now();
    await page.goto(`${base}${DASHBOARD}`, { waitUntil: 'commit', timeout: 30_000 });
    // in the page: every 20 ms, through the open shadow roots, the Kitchen row and the sensor cards
    const times = await (await page.waitForFunction(([name, checked, sensors]) => {
      const all = (root, sel, out = []) => {
        out.push(...root.querySelectorAll(sel));
        for (const el of root.querySelectorAll('*')) if (el.shadowRoot) all(el.shadowRoot, sel, out);
        return out;
      };
      const t = performance.now();
      const w = (window.__kiosk ??= {});
      if (w.kitchen === undefined) {
        for (const row of all(document, 'hui-toggle-entity-row')) {
          if (!all(row.shadowRoot ?? row, '.info').some((i) => i.getAttribute('title') === name)) continue;
          const sw = all(row.shadowRoot ?? row, '[role="switch"]')[0];
          if (sw && sw.getAttribute('aria-checked') === checked) w.kitchen = t;
        }
      }
      if (w.cards === undefined) {
        const shown = all(document, 'hui-entity-card').filter((c) => {
          const v = c.shadowRoot?.querySelector('.value');
          return v && v.textContent.trim() !== '';
        });
        if (shown.length >= sensors) w.cards = t;
      }
      return w.kitchen !== undefined && w.cards !== undefined ? { kitchen: w.kitchen, all: Math.max(w.kitchen, w.cards) } : false;
    }, [KITCHEN, want, SENSOR_CARDS], { polling: 20, timeout: RUN_TIMEOUT })).jsonValue();
    const shownAt = Date.now() - ws.t0; // on the clock of ws.cmds (≤ 20 ms after it showed)
    const where = await page.evaluate(() => location.pathname);
    if (where !== DASHBOARD) throw new Error(`${tag}: the page ended at ${where}, not ${DASHBOARD}`);
    await sleep(1000); // what is still in flight lands
    ws.stopped = true;
    const list = [...reqs.values()].filter((r) => /^https?:/.test(r.url));
    return {
      kitchen: times.kitchen, all: times.all,
      wsFrames: ws.frames, wsBytes: ws.bytes, entityFrames: ws.entityFrames, entityBytes: ws.entityBytes,
      aIds: ws.aIds, entityIds: ws.ids.size, sockets: ws.sockets, authOk: ws.authOk, cmds: [...ws.cmds.values()], shownAt,
      // the last answer to one of the page's commands that came before the dashboard showed
      lastAnswer: [...ws.cmds.values()].filter((c) => c.result !== null && c.result <= shownAt).sort((a, b) => b.result - a.result)[0] ?? null,
      requests: list.length, httpBytes: list.reduce((a, r) => a + r.bytes, 0), browserCached: list.filter((r) => r.cached).length,
    };
  } finally {
    await page.close().catch(() => {});
  }
}

// A cold load and a warm one in one fresh browser profile.
async function pair(base, tokens, tag) {
  const { context, close } = await openProfile(base, tokens);
  try {
    const blank = context.pages()[0]; // the persistent context's first tab stays open (about:blank)
    const cold = await load(context, base, `${tag} cold`);
    const warm = await load(context, base, `${tag} warm`);
    if (blank) await blank.close().catch(() => {});
    return { cold, warm };
  } finally {
    await close();
  }
}

// hass-edge's mirror holds every HA state its filter lets through (IDS: HA's entity ids).
async function waitMirrored(edge, ids) {
  const deadline = Date.now() + 60_000;
  for (;;) {
    const st = await json('GET', `${edge.base}/status`);
    const ex = st.filter?.exclude_domains ?? [];
    const inc = st.filter?.include_prefixes ?? [];
    const want = ids.filter((id) => !ex.includes(id.split('.')[0]) && (!inc.length || inc.some((p) => id.startsWith(p)))).length;
    if (st.store.tracked >= want) return st.store.tracked;
    if (Date.now() > deadline) throw new Error(`hass-edge ${edge.name}: tracks ${st.store.tracked} entities after 60 s, its filter lets ${want} of HA's through`);
    await sleep(200);
  }
}

// ---------- the run ----------
async function main() {
  const started = new Date();
  const load0 = loadavg();
  say(`dashboard: ${JSON.stringify(await entitiesPy('dashboard'))}`);
  const relay = TARGETS.some((t) => T[t].slow) ? await startRelay() : null;
  if (relay) say(`relay in front of HA on ${relay.url} (+${DELAY_MS} ms before the first bytes of every answer)`);
  const edges = {};
  for (const t of TARGETS) {
    if (!T[t].edge) continue;
    edges[t] = new Edge(t, T[t].slow ? relay.url : HA_URL, await freePort(), T[t].dash ? '\n[dashboards]\nurl_paths = ["lovelace"]\n' : '');
  }
  const baseOf = (t) => (T[t].edge ? edges[t].base : T[t].slow ? relay.url : HA_URL);
  const results = [];
  for (const n of COUNTS) {
    const made = await entitiesPy('count', String(n));
    say(`${n} sensors in HA (${made.created} set, ${made.removed} removed in ${made.seconds} s); HA holds ${made.ha_states} states`);
    const haIds = (await json('GET', `${HA_URL}/api/states`, { Authorization: `Bearer ${HA_TOKEN}` })).map((x) => x.entity_id);
    // Round robin over the targets, so that a change of the machine's load hits them all alike.
    for (let i = 1; i <= RUNS; i++) {
      for (const t of TARGETS) {
        const edge = edges[t];
        let tracked = null;
        if (edge) {
          edge.emptyAssets();
          await edge.start();
          tracked = await waitMirrored(edge, haIds);
        }
        const base = baseOf(t);
        const r = await pair(base, await tokensFor(new URL(base).origin), `${n} ${t} #${i}`);
        if (edge) await edge.stop();
        for (const kind of ['cold', 'warm']) {
          const x = r[kind];
          results.push({ n, target: t, kind, run: i, tracked, ...x });
          say(`${n} ${t} #${i} ${kind}: Kitchen ${fmtMs(x.kitchen)} ms, all cards ${fmtMs(x.all)} ms; auth_ok ${x.authOk} ms, `
            + `last answer before shown ${x.lastAnswer?.result} ms (${x.lastAnswer?.type}, asked at ${x.lastAnswer?.sent} ms), shown at ${x.shownAt} ms (goto's clock); entity data ${fmtKB(x.entityBytes)} KiB in ${x.entityFrames} frames `
            + `(${x.aIds} ids in a, ${x.entityIds} distinct); WebSocket ${fmtKB(x.wsBytes)} KiB in ${x.wsFrames} frames (${x.sockets} socket); `
            + `HTTP ${x.requests} requests ${fmtKB(x.httpBytes)} KiB, ${x.browserCached} from the browser's cache`
            + (tracked !== null ? `; hass-edge tracked ${tracked}` : ''));
        }
      }
    }
  }
  if (relay) relay.proc.kill('SIGTERM');
  const load1 = loadavg();

  const rows = [
    '| entities in HA | page served by | load | dashboard shown: median / max (ms) | WebSocket `auth_ok` / last answer before shown: median (ms) | entity data received: KiB / frames / ids in `a` | WebSocket received: KiB / frames | HTTP: requests / KiB (from browser cache) |',
    '|---|---|---|---|---|---|---|---|',
  ];
  for (const n of COUNTS) {
    for (const t of TARGETS) {
      for (const kind of ['cold', 'warm']) {
        const rs = results.filter((r) => r.n === n && r.target === t && r.kind === kind);
        const m = (f) => median(rs.map(f));
        rows.push(`| ${n.toLocaleString('en')} | ${T[t].label} | ${kind} | ${fmtMs(m((r) => r.kitchen))} / ${fmtMs(Math.max(...rs.map((r) => r.kitchen)))} `
          + `| ${fmtMs(m((r) => r.authOk))} / ${fmtMs(m((r) => r.lastAnswer?.result ?? 0))} | ${fmtKB(m((r) => r.entityBytes))} / ${m((r) => r.entityFrames)} / ${m((r) => r.aIds)} `
          + `| ${fmtKB(m((r) => r.wsBytes))} / ${m((r) => r.wsFrames)} | ${m((r) => r.requests)} / ${fmtKB(m((r) => r.httpBytes))} (${m((r) => r.browserCached)}) |`);
      }
    }
  }
  const md = [
    `Run: ${started.toISOString().slice(0, 16).replace('T', ' ')} UTC, ${RUNS} cold + warm pairs per target and entity count (round robin), each pair in a fresh Chromium profile.`,
    '',
    `Machine: ${cpus()[0]?.model ?? '?'}, ${cpus().length} cores; load average ${load0} at the start, ${load1} at the end. `
      + `Home Assistant ${HA_VERSION} (tests/ha-peer), Chromium ${browserVersion} (headless, Debian${CPU_THROTTLE > 1 ? `, CPU throttled ${CPU_THROTTLE}×` : ''}), hass-edge ${env('EDGE_BIN')}${process.env.EDGE_NOTE ? ` (${process.env.EDGE_NOTE})` : ''}.`,
    '',
    ...rows,
    '',
    `Dashboard shown = the Kitchen row shows HA's state; all 19 sensor cards showed a value at most ${fmtMs(Math.max(...results.map((r) => r.all - r.kitchen)))} ms later in every load. `
      + 'WebSocket times are from the goto on the driver\'s clock (the shown times on the page\'s, from its navigation start).',
  ].join('\n');
  console.log(`\n${md}\n`);
  writeFileSync(join(OUT_DIR, 'kiosk-entities.md'), `${md}\n`);
  writeFileSync(join(OUT_DIR, 'kiosk-entities.json'), JSON.stringify({ started, load0, load1, haVersion: HA_VERSION, browserVersion, delayMs: DELAY_MS, cpuThrottle: CPU_THROTTLE, runs: RUNS, results }, null, 1));
  say(`figures in ${join(OUT_DIR, 'kiosk-entities.md')} and kiosk-entities.json`);
}

await runMain(main, async () => {
  if (process.env.KEEP_ENTITIES !== '1') await entitiesPy('clean').then((c) => say(`HA cleaned: ${JSON.stringify(c)}`)).catch((e) => console.error(`kiosk: ${e.message}`));
});
