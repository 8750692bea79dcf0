//! One namespace over several Redis hash slots (`FLOODGATE_REDIS_SHARDS`).
//!
//! Shard g holds the complete key set of [`Keys`] (stock, limits, users, reservations,
//! deadlines, change feed...) for the SKUs that live there: SKU s lives in shard
//! [`shard_of`]`(s)`. Every script runs inside one shard, so none of them changed.
//!
//! An order is reserved as one **part** per shard it touches ([`Shards::parts`]): a
//! reservation record `resv:<order>` in each of those shards, holding that shard's lines
//! (and naming the whole order), with the order's deadline in that shard's `deadlines`.
//! A single-shard order (every order when there is one shard) is one part, exactly the
//! layout without shards. For a multi-part order:
//!
//! - the **first part** decides: it is the Idempotency-Key's shard when the order has a
//!   key (the key's record lives in the shard its (user, key) hashes to, whatever the
//!   body; that part may hold no lines at all), else the lowest shard. Ingress reserves it
//!   first, alone (a repeated key is answered there before anything else is touched),
//!   then the others at once; one refusal releases every part (the first one last... any
//!   order: none was published). A publish that fails is settled on the first part
//!   (`release.lua` atomic against the worker's `claim.lua`), then the others follow.
//! - the worker claims every part and commits only if all are ours; a part that expired
//!   or was released makes the whole order fail, and the worker releases the rest.
//! - each shard's reaper expires its own part when its deadline passes unconfirmed, so a
//!   crash between two parts (ingress killed mid-order) returns every unit within the
//!   reservation TTL plus a reaper tick, and the order is recorded failed.

use super::Keys;
use crate::{
    Namespace,
    bundle::HeldLine,
    domain::{IdempotencyKey, Sku, UserId},
};

/// Shards a namespace may have at most.
pub const MAX_SHARDS: usize = 64;

/// The shard of a string among `count` (FNV-1a 64, the same function as the intake
/// partition's: stable across versions and platforms).
pub fn shard_of(s: &str, count: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % count.max(1) as u64) as usize
}

/// The held lines ([`crate::bundle::held_lines`]) of one order that one shard holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub shard: usize,
    /// Empty only for the Idempotency-Key's part of an order none of whose SKUs live in
    /// the key's shard.
    pub lines: Vec<HeldLine>,
}

/// Every shard's [`Keys`] of one namespace.
#[derive(Debug, Clone)]
pub struct Shards {
    keys: Vec<Keys>,
}

impl Shards {
    /// `count` is 1..=[`MAX_SHARDS`] (the configuration checks it).
    pub fn new(ns: &Namespace, count: usize) -> Self {
        Self {
            keys: (0..count.clamp(1, MAX_SHARDS))
                .map(|g| Keys::shard(ns, g))
                .collect(),
        }
    }

    pub fn count(&self) -> usize {
        self.keys.len()
    }

    /// Shard `g`'s keys.
    pub fn get(&self, g: usize) -> &Keys {
        &self.keys[g]
    }

    /// Shard 0: the one a deployment without shards has; it also holds the layout record.
    pub fn first(&self) -> &Keys {
        &self.keys[0]
    }

