//! `floodgate`: the operator command.

use anyhow::Context;
use clap::{Parser, Subcommand};
use floodgate_common::{
    Config, auth,
    domain::{Role, UserId},
    telemetry,
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cfg = Config::from_env().context("reading configuration")?;
    match cli.command {
        Command::Migrate => {
            telemetry::init_logging_with_default("warn");
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
    }
    Ok(())
}
