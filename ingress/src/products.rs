//! The catalog above SKUs (API.md "v1 additions", Catalog): categories (a tree) and
//! products with options, whose SKUs each take one value of every option. Writes are a
//! manager's or an admin's, audited; reads are public. Nothing here is on the order path:
//! an order names SKUs, and a SKU's stock, limit and window live where they did.

use crate::{
    catalog::Fields,
    error::{ApiError, pg},
    repo::rfc3339,
    state::AppState,
    stock,
};
use anyhow::Context;
use floodgate_common::{
    audit::{self, Actor, Entry},
    domain::Sku,
};
use serde::Serialize;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};

/// The most options a product may have, values an option may have, and characters in an
/// option's name or value.
pub const MAX_OPTIONS: usize = 5;
pub const MAX_VALUES: usize = 50;
pub const MAX_OPTION_CHARS: usize = 50;
/// The most characters in a product's description.
pub const MAX_DESCRIPTION: usize = 2000;
/// The most categories, how deep they nest, and SKUs per product: bounds on what one
/// anonymous `GET /v1/categories` or `GET /v1/products` page costs.
pub const MAX_CATEGORIES: i64 = 1000;
pub const MAX_DEPTH: i64 = 8;
pub const MAX_SKUS_PER_PRODUCT: i64 = 100;

/// A category or product id: the rules of a SKU id (1-64 of `[A-Za-z0-9._-]`).
fn id(f: &Fields<'_>, name: &str) -> Result<String, ApiError> {
    let s = f.str(name)?;
    Sku::parse(s)
        .map(|_| s.to_owned())
        .map_err(|e| ApiError::InvalidRequest(format!("{name}: {e}")))
}

/// An optional id (absent or null: None).
fn opt_id(f: &Fields<'_>, name: &str) -> Result<Option<String>, ApiError> {
    match f.0.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => id(f, name).map(Some),
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Category {
    pub id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
}

/// `POST /v1/categories`.
pub async fn create_category(
    st: &AppState,
    actor: &Actor,
    body: &Map<String, Value>,
) -> Result<Category, ApiError> {
    let f = Fields(body);
    let c = Category {
        id: id(&f, "id")?,
        name: f.text("name")?,
        parent_id: opt_id(&f, "parent_id")?,
    };
    if c.parent_id.as_deref() == Some(c.id.as_str()) {
        return Err(ApiError::UnknownCategory { id: c.id });
    }
    let mut db = st.pg.get().await.context("PostgreSQL connection")?;
    let tx = db.transaction().await.map_err(pg)?;
    // One at a time: the caps below count what exists.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('floodgate.categories'), hashtext(current_schema()))",
        &[],
    )
    .await
    .map_err(pg)?;
    let count: i64 = tx
        .query_one("SELECT count(*) FROM categories", &[])
        .await
        .map_err(pg)?
        .get(0);
    if count >= MAX_CATEGORIES {
        return Err(ApiError::InvalidRequest(format!(
            "id: at most {MAX_CATEGORIES} categories"
        )));
    }
    if let Some(parent) = &c.parent_id {
        // The parent's depth (1 for a root); nothing deletes or moves a category.
        let depth: Option<i64> = tx
            .query_one(
                "WITH RECURSIVE up AS (
                   SELECT id, parent_id, 1 AS depth FROM categories WHERE id = $1
                   UNION ALL
                   SELECT c.id, c.parent_id, up.depth + 1 FROM categories c
                     JOIN up ON c.id = up.parent_id WHERE up.depth < 64)
                 SELECT max(depth)::bigint FROM up",
                &[parent],
            )
            .await
            .map_err(pg)?
            .get(0);
        match depth {
            None => return Err(ApiError::UnknownCategory { id: parent.clone() }),
            Some(d) if d >= MAX_DEPTH => {
                return Err(ApiError::InvalidRequest(format!(
                    "parent_id: categories nest at most {MAX_DEPTH} deep"
                )));
            }
            Some(_) => {}
        }
    }
    let inserted = tx
        .execute(
            "INSERT INTO categories (id, name, parent_id) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO NOTHING",
            &[&c.id, &c.name, &c.parent_id],
        )
        .await
        .map_err(pg)?;
    if inserted == 0 {
        return Err(ApiError::CategoryExists { id: c.id });
    }
    audit::append(
        &tx,
        actor,
        Entry {
            action: "category.create",
            target: format!("category:{}", c.id),
            before: None,
            after: Some(json!({"name": c.name, "parent_id": c.parent_id})),
        },
    )
    .await?;
    tx.commit().await.map_err(pg)?;
    Ok(c)
}

