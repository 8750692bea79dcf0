//! Points (API.md "v1 additions", Points): balances, top-ups (a customer's own charge, an
//! admin's grant) and their history, in PostgreSQL. A top-up is idempotent per
//! (user, reference): the entry's unique index decides, so concurrent repeats of one
//! reference add the amount once.
//!
//! An order paid with points holds its total in its Redis decision (`reserve.lua`),
//! spends it in its commit (the worker) and gets it back when it fails or a cancel
//! refunds it (`repo::cancel`). A committed credit reaches Redis's copy of what a user
//! may spend once, under its entry's token ([`fredis::credit_points`]); the workers'
//! settle pass applies one whose Redis half was lost.

use crate::{
    catalog::Fields,
    error::{ApiError, pg},
    state::AppState,
};
use anyhow::Context;
use floodgate_common::redis as fredis;
use floodgate_common::{
    audit::{self, Actor},
    domain::UserId,
};
use serde::Serialize;
use serde_json::{Map, Value, json};

/// The most one top-up may add.
pub const MAX_TOP_UP: i64 = 10_000_000;

/// A user's points.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Points {
    /// Points owned (PostgreSQL's balance: committed orders' spends taken off).
    pub balance: i64,
    /// Of those, held by orders paid with points that are accepted and not committed
    /// yet: `balance - held` may be spent now.
    pub held: i64,
}

/// The balance after a top-up.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Balance {
    pub balance: i64,
}

/// One change of a balance.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Entry {
    pub id: String,
    /// `charge`, `grant`, `spend` or `refund`.
    pub kind: String,
    /// Always positive; `spend` takes it away, the others add it.
    pub amount: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    pub reference: String,
    pub at: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct History {
    pub entries: Vec<Entry>,
    /// null on the last page.
    pub next_cursor: Option<String>,
}

/// `GET /v1/points`: the caller's own.
pub async fn get(st: &AppState, user: &UserId) -> Result<Points, ApiError> {
    let db = st.pg.get().await.context("PostgreSQL connection")?;
    let balance: Option<i64> = db
        .query_opt(
            "SELECT balance FROM point_accounts WHERE user_id = $1",
            &[&user.as_str()],
        )
        .await
        .map_err(pg)?
        .map(|r| r.get(0));
    let (_, held) = fredis::points_of(&mut st.redis.clone(), st.shards.first(), user.as_str())
        .await
        .map_err(|e| crate::orders::unavailable("Redis", e))?;
    Ok(Points {
        balance: balance.unwrap_or(0),
        held,
    })
}

/// `GET /v1/points/history`: the caller's entries, newest first.
pub async fn history(
    st: &AppState,
    user: &UserId,
    limit: Option<&str>,
    cursor: Option<&str>,
) -> Result<History, ApiError> {
    let limit = crate::catalog::page_limit(limit)?;
    let before = crate::catalog::id_cursor(cursor)?;
    let db = st.pg.get().await.context("PostgreSQL connection")?;
    let rows = db
        .query(
            "SELECT id, kind, amount, order_id, reference, at FROM point_entries
              WHERE user_id = $1 AND ($2::bigint IS NULL OR id < $2)
              ORDER BY id DESC LIMIT $3",
            &[&user.as_str(), &before, &(limit + 1)],
        )
        .await
        .map_err(pg)?;
    let entries: Vec<Entry> = rows
        .iter()
        .map(|r| Entry {
            id: r.get::<_, i64>(0).to_string(),
            kind: r.get(1),
            amount: r.get(2),
            order_id: r.get::<_, Option<uuid::Uuid>>(3).map(|u| u.to_string()),
            reference: r.get(4),
            at: crate::repo::rfc3339(r.get(5)),
        })
        .collect();
    let (entries, next_cursor) = crate::catalog::page(entries, limit, |e| e.id.clone());
    Ok(History {
        entries,
        next_cursor,
    })
}

