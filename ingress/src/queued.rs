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

use floodgate_common::redis::Redis;
use floodgate_common::{
    redis::{self as fredis, ConfirmedOrder, Keys, Queued},
    supervise::Supervisor,
};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Marks per script call at most: bounds one script's run time in Redis.
const MAX_BATCH: usize = 256;

/// Requests waiting for the marking task; past this, callers wait to hand theirs over.
const QUEUE: usize = 4_096;

type Reply = oneshot::Sender<Result<Queued, Arc<redis::RedisError>>>;

/// Cheap to clone; the marking task ends when the last clone is dropped.
#[derive(Clone)]
pub struct QueuedMarker {
    tx: mpsc::Sender<(ConfirmedOrder, Reply)>,
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
    /// clone of it).
    pub fn spawn(redis: Redis, keys: Arc<Keys>, tasks: &Supervisor) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        // It ends when every sender is gone (the process is stopping); before that, a
        // panic makes ingress unready.
        tasks.spawn_once("queued_marker", run(rx, redis, keys));
        Self { tx }
    }

    /// Marks one confirmed order queued, together with whatever other marks are waiting.
    pub async fn mark(&self, order: ConfirmedOrder) -> Result<Queued, MarkError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((order, reply))
            .await
            .map_err(|_| MarkError::Stopped)?;
        answer
            .await
            .map_err(|_| MarkError::Stopped)?
            .map_err(MarkError::Redis)
    }
}

async fn run(mut rx: mpsc::Receiver<(ConfirmedOrder, Reply)>, mut redis: Redis, keys: Arc<Keys>) {
    let mut waiting = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut waiting, MAX_BATCH).await > 0 {
        let orders: Vec<&ConfirmedOrder> = waiting.iter().map(|(o, _)| o).collect();
        metrics::histogram!(floodgate_common::telemetry::names::QUEUED_MARK_BATCH)
            .record(orders.len() as f64);
        match fredis::mark_queued(&mut redis, &keys, &orders).await {
            Ok(marks) => {
                for ((_, reply), mark) in waiting.drain(..).zip(marks) {
                    let _ = reply.send(Ok(mark));
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for (_, reply) in waiting.drain(..) {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}
