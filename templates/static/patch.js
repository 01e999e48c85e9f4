// Protocol v1.1 deltas (docs/protocol.md, "Protocol v1.1: deltas"): a patch frame's body turns the
// table's previous update into the next. This is mt5hub.delta.apply for the browser; keep the two
// in step (tests/test_delta_browser.py checks this one against bodies the Python side makes).
//
// Objects are built with Object.fromEntries and names kept in Maps, never `obj[name] = value`: a
// pair, timeframe or field may be named `__proto__`, and an assignment would set the prototype.

const hasOwn = (obj, name) => Object.prototype.hasOwnProperty.call(obj, name);

/** A copy of `obj` without `patch.unset`'s names, with `patch.set`'s fields put in. */
function setFields(obj, patch) {
  const unset = new Set(patch.unset ?? []);
  const set = patch.set ?? {};
  const entries = Object.entries(obj)
    .filter(([name]) => !unset.has(name))
    .map(([name, value]) => (hasOwn(set, name) ? [name, set[name]] : [name, value]));
  const held = new Set(entries.map(([name]) => name));
  for (const [name, value] of Object.entries(set)) {
    if (!held.has(name)) entries.push([name, value]);
  }
  return Object.fromEntries(entries);
}

/** The items in `patch.order`, or else in the old order without the removed ones. */
function reorder(byName, oldNames, patch) {
  let order = patch.order;
  if (order === undefined) {
    const removed = new Set(patch.removed ?? []);
    order = oldNames.filter((name) => !removed.has(name));
  }
  return order.map((name) => byName.get(name));
}

/** A cell's timeframe: its one name besides `cell_color`. */
const timeframe = (cell) => Object.keys(cell).find((name) => name !== 'cell_color');

function applyRow(row, patch) {
  const result = setFields(row, patch);
  if (['cells', 'removed', 'order'].some((name) => hasOwn(patch, name))) {
    const names = row.TF_data.map(timeframe);
    const byTf = new Map(names.map((name, i) => [name, row.TF_data[i]]));
    for (const [name, change] of Object.entries(patch.cells ?? {})) {
      // [value, colour] for a new cell or a new colour; a value alone keeps the cell's colour
      const [value, colour] = Array.isArray(change) ? change : [change, byTf.get(name).cell_color];
      byTf.set(name, Object.fromEntries([[name, value], ['cell_color', colour]]));
    }
    result.TF_data = reorder(byTf, names, patch);
  }
  return result;
}

/**
 * The document a patch body turns `doc` (the table's update at the patch's `base`) into.
 * `type`, `seq`, `ts` and `online` stay doc's: take `seq` and `ts` from the patch's header.
 * `doc` is not changed; what did not change is shared with it, so treat documents as read-only.
 * @param {object} doc
 * @param {object} body
 * @returns {object}
 */
export function applyPatch(doc, body) {
  const result = setFields(doc, body);
  if (['rows', 'added', 'removed', 'order'].some((name) => hasOwn(body, name))) {
    const pairs = doc.data.map((row) => row.pair);
    const byPair = new Map(pairs.map((pair, i) => [pair, doc.data[i]]));
    for (const [pair, rowPatch] of Object.entries(body.rows ?? {})) {
      byPair.set(pair, applyRow(byPair.get(pair), rowPatch));
    }
    for (const row of body.added ?? []) byPair.set(row.pair, row);
    result.data = reorder(byPair, pairs, body);
  }
  return result;
}
