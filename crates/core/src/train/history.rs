//! Per-epoch history rows (kept in every sidecar, regenerating `metrics.csv` and `progress.png`; SPEC §11.1.4–5).
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// `v` rounded to 15 significant decimal digits (non-finite values unchanged).
///
/// Every float written to a sidecar/summary and every `metrics.csv` cell goes through this rounding: a decimal of at
/// most 15 significant digits is read back *exactly* by serde_json's default (non-`float_roundtrip`) parser, which
/// can be 1 ulp off for 17-digit values. With it, history restored on resume regenerates byte-identical
/// `metrics.csv` and sidecars. The rounding is idempotent.
/// Below 1e-8 fewer digits are kept so that the decimal exponent of the integer significand stays within ±22 (the
/// exactly representable powers of ten the parser divides by).
pub fn round15(v: f64) -> f64 {
    if !v.is_finite() || v == 0.0 {
        return v;
    }
    let e10 = v.abs().log10().floor() as i32;
    let digits = (23 + e10).clamp(1, 15) as usize;
    format!("{v:.*e}", digits - 1).parse().unwrap_or(v)
}

/// serde `serialize_with` for `f64` fields: [`round15`].
pub fn ser_f64_15<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(round15(*v))
    } else {
        s.serialize_none()
    }
}

/// serde `serialize_with` for `Option<f64>` fields: [`round15`]; non-finite values become `null`.
pub fn ser_opt_f64_15<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(x) if x.is_finite() => s.serialize_some(&round15(*x)),
        _ => s.serialize_none(),
    }
}

/// An ordered list of named numbers, serialised as a JSON object whose key order is preserved on reading.
/// Values are written rounded by [`round15`]; non-finite values are written as `null` and read back as NaN.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Named(pub Vec<(String, f64)>);

impl Named {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
    /// Sets `name` (appending it if new).
    pub fn set(&mut self, name: &str, v: f64) {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some(e) => e.1 = v,
            None => self.0.push((name.to_string(), v)),
        }
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| n.as_str())
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<(String, f64)>> for Named {
    fn from(v: Vec<(String, f64)>) -> Self {
        Named(v)
    }
}

impl Serialize for Named {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            if v.is_finite() {
                m.serialize_entry(k, &round15(*v))?;
            } else {
                m.serialize_entry(k, &Option::<f64>::None)?;
            }
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Named {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Named;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of numbers")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Named, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, Option<f64>>()? {
                    out.push((k, v.unwrap_or(f64::NAN)));
                }
                Ok(Named(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// One epoch of a run. `None` marks a value not computed this epoch (e.g. no validation with `--val-every > 1`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryRow {
    /// 1-based epoch number.
    pub epoch: u64,
    /// Wall time of the epoch in seconds.
    #[serde(serialize_with = "ser_f64_15")]
    pub time_s: f64,
    /// Learning rate per parameter group (group order) — CSV columns `lr_<group>`.
    pub lr: Named,
    #[serde(serialize_with = "ser_opt_f64_15")]
    pub train_loss: Option<f64>,
    /// Loss components (mean over batches) — CSV columns `train_<name>` (e.g. `bce`, `dice_loss`, `iou_loss`,
    /// `change`; `coarse`, `refined`, `anchor`).
    #[serde(default)]
    pub components: Named,
    #[serde(serialize_with = "ser_opt_f64_15")]
    pub train_dice: Option<f64>,
    #[serde(serialize_with = "ser_opt_f64_15")]
    pub train_iou: Option<f64>,
    #[serde(serialize_with = "ser_opt_f64_15")]
    pub val_loss: Option<f64>,
    #[serde(serialize_with = "ser_opt_f64_15")]
    pub val_dice: Option<f64>,
    #[serde(serialize_with = "ser_opt_f64_15")]
    pub val_iou: Option<f64>,
    #[serde(serialize_with = "ser_opt_f64_15")]
    pub val_precision: Option<f64>,
    #[serde(serialize_with = "ser_opt_f64_15")]
    pub val_recall: Option<f64>,
    #[serde(serialize_with = "ser_opt_f64_15")]
    pub val_accuracy: Option<f64>,
    #[serde(serialize_with = "ser_opt_f64_15")]
    pub val_specificity: Option<f64>,
    /// Per-image mean validation Dice (§10.1), distinct from the pooled `val_dice`.
    #[serde(serialize_with = "ser_opt_f64_15")]
    pub val_dice_img: Option<f64>,
    /// Phase-specific columns under their CSV names (Phase 2: `val_coarse_dice`, `val_improvement`; Phase 3:
    /// `val_coarse_dice`, `val_coarse_iou`, `baseline_dice`).
    #[serde(default)]
    pub extra: Named,
    pub is_best: bool,
    /// Free-text note (e.g. hyper-parameters changed on resume with `--allow-config-change`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl HistoryRow {
    /// The fixed validation columns in CSV order.
    pub fn val_columns(&self) -> [(&'static str, Option<f64>); 8] {
        [
            ("val_loss", self.val_loss),
            ("val_dice", self.val_dice),
            ("val_iou", self.val_iou),
            ("val_precision", self.val_precision),
            ("val_recall", self.val_recall),
            ("val_accuracy", self.val_accuracy),
            ("val_specificity", self.val_specificity),
            ("val_dice_img", self.val_dice_img),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round15_survives_serde_json_exactly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut raw_mismatch = 0;
        for i in 0..20000 {
            let v: f64 = match i % 5 {
                0 => rng.gen::<f64>(),
                1 => rng.gen::<f64>() * 1e-4,
                2 => rng.gen::<f64>() * 1e-12,
                3 => -rng.gen::<f64>() * 1e7,
                _ => rng.gen::<f64>() * 1e3,
            };
            let r = round15(v);
            assert_eq!(round15(r), r, "idempotent");
            let back: f64 = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            assert_eq!(back.to_bits(), r.to_bits(), "{v} -> {r} -> {back}");
            let raw: f64 = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
            if raw.to_bits() != v.to_bits() {
                raw_mismatch += 1;
            }
            let tol = if v.abs() >= 1e-8 { 1e-14 } else { 1e-5 };
            assert!((r - v).abs() <= tol * v.abs(), "{v} vs {r}");
        }
        // documents why the rounding exists (serde_json without `float_roundtrip`)
        eprintln!("raw f64 JSON round-trip mismatches: {raw_mismatch}/20000");
    }

    #[test]
    fn row_json_round_trip_is_exact_after_rounding() {
        let r = HistoryRow {
            epoch: 3,
            time_s: 12.345678901234567,
            val_dice: Some(0.42000000000000004),
            components: Named(vec![("x".into(), 0.1 + 0.2)]),
            ..Default::default()
        };
        let j = serde_json::to_string(&r).unwrap();
        let back: HistoryRow = serde_json::from_str(&j).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), j);
        assert_eq!(back.val_dice, Some(round15(0.42000000000000004)));
    }
}
