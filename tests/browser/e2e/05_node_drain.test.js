// A node restarted mid-run (SIGTERM: drain, close 1012) moves its tab to another node; the tab
// misses nothing of the run living elsewhere.
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
  restartNode,
  runOwner,
  script,
  sendInPage,
  shot,
  shownNode,
  transcript,
  waitChunks,
  waitComplete,
} from '../lib/harness.js';

test('a tab whose node drains mid-run reconnects and misses nothing', async () => {
  const { context, errors, close } = await launchBrowser();
  try {
    const token = mintToken(freshUser('drain'));
    const tabA = await openConsole(context, token);
    const sessionId = await createSessionInPage(tabA);
    const tabB = await openConsole(context, token, sessionId);
    const nodeA = await shownNode(tabA);
    let nodeB = await shownNode(tabB);
    if (nodeB === nodeA) nodeB = await reloadOntoOtherNode(tabB, [nodeA]);

    const events = 120;
    await sendInPage(tabA, script(events, 50));
    await waitChunks(tabB, 10);
    assert.equal(await runOwner(token, sessionId), nodeA);
    const states = [];
    await tabB.exposeFunction('recordConnState', (s) => states.push(s));
    await tabB.evaluate(() => {
      new MutationObserver(() => window.recordConnState(document.getElementById('conn').dataset.state)).observe(
        document.getElementById('conn'),
        { attributes: true, attributeFilter: ['data-state'] },
      );
    });
    const restarting = restartNode(nodeB);
    await tabB.waitForSelector('#conn[data-state="reconnecting"]');
    assert.match(await tabB.textContent('#notice'), /shutting down/);
    await tabB.waitForSelector('#conn[data-state="open"] #conn-node:not([data-node-id=""])');
    await shot(tabB, '05-tab-b-after-drain');
    await restarting;

    await Promise.all([waitComplete(tabA), waitComplete(tabB)]);
    const b = await transcript(tabB);
    assert.deepEqual(b.chunks, expectedChunks(events), 'tab B: every chunk once, in order');
    assert.equal(contiguous(b.seqs), null, `tab B: ${b.seqs.join(',')}`);
    assert.equal(b.completes.length, 1);
    assert.equal(b.completes[0].success, true);
    assert.deepEqual(b.seqs, (await transcript(tabA)).seqs);
    assert.ok(states.includes('reconnecting') && states.at(-1) === 'open', states.join(' '));
    assert.deepEqual(errors, []);
  } finally {
    await close();
  }
});
