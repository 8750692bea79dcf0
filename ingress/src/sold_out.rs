//! What this ingress knows is sold out, so that the rush after a sell-out is refused
//! without a Redis round trip per request.
//!
//! When the reserve script answers `sold_out` with 0 units left, the SKU is remembered
//! for `FLOODGATE_SOLD_OUT_CACHE_MS`. Until then an order with a line of that SKU and
//! that carries no Idempotency-Key is answered 409 `sold_out` (available 0) from here.
//! The bound is the staleness: units that come back (a cancel, a release, a receive) are
//! sold again by this ingress at most that long after they returned. Orders with an
//! Idempotency-Key always ask Redis: a repeat of a key accepted before the sell-out must
//! get its order back, and only Redis knows the key. An order refused here would also
//! have been refused by the script, though the script may have named another reason
//! first (the per-user limit, or an earlier line short of stock).

use floodgate_common::domain::Sku;
use std::{
    collections::HashMap,
    sync::RwLock,
    time::{Duration, Instant},
};

/// SKUs seen sold out, each until a deadline.
#[derive(Debug)]
pub struct SoldOut {
    ttl: Duration,
    until: RwLock<HashMap<String, Instant>>,
}

impl SoldOut {
    /// Remembers for `ttl`; a zero `ttl` remembers nothing.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            until: RwLock::new(HashMap::new()),
        }
    }

    /// True while `sku` is known sold out.
    pub fn is_sold_out(&self, sku: &Sku) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let until = self.until.read().expect("sold-out lock");
        until.get(sku.as_str()).is_some_and(|t| Instant::now() < *t)
    }

    /// The reserve script, sent at `asked`, found `sku` with nothing left. The bound runs
    /// from the moment of asking (the script ran after it), and a late reply never moves
    /// an entry back to an older observation.
    pub fn remember(&self, sku: &str, asked: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut until = self.until.write().expect("sold-out lock");
        // Expired entries go as new ones come, so the map never outgrows the SKUs sold
        // out within one bound.
        if until.len() >= 1024 {
            until.retain(|_, t| now < *t);
        }
        let t = asked + self.ttl;
        let e = until.entry(sku.to_owned()).or_insert(t);
        *e = (*e).max(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_the_bound() {
        let s = SoldOut::new(Duration::from_millis(50));
        let sku = Sku::parse("tee").unwrap();
        assert!(!s.is_sold_out(&sku));
        s.remember("tee", Instant::now());
        assert!(s.is_sold_out(&sku));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!s.is_sold_out(&sku), "forgotten after the bound");
        let off = SoldOut::new(Duration::ZERO);
        off.remember("tee", Instant::now());
        assert!(!off.is_sold_out(&sku));
    }
}
