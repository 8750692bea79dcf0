//! `floodgate`: the operator command.

use anyhow::Context;
use clap::{Parser, Subcommand};
use floodgate_common::{
    Config, auth, dlq,
    domain::{Role, UserId},
    reconcile, telemetry,
};
use std::time::Duration;

/// Operate a floodgate deployment. Reads the same FLOODGATE_* environment variables as
/// the services (namespace, database, Redis, RabbitMQ, JWT secret).
#[derive(Parser)]
#[command(name = "floodgate", version, about)]
struct Cli {
    /// Who is running the command, for the audit log (recorded as `cli:<name>`).
    /// Default: $USER (or $LOGNAME).
    #[arg(long, global = true)]
    actor: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// The operator named by `--actor`, else by the environment, as the audit log records it.
fn operator(actor: Option<&str>) -> anyhow::Result<floodgate_common::audit::Actor> {
    let name = match actor {
        Some(a) => a.to_owned(),
        None => std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "unknown".into()),
    };
    anyhow::ensure!(
        (1..=64).contains(&name.len()) && name.bytes().all(|b| (0x21..=0x7e).contains(&b)),
        "--actor: 1-64 visible ASCII characters, got {name:?}"
    );
    Ok(floodgate_common::audit::Actor::operator(&name))
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
        /// customer, manager or admin.
        #[arg(long, default_value = "customer", value_parser = ["customer", "manager", "admin"])]
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
        /// Reload only if Redis has no stock loaded (a fresh namespace or a fresh Redis);
        /// when it is loaded, exit at once without the invariant scan.
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
    /// Send dead letters back to the intake queue (each to the partition it came from),
    /// attempts reset. The worker treats a replay like any redelivery: an order already
    /// recorded stays as it is.
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
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        // One readable line with the cause chain; no backtrace for an operator.
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // On stderr, not in the logs: those share stdout with what the command prints (a
    // token read with `$(floodgate token ...)`).
    for (name, closest) in floodgate_common::config::unknown_env() {
        eprintln!(
            "warning: {}",
            floodgate_common::config::unknown_var_message(&name, closest)
        );
    }
    let cfg = Config::from_env().context("reading configuration")?;
    telemetry::init_logging_with_default("warn");
    // Checked only by the commands that write (an odd $USER must not stop a `token`).
    let actor = || operator(cli.actor.as_deref());
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
            let role = match role.as_str() {
                "admin" => Role::Admin,
                "manager" => Role::Manager,
                _ => Role::Customer,
            };
            println!(
                "{}",
                auth::mint_for(&cfg, &user, role, Duration::from_secs(ttl_secs))
            );
        }
        Command::Reconcile {
            check,
            if_unloaded,
            quiet_secs,
            timeout_secs,
        } => {
            let actor = if check { None } else { Some(actor()?) };
            let code = reconcile_cmd(
                &cfg,
                actor.as_ref(),
                check,
                if_unloaded,
                quiet_secs,
                timeout_secs,
            )
            .await?;
            std::process::exit(code);
        }
        Command::Dlq { command } => match command {
            DlqCommand::List { limit } => dlq_list(&cfg, limit).await?,
            DlqCommand::Replay { all, order, limit } => {
                anyhow::ensure!(
                    all || !order.is_empty(),
                    "say which dead letters to replay: --all, or --order <id> (see floodgate dlq list)"
                );
                dlq_replay(&cfg, &actor()?, all, &order, limit).await?;
            }
        },
    }
    Ok(())
}

async fn reconcile_cmd(
    cfg: &Config,
    actor: Option<&floodgate_common::audit::Actor>,
    check_only: bool,
    if_unloaded: bool,
    quiet_secs: u64,
    timeout_secs: u64,
) -> anyhow::Result<i32> {
    let pool = floodgate_common::db::pool(cfg)?;
    let mut redis = floodgate_common::redis::connect(&cfg.redis_url)
        .await
        .context("connecting to Redis")?;
    let shards = cfg.shards();
    let loaded = floodgate_common::redis::all_loaded(&redis, &shards)
        .await
        .context("reading the stock epochs")?;
    if if_unloaded {
        // Never a change of the shard count: that reloads a live namespace, which only an
        // operator who drained it may do (docs/OPERATIONS.md).
        floodgate_common::stock::check_layout(&mut redis, &shards)
            .await
            .context("--if-unloaded does not change the shard count; drain, then run `floodgate reconcile`")?;
    }
    if if_unloaded && loaded {
        floodgate_common::stock::adopt_layout(&mut redis, &shards).await?;
        // Starting a stack must not cost time proportional to history: the invariant
        // scan is `floodgate reconcile --check`'s job.
        println!("stock is loaded; nothing to do");
        return Ok(0);
    }
    if !check_only {
        let skus = reconcile::repair(
            cfg,
            &pool,
            &mut redis,
            Duration::from_secs(quiet_secs),
            Duration::from_secs(timeout_secs),
            |msg| eprintln!("{msg}"),
        )
        .await?;
        // Recorded as soon as Redis was rewritten, whatever the check finds next.
        if let Some(actor) = actor {
            let db = pool.get().await.context("PostgreSQL connection")?;
            floodgate_common::audit::append(
                &db,
                actor,
                floodgate_common::audit::Entry {
                    action: "reconcile",
                    target: "stock".into(),
                    before: None,
                    after: Some(serde_json::json!({
                        "skus_loaded": skus,
                        "if_unloaded": if_unloaded,
                    })),
                },
            )
            .await?;
        }
    }
    let violations = reconcile::check(&pool, &mut redis, &shards, 3).await?;
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

async fn dlq_list(cfg: &Config, limit: usize) -> anyhow::Result<()> {
    let letters = dlq::list(cfg, limit).await?;
    for l in &letters {
        let body: String = l.body.chars().take(200).collect();
        println!(
            "{}\treason={}\tattempts={}\tpartition={}\t{body}",
            l.order_id.as_deref().unwrap_or("-"),
            l.reason,
            l.attempts,
            l.partition
        );
    }
    eprintln!("{} dead letter(s) shown", letters.len());
    Ok(())
}

async fn dlq_replay(
    cfg: &Config,
    actor: &floodgate_common::audit::Actor,
    all: bool,
    orders: &[String],
    limit: usize,
) -> anyhow::Result<()> {
    let select = if all {
        dlq::Select::All
    } else {
        dlq::Select::Orders(orders)
    };
    let pool = floodgate_common::db::pool(cfg)?;
    // Reachable before anything moves: a replay nobody could audit is not started.
    let db = pool.get().await.context("PostgreSQL connection")?;
    let (replayed, kept) = dlq::replay(cfg, select, limit).await?;
    for l in &replayed {
        floodgate_common::audit::append(
            &db,
            actor,
            floodgate_common::audit::Entry {
                action: "dlq.replay",
                target: l
                    .order_id
                    .as_deref()
                    .map_or_else(|| "dlq".to_owned(), |id| format!("order:{id}")),
                before: Some(serde_json::json!({ "reason": l.reason, "attempts": l.attempts })),
                after: Some(serde_json::json!({ "partition": l.partition })),
            },
        )
        .await?;
        println!(
            "replayed {} to partition {} (was: {})",
            l.order_id.as_deref().unwrap_or("-"),
            l.partition,
            l.reason
        );
    }
    eprintln!(
        "{} replayed, {kept} left in the dead-letter queue",
        replayed.len()
    );
    Ok(())
}