/// A category with its children, as `GET /v1/categories` nests them.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CategoryNode {
    pub id: String,
    pub name: String,
    #[schema(no_recursion)]
    pub children: Vec<CategoryNode>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CategoryTree {
    pub categories: Vec<CategoryNode>,
}

/// `GET /v1/categories`: every category, roots first, children under their parent, each
/// level sorted by name then id.
pub async fn categories(st: &AppState) -> Result<CategoryTree, ApiError> {
    let db = st.pg.get().await.context("PostgreSQL connection")?;
    let rows = db
        .query(
            "SELECT id, name, parent_id FROM categories ORDER BY name, id",
            &[],
        )
        .await
        .map_err(pg)?;
    let mut children: HashMap<Option<String>, Vec<(String, String)>> = HashMap::new();
    for r in &rows {
        children
            .entry(r.get("parent_id"))
            .or_default()
            .push((r.get("id"), r.get("name")));
    }
    fn build(
        parent: Option<String>,
        children: &mut HashMap<Option<String>, Vec<(String, String)>>,
    ) -> Vec<CategoryNode> {
        children
            .remove(&parent)
            .unwrap_or_default()
            .into_iter()
            .map(|(id, name)| CategoryNode {
                children: build(Some(id.clone()), children),
                id,
                name,
            })
            .collect()
    }
    Ok(CategoryTree {
        categories: build(None, &mut children),
    })
}

/// One option of a product and the values it may take.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ProductOption {
    pub name: String,
    pub values: Vec<String>,
}

/// An option's name or value: 1-50 characters once trimmed, no control character.
fn option_text(v: &Value, what: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::InvalidRequest(format!(
            "{what}: must be 1-{MAX_OPTION_CHARS} characters, no control characters"
        ))
    };
    let s = v.as_str().ok_or_else(bad)?.trim();
    if s.is_empty() || s.chars().count() > MAX_OPTION_CHARS || s.chars().any(char::is_control) {
        return Err(bad());
    }
    Ok(s.to_owned())
}

fn parse_options(v: Option<&Value>) -> Result<Vec<ProductOption>, ApiError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "options: must be a list of {\"name\",\"values\"}".into(),
            ));
        }
    };
    if list.len() > MAX_OPTIONS {
        return Err(ApiError::InvalidRequest(format!(
            "options: at most {MAX_OPTIONS}, got {}",
            list.len()
        )));
    }
    let mut out: Vec<ProductOption> = Vec::new();
    for (i, o) in list.iter().enumerate() {
        let Some(o) = o.as_object() else {
            return Err(ApiError::InvalidRequest(format!(
                "options[{i}]: must be an object {{\"name\",\"values\"}}"
            )));
        };
        if let Some(k) = o.keys().find(|k| *k != "name" && *k != "values") {
            return Err(ApiError::InvalidRequest(format!(
                "options[{i}].{k}: not a member of an option"
            )));
        }
        let name = option_text(
            o.get("name").unwrap_or(&Value::Null),
            &format!("options[{i}].name"),
        )?;
        if out.iter().any(|p| p.name == name) {
            return Err(ApiError::InvalidRequest(format!(
                "options[{i}].name: {name:?} twice"
            )));
        }
        let Some(values) = o.get("values").and_then(Value::as_array) else {
            return Err(ApiError::InvalidRequest(format!(
                "options[{i}].values: must be a list of 1-{MAX_VALUES} strings"
            )));
        };
        if values.is_empty() || values.len() > MAX_VALUES {
            return Err(ApiError::InvalidRequest(format!(
                "options[{i}].values: must be a list of 1-{MAX_VALUES} strings"
            )));
        }
        let mut vs: Vec<String> = Vec::new();
        for (j, v) in values.iter().enumerate() {
            let v = option_text(v, &format!("options[{i}].values[{j}]"))?;
            if vs.contains(&v) {
                return Err(ApiError::InvalidRequest(format!(
                    "options[{i}].values[{j}]: {v:?} twice"
                )));
            }
            vs.push(v);
        }
        out.push(ProductOption { name, values: vs });
    }
    Ok(out)
}

