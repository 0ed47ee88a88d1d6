// A client that behaves as upstream's front end (siteboon/claudecodeui v1.36.0) does, against the
// live 3-node stack: no `hello=1`; every frame of a kind it does not act on is kept as a chat row
// (its store merges rows by a string `id`: a row without one would throw); history and live rows
// are merged by id, ordered by timestamp, adjacent duplicates dropped; lastSeq is a per-session
// maximum; it refreshes from REST on `complete` and after a reconnect, then subscribes. Each
// scenario asserts every turn shows exactly once and every run ends. No browser: Node's
// WebSocket (scripts/browser-tests.sh adds --experimental-websocket on Node 20/21).
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { freshUser, lbUrl, mintToken, rest, script } from '../lib/harness.js';

/** Kinds the upstream client acts on without storing a row. */
const NOT_STORED = new Set(['complete', 'status', 'permission_request', 'permission_cancelled', 'session_created']);
/** Gateway kinds upstream's client handles in its own branches. */
const GATEWAY = new Set(['chat_subscribed', 'session_upserted', 'loading_progress', 'protocol_error']);
/** Provider kinds upstream's client knows. */
const PROVIDER = new Set([
  'text', 'thinking', 'tool_use', 'tool_result', 'error', 'stream_delta', 'stream_end', 'interactive_prompt',
  'task_notification', ...NOT_STORED,
]);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function until(what, predicate, timeout = 20000) {
  const deadline = Date.now() + timeout;
  while (Date.now() < deadline) {
    if (predicate()) return;
    await sleep(20);
  }
  throw new Error(`timed out waiting for ${what}`);
}

class UpstreamLikeClient {
  constructor(token) {
    this.token = token;
    this.rows = new Map(); // sessionId -> rows shown
    this.lastSeq = new Map(); // sessionId -> max seq seen (never reset)
    this.pending = new Map(); // requestId -> request
    this.completes = [];
    this.frames = [];
    this.streaming = new Map(); // sessionId -> streaming row
    this.completeRefreshes = 0;
    this.ws = null;
  }

