// The chatgate web console: sign in with a token, list and create sessions, follow one session's
// chat (every event kind), abort runs, answer tool approvals. Plain DOM, no build step; the
// wire protocol is handled by the client module (/client/chatgate.js).
import { ChatgateClient, CloseCode } from '/client/chatgate.js';

const TOKEN_KEY = 'chatgate.token';
const PROVIDER_KEY = 'chatgate.provider';
const $ = (id) => document.getElementById(id);

const ui = {
  signin: $('signin'),
  signinForm: $('signin-form'),
  tokenInput: $('token-input'),
  signinError: $('signin-error'),
  signOut: $('sign-out'),
  workspace: $('workspace'),
  conn: $('conn'),
  connState: $('conn-state'),
  connNode: $('conn-node'),
  newSession: $('new-session'),
  newProvider: $('new-provider'),
  newPath: $('new-path'),
  sandbox: $('sandbox'),
  newError: $('new-error'),
  refresh: $('refresh-sessions'),
  sessionList: $('session-list'),
  back: $('back'),
  chatTitle: $('chat-title'),
  chatMeta: $('chat-meta'),
  runState: $('run-state'),
  budget: $('budget'),
  abort: $('abort'),
  notice: $('notice'),
  permissions: $('permissions'),
  transcript: $('transcript'),
  composer: $('composer'),
  message: $('message'),
  send: $('send'),
  queued: $('queued'),
};

/** @type {ChatgateClient | null} */
let client = null;
let unsubscribers = [];
/** Sessions by id, as listed over REST (and updated by session_upserted). */
const sessions = new Map();
/** The session shown, and what the view knows of it. */
const view = {
  id: null,
  running: false,
  runId: null,
  /** requestId → element of a pending approval */
  prompts: new Map(),
  /** runs whose prompt this tab already shows (sent here, or from history) */
  promptedRuns: new Set(),
  /** prompts typed here whose run has not started yet (elements, oldest first) */
  localPrompts: [],
};

// ---- token and sign in -----------------------------------------------------------------------

function remember(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch {
    /* private mode */
  }
}

function recall(key) {
  try {
    return localStorage.getItem(key);
  } catch {
    return null;
  }
}

function storedToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) ?? '';
  } catch {
    return '';
  }
}

function storeToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    /* private mode: the token lives for this page only */
  }
}

/** `?token=` is accepted once: stored, then removed from the address bar. */
function takeTokenFromUrl() {
  const url = new URL(location.href);
  const token = url.searchParams.get('token');
  if (!token) return;
  storeToken(token.trim());
  url.searchParams.delete('token');
  history.replaceState(null, '', url.pathname + url.search + url.hash);
}

function showSignin(message = '') {
  stopClient();
  ui.workspace.hidden = true;
  ui.signOut.hidden = true;
  ui.signin.hidden = false;
  ui.signinError.textContent = message;
  setConn('offline', null);
  ui.tokenInput.focus();
}

async function signIn(token) {
  const probe = new ChatgateClient({ token });
  try {
    await probe.request('GET', '/api/providers/sessions?limit=1');
  } catch (e) {
    if (e.status === 401) return showSignin('That token was refused (expired or not signed by this gateway).');
    return showSignin(`The gateway did not answer: ${e.message}`);
  }
  storeToken(token);
  ui.signin.hidden = true;
  ui.workspace.hidden = false;
  ui.signOut.hidden = false;
  startClient();
  showSandbox();
  await loadSessions();
  openFromHash();
}

/** Shows whether this gateway runs agent CLIs in a sandbox (from `/readyz`). */
async function showSandbox() {
  try {
    const details = await (await fetch('/readyz', { cache: 'no-store' })).json();
    const mode = details.sandbox;
    if (mode !== 'bwrap' && mode !== 'none') return;
    ui.sandbox.dataset.mode = mode;
    ui.sandbox.textContent = mode === 'bwrap' ? 'agents sandboxed' : 'agents NOT sandboxed';
    ui.sandbox.title = mode === 'bwrap'
      ? 'Agent CLIs run in a bubblewrap sandbox: only their project and home are visible.'
      : 'Agent CLIs run without a sandbox (--sandbox none): they can read what the gateway\'s user can.';
    ui.sandbox.hidden = false;
  } catch {
    // The badge is informative only.
  }
}

