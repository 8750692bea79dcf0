//! Redis: key names and the Lua scripts that make every stock decision atomic.
//!
//! Every key carries the namespace as its cluster hash tag (`{ns}:...`): the reserve script
//! touches several SKUs, a user and an order in one call, and Redis Cluster runs a script
//! only when all its keys live in one slot. One namespace is therefore one slot; a sale
//! that outgrows one Redis core is split across namespaces.

mod keys;
mod scripts;

pub use keys::Keys;
pub use scripts::*;

/// Connects a multiplexed, auto-reconnecting connection.
pub async fn connect(url: &str) -> ::redis::RedisResult<::redis::aio::ConnectionManager> {
    let client = ::redis::Client::open(url)?;
    let cfg = ::redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(3)))
        .set_response_timeout(Some(std::time::Duration::from_secs(3)))
        .set_number_of_retries(2);
    ::redis::aio::ConnectionManager::new_with_config(client, cfg).await
}
