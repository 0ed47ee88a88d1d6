// Unit tests of web/chatgate.js (Node's test runner, no browser): reconnect and backoff,
// re-subscribe with lastSeq, dedupe, gap repair, replayTruncated, the send queue, close codes,
// and idempotent sends (a key per prompt, kept until answered, resent with the same key).
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { ChatgateClient, CloseCode, State, newClientRequestId } from '../../../web/chatgate.js';

/** A sessionStorage stand-in. */
class FakeStorage {
  constructor() {
    this.items = new Map();
  }
  getItem(key) {
    return this.items.has(key) ? this.items.get(key) : null;
  }
  setItem(key, value) {
    this.items.set(key, String(value));
  }
  removeItem(key) {
    this.items.delete(key);
  }
}

/** A WebSocket stand-in: records what the client sends; the test plays the server. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.all.push(this);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code, reason) {
    this.closedWith = { code, reason };
  }
  // server side
  accept(nodeId = 'node-a') {
    this.onopen?.();
    this.push({ kind: 'connected', nodeId, timestamp: new Date().toISOString() });
  }
  push(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  drop(code = 1006, reason = '') {
    this.onclose?.({ code, reason });
  }
  ofType(type) {
    return this.sent.filter((f) => f.type === type);
  }
}

/** Manual timers: nothing fires until `advance`. */
class Timers {
  constructor() {
    this.now = 0;
    this.pending = [];
    this.scheduled = [];
    this.nextId = 1;
  }
  setTimeout = (fn, ms) => {
    const id = this.nextId++;
    this.pending.push({ id, at: this.now + ms, fn });
    this.scheduled.push(ms);
    return id;
  };
  clearTimeout = (id) => {
    this.pending = this.pending.filter((t) => t.id !== id);
  };
  async advance(ms) {
    const until = this.now + ms;
    for (;;) {
      await settle();
      this.pending.sort((a, b) => a.at - b.at);
      const next = this.pending[0];
      if (!next || next.at > until) break;
      this.pending.shift();
      this.now = next.at;
      next.fn();
    }
    this.now = until;
    await settle();
  }
}

/** Lets pending promise callbacks run. */
async function settle() {
  for (let i = 0; i < 5; i += 1) await new Promise((resolve) => setImmediate(resolve));
}

function event(sessionId, seq, kind = 'stream_delta', extra = {}) {
  return { id: `e${seq}`, kind, sessionId, provider: 'script', runId: 'r1', timestamp: 't', seq, content: `c${seq}`, ...extra };
}

function ack(sessionId, lastSeq, extra = {}) {
  return {
    kind: 'chat_subscribed',
    sessionId,
    isProcessing: false,
    lastSeq,
    runId: null,
    pendingPermissions: [],
    replayTruncated: false,
    ...extra,
  };
}

/** A client wired to fakes; `history` maps session id → messages served over REST. */
function setup(options = {}) {
  FakeSocket.all = [];
  const timers = new Timers();
  const history = options.history ?? {};
  const fetches = [];
  const fetch = async (url, init) => {
    fetches.push({ url, init });
    if (options.fetchFails) return { ok: false, status: 503, json: async () => ({ success: false, error: { code: 'X', message: 'down' } }) };
    const id = decodeURIComponent(url.match(/sessions\/([^/]+)\/messages/)?.[1] ?? '');
    const messages = history[id] ?? [];
    const data = { messages, total: messages.length };
    if (options.historyLastSeq) data.lastSeq = options.historyLastSeq[id];
    return { ok: true, status: 200, json: async () => ({ success: true, data }) };
  };
  const client = new ChatgateClient({
    token: options.token ?? 'tok',
    url: 'ws://gw/ws',
    baseUrl: 'http://gw',
    WebSocket: FakeSocket,
    fetch,
    random: options.random ?? (() => 0),
    now: () => timers.now,
    setTimeout: timers.setTimeout,
    clearTimeout: timers.clearTimeout,
    backoff: { initialMs: 100, maxMs: 1000, factor: 2, jitter: 0.5, stableMs: 5000, ...(options.backoff ?? {}) },
    maxQueued: options.maxQueued,
    storage: options.storage ?? new FakeStorage(),
  });
  const seen = { events: [], history: [], errors: [], closes: [], states: [], expired: [] };
  client.on('event', (e) => seen.events.push(e));
  client.on('history', (h) => seen.history.push(h));
  client.on('error', (e) => seen.errors.push(e));
  client.on('close', (c) => seen.closes.push(c));
  client.on('state', (s) => seen.states.push(s.state));
  client.on('tokenexpired', (t) => seen.expired.push(t));
  const socket = () => FakeSocket.all.at(-1);
  return { client, timers, fetches, seen, socket, history };
}

const seqsOf = (events, id) => events.filter((e) => e.sessionId === id).map((e) => e.event.seq);