    /// Every shard, in order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &Keys)> {
        self.keys.iter().enumerate()
    }

    /// The shard a SKU lives in.
    pub fn of_sku(&self, sku: &Sku) -> usize {
        shard_of(sku.as_str(), self.count())
    }

    /// The keys of the shard a SKU lives in.
    pub fn for_sku(&self, sku: &Sku) -> &Keys {
        self.get(self.of_sku(sku))
    }

    /// How many buckets a SKU created with `buckets` has here: at most one per shard.
    pub fn effective_buckets(&self, buckets: usize) -> usize {
        buckets.clamp(1, self.count())
    }

    /// The shard of bucket `b` of a SKU with `k` buckets (bucket 0 is the SKU's own
    /// shard, [`Shards::of_sku`]; the others follow it round the ring).
    pub fn bucket_shard(&self, sku: &Sku, b: usize) -> usize {
        (self.of_sku(sku) + b) % self.count()
    }

    /// The bucket a user buys a SKU with `k` buckets from (and holds it in): the same one
    /// for every order, so the per-user limit is checked against everything the user holds.
    pub fn user_bucket(&self, user: &UserId, k: usize) -> usize {
        shard_of(user.as_str(), self.effective_buckets(k))
    }

    /// The shard where `user`'s units of `sku` (with `k` buckets) are reserved and held:
    /// the SKU's shard unless the SKU has buckets.
    pub fn holding_shard(&self, sku: &Sku, k: usize, user: &UserId) -> usize {
        self.bucket_shard(sku, self.user_bucket(user, k))
    }

    /// The shards of every bucket of a SKU with `k` buckets, bucket 0 first.
    pub fn bucket_shards(&self, sku: &Sku, k: usize) -> Vec<usize> {
        (0..self.effective_buckets(k))
            .map(|b| self.bucket_shard(sku, b))
            .collect()
    }

    /// The shard that holds a (user, Idempotency-Key) record, whatever the body.
    pub fn of_idempotency_key(&self, user: &UserId, key: &IdempotencyKey) -> usize {
        let name = format!("{}:{user}:{key}", user.as_str().len());
        shard_of(&name, self.count())
    }

    /// An order's parts, the deciding one first (see the module's documentation): the
    /// Idempotency-Key's shard when there is a key, then the shards of its held lines in
    /// ascending order, each with its lines in the order's order. A line of a SKU with
    /// buckets (`buckets` gives each SKU's count, 1 for most) is in the user's bucket's
    /// shard ([`Shards::holding_shard`]); a bundle's limit line in the bundle's shard.
    pub fn parts(
        &self,
        lines: &[HeldLine],
        user: &UserId,
        key: Option<&IdempotencyKey>,
        buckets: impl Fn(&Sku) -> usize,
    ) -> Vec<Part> {
        let mut parts: Vec<Part> = Vec::with_capacity(1);
        if let Some(k) = key {
            parts.push(Part {
                shard: self.of_idempotency_key(user, k),
                lines: Vec::new(),
            });
        }
        let mut rest: Vec<Part> = Vec::new();
        for l in lines {
            let g = self.holding_shard(&l.sku, buckets(&l.sku), user);
            match parts
                .iter_mut()
                .chain(rest.iter_mut())
                .find(|p| p.shard == g)
            {
                Some(p) => p.lines.push(l.clone()),
                None => rest.push(Part {
                    shard: g,
                    lines: vec![l.clone()],
                }),
            }
        }
        rest.sort_by_key(|p| p.shard);
        parts.extend(rest);
        parts
    }

    /// The shards of an order's parts, in [`Shards::parts`]'s order.
    pub fn shards_of(
        &self,
        lines: &[HeldLine],
        user: &UserId,
        key: Option<&IdempotencyKey>,
        buckets: impl Fn(&Sku) -> usize,
    ) -> Vec<usize> {
        self.parts(lines, user, key, buckets)
            .into_iter()
            .map(|p| p.shard)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(skus: &[&str]) -> Vec<HeldLine> {
        skus.iter()
            .map(|s| HeldLine {
                sku: Sku::parse(*s).unwrap(),
                qty: 1,
                bundle: false,
            })
            .collect()
    }

    #[test]
    fn one_shard_is_the_layout_without_shards() {
        let ns = Namespace::parse("shop").unwrap();
        let s = Shards::new(&ns, 1);
        assert_eq!(s.first().stock(), Keys::new(&ns).stock());
        let u = UserId::parse("u").unwrap();
        let k = IdempotencyKey::parse("k").unwrap();
        let p = s.parts(&lines(&["a", "b", "c"]), &u, Some(&k), |_| 1);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].shard, p[0].lines.len()), (0, 3));
    }

    #[test]
    fn shards_have_their_own_tags() {
        let ns = Namespace::parse("shop").unwrap();
        let s = Shards::new(&ns, 4);
        assert_eq!(s.get(0).stock(), "{shop}:stock");
        assert_eq!(s.get(3).stock(), "{shop.3}:stock");
    }

    #[test]
    fn parts_put_the_key_first_and_every_line_once() {
        let ns = Namespace::parse("shop").unwrap();
        let s = Shards::new(&ns, 8);
        let u = UserId::parse("u").unwrap();
        let skus: Vec<String> = (0..40).map(|i| format!("sku-{i}")).collect();
        let refs: Vec<&str> = skus.iter().map(String::as_str).collect();
        let l = lines(&refs);
        for key in ["a", "b", "c", "d"] {
            let k = IdempotencyKey::parse(key).unwrap();
            let p = s.parts(&l, &u, Some(&k), |_| 1);
            assert_eq!(p[0].shard, s.of_idempotency_key(&u, &k));
            let mut seen: Vec<&HeldLine> = p.iter().flat_map(|p| &p.lines).collect();
            assert_eq!(seen.len(), 40);
            seen.dedup();
            assert_eq!(seen.len(), 40);
            for part in &p {
                assert!(part.lines.iter().all(|l| s.of_sku(&l.sku) == part.shard));
            }
            let mut shards: Vec<usize> = p.iter().map(|p| p.shard).collect();
            shards.dedup();
            assert_eq!(shards.len(), p.len(), "one part per shard");
        }
        // 40 SKUs over 8 shards: they spread.
        let unkeyed = s.parts(&l, &u, None, |_| 1);
        assert!(unkeyed.len() >= 6, "{unkeyed:?}");
        assert!(unkeyed.windows(2).all(|w| w[0].shard < w[1].shard));
    }

    #[test]
    fn a_user_keeps_one_bucket_and_buckets_spread() {
        let ns = Namespace::parse("shop").unwrap();
        let s = Shards::new(&ns, 4);
        let sku = Sku::parse("hot").unwrap();
        assert_eq!(s.bucket_shards(&sku, 3).len(), 3);
        assert_eq!(
            s.bucket_shards(&sku, 9).len(),
            4,
            "one bucket per shard at most"
        );
        assert_eq!(s.bucket_shards(&sku, 3)[0], s.of_sku(&sku));
        let mut used = std::collections::BTreeSet::new();
        for i in 0..64 {
            let u = UserId::parse(format!("u{i}")).unwrap();
            let g = s.holding_shard(&sku, 4, &u);
            assert_eq!(g, s.holding_shard(&sku, 4, &u));
            let p = s.parts(&lines(&["hot"]), &u, None, |_| 4);
            assert_eq!(p[0].shard, g);
            used.insert(g);
        }
        assert_eq!(used.len(), 4, "users spread over every bucket");
        // One shard: every bucket is the SKU's shard.
        let one = Shards::new(&ns, 1);
        assert_eq!(one.bucket_shards(&sku, 4), vec![0]);
    }
}
