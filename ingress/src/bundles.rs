//! The bundles this ingress learned from the reserve script.
//!
//! A bundle ([`floodgate_common::bundle`]) is reserved as its held lines, which need its
//! components. Its definition is fixed at creation, so it is remembered for good once
//! learned: an ingress sends a SKU it has not met as a plain line, and `reserve.lua`
//! answers `bundle` with the components (writing nothing) when it is one, like `moved`
//! for bucket counts. Only the first order of a bundle per ingress pays the second round
//! trip; only SKUs Redis holds as bundles are stored, so the map holds no more than the
//! catalogue's bundles, whatever SKUs requests name.

use floodgate_common::{
    bundle::{BundleDef, Bundles},
    domain::{OrderLine, Sku},
};
use std::{collections::HashMap, sync::RwLock};

#[derive(Debug, Default)]
pub struct KnownBundles {
    defs: RwLock<HashMap<Sku, BundleDef>>,
}

impl KnownBundles {
    /// The definitions of the bundles among `lines` that this ingress knows.
    pub fn of(&self, lines: &[OrderLine]) -> Bundles {
        let defs = self.defs.read().expect("bundles lock");
        if defs.is_empty() {
            return Bundles::new();
        }
        lines
            .iter()
            .filter_map(|l| Some((l.sku.clone(), defs.get(&l.sku)?.clone())))
            .collect()
    }

    /// The reserve script said `sku` is a bundle of `def`.
    pub fn learn(&self, sku: &str, def: BundleDef) {
        if let Ok(sku) = Sku::parse(sku) {
            self.defs.write().expect("bundles lock").insert(sku, def);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use floodgate_common::domain::Quantity;

    #[test]
    fn only_the_orders_known_bundles() {
        let k = KnownBundles::default();
        let line = |s: &str| OrderLine {
            sku: Sku::parse(s).unwrap(),
            qty: Quantity::try_from(1).unwrap(),
        };
        assert!(k.of(&[line("kit")]).is_empty());
        let def = BundleDef::parse_field("a:1,b:2").unwrap();
        k.learn("kit", def.clone());
        let got = k.of(&[line("kit"), line("a")]);
        assert_eq!(got.len(), 1);
        assert_eq!(got.get(&Sku::parse("kit").unwrap()), Some(&def));
    }
}