/// A product as the public reads show it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProductView {
    pub product_id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category_id: Option<String>,
    pub options: Vec<ProductOption>,
    pub skus: Vec<ProductSku>,
    #[schema(format = DateTime)]
    pub created_at: String,
}

/// One SKU of a product.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProductSku {
    pub sku: String,
    /// One value of each of the product's options.
    #[schema(value_type = Object)]
    pub options: BTreeMap<String, String>,
    pub price_cents: i64,
    pub available: i64,
}

/// `POST /v1/products`.
pub async fn create_product(
    st: &AppState,
    actor: &Actor,
    body: &Map<String, Value>,
) -> Result<ProductView, ApiError> {
    let f = Fields(body);
    let product_id = id(&f, "product_id")?;
    let name = f.text("name")?;
    let description = match body.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d))
            if d.chars().count() <= MAX_DESCRIPTION
                && !d.chars().any(|c| c.is_control() && c != '\n' && c != '\t') =>
        {
            Some(d.clone())
        }
        Some(_) => {
            return Err(ApiError::InvalidRequest(format!(
                "description: at most {MAX_DESCRIPTION} characters, no control characters but newlines and tabs"
            )));
        }
    };
    let category_id = opt_id(&f, "category_id")?;
    let options = parse_options(body.get("options"))?;
    let mut db = st.pg.get().await.context("PostgreSQL connection")?;
    let tx = db.transaction().await.map_err(pg)?;
    if let Some(c) = &category_id {
        let found = tx
            .query_opt("SELECT 1 FROM categories WHERE id = $1 FOR SHARE", &[c])
            .await
            .map_err(pg)?;
        if found.is_none() {
            return Err(ApiError::UnknownCategory { id: c.clone() });
        }
    }
    let options_json = serde_json::to_value(&options).context("options serialize")?;
    let row = tx
        .query_opt(
            "INSERT INTO products (id, name, description, category_id, options)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO NOTHING RETURNING created_at",
            &[
                &product_id,
                &name,
                &description,
                &category_id,
                &options_json,
            ],
        )
        .await
        .map_err(pg)?;
    let Some(row) = row else {
        return Err(ApiError::ProductExists { id: product_id });
    };
    audit::append(
        &tx,
        actor,
        Entry {
            action: "product.create",
            target: format!("product:{product_id}"),
            before: None,
            after: Some(json!({
                "name": name, "description": description,
                "category_id": category_id, "options": options_json,
            })),
        },
    )
    .await?;
    tx.commit().await.map_err(pg)?;
    Ok(ProductView {
        product_id,
        name,
        description,
        category_id,
        options,
        skus: Vec::new(),
        created_at: rfc3339(row.get(0)),
    })
}

