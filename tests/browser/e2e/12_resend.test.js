// Idempotent chat.send (docs/client.md §Idempotent sends): the console sends every prompt with a
// `clientRequestId`, keeps it (in sessionStorage) until the gateway answers that key, and sends
// the same frame with the same key again when its socket dropped first, or after a page reload.
// Whatever the page could not tell, the prompt runs once: one user row in the session's history,
// one run, shown once. Through nginx on the 3-node stack, at desktop and phone widths; and a
// client that sends no key sees none of it.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  contiguous,
  createSessionInPage,
  expectedChunks,
  freshUser,
  launchBrowser,
  lbUrl,
  mintToken,
  openConsole,
  rest,
  script,
  sendInPage,
  shot,
  transcript,
  waitChunks,
  waitComplete,
  waitConnected,
} from '../lib/harness.js';

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function until(what, predicate, timeout = 20000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

/**
 * Runs in the page before its scripts: a WebSocket that can lose the gateway's answers
 * (`chat_accepted` frames are dropped while `window.__loseAnswers`, or on the first page of the
 * tab when `sessionStorage['test.loseFirstPage']` is set) and can close itself right after it
 * sent a `chat.send` (`window.__dropAfterSend`). `window.__sockets` holds the open ones.
 */
function faultySocket() {
  const Native = window.WebSocket;
  const firstPage = sessionStorage.getItem('test.loseFirstPage') === 'yes';
  if (firstPage) sessionStorage.setItem('test.loseFirstPage', 'done');
  window.__loseAnswers = firstPage;
  window.__dropAfterSend = false;
  window.__lost = [];
  window.__sockets = [];
  class FaultySocket extends Native {
    constructor(...args) {
      super(...args);
      window.__sockets.push(this);
    }
    set onmessage(fn) {
      super.onmessage = (message) => {
        if (window.__loseAnswers && String(message.data).includes('"kind":"chat_accepted"')) {
          window.__lost.push(JSON.parse(message.data));
          return;
        }
        fn.call(this, message);
      };
    }
    get onmessage() {
      return super.onmessage;
    }
    send(data) {
      super.send(data);
      if (window.__dropAfterSend && String(data).includes('"type":"chat.send"')) {
        window.__dropAfterSend = false;
        this.close(4000, 'test: dropped right after chat.send');
      }
    }
  }
  window.WebSocket = FaultySocket;
}

/** Every frame the page's sockets send and receive (across reloads), parsed. */
function recordFrames(page) {
  const frames = { sent: [], received: [] };
  page.on('websocket', (ws) => {
    ws.on('framesent', ({ payload }) => frames.sent.push(JSON.parse(String(payload))));
    ws.on('framereceived', ({ payload }) => frames.received.push(JSON.parse(String(payload))));
  });
  return frames;
}

/** A fresh tab of the console with the faulty socket, signed in, on a new `script` session. */
async function consoleWithSession(context, token) {
  const page = await context.newPage();
  await page.addInitScript(faultySocket);
  const frames = recordFrames(page);
  await page.goto(`${lbUrl()}/?token=${encodeURIComponent(token)}`);
  await waitConnected(page);
  const sessionId = await createSessionInPage(page);
  return { page, frames, sessionId };
}

/** What the gateway stored of the session: user rows, runs (by id), completes. */
async function stored(token, sessionId) {
  const base = `/api/providers/sessions/${encodeURIComponent(sessionId)}/messages`;
  const plain = await rest(token, 'GET', `${base}?limit=1000`);
  const all = await rest(token, 'GET', `${base}?kinds=all&limit=1000`);
  return {
    prompts: plain.messages.filter((m) => m.kind === 'text' && m.role === 'user').map((m) => m.content),
    runs: [...new Set(all.messages.map((m) => m.runId).filter(Boolean))],
    completes: all.messages.filter((m) => m.kind === 'complete'),
  };
}

const pendingInPage = (page) =>
  page.evaluate(() =>
    Object.keys(sessionStorage)
      .filter((k) => k.startsWith('chatgate.pendingSends'))
      .flatMap((k) => JSON.parse(sessionStorage.getItem(k))),
  );

const sendsOf = (frames, content) => frames.sent.filter((f) => f.type === 'chat.send' && f.content === content);
const answersTo = (frames, key) =>
  frames.received.filter((f) => f.clientRequestId === key && (f.kind === 'chat_accepted' || f.kind === 'protocol_error'));

test('a socket closed right after chat.send: the console resends the same key, the prompt runs once', async () => {
  const { context, errors, close } = await launchBrowser();
  try {
    const token = mintToken(freshUser('resend'));
    const { page, frames, sessionId } = await consoleWithSession(context, token);
    const events = 20;
    const prompt = script(events, 30);
    await page.evaluate(() => {
      window.__dropAfterSend = true;
    });
    await sendInPage(page, prompt);
    await waitComplete(page);
    await shot(page, '12-dropped-after-send');

    const sends = sendsOf(frames, prompt);
    assert.equal(sends.length, 2, 'sent, dropped, sent again');
    const key = sends[0].clientRequestId;
    assert.match(key, /^[A-Za-z0-9._:-]{1,128}$/);
    assert.deepEqual(sends[1], sends[0], 'the very same frame, the same key');
    // The first socket may have got its answer on the wire while closing (the page no longer
    // reads it); the resend's answer is the one the page acted on.
    const answers = answersTo(frames, key);
    assert.ok(answers.length >= 1 && answers.length <= 2, JSON.stringify(answers));
    assert.ok(answers.every((f) => f.kind === 'chat_accepted'), JSON.stringify(answers));
    if (answers.length === 2) {
      assert.equal(answers[0].duplicate, false);
      assert.equal(answers[1].duplicate, true, 'the first send started the run: the resend started nothing');
      assert.equal(answers[1].runId, answers[0].runId);
    }

    const t = await transcript(page);
    assert.deepEqual(t.prompts, [prompt], 'the prompt shown once');
    assert.deepEqual(t.chunks, expectedChunks(events));
    assert.equal(t.completes.length, 1);
    assert.equal(t.completes[0].success, true);
    const s = await stored(token, sessionId);
    assert.deepEqual(s.prompts, [prompt], 'one user row in the history');
    assert.equal(s.runs.length, 1, `runs ${s.runs.join(', ')}`);
    assert.equal(s.completes.length, 1);
    assert.equal(answers.at(-1).runId, s.runs[0]);
    assert.deepEqual(await pendingInPage(page), [], 'answered: nothing left in sessionStorage');
    assert.deepEqual(errors, []);
  } finally {
    await close();
  }
});

test('an answer lost mid-run: the resend after the reconnect is a duplicate, the run is shown once', async () => {
  const { context, errors, close } = await launchBrowser();
  try {
    const token = mintToken(freshUser('resend-live'));
    const { page, frames, sessionId } = await consoleWithSession(context, token);
    await page.evaluate(() => {
      window.__loseAnswers = true;
    });
    const events = 60;
    const prompt = script(events, 50);
    await sendInPage(page, prompt);
    await waitChunks(page, 5);
    // The run started and the page never learnt it from the gateway: its send is still pending.
    const lost = await page.evaluate(() => window.__lost);
    assert.equal(lost.length, 1);
    assert.equal(lost[0].duplicate, false);
    const key = lost[0].clientRequestId;
    assert.deepEqual((await pendingInPage(page)).map((p) => p.clientRequestId), [key]);
    assert.equal(await page.getAttribute('#transcript [data-local="true"]', 'data-state'), 'sent');

    // The socket drops mid-run.
    await page.evaluate(() => {
      window.__loseAnswers = false;
      for (const ws of window.__sockets) ws.close(4000, 'test: dropped mid-run');
    });
    await until('the resend', () => sendsOf(frames, prompt).length === 2);
    await waitComplete(page);
    await shot(page, '12-duplicate-mid-run');

    const sends = sendsOf(frames, prompt);
    assert.deepEqual(sends[1], sends[0], 'the same frame, the same key');
    const answers = answersTo(frames, key).filter((f) => f.kind === 'chat_accepted');
    assert.equal(answers.length, 2, 'the first (lost in the page) and the duplicate');
    assert.equal(answers[1].duplicate, true);
    assert.equal(answers[1].runId, lost[0].runId);
    assert.equal(answers[1].firstSeq, lost[0].firstSeq);

    const t = await transcript(page);
    assert.deepEqual(t.prompts, [prompt], 'the prompt shown once');
    assert.deepEqual(t.chunks, expectedChunks(events), 'every chunk once, in order');
    assert.equal(contiguous(t.seqs), null, t.seqs.join(','));
    assert.equal(t.completes.length, 1);
    const s = await stored(token, sessionId);
    assert.deepEqual(s.prompts, [prompt], 'one user row in the history');
    assert.deepEqual(s.runs, [lost[0].runId], 'one run');
    assert.equal(s.completes.length, 1);
    assert.deepEqual(await pendingInPage(page), []);
    assert.deepEqual(errors, []);
  } finally {
    await close();
  }
});

test('a reload with an unanswered prompt in sessionStorage sends it again: one run (phone width)', async () => {
  const { context, errors, close } = await launchBrowser({ viewport: { width: 390, height: 844 } });
  try {
    const token = mintToken(freshUser('resend-reload'));
    const { page, frames, sessionId } = await consoleWithSession(context, token);
    // From here on the first page of this tab loses the gateway's answers.
    await page.evaluate(() => sessionStorage.setItem('test.loseFirstPage', 'yes'));
    await page.reload();
    await waitConnected(page);
    await page.waitForFunction(() => !document.getElementById('message').disabled);
    assert.equal(await page.evaluate(() => window.__loseAnswers), true);

    const prompt = 'run me once';
    await sendInPage(page, prompt);
    await waitComplete(page);
    const key = sendsOf(frames, prompt)[0].clientRequestId;
    assert.deepEqual(await pendingInPage(page), [{ sessionId, content: prompt, clientRequestId: key }]);
    await shot(page, '12-phone-before-reload');

    await page.reload();
    await waitConnected(page);
    await until('the answer to the resend', () => answersTo(frames, key).length === 2);
    await until('sessionStorage emptied', async () => (await pendingInPage(page)).length === 0);
    await waitComplete(page);
    await shot(page, '12-phone-after-reload');

    const sends = sendsOf(frames, prompt);
    assert.equal(sends.length, 2);
    assert.deepEqual(sends[1], sends[0], 'the reloaded page sent the same frame, same key');
    const [first, second] = answersTo(frames, key);
    assert.equal(first.duplicate, false);
    assert.equal(second.kind, 'chat_accepted');
    assert.equal(second.duplicate, true);
    assert.equal(second.isProcessing, false);
    assert.equal(second.runId, first.runId);

    const t = await transcript(page);
    assert.deepEqual(t.prompts, [prompt], 'the prompt shown once');
    assert.equal(t.completes.length, 1);
    const s = await stored(token, sessionId);
    assert.deepEqual(s.prompts, [prompt]);
    assert.deepEqual(s.runs, [first.runId]);
    // The phone layout shows the chat pane, the prompt inside the screen's width.
    const box = await page.$eval('#transcript [data-kind="prompt"]', (el) => {
      const r = el.getBoundingClientRect();
      return { left: r.left, right: r.right, width: document.documentElement.clientWidth };
    });
    assert.ok(box.left >= 0 && box.right <= box.width, JSON.stringify(box));
    assert.equal(await page.evaluate(() => document.body.dataset.view), 'chat');
    assert.deepEqual(errors, []);
  } finally {
    await close();
  }
});

test('a client that sends no key gets no chat_accepted and no key fields', async () => {
  const token = mintToken(freshUser('resend-nokey'));
  const { sessionId } = await rest(token, 'POST', '/api/providers/sessions', { provider: 'script', projectPath: '.' });
  const frames = [];
  const ws = new WebSocket(`${lbUrl().replace(/^http/, 'ws')}/ws?token=${encodeURIComponent(token)}`);
  ws.onmessage = (m) => frames.push(JSON.parse(m.data));
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error('websocket failed'));
  });
  try {
    ws.send(JSON.stringify({ type: 'chat.send', sessionId, content: 'plain' }));
    await until('the run', () => frames.some((f) => f.kind === 'complete'));
    ws.send(JSON.stringify({ type: 'chat.send', sessionId: 'no-such-session', content: 'x' }));
    await until('the refusal', () => frames.some((f) => f.kind === 'protocol_error'));
    assert.deepEqual(frames.filter((f) => f.kind === 'chat_accepted'), []);
    for (const f of frames) {
      for (const field of ['clientRequestId', 'duplicate', 'outcome']) assert.equal(f[field], undefined, `${field} in ${JSON.stringify(f)}`);
    }
    assert.equal(frames.find((f) => f.kind === 'protocol_error').code, 'SESSION_NOT_FOUND');
  } finally {
    ws.close();
  }
});
