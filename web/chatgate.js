// chatgate.js — the chatgate WebSocket client, an ES module without dependencies.
//
// Served by every gateway node at /client/chatgate.js; documented in docs/client.md.
// It keeps one socket to the gateway (through any load balancer) and gives the application,
// per session, every event exactly once and in seq order, across reconnects, node changes,
// lost frames and truncated replays:
//
//   import { ChatgateClient } from '/client/chatgate.js';
//   const client = new ChatgateClient({ token: () => getFreshToken() });
//   client.on('event', ({ sessionId, event }) => render(sessionId, event));
//   client.on('history', ({ sessionId, messages }) => replaceTranscript(sessionId, messages));
//   client.connect();
//   client.subscribe(sessionId);          // loads history over REST, then follows live
//   client.send(sessionId, 'hello');      // queued while disconnected, sent after re-subscribe
//
// Every prompt carries an idempotency key (`clientRequestId`): until the gateway answers it
// (`chat_accepted`, or a `protocol_error` naming the key) the send is kept in sessionStorage and
// sent again, with the same key, after a reconnect or a page reload; the gateway starts it once.
//
// Works in browsers and in Node 20+ (pass `WebSocket` and `fetch` where the globals lack them).

/** Close codes the gateway uses (docs/protocol.md). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  /** Origin not allowed: permanent, the client does not reconnect. */
  POLICY: 1008,
  /** An inbound frame was larger than the server's limit. */
  TOO_BIG: 1009,
  /** The node is draining (shutting down): reconnect, another node takes over. */
  DRAINING: 1012,
  /** Slow consumer: this socket fell too far behind; reconnect and replay. */
  SLOW_CONSUMER: 4008,
  /** The token expired: reconnect with a fresh token. */
  TOKEN_EXPIRED: 4401,
});

/** Connection states, as reported by the `state` event. */
export const State = Object.freeze({
  IDLE: 'idle',
  CONNECTING: 'connecting',
  OPEN: 'open',
  RECONNECTING: 'reconnecting',
  CLOSED: 'closed',
});

/** How many history reloads in a row a session may need before the client accepts a jump. */
const MAX_RECOVERIES = 3;
/** Pause before the n-th history reload in a row (lets the history writer catch up). */
const RECOVERY_PAUSE_MS = 250;
/** Where unanswered sends are kept (sessionStorage), per WebSocket URL. */
const PENDING_KEY_PREFIX = 'chatgate.pendingSends ';
/** What the gateway takes as a `clientRequestId` (docs/protocol.md §Idempotent sends). */
const REQUEST_ID_PATTERN = /^[A-Za-z0-9._:-]{1,128}$/;

/**
 * A fresh idempotency key for one prompt: `crypto.randomUUID()`, or 32 random hex digits where
 * it is not available (pages served over plain http from another host than localhost are not a
 * secure context and have no `randomUUID`).
 * @returns {string}
 */
export function newClientRequestId() {
  const crypto = globalThis.crypto;
  if (typeof crypto?.randomUUID === 'function') return crypto.randomUUID();
  const bytes = new Uint8Array(16);
  if (typeof crypto?.getRandomValues === 'function') crypto.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i += 1) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * A send the gateway has not answered yet.
 * @typedef {object} PendingSend
 * @property {string} sessionId
 * @property {string} content
 * @property {object} [options]
 * @property {string} clientRequestId
 */

/**
 * @typedef {object} TokenRequest
 * @property {'connect' | 'reconnect' | 'expired' | 'rest'} reason why a token is needed
 */

/**
 * @typedef {string | ((request: TokenRequest) => string | Promise<string>)} TokenSource
 * A token, or a function returning one (possibly a promise). A function is called before every
 * connection attempt and after a 4401 (`reason: 'expired'`): that is the refresh hook.
 */

/**
 * @typedef {object} BackoffOptions
 * @property {number} [initialMs=500] delay before the first reconnect attempt
 * @property {number} [maxMs=15000] largest delay
 * @property {number} [factor=2] growth per failed attempt
 * @property {number} [jitter=0.5] fraction of the delay drawn at random (0 = none, 1 = full jitter)
 * @property {number} [stableMs=5000] a socket open this long resets the attempt count
 */

/**
 * @typedef {object} ClientOptions
 * @property {TokenSource} token the JWT, or a function that supplies a fresh one
 * @property {string} [url] WebSocket URL (default: `/ws` on the page's host, ws: or wss:)
 * @property {string} [baseUrl] REST base URL (default: the page's origin)
 * @property {BackoffOptions} [backoff]
 * @property {number} [maxQueued=100] largest number of frames queued while disconnected
 * @property {Storage | null} [storage] where unanswered sends are kept across page reloads
 *   (default: `sessionStorage` where there is one; `null`: in memory only)
 * @property {typeof WebSocket} [WebSocket] constructor to use (default: the global one)
 * @property {typeof fetch} [fetch] fetch to use (default: the global one)
 * @property {() => number} [random] random source in [0, 1) for jitter (default Math.random)
 * @property {() => number} [now] clock in ms (default Date.now)
 * @property {(fn: () => void, ms: number) => any} [setTimeout]
 * @property {(handle: any) => void} [clearTimeout]
 */

