//! What every service binary does before it starts: answer `--help` and `--version`
//! (and refuse arguments it does not know) without touching a server. Configuration
//! comes only from the environment; the help says which variables matter.

/// The part of every service's `--help` after its own description.
const ENVIRONMENT: &str = "\
Configuration comes from FLOODGATE_* environment variables; there are no flags.
Required:
  FLOODGATE_JWT_SECRET   HS256 secret(s), comma-separated, each >= 32 bytes; the first
                         signs, all verify (rotation). `ops/stack up` keeps one in
                         .stack/jwt-secret.
Common:
  FLOODGATE_NAMESPACE    prefix of every Redis key, AMQP name and the SQL schema
  FLOODGATE_REDIS_URL, FLOODGATE_AMQP_URL, FLOODGATE_DATABASE_URL
  FLOODGATE_INGRESS_ADDR, FLOODGATE_WORKER_ADDR, FLOODGATE_NOTIFIER_ADDR
Every variable, its default and its limits: README.md, section Configuration.
Signals: SIGTERM or SIGINT stops gracefully.";

/// Parses the command line of service `name`: prints help or the version and exits for
/// `--help`/`--version`, exits 2 with usage on anything else; returns when there are no
/// arguments.
pub fn service_args(name: &'static str, about: &'static str) {
    clap::Command::new(name)
        .bin_name(name)
        .version(env!("CARGO_PKG_VERSION"))
        .about(about)
        .after_help(ENVIRONMENT)
        .get_matches();
}
