//! The reserve decision against a model: random sequences of orders (several lines,
//! several users, with and without an Idempotency-Key, paid with points or not),
//! publish confirms and failures, worker commits and failures, reaps, cancels (with
//! their refunds), goods received, point credits, and replays of keys, cancels,
//! receipts and credits, run against the real Lua scripts on a real Redis and compared
//! step by step with a plain in-memory model of the contract (API.md and each script's
//! header).
//!
//! After every step both the step's outcome (reserved / sold_out{sku,available} /
//! limit_exceeded{sku,limit,already} / unknown_sku / duplicate{order,published} /
//! key reused / the claim, release, reap and mark words) and the whole observable state
//! must agree: units available per SKU, units each user holds per SKU, each user's
//! spendable and held points, every reservation's state, and the open-reservation list
//! (`deadlines`). A failure prints the shrunk,
//! minimal sequence of steps.
//!
//! Each case runs in a namespace of its own, removed when the case ends, pass or fail.

use floodgate_common::redis::Redis;
use floodgate_common::{
    Namespace,
    domain::{IdempotencyKey, OrderId, OrderLine, OrderLines, Quantity, Sku, UserId},
    redis::{
        self as fredis, Claim, ConfirmedOrder, Keys, Queued, Release, Reserve, ReserveRequest,
        ResvState, StockChange,
    },
};
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::{HashMap, HashSet};

/// Cases per run: each is up to `MAX_STEPS` steps of a few Redis round trips; the whole
/// test takes a few seconds on a 2-core machine.
const CASES: u32 = 128;
const MAX_STEPS: usize = 40;

/// The catalogue; `GHOST` is named by orders but never created.
const SKUS: [&str; 3] = ["a", "b", "tee-red-m"];
const GHOST: &str = "ghost";
/// Users whose ids contain ':', so their Idempotency-Key records must not collide.
const USERS: [&str; 3] = ["u", "u:k", "u:k:k"];
const IDEM_KEYS: [&str; 2] = ["k", "k:k"];
const REFERENCES: [&str; 2] = ["po-1", "po-2"];
/// Each SKU's price in points (what ingress totals an order paid with points by).
const PRICES: [i64; 3] = [100, 250, 40];
/// Point-credit tokens (a charge or grant entry's id; a repeat applies once).
const CREDITS: [i64; 2] = [1, 2];

/// The total ingress passes for an order paid with points (an unknown SKU costs 0: the
/// script refuses it as unknown first).
fn total(lines: &[(&'static str, i64)]) -> i64 {
    lines
        .iter()
        .map(|(s, q)| SKUS.iter().position(|k| k == s).map_or(0, |i| PRICES[i]) * q)
        .sum()
}

/// Every reservation's deadline: in the past of `NOW`, so a reap takes any reservation
/// whose publish was never confirmed.
const DEADLINE_MS: i64 = 1_000;
const NOW_MS: i64 = 2_000;

fn sku_name(i: usize) -> &'static str {
    SKUS.get(i).copied().unwrap_or(GHOST)
}

/// What became of an order's publish right after its reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Publish {
    /// The broker confirmed: ingress marks it queued.
    Confirmed,
    /// The publish failed: ingress releases it (`publish_failed`).
    Failed,
    /// Ingress is still waiting (or died): neither yet.
    Pending,
}

#[derive(Debug, Clone)]
enum Step {
    /// A new order: (SKU index, qty) lines, `SKUS.len()` being the unknown SKU.
    Order {
        user: usize,
        lines: Vec<(usize, i64)>,
        key: Option<usize>,
        publish: Publish,
        points: bool,
    },
    /// The same user sends an earlier keyed order's key again, with the same body (its
    /// lines in reverse order, which is the same body) or another (one qty more).
    Replay {
        of: Index,
        same_body: bool,
        publish: Publish,
    },
    /// A late publish confirm of an earlier order.
    Confirm { of: Index },
    /// A late publish failure of an earlier order.
    PublishFailed { of: Index },
    /// A worker claims an earlier order and commits it.
    Commit { of: Index },
    /// A worker claims an earlier order and PostgreSQL fails it.
    WorkerFail { of: Index },
    /// The reaper, past every deadline, tries an earlier order.
    Reap { of: Index },
    /// The owner cancels an earlier order (only a committed order gets this far).
    Cancel { of: Index },
    /// Goods received: `units` of a SKU under a reference (a repeat applies once).
    Receive {
        sku: usize,
        units: i64,
        reference: usize,
    },
    /// A committed point credit reaches Redis (a repeat of its token applies once).
    Credit {
        user: usize,
        points: i64,
        credit: usize,
    },
}

