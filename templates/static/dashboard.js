// The mt5hub dashboard: one panel per signal table (key, src), kept live over feed.js.
//
// Incoming messages only change `tables` (plain data) and mark what changed; the DOM is patched
// at most once per animation frame, however many updates arrive in between (see render()).
// Publisher strings reach the page through textContent and attributes only, never as HTML.

import { parseColor } from './colors.js';
import { startFeed, viewerUrl } from './feed.js';
import { applyPatch } from './patch.js';

// The column after the timeframes (`sum`, `sum_cell_color`). Timeframe names are A-Z a-z 0-9 _
// only, so this key cannot clash with one.
const SUM = '$sum';
const MAX_DECIMALS = 5;
const DEFAULT_STALE_S = 30;
const FRAME_BUDGET_MS = 8; // patching stops for this frame after this long: the page stays smooth
const HIGHLIGHT_MS = 800;
const STORE = { hidden: 'mt5hub.hiddenPanels', filter: 'mt5hub.filter', stale: 'mt5hub.staleSeconds' };

// ---- state ----------------------------------------------------------------------------------

const tables = new Map(); // id -> {id, key, src, clientId, seq, online, seenAt, rows, tfs, decimals, doc}
const views = new Map(); // id -> the DOM of that table's panel (see createView)
const dirty = new Set(); // ids whose panel must be patched at the next frame
let layoutChanged = false; // tables came or went: re-sort panels, rebuild the panel menu
let frameRequested = false;
let filterText = '';
let hiddenPanels = new Set();
let staleMs = DEFAULT_STALE_S * 1000;
let conn = { state: 'connecting' };
const stats = { messages: 0, updates: 0, patches: 0, renders: 0, snapshots: 0, pings: 0, resyncs: 0 };
let feed = null; // feed.js's handle: send subscribe/unsubscribe, restart after a bad patch
const PATCH_HEADER = new Set(['type', 'key', 'src', 'seq', 'base', 'ts']);
let rate = { since: Date.now(), updates: 0 };

const $ = (id) => document.getElementById(id);
const tableId = (key, src) => JSON.stringify([key, src]);

// ---- timeframes and numbers -------------------------------------------------------------------

const TF_MINUTES = { M: 1, H: 60, D: 1440, W: 10080, MN: 43200 };

/** M1 … MN1 sort in market order by their length; names outside that pattern go last. */
function tfMinutes(tf) {
  const m = /^(MN|M|H|D|W)(\d{1,5})$/i.exec(tf);
  return m ? TF_MINUTES[m[1].toUpperCase()] * Number(m[2]) : Infinity;
}

function compareTf(a, b) {
  return (tfMinutes(a) - tfMinutes(b)) || (a < b ? -1 : a > b ? 1 : 0); // Infinity - Infinity: NaN
}

function decimalsOf(value) {
  const text = String(value);
  if (text.includes('e')) return MAX_DECIMALS;
  const dot = text.indexOf('.');
  return dot < 0 ? 0 : Math.min(MAX_DECIMALS, text.length - dot - 1);
}

function formatNumber(value, decimals) {
  if (typeof value !== 'number' || !Number.isFinite(value)) return '';
  const text = value.toFixed(decimals);
  return /^-0(\.0*)?$/.test(text) ? text.slice(1) : text; // no "-0.00"
}

function formatAge(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s ago`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, '0')}s ago`;
  const h = Math.floor(m / 60);
  if (h < 24) return `${h}h ${String(m % 60).padStart(2, '0')}m ago`;
  return `${Math.floor(h / 24)}d ${h % 24}h ago`;
}

// ---- messages -> state ------------------------------------------------------------------------

