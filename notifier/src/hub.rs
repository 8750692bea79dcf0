//! The fan-out hub: who subscribes to what, the latest stock levels, and delivery to
//! each subscriber's own bounded buffer.
//!
//! Two kinds of events, two delivery rules:
//! - **Order events** must not be lost or reordered for a subscriber, so each subscriber
//!   has a bounded queue (`FLOODGATE_SUBSCRIBER_BUFFER`). The hub never waits on it: when
//!   it is full the subscriber is too slow, and it is disconnected with the reason
//!   `slow_consumer`. Nobody else is delayed.
//! - **Stock levels** conflate: each subscriber holds at most one pending level per SKU,
//!   and a newer level replaces an unsent one. A slow subscriber gets the latest level
//!   when it catches up, never a backlog.
//!
//! The hub is only ever locked for map lookups and `try_send`s, never across an await.

use floodgate_common::{
    amqp::OrderEvent,
    auth::{self, Caller},
    domain::{OrderId, OrderStatus, UserId},
    telemetry::names,
};
use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};
use time::OffsetDateTime;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::topics::{MAX_TOPICS, Topic};

/// Event ids remembered for de-duplication (the outbox relay delivers at least once).
const DEDUP_WINDOW: usize = 100_000;

/// Gauge, by `sku`: units available in Redis as the sampler last saw them (the
/// dashboard's stock panel). One series per SKU the notifier has seen; every notifier
/// instance exports the same levels.
const STOCK_AVAILABLE: &str = "floodgate_stock_available";

/// How a subscriber is connected, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Sse,
    Ws,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
        }
    }
}

/// One SKU's level at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct StockLevel {
    pub sku: String,
    pub available: i64,
    /// When the notifier sampled it.
    pub at: OffsetDateTime,
    /// The event as sent, `{"type":"stock","sku","available","at"}`: serialized once,
    /// shared by every subscriber.
    pub json: Arc<str>,
    /// Sent as the current level on subscribing, not as a change (its `at` may be long
    /// past, so it does not count towards the delivery lag).
    pub snapshot: bool,
}

impl StockLevel {
    pub fn new(sku: String, available: i64, at: OffsetDateTime) -> Self {
        let json = serde_json::json!({
            "type": "stock",
            "sku": sku,
            "available": available,
            "at": at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        })
        .to_string()
        .into();
        Self {
            sku,
            available,
            at,
            json,
            snapshot: false,
        }
    }
}

/// An order event and its JSON, serialized once and shared by every subscriber.
#[derive(Debug)]
pub struct OrderOut {
    pub event: OrderEvent,
    pub json: String,
}

impl OrderOut {
    pub fn new(event: OrderEvent) -> Self {
        let json = serde_json::to_string(&event).expect("order events serialize");
        Self { event, json }
    }
}

/// Why the notifier ended a stream; `code` is stable, for clients and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Its order-event buffer filled up.
    SlowConsumer,
    /// The notifier is shutting down.
    ShuttingDown,
    /// A WebSocket client stopped answering pings.
    PingTimeout,
    /// A WebSocket client sent something that is not a subscribe/unsubscribe message.
    ProtocolError,
    /// The broker connection was rebuilt: events may have been missed meanwhile, so
    /// subscribers of order topics reconnect and read the current status.
    Resync,
    /// The subscription was refused (bad topic, not allowed) before it streamed.
    Rejected,
    /// The token it was opened with expired (plus the verification leeway): order events
    /// are for callers whose token is valid, so the stream ends and the client reconnects
    /// with a fresh token.
    TokenExpired,
}

impl CloseReason {
    pub fn code(self) -> &'static str {
        match self {
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::ShuttingDown => "shutting_down",
            CloseReason::PingTimeout => "ping_timeout",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::Resync => "resync",
            CloseReason::Rejected => "rejected",
            CloseReason::TokenExpired => "token_expired",
        }
    }

    pub fn detail(self) -> &'static str {
        match self {
            CloseReason::SlowConsumer => {
                "order events arrived faster than this subscriber read them; reconnect and \
                 read the current status with GET /v1/orders/{id}"
            }
            CloseReason::ShuttingDown => "the notifier is shutting down; reconnect",
            CloseReason::PingTimeout => "no pong within two ping intervals",
            CloseReason::ProtocolError => "unexpected message",
            CloseReason::Resync => {
                "the notifier reconnected to the broker and may have missed order events; \
                 reconnect to read the current status"
            }
            CloseReason::Rejected => "the subscription was refused",
            CloseReason::TokenExpired => "the token expired; reconnect with a fresh one",
        }
    }
}

