//! `floodgate`: the operator command.

use anyhow::Context;
use clap::{Parser, Subcommand};
use floodgate_common::{
    Config,
    amqp::{ATTEMPT_HEADER, REASON_HEADER, Topology},
    auth,
    domain::{Role, UserId},
    reconcile,
    redis::Keys,
    stock, telemetry,
};
use lapin::{
    BasicProperties, Confirmation,
    options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions},
    types::AMQPValue,
};
use std::time::Duration;

/// Operate a floodgate deployment. Reads the same FLOODGATE_* environment variables as
/// the services (namespace, database, Redis, RabbitMQ, JWT secret).
#[derive(Parser)]
#[command(name = "floodgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the database if it is missing and apply migrations to the namespace's schema.
    ///
    /// Safe to run from several processes at once: migrations run under an advisory lock.
    Migrate,
    /// Print a JWT for a user and role, signed with FLOODGATE_JWT_SECRET.
    Token {
        /// The user id (the `sub` claim), 1-64 characters.
        #[arg(long)]
        sub: String,
        /// customer or admin.
        #[arg(long, default_value = "customer", value_parser = ["customer", "admin"])]
        role: String,
        /// How long the token is valid, in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
    },
    /// Bring Redis back in line with PostgreSQL, the system of record.
    ///
    /// Closes the gate (ingress answers 503), waits until the intake and retry queues
    /// have drained (every accepted order is in PostgreSQL), reloads stock levels,
    /// per-user counts and applied receipts from PostgreSQL, and opens the gate. Then
    /// checks every invariant. Exits non-zero if one is broken.
    Reconcile {
        /// Only compare Redis and PostgreSQL and check the order/ledger/inventory
        /// invariants; print each violation; change nothing. Exit 1 on any violation.
        #[arg(long)]
        check: bool,
        /// Reload only if Redis has no stock loaded (a fresh namespace or a fresh Redis).
        #[arg(long, conflicts_with = "check")]
        if_unloaded: bool,
        /// How long the queues must stay empty before the reload, in seconds.
        #[arg(long, default_value_t = 3)]
        quiet_secs: u64,
        /// Give up if the queues have not drained within this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Inspect and replay the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters with their reason, without removing them.
    List {
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Send dead letters back to the intake queue, attempts reset. The worker treats a
    /// replay like any redelivery: an order already recorded stays as it is.
    Replay {
        /// Replay every dead letter (up to --limit).
        #[arg(long, conflicts_with = "order")]
        all: bool,
        /// Replay only the dead letter of this order id (repeatable).
        #[arg(long)]
        order: Vec<String>,
        /// Look at most at this many dead letters.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cfg = Config::from_env().context("reading configuration")?;
    telemetry::init_logging_with_default("warn");
    match cli.command {
        Command::Migrate => {
            floodgate_common::db::ensure_database(&cfg).await?;
            floodgate_common::db::migrate(&cfg).await?;
            eprintln!("migrations applied to schema {}", cfg.namespace);
        }
        Command::Token {
            sub,
            role,
            ttl_secs,
        } => {
            let user = UserId::parse(sub).map_err(|e| anyhow::anyhow!("--sub: {e}"))?;
            let role = if role == "admin" {
                Role::Admin
            } else {
                Role::Customer
            };
            println!(
                "{}",
                auth::mint(
                    cfg.jwt_secret.expose(),
                    &user,
                    role,
                    Duration::from_secs(ttl_secs)
                )
            );
        }
        Command::Reconcile {
            check,
            if_unloaded,
            quiet_secs,
            timeout_secs,
        } => {
            let code = reconcile_cmd(&cfg, check, if_unloaded, quiet_secs, timeout_secs).await?;
            std::process::exit(code);
        }
        Command::Dlq { command } => match command {
            DlqCommand::List { limit } => dlq_list(&cfg, limit).await?,
            DlqCommand::Replay { all, order, limit } => {
                anyhow::ensure!(all || !order.is_empty(), "say --all or --order <id>");
                dlq_replay(&cfg, all, &order, limit).await?;
            }
        },
    }
    Ok(())
}

async fn reconcile_cmd(
    cfg: &Config,
    check_only: bool,
    if_unloaded: bool,
    quiet_secs: u64,
    timeout_secs: u64,
) -> anyhow::Result<i32> {
    let pool = floodgate_common::db::pool(cfg)?;
    let mut redis = floodgate_common::redis::connect(&cfg.redis_url)
        .await
        .context("connecting to Redis")?;
    let keys = Keys::new(&cfg.namespace);
    if if_unloaded {
        if stock::load_if_absent(&pool, &mut redis, &keys).await? {
            eprintln!("stock was not loaded; loaded it from PostgreSQL");
        } else {
            eprintln!("stock is loaded; nothing to do");
        }
    } else if !check_only {
        reconcile::repair(
            cfg,
            &pool,
            &mut redis,
            Duration::from_secs(quiet_secs),
            Duration::from_secs(timeout_secs),
            |msg| eprintln!("{msg}"),
        )
        .await?;
    }
    let violations = reconcile::check(&pool, &mut redis, &keys, 3).await?;
    if violations.is_empty() {
        println!("ok: Redis matches PostgreSQL and every invariant holds");
        Ok(0)
    } else {
        for v in &violations {
            println!("VIOLATION {v}");
        }
        println!("{} violation(s)", violations.len());
        Ok(1)
    }
}

fn header(props: &BasicProperties, name: &str) -> String {
    match props.headers().as_ref().and_then(|h| h.inner().get(name)) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        Some(AMQPValue::LongLongInt(n)) => n.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

async fn dlq_channel(
    cfg: &Config,
) -> anyhow::Result<(lapin::Connection, lapin::Channel, Topology)> {
    let conn = floodgate_common::amqp::connect(&cfg.amqp_url, "floodgate dlq")
        .await
        .context("connecting to RabbitMQ")?;
    let ch = conn.create_channel().await?;
    let topology = Topology::with_retry_steps(&cfg.namespace, cfg.retry_delays.len());
    topology.declare(&ch).await?;
    Ok((conn, ch, topology))
}

/// Reads dead letters without acking them; closing the channel puts them all back.
async fn dlq_list(cfg: &Config, limit: usize) -> anyhow::Result<()> {
    let (conn, ch, topology) = dlq_channel(cfg).await?;
    let mut n = 0;
    while n < limit {
        let Some(m) = ch
            .basic_get(
                topology.dead_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?
        else {
            break;
        };
        n += 1;
        let props = &m.delivery.properties;
        let id = props
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".into());
        let body = String::from_utf8_lossy(&m.delivery.data);
        let body: String = body.chars().take(200).collect();
        println!(
            "{id}\treason={}\tattempts={}\t{body}",
            header(props, REASON_HEADER),
            header(props, ATTEMPT_HEADER)
        );
    }
    let _ = ch.close(200, "listed".into()).await;
    let _ = conn.close(200, "listed".into()).await;
    eprintln!("{n} dead letter(s) in {}", topology.dead_queue);
    Ok(())
}

async fn dlq_replay(
    cfg: &Config,
    all: bool,
    orders: &[String],
    limit: usize,
) -> anyhow::Result<()> {
    let (conn, ch, topology) = dlq_channel(cfg).await?;
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let (mut replayed, mut kept) = (0, 0);
    for _ in 0..limit {
        let Some(m) = ch
            .basic_get(
                topology.dead_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?
        else {
            break;
        };
        let props = m.delivery.properties.clone();
        let id = props.message_id().as_ref().map(|s| s.to_string());
        let wanted = all || id.as_ref().is_some_and(|id| orders.contains(id));
        if !wanted {
            kept += 1;
            continue; // unacked: back in the queue when the channel closes
        }
        let mut headers = props.headers().clone().unwrap_or_default();
        let reason = header(&props, REASON_HEADER);
        let mut inner = headers.inner().clone();
        inner.remove(REASON_HEADER);
        inner.remove(ATTEMPT_HEADER);
        headers = inner.into();
        let confirm = publish
            .basic_publish(
                topology.orders_exchange.as_str().into(),
                topology.intake_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &m.delivery.data,
                props.with_headers(headers).with_delivery_mode(2),
            )
            .await?
            .await?;
        anyhow::ensure!(
            matches!(confirm, Confirmation::Ack(None)),
            "the broker did not take a replayed message: {confirm:?}"
        );
        m.delivery.acker.ack(Default::default()).await?;
        replayed += 1;
        println!("replayed {} (was: {reason})", id.as_deref().unwrap_or("-"));
    }
    let _ = ch.close(200, "replayed".into()).await;
    let _ = conn.close(200, "replayed".into()).await;
    eprintln!(
        "{replayed} replayed, {kept} left in {}",
        topology.dead_queue
    );
    Ok(())
}
