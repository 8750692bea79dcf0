//! Bundles: a SKU sold as a fixed set of other SKUs (API.md "v1 additions", Catalog;
//! docs/design/bundles-waitlist.md).
//!
//! A bundle has no stock of its own. An order's lines are turned into its **held lines**
//! ([`held_lines`]) before anything is reserved: each bundle line becomes its components'
//! units (line qty x component qty), summed with the order's own lines of the same SKUs,
//! plus one *limit line* of the bundle itself ([`HeldLine::bundle`]), which counts
//! against the bundle's own per-user limit and holds no stock. Every script that gives
//! units back skips the stock of a limit line and keeps its holding change, so one held
//! line list serves the reserve, release, reaper, claim and settle alike.

use crate::domain::{Invalid, OrderLine, Sku};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Components a bundle has at least and at most, and units of one component in it.
pub const MIN_COMPONENTS: usize = 2;
pub const MAX_COMPONENTS: usize = 20;
pub const MAX_COMPONENT_QTY: i64 = 1000;

/// A bundle's components: 2-20 distinct SKUs, 1..=1000 units each, in SKU order.
/// In JSON (the intake message): `[["sku", qty], ...]`, checked when read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<(Sku, i64)>", into = "Vec<(Sku, i64)>")]
pub struct BundleDef(Vec<(Sku, i64)>);

impl TryFrom<Vec<(Sku, i64)>> for BundleDef {
    type Error = Invalid;
    fn try_from(v: Vec<(Sku, i64)>) -> Result<Self, Invalid> {
        Self::new(v)
    }
}

impl From<BundleDef> for Vec<(Sku, i64)> {
    fn from(d: BundleDef) -> Self {
        d.0
    }
}

impl BundleDef {
    pub fn new(mut components: Vec<(Sku, i64)>) -> Result<Self, Invalid> {
        if !(MIN_COMPONENTS..=MAX_COMPONENTS).contains(&components.len()) {
            return Err(Invalid(format!(
                "components: a bundle has {MIN_COMPONENTS}-{MAX_COMPONENTS} components, got {}",
                components.len()
            )));
        }
        components.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = components.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Invalid(format!(
                "components: SKU {} appears twice; put the quantity on one component",
                w[0].0
            )));
        }
        if let Some((sku, q)) = components
            .iter()
            .find(|(_, q)| !(1..=MAX_COMPONENT_QTY).contains(q))
        {
            return Err(Invalid(format!(
                "components: qty of {sku} must be 1..={MAX_COMPONENT_QTY}, got {q}"
            )));
        }
        Ok(Self(components))
    }

    pub fn components(&self) -> &[(Sku, i64)] {
        &self.0
    }

    /// The Redis field of a bundle (`bundles` hash): `sku:qty,sku:qty,...` (a SKU id has
    /// no `:` or `,`).
    pub fn field(&self) -> String {
        let parts: Vec<String> = self.0.iter().map(|(s, q)| format!("{s}:{q}")).collect();
        parts.join(",")
    }

    pub fn parse_field(field: &str) -> Result<Self, Invalid> {
        let components = field
            .split(',')
            .map(|c| {
                let (sku, qty) = c
                    .split_once(':')
                    .ok_or_else(|| Invalid(format!("not a bundle component: {c:?}")))?;
                let qty = qty
                    .parse::<i64>()
                    .map_err(|_| Invalid(format!("not a bundle component: {c:?}")))?;
                Ok((Sku::parse(sku)?, qty))
            })
            .collect::<Result<Vec<_>, Invalid>>()?;
        Self::new(components)
    }

    /// Bundles available from the components' levels: `min(floor(level / qty))`, never
    /// below 0; None when a component's level is unknown.
    pub fn available(&self, level: impl Fn(&Sku) -> Option<i64>) -> Option<i64> {
        self.0
            .iter()
            .map(|(s, q)| level(s).map(|l| l.max(0) / q))
            .min()
            .flatten()
    }
}

/// The bundles an order names, by bundle SKU.
pub type Bundles = BTreeMap<Sku, BundleDef>;

/// One line as Redis holds it for an order: units of a SKU, or a bundle's limit line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLine {
    pub sku: Sku,
    /// Up to 50 lines x 1000 x 1000 units: more than one order line may hold.
    pub qty: i64,
    /// A bundle's limit line: counts the user's holding of the bundle, holds no stock.
    #[serde(default, rename = "b", skip_serializing_if = "std::ops::Not::not")]
    pub bundle: bool,
}