/// A top-up: `charge` (the caller's own, a payment provider confirmed it) or `grant`
/// (an admin's, audited). The same reference again: the balance as it is, nothing added;
/// with another amount or kind: 422.
pub async fn top_up(
    st: &AppState,
    user: &UserId,
    grant: Option<&Actor>,
    body: &Map<String, Value>,
) -> Result<Balance, ApiError> {
    let f = Fields(body);
    let amount = f.int("amount", 1, MAX_TOP_UP)?;
    let reference = f.reference()?;
    let kind = if grant.is_some() { "grant" } else { "charge" };
    let mut db = st.pg.get().await.context("PostgreSQL connection")?;
    let tx = db.transaction().await.map_err(pg)?;
    let added = tx
        .query_opt(
            "WITH e AS (
                INSERT INTO point_entries (user_id, kind, amount, reference, actor)
                VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT DO NOTHING
                RETURNING id, amount
             )
             INSERT INTO point_accounts AS a (user_id, balance)
             SELECT $1, amount FROM e
             ON CONFLICT (user_id) DO UPDATE
                SET balance = a.balance + EXCLUDED.balance, updated_at = now()
             RETURNING balance, (SELECT id FROM e)",
            &[
                &user.as_str(),
                &kind,
                &amount,
                &reference.as_str(),
                &grant.map(|a| a.name.as_str()),
            ],
        )
        .await
        .map_err(pg)?;
    let (balance, entry) = match added {
        Some(row) => {
            let balance: i64 = row.get(0);
            let entry: i64 = row.get(1);
            if let Some(actor) = grant {
                audit::append(
                    &tx,
                    actor,
                    audit::Entry {
                        action: "points.grant",
                        target: format!("user:{user}"),
                        before: Some(json!({"balance": balance - amount})),
                        after: Some(json!({
                            "balance": balance, "amount": amount,
                            "reference": reference.as_str(),
                        })),
                    },
                )
                .await?;
            }
            (balance, entry)
        }
        None => {
            // The reference was used: the same top-up again, or a mistake.
            let first = tx
                .query_one(
                    "SELECT kind, amount, id FROM point_entries
                      WHERE user_id = $1 AND reference = $2 AND kind IN ('charge', 'grant')",
                    &[&user.as_str(), &reference.as_str()],
                )
                .await
                .map_err(pg)?;
            let (was, was_amount, entry): (String, i64, i64) =
                (first.get(0), first.get(1), first.get(2));
            if was != kind || was_amount != amount {
                return Err(ApiError::InvalidRequest(format!(
                    "reference: already used for a {was} of {was_amount} points"
                )));
            }
            let balance = tx
                .query_one(
                    "SELECT balance FROM point_accounts WHERE user_id = $1",
                    &[&user.as_str()],
                )
                .await
                .map_err(pg)?
                .get(0);
            (balance, entry)
        }
    };
    tx.commit().await.map_err(pg)?;
    // What may be spent now, once (a repeat heals a crash between the commit and this).
    // Redis failing here loses nothing: the top-up is committed, and the workers'
    // settle pass applies it (each consistency check, FLOODGATE_CONSISTENCY_CHECK_SECS),
    // as does a repeat of this request or a reload.
    credit(st, user.as_str(), entry, amount).await;
    Ok(Balance { balance })
}

/// Adds a committed credit (the entry `entry` of `amount` points) to what `user` may
/// spend in Redis, once; a failure is logged (the settle pass applies it).
pub async fn credit(st: &AppState, user: &str, entry: i64, amount: i64) {
    let token = fredis::points_token(entry);
    if let Err(e) = fredis::credit_points(
        &mut st.redis.clone(),
        st.shards.first(),
        &token,
        user,
        amount,
    )
    .await
    {
        tracing::warn!(user, entry, error = %e,
            "a committed points credit did not reach Redis; the workers' settle pass applies it");
    }
}

/// The `{user}` of a grant's path.
pub fn user_of(raw: &str) -> Result<UserId, ApiError> {
    UserId::parse(raw).map_err(|e| ApiError::InvalidRequest(format!("user: {e}")))
}

/// `"payment"` of an order: absent or null pays elsewhere (false), `"points"` pays with
/// the buyer's points (true); anything else is not a payment method.
pub fn check_payment(payment: Option<&str>) -> Result<bool, ApiError> {
    match payment {
        None => Ok(false),
        Some("points") => Ok(true),
        Some(_) => Err(ApiError::InvalidOrder(
            "payment: \"points\", or absent".into(),
        )),
    }
}

/// The total of `lines` in points (1 point = 1 cent): price x qty of every line, at the
/// moment of ordering (PostgreSQL's `skus.price_cents`, a bundle's own price). A SKU
/// PostgreSQL does not have: 422 `unknown_sku`, as the reserve would answer.
pub async fn order_total(
    st: &AppState,
    lines: &floodgate_common::domain::OrderLines,
) -> Result<i64, ApiError> {
    let skus: Vec<&str> = lines.as_slice().iter().map(|l| l.sku.as_str()).collect();
    let db = st
        .pg
        .get()
        .await
        .map_err(|e| crate::orders::unavailable("PostgreSQL", e))?;
    // Prepared once per pooled connection: one round trip per order, not two.
    let stmt = db
        .prepare_cached("SELECT sku, price_cents::bigint FROM skus WHERE sku = ANY($1)")
        .await
        .map_err(|e| crate::orders::unavailable("PostgreSQL", e))?;
    let prices: std::collections::HashMap<String, i64> = db
        .query(&stmt, &[&skus])
        .await
        .map_err(|e| crate::orders::unavailable("PostgreSQL", e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut total: i64 = 0;
    for l in lines.as_slice() {
        let Some(price) = prices.get(l.sku.as_str()) else {
            return Err(ApiError::UnknownSku {
                sku: l.sku.to_string(),
            });
        };
        total = price
            .checked_mul(l.qty.get())
            .and_then(|t| total.checked_add(t))
            .ok_or_else(|| ApiError::InvalidOrder("the order's total is too large".into()))?;
    }
    Ok(total)
}
