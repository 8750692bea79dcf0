//! RabbitMQ: the topology (declared in one place) and the messages on it.

mod messages;
mod topology;

pub use messages::*;
pub use topology::*;

use lapin::{Connection, ConnectionProperties};

/// How long opening a connection may take: a broker that accepts TCP but never
/// finishes the handshake (a node still booting) must not hang a reconnect loop.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connects to the broker, named for the management UI; fails after
/// [`CONNECT_TIMEOUT`].
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no AMQP connection within {CONNECT_TIMEOUT:?}"),
        )
        .into()),
    }
}
