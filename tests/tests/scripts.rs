//! The Lua scripts' races, decided directly against a real Redis: which of reserve,
//! claim, release and reap wins, and that the loser changes nothing.

use floodgate_common::redis::Redis;
use floodgate_common::{
    Namespace,
    domain::{OrderId, OrderLine, OrderLines, Quantity, Sku, UserId},
    redis::{
        self as fredis, Claim, ConfirmedOrder, Keys, Queued, Release, Reserve, ReserveRequest,
        ResvState,
    },
};

struct Ns {
    keys: Keys,
    con: Redis,
    url: String,
}

/// Removes the namespace's keys whether the test passed or not.
impl Drop for Ns {
    fn drop(&mut self) {
        floodgate_tests::delete_redis_namespace(&self.url, &self.keys);
    }
}

impl Ns {
    async fn new(stock: i64) -> Self {
        let ns = Namespace::parse(&floodgate_tests::namespace()).unwrap();
        let url = floodgate_tests::redis_url();
        let mut con = fredis::connect(&url).await.unwrap();
        let keys = Keys::new(&ns);
        let _: () = redis::pipe()
            .set(keys.epoch(), 1)
            .hset(keys.stock(), "tee", stock)
            .hset(keys.limits(), "tee", 0)
            .query_async(&mut con)
            .await
            .unwrap();
        Self { keys, con, url }
    }

    async fn available(&mut self) -> i64 {
        redis::cmd("HGET")
            .arg(self.keys.stock())
            .arg("tee")
            .query_async(&mut self.con)
            .await
            .unwrap()
    }

    async fn reserve(&mut self, id: OrderId, user: &UserId, qty: i64, deadline_ms: i64) {
        let lines = OrderLines::try_from(vec![OrderLine {
            sku: Sku::parse("tee").unwrap(),
            qty: Quantity::try_from(qty).unwrap(),
        }])
        .unwrap();
        let r = fredis::reserve(
            &mut self.con,
            &self.keys,
            &ReserveRequest {
                order_id: id,
                user,
                lines: &lines,
                held: None,
                first: None,
                buckets: &floodgate_common::redis::one_bucket,
                idempotency: None,
                accepted_at: "2026-11-21T00:00:00Z",
                deadline_ms,
                waitlist_until_ms: None,
                idempotency_ttl_secs: 60,
                points: None,
            },
        )
        .await
        .unwrap();
        assert_eq!(r, Reserve::Reserved);
    }
}

const FAR: i64 = i64::MAX / 2;

#[tokio::test]
async fn a_failed_publish_cannot_release_an_order_a_worker_claimed() {
    let mut ns = Ns::new(10).await;
    let (id, user) = (OrderId::new(), UserId::parse("u").unwrap());
    ns.reserve(id, &user, 3, FAR).await;
    let claims = fredis::claim(&mut ns.con, &ns.keys, &[id]).await.unwrap();
    assert_eq!(claims, [Claim::Claimed]);
    // The confirm was lost, but the message was consumed: ingress must answer 202.
    let r = fredis::release(&mut ns.con, &ns.keys, &id, &user, None, "publish_failed")
        .await
        .unwrap();
    assert_eq!(r, Release::Taken);
    assert_eq!(ns.available().await, 7, "the claimed units stay sold");
}

#[tokio::test]
async fn a_late_message_of_an_unpublished_order_is_recognised() {
    let mut ns = Ns::new(10).await;
    let (id, user) = (OrderId::new(), UserId::parse("u").unwrap());
    ns.reserve(id, &user, 2, FAR).await;
    let r = fredis::release(&mut ns.con, &ns.keys, &id, &user, None, "publish_failed")
        .await
        .unwrap();
    assert_eq!(r, Release::Released);
    assert_eq!(ns.available().await, 10);
    // A second release gives nothing back twice.
    let again = fredis::release(&mut ns.con, &ns.keys, &id, &user, None, "failed")
        .await
        .unwrap();
    assert_eq!(again, Release::NotHeld);
    assert_eq!(ns.available().await, 10);
    let claims = fredis::claim(&mut ns.con, &ns.keys, &[id]).await.unwrap();
    assert_eq!(claims, [Claim::Unpublished]);
}

