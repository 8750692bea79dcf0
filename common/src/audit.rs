//! The audit log (API.md "Audit log"): who changed what, appended in the transaction of
//! the change itself. The table refuses UPDATE, DELETE and TRUNCATE (migration V6), so
//! this module can only append and read.

use anyhow::Context;
use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Who made a change, and under which request.
#[derive(Debug, Clone)]
pub struct Actor {
    /// The token's `sub`, or `cli:<operator>` for the `floodgate` command.
    pub name: String,
    /// `manager` or `admin` (the table refuses anything else).
    pub role: &'static str,
    /// The HTTP request's `X-Request-Id`, or the command run's own id.
    pub request_id: Option<String>,
}

impl Actor {
    /// The caller of an HTTP request, with the request's id when inside its scope.
    pub fn of(caller: &crate::auth::Caller) -> Self {
        Self {
            name: caller.user.to_string(),
            role: caller.role.as_str(),
            request_id: crate::request::current_id()
                .and_then(|v| v.to_str().ok().map(str::to_owned)),
        }
    }

    /// An operator running the `floodgate` command: `cli:<name>`, with a new id for this
    /// run (each record of one run carries the same id).
    pub fn operator(name: &str) -> Self {
        Self {
            name: format!("cli:{name}"),
            role: "admin",
            request_id: Some(uuid::Uuid::now_v7().to_string()),
        }
    }
}

/// One change to record.
#[derive(Debug)]
pub struct Entry<'a> {
    pub action: &'a str,
    pub target: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

/// Appends `entry` by `actor`, on `db` (the change's own transaction).
pub async fn append<C: GenericClient>(
    db: &C,
    actor: &Actor,
    entry: Entry<'_>,
) -> anyhow::Result<()> {
    db.execute(
        "INSERT INTO audit_log (actor, role, action, target, request_id, before, after)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &actor.name,
            &actor.role,
            &entry.action,
            &entry.target,
            &actor.request_id,
            &entry.before,
            &entry.after,
        ],
    )
    .await
    .context("appending to the audit log")?;
    Ok(())
}

/// A record as `GET /v1/audit` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Record {
    pub id: String,
    #[schema(format = DateTime)]
    pub at: String,
    pub actor: String,
    #[schema(pattern = "^(manager|admin)$")]
    pub role: String,
    #[schema(example = "stock.adjust")]
    pub action: String,
    #[schema(example = "sku:tee-red-m")]
    pub target: String,
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub before: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub after: Option<Value>,
}

/// One page of the log, newest first, strictly older than `before` (an id), filtered by
/// actor and target when given.
pub async fn page<C: GenericClient>(
    db: &C,
    actor: Option<&str>,
    target: Option<&str>,
    limit: i64,
    before: Option<i64>,
) -> anyhow::Result<Vec<Record>> {
    let rows = db
        .query(
            "SELECT id, at, actor, role, action, target, request_id, before, after
               FROM audit_log
              WHERE ($1::text IS NULL OR actor = $1) AND ($2::text IS NULL OR target = $2)
                AND ($3::bigint IS NULL OR id < $3)
              ORDER BY id DESC LIMIT $4",
            &[&actor, &target, &before, &limit],
        )
        .await
        .context("reading the audit log")?;
    Ok(rows
        .iter()
        .map(|r| Record {
            id: r.get::<_, i64>("id").to_string(),
            at: rfc3339(r.get("at")),
            actor: r.get("actor"),
            role: r.get("role"),
            action: r.get("action"),
            target: r.get("target"),
            request_id: r.get("request_id"),
            before: r.get("before"),
            after: r.get("after"),
        })
        .collect())
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .expect("a timestamptz formats as RFC 3339")
}