// ---- the client ------------------------------------------------------------------------------

function startClient() {
  stopClient();
  client = new ChatgateClient({ token: () => storedToken() });
  unsubscribers = [
    client.on('state', ({ state, nodeId }) => setConn(state, nodeId)),
    client.on('connected', ({ nodeId }) => setConn('open', nodeId)),
    client.on('close', onClose),
    client.on('tokenexpired', () => showSignin('Your token expired: sign in with a fresh one.')),
    client.on('subscribed', onSubscribed),
    client.on('history', onHistory),
    client.on('event', ({ sessionId, event }) => {
      if (sessionId === view.id) renderEvent(event, true);
      trackListState(sessionId, event);
    }),
    client.on('session', ({ frame }) => upsertSession(frame.session ?? { sessionId: frame.sessionId })),
    client.on('sent', onQueuedSent),
    client.on('error', onError),
  ];
  client.connect();
}

function stopClient() {
  for (const off of unsubscribers) off();
  unsubscribers = [];
  client?.close();
  client = null;
}

function setConn(state, nodeId) {
  ui.conn.dataset.state = state;
  ui.connState.textContent = state === 'open' ? 'connected' : state;
  ui.connNode.dataset.nodeId = nodeId ?? '';
  ui.connNode.textContent = nodeId ? `node ${nodeId}` : '';
  updateQueued();
}

function onClose({ code, willReconnect, delayMs }) {
  const why = {
    [CloseCode.DRAINING]: 'the node is shutting down',
    [CloseCode.SLOW_CONSUMER]: 'the connection fell behind',
    [CloseCode.TOO_BIG]: 'a message was too large',
    [CloseCode.POLICY]: 'this page’s origin is not allowed by the gateway',
  }[code];
  if (why) notice(`Connection closed: ${why}.${willReconnect ? ` Reconnecting in ${Math.round(delayMs / 100) / 10} s.` : ''}`);
}

function onError({ code, error, sessionId }) {
  if (sessionId && sessionId !== view.id) return;
  notice(`${code}: ${error}`);
  if (['RUN_IN_PROGRESS', 'BACKEND_UNAVAILABLE', 'INVALID_OPTIONS', 'NODE_BUSY'].includes(code)) {
    const failed = view.localPrompts.shift();
    if (failed) failed.dataset.state = 'failed';
  }
}

let noticeTimer = null;
function notice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => {
    ui.notice.hidden = true;
  }, 8000);
}

function updateQueued() {
  const n = client?.queued() ?? 0;
  ui.queued.textContent = n ? `${n} waiting for the connection` : '';
}

// ---- sessions list ---------------------------------------------------------------------------

async function loadSessions() {
  if (!client) return;
  try {
    const data = await client.request('GET', '/api/providers/sessions?limit=200');
    sessions.clear();
    for (const s of data.sessions ?? []) sessions.set(s.sessionId, s);
    renderSessionList();
  } catch (e) {
    if (e.status === 401) return showSignin('Your token was refused: sign in again.');
    notice(`Could not list sessions: ${e.message}`);
  }
}

function upsertSession(session) {
  if (!session?.sessionId) return;
  sessions.set(session.sessionId, { ...(sessions.get(session.sessionId) ?? {}), ...session });
  renderSessionList();
  if (session.sessionId === view.id) renderChatHead();
}

function trackListState(sessionId, event) {
  const s = sessions.get(sessionId);
  if (!s) return;
  const processing = event.kind !== 'complete';
  if (s.isProcessing !== processing) {
    s.isProcessing = processing;
    renderSessionList();
  }
}

function sessionLabel(s) {
  return s.summary || `Session ${s.sessionId.slice(0, 8)}`;
}

