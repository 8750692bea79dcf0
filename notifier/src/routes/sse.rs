//! `GET /v1/stream?topics=...`: Server-Sent Events. Errors before the stream starts are
//! problem+json; once streaming, a stream the notifier ends gets a last `error` event
//! with the reason (`slow_consumer`, `shutting_down`).

use super::{AppState, CLOSE_GRACE, Sent, caller, subscribe};
use crate::{
    error::ApiError,
    hub::{CloseReason, Next, Subscription, Transport},
    topics::Topic,
};
use axum::{
    Extension,
    extract::{Query, State},
    http::HeaderMap,
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use floodgate_common::http::ConnectionHandle;
use serde_json::json;
use std::{collections::HashMap, convert::Infallible};
use tokio_util::sync::CancellationToken;

#[utoipa::path(
    get, path = "/v1/stream", tag = "streams",
    security((), ("bearer" = []), ("access_token" = [])),
    summary = "Server-Sent Events: `stock`, `order` and a last `error` event",
    description = "Each event's `data` is one JSON object: a `StockEvent` (`event: stock`), an \
        `OrderEvent` (`event: order`), or, when the notifier ends the stream, an `ErrorEvent` \
        (`event: error`); a comment line every 15 s keeps it alive. Without a token only \
        public topics (`stock:...`) may be named.",
    params(("topics" = super::openapi::Topics, Query,
        description = "comma-separated, at most 100")),
    responses(
        (status = 200, description = "the stream: one `StreamEvent` after another",
            content_type = "text/event-stream", body = super::openapi::StreamEvent),
        super::openapi::SubscribeErrors,
    ),
)]
pub async fn stream(
    State(st): State<AppState>,
    Extension(conn): Extension<ConnectionHandle>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let caller = caller(&st, &headers, q.get("access_token").map(String::as_str))?;
    let topics = Topic::parse_list(q.get("topics").map_or("", String::as_str).split(','))
        .map_err(crate::hub::SubscribeError::InvalidTopic)?;
    let mut sub = st.hub.subscribe(caller, Transport::Sse)?;
    subscribe(&st, &mut sub, &topics).await?;
    watch_for_close(&sub, conn);

    struct Stream {
        sub: Subscription,
        sent: Sent,
        shutdown: CancellationToken,
        done: bool,
    }
    let state = Stream {
        sub,
        sent: Sent::new("sse"),
        shutdown: st.shutdown.clone(),
        done: false,
    };
    let events = futures::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let event = tokio::select! {
            biased;
            _ = s.shutdown.cancelled() => {
                s.sub.close(CloseReason::ShuttingDown);
                s.done = true;
                closing(CloseReason::ShuttingDown)
            }
            next = s.sub.next() => match next {
                Next::Order(e) => {
                    s.sent.order(e.event.at);
                    Event::default().event("order").data(&e.json)
                }
                Next::Stock(l) => {
                    s.sent.stock(&l);
                    Event::default().event("stock").data(&*l.json)
                }
                Next::Closed(r) => {
                    s.done = true;
                    closing(r)
                }
            },
        };
        Some((Ok::<_, Infallible>(event), s))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(st.cfg.keepalive))
        .into_response())
}

fn closing(r: CloseReason) -> Event {
    Event::default()
        .event("error")
        .data(json!({"type": "error", "code": r.code(), "detail": r.detail()}).to_string())
}

/// When the hub closes this stream (a slow consumer), the last event is written only if
/// the client reads again; the connection is dropped after [`CLOSE_GRACE`] either way.
fn watch_for_close(sub: &Subscription, conn: ConnectionHandle) {
    let closed = sub.closed_token();
    let gone = sub.dropped_token();
    tokio::spawn(async move {
        tokio::select! {
            _ = closed.cancelled() => {
                tokio::select! {
                    _ = gone.cancelled() => {}
                    _ = tokio::time::sleep(CLOSE_GRACE) => {}
                }
                conn.kill();
            }
            _ = gone.cancelled() => {}
        }
    });
}
