//! Domain newtypes. Each has a private field and is built by `parse`/`TryFrom`, so an
//! invalid value cannot exist, even after deserialization.

use serde::{Deserialize, Serialize};
use std::{collections::HashSet, fmt};
use uuid::Uuid;

/// Why a value was refused; the message names the rule, for problem+json `detail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

macro_rules! string_newtype {
    ($(#[$m:meta])* $name:ident, $check:expr) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: impl Into<String>) -> Result<Self, Invalid> {
                let s = s.into();
                let check: fn(&str) -> Result<(), String> = $check;
                check(&s).map_err(Invalid)?;
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = Invalid;
            fn try_from(s: String) -> Result<Self, Invalid> {
                Self::parse(s)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_newtype!(
    /// A stock-keeping unit id: 1-64 characters of `[A-Za-z0-9._-]`.
    Sku,
    |s| {
        if s.is_empty() || s.len() > 64 {
            return Err("a SKU id is 1-64 characters".into());
        }
        if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return Err("a SKU id may contain only A-Z, a-z, 0-9, '.', '_' and '-'".into());
        }
        Ok(())
    }
);

string_newtype!(
    /// The caller's id, the JWT `sub`: 1-64 characters, no control characters.
    UserId,
    |s| {
        if s.is_empty() || s.chars().count() > 64 {
            return Err("a user id is 1-64 characters".into());
        }
        if s.chars().any(char::is_control) {
            return Err("a user id may not contain control characters".into());
        }
        Ok(())
    }
);

string_newtype!(
    /// The `Idempotency-Key` header: 1-128 printable ASCII characters.
    IdempotencyKey,
    |s| {
        if s.is_empty() || s.len() > 128 {
            return Err("Idempotency-Key is 1-128 characters".into());
        }
        if !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err("Idempotency-Key may contain only printable ASCII".into());
        }
        Ok(())
    }
);

string_newtype!(
    /// A goods-received reference (delivery note, purchase order): 1-128 printable ASCII.
    Reference,
    |s| {
        if s.is_empty() || s.len() > 128 {
            return Err("reference is 1-128 characters".into());
        }
        if !s.bytes().all(|b| (0x21..0x7f).contains(&b) || b == b' ') {
            return Err("reference may contain only printable ASCII".into());
        }
        Ok(())
    }
);

/// Units of one SKU on one order line: 1..=1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Quantity(u16);

impl Quantity {
    pub const MAX: i64 = 1000;

    pub fn get(self) -> i64 {
        i64::from(self.0)
    }
}

impl TryFrom<i64> for Quantity {
    type Error = Invalid;
    fn try_from(v: i64) -> Result<Self, Invalid> {
        if (1..=Self::MAX).contains(&v) {
            Ok(Self(v as u16))
        } else {
            Err(Invalid(format!("qty must be 1..={}, got {v}", Self::MAX)))
        }
    }
}

impl From<Quantity> for i64 {
    fn from(q: Quantity) -> i64 {
        q.get()
    }
}

/// An order id: a UUIDv7, so ids sort by acceptance time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(Uuid);

impl OrderId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
    pub fn parse(s: &str) -> Option<Self> {
        Uuid::parse_str(s).ok().map(Self)
    }
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for OrderId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for OrderId {
    fn from(u: Uuid) -> Self {
        Self(u)
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: Sku,
    pub qty: Quantity,
}

/// The lines of an order: 1-50 lines, no SKU twice. Deserializing checks the same rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<OrderLine>", into = "Vec<OrderLine>")]
pub struct OrderLines(Vec<OrderLine>);

impl OrderLines {
    pub const MAX_LINES: usize = 50;

    pub fn as_slice(&self) -> &[OrderLine] {
        &self.0
    }
}

impl TryFrom<Vec<OrderLine>> for OrderLines {
    type Error = Invalid;
    fn try_from(lines: Vec<OrderLine>) -> Result<Self, Invalid> {
        if lines.is_empty() {
            return Err(Invalid("items: an order needs at least one line".into()));
        }
        if lines.len() > Self::MAX_LINES {
            return Err(Invalid(format!(
                "items: at most {} lines per order, got {}",
                Self::MAX_LINES,
                lines.len()
            )));
        }
        let mut seen = HashSet::new();
        for l in &lines {
            if !seen.insert(&l.sku) {
                return Err(Invalid(format!(
                    "items: SKU {} appears twice; put the quantity on one line",
                    l.sku
                )));
            }
        }
        Ok(Self(lines))
    }
}

impl From<OrderLines> for Vec<OrderLine> {
    fn from(l: OrderLines) -> Self {
        l.0
    }
}

/// Who the caller is, from the JWT `role` claim. Any other value is refused (401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    /// Catalog and stock work (API.md "Roles"): SKUs, receipts, adjustments, movements.
    Manager,
    /// Everything a manager can do, plus orders, the audit log and the operator tools.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Manager => "manager",
            Self::Admin => "admin",
        }
    }
}

