// A page served from another origin imports /client/chatgate.js from the gateway and runs a
// chat through it: the gateway grants CORS to the origins of --allowed-origins (module import,
// REST with Authorization and its preflight, the WebSocket's Origin check), and a page from an
// origin not on the list gets no grant (Chromium blocks the module).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { freePort, launchBrowser, mintWith, shot, startSingleNode } from '../lib/harness.js';

/** A page that imports the gateway's client module and runs one chat through it. */
function page(gateway, token) {
  return `<!doctype html>
<meta charset="utf-8">
<title>another origin</title>
<pre id="out">loading</pre>
<script type="module">
  const out = document.getElementById('out');
  const report = (state, detail) => { out.dataset.state = state; out.textContent = detail; };
  window.addEventListener('error', (e) => report('failed', String(e.message)));
  try {
    const { ChatgateClient } = await import(${JSON.stringify(`${gateway}/client/chatgate.js`)});
    const client = new ChatgateClient({
      token: ${JSON.stringify(token)},
      url: ${JSON.stringify(`${gateway.replace('http', 'ws')}/ws`)},
      baseUrl: ${JSON.stringify(gateway)},
    });
    const created = await client.request('POST', '/api/providers/sessions', { provider: 'script', projectPath: '.' });
    const chunks = [];
    client.on('event', ({ sessionId, event }) => {
      if (sessionId !== created.sessionId) return;
      if (event.kind === 'stream_delta') chunks.push(event.content);
      if (event.kind === 'complete') report(event.success ? 'done' : 'failed', chunks.join(''));
    });
    client.on('error', ({ code, error }) => report('failed', code + ': ' + error));
    client.connect();
    client.send(created.sessionId, 'hello across origins');
  } catch (e) {
    report('failed', String(e && e.message || e));
  }
</script>`;
}

/** Serves `html` at `/` on 127.0.0.1:port; returns a close function. */
async function serve(port, html) {
  const server = createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(html);
  });
  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
  return () => new Promise((resolve) => server.close(resolve));
}

test('a page on a listed origin imports the client module and chats; another origin gets no grant', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'chatgate-cors-'));
  const [allowedPort, otherPort, gatewayPort] = [await freePort(), await freePort(), await freePort()];
  const allowed = `http://127.0.0.1:${allowedPort}`;
  const secret = 'cross-origin-secret';
  const node = await startSingleNode({
    dir,
    port: gatewayPort,
    secret,
    nodeId: 'cors-1',
    args: ['--allowed-origins', allowed],
  });
  const token = mintWith(secret, 'cors-user', 600);
  const html = page(node.url, token);
  const closeAllowed = await serve(allowedPort, html);
  const closeOther = await serve(otherPort, html);
  const { context, close } = await launchBrowser();
  try {
    const good = await context.newPage();
    await good.goto(`${allowed}/`);
    await good.waitForSelector('#out[data-state]', { timeout: 20000 });
    assert.equal(await good.getAttribute('#out', 'data-state'), 'done', await good.textContent('#out'));
    assert.equal(await good.textContent('#out'), 'hello across origins');
    await shot(good, '10-cross-origin-allowed');

    const bad = await context.newPage();
    const blocked = [];
    bad.on('console', (message) => blocked.push(message.text()));
    await bad.goto(`http://127.0.0.1:${otherPort}/`);
    await bad.waitForSelector('#out[data-state]', { timeout: 20000 });
    assert.equal(await bad.getAttribute('#out', 'data-state'), 'failed', 'a page on another origin got through');
    assert.ok(
      blocked.some((text) => /CORS|Access-Control-Allow-Origin/i.test(text)),
      `Chromium did not report a CORS refusal: ${blocked.join('\n')}`,
    );
  } finally {
    await close();
    await closeAllowed();
    await closeOther();
    await node.stop('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
});
