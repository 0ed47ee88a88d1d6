// A tool approval of a run living on a third node shows in two tabs on the other two nodes;
// answering in one tab removes it from the other, and the run continues.
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
  runOwner,
  script,
  sendInPage,
  shot,
  shownNode,
  transcript,
  waitComplete,
} from '../lib/harness.js';

test('a permission prompt shows in both tabs; answering in one removes it from the other', async () => {
  const { context, errors, close } = await launchBrowser();
  try {
    const token = mintToken(freshUser('perm'));
    // Tab C starts the run (so it lives on C's node); A and B watch from the two other nodes.
    const tabC = await openConsole(context, token);
    const sessionId = await createSessionInPage(tabC);
    const nodeC = await shownNode(tabC);
    const tabA = await openConsole(context, token, sessionId);
    let nodeA = await shownNode(tabA);
    if (nodeA === nodeC) nodeA = await reloadOntoOtherNode(tabA, [nodeC]);
    const tabB = await openConsole(context, token, sessionId);
    let nodeB = await shownNode(tabB);
    if (nodeB === nodeA || nodeB === nodeC) nodeB = await reloadOntoOtherNode(tabB, [nodeA, nodeC]);
    assert.equal(new Set([nodeA, nodeB, nodeC]).size, 3, `${nodeA} ${nodeB} ${nodeC}`);

    const events = 5;
    await sendInPage(tabC, script(events, 20, { permission: { toolName: 'Bash', input: { command: 'make test' } } }));
    const prompt = '.prompt[data-request-id]';
    await Promise.all([tabA.waitForSelector(prompt), tabB.waitForSelector(prompt), tabC.waitForSelector(prompt)]);
    assert.equal(await runOwner(token, sessionId), nodeC, 'the run lives on the third node');
    const requestA = await tabA.getAttribute(prompt, 'data-request-id');
    assert.equal(await tabB.getAttribute(prompt, 'data-request-id'), requestA);
    assert.match(await tabA.textContent(prompt), /Allow Bash\?[\s\S]*make test/);
    await shot(tabA, '03-prompt-tab-a');
    await shot(tabB, '03-prompt-tab-b');

    // Answer in tab B: the prompt leaves tab A (and C), the run goes on and finishes.
    await tabB.getByRole('button', { name: 'Allow', exact: true }).click();
    await Promise.all([
      tabA.waitForSelector(prompt, { state: 'detached' }),
      tabB.waitForSelector(prompt, { state: 'detached' }),
      tabC.waitForSelector(prompt, { state: 'detached' }),
    ]);
    await shot(tabA, '03-prompt-gone-tab-a');
    await Promise.all([waitComplete(tabA), waitComplete(tabB), waitComplete(tabC)]);
    for (const [name, tab] of [['A', tabA], ['B', tabB], ['C', tabC]]) {
      const t = await transcript(tab);
      assert.deepEqual(
        t.kinds.slice(0, 4),
        ['permission_request', 'permission_resolved', 'tool_use', 'tool_result'],
        `tab ${name}`,
      );
      assert.deepEqual(t.chunks, expectedChunks(events), `tab ${name}: the run continued`);
      assert.equal(t.completes.length, 1);
      assert.equal(t.completes[0].success, true, `tab ${name}`);
      assert.match(await tab.textContent('#transcript'), /Approved/);
    }
    await shot(tabA, '03-complete-tab-a');
    assert.deepEqual(errors, []);
  } finally {
    await close();
  }
});

test('a denied approval ends the tool with an error in every tab', async () => {
  const { context, errors, close } = await launchBrowser();
  try {
    const token = mintToken(freshUser('deny'));
    const tabA = await openConsole(context, token);
    const sessionId = await createSessionInPage(tabA);
    const tabB = await openConsole(context, token, sessionId);
    await tabB.waitForFunction((id) => location.hash === `#/s/${id}`, sessionId);
    await sendInPage(tabA, script(2, 10, { permission: { toolName: 'Write', input: { path: 'x' } } }));
    await Promise.all([tabA.waitForSelector('.prompt'), tabB.waitForSelector('.prompt')]);
    await tabA.getByRole('button', { name: 'Deny', exact: true }).click();
    await tabB.waitForSelector('.prompt', { state: 'detached' });
    await Promise.all([waitComplete(tabA), waitComplete(tabB)]);
    for (const tab of [tabA, tabB]) {
      const t = await transcript(tab);
      assert.deepEqual(t.kinds.slice(0, 3), ['permission_request', 'permission_resolved', 'tool_result']);
      assert.match(await tab.textContent('#transcript'), /Denied[\s\S]*User denied tool use/);
    }
    assert.deepEqual(errors, []);
  } finally {
    await close();
  }
});