/// A SKU's place in its product, checked against the product's options: one value of
/// each, each from its list. Returns the options as stored (an object).
pub async fn variant(
    db: &impl deadpool_postgres::GenericClient,
    product_id: Option<&str>,
    options: Option<&Value>,
) -> Result<Option<(String, Value)>, ApiError> {
    let Some(product_id) = product_id else {
        if options.is_some_and(|o| !o.is_null()) {
            return Err(ApiError::InvalidRequest(
                "options: only a SKU of a product (product_id) has options".into(),
            ));
        }
        return Ok(None);
    };
    if Sku::parse(product_id).is_err() {
        return Err(ApiError::UnknownProduct {
            id: product_id.to_owned(),
        });
    }
    let row = db
        .query_opt("SELECT options FROM products WHERE id = $1", &[&product_id])
        .await
        .map_err(pg)?
        .ok_or_else(|| ApiError::UnknownProduct {
            id: product_id.to_owned(),
        })?;

    let declared: Vec<ProductOption> =
        serde_json::from_value(row.get("options")).context("a product's options in PostgreSQL")?;
    let given = match options {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "options: must be an object, one value of each of the product's options".into(),
            ));
        }
    };
    for o in &declared {
        match given.get(&o.name) {
            Some(Value::String(v)) if o.values.contains(v) => {}
            Some(Value::String(v)) => {
                return Err(ApiError::InvalidRequest(format!(
                    "options.{}: {v:?} is not one of {:?}",
                    o.name, o.values
                )));
            }
            Some(_) => {
                return Err(ApiError::InvalidRequest(format!(
                    "options.{}: must be one of {:?}",
                    o.name, o.values
                )));
            }
            None => {
                return Err(ApiError::InvalidRequest(format!(
                    "options.{}: required (one of {:?})",
                    o.name, o.values
                )));
            }
        }
    }
    if let Some(k) = given
        .keys()
        .find(|k| !declared.iter().any(|o| &o.name == *k))
    {
        return Err(ApiError::InvalidRequest(format!(
            "options.{k}: product {product_id} has no such option"
        )));
    }
    Ok(Some((product_id.to_owned(), Value::Object(given))))
}

