//! Typed wrappers around the Lua scripts in `lua/`. Each turns the script's reply into an
//! enum, so callers never see raw Redis values.

use super::Keys;
use crate::{
    bundle::{BundleDef, HeldLine},
    domain::{
        FailReason, IdempotencyKey, OrderId, OrderLine, OrderLines, OrderStatus, Sku, UserId,
    },
};
use redis::{RedisResult, Script, aio::ConnectionLike};
use std::sync::LazyLock;

static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/reserve.lua")));
/// A script that puts units back on sale, with the waitlist's `promote` function
/// (`lua/promote.lua`) before it, which it calls after the units are back.
macro_rules! promoting {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/promote.lua"),
                include_str!($file)
            ))
        })
    };
}

/// A script that releases an open reservation: [`promoting!`], and the
/// `give_back_points` function (`lua/give_back_points.lua`) for one paid with points.
macro_rules! releasing {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/promote.lua"),
                include_str!("lua/give_back_points.lua"),
                include_str!($file)
            ))
        })
    };
}

static RELEASE: LazyLock<Script> = releasing!("lua/release.lua");
static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/claim.lua")));
static FINISH: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/finish.lua")));
static QUEUED: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/queued.lua")));
static APPLY_STOCK: LazyLock<Script> = promoting!("lua/apply_stock.lua");
static TAKE_STOCK: LazyLock<Script> = promoting!("lua/take_stock.lua");
static UNWAIT: LazyLock<Script> = promoting!("lua/unwait.lua");
static PROMOTE_NOW: LazyLock<Script> = promoting!("lua/promote_now.lua");
/// Adds `rewait.lua` to a load's MULTI (`pipe`) for the shard of `keys`: `wlw` rebuilt
/// from the lists of `skus` (and of the SKUs it names), and the waitlisted orders' units
/// back in the holdings of `written` ((user, sku) pairs the load wrote).
pub fn rewait(
    pipe: &mut redis::Pipeline,
    keys: &Keys,
    skus: &[String],
    written: &[(String, String)],
) {
    // EVAL, not EVALSHA: inside a MULTI a script Redis has not cached would fail.
    let mut eval = redis::cmd("EVAL");
    eval.arg(include_str!("lua/rewait.lua"))
        .arg(1)
        .arg(keys.waiting())
        .arg(skus.len())
        .arg(skus);
    for (user, sku) in written {
        eval.arg(format!("{user}\t{sku}"));
    }
    pipe.add_command(eval).ignore();
}

/// How long released and done reservation records stay readable (redelivery, status).
pub const RECORD_TTL_SECS: u64 = 86_400;

/// How long the released parts of an order another part refused stay: only a re-sent
/// reserve (a cluster client's retry, seconds) may still meet them, and a sell-out can
/// refuse many such orders a second.
pub const REFUSED_TTL_SECS: u64 = 60;

/// Everything the reserve script needs about one order.
pub struct ReserveRequest<'a> {
    pub order_id: OrderId,
    pub user: &'a UserId,
    /// The whole order.
    pub lines: &'a OrderLines,
    /// The held lines ([`crate::bundle::held_lines`]) this shard holds: the order's, or
    /// this shard's part of them when it is reserved in parts; None: the order's own
    /// lines (an order without bundles, in one part).
    pub held: Option<&'a [HeldLine]>,
    /// The shard of the order's deciding part when it is reserved in parts
    /// ([`super::Part`]); None for an order of one part.
    pub first: Option<usize>,
    /// The bucket count the caller assumed for each SKU it placed in this shard (see
    /// [`super::Shards::parts`]); the script answers [`Reserve::Moved`] when it is not
    /// the SKU's.
    pub buckets: &'a (dyn Fn(&Sku) -> usize + Sync),
    /// The key and the hash of the body it was sent with.
    pub idempotency: Option<(&'a IdempotencyKey, &'a str)>,
    pub accepted_at: &'a str,
    pub deadline_ms: i64,
    /// Some for an order that may wait (`"waitlist": true`): short of stock, it is
    /// waitlisted until this deadline (ms) instead of refused. Only a one-line order of
    /// a SKU without buckets waits (`reserve.lua` refuses it as sold out otherwise).
    pub waitlist_until_ms: Option<i64>,
    pub idempotency_ttl_secs: u64,
    /// Some for an order paid with points: its total, held from the user's spendable
    /// points ([`super::Keys::points`]) in the same decision as the stock, or
    /// [`Reserve::InsufficientPoints`] and nothing reserved. Only for an order of one
    /// part in shard 0 (ingress refuses points with several shards).
    pub points: Option<i64>,
}

impl std::fmt::Debug for ReserveRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReserveRequest")
            .field("order_id", &self.order_id)
            .field("user", &self.user)
            .field("lines", &self.lines)
            .field("held", &self.held)
            .field("first", &self.first)
            .field("points", &self.points)
            .finish_non_exhaustive()
    }
}

/// The bucket count of a caller that knows of no SKU with buckets (see
/// [`ReserveRequest::buckets`]); `reserve.lua` corrects it with [`Reserve::Moved`].
pub fn one_bucket(_: &Sku) -> usize {
    1
}

