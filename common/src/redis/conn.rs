//! [`Redis`]: one connection type for one Redis server or a Redis Cluster, chosen by
//! `FLOODGATE_REDIS_URL` alone. The same scripts run on both: every key of a namespace
//! carries the `{ns}` hash tag, so a namespace is one slot, and a script (or a pipeline)
//! names keys of that slot only.
//!
//! # The cluster client's settings
//!
//! The `redis` crate's cluster defaults (16 retries, waits from 1.28 s up to 655 s, no
//! overall bound) would hold an order request for minutes. Measured here: a `kill -9` of a
//! master gets its replica promoted in about 4 s (`cluster-node-timeout` 2 s, then the
//! election); live slot migrations and manual failovers answer MOVED/ASK within
//! milliseconds. The order path wants a bounded answer: a reservation either decides
//! within about 2 s or ingress answers 503 and the buyer retries (with an Idempotency-Key
//! that is safe). So:
//!
//! - [`CLUSTER_CONNECTION_TIMEOUT`] 500 ms: a connect on a LAN takes well under 1 ms and a
//!   dead node's port refuses at once; only a black-holed host needs the timeout.
//! - [`CLUSTER_RESPONSE_TIMEOUT`] 2 s, the same as the overall bound: every script decides
//!   in well under a millisecond and the largest command (the stock load's MULTI) takes
//!   tens of ms, but a shorter per-attempt timeout only throws replies away: the crate
//!   does not re-send a command whose reply timed out (measured: a 1.2 s script under a
//!   1 s response timeout ran once and the caller got "timed out" at the overall bound),
//!   so a Redis stall of 1-2 s turned reserved orders into 503s. Retries happen on
//!   connection errors, MOVED/ASK, TRYAGAIN and CLUSTERDOWN, not on a slow reply.
//! - [`CLUSTER_OVERALL_TIMEOUT`] 2 s for a whole request, retries and redirections
//!   included: what the buyer waits at worst before a 503. A failover (~4 s) is not
//!   ridden out: requests in its first ~2 s get 503, later ones reach the new master.
//! - [`CLUSTER_RETRIES`] 5, waits drawn from 50 ms up to `min(500 ms, 50 ms * 2^n)`: a
//!   MOVED after a failover or migration is followed within ~50 ms, and five retries
//!   with those waits fit the overall bound.
//!
//! A request the client retries after a dropped connection may have run on the server
//! already: every script is idempotent by order id (see `lua/*.lua`), so running one
//! twice changes nothing the first run did not. The standalone connection
//! ([`ConnectionManager`]) never re-sends a command; it reconnects for the next one.

use redis::{
    Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr},
};
use std::time::Duration;

use super::Keys;

/// See the module doc.
pub const CLUSTER_CONNECTION_TIMEOUT: Duration = Duration::from_millis(500);
/// See the module doc.
pub const CLUSTER_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// See the module doc.
pub const CLUSTER_OVERALL_TIMEOUT: Duration = Duration::from_secs(2);
/// See the module doc.
pub const CLUSTER_RETRIES: u32 = 5;
/// Shortest wait before a retry (ms); see the module doc.
pub const CLUSTER_MIN_RETRY_WAIT_MS: u64 = 50;
/// Longest wait before a retry (ms); see the module doc.
pub const CLUSTER_MAX_RETRY_WAIT_MS: u64 = 500;

/// Where `FLOODGATE_REDIS_URL` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One URL: one Redis server.
    Server(String),
    /// Two or more URLs: seed nodes of one Redis Cluster (the client learns the rest).
    Cluster(Vec<String>),
}

