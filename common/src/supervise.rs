//! Supervised background tasks: a task that panics or ends before shutdown is restarted
//! with backoff. One that keeps failing is reported dead, so `/readyz` answers 503
//! naming it (a process whose relay, reaper or consumer cannot run is never reported
//! ready), and is still retried at the longest backoff: a passing cause (a schema
//! migrated late) heals without a restart of the process. A task that only feeds
//! metrics or keeps house ([`Role::Auxiliary`]) is supervised the same way, but its
//! death is only shown and counted: taking the process out of its load balancer would
//! not bring it back.

use crate::retry::{Backoff, Waits};
use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Failures in a row (each within [`HEALTHY_RUN`] of its start) before a task is dead.
pub const MAX_QUICK_FAILURES: u32 = 5;
/// A run that lasted this long was healthy: the failure count starts again.
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Where a supervised task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Running,
    /// Failed; waiting to start again (not yet counted as down).
    Restarting,
    /// Failed [`MAX_QUICK_FAILURES`] times in a row; still retried, and dead until a
    /// run lasts [`HEALTHY_RUN`].
    Dead,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Running => "running",
            TaskState::Restarting => "restarting",
            TaskState::Dead => "dead",
        }
    }
}

/// Whether a supervised task's death makes its process unready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The process cannot do its work without it (the relay, the reaper, a consumer):
    /// dead, `/readyz` answers 503 naming it.
    Essential,
    /// It only exports metrics or keeps house (the queue-depth poller, webhook
    /// retention): dead, `/readyz` shows it under `tasks` and
    /// `floodgate_task_failures_total` counts it, but the process stays ready.
    Auxiliary,
}

/// The supervised tasks of one process; cheap to clone.
#[derive(Clone, Default)]
pub struct Supervisor {
    states: Arc<Mutex<BTreeMap<&'static str, (TaskState, Role)>>>,
}