/// The reserve script's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserve {
    Reserved,
    Duplicate {
        order_id: OrderId,
        /// False while the first request is still waiting for its publish confirm.
        published: bool,
    },
    KeyReused,
    UnknownSku(String),
    LimitExceeded {
        sku: String,
        limit: i64,
        already: i64,
    },
    SoldOut {
        sku: String,
        available: i64,
    },
    StockNotLoaded,
    /// Before the SKU's sale window opens (ms since the Unix epoch, Redis's clock).
    NotStarted {
        sku: String,
        starts_ms: i64,
    },
    /// After the SKU's sale window closed.
    Ended {
        sku: String,
        ends_ms: i64,
    },
    /// The SKU has `buckets` buckets, not the count the caller assumed: nothing was
    /// written; place the order's parts again with it.
    Moved {
        sku: String,
        buckets: usize,
    },
    /// The line of `sku` was sent as a SKU's, and `sku` is a bundle with these
    /// components: nothing was written; place the order again with its held lines.
    Bundle {
        sku: String,
        def: BundleDef,
    },
    /// Short of stock, and the order may wait: it is on the SKU's waitlist at
    /// `position` (1 = next), nothing reserved, its units counted in the user's holding.
    /// (0 only for a re-sent call of an order that left the list since.)
    Waitlisted {
        position: i64,
    },
    /// Paid with points, and the user may spend only `spendable` of the `needed`:
    /// nothing was reserved.
    InsufficientPoints {
        spendable: i64,
        needed: i64,
    },
}

fn protocol_error(what: &str, reply: &[String]) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Client,
        "unexpected script reply",
        format!("{what}: {reply:?}"),
    ))
}

fn int(what: &str, reply: &[String], i: usize) -> RedisResult<i64> {
    reply
        .get(i)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| protocol_error(what, reply))
}

fn items_json(lines: &[OrderLine]) -> String {
    serde_json::to_string(lines).expect("order lines serialize")
}

/// Runs `reserve.lua`: all lines or none, see the script's header.
pub async fn reserve<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    req: &ReserveRequest<'_>,
) -> RedisResult<Reserve> {
    let (idem_key, body_hash) = match req.idempotency {
        Some((k, h)) => (keys.idem(req.user, k), h),
        None => (keys.no_idem(), ""),
    };
    let mut inv = RESERVE.prepare_invoke();
    inv.key(keys.epoch())
        .key(keys.stock())
        .key(keys.limits())
        .key(keys.user(req.user))
        .key(idem_key)
        .key(keys.resv(&req.order_id))
        .key(keys.deadlines())
        .key(keys.stock_changes())
        .key(keys.stock_seq())
        .key(keys.buckets())
        .key(keys.windows())
        .key(keys.bundles())
        .key(keys.waiting())
        .arg(req.order_id.to_string())
        .arg(req.user.as_str())
        .arg(body_hash)
        .arg(req.accepted_at)
        .arg(req.deadline_ms)
        .arg(req.idempotency_ttl_secs)
        .arg(items_json(req.lines.as_slice()))
        .arg(
            req.held
                .map(|l| serde_json::to_string(l).expect("held lines serialize"))
                .unwrap_or_default(),
        )
        .arg(req.first.map(|g| g.to_string()).unwrap_or_default())
        .arg(
            req.waitlist_until_ms
                .map(|d| d.to_string())
                .unwrap_or_default(),
        )
        .arg(req.idempotency.map(|(k, _)| k.as_str()).unwrap_or_default())
        .arg(req.points.map(|p| p.to_string()).unwrap_or_default());
    let own: Vec<HeldLine>;
    let held = match req.held {
        Some(h) => h,
        None => {
            own = req.lines.as_slice().iter().map(HeldLine::from).collect();
            &own
        }
    };
    for l in held {
        inv.arg(l.sku.as_str())
            .arg(l.qty)
            .arg((req.buckets)(&l.sku).max(1))
            .arg(if l.bundle { "b" } else { "s" });
    }
    let reply: Vec<String> = inv.invoke_async(con).await?;
    let w = "reserve";
    Ok(match reply.first().map(String::as_str) {
        Some("ok") => Reserve::Reserved,
        Some("dup") => Reserve::Duplicate {
            order_id: reply
                .get(1)
                .and_then(|s| OrderId::parse(s))
                .ok_or_else(|| protocol_error(w, &reply))?,
            published: reply.get(3).map(String::as_str) == Some("accepted"),
        },
        Some("reused") => Reserve::KeyReused,
        Some("unknown_sku") => Reserve::UnknownSku(reply.get(1).cloned().unwrap_or_default()),
        Some("limit") => Reserve::LimitExceeded {
            sku: reply.get(1).cloned().unwrap_or_default(),
            limit: int(w, &reply, 2)?,
            already: int(w, &reply, 3)?,
        },
        Some("sold_out") => Reserve::SoldOut {
            sku: reply.get(1).cloned().unwrap_or_default(),
            available: int(w, &reply, 2)?,
        },
        Some("unavailable") => Reserve::StockNotLoaded,
        Some("not_started") => Reserve::NotStarted {
            sku: reply.get(1).cloned().unwrap_or_default(),
            starts_ms: int(w, &reply, 2)?,
        },
        Some("ended") => Reserve::Ended {
            sku: reply.get(1).cloned().unwrap_or_default(),
            ends_ms: int(w, &reply, 2)?,
        },
        Some("moved") => Reserve::Moved {
            sku: reply.get(1).cloned().unwrap_or_default(),
            buckets: int(w, &reply, 2)?.max(1) as usize,
        },
        Some("bundle") => Reserve::Bundle {
            sku: reply.get(1).cloned().unwrap_or_default(),
            def: reply
                .get(2)
                .and_then(|f| BundleDef::parse_field(f).ok())
                .ok_or_else(|| protocol_error(w, &reply))?,
        },
        Some("waitlisted") => Reserve::Waitlisted {
            position: int(w, &reply, 1)?,
        },
        Some("insufficient_points") => Reserve::InsufficientPoints {
            spendable: int(w, &reply, 1)?,
            needed: int(w, &reply, 2)?,
        },
        _ => return Err(protocol_error(w, &reply)),
    })
}

