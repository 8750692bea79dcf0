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

use floodgate_common::{
    Config,
    amqp::{self, IntakeMessage, Link, PUBLISHED_HEADER, Reconnect, Topology},
    retry::Backoff,
};
use lapin::{
    BasicProperties, Channel, Confirmation,
    options::BasicPublishOptions,
    types::{AMQPValue, FieldTable},
};
use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
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

/// One link and its confirm-mode channels.
struct Session {
    link: Link,
    channels: Vec<Channel>,
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
        Ok(Self { link, channels })
    }

    fn healthy(&self) -> bool {
        self.link.is_connected() && self.channels.iter().all(|c| c.status().connected())
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
        let topology = Topology::with_retry_steps(&cfg.namespace, cfg.retry_delays.len());
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

    /// True while the connection to the broker is up.
    pub fn is_connected(&self) -> bool {
        self.current().is_some_and(|s| s.healthy())
    }

    /// Publishes persistent and mandatory, and returns only once the broker confirmed it
    /// has the message in a queue.
    pub async fn publish(&self, msg: &IntakeMessage, message_id: &str) -> Result<(), PublishError> {
        let i = &self.inner;
        let session = self.current().ok_or(PublishError::NotConnected)?;
        let ch = &session.channels[i.next.fetch_add(1, Ordering::Relaxed) % session.channels.len()];
        // When it went out, so the worker can measure how long it waited in the queue.
        let mut headers = FieldTable::default();
        headers.insert(
            PUBLISHED_HEADER.into(),
            AMQPValue::LongLongInt(amqp::unix_ms()),
        );
        let props = BasicProperties::default()
            // 2 = persistent: written to disk by the quorum queue before the confirm.
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message_id.into())
            .with_headers(headers);
        let payload = msg.to_bytes();
        let confirm = async {
            let pending = ch
                .basic_publish(
                    i.topology.orders_exchange.as_str().into(),
                    i.topology.intake_key.as_str().into(),
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
        tokio::time::timeout(timeout, confirm)
            .await
            .map_err(|_| PublishError::Timeout(timeout))?
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

/// Watches the session; when it has been unhealthy for two checks in a row, replaces it
/// through [`Reconnect`] ([`Backoff::INTERACTIVE`]: buyers are waiting) until the broker
/// is back.
async fn supervise(inner: std::sync::Weak<Inner>, stop: CancellationToken) {
    let mut links = Reconnect::new("ingress", Backoff::INTERACTIVE).already_open();
    let mut bad_checks = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {},
        }
        let Some(i) = inner.upgrade() else { return };
        let healthy = i
            .session
            .read()
            .expect("publisher lock poisoned")
            .as_ref()
            .is_some_and(|s| s.healthy());
        if healthy {
            bad_checks = 0;
            continue;
        }
        bad_checks += 1;
        if bad_checks < 2 {
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
    }
}