/// Why topics could not be subscribed. Nothing was subscribed when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("{0}")]
    InvalidTopic(String),
    #[error("order topics need a valid bearer token (header or access_token)")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("no such order")]
    OrderNotFound,
    #[error("unknown SKU {0}")]
    UnknownSku(String),
    #[error("this notifier serves its maximum of {0} subscribers; retry later or elsewhere")]
    Full(usize),
}

/// What a subscriber is sent next.
#[derive(Debug)]
pub enum Next {
    Order(Arc<OrderOut>),
    Stock(StockLevel),
    Closed(CloseReason),
}

#[derive(Default)]
struct Index {
    subs: HashMap<u64, Arc<Shared>>,
    stock: HashMap<String, HashSet<u64>>,
    all_stock: HashSet<u64>,
    orders: HashMap<OrderId, HashSet<u64>>,
    mine: HashMap<UserId, HashSet<u64>>,
    all_orders: HashSet<u64>,
}

impl Index {
    fn insert(&mut self, id: u64, t: &Topic, caller: Option<&Caller>) {
        match t {
            Topic::Stock(s) => {
                self.stock.entry(s.to_string()).or_default().insert(id);
            }
            Topic::AllStock => {
                self.all_stock.insert(id);
            }
            Topic::Order(o) => {
                self.orders.entry(*o).or_default().insert(id);
            }
            Topic::MyOrders => {
                if let Some(c) = caller {
                    self.mine.entry(c.user.clone()).or_default().insert(id);
                }
            }
            Topic::AllOrders => {
                self.all_orders.insert(id);
            }
        }
    }

    fn remove(&mut self, id: u64, t: &Topic, caller: Option<&Caller>) {
        fn out<K: std::hash::Hash + Eq>(m: &mut HashMap<K, HashSet<u64>>, k: &K, id: u64) {
            if let Some(set) = m.get_mut(k) {
                set.remove(&id);
                if set.is_empty() {
                    m.remove(k);
                }
            }
        }
        match t {
            Topic::Stock(s) => out(&mut self.stock, &s.to_string(), id),
            Topic::AllStock => {
                self.all_stock.remove(&id);
            }
            Topic::Order(o) => out(&mut self.orders, o, id),
            Topic::MyOrders => {
                if let Some(c) = caller {
                    out(&mut self.mine, &c.user, id);
                }
            }
            Topic::AllOrders => {
                self.all_orders.remove(&id);
            }
        }
    }
}

/// One subscriber's side of the hub.
struct Shared {
    id: u64,
    caller: Option<Caller>,
    transport: Transport,
    orders: mpsc::Sender<Arc<OrderOut>>,
    /// Stock levels not yet sent, one per SKU: a newer level replaces an unsent one.
    stock: Mutex<BTreeMap<String, StockLevel>>,
    stock_ready: Notify,
    topics: Mutex<HashSet<Topic>>,
    /// The orders of its `order:<id>` topics and the status last queued for each: a
    /// status is queued only if it is later than that one, so the current status read
    /// at subscribe time and the live event of the same change are sent once, and a
    /// stale read never follows a newer event.
    watched: Mutex<HashMap<OrderId, Option<OrderStatus>>>,
    closed: CancellationToken,
    reason: OnceLock<CloseReason>,
    /// Cancelled when the [`Subscription`] is dropped (the stream ended).
    dropped: CancellationToken,
}

/// The order of statuses in an order's life: a later one supersedes an earlier one.
fn rank(s: OrderStatus) -> u8 {
    match s {
        OrderStatus::Waitlisted => 0,
        OrderStatus::Accepted => 1,
        OrderStatus::Confirmed | OrderStatus::Failed => 2,
        OrderStatus::Cancelled => 3,
    }
}

/// What offering an order event to a subscriber did.
enum Offer {
    Queued,
    Skipped,
    Full,
}