/**
 * Per-session delivery state.
 * @typedef {object} SessionState
 * @property {string} id
 * @property {number} lastSeq highest seq delivered to the application
 * @property {boolean} acked the current socket has acknowledged the subscription
 * @property {boolean} awaitingAck a subscribe for it is in flight on the current socket
 * @property {boolean} expectReplay the next event follows a running-session ack (may jump)
 * @property {boolean} syncing a history reload is in flight
 * @property {number} recoveries history reloads in a row without progress
 * @property {number} gapResubscribes gap-driven resubscribes in a row without progress
 * @property {boolean} acceptJump deliver the next event even if seq jumps (after giving up)
 * @property {boolean} incomplete a jump was accepted: reload the history after the run's complete
 */

/**
 * A session's history with every stored kind (`kinds=all`): this client shows each run's
 * outcome, which the plain (upstream-compatible) history leaves out.
 * @param {string} sessionId
 */
const historyPath = (sessionId) => `/api/providers/sessions/${encodeURIComponent(sessionId)}/messages?kinds=all`;

/**
 * The chatgate client: one socket, any number of sessions.
 *
 * Events (subscribe with {@link ChatgateClient#on}):
 * - `state` `{state, nodeId, attempt, delayMs?}` — connection state changes
 * - `connected` `{nodeId}` — the gateway's first frame (this client asks for it with
 *   `hello=1`): the node serving this socket
 * - `subscribed` `{sessionId, ack}` — a `chat_subscribed` ack (`isProcessing`, `runId`,
 *   `pendingPermissions`, `lastSeq`, `replayTruncated`)
 * - `event` `{sessionId, event}` — a provider event, each seq exactly once, in order
 * - `history` `{sessionId, messages, lastSeq, reason}` — the session's history over REST; the
 *   application replaces what it shows for the session with it; events that follow continue it.
 *   `reason`: `initial` (subscribe without lastSeq), `truncated` (replayTruncated), `missed`
 *   (whole runs finished while away), `gap` (a live gap the replay could not fill), `completed`
 *   (a run whose start was never replayable ended: its full text is history now)
 * - `sent` `{sessionId, frame, resend}` — a queued frame went out (after a reconnect's
 *   re-subscribe); `resend` is true for an unanswered `chat.send` sent again with its key
 * - `accepted` `{sessionId, clientRequestId, runId, firstSeq, duplicate, isProcessing, content}` —
 *   a `chat_accepted` frame: the run a send started (`duplicate: false`), or the run an earlier
 *   send with the same key started (`duplicate: true`: nothing new started; show the prompt once)
 * - `session` `{frame}` — a `session_upserted` frame (session created, renamed, provider id)
 * - `error` `{code, error, sessionId}` — a `protocol_error` frame, or a client-side failure
 *   (`code` `HISTORY_FAILED`, `QUEUE_FULL`); the refusal of a keyed send also carries
 *   `clientRequestId`, `duplicate`, `outcome` (when the gateway gave one) and `willResend`
 *   (`BACKEND_UNAVAILABLE` with `outcome: "unknown"`: sent again with the same key after
 *   `delayMs`)
 * - `close` `{code, reason, willReconnect, delayMs}` — the socket closed
 * - `tokenexpired` `{willReconnect}` — the gateway closed with 4401
 */