/// The state of a reservation record in Redis (`resv:<order>`'s `state` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResvState {
    /// Stock held; the publish is not confirmed yet. The only state the reaper expires.
    Reserved,
    /// The broker confirmed the message: it waits for a worker however long that takes.
    Queued,
    /// A worker took it into a batch.
    Claimed,
    /// Committed in PostgreSQL as confirmed.
    Done,
    /// Its stock went back (publish failed, expired unconfirmed, or the order failed), or
    /// a waitlisted order left its waitlist unpromoted (`cancelled`, `waitlist_expired`).
    Released,
    /// On a SKU's waitlist: holds no stock (only its holding counts), has no deadline
    /// entry; promotion makes it `reserved` (`promote.lua`).
    Waitlisted,
}

impl ResvState {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "reserved" => Self::Reserved,
            "queued" => Self::Queued,
            "claimed" => Self::Claimed,
            "done" => Self::Done,
            "released" => Self::Released,
            "waitlisted" => Self::Waitlisted,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "reserved",
            Self::Queued => "queued",
            Self::Claimed => "claimed",
            Self::Done => "done",
            Self::Released => "released",
            Self::Waitlisted => "waitlisted",
        }
    }

    /// Holding stock for an order that is (or may yet be) accepted.
    pub fn is_open(self) -> bool {
        matches!(self, Self::Reserved | Self::Queued | Self::Claimed)
    }
}

/// What `queued.lua` found for one confirmed order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// Accepted: queued (or a worker already claimed or committed it, or Redis lost the
    /// record and PostgreSQL will decide). It never expires now.
    Accepted,
    /// The reaper released the reservation before the mark (its confirm outlasted the
    /// reservation TTL): the stock is back on sale, the order will be recorded failed,
    /// and it must not be answered 202.
    Released,
}

/// One order whose publish the broker confirmed.
#[derive(Debug, Clone)]
pub struct ConfirmedOrder {
    pub order_id: OrderId,
    pub user: UserId,
    pub idempotency_key: Option<IdempotencyKey>,
}

/// Runs `queued.lua` for orders whose publish the broker confirmed, in one call: each
/// reservation waits for a worker however long that takes, and each Idempotency-Key
/// record is marked accepted. One [`Queued`] per order, in order.
pub async fn mark_queued<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    orders: &[&ConfirmedOrder],
) -> RedisResult<Vec<Queued>> {
    if orders.is_empty() {
        return Ok(Vec::new());
    }
    let mut inv = QUEUED.prepare_invoke();
    inv.key(keys.deadlines());
    for o in orders {
        let idem = o
            .idempotency_key
            .as_ref()
            .map_or_else(|| keys.no_idem(), |k| keys.idem(&o.user, k));
        inv.key(keys.resv(&o.order_id))
            .key(idem)
            .arg(o.order_id.to_string());
    }
    let reply: Vec<String> = inv.invoke_async(con).await?;
    if reply.len() != orders.len() {
        return Err(protocol_error("queued", &reply));
    }
    reply
        .iter()
        .map(|w| match w.split_once(':') {
            // Expired unconfirmed (or released by ingress itself): never accepted.
            Some((
                "released",
                "reservation_expired" | "publish_failed" | "publish_abandoned" | "refused",
            )) => Ok(Queued::Released),
            // A worker was faster than the mark and recorded the order failed: it was
            // accepted, and its status tells the rest.
            Some(("released", _)) => Ok(Queued::Accepted),
            // Any other state (queued, claimed, done), or missing (PostgreSQL decides).
            None if w == "missing"
                || ResvState::parse(w).is_some_and(|s| s != ResvState::Released) =>
            {
                Ok(Queued::Accepted)
            }
            _ => Err(protocol_error("queued", &reply)),
        })
        .collect()
}

/// What `release.lua` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    /// This call gave the stock back.
    Released,
    /// Queued, claimed by a worker or committed (`done`): for a failed publish this
    /// means the message got through after all.
    Taken,
    /// Released before, or unknown to Redis: nothing to give back.
    NotHeld,
}

