//! Admin operations on SKUs: create, read, receive goods, read the ledger. PostgreSQL is
//! written first; Redis follows through `apply_stock.lua`, once per change.

use crate::{
    error::ApiError,
    repo::{self, NewSku, Patched, SkuCursor, SkuPatch, SkuRow, Window},
    state::AppState,
    stock,
};
use anyhow::Context;
use floodgate_common::{
    audit::Actor,
    bundle::BundleDef,
    domain::{OrderId, Reference, Sku},
    redis::{self as fredis, StockChange, Take, adjust_token, receive_token},
};
use serde::Serialize;
use serde_json::{Map, Value};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Units one receipt may add (and one adjustment add or write off), and the most a SKU
/// may start with.
pub const MAX_RECEIVE: i64 = 1_000_000;
pub const MAX_INITIAL_STOCK: i64 = 1_000_000_000;

/// A field of an admin body, with 422 `invalid_request` naming it when it is wrong.
pub(crate) struct Fields<'a>(pub(crate) &'a Map<String, Value>);

impl Fields<'_> {
    pub(crate) fn str(&self, name: &str) -> Result<&str, ApiError> {
        match self.0.get(name) {
            Some(Value::String(s)) => Ok(s),
            None | Some(Value::Null) => Err(missing(name)),
            Some(_) => Err(ApiError::InvalidRequest(format!(
                "{name}: must be a string"
            ))),
        }
    }

    pub(crate) fn int(&self, name: &str, min: i64, max: i64) -> Result<i64, ApiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Err(missing(name)),
            Some(Value::Number(n)) => match crate::extract::integral(n) {
                Some(v) if (min..=max).contains(&v) => Ok(v),
                _ => Err(ApiError::InvalidRequest(format!(
                    "{name}: must be an integer in {min}..={max}, got {n}"
                ))),
            },
            Some(_) => Err(ApiError::InvalidRequest(format!(
                "{name}: must be an integer in {min}..={max}"
            ))),
        }
    }

    /// 1-200 characters once trimmed, no control character (PostgreSQL text cannot hold
    /// NUL, and none belongs in a name or a reason).
    pub(crate) fn text(&self, name: &str) -> Result<String, ApiError> {
        let v = self.str(name)?.trim().to_owned();
        if v.is_empty() || v.chars().count() > 200 {
            return Err(ApiError::InvalidRequest(format!(
                "{name}: must be 1-200 characters"
            )));
        }
        if v.chars().any(char::is_control) {
            return Err(ApiError::InvalidRequest(format!(
                "{name}: must not contain control characters"
            )));
        }
        Ok(v)
    }

    /// An RFC 3339 instant, absent or null: None. In UTC, years 1970-9999, whole
    /// milliseconds at most (Redis compares milliseconds: a finer instant would open or
    /// close a sale up to a millisecond away from the one written).
    pub(crate) fn opt_time(&self, name: &str) -> Result<Option<OffsetDateTime>, ApiError> {
        let bad = |why: &str| {
            ApiError::InvalidRequest(format!(
                "{name}: must be an RFC 3339 date-time (e.g. 2030-01-01T09:00:00Z) or null{why}"
            ))
        };
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => {
                let t = OffsetDateTime::parse(s, &Rfc3339)
                    .ok()
                    .and_then(|t| t.checked_to_offset(time::UtcOffset::UTC))
                    .ok_or_else(|| bad(""))?;
                if !(1970..=9999).contains(&t.year()) {
                    return Err(bad(", in the years 1970-9999 (UTC)"));
                }
                if t.nanosecond() % 1_000_000 != 0 {
                    return Err(bad(", to the millisecond at most"));
                }
                Ok(Some(t))
            }
            Some(_) => Err(bad("")),
        }
    }

    /// `sale_starts_at` and `sale_ends_at` as a window whose end is after its start.
    pub(crate) fn window(&self) -> Result<Window, ApiError> {
        let window = Window {
            starts: self.opt_time("sale_starts_at")?,
            ends: self.opt_time("sale_ends_at")?,
        };
        if !window.is_valid() {
            return Err(ApiError::InvalidRequest(
                "sale_ends_at: must be after sale_starts_at".into(),
            ));
        }
        Ok(window)
    }

    /// A receipt's or adjustment's `reference`.
    pub(crate) fn reference(&self) -> Result<Reference, ApiError> {
        Reference::parse(self.str("reference")?)
            .map_err(|e| ApiError::InvalidRequest(format!("reference: {e}")))
    }

    pub(crate) fn opt_int(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.int(name, min, max).map(Some),
        }
    }
}

fn missing(name: &str) -> ApiError {
    ApiError::InvalidRequest(format!("{name}: required"))
}

