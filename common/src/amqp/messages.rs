use crate::{
    domain::{IdempotencyKey, OrderId, OrderLines, OrderStatus, UserId},
    trace::{self, TraceParent},
};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Message headers carrying `t` as `traceparent` (W3C trace context), so the trace of
/// the request that placed an order continues in whoever consumes it.
pub fn trace_headers(t: &TraceParent) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert(
        trace::HEADER.into(),
        AMQPValue::LongString(t.to_string().into()),
    );
    h
}

/// The `traceparent` a message carries; None if absent or malformed.
pub fn trace_of(props: &BasicProperties) -> Option<TraceParent> {
    let v = props.headers().as_ref()?.inner().get(trace::HEADER)?;
    match v {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()
            .and_then(TraceParent::parse),
        AMQPValue::ShortString(s) => TraceParent::parse(s.as_str()),
        _ => None,
    }
}

/// What travels on the intake queue. Tagged and versioned: a new shape is a new variant,
/// so workers of two versions can share a queue during a rolling deploy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum IntakeMessage {
    #[serde(rename = "order.v1")]
    OrderV1(OrderPlaced),
    /// An order paid with points ([`OrderPlaced::points`]): a type of its own, so a
    /// worker older than points dead-letters it (undecodable) instead of committing it
    /// without spending them. [`IntakeMessage::of`] picks the type.
    #[serde(rename = "order.v2")]
    OrderV2(OrderPlaced),
}

/// An order ingress accepted: its stock is reserved in Redis until `deadline_ms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub items: OrderLines,
    /// RFC 3339, as answered to the client.
    pub accepted_at: String,
    /// The reservation's deadline, ms since the Unix epoch.
    pub deadline_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<IdempotencyKey>,
    /// The bucket counts of the order's SKUs that have buckets (absent: none has), which
    /// the worker needs to find the order's parts (`Shards::parts`) and cannot learn.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub buckets: std::collections::BTreeMap<String, usize>,
    /// The definitions of the bundles among `items` (absent: none is a bundle), as the
    /// reserve used them: the worker expands the same held lines without a query.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub bundles: crate::bundle::Bundles,
    /// Paid with points: the order's total, which its reservation holds and its commit
    /// spends (absent: paid elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points: Option<i64>,
}

impl OrderPlaced {
    /// The bucket count of `sku` in this order (1: no buckets).
    pub fn buckets_of(&self, sku: &crate::domain::Sku) -> usize {
        self.buckets.get(sku.as_str()).copied().unwrap_or(1)
    }

    /// The order's held lines ([`crate::bundle::held_lines`]): what Redis holds for it.
    pub fn held(&self) -> Vec<crate::bundle::HeldLine> {
        crate::bundle::held_lines(self.items.as_slice(), &self.bundles)
    }
}

impl IntakeMessage {
    /// The message of `o`: `order.v2` when it is paid with points, else `order.v1`.
    pub fn of(o: OrderPlaced) -> Self {
        match o.points {
            Some(_) => Self::OrderV2(o),
            None => Self::OrderV1(o),
        }
    }

    /// The order it carries.
    pub fn order(&self) -> &OrderPlaced {
        match self {
            Self::OrderV1(o) | Self::OrderV2(o) => o,
        }
    }

    pub fn into_order(self) -> OrderPlaced {
        match self {
            Self::OrderV1(o) | Self::OrderV2(o) => o,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("intake messages serialize")
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(b)
    }
}

/// What travels on the `events` exchange: an order's status changed (routing key
/// `order.<status>`). Written to the outbox by the transaction that changed the status
/// and published by the worker's relay; the AMQP `message_id` carries the outbox row's
/// event id, which subscribers de-duplicate by (the relay publishes at least once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "order")]
pub struct OrderEvent {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub status: OrderStatus,
    /// Why a `failed` order failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the status changed (the outbox row's write time).
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

impl OrderEvent {
    pub fn from_bytes(b: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(b)
    }
}

/// The AMQP `type` property of a message that carries an [`OrderEventBatch`]; a message
/// without it carries one [`OrderEvent`] (its `message_id` the event id).
pub const ORDER_EVENT_BATCH: &str = "order.batch";

/// Several order events in one message: the relay sends each run of consecutive outbox
/// rows with the same routing key (`order.<status>`) as one message, in row order, so
/// an order's events still arrive in the order they were committed, and the broker
/// handles one message per committed batch instead of one per order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderEventBatch {
    pub events: Vec<BatchedEvent>,
}

/// One event of a batch with its outbox event id, which subscribers de-duplicate by.
/// On the wire it may also carry `traceparent`: the trace of the request that placed
/// the order (readers that do not know it ignore it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchedEvent {
    pub id: uuid::Uuid,
    pub event: OrderEvent,
}

/// One event of a batch as [`OrderEventBatch::decode_each`] reads it.
#[derive(Debug)]
pub struct DecodedEvent {
    /// The outbox event id, which subscribers de-duplicate by.
    pub id: uuid::Uuid,
    /// The order's trace, when the batch carried a valid one.
    pub trace: Option<TraceParent>,
    /// The event, or why it could not be read (that costs only this event).
    pub event: Result<OrderEvent, serde_json::Error>,
}

/// A batch as read: each event still raw, so one bad event costs only itself.
#[derive(Deserialize)]
struct RawBatch<'a> {
    #[serde(borrow)]
    events: Vec<RawEvent<'a>>,
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    id: uuid::Uuid,
    #[serde(default, borrow)]
    traceparent: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    event: &'a serde_json::value::RawValue,
}

impl OrderEventBatch {
    pub fn from_bytes(b: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(b)
    }