/// Runs `release.lua`.
pub async fn release<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    order_id: &OrderId,
    user: &UserId,
    idempotency: Option<&IdempotencyKey>,
    reason: &str,
) -> RedisResult<Release> {
    let idem = idempotency.map_or_else(|| keys.no_idem(), |k| keys.idem(user, k));
    let outcome: String = RELEASE
        .key(keys.resv(order_id))
        .key(keys.stock())
        .key(keys.user(user))
        .key(keys.deadlines())
        .key(idem)
        .key(keys.stock_changes())
        .key(keys.stock_seq())
        .arg(order_id.to_string())
        .arg(reason)
        .arg(if reason == "refused" {
            REFUSED_TTL_SECS
        } else {
            RECORD_TTL_SECS
        })
        .invoke_async(con)
        .await?;
    Ok(match outcome.as_str() {
        "released_now" => Release::Released,
        "queued" | "claimed" | "done" => Release::Taken,
        _ => Release::NotHeld,
    })
}

/// What `claim.lua` found for one order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Ours to commit.
    Claimed,
    /// Committed before; the message is a redelivery.
    Done,
    /// The reaper released it (its publish was never confirmed); its stock is back on sale.
    Expired,
    /// Ingress gave up on its publish and answered 503: never accepted, nothing to record.
    Unpublished,
    /// Released for another reason, already decided; it must not be committed.
    Released,
    /// Redis does not know it (Redis lost its data): PostgreSQL decides.
    Missing,
}

/// Runs `claim.lua` for a batch; one [`Claim`] per order, in order.
pub async fn claim<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    orders: &[OrderId],
) -> RedisResult<Vec<Claim>> {
    if orders.is_empty() {
        return Ok(Vec::new());
    }
    let mut inv = CLAIM.prepare_invoke();
    for id in orders {
        inv.key(keys.resv(id));
    }
    let reply: Vec<String> = inv.invoke_async(con).await?;
    if reply.len() != orders.len() {
        return Err(protocol_error("claim", &reply));
    }
    reply
        .iter()
        .map(|w| match w.as_str() {
            "claimed" => Ok(Claim::Claimed),
            "done" => Ok(Claim::Done),
            "expired" => Ok(Claim::Expired),
            "released" => Ok(Claim::Released),
            "unpublished" => Ok(Claim::Unpublished),
            "missing" => Ok(Claim::Missing),
            _ => Err(protocol_error("claim", &reply)),
        })
        .collect()
}

/// Runs `finish.lua`: the orders are committed.
pub async fn finish<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    orders: &[OrderId],
) -> RedisResult<()> {
    if orders.is_empty() {
        return Ok(());
    }
    let mut inv = FINISH.prepare_invoke();
    inv.key(keys.deadlines()).arg(RECORD_TTL_SECS);
    for id in orders {
        inv.key(keys.resv(id)).arg(id.to_string());
    }
    let _: i64 = inv.invoke_async(con).await?;
    Ok(())
}

/// The token under which a committed stock change is applied once (`apply_stock.lua`).
pub fn receive_token(sku: &Sku, reference: &str) -> String {
    format!("receive:{sku}:{reference}")
}

/// The token under which an order's cancellation returns one SKU's units, once.
pub fn cancel_token(order: &OrderId, sku: &Sku) -> String {
    format!("cancel:{order}:{sku}")
}

/// The token under which a stock adjustment changes Redis once: `apply_stock.lua` for
/// units added, `take_stock.lua`'s mark for units written off.
pub fn adjust_token(sku: &Sku, reference: &str) -> String {
    format!("adjust:{sku}:{reference}")
}

/// The SKU and reference of an [`adjust_token`] (a SKU id has no `:`).
pub fn parse_adjust_token(token: &str) -> Option<(Sku, &str)> {
    let (sku, reference) = token.strip_prefix("adjust:")?.split_once(':')?;
    Some((Sku::parse(sku).ok()?, reference))
}

/// What `take_stock.lua` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// `units` are out of sale now (`again`: an earlier call with this token took them),
    /// `level` is left.
    Taken { units: i64, level: i64, again: bool },
    /// Fewer units than asked are on sale here; nothing taken.
    Short { level: i64 },
    /// The shard's stock is not loaded; nothing taken.
    NotLoaded,
}

/// Takes `units` of `sku` out of sale in the shard of `keys`, once per `token` until
/// [`take_done`] or [`untake_stock`].
pub async fn take_stock<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    sku: &Sku,
    units: i64,
    token: &str,
) -> RedisResult<Take> {
    let (status, units, level) = take_script(con, keys, sku, units, token, "take").await?;
    Ok(match status {
        1 | 0 => Take::Taken {
            units,
            level,
            again: status == 0,
        },
        -1 => Take::Short { level },
        _ => Take::NotLoaded,
    })
}

/// Gives back what [`take_stock`] took under `token`, when PostgreSQL's record of it
/// did not commit. Returns the units given back (0: none were held).
pub async fn untake_stock<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    sku: &Sku,
    token: &str,
) -> RedisResult<i64> {
    Ok(take_script(con, keys, sku, 0, token, "undo").await?.1)
}

/// PostgreSQL recorded the write-off taken under `token`: forget its entry (the units
/// stay out of sale).
pub async fn take_done<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    sku: &Sku,
    token: &str,
) -> RedisResult<()> {
    take_script(con, keys, sku, 0, token, "done").await?;
    Ok(())
}

