//! The broker's ceiling for floodgate's intake: persistent, mandatory publishes with
//! publisher confirms into a quorum queue, as ingress sends them (4 confirm-mode
//! channels, `PROBE_PUBLISHERS` concurrent publishers each awaiting its own confirm,
//! default 64, like the load test's users), for `PROBE_SECONDS` (default 10). Messages
//! are the size of an intake message. The queue (`bench.publish-probe.<pid>`) is deleted
//! afterwards. Prints `PROBE_RESULT {"published":N,"secs":S,"per_sec":R}`.
//! Run by `ops/bench/compare`.

use futures::future::join_all;
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("FLOODGATE_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let publishers = env_num("PROBE_PUBLISHERS", 64) as usize;
    let secs = env_num("PROBE_SECONDS", 10);
    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let queue = format!("bench.publish-probe.{}", std::process::id());
    let mut channels = Vec::new();
    for i in 0..4 {
        let ch = conn.create_channel().await?;
        if i == 0 {
            let mut args = FieldTable::default();
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
            ch.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await?;
        }
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        channels.push(ch);
    }
    // About the size of an intake message with one line and an Idempotency-Key.
    let payload = Arc::new(vec![b'x'; 330]);
    let published = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let tasks = (0..publishers).map(|i| {
        let ch = channels[i % channels.len()].clone();
        let (payload, published, queue) = (payload.clone(), published.clone(), queue.clone());
        tokio::spawn(async move {
            while Instant::now() < until {
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &payload,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?
                    .await?;
                anyhow::ensure!(confirm.is_ack(), "the broker refused a message");
                published.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), anyhow::Error>(())
        })
    });
    let outcome: anyhow::Result<()> = join_all(tasks)
        .await
        .into_iter()
        .try_for_each(|r| r.map_err(anyhow::Error::from).and_then(|r| r));
    let elapsed = started.elapsed().as_secs_f64();
    let n = published.load(Ordering::Relaxed);
    // The queue goes whether the probe succeeded or not.
    let _ = channels[0]
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    outcome?;
    println!(
        "PROBE_RESULT {}",
        serde_json::json!({"published": n, "secs": elapsed, "per_sec": n as f64 / elapsed})
    );
    Ok(())
}
