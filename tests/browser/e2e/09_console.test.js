// The finished console, at 1280×800 and on a phone (390×844): a session opens at its newest
// message and follows live output while the user is at the bottom; scrolled up, new output
// shows a "New messages" button; a reload mid-run shows the resumed run streaming in view;
// long approval inputs wrap and show whole; the provider picker marks CLIs found or not and
// defaults to the first available one; titles, relative times, rename / archive / restore /
// delete; assistant Markdown, with an HTML injection attempt shown as text; the sign-in card,
// a disabled Abort and an empty session's hint.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import {
  createSessionInPage,
  freePort,
  freshUser,
  launchBrowser,
  mintToken,
  mintWith,
  openConsole,
  rest,
  script,
  sendInPage,
  shot,
  startSingleNode,
  waitChunks,
  waitComplete,
  waitConnected,
} from '../lib/harness.js';

const SIZES = [
  { name: 'desktop', viewport: { width: 1280, height: 800 } },
  { name: 'phone', viewport: { width: 390, height: 844 } },
];

/** The transcript's scroll position. */
const scrollState = (page) =>
  page.evaluate(() => {
    const t = document.getElementById('transcript');
    return {
      top: t.scrollTop,
      height: t.scrollHeight,
      client: t.clientHeight,
      fromBottom: t.scrollHeight - t.scrollTop - t.clientHeight,
    };
  });

async function assertAtBottom(page, what) {
  const s = await scrollState(page);
  assert.ok(s.fromBottom <= 4, `${what}: ${s.fromBottom}px from the bottom (${JSON.stringify(s)})`);
  return s;
}

/** Waits until the transcript sits at its bottom (a render may be one frame away). */
async function waitAtBottom(page, what) {
  await page
    .waitForFunction(() => {
      const t = document.getElementById('transcript');
      return t.scrollHeight - t.scrollTop - t.clientHeight <= 4;
    }, null, { timeout: 5000 })
    .catch(() => {});
  return assertAtBottom(page, what);
}

/**
 * Whether the last element matching `selector` lies inside the transcript's visible box (or,
 * with `end`, its end does: a reply taller than the screen shows its newest lines).
 */
const inView = (page, selector, { end = false } = {}) =>
  page.evaluate(([sel, onlyEnd]) => {
    const el = [...document.querySelectorAll(sel)].at(-1);
    if (!el) return false;
    const box = el.getBoundingClientRect();
    const view = document.getElementById('transcript').getBoundingClientRect();
    const bottomIn = box.bottom <= view.bottom + 1 && box.bottom > view.top && box.height > 0;
    return onlyEnd ? bottomIn : bottomIn && box.top >= view.top - 1;
  }, [selector, end]);

const completes = (page) => page.$$eval('#transcript [data-kind="complete"]', (els) => els.length);

/** Opens the console at `size` with a fresh user; returns what the tests need. */
async function start(size, label) {
  const browser = await launchBrowser({ viewport: size.viewport });
  const token = mintToken(freshUser(label));
  const page = await openConsole(browser.context, token);
  const alerts = [];
  page.on('dialog', (d) => {
    alerts.push(d.message());
    d.dismiss().catch(() => {});
  });
  return { ...browser, token, page, alerts };
}

/** Goes back to the sessions list on a phone (one pane at a time); a no-op on a desktop. */
async function showList(page) {
  if (await page.isVisible('#back')) await page.click('#back');
}

/** Twenty paragraphs of echo: a reply taller than any screen. */
const TALL = Array.from({ length: 20 }, (_, i) => `Paragraph ${i + 1} of a long answer that fills the screen.`).join('\n\n');

