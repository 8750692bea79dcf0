//! Webhook delivery: sends what `webhook_deliveries` says each endpoint is owed.
//!
//! The outbox relay fans every committed event of a subscribed type out into
//! `webhook_deliveries` in the transaction that deletes its outbox row
//! ([`crate::outbox`]), so nothing here is on the order path. This task keeps one
//! sender per live webhook. A sender claims its due deliveries (a lease: their
//! `next_attempt_at` moves past the request timeout, so a claim whose worker died lapses
//! and another worker sends it: at least once), posts them concurrently (at most
//! `FLOODGATE_WEBHOOK_CONCURRENCY`), and records every attempt in one transaction.
//!
//! Each endpoint has its own sender, its own requests and its own timeout, so a dead or
//! slow endpoint holds only its own deliveries: no connection or task is shared with
//! another endpoint, and no pooled database connection is held while a request is out.
//!
//! The circuit breaker lives in the `webhooks` row, so every worker sees one state and
//! `GET /v1/webhooks/{id}` shows it. Closed: deliveries flow; after
//! `FLOODGATE_WEBHOOK_BREAKER_FAILURES` consecutive failed attempts it opens. Open: no
//! request goes out (deliveries keep their schedule and wait; none is lost) until
//! `FLOODGATE_WEBHOOK_BREAKER_COOLDOWN_MS` has passed; then one worker takes the
//! half-open probe (one delivery). A success closes it; a failure opens it for another
//! cool-down. The in-process breakers on crates.io (`failsafe`, `recloser`,
//! `circuitbreaker-rs`) keep their state in one process's memory, which neither the API
//! nor the other workers could see, so this one is a few SQL statements.

use deadpool_postgres::Pool;
use floodgate_common::{
    Config,
    config::WebhookSettings,
    retry::{Backoff, Waits},
    telemetry::names,
    webhook::{self, is_public},
};
use rand::Rng;
use reqwest::{
    StatusCode,
    dns::{Addrs, Name, Resolve, Resolving},
    header::{HeaderMap, RETRY_AFTER},
};
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long an idle sender sleeps when nothing wakes it (deliveries written by another
/// worker's relay, a retry that fell due).
const TICK: Duration = Duration::from_millis(250);
/// How often the set of webhooks is read again at least (and the pending gauge
/// counted); a wake from the relay reads it too, at most every [`TICK`], so a new
/// webhook's first events do not wait for the timer.
const REFRESH: Duration = Duration::from_secs(2);
/// A round claims this many times `FLOODGATE_WEBHOOK_CONCURRENCY` deliveries and
/// records them together: a busy endpoint's database work is per round, not per
/// request (with one request per slot a sale's events queued behind the claim and
/// record round trips; measured with `ops/bench/webhook-lag`).
const ROUND_FACTOR: usize = 4;
/// PostgreSQL connections the senders share: their own pool, so endpoints never take a
/// connection the batch pipeline or the relay is waiting for.
const POOL_SIZE: usize = 4;

/// Runs the senders until `shutdown`. `wake` is notified by this worker's relay after a
/// commit that owed some webhook an event.
pub async fn run(cfg: Config, wake: Arc<Notify>, shutdown: CancellationToken) {
    let settings = Arc::new(cfg.webhooks.clone());
    let pg = match floodgate_common::db::pool(&Config {
        db_pool_size: POOL_SIZE,
        ..cfg.clone()
    }) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "webhooks: no PostgreSQL pool; not delivering"
            );
            shutdown.cancelled().await;
            return;
        }
    };
    let client = match client(&settings) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "webhooks: no HTTP client; not delivering"
            );
            shutdown.cancelled().await;
            return;
        }
    };
    let kick = Arc::new(Notify::new());
    let mut senders: HashMap<Uuid, (CancellationToken, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    let mut counted = tokio::time::Instant::now() - REFRESH;
    loop {
        let count = counted.elapsed() >= REFRESH;
        if count {
            counted = tokio::time::Instant::now();
        }
        match live(&pg, count).await {
            Ok(hooks) => {
                senders.retain(|id, (stop, task)| {
                    let keep = hooks.iter().any(|h| h.id == *id) && !task.is_finished();
                    if !keep {
                        stop.cancel();
                        metrics::gauge!(names::WEBHOOK_CIRCUIT, "webhook" => id.to_string())
                            .set(0.0);
                        metrics::gauge!(names::WEBHOOK_PENDING, "webhook" => id.to_string())
                            .set(0.0);
                    }
                    keep
                });
                for hook in hooks {
                    if let Some(pending) = hook.pending {
                        metrics::gauge!(names::WEBHOOK_PENDING, "webhook" => hook.id.to_string())
                            .set(pending as f64);
                    }
                    if senders.contains_key(&hook.id) {
                        continue;
                    }
                    let stop = shutdown.child_token();
                    let sender = Sender {
                        hook,
                        pg: pg.clone(),
                        client: client.clone(),
                        settings: settings.clone(),
                        kick: kick.clone(),
                        stop: stop.clone(),
                    };
                    let id = sender.hook.id;
                    senders.insert(id, (stop, tokio::spawn(sender.run())));
                }
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "webhooks: reading the webhooks failed"
                );
            }
        }
        // The relay's wakes go straight to the senders, and read the list again if it
        // was read longer than a tick ago (a webhook created since has no sender yet).
        let read = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => {
                    kick.notify_waiters();
                    if read.elapsed() < TICK {
                        continue;
                    }
                },
                _ = tokio::time::sleep_until(read + REFRESH) => {},
            }
            break;
        }
        if shutdown.is_cancelled() {
            break;
        }
    }
    for (_, (stop, task)) in senders {
        stop.cancel();
        let _ = task.await;
    }
}

