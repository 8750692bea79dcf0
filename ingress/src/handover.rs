//! Handing a reserved order to the broker: publish it, then mark its reservation queued
//! (or release it), and only then answer.
//!
//! This runs in a task of its own, not in the request's future: a client that hangs up
//! mid-request (its timeout is shorter than a slow confirm) must not leave a confirmed
//! order unmarked, nor a failed publish unreleased. The request waits for the task's
//! answer; the task finishes its work whether anyone still waits or not.
//!
//! The mark is what keeps an accepted order from ever expiring, so it is retried until
//! the reservation's deadline is near. If Redis does not answer within
//! [`ANSWER_WITHIN`], the request is answered 202 anyway (the order is durably queued)
//! while the task keeps trying.

use crate::{error::ApiError, queued::MarkError, state::AppState};
use backon::{BackoffBuilder, ExponentialBuilder};
use floodgate_common::{
    amqp::IntakeMessage,
    domain::{IdempotencyKey, OrderId, UserId},
    redis::{self as fredis, ConfirmedOrder, Queued, Release, ResvState},
    telemetry::names,
};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio::sync::oneshot;

/// How long a request waits for a failing mark before it is answered 202 anyway.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// How long before the reservation's deadline the task stops trying to mark it: the
/// reaper may take it from then on (and clocks of two machines differ a little).
pub const MARK_MARGIN: Duration = Duration::from_secs(1);

/// Publishes `msg` (the order `order_id` of `user`, reserved until `deadline_ms`) and
/// marks it queued. Ok means answer 202.
pub async fn hand_over(
    st: &AppState,
    user: &UserId,
    key: Option<&IdempotencyKey>,
    order_id: OrderId,
    msg: IntakeMessage,
    deadline_ms: i64,
) -> Result<(), ApiError> {
    let (answer, answered) = oneshot::channel();
    let task = Task {
        st: st.clone(),
        order: ConfirmedOrder {
            order_id,
            user: user.clone(),
            idempotency_key: key.cloned(),
        },
        deadline_ms,
        answer: Some(answer),
    };
    st.tasks.spawn(task.run(msg));
    answered.await.unwrap_or_else(|_| {
        Err(ApiError::Internal(anyhow::anyhow!(
            "the hand-over task of order {order_id} ended without an answer"
        )))
    })
}

struct Task {
    st: AppState,
    order: ConfirmedOrder,
    deadline_ms: i64,
    answer: Option<oneshot::Sender<Result<(), ApiError>>>,
}

impl Task {
    fn answer(&mut self, r: Result<(), ApiError>) {
        if let Some(a) = self.answer.take() {
            let _ = a.send(r);
        }
    }

    async fn run(mut self, msg: IntakeMessage) {
        let order_id = self.order.order_id;
        let started = Instant::now();
        let published = self.st.publisher.publish(&msg, &order_id.to_string()).await;
        metrics::histogram!(names::PUBLISH_DURATION).record(started.elapsed().as_secs_f64());
        if let Err(e) = published {
            metrics::counter!(names::PUBLISH_FAILURES).increment(1);
            tracing::warn!(error = %e, %order_id, "publish failed; releasing the reservation");
            let mut redis = self.st.redis.clone();
            let released = fredis::release(
                &mut redis,
                &self.st.keys,
                &order_id,
                &self.order.user,
                self.order.idempotency_key.as_ref(),
                "publish_failed",
            )
            .await;
            match released {
                // A worker already took it: the message got through, its confirm was
                // lost. The order is accepted after all.
                Ok(Release::Taken) => {
                    tracing::info!(%order_id, "a worker took the order whose confirm was lost");
                }
                Ok(Release::NotHeld) if self.worker_recorded_it().await => {
                    // A worker took it and already recorded it failed (its stock back):
                    // accepted, and its status says the rest.
                    tracing::info!(%order_id, "a worker settled the order whose confirm was lost");
                    self.answer(Ok(()));
                    return;
                }
                Ok(_) => {
                    self.answer(Err(crate::orders::unavailable("the message broker", e)));
                    return;
                }
                Err(re) => {
                    // The reservation expires unconfirmed and the reaper returns it.
                    tracing::error!(error = %re, %order_id, "release after a failed publish failed");
                    self.answer(Err(crate::orders::unavailable("the message broker", e)));
                    return;
                }
            }
        }
        self.mark().await;
    }

