// Shared helpers of the browser suite: the local stack's environment, tokens, Chromium, and
// reading the console's state from the page (node id, transcript, prompts).
//
// The stack is started by scripts/browser-tests.sh (deploy/local/up.sh 3), which exports
// CHATGATE_LB_URL, CHATGATE_JWT_SECRET and CHATGATE_LOCAL_STATE (see deploy/local/lib.sh).
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
/** Each node of the local stack, not behind nginx: [{nodeId: 'local-1', url}, …] (up.sh's order). */
export const stackNodes = () =>
  need('CHATGATE_NODE_URLS').split(/\s+/).filter(Boolean).map((url, i) => ({ nodeId: `local-${i + 1}`, url }));
export const stateDir = () => need('CHATGATE_LOCAL_STATE');
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

/** The pid of node `local-I` of the local stack. */
export function nodePid(nodeId) {
  const m = /^local-(\d+)$/.exec(nodeId);
  if (!m) throw new Error(`not a local stack node id: ${nodeId}`);
  return Number(readFileSync(path.join(stateDir(), `node-${m[1]}.pid`), 'utf8').trim());
}

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

/** A free TCP port on 127.0.0.1. */
export async function freePort() {
  const { createServer } = await import('node:net');
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
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
