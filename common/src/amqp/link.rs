//! One reconnecting broker link, used by every AMQP client of the services (ingress's
//! publisher, the worker's consumer, the outbox relay, the notifier's event source).
//!
//! - [`Link`]: a named connection that opens channels (plain or in confirm mode), says
//!   whether it is still up, and closes within [`CLOSE_TIMEOUT`] however dead the broker
//!   is. Closing the connection closes its channels, so the broker requeues every
//!   unacknowledged delivery.
//! - [`Reconnect`]: the loop around it. It opens the next session with a cancellable,
//!   jittered backoff ([`crate::retry`]), never retries at once what just failed, starts
//!   from the shortest wait again after a session that lived [`HEALTHY_LINK`], bounds
//!   each attempt by [`OPEN_TIMEOUT`] (a node still booting can accept a connection and
//!   then sit on a declare), and counts every rebuilt session in
//!   `floodgate_amqp_reconnects_total{service}`.
//!
//! A session is whatever a service builds on a link (its channels, its declared
//! topology); the service's `open` builds one whole, so a failure anywhere rebuilds all
//! of it. lapin's own connection recovery stays off (see `ingress/src/publisher.rs`).

use crate::{
    retry::{Backoff, Waits},
    telemetry::names,
};
use lapin::{Channel, Connection, ConnectionProperties, options::ConfirmSelectOptions};
use std::{future::Future, time::Duration};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long opening a connection may take: a broker that accepts TCP but never
/// finishes the handshake (a node still booting) must not hang a reconnect loop.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a close may take: on a dead or recovering connection it may never be
/// answered.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long opening a whole session (connection, channels, declares) may take.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// A session that lived this long was healthy: the next reconnect starts from the
/// shortest wait again.
pub const HEALTHY_LINK: Duration = Duration::from_secs(10);

/// A named connection to the broker (the name shows in the management UI).
pub struct Link {
    conn: Connection,
}

impl Link {
    /// Connects; fails after [`CONNECT_TIMEOUT`].
    pub async fn open(url: &str, name: &str) -> lapin::Result<Self> {
        let props = ConnectionProperties::default().with_connection_name(name.into());
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props)).await {
            Ok(conn) => Ok(Self { conn: conn? }),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no AMQP connection within {CONNECT_TIMEOUT:?}"),
            )
            .into()),
        }
    }

    /// A new channel.
    pub async fn channel(&self) -> lapin::Result<Channel> {
        self.conn.create_channel().await
    }

    /// A new channel in publisher-confirm mode: every publish on it resolves only once
    /// the broker took responsibility for the message (or refused it).
    pub async fn confirm_channel(&self) -> lapin::Result<Channel> {
        let ch = self.conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(ch)
    }

    /// True while the connection is up.
    pub fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }

    /// Closes the connection and with it every channel; gives up after
    /// [`CLOSE_TIMEOUT`].
    pub async fn close(&self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.conn.close(200, "shutdown".into())).await;
    }
}

/// Opens a service's sessions one after another: the first at start, the next after
/// each failure, with backoff. See the module docs.
pub struct Reconnect {
    service: &'static str,
    waits: Waits,
    /// When the current session opened; None before the first.
    opened: Option<Instant>,
}

impl Reconnect {
    /// `service` labels the metric and the logs.
    pub fn new(service: &'static str, backoff: Backoff) -> Self {
        // At 0 from the start, so an alert on `increase()` sees the first reconnect.
        metrics::counter!(names::RECONNECTS, "service" => service).increment(0);
        Self {
            service,
            waits: Waits::new(backoff),
            opened: None,
        }
    }

    /// For a service that opened its first session itself (to fail fast at start):
    /// the next [`Reconnect::next`] is a reconnect.
    pub fn already_open(mut self) -> Self {
        self.opened = Some(Instant::now());
        self
    }

    /// True until the first session opened.
    pub fn is_first(&self) -> bool {
        self.opened.is_none()
    }

    /// Logs why the current session ended; call before [`Reconnect::next`].
    pub fn lost(&self, error: &anyhow::Error) {
        tracing::warn!(
            service = self.service,
            error = format!("{error:#}"),
            "broker session lost; reconnecting"
        );
    }

    /// Opens the next session with `open`, retrying with backoff until it works. The
    /// first is tried at once; any later one only after a wait, since the last session
    /// just failed. None once `shutdown` is cancelled.
    pub async fn next<S, F, Fut>(&mut self, shutdown: &CancellationToken, open: F) -> Option<S>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<S>>,
    {
        let wait_first = self.opened.is_some();
        self.open(shutdown, open, wait_first).await
    }

    /// Like [`Reconnect::next`], but the first attempt is made at once: for a caller
    /// that already waited (ingress's publisher saw two failed health checks, and buyers
    /// get 503 until the session is back).
    pub async fn next_at_once<S, F, Fut>(
        &mut self,
        shutdown: &CancellationToken,
        open: F,
    ) -> Option<S>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<S>>,
    {
        self.open(shutdown, open, false).await
    }