test('connects with the token and reports the serving node id', async () => {
  const { client, socket, seen } = setup({ token: 'a b' });
  client.connect();
  await settle();
  assert.equal(socket().url, 'ws://gw/ws?token=a%20b&hello=1');
  socket().accept('local-2');
  assert.equal(client.nodeId, 'local-2');
  assert.equal(client.state, State.OPEN);
  assert.deepEqual(seen.states.slice(0, 2), [State.CONNECTING, State.OPEN]);
});

test('reconnects with exponential backoff, capped, and jitter inside its bounds', async () => {
  const { client, timers, socket } = setup();
  client.connect();
  await settle();
  for (let i = 0; i < 6; i += 1) {
    socket().drop(1006);
    await timers.advance(2000);
  }
  assert.deepEqual(timers.scheduled, [100, 200, 400, 800, 1000, 1000]);
  assert.equal(FakeSocket.all.length, 7);

  // With jitter 0.5 the delay lies in [base/2, base]; random() = 0.999 draws near the bottom.
  const jittered = setup({ random: () => 0.999 });
  jittered.client.connect();
  await settle();
  for (let i = 0; i < 4; i += 1) {
    jittered.socket().drop(1006);
    await jittered.timers.advance(2000);
  }
  const bases = [100, 200, 400, 800];
  jittered.timers.scheduled.forEach((ms, i) => {
    assert.ok(ms >= bases[i] / 2 && ms < bases[i], `delay ${ms} outside [${bases[i] / 2}, ${bases[i]})`);
  });
});

test('a connection that stayed up resets the backoff; a flapping one does not', async () => {
  const { client, timers, socket } = setup();
  client.connect();
  await settle();
  socket().drop(1006);
  await timers.advance(100);
  socket().drop(1006);
  await timers.advance(200);
  socket().accept();
  socket().drop(1006); // opened, but closed at once: still backing off
  await timers.advance(400);
  socket().accept();
  await timers.advance(6000);
  socket().drop(1006); // had been open 6 s: starts over
  await timers.advance(100);
  assert.deepEqual(timers.scheduled, [100, 200, 400, 100]);
});

test('re-subscribes every open session with its lastSeq after a reconnect', async () => {
  const { client, timers, socket, seen } = setup();
  client.connect();
  await settle();
  socket().accept();
  client.subscribe('s1', { lastSeq: 0 });
  client.subscribe('s2', { lastSeq: 7 });
  socket().push(ack('s1', 0, { isProcessing: true }));
  socket().push(ack('s2', 7, { isProcessing: true }));
  for (const seq of [1, 2, 3]) socket().push(event('s1', seq));
  socket().push(event('s2', 8));
  socket().drop(1006);
  await timers.advance(100);
  const fresh = socket();
  fresh.accept('node-b');
  const subscribe = fresh.ofType('chat.subscribe');
  assert.equal(subscribe.length, 1);
  assert.deepEqual(subscribe[0].sessions, [
    { sessionId: 's1', lastSeq: 3 },
    { sessionId: 's2', lastSeq: 8 },
  ]);
  assert.equal(client.nodeId, 'node-b');
  // The replay continues exactly after lastSeq.
  fresh.push(ack('s1', 5, { isProcessing: true }));
  fresh.push(event('s1', 4));
  fresh.push(event('s1', 5));
  assert.deepEqual(seqsOf(seen.events, 's1'), [1, 2, 3, 4, 5]);
  assert.deepEqual(seqsOf(seen.events, 's2'), [8]);
});

test('delivers each seq once and in order: duplicates are dropped', async () => {
  const { client, socket, seen } = setup();
  client.connect();
  await settle();
  socket().accept();
  client.subscribe('s', { lastSeq: 0 });
  socket().push(ack('s', 0, { isProcessing: true }));
  for (const seq of [1, 2, 2, 3, 1, 3, 4]) socket().push(event('s', seq));
  assert.deepEqual(seqsOf(seen.events, 's'), [1, 2, 3, 4]);
  // A duplicate is no gap: nothing was resubscribed.
  assert.equal(socket().ofType('chat.subscribe').length, 1);
  assert.equal(client.lastSeq('s'), 4);
});

test('a gap on the live path resubscribes from the last delivered seq', async () => {
  const { client, socket, seen } = setup();
  client.connect();
  await settle();
  socket().accept();
  client.subscribe('s', { lastSeq: 0 });
  socket().push(ack('s', 0, { isProcessing: true }));
  socket().push(event('s', 1));
  socket().push(event('s', 2));
  socket().push(event('s', 5)); // 3 and 4 lost
  socket().push(event('s', 6)); // the old subscription's tail: ignored until the new ack
  const subs = socket().ofType('chat.subscribe');
  assert.equal(subs.length, 2, 'one resubscribe for the gap, none for the tail');
  assert.deepEqual(subs.at(-1).sessions, [{ sessionId: 's', lastSeq: 2 }]);
  socket().push(ack('s', 6, { isProcessing: true }));
  for (const seq of [3, 4, 5, 6, 7]) socket().push(event('s', seq));
  assert.deepEqual(seqsOf(seen.events, 's'), [1, 2, 3, 4, 5, 6, 7]);
});

