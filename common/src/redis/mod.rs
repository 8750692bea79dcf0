//! Redis: the connection, key names and the Lua scripts that make every stock decision
//! atomic.
//!
//! Every key carries its shard's cluster hash tag (`{ns}:...` for shard 0, `{ns.g}:...`
//! for shard g): the reserve script touches several SKUs, a user and an order in one
//! call, and Redis Cluster runs a script only when all its keys live in one slot. A
//! namespace has `FLOODGATE_REDIS_SHARDS` shards (default 1: one slot); SKUs spread over
//! them and an order that spans several is reserved in parts ([`shards`]).
//!
//! # Layout
//!
//! - [`conn`] - [`Redis`]: one server or a Redis Cluster, by `FLOODGATE_REDIS_URL`, with
//!   the cluster client's retry and timeout settings.
//! - `keys` - [`Keys`], every key name of one shard of a namespace.
//! - [`shards`] - [`Shards`]: which shard a SKU, an Idempotency-Key and an order's parts
//!   live in.
//! - [`buckets`] - a hot SKU over several shards: moves between its buckets, the
//!   rebalancer.
//! - `parts` - calls over every part of an order, or many orders grouped per shard.
//! - `scripts` - typed wrappers of the Lua scripts in `lua/`.

pub mod buckets;
pub mod conn;
mod keys;
mod parts;
mod points;
mod scripts;
pub mod shards;

pub use conn::{Redis, ReplicaWait, Target, connect};
pub use keys::Keys;
pub use parts::*;
pub use points::*;
pub use scripts::*;
pub use shards::{MAX_SHARDS, Part, Shards, shard_of};
