//! Dependency probes: one real, bounded round trip each. `/readyz` of every service and the
//! worker's outage probing use the same ones.

use crate::redis::{Redis, Shards};
use crate::supervise::{Role, Supervisor, TaskState};
use deadpool_postgres::Pool;
use serde_json::{Value, json};
use std::time::Duration;

/// How long one probe may take before its dependency counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One bounded PING of each node that holds a shard of the namespace, at once (on a
/// cluster, the masters of its slots: another master being down does not stop this
/// deployment; on one server, one PING).
pub async fn redis_ok(redis: &Redis, shards: &Shards) -> bool {
    let probes = if redis.is_cluster() {
        shards.count()
    } else {
        1
    };
    let pings = futures::future::join_all((0..probes).map(|g| {
        let mut redis = redis.clone();
        let keys = shards.get(g).clone();
        async move { redis.ping(&keys).await }
    }));
    matches!(tokio::time::timeout(PROBE_TIMEOUT, pings).await, Ok(r) if r.iter().all(|p| p.is_ok()))
}

/// One bounded `SELECT 1` on a pooled connection.
pub async fn postgres_ok(pg: &Pool) -> bool {
    let select = async {
        pg.get().await?.query_one("SELECT 1", &[]).await?;
        anyhow::Ok(())
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, select).await,
        Ok(Ok(()))
    )
}

/// Probes Redis and PostgreSQL and combines them with the broker state the caller knows
/// and its essential supervised tasks. Returns whether all are up, and the `/readyz` body
/// naming what is down (a task as `task:<name>`), with every task's state under `tasks`.
pub async fn readiness(
    redis: &Redis,
    shards: &Shards,
    pg: &Pool,
    rabbitmq_up: bool,
    tasks: &Supervisor,
) -> (bool, Value) {
    let (redis_ok, pg_ok) = tokio::join!(redis_ok(redis, shards), postgres_ok(pg));
    let mut checks = vec![
        ("redis".to_owned(), redis_ok),
        ("rabbitmq".to_owned(), rabbitmq_up),
        ("postgres".to_owned(), pg_ok),
    ];
    let states = tasks.tasks();
    for (name, state, role) in &states {
        // Restarting after a failure is not yet down; failing again and again is. A
        // task that only feeds metrics shows its state under `tasks`, and that is all.
        if *role == Role::Essential {
            checks.push((format!("task:{name}"), *state != TaskState::Dead));
        }
    }
    let down: Vec<&str> = checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(n, _)| n.as_str())
        .collect();
    let ready = down.is_empty();
    let body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "down": down,
        "checks": checks.iter().map(|(n, ok)| (n.clone(), json!(ok))).collect::<serde_json::Map<_, _>>(),
        "tasks": states.iter().map(|(n, s, _)| (n.to_string(), json!(s.as_str()))).collect::<serde_json::Map<_, _>>(),
    });
    (ready, body)
}

/// The `/readyz` answer: 200 when ready, else 503, with the body naming what is down.
pub fn response(ready: bool, body: Value) -> axum::response::Response {
    use axum::{http::StatusCode, response::IntoResponse};
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}