/// A live webhook as the dispatcher reads it.
#[derive(Debug, Clone)]
struct Hook {
    id: Uuid,
    url: String,
    /// The URL's host when it is an address, not a name.
    literal: Option<std::net::IpAddr>,
    key: Vec<u8>,
    /// Deliveries owed, when counted this time.
    pending: Option<i64>,
}

/// The live webhooks; with `count`, each one's pending deliveries too.
async fn live(pg: &Pool, count: bool) -> anyhow::Result<Vec<Hook>> {
    let db = pg.get().await?;
    let rows = db
        .query(
            "SELECT w.id, w.url, w.secret,
                    CASE WHEN $1 THEN (SELECT count(*) FROM webhook_deliveries d
                                        WHERE d.webhook_id = w.id AND d.state = 'pending') END
               FROM webhooks w WHERE w.deleted_at IS NULL",
            &[&count],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let id: Uuid = r.get(0);
            let key = webhook::secret_key(r.get(2));
            if key.is_none() {
                tracing::error!(webhook = %id, "webhooks: the stored secret is not whsec_<base64>; skipped");
            }
            let url: String = r.get(1);
            let literal = url::Url::parse(&url).ok().and_then(|u| match u.host()? {
                url::Host::Ipv4(ip) => Some(ip.into()),
                url::Host::Ipv6(ip) => Some(ip.into()),
                url::Host::Domain(_) => None,
            });
            Some(Hook {
                id,
                literal,
                url,
                key: key?,
                pending: r.get(3),
            })
        })
        .collect())
}

/// The HTTP client every sender shares: it pools connections per host, so one
/// endpoint's connections never serve another's. No redirects (a redirect could lead
/// into the private network the URL check kept it from), and every name resolved on
/// each new connection is checked again ([`PublicOnly`]).
fn client(s: &WebhookSettings) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(s.timeout)
        .connect_timeout(s.timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        // HTTP(S)_PROXY would connect on the webhook's behalf, past [`PublicOnly`].
        .no_proxy()
        .pool_max_idle_per_host(s.concurrency)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("floodgate-webhooks/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(Arc::new(PublicOnly {
            allow_private: s.allow_private,
        }))
        .build()?)
}

