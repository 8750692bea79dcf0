//! Publishing accepted orders to the intake queue with publisher confirms.
//!
//! Several channels, each in confirm mode; concurrent requests publish on them round-robin
//! and each awaits only its own confirm, so many publishes are in flight per channel and
//! the broker confirms them in batches. A supervisor task watches the connection and
//! rebuilds connection, channels and topology with backoff when the broker goes away.
//!
//! lapin's own connection recovery is deliberately off: in the RabbitMQ-restart fault
//! test it let publishes in flight across the restart resolve without the message ever
//! reaching the queue (hundreds of reservations left with no message). A publish that
//! fails here is released and answered 503, which is always safe.
//!
//! Each order goes to the intake partition its first SKU picks
//! ([`Topology::partition_for`]).
//!
//! # Nacks and lost confirms
//!
//! On a RabbitMQ cluster, after the node that held a partition's leader and this
//! connection died, a publisher that reconnected to a survivor at once was nacked for
//! that partition for ~32 s (docs/OPERATIONS.md); a connection opened ~250 ms later was
//! not. So a nack, or a confirm that never came ([`PublishError::Timeout`]), marks the
//! session suspect, and the supervisor replaces it [`NACK_BACKOFF`] later (longer if
//! the replacement is nacked too), make-before-break: publishes keep going on the old
//! session until the new one is up, and the old one closes only after
//! `FLOODGATE_PUBLISH_TIMEOUT_MS`, so confirms in flight on it still arrive.
//!
//! A publish that failed may still have been enqueued (a lost confirm). Its release
//! (`release.lua`, reason `publish_failed`) takes back only a reservation no worker has
//! claimed, and the worker's claim of a released one says `unpublished` and drops the
//! message (`claim.lua`): either the buyer's 503 stands and nothing is recorded, or the
//! worker claimed first and ingress answers 202 after all (`handover.rs`).

use floodgate_common::{
    Config,
    amqp::{self, HEALTHY_LINK, IntakeMessage, Link, Reconnect, Topology},
    retry::Backoff,
    trace::TraceParent,
};
use lapin::{Channel, Confirmation, options::BasicPublishOptions};
use std::{
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why a message is not known to be durably queued.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to the broker")]
    NotConnected,
    #[error("broker error")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("no queue took the message (returned)")]
    Returned,
    #[error("no confirm within {0:?}")]
    Timeout(Duration),
}

/// How long after a nack or a lost confirm the session is replaced (the first time;
/// it doubles while replacements are nacked again, up to [`NACK_BACKOFF_MAX`]).
pub const NACK_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between nack-driven replacements (a partition that has lost its
/// quorum nacks until it has one again, whatever the connection).
pub const NACK_BACKOFF_MAX: Duration = Duration::from_secs(4);

impl PublishError {
    /// The metric label (`floodgate_publish_failures_total{reason}`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::NotConnected => "not_connected",
            Self::Broker(_) => "broker",
            Self::Nacked => "nacked",
            Self::Returned => "returned",
            Self::Timeout(_) => "timeout",
        }
    }
}

/// One link and its confirm-mode channels.
struct Session {
    link: Link,
    channels: Vec<Channel>,
    /// When a publish on it was first nacked or lost its confirm; None while none was.
    suspect: Mutex<Option<Instant>>,
}

impl Session {
    async fn open(cfg: &Config, topology: &Topology) -> anyhow::Result<Self> {
        let link = Link::open(
            &cfg.amqp_url,
            &format!("floodgate-ingress {}", cfg.namespace),
        )
        .await?;
        let mut channels = Vec::with_capacity(cfg.publish_channels);
        for i in 0..cfg.publish_channels {
            let ch = link.confirm_channel().await?;
            if i == 0 {
                topology.declare(&ch).await?;
            }
            channels.push(ch);
        }
        Ok(Self {
            link,
            channels,
            suspect: Mutex::new(None),
        })
    }

    fn healthy(&self) -> bool {
        self.link.is_connected() && self.channels.iter().all(|c| c.status().connected())
    }

    /// Records a nack or a lost confirm (the first one counts).
    fn mark_suspect(&self) {
        self.suspect
            .lock()
            .expect("publisher lock poisoned")
            .get_or_insert_with(Instant::now);
    }

    fn suspect_since(&self) -> Option<Instant> {
        *self.suspect.lock().expect("publisher lock poisoned")
    }
}

#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: Config,
    session: RwLock<Option<Arc<Session>>>,
    next: AtomicUsize,
    topology: Topology,
    stop: CancellationToken,
}

