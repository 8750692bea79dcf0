//! Configuration from `FLOODGATE_*` environment variables, validated once at start-up.
//!
//! [`VARS`] lists every variable any floodgate process reads, with its default and
//! meaning: the services' `--help` prints it, and a process warns at start about a set
//! `FLOODGATE_*` variable that is not in it (a typo would otherwise be ignored silently).

use std::{fmt, net::SocketAddr, str::FromStr, sync::Once, time::Duration};

/// One configuration variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Var {
    pub name: &'static str,
    /// The value used when it is unset, as an operator would write it; `""` when it is
    /// required or unset by default (`about` says which).
    pub default: &'static str,
    /// What it means, in one line.
    pub about: &'static str,
}

/// Every `FLOODGATE_*` variable a floodgate process (a service or the `floodgate`
/// command) reads. The tests below fail when a reader uses a name missing here, when a
/// default here differs from the one [`Config`] applies, or when README's configuration
/// table and this list disagree.
pub const VARS: &[Var] = &[
    Var {
        name: "FLOODGATE_NAMESPACE",
        default: "floodgate",
        about: "prefix of every Redis key, AMQP name and the PostgreSQL schema; [a-z][a-z0-9_]{0,39}",
    },
    Var {
        name: "FLOODGATE_REDIS_URL",
        default: "redis://127.0.0.1:6379",
        about: "Redis: one URL, or a comma-separated list of two or more redis:// URLs = seed nodes of a Redis Cluster",
    },
    Var {
        name: "FLOODGATE_REDIS_WAIT_REPLICAS",
        default: "0",
        about: "replicas that must have an order's reservation (Redis WAIT) before its 202; 0 = do not wait",
    },
    Var {
        name: "FLOODGATE_REDIS_WAIT_TIMEOUT_MS",
        default: "50",
        about: "how long a 202 waits for those replicas; past it the order is answered 202 anyway and counted",
    },
    Var {
        name: "FLOODGATE_REDIS_SHARDS",
        default: "1",
        about: "hash slots (1-64) a namespace's SKUs spread over, each its own key set; every process must agree (change it only as OPERATIONS.md says)",
    },
    Var {
        name: "FLOODGATE_AMQP_URL",
        default: "amqp://guest:guest@127.0.0.1:5672/%2f",
        about: "RabbitMQ: one URI, or the comma-separated URIs of one cluster's nodes (every connection rotates over them)",
    },
    Var {
        name: "FLOODGATE_INTAKE_PARTITIONS",
        default: "1",
        about: "intake quorum queues (1..=64), an order's chosen by its first SKU; the same on every process of a namespace",
    },
    Var {
        name: "FLOODGATE_DATABASE_URL",
        default: "postgres://postgres@127.0.0.1:5432/floodgate",
        about: "PostgreSQL; `floodgate migrate` creates the database if missing",
    },
    Var {
        name: "FLOODGATE_DATABASE_REPLICA_URL",
        default: "",
        about: "optional streaming replica for order-status reads; a read uses it only when it has replayed every commit made before the request",
    },
    Var {
        name: "FLOODGATE_JWT_SECRET",
        default: "",
        about: "required: HS256 secret(s), comma-separated, each >= 32 bytes; the first signs, all verify",
    },
    Var {
        name: "FLOODGATE_JWT_ISSUER",
        default: "",
        about: "unset by default; when set, tokens must carry this `iss`",
    },
    Var {
        name: "FLOODGATE_JWT_AUDIENCE",
        default: "",
        about: "unset by default; when set, tokens must carry this `aud`",
    },
    Var {
        name: "FLOODGATE_INGRESS_ADDR",
        default: "0.0.0.0:8080",
        about: "ingress listen address",
    },
    Var {
        name: "FLOODGATE_WORKER_ADDR",
        default: "0.0.0.0:8082",
        about: "worker health/metrics address",
    },
    Var {
        name: "FLOODGATE_RESERVATION_TTL_SECS",
        default: "30",
        about: "how long a reservation whose publish was never confirmed holds its stock",
    },
    Var {
        name: "FLOODGATE_WAITLIST_TTL_SECS",
        default: "3600",
        about: "how long a waitlisted order waits for units before it fails as waitlist_expired",
    },
    Var {
        name: "FLOODGATE_WEBHOOK_RETRY_SECS",
        default: "1,5,30,120,600,1800,7200",
        about: "webhook retry schedule: the delay before each retry of a failed delivery (seconds, fractions allowed; each delay is jittered +-20 %); past the last the delivery is dead",
    },
    Var {
        name: "FLOODGATE_WEBHOOK_TIMEOUT_MS",
        default: "10000",
        about: "one webhook request's whole time (connect, send, answer); past it the attempt failed",
    },
    Var {
        name: "FLOODGATE_WEBHOOK_CONCURRENCY",
        default: "16",
        about: "webhook requests one worker has in flight per endpoint at most",
    },
    Var {
        name: "FLOODGATE_WEBHOOK_BREAKER_FAILURES",
        default: "10",
        about: "consecutive failed deliveries that open an endpoint's circuit",
    },
    Var {
        name: "FLOODGATE_WEBHOOK_BREAKER_COOLDOWN_MS",
        default: "10000",
        about: "how long an open circuit waits before one half-open probe",
    },
    Var {
        name: "FLOODGATE_WEBHOOK_ALLOW_PRIVATE",
        default: "false",
        about: "true lets webhooks reach loopback and private addresses (tests, a platform on the same network); refused by default (SSRF)",
    },
    Var {
        name: "FLOODGATE_WEBHOOK_RETENTION_HOURS",
        default: "168",
        about: "how long webhook attempts, delivered deliveries, a deleted webhook's deliveries and the events they name are kept (hours, 0 keeps them all); a live webhook's pending and dead deliveries are never pruned",
    },
    Var {
        name: "FLOODGATE_IDEMPOTENCY_TTL_SECS",
        default: "86400",
        about: "how long an Idempotency-Key is remembered",
    },
    Var {
        name: "FLOODGATE_SOLD_OUT_CACHE_MS",
        default: "250",
        about: "an ingress refuses key-less orders for a SKU it saw sold out without asking Redis, for this long (the staleness bound; 0 = always ask)",
    },
    Var {
        name: "FLOODGATE_PUBLISH_TIMEOUT_MS",
        default: "5000",
        about: "wait for a publisher confirm before releasing and answering 503",
    },
    Var {
        name: "FLOODGATE_PUBLISH_CHANNELS",
        default: "4",
        about: "confirm-mode channels per ingress",
    },
    Var {
        name: "FLOODGATE_RATE_LIMIT_PER_SEC",
        default: "20",
        about: "orders per second per user per ingress (0 = off)",
    },
    Var {
        name: "FLOODGATE_RATE_LIMIT_BURST",
        default: "40",
        about: "burst above the per-user rate",
    },
    Var {
        name: "FLOODGATE_MAX_IN_FLIGHT",
        default: "1024",
        about: "API requests one ingress works on at once; past it 503 at once",
    },
    Var {
        name: "FLOODGATE_IP_RATE_LIMIT_PER_SEC",
        default: "50",
        about: "requests per second per client address on the public routes (0 = off)",
    },
    Var {
        name: "FLOODGATE_IP_RATE_LIMIT_BURST",
        default: "200",
        about: "burst above the per-address rate",
    },
    Var {
        name: "FLOODGATE_WORKER_PREFETCH",
        default: "1000",
        about: "unacked deliveries a worker holds",
    },
    Var {
        name: "FLOODGATE_WORKER_PIPELINE",
        default: "4",
        about: "batches one worker keeps in flight (1..=64, less than FLOODGATE_DB_POOL_SIZE)",
    },
    Var {
        name: "FLOODGATE_BATCH_SIZE",
        default: "200",
        about: "orders per commit at most (1..=5000)",
    },
    Var {
        name: "FLOODGATE_BATCH_MAX_WAIT_MS",
        default: "20",
        about: "how long a worker waits to fill a batch",
    },
    Var {
        name: "FLOODGATE_DB_POOL_SIZE",
        default: "16",
        about: "PostgreSQL connections per process",
    },
    Var {
        name: "FLOODGATE_DB_LOCK_TIMEOUT_MS",
        default: "5000",
        about: "a statement waiting this long for a row lock fails (transiently)",
    },
    Var {
        name: "FLOODGATE_RETRY_DELAYS_MS",
        default: "1000,5000,30000,120000",
        about: "scheduled-retry delays (1-10 steps, jittered); after the last, dead-lettered",
    },
    Var {
        name: "FLOODGATE_REAPER_INTERVAL_MS",
        default: "1000",
        about: "how often each worker looks for reservations past their deadline",
    },
    Var {
        name: "FLOODGATE_OUTBOX_POLL_MS",
        default: "250",
        about: "how often the outbox relay looks for events other processes wrote",
    },
    Var {
        name: "FLOODGATE_CONSISTENCY_CHECK_SECS",
        default: "60",
        about: "how often one worker checks Redis against PostgreSQL for the consistency gauges (0 = off)",
    },
    Var {
        name: "FLOODGATE_NOTIFIER_ADDR",
        default: "0.0.0.0:8081",
        about: "notifier listen address",
    },
    Var {
        name: "FLOODGATE_STOCK_INTERVAL_MS",
        default: "100",
        about: "how often the notifier samples changed stock levels (>= 10)",
    },
    Var {
        name: "FLOODGATE_SUBSCRIBER_BUFFER",
        default: "1024",
        about: "order events queued per subscriber before it is disconnected (>= 500 and FLOODGATE_BATCH_SIZE)",
    },
    Var {
        name: "FLOODGATE_MAX_SUBSCRIBERS",
        default: "20000",
        about: "streams one notifier serves; past it 503",
    },
    Var {
        name: "FLOODGATE_SUBSCRIBER_SEND_BUFFER_BYTES",
        default: "65536",
        about: "kernel send buffer per notifier connection (>= 4096)",
    },
    Var {
        name: "FLOODGATE_KEEPALIVE_SECS",
        default: "15",
        about: "SSE keep-alive and WebSocket ping interval",
    },
    Var {
        name: "FLOODGATE_PUBLIC_INGRESS_URL",
        default: "http://127.0.0.1:8080",
        about: "ingress as a browser sees it (the live page's test orders)",
    },
    Var {
        name: "FLOODGATE_CORS_ORIGINS",
        default: "*",
        about: "origins ingress answers CORS requests from (`*` or a comma-separated list)",
    },
    Var {
        name: "FLOODGATE_LOG",
        default: "info",
        about: "log filter (tracing env-filter syntax)",
    },
    Var {
        name: "FLOODGATE_LOG_FORMAT",
        default: "json",
        about: "`pretty` for human-readable logs",
    },
    Var {
        name: "FLOODGATE_TEST_FAILPOINT",
        default: "",
        about: "tests only: makes the worker's outbox relay abort or panic at a chosen point; never set it",
    },
];

