//! Webhook subscriptions (API.md "Webhooks"): create, read, delete, the delivery log
//! and replays. Only PostgreSQL is written here; the worker's relay owes each committed
//! event to the subscribers of its type and the worker delivers it
//! (`floodgate_worker::webhooks`).

use crate::{
    catalog::Fields,
    error::{ApiError, pg},
    repo::rfc3339,
    state::AppState,
};
use anyhow::Context;
use floodgate_common::{
    audit::{self, Actor},
    webhook::{self, EVENT_TYPES},
};
use serde::Serialize;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

/// Live webhooks a namespace may have at most: each has a sender in every worker.
pub const MAX_WEBHOOKS: i64 = 100;

/// A webhook as the API shows it. The secret only in the answer that created it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookView {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub created_at: String,
    /// `whsec_<base64>`: shown once, when the webhook is created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub circuit: Circuit,
    pub deliveries: DeliveryCounts,
}

/// The endpoint's circuit breaker, shared by every worker.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Circuit {
    /// `closed` (deliveries flow), `open` (they wait for the cool-down), `half_open`
    /// (one probe is out).
    pub state: String,
    /// Consecutive failed attempts.
    pub failures: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opened_at: Option<String>,
}

/// How many events the endpoint is owed (`pending`), got, or will not get unless
/// replayed (`dead`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryCounts {
    pub pending: i64,
    pub delivered: i64,
    pub dead: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookList {
    pub webhooks: Vec<WebhookView>,
}

/// One attempt of the delivery log.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Attempt {
    pub event_id: String,
    /// The event's type.
    #[serde(rename = "type")]
    pub kind: String,
    /// 1 for the first attempt (counted again from 1 after a replay).
    pub attempt: i32,
    /// `delivered`, `retry` (`next_attempt_at` says when) or `dead`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AttemptPage {
    pub deliveries: Vec<Attempt>,
    /// null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Replayed {
    /// Events armed for delivery again.
    pub replayed: u64,
}

/// Locks a live webhook's row for this transaction (as the worker's senders do before
/// touching its deliveries, so a replay or a delete and a sender's record never
/// deadlock, and a delete and a replay serialize). False: there is none.
async fn lock_live(tx: &deadpool_postgres::Transaction<'_>, id: Uuid) -> Result<bool, ApiError> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM webhooks WHERE id = $1 AND deleted_at IS NULL FOR NO KEY UPDATE",
            &[&id],
        )
        .await
        .map_err(pg)?
        .is_some())
}

/// An id from a path: anything that is not a webhook's id is 404.
fn webhook_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::WebhookNotFound)
}

/// `POST /v1/webhooks`.
pub async fn create(
    st: &AppState,
    actor: &Actor,
    body: &Map<String, Value>,
) -> Result<WebhookView, ApiError> {
    let f = Fields(body);
    let url = webhook::check_url(f.str("url")?.trim(), st.cfg.webhooks.allow_private)
        .await
        .map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    let events = events(body.get("events"))?;
    let description = match body.get("description") {
        None | Some(Value::Null) => None,
        Some(_) => Some(f.text("description")?),
    };
    let id = Uuid::now_v7();
    let secret = webhook::new_secret();
    let mut db = st.pg.get().await.context("PostgreSQL connection")?;
    let tx = db.transaction().await.map_err(pg)?;
    // One at a time: the cap counts what exists.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('floodgate.webhooks'), hashtext(current_schema()))",
        &[],
    )
    .await
    .map_err(pg)?;
    let live: i64 = tx
        .query_one(
            "SELECT count(*) FROM webhooks WHERE deleted_at IS NULL",
            &[],
        )
        .await
        .map_err(pg)?
        .get(0);
    if live >= MAX_WEBHOOKS {
        return Err(ApiError::InvalidRequest(format!(
            "url: at most {MAX_WEBHOOKS} webhooks; delete one first"
        )));
    }
    tx.execute(
        "INSERT INTO webhooks (id, url, events, description, secret) VALUES ($1, $2, $3, $4, $5)",
        &[&id, &url.as_str(), &events, &description, &secret],
    )
    .await
    .map_err(pg)?;
    let mut view = view(&tx, id).await?.ok_or(ApiError::WebhookNotFound)?;
    audit::append(
        &tx,
        actor,
        audit::Entry {
            action: "webhook.create",
            target: format!("webhook:{id}"),
            before: None,
            after: Some(serde_json::to_value(&view).context("webhook view")?),
        },
    )
    .await?;
    tx.commit().await.map_err(pg)?;
    view.secret = Some(secret);
    Ok(view)
}