/// A SKU with its live availability.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SkuView {
    #[serde(flatten)]
    pub row: SkuRow,
    pub available: i64,
    /// Units that orders on the SKU's waitlist wait for (they get the next units that
    /// come back, oldest first).
    pub waitlisted: i64,
}

/// The SKU `row` (of `sku`) with its live availability and waitlist.
async fn sku_view(st: &AppState, sku: &Sku, row: SkuRow) -> Result<SkuView, ApiError> {
    let available = stock::available(st, sku).await?;
    let waitlisted = stock::waiting(st, std::slice::from_ref(sku))
        .await?
        .remove(sku)
        .unwrap_or(0);
    Ok(SkuView {
        row,
        available,
        waitlisted,
    })
}

fn parse_sku(s: &str) -> Result<Sku, ApiError> {
    Sku::parse(s).map_err(|_| ApiError::SkuNotFound { sku: s.to_owned() })
}

pub async fn create(
    st: &AppState,
    actor: &Actor,
    body: &Map<String, Value>,
) -> Result<SkuView, ApiError> {
    let f = Fields(body);
    let sku =
        Sku::parse(f.str("sku")?).map_err(|e| ApiError::InvalidRequest(format!("sku: {e}")))?;
    let name = f.text("name")?;
    let new = NewSku {
        sku,
        name,
        price_cents: f.int("price_cents", 0, i64::from(i32::MAX) * 100)?,
        initial_stock: f.int("initial_stock", 0, MAX_INITIAL_STOCK)?,
        per_user_limit: f.opt_int("per_user_limit", 1, 1_000_000)?.unwrap_or(0) as i32,
        buckets: f
            .opt_int("buckets", 1, fredis::MAX_SHARDS as i64)?
            .unwrap_or(1) as i16,
        window: f.window()?,
        variant: None,
    };
    // More buckets than shards would put two in one shard, where they would be one.
    if new.buckets as usize > st.shards.count() {
        return Err(ApiError::InvalidRequest(format!(
            "buckets: at most the number of Redis shards (FLOODGATE_REDIS_SHARDS = {}), got {}",
            st.shards.count(),
            new.buckets
        )));
    }
    let product_id = match body.get("product_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) => Some(p.as_str()),
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "product_id: must be a string".into(),
            ));
        }
    };
    let new = NewSku {
        variant: {
            let db = st.pg.get().await.context("PostgreSQL connection")?;
            crate::products::variant(&db, product_id, body.get("options")).await?
        },
        ..new
    };
    let created = repo::create_sku(&st.pg, &new, actor)
        .await
        .map_err(lock_wait)?;
    match created {
        repo::Created::VariantOf(sku) => return Err(ApiError::VariantExists { sku }),
        repo::Created::ProductFull => {
            return Err(ApiError::InvalidRequest(format!(
                "product_id: the product has {} SKUs, the most one may have",
                crate::products::MAX_SKUS_PER_PRODUCT
            )));
        }
        _ => {}
    }
    // Also after a 409: a repeat heals a crash between the commit and this call, and is
    // a no-op otherwise.
    let row = bring_to_redis(st, &new.sku).await?;
    if matches!(created, repo::Created::Exists) {
        return Err(ApiError::SkuExists {
            sku: new.sku.to_string(),
        });
    }
    sku_view(st, &new.sku, row).await
}