/// The entry of `name` in [`VARS`].
pub fn var(name: &str) -> Option<&'static Var> {
    VARS.iter().find(|v| v.name == name)
}

/// Each name of `names` that starts with `FLOODGATE_` but is not in [`VARS`], with the
/// known name it most likely misspells (None when none is reasonably close).
pub fn unknown_vars<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Vec<(&'a str, Option<&'static str>)> {
    names
        .into_iter()
        .filter(|n| n.starts_with("FLOODGATE_") && var(n).is_none())
        .map(|n| (n, closest_var(n)))
        .collect()
}

/// The known variable `name` most likely misspells: the nearest by Damerau-Levenshtein
/// distance (typos, swapped letters) if it is within a third of the name, else the
/// nearest by Jaro-Winkler similarity (a name cut short or extended) if that is at least
/// 0.9. Compared without the common `FLOODGATE_` prefix, which would make every name
/// look alike.
pub fn closest_var(name: &str) -> Option<&'static str> {
    let strip = |n: &'static str| n.trim_start_matches("FLOODGATE_");
    let typed = name.trim_start_matches("FLOODGATE_");
    let (best, distance) = VARS
        .iter()
        .map(|v| (v.name, strsim::damerau_levenshtein(typed, strip(v.name))))
        .min_by_key(|(_, d)| *d)?;
    if distance <= (typed.chars().count() / 3).max(1) {
        return Some(best);
    }
    VARS.iter()
        .map(|v| (v.name, strsim::jaro_winkler(typed, strip(v.name))))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .filter(|(_, score)| *score >= 0.9)
        .map(|(n, _)| n)
}

/// What an operator is told about a set variable `name` that nothing reads.
pub fn unknown_var_message(name: &str, closest: Option<&str>) -> String {
    match closest {
        Some(known) => {
            format!("unknown configuration variable {name} is ignored; did you mean {known}?")
        }
        None => format!(
            "unknown configuration variable {name} is ignored (`--help` of a service lists every one)"
        ),
    }
}

/// The set `FLOODGATE_*` environment variables that nothing reads, with the known one
/// each most likely misspells.
pub fn unknown_env() -> Vec<(String, Option<&'static str>)> {
    let set: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .collect();
    unknown_vars(set.iter().map(String::as_str))
        .into_iter()
        .map(|(n, c)| (n.to_owned(), c))
        .collect()
}

/// Logs a warning (once per process) for every set `FLOODGATE_*` environment variable
/// that nothing reads, naming the known one it most likely misspells. Every service
/// gets it from [`crate::telemetry::init_service`], once logging is set up.
pub fn warn_unknown_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for (name, closest) in unknown_env() {
            tracing::warn!(
                variable = name,
                did_you_mean = closest,
                "{}",
                unknown_var_message(&name, closest)
            );
        }
    });
}

/// Why a configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}: {reason}")]
    Invalid { var: &'static str, reason: String },
}

/// The name every external object is derived from: Redis keys (`{ns}:...`), AMQP
/// exchanges and queues (`ns.orders`...) and the PostgreSQL schema. Lower-case letters,
/// digits and `_`, starting with a letter, at most 40 characters, so it is a valid schema
/// name without quoting.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Namespace(String);