impl Shared {
    fn may_see(&self, e: &OrderEvent) -> bool {
        self.caller
            .as_ref()
            .is_some_and(|c| c.is_admin() || c.user == e.user_id)
    }

    /// Queues an order event, unless it is an `order:<id>` topic's order and not later
    /// than what was queued for it. The check and the queueing happen under one lock,
    /// so the queue holds each order's statuses in their order.
    fn offer_order(&self, out: &Arc<OrderOut>) -> Offer {
        let event = &out.event;
        let mut watched = self.watched.lock().expect("watched lock");
        if let Some(last) = watched.get_mut(&event.order_id) {
            if last.is_some_and(|l| rank(l) >= rank(event.status)) {
                return Offer::Skipped;
            }
            *last = Some(event.status);
        }
        match self.orders.try_send(out.clone()) {
            Ok(()) => Offer::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => Offer::Full,
            Err(mpsc::error::TrySendError::Closed(_)) => Offer::Skipped,
        }
    }

    fn offer_stock(&self, level: &StockLevel) {
        let replaced = self
            .stock
            .lock()
            .expect("stock lock")
            .insert(level.sku.clone(), level.clone());
        if replaced.is_some() {
            metrics::counter!(names::EVENTS_DROPPED, "reason" => "conflated").increment(1);
        }
        self.stock_ready.notify_one();
    }
}

struct Inner {
    index: RwLock<Index>,
    levels: RwLock<HashMap<String, StockLevel>>,
    /// True once the first sample of the stock levels arrived.
    levels_loaded: AtomicBool,
    seen: Mutex<(HashSet<Uuid>, VecDeque<Uuid>)>,
    next_id: AtomicU64,
    count: AtomicUsize,
    buffer: usize,
    max: usize,
}