/** Read a table's rows defensively: the hub validates, but a bad row must never break the page. */
function readRows(data) {
  const rows = [];
  const seen = new Map(); // a pair listed twice still gets two rows
  for (const row of Array.isArray(data) ? data : []) {
    if (row === null || typeof row !== 'object' || typeof row.pair !== 'string') continue;
    const n = seen.get(row.pair) ?? 0;
    seen.set(row.pair, n + 1);
    const cells = new Map();
    for (const cell of Array.isArray(row.TF_data) ? row.TF_data : []) {
      if (cell === null || typeof cell !== 'object') continue;
      for (const [tf, value] of Object.entries(cell)) {
        if (tf !== 'cell_color' && typeof value === 'number') cells.set(tf, { value, color: cell.cell_color });
      }
    }
    cells.set(SUM, { value: row.sum, color: row.sum_cell_color });
    rows.push({ rowKey: `${n}:${row.pair}`, pair: row.pair, cells });
  }
  return rows;
}

function applyTable(msg, seenAt) {
  if (typeof msg.key !== 'string' || typeof msg.src !== 'string') return;
  const id = tableId(msg.key, msg.src);
  let t = tables.get(id);
  if (!t) {
    t = { id, key: msg.key, src: msg.src, decimals: 0 };
    tables.set(id, t);
    layoutChanged = true;
  }
  t.doc = msg; // the update as the hub holds it: what the next patch applies to
  t.clientId = typeof msg.clientId === 'string' ? msg.clientId : '';
  t.seq = msg.seq;
  t.online = msg.online !== false; // an update means a live publisher just sent it
  t.seenAt = seenAt;
  t.rows = readRows(msg.data);
  const tfs = new Set();
  for (const row of t.rows) {
    for (const [tf, cell] of row.cells) {
      if (tf !== SUM) tfs.add(tf);
      // Only ever more decimals, so that a number does not change width with its value.
      if (typeof cell.value === 'number') t.decimals = Math.max(t.decimals, decimalsOf(cell.value));
    }
  }
  t.tfs = [...tfs].sort(compareTf);
  dirty.add(id);
}

function onMessage(msg) {
  stats.messages += 1;
  const now = Date.now();
  switch (msg.type) {
    case 'snapshot':
      // A new connection: the snapshot is the whole truth, whatever we showed before. A
      // partial one answers a subscribe: it adds the tables we asked for.
      stats.snapshots += 1;
      if (!msg.partial) {
        tables.clear();
        unsubscribeHidden(); // the hidden panels' tables: not sent from now on
      }
      layoutChanged = true;
      for (const t of Array.isArray(msg.tables) ? msg.tables : []) {
        if (t !== null && typeof t === 'object') {
          // Age from the hub's own clocks, so a skewed clock on this machine does not matter.
          const age = Number(msg.ts) - Number(t.ts);
          applyTable(t, now - (Number.isFinite(age) ? Math.max(0, age) : 0));
        }
      }
      break;
    case 'update':
      stats.updates += 1;
      rate.updates += 1;
      applyTable(msg, now);
      break;
    case 'patch': {
      // Only what changed since update `base`, which the hub sends only when we hold it.
      const t = tables.get(tableId(msg.key, msg.src));
      if (!t || !t.doc || t.seq !== msg.base) {
        stats.resyncs += 1; // cannot happen with a correct hub: start again from a snapshot
        feed?.restart();
        return;
      }
      const body = Object.fromEntries(Object.entries(msg).filter(([name]) => !PATCH_HEADER.has(name)));
      stats.patches += 1;
      rate.updates += 1;
      applyTable({ ...applyPatch(t.doc, body), type: 'update', seq: msg.seq, ts: msg.ts }, now);
      break;
    }
    case 'unsubscribed': // the tables of panels we hid: nothing more of them comes
      for (const gone of Array.isArray(msg.tables) ? msg.tables : []) {
        if (tables.delete(tableId(gone.key, gone.src))) layoutChanged = true;
      }
      break;
    case 'presence': {
      const t = tables.get(tableId(msg.key, msg.src));
      if (!t) break; // a table we have no data for yet: its first update will say it is online
      t.online = msg.online === true;
      if (typeof msg.clientId === 'string') t.clientId = msg.clientId;
      dirty.add(t.id);
      break;
    }
    default:
      return; // a type from a later protocol version: ignore it
  }
  scheduleRender();
}