    /// True when a worker released the reservation after recording the order failed in
    /// PostgreSQL (release reason `failed`); not for this publish's failure, the reaper,
    /// or an undecodable message (never recorded).
    async fn worker_recorded_it(&self) -> bool {
        let mut redis = self.st.redis.clone();
        let r = fredis::reservation(&mut redis, &self.st.keys, &self.order.order_id).await;
        matches!(r, Ok(Some(r)) if r.state == ResvState::Released
            && r.reason.as_deref() == Some("failed"))
    }

    /// Marks the order queued, retrying (jittered, up to 1 s apart) until the deadline
    /// nears; answers as soon as the outcome is known, or 202 after [`ANSWER_WITHIN`].
    async fn mark(&mut self) {
        let order_id = self.order.order_id;
        let now_ms = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let left = Duration::from_millis((self.deadline_ms - now_ms).max(0) as u64);
        let give_up = Instant::now() + left.saturating_sub(MARK_MARGIN);
        let answer_by = Instant::now() + ANSWER_WITHIN;
        let mut waits = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(20))
            .with_max_delay(Duration::from_secs(1))
            .without_max_times()
            .with_jitter()
            .build();
        loop {
            match mark_once(&self.st, &self.order).await {
                Ok(Queued::Accepted) => {
                    if self.answer.is_none() {
                        tracing::info!(%order_id, "a confirmed order is marked queued at last");
                    }
                    self.answer(Ok(()));
                    return;
                }
                Ok(Queued::Released) => {
                    // Only when the confirm outlasted the reservation: the reaper gave
                    // the stock back; the worker will record the order failed.
                    metrics::counter!(names::QUEUED_MARK_FAILURES, "outcome" => "expired")
                        .increment(1);
                    tracing::warn!(%order_id, "the reservation expired before the publish was confirmed");
                    self.answer(Err(ApiError::Unavailable(
                        "the reservation expired before the broker confirmed the order; nothing was reserved"
                            .into(),
                    )));
                    return;
                }
                Err(e) => {
                    let now = Instant::now();
                    if now >= give_up {
                        metrics::counter!(names::QUEUED_MARK_FAILURES, "outcome" => "unmarked")
                            .increment(1);
                        tracing::error!(
                            error = format!("{e:#}"),
                            %order_id,
                            "could not mark a confirmed order queued before its deadline"
                        );
                        self.answer(Ok(()));
                        return;
                    }
                    if now >= answer_by && self.answer.is_some() {
                        // Durably queued: accepted. Keep marking in the background.
                        metrics::counter!(names::QUEUED_MARK_FAILURES, "outcome" => "late")
                            .increment(1);
                        tracing::warn!(error = format!("{e:#}"), %order_id, "answering 202 while the mark is still failing");
                        self.answer(Ok(()));
                    }
                    let wait = waits.next().unwrap_or(Duration::from_secs(1));
                    tokio::time::sleep(wait.min(give_up.saturating_duration_since(now))).await;
                }
            }
        }
    }
}

/// One mark through the batching marker; straight to Redis if the marker has stopped.
async fn mark_once(st: &AppState, order: &ConfirmedOrder) -> Result<Queued, MarkError> {
    match st.queued.mark(order.clone()).await {
        Err(MarkError::Stopped) => {
            let mut redis = st.redis.clone();
            let marks = fredis::mark_queued(&mut redis, &st.keys, std::slice::from_ref(order))
                .await
                .map_err(|e| MarkError::Redis(std::sync::Arc::new(e)))?;
            Ok(marks.into_iter().next().unwrap_or(Queued::Accepted))
        }
        other => other,
    }
}
