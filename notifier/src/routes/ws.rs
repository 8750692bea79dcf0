//! `GET /v1/ws`: WebSocket. The client sends `{"subscribe":[...]}` and
//! `{"unsubscribe":[...]}` (both may be in one message) and gets
//! `{"type":"subscribed","topics":[every topic held]}` back, then the events as text
//! messages. `?topics=` subscribes before the upgrade, with HTTP errors.
//!
//! A token that does not verify is refused with 401 before the upgrade. After it, a
//! refused subscription closes the socket with code 4000 + the HTTP status it would
//! have had (4400 invalid_topic, 4401, 4403, 4404) and `code: detail` as the reason.
//! The notifier pings every `FLOODGATE_KEEPALIVE_SECS` and closes a client that misses
//! two pongs; on shutdown it closes every socket with 1001.

use super::{AppState, Sent, caller, subscribe};
use crate::{
    error::{ApiError, truncate},
    hub::{CloseReason, Next, SubscribeError, Subscription, Transport},
    topics::Topic,
};
use axum::{
    extract::{
        Query, State,
        ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade},
    },
    http::HeaderMap,
    response::Response,
};
use futures::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use serde::Deserialize;
use serde_json::json;
use std::{collections::HashMap, time::Duration};
use tokio::time::Instant;

/// Largest client message accepted (a subscribe of 100 topics fits easily).
const MAX_MESSAGE: usize = 16 * 1024;
/// How long the closing handshake may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

#[utoipa::path(
    get, path = "/v1/ws", tag = "streams",
    security((), ("bearer" = []), ("access_token" = [])),
    summary = "WebSocket: subscribe and unsubscribe with messages, events as text messages",
    description = "Client messages: `{\"subscribe\":[...]}` / `{\"unsubscribe\":[...]}`, each \
        answered with `{\"type\":\"subscribed\",\"topics\":[...]}`; events are `StockEvent` \
        and `OrderEvent` JSON. A refused subscription closes with 4000 + its HTTP status.",
    params(("topics" = Option<super::openapi::Topics>, Query, nullable = false,
        description = "subscribes before the upgrade, with HTTP errors")),
    responses(
        (status = 101, description = "switching to the WebSocket protocol"),
        super::openapi::UpgradeErrors,
    ),
)]
pub async fn upgrade(
    ws: WebSocketUpgrade,
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let caller = caller(&st, &headers, q.get("access_token").map(String::as_str))?;
    let initial = match q.get("topics") {
        Some(list) => Topic::parse_list(list.split(',')).map_err(SubscribeError::InvalidTopic)?,
        None => Vec::new(),
    };
    let mut sub = st.hub.subscribe(caller, Transport::Ws)?;
    if !initial.is_empty() {
        subscribe(&st, &mut sub, &initial).await?;
    }
    Ok(ws
        .max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| run(socket, sub, st)))
}

/// A control message from the client.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Control {
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    unsubscribe: Vec<String>,
}

/// How a socket ends.
enum End {
    /// The client vanished, or cannot be written to.
    Gone,
    /// The client sent a close frame.
    ClientClosed,
    /// The notifier closes it with a reason.
    Close(u16, String),
}