/// The write-offs taken in the shard of `keys` that PostgreSQL has not recorded (or
/// whose entry was not forgotten yet): token -> units.
pub async fn open_takes<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
) -> RedisResult<Vec<(String, i64)>> {
    redis::cmd("HGETALL")
        .arg(keys.takes())
        .query_async(con)
        .await
}

async fn take_script<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    sku: &Sku,
    units: i64,
    token: &str,
    mode: &str,
) -> RedisResult<(i64, i64, i64)> {
    TAKE_STOCK
        .key(keys.epoch())
        .key(keys.stock())
        .key(keys.takes())
        .key(keys.stock_changes())
        .key(keys.stock_seq())
        .arg(sku.as_str())
        .arg(units)
        .arg(token)
        .arg(mode)
        .invoke_async(con)
        .await
}

/// A committed stock change to apply to Redis once (`apply_stock.lua`).
#[derive(Debug)]
pub struct StockChange<'a> {
    pub sku: &'a Sku,
    pub units: i64,
    pub token: &'a str,
    /// Set the SKU's per-user limit too.
    pub per_user_limit: Option<i64>,
    /// Change a user's holding too (a cancellation gives the limit back).
    pub user: Option<(&'a UserId, i64)>,
    /// The SKU's sale window ([`window_field`]), written with its initial stock.
    pub window: Option<&'a str>,
    /// A token that must be applied before this change is (a receipt waits for its
    /// SKU's initial stock, [`initial_token`]); until then the call applies nothing.
    pub after: Option<&'a str>,
}

/// The token of a SKU's initial stock (its first receipt, reference `initial`).
pub fn initial_token(sku: &Sku) -> String {
    receive_token(sku, crate::reconcile::INITIAL_REFERENCE)
}

/// Runs `apply_stock.lua`. Returns the available units after the call.
pub async fn apply_stock<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    change: &StockChange<'_>,
) -> RedisResult<i64> {
    Ok(apply_stock_status(con, keys, change).await?.1)
}

/// Gives a user's holding of a bundle back (a cancelled order's bundle line, whose units
/// come back through its components' own changes), once per `token`, with
/// `apply_stock.lua`'s holding-only mode: the bundle has no stock field to change.
/// Returns whether this call gave it back (false: the token was applied before).
pub async fn give_back_holding<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    user: &UserId,
    bundle: &Sku,
    qty: i64,
    token: &str,
) -> RedisResult<bool> {
    let (applied, _): (i64, i64) = APPLY_STOCK
        .key(keys.stock())
        .key(keys.limits())
        .key(keys.applied())
        .key(keys.user(user))
        .key(keys.stock_changes())
        .key(keys.stock_seq())
        .key(keys.windows())
        .arg(bundle.as_str())
        .arg(0)
        .arg(token)
        .arg("")
        .arg(-qty)
        .arg("")
        .arg("")
        .arg("hold")
        .invoke_async(con)
        .await?;
    Ok(applied == 1)
}

/// What `apply_stock.lua` did with a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Now,
    Before,
    /// Nothing: the change waits for its `after` token (a SKU's initial stock).
    Waiting,
}

/// [`apply_stock`], with what it did.
pub async fn apply_stock_status<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    change: &StockChange<'_>,
) -> RedisResult<(Applied, i64)> {
    let (user_key, user_delta) = match change.user {
        Some((u, d)) => (keys.user(u), d),
        None => (keys.no_idem(), 0),
    };
    let (applied, available): (i64, i64) = APPLY_STOCK
        .key(keys.stock())
        .key(keys.limits())
        .key(keys.applied())
        .key(user_key)
        .key(keys.stock_changes())
        .key(keys.stock_seq())
        .key(keys.windows())
        .arg(change.sku.as_str())
        .arg(change.units)
        .arg(change.token)
        .arg(
            change
                .per_user_limit
                .map(|l| l.to_string())
                .unwrap_or_default(),
        )
        .arg(user_delta)
        .arg(change.window.unwrap_or_default())
        .arg(change.after.unwrap_or_default())
        .invoke_async(con)
        .await?;
    let applied = match applied {
        1 => Applied::Now,
        0 => Applied::Before,
        _ => Applied::Waiting,
    };
    Ok((applied, available))
}

/// A reservation as ingress shows it before the worker commits it.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub state: ResvState,
    pub user: UserId,
    /// The whole order.
    pub lines: Vec<OrderLine>,
    /// The held lines of this record ([`crate::bundle::held_lines`]): the order's own
    /// lines, or its bundles expanded, or this shard's part of an order reserved in parts.
    pub held: Vec<HeldLine>,
    /// The shard of the order's deciding part, for a part of an order reserved in parts.
    pub first: Option<usize>,
    pub accepted_at: String,
    /// Why a released reservation was released (`publish_failed`, ...).
    pub reason: Option<String>,
    /// The Idempotency-Key of a waitlisted (or promoted) order, for its message.
    pub idempotency_key: Option<String>,
    /// Who cancelled a waitlisted order, as JSON, when that cancel is audited.
    pub cancelled_by: Option<String>,
    /// The points an order paid with points holds (its total).
    pub paid: Option<i64>,
}