impl Namespace {
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 40
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a namespace: 1-40 of [a-z0-9_], starting with a letter"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A secret that never shows up in `Debug` output or logs.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The shortest HS256 secret accepted: 32 bytes, the hash's own output size (RFC 7518
/// section 3.2 asks for at least that much key).
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// Every setting of every floodgate process. Read with [`Config::from_env`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Prefix of every Redis key, AMQP name and the PostgreSQL schema.
    pub namespace: Namespace,
    /// `FLOODGATE_REDIS_URL`: one server, or a cluster's seed nodes (checked at start-up
    /// by [`crate::redis::Target::parse`]).
    pub redis_url: String,
    /// Replicas that must acknowledge an order's reservation and queued mark before its
    /// 202 (`WAIT`), so a failover cannot lose it; 0 = answer without waiting.
    pub redis_wait_replicas: u32,
    /// The longest a 202 waits for them.
    pub redis_wait_timeout: Duration,
    /// `FLOODGATE_REDIS_SHARDS` (1..=64): the hash slots a namespace's SKUs spread over
    /// ([`crate::redis::Shards`]). Every process of a namespace must agree on it; Redis
    /// records the count it was loaded with and a process with another refuses to start.
    pub redis_shards: usize,
    /// `FLOODGATE_AMQP_URL`: one AMQP URI, or the comma-separated URIs of one cluster's
    /// nodes ([`crate::amqp::Nodes`], checked here at start-up); every connection rotates
    /// over them on connect and reconnect.
    pub amqp_url: String,
    /// Intake quorum queues (`FLOODGATE_INTAKE_PARTITIONS`, 1..=64): partition 0 is
    /// `<ns>.orders.intake`, partition i `<ns>.orders.intake.<i>`; an order goes to the
    /// one [`crate::amqp::partition_of`] its first SKU picks, and every worker consumes
    /// them all. Every process of a namespace must agree on it (see OPERATIONS.md for
    /// changing it).
    pub intake_partitions: usize,
    /// `FLOODGATE_DATABASE_URL`; the schema comes from the namespace.
    pub database_url: String,
    /// `FLOODGATE_DATABASE_REPLICA_URL`: a streaming replica that order-status reads may
    /// use (see `db::Reads`); writes always go to `database_url`.
    pub database_replica_url: Option<String>,
    /// HS256 secret that signs JWTs: the first of `FLOODGATE_JWT_SECRET`.
    pub jwt_secret: Secret,
    /// Every secret that verifies JWTs, the signing one first: `FLOODGATE_JWT_SECRET` is a
    /// comma-separated list, so a new secret can sign while tokens signed with the old
    /// one still verify until they expire (rotation).
    pub jwt_verify_secrets: Vec<Secret>,
    /// When set (`FLOODGATE_JWT_ISSUER`), tokens must carry this `iss`, and minted ones do.
    pub jwt_issuer: Option<String>,
    /// When set (`FLOODGATE_JWT_AUDIENCE`), tokens must carry this `aud`, and minted ones do.
    pub jwt_audience: Option<String>,
    /// Where ingress listens (`FLOODGATE_INGRESS_ADDR`).
    pub ingress_addr: SocketAddr,
    /// Where the worker serves health and metrics (`FLOODGATE_WORKER_ADDR`).
    pub worker_addr: SocketAddr,
    /// How long a reservation whose publish is not confirmed holds its stock before the
    /// reaper returns it (ingress died between the reserve and the confirm). A confirmed
    /// order's reservation never expires: it waits for a worker however long that takes.
    pub reservation_ttl: Duration,
    /// How long a waitlisted order waits for units before it fails `waitlist_expired`
    /// (`FLOODGATE_WAITLIST_TTL_SECS`).
    pub waitlist_ttl: Duration,
    /// How long an Idempotency-Key is remembered.
    pub idempotency_ttl: Duration,
    /// How long ingress waits for a publisher confirm before it gives up and releases.
    pub publish_timeout: Duration,
    /// `FLOODGATE_SOLD_OUT_CACHE_MS`: how long an ingress answers `sold_out` for a SKU
    /// from memory after Redis said it has none left (zero: never).
    pub sold_out_cache: Duration,
    /// Publisher channels per ingress process; confirms are pipelined on each.
    pub publish_channels: usize,
    /// Orders per second per user at one ingress; 0 turns the limiter off.
    pub rate_limit_per_sec: u32,
    /// Burst allowed above the per-user rate.
    pub rate_limit_burst: u32,
    /// Requests one ingress works on at once (`FLOODGATE_MAX_IN_FLIGHT`); past it a
    /// request is shed at once with 503 and `Retry-After`, never queued.
    pub max_in_flight: usize,
    /// Requests per second per client IP on the public, unauthenticated routes (stock
    /// reads, stream subscriptions), `FLOODGATE_IP_RATE_LIMIT_PER_SEC`; 0 turns it off
    /// (behind a proxy every client has the proxy's address: limit there instead).
    pub ip_rate_limit_per_sec: u32,
    /// Burst allowed above the per-IP rate.
    pub ip_rate_limit_burst: u32,
    /// Unacknowledged deliveries a worker holds at once.
    pub worker_prefetch: u16,
    /// Orders committed in one transaction at most.
    pub batch_size: usize,
    /// How long a worker waits to fill a batch after its first message.
    pub batch_max_wait: Duration,
    /// Batches one worker process keeps in flight (`FLOODGATE_WORKER_PIPELINE`): while
    /// one waits for its COMMIT the next is claimed and written, so the commit latency
    /// does not bound the drain rate.
    pub worker_pipeline: usize,
    /// PostgreSQL connections per process.
    pub db_pool_size: usize,
    /// How long a worker statement waits for a row lock before it fails (transiently).
    pub db_lock_timeout: Duration,
    /// Delay before each scheduled retry of a message that failed transiently; one delay
    /// queue per step. After the last step the message is dead-lettered.
    pub retry_delays: Vec<Duration>,
    /// How often the reaper looks for reservations past their deadline.
    pub reaper_interval: Duration,
    /// How often the outbox relay looks for events another process committed (events of
    /// its own worker's commits wake it at once).
    pub outbox_poll: Duration,
    /// How often a worker runs the invariant check of `floodgate reconcile --check` for
    /// the consistency gauges (`FLOODGATE_CONSISTENCY_CHECK_SECS`); None turns it off.
    /// One worker of a namespace at a time (an advisory lock); the others skip the turn.
    pub consistency_check: Option<Duration>,
    /// Where the notifier listens (`FLOODGATE_NOTIFIER_ADDR`).
    pub notifier_addr: SocketAddr,
    /// How often the notifier samples changed stock levels: a subscriber gets the latest
    /// level of each SKU at most this often.
    pub stock_interval: Duration,
    /// Order events queued per subscriber before it counts as too slow and is
    /// disconnected (stock levels conflate and never fill it). Events arrive in bursts
    /// of a committed batch (`FLOODGATE_BATCH_SIZE`), so keep it well above that.
    pub subscriber_buffer: usize,
    /// Subscribers one notifier serves at most; past it new streams get 503.
    pub max_subscribers: usize,
    /// Kernel send buffer per notifier connection, so a client that stops reading is
    /// found out after this many bytes, not after megabytes of autotuned buffer.
    pub subscriber_send_buffer: usize,
    /// SSE keep-alive comment and WebSocket ping interval.
    pub keepalive: Duration,
    /// The ingress URL the live page places test orders against (as a browser sees it).
    pub public_ingress_url: String,
    /// Webhook delivery (the webhook variables of [`VARS`]).
    pub webhooks: WebhookSettings,
    /// Origins ingress answers CORS requests from: `*` (any; tokens are bearer headers,
    /// never cookies) or a comma-separated list.
    pub cors_origins: Vec<String>,
}