  async connect() {
    const url = `${lbUrl().replace(/^http/, 'ws')}/ws?token=${encodeURIComponent(this.token)}`;
    const ws = new WebSocket(url);
    ws.onmessage = (event) => this.handle(JSON.parse(event.data));
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new Error('websocket failed'));
    });
    this.ws = ws;
  }

  close() {
    this.ws?.close();
    this.ws = null;
  }

  send(frame) {
    this.ws.send(JSON.stringify(frame));
  }

  rowsOf(sessionId) {
    if (!this.rows.has(sessionId)) this.rows.set(sessionId, []);
    return this.rows.get(sessionId);
  }

  /** Upstream's store: a row's id must be a string (its merge calls `id.startsWith`). */
  store(sessionId, row) {
    assert.equal(typeof row.id, 'string', `a stored row without a string id: ${JSON.stringify(row)}`);
    row.id.startsWith('x');
    this.rowsOf(sessionId).push(row);
  }

  handle(msg) {
    this.frames.push(msg);
    assert.ok(msg.kind, `a frame without a kind: ${JSON.stringify(msg)}`);
    assert.ok(PROVIDER.has(msg.kind) || GATEWAY.has(msg.kind), `a kind upstream does not handle: ${msg.kind}`);
    const sid = msg.sessionId;
    if (typeof msg.seq === 'number' && sid) this.lastSeq.set(sid, Math.max(this.lastSeq.get(sid) ?? 0, msg.seq));
    switch (msg.kind) {
      case 'chat_subscribed':
        this.pending = new Map((msg.pendingPermissions ?? []).map((p) => [p.requestId, p]));
        return;
      case 'session_upserted':
      case 'loading_progress':
        return;
      case 'stream_delta': {
        let row = this.streaming.get(sid);
        if (!row) {
          // Keeps the first chunk's id: the merged history text carries it.
          row = { id: msg.id, kind: 'text', role: 'assistant', content: '', timestamp: msg.timestamp };
          this.streaming.set(sid, row);
          this.store(sid, row);
        }
        row.content += msg.content ?? '';
        return;
      }
      case 'stream_end':
        this.streaming.delete(sid);
        return;
      case 'permission_request':
        this.pending.set(msg.requestId, msg);
        return;
      case 'permission_cancelled':
        this.pending.delete(msg.requestId);
        return;
      case 'complete':
        this.streaming.delete(sid);
        this.pending.clear();
        this.completes.push(msg);
        this.refresh(sid).then(
          () => { this.completeRefreshes += 1; },
          (e) => { this.failure = e; },
        );
        return;
      default:
        if (!NOT_STORED.has(msg.kind) && sid) this.store(sid, msg);
        else if (msg.kind === 'protocol_error') this.store(sid ?? '', msg);
    }
  }

  async history(sessionId) {
    const data = await rest(this.token, 'GET', `/api/providers/sessions/${sessionId}/messages`);
    assert.equal(data.total, data.messages.length);
    return data.messages;
  }

  /** REST history merged with the live rows: by id, by timestamp, adjacent duplicates dropped. */
  async refresh(sessionId) {
    const server = await this.history(sessionId);
    for (const row of server) assert.equal(typeof row.id, 'string', JSON.stringify(row));
    const ids = new Set(server.map((m) => m.id));
    const live = this.rowsOf(sessionId).filter((m) => !ids.has(m.id));
    const merged = [...server, ...live].sort((a, b) => String(a.timestamp).localeCompare(String(b.timestamp)));
    const shown = [];
    for (const row of merged) {
      const prev = shown[shown.length - 1];
      if (prev && prev.kind === row.kind && prev.role === row.role && prev.content === row.content) continue;
      shown.push(row);
    }
    this.rows.set(sessionId, shown);
  }

  /** After a reconnect: REST first, then subscribe from the per-session maximum. */
  async resume(sessionId) {
    await this.connect();
    await this.refresh(sessionId);
    this.send({ type: 'chat.subscribe', sessions: [{ sessionId, lastSeq: this.lastSeq.get(sessionId) ?? 0 }] });
  }

  async open(sessionId) {
    this.send({ type: 'chat.subscribe', sessions: [{ sessionId, lastSeq: 0 }] });
    await this.refresh(sessionId);
  }

  async sendChat(sessionId, content) {
    // Upstream's composer shows the prompt at once, as a row of its own.
    this.store(sessionId, {
      id: `local_${Date.now()}_${Math.random()}`, kind: 'text', role: 'user', content, timestamp: new Date().toISOString(),
    });
    this.send({
      type: 'chat.send', sessionId, content,
      options: {
        projectPath: '.', permissionMode: 'default', model: 'sonnet', effort: 'default', sessionSummary: 'compat',
        toolsSettings: { allowedTools: [], disallowedTools: [], skipPermissions: false }, images: [],
      },
    });
  }

  async waitRunEnd(n, timeout = 30000) {
    await until(`complete #${n}`, () => this.completes.length >= n && this.completeRefreshes >= n, timeout);
    if (this.failure) throw this.failure;
  }
}

async function newSession(token) {
  const data = await rest(token, 'POST', '/api/providers/sessions', { provider: 'script', projectPath: '.' });
  return data.sessionId;
}

/** Every turn once: each prompt as one user row, each reply's text in exactly one row. */
function assertEachTurnOnce(rows, prompts, replies) {
  for (const prompt of prompts) {
    const users = rows.filter((r) => r.role === 'user' && r.content === prompt);
    assert.equal(users.length, 1, `prompt shown ${users.length} times: ${JSON.stringify(rows, null, 1)}`);
  }
  for (const reply of replies) {
    const shown = rows.filter((r) => r.role === 'assistant' && r.content === reply);
    assert.equal(shown.length, 1, `reply shown ${shown.length} times: ${JSON.stringify(rows, null, 1)}`);
  }
  for (const row of rows) assert.ok(!['complete', 'status', 'connected'].includes(row.kind), JSON.stringify(row));
}

