//! Redis: the connection, key names and the Lua scripts that make every stock decision
//! atomic.
//!
//! Every key carries the namespace as its cluster hash tag (`{ns}:...`): the reserve script
//! touches several SKUs, a user and an order in one call, and Redis Cluster runs a script
//! only when all its keys live in one slot. One namespace is therefore one slot; a sale
//! that outgrows one Redis core is split across namespaces.
//!
//! # Layout
//!
//! - [`conn`] - [`Redis`]: one server or a Redis Cluster, by `FLOODGATE_REDIS_URL`, with
//!   the cluster client's retry and timeout settings.
//! - `keys` - [`Keys`], every key name of a namespace.
//! - `scripts` - typed wrappers of the Lua scripts in `lua/`.

pub mod conn;
mod keys;
mod scripts;

pub use conn::{Redis, Target, connect};
pub use keys::Keys;
pub use scripts::*;
