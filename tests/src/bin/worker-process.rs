//! The production worker entry point, built inside the test package so the fault tests can
//! start it as a real process (and SIGKILL it) via `CARGO_BIN_EXE_worker-process`.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    floodgate_worker::main_from_env().await
}
