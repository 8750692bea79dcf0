//! Placing and reading orders: the hot path (validate, reserve in Redis, publish, answer)
//! and the status read.

use crate::{error::ApiError, repo, state::AppState};
use floodgate_common::{
    amqp::{IntakeMessage, OrderPlaced},
    auth::Caller,
    bundle::{Bundles, held_lines},
    domain::{IdempotencyKey, Invalid, OrderId, OrderLine, OrderLines, OrderStatus, Quantity, Sku},
    redis::{self as fredis, Reserve, ReserveRequest},
    telemetry::names,
    trace::TraceParent,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};
use time::OffsetDateTime;

/// The request body as sent; any shape error is 400 before this exists.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct OrderRequest {
    /// 1-50 lines, no SKU twice.
    #[schema(schema_with = floodgate_common::openapi::order_lines_schema)]
    pub items: Vec<LineRequest>,
    /// When a line is short of stock, wait on the SKU's waitlist (202 `waitlisted`)
    /// instead of 409 `sold_out`. One line of a SKU that is not a bundle and has one
    /// bucket; in a deployment with several Redis shards, no Idempotency-Key.
    #[serde(default)]
    pub waitlist: bool,
    /// `"points"`: pay with the buyer's points; the order's total is held in the same
    /// decision as its stock (409 `insufficient_points` when too few are spendable).
    /// Not with `"waitlist": true`, nor with several Redis shards. Absent or null: paid
    /// elsewhere.
    #[serde(default)]
    pub payment: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct LineRequest {
    pub sku: String,
    #[serde(deserialize_with = "crate::extract::integer")]
    pub qty: i64,
}

impl OrderRequest {
    /// Checks every rule of API.md; the message names the field. Returns the lines and
    /// how the order is placed besides them.
    pub fn validate(self) -> Result<(OrderLines, Terms), ApiError> {
        let points = crate::points::check_payment(self.payment.as_deref())?;
        if points && self.waitlist {
            return Err(ApiError::InvalidOrder(
                "payment: an order paid with points cannot wait on a waitlist".into(),
            ));
        }
        if self.waitlist && self.items.len() > 1 {
            return Err(ApiError::InvalidOrder(
                "waitlist: an order that may wait has exactly one line".into(),
            ));
        }
        let lines = self
            .items
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let sku = Sku::parse(l.sku).map_err(|e| at(i, "sku", e))?;
                let qty = Quantity::try_from(l.qty).map_err(|e| at(i, "qty", e))?;
                Ok(OrderLine { sku, qty })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let lines = OrderLines::try_from(lines).map_err(|e| ApiError::InvalidOrder(e.0))?;
        Ok((
            lines,
            Terms {
                waitlist: self.waitlist,
                points,
            },
        ))
    }
}

fn at(i: usize, field: &str, e: Invalid) -> ApiError {
    ApiError::InvalidOrder(format!("items[{i}].{field}: {}", e.0))
}

/// What API.md answers for an order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OrderView {
    pub order_id: OrderId,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub user_id: Option<String>,
    pub status: OrderStatus,
    pub items: Vec<OrderLine>,
    #[schema(format = DateTime)]
    pub accepted_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, format = DateTime)]
    pub confirmed_at: Option<String>,
    /// Why a `failed` order failed (`reservation_expired`, `insufficient_stock`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub reason: Option<String>,
    /// While `waitlisted`: its place in the SKU's waitlist (1 = next to be promoted).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1)]
    pub position: Option<i64>,
    /// `"points"` for an order paid with points (absent: paid elsewhere).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub payment: Option<String>,
    /// An order paid with points: its total, held when it was placed and spent when it
    /// was committed (absent for an order paid elsewhere).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 0)]
    pub total_cents: Option<i64>,
}

/// How an order is placed besides its lines.
#[derive(Debug, Clone, Copy, Default)]
pub struct Terms {
    /// `"waitlist": true`: it may wait when short of stock.
    pub waitlist: bool,
    /// `"payment": "points"`: paid with the buyer's points.
    pub points: bool,
}

