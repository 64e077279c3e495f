// The web UI in a real browser (Debian's Chromium driven by playwright-core), against a real
// gateway, worker, archiver and nats-server started by tests/e2e/browser.rs.
//
//   node tests/browser/ui.test.mjs <gateway-url> <output-dir>
//
// It talks to its parent over stdio: it prints `RESTART` when it wants the gateway restarted
// and waits for a `RESTARTED` line on stdin, and `STALE <task> <session>` when it wants a late
// `queued` status event stored for a running task (answered `STALED`); every other line it
// prints is a log line, and
// `SCREENSHOT <path>` names the picture it saved. Exit status 0 means every check passed.
//
// Every wait polls a condition in the page with a deadline (page.waitForFunction, locator
// waits); none sleeps for a fixed time hoping an event has arrived.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

import { chromium } from 'playwright-core';

const [base, outDir = tmpdir()] = process.argv.slice(2);
if (!base) {
  console.error('usage: node ui.test.mjs <gateway-url> [output-dir]');
  process.exit(2);
}
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const WAIT_MS = 20_000;

const log = (...args) => console.log('[ui]', ...args);

// Lines from the parent (stdin), consumed one at a time by `nextLine`.
const lines = [];
const lineWaiters = [];
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const waiter = lineWaiters.shift();
  if (waiter) waiter(line);
  else lines.push(line);
});
const nextLine = (timeoutMs) => new Promise((resolve, reject) => {
  if (lines.length) return resolve(lines.shift());
  const timer = setTimeout(() => reject(new Error('no answer from the test runner on stdin')), timeoutMs);
  lineWaiters.push((line) => {
    clearTimeout(timer);
    resolve(line);
  });
});

/** Polls `fn(arg)` in the page until it is truthy; fails naming `what`. */
async function until(page, what, fn, arg, timeout = WAIT_MS) {
  try {
    return await (await page.waitForFunction(fn, arg, { timeout, polling: 50 })).jsonValue();
  } catch (e) {
    throw new Error(`timed out after ${timeout} ms waiting for ${what}: ${e.message.split('\n')[0]}`);
  }
}

const row = (page, id) => page.locator(`li.task[data-task-id="${id}"]`);

/** Status of a task row as the page shows it. */
function statusIs(page, id, status, timeout) {
  return until(page, `task ${id} to show ${status}`, ([id, status]) => {
    const li = document.querySelector(`li.task[data-task-id="${id}"]`);
    return li && li.querySelector('.badge').textContent === status;
  }, [id, status], timeout);
}

/** The width of a task's progress bar, in percent of its track. */
function progressAbove(page, id, above, timeout) {
  return until(page, `task ${id}'s progress bar to pass ${above}%`, ([id, above]) => {
    const fill = document.querySelector(`li.task[data-task-id="${id}"] .bar-fill`);
    const w = fill ? parseFloat(fill.style.width) : NaN;
    return w > above ? w : false;
  }, [id, above], timeout);
}

async function submit(page, kind, input, opts = {}) {
  await page.fill('#f-kind', kind);
  await page.fill('#f-input', input);
  await page.selectOption('#f-priority', opts.priority || 'normal');
  await page.selectOption('#f-class', opts.class || '');
  const before = await page.getAttribute('#submit-form', 'data-last-id');
  await page.click('#submit-button');
  const id = await until(page, 'the submitted task id', (before) => {
    const id = document.querySelector('#submit-form').dataset.lastId;
    return id && id !== before ? id : false;
  }, before);
  await row(page, id).waitFor({ timeout: WAIT_MS });
  log(`submitted ${kind} ${input} as ${id}`);
  return id;
}

async function click(page, id, verb) {
  const button = row(page, id).locator(`button[data-verb="${verb}"]`);
  await button.click({ timeout: WAIT_MS }); // waits until enabled
}

/**
 * Waits until a task's enabled buttons are `verbs` (sorted, comma separated): while a click's
 * request is in flight the row's buttons are disabled, and its status event can arrive first.
 */
function verbsAre(page, id, verbs, timeout) {
  return until(page, `task ${id}'s enabled buttons to be [${verbs}]`, ([id, verbs]) => {
    const li = document.querySelector(`li.task[data-task-id="${id}"]`);
    const on = li ? [...li.querySelectorAll('button[data-verb]:not([disabled])')] : [];
    return on.map((b) => b.dataset.verb).sort().join(',') === verbs;
  }, [id, verbs], timeout);
}

function check(cond, message) {
  if (!cond) throw new Error(`check failed: ${message}`);
}