impl Publisher {
    /// Connects, declares the topology, opens the channels and starts the supervisor.
    /// Fails if the broker is unreachable at start.
    pub async fn connect(cfg: &Config) -> anyhow::Result<Self> {
        let topology = Topology::of(cfg);
        let session = Session::open(cfg, &topology).await?;
        let p = Self {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                session: RwLock::new(Some(Arc::new(session))),
                next: AtomicUsize::new(0),
                topology,
                stop: CancellationToken::new(),
            }),
        };
        tokio::spawn(supervise(Arc::downgrade(&p.inner), p.inner.stop.clone()));
        Ok(p)
    }

    fn current(&self) -> Option<Arc<Session>> {
        self.inner
            .session
            .read()
            .expect("publisher lock poisoned")
            .clone()
    }

    /// `host:port` of the broker node the current session is connected to.
    pub fn node(&self) -> Option<String> {
        self.current().map(|s| s.link.node().to_owned())
    }

    /// True while the connection to the broker is up.
    pub fn is_connected(&self) -> bool {
        self.current().is_some_and(|s| s.healthy())
    }

    /// Publishes persistent and mandatory to the order's partition, and returns only once
    /// the broker confirmed it has the message in a queue. `trace` goes in the
    /// `traceparent` header.
    pub async fn publish(
        &self,
        msg: &IntakeMessage,
        message_id: &str,
        trace: Option<&TraceParent>,
    ) -> Result<(), PublishError> {
        let i = &self.inner;
        let session = self.current().ok_or(PublishError::NotConnected)?;
        let ch = &session.channels[i.next.fetch_add(1, Ordering::Relaxed) % session.channels.len()];
        // When it went out (the worker measures how long it waited), and its trace.
        let props = amqp::intake_properties(message_id, trace);
        let payload = msg.to_bytes();
        let order = msg.order();
        let key = &i.topology.partition_for(&order.items).key;
        let confirm = async {
            let pending = ch
                .basic_publish(
                    i.topology.orders_exchange.as_str().into(),
                    key.as_str().into(),
                    BasicPublishOptions {
                        // Unroutable (no queue bound) comes back instead of vanishing.
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &payload,
                    props,
                )
                .await?;
            match pending.await? {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(_)) => Err(PublishError::Returned),
                Confirmation::Nack(_) | Confirmation::NotRequested => Err(PublishError::Nacked),
            }
        };
        let timeout = i.cfg.publish_timeout;
        let outcome = tokio::time::timeout(timeout, confirm)
            .await
            .map_err(|_| PublishError::Timeout(timeout))
            .and_then(|r| r);
        if let Err(PublishError::Nacked | PublishError::Timeout(_)) = &outcome {
            session.mark_suspect();
        }
        outcome
    }

    /// Stops the supervisor and closes the session (graceful shutdown).
    pub async fn close(&self) {
        self.inner.stop.cancel();
        let old = self
            .inner
            .session
            .write()
            .expect("publisher lock poisoned")
            .take();
        if let Some(s) = old {
            s.link.close().await;
        }
    }
}

/// Watches the session. When it has been unhealthy for two checks in a row, replaces it
/// through [`Reconnect`] ([`Backoff::INTERACTIVE`]: buyers are waiting) until the broker
/// is back. When a publish on it was nacked or lost its confirm, replaces it after
/// [`NACK_BACKOFF`] (growing while replacements are nacked too), make-before-break (see
/// the module docs).
async fn supervise(inner: std::sync::Weak<Inner>, stop: CancellationToken) {
    let mut links = Reconnect::new("ingress", Backoff::INTERACTIVE).already_open();
    let mut bad_checks = 0;
    let mut nack_wait = NACK_BACKOFF;
    // When the last nack-driven replacement went in.
    let mut replaced_for_nack: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {},
        }
        let Some(i) = inner.upgrade() else { return };
        let current = i.session.read().expect("publisher lock poisoned").clone();
        let healthy = current.as_ref().is_some_and(|s| s.healthy());
        if !healthy {
            bad_checks += 1;
            // Two checks 250 ms apart, as ever.
            if bad_checks < 2 * 5 {
                continue;
            }
            links.lost(&anyhow::anyhow!(
                "the connection or a publishing channel closed"
            ));
            let old = i.session.write().expect("publisher lock poisoned").take();
            if let Some(old) = old {
                old.link.close().await;
            }
            let Some(s) = links
                .next_at_once(&stop, || Session::open(&i.cfg, &i.topology))
                .await
            else {
                return;
            };
            *i.session.write().expect("publisher lock poisoned") = Some(Arc::new(s));
            bad_checks = 0;
            continue;
        }
        bad_checks = 0;
        let Some(since) = current.as_ref().and_then(|s| s.suspect_since()) else {
            continue;
        };
        // Nacked again soon after the last replacement: wait longer this time.
        let wait = match replaced_for_nack {
            Some(at) if since.duration_since(at) < HEALTHY_LINK => nack_wait,
            _ => NACK_BACKOFF,
        };
        if since.elapsed() < wait {
            continue;
        }
        links.lost(&anyhow::anyhow!(
            "a publish was nacked or lost its confirm; replacing the connection"
        ));
        let Some(s) = links
            .next_at_once(&stop, || Session::open(&i.cfg, &i.topology))
            .await
        else {
            return;
        };
        tracing::info!(node = s.link.node(), "publisher moved to a new connection");
        let old = i
            .session
            .write()
            .expect("publisher lock poisoned")
            .replace(Arc::new(s));
        nack_wait = (wait * 2).min(NACK_BACKOFF_MAX);
        replaced_for_nack = Some(Instant::now());
        if let Some(old) = old {
            // Confirms in flight on it still arrive until the publish timeout.
            let grace = i.cfg.publish_timeout;
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                old.link.close().await;
            });
        }
    }
}
