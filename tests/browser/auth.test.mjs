// The web UI's sign-in against a gateway with API tokens (started by tests/e2e/browser.rs):
// the first 401 shows the token form; with the token the page connects its WebSocket (with a
// single-use ticket from POST /v1/ws-ticket: the token is in no socket URL or subprotocol, where
// proxies would log it), submits a task and watches it finish; a wrong token is refused with a
// message; "Sign out" forgets the token.
//
//   node tests/browser/auth.test.mjs <gateway-url> <token>
//
// Exit status 0 means every check passed. Every wait polls the page with a deadline.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { chromium } from 'playwright-core';

const [base, token] = process.argv.slice(2);
if (!base || !token) {
  console.error('usage: node auth.test.mjs <gateway-url> <token>');
  process.exit(2);
}
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const WAIT_MS = 20_000;
const log = (...args) => console.log('[auth]', ...args);

async function until(page, what, fn, arg) {
  try {
    return await (await page.waitForFunction(fn, arg, { timeout: WAIT_MS, polling: 50 })).jsonValue();
  } catch (e) {
    throw new Error(`timed out waiting for ${what}: ${e.message.split('\n')[0]}`);
  }
}


async function main() {
  const userDataDir = mkdtempSync(path.join(tmpdir(), 'claw-chromium-'));
  const browser = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = browser.pages()[0] || await browser.newPage();
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  const sockets = [];
  page.on('websocket', (ws) => sockets.push(ws.url()));
  try {
    await page.goto(`${base}/?session=browser-auth`);
    await until(page, 'the sign-in form', () => !document.querySelector('#auth-card').hidden);
    log('asked for a token');

    await page.fill('#auth-token', 'claw_wrong-0123456789abcdef');
    await page.click('#auth-form button[type=submit]');
    await until(page, 'the wrong token to be refused', () =>
      !document.querySelector('#auth-card').hidden
      && document.querySelector('#auth-error').textContent.includes('not accepted'));
    log('a wrong token is refused');

    await page.fill('#auth-token', token);
    await page.click('#auth-form button[type=submit]');
    await until(page, 'the socket to connect', () =>
      document.querySelector('#conn').dataset.state === 'connected'
      && document.querySelector('#auth-card').hidden);
    const stored = await page.evaluate(() => localStorage.getItem('claw.token'));
    if (stored !== token) throw new Error('the token is not kept in localStorage');
    log('signed in, socket connected');
    if (!sockets.some((url) => /[?&]ticket=ct_[0-9a-f]{64}(&|$)/.test(url))) {
      throw new Error(`no socket opened with a ticket: ${sockets.join(' ')}`);
    }
    if (sockets.some((url) => url.includes(token))) throw new Error('the token is in a socket URL');
    log('the socket was opened with a ticket, not the token');

    await page.fill('#f-kind', 'sleep');
    await page.fill('#f-input', '{"seconds": 0.3, "steps": 3}');
    await page.click('#submit-button');
    const id = await until(page, 'the submitted task id',
      () => document.querySelector('#submit-form').dataset.lastId || false);
    await until(page, `task ${id} to succeed on the page`, (id) => {
      const li = document.querySelector(`li.task[data-task-id="${id}"]`);
      return li && li.dataset.status === 'succeeded';
    }, id);
    log(`task ${id} succeeded, seen live`);

    // The principal may run one task at a time (running_tasks = 1 in the test's tokens file):
    // a second one waits, and its row says for what until it runs.
    const ids = [];
    for (const seconds of [2, 0.2]) {
      await page.fill('#f-input', JSON.stringify({ seconds }));
      const before = await page.evaluate(() => document.querySelector('#submit-form').dataset.lastId);
      await page.click('#submit-button');
      ids.push(await until(page, 'the next submitted task id', (before) => {
        const last = document.querySelector('#submit-form').dataset.lastId;
        return last && last !== before ? last : false;
      }, before));
    }
    const waitingText = await until(page, `task ${ids[1]} to say it waits for a slot`, (id) => {
      const li = document.querySelector(`li.task[data-task-id="${id}"]`);
      const text = li && li.textContent;
      return li && li.dataset.status === 'queued' && text.includes('waiting for a slot') ? text : false;
    }, ids[1]);
    if (!waitingText.includes('principal:web (limit 1)')) throw new Error(`waiting row: ${waitingText}`);
    await until(page, 'both to succeed, the second after the first', (ids) => ids.every((id) => {
      const li = document.querySelector(`li.task[data-task-id="${id}"]`);
      return li && li.dataset.status === 'succeeded' && !li.textContent.includes('waiting for a slot');
    }), ids);
    log('a task over the running_tasks limit says it waits, then runs');

    await page.reload();
    await until(page, 'the stored token to reconnect after a reload', () =>
      document.querySelector('#conn').dataset.state === 'connected'
      && document.querySelector('#auth-card').hidden
      && !document.querySelector('#sign-out').hidden);

    await page.click('#sign-out');
    await until(page, 'the form after signing out', () =>
      !document.querySelector('#auth-card').hidden && localStorage.getItem('claw.token') === null);
    log('signed out');
    const tickets = sockets.map((url) => new URL(url).searchParams.get('ticket')).filter(Boolean);
    if (new Set(tickets).size !== tickets.length) throw new Error('a ticket was used twice');
    if (problems.length) throw new Error(problems.join('\n'));
  } finally {
    await browser.close();
    rmSync(userDataDir, { recursive: true, force: true });
  }
}

main().then(() => log('ok'), (e) => {
  console.error(e);
  process.exit(1);
});