/// The life of an order as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    /// On a SKU's waitlist (`"waitlist": true`, short of stock): nothing reserved yet; the
    /// order becomes `accepted` when units come back for it.
    Waitlisted,
    /// Reserved in Redis and durably queued, not yet committed.
    Accepted,
    Confirmed,
    Failed,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waitlisted => "waitlisted",
            Self::Accepted => "accepted",
            Self::Confirmed => "confirmed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "waitlisted" => Self::Waitlisted,
            "accepted" => Self::Accepted,
            "confirmed" => Self::Confirmed,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

/// Why an order failed (`orders.reason`, `order.failed` events) or why its message was
/// dead-lettered. A closed set: it is a metric label and a stable word in the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailReason {
    /// Its reservation expired unconfirmed (the reaper took it) before a worker did.
    ReservationExpired,
    /// Its reservation was released for another reason before a worker took it.
    ReservationReleased,
    /// It waited on a waitlist for `FLOODGATE_WAITLIST_TTL_SECS` without being promoted.
    WaitlistExpired,
    /// PostgreSQL's `sold <= on_hand` refused it.
    InsufficientStock,
    /// Paid with points, and PostgreSQL's `balance >= 0` refused the spend.
    InsufficientPoints,
    /// Transient failures outlasted the retry schedule.
    RetriesExhausted,
    /// A SKU of the order has no inventory row.
    UnknownSku,
    /// The database refused it for good (a constraint or data error).
    Invalid,
    /// Another order of this user already holds its Idempotency-Key.
    DuplicateIdempotencyKey,
    /// The message could not be read (dead letters only).
    Undecodable,
    /// The order could not even be recorded failed (dead letters only).
    Unrecordable,
}

impl FailReason {
    /// Every reason, so each can be exported at 0 before its first use.
    pub const ALL: [FailReason; 11] = [
        Self::ReservationExpired,
        Self::ReservationReleased,
        Self::WaitlistExpired,
        Self::InsufficientStock,
        Self::InsufficientPoints,
        Self::RetriesExhausted,
        Self::UnknownSku,
        Self::Invalid,
        Self::DuplicateIdempotencyKey,
        Self::Undecodable,
        Self::Unrecordable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReservationExpired => "reservation_expired",
            Self::ReservationReleased => "reservation_released",
            Self::WaitlistExpired => "waitlist_expired",
            Self::InsufficientStock => "insufficient_stock",
            Self::InsufficientPoints => "insufficient_points",
            Self::RetriesExhausted => "retries_exhausted",
            Self::UnknownSku => "unknown_sku",
            Self::Invalid => "invalid",
            Self::DuplicateIdempotencyKey => "duplicate_idempotency_key",
            Self::Undecodable => "undecodable",
            Self::Unrecordable => "unrecordable",
        }
    }
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sku_rules() {
        assert!(Sku::parse("tee-red-m").is_ok());
        assert!(Sku::parse("A.b_C-9").is_ok());
        assert!(Sku::parse("").is_err());
        assert!(Sku::parse("a".repeat(65)).is_err());
        assert!(Sku::parse("a b").is_err());
        assert!(Sku::parse("a:b").is_err());
        assert!(serde_json::from_str::<Sku>("\"bad sku\"").is_err());
    }

    #[test]
    fn quantity_rules() {
        assert!(Quantity::try_from(0).is_err());
        assert!(Quantity::try_from(1001).is_err());
        assert_eq!(Quantity::try_from(1000).unwrap().get(), 1000);
        assert!(serde_json::from_str::<Quantity>("-1").is_err());
    }

    #[test]
    fn order_lines_rules() {
        let line = |s: &str| OrderLine {
            sku: Sku::parse(s).unwrap(),
            qty: Quantity::try_from(1).unwrap(),
        };
        assert!(OrderLines::try_from(vec![]).is_err());
        assert!(OrderLines::try_from(vec![line("a"), line("a")]).is_err());
        let many: Vec<_> = (0..51).map(|i| line(&format!("s{i}"))).collect();
        assert!(OrderLines::try_from(many).is_err());
        assert!(OrderLines::try_from(vec![line("a"), line("b")]).is_ok());
    }

    #[test]
    fn idempotency_key_rules() {
        assert!(IdempotencyKey::parse("abc-123 x").is_ok());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("é").is_err());
        assert!(IdempotencyKey::parse("a".repeat(129)).is_err());
    }
}