    /// Reads a batch event by event: the envelope must parse, but an event that does
    /// not (a newer writer's field, a corrupted row) is its own error, not the batch's.
    /// A malformed `traceparent` is dropped, never an error.
    pub fn decode_each(b: &[u8]) -> Result<Vec<DecodedEvent>, serde_json::Error> {
        let raw: RawBatch = serde_json::from_slice(b)?;
        Ok(raw
            .events
            .into_iter()
            .map(|e| DecodedEvent {
                id: e.id,
                trace: e.traceparent.as_deref().and_then(TraceParent::parse),
                event: serde_json::from_str(e.event.get()),
            })
            .collect())
    }

    /// The wire form, built from the outbox rows' JSON payloads as they are, without
    /// decoding them:
    /// `{"events":[{"id":"<uuid>","traceparent":"<trace>","event":<payload>},...]}`
    /// (`traceparent` only for rows that have one).
    pub fn encode_raw<'a>(
        rows: impl IntoIterator<Item = (uuid::Uuid, Option<TraceParent>, &'a str)>,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        out.extend_from_slice(br#"{"events":["#);
        for (i, (id, trace, payload)) in rows.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(br#"{"id":""#);
            out.extend_from_slice(id.hyphenated().to_string().as_bytes());
            if let Some(t) = trace {
                // Hex digits and dashes only: nothing to escape.
                out.extend_from_slice(br#"","traceparent":""#);
                out.extend_from_slice(t.to_string().as_bytes());
            }
            out.extend_from_slice(br#"","event":"#);
            out.extend_from_slice(payload.as_bytes());
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refuses_invalid_payloads() {
        let json = r#"{"type":"order.v1","order_id":"0190f0b4-1a2b-7c3d-8e4f-123456789abc",
            "user_id":"alice","items":[{"sku":"tee","qty":2}],
            "accepted_at":"2026-11-21T10:00:00Z","deadline_ms":1}"#;
        let m = IntakeMessage::from_bytes(json.as_bytes()).unwrap();
        let o = m.order();
        assert_eq!(o.items.as_slice()[0].qty.get(), 2);
        assert!(IntakeMessage::from_bytes(&m.to_bytes()).is_ok());
        let bad_qty = json.replace("\"qty\":2", "\"qty\":0");
        assert!(IntakeMessage::from_bytes(bad_qty.as_bytes()).is_err());
        assert!(IntakeMessage::from_bytes(b"garbage").is_err());
    }

    #[test]
    fn order_events_read_what_postgres_writes() {
        // jsonb_build_object(...) renders a timestamptz like this, and reason as null.
        let json = r#"{"at": "2026-11-21T10:00:00.123456+00:00", "type": "order",
            "reason": null, "status": "confirmed", "user_id": "alice",
            "order_id": "0190f0b4-1a2b-7c3d-8e4f-123456789abc"}"#;
        let e = OrderEvent::from_bytes(json.as_bytes()).unwrap();
        assert_eq!(e.status, OrderStatus::Confirmed);
        assert_eq!(e.reason, None);
        let out = serde_json::to_value(&e).unwrap();
        assert_eq!(out["type"], "order");
        assert!(OrderEvent::from_bytes(&json.replace("confirmed", "lost").into_bytes()).is_err());
    }

    #[test]
    fn a_raw_batch_decodes_to_its_events_in_order() {
        let a = r#"{"type":"order","order_id":"0190f0b4-1a2b-7c3d-8e4f-123456789abc","user_id":"alice","status":"confirmed","at":"2026-11-21T10:00:00Z"}"#;
        let b = r#"{"type":"order","order_id":"0190f0b4-1a2b-7c3d-8e4f-123456789abd","user_id":"bob","status":"failed","reason":"insufficient_stock","at":"2026-11-21T10:00:01Z"}"#;
        let (ia, ib) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let t = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let raw = OrderEventBatch::encode_raw([(ia, t, a), (ib, None, b)]);
        let batch = OrderEventBatch::from_bytes(&raw).unwrap();
        assert_eq!(batch.events.len(), 2);
        assert_eq!(batch.events[0].id, ia);
        assert_eq!(
            batch.events[0].event,
            OrderEvent::from_bytes(a.as_bytes()).unwrap()
        );
        assert_eq!(batch.events[1].id, ib);
        assert_eq!(
            batch.events[1].event.reason.as_deref(),
            Some("insufficient_stock")
        );
        let each = OrderEventBatch::decode_each(&raw).unwrap();
        assert_eq!(each[0].trace, t);
        assert_eq!(each[1].trace, None);
        // One bad event is its own error; the others still read.
        let bad = OrderEventBatch::encode_raw([
            (ia, None, a),
            (ib, None, r#"{"type":"order","status":"lost"}"#),
        ]);
        let each = OrderEventBatch::decode_each(&bad).unwrap();
        assert_eq!(each.len(), 2);
        assert!(each[0].event.is_ok());
        assert!(each[1].event.is_err());
        // A malformed traceparent is dropped, not an error.
        let junk = format!(r#"{{"events":[{{"id":"{ia}","traceparent":"junk","event":{a}}}]}}"#);
        let each = OrderEventBatch::decode_each(junk.as_bytes()).unwrap();
        assert!(each[0].event.is_ok() && each[0].trace.is_none());
        assert!(OrderEventBatch::decode_each(b"{not json").is_err());
        let empty = OrderEventBatch::encode_raw(std::iter::empty());
        assert!(
            OrderEventBatch::from_bytes(&empty)
                .unwrap()
                .events
                .is_empty()
        );
    }
}
