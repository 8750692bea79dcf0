//! The HTTP server loop. axum's `serve` cannot drop one chosen connection, and the
//! notifier needs to: a subscriber that stopped reading holds its socket open with its
//! send buffer full, so nothing written to it (not even "you are too slow") ever
//! leaves. Each connection here carries a kill switch in its requests' extensions, and
//! pulling it drops the socket.
//!
//! Every accepted socket also gets a bounded kernel send buffer and HTTP/1 write buffer,
//! so a stalled client is found out after kilobytes, not after megabytes of autotuned
//! buffers, and memory per subscriber stays bounded.

use axum::{Router, extract::Request};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

/// The HTTP/1 buffer bound per connection (hyper's minimum is 8 KiB).
const HTTP_BUFFER: usize = 16 * 1024;
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection's kill switch, found in every request's extensions.
#[derive(Clone, Debug)]
pub struct ConnectionHandle {
    kill: CancellationToken,
}

impl ConnectionHandle {
    /// Drops the connection now, whatever it is doing.
    pub fn kill(&self) {
        self.kill.cancel();
    }
}

/// Serves `router` on `listener` until `shutdown`; then stops accepting, lets each
/// connection finish gracefully for up to `grace`, and drops the rest.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    send_buffer: usize,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let connections = TaskTracker::new();
    loop {
        let (stream, _peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, usually: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(send_buffer) {
            tracing::debug!(error = %e, "could not bound the send buffer");
        }
        let handle = ConnectionHandle {
            kill: CancellationToken::new(),
        };
        let kill = handle.kill.clone();
        let service = router
            .clone()
            .map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(handle.clone());
                req
            });
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(HTTP_BUFFER)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = kill.cancelled() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(grace, conn).await;
                }
            }
        });
    }
    // Stop accepting: new connections are refused, not left waiting in the backlog.
    drop(listener);
    connections.close();
    connections.wait().await;
}