/// The hub; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl Hub {
    /// `buffer`: order events queued per subscriber; `max`: subscribers at most.
    pub fn new(buffer: usize, max: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                index: RwLock::default(),
                levels: RwLock::default(),
                levels_loaded: AtomicBool::new(false),
                seen: Mutex::default(),
                next_id: AtomicU64::new(1),
                count: AtomicUsize::new(0),
                buffer,
                max,
            }),
        }
    }

    /// Subscribers connected now.
    pub fn subscribers(&self) -> usize {
        self.inner.count.load(Ordering::Relaxed)
    }

    /// A new subscriber with no topics yet.
    pub fn subscribe(
        &self,
        caller: Option<Caller>,
        transport: Transport,
    ) -> Result<Subscription, SubscribeError> {
        let n = self.inner.count.fetch_add(1, Ordering::SeqCst);
        if n >= self.inner.max {
            self.inner.count.fetch_sub(1, Ordering::SeqCst);
            return Err(SubscribeError::Full(self.inner.max));
        }
        let (tx, rx) = mpsc::channel(self.inner.buffer);
        let shared = Arc::new(Shared {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            caller,
            transport,
            orders: tx,
            stock: Mutex::default(),
            stock_ready: Notify::new(),
            topics: Mutex::default(),
            watched: Mutex::default(),
            closed: CancellationToken::new(),
            reason: OnceLock::new(),
            dropped: CancellationToken::new(),
        });
        self.inner
            .index
            .write()
            .expect("index lock")
            .subs
            .insert(shared.id, shared.clone());
        metrics::gauge!(names::SUBSCRIBERS, "transport" => transport.as_str()).increment(1.0);
        self.close_at_expiry(&shared);
        Ok(Subscription {
            hub: self.clone(),
            shared,
            orders: rx,
            stock_turn: false,
        })
    }

    /// Closes `sub` with [`CloseReason::TokenExpired`] once its caller's token expired
    /// (`exp` plus the leeway verification allows). Nothing to do without a token.
    fn close_at_expiry(&self, sub: &Arc<Shared>) {
        let Some(caller) = &sub.caller else { return };
        let ends = caller.expires_at.saturating_add(auth::LEEWAY_SECS);
        let left = Duration::from_secs(ends.saturating_sub(auth::now_secs()));
        // A token good for more than a year is, for a stream, one that never expires.
        if left > Duration::from_secs(365 * 86_400) {
            return;
        }
        let (hub, sub) = (self.clone(), Arc::downgrade(sub));
        let Some(dropped) = sub.upgrade().map(|s| s.dropped.clone()) else {
            return;
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = dropped.cancelled() => {}
                _ = tokio::time::sleep(left) => {
                    if let Some(sub) = sub.upgrade() {
                        hub.close(&sub, CloseReason::TokenExpired);
                    }
                }
            }
        });
    }

    /// New stock levels from the sampler; only those that differ from the last known
    /// level are passed on. Returns how many changed.
    pub fn publish_stock(&self, levels: Vec<(String, i64)>, at: OffsetDateTime) -> usize {
        self.offer_levels(levels, at, false)
    }

    /// True once the hub has a level for `sku`.
    pub fn knows_sku(&self, sku: &str) -> bool {
        self.inner
            .levels
            .read()
            .expect("levels lock")
            .contains_key(sku)
    }

    /// Levels read from Redis for SKUs the sampler has not reported yet (one created a
    /// moment ago): taken only where the hub has no level, so a sample that arrived
    /// meanwhile is never overwritten by this older read.
    pub fn learn_skus(&self, levels: Vec<(String, i64)>, at: OffsetDateTime) -> usize {
        self.offer_levels(levels, at, true)
    }

    fn offer_levels(
        &self,
        levels: Vec<(String, i64)>,
        at: OffsetDateTime,
        only_new: bool,
    ) -> usize {
        let mut changed = Vec::new();
        {
            let mut known = self.inner.levels.write().expect("levels lock");
            for (sku, available) in levels {
                let old = known.get(&sku);
                if old.is_some_and(|l| only_new || l.available == available) {
                    continue;
                }
                let level = StockLevel::new(sku.clone(), available, at);
                known.insert(sku, level.clone());
                changed.push(level);
            }
        }
        if !only_new {
            self.inner.levels_loaded.store(true, Ordering::Relaxed);
        }
        if changed.is_empty() {
            return 0;
        }
        metrics::counter!(names::EVENTS_IN, "type" => "stock").increment(changed.len() as u64);
        for level in &changed {
            metrics::gauge!(STOCK_AVAILABLE, "sku" => level.sku.clone())
                .set(level.available as f64);
        }
        let index = self.inner.index.read().expect("index lock");
        for level in &changed {
            let one = index.stock.get(&level.sku).into_iter().flatten();
            for id in index.all_stock.iter().chain(one) {
                if let Some(sub) = index.subs.get(id) {
                    sub.offer_stock(level);
                }
            }
        }
        changed.len()
    }

    /// An order event from the broker. `event_id` de-duplicates re-published events.
    pub fn publish_order(&self, event_id: Option<Uuid>, event: OrderEvent) {
        if let Some(id) = event_id {
            let mut seen = self.inner.seen.lock().expect("dedup lock");
            if !seen.0.insert(id) {
                metrics::counter!(names::EVENTS_DROPPED, "reason" => "duplicate").increment(1);
                return;
            }
            seen.1.push_back(id);
            if seen.1.len() > DEDUP_WINDOW
                && let Some(old) = seen.1.pop_front()
            {
                seen.0.remove(&old);
            }
        }
        metrics::counter!(names::EVENTS_IN, "type" => "order").increment(1);
        let mut slow = Vec::new();
        {
            let index = self.inner.index.read().expect("index lock");
            let mut targets: HashSet<u64> = HashSet::new();
            targets.extend(index.all_orders.iter().copied());
            if let Some(ids) = index.mine.get(&event.user_id) {
                targets.extend(ids.iter().copied());
            }
            if let Some(ids) = index.orders.get(&event.order_id) {
                targets.extend(ids.iter().copied());
            }
            if targets.is_empty() {
                // Nobody listens for it: not even serialized.
                return;
            }
            let event = Arc::new(OrderOut::new(event));
            for id in targets {
                let Some(sub) = index.subs.get(&id) else {
                    continue;
                };
                if !sub.may_see(&event.event) {
                    continue;
                }
                if let Offer::Full = sub.offer_order(&event) {
                    slow.push(sub.clone());
                }
            }
        }
        for sub in slow {
            self.close(&sub, CloseReason::SlowConsumer);
        }
    }

    /// Closes every subscriber holding an order topic with `reason` (after a broker
    /// reconnect: they reconnect and read the current status).
    pub fn close_order_subscribers(&self, reason: CloseReason) -> usize {
        let subs: Vec<Arc<Shared>> = {
            let index = self.inner.index.read().expect("index lock");
            let mut ids: HashSet<u64> = index.all_orders.clone();
            ids.extend(index.mine.values().flatten());
            ids.extend(index.orders.values().flatten());
            ids.iter()
                .filter_map(|id| index.subs.get(id).cloned())
                .collect()
        };
        for sub in &subs {
            self.close(sub, reason);
        }
        subs.len()
    }

    /// Ends a subscriber's stream with `reason`: it stops receiving at once.
    fn close(&self, sub: &Arc<Shared>, reason: CloseReason) {
        if sub.reason.set(reason).is_ok() {
            metrics::counter!(names::DISCONNECTS, "reason" => reason.code()).increment(1);
            tracing::info!(
                subscriber = sub.id,
                transport = sub.transport.as_str(),
                reason = reason.code(),
                "closing a stream"
            );
        }
        self.detach(sub);
        sub.closed.cancel();
    }

    fn detach(&self, sub: &Shared) {
        let topics: Vec<Topic> = sub.topics.lock().expect("topics lock").drain().collect();
        let mut index = self.inner.index.write().expect("index lock");
        for t in &topics {
            index.remove(sub.id, t, sub.caller.as_ref());
        }
        index.subs.remove(&sub.id);
    }
}