    async fn open<S, F, Fut>(
        &mut self,
        shutdown: &CancellationToken,
        mut open: F,
        mut wait_first: bool,
    ) -> Option<S>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<S>>,
    {
        let reconnecting = match self.opened {
            None => false,
            Some(at) => {
                if at.elapsed() >= HEALTHY_LINK {
                    self.waits.reset();
                }
                true
            }
        };
        loop {
            if shutdown.is_cancelled() || (wait_first && !self.waits.sleep(shutdown).await) {
                return None;
            }
            wait_first = true;
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = tokio::time::timeout(OPEN_TIMEOUT, open()) => r,
            };
            match attempt {
                Ok(Ok(session)) => {
                    self.opened = Some(Instant::now());
                    if reconnecting {
                        metrics::counter!(names::RECONNECTS, "service" => self.service)
                            .increment(1);
                        tracing::info!(service = self.service, "broker session rebuilt");
                    }
                    return Some(session);
                }
                Ok(Err(e)) => tracing::info!(
                    service = self.service,
                    error = format!("{e:#}"),
                    "broker still unreachable"
                ),
                Err(_) => tracing::info!(
                    service = self.service,
                    "opening a broker session took longer than {OPEN_TIMEOUT:?}"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    const FAST: Backoff = Backoff {
        min: Duration::from_millis(100),
        max: Duration::from_millis(400),
    };

    /// An `open` that fails `failures` times, then succeeds; counts calls.
    fn flaky(
        failures: u32,
        calls: Arc<AtomicU32>,
    ) -> impl FnMut() -> std::future::Ready<anyhow::Result<u32>> {
        move || {
            let n = calls.fetch_add(1, Ordering::Relaxed);
            std::future::ready(if n < failures {
                Err(anyhow::anyhow!("down"))
            } else {
                Ok(n)
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_session_opens_at_once_a_later_one_only_after_a_wait() {
        let shutdown = CancellationToken::new();
        let calls = Arc::new(AtomicU32::new(0));
        let mut r = Reconnect::new("test", FAST);
        assert!(r.is_first());
        let t0 = Instant::now();
        assert_eq!(r.next(&shutdown, flaky(0, calls.clone())).await, Some(0));
        assert_eq!(t0.elapsed(), Duration::ZERO, "the first try is immediate");
        assert!(!r.is_first());

        // The session failed at once: the next open waits first, even when it works.
        let t1 = Instant::now();
        assert_eq!(r.next(&shutdown, flaky(0, Arc::default())).await, Some(0));
        assert!(t1.elapsed() >= FAST.min, "{:?}", t1.elapsed());
        // ... unless the caller waited already.
        let t2 = Instant::now();
        assert_eq!(
            r.next_at_once(&shutdown, flaky(0, Arc::default())).await,
            Some(0)
        );
        assert_eq!(t2.elapsed(), Duration::ZERO);
        // Each failed attempt adds a wait.
        let calls = Arc::new(AtomicU32::new(0));
        assert_eq!(r.next(&shutdown, flaky(2, calls.clone())).await, Some(2));
        assert_eq!(calls.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_across_short_lived_sessions_and_resets_after_a_healthy_one() {
        let shutdown = CancellationToken::new();
        let mut r = Reconnect::new("test", FAST).already_open();
        // Sessions that die at once, back to back: the waits grow toward the cap.
        let mut waited = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            r.next(&shutdown, flaky(0, Arc::default())).await.unwrap();
            waited.push(t.elapsed());
        }
        assert!(waited[4] >= FAST.max, "{waited:?}");
        // A session that lived HEALTHY_LINK: back to the shortest wait (with jitter, below
        // twice the minimum).
        tokio::time::sleep(HEALTHY_LINK).await;
        let t = Instant::now();
        r.next(&shutdown, flaky(0, Arc::default())).await.unwrap();
        assert!(
            t.elapsed() < FAST.min * 2 + Duration::from_millis(1),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_retries_and_a_hung_open_is_bounded() {
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            stop.cancel();
        });
        let calls = Arc::new(AtomicU32::new(0));
        let mut r = Reconnect::new("test", FAST);
        assert_eq!(
            r.next(&shutdown, flaky(u32::MAX, calls.clone())).await,
            None
        );
        assert!(calls.load(Ordering::Relaxed) > 3);

        // An open that never answers is abandoned after OPEN_TIMEOUT and tried again.
        let shutdown = CancellationToken::new();
        let tries = Arc::new(AtomicU32::new(0));
        let t = Instant::now();
        let mut r = Reconnect::new("test", FAST);
        let got = tokio::time::timeout(
            OPEN_TIMEOUT * 2,
            r.next(&shutdown, || {
                let n = tries.fetch_add(1, Ordering::Relaxed);
                async move {
                    if n == 0 {
                        std::future::pending::<()>().await;
                    }
                    Ok(n)
                }
            }),
        )
        .await
        .expect("a hung open is abandoned after OPEN_TIMEOUT");
        assert_eq!(got, Some(1));
        assert!(t.elapsed() >= OPEN_TIMEOUT);
    }
}