test('repeated gaps without progress fall back to a history reload', async () => {
  const history = { s: [{ kind: 'text', role: 'user', content: 'hi', seq: null }, { kind: 'text', seq: 9 }] };
  const { client, socket, seen, timers, fetches } = setup({ history });
  client.connect();
  await settle();
  socket().accept();
  client.subscribe('s', { lastSeq: 1 });
  socket().push(ack('s', 1, { isProcessing: true }));
  // The server keeps skipping seq 2..9 (its acks claim nothing past 1): two resubscribes, then
  // the history.
  for (let i = 0; i < 3; i += 1) {
    socket().push(event('s', 10));
    assert.equal(fetches.length, 0);
    if (i < 2) {
      assert.deepEqual(socket().ofType('chat.subscribe').at(-1).sessions, [{ sessionId: 's', lastSeq: 1 }]);
      socket().push(ack('s', 1, { isProcessing: true }));
    }
  }
  assert.equal(socket().ofType('chat.subscribe').length, 3);
  await timers.advance(5000);
  assert.equal(fetches.length, 1);
  assert.equal(seen.history.length, 1);
  assert.equal(seen.history[0].lastSeq, 9);
  assert.deepEqual(socket().ofType('chat.subscribe').at(-1).sessions, [{ sessionId: 's', lastSeq: 9 }]);
  socket().push(ack('s', 10, { isProcessing: true }));
  socket().push(event('s', 10));
  assert.deepEqual(seqsOf(seen.events, 's'), [10]);
});

test('replayTruncated reloads the history over REST, then continues after its last seq', async () => {
  const history = {
    s: [
      { kind: 'text', role: 'user', content: 'go', seq: null },
      { kind: 'text', role: 'assistant', content: 'merged', seq: 40 },
      { kind: 'complete', seq: 41 },
      { kind: 'text', role: 'user', content: 'again', seq: null },
      { kind: 'stream_end', seq: 60 },
    ],
  };
  const { client, socket, seen, timers, fetches } = setup({ history });
  client.connect();
  await settle();
  socket().accept();
  client.subscribe('s', { lastSeq: 3 });
  socket().push(ack('s', 70, { isProcessing: true, replayTruncated: true }));
  socket().push(event('s', 55)); // what was left of the window: not delivered, history covers it
  await timers.advance(1000);
  assert.equal(fetches.length, 1);
  assert.match(fetches[0].url, /^http:\/\/gw\/api\/providers\/sessions\/s\/messages\?kinds=all$/);
  assert.equal(fetches[0].init.headers.authorization, 'Bearer tok');
  assert.equal(seen.history.length, 1);
  assert.equal(seen.history[0].messages.length, 5);
  assert.equal(seen.history[0].reason, 'truncated');
  assert.deepEqual(socket().ofType('chat.subscribe').at(-1).sessions, [{ sessionId: 's', lastSeq: 60 }]);
  socket().push(ack('s', 70, { isProcessing: true }));
  for (let seq = 61; seq <= 70; seq += 1) socket().push(event('s', seq));
  assert.deepEqual(seqsOf(seen.events, 's'), [61, 62, 63, 64, 65, 66, 67, 68, 69, 70]);
});

test('a history page whose lastSeq is past its rows resumes from lastSeq', async () => {
  // Upstream's plain history lists the conversation only: the run's complete (seq 9) is not a row.
  const history = { s: [{ kind: 'text', role: 'user', content: 'x', seq: null }, { kind: 'text', seq: 7 }] };
  const { client, socket, seen, timers } = setup({ history, historyLastSeq: { s: 9 } });
  client.connect();
  await settle();
  socket().accept();
  client.subscribe('s');
  await timers.advance(10);
  assert.equal(seen.history[0].lastSeq, 9);
  assert.deepEqual(socket().ofType('chat.subscribe').at(-1).sessions, [{ sessionId: 's', lastSeq: 9 }]);
  // The idle ack at the same seq is no missed run: no second reload.
  socket().push(ack('s', 9, { isProcessing: false }));
  await timers.advance(10);
  assert.equal(seen.history.length, 1);
});

test('subscribe without lastSeq loads history first, then subscribes from it', async () => {
  const history = { s: [{ kind: 'text', role: 'user', content: 'x', seq: null }, { kind: 'complete', seq: 12 }] };
  const { client, socket, seen, timers } = setup({ history });
  client.connect();
  await settle();
  socket().accept();
  client.subscribe('s');
  await timers.advance(10);
  assert.equal(seen.history.length, 1);
  assert.equal(seen.history[0].reason, 'initial');
  assert.deepEqual(socket().ofType('chat.subscribe').at(-1).sessions, [{ sessionId: 's', lastSeq: 12 }]);
});

test('an idle ack past our lastSeq (runs finished while away) reloads history', async () => {
  const history = { s: [{ kind: 'complete', seq: 20 }] };
  const { client, socket, seen, timers } = setup({ history });
  client.connect();
  await settle();
  socket().accept();
  client.subscribe('s', { lastSeq: 5 });
  socket().push(ack('s', 20, { isProcessing: false }));
  await timers.advance(1000);
  assert.equal(seen.history.length, 1);
  assert.equal(seen.history[0].reason, 'missed');
  socket().push(ack('s', 20));
  assert.equal(client.lastSeq('s'), 20);
});

