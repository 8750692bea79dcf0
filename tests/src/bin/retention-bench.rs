//! What webhook retention (`worker/src/retention.rs`) costs: a first pass over a backlog,
//! and a steady pass over tables much larger than what it deletes.
//!
//!     retention-bench [--young 500000] [--old 100000]
//!
//! Against `FLOODGATE_DATABASE_URL`, in a fresh schema removed afterwards. One webhook,
//! `--young + --old` events, each with a delivery (delivered; one in a hundred dead) and
//! an attempt; `--old` of them two days old. Then, with a retention of one day:
//!
//! 1. the first pass (the old rows deleted), rows per second;
//! 2. a pass with nothing to delete, over the young rows left (what every worker pays
//!    every 10 minutes on a quiet day);
//! 3. 1,000 more rows aged past the retention and a pass over them: a steady pass's
//!    cost, which should not grow with the young rows around it.

use floodgate_common::{Config, Namespace};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn args() -> (i64, i64) {
    let (mut young, mut old) = (500_000, 100_000);
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let v = pair
            .get(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("usage: retention-bench [--young N] [--old N]"));
        match pair[0].as_str() {
            "--young" => young = v,
            "--old" => old = v,
            other => panic!("unknown argument {other}"),
        }
    }
    (young, old)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (young, old) = args();
    let ns = format!("retention_bench_{}", std::process::id());
    let cfg = Config::from_lookup(|k| match k {
        "FLOODGATE_NAMESPACE" => Some(ns.clone()),
        "FLOODGATE_JWT_SECRET" => Some("retention-bench-secret-0123456789abcdef".into()),
        _ => std::env::var(k).ok(),
    })?;
    assert_eq!(cfg.namespace, Namespace::parse(&ns).unwrap());
    floodgate_common::db::ensure_database(&cfg).await?;
    floodgate_common::db::migrate(&cfg).await?;
    let pg = floodgate_common::db::pool(&cfg)?;
    let result = run(&pg, young, old).await;
    floodgate_common::db::drop_schema(&cfg).await?;
    result
}

async fn run(pg: &deadpool_postgres::Pool, young: i64, old: i64) -> anyhow::Result<()> {
    let db = pg.get().await?;
    let t = Instant::now();
    db.batch_execute(&format!(
        "INSERT INTO webhooks (id, url, events, secret)
              VALUES ('00000000-0000-0000-0000-000000000001', 'https://example.com/hook',
                      '{{order.confirmed}}', 'whsec_AAAA');
         INSERT INTO webhook_events (event_id, type, at, data)
              SELECT gen_random_uuid(), 'order.confirmed',
                     now() - CASE WHEN g <= {old} THEN interval '2 days' ELSE interval '1 hour' END,
                     '{{}}'::jsonb
                FROM generate_series(1, {young} + {old}) g;
         INSERT INTO webhook_deliveries (webhook_id, event_id, state, attempts, updated_at)
              SELECT '00000000-0000-0000-0000-000000000001', event_id,
                     CASE WHEN random() < 0.01 THEN 'dead' ELSE 'delivered' END, 1, at
                FROM webhook_events;
         INSERT INTO webhook_attempts (webhook_id, event_id, attempt, status_code, at)
              SELECT webhook_id, event_id, 1, 200, updated_at FROM webhook_deliveries;
         ANALYZE;"
    ))
    .await?;
    println!(
        "seeded {} events, deliveries and attempts ({old} two days old) in {:.1} s",
        young + old,
        t.elapsed().as_secs_f64()
    );
    let day = Duration::from_secs(86_400);
    let stop = CancellationToken::new();
    let mut first = floodgate_worker::retention::Pruned::default();
    let t = Instant::now();
    let mut passes = 0;
    loop {
        let p = floodgate_worker::retention::prune(pg, day, &stop).await?;
        passes += 1;
        if p == Default::default() {
            break;
        }
        first.attempts += p.attempts;
        first.deliveries += p.deliveries;
        first.events += p.events;
    }
    let secs = t.elapsed().as_secs_f64();
    let rows = first.attempts + first.deliveries + first.events;
    println!(
        "backlog: {} attempts, {} deliveries, {} events pruned in {passes} passes, {secs:.2} s ({:.0} rows/s)",
        first.attempts,
        first.deliveries,
        first.events,
        rows as f64 / secs
    );
    let mut idle = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let p = floodgate_worker::retention::prune(pg, day, &stop).await?;
        assert_eq!(p, Default::default());
        idle.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    idle.sort_by(f64::total_cmp);
    println!(
        "a pass with nothing to delete over {young} young rows per table: median {:.2} ms of 5",
        idle[2]
    );
    let mut steady = Vec::new();
    for _ in 0..5 {
        db.batch_execute(
            "WITH pick AS (SELECT event_id FROM webhook_deliveries
                            WHERE state = 'delivered' AND updated_at > now() - interval '1 day'
                            LIMIT 1000)
             UPDATE webhook_deliveries d SET updated_at = now() - interval '2 days'
               FROM pick WHERE d.event_id = pick.event_id;
             UPDATE webhook_attempts a SET at = now() - interval '2 days'
               FROM webhook_deliveries d
              WHERE a.event_id = d.event_id AND d.updated_at < now() - interval '1 day'
                AND a.at > now() - interval '1 day';",
        )
        .await?;
        let t = Instant::now();
        let p = floodgate_worker::retention::prune(pg, day, &stop).await?;
        steady.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(p.deliveries >= 990, "{p:?}");
    }
    steady.sort_by(f64::total_cmp);
    println!(
        "a steady pass (1,000 deliveries, their attempts and events aged past the retention) among the young rows: median {:.1} ms of 5",
        steady[2]
    );
    Ok(())
}
