//! Handing a reserved order to the broker: publish it, then mark its reservation queued
//! (or release it), and only then answer.
//!
//! It runs inside the order request's own task ([`crate::orders::place`]), not in the
//! request's future: a client that hangs up mid-request (its timeout is shorter than a
//! slow confirm) must not leave a confirmed order unmarked, nor a failed publish
//! unreleased.
//!
//! The mark is what keeps an accepted order from ever expiring, so it is retried until
//! the reservation's deadline is near. If Redis does not answer within
//! [`ANSWER_WITHIN`], the request is answered 202 anyway (the order is durably queued)
//! and a background task keeps trying.

use crate::{error::ApiError, queued::MarkError, state::AppState};
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use floodgate_common::{
    amqp::IntakeMessage,
    domain::{IdempotencyKey, OrderId, UserId},
    redis::{self as fredis, ConfirmedOrder, Queued, Release, ResvState},
    telemetry::names,
    trace::TraceParent,
};
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// How long a request waits for a failing mark before it is answered 202 anyway.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// How long before the reservation's deadline the task stops trying to mark it: the
/// reaper may take it from then on (and clocks of two machines differ a little).
pub const MARK_MARGIN: Duration = Duration::from_secs(1);

/// Publishes `msg` (the order `order_id` of `user`, reserved in `shards` (its parts, the
/// deciding one first) until `deadline_ms`, with its request's `trace`) and marks it
/// queued. Ok means answer 202.
#[allow(clippy::too_many_arguments)]
pub async fn hand_over(
    st: &AppState,
    user: &UserId,
    key: Option<&IdempotencyKey>,
    order_id: OrderId,
    shards: &[usize],
    msg: IntakeMessage,
    deadline_ms: i64,
    trace: Option<TraceParent>,
) -> Result<(), ApiError> {
    let order = ConfirmedOrder {
        order_id,
        user: user.clone(),
        idempotency_key: key.cloned(),
    };
    let parts = Parts {
        order,
        shards: shards.to_vec(),
    };
    let started = Instant::now();
    let published = st
        .publisher
        .publish(&msg, &order_id.to_string(), trace.as_ref())
        .await;
    metrics::histogram!(names::PUBLISH_DURATION).record(started.elapsed().as_secs_f64());
    if let Err(e) = published {
        metrics::counter!(names::PUBLISH_FAILURES, "reason" => e.as_str()).increment(1);
        tracing::warn!(error = %e, %order_id, "publish failed; releasing the reservation");
        let released =
            fredis::release_unpublished(&st.redis, &st.shards, shards, &order_id, user, key).await;
        match released {
            // A worker already took it: the message got through, its confirm was lost.
            // The order is accepted after all.
            Ok(Release::Taken) => {
                tracing::info!(%order_id, "a worker took the order whose confirm was lost");
            }
            Ok(Release::NotHeld) if worker_recorded_it(st, shards[0], &order_id).await => {
                // A worker took it and already recorded it failed (its stock back):
                // accepted, and its status says the rest.
                tracing::info!(%order_id, "a worker settled the order whose confirm was lost");
                return Ok(());
            }
            Ok(_) => return Err(crate::orders::unavailable("the message broker", e)),
            Err(re) => {
                // The reservation expires unconfirmed and the reaper returns it.
                tracing::error!(error = %re, %order_id, "release after a failed publish failed");
                return Err(crate::orders::unavailable("the message broker", e));
            }
        }
    }
    mark(st, parts, deadline_ms).await
}

/// A confirmed order and the shards of its parts: each part is marked queued.
#[derive(Clone)]
struct Parts {
    order: ConfirmedOrder,
    shards: Vec<usize>,
}

/// True when a worker released the reservation after recording the order failed in
/// PostgreSQL (release reason `failed`); not for this publish's failure, the reaper, or
/// an undecodable message (never recorded).
async fn worker_recorded_it(st: &AppState, first_shard: usize, order_id: &OrderId) -> bool {
    let mut redis = st.redis.clone();
    let r = fredis::reservation(&mut redis, st.shards.get(first_shard), order_id).await;
    matches!(r, Ok(Some(r)) if r.state == ResvState::Released
        && r.reason.as_deref() == Some("failed"))
}

/// How a run of mark attempts ended.
enum Marked {
    /// The outcome is known: answer it.
    Answer(Result<(), ApiError>),
    /// Still failing when the buyer's answer was due.
    StillFailing(MarkError),
}

