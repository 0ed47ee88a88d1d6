// The OpenAI Chat Completions API of the model stand-in (`POST /v1/chat/completions`), for
// the real OpenCode CLI through its bundled `@ai-sdk/openai-compatible` provider (a provider
// in its config with `"npm": "@ai-sdk/openai-compatible"` and `options.baseURL` =
// http://127.0.0.1:<port>/v1). model-standin.mjs routes the path here and passes its shared
// scripting (`script`, `textsOf`), the shell command, the scripted error text, `nextId` and
// `sendJson`.
//
// A request that offers the shell tool (`bash`, OpenCode's) is scripted by its LAST user
// message as the other APIs are: `say <words>`, `fail with http 400`, `hang`, else a `bash`
// call running the command (`{command, description}`), and `done` once the last message is
// the tool's result (`role: "tool"`). Every other request (OpenCode's title generation): a
// short text.
//
// Streams SSE chunks (`choices[0].delta.content` / `delta.tool_calls`, then `finish_reason`,
// then a chunk with `usage` and no choices, then `data: [DONE]`) when `"stream": true`, one
// `chat.completion` object otherwise. Usage is a function of the request so a test can check
// the token accounting from the logged request: `prompt_tokens` = 100 × the number of
// messages, of which `cached_tokens` 40; `completion_tokens` 7, of which `reasoning_tokens` 2.

const SHELL_TOOL = 'bash';

function toolNames(body) {
  return (Array.isArray(body.tools) ? body.tools : []).map((tool) => tool?.function?.name || tool?.name).filter(Boolean);
}

/** The usage the stand-in reports for `body` (see the header). */
export function chatUsage(body) {
  const messages = Array.isArray(body.messages) ? body.messages.length : 0;
  return {
    prompt_tokens: 100 * messages,
    completion_tokens: 7,
    total_tokens: 100 * messages + 7,
    prompt_tokens_details: { cached_tokens: 40 },
    completion_tokens_details: { reasoning_tokens: 2 },
  };
}

/** The answer to `body`: `{kind: 'final'|'side', text}`, `{kind: 'tool_use', call}`, `{kind: 'fail'}` or `{kind: 'hang'}`. */
function answer(body, shared) {
  const messages = Array.isArray(body.messages) ? body.messages : [];
  if (!toolNames(body).includes(SHELL_TOOL)) return { kind: 'side', text: 'Standin title' };
  const toolResult = messages[messages.length - 1]?.role === 'tool';
  const lastUser = [...messages].reverse().find((m) => m?.role === 'user');
  const scripted = toolResult ? {} : shared.script(shared.textsOf(lastUser));
  if (scripted.say) return { kind: 'final', text: scripted.say };
  if (scripted.fail) return { kind: 'fail' };
  if (scripted.hang) return { kind: 'hang' };
  if (toolResult) return { kind: 'final', text: 'done' };
  const args = JSON.stringify({ command: shared.command, description: 'Run the probe' });
  return { kind: 'tool_use', call: { id: shared.nextId('call'), type: 'function', function: { name: SHELL_TOOL, arguments: args } } };
}

function message(reply) {
  if (reply.kind === 'tool_use') return { role: 'assistant', content: null, tool_calls: [reply.call] };
  return { role: 'assistant', content: reply.text };
}

function finishReason(reply) {
  return reply.kind === 'tool_use' ? 'tool_calls' : 'stop';
}

function stream(res, body, reply, shared) {
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', 'x-request-id': shared.nextId('req') });
  const base = { id: shared.nextId('chatcmpl'), object: 'chat.completion.chunk', created: Math.floor(Date.now() / 1000), model: body.model || 'standin' };
  const chunk = (choices, extra = {}) => res.write(`data: ${JSON.stringify({ ...base, choices, ...extra })}\n\n`);
  if (reply.kind === 'tool_use') {
    const { id, type, function: fn } = reply.call;
    chunk([{ index: 0, delta: { role: 'assistant', content: null, tool_calls: [{ index: 0, id, type, function: { name: fn.name, arguments: '' } }] }, finish_reason: null }]);
    chunk([{ index: 0, delta: { tool_calls: [{ index: 0, function: { arguments: fn.arguments } }] }, finish_reason: null }]);
  } else {
    chunk([{ index: 0, delta: { role: 'assistant', content: '' }, finish_reason: null }]);
    chunk([{ index: 0, delta: { content: reply.text }, finish_reason: null }]);
  }
  chunk([{ index: 0, delta: {}, finish_reason: finishReason(reply) }]);
  chunk([], { usage: chatUsage(body) });
  res.write('data: [DONE]\n\n');
  res.end();
}

/**
 * Answers `POST /v1/chat/completions`. `shared`: `{script, textsOf, command, failMessage, nextId, sendJson}`.
 */
export function handleChatCompletions(res, body, shared) {
  const reply = answer(body, shared);
  process.stderr.write(`standin: POST /v1/chat/completions model=${body.model} stream=${!!body.stream} tools=${toolNames(body).join(',')} -> ${reply.kind}\n`);
  if (reply.kind === 'hang') return;
  if (reply.kind === 'fail') {
    shared.sendJson(res, 400, { error: { message: shared.failMessage, type: 'invalid_request_error', param: null, code: null } });
    return;
  }
  if (body.stream) {
    stream(res, body, reply, shared);
    return;
  }
  shared.sendJson(res, 200, {
    id: shared.nextId('chatcmpl'),
    object: 'chat.completion',
    created: Math.floor(Date.now() / 1000),
    model: body.model || 'standin',
    choices: [{ index: 0, message: message(reply), finish_reason: finishReason(reply) }],
    usage: chatUsage(body),
  });
}