for (const size of SIZES) {
  test(`${size.name}: opens at the newest message, follows, offers new messages, resumes in view after a reload`, async () => {
    const { close, errors, page, token } = await start(size, `scroll-${size.name}`);
    try {
      const sessionId = await createSessionInPage(page);
      // An empty session says what to do.
      await page.waitForFunction(() => /Send a message to start/.test(document.getElementById('empty-chat').textContent));
      assert.equal(await page.isVisible('#empty-chat'), true);
      await shot(page, `09-${size.name}-empty-session`);
      await sendInPage(page, TALL);
      await waitComplete(page);
      await sendInPage(page, TALL);
      await waitComplete(page, 2);
      assert.equal(await page.isVisible('#empty-chat'), false);

      // A reload opens the session at its newest message.
      await page.reload();
      await waitConnected(page);
      await waitComplete(page, 2);
      const opened = await waitAtBottom(page, 'opened');
      assert.ok(opened.height > opened.client * 2, `the history is taller than the screen: ${JSON.stringify(opened)}`);
      assert.equal(await inView(page, '#transcript [data-kind="complete"]'), true, 'the last event is in view');
      await shot(page, `09-${size.name}-opened-at-newest`);

      // Live output is followed while the user is at the bottom.
      await sendInPage(page, script(200, 60, { payloadBytes: 120 }));
      await waitChunks(page, 15);
      await waitAtBottom(page, 'following');
      await waitChunks(page, 25);
      await waitAtBottom(page, 'still following');

      // Scrolled up, the text stays put and a "New messages" button appears.
      await page.evaluate(() => {
        document.getElementById('transcript').scrollTop = 0;
      });
      const chunksThen = await page.$$eval('#transcript span.chunk', (els) => els.length);
      await waitChunks(page, chunksThen + 5);
      await page.waitForSelector('#new-messages:not([hidden])');
      assert.ok((await scrollState(page)).top < 50, 'the user\'s scroll position is kept');
      assert.equal((await page.textContent('#new-messages')).trim(), 'New messages ↓');
      await shot(page, `09-${size.name}-new-messages`);
      await page.click('#new-messages');
      await waitAtBottom(page, 'after New messages');
      assert.equal(await page.isHidden('#new-messages'), true);
      await waitChunks(page, chunksThen + 12);
      await waitAtBottom(page, 'following again');

      // A reload mid-run shows the resumed run streaming, in view.
      assert.equal(await page.getAttribute('#run-state', 'data-state'), 'running');
      await page.reload();
      await waitConnected(page);
      assert.equal(page.url().split('#')[1], `/s/${sessionId}`);
      await page.waitForSelector('#transcript .msg.assistant.streaming');
      const before = await page.$$eval('#transcript span.chunk', (els) => els.length);
      await waitChunks(page, before + 5);
      await waitAtBottom(page, 'resumed after reload');
      assert.equal(await inView(page, '#transcript .msg.assistant.streaming', { end: true }), true, 'the streaming reply is in view');
      assert.equal(await page.getAttribute('#run-state', 'data-state'), 'running');
      await shot(page, `09-${size.name}-resumed-after-reload`);
      await waitComplete(page, 3, 40000);
      await waitAtBottom(page, 'run finished');

      // Sending in a session with history: the message and its answer are in view.
      await sendInPage(page, 'What changed since yesterday?');
      await waitComplete(page, 4);
      await waitAtBottom(page, 'after sending');
      assert.equal(await inView(page, '#transcript .msg.user'), true, 'the message is in view');
      assert.equal(await inView(page, '#transcript .msg.assistant'), true, 'the answer is in view');
      assert.match(
        await page.$$eval('#transcript .msg.assistant', (els) => els.at(-1).textContent),
        /What changed since yesterday\?/,
      );
      await shot(page, `09-${size.name}-sent-with-history`);
      assert.ok((await rest(token, 'GET', `/api/providers/sessions/${sessionId}`)).lastSeq > 0);
      assert.deepEqual(errors, []);
    } finally {
      await close();
    }
  });

  test(`${size.name}: a 2000-character approval input wraps and shows whole`, async () => {
    const { close, errors, page } = await start(size, `approval-${size.name}`);
    try {
      await createSessionInPage(page);
      const command = `npm run build && ${'node scripts/check.js --very-long-flag=value '.repeat(20)}${'x'.repeat(1100)}`.slice(0, 2000);
      assert.equal(command.length, 2000);
      await sendInPage(page, script(3, 10, { permission: { toolName: 'Bash', input: { command, description: 'Build' } } }));
      await page.waitForSelector('.prompt[data-request-id]');
      const box = await page.evaluate(() => {
        const prompt = document.querySelector('.prompt');
        const input = prompt.querySelector('.prompt-input');
        const style = getComputedStyle(input);
        const allow = prompt.querySelector('button.allow').getBoundingClientRect();
        return {
          promptScroll: prompt.scrollWidth,
          promptClient: prompt.clientWidth,
          inputScroll: input.scrollWidth,
          inputClient: input.clientWidth,
          inputScrollHeight: input.scrollHeight,
          inputClientHeight: input.clientHeight,
          overflowY: style.overflowY,
          text: input.textContent,
          pageScroll: document.documentElement.scrollWidth,
          pageClient: document.documentElement.clientWidth,
          allowVisible: allow.bottom <= window.innerHeight && allow.top >= 0,
        };
      });
      assert.ok(box.promptScroll <= box.promptClient, `box ${box.promptScroll} > ${box.promptClient}`);
      assert.ok(box.inputScroll <= box.inputClient, `input ${box.inputScroll} > ${box.inputClient}`);
      assert.ok(box.pageScroll <= box.pageClient, 'the page does not scroll sideways');
      assert.ok(box.text.includes(command), 'the whole command is in the box');
      assert.equal(box.overflowY, 'auto', 'a long input scrolls vertically');
      assert.equal(box.allowVisible, true, 'Allow is on screen');
      await shot(page, `09-${size.name}-approval-wrapped`);
      // Scrolled to its end, the command's last characters are visible.
      await page.$eval('.prompt-input', (el) => {
        el.scrollTop = el.scrollHeight;
      });
      await shot(page, `09-${size.name}-approval-scrolled`);
      await page.getByRole('button', { name: 'Allow', exact: true }).click();
      await waitComplete(page);
      assert.equal(await page.$$eval('.prompt', (els) => els.length), 0);
      assert.deepEqual(errors, []);
    } finally {
      await close();
    }
  });

  test(`${size.name}: assistant Markdown renders, an HTML injection attempt shows as text`, async () => {
    const { close, errors, page, alerts } = await start(size, `markdown-${size.name}`);
    try {
      await createSessionInPage(page);
      const attack = '<img src=x onerror=alert(1)> <script>window.__pwned = 1</script> [click me](javascript:alert(2))';
      const markdown = [
        '# Plan',
        'Here is **bold**, *italic* and `inline code`.',
        '',
        '- first item',
        '- second with [the docs](https://example.com/docs)',
        '',
        '1. one',
        '2. two',
        '',
        '```js',
        'const x = "<b>not bold</b>";',
        '```',
        '',
        `Attack: ${attack}`,
      ].join('\n');
      await sendInPage(page, markdown);
      await waitComplete(page);
      const check = async (when) => {
        const got = await page.evaluate(() => {
          const md = [...document.querySelectorAll('#transcript .msg.assistant .md')].at(-1);
          const link = md.querySelector('a');
          return {
            heading: md.querySelector('h3')?.textContent,
            strong: md.querySelector('strong')?.textContent,
            em: md.querySelector('em')?.textContent,
            code: md.querySelector('p code')?.textContent,
            bullets: [...md.querySelectorAll('ul > li')].map((li) => li.textContent),
            numbers: [...md.querySelectorAll('ol > li')].map((li) => li.textContent),
            block: md.querySelector('pre code')?.textContent,
            links: [...md.querySelectorAll('a')].map((a) => ({ href: a.getAttribute('href'), rel: a.rel, target: a.target })),
            linkText: link?.textContent,
            imgs: document.querySelectorAll('#transcript img').length,
            scripts: document.querySelectorAll('#transcript script').length,
            bold: md.querySelectorAll('b').length,
            last: md.lastElementChild.textContent,
            pwned: window.__pwned ?? null,
            assistants: document.querySelectorAll('#transcript .msg.assistant').length,
          };
        });
        assert.equal(got.heading, 'Plan', when);
        assert.equal(got.strong, 'bold', when);
        assert.equal(got.em, 'italic', when);
        assert.equal(got.code, 'inline code', when);
        assert.deepEqual(got.bullets, ['first item', 'second with the docs'], when);
        assert.deepEqual(got.numbers, ['one', 'two'], when);
        assert.equal(got.block, 'const x = "<b>not bold</b>";', when);
        assert.deepEqual(got.links, [{ href: 'https://example.com/docs', rel: 'noopener noreferrer', target: '_blank' }], when);
        assert.equal(got.imgs, 0, when);
        assert.equal(got.scripts, 0, when);
        assert.equal(got.bold, 0, when);
        assert.equal(got.last, `Attack: ${attack}`, `${when}: the attempt is shown as text`);
        assert.equal(got.pwned, null, when);
        assert.equal(got.assistants, 1, `${when}: the reply shows once`);
      };
      await check('live');
      await shot(page, `09-${size.name}-markdown`);
      await page.reload();
      await waitConnected(page);
      await waitComplete(page);
      await check('from history');
      assert.deepEqual(alerts, [], 'no alert ran');
      assert.deepEqual(errors, []);
    } finally {
      await close();
    }
  });

  test(`${size.name}: titles, relative times, rename, archive, restore and delete`, async () => {
    const { close, errors, page, token } = await start(size, `manage-${size.name}`);
    try {
      // Idle: Abort is disabled and looks it.
      const first = await createSessionInPage(page);
      const abort = await page.evaluate(() => {
        const b = document.getElementById('abort');
        const s = getComputedStyle(b);
        return { disabled: b.disabled, opacity: Number(s.opacity), color: s.color };
      });
      assert.equal(abort.disabled, true);
      assert.ok(abort.opacity < 0.7, `Abort looks disabled (opacity ${abort.opacity})`);
      const prompt = 'Fix the flaky login test and explain the root cause in detail please';
      await sendInPage(page, prompt);
      await waitComplete(page);
      await showList(page);
      const item = `#session-list .session[data-session-id="${first}"]`;
      assert.match(await page.textContent(`${item} .session-title`), /^Fix the flaky login test/);
      assert.match(await page.textContent(`${item} .session-meta`), /^script · \S+ · (just now|1 min ago)$/);
      assert.match(await page.getAttribute(`${item} time`, 'datetime'), /^\d{4}-\d\d-\d\dT/);
      await shot(page, `09-${size.name}-sessions-list`);

      // Another browser (nothing cached) finds the title in the history.
      const other = await launchBrowser({ viewport: size.viewport });
      try {
        const fresh = await openConsole(other.context, token);
        await fresh.waitForFunction(
          (sel) => /^Fix the flaky login test/.test(document.querySelector(sel)?.textContent ?? ''),
          `${item} .session-title`,
        );
      } finally {
        await other.close();
      }

      // Rename.
      await page.click(item);
      await page.click('#rename');
      await page.waitForSelector('#dialog[open]');
      await page.fill('#dialog-input', 'Login test fix');
      await shot(page, `09-${size.name}-rename-dialog`);
      await page.click('#dialog-ok');
      await page.waitForFunction(() => document.getElementById('chat-title').textContent === 'Login test fix');
      assert.equal((await rest(token, 'GET', `/api/providers/sessions/${first}`)).summary, 'Login test fix');
      await showList(page);
      assert.equal(await page.textContent(`${item} .session-title`), 'Login test fix');

      // Archive: gone from the list, listed under Archived, restored from there.
      await page.click(item);
      await page.click('#archive');
      await page.waitForSelector(item, { state: 'detached' });
      assert.equal((await rest(token, 'GET', `/api/providers/sessions/${first}`)).isArchived, true);
      await showList(page);
      await page.click('#show-archived');
      const archivedRow = `#session-list .archived-session[data-session-id="${first}"]`;
      await page.waitForSelector(archivedRow);
      assert.equal(await page.textContent(`${archivedRow} .session-title`), 'Login test fix');
      await shot(page, `09-${size.name}-archived-view`);
      await page.click(`${archivedRow} button.restore`);
      await page.waitForSelector(archivedRow, { state: 'detached' });
      assert.equal((await rest(token, 'GET', `/api/providers/sessions/${first}`)).isArchived, false);
      await page.click('#show-archived'); // back to the sessions
      await page.waitForSelector(item);

      // Delete asks first: Cancel keeps the session, Delete removes it and its history.
      await page.click(item);
      await page.click('#delete');
      await page.waitForSelector('#dialog[open]');
      assert.match(await page.textContent('#dialog-text'), /cannot be undone/);
      await shot(page, `09-${size.name}-delete-confirm`);
      await page.click('#dialog-cancel');
      await page.waitForSelector('#dialog:not([open])', { state: 'attached' });
      assert.equal((await rest(token, 'GET', `/api/providers/sessions/${first}`)).sessionId, first);
      await page.click('#delete');
      await page.click('#dialog-ok');
      await page.waitForSelector(item, { state: 'detached' });
      await assert.rejects(rest(token, 'GET', `/api/providers/sessions/${first}`), /404/);
      assert.equal(await page.evaluate(() => location.hash), '');

      // An archived session can be deleted from the Archived view too.
      const second = await createSessionInPage(page);
      await page.click('#archive');
      await page.waitForSelector(`#session-list .session[data-session-id="${second}"]`, { state: 'detached' });
      await showList(page);
      await page.click('#show-archived');
      const row = `#session-list .archived-session[data-session-id="${second}"]`;
      await page.waitForSelector(row);
      assert.equal(await page.textContent(`${row} .session-title`), 'New session');
      await page.click(`${row} button.delete`);
      await page.click('#dialog-ok');
      await page.waitForSelector(row, { state: 'detached' });
      await assert.rejects(rest(token, 'GET', `/api/providers/sessions/${second}`), /404/);
      assert.match(await page.textContent('#session-list'), /No archived sessions/);
      assert.deepEqual(errors, []);
    } finally {
      await close();
    }
  });

  test(`${size.name}: the provider picker marks what this node has; the sign-in card fits`, async () => {
    const { close, errors, page, token } = await start(size, `providers-${size.name}`);
    try {
      const { providers } = await rest(token, 'GET', '/api/providers');
      await page.waitForFunction(() => document.querySelector('#new-provider option')?.dataset.available !== undefined);
      const options = await page.$$eval('#new-provider option', (els) =>
        els.map((o) => ({ id: o.value, available: o.dataset.available === 'true', label: o.textContent })));
      assert.deepEqual(options.map((o) => o.id), providers.map((p) => p.id), 'the enabled providers, in order');
      for (const o of options) {
        const p = providers.find((x) => x.id === o.id);
        assert.equal(o.available, p.available, o.id);
        if (!p.available) assert.match(o.label, /CLI not found/, o.id);
      }
      assert.equal(options.find((o) => o.id === 'script').available, true);
      assert.equal(await page.inputValue('#new-provider'), providers.find((p) => p.available).id, 'the first available');
      await shot(page, `09-${size.name}-provider-picker`);

      // Signed out: the card is as tall as its content.
      await page.click('#sign-out');
      await page.waitForSelector('#signin:not([hidden])');
      const card = await page.evaluate(() => {
        const el = document.getElementById('signin');
        const last = el.querySelector('#signin-error').getBoundingClientRect();
        const box = el.getBoundingClientRect();
        return { height: box.height, bottomGap: box.bottom - last.bottom, viewport: window.innerHeight };
      });
      assert.ok(card.bottomGap < 40, `no empty panel below the form (${card.bottomGap}px)`);
      assert.ok(card.height < card.viewport * 0.8, `the card fits its content (${card.height}px)`);
      await shot(page, `09-${size.name}-signin`);
      assert.deepEqual(errors, []);
    } finally {
      await close();
    }
  });
}

