// The chatgate web console: sign in with a token, list and create sessions, follow one session's
// chat (every event kind), abort runs, answer tool approvals, rename / archive / restore /
// delete sessions. Plain DOM, no build step; the wire protocol is handled by the client module
// (/client/chatgate.js), assistant Markdown by /markdown.js (DOM nodes only, never HTML).
import { ChatgateClient, CloseCode, newClientRequestId } from '/client/chatgate.js';
import { renderMarkdown } from '/markdown.js';

const TOKEN_KEY = 'chatgate.token';
const PROVIDER_KEY = 'chatgate.provider';
/** First prompts of sessions without a summary, by id: their titles (this browser's cache). */
const TITLES_KEY = 'chatgate.titles';
/** How far from the bottom (px) the transcript still counts as "at the bottom". */
const STICK_PX = 48;
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
  providerHelp: $('provider-help'),
  sandbox: $('sandbox'),
  newError: $('new-error'),
  refresh: $('refresh-sessions'),
  showArchived: $('show-archived'),
  sessionsTitle: $('sessions-title'),
  sessionList: $('session-list'),
  sessionActions: $('session-actions'),
  rename: $('rename'),
  archive: $('archive'),
  remove: $('delete'),
  emptyChat: $('empty-chat'),
  newMessages: $('new-messages'),
  dialog: $('dialog'),
  dialogForm: $('dialog-form'),
  dialogTitle: $('dialog-title'),
  dialogText: $('dialog-text'),
  dialogLabel: $('dialog-label'),
  dialogInput: $('dialog-input'),
  dialogOk: $('dialog-ok'),
  dialogCancel: $('dialog-cancel'),
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
/** Archived sessions, listed over REST (`?archived=true`) while the Archived view is shown. */
const archived = new Map();
/** Which list the sidebar shows: `live` or `archived`. */
let listMode = 'live';
/** The session shown, and what the view knows of it. */
const view = {
  id: null,
  running: false,
  runId: null,
  /** requestId → element of a pending approval */
  prompts: new Map(),
  /** runs whose prompt this tab already shows (sent here, or from history) */
  promptedRuns: new Set(),
  /**
   * prompts typed here (or left by the previous page) that the gateway has not answered yet:
   * elements, oldest first, each with its `data-client-request-id`
   */
  localPrompts: [],
  /** whether the transcript follows new output (the user is at the bottom) */
  stick: true,
  /** whether the session's history has been shown */
  loaded: false,
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
  loadProviders();
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
    client.on('accepted', onAccepted),
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
  // Prompts that went out on this socket without an answer may or may not have arrived: the
  // client sends them again, with the same key, after the reconnect (the gateway runs each once).
  for (const el of view.localPrompts) if (el.dataset.state === 'sent') el.dataset.state = 'resending';
}

function onError({ code, error, sessionId, clientRequestId, duplicate, willResend }) {
  if (sessionId && sessionId !== view.id) return;
  const el = clientRequestId === undefined ? null : localPrompt(clientRequestId);
  if (willResend) {
    // The gateway cannot tell whether the run started: the same prompt goes again, same key.
    notice(`${code}: ${error} — sending it again.`, 'info');
    if (el) el.dataset.state = 'resending';
    return;
  }
  notice(duplicate ? `${code}: ${error} (the answer to this prompt's first attempt)` : `${code}: ${error}`);
  if (!el) return;
  // Refused: nothing was started. Shown as failed (again, if a history reload had taken it out).
  view.localPrompts = view.localPrompts.filter((p) => p !== el);
  el.dataset.state = 'failed';
  if (!el.isConnected) {
    ui.transcript.append(el);
    contentAdded();
  }
}

/** The unanswered prompt of this view with that key, or null. */
function localPrompt(clientRequestId) {
  return view.localPrompts.find((el) => el.dataset.clientRequestId === clientRequestId) ?? null;
}

/** A prompt bubble typed in this browser, for the send with that key. */
function promptElement(content, clientRequestId, state) {
  const el = item('li', 'msg user', content);
  el.dataset.kind = 'prompt';
  el.dataset.local = 'true';
  el.dataset.clientRequestId = clientRequestId;
  el.dataset.state = state;
  return el;
}

/**
 * `chat_accepted`: the prompt with that key runs as `runId` — started now, or by an earlier
 * attempt (`duplicate`). Either way the view shows the prompt once, before the run's events.
 */