// ---- state -> DOM, once per frame ---------------------------------------------------------------

function scheduleRender() {
  if (!frameRequested) {
    frameRequested = true;
    requestAnimationFrame(render);
  }
}

function render() {
  frameRequested = false;
  stats.renders += 1;
  const started = performance.now();
  if (layoutChanged) {
    layoutChanged = false;
    placePanels();
  }
  const now = Date.now();
  for (const id of dirty) {
    dirty.delete(id); // deleting the current entry while iterating a Set is safe
    const view = views.get(id);
    const t = tables.get(id);
    if (!view || !t) continue;
    if (!view.onScreen) {
      view.behind = true; // patched when it scrolls into view (see the IntersectionObserver)
      continue;
    }
    patchView(view, t, now);
    if (performance.now() - started > FRAME_BUDGET_MS) {
      scheduleRender(); // the rest next frame: a flood may make panels lag, never the page
      break;
    }
  }
  updateHeader();
}

/** Create and remove panels as tables come and go, and keep them sorted by key, then src. */
function placePanels() {
  for (const [id, view] of views) {
    if (!tables.has(id)) {
      view.section.remove();
      views.delete(id);
    }
  }
  const container = $('panels');
  const sorted = sortedTables();
  let previous = null;
  for (const t of sorted) {
    let view = views.get(t.id);
    if (!view) {
      view = createView(t);
      views.set(t.id, view);
    }
    const wanted = previous ? previous.nextSibling : container.firstChild;
    if (view.section !== wanted) container.insertBefore(view.section, wanted); // moves only those out of place
    previous = view.section;
  }
  buildPanelMenu(menuTables());
}

function sortedTables() {
  return [...tables.values()].sort((a, b) => a.key.localeCompare(b.key) || a.src.localeCompare(b.src));
}

/** Every table the panel menu offers: those we hold, and those hidden (the hub sends us
 * nothing of those, but the menu must still offer to show them again). */
function menuTables() {
  const all = new Map(tables);
  for (const id of hiddenPanels) {
    if (all.has(id)) continue;
    try {
      const [key, src] = JSON.parse(id);
      if (typeof key === 'string' && typeof src === 'string') all.set(id, { id, key, src });
    } catch {
      // an id stored by some other version of the page: not ours to show
    }
  }
  return [...all.values()].sort((a, b) => a.key.localeCompare(b.key) || a.src.localeCompare(b.src));
}

/** Hidden panels are unsubscribed (protocol v1.1), so the hub spends nothing on them. */
function unsubscribeHidden() {
  const hidden = [...hiddenPanels].map((id) => menuEntry(id)).filter(Boolean);
  if (hidden.length) feed?.send({ type: 'unsubscribe', tables: hidden });
}

function menuEntry(id) {
  try {
    const [key, src] = JSON.parse(id);
    return typeof key === 'string' && typeof src === 'string' ? { key, src } : null;
  } catch {
    return null;
  }
}

function createView(t) {
  const section = $('panel-template').content.firstElementChild.cloneNode(true);
  const part = (selector) => section.querySelector(selector);
  section.dataset.key = t.key;
  section.dataset.src = t.src;
  part('.key').textContent = t.key;
  part('.src').textContent = t.src;
  const view = {
    id: t.id,
    section,
    onScreen: true, // until the observer says otherwise: the first frame draws everything
    behind: false, // changed while off screen
    table: part('table'),
    head: part('thead tr'),
    body: part('tbody'),
    client: part('.client'),
    age: part('.age'),
    presence: part('.presence'),
    shape: '', // timeframes and rows the grid was built for
    digits: 0, // characters of the longest number shown so far: sets the column width
    pairChars: 0, // the same for the pair names
    rowEls: [],
    grid: [], // grid[row][column] = {td, text, color}: what the cell shows now
  };
  viewOf.set(section, view);
  screen.observe(section);
  return view;
}