/// `GET /v1/products/{id}`.
pub async fn product(st: &AppState, product_id: &str) -> Result<ProductView, ApiError> {
    let not_found = || ApiError::ProductNotFound {
        id: product_id.to_owned(),
    };
    Sku::parse(product_id).map_err(|_| not_found())?;
    let mut page = products(st, Some(product_id), None, 1, None).await?;
    page.pop().map(|l| l.view).ok_or_else(not_found)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProductPage {
    pub products: Vec<ProductView>,
    pub next_cursor: Option<String>,
}

/// `GET /v1/products?category_id=&limit=&cursor=`: newest first; a category takes in
/// its subcategories.
pub async fn list(
    st: &AppState,
    category_id: Option<&str>,
    limit: Option<&str>,
    cursor: Option<&str>,
) -> Result<ProductPage, ApiError> {
    let limit = crate::catalog::page_limit(limit)?.min(100);
    let after = match cursor {
        None | Some("") => None,
        // The SKU list's cursor: `<micros>.<id>`, a product id following a SKU id's rules.
        Some(c) => Some(
            crate::repo::SkuCursor::parse(c)
                .map(|c| (c.micros, c.sku))
                .ok_or_else(|| {
                    ApiError::InvalidRequest("cursor: not a cursor this API returned".into())
                })?,
        ),
    };
    let category_id = match category_id {
        None | Some("") => None,
        Some(c) => {
            Sku::parse(c).map_err(|_| ApiError::UnknownCategory { id: c.to_owned() })?;
            Some(c)
        }
    };
    if let Some(c) = category_id {
        let db = st.pg.get().await.context("PostgreSQL connection")?;
        if db
            .query_opt("SELECT 1 FROM categories WHERE id = $1", &[&c])
            .await
            .map_err(pg)?
            .is_none()
        {
            return Err(ApiError::UnknownCategory { id: c.to_owned() });
        }
    }
    let (products, next_cursor) = crate::catalog::page(
        products(st, None, category_id, limit + 1, after).await?,
        limit,
        |p| p.cursor.clone(),
    );
    Ok(ProductPage {
        products: products.into_iter().map(|p| p.view).collect(),
        next_cursor,
    })
}

struct Listed {
    view: ProductView,
    cursor: String,
}

/// Products (one by id, or a page of a category's tree, newest first) with their SKUs
/// and each SKU's live availability.
async fn products(
    st: &AppState,
    one: Option<&str>,
    category: Option<&str>,
    limit: i64,
    after: Option<(i64, String)>,
) -> Result<Vec<Listed>, ApiError> {
    let db = st.pg.get().await.context("PostgreSQL connection")?;
    let (after_micros, after_id) = match &after {
        Some((m, id)) => (Some(*m), Some(id.as_str())),
        None => (None, None),
    };
    // The category's subtree first (at most MAX_CATEGORIES ids), so the page query is an
    // index range per category rather than a filter over every product.
    let tree: Option<Vec<String>> = match category {
        None => None,
        Some(c) => Some(
            db.query(
                "WITH RECURSIVE tree AS (
                   SELECT id FROM categories WHERE id = $1
                   UNION SELECT c.id FROM categories c JOIN tree t ON c.parent_id = t.id)
                 SELECT id FROM tree",
                &[&c],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect(),
        ),
    };
    let rows = db
        .query(
            "SELECT p.id, p.name, p.description, p.category_id, p.options, p.created_at,
                    (extract(epoch FROM p.created_at) * 1000000)::bigint AS micros
               FROM products p
              WHERE ($1::text IS NULL OR p.id = $1)
                AND ($2::text[] IS NULL OR p.category_id = ANY($2))
                AND ($3::bigint IS NULL
                     OR (p.created_at, p.id) < (timestamptz 'epoch' + $3 * interval '1 microsecond', $4::text))
              ORDER BY p.created_at DESC, p.id DESC LIMIT $5",
            &[&one, &tree, &after_micros, &after_id, &limit],
        )
        .await
        .map_err(pg)?;
    let ids: Vec<String> = rows.iter().map(|r| r.get("id")).collect();
    let sku_rows = db
        .query(
            "SELECT sku, product_id, options, price_cents FROM skus
              WHERE product_id = ANY($1) ORDER BY sku",
            &[&ids],
        )
        .await
        .map_err(pg)?;
    let skus: Vec<Sku> = sku_rows
        .iter()
        .filter_map(|r| Sku::parse(r.get::<_, String>("sku")).ok())
        .collect();
    let levels: HashMap<Sku, i64> = stock::levels(st, &skus).await?.into_iter().collect();
    let mut by_product: HashMap<String, Vec<ProductSku>> = HashMap::new();
    for r in &sku_rows {
        let sku: String = r.get("sku");
        let options: Option<Value> = r.get("options");
        let options: BTreeMap<String, String> = options
            .and_then(|o| serde_json::from_value(o).ok())
            .unwrap_or_default();
        let available = Sku::parse(sku.as_str())
            .ok()
            .and_then(|s| levels.get(&s).copied())
            .unwrap_or(0);
        by_product
            .entry(r.get("product_id"))
            .or_default()
            .push(ProductSku {
                sku,
                options,
                price_cents: r.get("price_cents"),
                available,
            });
    }
    rows.iter()
        .map(|r| {
            let id: String = r.get("id");
            let options: Vec<ProductOption> = serde_json::from_value(r.get("options"))
                .context("a product's options in PostgreSQL")?;
            Ok(Listed {
                cursor: format!("{}.{}", r.get::<_, i64>("micros"), id),
                view: ProductView {
                    skus: by_product.remove(&id).unwrap_or_default(),
                    product_id: id,
                    name: r.get("name"),
                    description: r.get("description"),
                    category_id: r.get("category_id"),
                    options,
                    created_at: rfc3339(r.get("created_at")),
                },
            })
        })
        .collect()
}