impl Config {
    /// The namespace's Redis shards ([`crate::redis::Shards`]).
    pub fn shards(&self) -> crate::redis::Shards {
        crate::redis::Shards::new(&self.namespace, self.redis_shards)
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Builds a config from any lookup; tests pass a map.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        fn parsed<T: FromStr>(
            get: &impl Fn(&str) -> Option<String>,
            var: &'static str,
            default: T,
        ) -> Result<T, ConfigError>
        where
            T::Err: fmt::Display,
        {
            match get(var) {
                None => Ok(default),
                Some(v) => v.trim().parse().map_err(|e: T::Err| ConfigError::Invalid {
                    var,
                    reason: format!("{v:?}: {e}"),
                }),
            }
        }
        let string = |var: &str, default: &str| get(var).unwrap_or_else(|| default.to_owned());
        let ms = |var, default| parsed(&get, var, default).map(Duration::from_millis);
        let secs = |var, default| parsed(&get, var, default).map(Duration::from_secs);

        let namespace =
            Namespace::parse(&string("FLOODGATE_NAMESPACE", "floodgate")).map_err(|reason| {
                ConfigError::Invalid {
                    var: "FLOODGATE_NAMESPACE",
                    reason,
                }
            })?;
        let jwt_verify_secrets = jwt_secrets(get("FLOODGATE_JWT_SECRET"))?;
        let optional = |var: &str| {
            get(var)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let cfg = Config {
            namespace,
            redis_url: string("FLOODGATE_REDIS_URL", "redis://127.0.0.1:6379"),
            redis_wait_replicas: parsed(&get, "FLOODGATE_REDIS_WAIT_REPLICAS", 0)?,
            redis_wait_timeout: ms("FLOODGATE_REDIS_WAIT_TIMEOUT_MS", 50)?,
            redis_shards: parsed(&get, "FLOODGATE_REDIS_SHARDS", 1)?,
            amqp_url: string(
                "FLOODGATE_AMQP_URL",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ),
            intake_partitions: parsed(&get, "FLOODGATE_INTAKE_PARTITIONS", 1)?,
            database_url: string(
                "FLOODGATE_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/floodgate",
            ),
            database_replica_url: optional("FLOODGATE_DATABASE_REPLICA_URL"),
            jwt_secret: jwt_verify_secrets[0].clone(),
            jwt_verify_secrets,
            jwt_issuer: optional("FLOODGATE_JWT_ISSUER"),
            jwt_audience: optional("FLOODGATE_JWT_AUDIENCE"),
            ingress_addr: parsed(&get, "FLOODGATE_INGRESS_ADDR", ([0, 0, 0, 0], 8080).into())?,
            worker_addr: parsed(&get, "FLOODGATE_WORKER_ADDR", ([0, 0, 0, 0], 8082).into())?,
            reservation_ttl: secs("FLOODGATE_RESERVATION_TTL_SECS", 30)?,
            waitlist_ttl: secs("FLOODGATE_WAITLIST_TTL_SECS", 3_600)?,
            idempotency_ttl: secs("FLOODGATE_IDEMPOTENCY_TTL_SECS", 86_400)?,
            publish_timeout: ms("FLOODGATE_PUBLISH_TIMEOUT_MS", 5_000)?,
            sold_out_cache: ms("FLOODGATE_SOLD_OUT_CACHE_MS", 250)?,
            publish_channels: parsed(&get, "FLOODGATE_PUBLISH_CHANNELS", 4)?,
            rate_limit_per_sec: parsed(&get, "FLOODGATE_RATE_LIMIT_PER_SEC", 20)?,
            rate_limit_burst: parsed(&get, "FLOODGATE_RATE_LIMIT_BURST", 40)?,
            max_in_flight: parsed(&get, "FLOODGATE_MAX_IN_FLIGHT", 1_024)?,
            ip_rate_limit_per_sec: parsed(&get, "FLOODGATE_IP_RATE_LIMIT_PER_SEC", 50)?,
            ip_rate_limit_burst: parsed(&get, "FLOODGATE_IP_RATE_LIMIT_BURST", 200)?,
            worker_prefetch: parsed(&get, "FLOODGATE_WORKER_PREFETCH", 1000)?,
            batch_size: parsed(&get, "FLOODGATE_BATCH_SIZE", 200)?,
            batch_max_wait: ms("FLOODGATE_BATCH_MAX_WAIT_MS", 20)?,
            worker_pipeline: parsed(&get, "FLOODGATE_WORKER_PIPELINE", 4)?,
            db_pool_size: parsed(&get, "FLOODGATE_DB_POOL_SIZE", 16)?,
            db_lock_timeout: ms("FLOODGATE_DB_LOCK_TIMEOUT_MS", 5_000)?,
            retry_delays: delays(&string(
                "FLOODGATE_RETRY_DELAYS_MS",
                "1000,5000,30000,120000",
            ))?,
            reaper_interval: ms("FLOODGATE_REAPER_INTERVAL_MS", 1_000)?,
            outbox_poll: ms("FLOODGATE_OUTBOX_POLL_MS", 250)?,
            consistency_check: Some(secs("FLOODGATE_CONSISTENCY_CHECK_SECS", 60)?)
                .filter(|d| !d.is_zero()),
            notifier_addr: parsed(&get, "FLOODGATE_NOTIFIER_ADDR", ([0, 0, 0, 0], 8081).into())?,
            stock_interval: ms("FLOODGATE_STOCK_INTERVAL_MS", 100)?,
            subscriber_buffer: parsed(&get, "FLOODGATE_SUBSCRIBER_BUFFER", 1_024)?,
            max_subscribers: parsed(&get, "FLOODGATE_MAX_SUBSCRIBERS", 20_000)?,
            subscriber_send_buffer: parsed(&get, "FLOODGATE_SUBSCRIBER_SEND_BUFFER_BYTES", 65_536)?,
            keepalive: secs("FLOODGATE_KEEPALIVE_SECS", 15)?,
            public_ingress_url: string("FLOODGATE_PUBLIC_INGRESS_URL", "http://127.0.0.1:8080"),
            webhooks: WebhookSettings {
                retry: webhook_retry(&string(
                    "FLOODGATE_WEBHOOK_RETRY_SECS",
                    "1,5,30,120,600,1800,7200",
                ))?,
                timeout: ms("FLOODGATE_WEBHOOK_TIMEOUT_MS", 10_000)?,
                concurrency: parsed(&get, "FLOODGATE_WEBHOOK_CONCURRENCY", 16)?,
                breaker_failures: parsed(&get, "FLOODGATE_WEBHOOK_BREAKER_FAILURES", 10)?,
                breaker_cooldown: ms("FLOODGATE_WEBHOOK_BREAKER_COOLDOWN_MS", 10_000)?,
                allow_private: parsed(&get, "FLOODGATE_WEBHOOK_ALLOW_PRIVATE", false)?,
                retention: Some(Duration::from_secs(
                    parsed::<u64>(&get, "FLOODGATE_WEBHOOK_RETENTION_HOURS", 168)?
                        .saturating_mul(3600),
                ))
                .filter(|d| !d.is_zero()),
                prune_every: Duration::from_secs(600),
            },
            cors_origins: string("FLOODGATE_CORS_ORIGINS", "*")
                .split(',')
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
        };
        cfg.validate()
    }

    fn validate(self) -> Result<Self, ConfigError> {
        if let Err(reason) = crate::redis::Target::parse(&self.redis_url) {
            return Err(ConfigError::Invalid {
                var: "FLOODGATE_REDIS_URL",
                reason,
            });
        }
        if self.redis_wait_replicas > 0 && self.redis_wait_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                var: "FLOODGATE_REDIS_WAIT_TIMEOUT_MS",
                reason: "must be at least 1 while FLOODGATE_REDIS_WAIT_REPLICAS is set (WAIT 0 waits forever)".into(),
            });
        }
        // A WAIT past the cluster client's bound would always time out client-side and
        // count every batch as short.
        if self.redis_wait_timeout > Duration::from_millis(1_000) {
            return Err(ConfigError::Invalid {
                var: "FLOODGATE_REDIS_WAIT_TIMEOUT_MS",
                reason: "must be at most 1000 (a Redis request is bounded at 2 s)".into(),
            });
        }
        if self.reaper_interval.is_zero() {
            return Err(ConfigError::Invalid {
                var: "FLOODGATE_REAPER_INTERVAL_MS",
                reason: "must be at least 1".into(),
            });
        }
        let bad = |var, reason: &str| {
            Err(ConfigError::Invalid {
                var,
                reason: reason.to_owned(),
            })
        };
        if self.max_in_flight == 0 || self.max_in_flight > 1_000_000 {
            return bad("FLOODGATE_MAX_IN_FLIGHT", "must be 1..=1000000");
        }
        if self.ip_rate_limit_per_sec > 0 && self.ip_rate_limit_burst == 0 {
            return bad(
                "FLOODGATE_IP_RATE_LIMIT_BURST",
                "must be at least 1 while FLOODGATE_IP_RATE_LIMIT_PER_SEC is set",
            );
        }
        if let Err(reason) = crate::amqp::Nodes::parse(&self.amqp_url) {
            return Err(ConfigError::Invalid {
                var: "FLOODGATE_AMQP_URL",
                reason,
            });
        }
        if self.redis_shards == 0 || self.redis_shards > crate::redis::MAX_SHARDS {
            return Err(ConfigError::Invalid {
                var: "FLOODGATE_REDIS_SHARDS",
                reason: format!("must be 1..={}", crate::redis::MAX_SHARDS),
            });
        }
        if self.intake_partitions == 0 || self.intake_partitions > crate::amqp::MAX_PARTITIONS {
            return Err(ConfigError::Invalid {
                var: "FLOODGATE_INTAKE_PARTITIONS",
                reason: format!("must be 1..={}", crate::amqp::MAX_PARTITIONS),
            });
        }
        if self.publish_channels == 0 {
            return bad("FLOODGATE_PUBLISH_CHANNELS", "must be at least 1");
        }
        if self.batch_size == 0 || self.batch_size > 5_000 {
            return bad("FLOODGATE_BATCH_SIZE", "must be 1..=5000");
        }
        if self.worker_pipeline == 0 || self.worker_pipeline > 64 {
            return bad("FLOODGATE_WORKER_PIPELINE", "must be 1..=64");
        }
        // Each batch in flight holds a pooled connection; the relay and the reaper need one.
        if self.worker_pipeline >= self.db_pool_size {
            return Err(ConfigError::Invalid {
                var: "FLOODGATE_WORKER_PIPELINE",
                reason: format!(
                    "must be less than FLOODGATE_DB_POOL_SIZE ({})",
                    self.db_pool_size
                ),
            });
        }
        if self.worker_prefetch == 0 {
            return bad("FLOODGATE_WORKER_PREFETCH", "must be at least 1");
        }
        // The reaper expires only reservations whose publish is unconfirmed; one whose
        // confirm may still arrive must not expire under it, and after the confirm
        // ingress needs time to mark it queued (and clocks differ a little).
        if self.reservation_ttl < self.publish_timeout + Duration::from_secs(2) {
            return Err(ConfigError::Invalid {
                var: "FLOODGATE_RESERVATION_TTL_SECS",
                reason: format!(
                    "must be at least FLOODGATE_PUBLISH_TIMEOUT_MS ({} ms) + 2 s",
                    self.publish_timeout.as_millis()
                ),
            });
        }
        if self.db_pool_size == 0 {
            return bad("FLOODGATE_DB_POOL_SIZE", "must be at least 1");
        }
        if self.outbox_poll.is_zero() {
            return bad("FLOODGATE_OUTBOX_POLL_MS", "must be at least 1");
        }
        if self.stock_interval < Duration::from_millis(10) {
            return bad("FLOODGATE_STOCK_INTERVAL_MS", "must be at least 10");
        }
        // Order events arrive in bursts of up to a committed batch, and the outbox relay
        // publishes up to 500 at once: a smaller buffer would close healthy subscribers.
        if self.subscriber_buffer < self.batch_size.max(500) {
            return Err(ConfigError::Invalid {
                var: "FLOODGATE_SUBSCRIBER_BUFFER",
                reason: format!(
                    "must be at least {} (FLOODGATE_BATCH_SIZE, and the relay's 500-event bursts)",
                    self.batch_size.max(500)
                ),
            });
        }
        if self.max_subscribers == 0 {
            return bad("FLOODGATE_MAX_SUBSCRIBERS", "must be at least 1");
        }
        if self.subscriber_send_buffer < 4_096 {
            return bad(
                "FLOODGATE_SUBSCRIBER_SEND_BUFFER_BYTES",
                "must be at least 4096",
            );
        }
        if self.keepalive.is_zero() {
            return bad("FLOODGATE_KEEPALIVE_SECS", "must be at least 1");
        }
        if self.webhooks.timeout < Duration::from_millis(100) {
            return bad("FLOODGATE_WEBHOOK_TIMEOUT_MS", "must be at least 100");
        }
        if !(1..=256).contains(&self.webhooks.concurrency) {
            return bad("FLOODGATE_WEBHOOK_CONCURRENCY", "must be 1..=256");
        }
        if self.webhooks.breaker_failures == 0 {
            return bad("FLOODGATE_WEBHOOK_BREAKER_FAILURES", "must be at least 1");
        }
        if self.webhooks.breaker_cooldown < Duration::from_millis(100) {
            return bad(
                "FLOODGATE_WEBHOOK_BREAKER_COOLDOWN_MS",
                "must be at least 100",
            );
        }
        if self
            .webhooks
            .retention
            .is_some_and(|d| d > Duration::from_secs(3600 * MAX_RETENTION_HOURS))
        {
            return bad(
                "FLOODGATE_WEBHOOK_RETENTION_HOURS",
                "must be 0 (keep everything) or 1..=87600",
            );
        }
        if !self.public_ingress_url.starts_with("http://")
            && !self.public_ingress_url.starts_with("https://")
        {
            return bad(
                "FLOODGATE_PUBLIC_INGRESS_URL",
                "must start with http:// or https://",
            );
        }
        if self
            .cors_origins
            .iter()
            .any(|o| o != "*" && !o.contains("://"))
        {
            return bad(
                "FLOODGATE_CORS_ORIGINS",
                "`*` or a list of origins like https://shop.example",
            );
        }
        Ok(self)
    }
}

