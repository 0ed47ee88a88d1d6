// Abort from the second tab (on another node) ends the run in both tabs.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  contiguous,
  createSessionInPage,
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

test('abort from the second tab ends the run in both', async () => {
  const { context, errors, close } = await launchBrowser();
  try {
    const token = mintToken(freshUser('abort'));
    const tabA = await openConsole(context, token);
    const sessionId = await createSessionInPage(tabA);
    const tabB = await openConsole(context, token, sessionId);
    const nodeA = await shownNode(tabA);
    if ((await shownNode(tabB)) === nodeA) await reloadOntoOtherNode(tabB, [nodeA]);

    const events = 400;
    await sendInPage(tabA, script(events, 50));
    await Promise.all([waitChunks(tabA, 5), waitChunks(tabB, 5)]);
    assert.equal(await tabB.isEnabled('#abort'), true, 'abort is offered while running');
    await shot(tabB, '04-before-abort-tab-b');
    await tabB.click('#abort');

    await Promise.all([waitComplete(tabA, 1, 10000), waitComplete(tabB, 1, 10000)]);
    await shot(tabA, '04-aborted-tab-a');
    const a = await transcript(tabA);
    const b = await transcript(tabB);
    for (const [name, t, tab] of [['A', a, tabA], ['B', b, tabB]]) {
      assert.equal(t.completes.length, 1, `tab ${name}`);
      assert.equal(t.completes[0].aborted, true, `tab ${name}: aborted`);
      assert.equal(t.completes[0].success, false, `tab ${name}`);
      assert.match(t.completes[0].text, /Run aborted/);
      assert.ok(t.chunks.length < events, `tab ${name}: the run was cut short`);
      assert.equal(contiguous(t.seqs), null, `tab ${name}`);
      assert.equal(t.seqs.at(-1), t.completes[0].seq, `tab ${name}: complete is last`);
      assert.equal(await tab.getAttribute('#run-state', 'data-state'), 'idle');
      assert.equal(await tab.isDisabled('#abort'), true);
    }
    assert.deepEqual(a.seqs, b.seqs, 'both tabs saw the same events');
    assert.deepEqual(errors, []);
  } finally {
    await close();
  }
});
