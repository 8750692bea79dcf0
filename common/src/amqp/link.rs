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
//!
//! # Several nodes
//!
//! `FLOODGATE_AMQP_URL` may list the nodes of one RabbitMQ cluster, comma-separated
//! ([`Nodes`]). Every [`Link::open`] starts at the next node of a process-wide rotation
//! and, if that node refuses or does not finish the handshake within its share of
//! [`CONNECT_TIMEOUT`], goes on to the following ones: a process's links spread over the
//! nodes, and a reconnect after a node died lands on a live node in the same call.
//! (lapin 4's `Connection::connector` would call a closure on every connect of lapin's
//! own recovery; that recovery stays off, so every reconnect here is a new
//! [`Link::open`] and rotates by itself.)

use crate::{
    retry::{Backoff, Waits},
    telemetry::names,
};
use lapin::{
    Channel, Connection, ConnectionProperties, options::ConfirmSelectOptions, uri::AMQPUri,
};
use std::{
    fmt,
    future::Future,
    str::FromStr,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};
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

/// The shortest time one node of a list gets to finish a connection: a list of many
/// nodes shares [`CONNECT_TIMEOUT`] between them, but never below this.
pub const NODE_CONNECT_TIMEOUT_MIN: Duration = Duration::from_secs(3);

/// The nodes of `FLOODGATE_AMQP_URL`: one AMQP URI, or a comma-separated list of the
/// URIs of one cluster's nodes (same vhost and user on each). Parse, don't validate:
/// [`crate::Config`] builds it once at start-up, so a bad list is refused there.
#[derive(Clone, PartialEq, Eq)]
pub struct Nodes(Vec<AMQPUri>);

impl Nodes {
    /// Parses a list; the error names the bad entry by position (never its text, which
    /// may hold a password).
    pub fn parse(list: &str) -> Result<Self, String> {
        let entries: Vec<&str> = list.split(',').map(str::trim).collect();
        let n = entries.len();
        let mut nodes = Vec::with_capacity(n);
        for (i, e) in entries.iter().enumerate() {
            if e.is_empty() {
                return Err(format!(
                    "entry {} of {n} is empty (a list is `amqp://a:5672/%2f,amqp://b:5672/%2f`)",
                    i + 1
                ));
            }
            if !e.starts_with("amqp://") && !e.starts_with("amqps://") {
                return Err(format!(
                    "entry {} of {n} does not start with amqp:// or amqps://",
                    i + 1
                ));
            }
            let uri = AMQPUri::from_str(e).map_err(|why| {
                format!(
                    "entry {} of {n} is not an AMQP URI: {}",
                    i + 1,
                    why.replace(e, "<entry>")
                )
            })?;
            nodes.push(uri);
        }
        let mut seen = std::collections::HashSet::new();
        for (i, u) in nodes.iter().enumerate() {
            if !seen.insert((u.authority.host.as_str(), u.authority.port)) {
                return Err(format!(
                    "entry {} of {n} names {}:{} again",
                    i + 1,
                    u.authority.host,
                    u.authority.port
                ));
            }
        }
        Ok(Self(nodes))
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true: a list holds at least one node.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `host:port` of node `i`, for logs (never the credentials).
    pub fn addr(&self, i: usize) -> String {
        let a = &self.0[i].authority;
        format!("{}:{}", a.host, a.port)
    }
}

impl fmt::Debug for Nodes {
    /// Hosts and ports only: the URIs hold the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries((0..self.len()).map(|i| self.addr(i)))
            .finish()
    }
}

/// Where the next [`Link::open`] of this process starts in its node list.
static NEXT_NODE: AtomicUsize = AtomicUsize::new(0);

/// A named connection to the broker (the name shows in the management UI).
pub struct Link {
    conn: Connection,
    /// `host:port` of the node it is connected to.
    node: String,
}

impl Link {
    /// Connects to one of the nodes `url` lists (see the module docs): the next in the
    /// process's rotation first, then each following one. Fails when none connected,
    /// after at most about [`CONNECT_TIMEOUT`] (each node gets an equal share of it, at
    /// least [`NODE_CONNECT_TIMEOUT_MIN`]).
    pub async fn open(url: &str, name: &str) -> lapin::Result<Self> {
        let nodes = Nodes::parse(url).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("FLOODGATE_AMQP_URL: {e}"),
            )
        })?;
        let n = nodes.len();
        let per_node = (CONNECT_TIMEOUT / n as u32).max(NODE_CONNECT_TIMEOUT_MIN);
        let first = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
        let mut last_error = None;
        for k in 0..n {
            let i = (first + k) % n;
            let props = ConnectionProperties::default().with_connection_name(name.into());
            let attempt =
                tokio::time::timeout(per_node, Connection::connect_uri(nodes.0[i].clone(), props))
                    .await;
            let e = match attempt {
                Ok(Ok(conn)) => {
                    return Ok(Self {
                        conn,
                        node: nodes.addr(i),
                    });
                }
                Ok(Err(e)) => e,
                Err(_) => std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no AMQP connection within {per_node:?}"),
                )
                .into(),
            };
            if n > 1 {
                tracing::info!(node = nodes.addr(i), error = %e, "AMQP node unreachable; trying the next");
            }
            last_error = Some((i, e));
        }
        let (i, e) = last_error.expect("a list holds at least one node");
        if n == 1 {
            return Err(e);
        }
        Err(std::io::Error::other(format!(
            "none of the {n} AMQP nodes {nodes:?} connected; the last ({}) said: {e}",
            nodes.addr(i)
        ))
        .into())
    }

    /// `host:port` of the node this link is connected to.
    pub fn node(&self) -> &str {
        &self.node
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
