// A client that behaves as upstream's front end (siteboon/claudecodeui v1.36.0) does: no
// `hello=1`; every frame of a kind it does not act on is kept as a chat row (its store merges
// rows by a string `id`: a row without one would throw); history and live rows are merged by id,
// ordered by timestamp, adjacent duplicates dropped; lastSeq is a per-session maximum; it
// refreshes from REST on a run's end and, after any close, reconnects to the same URL 3 s later
// (WebSocketContext), refreshes from REST and subscribes again. A run ends for it on `complete`,
// or on a `chat_subscribed` that says the session no longer processes.
//
// Driven through a streamed reply, a reconnect mid-run, abort, multi-tab approval and reload
// from history: through nginx, on two nodes of the cluster addressed directly (the run on one,
// the approving tab on the other), and on one node on its own (the embedded default). Then
// drains (SIGTERM, close 1012) mid-run: in the cluster the tab's node while the run lives on
// another (the tab reconnects elsewhere and gets the rest of the run once), then the run's own
// node (the run ends `node draining`, once, seen by a tab on a live node and by the reconnected
// one); and a lone node drained and restarted under its tab. Each scenario asserts every turn
// shows exactly once and every run ends. No browser: Node's WebSocket (scripts/browser-tests.sh
// adds --experimental-websocket on Node 20/21).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import {
  freePort, freshUser, lbUrl, mintToken, mintWith, restartNode, rest, runOwner, script, stackNodes, startSingleNode,
} from '../lib/harness.js';

