//! RabbitMQ: the topology (declared in one place), the messages on it, the one
//! reconnecting link every service talks to the broker through, and the queue-depth
//! gauges ([`depth`]).

pub mod depth;
mod link;
mod messages;
mod topology;

pub use link::*;
pub use messages::*;
pub use topology::*;