export class ChatgateClient {
  /** @param {ClientOptions} options */
  constructor(options) {
    if (!options || (typeof options.token !== 'string' && typeof options.token !== 'function')) {
      throw new TypeError('ChatgateClient needs a token (a string or a function returning one)');
    }
    const loc = globalThis.location;
    /** @private */ this.tokenSource = options.token;
    /** @type {string} */
    this.url = options.url ?? (loc ? `${loc.protocol === 'https:' ? 'wss:' : 'ws:'}//${loc.host}/ws` : '');
    /** @type {string} */
    this.baseUrl = (options.baseUrl ?? (loc ? loc.origin : '')).replace(/\/$/, '');
    if (!this.url) throw new TypeError('ChatgateClient needs a url outside a browser page');
    const b = options.backoff ?? {};
    /** @private */
    this.backoff = {
      initialMs: b.initialMs ?? 500,
      maxMs: b.maxMs ?? 15000,
      factor: b.factor ?? 2,
      jitter: Math.min(1, Math.max(0, b.jitter ?? 0.5)),
      stableMs: b.stableMs ?? 5000,
    };
    /** @private */ this.maxQueued = options.maxQueued ?? 100;
    /** @private */ this.WS = options.WebSocket ?? globalThis.WebSocket;
    /** @private */ this.fetchFn = options.fetch ?? globalThis.fetch?.bind(globalThis);
    /** @private */ this.random = options.random ?? Math.random;
    /** @private */ this.now = options.now ?? Date.now;
    /** @private */ this.setTimer = options.setTimeout ?? globalThis.setTimeout.bind(globalThis);
    /** @private */ this.clearTimer = options.clearTimeout ?? globalThis.clearTimeout.bind(globalThis);

    /** Current connection state. @type {string} */
    this.state = State.IDLE;
    /** Node id of the serving node (from the `connected` frame), or null. @type {string | null} */
    this.nodeId = null;
    /** Failed attempts since the last stable connection. */
    this.attempt = 0;
    /** Last close code seen, or null. @type {number | null} */
    this.lastCloseCode = null;

    /** @private @type {Map<string, Set<Function>>} */ this.listeners = new Map();
    /** @private @type {Map<string, SessionState>} */ this.sessions = new Map();
    /** @private @type {{sessionId: string | null, frame: object}[]} */ this.queue = [];
    /** @private */ this.ws = null;
    /** @private */ this.socketId = 0;
    /** @private */ this.openedAt = 0;
    /** @private */ this.timer = null;
    /** @private */ this.wanted = false;
    /** @private */ this.nextTokenReason = 'connect';

    /** @private */ this.storage = options.storage !== undefined ? options.storage : defaultStorage();
    /** @private */ this.pendingKey = `${PENDING_KEY_PREFIX}${this.url}`;
    /**
     * Sends not answered yet, by key, oldest first; `retries` counts resends after an unknown
     * outcome, `timer` is the scheduled one.
     * @private @type {Map<string, PendingSend & {retries: number, timer: any}>}
     */
    this.pending = new Map();
    this.restorePending();
  }

  // ---- events --------------------------------------------------------------------------

  /**
   * Adds a listener; returns a function that removes it.
   * @param {string} type
   * @param {(payload: any) => void} fn
   * @returns {() => void}
   */
  on(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(fn);
    return () => this.listeners.get(type)?.delete(fn);
  }

  /** @private */
  emit(type, payload) {
    for (const fn of [...(this.listeners.get(type) ?? [])]) {
      try {
        fn(payload);
      } catch (e) {
        // A listener's bug must not break delivery to the others.
        globalThis.console?.error?.(`chatgate: '${type}' listener failed`, e);
      }
    }
  }

  /** @private */
  setState(state, extra = {}) {
    this.state = state;
    this.emit('state', { state, nodeId: this.nodeId, attempt: this.attempt, ...extra });
  }

  // ---- connection ----------------------------------------------------------------------

  /** Opens the socket (and keeps it open, reconnecting, until {@link close}). */
  connect() {
    if (this.wanted && this.state !== State.CLOSED && this.state !== State.IDLE) return;
    this.wanted = true;
    this.nextTokenReason = 'connect';
    // Sends a previous page left unanswered: follow their sessions, so they go out again (with
    // their keys) once each session's history is in and its subscription acknowledged.
    for (const p of this.pending.values()) if (!this.sessions.has(p.sessionId)) this.subscribe(p.sessionId);
    this.open();
  }

  /** Closes the socket for good (no reconnect). Subscriptions and the queue are kept. */
  close() {
    this.wanted = false;
    if (this.timer !== null) this.clearTimer(this.timer);
    this.timer = null;
    const ws = this.ws;
    this.ws = null;
    this.socketId += 1;
    this.nodeId = null;
    if (ws) {
      try {
        ws.close(CloseCode.NORMAL, 'client closed');
      } catch {
        /* already closed */
      }
    }
    this.resetSocketState();
    this.setState(State.CLOSED);
  }

  /**
   * Replaces a string token (for example after the application refreshed it following a
   * `tokenexpired` event), and reconnects if the client had stopped for lack of one.
   * @param {TokenSource} token
   */
  setToken(token) {
    this.tokenSource = token;
    if (this.wanted && this.state === State.CLOSED) {
      this.attempt = 0;
      this.open();
    }
  }

  /** @private */
  async resolveToken(reason) {
    const source = this.tokenSource;
    return typeof source === 'function' ? await source({ reason }) : source;
  }