impl Reservation {
    /// How an order that left its waitlist unpromoted ended (its released record's
    /// reason): `cancelled`, or `failed` / `waitlist_expired`. None for any other record.
    pub fn unwaited(&self) -> Option<(OrderStatus, Option<FailReason>)> {
        if self.state != ResvState::Released {
            return None;
        }
        match self.reason.as_deref() {
            Some("cancelled") => Some((OrderStatus::Cancelled, None)),
            Some("waitlist_expired") => {
                Some((OrderStatus::Failed, Some(FailReason::WaitlistExpired)))
            }
            _ => None,
        }
    }

    /// The status (and reason) the API shows for an order PostgreSQL does not hold yet:
    /// `waitlisted`, `accepted` while it holds stock, how it left its waitlist until the
    /// worker records that ([`Self::unwaited`]); None for any other released record (its
    /// order is failed in PostgreSQL, or never existed).
    pub fn status(&self) -> Option<(OrderStatus, Option<String>)> {
        match self.state {
            ResvState::Waitlisted => Some((OrderStatus::Waitlisted, None)),
            ResvState::Released => self
                .unwaited()
                .map(|(s, r)| (s, r.map(|r| r.as_str().to_owned()))),
            _ => Some((OrderStatus::Accepted, None)),
        }
    }
}

/// The fields of a reservation hash that [`Reservation`] is read from, in order.
const RESERVATION_FIELDS: [&str; 10] = [
    "state",
    "user",
    "items",
    "accepted_at",
    "reason",
    "part",
    "first",
    "idem",
    "by",
    "paid",
];

/// Reads one reservation record, if Redis has it.
pub async fn reservation<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    order_id: &OrderId,
) -> RedisResult<Option<Reservation>> {
    let fields: [Option<String>; 10] = redis::cmd("HMGET")
        .arg(keys.resv(order_id))
        .arg(&RESERVATION_FIELDS)
        .query_async(con)
        .await?;
    parse_reservation(fields)
}

/// Reads the reservation records of `order_ids` in one round trip (a pipeline of
/// `HMGET`s, not a transaction: each record is read whole, the set of them is not one
/// snapshot). The answers are in the order of `order_ids`; None where Redis has none.
/// Callers walking many ids send them in chunks, so no single reply grows without bound.
pub async fn reservations<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    order_ids: &[OrderId],
) -> RedisResult<Vec<Option<Reservation>>> {
    if order_ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for id in order_ids {
        pipe.cmd("HMGET")
            .arg(keys.resv(id))
            .arg(&RESERVATION_FIELDS);
    }
    let replies: Vec<[Option<String>; 10]> = pipe.query_async(con).await?;
    replies.into_iter().map(parse_reservation).collect()
}

fn parse_reservation(fields: [Option<String>; 10]) -> RedisResult<Option<Reservation>> {
    let [
        state,
        user,
        items,
        accepted_at,
        reason,
        part,
        first,
        idem,
        by,
        paid,
    ] = fields;
    let (Some(state), Some(user), Some(items)) = (state, user, items) else {
        return Ok(None);
    };
    let state = ResvState::parse(&state).ok_or_else(|| protocol_error("reservation", &[state]))?;
    let user = UserId::parse(user).map_err(|e| protocol_error("reservation", &[e.0]))?;
    let bad = |e: serde_json::Error| protocol_error("reservation", &[e.to_string()]);
    let lines: Vec<OrderLine> = serde_json::from_str(&items).map_err(bad)?;
    let held = match part {
        Some(p) => serde_json::from_str(&p).map_err(bad)?,
        None => lines.iter().map(HeldLine::from).collect(),
    };
    Ok(Some(Reservation {
        state,
        user,
        lines,
        held,
        first: first.and_then(|g| g.parse().ok()),
        accepted_at: accepted_at.unwrap_or_default(),
        reason,
        idempotency_key: idem,
        cancelled_by: by,
        paid: paid.and_then(|p| p.parse().ok()),
    }))
}

static REAP: LazyLock<Script> = releasing!("lua/reap.lua");

/// Order ids whose deadline is at or before `now_ms`, oldest first, at most `limit`.
pub async fn due<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    now_ms: i64,
    limit: usize,
) -> RedisResult<Vec<OrderId>> {
    zset_upto(con, &keys.deadlines(), &now_ms.to_string(), limit).await
}

/// Runs `reap.lua` for one due order. Returns true if this call released it.
pub async fn reap<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    order_id: &OrderId,
    user: &UserId,
    now_ms: i64,
) -> RedisResult<bool> {
    let reaped: i64 = REAP
        .key(keys.resv(order_id))
        .key(keys.stock())
        .key(keys.user(user))
        .key(keys.deadlines())
        .key(keys.reaped())
        .key(keys.stock_changes())
        .key(keys.stock_seq())
        .arg(order_id.to_string())
        .arg(now_ms)
        .arg(RECORD_TTL_SECS)
        .invoke_async(con)
        .await?;
    Ok(reaped == 1)
}

