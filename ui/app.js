// The OpenClaw web UI's script: no framework, no build step (gateway/src/ui.rs serves it as is).
//
// It reads and changes tasks through the HTTP API (`POST /v1/tasks`, `GET /v1/tasks/{id}`, the
// control verbs, `/v1/lanes`, history from `GET /v1/tasks?...`) and follows the session's live
// events over `GET /v1/ws?session=S&since=SEQ`. The first connection asks for `since=0`, so the
// session's recent events (and with them its tasks) are replayed into a fresh tab. It remembers
// the last event sequence it saw, so when the socket drops (a gateway restart closes it with
// 1012) it reconnects with backoff and `since=<seq>` and misses nothing; on every (re)connect it
// also re-reads the records of the unfinished tasks it shows, so a row is never left stale.
//
// With API tokens (the gateway's --tokens), the first 401 shows a sign-in form; the token is
// kept in localStorage and sent as `Authorization: Bearer` on every fetch. A WebSocket cannot
// carry headers, so each (re)connect first asks `POST /v1/ws-ticket` for a single-use ticket
// and opens `/v1/ws?...&ticket=T`: the URL a proxy logs holds nothing that still works.
// "Sign out" forgets the token. A gateway without tokens never answers 401, so the page
// then behaves as if none of this existed.
//
// Rendering is incremental: one <li> per task in a Map id → row, events only mark a row dirty,
// and dirty rows are redrawn once per animation frame. A thousand tasks with a burst of
// progress events cost one frame, not a thousand re-renders of the list.

'use strict';

const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);

/** The statuses each control verb applies to (docs/PROTOCOL.md, "Controlling a task"). */
const ALLOWED = {
  pause: new Set(['queued', 'running', 'retrying']),
  resume: new Set(['paused']),
  cancel: new Set(['queued', 'running', 'retrying', 'paused']),
  retry: new Set(['failed', 'cancelled']),
};

/** Record fields that never change after submission: safe to take from any read. */
const STATIC_FIELDS = ['id', 'session', 'kind', 'input', 'class', 'priority', 'max_attempts',
  'timeout_s', 'created_at', 'deadline'];

/** Streamed output kept per task: the tail, so a chatty LLM task cannot grow the page forever. */
const OUTPUT_KEEP = 16 * 1024;
/** Rows kept in the live list; beyond it the oldest finished rows go (history still has them). */
const MAX_ROWS = 1000;
/** Task ids remembered per session in localStorage, so a reload shows the same list. */
const REMEMBER = 200;
/** Parallel record reads when (re)loading a list: enough to be quick, few enough to be polite. */
const FETCH_PARALLEL = 6;
const LANES_EVERY_MS = 3000;
const RECONNECT_MIN_MS = 250;
const RECONNECT_MAX_MS = 5000;

const INPUT_TEMPLATES = {
  sleep: '{"seconds": 3, "steps": 6}',
  exec: '{"program": "name-from-worker-config", "args": []}',
  llm: '{"messages": [{"role": "user", "content": "Hello"}]}',
};

const $ = (selector, root = document) => root.querySelector(selector);

const state = {
  session: 'default',
  /** id → task: {id, rec, output, version, busy, actionError, li, els} */
  tasks: new Map(),
  dirty: new Set(),
  frame: 0,
  /** Tasks whose elapsed time ticks. */
  running: new Set(),
  /** Tasks waiting for a record read, and how many reads are under way. */
  fetchQueue: new Set(),
  fetching: 0,
  ws: null,
  /** Connect attempts started: a ticket that comes back after a newer attempt began is dropped. */
  connects: 0,
  /** The sequence of the last event seen, for `since`; null until the first. Per session. */
  lastSeq: null,
  failures: 0,
  reconnectTimer: 0,
  history: { cursor: null, paged: false, timer: 0 },
  lanes: new Map(),
  inputEdited: false,
  /** The API token, when the gateway has tokens and the user gave one. */
  token: null,
  /** The gateway answered 401: it has tokens, so the socket waits for one. */
  authRequired: false,
};

