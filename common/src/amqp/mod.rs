//! RabbitMQ: the topology (declared in one place) and the messages on it.

mod messages;
mod topology;

pub use messages::*;
pub use topology::*;

use lapin::{Connection, ConnectionProperties};

/// Connects to the broker, named for the management UI.
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props).await
}
