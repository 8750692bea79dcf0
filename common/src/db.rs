//! PostgreSQL: one schema per namespace, a connection pool whose sessions search that
//! schema, and migrations applied by refinery under an advisory lock.

use crate::{Config, Namespace};
use anyhow::Context;
use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// A PostgreSQL SQLSTATE floodgate reacts to.
pub mod sqlstate {
    pub use tokio_postgres::error::SqlState;
}

fn pg_config(cfg: &Config) -> anyhow::Result<tokio_postgres::Config> {
    url_config(cfg, &cfg.database_url, "FLOODGATE_DATABASE_URL")
}

fn url_config(cfg: &Config, url: &str, var: &str) -> anyhow::Result<tokio_postgres::Config> {
    let mut pg: tokio_postgres::Config = url
        .parse()
        .with_context(|| format!("{var} is not a PostgreSQL URL"))?;
    // A statement waiting on a row lock fails (transiently) instead of hanging a batch.
    pg.options(format!(
        "-c search_path={} -c lock_timeout={}",
        cfg.namespace,
        cfg.db_lock_timeout.as_millis()
    ));
    if pg.get_application_name().is_none() {
        pg.application_name("floodgate");
    }
    pg.connect_timeout(std::time::Duration::from_secs(5));
    Ok(pg)
}

/// A pool whose connections use the namespace's schema.
pub fn pool(cfg: &Config) -> anyhow::Result<Pool> {
    pool_of(cfg, pg_config(cfg)?)
}

/// A pool on the replica of `FLOODGATE_DATABASE_REPLICA_URL`, if one is set.
pub fn replica_pool(cfg: &Config) -> anyhow::Result<Option<Pool>> {
    cfg.database_replica_url
        .as_deref()
        .map(|url| pool_of(cfg, url_config(cfg, url, "FLOODGATE_DATABASE_REPLICA_URL")?))
        .transpose()
}

fn pool_of(cfg: &Config, pg: tokio_postgres::Config) -> anyhow::Result<Pool> {
    let mgr = deadpool_postgres::Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(cfg.db_pool_size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .wait_timeout(Some(std::time::Duration::from_secs(10)))
        .build()
        .context("building the PostgreSQL pool")
}

async fn connect(pg: &tokio_postgres::Config) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = pg.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "migration connection closed");
        }
    });
    Ok(client)
}

/// Creates the database named in the URL if it does not exist (connecting to the
/// `postgres` database to do so). Safe to race: a concurrent creation is not an error.
pub async fn ensure_database(cfg: &Config) -> anyhow::Result<()> {
    let pg = pg_config(cfg)?;
    let name = pg.get_dbname().unwrap_or("postgres").to_owned();
    if connect(&pg).await.is_ok() {
        return Ok(());
    }
    let mut admin = pg.clone();
    admin.dbname("postgres");
    let client = connect(&admin)
        .await
        .context("connecting to the postgres database to create floodgate's")?;
    let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match client.batch_execute(&sql).await {
        Ok(()) => Ok(()),
        // Two processes racing to create it: one wins, the other sees either code.
        Err(e)
            if e.code() == Some(&sqlstate::SqlState::DUPLICATE_DATABASE)
                || e.code() == Some(&sqlstate::SqlState::UNIQUE_VIOLATION) =>
        {
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("creating database {name}")),
    }
}

/// Creates the namespace's schema and applies the migrations in `migrations/`. Holds a
/// session advisory lock meanwhile, so processes starting together migrate one at a time.
pub async fn migrate(cfg: &Config) -> anyhow::Result<()> {
    let ns = cfg.namespace.as_str();
    let mut client = connect(&pg_config(cfg)?)
        .await
        .context("connecting to PostgreSQL to migrate")?;
    // hashtext is stable across sessions; the constant keeps us off other apps' locks.
    let lock = "SELECT pg_advisory_lock(hashtext('floodgate-migrate:' || $1))";
    client
        .execute(lock, &[&ns])
        .await
        .context("advisory lock")?;
    let result = async {
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {ns}"))
            .await
            .context("creating the namespace schema")?;
        embedded::migrations::runner()
            .run_async(&mut client)
            .await
            .context("applying migrations")
    }
    .await;
    let unlock = "SELECT pg_advisory_unlock(hashtext('floodgate-migrate:' || $1))";
    let _ = client.execute(unlock, &[&ns]).await;
    let report = result?;
    for m in report.applied_migrations() {
        tracing::info!(migration = %m, schema = ns, "applied");
    }
    Ok(())
}

/// The newest migration this build carries.
pub fn latest_migration() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}

/// Refuses a schema older than this build: a worker writing columns a migration has not
/// added yet would see every order refused by PostgreSQL and dead-letter it. PostgreSQL
/// out of reach is not decided here (the worker pauses and probes as ever); only a
/// schema that answers and is behind is an error, naming the fix.
pub async fn require_migrated(pool: &Pool, ns: &Namespace) -> anyhow::Result<()> {
    let client = match pool.get().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "PostgreSQL out of reach at start: schema version not checked");
            return Ok(());
        }
    };
    let needed = latest_migration();
    let found: Option<i32> = match client
        .query_opt("SELECT max(version) FROM refinery_schema_history", &[])
        .await
    {
        Ok(row) => row.and_then(|r| r.get(0)),
        // No history table: never migrated.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
        Err(e) => return Err(e).context("reading the schema's migration history"),
    };
    match found {
        Some(v) if v >= needed => Ok(()),
        found => anyhow::bail!(
            "the database schema of namespace {ns} is at migration {}, this build needs V{needed}: run `floodgate migrate` first",
            found.map_or("none".to_string(), |v| format!("V{v}"))
        ),
    }
}

/// Drops the namespace's schema and everything in it (tests clean up with this).
pub async fn drop_schema(cfg: &Config) -> anyhow::Result<()> {
    let client = connect(&pg_config(cfg)?).await?;
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            cfg.namespace.as_str()
        ))
        .await?;
    Ok(())
}