impl Target {
    /// Parses `FLOODGATE_REDIS_URL`: one URL, or a comma-separated list of two or more
    /// `redis://` (or `rediss://`) URLs of one cluster's nodes. The error names what is
    /// wrong, without echoing a password.
    pub fn parse(s: &str) -> Result<Self, String> {
        let urls: Vec<&str> = s.split(',').map(str::trim).collect();
        if urls.iter().any(|u| u.is_empty()) {
            return Err(
                "an empty entry: one URL, or a comma-separated list of cluster nodes".into(),
            );
        }
        for (i, u) in urls.iter().enumerate() {
            let info = u
                .into_connection_info()
                .map_err(|e| format!("entry {} is not a Redis URL: {}", i + 1, e.category()))?;
            if urls.len() > 1 {
                if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                    return Err(format!(
                        "entry {}: a cluster node is redis://host:port or rediss://host:port",
                        i + 1
                    ));
                }
                if info.redis_settings().db() != 0 {
                    return Err(format!(
                        "entry {}: Redis Cluster has only database 0",
                        i + 1
                    ));
                }
            }
        }
        let mut seen = urls.clone();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != urls.len() {
            return Err("a cluster node is listed twice".into());
        }
        Ok(match urls.as_slice() {
            [one] => Self::Server((*one).to_owned()),
            _ => Self::Cluster(urls.iter().map(|u| (*u).to_owned()).collect()),
        })
    }
}

/// A connection to the deployment's Redis: multiplexed, reconnecting, cheap to clone
/// (clones share the connection). Pass `&mut` of a clone to any `ConnectionLike` API.
#[derive(Clone)]
pub enum Redis {
    /// One server: today's connection manager.
    Server(ConnectionManager),
    /// A Redis Cluster: one multiplexed connection per node, routed by key slot.
    Cluster(ClusterConnection),
}

/// Connects to what `url` names (see [`Target::parse`]).
pub async fn connect(url: &str) -> RedisResult<Redis> {
    let target = Target::parse(url).map_err(|reason| {
        RedisError::from((
            ErrorKind::InvalidClientConfig,
            "FLOODGATE_REDIS_URL",
            reason,
        ))
    })?;
    match target {
        Target::Server(url) => {
            let client = redis::Client::open(url)?;
            let cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(3)))
                .set_response_timeout(Some(Duration::from_secs(3)))
                .set_number_of_retries(2);
            Ok(Redis::Server(
                ConnectionManager::new_with_config(client, cfg).await?,
            ))
        }
        Target::Cluster(nodes) => {
            let client = ClusterClientBuilder::new(nodes)
                .connection_timeout(CLUSTER_CONNECTION_TIMEOUT)
                .response_timeout(CLUSTER_RESPONSE_TIMEOUT)
                .overall_response_timeout(Some(CLUSTER_OVERALL_TIMEOUT))
                .retries(CLUSTER_RETRIES)
                .min_retry_wait(CLUSTER_MIN_RETRY_WAIT_MS)
                .max_retry_wait(CLUSTER_MAX_RETRY_WAIT_MS)
                .retry_wait_formula(CLUSTER_MIN_RETRY_WAIT_MS, 2)
                .build()?;
            Ok(Redis::Cluster(client.get_async_connection().await?))
        }
    }
}

/// SCAN's COUNT hint: keys examined per step.
const SCAN_COUNT: usize = 1_000;

impl Redis {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Runs `cmd` on the master of the namespace's slot. For commands that name no key
    /// (`SCAN`, `WAIT`, `PING`): a cluster client would send them to a random node or to
    /// every master.
    pub async fn on_namespace_node<T: redis::FromRedisValue>(
        &mut self,
        keys: &Keys,
        cmd: &Cmd,
    ) -> RedisResult<T> {
        match self {
            Self::Server(c) => cmd.query_async(c).await,
            Self::Cluster(c) => {
                let route = Route::with_key(keys.epoch(), SlotAddr::Master);
                let v = c
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?;
                Ok(redis::from_redis_value(v)?)
            }
        }
    }

    /// One PING to the node that holds the namespace.
    pub async fn ping(&mut self, keys: &Keys) -> RedisResult<()> {
        let _: String = self.on_namespace_node(keys, &redis::cmd("PING")).await?;
        Ok(())
    }