  /** @private */
  async open() {
    if (!this.wanted) return;
    const id = ++this.socketId;
    this.setState(this.attempt === 0 && this.nextTokenReason === 'connect' ? State.CONNECTING : State.RECONNECTING);
    let token;
    try {
      token = await this.resolveToken(this.nextTokenReason);
    } catch (e) {
      if (id !== this.socketId) return;
      this.emit('error', { code: 'TOKEN_FAILED', error: String(e?.message ?? e), sessionId: null });
      this.scheduleReconnect(null);
      return;
    }
    if (id !== this.socketId || !this.wanted) return;
    const sep = this.url.includes('?') ? '&' : '?';
    let ws;
    try {
      ws = new this.WS(`${this.url}${sep}token=${encodeURIComponent(token ?? '')}&hello=1`);
    } catch (e) {
      this.emit('error', { code: 'CONNECT_FAILED', error: String(e?.message ?? e), sessionId: null });
      this.scheduleReconnect(null);
      return;
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      if (id !== this.socketId) return;
      opened = true;
      this.openedAt = this.now();
      this.setState(State.OPEN);
      this.resubscribeAll();
    };
    ws.onmessage = (message) => {
      if (id !== this.socketId) return;
      this.handleText(typeof message.data === 'string' ? message.data : String(message.data));
    };
    ws.onclose = (event) => {
      if (id !== this.socketId) return;
      this.handleClose(event?.code ?? 1006, event?.reason ?? '', opened);
    };
    ws.onerror = () => {
      /* a close event follows */
    };
  }

  /** @private */
  handleClose(code, reason, opened) {
    this.ws = null;
    this.socketId += 1;
    this.nodeId = null;
    this.lastCloseCode = code;
    this.resetSocketState();
    if (opened && this.now() - this.openedAt >= this.backoff.stableMs) this.attempt = 0;
    if (!this.wanted) {
      this.emit('close', { code, reason, willReconnect: false, delayMs: null });
      this.setState(State.CLOSED);
      return;
    }
    if (code === CloseCode.POLICY) {
      this.wanted = false;
      this.emit('close', { code, reason, willReconnect: false, delayMs: null });
      this.setState(State.CLOSED, { code });
      return;
    }
    if (code === CloseCode.TOKEN_EXPIRED) {
      const canRefresh = typeof this.tokenSource === 'function';
      this.emit('tokenexpired', { willReconnect: canRefresh });
      if (!this.wanted) return; // a listener closed the client
      if (!canRefresh) {
        // A string token cannot be refreshed here: wait for setToken().
        this.emit('close', { code, reason, willReconnect: false, delayMs: null });
        this.setState(State.CLOSED, { code });
        return;
      }
      this.nextTokenReason = 'expired';
      this.attempt = 0;
    } else {
      this.nextTokenReason = 'reconnect';
    }
    // Draining and slow-consumer closes are the server asking for a prompt reconnect.
    if (code === CloseCode.DRAINING || code === CloseCode.SLOW_CONSUMER) this.attempt = 0;
    this.scheduleReconnect({ code, reason });
  }

  /**
   * The delay before reconnect attempt number `attempt` (0-based): exponential, capped,
   * with the jittered fraction drawn from `random`.
   * @param {number} attempt
   * @returns {number} milliseconds
   */
  delayFor(attempt) {
    const { initialMs, maxMs, factor, jitter } = this.backoff;
    const base = Math.min(maxMs, initialMs * factor ** attempt);
    return Math.round(base * (1 - jitter * this.random()));
  }

  /** @private */
  scheduleReconnect(closed) {
    const delayMs = this.delayFor(this.attempt);
    if (closed) this.emit('close', { code: closed.code, reason: closed.reason, willReconnect: true, delayMs });
    if (!this.wanted) return; // a listener closed the client
    this.attempt += 1;
    this.setState(State.RECONNECTING, { delayMs });
    if (this.timer !== null) this.clearTimer(this.timer);
    this.timer = this.setTimer(() => {
      this.timer = null;
      this.open();
    }, delayMs);
  }

  /**
   * @private Forget what the closed socket had acknowledged. Every send it left unanswered
   * may or may not have arrived: it goes back to the front of the queue, with its key, to be
   * sent again after the session's re-subscribe.
   */
  resetSocketState() {
    for (const s of this.sessions.values()) {
      s.acked = false;
      s.awaitingAck = false;
      s.expectReplay = false;
    }
    const queued = new Set(this.queue.map((q) => q.frame.clientRequestId).filter(Boolean));
    const again = [];
    for (const p of this.pending.values()) {
      if (p.timer !== null) this.clearTimer(p.timer);
      p.timer = null;
      if (!queued.has(p.clientRequestId)) again.push({ sessionId: p.sessionId, frame: sendFrameOf(p), resend: true });
    }
    if (again.length > 0) this.queue = [...again, ...this.queue];
  }

  /** @private */
  isOpen() {
    return this.ws !== null && this.state === State.OPEN;
  }

