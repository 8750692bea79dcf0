//! Publishing accepted orders to the intake queue with publisher confirms.
//!
//! Several channels, each in confirm mode; concurrent requests publish on them round-robin
//! and each awaits only its own confirm, so many publishes are in flight per channel and
//! the broker confirms them in batches.

use floodgate_common::{
    Config,
    amqp::{IntakeMessage, Topology},
};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

/// Why a message is not known to be durably queued.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker error")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("no queue took the message (returned)")]
    Returned,
    #[error("no confirm within {0:?}")]
    Timeout(Duration),
}

#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Connection,
    channels: Vec<Channel>,
    next: AtomicUsize,
    topology: Topology,
    timeout: Duration,
}

impl Publisher {
    /// Connects, declares the topology and opens the confirm-mode channels.
    pub async fn connect(cfg: &Config) -> anyhow::Result<Self> {
        let conn = floodgate_common::amqp::connect(
            &cfg.amqp_url,
            &format!("floodgate-ingress {}", cfg.namespace),
        )
        .await?;
        let topology = Topology::new(&cfg.namespace);
        let mut channels = Vec::with_capacity(cfg.publish_channels);
        for i in 0..cfg.publish_channels {
            let ch = conn.create_channel().await?;
            if i == 0 {
                topology.declare(&ch).await?;
            }
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            channels.push(ch);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                conn,
                channels,
                next: AtomicUsize::new(0),
                topology,
                timeout: cfg.publish_timeout,
            }),
        })
    }

    /// True while the connection to the broker is up.
    pub fn is_connected(&self) -> bool {
        self.inner.conn.status().connected()
    }

    /// Publishes persistent and mandatory, and returns only once the broker confirmed it
    /// has the message in a queue.
    pub async fn publish(&self, msg: &IntakeMessage, message_id: &str) -> Result<(), PublishError> {
        let i = &self.inner;
        let ch = &i.channels[i.next.fetch_add(1, Ordering::Relaxed) % i.channels.len()];
        let props = BasicProperties::default()
            // 2 = persistent: written to disk by the quorum queue before the confirm.
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message_id.into());
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
        tokio::time::timeout(i.timeout, confirm)
            .await
            .map_err(|_| PublishError::Timeout(i.timeout))?
    }

    /// Closes the channels and the connection (graceful shutdown).
    pub async fn close(&self) {
        for ch in &self.inner.channels {
            let _ = ch.close(200, "shutdown".into()).await;
        }
        let _ = self.inner.conn.close(200, "shutdown".into()).await;
    }
}
