// A kiosk card for hass-edge, no framework: REST for the first state, then the SSE stream.
// Query string: ?api=<hass-edge base URL>&token=<hass-edge API token>.
// Everything the browser test reads is also kept in `window.kiosk`.
'use strict';

(() => {
  const WATCH = ['light.kitchen', 'input_boolean.kitchen'];
  const STREAM_SELECTION = 'light.,input_boolean.kitchen';
  const MAX_EVENTS = 8;

  const q = new URLSearchParams(location.search);
  const api = (q.get('api') || '').replace(/\/+$/, '');
  const token = q.get('token') || '';

  const kiosk = {
    api,
    ready: false,        // the first REST reads are done (ok or not)
    streamOpen: false,   // EventSource fired `open`
    streamErrors: 0,
    initial: {},         // entity_id -> state object from GET /api/states/{id}
    latest: {},          // entity_id -> { state: <state object>, source: 'REST' | 'stream' }
    events: [],          // every state_changed received: { entity_id, old_state, new_state, at }
    checks: {},          // name -> { ok, label, detail }
    checksDone: false,
    toggles: [],         // results of the Toggle button: { status, ok }
    report,              // report(name, ok, label, detail): lets the test add its own lines
  };
  window.kiosk = kiosk;

  const $ = (sel, root = document) => root.querySelector(sel);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const hhmmss = (d) => d.toLocaleTimeString('en-GB', { hour12: false }) + '.' + String(d.getMilliseconds()).padStart(3, '0');

  // Clock in the corner: a kiosk shows the time.
  const tick = () => { $('#clock').textContent = new Date().toLocaleTimeString('en-GB', { hour: '2-digit', minute: '2-digit' }); };
  tick();
  setInterval(tick, 10_000);

  function report(name, ok, label, detail) {
    kiosk.checks[name] = { ok, label, detail: detail || '' };
    let li = document.querySelector(`#checks li[data-check="${CSS.escape(name)}"]`);
    if (!li) {
      li = el('li');
      li.dataset.check = name;
      $('#checks').append(li);
    }
    li.className = ok === null ? 'pending' : ok ? 'ok' : 'fail';
    li.replaceChildren(
      el('span', 'mark', ok === null ? '…' : ok ? '✓' : '✗'),
      (() => {
        const w = el('span', 'what', label);
        if (detail) w.append(el('span', 'detail', detail));
        return w;
      })(),
    );
  }

  function setBadge(text, kind) {
    const b = $('#stream-badge');
    b.textContent = text;
    b.className = `badge badge-${kind}`;
  }

  function render(entityId, state, source) {
    kiosk.latest[entityId] = { state, source };
    const tile = document.querySelector(`.tile[data-entity="${CSS.escape(entityId)}"]`);
    if (!tile) return;
    const field = (f) => $(`[data-field="${f}"]`, tile);
    if (!state) {
      field('state').textContent = 'removed';
      tile.classList.remove('is-on');
      return;
    }
    const attrs = state.attributes || {};
    $('.name', tile).textContent = attrs.friendly_name || entityId;
    field('state').textContent = state.state;
    tile.classList.toggle('is-on', state.state === 'on');
    tile.dataset.state = state.state;
    tile.dataset.source = source;
    let detail = '';
    if (entityId.startsWith('light.')) {
      detail = attrs.brightness != null ? `brightness ${Math.round((attrs.brightness / 255) * 100)} %` : 'no brightness';
    } else if (attrs.editable !== undefined) {
      detail = `helper · ${attrs.editable ? 'editable' : 'from YAML'}`;
    }
    field('detail').textContent = detail;
    field('changed').textContent = state.last_changed ? hhmmss(new Date(state.last_changed)) : '–';
    field('source').textContent = source;
  }

  function addEvent(data) {
    const at = new Date();
    kiosk.events.push({ ...data, at: at.toISOString() });
    const list = $('#events');
    $('.empty', list)?.remove();
    const oldS = data.old_state ? data.old_state.state : '∅';
    const newS = data.new_state ? data.new_state.state : 'removed';
    const li = el('li', 'fresh');
    li.dataset.entity = data.entity_id;
    const time = el('time', '', hhmmss(at));
    time.dateTime = at.toISOString();
    const chg = el('span', 'chg');
    chg.append(el('span', 'old', oldS), document.createTextNode(' → '), el('span', newS === 'on' ? 'new-on' : 'new', newS));
    li.append(time, el('span', 'ent', data.entity_id), chg);
    list.prepend(li);
    while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
  }

  const authed = (extra = {}) => ({ ...extra, headers: { Authorization: `Bearer ${token}`, ...(extra.headers || {}) } });

  async function loadInitial() {
    for (const id of WATCH) {
      try {
        const r = await fetch(`${api}/api/states/${id}`, authed());
        if (!r.ok) throw new Error(`HTTP ${r.status}: ${await r.text()}`);
        const s = await r.json();
        kiosk.initial[id] = s;
        render(id, s, 'REST');
      } catch (e) {
        kiosk.initial[id] = { error: String(e) };
        const tile = document.querySelector(`.tile[data-entity="${id}"]`);
        $('[data-field="state"]', tile).textContent = 'error';
        $('[data-field="detail"]', tile).textContent = String(e);
      }
    }
    const ok = WATCH.every((id) => kiosk.initial[id] && !kiosk.initial[id].error);
    report('rest-bearer', ok, 'GET /api/states/{id} with Bearer (CORS preflight)', ok ? '200 · ' + WATCH.length + ' entities' : JSON.stringify(kiosk.initial));
    kiosk.ready = true;
  }

  function openStream() {
    const url = `${api}/api/stream?entity_id=${encodeURIComponent(STREAM_SELECTION)}&access_token=${encodeURIComponent(token)}`;
    const es = new EventSource(url);
    kiosk.eventSource = es;
    es.onopen = () => {
      kiosk.streamOpen = true;
      setBadge('stream: live', 'live');
    };
    es.onerror = () => {
      kiosk.streamErrors += 1;
      kiosk.streamOpen = es.readyState === EventSource.OPEN;
      setBadge(es.readyState === EventSource.CLOSED ? 'stream: closed' : 'stream: reconnecting', 'bad');
    };
    // HA's own format (components/api APIEventStream): unnamed messages, `ping` when the
    // stream opens and as keep-alive, events in HA's envelope — a page written for HA.
    es.onmessage = (ev) => {
      if (ev.data === 'ping') { kiosk.pings = (kiosk.pings || 0) + 1; return; }
      let event;
      try { event = JSON.parse(ev.data); } catch (e) { report('stream-json', false, 'stream data is JSON', String(e)); return; }
      if (event.event_type !== 'state_changed') return;
      const data = event.data;
      addEvent(data);
      if (WATCH.includes(data.entity_id)) render(data.entity_id, data.new_state, 'stream');
    };
  }

  // What a page without the token gets: 401, readable because the origin is allowed.
  async function authChecks() {
    const cases = [
      ['rest-no-token', 'GET /api/states/light.kitchen without token', `${api}/api/states/light.kitchen`, {}],
      ['rest-wrong-token', 'GET /api/states/light.kitchen, wrong Bearer', `${api}/api/states/light.kitchen`, { headers: { Authorization: 'Bearer wrong-token-0123456789' } }],
      ['stream-no-token', 'GET /api/stream without access_token', `${api}/api/stream?entity_id=light.kitchen`, {}],
      ['rest-query-token', 'access_token= on /api/states is not accepted', `${api}/api/states/light.kitchen?access_token=${encodeURIComponent(token)}`, {}],
    ];
    for (const [name, label, url, init] of cases) {
      try {
        const r = await fetch(url, init);
        const body = await r.text();
        let message = body.slice(0, 60);
        try { message = JSON.parse(body).message.replace(/\s*\(.*$/, ''); } catch { /* not JSON: keep the text */ }
        report(name, r.status === 401, label, `HTTP ${r.status} · ${message}`);
      } catch (e) {
        report(name, false, label, `fetch failed: ${e}`);
      }
    }
    // An EventSource without the token must fail for good (no endless reconnects).
    await new Promise((resolve) => {
      const es = new EventSource(`${api}/api/stream?entity_id=light.kitchen`);
      const done = (ok, detail) => { es.close(); report('eventsource-no-token', ok, 'EventSource without access_token is refused', detail); resolve(); };
      es.onopen = () => done(false, 'it opened');
      es.onerror = () => done(es.readyState === EventSource.CLOSED, `readyState ${es.readyState} (2 = CLOSED)`);
      setTimeout(() => done(false, 'no error within 5 s'), 5000);
    });
    kiosk.checksDone = true;
  }

  async function toggle() {
    const button = $('#toggle');
    button.disabled = true;
    try {
      const r = await fetch(`${api}/api/services/input_boolean/toggle`, authed({
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ entity_id: 'input_boolean.kitchen' }),
      }));
      kiosk.toggles.push({ status: r.status, ok: r.ok, body: await r.text() });
    } catch (e) {
      kiosk.toggles.push({ status: 0, ok: false, body: String(e) });
    } finally {
      button.disabled = false;
    }
  }

  async function main() {
    if (!api) {
      $('#usage').hidden = false;
      $('#tiles').hidden = true;
      setBadge('no API configured', 'bad');
      return;
    }
    $('#api-label').textContent = `via hass-edge · ${api}`;
    $('#toggle').addEventListener('click', toggle);
    await loadInitial();
    openStream();
    await authChecks();
    $('#toggle').disabled = false;
  }

  main().catch((e) => report('page', false, 'page script', String(e)));
})();