function renderSessionList() {
  const items = [...sessions.values()].sort((a, b) => String(b.createdAt ?? '').localeCompare(String(a.createdAt ?? '')));
  ui.sessionList.replaceChildren(
    ...items.map((s) => {
      const li = document.createElement('li');
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'session';
      button.dataset.sessionId = s.sessionId;
      if (s.sessionId === view.id) button.setAttribute('aria-current', 'page');
      const title = document.createElement('span');
      title.className = 'session-title';
      title.textContent = sessionLabel(s);
      const meta = document.createElement('span');
      meta.className = 'session-meta';
      meta.textContent = `${s.provider ?? ''} · ${s.projectPath ?? ''}`;
      button.append(title, meta);
      if (s.isProcessing) {
        const badge = document.createElement('span');
        badge.className = 'badge';
        badge.textContent = 'running';
        button.append(badge);
      }
      button.addEventListener('click', () => selectSession(s.sessionId));
      li.append(button);
      return li;
    }),
  );
  if (items.length === 0) {
    const li = document.createElement('li');
    li.className = 'empty';
    li.textContent = 'No sessions yet.';
    ui.sessionList.append(li);
  }
}

async function createSession(event) {
  event.preventDefault();
  ui.newError.textContent = '';
  const provider = ui.newProvider.value;
  const projectPath = ui.newPath.value.trim();
  remember(PROVIDER_KEY, provider);
  try {
    const data = await client.request('POST', '/api/providers/sessions', { provider, projectPath });
    upsertSession({ ...data, createdAt: new Date().toISOString(), isProcessing: false });
    selectSession(data.sessionId);
  } catch (e) {
    ui.newError.textContent = `${e.code ?? 'ERROR'}: ${e.message}`;
  }
}

// ---- chat view -------------------------------------------------------------------------------

