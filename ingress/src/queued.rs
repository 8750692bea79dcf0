//! Marking confirmed orders queued in Redis, many orders per script call.
//!
//! Once the broker confirmed an order's message, its reservation must wait for a worker
//! however long that takes, so ingress marks it `queued` (`queued.lua`) before it answers
//! 202. The reaper only expires reservations still `reserved`: those whose publish was
//! never confirmed, for which no 202 was ever sent.
//!
//! Every request in flight needs that mark at about the same moment (the broker confirms
//! in batches), so one task collects whatever marks are waiting and runs them in one
//! script call: one Redis round trip and one script run for tens of orders under load,
//! and no waiting at all when it is quiet (the first mark goes out at once).
//!
//! With `FLOODGATE_REDIS_WAIT_REPLICAS` > 0 the marked orders' answers go through a
//! second task first, which waits until that many replicas have the reservations and
//! marks (one `WAIT` for whatever batches are waiting, on a connection of its own, so the
//! order path's shared connection is never blocked by it): a failover after the 202
//! cannot lose them. If the replicas do not answer within the timeout the orders are
//! answered anyway (each is durably queued in RabbitMQ) and counted.

use floodgate_common::{
    redis::{self as fredis, ConfirmedOrder, Queued, Redis, Shards},
    supervise::Supervisor,
    telemetry::names,
};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, oneshot};

/// Marks per script call at most: bounds one script's run time in Redis.
const MAX_BATCH: usize = 256;

/// Requests waiting for the marking task; past this, callers wait to hand theirs over.
const QUEUE: usize = 4_096;

type Reply = oneshot::Sender<Result<Queued, Arc<redis::RedisError>>>;

/// Marked orders whose answers wait for the replicas, and the shards they were marked in.
type Marked = (Vec<(Reply, Queued)>, Vec<usize>);

pub use floodgate_common::redis::ReplicaWait;

/// Cheap to clone; the marking task ends when the last clone is dropped.
#[derive(Clone)]
pub struct QueuedMarker {
    tx: mpsc::Sender<(usize, ConfirmedOrder, Reply)>,
}

/// Why an order could not be marked.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    #[error("Redis refused or failed the mark")]
    Redis(#[source] Arc<redis::RedisError>),
    #[error("the marking task has stopped")]
    Stopped,
}

impl QueuedMarker {
    /// Starts the marking task on `redis` (a multiplexed connection; the task holds one
    /// clone of it), and the replica wait when `wait` is given.
    pub fn spawn(
        redis: Redis,
        shards: Arc<Shards>,
        wait: Option<ReplicaWait>,
        tasks: &Supervisor,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let waiter = wait.map(|w| {
            let (wtx, wrx) = mpsc::channel(QUEUE);
            tasks.spawn_once("replica_wait", wait_then_answer(wrx, w, shards.clone()));
            wtx
        });
        // It ends when every sender is gone (the process is stopping); before that, a
        // panic makes ingress unready.
        tasks.spawn_once("queued_marker", run(rx, redis, shards, waiter));
        Self { tx }
    }

    /// Marks one confirmed order's part in `shard` queued, together with whatever other
    /// marks are waiting.
    pub async fn mark(&self, shard: usize, order: ConfirmedOrder) -> Result<Queued, MarkError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((shard, order, reply))
            .await
            .map_err(|_| MarkError::Stopped)?;
        answer
            .await
            .map_err(|_| MarkError::Stopped)?
            .map_err(MarkError::Redis)
    }
}

async fn run(
    mut rx: mpsc::Receiver<(usize, ConfirmedOrder, Reply)>,
    redis: Redis,
    shards: Arc<Shards>,
    waiter: Option<mpsc::Sender<Marked>>,
) {
    let mut waiting = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut waiting, MAX_BATCH).await > 0 {
        let parts: Vec<(usize, &ConfirmedOrder)> =
            waiting.iter().map(|(g, o, _)| (*g, o)).collect();
        metrics::histogram!(floodgate_common::telemetry::names::QUEUED_MARK_BATCH)
            .record(parts.len() as f64);
        // One script call per shard involved, at once (one call with one shard).
        match fredis::mark_parts_queued(&redis, &shards, &parts).await {
            Ok(marks) => {
                let mut touched: Vec<usize> = waiting.iter().map(|(g, _, _)| *g).collect();
                touched.sort_unstable();
                touched.dedup();
                let marked = waiting.drain(..).map(|(_, _, reply)| reply).zip(marks);
                match &waiter {
                    Some(w) => {
                        if let Err(mpsc::error::SendError((marked, _))) =
                            w.send((marked.collect(), touched)).await
                        {
                            // The wait has stopped (the process is stopping): answer now.
                            for (reply, mark) in marked {
                                let _ = reply.send(Ok(mark));
                            }
                        }
                    }
                    None => {
                        for (reply, mark) in marked {
                            let _ = reply.send(Ok(mark));
                        }
                    }
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for (_, _, reply) in waiting.drain(..) {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Batches of marked orders waiting per `WAIT` at most.
const MAX_WAIT_BATCHES: usize = 64;

/// How often a replica wait that falls short is logged at most (the counter has each).
const SHORT_LOG_EVERY: Duration = Duration::from_secs(10);

/// One `WAIT` per shard involved (on its master, at once) for whatever marked batches are
/// waiting, then their answers. The fewest replicas any of them reached counts.
async fn wait_then_answer(mut rx: mpsc::Receiver<Marked>, w: ReplicaWait, shards: Arc<Shards>) {
    let mut batches: Vec<Marked> = Vec::with_capacity(MAX_WAIT_BATCHES);
    let mut logged: Option<Instant> = None;
    while rx.recv_many(&mut batches, MAX_WAIT_BATCHES).await > 0 {
        let mut touched: Vec<usize> = batches
            .iter()
            .flat_map(|(_, g)| g.iter().copied())
            .collect();
        touched.sort_unstable();
        touched.dedup();
        if !w.redis.is_cluster() {
            // One server holds every shard: one WAIT covers them all.
            touched.truncate(1);
        }
        let waits = futures::future::join_all(touched.iter().map(|&g| {
            let mut redis = w.redis.clone();
            let keys = shards.get(g).clone();
            async move { redis.wait_replicas(&keys, w.replicas, w.timeout).await }
        }))
        .await;
        let acked = waits
            .into_iter()
            .try_fold(u32::MAX, |least, n| n.map(|n| least.min(n)));
        if !matches!(acked, Ok(n) if n >= w.replicas) {
            let orders: usize = batches.iter().map(|(b, _)| b.len()).sum();
            metrics::counter!(names::REDIS_WAIT_SHORT).increment(orders as u64);
            if logged.is_none_or(|t| t.elapsed() >= SHORT_LOG_EVERY) {
                logged = Some(Instant::now());
                tracing::warn!(
                    acked = ?acked.as_ref().ok(),
                    error = acked.as_ref().err().map(|e| format!("{e:#}")),
                    wanted = w.replicas,
                    orders,
                    "answering 202 before the Redis replicas have the reservations"
                );
            }
        }
        for (reply, mark) in batches.drain(..).flat_map(|(b, _)| b) {
            let _ = reply.send(Ok(mark));
        }
    }
}
