// Drives the live page's back office in headless Chromium, as a shop manager would:
// signs in with a manager token, creates a SKU whose sale opens a few seconds later,
// watches its card count down and flip to the live level at the opening, then receives
// goods and writes some off through the page's forms, and sees the level follow. Then
// it opens the waitlist of WAITLIST_SKU (sold out, with WAITLISTED orders waiting, set
// up by the caller), receives one unit of it through the page, and sees the head of the
// waitlist promoted off the list.
//
//   PAGE_URL=http://127.0.0.1:8081/ TOKEN=<manager JWT> SKU=drop-1 STOCK=20 OPENS_IN_SECS=6 \
//   WAITLIST_SKU=wl-1 WAITLISTED=2 SCREENSHOT=target/back-office.png node tests/browser/back-office.mjs
//
// Prints exactly one JSON line on stdout: {"ok":true,...} (exit 0) or {"ok":false,"error":...}
// (exit 1). Progress goes to stderr.

import fs from 'node:fs/promises';
import path from 'node:path';

const TOTAL_MS = 60_000;
const started = Date.now();
const deadline = started + TOTAL_MS;
const pageErrors = [];
let step = 'setup';
let browser = null;
let page = null;

const log = (msg) => process.stderr.write(`[back-office ${((Date.now() - started) / 1000).toFixed(1)}s] ${msg}\n`);
const remaining = (cap = TOTAL_MS) => {
  const left = deadline - Date.now();
  if (left <= 0) throw new Error(`total time of ${TOTAL_MS / 1000} s used up`);
  return Math.min(cap, left);
};
function env(name, fallback) {
  const v = process.env[name];
  if (v === undefined || v === '') {
    if (fallback !== undefined) return fallback;
    throw new Error(`environment variable ${name} is required`);
  }
  return v;
}

async function finish(result, code) {
  if (browser) await Promise.race([browser.close().catch(() => {}), new Promise((r) => setTimeout(r, 5_000))]);
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exit(code);
}

async function shown(sku) {
  try {
    return await page.evaluate((sku) => {
      const text = (sel) => document.querySelector(sel)?.textContent?.trim() ?? null;
      const card = [...document.querySelectorAll('#stock [data-sku]')].find((e) => e.dataset.sku === sku);
      return {
        status: text('#status'),
        whoami: text('#whoami'),
        office_hidden: document.querySelector('#office')?.hidden ?? null,
        office_result: text('#office-result'),
        card: card ? { available: card.querySelector('.available')?.textContent, tag: card.querySelector('.sku-tag')?.textContent, window: card.dataset.window } : null,
      };
    }, sku);
  } catch (err) {
    return { unavailable: err.message };
  }
}

const watchdog = setTimeout(() => finish({ ok: false, error: `${step}: hung` }, 1), TOTAL_MS + 10_000);
watchdog.unref();

