//! `/readyz`: one real round trip to each dependency, the same in every service.

use deadpool_postgres::Pool;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};
use std::time::Duration;

/// How long one probe may take before its dependency counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Pings Redis and PostgreSQL (bounded) and combines them with the broker state the caller
/// knows. Returns whether all are up, and the body naming what is down.
pub async fn readiness(redis: &ConnectionManager, pg: &Pool, rabbitmq_up: bool) -> (bool, Value) {
    let mut redis = redis.clone();
    let redis_ok = matches!(
        tokio::time::timeout(
            PROBE_TIMEOUT,
            redis::cmd("PING").query_async::<String>(&mut redis)
        )
        .await,
        Ok(Ok(_))
    );
    let pg_ok = matches!(
        tokio::time::timeout(PROBE_TIMEOUT, async {
            pg.get().await?.query_one("SELECT 1", &[]).await?;
            anyhow::Ok(())
        })
        .await,
        Ok(Ok(()))
    );
    let checks = [
        ("redis", redis_ok),
        ("rabbitmq", rabbitmq_up),
        ("postgres", pg_ok),
    ];
    let down: Vec<&str> = checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(n, _)| *n)
        .collect();
    let ready = down.is_empty();
    let body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "down": down,
        "checks": checks.iter().map(|(n, ok)| (n.to_string(), json!(ok))).collect::<serde_json::Map<_, _>>(),
    });
    (ready, body)
}