test('a replay that starts past lastSeq + 1 (an earlier run missed) reloads history', async () => {
  const history = { s: [{ kind: 'complete', seq: 30 }] };
  const { client, socket, seen, timers } = setup({ history });
  client.connect();
  await settle();
  socket().accept();
  client.subscribe('s', { lastSeq: 5 });
  socket().push(ack('s', 33, { isProcessing: true }));
  socket().push(event('s', 31)); // first event of the current run
  await timers.advance(1000);
  assert.equal(seen.history.length, 1);
  assert.deepEqual(socket().ofType('chat.subscribe').at(-1).sessions, [{ sessionId: 's', lastSeq: 30 }]);
  socket().push(ack('s', 33, { isProcessing: true }));
  for (const seq of [31, 32, 33]) socket().push(event('s', seq));
  assert.deepEqual(seqsOf(seen.events, 's'), [31, 32, 33]);
});

test('a failing history reload is reported and the client still subscribes', async () => {
  const { client, socket, seen, timers } = setup({ fetchFails: true });
  client.connect();
  await settle();
  socket().accept();
  client.subscribe('s', { lastSeq: 2 });
  socket().push(ack('s', 9, { isProcessing: true, replayTruncated: true }));
  await timers.advance(1000);
  assert.equal(seen.errors.at(-1).code, 'HISTORY_FAILED');
  socket().push(ack('s', 9, { isProcessing: true, replayTruncated: true }));
  socket().push(event('s', 8));
  socket().push(event('s', 9));
  assert.deepEqual(seqsOf(seen.events, 's'), [8, 9]);
});

test('chat.send while disconnected is queued and sent after the re-subscribe is acknowledged', async () => {
  const { client, timers, socket } = setup();
  const flushed = [];
  client.on('sent', ({ sessionId, frame }) => flushed.push(`${sessionId}:${frame.type}`));
  client.connect();
  await settle();
  socket().accept();
  client.subscribe('s', { lastSeq: 4 });
  socket().push(ack('s', 4));
  socket().drop(1006);
  assert.equal(client.send('s', 'first'), 'queued');
  assert.equal(client.abort('s'), 'queued');
  assert.equal(client.queued(), 2);
  await timers.advance(100);
  const fresh = socket();
  fresh.accept();
  assert.deepEqual(
    fresh.sent.map((f) => f.type),
    ['chat.subscribe'],
    'nothing but the subscribe before its ack',
  );
  fresh.push(ack('s', 4));
  assert.deepEqual(
    fresh.sent.map((f) => f.type),
    ['chat.subscribe', 'chat.send', 'chat.abort'],
  );
  assert.equal(fresh.sent[1].content, 'first');
  assert.equal(client.queued(), 0);
  assert.deepEqual(flushed, ['s:chat.send', 's:chat.abort'], 'the application is told');
  // Connected and acknowledged: sent at once.
  assert.equal(client.send('s', 'second'), 'sent');
});

test('the send queue is bounded', async () => {
  const { client, seen } = setup({ maxQueued: 2 });
  client.subscribe('s', { lastSeq: 0 });
  client.send('s', 'a');
  client.send('s', 'b');
  assert.throws(() => client.send('s', 'c'), /queue full/);
  assert.equal(seen.errors.at(-1).code, 'QUEUE_FULL');
  assert.equal(client.queued(), 2);
});

test('4401 calls the token function for a fresh token and reconnects with it', async () => {
  const reasons = [];
  let n = 0;
  const token = ({ reason }) => {
    reasons.push(reason);
    n += 1;
    return `t${n}`;
  };
  const { client, timers, socket, seen } = setup({ token });
  client.connect();
  await settle();
  socket().accept();
  socket().drop(CloseCode.TOKEN_EXPIRED, 'token expired');
  assert.equal(seen.expired.length, 1);
  assert.equal(seen.expired[0].willReconnect, true);
  assert.equal(seen.closes.at(-1).code, 4401);
  await timers.advance(100);
  assert.deepEqual(reasons, ['connect', 'expired']);
  assert.equal(socket().url, 'ws://gw/ws?token=t2&hello=1');
});

test('4401 with a fixed token stops until setToken', async () => {
  const { client, timers, socket, seen } = setup({ token: 'old' });
  client.connect();
  await settle();
  socket().accept();
  socket().drop(CloseCode.TOKEN_EXPIRED);
  await timers.advance(60000);
  assert.equal(FakeSocket.all.length, 1);
  assert.equal(client.state, State.CLOSED);
  assert.equal(seen.expired[0].willReconnect, false);
  client.setToken('new');
  await settle();
  assert.equal(FakeSocket.all.length, 2);
  assert.equal(socket().url, 'ws://gw/ws?token=new&hello=1');
});

