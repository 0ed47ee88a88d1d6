// Shared helpers of the browser suite: the local stack's environment, tokens, Chromium, and
// reading the console's state from the page (node id, transcript, prompts).
//
// The stack is started by scripts/browser-tests.sh, which runs the suite under the test kit's
// supervisor (`chatgate-stack --nodes 3`, crates/chatgate-testkit/src/stack.rs): it exports
// CHATGATE_LB_URL, CHATGATE_NODE_URLS, CHATGATE_JWT_SECRET, CHATGATE_BIN, CHATGATE_STACK_STATE
// and CHATGATE_STACK_CONTROL, the endpoint through which `restartNode` and `killNode` restart or
// kill a node. `startSingleNode` starts a lone node of its own (the embedded default).
import { createHmac, randomUUID } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));

function need(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run the suite through scripts/browser-tests.sh`);
  return value;
}

export const lbUrl = () => need('CHATGATE_LB_URL');
/** Each node of the stack, not behind nginx: [{nodeId: 'local-1', url}, …]. */
export const stackNodes = () =>
  need('CHATGATE_NODE_URLS').split(/\s+/).filter(Boolean).map((url, i) => ({ nodeId: `local-${i + 1}`, url }));
/** The stack's state directory (node-I.log, nginx's files). */
export const stateDir = () => need('CHATGATE_STACK_STATE');
/** The run lease the stack's nodes use (CHATGATE_RUN_LEASE), in ms. */
export const leaseMs = () => parseDuration(process.env.CHATGATE_RUN_LEASE ?? '15s');
export const artifactsDir = () => process.env.CHATGATE_BROWSER_ARTIFACTS ?? path.join(here, '..', 'artifacts');

function parseDuration(text) {
  const m = /^(\d+)(ms|s|m)$/.exec(text.trim());
  if (!m) throw new Error(`cannot read duration ${text}`);
  return Number(m[1]) * { ms: 1, s: 1000, m: 60000 }[m[2]];
}

const b64url = (data) => Buffer.from(data).toString('base64url');

/** An HS256 token for `user`, signed with the stack's secret. */
export function mintToken(user, ttlSeconds = 3600) {
  return mintWith(need('CHATGATE_JWT_SECRET'), user, ttlSeconds);
}

/** A fresh user id, so each test sees only its own sessions. */
export const freshUser = (label) => `browser-${label}-${randomUUID().slice(0, 8)}`;

/** A REST call through the balancer (or to `base`); resolves to the envelope's `data`. */
export async function rest(token, method, route, body, base = lbUrl()) {
  const response = await fetch(`${base}${route}`, {
    method,
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const payload = await response.json();
  if (!payload.success) throw new Error(`${method} ${route}: ${response.status} ${JSON.stringify(payload)}`);
  return payload.data;
}

/** The node that owns a session's run (from GET /sessions/running, asked of `base`), or null. */
export async function runOwner(token, sessionId, base = lbUrl()) {
  const data = await rest(token, 'GET', '/api/providers/sessions/running', undefined, base);
  return data.sessions.find((s) => s.sessionId === sessionId)?.nodeId ?? null;
}

/** Asks the stack supervisor to `action` node `local-I`; resolves to its answer (a line of text). */
async function controlNode(nodeId, action) {
  const m = /^local-(\d+)$/.exec(nodeId);
  if (!m) throw new Error(`not a stack node id: ${nodeId}`);
  const response = await fetch(`${need('CHATGATE_STACK_CONTROL')}/nodes/${m[1]}/${action}`, { method: 'POST' });
  const text = await response.text();
  if (!response.ok) throw new Error(`${action} ${nodeId}: ${response.status} ${text.trim()}`);
  return text.trim();
}

/**
 * Restarts node `local-I` of the stack: SIGTERM (it drains: /readyz 503, sockets closed with
 * 1012, runs given the grace period), its exit, a new start on the same port, /readyz. A node
 * that is down (killed) is just started. Resolves once it is ready again.
 */
export const restartNode = (nodeId) => controlNode(nodeId, 'restart');

/** SIGKILL to node `local-I` of the stack (a crash); resolves once the process is gone. */
export const killNode = (nodeId) => controlNode(nodeId, 'kill');

export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/**
 * Headless Chromium (Debian's package) on a fresh user-data-dir; returns the context (one
 * browser window: its pages are tabs sharing local storage) and a close function.
 */
export async function launchBrowser({ viewport = { width: 1100, height: 760 } } = {}) {
  const profile = mkdtempSync(path.join(tmpdir(), 'chatgate-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHATGATE_CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: CHROMIUM_ARGS,
    viewport,
  });
  context.setDefaultTimeout(20000);
  const errors = [];
  context.on('weberror', (e) => errors.push(String(e.error())));
  const close = async () => {
    await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  };
  return { context, errors, close };
}

/** Saves a screenshot of the page as an artifact; returns its path. */
export async function shot(page, name) {
  mkdirSync(artifactsDir(), { recursive: true });
  const file = path.join(artifactsDir(), `${name}.png`);
  await page.screenshot({ path: file, fullPage: false });
  return file;
}

/** The console at `/` of `base` (the balancer) signed in with `token` (passed once as ?token=). */
export async function openConsole(context, token, sessionId, base = lbUrl()) {
  const page = await context.newPage();
  const hash = sessionId ? `#/s/${sessionId}` : '';
  await page.goto(`${base}/?token=${encodeURIComponent(token)}${hash}`);
  await waitConnected(page);
  return page;
}