/// Puts a SKU PostgreSQL has into Redis with its first units: its buckets opened
/// (`open_bucket.lua`) and its initial receipt applied once, each with the limit and
/// window PostgreSQL holds *now*, read under the row's share lock and the load lock
/// (shared) while they are written: a PATCH waits until they are, so it can never be
/// undone by an older window, and no load runs in between. Idempotent (a SKU already in
/// Redis is left as it is). Returns the row.
pub async fn bring_to_redis(st: &AppState, sku: &Sku) -> Result<SkuRow, ApiError> {
    let mut db = st.pg.get().await.context("PostgreSQL connection")?;
    let tx = db.transaction().await.context("starting a transaction")?;
    tx.execute(floodgate_common::stock::LOAD_LOCK_SHARED, &[])
        .await
        .map_err(|e| lock_wait(anyhow::Error::new(e).context("waiting for a load of stock")))?;
    let row = repo::sku_shared(&tx, sku)
        .await
        .map_err(lock_wait)?
        .ok_or_else(|| anyhow::anyhow!("SKU {sku} vanished after it was written"))?;
    if let Some(def) = bundle_def(&row)? {
        // A bundle: its rules and definition, no stock.
        fredis::put_bundle(
            &mut st.redis.clone(),
            &st.shards,
            sku,
            &def,
            i64::from(row.per_user_limit),
            row.window.field().as_deref(),
        )
        .await
        .map_err(|e| crate::orders::unavailable("Redis", e))?;
        tx.commit()
            .await
            .context("ending the bundle's first write to Redis")?;
        return Ok(row);
    }
    let initial = Reference::parse(repo::INITIAL_REFERENCE).expect("a valid reference");
    let initial_stock: i64 = tx
        .query_opt(
            "SELECT qty FROM stock_movements WHERE kind = 'receive' AND sku = $1 AND reference = $2",
            &[&sku.as_str(), &initial.as_str()],
        )
        .await
        .context("reading a SKU's initial receipt")?
        .map_or(0, |r| r.get(0));
    let window = row.window.field();
    // The row's count, not a request's: a repeat with another count heals the first.
    fredis::buckets::open_buckets(
        &mut st.redis.clone(),
        &st.shards,
        sku,
        row.buckets as usize,
        i64::from(row.per_user_limit),
        window.as_deref(),
    )
    .await
    .map_err(|e| crate::orders::unavailable("Redis", e))?;
    fredis::apply_stock(
        &mut st.redis.clone(),
        st.shards.for_sku(sku),
        &StockChange {
            sku,
            units: initial_stock,
            token: &fredis::initial_token(sku),
            per_user_limit: Some(i64::from(row.per_user_limit)),
            user: None,
            // With its first units, in the same script: never stock without its window.
            window: window.as_deref(),
            after: None,
        },
    )
    .await
    .map_err(|e| crate::orders::unavailable("Redis", e))?;
    tx.commit()
        .await
        .context("ending the SKU's first write to Redis")?;
    Ok(row)
}

/// A bundle row's definition (None for a SKU that is not a bundle).
fn bundle_def(row: &SkuRow) -> Result<Option<BundleDef>, ApiError> {
    let Some(components) = &row.components else {
        return Ok(None);
    };
    let parsed: Vec<(Sku, i64)> = components
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some((
                Sku::parse(c.get("sku")?.as_str()?).ok()?,
                c.get("qty")?.as_i64()?,
            ))
        })
        .collect();
    BundleDef::new(parsed)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("bundle {}: {e}", row.sku).into())
}

/// `POST /v1/bundles`: a SKU sold as 2-20 other SKUs (API.md, Catalog). PostgreSQL
/// first, then Redis (its limit, window and definition in one atomic write: see
/// [`fredis::put_bundle`]); a repeat (409) heals a crash between the two.
pub async fn create_bundle(
    st: &AppState,
    actor: &Actor,
    body: &Map<String, Value>,
) -> Result<SkuView, ApiError> {
    let f = Fields(body);
    let sku =
        Sku::parse(f.str("sku")?).map_err(|e| ApiError::InvalidRequest(format!("sku: {e}")))?;
    let name = f.text("name")?;
    let price_cents = f.int("price_cents", 0, i64::from(i32::MAX) * 100)?;
    let per_user_limit = f.opt_int("per_user_limit", 1, 1_000_000)?.unwrap_or(0) as i32;
    let window = f.window()?;
    let Some(Value::Array(list)) = body.get("components") else {
        return Err(ApiError::InvalidRequest(format!(
            "components: required, a list of {}-{} {{\"sku\", \"qty\"}}",
            floodgate_common::bundle::MIN_COMPONENTS,
            floodgate_common::bundle::MAX_COMPONENTS
        )));
    };
    let mut components = Vec::with_capacity(list.len());
    for (i, c) in list.iter().enumerate() {
        let Value::Object(c) = c else {
            return Err(ApiError::InvalidRequest(format!(
                "components[{i}]: must be an object {{\"sku\", \"qty\"}}"
            )));
        };
        let c = Fields(c);
        let at = |e: ApiError| match e {
            ApiError::InvalidRequest(m) => ApiError::InvalidRequest(format!("components[{i}].{m}")),
            e => e,
        };
        let component = Sku::parse(c.str("sku").map_err(at)?)
            .map_err(|e| ApiError::InvalidRequest(format!("components[{i}].sku: {e}")))?;
        if component == sku {
            return Err(ApiError::InvalidRequest(format!(
                "components[{i}].sku: a bundle cannot contain itself"
            )));
        }
        let qty = c
            .int("qty", 1, floodgate_common::bundle::MAX_COMPONENT_QTY)
            .map_err(at)?;
        components.push((component, qty));
    }
    let def = BundleDef::new(components).map_err(|e| ApiError::InvalidRequest(e.0))?;
    let new = repo::NewBundle {
        sku,
        name,
        price_cents,
        per_user_limit,
        window,
        def,
    };
    let created = repo::create_bundle(&st.pg, &new, actor)
        .await
        .map_err(lock_wait)?;
    match created {
        repo::BundleCreated::UnknownComponent(sku) => return Err(ApiError::UnknownSku { sku }),
        repo::BundleCreated::NestedBundle(c) => {
            return Err(ApiError::InvalidRequest(format!(
                "components: {c} is a bundle; a bundle's components are SKUs of their own"
            )));
        }
        repo::BundleCreated::New | repo::BundleCreated::Exists => {}
    }
    // Also after a 409 (see `create`); a SKU that is not a bundle is left as it is.
    let row = bring_to_redis(st, &new.sku).await?;
    if matches!(created, repo::BundleCreated::Exists) {
        return Err(ApiError::SkuExists {
            sku: new.sku.to_string(),
        });
    }
    sku_view(st, &new.sku, row).await
}

