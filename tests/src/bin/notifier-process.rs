//! The production notifier entry point, built inside the test package so tests can start it
//! as a real process via `CARGO_BIN_EXE_notifier-process`.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    floodgate_notifier::main_from_env().await
}
