#[tokio::main]
async fn main() -> anyhow::Result<()> {
    floodgate_ingress::main_from_env().await
}

/// glibc's malloc and free took about 17 % of ingress's CPU under load (perf); mimalloc's
/// thread-local free lists cost a fraction of that for the many small, short-lived
/// allocations of a request or a batch.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
