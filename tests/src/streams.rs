//! Stream clients for the notifier tests: a minimal SSE reader over reqwest and a
//! WebSocket client (tokio-tungstenite), both yielding parsed JSON events.

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use std::{pin::Pin, time::Duration};
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};

type ByteStream = Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// One SSE event: its `event:` name and its `data:` as JSON.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub name: String,
    pub data: Value,
}

/// An open SSE stream.
pub struct Sse {
    body: ByteStream,
    buf: Vec<u8>,
    /// True once the server ended the stream.
    pub ended: bool,
}

impl Sse {
    /// GETs `url`; Err with the status and body when the stream is refused.
    pub async fn connect(client: &reqwest::Client, url: &str) -> Result<Self, (u16, Value)> {
        let resp = client
            .get(url)
            .header("Accept", "text/event-stream")
            .send()
            .await
            .expect("connect to the notifier");
        let status = resp.status().as_u16();
        if status != 200 {
            let text = resp.text().await.unwrap_or_default();
            return Err((
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            ));
        }
        Ok(Self {
            body: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
            ended: false,
        })
    }

    /// The next event (keep-alive comments skipped); None when the stream ended or
    /// nothing came within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<SseEvent> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = find(&self.buf, b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&block);
                let mut name = String::from("message");
                let mut data = String::new();
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Some(SseEvent {
                    name,
                    data: serde_json::from_str(&data).unwrap_or(Value::String(data)),
                });
            }
            match tokio::time::timeout_at(until, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.extend_from_slice(&chunk),
                Ok(_) => {
                    self.ended = true;
                    return None;
                }
                Err(_) => return None,
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An open WebSocket.
pub struct Ws {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    /// The close frame the server sent, once it did.
    pub closed: Option<(u16, String)>,
}

impl Ws {
    /// Opens `url` (ws://...); Err with the HTTP status when the upgrade is refused.
    pub async fn connect(url: &str) -> Result<Self, u16> {
        match tokio_tungstenite::connect_async(url).await {
            Ok((socket, _)) => Ok(Self {
                socket,
                closed: None,
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("websocket connect failed: {e}"),
        }
    }

    pub async fn send(&mut self, v: &Value) {
        self.socket
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("send");
    }

    /// The next JSON message; None when the socket closed (see `closed`) or nothing came
    /// within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Value> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(until, self.socket.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Some(serde_json::from_str(t.as_str()).expect("JSON message"));
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    self.closed = Some(frame.map_or((1005, String::new()), |f| {
                        (u16::from(f.code), f.reason.to_string())
                    }));
                    return None;
                }
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .socket
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}