/** Upstream's WebSocketContext reconnects this long after any close. */
const RECONNECT_DELAY_MS = 3000;
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
  /** A tab whose page (REST and /ws) is served from `base`. */
  constructor(token, base = lbUrl()) {
    this.token = token;
    this.base = base;
    this.rows = new Map(); // sessionId -> rows shown
    this.lastSeq = new Map(); // sessionId -> max seq seen (never reset)
    this.processing = new Map(); // sessionId -> the processing indicator
    this.opened = new Set(); // sessions shown: refreshed and subscribed again after a reconnect
    this.pending = new Map(); // requestId -> request
    this.completes = [];
    this.ends = []; // {sessionId, frame}: each run end this tab saw (`complete` or an idle ack)
    this.endRefreshes = 0;
    this.acks = [];
    this.frames = [];
    this.closeCodes = []; // close codes of sockets that were open
    this.reconnects = 0;
    this.streaming = new Map(); // sessionId -> streaming row
    this.ws = null;
    this.everOpen = false;
    this.stopped = false;
  }

  /** The first connection; rejects if it does not open. */
  connect() {
    this.stopped = false;
    return new Promise((resolve, reject) => this.dial(resolve, reject));
  }

  /** Upstream's connect(): on any close, dial the same URL again after the delay. */
  dial(onOpen, onFail) {
    const ws = new WebSocket(`${this.base.replace(/^http/, 'ws')}/ws?token=${encodeURIComponent(this.token)}`);
    let open = false;
    ws.onopen = () => {
      open = true;
      this.ws = ws;
      const again = this.everOpen;
      this.everOpen = true;
      onOpen?.();
      if (again) this.reconnected();
    };
    ws.onmessage = (event) => {
      try {
        this.handle(JSON.parse(event.data));
      } catch (e) {
        this.failure ??= e;
      }
    };
    ws.onerror = () => {};
    ws.onclose = (event) => {
      if (this.ws === ws) this.ws = null;
      if (open) this.closeCodes.push(event.code);
      if (!open && onFail) {
        onFail(new Error(`websocket to ${this.base} failed`));
        return;
      }
      if (this.stopped) return;
      setTimeout(() => {
        if (!this.stopped) this.dial();
      }, RECONNECT_DELAY_MS);
    };
  }

  /** After a reconnect (upstream's `websocket_reconnected`): REST first, then subscribe from the maximum. */
  async reconnected() {
    this.reconnects += 1;
    for (const sessionId of this.opened) {
      try {
        await this.refresh(sessionId);
        this.send({ type: 'chat.subscribe', sessions: [{ sessionId, lastSeq: this.lastSeq.get(sessionId) ?? 0 }] });
      } catch (e) {
        this.failure ??= e;
      }
    }
  }

  /** The network drops the socket: upstream reconnects by itself. */
  drop() {
    this.ws?.close();
  }

  close() {
    this.stopped = true;
    this.ws?.close();
    this.ws = null;
  }

  send(frame) {
    assert.ok(this.ws, 'sending while disconnected');
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
      case 'chat_subscribed': {
        assert.equal(typeof msg.id, 'string', `an ack without a string id: ${JSON.stringify(msg)}`);
        this.acks.push(msg);
        this.pending = new Map((msg.pendingPermissions ?? []).map((p) => [p.requestId, p]));
        const was = this.processing.get(sid);
        this.processing.set(sid, msg.isProcessing);
        // The run ended while this tab was away: its `complete` is history, not replayed.
        if (was && !msg.isProcessing) this.runEnded(sid, msg);
        return;
      }
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
        this.completes.push(msg);
        this.processing.set(sid, false);
        this.runEnded(sid, msg);
        return;
      default:
        if (!NOT_STORED.has(msg.kind) && sid) this.store(sid, msg);
        else if (msg.kind === 'protocol_error') this.store(sid ?? '', msg);
    }
  }

  /** The run's end in the UI: streaming and approvals cleared, history refreshed. */
  runEnded(sessionId, frame) {
    this.streaming.delete(sessionId);
    this.pending.clear();
    this.ends.push({ sessionId, frame });
    this.refresh(sessionId).then(
      () => { this.endRefreshes += 1; },
      (e) => { this.failure ??= e; },
    );
  }

  async history(sessionId, kinds) {
    const query = kinds ? `?kinds=${kinds}` : '';
    const data = await rest(this.token, 'GET', `/api/providers/sessions/${sessionId}/messages${query}`, undefined, this.base);
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

  /** Opens a session: subscribe and REST in parallel; shown (and the composer usable) once both answered. */
  async open(sessionId) {
    this.opened.add(sessionId);
    const acks = this.acks.length;
    this.send({ type: 'chat.subscribe', sessions: [{ sessionId, lastSeq: 0 }] });
    await this.refresh(sessionId);
    await until('the subscribe ack', () => this.acks.slice(acks).some((a) => a.sessionId === sessionId));
  }

  async sendChat(sessionId, content) {
    // Upstream's composer shows the prompt at once, as a row of its own, and the indicator.
    this.store(sessionId, {
      id: `local_${Date.now()}_${Math.random()}`, kind: 'text', role: 'user', content, timestamp: new Date().toISOString(),
    });
    this.processing.set(sessionId, true);
    this.send({
      type: 'chat.send', sessionId, content,
      options: {
        projectPath: '.', permissionMode: 'default', model: 'sonnet', effort: 'default', sessionSummary: 'compat',
        toolsSettings: { allowedTools: [], disallowedTools: [], skipPermissions: false }, images: [],
      },
    });
  }

  /** Waits until this tab saw `n` run ends and refreshed after each. */
  async waitRunEnd(n, timeout = 30000) {
    await until(`run end #${n}`, () => this.failure || (this.ends.length >= n && this.endRefreshes >= n), timeout);
    if (this.failure) throw this.failure;
  }

  streamed(sessionId) {
    return this.streaming.get(sessionId)?.content.length ?? 0;
  }

  check() {
    if (this.failure) throw this.failure;
    const errors = this.frames.filter((f) => f.kind === 'protocol_error');
    assert.deepEqual(errors, [], 'protocol errors');
    assert.ok(!this.frames.some((f) => f.kind === 'connected' || f.kind === 'permission_resolved'), 'opt-in kinds leaked');
  }
}

