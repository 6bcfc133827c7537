//! Sale scenarios: one TOML format (documented in `scenarios/README.md`),
//! one parser, read by `fsctl seed`, `storm` and `demo` with `--scenario`.

use crate::exit::Failure;
use flashsale_engine::ledger::NewProduct;
use serde::Deserialize;
use std::path::Path;

pub const DEFAULT_MAX_PER_ORDER: i32 = 10;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The catalog: one entry per product or per range of products.
    #[serde(default)]
    pub products: Vec<ProductSpec>,
    /// The buy storm (read by `fsctl storm` and `fsctl demo`).
    #[serde(default)]
    pub storm: Option<StormSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductSpec {
    /// One product id...
    pub id: Option<i64>,
    /// ...or a range, `"1-50"`.
    pub ids: Option<String>,
    /// Name (a range appends ` #<id>`); default `product <id>`.
    pub name: Option<String>,
    pub stock: i32,
    pub max_per_order: Option<i32>,
    pub per_user_limit: Option<i32>,
    /// Seconds a booked order is held for payment (none: final at once).
    pub hold_seconds: Option<i32>,
}

/// The storm a scenario describes; every field is a default for the flag
/// of the same name.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StormSpec {
    pub requests: Option<u64>,
    pub duration: Option<String>,
    pub concurrency: Option<u64>,
    pub rate: Option<f64>,
    pub product: Option<i64>,
    pub products: Option<i64>,
    pub skew: Option<String>,
    pub users: Option<u64>,
    pub quantity: Option<String>,
    pub duplicate_ratio: Option<f64>,
    pub invalid_ratio: Option<f64>,
    /// `"uuid"` (the default) or `"sequential"`, as `--keys`.
    pub keys: Option<String>,
    /// HS256 secret to sign each buyer's token with, as `--jwt-secret`
    /// (a test deployment's: a scenario file is no place for a real one).
    pub jwt_secret: Option<String>,
    /// Ramps, `"10s:500"` each.
    #[serde(default)]
    pub stages: Vec<String>,
    #[serde(default)]
    pub thresholds: Vec<String>,
    pub drain_timeout: Option<String>,
    /// As `--pay-ratio`.
    pub pay_ratio: Option<f64>,
    /// As `--pay-delay`: `"2s"`.
    pub pay_delay: Option<String>,
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Self, Failure> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::usage(format!("cannot read scenario {}: {e}", path.display())))?;
        let scenario: Scenario = toml::from_str(&text)
            .map_err(|e| Failure::usage(format!("scenario {}: {e}", path.display())))?;
        scenario.catalog()?;
        Ok(scenario)
    }

    /// The products the scenario seeds, validated.
    pub fn catalog(&self) -> Result<Vec<NewProduct>, Failure> {
        let mut out = Vec::new();
        for spec in &self.products {
            let ids = match (&spec.id, &spec.ids) {
                (Some(id), None) => *id..=*id,
                (None, Some(range)) => parse_range(range)?,
                _ => {
                    return Err(Failure::usage(
                        "each [[products]] needs exactly one of id or ids",
                    ));
                }
            };
            let single = spec.id.is_some();
            for id in ids {
                let name = match &spec.name {
                    Some(n) if single => n.clone(),
                    Some(n) => format!("{n} #{id}"),
                    None => format!("product {id}"),
                };
                out.push(validated(NewProduct {
                    id,
                    name,
                    stock: spec.stock,
                    max_per_order: spec.max_per_order.unwrap_or(DEFAULT_MAX_PER_ORDER),
                    per_user_limit: spec.per_user_limit,
                    hold_seconds: spec.hold_seconds,
                })?);
            }
        }
        Ok(out)
    }
}

fn parse_range(range: &str) -> Result<std::ops::RangeInclusive<i64>, Failure> {
    let bad = || {
        Failure::usage(format!(
            "ids {range:?}: expected \"FIRST-LAST\" with 1 <= FIRST <= LAST"
        ))
    };
    let (a, b) = range.split_once('-').ok_or_else(bad)?;
    let (a, b): (i64, i64) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a < 1 || b < a {
        return Err(bad());
    }
    Ok(a..=b)
}

/// The contract's bounds on a product: the same for flags and scenarios.
pub fn validated(p: NewProduct) -> Result<NewProduct, Failure> {
    if p.id < 1 {
        return Err(Failure::usage(format!(
            "product id {} must be at least 1",
            p.id
        )));
    }
    if p.stock < 0 {
        return Err(Failure::usage(format!(
            "product {}: stock {} must be 0 or more",
            p.id, p.stock
        )));
    }
    if p.max_per_order < 1 {
        return Err(Failure::usage(format!(
            "product {}: max-per-order {} must be at least 1",
            p.id, p.max_per_order
        )));
    }
    if p.per_user_limit.is_some_and(|l| l < 1) {
        return Err(Failure::usage(format!(
            "product {}: per-user-limit must be at least 1",
            p.id
        )));
    }
    if p.hold_seconds.is_some_and(|s| s < 1) {
        return Err(Failure::usage(format!(
            "product {}: hold-seconds must be at least 1",
            p.id
        )));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_products_and_ranges() {
        let s: Scenario = toml::from_str(
            r#"
            name = "t"
            [[products]]
            id = 1
            name = "Hot"
            stock = 100
            per_user_limit = 2
            [[products]]
            ids = "2-4"
            stock = 5
            [storm]
            requests = 10
            thresholds = ["p99<250ms"]
            "#,
        )
        .expect("valid scenario");
        let c = s.catalog().expect("valid catalog");
        assert_eq!(c.len(), 4);
        assert_eq!(c[0].name, "Hot");
        assert_eq!(c[0].per_user_limit, Some(2));
        assert_eq!(c[3].id, 4);
        assert_eq!(c[3].max_per_order, DEFAULT_MAX_PER_ORDER);
        assert_eq!(s.storm.expect("storm").requests, Some(10));
    }

    #[test]
    fn refuses_bad_values() {
        for bad in [
            "name='t'\n[[products]]\nid=1\nstock=-1",
            "name='t'\n[[products]]\nid=0\nstock=1",
            "name='t'\n[[products]]\nid=1\nstock=1\nmax_per_order=0",
            "name='t'\n[[products]]\nids='5-2'\nstock=1",
            "name='t'\n[[products]]\nstock=1",
        ] {
            let s: Scenario = toml::from_str(bad).expect("parses");
            assert!(s.catalog().is_err(), "{bad}");
        }
        assert!(toml::from_str::<Scenario>("name='t'\ntypo=1").is_err());
    }
}

#[cfg(test)]
mod shipped {
    use super::Scenario;

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).expect("scenarios/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path)
                    .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.message));
                seen += 1;
            }
        }
        assert!(seen >= 7, "{seen} scenarios");
    }
}
