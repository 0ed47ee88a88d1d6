// The console on the embedded default (one node, SQLite, no Redis), started by the test: the
// token the node prints signs in; history after a reload; a message typed while the node is
// down waits in the queue and is sent after the reconnect; an expired token (4401) goes back
// to the sign-in form.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import {
  contiguous,
  createSessionInPage,
  freePort,
  launchBrowser,
  mintWith,
  openConsole,
  sendInPage,
  shot,
  shownNode,
  startSingleNode,
  transcript,
  waitComplete,
} from '../lib/harness.js';

const tempDir = () => mkdtempSync(path.join(tmpdir(), 'chatgate-single-'));

test('the printed token signs in on the embedded default; a reload shows the history', async () => {
  const dir = tempDir();
  const node = await startSingleNode({ dir, port: await freePort(), secret: null });
  const { context, errors, close } = await launchBrowser();
  try {
    const token = /token for user \S+, valid [^:]+: (\S+)/.exec(node.output())?.[1];
    assert.ok(token, `no token printed: ${node.output()}`);
    const page = await openConsole(context, token, undefined, node.url);
    assert.equal(await shownNode(page), 'single-1');
    await createSessionInPage(page);
    const words = 'hello from the embedded default';
    await sendInPage(page, words);
    await waitComplete(page);
    const live = await transcript(page);
    assert.equal(live.chunks.join(''), words);
    assert.equal(contiguous(live.seqs), null);

    await page.reload();
    await waitComplete(page);
    const reloaded = await transcript(page);
    assert.deepEqual(reloaded.prompts, [words], 'the prompt from the history');
    assert.equal(reloaded.completes.length, 1);
    assert.equal(reloaded.completes[0].seq, live.completes[0].seq);
    const answers = await page.$$eval('#transcript .msg.assistant', (els) => els.map((e) => e.textContent));
    assert.deepEqual(answers, [words], 'the merged reply, once');
    await shot(page, '08-embedded-default-history');
    assert.deepEqual(errors, []);
  } finally {
    await close();
    await node.stop('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a message typed while the node is down is queued and sent after the reconnect', async () => {
  const dir = tempDir();
  const port = await freePort();
  const secret = 'browser-single-secret';
  let node = await startSingleNode({ dir, port, secret });
  const { context, errors, close } = await launchBrowser();
  try {
    const page = await openConsole(context, mintWith(secret, 'queue-user', 3600), undefined, node.url);
    await createSessionInPage(page);
    await sendInPage(page, 'first run');
    await waitComplete(page);

    // SIGTERM: the node drains, closes the socket with 1012 and exits.
    await node.stop('SIGTERM');
    await page.waitForSelector('#conn[data-state="reconnecting"]');
    assert.match(await page.textContent('#notice'), /shutting down/);
    await sendInPage(page, 'typed while offline');
    const queued = '#transcript [data-kind="prompt"][data-local="true"]:last-child';
    assert.equal(await page.getAttribute(queued, 'data-state'), 'queued');
    assert.match(await page.textContent('#queued'), /1 waiting for the connection/);
    await shot(page, '08-queued-while-disconnected');

    node = await startSingleNode({ dir, port, secret });
    await page.waitForSelector('#conn[data-state="open"]', { timeout: 20000 });
    await waitComplete(page, 2);
    const t = await transcript(page);
    // Live chunks, or the history's merged text where the node's restart made the page reload
    // the history: either way each reply shows once, in order.
    const replies = await page.$$eval('#transcript .msg.assistant', (els) => els.map((e) => e.textContent));
    assert.deepEqual(replies, ['first run', 'typed while offline']);
    assert.ok(t.seqs.every((seq, i) => i === 0 || seq > t.seqs[i - 1]), `seqs ${t.seqs.join(',')}`);
    assert.deepEqual(t.completes.map((c) => c.success), [true, true]);
    assert.deepEqual(t.prompts, ['first run', 'typed while offline']);
    assert.equal(await page.textContent('#queued'), '');
    assert.deepEqual(errors, []);
  } finally {
    await close();
    await node.stop('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
});

test('an expired token (4401) sends the console back to the sign-in form', async () => {
  const dir = tempDir();
  const secret = 'browser-expiry-secret';
  const node = await startSingleNode({ dir, port: await freePort(), secret });
  const { context, errors, close } = await launchBrowser();
  try {
    const page = await openConsole(context, mintWith(secret, 'expiry-user', 3), undefined, node.url);
    await page.waitForSelector('#signin:not([hidden])', { timeout: 10000 });
    assert.match(await page.textContent('#signin-error'), /expired/);
    assert.equal(await page.getAttribute('#conn', 'data-state'), 'offline');
    await shot(page, '08-token-expired');
    assert.deepEqual(errors, []);
  } finally {
    await close();
    await node.stop('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
});