test('1008 (Origin refused) does not reconnect; 1012 and 4008 reconnect promptly', async () => {
  const refused = setup();
  refused.client.connect();
  await settle();
  refused.socket().accept();
  refused.socket().drop(CloseCode.POLICY);
  await refused.timers.advance(60000);
  assert.equal(FakeSocket.all.length, 1);
  assert.equal(refused.seen.closes[0].willReconnect, false);

  for (const code of [CloseCode.DRAINING, CloseCode.SLOW_CONSUMER]) {
    const { client, timers, socket, seen } = setup();
    client.connect();
    await settle();
    // Some failed attempts first: the server's request to reconnect still starts over.
    socket().drop(1006);
    await timers.advance(100);
    socket().drop(1006);
    await timers.advance(200);
    socket().accept('a');
    socket().drop(code);
    assert.equal(seen.closes.at(-1).code, code);
    assert.equal(seen.closes.at(-1).willReconnect, true);
    assert.ok(seen.closes.at(-1).delayMs <= 100, `reconnect delay ${seen.closes.at(-1).delayMs}`);
    assert.equal(client.nodeId, null);
    await timers.advance(100);
    socket().accept('b');
    assert.equal(client.nodeId, 'b');
  }
});

test('close() stops for good', async () => {
  const { client, timers, socket } = setup();
  client.connect();
  await settle();
  socket().accept();
  client.close();
  assert.equal(socket().closedWith.code, 1000);
  socket().drop(1000);
  await timers.advance(60000);
  assert.equal(FakeSocket.all.length, 1);
  assert.equal(client.state, State.CLOSED);
});

test('protocol errors and session notices are surfaced', async () => {
  const { client, socket, seen } = setup();
  const sessions = [];
  client.on('session', (s) => sessions.push(s.frame.sessionId));
  client.connect();
  await settle();
  socket().accept();
  socket().push({ kind: 'protocol_error', code: 'RUN_IN_PROGRESS', error: 'busy', sessionId: 's' });
  socket().push({ kind: 'session_upserted', sessionId: 'n', provider: 'script', session: {} });
  assert.deepEqual(seen.errors.at(-1), { code: 'RUN_IN_PROGRESS', error: 'busy', sessionId: 's' });
  assert.deepEqual(sessions, ['n']);
});

test('a listener that closes the client on tokenexpired or close stops every reconnect', async () => {
  for (const type of ['tokenexpired', 'close']) {
    const { client, timers, socket } = setup({ token: () => 'fresh' });
    client.on(type, () => client.close());
    client.connect();
    await settle();
    socket().accept();
    socket().drop(CloseCode.TOKEN_EXPIRED);
    await timers.advance(60000);
    assert.equal(FakeSocket.all.length, 1, type);
    assert.equal(client.state, State.CLOSED, type);
    assert.equal(timers.pending.length, 0, type);
  }
});

test('after giving up on a truncated replay, the run\'s complete reloads the whole history', async () => {
  const history = { s: [{ kind: 'text', role: 'user', content: 'go', seq: null }] };
  const { client, socket, seen, timers, fetches } = setup({ history });
  client.connect();
  await settle();
  socket().accept();
  client.subscribe('s');
  await timers.advance(10);
  // The window lost the run's start: every reload still ends truncated (the stream is not in
  // the history before its stream_end).
  for (let i = 0; i < 3; i += 1) {
    socket().push(ack('s', 500, { isProcessing: true, replayTruncated: true }));
    await timers.advance(5000);
  }
  assert.equal(fetches.length, 4);
  socket().push(ack('s', 500, { isProcessing: true, replayTruncated: true }));
  for (let seq = 200; seq <= 202; seq += 1) socket().push(event('s', seq));
  assert.deepEqual(seqsOf(seen.events, 's'), [200, 201, 202], 'what the window had, once the client gave up');
  assert.equal(fetches.length, 4);
  history.s.push({ kind: 'text', role: 'assistant', content: 'all of it', seq: 203 }, { kind: 'complete', seq: 204 });
  socket().push(event('s', 203, 'stream_end'));
  socket().push(event('s', 204, 'complete'));
  await timers.advance(10);
  assert.equal(fetches.length, 5);
  assert.equal(seen.history.at(-1).reason, 'completed');
  assert.equal(seen.history.at(-1).lastSeq, 204);
  assert.deepEqual(socket().ofType('chat.subscribe').at(-1).sessions, [{ sessionId: 's', lastSeq: 204 }]);
  // A complete after an ordinary, whole replay reloads nothing.
  socket().push(ack('s', 204));
  for (const seq of [205, 206]) socket().push(event('s', seq, seq === 206 ? 'complete' : 'stream_delta'));
  await timers.advance(10);
  assert.equal(fetches.length, 5);
});

// ---- idempotent sends (clientRequestId) ---------------------------------------------------------

const KEY = /^[A-Za-z0-9._:-]{1,128}$/;
const PENDING = 'chatgate.pendingSends ws://gw/ws';
const stored = (storage) => JSON.parse(storage.getItem(PENDING) ?? '[]');

function accepted(sessionId, clientRequestId, extra = {}) {
  return {
    id: `chat_accepted_${clientRequestId}`,
    kind: 'chat_accepted',
    sessionId,
    clientRequestId,
    runId: 'r1',
    firstSeq: 5,
    duplicate: false,
    isProcessing: true,
    timestamp: 't',
    ...extra,
  };
}

