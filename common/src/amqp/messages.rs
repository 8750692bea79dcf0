use crate::domain::{IdempotencyKey, OrderId, OrderLines, UserId};
use serde::{Deserialize, Serialize};

/// What travels on the intake queue. Tagged and versioned: a new shape is a new variant,
/// so workers of two versions can share a queue during a rolling deploy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum IntakeMessage {
    #[serde(rename = "order.v1")]
    OrderV1(OrderPlaced),
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
}

impl IntakeMessage {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("intake messages serialize")
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(b)
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
        let IntakeMessage::OrderV1(o) = &m;
        assert_eq!(o.items.as_slice()[0].qty.get(), 2);
        assert!(IntakeMessage::from_bytes(&m.to_bytes()).is_ok());
        let bad_qty = json.replace("\"qty\":2", "\"qty\":0");
        assert!(IntakeMessage::from_bytes(bad_qty.as_bytes()).is_err());
        assert!(IntakeMessage::from_bytes(b"garbage").is_err());
    }
}