async fn run(socket: WebSocket, mut sub: Subscription, st: AppState) {
    let (mut tx, mut rx) = socket.split();
    let keepalive = st.cfg.keepalive;
    let sent = Sent::new("ws");
    let mut ping = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
    // Pings sent since the last pong.
    let mut unanswered = 0u32;
    let end = loop {
        // Pings go before events, so a busy stream cannot starve them.
        let out = tokio::select! {
            biased;
            _ = st.shutdown.cancelled() => {
                sub.close(CloseReason::ShuttingDown);
                break close_for(CloseReason::ShuttingDown);
            }
            _ = ping.tick() => {
                if unanswered >= 2 {
                    sub.close(CloseReason::PingTimeout);
                    break close_for(CloseReason::PingTimeout);
                }
                unanswered += 1;
                Message::Ping(Default::default())
            }
            msg = rx.next() => match msg {
                None | Some(Err(_)) => break End::Gone,
                Some(Ok(Message::Close(_))) => break End::ClientClosed,
                Some(Ok(Message::Pong(_))) => {
                    unanswered = 0;
                    continue;
                }
                // axum answers pings itself.
                Some(Ok(Message::Ping(_))) => continue,
                Some(Ok(Message::Text(text))) => match control(&st, &mut sub, text.as_str()).await {
                    Ok(reply) => Message::Text(reply.into()),
                    Err(e) => {
                        sub.close(CloseReason::Rejected);
                        break End::Close(e.close_code(), e.close_reason());
                    }
                },
                Some(Ok(Message::Binary(_))) => {
                    sub.close(CloseReason::ProtocolError);
                    break close_for(CloseReason::ProtocolError);
                }
            },
            next = sub.next() => match next {
                Next::Order(e) => {
                    sent.order(e.event.at);
                    Message::Text(e.json.as_str().into())
                }
                Next::Stock(l) => {
                    sent.stock(&l);
                    Message::Text((&*l.json).into())
                }
                Next::Closed(r) => break close_for(r),
            },
        };
        // A client that stops reading blocks this send. It ends when the hub closes the
        // subscriber (its order buffer filled), on shutdown, or after two keep-alive
        // intervals (a stock-only subscriber never fills a buffer): the socket is
        // dropped, since nothing more can be written to it anyway.
        tokio::select! {
            r = tx.send(out) => if r.is_err() { break End::Gone },
            _ = sub.closed() => break End::Gone,
            _ = st.shutdown.cancelled() => break End::Gone,
            _ = tokio::time::sleep(keepalive * 2) => {
                sub.close(CloseReason::SlowConsumer);
                break End::Gone;
            }
        }
    };
    match end {
        End::Close(code, reason) => close(&mut tx, &mut rx, code, reason).await,
        // Complete the closing handshake the client started.
        End::ClientClosed => {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, tx.close()).await;
        }
        End::Gone => {}
    }
}

fn close_for(r: CloseReason) -> End {
    let code = match r {
        CloseReason::ShuttingDown | CloseReason::PingTimeout => 1001,
        CloseReason::SlowConsumer | CloseReason::Resync | CloseReason::Rejected => 1008,
        CloseReason::ProtocolError => 1003,
        // As a refused subscription without a valid token would be.
        CloseReason::TokenExpired => 4401,
    };
    End::Close(code, truncate(format!("{}: {}", r.code(), r.detail()), 123))
}

/// The closing handshake: our close frame, then the client's answer (or
/// [`CLOSE_TIMEOUT`]), so a browser sees a clean close rather than a dropped connection.
async fn close(
    tx: &mut SplitSink<WebSocket, Message>,
    rx: &mut SplitStream<WebSocket>,
    code: u16,
    reason: String,
) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if tx.send(Message::Close(Some(frame))).await.is_ok() {
            while let Some(Ok(m)) = rx.next().await {
                if let Message::Close(_) = m {
                    break;
                }
            }
        }
        let _ = tx.close().await;
    })
    .await;
}

/// Applies one control message; the reply lists every topic held.
async fn control(st: &AppState, sub: &mut Subscription, text: &str) -> Result<String, ApiError> {
    let c: Control = serde_json::from_str(text).map_err(|e| {
        SubscribeError::InvalidTopic(format!(
            "expected {{\"subscribe\":[...]}} or {{\"unsubscribe\":[...]}}: {e}"
        ))
    })?;
    if !c.unsubscribe.is_empty() {
        let topics = Topic::parse_list(c.unsubscribe.iter().map(String::as_str))
            .map_err(SubscribeError::InvalidTopic)?;
        sub.remove(&topics);
    }
    if !c.subscribe.is_empty() {
        let topics = Topic::parse_list(c.subscribe.iter().map(String::as_str))
            .map_err(SubscribeError::InvalidTopic)?;
        subscribe(st, sub, &topics).await?;
    }
    Ok(json!({"type": "subscribed", "topics": sub.topics()}).to_string())
}