/// One subscriber's handle: its topics and its queue. Dropping it unsubscribes.
pub struct Subscription {
    hub: Hub,
    shared: Arc<Shared>,
    orders: mpsc::Receiver<Arc<OrderOut>>,
    /// Alternates between stock levels and order events in [`Subscription::next`].
    stock_turn: bool,
}

impl Subscription {
    pub fn caller(&self) -> Option<&Caller> {
        self.shared.caller.as_ref()
    }

    /// Checks that the caller may hold every topic, then subscribes them all (or none)
    /// and queues the current level of each stock topic. Ownership of an `order:<id>`
    /// topic is checked by the caller of this (it needs a lookup); the hub filters
    /// every order event by owner anyway.
    pub fn add(&mut self, topics: &[Topic]) -> Result<(), SubscribeError> {
        let caller = self.shared.caller.as_ref();
        for t in topics {
            if t.is_private() && caller.is_none() {
                return Err(SubscribeError::Unauthorized);
            }
            if *t == Topic::AllOrders && !caller.is_some_and(Caller::is_admin) {
                return Err(SubscribeError::Forbidden(
                    "orders:* needs the admin role; customers subscribe orders:mine".into(),
                ));
            }
            if let Topic::Stock(sku) = t
                && self.hub.inner.levels_loaded.load(Ordering::Relaxed)
                && !self
                    .hub
                    .inner
                    .levels
                    .read()
                    .expect("levels lock")
                    .contains_key(sku.as_str())
            {
                return Err(SubscribeError::UnknownSku(sku.to_string()));
            }
        }
        {
            let mut mine = self.shared.topics.lock().expect("topics lock");
            let new: Vec<&Topic> = topics.iter().filter(|t| !mine.contains(t)).collect();
            if mine.len() + new.len() > MAX_TOPICS {
                return Err(SubscribeError::InvalidTopic(format!(
                    "at most {MAX_TOPICS} topics per subscriber"
                )));
            }
            let mut index = self.hub.inner.index.write().expect("index lock");
            if !index.subs.contains_key(&self.shared.id) {
                // Closed meanwhile; the stream ends with its reason.
                return Ok(());
            }
            for t in new {
                index.insert(self.shared.id, t, caller);
                if let Topic::Order(id) = t {
                    self.shared
                        .watched
                        .lock()
                        .expect("watched lock")
                        .entry(*id)
                        .or_insert(None);
                }
                mine.insert(t.clone());
            }
        }
        let levels = self.hub.inner.levels.read().expect("levels lock");
        let current = |l: &StockLevel| StockLevel {
            snapshot: true,
            ..l.clone()
        };
        for t in topics {
            match t {
                Topic::AllStock => levels
                    .values()
                    .for_each(|l| self.shared.offer_stock(&current(l))),
                Topic::Stock(sku) => {
                    if let Some(l) = levels.get(sku.as_str()) {
                        self.shared.offer_stock(&current(l));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Unsubscribes topics (unknown ones are ignored).
    pub fn remove(&mut self, topics: &[Topic]) {
        let mut mine = self.shared.topics.lock().expect("topics lock");
        let mut index = self.hub.inner.index.write().expect("index lock");
        for t in topics {
            if mine.remove(t) {
                index.remove(self.shared.id, t, self.shared.caller.as_ref());
                if let Topic::Order(id) = t {
                    self.shared.watched.lock().expect("watched lock").remove(id);
                }
            }
        }
    }

    /// The topics held now.
    pub fn topics(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .shared
            .topics
            .lock()
            .expect("topics lock")
            .iter()
            .map(Topic::to_string)
            .collect();
        v.sort();
        v
    }

    /// Queues an order's current status (sent on subscribing to `order:<id>`), so a
    /// subscriber that arrives after the change still learns it; skipped if the live
    /// event of that change (or a later one) was queued meanwhile.
    pub fn push_current(&mut self, event: OrderEvent) {
        if let Offer::Full = self.shared.offer_order(&Arc::new(OrderOut::new(event))) {
            self.hub.close(&self.shared, CloseReason::SlowConsumer);
        }
    }

    /// Ends this stream with `reason` (the transport noticed it).
    pub fn close(&self, reason: CloseReason) {
        self.hub.close(&self.shared, reason);
    }

    /// Resolves when the hub closed this stream.
    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.shared.closed.cancelled()
    }

    /// Cancelled when the hub closes this stream.
    pub fn closed_token(&self) -> CancellationToken {
        self.shared.closed.clone()
    }

    /// Cancelled when this subscription is dropped.
    pub fn dropped_token(&self) -> CancellationToken {
        self.shared.dropped.clone()
    }

    /// The next thing to send: queued order events and pending stock levels, taking
    /// turns so a busy order feed never starves the levels; `Closed` once the hub
    /// closed the stream.
    pub async fn next(&mut self) -> Next {
        loop {
            if let Some(r) = self.shared.reason.get() {
                return Next::Closed(*r);
            }
            self.stock_turn = !self.stock_turn;
            if self.stock_turn
                && let Some((_, level)) = self.shared.stock.lock().expect("stock lock").pop_first()
            {
                return Next::Stock(level);
            }
            if let Ok(e) = self.orders.try_recv() {
                return Next::Order(e);
            }
            if let Some((_, level)) = self.shared.stock.lock().expect("stock lock").pop_first() {
                return Next::Stock(level);
            }
            tokio::select! {
                biased;
                _ = self.shared.closed.cancelled() => {}
                e = self.orders.recv() => {
                    if let Some(e) = e {
                        return Next::Order(e);
                    }
                }
                _ = self.shared.stock_ready.notified() => {}
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.shared.dropped.cancel();
        self.hub.detach(&self.shared);
        self.hub.inner.count.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!(names::SUBSCRIBERS, "transport" => self.shared.transport.as_str())
            .decrement(1.0);
        if self.shared.reason.get().is_none() {
            metrics::counter!(names::DISCONNECTS, "reason" => "client_closed").increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use floodgate_common::domain::Role;

    fn caller(user: &str, role: Role) -> Option<Caller> {
        Some(Caller {
            user: UserId::parse(user).unwrap(),
            role,
            expires_at: u64::MAX,
        })
    }

    fn event(user: &str, status: OrderStatus) -> OrderEvent {
        OrderEvent {
            order_id: OrderId::new(),
            user_id: UserId::parse(user).unwrap(),
            status,
            reason: None,
            at: OffsetDateTime::now_utc(),
        }
    }

    #[tokio::test]
    async fn order_events_reach_owners_and_admins_once_and_full_buffers_close() {
        let hub = Hub::new(2, 10);
        let mut alice = hub
            .subscribe(caller("alice", Role::Customer), Transport::Sse)
            .unwrap();
        alice.add(&[Topic::MyOrders]).unwrap();
        let mut bob = hub
            .subscribe(caller("bob", Role::Customer), Transport::Sse)
            .unwrap();
        let e = event("alice", OrderStatus::Confirmed);
        // bob names alice's order: the hub still never hands it to him.
        bob.add(&[Topic::Order(e.order_id), Topic::MyOrders])
            .unwrap();
        let mut admin = hub
            .subscribe(caller("ops", Role::Admin), Transport::Ws)
            .unwrap();
        admin.add(&[Topic::AllOrders]).unwrap();
        assert!(matches!(
            alice.add(&[Topic::AllOrders]),
            Err(SubscribeError::Forbidden(_))
        ));

        let id = Uuid::now_v7();
        hub.publish_order(Some(id), e.clone());
        hub.publish_order(Some(id), e.clone());
        assert!(matches!(alice.next().await, Next::Order(got) if got.event == e));
        assert!(matches!(admin.next().await, Next::Order(_)));
        assert!(bob.orders.try_recv().is_err());
        assert!(
            alice.orders.try_recv().is_err(),
            "the duplicate was dropped"
        );

        // Alice stops reading: the third undelivered event overflows her buffer of 2.
        for _ in 0..3 {
            hub.publish_order(Some(Uuid::now_v7()), event("alice", OrderStatus::Confirmed));
        }
        assert!(matches!(
            alice.next().await,
            Next::Closed(CloseReason::SlowConsumer)
        ));
        // Closing is not dropping: the three handles count until their streams end.
        assert_eq!(hub.subscribers(), 3);
        drop(alice);
        assert_eq!(hub.subscribers(), 2);
    }

    #[tokio::test]
    async fn stock_levels_conflate_and_new_subscribers_get_the_current_level() {
        let hub = Hub::new(4, 10);
        let now = OffsetDateTime::now_utc();
        hub.publish_stock(vec![("tee".into(), 10), ("cap".into(), 5)], now);
        let mut sub = hub.subscribe(None, Transport::Sse).unwrap();
        assert!(matches!(
            sub.add(&[Topic::MyOrders]),
            Err(SubscribeError::Unauthorized)
        ));
        assert!(matches!(
            sub.add(&[Topic::Stock(
                floodgate_common::domain::Sku::parse("nope").unwrap()
            )]),
            Err(SubscribeError::UnknownSku(_))
        ));
        sub.add(&[Topic::Stock(
            floodgate_common::domain::Sku::parse("tee").unwrap(),
        )])
        .unwrap();
        for n in (0..10).rev() {
            hub.publish_stock(vec![("tee".into(), n), ("cap".into(), 4)], now);
        }
        match sub.next().await {
            Next::Stock(l) => assert_eq!((l.sku.as_str(), l.available), ("tee", 0)),
            other => panic!("{other:?}"),
        }
        assert!(
            sub.shared.stock.lock().unwrap().is_empty(),
            "one level per SKU, the latest"
        );
    }

    #[tokio::test]
    async fn an_order_topic_sends_each_status_once_and_never_an_older_one() {
        let hub = Hub::new(8, 10);
        let mut sub = hub
            .subscribe(caller("alice", Role::Customer), Transport::Ws)
            .unwrap();
        let confirmed = event("alice", OrderStatus::Confirmed);
        sub.add(&[Topic::Order(confirmed.order_id), Topic::MyOrders])
            .unwrap();
        // The live event lands while the subscribe-time lookup is still running...
        hub.publish_order(Some(Uuid::now_v7()), confirmed.clone());
        // ...which then reads the same status, or an older one from Redis.
        sub.push_current(confirmed.clone());
        let mut accepted = confirmed.clone();
        accepted.status = OrderStatus::Accepted;
        sub.push_current(accepted);
        let mut cancelled = confirmed.clone();
        cancelled.status = OrderStatus::Cancelled;
        hub.publish_order(Some(Uuid::now_v7()), cancelled);
        let mut got = Vec::new();
        while let Ok(e) = sub.orders.try_recv() {
            got.push(e.event.status);
        }
        assert_eq!(got, [OrderStatus::Confirmed, OrderStatus::Cancelled]);
    }
}