async function main() {
  const PAGE_URL = env('PAGE_URL');
  const TOKEN = env('TOKEN');
  const SKU = env('SKU');
  const STOCK = Number(env('STOCK', '20'));
  const OPENS_IN_SECS = Number(env('OPENS_IN_SECS', '6'));
  const SCREENSHOT = env('SCREENSHOT');
  const WAITLIST_SKU = env('WAITLIST_SKU');
  const WAITLISTED = Number(env('WAITLISTED'));
  const { chromium } = await import('playwright-core');
  browser = await chromium.launch({
    executablePath: env('CHROMIUM', '/usr/bin/chromium'),
    headless: true,
    timeout: remaining(30_000),
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-sync'],
  });
  page = await (await browser.newContext({ viewport: { width: 1440, height: 1100 } })).newPage();
  page.on('pageerror', (err) => pageErrors.push(String(err && err.stack ? err.stack : err)));

  const card = (sku) => [...document.querySelectorAll('#stock [data-sku]')].find((e) => e.dataset.sku === sku);
  const waitFor = async (what, fn, arg, ms) => {
    try {
      const h = await page.waitForFunction(fn, arg, { timeout: remaining(ms), polling: 50 });
      return await h.jsonValue();
    } catch {
      throw new Error(`${what}; the page shows ${JSON.stringify(await shown(SKU))}`);
    }
  };
  const result = async (what) => {
    const r = await waitFor(`${what}: #office-result never settled`, () => {
      const el = document.querySelector('#office-result');
      return el && (el.dataset.state === 'ok' || el.dataset.state === 'error') ? { state: el.dataset.state, text: el.textContent } : null;
    }, null, 15_000);
    log(`${what}: ${r.state} ${r.text}`);
    return r;
  };

  step = '1 open and sign in';
  const response = await page.goto(PAGE_URL, { waitUntil: 'domcontentloaded', timeout: remaining(15_000) });
  if (!response || !response.ok()) throw new Error(`GET ${PAGE_URL} failed`);
  await waitFor('the stream never went live', () => (document.querySelector('#status')?.textContent || '').includes('live'), null, 15_000);
  if (!(await page.evaluate(() => document.querySelector('#office').hidden))) throw new Error('the back office shows before any token');
  await page.fill('#token', TOKEN);
  await page.click('#use-token');
  await waitFor('the back office never showed for the manager token', () => !document.querySelector('#office').hidden
    && /manager/.test(document.querySelector('#whoami')?.textContent || ''), null, 5_000);

  step = '2 create a SKU whose sale opens soon';
  const opensAt = Date.now() + OPENS_IN_SECS * 1000;
  await page.fill('#new-sku', SKU);
  await page.fill('#new-name', `Drop ${SKU}`);
  await page.fill('#new-price', '1000');
  await page.fill('#new-stock', String(STOCK));
  // datetime-local takes the browser's local time, to the second.
  await page.evaluate((ms) => {
    const d = new Date(Math.ceil(ms / 1000) * 1000);
    const p = (n) => String(n).padStart(2, '0');
    document.querySelector('#new-starts').value =
      `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }, opensAt);
  await page.click('#create-sku');
  const created = await result('create');
  if (created.state !== 'ok' || !created.text.includes(`created ${SKU}`)) throw new Error(`create refused: ${created.text}`);

  step = '3 the card counts down';
  const countdown = await waitFor('no countdown on the new SKU\'s card', (sku) => {
    const c = [...document.querySelectorAll('#stock [data-sku]')].find((e) => e.dataset.sku === sku);
    const t = c?.querySelector('.available')?.textContent || '';
    return c && c.dataset.window === 'upcoming' && /^opens in \d+:\d\d$/.test(t) ? t : null;
  }, SKU, 10_000);
  log(`countdown: ${countdown}`);

  step = '4 it flips to the live level at the opening';
  const flip = await waitFor(`the card never showed ${STOCK} after the opening`, ({ sku, stock }) => {
    const c = [...document.querySelectorAll('#stock [data-sku]')].find((e) => e.dataset.sku === sku);
    return c && c.dataset.window === '' && c.querySelector('.available')?.textContent === String(stock) ? Date.now() : null;
  }, { sku: SKU, stock: STOCK }, OPENS_IN_SECS * 1000 + 10_000);
  const flippedAfterMs = flip - Math.ceil(opensAt / 1000) * 1000;
  log(`flipped ${flippedAfterMs} ms after the opening`);

  step = '5 receive goods';
  await waitFor('the stock form has no option for the SKU', (sku) => [...document.querySelectorAll('#stock-sku option')].some((o) => o.value === sku), SKU, 5_000);
  await page.selectOption('#stock-sku', SKU);
  await page.fill('#stock-qty', '5');
  await page.click('#receive-stock');
  const received = await result('receive');
  if (received.state !== 'ok') throw new Error(`receive refused: ${received.text}`);
  await waitFor(`the card never showed ${STOCK + 5}`, ({ sku, v }) => {
    const c = [...document.querySelectorAll('#stock [data-sku]')].find((e) => e.dataset.sku === sku);
    return c?.querySelector('.available')?.textContent === String(v);
  }, { sku: SKU, v: STOCK + 5 }, 10_000);

  step = '6 write some off, then too many';
  await page.fill('#stock-qty', '3');
  await page.fill('#stock-reason', 'dropped by the forklift');
  await page.evaluate(() => { document.querySelector('#office-result').dataset.state = 'idle'; });
  await page.click('#write-off');
  const written = await result('write-off');
  if (written.state !== 'ok') throw new Error(`write-off refused: ${written.text}`);
  await waitFor(`the card never showed ${STOCK + 2}`, ({ sku, v }) => {
    const c = [...document.querySelectorAll('#stock [data-sku]')].find((e) => e.dataset.sku === sku);
    return c?.querySelector('.available')?.textContent === String(v);
  }, { sku: SKU, v: STOCK + 2 }, 10_000);
  await page.fill('#stock-qty', '1000');
  await page.evaluate(() => { document.querySelector('#office-result').dataset.state = 'idle'; });
  await page.click('#write-off');
  const refused = await result('too large a write-off');
  if (refused.state !== 'error' || !refused.text.includes('insufficient_stock')) throw new Error(`expected insufficient_stock, got ${refused.text}`);

  step = '7 the waitlist, and a receipt that promotes its head';
  await waitFor('the waitlist form has no option for the SKU', (sku) => [...document.querySelectorAll('#wl-sku option')].some((o) => o.value === sku), WAITLIST_SKU, 10_000);
  await page.selectOption('#wl-sku', WAITLIST_SKU);
  await page.click('#show-waitlist');
  const waiting = await waitFor(`the waitlist never showed ${WAITLISTED} orders`, (n) => {
    const rows = [...document.querySelectorAll('#waitlist li')];
    return rows.length === n ? { summary: document.querySelector('#waitlist-summary').textContent, first: rows[0].dataset.order, positions: rows.map((r) => r.querySelector('.pos').textContent) } : null;
  }, WAITLISTED, 10_000);
  log(`waitlist: ${waiting.summary} ${waiting.positions.join(' ')}`);
  if (!waiting.summary.startsWith(`${WAITLISTED} orders wait`)) throw new Error(`summary: ${waiting.summary}`);
  await page.selectOption('#stock-sku', WAITLIST_SKU);
  await page.fill('#stock-qty', '1');
  await page.evaluate(() => { document.querySelector('#office-result').dataset.state = 'idle'; });
  await page.click('#receive-stock');
  const restocked = await result('receive for the waitlist');
  if (restocked.state !== 'ok') throw new Error(`receive refused: ${restocked.text}`);
  const after = await waitFor(`the waitlist never dropped to ${WAITLISTED - 1}`, ({ n, first }) => {
    const rows = [...document.querySelectorAll('#waitlist li')];
    return rows.length === n && !rows.some((r) => r.dataset.order === first)
      ? { summary: document.querySelector('#waitlist-summary').textContent, head: rows[0]?.querySelector('.pos')?.textContent ?? null } : null;
  }, { n: WAITLISTED - 1, first: waiting.first }, 10_000);
  log(`after the receipt: ${after.summary}`);

  step = '8 screenshot';
  await fs.mkdir(path.dirname(path.resolve(SCREENSHOT)), { recursive: true });
  await page.screenshot({ path: SCREENSHOT, fullPage: true, timeout: remaining(10_000) });
  if (pageErrors.length) throw new Error(`the page threw: ${pageErrors[0]}`);
  await finish({
    ok: true,
    countdown,
    flipped_after_ms: flippedAfterMs,
    refused: refused.text,
    waitlist: waiting.summary,
    promoted: waiting.first,
    waitlist_after: after.summary,
    page_errors: pageErrors,
    elapsed_ms: Date.now() - started,
  }, 0);
}

main().catch(async (err) => {
  const text = (err && err.message ? err.message : String(err)).replace(/\u001b\[[0-9;]*m/g, '').split('\nCall log:')[0];
  try {
    if (page && process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true, timeout: 5_000 });
  } catch { /* best effort */ }
  await finish({ ok: false, error: `${step}: ${text}`, page_errors: pageErrors }, 1);
});
