//! The mock data platform (`floodgate_tests::mock_platform`) as a process, for demos and
//! by-hand runs: point a webhook at it, watch the deliveries, break it on purpose.
//!
//!     mock-platform [--bind 127.0.0.1:9900] [--secret whsec_...]
//!
//! The secret may come from `MOCK_PLATFORM_SECRET` instead (kept out of `ps`), or later
//! with `POST /secret {"secret":"whsec_..."}`; until then deliveries are answered but
//! recorded unverified. One line per request on stdout; steer it with `POST /control`
//! (`{"mode":"fail","ratio":0.3}`, `{"mode":"down","for_secs":10}`...), read it with
//! `GET /stats` and `GET /received`. Runs until Ctrl-C.

use anyhow::Context;
use clap::Parser;
use floodgate_tests::mock_platform::MockPlatform;
use std::net::SocketAddr;
use time::format_description::well_known::Rfc3339;
use tokio::sync::broadcast::error::RecvError;

#[derive(Parser)]
#[command(
    name = "mock-platform",
    about = "A mock data platform receiving floodgate's webhooks: verifies their signatures, records them, fails on demand"
)]
struct Args {
    /// Address to listen on (deliveries to /hook, control on /control, /secret, /stats, /received).
    #[arg(long, default_value = "127.0.0.1:9900")]
    bind: SocketAddr,
    /// The webhook's signing secret (whsec_<base64>), as floodgate showed it on creation.
    #[arg(long, env = "MOCK_PLATFORM_SECRET", hide_env_values = true)]
    secret: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mock = MockPlatform::start_on(args.bind)
        .await
        .with_context(|| format!("bind {}", args.bind))?;
    if let Some(secret) = &args.secret {
        mock.try_set_secret(secret)?;
    }
    println!(
        "mock-platform: deliveries to {}, control at {}/control; {}",
        mock.url(),
        mock.base_url(),
        if args.secret.is_some() {
            "verifying signatures"
        } else {
            "no secret: recording deliveries unverified (POST /secret to set one)"
        }
    );
    // Subscribed before anything can arrive, so the log misses nothing.
    let mut log = mock.subscribe();
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            r = log.recv() => match r {
                Ok(r) => println!(
                    "{}  {}  {}  verified={}  {}",
                    r.received_at.format(&Rfc3339).unwrap_or_default(),
                    if r.webhook_id.is_empty() { "-" } else { &r.webhook_id },
                    if r.event_type.is_empty() { "-" } else { &r.event_type },
                    r.verified,
                    match r.answered {
                        0 => "dropped".to_owned(),
                        s => s.to_string(),
                    },
                ),
                Err(RecvError::Lagged(n)) => println!("... {n} requests not logged (too many at once)"),
                Err(RecvError::Closed) => break,
            },
        }
    }
    let stats = (
        mock.count(),
        mock.accepted().len(),
        mock.unique_accepted_ids().len(),
    );
    println!(
        "mock-platform: {} requests, {} accepted, {} distinct events",
        stats.0, stats.1, stats.2
    );
    Ok(())
}