fn publish() -> impl Strategy<Value = Publish> {
    prop_oneof![
        6 => Just(Publish::Confirmed),
        1 => Just(Publish::Failed),
        2 => Just(Publish::Pending),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    // Now and then a line names the SKU that does not exist.
    let sku = prop_oneof![12 => 0..SKUS.len(), 1 => Just(SKUS.len())];
    let lines = prop::collection::vec((sku, 1i64..=4), 1..=3).prop_map(|mut v| {
        // No SKU twice in one order (OrderLines refuses it before Redis is asked).
        let mut seen = HashSet::new();
        v.retain(|(s, _)| seen.insert(*s));
        v
    });
    let order = (
        0..USERS.len(),
        lines,
        prop::option::weighted(0.6, 0..IDEM_KEYS.len()),
        publish(),
        prop::bool::weighted(0.4),
    )
        .prop_map(|(user, lines, key, publish, points)| Step::Order {
            user,
            lines,
            key,
            publish,
            points,
        });
    prop_oneof![
        10 => order,
        4 => (any::<Index>(), prop::bool::weighted(0.7), publish())
            .prop_map(|(of, same_body, publish)| Step::Replay { of, same_body, publish }),
        2 => any::<Index>().prop_map(|of| Step::Confirm { of }),
        1 => any::<Index>().prop_map(|of| Step::PublishFailed { of }),
        3 => any::<Index>().prop_map(|of| Step::Commit { of }),
        1 => any::<Index>().prop_map(|of| Step::WorkerFail { of }),
        2 => any::<Index>().prop_map(|of| Step::Reap { of }),
        3 => any::<Index>().prop_map(|of| Step::Cancel { of }),
        2 => (0..SKUS.len(), 1i64..=5, 0..REFERENCES.len())
            .prop_map(|(sku, units, reference)| Step::Receive { sku, units, reference }),
        1 => (0..USERS.len(), 1i64..=600, 0..CREDITS.len())
            .prop_map(|(user, points, credit)| Step::Credit { user, points, credit }),
    ]
}

/// The catalogue at the start of a case: per SKU (initial stock, per-user limit or 0).
fn catalogue() -> impl Strategy<Value = Vec<(i64, i64)>> {
    prop::collection::vec((0i64..=8, prop_oneof![Just(0i64), 1i64..=4]), SKUS.len())
}

/// Each user's points at the start of a case.
fn funds() -> impl Strategy<Value = Vec<i64>> {
    prop::collection::vec(prop_oneof![Just(0i64), 1i64..=1500], USERS.len())
}

/// One step's observable outcome, as the typed wrappers return it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The reserve decision, and what marking or releasing it after its publish answered.
    Order(Reserve, Option<Settled>),
    Queued(Queued),
    Release(Release),
    /// The claim, and for a worker failure the release that followed a claimed order.
    Claim(Claim, Option<Release>),
    Reaped(bool),
    /// Units available after each line's cancel token was applied, and what its refund
    /// did (an order paid with points).
    Cancelled(Vec<i64>, Option<fredis::Credited>),
    /// Units available after the receipt.
    Received(i64),
    /// What the point credit did.
    Credited(fredis::Credited),
    /// The step had nothing to act on (no earlier order, or an order not committed).
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Settled {
    Queued(Queued),
    Release(Release),
}

/// The model's view of a reservation: the state of `resv:<id>` and why it was released.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Reserved,
    Queued,
    Claimed,
    Done,
    Released(&'static str),
}

impl State {
    fn resv_state(&self) -> ResvState {
        match self {
            State::Reserved => ResvState::Reserved,
            State::Queued => ResvState::Queued,
            State::Claimed => ResvState::Claimed,
            State::Done => ResvState::Done,
            State::Released(_) => ResvState::Released,
        }
    }

    fn is_open(&self) -> bool {
        matches!(self, State::Reserved | State::Queued | State::Claimed)
    }
}

#[derive(Debug, Clone)]
struct Order {
    id: OrderId,
    user: usize,
    /// (SKU, qty) in the order the client sent them.
    lines: Vec<(&'static str, i64)>,
    key: Option<usize>,
    state: State,
    /// The deadlines zset's score: `None` when the order is not listed.
    deadline: Option<f64>,
    /// Paid with points: its total.
    paid: Option<i64>,
}

#[derive(Debug, Clone)]
struct IdemRecord {
    order: usize,
    body_hash: String,
    accepted: bool,
}

/// The contract, in memory.
#[derive(Debug, Default)]
struct Model {
    available: HashMap<&'static str, i64>,
    limits: HashMap<&'static str, i64>,
    held: HashMap<(usize, &'static str), i64>,
    idem: HashMap<(usize, usize), IdemRecord>,
    applied: HashSet<String>,
    orders: Vec<Order>,
    /// Per user: points spendable, and held by open reservations paid with points.
    points: HashMap<usize, i64>,
    points_held: HashMap<usize, i64>,
}

/// What ingress sends as the body hash: the same lines in any order are the same body;
/// paid with points it is another.
fn body_hash(lines: &[(&str, i64)], points: bool) -> String {
    let mut sorted = lines.to_vec();
    sorted.sort();
    format!("{sorted:?}{points}")
}

impl Model {
    fn new(catalogue: &[(i64, i64)], funds: &[i64]) -> Self {
        let mut m = Model::default();
        for (i, &(stock, limit)) in catalogue.iter().enumerate() {
            m.available.insert(SKUS[i], stock);
            m.limits.insert(SKUS[i], limit);
            m.applied.insert(format!("receive:{}:initial", SKUS[i]));
        }
        for (u, &f) in funds.iter().enumerate() {
            m.credit(u, f, fredis::points_token(1_000 + u as i64));
        }
        m
    }

    /// credit_points.lua: once per token.
    fn credit(&mut self, user: usize, points: i64, token: String) -> fredis::Credited {
        if !self.applied.insert(token) {
            return fredis::Credited::Before;
        }
        *self.points.entry(user).or_default() += points;
        fredis::Credited::Now
    }

    fn held(&self, user: usize, sku: &'static str) -> i64 {
        self.held.get(&(user, sku)).copied().unwrap_or(0)
    }

    fn give_back(&mut self, o: usize) {
        let (user, lines) = (self.orders[o].user, self.orders[o].lines.clone());
        for (sku, qty) in lines {
            *self.available.get_mut(sku).expect("a known SKU") += qty;
            *self.held.entry((user, sku)).or_default() -= qty;
        }
        if let Some(p) = self.orders[o].paid {
            *self.points.entry(user).or_default() += p;
            *self.points_held.entry(user).or_default() -= p;
        }
    }

    /// reserve.lua: idempotency, unknown SKUs, per-user limits, stock; then all or none.
    fn reserve(
        &mut self,
        id: OrderId,
        user: usize,
        lines: &[(&'static str, i64)],
        key: Option<usize>,
        points: bool,
    ) -> Reserve {
        let hash = body_hash(lines, points);
        if let Some(rec) = key.and_then(|k| self.idem.get(&(user, k))) {
            if rec.body_hash != hash {
                return Reserve::KeyReused;
            }
            return Reserve::Duplicate {
                order_id: self.orders[rec.order].id,
                published: rec.accepted,
            };
        }
        if let Some((sku, _)) = lines.iter().find(|(s, _)| !self.available.contains_key(s)) {
            return Reserve::UnknownSku(sku.to_string());
        }
        for &(sku, qty) in lines {
            let (limit, already) = (self.limits[sku], self.held(user, sku));
            if limit > 0 && already + qty > limit {
                return Reserve::LimitExceeded {
                    sku: sku.into(),
                    limit,
                    already,
                };
            }
        }
        for &(sku, qty) in lines {
            let available = self.available[sku];
            if available < qty {
                return Reserve::SoldOut {
                    sku: sku.into(),
                    available: available.max(0),
                };
            }
        }
        let paid = points.then(|| total(lines));
        if let Some(needed) = paid {
            let spendable = self.points.get(&user).copied().unwrap_or(0);
            if spendable < needed {
                return Reserve::InsufficientPoints { spendable, needed };
            }
            *self.points.entry(user).or_default() -= needed;
            *self.points_held.entry(user).or_default() += needed;
        }
        for &(sku, qty) in lines {
            *self.available.get_mut(sku).expect("checked") -= qty;
            *self.held.entry((user, sku)).or_default() += qty;
        }
        self.orders.push(Order {
            id,
            user,
            lines: lines.to_vec(),
            key,
            state: State::Reserved,
            deadline: Some(DEADLINE_MS as f64),
            paid,
        });
        if let Some(k) = key {
            let order = self.orders.len() - 1;
            self.idem.insert(
                (user, k),
                IdemRecord {
                    order,
                    body_hash: hash,
                    accepted: false,
                },
            );
        }
        Reserve::Reserved
    }

    /// queued.lua for one order.
    fn mark_queued(&mut self, o: usize) -> Queued {
        let order = &mut self.orders[o];
        if order.state == State::Reserved {
            order.state = State::Queued;
        }
        if matches!(order.state, State::Queued | State::Claimed) && order.deadline.is_some() {
            order.deadline = Some(f64::INFINITY);
        }
        let (state, user, key) = (order.state.clone(), order.user, order.key);
        if matches!(state, State::Queued | State::Claimed | State::Done)
            && let Some(rec) = key.and_then(|k| self.idem.get_mut(&(user, k)))
            && rec.order == o
        {
            rec.accepted = true;
        }
        match state {
            State::Released("reservation_expired" | "publish_failed") => Queued::Released,
            _ => Queued::Accepted,
        }
    }

    /// release.lua.
    fn release(&mut self, o: usize, reason: &'static str) -> Release {
        let state = self.orders[o].state.clone();
        let releasable = match state {
            State::Reserved => true,
            State::Queued | State::Claimed => reason != "publish_failed",
            State::Done | State::Released(_) => false,
        };
        if !releasable {
            return match state {
                State::Released(_) => Release::NotHeld,
                _ => Release::Taken,
            };
        }
        self.give_back(o);
        let order = &mut self.orders[o];
        order.state = State::Released(reason);
        order.deadline = None;
        let (user, key) = (order.user, order.key);
        if reason == "publish_failed"
            && let Some(k) = key
            && self.idem.get(&(user, k)).is_some_and(|r| r.order == o)
        {
            self.idem.remove(&(user, k));
        }
        Release::Released
    }

    /// claim.lua for one order.
    fn claim(&mut self, o: usize) -> Claim {
        let order = &mut self.orders[o];
        match order.state {
            State::Reserved | State::Queued | State::Claimed => {
                order.state = State::Claimed;
                Claim::Claimed
            }
            State::Done => Claim::Done,
            State::Released("reservation_expired") => Claim::Expired,
            State::Released("publish_failed") => Claim::Unpublished,
            State::Released(_) => Claim::Released,
        }
    }

    /// finish.lua for one order: a committed order's points are spent, no longer held.
    fn finish(&mut self, o: usize) {
        let order = &mut self.orders[o];
        if order.state.is_open() {
            order.state = State::Done;
            if let Some(p) = order.paid {
                *self.points_held.entry(order.user).or_default() -= p;
            }
        }
        order.deadline = None;
    }

    /// reap.lua at `NOW_MS`.
    fn reap(&mut self, o: usize) -> bool {
        let order = &mut self.orders[o];
        match order.state {
            State::Queued | State::Claimed => {
                order.deadline = Some(f64::INFINITY);
                false
            }
            State::Reserved => {
                self.give_back(o);
                let order = &mut self.orders[o];
                order.state = State::Released("reservation_expired");
                order.deadline = None;
                true
            }
            _ => {
                order.deadline = None;
                false
            }
        }
    }

    /// apply_stock.lua: a change applied once per token.
    fn apply_stock(
        &mut self,
        sku: &'static str,
        units: i64,
        token: String,
        user: Option<(usize, i64)>,
    ) -> i64 {
        if self.applied.insert(token) {
            *self.available.entry(sku).or_default() += units;
            if let Some((u, delta)) = user {
                *self.held.entry((u, sku)).or_default() += delta;
            }
        }
        self.available.get(sku).copied().unwrap_or(0)
    }
}

/// One case's namespace on the real Redis, removed when dropped, pass or fail.
struct Real {
    keys: Keys,
    con: Redis,
    url: String,
}

impl Drop for Real {
    fn drop(&mut self) {
        floodgate_tests::delete_redis_namespace(&self.url, &self.keys);
    }
}

fn users() -> Vec<UserId> {
    USERS.iter().map(|u| UserId::parse(*u).unwrap()).collect()
}

fn sku(name: &str) -> Sku {
    Sku::parse(name).unwrap()
}

/// What Redis shows of the state the model predicts, read in one round trip.
#[derive(Debug, PartialEq)]
struct Observed {
    available: Vec<Option<i64>>,
    held: Vec<Vec<i64>>,
    /// Per user: (spendable, held) points.
    points: Vec<(i64, i64)>,
    states: Vec<Option<ResvState>>,
    deadlines: Vec<Option<f64>>,
}

impl Real {
    async fn new(catalogue: &[(i64, i64)], funds: &[i64]) -> Self {
        let ns = Namespace::parse(&floodgate_tests::namespace()).unwrap();
        let url = floodgate_tests::redis_url();
        let con = fredis::connect(&url)
            .await
            .expect("Redis at FLOODGATE_REDIS_URL");
        let mut real = Real {
            keys: Keys::new(&ns),
            con,
            url,
        };
        let _: () = redis::cmd("SET")
            .arg(real.keys.epoch())
            .arg(OrderId::new().to_string())
            .query_async(&mut real.con)
            .await
            .unwrap();
        // As `POST /v1/skus` loads a new SKU.
        for (i, &(stock, limit)) in catalogue.iter().enumerate() {
            let s = sku(SKUS[i]);
            let token = fredis::receive_token(&s, "initial");
            fredis::apply_stock(
                &mut real.con,
                &real.keys,
                &StockChange {
                    sku: &s,
                    units: stock,
                    token: &token,
                    per_user_limit: Some(limit),
                    user: None,
                    window: None,
                    after: None,
                },
            )
            .await
            .unwrap();
        }
        // As a charge reaches Redis: once per entry token.
        for (u, &f) in funds.iter().enumerate() {
            let token = fredis::points_token(1_000 + u as i64);
            fredis::credit_points(&mut real.con, &real.keys, &token, USERS[u], f)
                .await
                .unwrap();
        }
        real
    }

    async fn observe(&mut self, orders: &[Order]) -> Observed {
        let k = &self.keys;
        let mut pipe = redis::pipe();
        let mut all_skus: Vec<&str> = SKUS.to_vec();
        all_skus.push(GHOST);
        pipe.cmd("HMGET").arg(k.stock()).arg(&all_skus);
        for u in users() {
            pipe.cmd("HMGET").arg(k.user(&u)).arg(&all_skus);
        }
        pipe.cmd("HMGET").arg(k.points()).arg(&USERS);
        pipe.cmd("HMGET").arg(k.points_held()).arg(&USERS);
        for o in orders {
            pipe.cmd("HGET").arg(k.resv(&o.id)).arg("state");
        }
        for o in orders {
            pipe.cmd("ZSCORE").arg(k.deadlines()).arg(o.id.to_string());
        }
        let mut replies: Vec<redis::Value> = pipe.query_async(&mut self.con).await.unwrap();
        let mut take = |n: usize| replies.drain(..n).collect::<Vec<_>>();
        let from = |v: redis::Value| -> Vec<Option<i64>> { redis::from_redis_value(v).unwrap() };
        let available = from(take(1).remove(0));
        let held = take(USERS.len())
            .into_iter()
            .map(|v| from(v).into_iter().map(|h| h.unwrap_or(0)).collect())
            .collect();
        let (spendable, held_points) = {
            let mut two = take(2);
            let held_points = from(two.remove(1));
            (from(two.remove(0)), held_points)
        };
        let points = spendable
            .into_iter()
            .zip(held_points)
            .map(|(s, h)| (s.unwrap_or(0), h.unwrap_or(0)))
            .collect();
        let states = take(orders.len())
            .into_iter()
            .map(|v| {
                let s: Option<String> = redis::from_redis_value(v).unwrap();
                s.map(|s| ResvState::parse(&s).expect("a known state"))
            })
            .collect();
        let deadlines = take(orders.len())
            .into_iter()
            .map(|v| redis::from_redis_value(v).unwrap())
            .collect();
        Observed {
            available,
            held,
            points,
            states,
            deadlines,
        }
    }
}

impl Model {
    fn observed(&self) -> Observed {
        let mut available: Vec<Option<i64>> = SKUS
            .iter()
            .map(|s| self.available.get(s).copied())
            .collect();
        available.push(None);
        let held = (0..USERS.len())
            .map(|u| SKUS.iter().map(|s| self.held(u, s)).chain([0]).collect())
            .collect();
        Observed {
            available,
            held,
            points: (0..USERS.len())
                .map(|u| {
                    (
                        self.points.get(&u).copied().unwrap_or(0),
                        self.points_held.get(&u).copied().unwrap_or(0),
                    )
                })
                .collect(),
            states: self
                .orders
                .iter()
                .map(|o| Some(o.state.resv_state()))
                .collect(),
            deadlines: self.orders.iter().map(|o| o.deadline).collect(),
        }
    }
}

/// Runs one step on Redis and on the model; returns (real outcome, model outcome).
async fn run_step(
    step: &Step,
    real: &mut Real,
    model: &mut Model,
    users: &[UserId],
) -> (Outcome, Outcome) {
    let pick = |of: &Index, model: &Model| {
        (!model.orders.is_empty()).then(|| of.index(model.orders.len()))
    };
    match step {
        Step::Order {
            user,
            lines,
            key,
            publish,
            points,
        } => {
            let lines: Vec<(&'static str, i64)> =
                lines.iter().map(|&(s, q)| (sku_name(s), q)).collect();
            place(real, model, users, *user, &lines, (*key, *points), *publish).await
        }
        Step::Replay {
            of,
            same_body,
            publish,
        } => {
            let keyed: Vec<&Order> = model.orders.iter().filter(|o| o.key.is_some()).collect();
            if keyed.is_empty() {
                return (Outcome::Skipped, Outcome::Skipped);
            }
            let first = keyed[of.index(keyed.len())];
            let (user, key, points) = (first.user, first.key, first.paid.is_some());
            let mut lines = first.lines.clone();
            lines.reverse();
            if !same_body {
                lines[0].1 += 1;
            }
            place(real, model, users, user, &lines, (key, points), *publish).await
        }
        Step::Confirm { of } => {
            let Some(o) = pick(of, model) else {
                return (Outcome::Skipped, Outcome::Skipped);
            };
            let r = mark_queued(real, &model.orders[o], users).await;
            (Outcome::Queued(r), Outcome::Queued(model.mark_queued(o)))
        }
        Step::PublishFailed { of } => {
            let Some(o) = pick(of, model) else {
                return (Outcome::Skipped, Outcome::Skipped);
            };
            let r = release(real, &model.orders[o], users, "publish_failed").await;
            (
                Outcome::Release(r),
                Outcome::Release(model.release(o, "publish_failed")),
            )
        }
        Step::Commit { of } => {
            let Some(o) = pick(of, model) else {
                return (Outcome::Skipped, Outcome::Skipped);
            };
            let id = model.orders[o].id;
            let c = fredis::claim(&mut real.con, &real.keys, &[id])
                .await
                .unwrap()[0];
            if c == Claim::Claimed {
                fredis::finish(&mut real.con, &real.keys, &[id])
                    .await
                    .unwrap();
            }
            let m = model.claim(o);
            if m == Claim::Claimed {
                model.finish(o);
            }
            (Outcome::Claim(c, None), Outcome::Claim(m, None))
        }
        Step::WorkerFail { of } => {
            let Some(o) = pick(of, model) else {
                return (Outcome::Skipped, Outcome::Skipped);
            };
            let id = model.orders[o].id;
            let c = fredis::claim(&mut real.con, &real.keys, &[id])
                .await
                .unwrap()[0];
            let r = match c {
                Claim::Claimed => Some(release(real, &model.orders[o], users, "failed").await),
                _ => None,
            };
            let m = model.claim(o);
            let mr = (m == Claim::Claimed).then(|| model.release(o, "failed"));
            (Outcome::Claim(c, r), Outcome::Claim(m, mr))
        }
        Step::Reap { of } => {
            let Some(o) = pick(of, model) else {
                return (Outcome::Skipped, Outcome::Skipped);
            };
            let order = &model.orders[o];
            let r = fredis::reap(
                &mut real.con,
                &real.keys,
                &order.id,
                &users[order.user],
                NOW_MS,
            )
            .await
            .unwrap();
            (Outcome::Reaped(r), Outcome::Reaped(model.reap(o)))
        }
        Step::Cancel { of } => {
            let Some(o) = pick(of, model) else {
                return (Outcome::Skipped, Outcome::Skipped);
            };
            // PostgreSQL cancels only a confirmed (committed) order; the rest never reach
            // Redis. Released-after-commit cannot happen: finish makes it done for good.
            if model.orders[o].state != State::Done {
                return (Outcome::Skipped, Outcome::Skipped);
            }
            let order = model.orders[o].clone();
            let (mut real_av, mut model_av) = (vec![], vec![]);
            for &(s, qty) in &order.lines {
                let token = fredis::cancel_token(&order.id, &sku(s));
                real_av.push(
                    fredis::apply_stock(
                        &mut real.con,
                        &real.keys,
                        &StockChange {
                            sku: &sku(s),
                            units: qty,
                            token: &token,
                            per_user_limit: None,
                            user: Some((&users[order.user], -qty)),
                            window: None,
                            after: None,
                        },
                    )
                    .await
                    .unwrap(),
                );
                model_av.push(model.apply_stock(s, qty, token, Some((order.user, -qty))));
            }
            // An order paid with points is refunded: a credit under its refund entry's
            // token (here one per order).
            let (real_refund, model_refund) = match order.paid {
                Some(p) => {
                    let token = format!("points:refund:{}", order.id);
                    let r = fredis::credit_points(
                        &mut real.con,
                        &real.keys,
                        &token,
                        USERS[order.user],
                        p,
                    )
                    .await
                    .unwrap();
                    (Some(r), Some(model.credit(order.user, p, token)))
                }
                None => (None, None),
            };
            (
                Outcome::Cancelled(real_av, real_refund),
                Outcome::Cancelled(model_av, model_refund),
            )
        }
        Step::Credit {
            user,
            points,
            credit,
        } => {
            let token = fredis::points_token(CREDITS[*credit]);
            let r = fredis::credit_points(&mut real.con, &real.keys, &token, USERS[*user], *points)
                .await
                .unwrap();
            (
                Outcome::Credited(r),
                Outcome::Credited(model.credit(*user, *points, token)),
            )
        }
        Step::Receive {
            sku: s,
            units,
            reference,
        } => {
            let name = SKUS[*s];
            let token = fredis::receive_token(&sku(name), REFERENCES[*reference]);
            let r = fredis::apply_stock(
                &mut real.con,
                &real.keys,
                &StockChange {
                    sku: &sku(name),
                    units: *units,
                    token: &token,
                    per_user_limit: None,
                    user: None,
                    window: None,
                    after: None,
                },
            )
            .await
            .unwrap();
            (
                Outcome::Received(r),
                Outcome::Received(model.apply_stock(name, *units, token, None)),
            )
        }
    }
}

/// Ingress's path for one order: reserve, then mark it queued or release it as its
/// publish went.
async fn place(
    real: &mut Real,
    model: &mut Model,
    users: &[UserId],
    user: usize,
    lines: &[(&'static str, i64)],
    (key, points): (Option<usize>, bool),
    publish: Publish,
) -> (Outcome, Outcome) {
    let id = OrderId::new();
    let order_lines = OrderLines::try_from(
        lines
            .iter()
            .map(|&(s, q)| OrderLine {
                sku: sku(s),
                qty: Quantity::try_from(q).unwrap(),
            })
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let idem_key = key.map(|k| IdempotencyKey::parse(IDEM_KEYS[k]).unwrap());
    let hash = body_hash(lines, points);
    let r = fredis::reserve(
        &mut real.con,
        &real.keys,
        &ReserveRequest {
            order_id: id,
            user: &users[user],
            lines: &order_lines,
            held: None,
            first: None,
            buckets: &floodgate_common::redis::one_bucket,
            idempotency: idem_key.as_ref().map(|k| (k, hash.as_str())),
            accepted_at: "2026-11-21T00:00:00Z",
            deadline_ms: DEADLINE_MS,
            waitlist_until_ms: None,
            idempotency_ttl_secs: 600,
            points: points.then(|| total(lines)),
        },
    )
    .await
    .unwrap();
    let m = model.reserve(id, user, lines, key, points);
    if r != Reserve::Reserved || m != Reserve::Reserved {
        return (Outcome::Order(r, None), Outcome::Order(m, None));
    }
    let o = model.orders.len() - 1;
    let (rs, ms) = match publish {
        Publish::Pending => (None, None),
        Publish::Confirmed => (
            Some(Settled::Queued(
                mark_queued(real, &model.orders[o], users).await,
            )),
            Some(Settled::Queued(model.mark_queued(o))),
        ),
        Publish::Failed => (
            Some(Settled::Release(
                release(real, &model.orders[o], users, "publish_failed").await,
            )),
            Some(Settled::Release(model.release(o, "publish_failed"))),
        ),
    };
    (Outcome::Order(r, rs), Outcome::Order(m, ms))
}

async fn mark_queued(real: &mut Real, order: &Order, users: &[UserId]) -> Queued {
    let confirmed = ConfirmedOrder {
        order_id: order.id,
        user: users[order.user].clone(),
        idempotency_key: order
            .key
            .map(|k| IdempotencyKey::parse(IDEM_KEYS[k]).unwrap()),
    };
    fredis::mark_queued(&mut real.con, &real.keys, &[&confirmed])
        .await
        .unwrap()[0]
}

async fn release(real: &mut Real, order: &Order, users: &[UserId], reason: &str) -> Release {
    let key = order
        .key
        .map(|k| IdempotencyKey::parse(IDEM_KEYS[k]).unwrap());
    fredis::release(
        &mut real.con,
        &real.keys,
        &order.id,
        &users[order.user],
        key.as_ref(),
        reason,
    )
    .await
    .unwrap()
}

async fn run_case(
    catalogue: &[(i64, i64)],
    funds: &[i64],
    steps: &[Step],
) -> Result<(), TestCaseError> {
    let users = users();
    let mut real = Real::new(catalogue, funds).await;
    let mut model = Model::new(catalogue, funds);
    prop_assert_eq!(
        real.observe(&model.orders).await,
        model.observed(),
        "after loading"
    );
    for (i, step) in steps.iter().enumerate() {
        let (got, want) = run_step(step, &mut real, &mut model, &users).await;
        prop_assert_eq!(got, want, "outcome of step {} ({:?})", i, step);
        let observed = real.observe(&model.orders).await;
        prop_assert_eq!(
            observed,
            model.observed(),
            "state after step {} ({:?})",
            i,
            step
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: CASES,
        ..ProptestConfig::default()
    })]

    #[test]
    fn reserve_matches_the_model(
        catalogue in catalogue(),
        funds in funds(),
        steps in prop::collection::vec(step(), 1..=MAX_STEPS),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run_case(&catalogue, &funds, &steps))?;
    }
}

/// The same reserve call twice, same order id (a client-side retry of a call whose
/// reply was lost would do this): the second must not take the units again. (Found by
/// this suite: reserve.lua once reserved again and overwrote the record.)
#[tokio::test]
async fn a_replayed_reserve_does_not_take_the_units_twice() {
    let mut real = Real::new(&[(5, 0), (0, 0), (0, 0)], &[0, 0, 0]).await;
    let mut model = Model::new(&[(5, 0), (0, 0), (0, 0)], &[0, 0, 0]);
    let users = users();
    let lines = OrderLines::try_from(vec![OrderLine {
        sku: sku("a"),
        qty: Quantity::try_from(2).unwrap(),
    }])
    .unwrap();
    let req = ReserveRequest {
        order_id: OrderId::new(),
        user: &users[0],
        lines: &lines,
        held: None,
        first: None,
        buckets: &floodgate_common::redis::one_bucket,
        idempotency: None,
        accepted_at: "2026-11-21T00:00:00Z",
        deadline_ms: DEADLINE_MS,
        waitlist_until_ms: None,
        idempotency_ttl_secs: 600,
        points: None,
    };
    let first = fredis::reserve(&mut real.con, &real.keys, &req)
        .await
        .unwrap();
    assert_eq!(first, Reserve::Reserved);
    model.reserve(req.order_id, 0, &[("a", 2)], None, false);
    let again = fredis::reserve(&mut real.con, &real.keys, &req)
        .await
        .unwrap();
    assert_eq!(again, Reserve::Reserved);
    assert_eq!(real.observe(&model.orders).await, model.observed());
}
