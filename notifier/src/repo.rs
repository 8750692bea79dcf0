//! The one lookup the notifier makes: an order's owner and current status, for an
//! `order:<id>` subscription (ownership check and the status to send at once).

use floodgate_common::redis::Redis;
use floodgate_common::{
    amqp::OrderEvent,
    domain::{OrderId, OrderStatus, UserId},
    reads::Reads,
    redis::{Shards, find_reservation},
};
use std::time::Instant;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// What is known about an order now.
pub struct Current {
    pub owner: UserId,
    /// Its status as an event, when it has one to tell (a reservation released but not
    /// yet recorded has none: its `failed` event is on the way).
    pub event: Option<OrderEvent>,
}

/// PostgreSQL first (committed orders), then the Redis reservation (accepted orders not
/// yet committed). None when neither knows it, or ingress never accepted it.
pub async fn current(
    reads: &Reads,
    redis: &Redis,
    shards: &Shards,
    id: &OrderId,
) -> anyhow::Result<Option<Current>> {
    let (db, _) = reads.connection(Instant::now()).await?;
    let row = db
        .query_opt(
            "SELECT user_id, status, reason, updated_at FROM orders WHERE id = $1",
            &[&id.as_uuid()],
        )
        .await?;
    if let Some(r) = row {
        let owner = UserId::parse(r.get::<_, String>("user_id"))?;
        let status = OrderStatus::parse(r.get("status"))
            .ok_or_else(|| anyhow::anyhow!("unknown order status in PostgreSQL"))?;
        return Ok(Some(Current {
            event: Some(OrderEvent {
                order_id: *id,
                user_id: owner.clone(),
                status,
                reason: r.get("reason"),
                at: r.get("updated_at"),
            }),
            owner,
        }));
    }
    let Some(resv) = find_reservation(redis, shards, id).await? else {
        return Ok(None);
    };
    // A waitlisted order is in Redis only until PostgreSQL records how it ended.
    let event = resv.status().map(|(status, reason)| OrderEvent {
        order_id: *id,
        user_id: resv.user.clone(),
        status,
        reason,
        at: OffsetDateTime::parse(&resv.accepted_at, &Rfc3339)
            .unwrap_or_else(|_| OffsetDateTime::now_utc()),
    });
    // A reservation whose publish failed was answered 503, and the parts of an order
    // another part refused were answered 409: that order never existed.
    if matches!(
        resv.reason.as_deref(),
        Some("publish_failed" | "publish_abandoned" | "refused")
    ) {
        return Ok(None);
    }
    Ok(Some(Current {
        owner: resv.user,
        event,
    }))
}