// Panels off screen are not patched: with 50 tables updating, most of the work would be for
// cells nobody can see. A panel that comes into view is brought up to date at once.
const viewOf = new WeakMap();
const screen = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    const view = viewOf.get(entry.target);
    if (!view) continue;
    view.onScreen = entry.isIntersecting;
    if (view.onScreen && view.behind) {
      view.behind = false;
      dirty.add(view.id);
      scheduleRender();
    }
  }
}, { rootMargin: '200px' });

function patchView(view, t, now) {
  const shape = JSON.stringify([t.tfs, t.rows.map((r) => r.rowKey)]);
  if (shape !== view.shape) {
    buildGrid(view, t);
    view.shape = shape;
    applyFilter(view);
  }
  const columns = [...t.tfs, SUM];
  let longest = 0;
  t.rows.forEach((row, r) => {
    columns.forEach((tf, c) => {
      const cell = row.cells.get(tf);
      const text = cell ? formatNumber(cell.value, t.decimals) : '';
      longest = Math.max(longest, text.length);
      const color = cell && typeof cell.color === 'string' ? cell.color : '';
      const slot = view.grid[r][c];
      if (slot.text === text && slot.color === color) return;
      if (slot.text !== text) setText(slot.td, text);
      if (slot.color !== color) paintColor(slot.td, color);
      if (slot.text !== null) highlight(slot.td, now); // changed, not first drawn
      slot.text = text;
      slot.color = color;
    });
  });
  if (longest > view.digits) {
    view.digits = longest; // widths only grow: a column that jumps back and forth is hard to read
    view.table.style.setProperty('--digits', String(longest));
  }
  // Set only what changed: a new attribute value on the panel restyles everything inside it.
  setAttr(view.section, 'data-online', String(t.online));
  setText(view.presence, t.online ? 'online' : 'offline');
  setText(view.client, t.clientId);
  setAttr(view.client, 'title', `publisher ${t.clientId}, update #${t.seq ?? '?'}`);
  updateAge(view, t, now);
}

/** Rebuild the grid of one panel: only when its rows or timeframes changed, not on every update. */
function buildGrid(view, t) {
  const columns = [...t.tfs, SUM];
  const heading = (text, cls) => {
    const th = document.createElement('th');
    th.scope = 'col';
    th.textContent = text;
    if (cls) th.className = cls;
    return th;
  };
  view.head.replaceChildren(heading('Pair', 'pair'), ...t.tfs.map((tf) => heading(tf)), heading('Sum', 'sum'));
  const longestPair = Math.max(6, ...t.rows.map((row) => row.pair.length));
  if (longestPair > view.pairChars) {
    view.pairChars = longestPair; // like the numbers' width: grows, never jumps back
    view.table.style.setProperty('--pair-chars', String(longestPair));
  }
  view.rowEls = [];
  view.grid = [];
  const rows = t.rows.map((row) => {
    const tr = document.createElement('tr');
    tr.dataset.pair = row.pair;
    const name = document.createElement('th');
    name.scope = 'row';
    name.className = 'pair';
    name.textContent = row.pair;
    name.title = row.pair; // a long symbol name is cut with an ellipsis
    tr.append(name);
    view.grid.push(columns.map((tf) => {
      const td = document.createElement('td');
      td.dataset.tf = tf;
      tr.append(td);
      return { td, text: null, color: null };
    }));
    view.rowEls.push(tr);
    return tr;
  });
  view.body.replaceChildren(...rows);
  view.table.style.setProperty('--columns', String(columns.length));
}

// Each colour becomes one class, made on first use: a cell's colour is then a single class
// change, and cells of the same colour can share their computed style (inline styles cannot).
// The rules go into a constructed stylesheet, which the page's Content-Security-Policy allows.
const colorSheet = new CSSStyleSheet();
document.adoptedStyleSheets = [...document.adoptedStyleSheets, colorSheet];
const colorClasses = new Map(); // colour string from the wire -> class name (a cache)
const colorRules = new Set(); // the rgb-R-G-B classes that have a rule in colorSheet
const MAX_COLORS = 2000; // a publisher inventing colours cannot grow either of them forever