/** A connected client following `s` (acknowledged at lastSeq 4), with its storage. */
async function connected(options = {}) {
  const storage = options.storage ?? new FakeStorage();
  const env = setup({ ...options, storage });
  const accepts = [];
  const sent = [];
  env.client.on('accepted', (a) => accepts.push(a));
  env.client.on('sent', (e) => sent.push(e));
  env.client.connect();
  await settle();
  env.socket().accept();
  env.client.subscribe('s', { lastSeq: 4 });
  env.socket().push(ack('s', 4));
  return { ...env, storage, accepts, sent };
}

test('every prompt carries its own key, kept in storage until the gateway answers it', async () => {
  const { client, socket, storage, accepts } = await connected();
  assert.equal(client.send('s', 'one', { model: 'm' }), 'sent');
  assert.equal(client.send('s', 'two'), 'sent');
  const [first, second] = socket().ofType('chat.send');
  assert.match(first.clientRequestId, KEY);
  assert.match(second.clientRequestId, KEY);
  assert.notEqual(first.clientRequestId, second.clientRequestId);
  assert.deepEqual(first, { type: 'chat.send', sessionId: 's', content: 'one', options: { model: 'm' }, clientRequestId: first.clientRequestId });
  assert.deepEqual(stored(storage), [
    { sessionId: 's', content: 'one', options: { model: 'm' }, clientRequestId: first.clientRequestId },
    { sessionId: 's', content: 'two', clientRequestId: second.clientRequestId },
  ]);
  socket().push(accepted('s', first.clientRequestId));
  assert.deepEqual(accepts, [
    { sessionId: 's', clientRequestId: first.clientRequestId, runId: 'r1', firstSeq: 5, duplicate: false, isProcessing: true, content: 'one' },
  ]);
  assert.deepEqual(client.pendingSends().map((p) => p.content), ['two']);
  socket().push({ kind: 'protocol_error', code: 'RUN_IN_PROGRESS', error: 'busy', sessionId: 's', clientRequestId: second.clientRequestId, duplicate: false });
  assert.equal(storage.getItem(PENDING), null, 'answered sends leave storage');
  assert.deepEqual(client.pendingSends(), []);
});

test('a caller-given key is used and checked', async () => {
  const { client, socket } = await connected();
  client.send('s', 'x', undefined, { clientRequestId: 'k-1.a:b_c' });
  assert.equal(socket().ofType('chat.send')[0].clientRequestId, 'k-1.a:b_c');
  assert.throws(() => client.send('s', 'y', undefined, { clientRequestId: 'has space' }), TypeError);
  assert.throws(() => client.send('s', 'y', undefined, { clientRequestId: 'x'.repeat(129) }), TypeError);
  assert.throws(() => client.send('s', 'y', undefined, { clientRequestId: 'k-1.a:b_c' }), /already waiting/);
  assert.equal(socket().ofType('chat.send').length, 1);
});