impl Supervisor {
    /// Runs `make()` as the [`Role::Essential`] task `name` on `tracker` until
    /// `shutdown`, restarting it whenever it panics or returns while `shutdown` is not
    /// cancelled.
    pub fn spawn<F, Fut>(
        &self,
        tracker: &TaskTracker,
        name: &'static str,
        shutdown: CancellationToken,
        make: F,
    ) where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.spawn_as(Role::Essential, tracker, name, shutdown, make)
    }

    /// [`Supervisor::spawn`] for a task of `role`.
    pub fn spawn_as<F, Fut>(
        &self,
        role: Role,
        tracker: &TaskTracker,
        name: &'static str,
        shutdown: CancellationToken,
        mut make: F,
    ) where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let states = self.states.clone();
        let set = move |s: TaskState| {
            states
                .lock()
                .expect("supervisor lock")
                .insert(name, (s, role));
        };
        set(TaskState::Running);
        // At 0 from the start, so an alert on `increase()` sees the first failure.
        metrics::counter!(crate::telemetry::names::TASK_FAILURES, "task" => name).increment(0);
        tracker.spawn(async move {
            let mut waits = Waits::new(Backoff::BACKGROUND);
            let mut quick_failures = 0;
            loop {
                let mut run = tokio::spawn(make());
                // A run that lasts HEALTHY_RUN clears the record (and a dead task).
                let outcome = tokio::select! {
                    o = &mut run => o,
                    _ = tokio::time::sleep(HEALTHY_RUN) => {
                        quick_failures = 0;
                        waits.reset();
                        set(TaskState::Running);
                        run.await
                    }
                };
                if shutdown.is_cancelled() {
                    return;
                }
                match outcome {
                    Err(e) if e.is_panic() => tracing::error!(task = name, "task panicked"),
                    _ => tracing::error!(task = name, "task ended unexpectedly"),
                }
                metrics::counter!(crate::telemetry::names::TASK_FAILURES, "task" => name)
                    .increment(1);
                quick_failures += 1;
                let dead = quick_failures >= MAX_QUICK_FAILURES;
                if quick_failures == MAX_QUICK_FAILURES {
                    tracing::error!(
                        task = name,
                        failures = quick_failures,
                        essential = role == Role::Essential,
                        "task keeps failing: /readyz reports it dead; still retrying"
                    );
                }
                set(if dead {
                    TaskState::Dead
                } else {
                    TaskState::Restarting
                });
                if !waits.sleep(&shutdown).await {
                    return;
                }
                if !dead {
                    set(TaskState::Running);
                }
            }
        });
    }

    /// Runs `task` once as `name`, for a task that cannot be restarted (it owns a
    /// channel's receiving end, and ends only when every sender is gone): if it panics,
    /// it is dead.
    pub fn spawn_once<Fut>(&self, name: &'static str, task: Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let states = self.states.clone();
        states
            .lock()
            .expect("supervisor lock")
            .insert(name, (TaskState::Running, Role::Essential));
        metrics::counter!(crate::telemetry::names::TASK_FAILURES, "task" => name).increment(0);
        tokio::spawn(async move {
            if !tokio::spawn(task).await.is_err_and(|e| e.is_panic()) {
                return;
            }
            tracing::error!(task = name, "task panicked; it cannot be restarted");
            metrics::counter!(crate::telemetry::names::TASK_FAILURES, "task" => name).increment(1);
            states
                .lock()
                .expect("supervisor lock")
                .insert(name, (TaskState::Dead, Role::Essential));
        });
    }

    /// Every task with its state.
    pub fn states(&self) -> Vec<(&'static str, TaskState)> {
        self.tasks().into_iter().map(|(n, s, _)| (n, s)).collect()
    }

    /// Every task with its state and role.
    pub fn tasks(&self) -> Vec<(&'static str, TaskState, Role)> {
        self.states
            .lock()
            .expect("supervisor lock")
            .iter()
            .map(|(n, (s, r))| (*n, *s, *r))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_then_given_up_and_a_healthy_one_runs_on() {
        let sup = Supervisor::default();
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        sup.spawn(&tracker, "flaky", shutdown.clone(), move || {
            r.fetch_add(1, Ordering::Relaxed);
            async { panic!("boom") }
        });
        let s = shutdown.clone();
        sup.spawn(&tracker, "steady", shutdown.clone(), move || {
            let s = s.clone();
            async move { s.cancelled().await }
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        // Dead after five quick failures, and still retried at the longest backoff.
        let after_30s = runs.load(Ordering::Relaxed);
        assert!(after_30s > MAX_QUICK_FAILURES, "{after_30s}");
        assert_eq!(
            sup.states(),
            [("flaky", TaskState::Dead), ("steady", TaskState::Running)]
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(runs.load(Ordering::Relaxed) > after_30s);
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_metrics_only_task_is_supervised_the_same_and_says_so() {
        let sup = Supervisor::default();
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        sup.spawn_as(
            Role::Auxiliary,
            &tracker,
            "gauges",
            shutdown.clone(),
            move || {
                r.fetch_add(1, Ordering::Relaxed);
                async { panic!("boom") }
            },
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(runs.load(Ordering::Relaxed) > MAX_QUICK_FAILURES);
        assert_eq!(sup.tasks(), [("gauges", TaskState::Dead, Role::Auxiliary)]);
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_task_that_runs_again_for_a_while_is_alive_again() {
        let sup = Supervisor::default();
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let (r, s) = (runs.clone(), shutdown.clone());
        sup.spawn(&tracker, "heals", shutdown.clone(), move || {
            let n = r.fetch_add(1, Ordering::Relaxed);
            let s = s.clone();
            async move {
                if n < MAX_QUICK_FAILURES + 2 {
                    panic!("not yet");
                }
                s.cancelled().await
            }
        });
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(sup.states(), [("heals", TaskState::Dead)]);
        tokio::time::sleep(HEALTHY_RUN + Duration::from_secs(5)).await;
        assert_eq!(sup.states(), [("heals", TaskState::Running)]);
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