/// Parses `FLOODGATE_JWT_SECRET`: required, one or more comma-separated secrets (the first
/// signs, all verify), each at least [`MIN_JWT_SECRET_BYTES`]. There is no default: a
/// default written in the source would let anyone who reads it mint admin tokens.
fn jwt_secrets(v: Option<String>) -> Result<Vec<Secret>, ConfigError> {
    let bad = |reason: String| ConfigError::Invalid {
        var: "FLOODGATE_JWT_SECRET",
        reason,
    };
    let Some(v) = v.filter(|v| !v.trim().is_empty()) else {
        return Err(bad(format!(
            "not set; every floodgate process needs the HS256 secret that signs tokens \
             (at least {MIN_JWT_SECRET_BYTES} bytes, e.g. `openssl rand -base64 48`; \
             `ops/stack up` keeps one in .stack/jwt-secret)"
        )));
    };
    v.split(',')
        .map(str::trim)
        .enumerate()
        .map(|(i, s)| {
            if s.len() < MIN_JWT_SECRET_BYTES {
                Err(bad(format!(
                    "secret {} of the list is {} bytes; each must be at least {MIN_JWT_SECRET_BYTES}",
                    i + 1,
                    s.len()
                )))
            } else {
                Ok(Secret::new(s))
            }
        })
        .collect()
}