/// Result of placing an order: new (202) or the first answer to this Idempotency-Key.
pub enum Placed {
    New(OrderView),
    Repeat(OrderView),
}

/// The same lines in any order hash the same; paid with points, they hash otherwise
/// (the same key with another payment is another body).
/// (Public for tests that act as an ingress that died mid-order.)
pub fn body_hash(lines: &OrderLines, points: bool) -> String {
    let mut sorted = lines.as_slice().to_vec();
    sorted.sort_by(|a, b| a.sku.cmp(&b.sku));
    let mut canonical = serde_json::to_vec(&sorted).expect("lines serialize");
    if points {
        canonical.extend_from_slice(b"|points");
    }
    hex::encode(Sha256::digest(canonical))
}

pub(crate) fn unavailable(what: &str, e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "{what} unavailable");
    ApiError::Unavailable(format!("{what} is unavailable; nothing was reserved"))
}

/// Reserve, publish, answer. Nothing is reserved unless the answer is 202.
///
/// It runs in a task of its own: a client that hangs up mid-request must not cut it
/// short between the reserve and the publish, nor between the confirm and the mark
/// (either would leave a reservation that only the reaper settles).
pub async fn place(
    st: &AppState,
    caller: &Caller,
    lines: OrderLines,
    key: Option<IdempotencyKey>,
    Terms { waitlist, points }: Terms,
    permit: Option<floodgate_common::http::InFlightPermit>,
    trace: Option<TraceParent>,
) -> Result<Placed, ApiError> {
    use tracing::Instrument;
    if points && st.shards.count() > 1 {
        return Err(ApiError::InvalidOrder(
            "payment: paying with points needs a deployment with one Redis shard \
             (FLOODGATE_REDIS_SHARDS=1)"
                .into(),
        ));
    }
    // An order that may wait is never refused from memory: it waits instead.
    if key.is_none() && !waitlist {
        // Any line, a bundle's components too: an order over several shards would
        // otherwise reserve its other parts only to give them back.
        let bundles = st.bundles.of(lines.as_slice());
        let short = if bundles.is_empty() {
            lines
                .as_slice()
                .iter()
                .find(|l| st.sold_out.is_sold_out(&l.sku))
                .map(|l| l.sku.to_string())
        } else {
            held_lines(lines.as_slice(), &bundles)
                .iter()
                .find(|l| !l.bundle && st.sold_out.is_sold_out(&l.sku))
                .map(|l| l.sku.to_string())
        };
        if let Some(sku) = short {
            metrics::counter!(names::SOLD_OUT_CACHED).increment(1);
            return Err(sold_out(lines.as_slice(), &bundles, sku, 0));
        }
    }
    let (st, caller) = (st.clone(), caller.clone());
    let tasks = st.tasks.clone();
    tasks
        .spawn(
            async move {
                // The request's in-flight slot stays taken while its order is worked on,
                // even after its client hung up.
                let _slot = permit;
                place_to_the_end(&st, &caller, lines, key, waitlist, points, trace).await
            }
            .in_current_span(),
        )
        .await
        .unwrap_or_else(|e| Err(ApiError::Internal(anyhow::anyhow!("placing an order: {e}"))))
}