function colorClass(name) {
  let cls = colorClasses.get(name);
  if (cls !== undefined) return cls;
  const color = parseColor(name);
  if (color.kind === 'none') cls = '';
  else if (color.kind === 'unknown') cls = 'unknown-color';
  else {
    cls = `rgb-${color.rgb.join('-')}`;
    if (!colorRules.has(cls)) {
      if (colorRules.size >= MAX_COLORS) return 'unknown-color';
      colorRules.add(cls);
      const rgb = `rgb(${color.rgb.join(' ')})`;
      colorSheet.insertRule(`.grid td.${cls} { background: color-mix(in srgb, ${rgb} var(--tint), var(--panel)); }`);
    }
  }
  if (colorClasses.size < MAX_COLORS) colorClasses.set(name, cls);
  return cls;
}

function paintColor(td, name) {
  const cls = colorClass(name);
  td.className = highlighted.has(td) ? `${cls} changed` : cls;
  td.dataset.color = name;
  if (cls === 'unknown-color' || td.title) td.title = cls === 'unknown-color' ? `unknown colour ${name}` : '';
}

function setText(element, text) {
  const node = element.firstChild;
  if (node && node.nodeType === Node.TEXT_NODE && !node.nextSibling) {
    if (node.data !== text) node.data = text; // cheaper than replacing the text node
  } else {
    element.textContent = text;
  }
}

function setAttr(element, name, value) {
  if (element.getAttribute(name) !== value) element.setAttribute(name, value);
}

// A changed cell wears the `changed` class for a moment. A plain class, not a CSS animation:
// under a flood thousands of cells change at once, and animating each of them would cost a
// style recalculation per frame. One sweep takes the marks off again.
const highlighted = new Map(); // td -> when its mark comes off

function highlight(td, now) {
  if (!highlighted.has(td)) td.classList.add('changed');
  highlighted.set(td, now + HIGHLIGHT_MS);
}

function sweepHighlights() {
  const now = Date.now();
  for (const [td, until] of highlighted) {
    if (until <= now) {
      td.classList.remove('changed');
      highlighted.delete(td);
    }
  }
}

function updateAge(view, t, now) {
  const age = now - t.seenAt;
  setText(view.age, formatAge(age));
  setAttr(view.section, 'data-stale', String(age > staleMs));
}

// ---- filter, panel choice, settings -----------------------------------------------------------

/** A panel shows when chosen and when its key or one of its pairs matches the filter. */
function applyFilter(view) {
  const q = filterText.trim().toLowerCase();
  const keyMatches = q === '' || view.section.dataset.key.toLowerCase().includes(q);
  let anyRow = false;
  for (const tr of view.rowEls) { // the rows on the page, which may be older than the data
    const show = keyMatches || tr.dataset.pair.toLowerCase().includes(q);
    tr.hidden = !show;
    anyRow ||= show;
  }
  view.section.hidden = hiddenPanels.has(view.id) || !(keyMatches || anyRow);
}

function refilterAll() {
  for (const view of views.values()) applyFilter(view);
  updateHeader();
}

function buildPanelMenu(sorted) {
  const items = sorted.map((t) => {
    const label = document.createElement('label');
    const box = document.createElement('input');
    box.type = 'checkbox';
    box.checked = !hiddenPanels.has(t.id);
    box.addEventListener('change', () => {
      if (box.checked) hiddenPanels.delete(t.id);
      else hiddenPanels.add(t.id);
      save(STORE.hidden, JSON.stringify([...hiddenPanels]));
      const entry = { key: t.key, src: t.src };
      feed?.send({ type: box.checked ? 'subscribe' : 'unsubscribe', tables: [entry] });
      refilterAll();
    });
    label.append(box, `${t.key} · ${t.src}`); // a string argument becomes a text node
    return label;
  });
  $('panel-list').replaceChildren(...items);
}