/// How webhooks are delivered (the webhook variables of [`VARS`]).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// The delay before each retry of a failed delivery; past the last it is dead.
    pub retry: Vec<Duration>,
    /// One request's whole time.
    pub timeout: Duration,
    /// Requests in flight per endpoint per worker at most.
    pub concurrency: usize,
    /// Consecutive failures that open an endpoint's circuit.
    pub breaker_failures: u32,
    /// How long an open circuit waits before its half-open probe.
    pub breaker_cooldown: Duration,
    /// Loopback and private addresses allowed (tests; a platform on the same network).
    pub allow_private: bool,
    /// How long attempts, delivered deliveries and unowed events are kept (None: all).
    pub retention: Option<Duration>,
    /// How often each worker prunes what is older than `retention` (no variable: tests
    /// shorten it).
    pub prune_every: Duration,
}

/// The longest webhook retention (ten years): past it a typo, not a policy.
const MAX_RETENTION_HOURS: u64 = 87_600;

/// Parses `FLOODGATE_WEBHOOK_RETRY_SECS`: 1-20 comma-separated delays in seconds
/// (fractions allowed, so tests can retry within a second), each 0.01..=86400.
fn webhook_retry(v: &str) -> Result<Vec<Duration>, ConfigError> {
    let bad = |reason: String| ConfigError::Invalid {
        var: "FLOODGATE_WEBHOOK_RETRY_SECS",
        reason,
    };
    let list = v
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<f64>()
                .ok()
                .filter(|s| (0.01..=86_400.0).contains(s))
                .map(Duration::from_secs_f64)
                .ok_or_else(|| bad(format!("{p:?} is not a delay in seconds (0.01..=86400)")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if list.is_empty() || list.len() > 20 {
        return Err(bad("1 to 20 delays".into()));
    }
    Ok(list)
}

/// Parses `FLOODGATE_RETRY_DELAYS_MS`: 1-10 comma-separated delays in ms, each 1..=3600000.
fn delays(v: &str) -> Result<Vec<Duration>, ConfigError> {
    let bad = |reason: String| ConfigError::Invalid {
        var: "FLOODGATE_RETRY_DELAYS_MS",
        reason,
    };
    let list = v
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<u64>()
                .ok()
                .filter(|ms| (1..=3_600_000).contains(ms))
                .map(Duration::from_millis)
                .ok_or_else(|| bad(format!("{p:?} is not a delay in ms (1..=3600000)")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if list.is_empty() || list.len() > crate::amqp::MAX_RETRY_STEPS {
        return Err(bad("1 to 10 delays".into()));
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";

    /// A config from `pairs`, with a valid secret unless `pairs` sets one.
    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        map.entry("FLOODGATE_JWT_SECRET".into())
            .or_insert_with(|| SECRET.into());
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn no_secret_no_start_and_a_list_rotates() {
        let none = Config::from_lookup(|_| None).unwrap_err().to_string();
        assert!(
            none.starts_with("FLOODGATE_JWT_SECRET") && none.contains("not set"),
            "{none}"
        );
        let e = cfg(&[("FLOODGATE_JWT_SECRET", "   ")]).unwrap_err();
        assert!(e.to_string().contains("not set"), "{e}");
        let e = cfg(&[("FLOODGATE_JWT_SECRET", &"x".repeat(31))]).unwrap_err();
        assert!(e.to_string().contains("31 bytes"), "{e}");
        assert!(cfg(&[("FLOODGATE_JWT_SECRET", &"x".repeat(32))]).is_ok());
        let old = "an-older-secret-still-verifying-1234";
        let list = format!("{SECRET}, {old}");
        let c = cfg(&[("FLOODGATE_JWT_SECRET", &list)]).unwrap();
        assert_eq!(c.jwt_secret.expose(), SECRET);
        let all: Vec<&str> = c.jwt_verify_secrets.iter().map(Secret::expose).collect();
        assert_eq!(all, [SECRET, old]);
        // One short secret anywhere in the list refuses the whole list.
        let e = cfg(&[("FLOODGATE_JWT_SECRET", &format!("{SECRET},short"))]).unwrap_err();
        assert!(e.to_string().contains("secret 2"), "{e}");
    }

    #[test]
    fn defaults_run_against_the_local_stack() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.namespace.as_str(), "floodgate");
        assert_eq!(c.ingress_addr.port(), 8080);
        assert_eq!(c.worker_addr.port(), 8082);
        assert_eq!(c.notifier_addr.port(), 8081);
        assert_eq!(c.stock_interval, Duration::from_millis(100));
        assert_eq!(c.cors_origins, ["*"]);
        assert_eq!((c.jwt_issuer, c.jwt_audience), (None, None));
    }

    #[test]
    fn rejects_bad_values_naming_the_variable() {
        let e = cfg(&[("FLOODGATE_BATCH_SIZE", "many")]).unwrap_err();
        assert!(e.to_string().starts_with("FLOODGATE_BATCH_SIZE"), "{e}");
        let e = cfg(&[("FLOODGATE_NAMESPACE", "Bad-Name")]).unwrap_err();
        assert!(e.to_string().starts_with("FLOODGATE_NAMESPACE"), "{e}");
        assert!(cfg(&[("FLOODGATE_BATCH_SIZE", "0")]).is_err());
        assert!(cfg(&[("FLOODGATE_RETRY_DELAYS_MS", "100,x")]).is_err());
        assert!(cfg(&[("FLOODGATE_RETRY_DELAYS_MS", "")]).is_err());
        let e = cfg(&[("FLOODGATE_SUBSCRIBER_BUFFER", "100")]).unwrap_err();
        assert!(e.to_string().contains("at least 500"), "{e}");
        let e = cfg(&[
            ("FLOODGATE_BATCH_SIZE", "800"),
            ("FLOODGATE_SUBSCRIBER_BUFFER", "600"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("at least 800"), "{e}");
        assert!(cfg(&[("FLOODGATE_STOCK_INTERVAL_MS", "5")]).is_err());
        assert!(cfg(&[("FLOODGATE_WORKER_PIPELINE", "0")]).is_err());
        let e = cfg(&[
            ("FLOODGATE_WORKER_PIPELINE", "8"),
            ("FLOODGATE_DB_POOL_SIZE", "8"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("FLOODGATE_DB_POOL_SIZE (8)"), "{e}");
        // An unconfirmed reservation must outlive the wait for its confirm.
        let e = cfg(&[("FLOODGATE_RESERVATION_TTL_SECS", "6")]).unwrap_err();
        assert!(
            e.to_string().contains("FLOODGATE_PUBLISH_TIMEOUT_MS"),
            "{e}"
        );
        assert!(cfg(&[("FLOODGATE_RESERVATION_TTL_SECS", "7")]).is_ok());
        assert!(
            cfg(&[
                ("FLOODGATE_RESERVATION_TTL_SECS", "3"),
                ("FLOODGATE_PUBLISH_TIMEOUT_MS", "1000"),
            ])
            .is_ok()
        );
        assert!(cfg(&[("FLOODGATE_PUBLIC_INGRESS_URL", "localhost:8080")]).is_err());
        assert!(cfg(&[("FLOODGATE_CORS_ORIGINS", "shop.example")]).is_err());
        // A Redis Cluster is a list of nodes; a malformed list stops the start.
        let e = cfg(&[("FLOODGATE_REDIS_URL", "redis://a:7000,,redis://b:7001")]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("FLOODGATE_REDIS_URL: an empty entry"),
            "{e}"
        );
        let c = cfg(&[("FLOODGATE_REDIS_URL", "redis://a:7000,redis://b:7001")]).unwrap();
        assert_eq!(c.redis_url, "redis://a:7000,redis://b:7001");
        assert!(cfg(&[("FLOODGATE_REDIS_WAIT_REPLICAS", "1")]).is_ok());
        assert!(
            cfg(&[
                ("FLOODGATE_REDIS_WAIT_REPLICAS", "1"),
                ("FLOODGATE_REDIS_WAIT_TIMEOUT_MS", "0"),
            ])
            .is_err()
        );
        let c = cfg(&[(
            "FLOODGATE_CORS_ORIGINS",
            "https://a.example, https://b.example",
        )])
        .unwrap();
        assert_eq!(c.cors_origins, ["https://a.example", "https://b.example"]);
        // The broker: one URI or a list of a cluster's nodes; a bad entry is named by its
        // position, never printed (it may hold a password).
        let nodes = "amqp://u:p@10.0.0.1:5672/%2f, amqp://u:p@10.0.0.2:5672/%2f";
        assert_eq!(
            cfg(&[("FLOODGATE_AMQP_URL", nodes)]).unwrap().amqp_url,
            nodes
        );
        for (list, says) in [
            ("amqp://u:secret@a:5672/%2f,", "entry 2 of 2 is empty"),
            (
                "amqp://u:secret@a:5672/%2f,http://b",
                "entry 2 of 2 does not start",
            ),
            (
                "amqp://u:secret@a:5672/%2f,amqp://u:secret@a:5672/%2f",
                "a:5672 again",
            ),
            (
                "amqp://u:secret@a:99999/%2f",
                "entry 1 of 1 is not an AMQP URI",
            ),
            ("", "entry 1 of 1 is empty"),
        ] {
            let e = cfg(&[("FLOODGATE_AMQP_URL", list)])
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("FLOODGATE_AMQP_URL") && e.contains(says),
                "{list}: {e}"
            );
            assert!(!e.contains("secret"), "{e}");
        }
        assert_eq!(cfg(&[]).unwrap().intake_partitions, 1);
        assert_eq!(
            cfg(&[("FLOODGATE_INTAKE_PARTITIONS", "3")])
                .unwrap()
                .intake_partitions,
            3
        );
        for bad in ["0", "65", "x"] {
            let e = cfg(&[("FLOODGATE_INTAKE_PARTITIONS", bad)]).unwrap_err();
            assert!(
                e.to_string().starts_with("FLOODGATE_INTAKE_PARTITIONS"),
                "{e}"
            );
        }
        assert_eq!(cfg(&[]).unwrap().redis_shards, 1);
        assert_eq!(
            cfg(&[("FLOODGATE_REDIS_SHARDS", "8")])
                .unwrap()
                .redis_shards,
            8
        );
        for bad in ["0", "65", "x"] {
            let e = cfg(&[("FLOODGATE_REDIS_SHARDS", bad)]).unwrap_err();
            assert!(e.to_string().starts_with("FLOODGATE_REDIS_SHARDS"), "{e}");
        }
        let c = cfg(&[("FLOODGATE_RETRY_DELAYS_MS", "100, 2000")]).unwrap();
        assert_eq!(
            c.retry_delays,
            [Duration::from_millis(100), Duration::from_secs(2)]
        );
    }

    /// Variables read outside [`Config`]: logging (`telemetry`) and the worker's test
    /// failpoint.
    const READ_ELSEWHERE: [&str; 3] = [
        "FLOODGATE_LOG",
        "FLOODGATE_LOG_FORMAT",
        "FLOODGATE_TEST_FAILPOINT",
    ];

    #[test]
    fn config_reads_exactly_the_listed_variables() {
        let seen = std::cell::RefCell::new(std::collections::BTreeSet::new());
        Config::from_lookup(|k| {
            seen.borrow_mut().insert(k.to_owned());
            (k == "FLOODGATE_JWT_SECRET").then(|| SECRET.to_owned())
        })
        .unwrap();
        let seen = seen.into_inner();
        let unlisted: Vec<&String> = seen.iter().filter(|n| var(n).is_none()).collect();
        assert!(unlisted.is_empty(), "read but not in VARS: {unlisted:?}");
        let unread: Vec<&str> = VARS
            .iter()
            .map(|v| v.name)
            .filter(|n| !seen.contains(*n) && !READ_ELSEWHERE.contains(n))
            .collect();
        assert!(unread.is_empty(), "in VARS but read by nothing: {unread:?}");
        let mut names: Vec<&str> = VARS.iter().map(|v| v.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), VARS.len(), "a name is listed twice");
    }

    #[test]
    fn listed_defaults_are_the_ones_config_applies() {
        let given: Vec<(&str, &str)> = VARS
            .iter()
            .filter(|v| !v.default.is_empty())
            .map(|v| (v.name, v.default))
            .collect();
        assert_eq!(
            format!("{:?}", cfg(&given).unwrap()),
            format!("{:?}", cfg(&[]).unwrap())
        );
        // And the comparison can tell: one value off changes the config.
        let mut off = given.clone();
        off.retain(|(n, _)| *n != "FLOODGATE_BATCH_SIZE");
        off.push(("FLOODGATE_BATCH_SIZE", "201"));
        assert_ne!(
            format!("{:?}", cfg(&off).unwrap()),
            format!("{:?}", cfg(&[]).unwrap())
        );
        assert_eq!(var("FLOODGATE_BATCH_SIZE").unwrap().default, "200");
        assert_eq!(
            var("FLOODGATE_CONSISTENCY_CHECK_SECS").unwrap().default,
            "60"
        );
        assert_eq!(
            cfg(&[]).unwrap().consistency_check,
            Some(Duration::from_secs(60))
        );
        let off = cfg(&[("FLOODGATE_CONSISTENCY_CHECK_SECS", "0")]).unwrap();
        assert_eq!(off.consistency_check, None);
        let e = cfg(&[("FLOODGATE_CONSISTENCY_CHECK_SECS", "soon")]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("FLOODGATE_CONSISTENCY_CHECK_SECS"),
            "{e}"
        );
    }

    /// Every `FLOODGATE_[A-Z0-9_]+` name in `text`.
    fn names_in(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("FLOODGATE_") {
            let tail = &rest[at + "FLOODGATE_".len()..];
            let len = tail
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            let suffix = tail[..len].trim_end_matches('_');
            if !suffix.is_empty() {
                out.push(format!("FLOODGATE_{suffix}"));
            }
            rest = &tail[len..];
        }
        out
    }

    /// Every `.rs` file under `dir`.
    fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn the_sources_name_only_listed_variables() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        // Every process's code (the test harness in tests/ sets variables, reads none).
        for dir in [
            "common/src",
            "ingress/src",
            "worker/src",
            "notifier/src",
            "cli/src",
            "ops/loadtest/src",
        ] {
            rust_files(&root.join(dir), &mut files);
        }
        assert!(files.len() > 20, "{files:?}");
        let mut unlisted = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            for n in names_in(&text) {
                if var(&n).is_none() {
                    unlisted.push(format!("{}: {n}", f.display()));
                }
            }
        }
        assert!(unlisted.is_empty(), "not in VARS: {unlisted:#?}");
        // The scanner finds names where they are (built with concat!, or the scan above
        // would find these made-up ones in this very file).
        assert_eq!(
            names_in(concat!(
                "x FLOODGATE",
                "_A_1, `FLOODGATE",
                "_*` FLOODGATE",
                "_B_"
            )),
            [concat!("FLOODGATE", "_A_1"), concat!("FLOODGATE", "_B")]
        );
    }

    #[test]
    fn the_readme_table_lists_every_variable_with_its_default() {
        let readme = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
        )
        .unwrap();
        let rows: Vec<&str> = readme
            .lines()
            .filter(|l| l.starts_with("| `FLOODGATE_"))
            .collect();
        let mut in_readme: Vec<String> = rows.iter().map(|r| names_in(r)[0].clone()).collect();
        in_readme.sort();
        let mut listed: Vec<&str> = VARS.iter().map(|v| v.name).collect();
        listed.sort_unstable();
        assert_eq!(
            in_readme, listed,
            "README's configuration table and VARS differ"
        );
        for v in VARS.iter().filter(|v| !v.default.is_empty()) {
            let row = rows
                .iter()
                .find(|r| r.starts_with(&format!("| `{}` |", v.name)))
                .unwrap();
            assert!(
                row.contains(&format!("| `{}` |", v.default)),
                "README gives {} another default than {:?}: {row}",
                v.name,
                v.default
            );
        }
    }

    #[test]
    fn an_unknown_variable_is_found_with_the_one_it_misspells() {
        // Built with concat!, so the sources scan above does not take them for readers.
        let typo = |s: &str| format!("{}{s}", concat!("FLOODGATE", "_"));
        let cases: [(&str, Option<&str>); 9] = [
            ("BATCH_SIZ", Some("FLOODGATE_BATCH_SIZE")),
            ("BACTH_SIZE", Some("FLOODGATE_BATCH_SIZE")),
            ("REDIS_ULR", Some("FLOODGATE_REDIS_URL")),
            ("NAMESPCE", Some("FLOODGATE_NAMESPACE")),
            ("DB_POOL", Some("FLOODGATE_DB_POOL_SIZE")),
            ("JWT_SECRETS", Some("FLOODGATE_JWT_SECRET")),
            ("WORKER_PREFECH", Some("FLOODGATE_WORKER_PREFETCH")),
            ("FOO", None),
            ("TOTALLY_UNRELATED_THING", None),
        ];
        for (name, want) in cases {
            let name = typo(name);
            assert_eq!(closest_var(&name), want, "{name}");
            assert_eq!(unknown_vars([name.as_str()]), [(name.as_str(), want)]);
        }
        // Known names and other variables are not reported.
        assert!(unknown_vars(["FLOODGATE_BATCH_SIZE", "PATH", "floodgate_x"]).is_empty());
    }

    #[test]
    fn secrets_are_not_printed() {
        let c = cfg(&[(
            "FLOODGATE_JWT_SECRET",
            "a-very-secret-value-123-0123456789abcdef",
        )])
        .unwrap();
        assert!(!format!("{c:?}").contains("a-very-secret-value-123-0123456789abcdef"));
    }

    #[test]
    fn webhook_retention_is_hours_and_zero_keeps_everything() {
        let hours = |h: u64| Some(Duration::from_secs(h * 3600));
        assert_eq!(cfg(&[]).unwrap().webhooks.retention, hours(168));
        let one = cfg(&[("FLOODGATE_WEBHOOK_RETENTION_HOURS", "1")]).unwrap();
        assert_eq!(one.webhooks.retention, hours(1));
        let all = cfg(&[("FLOODGATE_WEBHOOK_RETENTION_HOURS", "0")]).unwrap();
        assert_eq!(all.webhooks.retention, None);
        assert_eq!(
            cfg(&[("FLOODGATE_WEBHOOK_RETENTION_HOURS", "87600")])
                .unwrap()
                .webhooks
                .retention,
            hours(87_600)
        );
        for bad in ["87601", "18446744073709551615", "-1", "a week", "1.5"] {
            let e = cfg(&[("FLOODGATE_WEBHOOK_RETENTION_HOURS", bad)]).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("FLOODGATE_WEBHOOK_RETENTION_HOURS"),
                "{bad}: {e}"
            );
        }
    }
}