/** Waits until the console shows an open connection with a node id. */
export async function waitConnected(page) {
  await page.waitForSelector('#conn[data-state="open"] #conn-node:not([data-node-id=""])');
}

/** The node id the console shows for its socket. */
export async function shownNode(page) {
  return page.getAttribute('#conn-node', 'data-node-id');
}

/** Reloads the page until its socket is served by a node not in `avoid`; returns that node. */
export async function reloadOntoOtherNode(page, avoid, tries = 20) {
  for (let i = 0; i < tries; i += 1) {
    await page.reload();
    await waitConnected(page);
    const node = await shownNode(page);
    if (!avoid.includes(node)) return node;
  }
  throw new Error(`no reload landed outside ${avoid.join(', ')} in ${tries} tries`);
}

/** Creates a session through the console's form; returns its id (from the address bar). */
export async function createSessionInPage(page, provider = 'script', projectPath = '.') {
  await page.selectOption('#new-provider', provider);
  await page.fill('#new-path', projectPath);
  await page.click('#new-session button[type="submit"]');
  await page.waitForFunction(() => /^#\/s\/./.test(location.hash) && !document.getElementById('message').disabled);
  return page.evaluate(() => location.hash.slice('#/s/'.length));
}

/** Types a message in the composer and presses Enter. */
export async function sendInPage(page, content) {
  await page.fill('#message', content);
  await page.press('#message', 'Enter');
}

/** What the transcript shows: seqs in document order, stream chunks, completes. */
export async function transcript(page) {
  return page.evaluate(() => {
    const t = document.getElementById('transcript');
    return {
      seqs: [...t.querySelectorAll('[data-seq]')].map((el) => Number(el.dataset.seq)),
      chunks: [...t.querySelectorAll('span.chunk')].map((el) => el.dataset.text ?? el.textContent),
      completes: [...t.querySelectorAll('[data-kind="complete"]')].map((el) => ({
        seq: Number(el.dataset.seq),
        success: el.dataset.success === 'true',
        aborted: el.dataset.aborted === 'true',
        text: el.textContent,
      })),
      prompts: [...t.querySelectorAll('[data-kind="prompt"]')].map((el) => el.textContent),
      kinds: [...t.querySelectorAll('[data-seq]')].map((el) => el.dataset.kind),
    };
  });
}

/** Waits until the transcript shows `n` completes. */
export async function waitComplete(page, n = 1, timeout = 30000) {
  await page.waitForFunction(
    (count) => document.querySelectorAll('#transcript [data-kind="complete"]').length >= count,
    n,
    { timeout },
  );
}

/** Waits until at least `n` stream chunks are shown. */
export async function waitChunks(page, n, timeout = 20000) {
  await page.waitForFunction(
    (count) => document.querySelectorAll('#transcript span.chunk').length >= count,
    n,
    { timeout },
  );
}

/** `chunk 1` … `chunk n`, what a `script` run of n events streams. */
export const expectedChunks = (n) => Array.from({ length: n }, (_, i) => `chunk ${i + 1}`);

/** A `script` run: `events` stream_deltas, one every `intervalMs`, optionally after an approval. */
export const script = (events, intervalMs, extra = {}) => JSON.stringify({ events, intervalMs, ...extra });

/** Asserts seqs are strictly increasing and contiguous (each seq once, none missing). */
export function contiguous(seqs) {
  for (let i = 1; i < seqs.length; i += 1) {
    if (seqs[i] !== seqs[i - 1] + 1) return `seq ${seqs[i]} follows ${seqs[i - 1]} at index ${i}`;
  }
  return null;
}

/**
 * A free TCP port on 127.0.0.1, below the kernel's ephemeral range, as the test kit picks them
 * (crates/chatgate-testkit/src/ports.rs): outgoing connections take their source ports from that
 * range, and one could take the port between this check and the listener's bind, or while a
 * node is down between two starts on it.
 */
export async function freePort() {
  const { createServer } = await import('node:net');
  let low = 32768;
  try {
    low = Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || low;
  } catch {
    /* not Linux: the usual start of the range */
  }
  const from = Math.max(10000, low - 12000);
  const free = (port) => new Promise((resolve) => {
    const server = createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
  for (let i = 0; i < 200; i += 1) {
    const port = from + Math.floor(Math.random() * (low - from));
    if (await free(port)) return port;
  }
  throw new Error(`no free port between ${from} and ${low}`);
}

/**
 * One gateway node on the embedded default (SQLite in `dir`, no Redis), started by the test
 * with the stack's binary. `secret` null starts it without --jwt-secret (it prints a token);
 * `args` are more flags.
 * Returns {url, port, output(), stop(signal), exited}.
 */
export async function startSingleNode({ dir, port, secret, nodeId = 'single-1', args: extra = [] }) {
  const { spawn } = await import('node:child_process');
  const env = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (!key.startsWith('CHATGATE_') && key !== 'REDIS_URL' && key !== 'DATABASE_URL') env[key] = value;
  }
  const args = [
    'serve',
    '--listen', `127.0.0.1:${port}`,
    '--database-url', `sqlite://${path.join(dir, 'chatgate.db')}?mode=rwc`,
    // Workspaces and provider homes side by side in `dir` (the homes must lie outside the workspaces).
    '--workspaces-root', mkdirp(path.join(dir, 'workspaces')),
    '--homes-root', path.join(dir, 'homes'),
    '--node-id', nodeId,
    '--drain-grace', '1s',
  ];
  if (secret) args.push('--jwt-secret', secret);
  args.push(...extra);
  const child = spawn(need('CHATGATE_BIN'), args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (d) => { output += d; });
  child.stderr.on('data', (d) => { output += d; });
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 30000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`single node exited: ${output}`);
    try {
      if ((await fetch(`${url}/readyz`)).ok) break;
    } catch {
      /* not listening yet */
    }
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`single node not ready: ${output}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return {
    url,
    port,
    output: () => output,
    exited,
    stop: async (signal = 'SIGTERM') => {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
  };
}

function mkdirp(dir) {
  mkdirSync(dir, { recursive: true });
  return dir;
}

/** An HS256 token for `user` signed with `secret`, valid `ttlSeconds`. */
export function mintWith(secret, user, ttlSeconds) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify({ userId: user, iat: now, exp: now + ttlSeconds }));
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}
