#[tokio::main]
async fn main() -> anyhow::Result<()> {
    floodgate_worker::main_from_env().await
}
