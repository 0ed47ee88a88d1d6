#!/usr/bin/env node
// A local stand-in for the Anthropic Messages API, so the real Claude Code CLI can run a
// whole agent turn with no internet: `node model-standin.mjs [port]` listens on
// 127.0.0.1:<port> (0 or none: a free port) and prints `listening <port>` on stdout.
// Point the CLI at it with ANTHROPIC_BASE_URL=http://127.0.0.1:<port>.
//
// Scripted behaviour of `POST /v1/messages` (streaming SSE when the body says
// `"stream": true`, one JSON message otherwise):
// - the agent's own conversation (the request offers a `Bash` tool):
//   - its last user message carries no `tool_result`: a `tool_use` of `Bash` with
//     input `{"command": <STANDIN_COMMAND or "env">, "description": "print env"}`;
//   - it carries a `tool_result`: the text `done`;
// - every other request (title generation, quota checks, summaries, …): a short text.
// `POST /v1/messages/count_tokens` answers a rough count, `/api/hello` (the CLI's connectivity
// check) 200. Anything else is logged to stderr
// and answered 404 in the API's error shape. With STANDIN_LOG=<file>, every request (method,
// path, headers without credentials, body) is appended to that file as one JSON line.
// No dependencies: Node's standard library only.
import { appendFileSync } from 'node:fs';
import { createServer } from 'node:http';

const COMMAND = process.env.STANDIN_COMMAND || 'env';
const LOG = process.env.STANDIN_LOG || '';
let counter = 0;

const nextId = (prefix) => `${prefix}_standin${String(++counter).padStart(6, '0')}`;

function log(entry) {
  if (LOG) appendFileSync(LOG, `${JSON.stringify(entry)}\n`);
}

function hasToolResult(message) {
  return Array.isArray(message?.content) && message.content.some((part) => part?.type === 'tool_result');
}

function offersBash(body) {
  return Array.isArray(body.tools) && body.tools.some((tool) => tool?.name === 'Bash');
}

/** The content blocks and stop reason of the answer to `body`. */
function answer(body) {
  const messages = Array.isArray(body.messages) ? body.messages : [];
  const lastUser = [...messages].reverse().find((m) => m?.role === 'user');
  if (offersBash(body)) {
    if (hasToolResult(lastUser)) {
      return { kind: 'final', content: [{ type: 'text', text: 'done' }], stop: 'end_turn' };
    }
    const input = { command: COMMAND, description: 'print env' };
    return { kind: 'tool_use', content: [{ type: 'tool_use', id: nextId('toolu'), name: 'Bash', input }], stop: 'tool_use' };
  }
  return { kind: 'side', content: [{ type: 'text', text: 'Printing the environment' }], stop: 'end_turn' };
}

function usage() {
  return { input_tokens: 12, output_tokens: 6, cache_creation_input_tokens: 0, cache_read_input_tokens: 0 };
}

function sendJson(res, status, value) {
  const text = JSON.stringify(value);
  res.writeHead(status, { 'content-type': 'application/json', 'request-id': nextId('req') });
  res.end(text);
}

function sendMessage(res, body, reply) {
  sendJson(res, 200, {
    id: nextId('msg'),
    type: 'message',
    role: 'assistant',
    model: body.model || 'claude-standin',
    content: reply.content,
    stop_reason: reply.stop,
    stop_sequence: null,
    usage: usage(),
  });
}

function streamMessage(res, body, reply) {
  res.writeHead(200, {
    'content-type': 'text/event-stream',
    'cache-control': 'no-cache',
    connection: 'keep-alive',
    'request-id': nextId('req'),
  });
  const event = (type, data) => res.write(`event: ${type}\ndata: ${JSON.stringify({ type, ...data })}\n\n`);
  event('message_start', {
    message: {
      id: nextId('msg'),
      type: 'message',
      role: 'assistant',
      model: body.model || 'claude-standin',
      content: [],
      stop_reason: null,
      stop_sequence: null,
      usage: { ...usage(), output_tokens: 1 },
    },
  });
  reply.content.forEach((block, index) => {
    if (block.type === 'text') {
      event('content_block_start', { index, content_block: { type: 'text', text: '' } });
      event('content_block_delta', { index, delta: { type: 'text_delta', text: block.text } });
    } else {
      event('content_block_start', { index, content_block: { type: 'tool_use', id: block.id, name: block.name, input: {} } });
      event('content_block_delta', {
        index,
        delta: { type: 'input_json_delta', partial_json: JSON.stringify(block.input) },
      });
    }
    event('content_block_stop', { index });
  });
  event('message_delta', { delta: { stop_reason: reply.stop, stop_sequence: null }, usage: { output_tokens: 6 } });
  event('message_stop', {});
  res.end();
}

function redactedHeaders(headers) {
  const out = { ...headers };
  for (const name of ['x-api-key', 'authorization']) if (name in out) out[name] = '<redacted>';
  return out;
}

const server = createServer((req, res) => {
  const chunks = [];
  req.on('data', (chunk) => chunks.push(chunk));
  req.on('end', () => {
    const raw = Buffer.concat(chunks).toString('utf8');
    let body = {};
    try {
      body = raw ? JSON.parse(raw) : {};
    } catch {
      body = { unparsed: raw.slice(0, 2000) };
    }
    const path = (req.url || '').split('?')[0];
    log({ method: req.method, url: req.url, headers: redactedHeaders(req.headers), body });
    if (req.method === 'POST' && path === '/v1/messages') {
      const reply = answer(body);
      process.stderr.write(
        `standin: POST /v1/messages model=${body.model} stream=${!!body.stream} tools=${(body.tools || []).length} -> ${reply.kind}\n`,
      );
      if (body.stream) streamMessage(res, body, reply);
      else sendMessage(res, body, reply);
      return;
    }
    if (req.method === 'POST' && path === '/v1/messages/count_tokens') {
      sendJson(res, 200, { input_tokens: Math.max(1, Math.ceil(raw.length / 4)) });
      return;
    }
    if (path === '/api/hello') {
      // The CLI's connectivity check (HEAD), made unless CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC is set.
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end(req.method === 'HEAD' ? undefined : 'hello');
      return;
    }
    process.stderr.write(`standin: unknown request ${req.method} ${req.url} ${raw.slice(0, 300)}\n`);
    sendJson(res, 404, { type: 'error', error: { type: 'not_found_error', message: `standin: no ${req.method} ${path}` } });
  });
});

server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
