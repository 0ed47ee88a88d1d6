// A tab that joins a long run after the replay window (CHATGATE_REPLAY_MAX_EVENTS) dropped its
// start gets replayTruncated: the client reloads the history, shows what the window has, and
// once the run is complete shows its whole text from the history, once, in order.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
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

test('a tab joining after the replay window moved on ends with the whole run', async () => {
  const windowSize = Number(process.env.CHATGATE_REPLAY_MAX_EVENTS ?? 10000);
  // Long enough that the late tab is still in the run after its reloads.
  const events = windowSize + 750;
  const { context, errors, close } = await launchBrowser();
  try {
    const token = mintToken(freshUser('trunc'));
    const tabA = await openConsole(context, token);
    const sessionId = await createSessionInPage(tabA);
    const prompt = script(events, 8);
    await sendInPage(tabA, prompt);
    await waitChunks(tabA, windowSize + 50, 30000); // the run's start has left the window

    const reasons = []; // tab B's (tab A was opened before the hook)
    await context.exposeFunction('recordHistory', (r) => reasons.push(r));
    await context.addInitScript(() => {
      document.addEventListener('DOMContentLoaded', () => {
        const t = document.getElementById('transcript');
        new MutationObserver(() => window.recordHistory(t.dataset.history)).observe(t, {
          attributes: true,
          attributeFilter: ['data-history'],
        });
      });
    });
    const tabB = await openConsole(context, token, sessionId);
    const nodeA = await shownNode(tabA);
    if ((await shownNode(tabB)) === nodeA) await reloadOntoOtherNode(tabB, [nodeA]);
    const joined = await transcript(tabB);
    await Promise.all([waitComplete(tabA, 1, 30000), waitComplete(tabB, 1, 30000)]);
    // Once the run is over its whole text is history, and tab B shows it: reloaded after the
    // complete (the client had given up on the window); or, if the run ended while tab B was
    // still reloading, by the reload that saw the session idle past its lastSeq; or, if the run
    // ended before the truncated replay's own reload read the history, by that reload (it holds
    // the whole run and the `complete`, so the subscribe after it has nothing left to replay).
    const whole = expectedChunks(events).join('');
    await tabB.waitForFunction(
      (text) => [...document.querySelectorAll('#transcript .msg.assistant')].some((el) => el.textContent === text),
      whole,
    );
    assert.equal(reasons[0], 'initial', reasons.join(' '));
    assert.ok(reasons.includes('truncated'), `replayTruncated reloaded the history: ${reasons.join(' ')}`);
    assert.ok(['completed', 'missed', 'truncated'].includes(reasons.at(-1)), reasons.join(' '));
    await shot(tabB, '07-joined-late-whole-history');
    const b = await transcript(tabB);
    const replies = await tabB.$$eval('#transcript .msg.assistant', (els) => els.map((e) => e.textContent));
    assert.deepEqual(replies, [whole], 'the run\'s text once, every chunk in order');
    assert.deepEqual(b.prompts, [prompt]);
    assert.equal(b.completes.length, 1);
    assert.equal(b.completes[0].success, true);
    assert.ok(b.seqs.every((seq, i) => i === 0 || seq > b.seqs[i - 1]), 'seqs strictly increasing');
    assert.ok(joined.chunks.length < events, 'tab B joined mid-run');
    // Tab A followed live from the start: every chunk.
    assert.deepEqual((await transcript(tabA)).chunks, expectedChunks(events));
    assert.deepEqual(errors, []);
  } finally {
    await close();
  }
});
