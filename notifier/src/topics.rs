//! Subscription topics, parsed once at the edge: `stock:<sku>`, `stock:*`, `order:<id>`,
//! `orders:mine` and (an addition to API.md, admin only) `orders:*`.

use floodgate_common::domain::{OrderId, Sku};
use std::fmt;

/// Topics one subscriber may hold at once.
pub const MAX_TOPICS: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// One SKU's level (public).
    Stock(Sku),
    /// Every SKU's level (public).
    AllStock,
    /// One order's status (its owner or an admin).
    Order(OrderId),
    /// Every order of the caller.
    MyOrders,
    /// Every order (admin).
    AllOrders,
}

impl Topic {
    /// Parses one topic; the error says what is wrong, for the client.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = |why: &str| Err(format!("topic {s:?}: {why}"));
        match s.split_once(':') {
            Some(("stock", "*")) => Ok(Topic::AllStock),
            Some(("stock", sku)) => match Sku::parse(sku) {
                Ok(sku) => Ok(Topic::Stock(sku)),
                Err(e) => bad(&e.0),
            },
            Some(("order", id)) => match OrderId::parse(id) {
                Some(id) => Ok(Topic::Order(id)),
                None => bad("an order topic is order:<order id (a UUID)>"),
            },
            Some(("orders", "mine")) => Ok(Topic::MyOrders),
            Some(("orders", "*")) => Ok(Topic::AllOrders),
            _ => bad(
                "expected stock:<sku>, stock:*, order:<id>, orders:mine or orders:* \
                 (admin)",
            ),
        }
    }

    /// Parses a comma-separated list (the SSE `topics` parameter): 1 to [`MAX_TOPICS`].
    pub fn parse_list<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Vec<Self>, String> {
        let mut out: Vec<Topic> = Vec::new();
        for item in items {
            if item.trim().is_empty() {
                continue;
            }
            let t = Topic::parse(item)?;
            if !out.contains(&t) {
                out.push(t);
            }
        }
        if out.is_empty() {
            return Err("name at least one topic, e.g. topics=stock:*".into());
        }
        if out.len() > MAX_TOPICS {
            return Err(format!("at most {MAX_TOPICS} topics per subscriber"));
        }
        Ok(out)
    }

    /// True for the topics that need a token.
    pub fn is_private(&self) -> bool {
        matches!(self, Topic::Order(_) | Topic::MyOrders | Topic::AllOrders)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::Stock(s) => write!(f, "stock:{s}"),
            Topic::AllStock => f.write_str("stock:*"),
            Topic::Order(id) => write!(f, "order:{id}"),
            Topic::MyOrders => f.write_str("orders:mine"),
            Topic::AllOrders => f.write_str("orders:*"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_topic_and_names_what_is_wrong() {
        let id = "0190f0b4-1a2b-7c3d-8e4f-123456789abc";
        let list = Topic::parse_list([
            "stock:tee-red",
            "stock:*",
            &format!("order:{id}"),
            "orders:mine",
            "orders:*",
            "stock:*",
        ])
        .unwrap();
        assert_eq!(list.len(), 5);
        assert_eq!(list[2].to_string(), format!("order:{id}"));
        assert!(Topic::parse("stock:").unwrap_err().contains("1-64"));
        assert!(Topic::parse("order:42").unwrap_err().contains("UUID"));
        assert!(
            Topic::parse("weather:today")
                .unwrap_err()
                .contains("expected")
        );
        assert!(Topic::parse_list(["", " "]).is_err());
        let many: Vec<String> = (0..=MAX_TOPICS).map(|i| format!("stock:s{i}")).collect();
        assert!(
            Topic::parse_list(many.iter().map(String::as_str))
                .unwrap_err()
                .contains("at most")
        );
    }
}