function openFromHash() {
  const match = location.hash.match(/^#\/s\/([A-Za-z0-9._-]{1,120})$/);
  if (match) selectSession(match[1]);
}

function selectSession(id) {
  if (!client) return;
  if (view.id && view.id !== id) client.unsubscribe(view.id);
  const same = view.id === id;
  view.id = id;
  if (location.hash !== `#/s/${id}`) history.replaceState(null, '', `#/s/${id}`);
  document.body.dataset.view = 'chat';
  ui.message.disabled = false;
  ui.send.disabled = false;
  if (!same) {
    resetView();
    renderChatHead();
    renderSessionList();
    client.subscribe(id);
  }
  ui.message.focus();
}

function resetView() {
  ui.transcript.replaceChildren();
  ui.permissions.replaceChildren();
  view.prompts.clear();
  view.promptedRuns.clear();
  view.localPrompts = [];
  view.running = false;
  view.runId = null;
  ui.budget.hidden = true;
  setRunning(false);
}

function renderChatHead() {
  const s = sessions.get(view.id);
  ui.chatTitle.textContent = s ? sessionLabel(s) : view.id ? `Session ${view.id.slice(0, 8)}` : 'No session selected';
  ui.chatMeta.textContent = s ? `${s.provider} · ${s.projectPath}` : '';
}

function setRunning(running, runId = view.runId) {
  view.running = running;
  view.runId = runId;
  ui.runState.dataset.state = running ? 'running' : 'idle';
  ui.runState.textContent = running ? 'running' : 'idle';
  ui.abort.disabled = !running;
}

function onSubscribed({ sessionId, ack }) {
  if (sessionId !== view.id) return;
  setRunning(Boolean(ack.isProcessing), ack.runId ?? null);
  // The ack's list is the truth about pending approvals at subscribe time.
  const pending = new Set();
  for (const p of ack.pendingPermissions ?? []) {
    pending.add(p.requestId);
    addPrompt(p);
  }
  for (const id of [...view.prompts.keys()]) if (!pending.has(id)) removePrompt(id);
  updateQueued();
}

function onHistory({ sessionId, messages, reason }) {
  if (sessionId !== view.id) return;
  ui.transcript.replaceChildren();
  ui.transcript.dataset.history = reason;
  view.promptedRuns.clear();
  for (const m of messages) renderEvent(m, false);
  // A prompt still waiting in the queue stays visible; one already sent is the history's now
  // (or, if its run has not written it yet, comes back with the run's first event).
  view.localPrompts = view.localPrompts.filter((el) => el.dataset.state === 'queued');
  for (const el of view.localPrompts) ui.transcript.append(el);
}

function onQueuedSent({ sessionId, frame }) {
  updateQueued();
  if (sessionId !== view.id || frame.type !== 'chat.send') return;
  const el = view.localPrompts.find((p) => p.dataset.state === 'queued');
  if (el) el.dataset.state = 'sent';
}

function sendMessage(event) {
  event?.preventDefault();
  const content = ui.message.value;
  if (!client || !view.id || !content.trim()) return;
  const el = item('li', 'msg user', content);
  el.dataset.kind = 'prompt';
  el.dataset.local = 'true';
  try {
    el.dataset.state = client.send(view.id, content);
  } catch (e) {
    notice(e.message);
    return;
  }
  view.localPrompts.push(el);
  ui.transcript.append(el);
  ui.message.value = '';
  scrollToEnd();
  updateQueued();
}

function abortRun() {
  if (!client || !view.id) return;
  client.abort(view.id);
  ui.abort.disabled = true;
  updateQueued();
}

// ---- approvals -------------------------------------------------------------------------------

function addPrompt(p) {
  if (!p?.requestId || view.prompts.has(p.requestId)) return;
  const box = document.createElement('div');
  box.className = 'prompt';
  box.dataset.requestId = p.requestId;
  box.setAttribute('role', 'group');
  const titleId = `prompt-${p.requestId}`;
  box.setAttribute('aria-labelledby', titleId);
  const title = document.createElement('p');
  title.id = titleId;
  title.className = 'prompt-title';
  title.textContent = `Allow ${p.toolName ?? 'this tool'}?`;
  const input = document.createElement('pre');
  input.className = 'prompt-input';
  input.textContent = pretty(p.input);
  const allow = button('Allow', 'allow', () => answer(p.requestId, true, box));
  const deny = button('Deny', 'deny', () => answer(p.requestId, false, box));
  const actions = document.createElement('div');
  actions.className = 'prompt-actions';
  actions.append(allow, deny);
  box.append(title, input, actions);
  ui.permissions.append(box);
  view.prompts.set(p.requestId, box);
}

function answer(requestId, allow, box) {
  if (!client) return;
  client.respondPermission(requestId, allow, { sessionId: view.id });
  box.dataset.state = 'answered';
  for (const b of box.querySelectorAll('button')) b.disabled = true;
}

function removePrompt(requestId) {
  view.prompts.get(requestId)?.remove();
  view.prompts.delete(requestId);
}

function clearPrompts() {
  for (const id of [...view.prompts.keys()]) removePrompt(id);
}

// ---- rendering events ------------------------------------------------------------------------

function item(tag, className, text) {
  const el = document.createElement(tag);
  el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function button(label, className, onClick) {
  const b = document.createElement('button');
  b.type = 'button';
  b.className = className;
  b.textContent = label;
  b.addEventListener('click', onClick);
  return b;
}

function pretty(value) {
  if (typeof value === 'string') return value;
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

function mark(el, event) {
  if (typeof event.seq === 'number') el.dataset.seq = String(event.seq);
  el.dataset.kind = event.kind;
  if (event.runId) el.dataset.runId = event.runId;
  return el;
}

/** A hidden marker carrying an event's seq inside an element that already shows it. */
function seqMarker(event, tag = 'span') {
  const el = mark(document.createElement(tag), event);
  el.hidden = true;
  return el;
}

function lastItem() {
  return ui.transcript.lastElementChild;
}

function openStream() {
  const last = lastItem();
  return last?.classList.contains('streaming') ? last : null;
}

function scrollToEnd() {
  const t = ui.transcript;
  if (t.scrollHeight - t.scrollTop - t.clientHeight < 200) t.scrollTop = t.scrollHeight;
}

/** Renders one event (live, or from history) at the end of the transcript. */
function renderEvent(event, live) {
  if (live) noteRun(event);
  const t = ui.transcript;
  switch (event.kind) {
    case 'stream_delta': {
      let bubble = openStream();
      if (!bubble) {
        bubble = item('li', 'msg assistant streaming');
        bubble.dataset.kind = 'stream';
        if (event.runId) bubble.dataset.runId = event.runId;
        t.append(bubble);
        t.setAttribute('aria-busy', 'true');
      }
      bubble.append(mark(item('span', 'chunk', event.content ?? ''), event));
      break;
    }
    case 'stream_end': {
      const bubble = openStream();
      if (bubble) {
        bubble.classList.remove('streaming');
        bubble.append(seqMarker(event));
      } else {
        t.append(seqMarker(event, 'li'));
      }
      t.removeAttribute('aria-busy');
      break;
    }
    case 'text': {
      const role = event.role === 'user' ? 'user' : 'assistant';
      if (role === 'user' && event.runId) view.promptedRuns.add(event.runId);
      if (role === 'user' && typeof event.seq !== 'number') {
        // A prompt from the history: it stands for the run that follows it.
        const el = item('li', 'msg user', contentText(event.content));
        el.dataset.kind = 'prompt';
        t.append(el);
        break;
      }
      if (role === 'assistant' && repeatsLastReply(event)) {
        // The whole text after its stream (live), or after the stream's merged text (history):
        // already shown.
        lastItem().append(seqMarker(event));
        break;
      }
      t.append(mark(item('li', `msg ${role}`, contentText(event.content)), event));
      break;
    }
    case 'thinking': {
      const el = mark(item('li', 'item thinking'), event);
      const details = document.createElement('details');
      details.append(item('summary', '', 'Thinking'), item('p', 'thinking-text', contentText(event.content)));
      el.append(details);
      t.append(el);
      break;
    }
    case 'tool_use': {
      const el = mark(item('li', 'item tool'), event);
      if (event.toolId) el.dataset.toolId = event.toolId;
      const details = document.createElement('details');
      details.append(item('summary', '', `Tool: ${event.toolName ?? 'unknown'}`), item('pre', 'tool-input', pretty(event.toolInput)));
      el.append(details);
      t.append(el);
      break;
    }
    case 'tool_result': {
      const owner = event.toolId ? t.querySelector(`li.tool[data-tool-id="${CSS.escape(event.toolId)}"] details`) : null;
      const result = mark(item('pre', `tool-result${event.isError ? ' is-error' : ''}`, pretty(event.content)), event);
      if (owner) {
        owner.append(result);
        const summary = owner.querySelector('summary');
        if (summary) summary.textContent += event.isError ? ' · error' : ' · done';
        if (event.isError) owner.parentElement.classList.add('is-error');
      } else {
        const el = item('li', `item tool${event.isError ? ' is-error' : ''}`);
        el.append(item('span', 'label', event.isError ? 'Tool error' : 'Tool result'), result);
        t.append(el);
      }
      break;
    }
    case 'error':
      t.append(mark(item('li', 'item error', `Error: ${contentText(event.content)}`), event));
      break;
    case 'status': {
      const budget = event.tokenBudget;
      if (budget && typeof budget.used === 'number') {
        ui.budget.hidden = false;
        ui.budget.dataset.used = String(budget.used);
        ui.budget.textContent = budget.total
          ? `${budget.used.toLocaleString()} / ${Number(budget.total).toLocaleString()} tokens`
          : `${budget.used.toLocaleString()} tokens`;
        t.append(seqMarker(event, 'li'));
      } else {
        t.append(mark(item('li', 'item status', `Status: ${event.text ?? pretty(event)}`), event));
      }
      break;
    }
    case 'permission_request':
      t.append(mark(item('li', 'item permission', `Approval requested: ${event.toolName ?? 'tool'}`), event));
      if (live) addPrompt(event);
      break;
    case 'permission_resolved':
      t.append(mark(item('li', 'item permission', event.allow ? 'Approved' : 'Denied'), event));
      if (live) removePrompt(event.requestId);
      break;
    case 'permission_cancelled':
      t.append(mark(item('li', 'item permission', `Approval request cancelled (${event.reason ?? 'cancelled'})`), event));
      if (live) removePrompt(event.requestId);
      break;
    case 'complete': {
      let text;
      if (event.aborted) text = event.error ? `Run ended: ${event.error}` : 'Run aborted';
      else if (event.success) text = 'Run finished';
      else text = `Run failed${event.error ? `: ${event.error}` : ''} (exit ${event.exitCode})`;
      const el = mark(item('li', `item complete${event.success ? ' ok' : ' failed'}`, text), event);
      el.dataset.success = String(Boolean(event.success));
      el.dataset.aborted = String(Boolean(event.aborted));
      el.dataset.exitCode = String(event.exitCode);
      // A run cut short (owner lost, aborted) leaves its stream open: close it.
      openStream()?.classList.remove('streaming');
      t.append(el);
      t.removeAttribute('aria-busy');
      if (live) {
        clearPrompts();
        setRunning(false, null);
      }
      break;
    }
    default:
      t.append(mark(item('li', 'item other', `${event.kind}: ${pretty(event)}`), event));
  }
  if (live) scrollToEnd();
}

function contentText(content) {
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) return content.map((c) => (typeof c === 'string' ? c : c?.text ?? '')).join('');
  return pretty(content);
}

/** Whether an assistant `text` repeats the reply just shown for the same run. */
function repeatsLastReply(event) {
  const last = lastItem();
  if (!last || !last.classList.contains('assistant') || last.classList.contains('streaming')) return false;
  if (event.runId && last.dataset.runId && event.runId !== last.dataset.runId) return false;
  const shown = last.dataset.kind === 'stream'
    ? [...last.querySelectorAll('span.chunk')].map((s) => s.textContent).join('')
    : last.textContent;
  return shown === contentText(event.content);
}

/** A live event of a run this view has not seen start: show the run's prompt. */
function noteRun(event) {
  if (!event.runId) return;
  if (event.kind !== 'complete') setRunning(true, event.runId);
  if (view.promptedRuns.has(event.runId)) return;
  view.promptedRuns.add(event.runId);
  const local = view.localPrompts.shift();
  if (local) {
    // Typed here: its run has started.
    local.dataset.state = 'sent';
    local.dataset.runId = event.runId;
    return;
  }
  // Typed in another tab: the prompt is in the history, just before the run's first event.
  const placeholder = item('li', 'msg user pending-prompt', '…');
  placeholder.dataset.kind = 'prompt';
  placeholder.dataset.runId = event.runId;
  ui.transcript.append(placeholder);
  fillPrompt(placeholder, event.sessionId, event.seq);
}

async function fillPrompt(placeholder, sessionId, firstSeq) {
  // The owner writes history in batches off the live path: the prompt may take a moment.
  for (const pause of [0, 250, 500, 1000, 2000, 4000]) {
    if (pause) await new Promise((resolve) => setTimeout(resolve, pause));
    if (!client || view.id !== sessionId || !placeholder.isConnected) return;
    let messages;
    try {
      messages = await client.loadHistory(sessionId);
    } catch {
      continue;
    }
    let prompt = null;
    for (const m of messages) {
      if (typeof m.seq === 'number' && m.seq >= firstSeq) break;
      if (m.kind === 'text' && m.role === 'user') prompt = m;
    }
    if (prompt && (!prompt.runId || prompt.runId === placeholder.dataset.runId)) {
      placeholder.textContent = contentText(prompt.content);
      placeholder.classList.remove('pending-prompt');
      return;
    }
  }
  placeholder.remove();
}

// ---- wiring ----------------------------------------------------------------------------------

ui.signinForm.addEventListener('submit', (e) => {
  e.preventDefault();
  const token = ui.tokenInput.value.trim();
  if (token) signIn(token);
});
ui.signOut.addEventListener('click', () => {
  storeToken('');
  view.id = null;
  history.replaceState(null, '', location.pathname);
  showSignin();
});
ui.newSession.addEventListener('submit', createSession);
ui.refresh.addEventListener('click', loadSessions);
ui.back.addEventListener('click', () => {
  document.body.dataset.view = 'list';
  ui.sessionList.querySelector('[aria-current="page"]')?.focus();
});
ui.abort.addEventListener('click', abortRun);
ui.composer.addEventListener('submit', sendMessage);
ui.message.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) sendMessage(e);
});
window.addEventListener('hashchange', openFromHash);

const lastProvider = recall(PROVIDER_KEY);
if (lastProvider && [...ui.newProvider.options].some((o) => o.value === lastProvider)) ui.newProvider.value = lastProvider;
takeTokenFromUrl();
const initial = storedToken();
if (initial) signIn(initial);
else showSignin();