function onAccepted({ sessionId, clientRequestId, runId, content }) {
  if (sessionId !== view.id) return;
  let el = localPrompt(clientRequestId);
  view.localPrompts = view.localPrompts.filter((p) => p !== el);
  if (!runId) return;
  if (view.promptedRuns.has(runId)) {
    // The run's prompt is shown already: from the history, or as a placeholder its first
    // event made (the replay came before this answer), which the known text fills.
    const shown = [...ui.transcript.querySelectorAll('[data-kind="prompt"]')].find(
      (p) => p !== el && p.dataset.runId === runId,
    );
    if (shown?.classList.contains('pending-prompt') && content !== null) {
      shown.textContent = content;
      shown.classList.remove('pending-prompt');
    }
    if (shown) el?.remove();
    else if (el) markStarted(el, runId);
    return;
  }
  view.promptedRuns.add(runId);
  if (!el) {
    if (content === null) return; // not sent from this browser: the history has it
    el = promptElement(content, clientRequestId, 'sent');
  }
  markStarted(el, runId);
}

/** A local prompt whose run started: shown (at the end, before the run's events). */
function markStarted(el, runId) {
  el.dataset.state = 'sent';
  el.dataset.runId = runId;
  if (!el.isConnected) {
    ui.transcript.append(el);
    contentAdded();
  }
}