// ---------------------------------------------------------------------------------------------
// HTTP

class ApiError extends Error {
  constructor(status, code, message, field, body) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field || null;
    this.body = body;
  }
}

/** One API call; resolves to the parsed JSON body, rejects with an ApiError carrying the API's
 *  `{"error": {"code", "message", "field"?}}`. */
async function api(method, path, body) {
  const init = { method, headers: {} };
  if (state.token) init.headers.authorization = `Bearer ${state.token}`;
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, 'unreachable', 'The gateway cannot be reached.');
  }
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (response.status === 401) signedOut(state.token ? 'That token was not accepted.' : '');
  if (!response.ok) {
    const e = (json && json.error) || {};
    throw new ApiError(response.status, e.code || `http_${response.status}`,
      e.message || text || response.statusText, e.field, json);
  }
  return json;
}

// ---------------------------------------------------------------------------------------------
// Sign-in (only when the gateway has API tokens)

/** The gateway wants a token: forget a refused one, stop the socket, show the form. */
function signedOut(message) {
  const first = !state.authRequired || state.token;
  state.authRequired = true;
  state.token = null;
  storageRemove('claw.token');
  $('#sign-out').hidden = true;
  $('#auth-card').hidden = false;
  if (message || first) $('#auth-error').textContent = message;
  if (first) {
    const old = state.ws;
    state.ws = null;
    if (old) old.close(1000, 'signed out');
    clearTimeout(state.reconnectTimer);
    setConnection('signed-out', 'signed out');
    $('#auth-token').focus();
  }
}

function signIn(token) {
  state.token = token;
  storageSet('claw.token', token);
  $('#auth-card').hidden = true;
  $('#auth-error').textContent = '';
  $('#sign-out').hidden = false;
  loadLanes();
  reconnectNow();
}

function signOut() {
  signedOut('');
  for (const t of [...state.tasks.values()]) removeTask(t);
  updateCount();
}

const taskPath = (id) => `/v1/tasks/${encodeURIComponent(id)}`;

/** Queues a re-read of a task's record; at most FETCH_PARALLEL reads run at once, so a
 *  replay that discovers a thousand tasks does not fire a thousand requests together. */
function queueRefresh(t) {
  state.fetchQueue.add(t);
  pumpRefresh();
}