/// Reaped orders still waiting for their PostgreSQL record.
pub async fn reaped<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    limit: usize,
) -> RedisResult<Vec<OrderId>> {
    let ids: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.reaped())
        .arg(0)
        .arg(limit as i64 - 1)
        .query_async(con)
        .await?;
    Ok(ids.iter().filter_map(|s| OrderId::parse(s)).collect())
}

/// A reaped order is recorded in PostgreSQL.
pub async fn forget_reaped<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    order_id: &OrderId,
) -> RedisResult<()> {
    redis::cmd("ZREM")
        .arg(keys.reaped())
        .arg(order_id.to_string())
        .query_async(con)
        .await
}

/// The user of a reservation, if Redis has it (to name the user's key for a script).
pub async fn reservation_user<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    order_id: &OrderId,
) -> RedisResult<Option<UserId>> {
    let user: Option<String> = redis::cmd("HGET")
        .arg(keys.resv(order_id))
        .arg("user")
        .query_async(con)
        .await?;
    Ok(user.and_then(|u| UserId::parse(u).ok()))
}

/// True while stock levels are loaded (the epoch exists): ingress may reserve.
pub async fn stock_loaded<C: ConnectionLike>(con: &mut C, keys: &Keys) -> RedisResult<bool> {
    redis::cmd("EXISTS")
        .arg(keys.epoch())
        .query_async(con)
        .await
}

/// Units available of each SKU, in order; None for a SKU Redis does not know.
pub async fn available<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    skus: &[&Sku],
) -> RedisResult<Vec<Option<i64>>> {
    if skus.is_empty() {
        return Ok(Vec::new());
    }
    redis::cmd("HMGET")
        .arg(keys.stock())
        .arg(skus.iter().map(|s| s.as_str()).collect::<Vec<_>>())
        .query_async(con)
        .await
}

static STOCK_CHANGES: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/stock_changes.lua")));

/// Where a reader of [`stock_changes`] is: the load (epoch) and change sequence it has
/// seen. The default has seen nothing, so its first read returns every level.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StockCursor {
    pub epoch: String,
    pub seq: i64,
}

/// Runs `stock_changes.lua`: the levels changed since `cursor` and the cursor to pass
/// next time; None while stock is not loaded.
pub async fn stock_changes<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    cursor: &StockCursor,
) -> RedisResult<Option<(StockCursor, Vec<(String, i64)>)>> {
    let reply: Vec<String> = STOCK_CHANGES
        .key(keys.epoch())
        .key(keys.stock())
        .key(keys.stock_changes())
        .key(keys.stock_seq())
        .arg(cursor.seq)
        .arg(&cursor.epoch)
        .invoke_async(con)
        .await?;
    let w = "stock_changes";
    let epoch = reply.first().cloned().unwrap_or_default();
    if epoch.is_empty() {
        return Ok(None);
    }
    let seq = int(w, &reply, 1)?;
    let levels = reply[2..]
        .chunks_exact(2)
        .map(|p| {
            p[1].parse()
                .map(|n| (p[0].clone(), n))
                .map_err(|_| protocol_error(w, &reply))
        })
        .collect::<RedisResult<_>>()?;
    Ok(Some((StockCursor { epoch, seq }, levels)))
}

/// A sale window as `reserve.lua` reads it from `windows`: `<starts ms>,<ends ms>`, a
/// side empty when open; None when both are (no field at all: nothing to compare).
pub fn window_field(starts_ms: Option<i64>, ends_ms: Option<i64>) -> Option<String> {
    let side = |t: Option<i64>| t.map(|t| t.max(0).to_string()).unwrap_or_default();
    (starts_ms.is_some() || ends_ms.is_some())
        .then(|| format!("{},{}", side(starts_ms), side(ends_ms)))
}

/// Adds to `pipe` the commands that set `sku`'s sale window in the shard of `keys`
/// (`field` from [`window_field`]; None removes it).
pub fn set_window(pipe: &mut redis::Pipeline, keys: &Keys, sku: &Sku, field: Option<&str>) {
    match field {
        Some(f) => pipe.hset(keys.windows(), sku.as_str(), f).ignore(),
        None => pipe.hdel(keys.windows(), sku.as_str()).ignore(),
    };
}

/// Writes what `reserve.lua` decides `sku` by besides its level (its per-user `limit`,
/// its sale `window` field: None leaves either as it is, `Some(None)` removes the window)
/// in the shard of each of its `k` buckets: one atomic pipeline per shard, since a Redis
/// Cluster refuses a pipeline over several slots.
pub async fn set_rules<C: ConnectionLike>(
    con: &mut C,
    shards: &super::Shards,
    sku: &Sku,
    k: usize,
    limit: Option<i64>,
    window: Option<Option<&str>>,
) -> RedisResult<()> {
    for g in shards.bucket_shards(sku, k) {
        let keys = shards.get(g);
        let mut pipe = redis::pipe();
        pipe.atomic();
        if let Some(l) = limit {
            pipe.hset(keys.limits(), sku.as_str(), l).ignore();
        }
        if let Some(w) = window {
            set_window(&mut pipe, keys, sku, w);
        }
        let _: () = pipe.query_async(con).await?;
    }
    Ok(())
}

