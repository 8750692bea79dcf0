//! The bucket counts of hot SKUs, as this ingress learned them from the reserve script.
//!
//! A SKU with buckets ([`floodgate_common::redis::buckets`]) is reserved in the shard of
//! the buyer's bucket, which depends on the SKU's count K. K is fixed at creation, so it
//! is remembered for good once learned: an ingress assumes 1 for a SKU it has not met,
//! and `reserve.lua` answers `moved` with K (writing nothing) when that is wrong, like
//! Redis Cluster's `MOVED`. Only the first order of such a SKU per ingress pays the
//! second round trip; SKUs with one bucket are never stored, so the map holds no more
//! than the catalogue's hot SKUs, whatever SKUs requests name.

use floodgate_common::domain::Sku;
use std::{collections::HashMap, sync::RwLock};

#[derive(Debug, Default)]
pub struct KnownBuckets {
    counts: RwLock<HashMap<String, usize>>,
}

impl KnownBuckets {
    /// The count learned for `sku`; 1 for a SKU never answered `moved`.
    pub fn get(&self, sku: &Sku) -> usize {
        let counts = self.counts.read().expect("bucket counts lock");
        counts.get(sku.as_str()).copied().unwrap_or(1)
    }

    /// The reserve script said `sku` has `k` buckets. A count once learned is never
    /// taken back to 1: a bucket that answers 1 for a SKU another bucket says has more
    /// lost its `buckets` field (the worker's settle restores it), and the order is
    /// answered 503 after its bounded redirects rather than reserved in the wrong bucket.
    pub fn learn(&self, sku: &str, k: usize) {
        if k > 1 {
            let mut counts = self.counts.write().expect("bucket counts lock");
            counts.insert(sku.to_owned(), k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bucket_until_told() {
        let k = KnownBuckets::default();
        let sku = Sku::parse("hot").unwrap();
        assert_eq!(k.get(&sku), 1);
        k.learn("hot", 4);
        assert_eq!(k.get(&sku), 4);
        k.learn("hot", 1);
        assert_eq!(k.get(&sku), 4, "never back to 1");
        k.learn("cold", 1);
        assert_eq!(
            k.counts.read().unwrap().len(),
            1,
            "one bucket is not stored"
        );
    }
}
