#!/usr/bin/env node
// A local stand-in for the Anthropic Messages API and the OpenAI Responses API, so the real
// Claude Code and Codex CLIs can run whole agent turns with no internet (the OpenAI Chat
// Completions API, for OpenCode, is in standin-chat-completions.mjs):
// `node model-standin.mjs [port]` listens on 127.0.0.1:<port> (0 or none: a free port) and
// prints `listening <port>` on stdout. Point Claude at it with
// ANTHROPIC_BASE_URL=http://127.0.0.1:<port>, Codex with a `[model_providers.X]` whose
// `base_url` is http://127.0.0.1:<port>/v1 and `wire_api = "responses"`.
//
// The agent's own conversation (a request that offers the shell tool: `Bash` for Claude,
// `exec_command` or `shell` for Codex) is scripted by the text of its LAST user message:
// - a text part starting with `say <words>`: the text `<words>` (no tool);
// - a text part `fail with http 400`: an HTTP 400 in the API's error shape, message
//   `standin: invalid request (scripted)`;
// - a text part `hang`: the response never comes (the connection stays open);
// - a text part `ask a question` (Messages API only): an `AskUserQuestion` tool call (one
//   question, "Which color?", options red and blue), then `done` after its result;
// - a text part `drop once then say <words>` (Responses API only): the first such request's
//   stream ends before `response.completed` (a dropped connection), the retry gets `<words>`;
// - otherwise, when the last message carries no tool result: a call of the shell tool
//   running <STANDIN_COMMAND or "env">; when it carries one: the text `done`.
// Every other request (title generation, quota checks, summaries, …): a short text.
//
// `POST /v1/messages` (Claude) streams SSE when the body says `"stream": true`, one JSON
// message otherwise. `POST /v1/responses` (Codex) always streams SSE.
// `POST /v1/messages/count_tokens` answers a rough count, `/api/hello` (the CLI's connectivity
// check) 200. Anything else is logged to stderr
// and answered 404 in the API's error shape. With STANDIN_LOG=<file>, every request (method,
// path, headers without credentials, body) is appended to that file as one JSON line.
// No dependencies: Node's standard library only.
import { appendFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { handleChatCompletions } from './standin-chat-completions.mjs';
import { handleGemini } from './standin-gemini.mjs';

const COMMAND = process.env.STANDIN_COMMAND || 'env';
const LOG = process.env.STANDIN_LOG || '';
const FAIL_MESSAGE = 'standin: invalid request (scripted)';
let counter = 0;
/** The `drop once then say …` prompts whose first stream was dropped already. */
const dropped = new Set();

const nextId = (prefix) => `${prefix}_standin${String(++counter).padStart(6, '0')}`;

function log(entry) {
  if (LOG) appendFileSync(LOG, `${JSON.stringify(entry)}\n`);
}

/** The text parts of a message (Anthropic `text`, OpenAI `input_text`/`output_text`, or a string). */
function textsOf(message) {
  if (!message) return [];
  if (typeof message.content === 'string') return [message.content];
  if (!Array.isArray(message.content)) return [];
  return message.content
    .filter((part) => typeof part?.text === 'string' && part.type !== 'tool_result')
    .map((part) => part.text.trim());
}

/**
 * What the prompt asks for: `{say}`, `{fail}`, `{hang}` or `{}` (the shell tool flow). The
 * newest matching text part wins: after a failed turn, a CLI may send the failed prompt and the
 * next one as parts of one user message.
 */
function script(texts) {
  for (const text of [...texts].reverse()) {
    if (text.startsWith('say ')) return { say: text.slice(4).split('\n')[0].trim() };
    if (text === 'fail with http 400') return { fail: true };
    if (text === 'hang') return { hang: true };
    if (text === 'ask a question') return { ask: true };
    if (text.startsWith('drop once then say ')) return { say: text.slice(19).split('\n')[0].trim(), dropOnce: text };
  }
  return {};
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
    const scripted = hasToolResult(lastUser) ? {} : script(textsOf(lastUser));
    if (scripted.say) return { kind: 'final', content: [{ type: 'text', text: scripted.say }], stop: 'end_turn' };
    if (scripted.fail) return { kind: 'fail' };
    if (scripted.hang) return { kind: 'hang' };
    if (hasToolResult(lastUser)) {
      return { kind: 'final', content: [{ type: 'text', text: 'done' }], stop: 'end_turn' };
    }
    if (scripted.ask) {
      const question = {
        question: 'Which color?',
        header: 'Color',
        multiSelect: false,
        options: [
          { label: 'red', description: 'The warm one' },
          { label: 'blue', description: 'The cool one' },
        ],
      };
      const call = { type: 'tool_use', id: nextId('toolu'), name: 'AskUserQuestion', input: { questions: [question] } };
      return { kind: 'tool_use', content: [call], stop: 'tool_use' };
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

// ---- OpenAI Responses API (Codex) ----

function responsesTools(body) {
  return (Array.isArray(body.tools) ? body.tools : []).map((tool) => tool?.name || tool?.function?.name).filter(Boolean);
}

/** The answer to a Responses request: `{kind, text}` or `{kind: 'tool_use', name, args}`. */
function answerResponses(body) {
  const input = Array.isArray(body.input) ? body.input : [];
  const last = input[input.length - 1];
  const lastUser = [...input].reverse().find((item) => item?.role === 'user' && (item.type === 'message' || !item.type));
  const tools = responsesTools(body);
  const shell = ['exec_command', 'shell', 'shell_command'].find((name) => tools.includes(name));
  if (!shell) return { kind: 'side', text: 'standin side answer' };
  const toolResult = last?.type === 'function_call_output' || last?.type === 'custom_tool_call_output';
  const scripted = toolResult ? {} : script(textsOf(lastUser));
  if (scripted.dropOnce && !dropped.has(scripted.dropOnce)) {
    dropped.add(scripted.dropOnce);
    return { kind: 'drop' };
  }
  if (scripted.say) return { kind: 'final', text: scripted.say };
  if (scripted.fail) return { kind: 'fail' };
  if (scripted.hang) return { kind: 'hang' };
  if (toolResult) return { kind: 'final', text: 'done' };
  const args = shell === 'exec_command' ? { cmd: COMMAND } : shell === 'shell' ? { command: ['bash', '-lc', COMMAND] } : { command: COMMAND };
  return { kind: 'tool_use', name: shell, args };
}

function streamResponse(res, body, reply) {
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', 'x-request-id': nextId('req') });
  let sequence = 0;
  const event = (type, data) =>
    res.write(`event: ${type}\ndata: ${JSON.stringify({ type, sequence_number: sequence++, ...data })}\n\n`);
  const id = nextId('resp');
  const base = { id, object: 'response', created_at: Math.floor(Date.now() / 1000), model: body.model || 'standin', output: [] };
  event('response.created', { response: { ...base, status: 'in_progress' } });
  let item;
  if (reply.kind === 'tool_use') {
    item = { type: 'function_call', id: nextId('fc'), call_id: nextId('call'), name: reply.name, arguments: JSON.stringify(reply.args), status: 'completed' };
    event('response.output_item.added', { output_index: 0, item: { ...item, arguments: '' } });
    event('response.function_call_arguments.delta', { output_index: 0, item_id: item.id, delta: item.arguments });
    event('response.function_call_arguments.done', { output_index: 0, item_id: item.id, arguments: item.arguments });
  } else {
    const part = { type: 'output_text', text: reply.text, annotations: [] };
    item = { type: 'message', id: nextId('msg'), role: 'assistant', status: 'completed', content: [part] };
    event('response.output_item.added', { output_index: 0, item: { ...item, content: [], status: 'in_progress' } });
    event('response.content_part.added', { output_index: 0, item_id: item.id, content_index: 0, part: { ...part, text: '' } });
    event('response.output_text.delta', { output_index: 0, item_id: item.id, content_index: 0, delta: reply.text });
    event('response.output_text.done', { output_index: 0, item_id: item.id, content_index: 0, text: reply.text });
    event('response.content_part.done', { output_index: 0, item_id: item.id, content_index: 0, part });
  }
  event('response.output_item.done', { output_index: 0, item });
  const usage = {
    input_tokens: 120,
    input_tokens_details: { cached_tokens: 20 },
    output_tokens: 8,
    output_tokens_details: { reasoning_tokens: 3 },
    total_tokens: 128,
  };
  event('response.completed', { response: { ...base, status: 'completed', output: [item], usage } });
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
      if (reply.kind === 'hang') return;
      if (reply.kind === 'fail') {
        sendJson(res, 400, { type: 'error', error: { type: 'invalid_request_error', message: FAIL_MESSAGE } });
        return;
      }
      if (body.stream) streamMessage(res, body, reply);
      else sendMessage(res, body, reply);
      return;
    }
    if (handleGemini(req, res, path, body, { script, command: COMMAND, failMessage: FAIL_MESSAGE, nextId })) return;
    if (req.method === 'POST' && path === '/v1/responses') {
      const reply = answerResponses(body);
      process.stderr.write(`standin: POST /v1/responses model=${body.model} tools=${responsesTools(body).join(',')} -> ${reply.kind}\n`);
      if (reply.kind === 'hang') return;
      if (reply.kind === 'fail') {
        sendJson(res, 400, { error: { message: FAIL_MESSAGE, type: 'invalid_request_error', param: null, code: null } });
        return;
      }
      if (reply.kind === 'drop') {
        res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
        res.end(`event: response.created\ndata: ${JSON.stringify({ type: 'response.created', response: { id: nextId('resp'), status: 'in_progress' } })}\n\n`);
        return;
      }
      streamResponse(res, body, reply);
      return;
    }
    if (req.method === 'POST' && path === '/v1/chat/completions') {
      return handleChatCompletions(res, body, { script, textsOf, command: COMMAND, failMessage: FAIL_MESSAGE, nextId, sendJson });
    }
    if (req.method === 'GET' && path === '/v1/models') {
      sendJson(res, 200, { object: 'list', data: [] });
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