async function main() {
  const userDataDir = mkdtempSync(path.join(tmpdir(), 'claw-chromium-'));
  // A persistent context on a fresh, empty profile directory of our own.
  const browser = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    viewport: { width: 1280, height: 1000 },
    // Without the background-networking flags Chromium keeps dialing Google's hosts, and a
    // closed network answers each one with a refused connection.
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const problems = [];
  const page = browser.pages()[0] || await browser.newPage();
  try {
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('console', (m) => {
      // Expected: a socket refused while the gateway restarts, and the browser's note on the
      // 4xx the test provokes on purpose. Anything else is a bug.
      const expected = /WebSocket connection to .* failed|status of 4\d\d/;
      if (m.type() === 'error' && !expected.test(m.text())) {
        problems.push(`console error: ${m.text()}`);
      }
    });

    const session = `browser-${Date.now().toString(36)}`;
    await page.goto(`${base}/?session=${session}`);
    // Record every state of the connection indicator, so a quick reconnect is not missed.
    await page.evaluate(() => {
      const conn = document.querySelector('#conn');
      window.connStates = [conn.dataset.state];
      new MutationObserver(() => window.connStates.push(conn.dataset.state))
        .observe(conn, { attributes: true, attributeFilter: ['data-state'] });
    });
    await until(page, 'the socket to connect', () =>
      document.querySelector('#conn').dataset.state === 'connected');
    check(await page.inputValue('#session') === session, 'the session comes from the URL');
    await until(page, 'the lanes table', () => document.querySelectorAll('#lanes-body tr[data-lane]').length === 6);
    log('page loaded, socket connected, six lanes shown');

    // A bad input never leaves the page; a wrong one gets the API's field error.
    await page.fill('#f-input', '{"seconds": ');
    await until(page, 'the JSON error', () =>
      document.querySelector('.field-error[data-for="input"]').textContent.startsWith('Not valid JSON'));
    await page.fill('#f-kind', 'sleep');
    await page.fill('#f-input', '{"seconds": "long"}');
    await page.click('#submit-button');
    await until(page, 'the API field error', () =>
      document.querySelector('.field-error[data-for="input"]').textContent.includes('input.seconds'));
    log('invalid JSON and a 422 with field input.seconds are shown at the input');

    // A short task: the bar moves, the status reaches succeeded, the result is shown.
    const quick = await submit(page, 'sleep', '{"seconds": 3, "steps": 6}');
    const first = await progressAbove(page, quick, 0);
    check(first < 100, `the first progress seen is partial (${first}%)`);
    const later = await progressAbove(page, quick, first);
    log(`progress bar moved: ${first}% → ${later}%`);
    await statusIs(page, quick, 'succeeded');
    await until(page, 'the result and the elapsed time', (id) => {
      const li = document.querySelector(`li.task[data-task-id="${id}"]`);
      return li.querySelector('.t-outcome').textContent.includes('result')
        && /s$/.test(li.querySelector('.t-elapsed').textContent);
    }, quick);
    check(parseFloat(await row(page, quick).locator('.bar-fill').evaluate((e) => e.style.width)) === 100,
      'a succeeded task shows a full bar');
    await verbsAre(page, quick, ''); // no control applies to a succeeded task
    log(`task ${quick} succeeded with its result shown`);

    // A long task: pause, resume, cancel, each reflected live; buttons follow the status.
    const long = await submit(page, 'sleep', '{"seconds": 30, "steps": 30}', { priority: 'high' });
    await statusIs(page, long, 'running');
    await progressAbove(page, long, 0);
    // A `queued` announcement that reaches the stream after `running` (a gateway and a worker
    // in separate processes) does not turn the running task back: the runner stores one, and
    // once a later progress event is shown, the page has applied it.
    console.log(`STALE ${long} ${session}`);
    const staled = await nextLine(WAIT_MS);
    check(staled === 'STALED', `the runner answered ${JSON.stringify(staled)}`);
    const before = parseFloat(await row(page, long).locator('.bar-fill').evaluate((e) => e.style.width));
    await progressAbove(page, long, before);
    check(await row(page, long).getAttribute('data-status') === 'running', 'a late queued event is ignored');
    log('a late queued event left the running task running');
    await verbsAre(page, long, 'cancel,pause'); // a running task can be paused or cancelled
    await click(page, long, 'pause');
    await statusIs(page, long, 'paused');
    await verbsAre(page, long, 'cancel,resume'); // a paused task can be resumed or cancelled
    await click(page, long, 'resume');
    await statusIs(page, long, 'running');
    await click(page, long, 'cancel');
    await statusIs(page, long, 'cancelled');
    await verbsAre(page, long, 'retry'); // a cancelled task can only be retried
    log(`task ${long} paused, resumed and cancelled from the page`);

    // A lane paused and resumed from the lanes panel.
    const lane = page.locator('#lanes-body tr[data-lane="long/low"]');
    await lane.locator('button').click();
    await until(page, 'lane long/low to show paused', () =>
      document.querySelector('tr[data-lane="long/low"]').classList.contains('paused'));
    await lane.locator('button', { hasText: 'Resume' }).click();
    await until(page, 'lane long/low to run again', () =>
      !document.querySelector('tr[data-lane="long/low"]').classList.contains('paused'));
    log('lane long/low paused and resumed');

    // A gateway restart while a task runs: the page reconnects by itself, and both the events
    // it missed while the gateway was down and the ones after arrive.
    const across = await submit(page, 'sleep', '{"seconds": 4, "steps": 8}');
    await statusIs(page, across, 'running');
    const beforeRestart = await page.evaluate(() => window.connStates.length);
    console.log('RESTART');
    const answer = await nextLine(60_000);
    check(answer === 'RESTARTED', `the runner answered ${JSON.stringify(answer)}`);
    await until(page, 'the indicator to show the reconnect', (n) => {
      const seen = window.connStates.slice(n);
      const r = seen.indexOf('reconnecting');
      return r >= 0 && seen.indexOf('connected', r) > r
        && document.querySelector('#conn').dataset.state === 'connected';
    }, beforeRestart);
    log(`reconnected after the restart (indicator went ${await page.evaluate((n) => window.connStates.slice(n).join(' → '), beforeRestart)})`);
    await statusIs(page, across, 'succeeded');
    const after = await submit(page, 'sleep', '{"seconds": 2, "steps": 4}');
    await progressAbove(page, after, 0);
    await statusIs(page, after, 'succeeded');
    log(`task ${across} (across the restart) and ${after} (after it) succeeded live`);

    // History from the archive, filtered by status.
    await page.selectOption('#history-form select[name="status"]', 'succeeded');
    await until(page, 'the finished tasks in the history', ([a, b]) => {
      const has = (id) => document.querySelector(`#history-body tr[data-task-id="${id}"]`);
      if (has(a) && has(b)) return true;
      // The archiver writes shortly after the finish: search again, at most once a second.
      if (!(Date.now() - (window.lastSearch || 0) < 1000)) {
        window.lastSearch = Date.now();
        document.querySelector('#history-form button[type="submit"]').click();
      }
      return false;
    }, [quick, after]);
    check(await page.locator(`#history-body tr[data-task-id="${long}"]`).count() === 0,
      'the status filter leaves the cancelled task out');
    log('history shows the succeeded tasks and filters out the cancelled one');

    // Leave a paused task on screen so the picture shows every kind of row.
    const shown = await submit(page, 'sleep', '{"seconds": 60, "steps": 60}', { class: 'long', priority: 'low' });
    await progressAbove(page, shown, 0);
    await click(page, shown, 'pause');
    await statusIs(page, shown, 'paused');
    await page.locator(`li.task[data-task-id="${quick}"]`).scrollIntoViewIfNeeded();
    const shot = path.join(outDir, 'ui.png');
    await page.screenshot({ path: shot, fullPage: true });
    console.log(`SCREENSHOT ${shot}`);

    check(problems.length === 0, `the page reported problems:\n  ${problems.join('\n  ')}`);
    log('all checks passed');
  } catch (e) {
    // What the page showed when it failed: the rows as text, and a picture.
    const rows = await page.locator('li.task').evaluateAll((lis) => lis.map((li) =>
      `${li.dataset.taskId} ${li.dataset.status} | ${li.innerText.replace(/\s+/g, ' ')}`)).catch(() => []);
    log(`rows at failure:\n  ${rows.join('\n  ')}`);
    if (problems.length) log(`page problems:\n  ${problems.join('\n  ')}`);
    const shot = path.join(outDir, 'failure.png');
    await page.screenshot({ path: shot, fullPage: true }).catch(() => {});
    console.log(`SCREENSHOT ${shot}`);
    throw e;
  } finally {
    await browser.close();
    rmSync(userDataDir, { recursive: true, force: true });
  }
}

main().then(() => process.exit(0), (e) => {
  console.error(`[ui] FAILED: ${e.stack || e}`);
  process.exit(1);
});
