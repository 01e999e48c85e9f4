// The viewer side of protocol v1 (docs/protocol.md): one WebSocket to the hub's /ws, kept open.
//
// It answers the hub's application pings, reconnects with capped exponential backoff and jitter,
// and drops a connection that went silent (a dead network often gives no close event for minutes).
// Everything else it receives goes to onMessage; what that does with it is dashboard.js's business.

const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 30_000;
const STABLE_MS = 10_000; // a connection that lived this long starts the backoff again from the base
const CONNECT_TIMEOUT_MS = 15_000;
// The hub pings a viewer every ping_interval (10 s by default) and drops it after viewer_timeout
// (30 s), so a healthy connection is never silent for long. The limit grows with the gaps seen
// between pings, in case a hub is configured with a longer interval.
const MIN_SILENCE_MS = 45_000;

/**
 * The /ws URL next to this page: ws:// for an http page, wss:// for https. The page's ?token=,
 * ?keys= and ?src= are passed on (a bookmark of `/?keys=EA1,EA2` opens one strategy's screen),
 * and it asks for patches (protocol v1.1 deltas: only what changed).
 */
export function viewerUrl(pageHref = location.href) {
  const page = new URL(pageHref);
  const url = new URL('ws', page); // relative: works behind a proxy that adds a path prefix
  url.protocol = page.protocol === 'https:' ? 'wss:' : 'ws:';
  url.search = '';
  url.hash = '';
  for (const name of ['token', 'keys', 'src']) {
    const value = page.searchParams.get(name);
    if (value) url.searchParams.set(name, value);
  }
  url.searchParams.set('delta', '1');
  return url.href;
}

/**
 * Connect and stay connected.
 * @param {{url: string, onMessage: (msg: object) => void, onPing?: () => void,
 *          onState: (s: {state: 'connecting'|'live'|'reconnecting', retryAt?: number}) => void}} opts
 * @returns {{send: (msg: object) => boolean, restart: () => void}} send a message on the live
 *          connection (false if there is none), or drop it and connect again at once
 */
export function startFeed({ url, onMessage, onState, onPing = () => {} }) {
  let socket = null;
  let attempt = 0; // failures since the last stable connection: the backoff exponent
  let startedAt = 0;
  let openedAt = 0;
  let lastFrameAt = 0;
  let lastPingAt = 0;
  let longestPingGap = 0;
  let retryTimer = null;

  function connect() {
    retryTimer = null;
    onState({ state: 'connecting' });
    const ws = new WebSocket(url);
    socket = ws;
    startedAt = Date.now();
    ws.onopen = () => {
      openedAt = lastFrameAt = Date.now();
      lastPingAt = 0;
    };
    ws.onmessage = (event) => {
      lastFrameAt = Date.now();
      receive(ws, event.data);
    };
    ws.onclose = () => lost(ws); // an error event is always followed by close
  }

  function receive(ws, text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return; // not JSON: not for us
    }
    if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) return;
    if (msg.type === 'ping') {
      notePing();
      ws.send('{"type":"pong"}'); // without it the hub drops us after viewer_timeout
      onPing();
      return;
    }
    onMessage(msg);
    if (msg.type === 'snapshot') onState({ state: 'live' }); // the picture is complete from here on
  }

  function notePing() {
    const now = Date.now();
    if (lastPingAt) longestPingGap = Math.max(longestPingGap, now - lastPingAt);
    lastPingAt = now;
  }

  // Forget this socket and schedule the next attempt. Safe to call twice for the same socket.
  function lost(ws) {
    if (ws !== socket) return;
    ws.onopen = ws.onmessage = ws.onclose = null;
    socket = null;
    if (openedAt && Date.now() - openedAt >= STABLE_MS) attempt = 0;
    openedAt = 0;
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
    attempt += 1;
    // "Equal jitter": somewhere in the upper half, so that after a hub restart the viewers
    // do not all come back in the same millisecond, and none comes back at once in a loop.
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    retryTimer = setTimeout(connect, delay);
    onState({ state: 'reconnecting', retryAt: Date.now() + delay });
  }

  function watchdog() {
    const ws = socket;
    if (!ws) return;
    const now = Date.now();
    const silent = ws.readyState === WebSocket.OPEN
      && now - lastFrameAt > Math.max(MIN_SILENCE_MS, 3 * longestPingGap);
    const stuck = ws.readyState === WebSocket.CONNECTING && now - startedAt > CONNECT_TIMEOUT_MS;
    if (silent || stuck) {
      lost(ws); // first, so that the close below (which may never complete) cannot matter
      ws.close();
    }
  }

  // Back online (laptop woke up, Wi-Fi returned) or back in front of the user (timers of hidden
  // tabs are throttled hard): do not sit out the rest of a long backoff.
  const retryNow = () => {
    if (retryTimer !== null && document.visibilityState === 'visible') {
      clearTimeout(retryTimer);
      connect();
    }
  };
  window.addEventListener('online', retryNow);
  document.addEventListener('visibilitychange', retryNow);
  setInterval(watchdog, 5_000);
  connect();

  return {
    send(msg) {
      if (!socket || socket.readyState !== WebSocket.OPEN) return false;
      socket.send(JSON.stringify(msg));
      return true;
    },
    restart() {
      const ws = socket;
      if (!ws) return;
      lost(ws);
      ws.close();
      clearTimeout(retryTimer);
      attempt = 0;
      connect(); // the snapshot makes the page whole again
    },
  };
}