impl From<&OrderLine> for HeldLine {
    fn from(l: &OrderLine) -> Self {
        Self {
            sku: l.sku.clone(),
            qty: l.qty.get(),
            bundle: false,
        }
    }
}

/// The held lines of an order (see the module): in the order's order, each bundle's
/// limit line where its line was, each SKU once (its first place), its units summed.
/// An order without bundles: its own lines.
pub fn held_lines(lines: &[OrderLine], bundles: &Bundles) -> Vec<HeldLine> {
    let mut out: Vec<HeldLine> = Vec::with_capacity(lines.len());
    let add = |out: &mut Vec<HeldLine>, sku: &Sku, qty: i64| match out
        .iter_mut()
        .find(|h| !h.bundle && &h.sku == sku)
    {
        Some(h) => h.qty += qty,
        None => out.push(HeldLine {
            sku: sku.clone(),
            qty,
            bundle: false,
        }),
    };
    for l in lines {
        match bundles.get(&l.sku) {
            Some(def) => {
                out.push(HeldLine {
                    sku: l.sku.clone(),
                    qty: l.qty.get(),
                    bundle: true,
                });
                for (c, q) in def.components() {
                    add(&mut out, c, l.qty.get() * q);
                }
            }
            None => add(&mut out, &l.sku, l.qty.get()),
        }
    }
    out
}

/// The stock units of held lines (limit lines left out), one entry per SKU.
pub fn units(held: &[HeldLine]) -> impl Iterator<Item = &HeldLine> {
    held.iter().filter(|h| !h.bundle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Quantity;

    fn sku(s: &str) -> Sku {
        Sku::parse(s).unwrap()
    }
    fn line(s: &str, q: i64) -> OrderLine {
        OrderLine {
            sku: sku(s),
            qty: Quantity::try_from(q).unwrap(),
        }
    }

    #[test]
    fn a_bundle_line_becomes_its_components_summed_with_the_orders_own() {
        let mut bundles = Bundles::new();
        bundles.insert(
            sku("kit"),
            BundleDef::new(vec![(sku("cam"), 1), (sku("card"), 2)]).unwrap(),
        );
        let held = held_lines(&[line("card", 1), line("kit", 3), line("bag", 1)], &bundles);
        let got: Vec<(&str, i64, bool)> = held
            .iter()
            .map(|h| (h.sku.as_str(), h.qty, h.bundle))
            .collect();
        assert_eq!(
            got,
            [
                ("card", 7, false),
                ("kit", 3, true),
                ("cam", 3, false),
                ("bag", 1, false)
            ]
        );
        assert_eq!(units(&held).count(), 3);
        let plain = held_lines(&[line("a", 2)], &bundles);
        assert_eq!(plain, [HeldLine::from(&line("a", 2))]);
        // The limit line is marked in JSON, a unit line is the order line's shape.
        assert_eq!(
            serde_json::to_string(&held[..2]).unwrap(),
            r#"[{"sku":"card","qty":7},{"sku":"kit","qty":3,"b":true}]"#
        );
    }

    #[test]
    fn definitions_are_checked_and_read_back() {
        let def = BundleDef::new(vec![(sku("b"), 2), (sku("a"), 1)]).unwrap();
        assert_eq!(def.field(), "a:1,b:2");
        assert_eq!(BundleDef::parse_field("a:1,b:2").unwrap(), def);
        assert!(BundleDef::new(vec![(sku("a"), 1)]).is_err());
        assert!(BundleDef::new(vec![(sku("a"), 1), (sku("a"), 2)]).is_err());
        assert!(BundleDef::new(vec![(sku("a"), 0), (sku("b"), 1)]).is_err());
        assert!(BundleDef::new(vec![(sku("a"), 1001), (sku("b"), 1)]).is_err());
        assert!(BundleDef::parse_field("a:1").is_err());
        assert!(BundleDef::parse_field("a:x,b:1").is_err());
        assert_eq!(
            def.available(|s| Some(if s.as_str() == "a" { 5 } else { 7 })),
            Some(3)
        );
        assert_eq!(def.available(|_| Some(-4)), Some(0));
        assert_eq!(def.available(|s| (s.as_str() == "a").then_some(9)), None);
    }
}