/// 409 `bundle_has_no_stock` for a receipt or adjustment that found a bundle
/// ([`repo::IsBundle`]); any other error as [`lock_wait`] maps it.
fn bundle_or(e: anyhow::Error, sku: &Sku) -> ApiError {
    if e.downcast_ref::<repo::IsBundle>().is_some() {
        return ApiError::BundleHasNoStock {
            sku: sku.to_string(),
        };
    }
    lock_wait(e)
}

pub async fn get(st: &AppState, sku: &str) -> Result<SkuView, ApiError> {
    let sku = parse_sku(sku)?;
    let row = repo::sku(&st.pg, &sku)
        .await?
        .ok_or_else(|| ApiError::SkuNotFound {
            sku: sku.to_string(),
        })?;
    sku_view(st, &sku, row).await
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Received {
    pub sku: String,
    pub on_hand: i64,
    pub available: i64,
}

pub async fn receive(
    st: &AppState,
    actor: &Actor,
    sku: &str,
    body: &Map<String, Value>,
) -> Result<Received, ApiError> {
    let sku = parse_sku(sku)?;
    let f = Fields(body);
    let qty = f.int("qty", 1, MAX_RECEIVE)?;
    let reference = f.reference()?;
    let on_hand = repo::receive(&st.pg, &sku, qty, &reference, actor)
        .await
        .map_err(|e| bundle_or(e, &sku))?
        .ok_or_else(|| ApiError::SkuNotFound {
            sku: sku.to_string(),
        })?;
    // The units of the first receipt with this reference, applied to Redis once.
    let first_qty = repo::receipt_qty(&st.pg, &sku, &reference)
        .await?
        .unwrap_or(qty);
    let token = receive_token(&sku, reference.as_str());
    let available = apply_after_initial(st, &sku, first_qty, &token).await?;
    // Over every bucket, for a SKU with buckets (the receipt went to bucket 0).
    let available = if st.shards.count() > 1 {
        stock::available(st, &sku).await?
    } else {
        available
    };
    Ok(Received {
        sku: sku.to_string(),
        on_hand,
        available,
    })
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MovementsPage {
    pub movements: Vec<repo::Movement>,
    pub next_cursor: Option<String>,
}

pub async fn movements(
    st: &AppState,
    sku: &str,
    limit: Option<&str>,
    cursor: Option<&str>,
) -> Result<MovementsPage, ApiError> {
    let sku = parse_sku(sku)?;
    let limit = page_limit(limit)?;
    let before = id_cursor(cursor)?;
    if repo::sku(&st.pg, &sku).await?.is_none() {
        return Err(ApiError::SkuNotFound {
            sku: sku.to_string(),
        });
    }
    let (movements, next_cursor) = page(
        repo::movements(&st.pg, &sku, limit + 1, before).await?,
        limit,
        |m| m.id.clone(),
    );
    Ok(MovementsPage {
        movements,
        next_cursor,
    })
}

/// The head of a SKU's waitlist (`GET /v1/skus/{sku}/waitlist`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WaitlistPage {
    pub sku: String,
    /// Units the SKU's waitlisted orders wait for.
    pub waitlisted: i64,
    /// How many orders wait.
    pub orders: i64,
    /// The first `limit` of them, next to be promoted first.
    pub entries: Vec<WaitlistEntry>,
}

/// One waitlisted order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WaitlistEntry {
    pub position: i64,
    pub order_id: OrderId,
    pub user_id: String,
    pub qty: i64,
    /// When it was placed (its `accepted_at`).
    #[schema(format = DateTime)]
    pub waitlisted_at: String,
}