let noticeTimer = null;
function notice(text, kind = 'error') {
  ui.notice.dataset.kind = kind;
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

// ---- providers -------------------------------------------------------------------------------

/**
 * Fills the provider picker from `GET /api/providers`: the enabled providers in order, each
 * marked with whether its CLI was found on this node; the default is the last one used if it
 * is available, else the first available one.
 */
async function loadProviders() {
  let providers;
  try {
    providers = (await client.request('GET', '/api/providers')).providers ?? [];
  } catch {
    return; // an older gateway: keep the built-in list
  }
  if (!providers.length) return;
  ui.newProvider.replaceChildren(
    ...providers.map((p) => {
      const option = document.createElement('option');
      option.value = p.id;
      option.dataset.available = String(Boolean(p.available));
      option.dataset.program = p.program ?? '';
      option.textContent = p.available ? p.id : `${p.id} — CLI not found`;
      return option;
    }),
  );
  const last = recall(PROVIDER_KEY);
  const available = providers.filter((p) => p.available);
  const pick = available.find((p) => p.id === last) ?? available[0] ?? providers[0];
  ui.newProvider.value = pick.id;
  describeProvider();
}

function describeProvider() {
  const option = ui.newProvider.selectedOptions[0];
  if (!option || option.dataset.available !== 'false') {
    ui.providerHelp.textContent = '';
    ui.providerHelp.hidden = true;
    return;
  }
  ui.providerHelp.hidden = false;
  ui.providerHelp.textContent = `The ${option.dataset.program || option.value} program was not found on this node: its runs will fail.`;
}

// ---- sessions list ---------------------------------------------------------------------------

async function loadSessions() {
  if (!client) return;
  try {
    if (listMode === 'archived') {
      const data = await client.request('GET', '/api/providers/sessions?archived=true&limit=200');
      archived.clear();
      for (const s of data.sessions ?? []) archived.set(s.sessionId, s);
    } else {
      const data = await client.request('GET', '/api/providers/sessions?limit=200');
      sessions.clear();
      for (const s of data.sessions ?? []) sessions.set(s.sessionId, s);
    }
    renderSessionList();
    fillTitles();
  } catch (e) {
    if (e.status === 401) return showSignin('Your token was refused: sign in again.');
    notice(`Could not list sessions: ${e.message}`);
  }
}

function showList(mode) {
  listMode = mode;
  ui.showArchived.setAttribute('aria-pressed', String(mode === 'archived'));
  ui.showArchived.textContent = mode === 'archived' ? 'Back to sessions' : 'Archived';
  ui.sessionsTitle.textContent = mode === 'archived' ? 'Archived sessions' : 'Sessions';
  renderSessionList();
  loadSessions();
}

function upsertSession(session) {
  if (!session?.sessionId) return;
  if (session.isArchived) return;
  sessions.set(session.sessionId, { ...(sessions.get(session.sessionId) ?? {}), ...session });
  renderSessionList();
  if (session.sessionId === view.id) renderChatHead();
}

function trackListState(sessionId, event) {
  const s = sessions.get(sessionId);
  if (!s) return;
  s.updatedAt = new Date().toISOString();
  const processing = event.kind !== 'complete';
  if (s.isProcessing !== processing) {
    s.isProcessing = processing;
    renderSessionList();
  }
}

// Titles: the summary, else the session's first prompt (cached in this browser, or read from
// the oldest history row), shortened to one line.

function loadTitles() {
  try {
    return JSON.parse(localStorage.getItem(TITLES_KEY) ?? '{}') ?? {};
  } catch {
    return {};
  }
}

const titles = loadTitles();

function rememberTitle(id, prompt) {
  const text = shorten(prompt);
  if (!id || !text || titles[id]) return false;
  titles[id] = text;
  const ids = Object.keys(titles);
  for (const old of ids.slice(0, Math.max(0, ids.length - 500))) delete titles[old];
  remember(TITLES_KEY, JSON.stringify(titles));
  return true;
}

function shorten(text, max = 80) {
  const line = String(text ?? '').replace(/\s+/g, ' ').trim();
  return line.length > max ? `${line.slice(0, max - 1).trimEnd()}…` : line;
}

function sessionLabel(s) {
  return shorten(s.summary) || titles[s.sessionId] || 'New session';
}

/** Reads the first prompt of listed sessions that have history but no title yet. */
let filling = false;
async function fillTitles() {
  if (filling || !client) return;
  filling = true;
  try {
    const missing = [...sessions.values(), ...archived.values()]
      .filter((s) => !s.summary && !titles[s.sessionId] && Number(s.lastSeq) > 0)
      .slice(0, 20);
    for (const s of missing) {
      if (!client) return;
      try {
        const base = `/api/providers/sessions/${encodeURIComponent(s.sessionId)}/messages`;
        const { total } = await client.request('GET', `${base}?limit=1`);
        if (!total) continue;
        const { messages } = await client.request('GET', `${base}?limit=1&offset=${total - 1}`);
        const first = messages?.[0];
        if (first?.kind === 'text' && first.role === 'user' && rememberTitle(s.sessionId, contentText(first.content))) {
          renderSessionList();
          if (s.sessionId === view.id) renderChatHead();
        }
      } catch {
        // A title is a nicety: the next list load tries again.
      }
    }
  } finally {
    filling = false;
  }
}

/** "3 min ago" for an ISO time. */
function relativeTime(iso, now = Date.now()) {
  const then = Date.parse(iso ?? '');
  if (Number.isNaN(then)) return '';
  const s = Math.max(0, Math.round((now - then) / 1000));
  if (s < 45) return 'just now';
  const m = Math.round(s / 60);
  if (m < 60) return `${m} min ago`;
  const h = Math.round(m / 60);
  if (h < 24) return `${h} h ago`;
  const d = Math.round(h / 24);
  if (d === 1) return 'yesterday';
  if (d < 7) return `${d} days ago`;
  return new Date(then).toLocaleDateString();
}

function timeElement(iso) {
  const time = document.createElement('time');
  time.className = 'ago';
  time.dateTime = iso ?? '';
  time.title = iso ? new Date(iso).toLocaleString() : '';
  time.textContent = relativeTime(iso);
  return time;
}

function projectName(path) {
  const parts = String(path ?? '').split('/').filter(Boolean);
  return parts.at(-1) ?? '/';
}

function sessionMeta(s) {
  const meta = document.createElement('span');
  meta.className = 'session-meta';
  const project = document.createElement('span');
  project.className = 'project';
  project.title = s.projectPath ?? '';
  project.textContent = projectName(s.projectPath);
  meta.append(`${s.provider ?? ''} · `, project, ' · ', timeElement(s.updatedAt ?? s.createdAt));
  return meta;
}

function renderSessionList() {
  const source = listMode === 'archived' ? archived : sessions;
  const items = [...source.values()].sort((a, b) => String(b.createdAt ?? '').localeCompare(String(a.createdAt ?? '')));
  ui.sessionList.dataset.mode = listMode;
  ui.sessionList.replaceChildren(...items.map((s) => (listMode === 'archived' ? archivedItem(s) : liveItem(s))));
  if (items.length === 0) {
    const li = document.createElement('li');
    li.className = 'empty';
    li.textContent = listMode === 'archived' ? 'No archived sessions.' : 'No sessions yet: create one above.';
    ui.sessionList.append(li);
  }
}

function liveItem(s) {
  const li = document.createElement('li');
  const button = document.createElement('button');
  button.type = 'button';
  button.className = 'session';
  button.dataset.sessionId = s.sessionId;
  if (s.sessionId === view.id) button.setAttribute('aria-current', 'page');
  const title = document.createElement('span');
  title.className = 'session-title';
  title.textContent = sessionLabel(s);
  button.append(title, sessionMeta(s));
  if (s.isProcessing) {
    const badge = document.createElement('span');
    badge.className = 'badge';
    badge.textContent = 'running';
    button.append(badge);
  }
  button.addEventListener('click', () => selectSession(s.sessionId));
  li.append(button);
  return li;
}

function archivedItem(s) {
  const li = document.createElement('li');
  li.className = 'archived-session';
  li.dataset.sessionId = s.sessionId;
  const title = document.createElement('span');
  title.className = 'session-title';
  title.textContent = sessionLabel(s);
  const actions = document.createElement('div');
  actions.className = 'row-actions';
  actions.append(
    button('Restore', 'small restore', () => restoreSession(s.sessionId)),
    button('Delete', 'small danger delete', () => deleteSession(s.sessionId, sessionLabel(s))),
  );
  li.append(title, sessionMeta(s), actions);
  return li;
}

async function createSession(event) {
  event.preventDefault();
  ui.newError.textContent = '';
  const provider = ui.newProvider.value;
  const projectPath = ui.newPath.value.trim();
  remember(PROVIDER_KEY, provider);
  try {
    const data = await client.request('POST', '/api/providers/sessions', { provider, projectPath });
    const now = new Date().toISOString();
    if (listMode !== 'live') showList('live');
    upsertSession({ ...data, summary: '', createdAt: now, updatedAt: now, isProcessing: false });
    selectSession(data.sessionId);
  } catch (e) {
    ui.newError.textContent = `${e.code ?? 'ERROR'}: ${e.message}`;
  }
}

// ---- rename, archive, restore, delete --------------------------------------------------------

/**
 * A modal question: resolves to the input's value (or true without input) when confirmed,
 * null when cancelled.
 */
function ask({ title, text = '', input = null, ok = 'OK', danger = false }) {
  return new Promise((resolve) => {
    ui.dialogTitle.textContent = title;
    ui.dialogText.textContent = text;
    ui.dialogText.hidden = !text;
    ui.dialogLabel.hidden = input === null;
    ui.dialogInput.hidden = input === null;
    ui.dialogInput.required = input !== null;
    ui.dialogInput.value = input ?? '';
    ui.dialogOk.textContent = ok;
    ui.dialogOk.classList.toggle('danger-solid', danger);
    const done = (value) => {
      ui.dialogForm.removeEventListener('submit', onSubmit);
      ui.dialogCancel.removeEventListener('click', onCancel);
      ui.dialog.removeEventListener('cancel', onCancel);
      if (ui.dialog.open) ui.dialog.close();
      resolve(value);
    };
    const onSubmit = (e) => {
      e.preventDefault();
      if (input === null) return done(true);
      const value = ui.dialogInput.value.trim();
      if (value) done(value);
    };
    const onCancel = (e) => {
      e.preventDefault();
      done(null);
    };
    ui.dialogForm.addEventListener('submit', onSubmit);
    ui.dialogCancel.addEventListener('click', onCancel);
    ui.dialog.addEventListener('cancel', onCancel);
    ui.dialog.showModal();
    (input === null ? ui.dialogCancel : ui.dialogInput).focus();
    if (input !== null) ui.dialogInput.select();
  });
}

async function renameSession() {
  const s = sessions.get(view.id);
  if (!client || !view.id) return;
  const current = s ? sessionLabel(s) : '';
  const summary = await ask({ title: 'Rename session', input: current === 'New session' ? '' : current, ok: 'Save' });
  if (!summary) return;
  try {
    await client.request('PUT', `/api/providers/sessions/${encodeURIComponent(view.id)}`, { summary });
    upsertSession({ sessionId: view.id, summary });
  } catch (e) {
    notice(`Could not rename: ${e.message}`);
  }
}

async function archiveSession() {
  const id = view.id;
  if (!client || !id) return;
  try {
    await client.request('DELETE', `/api/providers/sessions/${encodeURIComponent(id)}`);
  } catch (e) {
    return notice(`Could not archive: ${e.message}`);
  }
  const s = sessions.get(id);
  sessions.delete(id);
  if (s) archived.set(id, { ...s, isArchived: true, isProcessing: false });
  closeSession();
  renderSessionList();
  notice('Session archived: find it under Archived.', 'info');
}

async function restoreSession(id) {
  try {
    await client.request('POST', `/api/providers/sessions/${encodeURIComponent(id)}/restore`);
  } catch (e) {
    return notice(`Could not restore: ${e.message}`);
  }
  const s = archived.get(id);
  archived.delete(id);
  if (s) sessions.set(id, { ...s, isArchived: false });
  renderSessionList();
  notice('Session restored.', 'info');
}

async function deleteSession(id, label) {
  const sure = await ask({
    title: 'Delete session?',
    text: `“${label}” and its whole history will be deleted. This cannot be undone.`,
    ok: 'Delete',
    danger: true,
  });
  if (!sure) return;
  try {
    await client.request('DELETE', `/api/providers/sessions/${encodeURIComponent(id)}?force=true`);
  } catch (e) {
    return notice(`Could not delete: ${e.message}`);
  }
  sessions.delete(id);
  archived.delete(id);
  delete titles[id];
  remember(TITLES_KEY, JSON.stringify(titles));
  if (view.id === id) closeSession();
  renderSessionList();
  notice('Session deleted.', 'info');
}

/** Leaves the open session: nothing selected, the list shown (on a phone). */
function closeSession() {
  if (view.id) client?.unsubscribe(view.id);
  view.id = null;
  history.replaceState(null, '', location.pathname);
  resetView();
  renderChatHead();
  ui.message.disabled = true;
  ui.send.disabled = true;
  document.body.dataset.view = 'list';
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
    // Prompts a previous page of this tab sent without an answer: the client sends them again;
    // shown once answered (accepted, or refused).
    view.localPrompts = client.pendingSends(id).map((p) => promptElement(p.content, p.clientRequestId, 'resending'));
    view.loaded = false;
    updateEmpty();
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
  view.stick = true;
  autoTop = 0;
  view.loaded = false;
  ui.newMessages.hidden = true;
  ui.budget.hidden = true;
  setRunning(false);
  updateEmpty();
}

function renderChatHead() {
  const s = sessions.get(view.id);
  ui.chatTitle.textContent = s ? sessionLabel(s) : view.id ? `Session ${view.id.slice(0, 8)}` : 'No session selected';
  ui.chatMeta.replaceChildren();
  if (s) ui.chatMeta.append(`${s.provider} · ${s.projectPath}`);
  ui.sessionActions.hidden = !view.id;
  document.body.dataset.session = view.id ? 'open' : 'none';
}

function setRunning(running, runId = view.runId) {
  view.running = running;
  view.runId = runId;
  ui.runState.dataset.state = running ? 'running' : 'idle';
  ui.runState.textContent = running ? 'running' : 'idle';
  ui.abort.disabled = !running;
  ui.abort.title = running ? 'Stop this run' : 'No run is going';
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
  // A prompt still waiting in the queue stays visible. One that went out is in the history if
  // it arrived; if it did not, the gateway's answer to its resend (chat_accepted) shows it.
  for (const el of view.localPrompts) if (el.dataset.state === 'queued') ui.transcript.append(el);
  const first = messages.find((m) => m.kind === 'text' && m.role === 'user');
  if (first && rememberTitle(sessionId, contentText(first.content))) {
    renderSessionList();
    renderChatHead();
  }
  view.loaded = true;
  // Opening a session shows its newest message; a reloaded history keeps following if it was.
  if (reason === 'initial') view.stick = true;
  if (view.stick) autoTop = 0;
  contentAdded();
}

function onQueuedSent({ sessionId, frame }) {
  updateQueued();
  if (sessionId !== view.id || frame.type !== 'chat.send') return;
  const el = localPrompt(frame.clientRequestId);
  if (el) el.dataset.state = 'sent';
}

function sendMessage(event) {
  event?.preventDefault();
  const content = ui.message.value;
  if (!client || !view.id || !content.trim()) return;
  // One key per prompt: however often it is sent again, the gateway runs it once.
  const clientRequestId = newClientRequestId();
  const el = promptElement(content, clientRequestId, 'queued');
  try {
    el.dataset.state = client.send(view.id, content, undefined, { clientRequestId });
  } catch (e) {
    notice(e.message);
    return;
  }
  view.localPrompts.push(el);
  ui.transcript.append(el);
  ui.message.value = '';
  if (rememberTitle(view.id, content)) {
    renderSessionList();
    renderChatHead();
  }
  // Whoever sends wants to see the answer.
  scrollToBottom();
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
  title.textContent = `Allow ${p.displayName || p.toolName || 'this tool'}?`;
  // The CLI's own words for the ask, when it gives them (Claude: why it asks, which path).
  const why = [p.description, p.decisionReason, p.blockedPath && `Path: ${p.blockedPath}`].filter(
    (line) => typeof line === 'string' && line,
  );
  const reason = document.createElement('p');
  reason.className = 'prompt-reason';
  reason.textContent = why.join(' — ');
  const input = document.createElement('pre');
  input.className = 'prompt-input';
  input.tabIndex = 0; // scrollable with the keyboard
  input.setAttribute('aria-label', 'Tool input');
  input.textContent = approvalText(p.input);
  const allow = button('Allow', 'allow', () => answer(p.requestId, true, box));
  const deny = button('Deny', 'deny', () => answer(p.requestId, false, box));
  const actions = document.createElement('div');
  actions.className = 'prompt-actions';
  actions.append(allow, deny);
  box.append(title, ...(why.length ? [reason] : []), input, actions);
  ui.permissions.append(box);
  view.prompts.set(p.requestId, box);
}

/** A tool's input for an approval: a command as it will run, else the input as JSON. */
function approvalText(input) {
  if (input && typeof input === 'object' && !Array.isArray(input) && typeof input.command === 'string') {
    const { command, ...rest } = input;
    return Object.keys(rest).length ? `${command}\n\n${pretty(rest)}` : command;
  }
  return pretty(input);
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

// Scrolling: the transcript follows new output while the user is at its bottom (view.stick);
// scrolled up, new output shows a "New messages" button instead of moving the text away.

function atBottom() {
  const t = ui.transcript;
  return t.scrollHeight - t.scrollTop - t.clientHeight <= STICK_PX;
}

/** Where this script last scrolled the transcript to (it only grows while followed). */
let autoTop = 0;

function scrollToBottom() {
  const t = ui.transcript;
  t.scrollTop = t.scrollHeight;
  autoTop = t.scrollTop;
  view.stick = true;
  ui.newMessages.hidden = true;
}

/**
 * Follows the transcript's end while stuck to it. A user who scrolled up since our last
 * scroll is not pulled back, even before the browser reported that scroll.
 */
function follow() {
  if (view.stick && ui.transcript.scrollTop < autoTop - 2 && !atBottom()) view.stick = false;
  if (view.stick) scrollToBottom();
  else if (!atBottom()) ui.newMessages.hidden = false;
}

/** After the transcript grew: follow it, or offer to. */
function contentAdded() {
  updateEmpty();
  follow();
}

function updateEmpty() {
  const empty = !ui.transcript.querySelector('li:not([hidden])');
  ui.emptyChat.hidden = Boolean(view.id) && !empty;
  if (!view.id) ui.emptyChat.textContent = 'Pick a session, or create one.';
  else if (!view.loaded) ui.emptyChat.textContent = 'Loading the conversation…';
  else ui.emptyChat.textContent = 'Send a message to start the conversation.';
}

// ---- Markdown in assistant bubbles ------------------------------------------------------------

/** Markdown source of each rendered assistant bubble. */
const sources = new WeakMap();
const pendingRenders = new Set();
let renderTimer = null;

/** Sets a bubble's Markdown source and renders it (now, or soon while it streams). */
function setMarkdown(bubble, text, now = true) {
  sources.set(bubble, text);
  if (now) return renderBubble(bubble);
  pendingRenders.add(bubble);
  renderTimer ??= setTimeout(() => {
    renderTimer = null;
    for (const b of pendingRenders) renderBubble(b);
    pendingRenders.clear();
    follow();
  }, 80);
}

function renderBubble(bubble) {
  pendingRenders.delete(bubble);
  let md = bubble.querySelector(':scope > .md');
  if (!md) {
    md = item('div', 'md');
    bubble.append(md);
  }
  md.replaceChildren(renderMarkdown(sources.get(bubble) ?? ''));
}

function assistantBubble(text, event) {
  const el = mark(item('li', 'msg assistant'), event);
  setMarkdown(el, text);
  return el;
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
        // The chunks as they came (each with its seq and text in data-text, so the bubble's
        // text is only what it shows), hidden: the bubble shows their Markdown.
        const chunks = item('span', 'chunks');
        chunks.hidden = true;
        bubble.append(chunks);
        t.append(bubble);
        t.setAttribute('aria-busy', 'true');
      }
      const chunk = String(event.content ?? '');
      const chunkEl = mark(item('span', 'chunk'), event);
      chunkEl.dataset.text = chunk;
      bubble.querySelector(':scope > .chunks').append(chunkEl);
      setMarkdown(bubble, (sources.get(bubble) ?? '') + chunk, !sources.has(bubble));
      break;
    }
    case 'stream_end': {
      const bubble = openStream();
      if (bubble) {
        bubble.classList.remove('streaming');
        bubble.querySelector(':scope > .chunks').append(seqMarker(event));
        renderBubble(bubble);
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
        if (event.runId) el.dataset.runId = event.runId;
        t.append(el);
        break;
      }
      if (role === 'assistant' && repeatsLastReply(event)) {
        // The whole text after its stream (live), or after the stream's merged text (history):
        // already shown; the whole text keeps the line breaks a word-by-word stream may lose.
        const last = lastItem();
        (last.querySelector(':scope > .chunks') ?? last).append(seqMarker(event));
        setMarkdown(last, contentText(event.content));
        break;
      }
      if (role === 'assistant') t.append(assistantBubble(contentText(event.content), event));
      else t.append(mark(item('li', `msg ${role}`, contentText(event.content)), event));
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
      const open = openStream();
      if (open) {
        open.classList.remove('streaming');
        renderBubble(open);
      }
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
  if (live) contentAdded();
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
  // Compared without whitespace: the echo streams words joined by single spaces.
  const words = (text) => String(text ?? '').split(/\s+/).filter(Boolean).join(' ');
  return words(sources.get(last)) === words(contentText(event.content));
}

/** A live event of a run this view has not seen start: show the run's prompt. */
function noteRun(event) {
  if (!event.runId) return;
  if (event.kind !== 'complete') setRunning(true, event.runId);
  // A prompt typed here is matched to its run by chat_accepted, which comes before the run's
  // first event (or, for a resend answered as a duplicate, may come after its replay: it then
  // fills this placeholder).
  if (view.promptedRuns.has(event.runId)) return;
  view.promptedRuns.add(event.runId);
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
    if (!placeholder.classList.contains('pending-prompt')) return; // filled by chat_accepted
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
  if (placeholder.classList.contains('pending-prompt')) placeholder.remove();
}

// ---- wiring ----------------------------------------------------------------------------------

ui.signinForm.addEventListener('submit', (e) => {
  e.preventDefault();
  const token = ui.tokenInput.value.trim();
  if (token) signIn(token);
});
ui.signOut.addEventListener('click', () => {
  // Prompts still waiting for an answer are this user's: not sent again after signing out.
  client?.discardPending();
  storeToken('');
  sessions.clear();
  archived.clear();
  view.id = null;
  history.replaceState(null, '', location.pathname);
  showSignin();
});
ui.newSession.addEventListener('submit', createSession);
ui.newProvider.addEventListener('change', describeProvider);
ui.refresh.addEventListener('click', loadSessions);
ui.showArchived.addEventListener('click', () => showList(listMode === 'archived' ? 'live' : 'archived'));
ui.rename.addEventListener('click', renameSession);
ui.archive.addEventListener('click', archiveSession);
ui.remove.addEventListener('click', () => {
  const s = sessions.get(view.id);
  if (view.id) deleteSession(view.id, s ? sessionLabel(s) : view.id);
});
ui.transcript.addEventListener('scroll', () => {
  view.stick = atBottom();
  if (view.stick) ui.newMessages.hidden = true;
}, { passive: true });
ui.newMessages.addEventListener('click', () => {
  scrollToBottom();
  ui.message.focus({ preventScroll: true });
});
// A transcript that changes size (a phone's keyboard, an approval box above it) stays at its
// bottom when it was there.
new ResizeObserver(() => {
  if (view.stick) scrollToBottom();
}).observe(ui.transcript);
// Relative times ("3 min ago") stay current.
setInterval(() => {
  for (const time of document.querySelectorAll('time.ago')) time.textContent = relativeTime(time.dateTime);
}, 30000);
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
updateEmpty();
takeTokenFromUrl();
const initial = storedToken();
if (initial) signIn(initial);
else showSignin();
