// Two tabs on different nodes show the same live run: the same chunks, in order, the prompt
// typed in the other tab, one complete each.
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

test('two tabs on different nodes show the same live run', async () => {
  const { context, errors, close } = await launchBrowser();
  try {
    const token = mintToken(freshUser('tabs'));
    const tabA = await openConsole(context, token);
    const sessionId = await createSessionInPage(tabA);
    const tabB = await openConsole(context, token, sessionId);
    const nodeA = await shownNode(tabA);
    let nodeB = await shownNode(tabB);
    if (nodeB === nodeA) nodeB = await reloadOntoOtherNode(tabB, [nodeA]);
    assert.notEqual(nodeA, nodeB);
    await tabB.waitForFunction((id) => location.hash === `#/s/${id}`, sessionId);

    const events = 40;
    const prompt = script(events, 60);
    await sendInPage(tabA, prompt);
    // Tab B follows live, while the run is still going.
    await waitChunks(tabB, 5);
    assert.equal(await tabB.getAttribute('#run-state', 'data-state'), 'running');
    assert.ok((await transcript(tabB)).chunks.length < events, 'tab B saw the run live');
    await shot(tabA, '02-tab-a-live');
    await shot(tabB, '02-tab-b-live-other-node');

    await Promise.all([waitComplete(tabA), waitComplete(tabB)]);
    const a = await transcript(tabA);
    const b = await transcript(tabB);
    await shot(tabB, '02-tab-b-complete');
    for (const [name, t] of [['A', a], ['B', b]]) {
      assert.deepEqual(t.chunks, expectedChunks(events), `tab ${name}: every chunk once, in order`);
      assert.equal(contiguous(t.seqs), null, `tab ${name}: ${t.seqs.join(',')}`);
      assert.equal(t.completes.length, 1, `tab ${name}: one complete`);
      assert.equal(t.completes[0].success, true);
      assert.deepEqual(t.prompts, [prompt], `tab ${name}: the prompt once`);
    }
    assert.deepEqual(a.seqs, b.seqs);
    // Both tabs stayed on their nodes.
    assert.equal(await shownNode(tabA), nodeA);
    assert.equal(await shownNode(tabB), nodeB);
    assert.deepEqual(errors, []);
  } finally {
    await close();
  }
});
