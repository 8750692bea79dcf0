use crate::{
    Namespace,
    domain::{IdempotencyKey, OrderId, UserId},
};

/// Names of every Redis key of one namespace.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Shard 0's keys: the only shard of a deployment with one (the default).
    pub fn new(ns: &Namespace) -> Self {
        Self::shard(ns, 0)
    }

    /// The keys of shard `g` of the namespace ([`super::Shards`]): hash tag `{ns}` for
    /// shard 0 (so one shard is the layout of a deployment without shards) and `{ns.g}`
    /// for the others (a namespace has no `.`, so no two namespaces' shards meet).
    pub fn shard(ns: &Namespace, g: usize) -> Self {
        let prefix = if g == 0 {
            format!("{{{ns}}}:")
        } else {
            format!("{{{ns}.{g}}}:")
        };
        Self { prefix }
    }

    /// How many shards the namespace was loaded with (shard 0 holds it; see
    /// [`super::Shards::check_layout`]).
    pub fn layout(&self) -> String {
        format!("{}shards", self.prefix)
    }

    /// Pattern matching every key of the namespace (for tests and tooling).
    pub fn pattern(&self) -> String {
        format!("{}*", self.prefix)
    }

    /// Present while the stock levels are loaded; its value (a UUIDv7) names the load.
    pub fn epoch(&self) -> String {
        format!("{}epoch", self.prefix)
    }
    /// Hash sku -> units available for sale.
    pub fn stock(&self) -> String {
        format!("{}stock", self.prefix)
    }
    /// Zset sku -> the change sequence of its last stock change. Every script that moves
    /// a level marks the SKU here; the notifier reads what changed since its cursor.
    /// One entry per SKU, so it never grows past the catalogue.
    pub fn stock_changes(&self) -> String {
        format!("{}stock:changes", self.prefix)
    }
    /// The change sequence counter of `stock_changes`.
    pub fn stock_seq(&self) -> String {
        format!("{}stock:seq", self.prefix)
    }
    /// Hash user -> points the user may spend now: the balance PostgreSQL holds less
    /// what [`Self::points_held`] holds (only shard 0's is used: paying with points needs
    /// one shard). `reserve.lua` takes an order's total from it; the scripts compute its
    /// name from their keys' prefix (same slot).
    pub fn points(&self) -> String {
        format!("{}pts", self.prefix)
    }
    /// Hash user -> points held by the user's open point-paid reservations (accepted,
    /// not committed yet): `finish.lua` drops a committed order's, `release.lua` and
    /// `reap.lua` give a failed or expired one's back to [`Self::points`].
    pub fn points_held(&self) -> String {
        format!("{}ptsheld", self.prefix)
    }
    /// Hash sku -> per-user limit (0 = none).
    pub fn limits(&self) -> String {
        format!("{}limits", self.prefix)
    }
    /// Hash sku -> `<starts ms>,<ends ms>` (either side empty: open), for the SKUs with a
    /// sale window; `reserve.lua` compares it with Redis's own clock (`TIME`). Every
    /// bucket's shard holds the field.
    pub fn windows(&self) -> String {
        format!("{}windows", self.prefix)
    }
    /// Hash bundle -> `sku:qty,sku:qty,...` ([`crate::bundle::BundleDef::field`]), in the
    /// bundle's own shard: `reserve.lua` answers `bundle` with it to a caller that sent a
    /// bundle as a plain line, and the stock reads and the notifier read it.
    pub fn bundles(&self) -> String {
        format!("{}bundles", self.prefix)
    }
    /// Hash sku -> bucket count, for the SKUs with more than one bucket that have one in
    /// this shard (every bucket's shard holds the field): `reserve.lua` answers `moved`
    /// to a caller that assumed another count.
    pub fn buckets(&self) -> String {
        format!("{}buckets", self.prefix)
    }
    /// Hash move token -> `sku|destination shard|units|destination epoch|epoch here`:
    /// units taken out of a bucket here and not yet added to the destination bucket
    /// (`move_out.lua`, `move_in.lua`).
    pub fn moves(&self) -> String {
        format!("{}moves", self.prefix)
    }
    /// Marks one half of a move (`out` here, `in` or `back` here) as run, for a day (the
    /// scripts set it with an expiry): a re-sent half finds it and changes nothing.
    pub fn move_mark(&self, half: &str, token: &str) -> String {
        format!("{}mv:{half}:{token}", self.prefix)
    }
    /// Held (a second) by the rebalancer pass evening out one SKU's buckets, so that
    /// workers' passes take turns per SKU instead of racing to the same buckets.
    pub fn rebalancing(&self, sku: &str) -> String {
        format!("{}rebalancing:{sku}", self.prefix)
    }
    /// Hash adjustment token -> units a write-off took out of sale that PostgreSQL has
    /// not recorded yet (see `take_stock.lua`): a re-sent adjustment finds its entry and
    /// takes no more; the worker's settle pass gives back the units of one that never
    /// committed. Normally empty. A load deletes it.
    pub fn takes(&self) -> String {
        format!("{}takes", self.prefix)
    }
    /// Set of stock-change tokens already applied (see `apply_stock.lua`).
    pub fn applied(&self) -> String {
        format!("{}applied", self.prefix)
    }
    /// Zset of every open reservation: order id -> deadline (ms) while its publish is
    /// unconfirmed, `+inf` once the broker confirmed it (queued orders never expire).
    /// The reaper reads what is due; reconcile counts what the open ones hold.
    pub fn deadlines(&self) -> String {
        format!("{}deadlines", self.prefix)
    }
    /// Zset of reaped order ids awaiting their PostgreSQL record.
    pub fn reaped(&self) -> String {
        format!("{}reaped", self.prefix)
    }
    /// Hash sku -> units a user holds, for per-user limits.
    pub fn user(&self, user: &UserId) -> String {
        format!("{}user:{user}", self.prefix)
    }
    /// Pattern of every user key.
    pub fn user_pattern(&self) -> String {
        format!("{}user:*", self.prefix)
    }
    /// A key that is never written: scripts take it in the Idempotency-Key slot of an
    /// order that has none (a script must name every key it may touch).
    pub fn no_idem(&self) -> String {
        format!("{}idem:-", self.prefix)
    }
    /// One (user, Idempotency-Key) record. The user id's length goes first so that no
    /// (user, key) pair can spell another's key.
    pub fn idem(&self, user: &UserId, key: &IdempotencyKey) -> String {
        format!("{}idem:{}:{user}:{key}", self.prefix, user.as_str().len())
    }
    /// A counter written only so that a `WAIT` has a write of its own connection to wait
    /// for ([`crate::redis::Redis::wait_replicas`]).
    pub fn replication_probe(&self) -> String {
        format!("{}wait", self.prefix)
    }
    /// One order's reservation.
    pub fn resv(&self, order: &OrderId) -> String {
        format!("{}resv:{order}", self.prefix)
    }

    // The waitlist (`reserve.lua` with a waitlist deadline, `promote.lua`, `unwait.lua`).
    // Every key below lives in the shard of the SKU it waits for; `promote.lua` derives
    // the names from the stock key's prefix, so they must stay in step with it (as must
    // `wlseq`, the waitlist sequence counter, which only `reserve.lua` names).

    /// Zset of the orders waiting for one SKU: order id -> the shard's waitlist sequence
    /// at the decision (first come, first served).
    pub fn waitlist(&self, sku: &str) -> String {
        format!("{}wl:{sku}", self.prefix)
    }
    /// Hash sku -> units the SKU's waitlisted orders wait for: a new order only takes
    /// what is above it.
    pub fn waiting(&self) -> String {
        format!("{}wlw", self.prefix)
    }
    /// Zset of waitlisted order ids -> the deadline (ms) past which the reaper fails them
    /// `waitlist_expired`.
    pub fn waitlist_deadlines(&self) -> String {
        format!("{}wlexp", self.prefix)
    }
    /// Zset of waitlisted order ids whose `waitlisted` event is not out yet -> sequence.
    pub fn waitlisted_new(&self) -> String {
        format!("{}wlnew", self.prefix)
    }
    /// Zset of promoted order ids (reserved, not yet published) -> promotion time (ms):
    /// the worker's promoter publishes each to the intake queue and marks it queued.
    pub fn promoted(&self) -> String {
        format!("{}promoted", self.prefix)
    }
    /// Held (a few seconds, `SET NX PX`) by the worker whose promoter is passing over the
    /// shard, so that several workers take turns instead of publishing the same promoted
    /// orders (harmless, the claim takes one, but wasteful).
    pub fn promoting(&self) -> String {
        format!("{}promoting", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag_and_do_not_collide() {
        let k = Keys::new(&Namespace::parse("shop").unwrap());
        assert_eq!(k.stock(), "{shop}:stock");
        let u1 = UserId::parse("a:b").unwrap();
        let u2 = UserId::parse("a").unwrap();
        let k1 = IdempotencyKey::parse("c").unwrap();
        let k2 = IdempotencyKey::parse("b:c").unwrap();
        assert_ne!(k.idem(&u1, &k1), k.idem(&u2, &k2));
    }
}