pub async fn waitlist(
    st: &AppState,
    sku: &str,
    limit: Option<&str>,
) -> Result<WaitlistPage, ApiError> {
    let sku = parse_sku(sku)?;
    let limit = page_limit(limit)?;
    if repo::sku(&st.pg, &sku).await?.is_none() {
        return Err(ApiError::SkuNotFound {
            sku: sku.to_string(),
        });
    }
    let keys = st.shards.for_sku(&sku);
    let mut con = st.redis.clone();
    let redis_err = |e| crate::orders::unavailable("Redis", e);
    let (waitlisted, orders): (Option<i64>, i64) = redis::pipe()
        .hget(keys.waiting(), sku.as_str())
        .zcard(keys.waitlist(sku.as_str()))
        .query_async(&mut con)
        .await
        .map_err(redis_err)?;
    let ids = fredis::waitlist_head(&mut con, keys, sku.as_str(), limit as usize)
        .await
        .map_err(redis_err)?;
    let found = fredis::reservations(&mut con, keys, &ids)
        .await
        .map_err(redis_err)?;
    // Positions count every entry ahead, so a record gone meanwhile keeps its place.
    let entries = ids
        .iter()
        .zip(found)
        .enumerate()
        .filter_map(|(i, (id, r))| {
            let r = r.filter(|r| r.state == fredis::ResvState::Waitlisted)?;
            Some(WaitlistEntry {
                position: i as i64 + 1,
                order_id: *id,
                user_id: r.user.to_string(),
                qty: r.lines.first().map_or(0, |l| l.qty.get()),
                waitlisted_at: r.accepted_at,
            })
        })
        .collect();
    Ok(WaitlistPage {
        sku: sku.to_string(),
        waitlisted: waitlisted.unwrap_or(0),
        orders,
        entries,
    })
}

/// `limit` of a paged list: 1..=500, 50 when absent.
pub fn page_limit(limit: Option<&str>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(50),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=500).contains(l))
            .ok_or_else(|| ApiError::InvalidRequest("limit: must be an integer 1..=500".into())),
    }
}

/// One page of a list read with `limit + 1` rows: the first `limit`, and the cursor of
/// the last of them when there was more (None on the last page).
pub fn page<T>(
    mut rows: Vec<T>,
    limit: i64,
    cursor: impl FnOnce(&T) -> String,
) -> (Vec<T>, Option<String>) {
    if rows.len() as i64 <= limit {
        return (rows, None);
    }
    rows.truncate(limit as usize);
    let next = rows.last().map(cursor);
    (rows, next)
}

/// A `cursor` that is a row id (the ledger's, the audit log's); none when absent or empty.
pub fn id_cursor(cursor: Option<&str>) -> Result<Option<i64>, ApiError> {
    match cursor {
        None | Some("") => Ok(None),
        Some(c) => Ok(Some(c.parse::<i64>().ok().filter(|c| *c > 0).ok_or_else(
            || ApiError::InvalidRequest("cursor: not a cursor this API returned".into()),
        )?)),
    }
}