/// Puts a bundle into its shard: its per-user `limit`, its sale `window` and its
/// definition, in one atomic pipeline. The definition is what makes the bundle orderable
/// (`reserve.lua` refuses a bundle line without one), so no order is ever decided with a
/// bundle's definition but without its rules. Idempotent (a definition never changes).
pub async fn put_bundle<C: ConnectionLike>(
    con: &mut C,
    shards: &super::Shards,
    bundle: &Sku,
    def: &BundleDef,
    limit: i64,
    window: Option<&str>,
) -> RedisResult<()> {
    let keys = shards.for_sku(bundle);
    let mut pipe = redis::pipe();
    pipe.atomic();
    pipe.hset(keys.limits(), bundle.as_str(), limit).ignore();
    set_window(&mut pipe, keys, bundle, window);
    pipe.hset(keys.bundles(), bundle.as_str(), def.field())
        .ignore();
    pipe.query_async(con).await
}

/// What `unwait.lua` did with a waitlisted order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unwait {
    /// Off its waitlist now, its holding back; recorded in PostgreSQL next (`reaped`).
    Released,
    /// Its waitlist deadline has not passed (an expiry asked too early).
    NotDue,
    /// Not waitlisted (any more): the state that kept it (`reserved` once promoted,
    /// `released`, ..., `missing`).
    Not(String),
}

/// Runs `unwait.lua`: the waitlisted order `order_id` of `user` leaves its waitlist,
/// `cancelled` by its buyer or `waitlist_expired` (only past its deadline, `now_ms`).
/// `by`: who cancelled it, as JSON, when the cancel is audited (the reaper writes the
/// record with the order's).
pub async fn unwait<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    order_id: &OrderId,
    user: &UserId,
    reason: &str,
    now_ms: i64,
    by: Option<&str>,
) -> RedisResult<Unwait> {
    let outcome: String = UNWAIT
        .key(keys.resv(order_id))
        .key(keys.user(user))
        .key(keys.reaped())
        .key(keys.stock())
        .arg(order_id.to_string())
        .arg(reason)
        .arg(now_ms)
        .arg(RECORD_TTL_SECS)
        .arg(by.unwrap_or_default())
        .invoke_async(con)
        .await?;
    Ok(match outcome.as_str() {
        "released_now" => Unwait::Released,
        "not_due" => Unwait::NotDue,
        _ => Unwait::Not(outcome),
    })
}

/// Promotes what fits of `sku`'s waitlist now (`promote_now.lua`); how many orders.
pub async fn promote_now<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    sku: &str,
) -> RedisResult<i64> {
    PROMOTE_NOW
        .key(keys.stock())
        .arg(sku)
        .invoke_async(con)
        .await
}

/// The units each waitlisted SKU of the shard waits for (`wlw`).
pub async fn waiting<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
) -> RedisResult<Vec<(String, i64)>> {
    redis::cmd("HGETALL")
        .arg(keys.waiting())
        .query_async(con)
        .await
}

/// The waitlisted order `order_id`'s place in `sku`'s waitlist (1 = next), if it is on it.
pub async fn waitlist_position<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    sku: &str,
    order_id: &OrderId,
) -> RedisResult<Option<i64>> {
    let rank: Option<i64> = redis::cmd("ZRANK")
        .arg(keys.waitlist(sku))
        .arg(order_id.to_string())
        .query_async(con)
        .await?;
    Ok(rank.map(|r| r + 1))
}

/// Every order still waitlisted on `sku`'s list in the shard of `keys`, next first (the
/// list read whole, the records in chunks of 500: for checks and loads, not hot paths).
pub async fn waitlisted<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    sku: &str,
) -> RedisResult<Vec<(OrderId, Reservation)>> {
    let ids = waitlist_head(con, keys, sku, 0).await?;
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let found = reservations(con, keys, chunk).await?;
        out.extend(chunk.iter().zip(found).filter_map(|(id, r)| {
            r.filter(|r| r.state == ResvState::Waitlisted)
                .map(|r| (*id, r))
        }));
    }
    Ok(out)
}

/// The first `limit` orders of `sku`'s waitlist, next first (0: all of them).
pub async fn waitlist_head<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    sku: &str,
    limit: usize,
) -> RedisResult<Vec<OrderId>> {
    let ids: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.waitlist(sku))
        .arg(0)
        .arg(limit as i64 - 1)
        .query_async(con)
        .await?;
    // (limit 0 asks for 0..-1: the whole list.)
    Ok(ids.iter().filter_map(|s| OrderId::parse(s)).collect())
}

/// Order ids of a zset of the shard (`wlexp`, `wlnew`, `promoted`) whose score is at
/// most `max` (`+inf`: all), lowest first, at most `limit`.
pub async fn zset_upto<C: ConnectionLike>(
    con: &mut C,
    key: &str,
    max: &str,
    limit: usize,
) -> RedisResult<Vec<OrderId>> {
    let ids: Vec<String> = redis::cmd("ZRANGE")
        .arg(key)
        .arg("-inf")
        .arg(max)
        .arg("BYSCORE")
        .arg("LIMIT")
        .arg(0)
        .arg(limit)
        .query_async(con)
        .await?;
    Ok(ids.iter().filter_map(|s| OrderId::parse(s)).collect())
}