function pumpRefresh() {
  while (state.fetching < FETCH_PARALLEL && state.fetchQueue.size > 0) {
    const t = state.fetchQueue.values().next().value;
    state.fetchQueue.delete(t);
    state.fetching += 1;
    refresh(t).finally(() => {
      state.fetching -= 1;
      pumpRefresh();
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Session and remembered ids

const TOKEN = /^[A-Za-z0-9_-]{1,64}$/;

function storageGet(key) {
  try {
    return localStorage.getItem(key);
  } catch {
    return null;
  }
}

function storageRemove(key) {
  try {
    localStorage.removeItem(key);
  } catch {
    // Nothing was stored.
  }
}

function storageSet(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch {
    // Private mode or a full quota: the page still works, it just forgets on reload.
  }
}

function initialSession() {
  const fromUrl = new URLSearchParams(location.search).get('session');
  if (fromUrl && TOKEN.test(fromUrl)) return fromUrl;
  const stored = storageGet('claw.session');
  if (stored && TOKEN.test(stored)) return stored;
  return 'default';
}

const rememberedKey = () => `claw.tasks.${state.session}`;

function remembered() {
  try {
    const ids = JSON.parse(storageGet(rememberedKey()) || '[]');
    return Array.isArray(ids) ? ids.filter((id) => typeof id === 'string' && TOKEN.test(id)) : [];
  } catch {
    return [];
  }
}

function remember(id) {
  const ids = remembered().filter((x) => x !== id);
  ids.unshift(id);
  storageSet(rememberedKey(), JSON.stringify(ids.slice(0, REMEMBER)));
}

function forget(ids) {
  const gone = new Set(ids);
  storageSet(rememberedKey(), JSON.stringify(remembered().filter((x) => !gone.has(x))));
}

function switchSession(session) {
  state.session = session;
  storageSet('claw.session', session);
  $('#session').value = session;
  const url = new URL(location.href);
  url.searchParams.set('session', session);
  history.replaceState(null, '', url);

  for (const t of state.tasks.values()) t.li.remove();
  state.tasks.clear();
  state.dirty.clear();
  state.running.clear();
  state.fetchQueue.clear();
  state.lastSeq = null;
  updateCount();

  const ids = remembered();
  for (const id of ids) ensureTask(id, { append: true });
  for (const id of ids) queueRefresh(state.tasks.get(id));

  reconnectNow();
  loadHistory(false);
}

// ---------------------------------------------------------------------------------------------
// Tasks: state and rendering

function ensureTask(id, { append = false } = {}) {
  let t = state.tasks.get(id);
  if (t) return t;
  const li = $('#task-row').content.firstElementChild.cloneNode(true);
  li.dataset.taskId = id;
  t = {
    id,
    rec: { id },
    output: '',
    outputShown: '',
    version: 0,
    busy: false,
    actionError: '',
    li,
    els: {
      id: $('.t-id', li),
      kind: $('.t-kind', li),
      badge: $('.badge', li),
      attempt: $('.t-attempt', li),
      elapsed: $('.t-elapsed', li),
      buttons: [...li.querySelectorAll('button[data-verb]')],
      fill: $('.bar-fill', li),
      message: $('.t-message', li),
      output: $('.t-output', li),
      pre: $('.t-output pre', li),
      outcome: $('.t-outcome', li),
      error: $('.t-error', li),
    },
  };
  t.els.id.textContent = id.length > 12 ? `${id.slice(0, 4)}…${id.slice(-6)}` : id;
  t.els.id.title = id;
  const list = $('#tasks');
  if (append) list.append(li);
  else list.prepend(li);
  state.tasks.set(id, t);
  trimRows();
  markDirty(t);
  return t;
}

/** Drops the oldest finished rows beyond MAX_ROWS. */
function trimRows() {
  if (state.tasks.size <= MAX_ROWS) return;
  const dropped = [];
  for (let li = $('#tasks').lastElementChild; li && state.tasks.size > MAX_ROWS;) {
    const prev = li.previousElementSibling;
    const t = state.tasks.get(li.dataset.taskId);
    if (t && TERMINAL.has(t.rec.status)) {
      removeTask(t);
      dropped.push(t.id);
    }
    li = prev;
  }
  forget(dropped);
}

function removeTask(t) {
  t.li.remove();
  state.tasks.delete(t.id);
  state.dirty.delete(t);
  state.running.delete(t);
}

/** Takes a record read over HTTP. `fresh` says no event arrived since the read was sent; when
 *  one did, the event is newer than the record, so only the fields that never change are
 *  taken (and what the row does not know yet). */
function applyRecord(t, rec, fresh) {
  if (fresh || !t.rec.status) {
    t.rec = { ...rec };
  } else {
    for (const k of STATIC_FIELDS) t.rec[k] = rec[k];
    if (rec.status === t.rec.status) {
      for (const k of ['result', 'result_ref', 'error', 'started_at', 'finished_at', 'waiting']) {
        if (t.rec[k] == null && rec[k] != null) t.rec[k] = rec[k];
      }
    }
  }
  markDirty(t);
}

/** Re-reads the record of `t`; a task that no longer exists anywhere leaves the list. */
async function refresh(t) {
  if (!t) return;
  const seen = t.version;
  try {
    applyRecord(t, await api('GET', taskPath(t.id)), t.version === seen);
  } catch (e) {
    if (e.status === 404 && state.tasks.get(t.id) === t) {
      removeTask(t);
      forget([t.id]);
      updateCount();
    }
  }
}

/** One event from the socket: `{seq, type, task_id, session, at, data}`. */
function onEvent(ev) {
  if (typeof ev.seq === 'number') {
    if (state.lastSeq !== null && ev.seq <= state.lastSeq) return; // already applied
    state.lastSeq = ev.seq;
  }
  if (ev.session && ev.session !== state.session) return;
  const known = state.tasks.has(ev.task_id);
  const t = ensureTask(ev.task_id);
  if (!known) {
    // A task of this session that the page did not submit (the CLI, NATS, another tab).
    remember(t.id);
    queueRefresh(t);
  }
  t.version += 1;
  const r = t.rec;
  const d = ev.data;
  switch (ev.type) {
    case 'status': {
      const was = r.status;
      if (d.status === 'queued' && (was === 'running' || was === 'retrying')
          && d.cause !== 'handed_back') {
        // The gateway's `queued` of a new task can reach the stream after the worker's
        // `running` (docs/PROTOCOL.md, "Events"); a running task goes back to queued only when
        // a draining worker hands it back.
        break;
      }
      if (d.status === 'running' && was !== 'running' && was !== 'paused') {
        // A new attempt starts (from queued or retrying): the record resets its progress too.
        r.started_at = ev.at;
        r.progress = null;
      }
      if (d.status !== 'queued') r.waiting = null;
      // A queued task announced queued again waits for something (a concurrency slot): the
      // record says what.
      if (d.status === 'queued' && was === 'queued') queueRefresh(t);
      if (d.status === 'queued' && TERMINAL.has(was)) {
        // `retry`: a new round of attempts; the old outcome no longer applies.
        r.result = null;
        r.result_ref = null;
        r.error = null;
        r.finished_at = null;
        r.progress = null;
      }
      if (TERMINAL.has(d.status)) {
        r.finished_at = ev.at;
        historySoon();
        if (d.status === 'succeeded' && r.progress) r.progress = { ...r.progress, fraction: 1 };
      }
      r.status = d.status;
      r.cause = d.cause;
      if (typeof d.attempt === 'number') r.attempt = d.attempt;
      // Protocol 5: the end carries its outcome (earlier workers sent it just before).
      if ('result' in d) r.result = d.result;
      if (d.result_ref) r.result_ref = d.result_ref;
      if (d.error) r.error = d.error;
      break;
    }
    case 'progress':
      r.progress = { fraction: d.fraction, message: d.message };
      break;
    case 'output':
      t.output = (t.output + (d.text || '')).slice(-OUTPUT_KEEP);
      break;
    // Protocol 4 and earlier (a stream may still hold them): the outcome before the status.
    case 'result':
      r.result = d;
      break;
    case 'result_ref':
      // Too large for an event: the result is in the object store, downloaded on request.
      r.result_ref = d;
      break;
    case 'error':
      r.error = d;
      break;
    default:
      return;
  }
  markDirty(t);
}

function markDirty(t) {
  state.dirty.add(t);
  if (!state.frame) state.frame = requestAnimationFrame(flush);
}

function flush() {
  state.frame = 0;
  for (const t of state.dirty) render(t);
  state.dirty.clear();
  updateCount();
}

function updateCount() {
  $('#task-count').textContent = String(state.tasks.size);
  $('#tasks-empty').hidden = state.tasks.size > 0;
}

function render(t) {
  const r = t.rec;
  const e = t.els;
  const status = r.status || 'loading';
  t.li.dataset.status = status;
  e.kind.textContent = r.kind || '…';
  e.badge.textContent = r.status || '…';
  e.badge.dataset.status = status;
  e.attempt.textContent = r.attempt ? `attempt ${r.attempt}${r.max_attempts ? `/${r.max_attempts}` : ''}` : '';
  for (const b of e.buttons) {
    b.disabled = t.busy || !ALLOWED[b.dataset.verb].has(r.status);
  }

  const fraction = r.progress && Number.isFinite(r.progress.fraction)
    ? Math.min(1, Math.max(0, r.progress.fraction)) : (r.status === 'succeeded' ? 1 : 0);
  e.fill.style.width = `${(fraction * 100).toFixed(1)}%`;
  e.fill.parentElement.title = `${Math.round(fraction * 100)}%`;
  e.message.textContent = (r.progress && r.progress.message) || (fraction > 0 ? `${Math.round(fraction * 100)}%` : '');

  if (t.output !== t.outputShown) {
    e.output.hidden = t.output === '';
    const pre = e.pre;
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = t.output;
    if (atBottom) pre.scrollTop = pre.scrollHeight;
    t.outputShown = t.output;
  }

  renderOutcome(t);
  e.error.textContent = t.actionError;

  if (r.status === 'running') state.running.add(t);
  else state.running.delete(t);
  renderElapsed(t);
}

function renderOutcome(t) {
  const r = t.rec;
  const box = t.els.outcome;
  box.replaceChildren();
  box.classList.remove('error');
  if (r.status === 'succeeded' && r.result_ref) {
    box.append('result ', download(t.id, r.result_ref));
  } else if (r.status === 'succeeded' && r.result !== undefined && r.result !== null) {
    box.append('result ', code(json(r.result, 600)));
  } else if (r.error && r.status !== 'succeeded' && r.status !== 'queued') {
    box.classList.add('error');
    const retrying = r.status === 'retrying' ? ' (will retry)' : '';
    box.append(`${r.error.code}: ${r.error.message}${retrying}`);
  } else if (r.status === 'cancelled' || r.status === 'failed') {
    box.append(`${r.status}${r.cause ? ` by ${r.cause}` : ''}`);
  } else if (r.status === 'queued' && r.waiting) {
    box.append(`waiting for a slot: ${r.waiting}`);
  }
  box.hidden = box.childNodes.length === 0;
}

/** A button that fetches a stored result (with the token, which a plain link would not send)
 *  and saves it as `<id>-result.json`. */
function download(id, ref) {
  const b = document.createElement('button');
  b.type = 'button';
  b.className = 'download';
  b.textContent = `download (${bytes(ref.size)})`;
  b.setAttribute('aria-label', `download the result of task ${id}, ${bytes(ref.size)}`);
  b.addEventListener('click', async () => {
    const headers = state.token ? { authorization: `Bearer ${state.token}` } : {};
    const response = await fetch(`${taskPath(id)}/result`, { headers });
    if (!response.ok) {
      b.textContent = `download failed (${response.status})`;
      return;
    }
    const url = URL.createObjectURL(await response.blob());
    const a = document.createElement('a');
    a.href = url;
    a.download = `${id}-result.json`;
    a.click();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  });
  return b;
}

function bytes(n) {
  if (n >= 1024 * 1024) return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${n} B`;
}

function code(text) {
  const c = document.createElement('code');
  c.textContent = text;
  return c;
}

function json(value, max) {
  const s = JSON.stringify(value);
  return s.length > max ? `${s.slice(0, max)}…` : s;
}

function renderElapsed(t) {
  const r = t.rec;
  const start = Date.parse(r.started_at || '');
  let text = '';
  if (Number.isFinite(start)) {
    const end = r.status === 'running' || !r.finished_at ? Date.now() : Date.parse(r.finished_at);
    text = duration(Math.max(0, end - start));
  }
  if (t.els.elapsed.textContent !== text) t.els.elapsed.textContent = text;
}

function duration(ms) {
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(Math.floor(s % 60)).padStart(2, '0')}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, '0')}m`;
}

/** Once a second: only the running rows' elapsed time, nothing else. */
function tick() {
  for (const t of state.running) renderElapsed(t);
}

async function control(t, verb) {
  t.busy = true;
  t.actionError = '';
  markDirty(t);
  const seen = t.version;
  try {
    applyRecord(t, await api('POST', `${taskPath(t.id)}/${verb}`), t.version === seen);
  } catch (e) {
    t.actionError = `${verb}: ${e.message}`;
    const current = e.body && e.body.error && e.body.error.status;
    if (current && t.version === seen) t.rec.status = current;
  } finally {
    t.busy = false;
    markDirty(t);
  }
}

// ---------------------------------------------------------------------------------------------
// Submit form

function setFieldError(name, message) {
  const p = document.querySelector(`.field-error[data-for="${name}"]`);
  if (p) p.textContent = message;
  const input = $(`#f-${name}`);
  if (input) input.setAttribute('aria-invalid', message ? 'true' : 'false');
}

function clearSubmitErrors() {
  for (const name of ['kind', 'input', 'priority', 'class']) setFieldError(name, '');
  $('#submit-error').textContent = '';
}

/** The input textarea as JSON, or undefined with the field error shown. Empty means `null`. */
function parseInput() {
  const text = $('#f-input').value.trim();
  if (text === '') {
    setFieldError('input', '');
    return { ok: true, value: null };
  }
  try {
    const value = JSON.parse(text);
    setFieldError('input', '');
    return { ok: true, value };
  } catch (e) {
    setFieldError('input', `Not valid JSON: ${e.message}`);
    return { ok: false };
  }
}

/** Shows an API error next to the field it names (`input.seconds` belongs to the input box). */
function showSubmitError(e) {
  const field = e.field || '';
  const name = field.split('.')[0];
  if (['kind', 'input', 'priority', 'class'].includes(name)) {
    setFieldError(name, field.includes('.') ? `${field}: ${e.message}` : e.message);
  } else {
    $('#submit-error').textContent = field ? `${field}: ${e.message}` : e.message;
  }
}

async function submitTask(ev) {
  ev.preventDefault();
  clearSubmitErrors();
  $('#submit-ok').textContent = '';
  const form = ev.target;
  const kind = form.kind.value.trim();
  if (!kind) {
    setFieldError('kind', 'Name a kind, e.g. sleep.');
    return;
  }
  const input = parseInput();
  if (!input.ok) return;
  const body = { kind, session: state.session, priority: form.priority.value };
  if (input.value !== null) body.input = input.value;
  if (form.class.value) body.class = form.class.value;

  const button = $('#submit-button');
  button.disabled = true;
  try {
    const rec = await api('POST', '/v1/tasks', body);
    const t = ensureTask(rec.id);
    applyRecord(t, rec, t.version === 0);
    remember(rec.id);
    form.dataset.lastId = rec.id;
    $('#submit-ok').textContent = `Submitted ${rec.id} (${rec.class} · ${rec.priority})`;
  } catch (e) {
    showSubmitError(e);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Live events

function setConnection(conn, text) {
  const box = $('#conn');
  box.dataset.state = conn;
  $('#conn-text').textContent = text || conn;
}

function socketUrl() {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  // `since=0` on the first connection replays the session's events still in the stream (the
  // last hour), which brings back the tasks a new tab has never seen; later connections resume
  // after the last event applied, so nothing is missed and nothing repeats.
  const since = state.lastSeq === null ? 0 : state.lastSeq;
  return `${scheme}//${location.host}/v1/ws?session=${encodeURIComponent(state.session)}&since=${since}`;
}

async function connect() {
  clearTimeout(state.reconnectTimer);
  if (state.authRequired && !state.token) return;
  const attempt = ++state.connects;
  let ticket = '';
  if (state.token) {
    try {
      ticket = `&ticket=${encodeURIComponent((await api('POST', '/v1/ws-ticket')).ticket)}`;
    } catch (e) {
      // A refused token signs the page out (as any 401 does); anything else is retried.
      if (attempt === state.connects && !(e instanceof ApiError && e.status === 401)) {
        scheduleReconnect();
      }
      return;
    }
    // Signed out, or a newer connect (a session change) started, while it was on its way.
    if (attempt !== state.connects || !state.token) return;
  }
  const url = socketUrl() + ticket;
  let ws;
  try {
    ws = new WebSocket(url, ['claw.v1']);
  } catch {
    scheduleReconnect();
    return;
  }
  state.ws = ws;
  if (state.failures === 0) setConnection('connecting');
  ws.onmessage = (m) => {
    if (state.ws !== ws) return;
    let frame;
    try {
      frame = JSON.parse(m.data);
    } catch {
      return;
    }
    onFrame(frame);
  };
  ws.onclose = () => {
    if (state.ws !== ws) return;
    state.ws = null;
    scheduleReconnect();
  };
}

function onFrame(frame) {
  if (frame.type === 'hello') {
    // The hello's `seq` (the stream's end at connect time) is not used as a resume mark: the
    // replay that follows it carries lower sequences, and every event carries its own.
    state.failures = 0;
    setConnection('connected');
    resync();
  } else if (frame.type === 'gap') {
    // The stream no longer holds some events after our `since`: the records say what they said.
    resync();
  } else if (typeof frame.task_id === 'string' && frame.type !== 'reply') {
    onEvent(frame);
  }
}

/** Re-reads every unfinished task on the page: whatever the socket missed is in the record. */
function resync() {
  for (const t of state.tasks.values()) {
    if (!TERMINAL.has(t.rec.status)) queueRefresh(t);
  }
}

function scheduleReconnect() {
  state.failures += 1;
  const backoff = Math.min(RECONNECT_MAX_MS, RECONNECT_MIN_MS * 2 ** (state.failures - 1));
  const delay = backoff / 2 + Math.random() * backoff / 2; // jitter: tabs don't reconnect in step
  setConnection('reconnecting', 'reconnecting…');
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = setTimeout(connect, delay);
}

function reconnectNow() {
  const old = state.ws;
  state.ws = null;
  if (old) old.close(1000, 'session changed');
  state.failures = 0;
  connect();
}

// ---------------------------------------------------------------------------------------------
// Lanes

async function loadLanes() {
  try {
    const { lanes } = await api('GET', '/v1/lanes');
    renderLanes(lanes);
    $('#lanes-error').textContent = '';
  } catch (e) {
    $('#lanes-error').textContent = e.message;
  }
}

function renderLanes(lanes) {
  const body = $('#lanes-body');
  if (state.lanes.size === 0) body.replaceChildren();
  for (const lane of lanes) {
    const key = `${lane.class}/${lane.priority}`;
    let row = state.lanes.get(key);
    if (!row) {
      const tr = document.createElement('tr');
      tr.dataset.lane = key;
      tr.innerHTML = '<td></td><td class="num"></td><td class="num"></td><td><button type="button"></button></td>';
      tr.cells[0].textContent = `${lane.class} · ${lane.priority}`;
      row = { tr, depth: tr.cells[1], flight: tr.cells[2], button: $('button', tr) };
      row.button.addEventListener('click', () => toggleLane(row));
      state.lanes.set(key, row);
      body.append(tr);
    }
    row.lane = lane;
    row.tr.classList.toggle('paused', lane.paused);
    row.depth.textContent = String(lane.depth);
    row.flight.textContent = String(lane.in_flight);
    row.button.textContent = lane.paused ? 'Resume' : 'Pause';
  }
}

async function toggleLane(row) {
  const { lane } = row;
  const action = lane.paused ? 'resume' : 'pause';
  row.button.disabled = true;
  try {
    await api('POST', `/v1/lanes/${lane.class}/${lane.priority}/${action}`);
    $('#lanes-error').textContent = '';
  } catch (e) {
    $('#lanes-error').textContent = `${action} ${lane.class}/${lane.priority}: ${e.message}`;
  } finally {
    row.button.disabled = false;
    loadLanes();
  }
}

// ---------------------------------------------------------------------------------------------
// History

async function loadHistory(more) {
  const form = $('#history-form');
  const params = new URLSearchParams();
  if (!form.all.checked) params.set('session', state.session);
  if (form.status.value) params.set('status', form.status.value);
  if (form.kind.value.trim()) params.set('kind', form.kind.value.trim());
  params.set('limit', form.limit.value);
  if (more && state.history.cursor) params.set('cursor', state.history.cursor);
  const body = $('#history-body');
  try {
    const page = await api('GET', `/v1/tasks?${params}`);
    if (!more) body.replaceChildren();
    for (const rec of page.tasks) body.append(historyRow(rec));
    if (!more && page.tasks.length === 0) {
      const tr = body.insertRow();
      const td = tr.insertCell();
      td.colSpan = 7;
      td.className = 'muted';
      td.textContent = 'No finished tasks match.';
    }
    state.history.cursor = page.next_cursor || null;
    state.history.paged = more;
    $('#history-more').hidden = !state.history.cursor;
    $('#history-error').textContent = '';
  } catch (e) {
    $('#history-error').textContent = e.message;
  }
}

/** A finished task lands in the archive shortly after: refresh the first history page then,
 *  once for a burst of finishes, and never while the user is paging further back. */
function historySoon() {
  if (state.history.paged) return;
  clearTimeout(state.history.timer);
  state.history.timer = setTimeout(() => loadHistory(false), 1500);
}

function historyRow(rec) {
  const tr = document.createElement('tr');
  tr.dataset.taskId = rec.id;
  const cells = Array.from({ length: 7 }, () => tr.insertCell());
  cells[0].textContent = rec.id.length > 12 ? `${rec.id.slice(0, 4)}…${rec.id.slice(-6)}` : rec.id;
  cells[0].title = rec.id;
  cells[0].className = 't-id';
  cells[1].textContent = rec.kind;
  const badge = document.createElement('span');
  badge.className = 'badge';
  badge.dataset.status = rec.status;
  badge.textContent = rec.status;
  cells[2].append(badge);
  cells[3].textContent = rec.session;
  const created = new Date(rec.created_at);
  cells[4].textContent = Number.isFinite(created.getTime()) ? created.toLocaleString() : '';
  const start = Date.parse(rec.started_at || rec.created_at);
  const end = Date.parse(rec.finished_at || '');
  cells[5].className = 'num';
  cells[5].textContent = Number.isFinite(start) && Number.isFinite(end) ? duration(end - start) : '';
  cells[6].className = 'outcome';
  const outcome = rec.status === 'succeeded'
    ? (rec.result_ref ? `stored result, ${bytes(rec.result_ref.size)}` : json(rec.result ?? null, 200))
    : rec.error ? `${rec.error.code}: ${rec.error.message}` : (rec.cause || '');
  cells[6].textContent = outcome;
  cells[6].title = outcome;
  return tr;
}

// ---------------------------------------------------------------------------------------------
// Wiring

function start() {
  $('#session-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const s = $('#session').value.trim();
    if (TOKEN.test(s) && s !== state.session) switchSession(s);
  });

  const form = $('#submit-form');
  form.addEventListener('submit', submitTask);
  $('#f-input').addEventListener('input', () => {
    state.inputEdited = true;
    parseInput();
  });
  $('#f-kind').addEventListener('input', (ev) => {
    setFieldError('kind', '');
    const template = INPUT_TEMPLATES[ev.target.value.trim()];
    if (template && !state.inputEdited) {
      $('#f-input').value = template;
      parseInput();
    }
  });

  $('#tasks').addEventListener('click', (ev) => {
    const button = ev.target.closest('button[data-verb]');
    if (!button) return;
    const t = state.tasks.get(button.closest('li.task').dataset.taskId);
    if (t) control(t, button.dataset.verb);
  });
  $('#clear-finished').addEventListener('click', () => {
    const done = [...state.tasks.values()].filter((t) => TERMINAL.has(t.rec.status));
    for (const t of done) removeTask(t);
    forget(done.map((t) => t.id));
    updateCount();
  });

  $('#history-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    loadHistory(false);
  });
  $('#history-more').addEventListener('click', () => loadHistory(true));

  $('#auth-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const token = $('#auth-token').value.trim();
    $('#auth-token').value = '';
    if (token) signIn(token);
  });
  $('#sign-out').addEventListener('click', signOut);
  state.token = storageGet('claw.token');
  $('#sign-out').hidden = !state.token;

  setInterval(tick, 1000);
  setInterval(() => {
    if (!document.hidden && !(state.authRequired && !state.token)) loadLanes();
  }, LANES_EVERY_MS);
  loadLanes();

  switchSession(initialSession());
}

start();