fn bad_cursor() -> ApiError {
    ApiError::InvalidRequest("cursor: not a cursor this API returned".into())
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SkuPage {
    pub skus: Vec<SkuView>,
    pub next_cursor: Option<String>,
}

/// `GET /v1/skus`: newest first.
pub async fn list(
    st: &AppState,
    limit: Option<&str>,
    cursor: Option<&str>,
    product_id: Option<&str>,
) -> Result<SkuPage, ApiError> {
    let limit = page_limit(limit)?;
    let product_id = match product_id {
        None | Some("") => None,
        Some(p) => {
            let db = st.pg.get().await.context("PostgreSQL connection")?;
            let known = Sku::parse(p).is_ok()
                && db
                    .query_opt("SELECT 1 FROM products WHERE id = $1", &[&p])
                    .await
                    .context("reading a product")?
                    .is_some();
            if !known {
                return Err(ApiError::UnknownProduct { id: p.to_owned() });
            }
            Some(p)
        }
    };
    let after = match cursor {
        None | Some("") => None,
        Some(c) => Some(SkuCursor::parse(c).ok_or_else(bad_cursor)?),
    };
    let (rows, next_cursor) = page(
        repo::skus(&st.pg, limit + 1, after.as_ref(), product_id).await?,
        limit,
        |(_, c)| c.encode(),
    );
    let skus: Vec<Sku> = rows
        .iter()
        .filter_map(|(r, _)| Sku::parse(r.sku.as_str()).ok())
        .collect();
    let levels: std::collections::HashMap<Sku, i64> =
        stock::levels(st, &skus).await?.into_iter().collect();
    let waiting = stock::waiting(st, &skus).await?;
    let skus = rows
        .into_iter()
        .map(|(row, _)| {
            let available = Sku::parse(row.sku.as_str())
                .ok()
                .and_then(|s| levels.get(&s).copied())
                .unwrap_or(0);
            let waitlisted = Sku::parse(row.sku.as_str())
                .ok()
                .and_then(|s| waiting.get(&s).copied())
                .unwrap_or(0);
            SkuView {
                row,
                available,
                waitlisted,
            }
        })
        .collect();
    Ok(SkuPage { skus, next_cursor })
}

/// The fields `PATCH /v1/skus/{sku}` may change.
const PATCHABLE: [&str; 5] = [
    "name",
    "price_cents",
    "per_user_limit",
    "sale_starts_at",
    "sale_ends_at",
];

/// `PATCH /v1/skus/{sku}`. A changed per-user limit reaches Redis (every bucket's
/// shard) before PostgreSQL commits, under the SKU's row lock: two concurrent changes
/// cannot leave Redis with the older one, and a Redis failure changes nothing.
pub async fn patch(
    st: &AppState,
    actor: &Actor,
    sku: &str,
    body: &Map<String, Value>,
) -> Result<SkuView, ApiError> {
    let sku = parse_sku(sku)?;
    if let Some(k) = body.keys().find(|k| !PATCHABLE.contains(&k.as_str())) {
        return Err(ApiError::InvalidRequest(format!(
            "{k}: not a field that can be changed (only {})",
            PATCHABLE.join(", ")
        )));
    }
    if body.is_empty() {
        return Err(ApiError::InvalidRequest(format!(
            "the body changes nothing: give any of {}",
            PATCHABLE.join(", ")
        )));
    }
    let f = Fields(body);
    let patch = SkuPatch {
        name: body
            .contains_key("name")
            .then(|| f.text("name"))
            .transpose()?,
        price_cents: body
            .contains_key("price_cents")
            .then(|| f.int("price_cents", 0, i64::from(i32::MAX) * 100))
            .transpose()?,
        // null clears the limit (0 = none), as it does for the sale window.
        per_user_limit: match body.get("per_user_limit") {
            None => None,
            Some(Value::Null) => Some(0),
            Some(_) => Some(f.int("per_user_limit", 1, 1_000_000)? as i32),
        },
        sale_starts_at: body
            .contains_key("sale_starts_at")
            .then(|| f.opt_time("sale_starts_at"))
            .transpose()?,
        sale_ends_at: body
            .contains_key("sale_ends_at")
            .then(|| f.opt_time("sale_ends_at"))
            .transpose()?,
    };
    let mut db = st
        .pg
        .get()
        .await
        .map_err(|e| anyhow::Error::new(e).context("PostgreSQL connection"))?;
    let tx = db
        .transaction()
        .await
        .map_err(|e| anyhow::Error::new(e).context("starting a transaction"))?;
    tx.execute(floodgate_common::stock::LOAD_LOCK_SHARED, &[])
        .await
        .map_err(|e| lock_wait(anyhow::Error::new(e).context("waiting for a load of stock")))?;
    let (before, after) = match repo::update_sku(&tx, &sku, &patch, actor)
        .await
        .map_err(lock_wait)?
    {
        Patched::Done(rows) => *rows,
        Patched::UnknownSku => {
            return Err(ApiError::SkuNotFound {
                sku: sku.to_string(),
            });
        }
        Patched::BadWindow => {
            return Err(ApiError::InvalidRequest(
                "sale_ends_at: must be after sale_starts_at (as the SKU's window would be)".into(),
            ));
        }
    };
    // Redis first, under the row lock and the shared load lock: what orders are decided
    // by never lags what PostgreSQL says. After a failure, Redis gets what PostgreSQL
    // holds then (a commit that failed to answer may still have committed).
    if let Err(e) = write_settings(st, &sku, Some(&before), &after).await {
        drop(tx);
        drop(db);
        resync_settings(st, &sku).await;
        return Err(e);
    }
    if let Err(e) = tx.commit().await {
        drop(db);
        resync_settings(st, &sku).await;
        return Err(anyhow::Error::new(e)
            .context("committing a SKU change")
            .into());
    }
    sku_view(st, &sku, after).await
}

/// Writes what `reserve.lua` reads of `after` (the per-user limit, the sale window) to
/// every shard holding a bucket of `sku`: what differs from `before`, or all of it.
async fn write_settings(
    st: &AppState,
    sku: &Sku,
    before: Option<&SkuRow>,
    after: &SkuRow,
) -> Result<(), ApiError> {
    let window = after.window.field();
    let window_changed = before.is_none_or(|b| b.window != after.window);
    let limit_changed = before.is_none_or(|b| b.per_user_limit != after.per_user_limit);
    fredis::set_rules(
        &mut st.redis.clone(),
        &st.shards,
        sku,
        after.buckets.max(1) as usize,
        limit_changed.then_some(i64::from(after.per_user_limit)),
        window_changed.then_some(window.as_deref()),
    )
    .await
    .map_err(|e| crate::orders::unavailable("Redis", e))
}

/// Writes what PostgreSQL holds of `sku`'s limit and window to Redis, after a PATCH
/// that failed: under the shared load lock and the row's share lock, so no other PATCH
/// or load runs in between. If this fails too, Redis may keep the failed PATCH's values
/// until a reload (logged).
async fn resync_settings(st: &AppState, sku: &Sku) {
    let done: Result<(), ApiError> = async {
        let mut db = st.pg.get().await.context("PostgreSQL connection")?;
        let tx = db.transaction().await.context("starting a transaction")?;
        tx.execute(floodgate_common::stock::LOAD_LOCK_SHARED, &[])
            .await
            .context("waiting for a load of stock")?;
        if let Some(row) = repo::sku_shared(&tx, sku).await? {
            write_settings(st, sku, None, &row).await?;
        }
        tx.commit().await.context("ending the resync")?;
        Ok(())
    }
    .await;
    if let Err(e) = done {
        tracing::error!(error = %e, %sku, "a PATCH failed and Redis could not be brought back to PostgreSQL's settings: run floodgate reconcile");
    }
}

/// `POST /v1/skus/{sku}/adjust`: a correction of the units on hand, idempotent per
/// (sku, reference).
///
/// Units added go like a receipt: PostgreSQL first, then Redis once (`apply_stock.lua`).
/// Units written off go the other way, because they must not be sold meanwhile: taken
/// out of sale in Redis first (`take_stock.lua`, atomic with every reserve decision; 409
/// `insufficient_stock` when fewer are free), then recorded in PostgreSQL, whose CHECK
/// (`sold <= on_hand`) is the final word. A record that fails before its commit gives
/// the units back; a commit whose outcome is unknown leaves them out of sale (never sold
/// twice) until the request is repeated with its reference, or `floodgate reconcile`.
pub async fn adjust(
    st: &AppState,
    actor: &Actor,
    sku: &str,
    body: &Map<String, Value>,
) -> Result<Received, ApiError> {
    let sku = parse_sku(sku)?;
    let f = Fields(body);
    let delta = f.int("delta", -MAX_RECEIVE, MAX_RECEIVE)?;
    if delta == 0 {
        return Err(ApiError::InvalidRequest(
            "delta: must not be 0 (negative writes units off, positive adds them)".into(),
        ));
    }
    let reason = f.text("reason")?;
    let reference = f.reference()?;
    let pg = |e: tokio_postgres::Error| anyhow::Error::new(e).context("PostgreSQL");
    let mut db = st
        .pg
        .get()
        .await
        .map_err(|e| anyhow::Error::new(e).context("PostgreSQL connection"))?;
    let tx = db.transaction().await.map_err(pg)?;
    let (on_hand, buckets) = repo::lock_adjustments(&tx, &sku)
        .await
        .map_err(|e| bundle_or(e, &sku))?
        .ok_or_else(|| ApiError::SkuNotFound {
            sku: sku.to_string(),
        })?;
    let token = adjust_token(&sku, reference.as_str());
    let mut redis = st.redis.clone();
    let home = st.shards.of_sku(&sku);
    if let Some(recorded) = repo::adjustment(&tx, &sku, &reference).await? {
        // A repeat: the first one's units, applied to Redis once (it may have crashed
        // between its commit and Redis).
        tx.commit().await.map_err(pg)?;
        // Back to the pool first: bringing a missing initial stock takes a connection.
        drop(db);
        if recorded > 0 {
            apply_added(st, &sku, recorded, &token).await?;
        }
        return answer(st, &sku, on_hand).await;
    }
    if delta > 0 {
        let after = record(st, &tx, &sku, delta, &reason, &reference, actor).await?;
        tx.commit().await.map_err(pg)?;
        drop(db);
        apply_added(st, &sku, delta, &token).await?;
        return answer(st, &sku, after).await;
    }
    // A write-off: out of sale first. A SKU with buckets takes from bucket 0, after
    // pulling units into it from the others when it is short.
    let keys = st.shards.get(home);
    let buckets = st.shards.effective_buckets(buckets.max(1) as usize);
    let mut pulled = false;
    let units = loop {
        match fredis::take_stock(&mut redis, keys, &sku, -delta, &token)
            .await
            .map_err(|e| crate::orders::unavailable("Redis", e))?
        {
            Take::Taken { units, .. } => break units,
            Take::NotLoaded => {
                return Err(ApiError::Unavailable(
                    "stock is not loaded in Redis; nothing was changed".into(),
                ));
            }
            Take::Short { level } if buckets > 1 && !pulled => {
                pulled = true;
                let total = st
                    .mover
                    .pull(&sku, buckets, home, -delta)
                    .await
                    .map_err(|e| crate::orders::unavailable("Redis", e))?;
                if total < -delta {
                    return Err(ApiError::InsufficientStock {
                        sku: sku.to_string(),
                        available: total.max(level),
                    });
                }
            }
            Take::Short { .. } => {
                return Err(ApiError::InsufficientStock {
                    sku: sku.to_string(),
                    available: stock::available(st, &sku).await?,
                });
            }
        }
    };
    // A failover must not bring the units back on sale once PostgreSQL counts them gone.
    if !st.mover.replicated(home).await {
        give_back(st, &sku, &token).await;
        return Err(ApiError::Unavailable(
            "Redis replicas did not confirm the write-off in time; nothing was changed".into(),
        ));
    }
    let recorded = match record(st, &tx, &sku, -units, &reason, &reference, actor).await {
        Ok(after) => after,
        Err(e) => {
            give_back(st, &sku, &token).await;
            return Err(e);
        }
    };
    if let Err(e) = tx.commit().await {
        // The outcome is unknown: the units stay out of sale (never sold twice). The
        // same request again settles it, and so does the worker's settle pass (it gives
        // them back if the record is not there).
        return Err(ApiError::Unavailable(format!(
            "PostgreSQL did not confirm the write-off ({e}); repeat the request with the same reference"
        )));
    }
    if let Err(e) = fredis::take_done(&mut redis, keys, &sku, &token).await {
        // Harmless: the settle pass finds the record and forgets the entry.
        tracing::warn!(error = %e, %sku, "could not clear a recorded write-off's entry");
    }
    answer(st, &sku, recorded).await
}

/// A lock wait that timed out (`lock_timeout`: a load of stock, or another adjustment of
/// the SKU, held it) is a 503 to retry, not a 500.
fn lock_wait(e: anyhow::Error) -> ApiError {
    let timed_out = e
        .chain()
        .filter_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .any(|pg| pg.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE));
    if timed_out {
        ApiError::Unavailable(
            "a reload of stock or another adjustment of this SKU is in progress; nothing was changed"
                .into(),
        )
    } else {
        e.into()
    }
}