#[tokio::test]
async fn claim_and_reap_never_both_win() {
    let mut ns = Ns::new(10).await;
    let user = UserId::parse("u").unwrap();
    let (reaped_first, claimed_first) = (OrderId::new(), OrderId::new());
    ns.reserve(reaped_first, &user, 1, 1_000).await;
    ns.reserve(claimed_first, &user, 1, 1_000).await;
    assert_eq!(ns.available().await, 8);

    // Reaper first: the late claim sees it expired.
    assert!(
        fredis::reap(&mut ns.con, &ns.keys, &reaped_first, &user, 2_000)
            .await
            .unwrap()
    );
    let c = fredis::claim(&mut ns.con, &ns.keys, &[reaped_first])
        .await
        .unwrap();
    assert_eq!(c, [Claim::Expired]);
    assert_eq!(ns.available().await, 9, "released once");

    // Claim first: the reaper leaves it alone.
    let c = fredis::claim(&mut ns.con, &ns.keys, &[claimed_first])
        .await
        .unwrap();
    assert_eq!(c, [Claim::Claimed]);
    assert!(
        !fredis::reap(&mut ns.con, &ns.keys, &claimed_first, &user, 2_000)
            .await
            .unwrap()
    );
    assert_eq!(ns.available().await, 9);
    // A claimed entry (its message exists) no longer sits on the due list.
    assert!(
        fredis::due(&mut ns.con, &ns.keys, 2_000, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Committed: finished; a redelivery is recognised as done.
    fredis::finish(&mut ns.con, &ns.keys, &[claimed_first])
        .await
        .unwrap();
    let c = fredis::claim(&mut ns.con, &ns.keys, &[claimed_first])
        .await
        .unwrap();
    assert_eq!(c, [Claim::Done]);
}

#[tokio::test]
async fn a_message_past_its_deadline_is_claimed_not_expired() {
    // The worker holds the message, so the publish happened: the order is committed
    // however late, unless the reaper got there first.
    let mut ns = Ns::new(5).await;
    let (id, user) = (OrderId::new(), UserId::parse("u").unwrap());
    ns.reserve(id, &user, 5, 1_000).await;
    assert_eq!(ns.available().await, 0);
    let c = fredis::claim(&mut ns.con, &ns.keys, &[id]).await.unwrap();
    assert_eq!(c, [Claim::Claimed]);
    assert!(
        !fredis::reap(&mut ns.con, &ns.keys, &id, &user, 5_000)
            .await
            .unwrap()
    );
    assert_eq!(ns.available().await, 0, "the claimed units stay sold");
}

async fn state(ns: &mut Ns, id: &OrderId) -> ResvState {
    fredis::reservation(&mut ns.con, &ns.keys, id)
        .await
        .unwrap()
        .expect("a reservation record")
        .state
}

async fn deadline(ns: &mut Ns, id: &OrderId) -> Option<f64> {
    redis::cmd("ZSCORE")
        .arg(ns.keys.deadlines())
        .arg(id.to_string())
        .query_async(&mut ns.con)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_queued_reservation_is_never_reaped_and_stays_open() {
    let mut ns = Ns::new(10).await;
    let user = UserId::parse("u").unwrap();
    let (queued, unconfirmed, claimed) = (OrderId::new(), OrderId::new(), OrderId::new());
    for id in [queued, unconfirmed, claimed] {
        ns.reserve(id, &user, 1, 1_000).await;
    }
    // A worker was faster than ingress's mark for one of them.
    assert_eq!(
        fredis::claim(&mut ns.con, &ns.keys, &[claimed])
            .await
            .unwrap(),
        [Claim::Claimed]
    );
    let confirmed = |order_id| ConfirmedOrder {
        order_id,
        user: user.clone(),
        idempotency_key: None,
    };
    let marks = fredis::mark_queued(
        &mut ns.con,
        &ns.keys,
        &[&confirmed(queued), &confirmed(claimed)],
    )
    .await
    .unwrap();
    assert_eq!(marks, [Queued::Accepted, Queued::Accepted]);
    assert_eq!(state(&mut ns, &queued).await, ResvState::Queued);
    assert_eq!(state(&mut ns, &claimed).await, ResvState::Claimed);
    // Both stay listed as open reservations (reconcile counts them), with no deadline.
    assert_eq!(deadline(&mut ns, &queued).await, Some(f64::INFINITY));
    assert_eq!(deadline(&mut ns, &claimed).await, Some(f64::INFINITY));

    // Far past every deadline, only the unconfirmed reservation is due and reaped.
    let due = fredis::due(&mut ns.con, &ns.keys, i64::MAX / 4, 10)
        .await
        .unwrap();
    assert_eq!(due, [unconfirmed]);
    for id in [queued, claimed, unconfirmed] {
        let reaped = fredis::reap(&mut ns.con, &ns.keys, &id, &user, i64::MAX / 4)
            .await
            .unwrap();
        assert_eq!(reaped, id == unconfirmed, "{id}");
    }
    assert_eq!(ns.available().await, 8, "only the unconfirmed unit is back");

    // The queued one is claimed whenever a worker comes, then finished.
    assert_eq!(
        fredis::claim(&mut ns.con, &ns.keys, &[queued])
            .await
            .unwrap(),
        [Claim::Claimed]
    );
    fredis::finish(&mut ns.con, &ns.keys, &[queued, claimed])
        .await
        .unwrap();
    assert_eq!(deadline(&mut ns, &queued).await, None);
    assert_eq!(state(&mut ns, &queued).await, ResvState::Done);
    // A late mark never resurrects a settled reservation's entry.
    let marks = fredis::mark_queued(&mut ns.con, &ns.keys, &[&confirmed(queued)])
        .await
        .unwrap();
    assert_eq!(marks, [Queued::Accepted]);
    assert_eq!(deadline(&mut ns, &queued).await, None);
    // The reaped one answers Released to a mark that comes too late: no 202 for it.
    let marks = fredis::mark_queued(&mut ns.con, &ns.keys, &[&confirmed(unconfirmed)])
        .await
        .unwrap();
    assert_eq!(marks, [Queued::Released]);
    assert_eq!(
        fredis::claim(&mut ns.con, &ns.keys, &[unconfirmed])
            .await
            .unwrap(),
        [Claim::Expired]
    );
}

#[tokio::test]
async fn a_queued_order_that_fails_in_the_worker_is_released_once() {
    let mut ns = Ns::new(4).await;
    let (id, user) = (OrderId::new(), UserId::parse("u").unwrap());
    ns.reserve(id, &user, 4, 1_000).await;
    let order = ConfirmedOrder {
        order_id: id,
        user: user.clone(),
        idempotency_key: None,
    };
    fredis::mark_queued(&mut ns.con, &ns.keys, &[&order])
        .await
        .unwrap();
    // A late 'publish_failed' cannot take back a queued order.
    let r = fredis::release(&mut ns.con, &ns.keys, &id, &user, None, "publish_failed")
        .await
        .unwrap();
    assert_eq!(r, Release::Taken);
    assert_eq!(ns.available().await, 0);
    // The worker's release of a failed order gives the stock back, once.
    let r = fredis::release(&mut ns.con, &ns.keys, &id, &user, None, "failed")
        .await
        .unwrap();
    assert_eq!(r, Release::Released);
    let r = fredis::release(&mut ns.con, &ns.keys, &id, &user, None, "failed")
        .await
        .unwrap();
    assert_eq!(r, Release::NotHeld);
    assert_eq!(ns.available().await, 4);
    assert_eq!(deadline(&mut ns, &id).await, None);
    // A mark that comes after the worker recorded the order failed: it was accepted (the
    // client reads `failed` in its status), not a 503 "nothing was reserved".
    let order = ConfirmedOrder {
        order_id: id,
        user,
        idempotency_key: None,
    };
    let marks = fredis::mark_queued(&mut ns.con, &ns.keys, &[&order])
        .await
        .unwrap();
    assert_eq!(marks, [Queued::Accepted]);
}

#[tokio::test]
async fn stock_changes_returns_what_changed_since_the_cursor_and_everything_after_a_reset() {
    let mut ns = Ns::new(10).await;
    let _: () = redis::cmd("HSET")
        .arg(ns.keys.stock())
        .arg("cap")
        .arg(3)
        .query_async(&mut ns.con)
        .await
        .unwrap();
    let sorted = |mut v: Vec<(String, i64)>| {
        v.sort();
        v
    };
    // A new reader gets every level.
    let (cursor, levels) = fredis::stock_changes(&mut ns.con, &ns.keys, &Default::default())
        .await
        .unwrap()
        .expect("loaded");
    assert_eq!(sorted(levels), [("cap".into(), 3), ("tee".into(), 10)]);
    // Nothing changed: nothing returned.
    let (cursor, levels) = fredis::stock_changes(&mut ns.con, &ns.keys, &cursor)
        .await
        .unwrap()
        .unwrap();
    assert!(levels.is_empty());
    // A reservation marks its SKU: only that one comes back, at its new level.
    let user = UserId::parse("alice").unwrap();
    ns.reserve(OrderId::new(), &user, 2, i64::MAX).await;
    let (cursor, levels) = fredis::stock_changes(&mut ns.con, &ns.keys, &cursor)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(levels, [("tee".into(), 8)]);
    // The change counter lost (Redis restarted without it): everything again.
    let _: () = redis::cmd("DEL")
        .arg(ns.keys.stock_seq())
        .query_async(&mut ns.con)
        .await
        .unwrap();
    let (_, levels) = fredis::stock_changes(&mut ns.con, &ns.keys, &cursor)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(levels.len(), 2);
    // A reload names a new epoch: everything again.
    let _: () = redis::cmd("SET")
        .arg(ns.keys.epoch())
        .arg("another-load")
        .query_async(&mut ns.con)
        .await
        .unwrap();
    let (cursor, levels) = fredis::stock_changes(&mut ns.con, &ns.keys, &cursor)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(levels.len(), 2);
    assert_eq!(cursor.epoch, "another-load");
    // No stock loaded: None, and the reader starts over.
    let _: () = redis::cmd("DEL")
        .arg(ns.keys.epoch())
        .query_async(&mut ns.con)
        .await
        .unwrap();
    assert!(
        fredis::stock_changes(&mut ns.con, &ns.keys, &cursor)
            .await
            .unwrap()
            .is_none()
    );
}

// Every script re-sent. A cluster client re-sends a command whose connection dropped
// before the reply, so a script may run twice with the same arguments; the caller sees
// only the second reply. Each test runs a call, dumps the namespace, runs the very same
// call again and dumps it again: the second run must change nothing, and its reply must
// lead the caller to the same decision as the first.

/// Every key of the namespace with its type and whole value (TTLs aside).
async fn dump(ns: &mut Ns) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for key in ns.con.namespace_keys(&ns.keys).await.unwrap() {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut ns.con)
            .await
            .unwrap();
        let cmd = match kind.as_str() {
            "hash" => redis::cmd("HGETALL").arg(&key).clone(),
            "zset" => redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .clone(),
            "set" => redis::cmd("SMEMBERS").arg(&key).clone(),
            "string" => redis::cmd("GET").arg(&key).clone(),
            other => panic!("{key}: unexpected type {other}"),
        };
        let mut value: Vec<String> = match kind.as_str() {
            "string" => vec![cmd.query_async(&mut ns.con).await.unwrap()],
            _ => cmd.query_async(&mut ns.con).await.unwrap(),
        };
        if kind == "hash" || kind == "set" {
            // Field order of a hash or set is not part of its value.
            if kind == "hash" {
                let mut pairs: Vec<String> = value.chunks(2).map(|p| p.join("=")).collect();
                pairs.sort();
                value = pairs;
            } else {
                value.sort();
            }
        }
        out.insert(key, format!("{kind} {value:?}"));
    }
    out
}

/// Runs `$call` (an expression using `$ns.con`), then the very same call again; asserts
/// the second run changed nothing and returns both replies.
macro_rules! twice {
    ($ns:ident, $call:expr) => {{
        let first = $call;
        let after_first = dump(&mut $ns).await;
        let second = $call;
        assert_eq!(
            after_first,
            dump(&mut $ns).await,
            "a re-sent call changed Redis"
        );
        (first, second)
    }};
}

fn one_line(qty: i64) -> OrderLines {
    OrderLines::try_from(vec![OrderLine {
        sku: Sku::parse("tee").unwrap(),
        qty: Quantity::try_from(qty).unwrap(),
    }])
    .unwrap()
}

#[tokio::test]
async fn a_reserve_resent_decrements_once_with_and_without_an_idempotency_key() {
    use floodgate_common::domain::IdempotencyKey;
    let mut ns = Ns::new(10).await;
    let user = UserId::parse("u").unwrap();
    let lines = one_line(3);
    let key = IdempotencyKey::parse("checkout-1").unwrap();
    for idempotency in [None, Some((&key, "body-hash"))] {
        let req = ReserveRequest {
            order_id: OrderId::new(),
            user: &user,
            lines: &lines,
            held: None,
            first: None,
            buckets: &floodgate_common::redis::one_bucket,
            idempotency,
            accepted_at: "2026-11-21T00:00:00Z",
            deadline_ms: FAR,
            waitlist_until_ms: None,
            idempotency_ttl_secs: 60,
            points: None,
        };
        let (first, second) = twice!(
            ns,
            fredis::reserve(&mut ns.con, &ns.keys, &req).await.unwrap()
        );
        assert_eq!(first, Reserve::Reserved);
        // Not `Duplicate` of itself: ingress would wait for its own publish.
        assert_eq!(second, Reserve::Reserved, "key: {idempotency:?}");
    }
    assert_eq!(ns.available().await, 4, "two orders of 3, each taken once");
    // Resent after the gate closed (a reload began): still the first run's answer.
    let id = OrderId::new();
    ns.reserve(id, &user, 1, FAR).await;
    let _: () = redis::cmd("DEL")
        .arg(ns.keys.epoch())
        .query_async(&mut ns.con)
        .await
        .unwrap();
    let again = fredis::reserve(
        &mut ns.con,
        &ns.keys,
        &ReserveRequest {
            order_id: id,
            user: &user,
            lines: &one_line(1),
            held: None,
            first: None,
            buckets: &floodgate_common::redis::one_bucket,
            idempotency: None,
            accepted_at: "2026-11-21T00:00:00Z",
            deadline_ms: FAR,
            waitlist_until_ms: None,
            idempotency_ttl_secs: 60,
            points: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(again, Reserve::Reserved);
}

#[tokio::test]
async fn a_mark_claim_and_finish_resent_change_nothing() {
    let mut ns = Ns::new(10).await;
    let (id, user) = (OrderId::new(), UserId::parse("u").unwrap());
    ns.reserve(id, &user, 2, 1_000).await;
    let order = ConfirmedOrder {
        order_id: id,
        user: user.clone(),
        idempotency_key: None,
    };
    let (first, second) = twice!(
        ns,
        fredis::mark_queued(&mut ns.con, &ns.keys, &[&order])
            .await
            .unwrap()
    );
    assert_eq!(
        (first, second),
        (vec![Queued::Accepted], vec![Queued::Accepted])
    );
    let (first, second) = twice!(
        ns,
        fredis::claim(&mut ns.con, &ns.keys, &[id]).await.unwrap()
    );
    assert_eq!(
        (first, second),
        (vec![Claim::Claimed], vec![Claim::Claimed])
    );
    twice!(
        ns,
        fredis::finish(&mut ns.con, &ns.keys, &[id]).await.unwrap()
    );
    assert_eq!(state(&mut ns, &id).await, ResvState::Done);
    assert_eq!(ns.available().await, 8);
}

#[tokio::test]
async fn a_release_resent_gives_back_once() {
    let mut ns = Ns::new(10).await;
    let user = UserId::parse("u").unwrap();
    // A failed publish (ingress), and an order the worker failed.
    let (unpublished, failed) = (OrderId::new(), OrderId::new());
    ns.reserve(unpublished, &user, 2, FAR).await;
    ns.reserve(failed, &user, 3, FAR).await;
    fredis::claim(&mut ns.con, &ns.keys, &[failed])
        .await
        .unwrap();
    for (id, reason) in [(unpublished, "publish_failed"), (failed, "failed")] {
        let (first, second) = twice!(
            ns,
            fredis::release(&mut ns.con, &ns.keys, &id, &user, None, reason)
                .await
                .unwrap()
        );
        // Either answer leads each caller to the same decision: ingress answers 503 for
        // a publish that failed unless a worker took it (`Taken`); the worker goes on.
        assert_eq!((first, second), (Release::Released, Release::NotHeld));
    }
    assert_eq!(ns.available().await, 10, "each released once");
}

#[tokio::test]
async fn a_reap_resent_releases_once_and_the_order_is_still_recorded() {
    let mut ns = Ns::new(10).await;
    let (id, user) = (OrderId::new(), UserId::parse("u").unwrap());
    ns.reserve(id, &user, 4, 1_000).await;
    let (first, second) = twice!(
        ns,
        fredis::reap(&mut ns.con, &ns.keys, &id, &user, 2_000)
            .await
            .unwrap()
    );
    assert!(first && !second);
    assert_eq!(ns.available().await, 10);
    // The second reply says "not reaped by this call", but the order waits in `reaped`,
    // where the reaper's next pass records it failed in PostgreSQL.
    assert_eq!(
        fredis::reaped(&mut ns.con, &ns.keys, 10).await.unwrap(),
        [id]
    );
}

#[tokio::test]
async fn a_stock_change_resent_applies_once() {
    let mut ns = Ns::new(10).await;
    let sku = Sku::parse("tee").unwrap();
    let user = UserId::parse("u").unwrap();
    let token = fredis::receive_token(&sku, "po-7");
    let change = fredis::StockChange {
        sku: &sku,
        units: 5,
        token: &token,
        per_user_limit: Some(2),
        user: Some((&user, -1)),
        window: None,
        after: None,
    };
    let (first, second) = twice!(
        ns,
        fredis::apply_stock(&mut ns.con, &ns.keys, &change)
            .await
            .unwrap()
    );
    assert_eq!((first, second), (15, 15));
}

#[tokio::test]
async fn a_wait_counts_the_replicas_of_the_namespaces_node() {
    let mut ns = Ns::new(10).await;
    ns.reserve(OrderId::new(), &UserId::parse("u").unwrap(), 1, FAR)
        .await;
    // On a cluster this must reach the master of the namespace's slot, not every master.
    let info: String = ns
        .con
        .on_namespace_node(&ns.keys, redis::cmd("INFO").arg("replication"))
        .await
        .unwrap();
    let replicas: u32 = info
        .lines()
        .find_map(|l| l.strip_prefix("connected_slaves:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("connected_slaves in INFO replication");
    let acked = ns
        .con
        // Long enough for a replica on a loaded 2-core machine (the client's bound is 2 s).
        .wait_replicas(&ns.keys, 1, std::time::Duration::from_millis(1_000))
        .await
        .unwrap();
    assert!(
        acked >= replicas.min(1) && acked <= replicas,
        "{acked} of {replicas}: {info}"
    );
}
