#[tokio::main]
async fn main() -> anyhow::Result<()> {
    floodgate_notifier::main_from_env().await
}