async fn record(
    st: &AppState,
    tx: &deadpool_postgres::Transaction<'_>,
    sku: &Sku,
    delta: i64,
    reason: &str,
    reference: &Reference,
    actor: &Actor,
) -> Result<i64, ApiError> {
    match repo::record_adjustment(tx, sku, delta, reason, reference, actor).await {
        Ok(after) => Ok(after),
        Err(repo::AdjustError::BelowSold) => Err(ApiError::InsufficientStock {
            sku: sku.to_string(),
            available: stock::available(st, sku).await?,
        }),
        Err(repo::AdjustError::Other(e)) => Err(e.into()),
    }
}

/// Applies units an adjustment added to Redis, once per token, in bucket 0.
async fn apply_added(st: &AppState, sku: &Sku, units: i64, token: &str) -> Result<(), ApiError> {
    apply_after_initial(st, sku, units, token).await.map(|_| ())
}

/// Applies units PostgreSQL has committed (a receipt, an addition) to bucket 0 once per
/// token. They wait for the SKU's initial stock, which brings its limit and window: if
/// that never reached Redis (a crash right after the SKU's creation), it is brought now
/// and the units applied after it. Returns the level after.
async fn apply_after_initial(
    st: &AppState,
    sku: &Sku,
    units: i64,
    token: &str,
) -> Result<i64, ApiError> {
    let initial = fredis::initial_token(sku);
    let change = StockChange {
        sku,
        units,
        token,
        per_user_limit: None,
        user: None,
        window: None,
        after: Some(&initial),
    };
    let apply = || async {
        fredis::apply_stock_status(&mut st.redis.clone(), st.shards.for_sku(sku), &change)
            .await
            .map_err(|e| crate::orders::unavailable("Redis", e))
    };
    let (applied, level) = apply().await?;
    if applied != fredis::Applied::Waiting {
        return Ok(level);
    }
    bring_to_redis(st, sku).await?;
    let (applied, level) = apply().await?;
    if applied == fredis::Applied::Waiting {
        return Err(ApiError::Unavailable(format!(
            "{sku}'s initial stock is not in Redis yet; the units are recorded and follow it"
        )));
    }
    Ok(level)
}

/// Puts back units a write-off took when its record failed before the commit. If this
/// fails too, they stay out of sale until the request is repeated or a reconcile.
async fn give_back(st: &AppState, sku: &Sku, token: &str) {
    if let Err(e) =
        fredis::untake_stock(&mut st.redis.clone(), st.shards.for_sku(sku), sku, token).await
    {
        tracing::warn!(error = %e, %sku, "could not give back the units of a failed write-off; they stay out of sale until it is repeated or reconciled");
    }
}

async fn answer(st: &AppState, sku: &Sku, on_hand: i64) -> Result<Received, ApiError> {
    Ok(Received {
        sku: sku.to_string(),
        on_hand,
        available: stock::available(st, sku).await?,
    })
}