  /** @private */
  sendFrame(frame) {
    if (!this.isOpen()) return false;
    try {
      this.ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  /** @private Subscribe every open session with its lastSeq on a new socket, then flush. */
  resubscribeAll() {
    const targets = [];
    for (const s of this.sessions.values()) {
      if (s.syncing) continue; // subscribes itself when its history is in
      s.awaitingAck = true;
      targets.push({ sessionId: s.id, lastSeq: s.lastSeq });
    }
    if (targets.length > 0) this.sendFrame({ type: 'chat.subscribe', sessions: targets });
    this.flushQueue();
  }

  // ---- sessions ------------------------------------------------------------------------

  /**
   * Follows a session: with `lastSeq` given, subscribes from there (the application already
   * holds everything up to it); without, loads the history over REST first (a `history` event)
   * and subscribes from its last seq. Calling it again for a followed session re-syncs it.
   * @param {string} sessionId
   * @param {{lastSeq?: number}} [options]
   */
  subscribe(sessionId, options = {}) {
    const s = this.session(sessionId);
    if (typeof options.lastSeq === 'number' && options.lastSeq >= 0) {
      s.lastSeq = Math.floor(options.lastSeq);
      this.subscribeNow(s);
    } else {
      this.recover(s, 'initial');
    }
  }

  /**
   * Stops following a session (and drops its queued frames and unanswered sends).
   * @param {string} sessionId
   */
  unsubscribe(sessionId) {
    if (!this.sessions.delete(sessionId)) return;
    this.queue = this.queue.filter((q) => q.sessionId !== sessionId);
    this.discardPending(sessionId);
    this.sendFrame({ type: 'chat.unsubscribe', sessions: [sessionId] });
  }

  /** The sessions followed. @returns {string[]} */
  subscriptions() {
    return [...this.sessions.keys()];
  }

  /**
   * Highest seq delivered for a session (0 before any).
   * @param {string} sessionId
   * @returns {number}
   */
  lastSeq(sessionId) {
    return this.sessions.get(sessionId)?.lastSeq ?? 0;
  }

  /** @private @returns {SessionState} */
  session(id) {
    let s = this.sessions.get(id);
    if (!s) {
      s = {
        id,
        lastSeq: 0,
        acked: false,
        awaitingAck: false,
        expectReplay: false,
        syncing: false,
        recoveries: 0,
        gapResubscribes: 0,
        acceptJump: false,
        incomplete: false,
      };
      this.sessions.set(id, s);
    }
    return s;
  }

  /** @private */
  subscribeNow(s) {
    s.acked = false;
    s.awaitingAck = false;
    if (this.sendFrame({ type: 'chat.subscribe', sessions: [{ sessionId: s.id, lastSeq: s.lastSeq }] })) {
      s.awaitingAck = true;
    }
  }

  /**
   * Reloads a session's history over REST, hands it to the application (`history` event),
   * then subscribes from its last seq so the replay continues exactly after it.
   * @private
   */
  async recover(s, reason) {
    if (s.syncing) return;
    s.syncing = true;
    s.acked = false;
    s.awaitingAck = false;
    if (reason !== 'initial' && reason !== 'completed') s.recoveries += 1;
    const pause = Math.min(2000, RECOVERY_PAUSE_MS * Math.max(0, s.recoveries - 1));
    if (pause > 0) await new Promise((resolve) => this.setTimer(resolve, pause));
    let messages;
    let covered = 0;
    try {
      const data = await this.request('GET', historyPath(s.id));
      messages = Array.isArray(data?.messages) ? data.messages : [];
      // `lastSeq` is the last seq stored (whatever its kind), so the subscribe below resumes
      // after it.
      if (typeof data?.lastSeq === 'number') covered = data.lastSeq;
    } catch (e) {
      s.syncing = false;
      if (this.sessions.get(s.id) !== s) return;
      this.emit('error', { code: 'HISTORY_FAILED', error: String(e?.message ?? e), sessionId: s.id });
      // Carry on from where the application is; take what the replay gives, without looping.
      s.acceptJump = true;
      this.subscribeNow(s);
      return;
    }
    if (this.sessions.get(s.id) !== s) return; // unsubscribed meanwhile
    let top = covered;
    for (const m of messages) if (typeof m?.seq === 'number' && m.seq > top) top = m.seq;
    s.syncing = false;
    s.lastSeq = top;
    s.expectReplay = false;
    s.gapResubscribes = 0;
    s.acceptJump = s.recoveries >= MAX_RECOVERIES;
    this.emit('history', { sessionId: s.id, messages, lastSeq: top, reason });
    // Live events that arrived during the fetch were dropped: the replay below brings them.
    this.subscribeNow(s);
  }

  /**
   * Every message of a session's history, with each run's outcome: the conversation plus the
   * `complete`, `status` and `permission_*` events
   * (`GET /api/providers/sessions/:id/messages?kinds=all`).
   * @param {string} sessionId
   * @returns {Promise<object[]>}
   */
  async loadHistory(sessionId) {
    const data = await this.request('GET', historyPath(sessionId));
    return Array.isArray(data?.messages) ? data.messages : [];
  }

  /**
   * A REST call with the token; resolves to `data` of the envelope, rejects with an Error
   * carrying `status` and `code` otherwise. A 401 asks a token function for a fresh token once.
   * @param {string} method
   * @param {string} path
   * @param {object} [body]
   * @returns {Promise<any>}
   */
  async request(method, path, body) {
    if (!this.fetchFn) throw new Error('no fetch available');
    const call = async (reason) => {
      const token = await this.resolveToken(reason);
      const headers = { authorization: `Bearer ${token}` };
      if (body !== undefined) headers['content-type'] = 'application/json';
      return this.fetchFn(`${this.baseUrl}${path}`, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    };
    let response = await call('rest');
    if (response.status === 401 && typeof this.tokenSource === 'function') response = await call('expired');
    let payload = null;
    try {
      payload = await response.json();
    } catch {
      payload = null;
    }
    if (!response.ok || payload?.success === false) {
      const err = new Error(payload?.error?.message ?? payload?.error ?? `HTTP ${response.status}`);
      err.status = response.status;
      err.code = payload?.error?.code ?? null;
      throw err;
    }
    return payload?.data ?? payload;
  }

  // ---- verbs ---------------------------------------------------------------------------

  /**
   * Sends `chat.send` with an idempotency key (`clientRequestId`: `key` if given, else a fresh
   * {@link newClientRequestId}). While disconnected (or before the session's subscription is
   * acknowledged) the frame is queued and sent after the re-subscribe. A session not followed
   * yet is followed (history, then live). Until the gateway answers the key (`accepted`, or an
   * `error` carrying it) the send is kept (in `storage` too) and sent again with the same key
   * after a reconnect or a page reload: the gateway starts it at most once.
   * @param {string} sessionId
   * @param {string} content
   * @param {object} [options] run options (`model`, `permissionMode`, …)
   * @param {{clientRequestId?: string}} [key] the key to use (1–128 of `A-Za-z0-9._:-`)
   * @returns {'sent' | 'queued'}
   */
  send(sessionId, content, options, { clientRequestId = newClientRequestId() } = {}) {
    if (typeof clientRequestId !== 'string' || !REQUEST_ID_PATTERN.test(clientRequestId)) {
      throw new TypeError('clientRequestId must be 1–128 characters of letters, digits, ".", "_", ":" or "-"');
    }
    if (this.pending.has(clientRequestId)) throw new Error(`a send with key ${clientRequestId} is already waiting for its answer`);
    if (!this.sessions.has(sessionId)) this.subscribe(sessionId);
    const p = { sessionId, content, clientRequestId, retries: 0, timer: null };
    if (options !== undefined) p.options = options;
    const result = this.deliverOrQueue(sessionId, sendFrameOf(p));
    this.pending.set(clientRequestId, p);
    this.savePending();
    return result;
  }

  /**
   * Sends not answered yet (oldest first), of one session or of all.
   * @param {string} [sessionId]
   * @returns {PendingSend[]}
   */
  pendingSends(sessionId) {
    return [...this.pending.values()]
      .filter((p) => sessionId === undefined || p.sessionId === sessionId)
      .map(publicPending);
  }

  /**
   * Forgets unanswered sends (of one session, or all): they are not sent again, here nor after
   * a reload. For example when the user signs out.
   * @param {string} [sessionId]
   */
  discardPending(sessionId) {
    let changed = false;
    for (const [key, p] of [...this.pending]) {
      if (sessionId !== undefined && p.sessionId !== sessionId) continue;
      this.forgetPending(key);
      changed = true;
    }
    if (changed) this.savePending();
  }

  /**
   * Sends `chat.abort` (queued like {@link send} while disconnected).
   * @param {string} sessionId
   * @returns {'sent' | 'queued'}
   */
  abort(sessionId) {
    return this.deliverOrQueue(sessionId, { type: 'chat.abort', sessionId });
  }

  /**
   * Answers a tool approval (`chat.permission-response`).
   * @param {string} requestId
   * @param {boolean} allow
   * @param {{sessionId?: string, updatedInput?: any, message?: string, rememberEntry?: any}} [extra]
   * @returns {'sent' | 'queued'}
   */
  respondPermission(requestId, allow, extra = {}) {
    const { sessionId = null, ...rest } = extra;
    const frame = { type: 'chat.permission-response', requestId, allow: Boolean(allow), ...rest };
    return this.deliverOrQueue(sessionId, frame);
  }

  /** Frames waiting for a connection. @returns {number} */
  queued() {
    return this.queue.length;
  }

  /** @private */
  ready(sessionId) {
    if (!this.isOpen()) return false;
    if (sessionId === null) return true;
    const s = this.sessions.get(sessionId);
    return !s || (s.acked && !s.syncing);
  }

  /** @private */
  deliverOrQueue(sessionId, frame, resend = false) {
    const waiting = this.queue.some((q) => q.sessionId === sessionId);
    if (!waiting && this.ready(sessionId) && this.sendFrame(frame)) {
      if (resend) this.emit('sent', { sessionId, frame, resend });
      return 'sent';
    }
    if (resend) {
      // An answer is owed to a send the application already made: never refused for room.
      this.queue.push({ sessionId, frame, resend });
      return 'queued';
    }
    if (this.queue.length >= this.maxQueued) {
      const error = `send queue full (${this.maxQueued} frames waiting for a connection)`;
      this.emit('error', { code: 'QUEUE_FULL', error, sessionId });
      throw new Error(error);
    }
    this.queue.push({ sessionId, frame });
    return 'queued';
  }

  /** @private Sends every queued frame whose session is ready, in order. */
  flushQueue() {
    if (!this.isOpen() || this.queue.length === 0) return;
    const blocked = new Set();
    const rest = [];
    const sent = [];
    for (const item of this.queue) {
      if (blocked.has(item.sessionId) || !this.ready(item.sessionId) || !this.sendFrame(item.frame)) {
        blocked.add(item.sessionId);
        rest.push(item);
      } else {
        sent.push(item);
      }
    }
    this.queue = rest;
    for (const item of sent) this.emit('sent', { sessionId: item.sessionId, frame: item.frame, resend: Boolean(item.resend) });
  }

  // ---- unanswered sends ----------------------------------------------------------------

  /** @private Loads the sends a previous page left unanswered; they wait in the queue. */
  restorePending() {
    let list = [];
    try {
      list = JSON.parse(this.storage?.getItem(this.pendingKey) ?? '[]');
    } catch {
      list = [];
    }
    if (!Array.isArray(list)) return;
    for (const entry of list) {
      if (
        !entry ||
        typeof entry.sessionId !== 'string' ||
        typeof entry.content !== 'string' ||
        typeof entry.clientRequestId !== 'string' ||
        !REQUEST_ID_PATTERN.test(entry.clientRequestId) ||
        (entry.options !== undefined && (entry.options === null || typeof entry.options !== 'object')) ||
        this.pending.has(entry.clientRequestId)
      ) {
        continue;
      }
      const p = { sessionId: entry.sessionId, content: entry.content, clientRequestId: entry.clientRequestId, retries: 0, timer: null };
      if (entry.options !== undefined) p.options = entry.options;
      this.pending.set(p.clientRequestId, p);
      this.queue.push({ sessionId: p.sessionId, frame: sendFrameOf(p), resend: true });
    }
  }

  /** @private Writes the unanswered sends to storage (memory only when it is full or absent). */
  savePending() {
    if (!this.storage) return;
    try {
      if (this.pending.size === 0) this.storage.removeItem(this.pendingKey);
      else this.storage.setItem(this.pendingKey, JSON.stringify([...this.pending.values()].map(publicPending)));
    } catch {
      /* quota exceeded or storage refused: the send is still kept for this page */
    }
  }

  /** @private Drops one unanswered send (its timer and queued frame too); the caller saves. */
  forgetPending(key) {
    const p = this.pending.get(key);
    if (!p) return null;
    if (p.timer !== null) this.clearTimer(p.timer);
    this.pending.delete(key);
    this.queue = this.queue.filter((q) => q.frame.clientRequestId !== key);
    return p;
  }

  /** @private `chat_accepted`: the key's send started a run, now or (duplicate) before. */
  handleAccepted(frame) {
    const key = typeof frame.clientRequestId === 'string' ? frame.clientRequestId : null;
    const p = key === null ? null : this.forgetPending(key);
    if (p) this.savePending();
    // A duplicate does not subscribe the socket; this client resends only after the session's
    // subscription was acknowledged on the same socket, so the run's events reach it anyway.
    this.emit('accepted', {
      sessionId: typeof frame.sessionId === 'string' ? frame.sessionId : (p?.sessionId ?? null),
      clientRequestId: key,
      runId: frame.runId ?? null,
      firstSeq: typeof frame.firstSeq === 'number' ? frame.firstSeq : null,
      duplicate: frame.duplicate === true,
      isProcessing: Boolean(frame.isProcessing),
      content: p?.content ?? null,
    });
  }

  /**
   * @private A `protocol_error`. One naming a pending key answers it: nothing started (the key
   * is done) — except `BACKEND_UNAVAILABLE` with `outcome: "unknown"`, where the run may have
   * started: the same frame goes again, with the same key, after a backoff delay.
   */
  handleRefusal(frame) {
    const payload = { code: frame.code, error: frame.error, sessionId: frame.sessionId ?? null };
    if (typeof frame.clientRequestId === 'string') {
      const key = frame.clientRequestId;
      payload.clientRequestId = key;
      payload.duplicate = frame.duplicate === true;
      if (frame.outcome !== undefined) payload.outcome = frame.outcome;
      const p = this.pending.get(key);
      const unknown = frame.code === 'BACKEND_UNAVAILABLE' && frame.outcome === 'unknown';
      payload.willResend = Boolean(p) && unknown;
      if (p && unknown) {
        payload.delayMs = this.retryPending(p);
      } else if (p) {
        this.forgetPending(key);
        this.savePending();
      }
    }
    this.emit('error', payload);
  }

  /** @private Schedules the resend of a send whose outcome is unknown; returns the delay. */
  retryPending(p) {
    const delayMs = this.delayFor(p.retries);
    p.retries += 1;
    if (p.timer !== null) this.clearTimer(p.timer);
    // Cleared when the key is answered or forgotten, and when the socket closes (the send is
    // queued again then).
    p.timer = this.setTimer(() => {
      p.timer = null;
      this.deliverOrQueue(p.sessionId, sendFrameOf(p), true);
    }, delayMs);
    return delayMs;
  }

  // ---- inbound -------------------------------------------------------------------------

  /** @private */
  handleText(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if (!frame || typeof frame !== 'object') return;
    switch (frame.kind) {
      case 'connected':
        this.nodeId = typeof frame.nodeId === 'string' ? frame.nodeId : null;
        this.emit('connected', { nodeId: this.nodeId });
        this.setState(State.OPEN);
        return;
      case 'chat_subscribed':
        this.handleAck(frame);
        return;
      case 'session_upserted':
        this.emit('session', { frame });
        return;
      case 'protocol_error':
        this.handleRefusal(frame);
        return;
      case 'chat_accepted':
        this.handleAccepted(frame);
        return;
      default:
        if (typeof frame.seq === 'number' && typeof frame.sessionId === 'string') this.handleEvent(frame);
    }
  }

  /** @private */
  handleAck(ack) {
    const s = this.sessions.get(ack.sessionId);
    if (!s) return;
    if (s.syncing) return; // a stale ack: the subscribe after the reload brings a fresh one
    s.awaitingAck = false;
    s.acked = true;
    this.emit('subscribed', { sessionId: s.id, ack });
    const top = typeof ack.lastSeq === 'number' ? ack.lastSeq : 0;
    if (ack.replayTruncated && !s.acceptJump) {
      // Events after lastSeq are gone from the replay window: the history has them.
      this.recover(s, 'truncated');
      return;
    }
    if (!ack.isProcessing && top > s.lastSeq) {
      // Whole runs finished while we were away: they are history, never replayed.
      if (s.acceptJump) {
        s.lastSeq = top;
      } else {
        this.recover(s, 'missed');
        return;
      }
    }
    if (top <= s.lastSeq && !ack.replayTruncated) s.recoveries = 0;
    s.expectReplay = Boolean(ack.isProcessing) && top > s.lastSeq;
    // A jump is accepted only for the replay right after giving up on a reload.
    if (!s.expectReplay) s.acceptJump = false;
    this.flushQueue();
  }

  /** @private */
  handleEvent(event) {
    const s = this.sessions.get(event.sessionId);
    if (!s) return;
    if (s.syncing) return; // the subscribe after the history reload replays it
    const seq = event.seq;
    if (seq <= s.lastSeq) return; // duplicate
    if (seq !== s.lastSeq + 1 && !s.acceptJump) {
      if (s.awaitingAck) return; // the old subscription's tail; the new replay covers it
      if (s.expectReplay) {
        // The replay starts past lastSeq + 1: earlier runs finished meanwhile (history).
        this.recover(s, 'missed');
        return;
      }
      // A gap on the live path: resubscribe from lastSeq; twice without progress → history.
      s.gapResubscribes += 1;
      if (s.gapResubscribes > 2) this.recover(s, 'gap');
      else this.subscribeNow(s);
      return;
    }
    if (seq !== s.lastSeq + 1) s.incomplete = true; // gave up on a gap: the history has it later
    s.lastSeq = seq;
    s.expectReplay = false;
    s.acceptJump = false;
    s.gapResubscribes = 0;
    s.recoveries = 0;
    this.emit('event', { sessionId: s.id, event });
    if (event.kind === 'complete' && s.incomplete) {
      // The run is over and its history whole: reload it to fill what the replay lacked.
      s.incomplete = false;
      this.recover(s, 'completed');
    }
  }
}

/** The page's sessionStorage, or null (none, or refused: sandboxed frames, privacy modes). */
function defaultStorage() {
  try {
    return globalThis.sessionStorage ?? null;
  } catch {
    return null;
  }
}

/** The `chat.send` frame of a send (the same on every resend). */
function sendFrameOf(p) {
  const frame = { type: 'chat.send', sessionId: p.sessionId, content: p.content };
  if (p.options !== undefined) frame.options = p.options;
  frame.clientRequestId = p.clientRequestId;
  return frame;
}

/** What is kept of a pending send (and stored). @returns {PendingSend} */
function publicPending(p) {
  const out = { sessionId: p.sessionId, content: p.content, clientRequestId: p.clientRequestId };
  if (p.options !== undefined) out.options = p.options;
  return out;
}

/**
 * A `ChatgateClient` with the given options (shorthand).
 * @param {ClientOptions} options
 * @returns {ChatgateClient}
 */
export function createClient(options) {
  return new ChatgateClient(options);
}