async fn place_to_the_end(
    st: &AppState,
    caller: &Caller,
    lines: OrderLines,
    key: Option<IdempotencyKey>,
    waitlist: bool,
    points: bool,
    trace: Option<TraceParent>,
) -> Result<Placed, ApiError> {
    let hash = key.as_ref().map(|_| body_hash(&lines, points));
    // Paid with points: the total at the moment of ordering, held by the reserve.
    let total = match points {
        true => Some(crate::points::order_total(st, &lines).await?),
        false => None,
    };
    // A duplicate whose first request is still publishing waits for it; if that publish
    // fails the record vanishes and this request becomes the first.
    let wait_until = Instant::now() + st.cfg.publish_timeout + Duration::from_secs(1);
    // Redirects to a hot SKU's bucket count, and pulls of units into the buyer's bucket:
    // each at most once per line (a count is fixed once learned; a pull that lost its
    // units to other buyers meanwhile answers sold out, as without buckets).
    // Bundles learned from the script's `bundle` replies: at most once per line.
    let (mut moved, mut pulled, mut learned) = (0, 0, 0);
    loop {
        // Again on each turn: a `moved` or `bundle` reply changes the held lines or
        // where one goes. One snapshot of the bundles and the counts for the parts, the
        // script and the message, so all three agree.
        let bundles = st.bundles.of(lines.as_slice());
        let held = held_lines(lines.as_slice(), &bundles);
        let counts: BTreeMap<String, usize> = held
            .iter()
            .map(|l| (l.sku.to_string(), st.buckets.get(&l.sku)))
            .filter(|(_, k)| *k > 1)
            .collect();
        let known = |s: &Sku| counts.get(s.as_str()).copied().unwrap_or(1);
        let parts = st.shards.parts(&held, &caller.user, key.as_ref(), known);
        if waitlist {
            // Promotion is one script in the SKU's shard: one line, of one bucket, and
            // the order in one part (its Idempotency-Key's record in another shard would
            // make it two).
            may_wait(&held, &counts, &parts)?;
        }
        let order_id = OrderId::new();
        // Microseconds: what PostgreSQL keeps, so every answer shows the same instant.
        let now = OffsetDateTime::now_utc();
        let now = now
            .replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
            .expect("a truncated nanosecond is valid");
        let accepted_at = repo::rfc3339(now);
        let deadline = now + st.cfg.reservation_ttl;
        let deadline_ms = (deadline.unix_timestamp_nanos() / 1_000_000) as i64;
        let req = ReserveRequest {
            order_id,
            user: &caller.user,
            lines: &lines,
            held: None,
            first: None,
            idempotency: key.as_ref().zip(hash.as_deref()),
            accepted_at: &accepted_at,
            deadline_ms,
            waitlist_until_ms: waitlist.then(|| {
                let until = now + st.cfg.waitlist_ttl;
                (until.unix_timestamp_nanos() / 1_000_000) as i64
            }),
            // An order that may wait keeps its key at least as long as it may wait: a
            // repeat must find it, not place a second order.
            idempotency_ttl_secs: match waitlist {
                true => st
                    .cfg
                    .idempotency_ttl
                    .max(st.cfg.waitlist_ttl + Duration::from_secs(60)),
                false => st.cfg.idempotency_ttl,
            }
            .as_secs()
            .max(1),
            buckets: &known,
            points: total,
        };
        let started = Instant::now();
        let decision = fredis::reserve_parts(&st.redis, &st.shards, &parts, &req)
            .await
            .map_err(|e| unavailable("Redis", e))?;
        metrics::histogram!(names::RESERVE_DURATION).record(started.elapsed().as_secs_f64());
        match decision {
            Reserve::Reserved => {
                publish(
                    st,
                    caller,
                    &lines,
                    counts,
                    bundles,
                    &parts,
                    key.as_ref(),
                    order_id,
                    &accepted_at,
                    deadline_ms,
                    total,
                    trace,
                )
                .await?;
                // Counted here, not in the handler: a buyer who hung up still has an order.
                metrics::counter!(names::ORDERS_ACCEPTED).increment(1);
                return Ok(Placed::New(OrderView {
                    order_id,
                    user_id: None,
                    status: OrderStatus::Accepted,
                    items: lines.as_slice().to_vec(),
                    accepted_at,
                    confirmed_at: None,
                    reason: None,
                    position: None,
                    payment: total.map(|_| "points".to_owned()),
                    total_cents: total,
                }));
            }
            Reserve::Waitlisted { position } => {
                // Nothing to publish: the worker's promoter publishes it once promoted,
                // and sends its `waitlisted` event.
                metrics::counter!(names::ORDERS_WAITLISTED).increment(1);
                return Ok(Placed::New(OrderView {
                    order_id,
                    user_id: None,
                    status: OrderStatus::Waitlisted,
                    items: lines.as_slice().to_vec(),
                    accepted_at,
                    confirmed_at: None,
                    reason: None,
                    position: (position > 0).then_some(position),
                    payment: None,
                    total_cents: None,
                }));
            }
            Reserve::Duplicate {
                order_id,
                published,
                ..
            } => {
                if published {
                    return repeat(st, caller, order_id).await.map(Placed::Repeat);
                }
                if Instant::now() > wait_until {
                    // The first request's ingress may have died before confirming; once
                    // its order is decided (the reaper records it) that is the answer.
                    if let Some(view) = view(st, caller, order_id).await?
                        && view.status != OrderStatus::Accepted
                    {
                        return Ok(Placed::Repeat(OrderView {
                            user_id: None,
                            ..view
                        }));
                    }
                    return Err(ApiError::Unavailable(
                        "the first request with this Idempotency-Key is still in progress".into(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Reserve::KeyReused => return Err(ApiError::IdempotencyKeyReused),
            Reserve::UnknownSku(sku) => return Err(ApiError::UnknownSku { sku }),
            Reserve::LimitExceeded {
                sku,
                limit,
                already,
            } => {
                return Err(ApiError::LimitExceeded {
                    sku,
                    limit,
                    already,
                });
            }
            Reserve::Bundle { sku, def } => {
                st.bundles.learn(&sku, def);
                learned += 1;
                if learned > lines.as_slice().len() {
                    return Err(unavailable(
                        "Redis",
                        format!("{sku}: answered as a bundle again after it was learned"),
                    ));
                }
            }
            Reserve::Moved { sku, buckets } => {
                st.buckets.learn(&sku, buckets);
                moved += 1;
                if moved > held.len() {
                    return Err(unavailable(
                        "Redis",
                        format!("{sku}: the bucket count keeps changing ({buckets})"),
                    ));
                }
            }
            Reserve::SoldOut { sku, available } => {
                // The held line short of units: the order's own line, or a bundle's
                // components summed with it.
                let line = held.iter().find(|l| !l.bundle && l.sku.as_str() == sku);
                let k = line.map_or(1, |l| known(&l.sku));
                let Some(line) = line.filter(|_| k > 1) else {
                    if available == 0 {
                        st.sold_out.remember(&sku, started);
                    }
                    return Err(sold_out(lines.as_slice(), &bundles, sku, available));
                };
                if pulled >= held.len() {
                    // Others keep taking what is pulled in: what the buyer's bucket had.
                    return Err(sold_out(lines.as_slice(), &bundles, sku, available));
                }
                // The buyer's bucket is short: the SKU's other buckets may not be.
                let to = st.shards.holding_shard(&line.sku, k, &caller.user);
                let total = st
                    .mover
                    .pull(&line.sku, k, to, line.qty)
                    .await
                    .map_err(|e| unavailable("Redis", e))?;
                pulled += 1;
                if total < line.qty || pulled > held.len() {
                    if total == 0 {
                        st.sold_out.remember(&sku, started);
                    }
                    // The SKU's units over every bucket, unless others keep taking what
                    // is pulled in: then what the buyer's bucket had.
                    let available = if total < line.qty { total } else { available };
                    return Err(sold_out(lines.as_slice(), &bundles, sku, available));
                }
            }
            Reserve::NotStarted { sku, starts_ms } => {
                return Err(ApiError::SaleNotStarted {
                    sku,
                    starts_at: crate::stock::ms_rfc3339(starts_ms).unwrap_or_default(),
                });
            }
            Reserve::Ended { sku, ends_ms } => {
                return Err(ApiError::SaleEnded {
                    sku,
                    ended_at: crate::stock::ms_rfc3339(ends_ms).unwrap_or_default(),
                });
            }
            Reserve::InsufficientPoints { spendable, needed } => {
                return Err(ApiError::InsufficientPoints {
                    balance: spendable,
                    needed,
                });
            }
            Reserve::StockNotLoaded => {
                return Err(ApiError::Unavailable(
                    "stock levels are not loaded; an operator must run floodgate reconcile".into(),
                ));
            }
        }
    }
}

/// 422 unless an order may wait on a waitlist: see [`OrderRequest::waitlist`].
fn may_wait(
    held: &[floodgate_common::bundle::HeldLine],
    counts: &BTreeMap<String, usize>,
    parts: &[fredis::Part],
) -> Result<(), ApiError> {
    let why = match held {
        [l] if l.bundle => Some("a bundle cannot wait"),
        [_] if !counts.is_empty() => Some("a SKU with buckets cannot wait"),
        [_] if parts.len() > 1 => Some(
            "with several Redis shards, an order that may wait cannot carry an Idempotency-Key",
        ),
        [_] => None,
        _ => Some("an order that may wait has exactly one line, and no bundle"),
    };
    match why {
        Some(why) => Err(ApiError::InvalidOrder(format!("waitlist: {why}"))),
        None => Ok(()),
    }
}

/// 409 `sold_out` for the SKU `sku` the reserve found short: the order's line of it, or,
/// when only a bundle line of the order holds it, that bundle, with the bundles this
/// component's `available` units would make.
fn sold_out(lines: &[OrderLine], bundles: &Bundles, sku: String, available: i64) -> ApiError {
    let direct = lines.iter().any(|l| l.sku.as_str() == sku);
    let holders: Vec<(&Sku, i64)> = bundles
        .iter()
        .filter_map(|(b, d)| {
            d.components()
                .iter()
                .find(|(c, _)| c.as_str() == sku)
                .map(|(_, q)| (b, *q))
        })
        .collect();
    match holders.as_slice() {
        [(bundle, per)] if !direct => ApiError::SoldOut {
            sku: bundle.to_string(),
            available: available.max(0) / per,
        },
        _ => ApiError::SoldOut { sku, available },
    }
}

/// Publishes the reserved order and marks it queued ([`crate::handover`]). `trace` (the
/// request's) travels in the message's `traceparent` header.
#[allow(clippy::too_many_arguments)]
async fn publish(
    st: &AppState,
    caller: &Caller,
    lines: &OrderLines,
    buckets: BTreeMap<String, usize>,
    bundles: Bundles,
    parts: &[fredis::Part],
    key: Option<&IdempotencyKey>,
    order_id: OrderId,
    accepted_at: &str,
    deadline_ms: i64,
    points: Option<i64>,
    trace: Option<TraceParent>,
) -> Result<(), ApiError> {
    let msg = IntakeMessage::of(OrderPlaced {
        order_id,
        user_id: caller.user.clone(),
        items: lines.clone(),
        accepted_at: accepted_at.to_owned(),
        deadline_ms,
        idempotency_key: key.cloned(),
        buckets,
        bundles,
        points,
    });
    let shards: Vec<usize> = parts.iter().map(|p| p.shard).collect();
    crate::handover::hand_over(
        st,
        &caller.user,
        key,
        order_id,
        &shards,
        msg,
        deadline_ms,
        trace,
    )
    .await
}

/// The first order of a repeated Idempotency-Key, with its current status.
async fn repeat(st: &AppState, caller: &Caller, order_id: OrderId) -> Result<OrderView, ApiError> {
    let mut view = view(st, caller, order_id)
        .await?
        .ok_or(ApiError::OrderNotFound)?;
    view.user_id = None;
    Ok(view)
}

/// An order as its owner or an admin may see it; None for anyone else.
pub async fn view(
    st: &AppState,
    caller: &Caller,
    order_id: OrderId,
) -> Result<Option<OrderView>, ApiError> {
    let began = std::time::Instant::now();
    let visible = |owner: &str| caller.is_admin() || owner == caller.user.as_str();
    if let Some(o) = repo::order(&st.reads, began, &order_id).await? {
        if !visible(&o.user_id) {
            return Ok(None);
        }
        let status = OrderStatus::parse(&o.status).unwrap_or(OrderStatus::Failed);
        return Ok(Some(OrderView {
            order_id,
            user_id: Some(o.user_id),
            status,
            items: o.lines,
            accepted_at: repo::rfc3339(o.accepted_at),
            confirmed_at: o.confirmed_at.map(repo::rfc3339),
            reason: o.reason,
            position: None,
            payment: o.payment,
            total_cents: o.total_cents,
        }));
    }
    let resv = fredis::find_reservation(&st.redis, &st.shards, &order_id)
        .await
        .map_err(|e| unavailable("Redis", e))?;
    let Some(r) = resv.filter(|r| visible(r.user.as_str())) else {
        return Ok(None);
    };
    // A waitlisted order leaves Redis only for PostgreSQL's record: until the worker
    // writes it, its released record says how it ended.
    let Some((status, reason)) = r.status() else {
        return Ok(None);
    };
    let position = match (status, r.lines.first()) {
        (OrderStatus::Waitlisted, Some(l)) => fredis::waitlist_position(
            &mut st.redis.clone(),
            st.shards.for_sku(&l.sku),
            l.sku.as_str(),
            &order_id,
        )
        .await
        .map_err(|e| unavailable("Redis", e))?,
        _ => None,
    };
    Ok(Some(OrderView {
        order_id,
        user_id: Some(r.user.to_string()),
        status,
        items: r.lines,
        accepted_at: r.accepted_at,
        confirmed_at: None,
        reason,
        position,
        payment: r.paid.map(|_| "points".to_owned()),
        total_cents: r.paid,
    }))
}

/// Cancels a waitlisted order (`unwait.lua`): off its waitlist, its holding back, the
/// next in line promoted if it fits now; the worker records it `cancelled` in
/// PostgreSQL. Promoted meanwhile: it is an accepted order, cancelled as one.
async fn cancel_waiting(
    st: &AppState,
    caller: &Caller,
    v: OrderView,
) -> Result<Option<OrderView>, ApiError> {
    let (Some(line), Some(user)) = (v.items.first(), v.user_id.as_deref()) else {
        return Ok(Some(v));
    };
    let user = floodgate_common::domain::UserId::parse(user)
        .map_err(|e| anyhow::anyhow!("a reservation's user id breaks the rules: {e}"))?;
    let now = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    // A manager's or admin's cancel is audited, as for a confirmed order: the record
    // keeps who it was, and the reaper writes the audit row in the transaction that
    // records the order in PostgreSQL (so neither exists without the other).
    let actor = floodgate_common::audit::Actor::of(caller);
    let by = (actor.role != "customer").then(|| {
        serde_json::json!({
            "name": actor.name,
            "role": actor.role,
            "request_id": actor.request_id,
        })
        .to_string()
    });
    let outcome = fredis::unwait(
        &mut st.redis.clone(),
        st.shards.for_sku(&line.sku),
        &v.order_id,
        &user,
        "cancelled",
        now,
        by.as_deref(),
    )
    .await
    .map_err(|e| unavailable("Redis", e))?;
    if outcome == fredis::Unwait::Released {
        metrics::counter!(names::WAITLIST_LEFT, "reason" => "cancelled").increment(1);
    }
    let v = view(st, caller, v.order_id).await?;
    match v {
        Some(v) if v.status == OrderStatus::Accepted => Err(ApiError::NotCancellable(
            "the order was just promoted from the waitlist and is not committed yet; retry in a moment"
                .into(),
        )),
        // It expired just before the cancel.
        Some(v) if v.status == OrderStatus::Failed => Err(ApiError::NotCancellable(
            "a failed order has nothing to cancel".into(),
        )),
        v => Ok(v),
    }
}

/// How long a cancel waits for a just-accepted order to be committed.
const CANCEL_WAIT: Duration = Duration::from_secs(3);

/// Cancels a confirmed order: PostgreSQL first (status, inventory, ledger), then its units
/// return to Redis once per line. Idempotent. None if the caller may not see the order.
/// `trace` (the request's) goes with the `order.cancelled` event.
pub async fn cancel(
    st: &AppState,
    caller: &Caller,
    order_id: OrderId,
    trace: Option<TraceParent>,
) -> Result<Option<OrderView>, ApiError> {
    let may = |owner: &str| caller.is_admin() || owner == caller.user.as_str();
    let until = Instant::now() + CANCEL_WAIT;
    let (user_id, lines, buckets, bundle_lines, refund) = loop {
        let actor = floodgate_common::audit::Actor::of(caller);
        match repo::cancel(&st.pg, &order_id, may, trace.as_ref(), &actor).await? {
            repo::Cancel::Cancelled {
                user_id,
                lines,
                buckets,
                bundle_lines,
                refund,
            } => break (user_id, lines, buckets, bundle_lines, refund),
            repo::Cancel::Failed { .. } => {
                return Err(ApiError::NotCancellable(
                    "a failed order has nothing to cancel".into(),
                ));
            }
            repo::Cancel::Absent => {
                // Accepted but not committed yet: the worker takes milliseconds.
                let Some(v) = view(st, caller, order_id).await? else {
                    return Ok(None);
                };
                match v.status {
                    OrderStatus::Waitlisted => return cancel_waiting(st, caller, v).await,
                    // Taken off its waitlist before; PostgreSQL's record follows.
                    OrderStatus::Cancelled => return Ok(Some(v)),
                    OrderStatus::Failed => {
                        return Err(ApiError::NotCancellable(
                            "a failed order has nothing to cancel".into(),
                        ));
                    }
                    _ => {}
                }
                if Instant::now() > until {
                    return Err(ApiError::NotCancellable(format!(
                        "the order is {} and not committed yet; retry in a moment",
                        v.status.as_str()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let user = floodgate_common::domain::UserId::parse(user_id)
        .map_err(|e| anyhow::anyhow!("an order's user id breaks the rules: {e}"))?;
    let mut redis = st.redis.clone();
    for ((sku, qty), k) in lines.iter().zip(buckets) {
        let Ok(sku) = Sku::parse(sku.as_str()) else {
            continue;
        };
        let token = fredis::cancel_token(&order_id, &sku);
        // To the buyer's bucket, where the buyer's holding (the per-user limit) is.
        fredis::apply_stock(
            &mut redis,
            st.shards.get(st.shards.holding_shard(&sku, k, &user)),
            &fredis::StockChange {
                sku: &sku,
                units: *qty,
                token: &token,
                per_user_limit: None,
                user: Some((&user, -qty)),
                window: None,
                after: None,
            },
        )
        .await
        .map_err(|e| unavailable("Redis", e))?;
    }
    // A bundle's own holding (its per-user limit), in its shard, once per token. Not in
    // the ledger (a bundle has no stock): a repeat of this cancel heals a crash before
    // it, so do the workers' settle pass (for a day) and a load (which recomputes it).
    for (bundle, qty) in &bundle_lines {
        let Ok(bundle) = Sku::parse(bundle.as_str()) else {
            continue;
        };
        fredis::give_back_holding(
            &mut redis,
            st.shards.for_sku(&bundle),
            &user,
            &bundle,
            *qty,
            &fredis::cancel_token(&order_id, &bundle),
        )
        .await
        .map_err(|e| unavailable("Redis", e))?;
    }
    // Its refunded points may be spent again, once (a repeat heals a crash before this).
    if let Some((entry, points)) = refund {
        let token = fredis::points_token(entry);
        fredis::credit_points(&mut redis, st.shards.first(), &token, user.as_str(), points)
            .await
            .map_err(|e| unavailable("Redis", e))?;
    }
    view(st, caller, order_id).await
}
