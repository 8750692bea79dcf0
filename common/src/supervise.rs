//! Supervised background tasks: a task that panics or ends before shutdown is restarted
//! with backoff; one that keeps failing is given up on and named by `/readyz` (503), so
//! a process whose relay, reaper or consumer died is never reported ready.

use crate::retry::{Backoff, Waits};
use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Failures in a row (each within [`HEALTHY_RUN`] of its start) before a task is given up.
pub const MAX_QUICK_FAILURES: u32 = 5;
/// A run that lasted this long was healthy: the failure count starts again.
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Where a supervised task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Running,
    /// Failed; waiting to start again.
    Restarting,
    /// Failed [`MAX_QUICK_FAILURES`] times in a row; not restarted.
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

/// The supervised tasks of one process; cheap to clone.
#[derive(Clone, Default)]
pub struct Supervisor {
    states: Arc<Mutex<BTreeMap<&'static str, TaskState>>>,
}

impl Supervisor {
    /// Runs `make()` as task `name` on `tracker` until `shutdown`, restarting it whenever
    /// it panics or returns while `shutdown` is not cancelled.
    pub fn spawn<F, Fut>(
        &self,
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
            states.lock().expect("supervisor lock").insert(name, s);
        };
        set(TaskState::Running);
        tracker.spawn(async move {
            let mut waits = Waits::new(Backoff::BACKGROUND);
            let mut quick_failures = 0;
            loop {
                let started = Instant::now();
                let outcome = tokio::spawn(make()).await;
                if shutdown.is_cancelled() {
                    return;
                }
                match outcome {
                    Err(e) if e.is_panic() => tracing::error!(task = name, "task panicked"),
                    _ => tracing::error!(task = name, "task ended unexpectedly"),
                }
                metrics::counter!(crate::telemetry::names::TASK_FAILURES, "task" => name)
                    .increment(1);
                if started.elapsed() >= HEALTHY_RUN {
                    quick_failures = 0;
                    waits.reset();
                }
                quick_failures += 1;
                if quick_failures >= MAX_QUICK_FAILURES {
                    tracing::error!(
                        task = name,
                        failures = quick_failures,
                        "task keeps failing; given up: /readyz reports it"
                    );
                    set(TaskState::Dead);
                    return;
                }
                set(TaskState::Restarting);
                if !waits.sleep(&shutdown).await {
                    return;
                }
                set(TaskState::Running);
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
            .insert(name, TaskState::Running);
        tokio::spawn(async move {
            if !tokio::spawn(task).await.is_err_and(|e| e.is_panic()) {
                return;
            }
            tracing::error!(task = name, "task panicked; it cannot be restarted");
            metrics::counter!(crate::telemetry::names::TASK_FAILURES, "task" => name).increment(1);
            states
                .lock()
                .expect("supervisor lock")
                .insert(name, TaskState::Dead);
        });
    }

    /// Every task with its state.
    pub fn states(&self) -> Vec<(&'static str, TaskState)> {
        self.states
            .lock()
            .expect("supervisor lock")
            .iter()
            .map(|(n, s)| (*n, *s))
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
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(runs.load(Ordering::Relaxed), MAX_QUICK_FAILURES);
        assert_eq!(
            sup.states(),
            [("flaky", TaskState::Dead), ("steady", TaskState::Running)]
        );
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
