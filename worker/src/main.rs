use anyhow::Context;
use floodgate_common::{Config, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init_logging();
    let cfg = Config::from_env().context("reading configuration")?;
    let worker = floodgate_worker::Worker::build(cfg).await?;
    tracing::info!(port = worker.port(), "worker consuming");
    worker.run_until_stopped(shutdown::on_signal()).await
}