/// Resolves names like the system does, then drops every address a webhook may not
/// reach ([`is_public`]): a name checked when the webhook was created can point inside
/// later (DNS rebinding).
struct PublicOnly {
    allow_private: bool,
}

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!(
                    "{host} resolves to no public address (FLOODGATE_WEBHOOK_ALLOW_PRIVATE is off)"
                )
                .into());
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// One endpoint's sender.
struct Sender {
    hook: Hook,
    pg: Pool,
    client: reqwest::Client,
    settings: Arc<WebhookSettings>,
    kick: Arc<Notify>,
    stop: CancellationToken,
}

/// What the circuit lets through this round.
enum Gate {
    /// Deliveries may go out (closed, or the half-open probe).
    Pass,
    /// Nothing this round (open, cooling down; or another worker holds the probe): the
    /// sender looks again after a tick.
    Wait,
}

/// One round's claim: its deliveries, and the token that proves the claim is still
/// this round's when it records them (a replay, or a lease that lapsed and another
/// worker took over, clears or replaces it).
#[derive(Default)]
struct Claimed {
    token: Uuid,
    due: Vec<Due>,
}

/// One claimed delivery.
struct Due {
    event_id: Uuid,
    attempts: i32,
    at: OffsetDateTime,
    body: Vec<u8>,
}

/// How one attempt ended.
#[derive(Debug)]
enum Outcome {
    Delivered(u16),
    /// Retried later: a timeout, a connection error, 408, 429 or 5xx; with the delay
    /// the endpoint asked for (`Retry-After`), if any.
    Failed {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    },
    /// Dead at once: any other answer.
    Refused(u16),
    /// Dead at once, never sent: the URL's host is an address a webhook may not reach
    /// (created while `FLOODGATE_WEBHOOK_ALLOW_PRIVATE` was on, which it no longer is).
    /// Says nothing of the endpoint: the circuit does not count it.
    Blocked(String),
    /// Not sent: the sender stopped (the webhook was deleted, the worker shuts down) or
    /// the round's failures opened the circuit. Handed back as it was, no attempt spent.
    Skipped,
}