test('a provider whose CLI is missing is marked; the default is the first available one', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'chatgate-providers-'));
  const secret = 'browser-providers-secret';
  const node = await startSingleNode({
    dir,
    port: await freePort(),
    secret,
    args: ['--providers', 'codex,claude,script', '--codex-bin', '/nonexistent/bin/codex', '--claude-bin', '/bin/sh'],
  });
  const { context, errors, close } = await launchBrowser({ viewport: { width: 1280, height: 800 } });
  try {
    const page = await openConsole(context, mintWith(secret, 'providers-user', 3600), undefined, node.url);
    await page.waitForFunction(() => document.querySelector('#new-provider option')?.dataset.available !== undefined);
    const options = await page.$$eval('#new-provider option', (els) =>
      els.map((o) => ({ id: o.value, available: o.dataset.available, label: o.textContent })));
    assert.deepEqual(options, [
      { id: 'codex', available: 'false', label: 'codex — CLI not found' },
      { id: 'claude', available: 'true', label: 'claude' },
      { id: 'script', available: 'true', label: 'script' },
    ]);
    assert.equal(await page.inputValue('#new-provider'), 'claude', 'the first available one');
    await page.selectOption('#new-provider', 'codex');
    assert.match(await page.textContent('#provider-help'), /\/nonexistent\/bin\/codex program was not found/);
    await shot(page, '09-desktop-provider-missing');
    assert.deepEqual(errors, []);
  } finally {
    await close();
    await node.stop('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
});
