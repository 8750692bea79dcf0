//! Admin operations on SKUs: create, read, receive goods, read the ledger. PostgreSQL is
//! written first; Redis follows through `apply_stock.lua`, once per change.

use crate::{
    error::ApiError,
    repo::{self, NewSku, SkuRow},
    state::AppState,
    stock,
};
use floodgate_common::{
    domain::{Reference, Sku},
    redis::{self as fredis, StockChange, receive_token},
};
use serde::Serialize;
use serde_json::{Map, Value};

/// Units one receipt may add, and the most a SKU may start with.
pub const MAX_RECEIVE: i64 = 1_000_000;
pub const MAX_INITIAL_STOCK: i64 = 1_000_000_000;

/// A field of an admin body, with 422 `invalid_request` naming it when it is wrong.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn str(&self, name: &str) -> Result<&str, ApiError> {
        match self.0.get(name) {
            Some(Value::String(s)) => Ok(s),
            None | Some(Value::Null) => Err(missing(name)),
            Some(_) => Err(ApiError::InvalidRequest(format!(
                "{name}: must be a string"
            ))),
        }
    }

    fn int(&self, name: &str, min: i64, max: i64) -> Result<i64, ApiError> {
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

    fn opt_int(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
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
}

fn parse_sku(s: &str) -> Result<Sku, ApiError> {
    Sku::parse(s).map_err(|_| ApiError::SkuNotFound { sku: s.to_owned() })
}

pub async fn create(st: &AppState, body: &Map<String, Value>) -> Result<SkuView, ApiError> {
    let f = Fields(body);
    let sku =
        Sku::parse(f.str("sku")?).map_err(|e| ApiError::InvalidRequest(format!("sku: {e}")))?;
    let name = f.str("name")?.trim().to_owned();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::InvalidRequest(
            "name: must be 1-200 characters".into(),
        ));
    }
    // PostgreSQL text cannot hold NUL, and no control character belongs in a name.
    if name.chars().any(char::is_control) {
        return Err(ApiError::InvalidRequest(
            "name: must not contain control characters".into(),
        ));
    }
    let new = NewSku {
        sku,
        name,
        price_cents: f.int("price_cents", 0, i64::from(i32::MAX) * 100)?,
        initial_stock: f.int("initial_stock", 0, MAX_INITIAL_STOCK)?,
        per_user_limit: f.opt_int("per_user_limit", 1, 1_000_000)?.unwrap_or(0) as i32,
        buckets: f
            .opt_int("buckets", 1, fredis::MAX_SHARDS as i64)?
            .unwrap_or(1) as i16,
    };
    // More buckets than shards would put two in one shard, where they would be one.
    if new.buckets as usize > st.shards.count() {
        return Err(ApiError::InvalidRequest(format!(
            "buckets: at most the number of Redis shards (FLOODGATE_REDIS_SHARDS = {}), got {}",
            st.shards.count(),
            new.buckets
        )));
    }
    let created = repo::create_sku(&st.pg, &new).await?;
    // Also after a 409: a repeat heals a crash between the commit and this call, and is
    // a no-op otherwise.
    let row = repo::sku(&st.pg, &new.sku)
        .await?
        .ok_or_else(|| anyhow::anyhow!("SKU {} vanished after it was written", new.sku))?;
    let initial = Reference::parse(repo::INITIAL_REFERENCE).expect("a valid reference");
    let initial_stock = repo::receipt_qty(&st.pg, &new.sku, &initial)
        .await?
        .unwrap_or(new.initial_stock);
    // The row's count, not the request's: a repeat with another count heals the first.
    fredis::buckets::open_buckets(
        &mut st.redis.clone(),
        &st.shards,
        &new.sku,
        row.buckets as usize,
        i64::from(row.per_user_limit),
    )
    .await
    .map_err(|e| anyhow::Error::new(e).context("opening a new SKU's buckets in Redis"))?;
    let mut redis = st.redis.clone();
    let token = receive_token(&new.sku, repo::INITIAL_REFERENCE);
    fredis::apply_stock(
        &mut redis,
        st.shards.for_sku(&new.sku),
        &StockChange {
            sku: &new.sku,
            units: initial_stock,
            token: &token,
            per_user_limit: Some(i64::from(row.per_user_limit)),
            user: None,
        },
    )
    .await
    .map_err(|e| anyhow::Error::new(e).context("loading a new SKU into Redis"))?;
    if !created {
        return Err(ApiError::SkuExists {
            sku: new.sku.to_string(),
        });
    }
    let available = stock::available(st, &new.sku).await?;
    Ok(SkuView { row, available })
}

pub async fn get(st: &AppState, sku: &str) -> Result<SkuView, ApiError> {
    let sku = parse_sku(sku)?;
    let row = repo::sku(&st.pg, &sku)
        .await?
        .ok_or_else(|| ApiError::SkuNotFound {
            sku: sku.to_string(),
        })?;
    let available = stock::available(st, &sku).await?;
    Ok(SkuView { row, available })
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Received {
    pub sku: String,
    pub on_hand: i64,
    pub available: i64,
}

pub async fn receive(
    st: &AppState,
    sku: &str,
    body: &Map<String, Value>,
) -> Result<Received, ApiError> {
    let sku = parse_sku(sku)?;
    let f = Fields(body);
    let qty = f.int("qty", 1, MAX_RECEIVE)?;
    let reference = Reference::parse(f.str("reference")?)
        .map_err(|e| ApiError::InvalidRequest(format!("reference: {e}")))?;
    let on_hand = repo::receive(&st.pg, &sku, qty, &reference)
        .await?
        .ok_or_else(|| ApiError::SkuNotFound {
            sku: sku.to_string(),
        })?;
    // The units of the first receipt with this reference, applied to Redis once.
    let first_qty = repo::receipt_qty(&st.pg, &sku, &reference)
        .await?
        .unwrap_or(qty);
    let mut redis = st.redis.clone();
    let token = receive_token(&sku, reference.as_str());
    let available = fredis::apply_stock(
        &mut redis,
        st.shards.for_sku(&sku),
        &StockChange {
            sku: &sku,
            units: first_qty,
            token: &token,
            per_user_limit: None,
            user: None,
        },
    )
    .await
    .map_err(|e| anyhow::Error::new(e).context("applying a receipt to Redis"))?;
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
    let limit = match limit {
        None => 50,
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=500).contains(l))
            .ok_or_else(|| ApiError::InvalidRequest("limit: must be an integer 1..=500".into()))?,
    };
    let before = match cursor {
        None | Some("") => None,
        Some(c) => Some(c.parse::<i64>().ok().filter(|c| *c > 0).ok_or_else(|| {
            ApiError::InvalidRequest("cursor: not a cursor this API returned".into())
        })?),
    };
    if repo::sku(&st.pg, &sku).await?.is_none() {
        return Err(ApiError::SkuNotFound {
            sku: sku.to_string(),
        });
    }
    let mut movements = repo::movements(&st.pg, &sku, limit + 1, before).await?;
    let next_cursor = if movements.len() as i64 > limit {
        movements.truncate(limit as usize);
        movements.last().map(|m| m.id.clone())
    } else {
        None
    };
    Ok(MovementsPage {
        movements,
        next_cursor,
    })
}
