// kill -9 the node that owns the run: both tabs show the terminal complete within lease + 5 s;
// the tab that was on the dead node reconnects to another one. The node is started again after.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  contiguous,
  createSessionInPage,
  freshUser,
  killNode,
  launchBrowser,
  leaseMs,
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

test('killing the owner node ends the run in both tabs within lease + 5 s', async () => {
  const { context, errors, close } = await launchBrowser();
  let killed = null;
  try {
    const token = mintToken(freshUser('kill'));
    const tabA = await openConsole(context, token);
    const sessionId = await createSessionInPage(tabA);
    const tabB = await openConsole(context, token, sessionId);
    const nodeA = await shownNode(tabA);
    let nodeB = await shownNode(tabB);
    if (nodeB === nodeA) nodeB = await reloadOntoOtherNode(tabB, [nodeA]);

    await sendInPage(tabA, script(1000, 50));
    await Promise.all([waitChunks(tabA, 5), waitChunks(tabB, 5)]);
    const owner = await runOwner(token, sessionId);
    assert.equal(owner, nodeA, 'the run lives on the node of the tab that sent it');
    await shot(tabB, '06-before-kill-tab-b');

    killed = owner;
    await killNode(owner);
    const killedAt = Date.now();
    const limit = leaseMs() + 5000;
    await Promise.all([waitComplete(tabA, 1, limit), waitComplete(tabB, 1, limit)]);
    const took = Date.now() - killedAt;
    assert.ok(took <= limit, `complete after ${took} ms (limit ${limit})`);
    await shot(tabA, '06-owner-killed-tab-a');
    await shot(tabB, '06-owner-killed-tab-b');

    for (const [name, tab] of [['A', tabA], ['B', tabB]]) {
      const t = await transcript(tab);
      assert.equal(t.completes.length, 1, `tab ${name}: one complete`);
      assert.equal(t.completes[0].success, false);
      assert.equal(t.completes[0].aborted, false);
      assert.match(t.completes[0].text, /run owner lost/, `tab ${name}`);
      assert.equal(contiguous(t.seqs), null, `tab ${name}: ${t.seqs.join(',')}`);
      assert.equal(t.seqs.at(-1), t.completes[0].seq);
      assert.equal(await tab.getAttribute('#run-state', 'data-state'), 'idle');
    }
    // Tab A lost its node with the run and reconnected to a live one.
    await tabA.waitForSelector(`#conn[data-state="open"] #conn-node:not([data-node-id=""]):not([data-node-id="${owner}"])`);
    assert.equal(await shownNode(tabB), nodeB);

    // The session takes a new run, on a live node.
    await sendInPage(tabB, 'after the crash');
    await Promise.all([waitComplete(tabA, 2), waitComplete(tabB, 2)]);
    const after = await transcript(tabA);
    assert.equal(after.completes[1].success, true);
    assert.deepEqual(errors, []);
  } finally {
    await close();
    if (killed) {
      // Leave the stack whole for whatever runs next.
      await restartNode(killed);
    }
  }
});
