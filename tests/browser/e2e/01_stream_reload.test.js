// A `script` run streams into the page; a reload mid-run lands on another node (the node id the
// console shows changes) and the transcript is complete, in order, without duplicates.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  contiguous,
  createSessionInPage,
  expectedChunks,
  freshUser,
  launchBrowser,
  mintToken,
  openConsole,
  reloadOntoOtherNode,
  script,
  sendInPage,
  shot,
  shownNode,
  transcript,
  waitChunks,
  waitComplete,
} from '../lib/harness.js';

test('a script run streams into the page and survives a reload onto another node', async () => {
  const { context, errors, close } = await launchBrowser();
  try {
    const token = mintToken(freshUser('reload'));
    const page = await openConsole(context, token);
    const firstNode = await shownNode(page);
    assert.match(firstNode, /^local-\d$/);
    // ?token= is taken once: stored, and gone from the address bar.
    assert.ok(!page.url().includes('token='), page.url());

    const sessionId = await createSessionInPage(page);
    const events = 100;
    await sendInPage(page, script(events, 80));
    await waitChunks(page, 10);
    assert.equal(await page.getAttribute('#run-state', 'data-state'), 'running');
    const before = await transcript(page);
    assert.deepEqual(before.chunks, expectedChunks(before.chunks.length), 'streamed in order');
    await shot(page, '01-streaming-before-reload');

    const secondNode = await reloadOntoOtherNode(page, [firstNode]);
    assert.notEqual(secondNode, firstNode);
    assert.equal(page.url().split('#')[1], `/s/${sessionId}`, 'the reload reopens the session');
    await waitChunks(page, 1);
    const landed = await transcript(page);
    assert.ok(landed.chunks.length < events, `the reload landed mid-run (${landed.chunks.length} chunks)`);
    assert.deepEqual(landed.chunks, expectedChunks(landed.chunks.length), 'replayed from the start of the run');
    await shot(page, '01-after-reload-other-node');

    await waitComplete(page);
    const after = await transcript(page);
    await shot(page, '01-complete-after-reload');
    assert.deepEqual(after.chunks, expectedChunks(events), 'every chunk once, in order');
    assert.equal(after.completes.length, 1);
    assert.equal(after.completes[0].success, true);
    assert.equal(contiguous(after.seqs), null, `seqs ${after.seqs.join(',')}`);
    assert.equal(after.seqs[0], 1, 'the run is replayed from its first event');
    assert.equal(after.seqs.at(-1), after.completes[0].seq, 'complete is the last event');
    assert.equal(after.seqs.length, events + 2, 'deltas, stream_end, complete');
    assert.deepEqual(after.prompts, [script(events, 80)], 'the prompt from the history, once');
    assert.equal(await page.getAttribute('#run-state', 'data-state'), 'idle');
    assert.equal(await shownNode(page), secondNode);

    // Accessible names and live regions; one pane at a time on a phone.
    assert.equal(await page.getAttribute('#transcript', 'role'), 'log');
    assert.equal(await page.getAttribute('#transcript', 'aria-live'), 'polite');
    assert.equal(await page.getByLabel('Message').count(), 1);
    await page.setViewportSize({ width: 390, height: 844 });
    assert.equal(await page.isHidden('#sidebar'), true);
    assert.equal(await page.isVisible('#transcript'), true);
    await shot(page, '01-phone-chat');
    await page.getByRole('button', { name: 'Sessions', exact: true }).click();
    assert.equal(await page.isVisible('#sidebar'), true);
    assert.equal(await page.isHidden('#chat'), true);
    await shot(page, '01-phone-sessions');
    assert.deepEqual(errors, []);
  } finally {
    await close();
  }
});
