// floodgate live page: live stock levels, an order feed and a test-order form.
// Plain ES2020, no build step, no dependencies. Served by the notifier at /assets/app.js.
'use strict';

(() => {
  const TOKEN_KEY = 'floodgate.token';
  const FEED_CAP = 200; // order rows kept in the DOM
  const STATUS_MEMORY = 5000; // last known status per order id (for counters and ordering)
  const RATE_WINDOW_MS = 60000; // "sold in the last minute" per SKU
  const SPARK_MS = 5 * 60000; // the sparkline under each SKU's bar shows this much history
  const SPARK_W = 300;
  const SPARK_H = 40;
  const RETRY_MIN_MS = 2000;
  const RETRY_MAX_MS = 30000;
  const ORDER_TIMEOUT_MS = 15000;
  const STATUS_RANK = { waitlisted: -1, accepted: 0, confirmed: 1, failed: 2, cancelled: 2 };
  const has = (obj, key) => Object.prototype.hasOwnProperty.call(obj, key);
  const rank = (status) => (has(STATUS_RANK, status) ? STATUS_RANK[status] : 1);

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $('status'),
    statusLabel: document.querySelector('#status .label'),
    topics: $('stream-topics'),
    lastEvent: $('last-event'),
    clock: $('clock'),
    clockUtc: $('clock-utc'),
    notice: $('notice'),
    noticeText: $('notice-text'),
    noticeClose: $('notice-close'),
    stock: $('stock'),
    stockEmpty: $('stock-empty'),
    stockSummary: $('stock-summary'),
    feed: $('feed'),
    feedEmpty: $('feed-empty'),
    feedTitle: $('feed-title'),
    feedSince: $('feed-since'),
    count: {
      confirmed: $('count-confirmed'),
      failed: $('count-failed'),
      cancelled: $('count-cancelled'),
    },
    tokenForm: $('token-form'),
    token: $('token'),
    useToken: $('use-token'),
    forgetToken: $('forget-token'),
    tokenMsg: $('token-msg'),
    whoami: $('whoami'),
    orderForm: $('order-form'),
    orderSku: $('order-sku'),
    orderQty: $('order-qty'),
    placeOrder: $('place-order'),
    orderResult: $('order-result'),
    office: $('office'),
    createForm: $('create-form'),
    newSku: $('new-sku'),
    newName: $('new-name'),
    newPrice: $('new-price'),
    newStock: $('new-stock'),
    newLimit: $('new-limit'),
    newStarts: $('new-starts'),
    stockForm: $('stock-form'),
    stockSku: $('stock-sku'),
    stockQty: $('stock-qty'),
    stockReason: $('stock-reason'),
    writeOff: $('write-off'),
    officeResult: $('office-result'),
    waitlistForm: $('waitlist-form'),
    wlSku: $('wl-sku'),
    waitlistSummary: $('waitlist-summary'),
    waitlist: $('waitlist'),
  };

  const SVGNS = 'http://www.w3.org/2000/svg';
  const collator = new Intl.Collator('en', { numeric: true });
  const nf = new Intl.NumberFormat('en');

  // ---------------------------------------------------------------- helpers

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const pad2 = (n) => String(n).padStart(2, '0');
  function hms(d) {
    return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  }
  function parseTime(at) {
    const d = at ? new Date(at) : new Date();
    return Number.isNaN(d.getTime()) ? new Date() : d;
  }
  function ago(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return `${s} s`;
    const m = Math.round(s / 60);
    if (m < 120) return `${m} min`;
    return `${Math.round(m / 60)} h`;
  }

  // (Re)start a highlight animation. Each kind has two identical keyframes, -1 and -2:
  // switching between them restarts it without forcing a layout, which matters at
  // hundreds of order events a second.
  const pulsing = new WeakMap();
  function pulse(node, kind) {
    const prev = pulsing.get(node);
    const next = prev === `${kind}-1` ? `${kind}-2` : `${kind}-1`;
    if (prev) node.classList.remove(prev);
    node.classList.add(next);
    pulsing.set(node, next);
  }

  function uuid() {
    if (window.crypto && typeof crypto.randomUUID === 'function') return crypto.randomUUID();
    // randomUUID needs a secure context; a wall screen on plain http://host:8081 is not one.
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  // ---------------------------------------------------------------- notice bar

  let noticeTimer = null;
  let noticeAwaitsLive = false; // the notice is about the stream: say when it is back
  function showNotice(text, kind = 'warn', awaitLive = true) {
    clearTimeout(noticeTimer);
    noticeAwaitsLive = awaitLive;
    ui.noticeText.textContent = `${hms(new Date())}  ${text}`;
    ui.notice.dataset.kind = kind;
    ui.notice.hidden = false;
  }
  function hideNoticeLater(ms) {
    clearTimeout(noticeTimer);
    if (!ui.notice.hidden) noticeTimer = setTimeout(() => { ui.notice.hidden = true; }, ms);
  }
  ui.noticeClose.addEventListener('click', () => { ui.notice.hidden = true; });

  // ---------------------------------------------------------------- token / identity

  function decodeJwt(raw) {
    const parts = raw.split('.');
    if (parts.length !== 3) return { error: 'not a JWT (expected three dot-separated parts)' };
    let claims;
    try {
      let b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
      b64 += '='.repeat((4 - (b64.length % 4)) % 4);
      const bin = atob(b64);
      const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
      claims = JSON.parse(new TextDecoder().decode(bytes));
    } catch (_) {
      return { error: 'payload is not base64url JSON' };
    }
    if (!claims || typeof claims !== 'object') return { error: 'payload is not a JSON object' };
    if (typeof claims.sub !== 'string' || claims.sub === '') return { error: 'no "sub" claim' };
    return { claims };
  }

  function cleanToken(raw) {
    return String(raw || '').trim().replace(/^bearer\s+/i, '').replace(/\s+/g, '');
  }

  // The token in use and what it says. state: none | ok | expired | invalid
  let token = null;
  let who = { state: 'none' };

  function identify(raw) {
    if (!raw) return { state: 'none' };
    const { claims, error } = decodeJwt(raw);
    if (error) return { state: 'invalid', error };
    const role = typeof claims.role === 'string' ? claims.role : 'customer';
    const exp = typeof claims.exp === 'number' ? claims.exp * 1000 : null;
    const base = { sub: claims.sub, role, admin: role === 'admin', manages: role === 'manager' || role === 'admin', exp };
    if (exp !== null && exp <= Date.now()) return { ...base, state: 'expired' };
    return { ...base, state: 'ok' };
  }

  function renderWhoami() {
    const w = who;
    ui.whoami.dataset.state = w.state === 'ok' && forcePublic ? 'refused' : w.state;
    let text;
    if (w.state === 'none') text = 'not signed in — stock only';
    else if (w.state === 'invalid') text = `token can't be decoded: ${w.error} — stock only`;
    else if (w.state === 'ok' && forcePublic) {
      text = `${w.sub} (${w.role}): the stream refused this token (${refusal}) — stock only`;
    } else if (w.state === 'expired') {
      text = `${w.sub} (${w.role}): token expired ${ago(Date.now() - w.exp)} ago — paste a fresh one`;
    } else {
      const exp = w.exp === null ? 'no expiry' : `expires in ${ago(w.exp - Date.now())}`;
      text = `signed in as ${w.sub} (${w.role}), ${exp}`;
    }
    ui.whoami.textContent = text;
    ui.forgetToken.disabled = !token;
    ui.office.hidden = !(w.state === 'ok' && w.manages);
  }

  function identityKey(w) {
    return w.sub ? `${w.sub}\u0000${w.role}` : ''; // a fresh token for the same user keeps the feed
  }

  function setToken(raw, { store }) {
    const before = identityKey(who);
    token = raw || null;
    who = identify(token);
    if (store) {
      try {
        if (token) localStorage.setItem(TOKEN_KEY, token);
        else localStorage.removeItem(TOKEN_KEY);
      } catch (_) { /* storage may be disabled; the token still works for this page */ }
    }
    forcePublic = false;
    renderWhoami();
    if (identityKey(who) !== before) resetFeed();
    renderFeedChrome();
    openStream();
  }

  ui.tokenForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const raw = cleanToken(ui.token.value);
    if (!raw) {
      ui.tokenMsg.textContent = 'paste a token first';
      ui.tokenMsg.dataset.kind = 'error';
      return;
    }
    // #whoami always describes the last token given; one that can't be used leaves the page on stock only
    const w = identify(raw);
    ui.token.value = '';
    if (w.state === 'ok') {
      ui.token.placeholder = 'token in use — paste another to switch';
      ui.tokenMsg.textContent = 'token saved in this browser';
      ui.tokenMsg.dataset.kind = 'ok';
    } else {
      ui.token.placeholder = 'paste a JWT (kept in this browser)';
      ui.tokenMsg.textContent = w.state === 'expired' ? 'that token has expired' : "that token can't be decoded";
      ui.tokenMsg.dataset.kind = 'error';
    }
    setToken(raw, { store: true });
  });

  ui.token.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey) {
      ev.preventDefault();
      ui.tokenForm.requestSubmit();
    }
  });

  ui.forgetToken.addEventListener('click', () => {
    ui.token.value = '';
    ui.token.placeholder = 'paste a JWT (kept in this browser)';
    ui.tokenMsg.textContent = 'token forgotten';
    ui.tokenMsg.dataset.kind = 'ok';
    setToken(null, { store: true });
  });

  // ---------------------------------------------------------------- stock panel

  const stock = new Map(); // sku -> { card, num, fill, tag, peakEl, rateEl, available, peak, samples }

  function levelOf(available, peak) {
    if (available <= 0) return { level: 'soldout', fraction: 0 };
    const fraction = peak > 0 ? Math.min(1, available / peak) : 1;
    if (fraction > 0.5) return { level: 'ok', fraction };
    if (fraction > 0.1) return { level: 'low', fraction };
    return { level: 'critical', fraction };
  }

  function ensureCard(sku) {
    let s = stock.get(sku);
    if (s) return s;
    const card = el('article', 'sku-card');
    card.dataset.sku = sku;
    const name = el('h3', 'sku-name', sku);
    name.title = sku;
    const numRow = el('div', 'num-row');
    const num = el('div', 'available', '0');
    const tag = el('span', 'sku-tag');
    numRow.append(num, tag);
    const bar = el('div', 'bar');
    const fill = el('div', 'fill');
    bar.append(fill);
    const spark = document.createElementNS(SVGNS, 'svg');
    spark.setAttribute('class', 'spark');
    spark.setAttribute('viewBox', `0 0 ${SPARK_W} ${SPARK_H}`);
    spark.setAttribute('preserveAspectRatio', 'none');
    spark.setAttribute('aria-hidden', 'true');
    const sparkArea = document.createElementNS(SVGNS, 'path');
    sparkArea.setAttribute('class', 'spark-area');
    const sparkLine = document.createElementNS(SVGNS, 'path');
    sparkLine.setAttribute('class', 'spark-line');
    spark.append(sparkArea, sparkLine);
    const meta = el('footer', 'sku-meta');
    const peakEl = el('span', 'peak');
    const rateEl = el('span', 'rate');
    meta.append(peakEl, rateEl);
    card.append(name, numRow, bar, spark, meta);
    card.title = `${sku}: level over the last ${SPARK_MS / 60000} min under the bar`;

    // keep cards sorted by sku
    let next = null;
    for (const other of ui.stock.querySelectorAll('.sku-card')) {
      if (collator.compare(other.dataset.sku, sku) > 0) { next = other; break; }
    }
    ui.stock.insertBefore(card, next);
    ui.stockEmpty.hidden = true;

    s = { card, num, fill, tag, peakEl, rateEl, sparkArea, sparkLine, available: null, peak: 0, samples: [], hist: [] };
    stock.set(sku, s);
    addSkuOption(sku);
    wantWindow(sku);
    return s;
  }

  function soldInWindow(s, now) {
    const cutoff = now - RATE_WINDOW_MS;
    while (s.samples.length > 1 && s.samples[1].t <= cutoff) s.samples.shift();
    let sold = 0;
    for (let i = 1; i < s.samples.length; i++) {
      const drop = s.samples[i - 1].v - s.samples[i].v;
      if (drop > 0 && s.samples[i].t > cutoff) sold += drop;
    }
    return sold;
  }

  function renderRate(s, now) {
    const sold = soldInWindow(s, now);
    s.rateEl.textContent = sold > 0 ? `−${nf.format(sold)} in last min` : 'no sales in last min';
    s.rateEl.classList.toggle('hot', sold > 0);
  }

  function onStock(data) {
    const sku = String(data.sku || '');
    const available = Number(data.available);
    if (!sku || !Number.isFinite(available)) return;
    const v = Math.max(0, Math.trunc(available));
    const s = ensureCard(sku);
    const prev = s.available;
    if (prev === v) return; // a reconnect's snapshot repeats what we show
    s.available = v;
    s.peak = Math.max(s.peak, v);
    const now = Date.now();
    s.samples.push({ t: now, v });
    const lastHist = s.hist[s.hist.length - 1];
    if (lastHist && now - lastHist.t < 1000) lastHist.v = v; // about one point per second is all 300 px can show
    else s.hist.push({ t: now, v });

    const { level, fraction } = levelOf(v, s.peak);
    s.num.textContent = String(v);
    s.card.dataset.level = level;
    s.fill.style.width = `${(fraction * 100).toFixed(2)}%`;
    s.tag.textContent = level === 'soldout' ? 'sold out' : `${Math.round(fraction * 100)}%`;
    s.peakEl.textContent = `peak ${nf.format(s.peak)}`;
    renderRate(s, now);
    if (prev !== null) pulse(s.num, v < prev ? 'flash-down' : 'flash-up');

    updateSkuOption(sku, v);
    sparkDirty.add(s);
    scheduleSummary();
    renderWindow(sku, s);
  }

  // ---------------------------------------------------------------- sale windows

  // The server's clock, as the stock events' `at` tell it (a countdown must open with
  // the sale, whatever this browser's clock says): the largest (at - now) seen lately,
  // since an event arrives after its `at`.
  const offsets = [];
  let serverOffset = 0;
  function noteServerTime(at) {
    const t = Date.parse(at);
    if (Number.isNaN(t)) return;
    offsets.push(t - Date.now());
    if (offsets.length > 20) offsets.shift();
    serverOffset = Math.max(...offsets);
  }
  const serverNow = () => Date.now() + serverOffset;

  const windows = new Map(); // sku -> { starts, ends } in ms (null: open)
  const windowQueue = new Set();
  let windowTimer = null;
  function wantWindow(sku) {
    windowQueue.add(sku);
    clearTimeout(windowTimer);
    windowTimer = setTimeout(() => {
      const skus = [...windowQueue];
      windowQueue.clear();
      fetchWindows(skus);
    }, 200);
  }

  // The public stock read carries each SKU's sale window (ingress, `GET /v1/stock`).
  async function fetchWindows(skus) {
    let base;
    try { base = await ingressUrl(); } catch (_) { return; }
    for (let i = 0; i < skus.length; i += 100) {
      const chunk = skus.slice(i, i + 100);
      try {
        const res = await fetch(`${base}/v1/stock?skus=${chunk.map(encodeURIComponent).join(',')}`, { mode: 'cors', cache: 'no-store' });
        if (!res.ok) continue;
        const body = await res.json();
        const seen = new Set();
        for (const e of (body && body.stock) || []) {
          seen.add(e.sku);
          const starts = e.sale_starts_at ? Date.parse(e.sale_starts_at) : null;
          const ends = e.sale_ends_at ? Date.parse(e.sale_ends_at) : null;
          if (starts !== null || ends !== null) windows.set(e.sku, { starts, ends });
          else windows.delete(e.sku);
        }
        for (const sku of chunk) {
          if (!seen.has(sku)) windows.delete(sku);
          const s = stock.get(sku);
          if (s) renderWindow(sku, s);
        }
      } catch (_) { /* ingress unreachable: the cards keep showing levels */ }
    }
  }

  function countdown(ms) {
    const t = Math.max(0, Math.ceil(ms / 1000));
    const d = Math.floor(t / 86400);
    const h = Math.floor((t % 86400) / 3600);
    const m = Math.floor((t % 3600) / 60);
    const sec = t % 60;
    if (d > 0) return `${d}d ${h}h ${pad2(m)}m`;
    if (h > 0) return `${h}:${pad2(m)}:${pad2(sec)}`;
    return `${m}:${pad2(sec)}`;
  }

  // A SKU before its sale: a countdown in place of its level, until the opening, then
  // the live level; after its end, the level with "sale ended".
  function renderWindow(sku, s) {
    const w = windows.get(sku);
    const now = serverNow();
    let state = '';
    if (w && w.starts !== null && now < w.starts) state = 'upcoming';
    else if (w && w.ends !== null && now >= w.ends) state = 'ended';
    if (state === 'upcoming') {
      s.num.textContent = `opens in ${countdown(w.starts - now)}`;
      s.tag.textContent = `at ${hms(new Date(w.starts))}`;
    } else if (s.card.dataset.window === 'upcoming' || state === 'ended') {
      const v = s.available === null ? 0 : s.available;
      const { level, fraction } = levelOf(v, s.peak);
      s.num.textContent = String(v);
      if (state === 'ended') s.tag.textContent = 'sale ended';
      else s.tag.textContent = level === 'soldout' ? 'sold out' : `${Math.round(fraction * 100)}%`;
    }
    if ((s.card.dataset.window || '') !== state) s.card.dataset.window = state;
  }

  function renderWindows() {
    for (const [sku, s] of stock) if (windows.has(sku) || s.card.dataset.window) renderWindow(sku, s);
  }

  // A step line of the level over the last SPARK_MS (or since the SKU's first event, if that
  // is shorter), scaled to the peak seen.
  function renderSpark(s, now) {
    while (s.hist.length > 1 && s.hist[1].t <= now - SPARK_MS) s.hist.shift();
    if (!s.hist.length) return;
    const start = Math.max(now - SPARK_MS, s.hist[0].t);
    const span = Math.max(1, now - start);
    const x = (t) => (Math.max(0, t - start) / span * SPARK_W).toFixed(1);
    const y = (v) => (SPARK_H - 2 - (s.peak > 0 ? v / s.peak : 0) * (SPARK_H - 4)).toFixed(1);
    let d = `M${x(s.hist[0].t)},${y(s.hist[0].v)}`;
    for (let i = 1; i < s.hist.length; i++) d += `H${x(s.hist[i].t)}V${y(s.hist[i].v)}`;
    d += `H${SPARK_W}`;
    s.sparkLine.setAttribute('d', d);
    s.sparkArea.setAttribute('d', `${d}V${SPARK_H}H${x(s.hist[0].t)}Z`);
  }

  const sparkDirty = new Set();
  let summaryQueued = false;
  function scheduleSummary() {
    if (summaryQueued) return;
    summaryQueued = true;
    requestAnimationFrame(() => {
      summaryQueued = false;
      const now = Date.now();
      for (const s of sparkDirty) renderSpark(s, now);
      sparkDirty.clear();
      let total = 0;
      let soldOut = 0;
      for (const s of stock.values()) {
        total += s.available || 0;
        if (!s.available) soldOut += 1;
      }
      const n = stock.size;
      ui.stockSummary.textContent =
        `${n} SKU${n === 1 ? '' : 's'} · ${nf.format(total)} available` +
        (soldOut ? ` · ${soldOut} sold out` : '');
    });
  }

  // ---------------------------------------------------------------- SKU select

  function addSkuOption(sku) {
    for (const sel of [ui.orderSku, ui.stockSku, ui.wlSku]) {
      const placeholder = sel.querySelector('option[value=""]');
      const opt = el('option', '', sku);
      opt.value = sku;
      let next = null;
      for (const o of sel.options) {
        if (o.value && collator.compare(o.value, sku) > 0) { next = o; break; }
      }
      sel.insertBefore(opt, next);
      if (placeholder) {
        placeholder.remove();
        sel.value = sku;
      }
    }
  }

  function updateSkuOption(sku, available) {
    for (const o of ui.orderSku.options) {
      if (o.value === sku) {
        const label = available > 0 ? sku : `${sku} — sold out`;
        if (o.textContent !== label) o.textContent = label;
        return;
      }
    }
  }

  // ---------------------------------------------------------------- order feed

  const rows = new Map(); // order id -> row element (only rows in the DOM)
  const lastStatus = new Map(); // order id -> last status seen (bounded)
  const counts = { confirmed: 0, failed: 0, cancelled: 0 };
  let feedSince = new Date();

  function resetFeed() {
    rows.clear();
    lastStatus.clear();
    ui.feed.replaceChildren();
    for (const k of Object.keys(counts)) counts[k] = 0;
    feedSince = new Date();
    renderCounts();
  }

  function renderCounts() {
    for (const k of Object.keys(counts)) ui.count[k].textContent = nf.format(counts[k]);
    ui.feedSince.textContent = `since ${hms(feedSince)}`;
  }

  function renderFeedChrome() {
    const w = who;
    ui.feedTitle.textContent = w.state === 'ok' && !w.admin ? 'my orders' : 'orders';
    let empty = '';
    if (w.state === 'none') empty = 'paste a token to see orders';
    else if (w.state === 'invalid') empty = "the token can't be decoded — paste a valid one to see orders";
    else if (w.state === 'expired') empty = 'the token has expired — paste a fresh one to see orders';
    else if (forcePublic) empty = 'the orders stream was refused — check the token';
    else if (ui.feed.childElementCount === 0) {
      empty = w.admin ? 'no orders yet — waiting for the first one…' : 'no orders of yours yet';
    }
    ui.feedEmpty.textContent = empty;
    ui.feedEmpty.hidden = empty === '';
  }

  function rememberStatus(id, status) {
    lastStatus.delete(id);
    lastStatus.set(id, status);
    if (lastStatus.size > STATUS_MEMORY) lastStatus.delete(lastStatus.keys().next().value);
  }

  function shortId(id) {
    return id.length > 12 ? `…${id.slice(-8)}` : id;
  }

  function fillRow(row, o) {
    row.dataset.status = o.status;
    row.querySelector('.t').textContent = hms(parseTime(o.at));
    row.querySelector('.t').title = o.at || '';
    const user = row.querySelector('.user');
    if (o.user_id) { user.textContent = o.user_id; user.title = o.user_id; }
    row.querySelector('.badge').textContent = o.status;
    const reason = row.querySelector('.reason');
    reason.textContent = o.reason || '';
    reason.title = o.reason || '';
    row.classList.toggle('has-reason', !!o.reason);
  }

  function newRow(id) {
    const row = el('div', 'order');
    row.dataset.orderId = id;
    const oid = el('code', 'oid', shortId(id));
    oid.title = id;
    row.append(el('time', 't'), oid, el('span', 'user', '—'), el('span', 'badge'), el('span', 'reason'));
    return row;
  }

  function onOrder(o) {
    const id = String(o.order_id || '');
    const status = String(o.status || '');
    if (!id || !status) return;
    const prev = lastStatus.get(id);
    if (prev !== undefined && rank(status) < rank(prev)) return; // a late, out-of-order event
    if (prev !== status && has(counts, status)) {
      counts[status] += 1;
      renderCounts();
    }
    rememberStatus(id, status);

    let row = rows.get(id);
    if (!row) {
      row = newRow(id);
      rows.set(id, row);
    }
    fillRow(row, { ...o, order_id: id, status });
    if (ui.feed.firstElementChild !== row) ui.feed.prepend(row);
    pulse(row, 'fresh');
    while (ui.feed.childElementCount > FEED_CAP) {
      const last = ui.feed.lastElementChild;
      rows.delete(last.dataset.orderId);
      last.remove();
    }
    if (!ui.feedEmpty.hidden) renderFeedChrome();
  }

  // ---------------------------------------------------------------- event stream

  let es = null;
  let esGen = 0;
  let retryTimer = null;
  let retryDelay = RETRY_MIN_MS;
  let forcePublic = false; // the token was refused by the stream: stock only until the token changes
  let refusal = ''; // why it was refused
  let lastEventAt = 0;
  let streamState = 'connecting';

  function setStatus(state, label, title) {
    streamState = state;
    ui.status.dataset.state = state;
    ui.statusLabel.textContent = label;
    ui.status.title = title || '';
  }

  function streamPlan() {
    if (who.state === 'ok' && !forcePublic) {
      return { topics: ['stock:*', who.admin ? 'orders:*' : 'orders:mine'], withToken: true };
    }
    return { topics: ['stock:*'], withToken: false };
  }

  function closeStream() {
    clearTimeout(retryTimer);
    retryTimer = null;
    if (es) es.close();
    es = null;
  }

  function parse(ev) {
    try {
      return JSON.parse(ev.data);
    } catch (_) {
      console.warn('floodgate: event with unreadable data', ev.type, ev.data);
      return null;
    }
  }

  function handle(kind, data) {
    if (!data) return;
    if (data.at) noteServerTime(data.at);
    if (!lastEventAt) ui.lastEvent.textContent = 'last event 0 s ago';
    lastEventAt = Date.now();
    try {
      if (kind === 'stock') onStock(data);
      else if (kind === 'order') onOrder(data);
    } catch (err) {
      console.warn('floodgate: could not show event', kind, err);
    }
  }

  function openStream() {
    closeStream();
    const gen = ++esGen;
    const plan = streamPlan();
    let url = `v1/stream?topics=${encodeURIComponent(plan.topics.join(','))}`;
    if (plan.withToken) url += `&access_token=${encodeURIComponent(token)}`;
    ui.topics.textContent = plan.topics.join(' · ');
    setStatus('connecting', 'connecting…');

    let src;
    try {
      src = new EventSource(url);
    } catch (err) {
      setStatus('refused', 'stream failed', String(err));
      scheduleRetry(gen);
      return;
    }
    es = src;
    const current = () => gen === esGen;

    src.onopen = () => {
      if (!current()) return;
      retryDelay = RETRY_MIN_MS;
      setStatus('live', 'live', `topics: ${plan.topics.join(', ')}`);
      if (noticeAwaitsLive && !ui.notice.hidden) {
        noticeAwaitsLive = false;
        ui.noticeText.textContent += ` · live again at ${hms(new Date())}`;
        hideNoticeLater(30000);
      }
    };
    src.addEventListener('stock', (ev) => { if (current()) handle('stock', parse(ev)); });
    src.addEventListener('order', (ev) => { if (current()) handle('order', parse(ev)); });
    src.onmessage = (ev) => { // unnamed events: dispatch on the "type" field
      if (!current()) return;
      const data = parse(ev);
      if (data && (data.type === 'stock' || data.type === 'order')) handle(data.type, data);
    };
    src.addEventListener('error', (ev) => {
      if (!current()) return;
      if (typeof ev.data === 'string') { // the server's own `event: error`, sent before it closes
        const data = parse(ev) || {};
        const code = data.code || 'error';
        showNotice(`server closed the stream: ${code}${data.detail ? ` — ${data.detail}` : ''}; reconnecting`, 'warn');
        return;
      }
      if (src.readyState === EventSource.CLOSED) {
        streamRefused(gen, url, plan);
      } else {
        setStatus('reconnecting', 'reconnecting…', 'the stream dropped; the browser is reconnecting');
      }
    });
  }

  function scheduleRetry(gen) {
    clearTimeout(retryTimer);
    const delay = retryDelay;
    retryDelay = Math.min(RETRY_MAX_MS, retryDelay * 2);
    retryTimer = setTimeout(() => { if (gen === esGen) openStream(); }, delay);
    return delay;
  }

  // EventSource gives up for good on a non-200 answer and can't read its body:
  // fetch the same URL to read the problem+json, say what happened, and carry on.
  async function streamRefused(gen, url, plan) {
    if (es) es.close();
    setStatus('refused', 'stream refused', 'the server refused the stream');
    let status = 0;
    let problem = null;
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 5000);
    try {
      const res = await fetch(url, { signal: ctl.signal, headers: { Accept: 'text/event-stream' }, cache: 'no-store' });
      status = res.status;
      if (!res.ok && /json/i.test(res.headers.get('content-type') || '')) problem = await res.json();
    } catch (_) { /* unreachable, or aborted */ }
    clearTimeout(timer);
    ctl.abort(); // if it is a working stream this time, don't keep it open
    if (gen !== esGen) return;

    const what = problem
      ? `${problem.code || status}${problem.detail ? `: ${problem.detail}` : ''}`
      : status ? `HTTP ${status}` : 'no answer';
    if (plan.withToken && (status === 401 || status === 403)) {
      forcePublic = true;
      refusal = what;
      renderWhoami();
      renderFeedChrome();
      showNotice(`orders stream refused (${what}) — check the token; showing stock only`, 'error', false);
      openStream();
      return;
    }
    const delay = scheduleRetry(gen);
    setStatus('refused', 'stream refused', what);
    showNotice(`stream refused (${what}); retrying in ${Math.round(delay / 1000)} s`, 'error');
  }

  // ---------------------------------------------------------------- test order

  let configPromise = null;
  function ingressUrl() {
    if (!configPromise) {
      configPromise = fetch('config.json', { cache: 'no-store' })
        .then((res) => {
          if (!res.ok) throw new Error(`config.json: HTTP ${res.status}`);
          return res.json();
        })
        .then((cfg) => {
          if (!cfg || typeof cfg.ingress_url !== 'string' || !cfg.ingress_url) throw new Error('config.json has no ingress_url');
          return cfg.ingress_url.replace(/\/+$/, '');
        })
        .catch((err) => {
          configPromise = null; // try again next time
          throw err;
        });
    }
    return configPromise;
  }

  function showResult(state, text, orderId) {
    ui.orderResult.dataset.state = state;
    ui.orderResult.textContent = text;
    if (orderId) ui.orderResult.dataset.lastOrderId = orderId;
  }

  let placing = false;
  ui.orderForm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    if (placing) return;
    if (who.state !== 'ok') {
      showResult('error', who.state === 'expired' ? 'token expired: paste a fresh one first' : 'no token: paste one first');
      return;
    }
    const sku = ui.orderSku.value;
    const qty = Number(ui.orderQty.value);
    if (!sku) { showResult('error', 'no SKU to order yet'); return; }
    if (!Number.isInteger(qty) || qty < 1 || qty > 10) { showResult('error', 'qty must be a whole number from 1 to 10'); return; }

    placing = true;
    ui.placeOrder.disabled = true;
    showResult('pending', `placing ${qty} × ${sku}…`);
    let base = '';
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), ORDER_TIMEOUT_MS);
    try {
      base = await ingressUrl();
      const res = await fetch(`${base}/v1/orders`, {
        method: 'POST',
        mode: 'cors',
        cache: 'no-store',
        signal: ctl.signal,
        headers: {
          Authorization: `Bearer ${token}`,
          'Content-Type': 'application/json',
          'Idempotency-Key': uuid(),
        },
        body: JSON.stringify({ items: [{ sku, qty }] }),
      });
      let body = null;
      try { body = await res.json(); } catch (_) { /* empty or not JSON */ }
      if (res.ok && body && body.order_id) {
        const st = body.status || 'accepted';
        showResult('ok', `${st}: order ${body.order_id} · ${qty} × ${sku} · ${hms(parseTime(body.accepted_at))}`, body.order_id);
        if (who.state === 'ok') {
          onOrder({ order_id: body.order_id, user_id: who.sub, status: st, at: body.accepted_at });
        }
      } else {
        const code = (body && body.code) || `http_${res.status}`;
        let detail = (body && (body.detail || body.title)) || res.statusText || '';
        if (body && code === 'sold_out' && body.available !== undefined) detail += ` (available ${body.available})`;
        const retry = res.headers.get('retry-after');
        if (retry) detail += ` (retry after ${retry} s)`;
        showResult('error', `${res.status} ${code}: ${detail}`.trim());
      }
    } catch (err) {
      if (err && err.name === 'AbortError') {
        showResult('error', `timeout: no answer from ${base || 'ingress'} in ${ORDER_TIMEOUT_MS / 1000} s`);
      } else if (!base) {
        showResult('error', `no_config: ${err && err.message ? err.message : err}`);
      } else {
        showResult('error', `network_error: could not reach ${base} (down, or CORS refused)`);
      }
    } finally {
      clearTimeout(timer);
      placing = false;
      ui.placeOrder.disabled = false;
    }
  });

  // ---------------------------------------------------------------- back office

  function officeResult(state, text) {
    ui.officeResult.dataset.state = state;
    ui.officeResult.textContent = text;
  }

  // One manager/admin call to ingress; the answer's problem+json shown as it came.
  let officeBusy = false;
  let pendingRef = null; // { key, ref } of a stock change whose answer never came
  async function officeCall(label, path, body, done) {
    if (officeBusy) return;
    if (who.state !== 'ok' || !who.manages) { officeResult('error', 'needs a manager or admin token'); return; }
    officeBusy = true;
    officeResult('pending', `${label}…`);
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), ORDER_TIMEOUT_MS);
    try {
      const base = await ingressUrl();
      const res = await fetch(`${base}${path}`, {
        method: 'POST',
        mode: 'cors',
        cache: 'no-store',
        signal: ctl.signal,
        headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
      });
      let answer = null;
      try { answer = await res.json(); } catch (_) { /* not JSON */ }
      // A definite answer to a stock change (2xx or 4xx) ends its reference; a 5xx may
      // mean it went through (a commit not confirmed), so a retry keeps it.
      if (body.reference && res.status < 500) pendingRef = null;
      if (res.ok && answer) {
        officeResult('ok', done(answer));
      } else {
        const code = (answer && answer.code) || `http_${res.status}`;
        let detail = (answer && (answer.detail || answer.title)) || res.statusText || '';
        if (answer && answer.available !== undefined) detail += ` (available ${answer.available})`;
        officeResult('error', `${res.status} ${code}: ${detail}`.trim());
      }
    } catch (err) {
      officeResult('error', err && err.name === 'AbortError' ? 'timeout: no answer from ingress' : `network_error: ${err && err.message ? err.message : err}`);
    } finally {
      clearTimeout(timer);
      officeBusy = false;
    }
  }

  const wholeNumber = (v) => (v === '' ? null : Number(v));

  ui.createForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const sku = ui.newSku.value.trim();
    const body = {
      sku,
      name: ui.newName.value.trim(),
      price_cents: wholeNumber(ui.newPrice.value),
      initial_stock: wholeNumber(ui.newStock.value),
    };
    const limit = wholeNumber(ui.newLimit.value);
    if (limit !== null) body.per_user_limit = limit;
    if (ui.newStarts.value) {
      const starts = new Date(ui.newStarts.value);
      if (Number.isNaN(starts.getTime())) { officeResult('error', 'sale starts: not a date and time'); return; }
      body.sale_starts_at = starts.toISOString();
    }
    officeCall(`creating ${sku}`, '/v1/skus', body, (a) => {
      if (a.sku) { windows.delete(a.sku); wantWindow(a.sku); }
      const opens = a.sale_starts_at ? `, on sale from ${a.sale_starts_at}` : '';
      return `created ${a.sku}: ${a.available} available${opens}`;
    });
  });

  function stockChange(ev, writeOff) {
    if (ev) ev.preventDefault();
    const sku = ui.stockSku.value;
    const units = wholeNumber(ui.stockQty.value);
    if (!sku) { officeResult('error', 'no SKU yet'); return; }
    if (!Number.isInteger(units) || units < 1) { officeResult('error', 'units: a whole number from 1'); return; }
    const path = `/v1/skus/${encodeURIComponent(sku)}/${writeOff ? 'adjust' : 'receive'}`;
    const reason = ui.stockReason.value.trim();
    // The same reference again after an answer that never came (a timeout, a dropped
    // connection): the request may have gone through, and its reference makes the
    // repeat change nothing. A definite answer starts a new one.
    if (officeBusy) return; // the request in flight keeps its reference
    const key = JSON.stringify([path, units, writeOff ? reason : '']);
    if (!pendingRef || pendingRef.key !== key) pendingRef = { key, ref: `page-${uuid()}` };
    const reference = pendingRef.ref;
    const body = writeOff ? { delta: -units, reason, reference } : { qty: units, reference };
    officeCall(`${writeOff ? 'writing off' : 'receiving'} ${units} × ${sku}`, path, body,
      (a) => `${writeOff ? 'wrote off' : 'received'} ${units} × ${a.sku}: ${a.on_hand} on hand, ${a.available} available`);
  }
  ui.stockForm.addEventListener('submit', (ev) => stockChange(ev, false));
  ui.writeOff.addEventListener('click', () => stockChange(null, true));

  // The waitlist of one SKU (GET /v1/skus/{sku}/waitlist), next to be promoted first,
  // refreshed every 2 s while shown: orders leave it as units come back.
  let waitlistSku = null;
  let waitlistBusy = false;
  async function showWaitlist() {
    if (!waitlistSku || waitlistBusy) return;
    if (who.state !== 'ok' || !who.manages) { ui.waitlistSummary.textContent = 'needs a manager or admin token'; return; }
    waitlistBusy = true;
    const sku = waitlistSku;
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), ORDER_TIMEOUT_MS);
    try {
      const base = await ingressUrl();
      const res = await fetch(`${base}/v1/skus/${encodeURIComponent(sku)}/waitlist?limit=20`, {
        mode: 'cors',
        cache: 'no-store',
        signal: ctl.signal,
        headers: { Authorization: `Bearer ${token}` },
      });
      let a = null;
      try { a = await res.json(); } catch (_) { /* not JSON */ }
      if (sku !== waitlistSku) return; // another SKU was picked meanwhile
      if (!res.ok || !a) {
        const code = (a && a.code) || `http_${res.status}`;
        ui.waitlistSummary.textContent = `${res.status} ${code}: ${(a && a.detail) || res.statusText || ''}`.trim();
        ui.waitlist.replaceChildren();
        return;
      }
      ui.waitlistSummary.textContent = a.orders > 0
        ? `${nf.format(a.orders)} ${a.orders === 1 ? 'order waits' : 'orders wait'} for ${nf.format(a.waitlisted)} unit${a.waitlisted === 1 ? '' : 's'} of ${a.sku}`
        : `no one waits for ${a.sku}`;
      ui.waitlist.dataset.orders = String(a.orders);
      ui.waitlist.replaceChildren(...a.entries.map((e) => {
        const li = el('li');
        li.dataset.order = e.order_id;
        li.append(el('span', 'pos', `#${e.position}`), el('span', 'id', shortId(e.order_id)),
          el('span', 'user', e.user_id), el('span', 'qty', `× ${e.qty}`),
          el('span', 'at', hms(parseTime(e.waitlisted_at))));
        li.title = `${e.order_id} of ${e.user_id}, waiting since ${e.waitlisted_at}`;
        return li;
      }));
    } catch (err) {
      ui.waitlistSummary.textContent = err && err.name === 'AbortError' ? 'timeout: no answer from ingress' : `network_error: ${err && err.message ? err.message : err}`;
    } finally {
      clearTimeout(timer);
      waitlistBusy = false;
    }
  }
  ui.waitlistForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    waitlistSku = ui.wlSku.value || null;
    if (!waitlistSku) { ui.waitlistSummary.textContent = 'no SKU yet'; return; }
    showWaitlist();
  });
  setInterval(() => { if (!ui.office.hidden) showWaitlist(); }, 2000);

  // ---------------------------------------------------------------- clock and timers

  function tick() {
    const now = new Date();
    ui.clock.textContent = hms(now);
    ui.clockUtc.textContent = `UTC ${pad2(now.getUTCHours())}:${pad2(now.getUTCMinutes())}`;
    ui.lastEvent.textContent = lastEventAt ? `last event ${ago(now - lastEventAt)} ago` : 'no events yet';
    ui.lastEvent.classList.toggle('stale', streamState === 'live' && lastEventAt > 0 && now - lastEventAt > 60000);

    if (who.state === 'ok' && who.exp !== null && who.exp <= now.getTime()) {
      // the token ran out while the page was open: say so, keep the rows, keep the stock flowing
      who = { ...who, state: 'expired' };
      renderFeedChrome();
      openStream();
    }
    renderWhoami();
    if (now.getSeconds() % 2 === 0) {
      for (const s of stock.values()) renderSpark(s, now.getTime());
    }
    if (now.getSeconds() % 5 === 0) {
      for (const s of stock.values()) renderRate(s, now.getTime());
    }
  }

  // ---------------------------------------------------------------- start

  let stored = null;
  try { stored = localStorage.getItem(TOKEN_KEY); } catch (_) { /* no storage */ }
  if (stored) {
    ui.token.placeholder = 'token in use — paste another to switch';
  }
  token = stored || null;
  who = identify(token);
  renderWhoami();
  resetFeed();
  renderFeedChrome();
  tick();
  setInterval(tick, 1000);
  setInterval(renderWindows, 250);
  // A window changed by a PATCH reaches the page within half a minute.
  setInterval(() => { if (stock.size) fetchWindows([...stock.keys()]); }, 30000);
  openStream();
  ingressUrl().catch(() => { /* reported when an order is placed */ });
})();