test('keys are UUIDs, or 32 random hex digits where crypto.randomUUID is missing', () => {
  assert.match(newClientRequestId(), /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
  const original = Object.getOwnPropertyDescriptor(globalThis, 'crypto');
  try {
    for (const crypto of [{ getRandomValues: (a) => a.fill(171) }, undefined]) {
      Object.defineProperty(globalThis, 'crypto', { value: crypto, configurable: true, writable: true });
      const key = newClientRequestId();
      assert.match(key, /^[0-9a-f]{32}$/);
      if (crypto) assert.equal(key, 'ab'.repeat(16));
      assert.match(key, KEY);
    }
    Object.defineProperty(globalThis, 'crypto', { value: undefined, configurable: true, writable: true });
    assert.notEqual(newClientRequestId(), newClientRequestId());
  } finally {
    Object.defineProperty(globalThis, 'crypto', original);
  }
});

test('a socket dropped before the answer: the same frame, same key, after the re-subscribe', async () => {
  const { client, timers, socket, storage, sent, accepts } = await connected();
  client.send('s', 'deploy', { permissionMode: 'plan' });
  const original = socket().ofType('chat.send')[0];
  socket().drop(1006);
  assert.equal(client.queued(), 1, 'waiting for the connection');
  await timers.advance(100);
  const fresh = socket();
  fresh.accept('node-b');
  assert.deepEqual(fresh.sent.map((f) => f.type), ['chat.subscribe'], 'nothing before the ack');
  fresh.push(ack('s', 4));
  assert.deepEqual(fresh.ofType('chat.send'), [original], 'the very same frame');
  assert.deepEqual(sent, [{ sessionId: 's', frame: original, resend: true }]);
  assert.equal(stored(storage).length, 1, 'still unanswered');
  // Dropped again before the answer: once more, still the same key.
  fresh.drop(1006);
  await timers.advance(200);
  socket().accept('node-c');
  socket().push(ack('s', 4));
  assert.deepEqual(socket().ofType('chat.send'), [original]);
  socket().push(accepted('s', original.clientRequestId, { duplicate: true, isProcessing: false }));
  assert.equal(accepts.at(-1).duplicate, true);
  assert.equal(accepts.at(-1).content, 'deploy');
  assert.equal(storage.getItem(PENDING), null);
  // Answered: a later drop sends nothing again.
  socket().drop(1006);
  await timers.advance(400);
  socket().accept();
  socket().push(ack('s', 4));
  assert.deepEqual(socket().ofType('chat.send'), []);
  assert.equal(client.queued(), 0);
});

test('a send queued while disconnected goes out once, with its key, across several drops', async () => {
  const { client, timers, socket } = await connected();
  socket().drop(1006);
  assert.equal(client.send('s', 'later'), 'queued');
  await timers.advance(100);
  socket().drop(1006); // never opened
  await timers.advance(200);
  socket().accept();
  socket().push(ack('s', 4));
  const sends = socket().ofType('chat.send');
  assert.equal(sends.length, 1);
  assert.equal(sends[0].content, 'later');
  assert.match(sends[0].clientRequestId, KEY);
});

test('a refusal naming the key ends it; a duplicate RUN_IN_PROGRESS is reported as such', async () => {
  const { client, timers, socket, seen, storage } = await connected();
  client.send('s', 'again');
  const key = socket().ofType('chat.send')[0].clientRequestId;
  socket().drop(1006);
  await timers.advance(100);
  socket().accept();
  socket().push(ack('s', 4, { isProcessing: true }));
  socket().push({ kind: 'protocol_error', code: 'RUN_IN_PROGRESS', error: 'A run is in progress', sessionId: 's', clientRequestId: key, duplicate: true });
  assert.deepEqual(seen.errors.at(-1), {
    code: 'RUN_IN_PROGRESS',
    error: 'A run is in progress',
    sessionId: 's',
    clientRequestId: key,
    duplicate: true,
    willResend: false,
  });
  assert.equal(storage.getItem(PENDING), null);
  socket().drop(1006);
  await timers.advance(200);
  socket().accept();
  socket().push(ack('s', 4));
  assert.deepEqual(socket().ofType('chat.send'), [], 'a refused send is not sent again');
});

test('BACKEND_UNAVAILABLE with an unknown outcome resends the same key after a backoff', async () => {
  const { client, timers, socket, seen, storage, accepts, sent } = await connected();
  client.send('s', 'maybe');
  const frame = socket().ofType('chat.send')[0];
  const unknown = { kind: 'protocol_error', code: 'BACKEND_UNAVAILABLE', error: 'Redis', sessionId: 's', clientRequestId: frame.clientRequestId, duplicate: false, outcome: 'unknown' };
  socket().push(unknown);
  assert.equal(seen.errors.at(-1).willResend, true);
  assert.equal(seen.errors.at(-1).outcome, 'unknown');
  assert.equal(seen.errors.at(-1).delayMs, 100);
  await timers.advance(99);
  assert.equal(socket().ofType('chat.send').length, 1);
  await timers.advance(1);
  assert.deepEqual(socket().ofType('chat.send'), [frame, frame]);
  assert.deepEqual(sent, [{ sessionId: 's', frame, resend: true }]);
  // Unknown again: the next delay grows; a drop meanwhile resends it once, after the ack.
  socket().push(unknown);
  assert.equal(seen.errors.at(-1).delayMs, 200);
  socket().drop(1006);
  await timers.advance(1000);
  socket().accept();
  await timers.advance(1000);
  assert.deepEqual(socket().ofType('chat.send'), [], 'not before the ack, not by the old timer');
  socket().push(ack('s', 4));
  assert.deepEqual(socket().ofType('chat.send'), [frame]);
  assert.equal(stored(storage).length, 1);
  socket().push(accepted('s', frame.clientRequestId, { duplicate: true }));
  assert.equal(accepts.length, 1);
  assert.equal(storage.getItem(PENDING), null);
  await timers.advance(5000);
  assert.equal(socket().ofType('chat.send').length, 1);

  // Any other refusal of a keyed send (even BACKEND_UNAVAILABLE without "unknown") is final.
  client.send('s', 'refused');
  const key = socket().ofType('chat.send').at(-1).clientRequestId;
  socket().push({ kind: 'protocol_error', code: 'BACKEND_UNAVAILABLE', error: 'down', sessionId: 's', clientRequestId: key, duplicate: false });
  assert.equal(seen.errors.at(-1).willResend, false);
  await timers.advance(20000);
  assert.equal(socket().ofType('chat.send').length, 2);
  assert.deepEqual(client.pendingSends(), []);
});

test('a page reload resends what the previous page left unanswered, after history and ack', async () => {
  const storage = new FakeStorage();
  const before = await connected({ storage });
  before.client.send('s', 'survive the reload', { model: 'x' });
  const frame = before.socket().ofType('chat.send')[0];
  before.client.send('s', 'answered');
  before.socket().push(accepted('s', before.socket().ofType('chat.send')[1].clientRequestId));
  // Another gateway's leftovers in the same tab are not this client's.
  storage.setItem('chatgate.pendingSends ws://other/ws', JSON.stringify([{ sessionId: 's', content: 'no', clientRequestId: 'other' }]));
  before.client.close(); // the page goes away

  const history = { s: [{ kind: 'complete', seq: 9 }] };
  const after = setup({ storage, history });
  const sent = [];
  after.client.on('sent', (e) => sent.push(e));
  assert.deepEqual(after.client.pendingSends(), [{ sessionId: 's', content: 'survive the reload', options: { model: 'x' }, clientRequestId: frame.clientRequestId }]);
  after.client.connect();
  await after.timers.advance(10);
  assert.equal(after.seen.history.length, 1, 'the session of the pending send is followed');
  after.socket().accept();
  assert.deepEqual(after.socket().sent.map((f) => f.type), ['chat.subscribe']);
  assert.deepEqual(after.socket().ofType('chat.subscribe')[0].sessions, [{ sessionId: 's', lastSeq: 9 }]);
  after.socket().push(ack('s', 9));
  assert.deepEqual(after.socket().ofType('chat.send'), [frame]);
  assert.equal(sent[0].resend, true);
  after.socket().push(accepted('s', frame.clientRequestId, { duplicate: true, isProcessing: false }));
  assert.equal(storage.getItem(PENDING), null);
  assert.notEqual(storage.getItem('chatgate.pendingSends ws://other/ws'), null, 'left alone');
});

test('garbage in storage is ignored', async () => {
  const storage = new FakeStorage();
  storage.setItem(PENDING, JSON.stringify([
    null,
    { sessionId: 's', content: 'ok', clientRequestId: 'good' },
    { sessionId: 's', content: 1, clientRequestId: 'bad-content' },
    { sessionId: 's', content: 'x', clientRequestId: 'bad key' },
    { sessionId: 's', content: 'x', clientRequestId: 'bad-options', options: 'no' },
  ]));
  assert.deepEqual(setup({ storage }).client.pendingSends().map((p) => p.clientRequestId), ['good']);
  storage.setItem(PENDING, '{not json');
  assert.deepEqual(setup({ storage }).client.pendingSends(), []);
});

test('unsubscribe and discardPending forget unanswered sends', async () => {
  const { client, timers, socket, storage } = await connected();
  client.subscribe('t', { lastSeq: 0 });
  socket().push(ack('t', 0));
  client.send('s', 'a');
  client.send('t', 'b');
  client.unsubscribe('s');
  assert.deepEqual(stored(storage).map((p) => p.content), ['b']);
  // A resend scheduled after an unknown outcome is cancelled with it.
  const key = socket().ofType('chat.send')[1].clientRequestId;
  socket().push({ kind: 'protocol_error', code: 'BACKEND_UNAVAILABLE', error: 'x', sessionId: 't', clientRequestId: key, duplicate: false, outcome: 'unknown' });
  client.discardPending();
  assert.equal(storage.getItem(PENDING), null);
  await timers.advance(5000);
  assert.equal(socket().ofType('chat.send').length, 2);
  socket().drop(1006);
  await timers.advance(100);
  socket().accept();
  socket().push(ack('t', 0));
  assert.deepEqual(socket().ofType('chat.send'), []);
});

test('frames without a key are reported as before: no new fields', async () => {
  const { client, socket, seen, accepts } = await connected();
  socket().push({ kind: 'protocol_error', code: 'NO_ACTIVE_RUN', error: 'nothing to abort', sessionId: 's' });
  assert.deepEqual(seen.errors.at(-1), { code: 'NO_ACTIVE_RUN', error: 'nothing to abort', sessionId: 's' });
  // An answer for a key this client does not hold changes nothing it keeps.
  client.send('s', 'mine');
  socket().push(accepted('s', 'someone-else'));
  assert.equal(accepts[0].content, null);
  assert.equal(client.pendingSends().length, 1);
});

test('a resend waits its turn behind a history reload, even with the queue full', async () => {
  const history = { s: [{ kind: 'complete', seq: 20 }] };
  const { client, timers, socket, seen } = await connected({ history, maxQueued: 1 });
  client.send('s', 'maybe');
  const frame = socket().ofType('chat.send')[0];
  socket().push({ kind: 'protocol_error', code: 'BACKEND_UNAVAILABLE', error: 'x', sessionId: 's', clientRequestId: frame.clientRequestId, duplicate: false, outcome: 'unknown' });
  // Runs finished meanwhile: the session reloads its history, and a new prompt waits for it.
  socket().push(ack('s', 20));
  assert.equal(client.send('s', 'next'), 'queued');
  await timers.advance(100); // the resend is due during the reload: queued, never refused
  assert.equal(seen.errors.filter((e) => e.code === 'QUEUE_FULL').length, 0);
  assert.equal(client.queued(), 2);
  await timers.advance(10);
  socket().push(ack('s', 20));
  assert.deepEqual(socket().ofType('chat.send').map((f) => f.content), ['maybe', 'next', 'maybe']);
  assert.equal(socket().ofType('chat.send')[2].clientRequestId, frame.clientRequestId);
});
