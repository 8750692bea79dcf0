// Drives the notifier's live page in headless Chromium, as a person at a wall screen would:
// waits for live stock, signs in with a token, places orders through the page's form, and
// checks that the stock number and the order feed move on screen.
//
//   PAGE_URL=http://127.0.0.1:8081/ TOKEN=<admin JWT> SKU=tee-red-m ORDERS=5 \
//   SCREENSHOT=target/live-page.png node tests/browser/live-page.mjs
//
// Prints exactly one JSON line on stdout: {"ok":true,...} (exit 0) or {"ok":false,"error":...} (exit 1).
// Progress goes to stderr.

import fs from 'node:fs/promises';
import path from 'node:path';

const TOTAL_MS = 60_000;
const started = Date.now();
const deadline = started + TOTAL_MS;

const consoleErrors = [];
const pageErrors = [];
let step = 'setup';
let browser = null;
let page = null;
let finished = false;

function log(msg) {
  process.stderr.write(`[live-page ${((Date.now() - started) / 1000).toFixed(1)}s] ${msg}\n`);
}

function remaining(cap = TOTAL_MS) {
  const left = deadline - Date.now();
  if (left <= 0) throw new Error(`total time of ${TOTAL_MS / 1000} s used up`);
  return Math.min(cap, left);
}

function envOr(name, fallback) {
  const v = process.env[name];
  if (v === undefined || v === '') {
    if (fallback !== undefined) return fallback;
    throw new Error(`environment variable ${name} is required`);
  }
  return v;
}

async function screenshot(file) {
  if (!page || !file) return false;
  try {
    await fs.mkdir(path.dirname(path.resolve(file)), { recursive: true });
    await page.screenshot({ path: file, fullPage: true, timeout: 10_000 });
    return true;
  } catch (err) {
    log(`screenshot failed: ${err.message}`);
    return false;
  }
}

async function closeBrowser() {
  if (!browser) return;
  const b = browser;
  browser = null;
  await Promise.race([b.close().catch(() => {}), new Promise((r) => setTimeout(r, 5_000))]);
}

async function finish(result, code) {
  if (finished) return;
  finished = true;
  await closeBrowser();
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exit(code);
}

async function fail(message, extra = {}) {
  const file = process.env.SCREENSHOT;
  const shot = await screenshot(file);
  await finish({
    ok: false,
    error: `${step}: ${message}`,
    step,
    ...extra,
    screenshot: shot ? file : null,
    console_errors: consoleErrors,
    page_errors: pageErrors,
    elapsed_ms: Date.now() - started,
  }, 1);
}

// A last resort if something hangs outside the timeouts below (a stuck browser, a stuck close).
const watchdog = setTimeout(() => {
  fail(`hung: total time of ${TOTAL_MS / 1000} s used up`).finally(() => process.exit(1));
  setTimeout(() => process.exit(1), 15_000).unref();
}, TOTAL_MS + 10_000);
watchdog.unref();

// What the page shows right now, for failure messages.
async function snapshot(sku) {
  try {
    return await page.evaluate((sku) => {
      const text = (sel) => document.querySelector(sel)?.textContent?.trim() ?? null;
      const card = [...document.querySelectorAll('#stock [data-sku]')].find((e) => e.dataset.sku === sku);
      return {
        status: text('#status'),
        whoami: text('#whoami'),
        order_result: text('#order-result'),
        skus_on_page: [...document.querySelectorAll('#stock [data-sku]')].map((e) => e.dataset.sku),
        available: card ? card.querySelector('.available')?.textContent ?? null : null,
        feed_rows: document.querySelectorAll('#feed [data-order-id]').length,
        feed_confirmed: document.querySelectorAll('#feed [data-status="confirmed"]').length,
        notice: document.querySelector('#notice:not([hidden])')?.textContent?.trim() ?? null,
      };
    }, sku);
  } catch (err) {
    return { unavailable: err.message };
  }
}