/// Marks the order queued, retrying (jittered, up to 1 s apart) until the deadline nears.
/// Answers as soon as the outcome is known; after [`ANSWER_WITHIN`] of failures answers
/// 202 and leaves the rest of the retries to a background task.
async fn mark(st: &AppState, order: Parts, deadline_ms: i64) -> Result<(), ApiError> {
    let now_ms = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let left = Duration::from_millis((deadline_ms - now_ms).max(0) as u64);
    let give_up = Instant::now() + left.saturating_sub(MARK_MARGIN);
    let mut waits = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(20))
        .with_max_delay(Duration::from_secs(1))
        .without_max_times()
        .with_jitter()
        .build();
    let answer_by = Instant::now() + ANSWER_WITHIN;
    match mark_until(st, &order, give_up, Some(answer_by), &mut waits).await {
        Marked::Answer(a) => a,
        Marked::StillFailing(e) => {
            // Durably queued: accepted. Keep marking in the background.
            metrics::counter!(names::QUEUED_MARK_FAILURES, "outcome" => "late").increment(1);
            tracing::warn!(error = format!("{e:#}"), order_id = %order.order.order_id, "answering 202 while the mark is still failing");
            let st2 = st.clone();
            st.tasks.spawn(tracing::Instrument::in_current_span(async move {
                let wait = waits.next().unwrap_or(Duration::from_secs(1));
                tokio::time::sleep(wait.min(give_up.saturating_duration_since(Instant::now())))
                    .await;
                if let Marked::Answer(Ok(())) =
                    mark_until(&st2, &order, give_up, None, &mut waits).await
                {
                    tracing::info!(order_id = %order.order.order_id, "a confirmed order is marked queued at last");
                }
            }));
            Ok(())
        }
    }
}

/// Mark attempts until the outcome is known, `give_up` passes, or (when given)
/// `answer_by` passes while they still fail.
async fn mark_until(
    st: &AppState,
    order: &Parts,
    give_up: Instant,
    answer_by: Option<Instant>,
    waits: &mut ExponentialBackoff,
) -> Marked {
    let order_id = order.order.order_id;
    loop {
        let e = match mark_once(st, order).await {
            Ok(Queued::Accepted) => return Marked::Answer(Ok(())),
            Ok(Queued::Released) => {
                // Only when the confirm outlasted the reservation: the reaper gave the
                // stock back; the worker will record the order failed.
                metrics::counter!(names::QUEUED_MARK_FAILURES, "outcome" => "expired").increment(1);
                tracing::warn!(%order_id, "the reservation expired before the publish was confirmed");
                return Marked::Answer(Err(ApiError::Unavailable(
                    "the reservation expired before the broker confirmed the order; nothing was reserved"
                        .into(),
                )));
            }
            Err(e) => e,
        };
        let now = Instant::now();
        if now >= give_up {
            metrics::counter!(names::QUEUED_MARK_FAILURES, "outcome" => "unmarked").increment(1);
            tracing::error!(
                error = format!("{e:#}"),
                %order_id,
                "could not mark a confirmed order queued before its deadline"
            );
            return Marked::Answer(Ok(()));
        }
        if answer_by.is_some_and(|t| now >= t) {
            return Marked::StillFailing(e);
        }
        let wait = waits.next().unwrap_or(Duration::from_secs(1));
        tokio::time::sleep(wait.min(give_up.saturating_duration_since(now))).await;
    }
}

/// One mark of every part (through the batching marker, at once; straight to Redis if
/// the marker has stopped). Released when any part was: that part's units are back on
/// sale, so the order cannot be accepted (the worker fails it and releases the rest).
async fn mark_once(st: &AppState, order: &Parts) -> Result<Queued, MarkError> {
    let marks = futures::future::join_all(
        order
            .shards
            .iter()
            .map(|&g| st.queued.mark(g, order.order.clone())),
    )
    .await;
    let mut outcome = Queued::Accepted;
    for m in marks {
        match m {
            Ok(Queued::Released) => outcome = Queued::Released,
            Ok(Queued::Accepted) => {}
            Err(MarkError::Stopped) => {
                let parts: Vec<(usize, &ConfirmedOrder)> =
                    order.shards.iter().map(|&g| (g, &order.order)).collect();
                let marks = fredis::mark_parts_queued(&st.redis, &st.shards, &parts)
                    .await
                    .map_err(|e| MarkError::Redis(std::sync::Arc::new(e)))?;
                return Ok(if marks.contains(&Queued::Released) {
                    Queued::Released
                } else {
                    Queued::Accepted
                });
            }
            Err(e) => return Err(e),
        }
    }
    Ok(outcome)
}