function load(name) {
  try {
    return localStorage.getItem(name);
  } catch {
    return null; // storage disabled: settings just are not remembered
  }
}

function save(name, value) {
  try {
    localStorage.setItem(name, value);
  } catch {
    // as above
  }
}

function setupControls() {
  try {
    hiddenPanels = new Set(JSON.parse(load(STORE.hidden) ?? '[]'));
  } catch {
    hiddenPanels = new Set();
  }
  const filter = $('filter');
  filter.value = filterText = load(STORE.filter) ?? '';
  filter.addEventListener('input', () => {
    filterText = filter.value;
    save(STORE.filter, filterText);
    refilterAll();
  });
  const menu = $('panel-menu'); // a <details>: close it like any drop-down menu
  document.addEventListener('click', (event) => {
    if (menu.open && !menu.contains(event.target)) menu.open = false;
  });
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') menu.open = false;
  });
  $('show-all').addEventListener('click', () => {
    const shown = [...hiddenPanels].map((id) => menuEntry(id)).filter(Boolean);
    hiddenPanels.clear();
    save(STORE.hidden, '[]');
    if (shown.length) feed?.send({ type: 'subscribe', tables: shown });
    buildPanelMenu(menuTables());
    refilterAll();
  });
  // ?stale=N in the URL wins (handy for a wall screen, and for tests); the box is remembered.
  const fromUrl = Number(new URLSearchParams(location.search).get('stale'));
  const stored = Number(load(STORE.stale));
  const seconds = fromUrl > 0 ? fromUrl : stored > 0 ? stored : DEFAULT_STALE_S;
  staleMs = seconds * 1000;
  const box = $('stale');
  box.value = String(seconds);
  box.addEventListener('change', () => {
    const value = Number(box.value);
    if (!(value > 0)) return;
    staleMs = value * 1000;
    save(STORE.stale, String(value));
    tick();
  });
}

// ---- header and the clock -----------------------------------------------------------------------

function updateHeader() {
  const total = tables.size;
  const shown = [...views.values()].filter((v) => !v.section.hidden).length;
  setText($('table-count'), String(total));
  const empty = $('empty');
  if (empty.hidden !== shown > 0) empty.hidden = shown > 0;
  setText(empty, total === 0
    ? 'Waiting for the first table… Publishers send them to /ws/dll.'
    : 'No panel matches the filter, or all are hidden (see Panels).');
}

function showConnection() {
  setAttr($('conn'), 'data-state', conn.state);
  setAttr(document.body, 'data-feed', conn.state); // dims the panels while not live
  let text = conn.state === 'live' ? 'live' : 'connecting…';
  if (conn.state === 'reconnecting') {
    text = `reconnecting in ${Math.max(1, Math.ceil((conn.retryAt - Date.now()) / 1000))} s`;
  }
  setText($('conn-text'), text);
}

/** Twice a second: ages, stale marks, the reconnect countdown, updates/s. Cheap, never a re-render. */
function tick() {
  const now = Date.now();
  for (const [id, view] of views) {
    const t = tables.get(id); // missing between a snapshot and the next frame
    if (t) updateAge(view, t, now);
  }
  if (now - rate.since >= 1000) {
    const perSecond = (rate.updates * 1000) / (now - rate.since);
    setText($('rate'), perSecond >= 10 ? perSecond.toFixed(0) : perSecond.toFixed(1));
    rate = { since: now, updates: 0 };
  }
  showConnection();
}

// ---- start ----------------------------------------------------------------------------------------

setupControls();
setInterval(tick, 500);
setInterval(sweepHighlights, 200);
feed = startFeed({
  url: viewerUrl(),
  onMessage,
  onPing: () => {
    stats.pings += 1;
  },
  onState: (state) => {
    conn = state;
    showConnection();
  },
});
// For tests and for curious people in the console: read-only use, please.
window.mt5hub = { stats, tables };