async function main() {
  const PAGE_URL = envOr('PAGE_URL');
  const TOKEN = envOr('TOKEN');
  const SKU = envOr('SKU');
  const ORDERS = Number(envOr('ORDERS', '5'));
  const SCREENSHOT = envOr('SCREENSHOT');
  const CHROMIUM = envOr('CHROMIUM', '/usr/bin/chromium');
  if (!Number.isInteger(ORDERS) || ORDERS < 1) throw new Error(`ORDERS must be a positive integer, got ${process.env.ORDERS}`);

  step = 'load playwright-core';
  let chromium;
  try {
    ({ chromium } = await import('playwright-core'));
  } catch (err) {
    throw new Error(`cannot load playwright-core (run \`npm ci\` in tests/browser): ${err.message}`);
  }

  step = 'launch chromium';
  try {
    await fs.access(CHROMIUM);
  } catch {
    throw new Error(`no Chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM)`);
  }
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    timeout: remaining(30_000),
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
  page = await context.newPage();
  page.on('console', (msg) => {
    if (msg.type() === 'error') {
      const loc = msg.location();
      const text = loc && loc.url ? `${msg.text()} (${loc.url}:${loc.lineNumber})` : msg.text();
      consoleErrors.push(text.replace(/access_token=[^&\s)]+/g, 'access_token=…')); // keep tokens out of logs
    }
  });
  page.on('pageerror', (err) => {
    pageErrors.push(String(err && err.stack ? err.stack : err));
  });

  // 1. the page loads, the stream is live, and the SKU shows a number
  step = '1 open page';
  log(`opening ${PAGE_URL}`);
  const response = await page.goto(PAGE_URL, { waitUntil: 'domcontentloaded', timeout: remaining(15_000) });
  if (!response) throw new Error(`no response for ${PAGE_URL}`);
  if (!response.ok()) throw new Error(`GET ${PAGE_URL} answered HTTP ${response.status()}`);

  step = '1 wait for live stock';
  try {
    await page.waitForFunction((sku) => {
      const status = document.querySelector('#status');
      const card = [...document.querySelectorAll('#stock [data-sku]')].find((e) => e.dataset.sku === sku);
      const available = card && card.querySelector('.available');
      return !!status && status.textContent.includes('live') && !!available && /^\d+$/.test(available.textContent);
    }, SKU, { timeout: remaining(15_000), polling: 50 });
  } catch (err) {
    const shown = await snapshot(SKU);
    let why;
    if (!shown.status || !shown.status.includes('live')) why = `#status never said live (it says ${JSON.stringify(shown.status)})`;
    else if (shown.available === null) why = `no [data-sku="${SKU}"] with an .available on the page (SKUs shown: ${JSON.stringify(shown.skus_on_page)})`;
    else why = `[data-sku="${SKU}"] .available is ${JSON.stringify(shown.available)}, not an integer`;
    throw new Error(`${why}; the page shows ${JSON.stringify(shown)}`);
  }
  const before = Number(await availableOf(SKU));
  log(`live; ${SKU} shows ${before}`);
  if (before < ORDERS) throw new Error(`${SKU} shows ${before} available, fewer than the ${ORDERS} orders to place`);

  // record every distinct value the SKU's number takes from here on, every 50 ms and on every DOM change
  await page.evaluate((sku) => {
    const seen = [];
    window.__liveTestSeen = seen;
    const read = () => {
      const card = [...document.querySelectorAll('#stock [data-sku]')].find((e) => e.dataset.sku === sku);
      const text = card?.querySelector('.available')?.textContent;
      if (text !== undefined && /^\d+$/.test(text)) {
        const v = Number(text);
        if (seen[seen.length - 1] !== v) seen.push(v);
      }
    };
    read();
    setInterval(read, 50);
    new MutationObserver(read).observe(document.querySelector('#stock'), { subtree: true, childList: true, characterData: true });
  }, SKU);

  // 2. sign in with the token
  step = '2 use token';
  await page.fill('#token', TOKEN, { timeout: remaining(5_000) });
  await page.click('#use-token', { timeout: remaining(5_000) });
  try {
    await page.waitForFunction(() => /admin/.test(document.querySelector('#whoami')?.textContent || ''), null, { timeout: remaining(5_000), polling: 50 });
  } catch {
    throw new Error(`#whoami does not mention admin after #use-token: ${JSON.stringify(await snapshot(SKU))}`);
  }
  log(`whoami: ${await page.textContent('#whoami')}`);
  // the stream reopens with the admin topics
  try {
    await page.waitForFunction(() => (document.querySelector('#status')?.textContent || '').includes('live'), null, { timeout: remaining(10_000), polling: 50 });
  } catch {
    throw new Error(`the stream did not come back live with the token: ${JSON.stringify(await snapshot(SKU))}`);
  }

  // 3. place ORDERS orders through the form
  step = '3 place orders';
  try {
    await page.waitForFunction((sku) => [...document.querySelectorAll('#order-sku option')].some((o) => o.value === sku), SKU, { timeout: remaining(5_000), polling: 50 });
  } catch {
    throw new Error(`#order-sku has no option for ${SKU}`);
  }
  await page.selectOption('#order-sku', SKU, { timeout: remaining(5_000) });
  await page.fill('#order-qty', '1', { timeout: remaining(5_000) });
  const orderIds = [];
  for (let i = 1; i <= ORDERS; i++) {
    step = `3 place order ${i}/${ORDERS}`;
    await page.click('#place-order', { timeout: remaining(10_000) });
    let outcome;
    try {
      const handle = await page.waitForFunction((known) => {
        const el = document.querySelector('#order-result');
        if (!el) return null;
        const text = el.textContent || '';
        if (el.dataset.state === 'error') return { error: text };
        if (!/\baccepted\b/.test(text)) return null;
        const m = text.match(/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/i);
        const id = m ? m[0] : el.dataset.lastOrderId;
        if (!id || known.includes(id)) return null;
        return { id, text };
      }, orderIds, { timeout: remaining(15_000), polling: 50 });
      outcome = await handle.jsonValue();
    } catch {
      throw new Error(`#order-result never showed "accepted" with a new order id: ${JSON.stringify(await snapshot(SKU))}`);
    }
    if (outcome.error) throw new Error(`the order was refused: ${outcome.error}`);
    orderIds.push(outcome.id);
    log(`order ${i}: ${outcome.text}`);
  }

  // 4. the stock number on screen comes down by ORDERS
  step = '4 wait for stock to drop';
  const expected = before - ORDERS;
  try {
    await page.waitForFunction(({ sku, expected }) => {
      const card = [...document.querySelectorAll('#stock [data-sku]')].find((e) => e.dataset.sku === sku);
      return card?.querySelector('.available')?.textContent === String(expected);
    }, { sku: SKU, expected }, { timeout: remaining(20_000), polling: 50 });
  } catch {
    const seen = await page.evaluate(() => window.__liveTestSeen).catch(() => null);
    throw new Error(`${SKU} never showed ${expected} (${before} - ${ORDERS}); values seen: ${JSON.stringify(seen)}; now ${JSON.stringify(await snapshot(SKU))}`);
  }
  const after = Number(await availableOf(SKU));
  await page.waitForTimeout(60); // one more poll of the recorder
  const seen = await page.evaluate(() => window.__liveTestSeen.slice());
  log(`${SKU}: ${before} -> ${after}, seen ${JSON.stringify(seen)}`);

  // 5. the feed shows the orders confirmed
  step = '5 wait for confirmed orders in the feed';
  try {
    // at least ORDERS confirmed rows, and among them every order this script placed
    await page.waitForFunction(({ n, ids }) => {
      const confirmed = new Set([...document.querySelectorAll('#feed [data-order-id][data-status="confirmed"]')].map((r) => r.dataset.orderId));
      return confirmed.size >= n && ids.every((id) => confirmed.has(id));
    }, { n: ORDERS, ids: orderIds }, { timeout: remaining(20_000), polling: 50 });
  } catch {
    const rows = await page.evaluate(() => [...document.querySelectorAll('#feed [data-order-id]')].slice(0, 20).map((r) => `${r.dataset.orderId}=${r.dataset.status}`)).catch(() => null);
    throw new Error(`#feed does not hold the ${ORDERS} placed orders as rows with data-status="confirmed"; placed ${JSON.stringify(orderIds)}; rows (newest first): ${JSON.stringify(rows)}`);
  }
  const feed = await page.evaluate((ids) => {
    const rows = [...document.querySelectorAll('#feed [data-order-id]')];
    const confirmed = rows.filter((r) => r.dataset.status === 'confirmed');
    const ours = ids.filter((id) => confirmed.some((r) => r.dataset.orderId === id)).length;
    return { confirmed: confirmed.length, ours };
  }, orderIds);
  log(`feed: ${feed.confirmed} confirmed rows, ${feed.ours} of ours`);

  // 6. screenshot
  step = '6 screenshot';
  await page.waitForTimeout(1_000); // let the highlight animations settle
  await fs.mkdir(path.dirname(path.resolve(SCREENSHOT)), { recursive: true });
  await page.screenshot({ path: SCREENSHOT, fullPage: true, timeout: remaining(10_000) });

  step = 'page errors';
  if (pageErrors.length) throw new Error(`the page threw ${pageErrors.length} uncaught error(s): ${pageErrors[0]}`);

  // 7. report
  await finish({
    ok: true,
    before,
    after,
    seen,
    confirmed: feed.confirmed,
    confirmed_ours: feed.ours,
    order_ids: orderIds,
    screenshot: SCREENSHOT,
    console_errors: consoleErrors,
    page_errors: pageErrors,
    elapsed_ms: Date.now() - started,
  }, 0);

  async function availableOf(sku) {
    return page.evaluate((sku) => {
      const card = [...document.querySelectorAll('#stock [data-sku]')].find((e) => e.dataset.sku === sku);
      return card?.querySelector('.available')?.textContent ?? null;
    }, sku);
  }
}

// Playwright's messages carry ANSI colours and a call log; keep the first line, plain.
function plain(err) {
  const text = err && err.message ? err.message : String(err);
  return text.replace(/\u001b\[[0-9;]*m/g, '').split('\nCall log:')[0].trim();
}

main().catch((err) => fail(plain(err)));