    /// Every key of the namespace (`SCAN` on its slot's node: never `KEYS`, which blocks
    /// the server for the whole keyspace). For tools and tests.
    pub async fn namespace_keys(&mut self, keys: &Keys) -> RedisResult<Vec<String>> {
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(keys.pattern())
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let (next, batch): (u64, Vec<String>) = self.on_namespace_node(keys, &cmd).await?;
            out.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Deletes every key of the namespace; returns how many. For tools and tests.
    pub async fn delete_namespace(&mut self, keys: &Keys) -> RedisResult<usize> {
        let all = self.namespace_keys(keys).await?;
        for chunk in all.chunks(SCAN_COUNT) {
            let _: i64 = redis::cmd("DEL").arg(chunk).query_async(self).await?;
        }
        Ok(all.len())
    }

    /// Waits until `replicas` replicas of the namespace's node have every write that
    /// node made before this call (reservations and queued marks sent on any connection
    /// and answered before it), or `timeout` passes; returns how many have.
    ///
    /// `WAIT` counts only the writes of its own connection, and blocks that connection
    /// while it waits: so this sends a write of its own first (`INCR` of
    /// [`Keys::replication_probe`]), then `WAIT`, in one round trip. Replication is one
    /// ordered stream per master, so a replica that has the probe has everything before
    /// it. Call it on a connection of its own, not the one the order path shares.
    pub async fn wait_replicas(
        &mut self,
        keys: &Keys,
        replicas: u32,
        timeout: Duration,
    ) -> RedisResult<u32> {
        let mut pipe = redis::pipe();
        pipe.cmd("INCR")
            .arg(keys.replication_probe())
            .ignore()
            .cmd("WAIT")
            .arg(replicas)
            .arg(timeout.as_millis().max(1) as u64);
        let (n,): (u32,) = pipe.query_async(self).await?;
        Ok(n)
    }
}

/// `FLOODGATE_REDIS_WAIT_REPLICAS`: how many replicas must have a write before it counts
/// (a reservation before its 202, a move between buckets before its next half).
#[derive(Clone)]
pub struct ReplicaWait {
    /// A connection of its own: `WAIT` blocks the connection it runs on.
    pub redis: Redis,
    pub replicas: u32,
    pub timeout: Duration,
}

impl ReplicaWait {
    /// None when the configuration asks for no replica.
    pub async fn from_config(cfg: &crate::Config) -> RedisResult<Option<Self>> {
        if cfg.redis_wait_replicas == 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            redis: connect(&cfg.redis_url).await?,
            replicas: cfg.redis_wait_replicas,
            timeout: cfg.redis_wait_timeout,
        }))
    }

    /// True when enough replicas of `keys`' node have every write it made before this
    /// call; false when they do not within the timeout, or the `WAIT` failed.
    pub async fn holds(&self, keys: &Keys) -> bool {
        let mut redis = self.redis.clone();
        matches!(
            redis.wait_replicas(keys, self.replicas, self.timeout).await,
            Ok(n) if n >= self.replicas
        )
    }
}

impl ConnectionLike for Redis {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Server(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Server(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Server(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_is_a_server_a_list_is_a_cluster() {
        let table: &[(&str, Result<Target, &str>)] = &[
            (
                "redis://127.0.0.1:6379",
                Ok(Target::Server("redis://127.0.0.1:6379".into())),
            ),
            (
                "redis://127.0.0.1:6379/3",
                Ok(Target::Server("redis://127.0.0.1:6379/3".into())),
            ),
            (
                "redis://a:7000, redis://b:7001",
                Ok(Target::Cluster(vec![
                    "redis://a:7000".into(),
                    "redis://b:7001".into(),
                ])),
            ),
            ("redis://a:7000,", Err("an empty entry")),
            ("", Err("an empty entry")),
            ("redis://a:7000,nonsense", Err("entry 2 is not a Redis URL")),
            ("redis://a:7000,redis://a:7000", Err("listed twice")),
            ("redis://a:7000,redis://b:7001/2", Err("only database 0")),
            (
                "redis://a:7000,redis+unix:///tmp/r.sock",
                Err("entry 2: a cluster node is redis://"),
            ),
        ];
        for (input, want) in table {
            let got = Target::parse(input);
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(w, g, "{input}"),
                (Err(w), Err(g)) => assert!(g.contains(w), "{input}: {g}"),
                _ => panic!("{input}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn a_password_is_not_echoed() {
        let e = Target::parse("redis://:hunter2@a:7000,redis://:hunter2@a:7000").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