/// `events`: 1-4 distinct types of [`EVENT_TYPES`].
fn events(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::InvalidRequest(format!(
            "events: a non-empty list of distinct event types, each one of {}",
            EVENT_TYPES.join(", ")
        ))
    };
    let Some(Value::Array(list)) = v else {
        return Err(bad());
    };
    let mut out: Vec<String> = Vec::new();
    for e in list {
        match e.as_str() {
            Some(t) if EVENT_TYPES.contains(&t) && !out.iter().any(|o| o == t) => {
                out.push(t.to_owned())
            }
            _ => return Err(bad()),
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// A webhook's view (without its secret); None if there is none or it was deleted.
async fn view<C: deadpool_postgres::GenericClient>(
    db: &C,
    id: Uuid,
) -> Result<Option<WebhookView>, ApiError> {
    let mut views = views(db, Some(id)).await?;
    Ok(views.pop())
}

async fn views<C: deadpool_postgres::GenericClient>(
    db: &C,
    id: Option<Uuid>,
) -> Result<Vec<WebhookView>, ApiError> {
    let rows = db
        .query(
            "SELECT w.id, w.url, w.events, w.description, w.created_at, w.circuit, w.failures,
                    w.opened_at,
                    count(*) FILTER (WHERE d.state = 'pending'),
                    count(*) FILTER (WHERE d.state = 'delivered'),
                    count(*) FILTER (WHERE d.state = 'dead')
               FROM webhooks w LEFT JOIN webhook_deliveries d ON d.webhook_id = w.id
              WHERE w.deleted_at IS NULL AND ($1::uuid IS NULL OR w.id = $1)
              GROUP BY w.id ORDER BY w.created_at, w.id",
            &[&id],
        )
        .await
        .map_err(pg)?;
    Ok(rows
        .iter()
        .map(|r| WebhookView {
            id: r.get::<_, Uuid>(0).to_string(),
            url: r.get(1),
            events: r.get(2),
            description: r.get(3),
            created_at: rfc3339(r.get(4)),
            secret: None,
            circuit: Circuit {
                state: r.get(5),
                failures: r.get(6),
                opened_at: r.get::<_, Option<OffsetDateTime>>(7).map(rfc3339),
            },
            deliveries: DeliveryCounts {
                pending: r.get(8),
                delivered: r.get(9),
                dead: r.get(10),
            },
        })
        .collect())
}

/// `GET /v1/webhooks`.
pub async fn list(st: &AppState) -> Result<WebhookList, ApiError> {
    let db = st.pg.get().await.context("PostgreSQL connection")?;
    Ok(WebhookList {
        webhooks: views(&db, None).await?,
    })
}

/// `GET /v1/webhooks/{id}`.
pub async fn get(st: &AppState, id: &str) -> Result<WebhookView, ApiError> {
    let id = webhook_id(id)?;
    let db = st.pg.get().await.context("PostgreSQL connection")?;
    view(&db, id).await?.ok_or(ApiError::WebhookNotFound)
}

/// `DELETE /v1/webhooks/{id}`: nothing more is delivered to it; its log stays.
pub async fn delete(st: &AppState, actor: &Actor, id: &str) -> Result<(), ApiError> {
    let id = webhook_id(id)?;
    let mut db = st.pg.get().await.context("PostgreSQL connection")?;
    let tx = db.transaction().await.map_err(pg)?;
    if !lock_live(&tx, id).await? {
        return Err(ApiError::WebhookNotFound);
    }
    let before = view(&tx, id).await?.ok_or(ApiError::WebhookNotFound)?;
    tx.execute(
        "UPDATE webhooks SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL",
        &[&id],
    )
    .await
    .map_err(pg)?;
    audit::append(
        &tx,
        actor,
        audit::Entry {
            action: "webhook.delete",
            target: format!("webhook:{id}"),
            before: Some(serde_json::to_value(&before).context("webhook view")?),
            after: None,
        },
    )
    .await?;
    tx.commit().await.map_err(pg)?;
    Ok(())
}

/// `GET /v1/webhooks/{id}/deliveries`: the attempts, newest first.
pub async fn deliveries(
    st: &AppState,
    id: &str,
    limit: Option<&str>,
    cursor: Option<&str>,
) -> Result<AttemptPage, ApiError> {
    let id = webhook_id(id)?;
    let limit = crate::catalog::page_limit(limit)?;
    let before = crate::catalog::id_cursor(cursor)?;
    let db = st.pg.get().await.context("PostgreSQL connection")?;
    if view(&db, id).await?.is_none() {
        return Err(ApiError::WebhookNotFound);
    }
    let rows = db
        .query(
            "SELECT a.id, a.event_id, COALESCE(e.type, ''), a.attempt, a.status_code, a.error,
                    a.at, a.next_attempt_at,
                    CASE WHEN a.status_code BETWEEN 200 AND 299 THEN 'delivered'
                         WHEN a.next_attempt_at IS NOT NULL THEN 'retry'
                         ELSE 'dead' END
               FROM webhook_attempts a LEFT JOIN webhook_events e USING (event_id)
              WHERE a.webhook_id = $1 AND ($2::bigint IS NULL OR a.id < $2)
              ORDER BY a.id DESC LIMIT $3",
            &[&id, &before, &(limit + 1)],
        )
        .await
        .map_err(pg)?;
    let (rows, next_cursor) = crate::catalog::page(rows, limit, |r| r.get::<_, i64>(0).to_string());
    let deliveries: Vec<Attempt> = rows
        .iter()
        .map(|r| Attempt {
            event_id: r.get::<_, Uuid>(1).to_string(),
            kind: r.get(2),
            attempt: r.get(3),
            status_code: r.get(4),
            error: r.get(5),
            at: rfc3339(r.get(6)),
            next_attempt_at: r.get::<_, Option<OffsetDateTime>>(7).map(rfc3339),
            outcome: r.get(8),
        })
        .collect();
    Ok(AttemptPage {
        deliveries,
        next_cursor,
    })
}

/// `POST /v1/webhooks/{id}/replay` `{"since"}`: every stored event of the webhook's
/// types committed at or after `since` is owed again, delivered or dead alike, with a
/// fresh retry schedule. Events from before the webhook's own creation count too, if
/// another webhook kept them.
pub async fn replay(
    st: &AppState,
    actor: &Actor,
    id: &str,
    body: &Map<String, Value>,
) -> Result<Replayed, ApiError> {
    let id = webhook_id(id)?;
    let since = Fields(body)
        .opt_time("since")?
        .ok_or_else(|| ApiError::InvalidRequest("since: required".into()))?;
    let mut db = st.pg.get().await.context("PostgreSQL connection")?;
    let tx = db.transaction().await.map_err(pg)?;
    if !lock_live(&tx, id).await? {
        return Err(ApiError::WebhookNotFound);
    }
    // A worker's retention batch is not deleting the events this re-arms.
    tx.execute(webhook::PRUNE_LOCK_SHARED, &[])
        .await
        .map_err(pg)?;
    let replayed = tx
        .execute(
            "INSERT INTO webhook_deliveries (webhook_id, event_id)
             SELECT w.id, e.event_id FROM webhooks w
               JOIN webhook_events e ON e.type = ANY(w.events)
              WHERE w.id = $1 AND e.at >= $2
             ON CONFLICT (webhook_id, event_id) DO UPDATE
                SET state = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now(),
                    lease = NULL",
            &[&id, &since],
        )
        .await
        .map_err(pg)?;
    audit::append(
        &tx,
        actor,
        audit::Entry {
            action: "webhook.replay",
            target: format!("webhook:{id}"),
            before: None,
            after: Some(json!({"since": rfc3339(since), "replayed": replayed})),
        },
    )
    .await?;
    tx.commit().await.map_err(pg)?;
    Ok(Replayed { replayed })
}