async function newSession(token, base = lbUrl()) {
  const data = await rest(token, 'POST', '/api/providers/sessions', { provider: 'script', projectPath: '.' }, base);
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

/** The one assistant row of a cut-short turn (the rows after its prompt): a prefix of the full reply. */
function cutReply(rows, prompt, full) {
  const at = rows.findIndex((r) => r.role === 'user' && r.content === prompt);
  assert.ok(at >= 0, `prompt not shown: ${JSON.stringify(rows, null, 1)}`);
  const next = rows.findIndex((r, i) => i > at && r.role === 'user');
  const answers = rows.slice(at + 1, next < 0 ? undefined : next).filter((r) => r.role === 'assistant');
  assert.equal(answers.length, 1, `the cut reply shown ${answers.length} times: ${JSON.stringify(rows, null, 1)}`);
  const { content } = answers[0];
  assert.ok(content.startsWith('chunk 1') && full.startsWith(content), `not a prefix of the reply: ${content}`);
  return content;
}

const chunks = (n) => Array.from({ length: n }, (_, i) => `chunk ${i + 1}`).join('');

/** The `complete` of a run a drain ended (docs/protocol.md). */
function assertDrained(frame) {
  assert.equal(frame.kind, 'complete', JSON.stringify(frame));
  assert.equal(frame.exitCode, 1);
  assert.equal(frame.success, false);
  assert.equal(frame.aborted, true);
  assert.equal(frame.error, 'node draining');
}

/** The stored events of the session: exactly one `complete` per run, in order; returns them. */
async function storedCompletes(tab, sessionId, runs) {
  const events = await tab.history(sessionId, 'all');
  const completes = events.filter((e) => e.kind === 'complete');
  assert.equal(completes.length, runs, `completes stored: ${JSON.stringify(completes)}`);
  return completes;
}

/** Polls until the session's run is listed, asking `base`; returns its node. */
async function ownerOf(token, sessionId, base = lbUrl()) {
  const deadline = Date.now() + 10000;
  while (Date.now() < deadline) {
    const owner = await runOwner(token, sessionId, base);
    if (owner) return owner;
    await sleep(50);
  }
  throw new Error('the run is not listed as running');
}

/**
 * The conversation: a streamed reply, a reconnect mid-run, abort, an approval answered in a
 * second tab on `baseB` while the run lives on the first tab's node, and a reload on `baseB`.
 * Returns the node that owned the approval's run.
 */
async function conversation(token, baseA, baseB) {
  const sessionId = await newSession(token, baseA);
  const tab = new UpstreamLikeClient(token, baseA);
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

  // 2. The socket drops mid-run: upstream reconnects after its delay, REST, then subscribe
  //    from the per-session maximum; the rest of the run arrives once.
  prompts.push(script(150, 40));
  replies.push(chunks(150));
  await tab.sendChat(sessionId, prompts[1]);
  await until('a few chunks', () => tab.streamed(sessionId) > 20);
  tab.drop();
  await until('the reconnect', () => tab.reconnects === 1 && tab.acks.length === 2, 15000);
  assert.equal(tab.acks[1].isProcessing, true, 'reconnected mid-run');
  await tab.waitRunEnd(2);
  assert.equal(tab.completes[1].success, true);
  assertEachTurnOnce(tab.rowsOf(sessionId), prompts, replies);

  // 3. Abort: the run ends (aborted) and its prompt still shows once.
  prompts.push(script(200, 50));
  await tab.sendChat(sessionId, prompts[2]);
  await until('the run streams', () => tab.streamed(sessionId) > 0);
  tab.send({ type: 'chat.abort', sessionId });
  await tab.waitRunEnd(3);
  assert.equal(tab.completes[2].aborted, true);
  assertEachTurnOnce(tab.rowsOf(sessionId), prompts, replies);

  // 4. Multi-tab approval: answered in the other tab, gone from this one's pending list; the
  //    other tab sees the streamed reply once.
  const other = new UpstreamLikeClient(token, baseB);
  await other.connect();
  await other.open(sessionId);
  prompts.push(script(20, 20, { permission: { toolName: 'Bash', input: { command: 'ls' } } }));
  replies.push(chunks(20));
  await tab.sendChat(sessionId, prompts[3]);
  await until('the approval in both tabs', () => tab.pending.size === 1 && other.pending.size === 1);
  const owner = await ownerOf(token, sessionId, baseB);
  const [requestId] = other.pending.keys();
  other.send({ type: 'chat.permission-response', requestId, allow: true });
  await until('the approval gone from the first tab', () => tab.pending.size === 0);
  await tab.waitRunEnd(4);
  await other.waitRunEnd(1);
  assert.equal(other.completes[0].success, true);
  for (const rows of [tab.rowsOf(sessionId), other.rowsOf(sessionId)]) {
    assertEachTurnOnce(rows, prompts, replies);
    assert.equal(rows.filter((r) => r.kind === 'tool_use').length, 1);
  }
  other.close();

  // 5. Reload from history: each turn once, ids strings, time order kept.
  const reloaded = new UpstreamLikeClient(token, baseB);
  await reloaded.connect();
  await reloaded.open(sessionId);
  assertEachTurnOnce(reloaded.rowsOf(sessionId), prompts, replies);
  const history = await reloaded.history(sessionId);
  const stamps = history.map((m) => m.timestamp);
  assert.deepEqual(stamps, [...stamps].sort(), 'history timestamps go backwards');
  assert.ok(history.every((m) => ['text', 'thinking', 'tool_use', 'tool_result', 'error'].includes(m.kind)));
  await storedCompletes(reloaded, sessionId, 4);
  reloaded.close();
  tab.close();
  for (const t of [tab, other, reloaded]) t.check();
  return owner;
}

test('through nginx: streamed reply, reconnect mid-run, abort, multi-tab approval, reload', async () => {
  await conversation(mintToken(freshUser('compat')), lbUrl(), lbUrl());
});

test('two nodes addressed directly: the run on one, the approving tab on the other', async () => {
  const [first, second] = stackNodes();
  const owner = await conversation(mintToken(freshUser('compat-x')), first.url, second.url);
  assert.equal(owner, first.nodeId, 'the run lives on the sending tab\'s node');
});

test('one node on its own (embedded default, no nginx): the same conversation', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'chatgate-upstream-'));
  const secret = 'upstream-single-secret';
  const node = await startSingleNode({ dir, secret, port: await freePort(), nodeId: 'upstream-1' });
  try {
    const owner = await conversation(mintWith(secret, 'compat-single', 3600), node.url, node.url);
    assert.equal(owner, 'upstream-1');
  } finally {
    await node.stop('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a drain (1012) mid-run in the cluster: the tab\'s node, then the run\'s node', async () => {
  const token = mintToken(freshUser('compat-drain'));
  const nodes = stackNodes();
  const sessionId = await newSession(token);
  const tab = new UpstreamLikeClient(token); // through nginx, as a deployed front end
  await tab.connect();
  await tab.open(sessionId);
  const prompts = [];
  const replies = [];
  const watchers = [];
  try {
    // A first turn; its run shows which node serves the tab's socket.
    prompts.push(script(30, 30));
    replies.push(chunks(30));
    await tab.sendChat(sessionId, prompts[0]);
    const tabNode = await ownerOf(token, sessionId);
    await tab.waitRunEnd(1);

    // 1. The tab's node drains while the run lives on another node: 1012, a reconnect through
    //    nginx to a live node, REST, subscribe from lastSeq; the rest of the run arrives once.
    const runNode = nodes.find((n) => n.nodeId !== tabNode);
    const sender = new UpstreamLikeClient(token, runNode.url);
    watchers.push(sender);
    await sender.connect();
    await sender.open(sessionId);
    prompts.push(script(200, 40));
    replies.push(chunks(200));
    await sender.sendChat(sessionId, prompts[1]);
    await until('the run streams to the tab', () => tab.streamed(sessionId) > 20);
    assert.equal(await runOwner(token, sessionId), runNode.nodeId);
    const acksBefore = tab.acks.length;
    await restartNode(tabNode);
    await until('the close', () => tab.closeCodes.length > 0);
    assert.deepEqual(tab.closeCodes, [1012], 'the tab\'s socket closed with 1012');
    await until('the reconnect', () => tab.reconnects === 1 && tab.acks.length > acksBefore, 15000);
    assert.equal(tab.acks.at(-1).isProcessing, true, 'reconnected mid-run');
    await Promise.all([tab.waitRunEnd(2), sender.waitRunEnd(1)]);
    for (const t of [tab, sender]) {
      assert.equal(t.completes.at(-1).success, true);
      assertEachTurnOnce(t.rowsOf(sessionId), prompts, replies);
    }
    sender.close();

    // 2. The run's own node drains: the run ends `node draining` (after the grace), exactly
    //    once; a tab on a live node sees it live, the drained tab after its reconnect.
    prompts.push(script(400, 40));
    await tab.sendChat(sessionId, prompts[2]);
    const drained = await ownerOf(token, sessionId);
    const watcher = new UpstreamLikeClient(token, nodes.find((n) => n.nodeId !== drained).url);
    watchers.push(watcher);
    await watcher.connect();
    await watcher.open(sessionId);
    await until('the run streams to both tabs', () => tab.streamed(sessionId) > 20 && watcher.streamed(sessionId) > 20);
    const closesBefore = tab.closeCodes.length;
    const restarting = restartNode(drained);
    await until('the close', () => tab.closeCodes.length > closesBefore);
    assert.deepEqual(tab.closeCodes.slice(closesBefore), [1012], 'the tab\'s socket closed with 1012');
    // A tab opened during the drain (nginx skips the draining node): the run is still in its
    // grace, or already over; either way it shows the turn once.
    const late = new UpstreamLikeClient(token);
    watchers.push(late);
    await late.connect();
    await late.open(sessionId);
    const lateSawRun = late.acks[0].isProcessing;
    await restarting;
    await Promise.all([tab.waitRunEnd(3), watcher.waitRunEnd(1), lateSawRun ? late.waitRunEnd(1) : null]);
    assertDrained(watcher.completes.at(-1));
    if (lateSawRun) assertDrained(late.completes.at(-1));
    const [, , stored] = await storedCompletes(tab, sessionId, 3);
    assertDrained(stored);
    const end = tab.ends.at(-1).frame;
    if (end.kind === 'complete') assertDrained(end);
    else assert.ok(!end.isProcessing && end.lastSeq >= stored.seq, JSON.stringify({ end, stored }));
    const cut = cutReply(tab.rowsOf(sessionId), prompts[2], chunks(400));
    for (const t of [watcher, late]) assert.equal(cutReply(t.rowsOf(sessionId), prompts[2], chunks(400)), cut);
    assert.equal(cutReply(await tab.history(sessionId), prompts[2], chunks(400)), cut);
    for (const t of [tab, watcher, late]) assertEachTurnOnce(t.rowsOf(sessionId), prompts, replies);
    late.close();

    // The session takes a new run afterwards.
    prompts.push(script(3, 10));
    replies.push(chunks(3));
    await tab.sendChat(sessionId, prompts[3]);
    await Promise.all([tab.waitRunEnd(4), watcher.waitRunEnd(2)]);
    assert.equal(tab.completes.at(-1).success, true);
    for (const t of [tab, watcher]) assertEachTurnOnce(t.rowsOf(sessionId), prompts, replies);

    // Reload from history.
    const reloaded = new UpstreamLikeClient(token);
    watchers.push(reloaded);
    await reloaded.connect();
    await reloaded.open(sessionId);
    assertEachTurnOnce(reloaded.rowsOf(sessionId), prompts, replies);
    assert.equal(cutReply(reloaded.rowsOf(sessionId), prompts[2], chunks(400)), cut);
    for (const t of [tab, ...watchers]) t.check();
  } finally {
    tab.close();
    for (const t of watchers) t.close();
  }
});

test('a drain (1012) mid-run of a lone node: the run ends, the tab comes back after the restart', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'chatgate-upstream-'));
  const secret = 'upstream-single-secret';
  const port = await freePort();
  let node = await startSingleNode({ dir, secret, port, nodeId: 'upstream-1' });
  const token = mintWith(secret, 'compat-single-drain', 3600);
  const tab = new UpstreamLikeClient(token, node.url);
  try {
    const sessionId = await newSession(token, node.url);
    await tab.connect();
    await tab.open(sessionId);
    const prompts = [script(5, 10)];
    const replies = [chunks(5)];
    await tab.sendChat(sessionId, prompts[0]);
    await tab.waitRunEnd(1);

    // SIGTERM: the socket closes with 1012, the run gets the grace and ends `node draining`,
    // the node exits; the tab keeps dialling the same URL until the node is back.
    prompts.push(script(400, 40));
    await tab.sendChat(sessionId, prompts[1]);
    await until('the run streams', () => tab.streamed(sessionId) > 20);
    assert.deepEqual(await node.stop('SIGTERM'), { code: 0, signal: null });
    await until('the close', () => tab.closeCodes.length > 0);
    assert.deepEqual(tab.closeCodes, [1012]);
    node = await startSingleNode({ dir, secret, port, nodeId: 'upstream-1' });
    await tab.waitRunEnd(2, 30000);
    assert.equal(tab.reconnects, 1);
    const [, stored] = await storedCompletes(tab, sessionId, 2);
    assertDrained(stored);
    const end = tab.ends.at(-1).frame;
    if (end.kind === 'complete') assertDrained(end);
    else assert.ok(!end.isProcessing && end.lastSeq >= stored.seq, JSON.stringify({ end, stored }));
    const cut = cutReply(tab.rowsOf(sessionId), prompts[1], chunks(400));
    assertEachTurnOnce(tab.rowsOf(sessionId), prompts, replies);

    // The session takes a new run; seq went on from before the restart.
    const before = tab.lastSeq.get(sessionId);
    prompts.push(script(3, 10));
    replies.push(chunks(3));
    await tab.sendChat(sessionId, prompts[2]);
    await tab.waitRunEnd(3);
    assert.equal(tab.completes.at(-1).success, true);
    assert.ok(tab.completes.at(-1).seq > before, `seq went back: ${tab.completes.at(-1).seq} <= ${before}`);
    assertEachTurnOnce(tab.rowsOf(sessionId), prompts, replies);

    const reloaded = new UpstreamLikeClient(token, node.url);
    await reloaded.connect();
    await reloaded.open(sessionId);
    assertEachTurnOnce(reloaded.rowsOf(sessionId), prompts, replies);
    assert.equal(cutReply(reloaded.rowsOf(sessionId), prompts[1], chunks(400)), cut);
    reloaded.close();
    tab.check();
    reloaded.check();
  } finally {
    tab.close();
    await node.stop('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
});
