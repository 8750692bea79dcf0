//! RabbitMQ: the topology (declared in one place), the messages on it, and the one
//! reconnecting link every service talks to the broker through.

mod link;
mod messages;
mod topology;

pub use link::*;
pub use messages::*;
pub use topology::*;
