//! Waiting for something to come back (a broker, a database): jittered exponential
//! backoff from `backon`, cancellable by shutdown. Every reconnect and probe loop of the
//! services uses this one shape instead of its own "double the wait up to a cap" loop.

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use std::{fmt::Display, future::Future, time::Duration};
use tokio_util::sync::CancellationToken;

/// Delays from `min`, doubling, up to `max`; each wait is its delay plus a random part of
/// it (backon's jitter: `d..2d`), so many processes that lost the same server do not all
/// come back in the same millisecond.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Background work (worker, relay, notifier): waits of 100-200 ms up to 2.5-5 s.
    pub const BACKGROUND: Backoff = Backoff {
        min: Duration::from_millis(100),
        max: Duration::from_millis(2_500),
    };
    /// Buyers are waiting (ingress's publisher): waits of 100-200 ms up to 1-2 s.
    pub const INTERACTIVE: Backoff = Backoff {
        min: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };

    fn waits(self) -> ExponentialBackoff {
        ExponentialBuilder::default()
            .with_min_delay(self.min)
            .with_max_delay(self.max)
            .with_jitter()
            .without_max_times()
            .build()
    }
}

/// The waits of one reconnect loop; [`Waits::reset`] once a connection worked.
pub struct Waits {
    backoff: Backoff,
    waits: ExponentialBackoff,
}

impl Waits {
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            waits: backoff.waits(),
        }
    }

    /// Starts again from the shortest wait.
    pub fn reset(&mut self) {
        self.waits = self.backoff.waits();
    }

    /// Sleeps the next wait. False if `shutdown` was cancelled first.
    pub async fn sleep(&mut self, shutdown: &CancellationToken) -> bool {
        let wait = self.waits.next().unwrap_or(self.backoff.max);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

/// Calls `attempt` until it succeeds, logging each failure with `what` and sleeping a
/// backoff wait in between. None if `shutdown` is cancelled first (also before the
/// first attempt). The first attempt is made at once: a caller that must not retry
/// at once what just failed sleeps a [`Waits`] first.
pub async fn until_ok<T, E, F, Fut>(
    shutdown: &CancellationToken,
    backoff: Backoff,
    what: &str,
    mut attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Display,
{
    let mut waits = Waits::new(backoff);
    loop {
        if shutdown.is_cancelled() {
            return None;
        }
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = attempt() => r,
        };
        match outcome {
            Ok(t) => return Some(t),
            Err(e) => tracing::info!(error = format!("{e:#}"), "{what}"),
        }
        if !waits.sleep(shutdown).await {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const FAST: Backoff = Backoff {
        min: Duration::from_millis(1),
        max: Duration::from_millis(4),
    };

    #[tokio::test]
    async fn retries_until_ok_and_stops_on_shutdown() {
        let tries = AtomicU32::new(0);
        let shutdown = CancellationToken::new();
        let got = until_ok(&shutdown, FAST, "probe", || async {
            match tries.fetch_add(1, Ordering::Relaxed) {
                0..=2 => Err("not yet"),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(got, Some(3));

        // Never succeeds: shutdown ends it.
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            stop.cancel();
        });
        let never = until_ok(&shutdown, FAST, "probe", || async { Err::<(), _>("down") }).await;
        assert_eq!(never, None);
        // Already cancelled: not even one attempt.
        let before = tries.load(Ordering::Relaxed);
        let none = until_ok(&shutdown, FAST, "probe", || async {
            tries.fetch_add(1, Ordering::Relaxed);
            Ok::<_, &str>(())
        })
        .await;
        assert_eq!((none, tries.load(Ordering::Relaxed)), (None, before));
    }

    #[test]
    fn waits_stay_within_the_bounds_with_jitter() {
        let b = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_millis(800),
        };
        let waits: Vec<Duration> = b.waits().take(10).collect();
        // backon's jitter adds up to one more wait on top of each delay.
        assert!(
            waits.iter().all(|w| *w >= b.min && *w <= b.max * 2),
            "{waits:?}"
        );
        assert!(waits[9] >= Duration::from_millis(800), "{waits:?}");
    }
}