impl Sender {
    async fn run(self) {
        let id = self.hook.id;
        let mut waits = Waits::new(Backoff::BACKGROUND);
        while !self.stop.is_cancelled() {
            match self.round().await {
                Ok(sent) => {
                    waits.reset();
                    if sent == 0 {
                        self.idle(TICK).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(webhook = %id, error = format!("{e:#}"), "webhooks: a delivery round failed; retrying");
                    if !waits.sleep(&self.stop).await {
                        return;
                    }
                }
            }
        }
    }

    async fn idle(&self, d: Duration) {
        tokio::select! {
            _ = self.stop.cancelled() => {},
            _ = self.kick.notified() => {},
            _ = tokio::time::sleep(d) => {},
        }
    }

    /// One round: pass the circuit, claim, send, record. Returns how many deliveries
    /// went out (0: nothing due, or the circuit held them back).
    async fn round(&self) -> anyhow::Result<usize> {
        let (
            gate,
            probing,
            Claimed {
                token,
                due: claimed,
            },
        ) = self.claim().await?;
        if matches!(gate, Gate::Wait) || claimed.is_empty() {
            return Ok(0);
        }
        // At most `concurrency` requests out at once. `run` counts the failures in a row,
        // in the order they end: once they reach the threshold the circuit opens, and
        // the requests not sent yet are not sent (nor are they once the sender stops).
        let slots = tokio::sync::Semaphore::new(self.settings.concurrency);
        let run = std::sync::atomic::AtomicU32::new(0);
        let threshold = self.settings.breaker_failures;
        let outcomes = futures::future::join_all(claimed.iter().map(|d| async {
            let _slot = slots.acquire().await;
            if self.stop.is_cancelled() || run.load(Relaxed) >= threshold {
                return Outcome::Skipped;
            }
            let outcome = self.send(d).await;
            match outcome {
                Outcome::Failed { .. } => {
                    run.fetch_add(1, Relaxed);
                }
                Outcome::Delivered(_) | Outcome::Refused(_) => run.store(0, Relaxed),
                Outcome::Blocked(_) | Outcome::Skipped => {}
            }
            outcome
        }))
        .await;
        let tail = run.load(Relaxed);
        self.record(token, &claimed, &outcomes, probing, tail)
            .await?;
        Ok(claimed.len())
    }

    /// Reads the circuit and claims what it lets through, in one transaction (the
    /// webhook's row locked, so two workers never both take the half-open probe).
    async fn claim(&self) -> anyhow::Result<(Gate, bool, Claimed)> {
        let s = &self.settings;
        let mut db = self.pg.get().await?;
        // An idle endpoint (the common case, polled every tick) costs one index probe,
        // not a transaction that locks its webhook's row.
        let due: bool = db
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM webhook_deliveries
                                 WHERE webhook_id = $1 AND state = 'pending'
                                   AND next_attempt_at <= now())",
                &[&self.hook.id],
            )
            .await?
            .get(0);
        if !due {
            return Ok((Gate::Pass, false, Claimed::default()));
        }
        let tx = db.transaction().await?;
        tx.batch_execute("SET LOCAL idle_in_transaction_session_timeout = '10s'")
            .await?;
        // NO KEY UPDATE: the relay's inserts of deliveries (their foreign key takes KEY
        // SHARE on this row) never wait for a sender.
        let Some(row) = tx
            .query_opt(
                "SELECT circuit, EXTRACT(EPOCH FROM (opened_at + $2 * interval '1 millisecond' - now()))::float8,
                        probe_until IS NULL OR probe_until < now()
                   FROM webhooks WHERE id = $1 AND deleted_at IS NULL FOR NO KEY UPDATE",
                &[&self.hook.id, &(s.breaker_cooldown.as_millis() as f64)],
            )
            .await?
        else {
            // Deleted: the dispatcher stops this sender on its next read.
            return Ok((Gate::Wait, false, Claimed::default()));
        };
        let circuit: &str = row.get(0);
        let cooling: Option<f64> = row.get(1);
        let probe_free: bool = row.get(2);
        metrics::gauge!(names::WEBHOOK_CIRCUIT, "webhook" => self.hook.id.to_string())
            .set(circuit_gauge(circuit));
        let (limit, probing) = match circuit {
            "closed" => (s.concurrency * ROUND_FACTOR, false),
            "open" => match cooling {
                Some(left) if left > 0.0 => {
                    return Ok((Gate::Wait, false, Claimed::default()));
                }
                _ => (1, true),
            },
            // half_open: another worker's probe is out, unless its lease lapsed.
            _ if probe_free => (1, true),
            _ => return Ok((Gate::Wait, false, Claimed::default())),
        };
        // Past the round's requests (`ROUND_FACTOR` after one another at worst, each up
        // to the timeout) and the wait for a pooled connection to record them.
        let lease = (s.timeout * limit.div_ceil(s.concurrency) as u32 + Duration::from_secs(15))
            .as_millis() as f64;
        let token = Uuid::new_v4();
        let rows = tx
            .query(
                "WITH due AS (
                    SELECT event_id FROM webhook_deliveries
                     WHERE webhook_id = $1 AND state = 'pending' AND next_attempt_at <= now()
                     ORDER BY next_attempt_at LIMIT $2
                     FOR UPDATE SKIP LOCKED
                 ), claimed AS (
                    UPDATE webhook_deliveries d
                       SET next_attempt_at = now() + $3 * interval '1 millisecond', updated_at = now(),
                           lease = $4
                      FROM due WHERE d.webhook_id = $1 AND d.event_id = due.event_id
                    RETURNING d.event_id, d.attempts
                 )
                 SELECT c.event_id, c.attempts, e.type, e.at, e.data::text
                   FROM claimed c JOIN webhook_events e USING (event_id)
                  ORDER BY e.at",
                &[&self.hook.id, &(limit as i64), &lease, &token],
            )
            .await?;
        if probing && !rows.is_empty() {
            tx.execute(
                "UPDATE webhooks SET circuit = 'half_open',
                        probe_until = now() + $2 * interval '1 millisecond'
                  WHERE id = $1",
                &[&self.hook.id, &lease],
            )
            .await?;
            metrics::gauge!(names::WEBHOOK_CIRCUIT, "webhook" => self.hook.id.to_string())
                .set(circuit_gauge("half_open"));
            tracing::info!(webhook = %self.hook.id, "webhooks: circuit half-open; one probe");
        }
        tx.commit().await?;
        let claimed: Vec<Due> = rows
            .iter()
            .map(|r| {
                let event_id: Uuid = r.get(0);
                let at: OffsetDateTime = r.get(3);
                let data: &str = r.get(4);
                let body = format!(
                    r#"{{"type":{},"event_id":"{event_id}","at":{},"data":{data}}}"#,
                    serde_json::Value::from(r.get::<_, &str>(2)),
                    serde_json::Value::from(
                        at.format(&time::format_description::well_known::Rfc3339)
                            .unwrap_or_default()
                    ),
                );
                Due {
                    event_id,
                    attempts: r.get(1),
                    at,
                    body: body.into_bytes(),
                }
            })
            .collect();
        if let Some(first) = claimed.first() {
            tracing::debug!(
                webhook = %self.hook.id,
                claimed = claimed.len(),
                oldest_ms = (OffsetDateTime::now_utc() - first.at).whole_milliseconds() as i64,
                "webhooks: claimed"
            );
        }
        Ok((
            Gate::Pass,
            probing,
            Claimed {
                token,
                due: claimed,
            },
        ))
    }

    /// One attempt: the body signed as the Standard Webhooks specification says.
    async fn send(&self, due: &Due) -> Outcome {
        // A name is checked on every connection ([`PublicOnly`]); an address literal
        // never goes through a resolver, so it is checked here.
        if let Some(ip) = self.hook.literal
            && !self.settings.allow_private
            && !is_public(ip)
        {
            return Outcome::Blocked(format!(
                "{ip} is not a public address (FLOODGATE_WEBHOOK_ALLOW_PRIVATE is off); not sent"
            ));
        }
        let id = due.event_id.to_string();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let signature = webhook::sign(&self.hook.key, &id, now, &due.body);
        let sent = self
            .client
            .post(&self.hook.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", now.to_string())
            .header("webhook-signature", signature)
            .body(due.body.clone())
            .send()
            .await;
        match sent {
            Err(e) => Outcome::Failed {
                status: None,
                error: error_chain(&e),
                retry_after: None,
            },
            Ok(resp) => {
                let status = resp.status();
                let retry_after = retry_after(resp.headers());
                // The body is not read: only the status counts, and a slow body must not
                // hold the connection (dropped, it is closed, not pooled).
                drop(resp);
                classify(status, retry_after)
            }
        }
    }

    /// Writes the attempts, the deliveries' new states and the circuit, in one
    /// transaction. `tail` is the failures in a row the round ended with.
    async fn record(
        &self,
        token: Uuid,
        claimed: &[Due],
        outcomes: &[Outcome],
        probing: bool,
        tail: u32,
    ) -> anyhow::Result<()> {
        let s = &self.settings;
        let now = OffsetDateTime::now_utc();
        let mut ids = Vec::new();
        let mut states = Vec::new();
        let mut attempts: Vec<i32> = Vec::new();
        let mut next: Vec<Option<OffsetDateTime>> = Vec::new();
        let mut codes: Vec<Option<i32>> = Vec::new();
        let mut errors: Vec<Option<String>> = Vec::new();
        let mut skipped: Vec<Uuid> = Vec::new();
        let (mut ok, mut failed) = (0i32, 0i32);
        for (due, outcome) in claimed.iter().zip(outcomes) {
            let attempt = due.attempts + 1;
            let (state, at, code, error) = match outcome {
                Outcome::Skipped => {
                    skipped.push(due.event_id);
                    continue;
                }
                Outcome::Delivered(code) => {
                    ok += 1;
                    let lag = (now - due.at).as_seconds_f64().max(0.0);
                    metrics::histogram!(names::WEBHOOK_LAG).record(lag);
                    metrics::counter!(names::WEBHOOK_ATTEMPTS, "outcome" => "delivered")
                        .increment(1);
                    ("delivered", None, Some(*code), None)
                }
                Outcome::Blocked(why) => {
                    metrics::counter!(names::WEBHOOK_ATTEMPTS, "outcome" => "dead").increment(1);
                    ("dead", None, None, Some(why.clone()))
                }
                Outcome::Refused(code) => {
                    // The endpoint answered: it is up, whatever it thought of the event.
                    ok += 1;
                    metrics::counter!(names::WEBHOOK_ATTEMPTS, "outcome" => "dead").increment(1);
                    (
                        "dead",
                        None,
                        Some(*code),
                        Some(format!("answered {code}; not retried")),
                    )
                }
                Outcome::Failed {
                    status,
                    error,
                    retry_after,
                } => {
                    failed += 1;
                    match s.retry.get(due.attempts as usize) {
                        Some(delay) => {
                            metrics::counter!(names::WEBHOOK_ATTEMPTS, "outcome" => "retry")
                                .increment(1);
                            let wait = jitter(*delay).max(
                                retry_after
                                    .unwrap_or_default()
                                    .min(*s.retry.last().unwrap_or(delay)),
                            );
                            ("pending", Some(now + wait), *status, Some(error.clone()))
                        }
                        None => {
                            metrics::counter!(names::WEBHOOK_ATTEMPTS, "outcome" => "dead")
                                .increment(1);
                            (
                                "dead",
                                None,
                                *status,
                                Some(format!("{error}; the retry schedule is spent")),
                            )
                        }
                    }
                }
            };
            ids.push(due.event_id);
            states.push(state);
            attempts.push(attempt);
            next.push(at);
            codes.push(code.map(i32::from));
            errors.push(error);
        }
        let mut db = self.pg.get().await?;
        let tx = db.transaction().await?;
        tx.batch_execute("SET LOCAL idle_in_transaction_session_timeout = '10s'")
            .await?;
        // The circuit first (its row lock orders this transaction after any other on
        // this webhook). Failures count in a row: a round with an answer leaves the run
        // it ended with, one without adds to the run before it. At the threshold, or on
        // a failed probe, it opens; the half-open probe's success closes it.
        let row = tx
            .query_one(
                "WITH old AS (
                    SELECT circuit, failures FROM webhooks WHERE id = $1 FOR NO KEY UPDATE
                 ), n AS (
                    SELECT CASE WHEN $2 > 0 THEN $6 ELSE old.failures + $3 END AS failures
                      FROM old
                 ), c AS (
                    SELECT CASE
                        WHEN $5 THEN CASE WHEN $2 > 0 THEN 'closed' ELSE 'open' END
                        WHEN n.failures >= $4 THEN 'open'
                        WHEN $2 > 0 THEN 'closed'
                        WHEN old.circuit = 'half_open' AND $3 > 0 THEN 'open'
                        ELSE old.circuit END AS circuit
                      FROM old, n
                 )
                 UPDATE webhooks w SET
                    failures = n.failures,
                    circuit = c.circuit,
                    opened_at = CASE
                        WHEN c.circuit <> 'open' THEN NULL
                        WHEN old.circuit = 'open' AND NOT $5 THEN w.opened_at
                        ELSE now() END,
                    probe_until = CASE WHEN c.circuit = 'half_open' THEN w.probe_until END
                   FROM old, n, c WHERE w.id = $1
                 RETURNING old.circuit, c.circuit, n.failures",
                &[
                    &self.hook.id,
                    &ok,
                    &failed,
                    &(s.breaker_failures as i32),
                    &probing,
                    &(tail as i32),
                ],
            )
            .await?;
        // Only deliveries still claimed by this round: a replay since (or a lapsed lease
        // another worker took over) owns them now; the attempt is logged all the same.
        tx.execute(
            "UPDATE webhook_deliveries d
                SET state = t.state, attempts = t.attempt, lease = NULL,
                    next_attempt_at = COALESCE(t.next, d.next_attempt_at), updated_at = now()
               FROM unnest($2::uuid[], $3::text[], $4::int[], $5::timestamptz[])
                    AS t(event_id, state, attempt, next)
              WHERE d.webhook_id = $1 AND d.event_id = t.event_id AND d.lease = $6",
            &[&self.hook.id, &ids, &states, &attempts, &next, &token],
        )
        .await?;
        if !skipped.is_empty() {
            // Not sent: due again at once (an open circuit holds them back), no attempt.
            tx.execute(
                "UPDATE webhook_deliveries SET lease = NULL, next_attempt_at = now(), updated_at = now()
                  WHERE webhook_id = $1 AND event_id = ANY($2) AND lease = $3",
                &[&self.hook.id, &skipped, &token],
            )
            .await?;
        }
        if !ids.is_empty() {
            tx.execute(
                "INSERT INTO webhook_attempts (webhook_id, event_id, attempt, status_code, error, next_attempt_at)
                 SELECT $1, * FROM unnest($2::uuid[], $3::int[], $4::int[], $5::text[], $6::timestamptz[])",
                &[&self.hook.id, &ids, &attempts, &codes, &errors, &next],
            )
            .await?;
        }
        tx.commit().await?;
        let (before, after, failures): (String, String, i32) = (row.get(0), row.get(1), row.get(2));
        metrics::gauge!(names::WEBHOOK_CIRCUIT, "webhook" => self.hook.id.to_string())
            .set(circuit_gauge(&after));
        if before != after {
            if after == "open" && before == "half_open" {
                tracing::debug!(webhook = %self.hook.id, failures, "webhooks: the probe failed; circuit open again");
            } else if after == "open" {
                tracing::warn!(webhook = %self.hook.id, url = %self.hook.url, failures, "webhooks: circuit opened; deliveries wait");
            } else {
                tracing::info!(webhook = %self.hook.id, from = %before, to = %after, "webhooks: circuit changed");
            }
        }
        Ok(())
    }
}

fn circuit_gauge(state: &str) -> f64 {
    match state {
        "closed" => 0.0,
        "half_open" => 1.0,
        _ => 2.0,
    }
}

/// A timeout, 408, 429 or 5xx is worth another try; any other 4xx (or a 1xx/3xx: no
/// redirect is followed) is the endpoint refusing this event.
fn classify(status: StatusCode, retry_after: Option<Duration>) -> Outcome {
    let code = status.as_u16();
    if status.is_success() {
        Outcome::Delivered(code)
    } else if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        Outcome::Failed {
            status: Some(code),
            error: format!("answered {code}"),
            retry_after,
        }
    } else {
        Outcome::Refused(code)
    }
}

/// `Retry-After` in seconds (an HTTP date is not worth the parsing here).
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let secs: u64 = h.get(RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// `d` moved by up to 20 % either way, so endpoints that failed together are not
/// retried in lock step.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.8..=1.2))
}

/// An error with its causes, which is where reqwest says what really happened.
fn error_chain(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "could not connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s.truncate(500);
    s
}
