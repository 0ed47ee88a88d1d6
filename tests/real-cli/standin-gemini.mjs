// The Gemini API part of model-standin.mjs, for the real Gemini CLI: point it at the stand-in
// with GOOGLE_GEMINI_BASE_URL=http://127.0.0.1:<port>, GEMINI_API_KEY=<anything> and
// `{"security":{"auth":{"selectedType":"gemini-api-key"}}}` in its ~/.gemini/settings.json.
//
// `POST /v1beta/models/<model>:streamGenerateContent?alt=sse` (the agent's turns) answers SSE
// `data: <GenerateContentResponse>` chunks; `POST …:generateContent` (the CLI's side requests:
// the model router's classifier, the next-speaker check, …) answers one JSON response whose text
// fills the request's JSON schema when it has one; `…:countTokens` a rough count.
//
// The agent's turns are scripted by the stand-in's rules (see model-standin.mjs): the text of the
// LAST user content says `say <words>`, `fail with http 400` (an HTTP 400 in Google's error
// shape: `{"error":{"code":400,"message":…,"status":"INVALID_ARGUMENT"}}`), `hang`; otherwise a
// `run_shell_command {command}` call, and `done` once the last user content carries its
// `functionResponse` (also when the CLI did not offer that tool: its default approval mode offers
// no shell tool in headless mode, and the test shows what the CLI makes of the call). The caller logs every request before handing it here.

const SHELL_TOOL = 'run_shell_command';

/** The names of the function declarations the request offers. */
function offeredTools(body) {
  const tools = Array.isArray(body.tools) ? body.tools : [];
  return tools.flatMap((tool) => (Array.isArray(tool?.functionDeclarations) ? tool.functionDeclarations : [])).map((f) => f?.name);
}

function partsOf(content) {
  return Array.isArray(content?.parts) ? content.parts : [];
}

/** The answer to an agent turn: `{kind, parts}` (`kind` is `final`, `tool_use`, `fail` or `hang`). */
function answerTurn(body, ctx) {
  const contents = Array.isArray(body.contents) ? body.contents : [];
  const lastUser = [...contents].reverse().find((c) => c?.role === 'user');
  const toolResult = partsOf(lastUser).some((part) => part?.functionResponse);
  const texts = partsOf(lastUser).filter((part) => typeof part?.text === 'string').map((part) => part.text.trim());
  const scripted = toolResult ? {} : ctx.script(texts);
  if (scripted.say) return { kind: 'final', parts: [{ text: scripted.say }] };
  if (scripted.fail) return { kind: 'fail' };
  if (scripted.hang) return { kind: 'hang' };
  if (toolResult) return { kind: 'final', parts: [{ text: 'done' }] };
  const args = { command: ctx.command, description: 'print env' };
  return { kind: 'tool_use', parts: [{ functionCall: { id: ctx.nextId('call'), name: SHELL_TOOL, args } }] };
}

/** A value that satisfies a (simple) JSON schema: an enum's first choice, required properties filled. */
function fill(schema) {
  if (!schema || typeof schema !== 'object') return 'standin';
  if (Array.isArray(schema.enum) && schema.enum.length) return schema.enum[0];
  const type = String(schema.type || '').toLowerCase();
  if (type === 'object') {
    const props = schema.properties || {};
    const names = Array.isArray(schema.required) ? schema.required : Object.keys(props);
    return Object.fromEntries(names.map((name) => [name, fill(props[name])]));
  }
  if (type === 'array') return [];
  if (type === 'boolean') return false;
  if (type === 'number' || type === 'integer') return typeof schema.minimum === 'number' ? schema.minimum : 1;
  return 'standin';
}

/** The text of a side request's answer: JSON filling its schema, or a short sentence. */
function sideText(body) {
  const config = body.generationConfig || {};
  const schema = config.responseJsonSchema || config.responseSchema;
  if (schema) return JSON.stringify(fill(schema));
  if (config.responseMimeType === 'application/json') return '{}';
  return 'standin side answer';
}

function response(parts, model) {
  return {
    candidates: [{ content: { role: 'model', parts }, finishReason: 'STOP', index: 0 }],
    usageMetadata: { promptTokenCount: 12, candidatesTokenCount: 6, totalTokenCount: 18 },
    modelVersion: model,
  };
}

function sendJson(res, status, value) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(value));
}

function streamTurn(res, reply, model) {
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
  res.write(`data: ${JSON.stringify(response(reply.parts, model))}\r\n\r\n`);
  res.end();
}

/**
 * Answers a Gemini API request (`path` without its query); false when `path` is not one.
 * `ctx`: `{ script, command, failMessage, nextId }` of the stand-in.
 */
export function handleGemini(req, res, path, body, ctx) {
  const match = /^\/v1(?:beta|alpha|)\/models\/([^/:]+):([A-Za-z]+)$/.exec(path);
  if (req.method !== 'POST' || !match) return false;
  const [, model, method] = match;
  if (method === 'countTokens') {
    sendJson(res, 200, { totalTokens: Math.max(1, Math.ceil(JSON.stringify(body).length / 4)) });
    return true;
  }
  // The agent's own conversation offers tools (the shell tool only where the approval mode allows
  // it); the CLI's side requests offer none.
  const agentTurn = method === 'streamGenerateContent' && offeredTools(body).length > 0;
  const reply = agentTurn ? answerTurn(body, ctx) : { kind: 'side', parts: [{ text: sideText(body) }] };
  process.stderr.write(`standin: POST ${model}:${method} tools=${offeredTools(body).length} -> ${reply.kind}\n`);
  if (reply.kind === 'hang') return true;
  if (reply.kind === 'fail') {
    sendJson(res, 400, { error: { code: 400, message: ctx.failMessage, status: 'INVALID_ARGUMENT' } });
    return true;
  }
  if (method === 'streamGenerateContent') streamTurn(res, reply, model);
  else sendJson(res, 200, response(reply.parts, model));
  return true;
}