const chunks = (n) => Array.from({ length: n }, (_, i) => `chunk ${i + 1}`).join('');

test('an upstream-style client: streamed reply, reconnect mid-run, abort, multi-tab approval, reload', async () => {
  const token = mintToken(freshUser('compat'));
  const sessionId = await newSession(token);
  const tab = new UpstreamLikeClient(token);
  await tab.connect();
  await tab.open(sessionId);
  const prompts = [];
  const replies = [];

  // 1. A streamed reply.
  prompts.push(script(5, 10));
  replies.push(chunks(5));
  await tab.sendChat(sessionId, prompts[0]);
  await tab.waitRunEnd(1);
  assert.equal(tab.completes[0].success, true);
  assertEachTurnOnce(tab.rowsOf(sessionId), prompts, replies);

  // 2. A reconnect mid-run: REST, then subscribe from the per-session maximum.
  prompts.push(script(30, 40));
  replies.push(chunks(30));
  await tab.sendChat(sessionId, prompts[1]);
  await until('a few chunks', () => (tab.streaming.get(sessionId)?.content.length ?? 0) > 20);
  tab.close();
  await sleep(300);
  await tab.resume(sessionId);
  await tab.waitRunEnd(2);
  assert.equal(tab.completes[1].success, true);
  assertEachTurnOnce(tab.rowsOf(sessionId), prompts, replies);

  // 3. Abort: the run ends (aborted) and its prompt still shows once.
  prompts.push(script(200, 50));
  await tab.sendChat(sessionId, prompts[2]);
  await until('the run streams', () => (tab.streaming.get(sessionId)?.content.length ?? 0) > 0);
  tab.send({ type: 'chat.abort', sessionId });
  await tab.waitRunEnd(3);
  assert.equal(tab.completes[2].aborted, true);
  assertEachTurnOnce(tab.rowsOf(sessionId), prompts, replies);

  // 4. Multi-tab approval: answered in the other tab, gone from this one's pending list.
  const other = new UpstreamLikeClient(token);
  await other.connect();
  await other.open(sessionId);
  prompts.push(script(2, 10, { permission: { toolName: 'Bash', input: { command: 'ls' } } }));
  replies.push(chunks(2));
  await tab.sendChat(sessionId, prompts[3]);
  await until('the approval in both tabs', () => tab.pending.size === 1 && other.pending.size === 1);
  const [requestId] = other.pending.keys();
  other.send({ type: 'chat.permission-response', requestId, allow: true });
  await until('the approval gone from the first tab', () => tab.pending.size === 0);
  await tab.waitRunEnd(4);
  await other.waitRunEnd(1);
  assertEachTurnOnce(tab.rowsOf(sessionId), prompts, replies);
  assert.equal(tab.rowsOf(sessionId).filter((r) => r.kind === 'tool_use').length, 1);
  other.close();

  // 5. Reload from history: each turn once, ids strings, time order kept.
  const reloaded = new UpstreamLikeClient(token);
  await reloaded.connect();
  await reloaded.open(sessionId);
  const rows = reloaded.rowsOf(sessionId);
  assertEachTurnOnce(rows, prompts, replies);
  const history = await reloaded.history(sessionId);
  const stamps = history.map((m) => m.timestamp);
  assert.deepEqual(stamps, [...stamps].sort(), 'history timestamps go backwards');
  assert.ok(history.every((m) => ['text', 'thinking', 'tool_use', 'tool_result', 'error'].includes(m.kind)));
  reloaded.close();
  tab.close();
  const seen = [...tab.frames, ...other.frames, ...reloaded.frames];
  assert.ok(!seen.some((f) => f.kind === 'connected' || f.kind === 'permission_resolved'), 'opt-in kinds leaked');
});
