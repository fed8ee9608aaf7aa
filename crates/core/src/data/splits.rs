//! Train/test split, K folds and `splits.json` (SPEC §3.5).
use super::mt19937::Mt19937;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Sorts sample names in code-point order of `<name>.png` (the extension takes part in the comparison, §3.5.2).
pub fn sort_names(names: &mut [String]) {
    names.sort_by_cached_key(|n| format!("{n}.png"));
}

/// §3.5.1: `items` must already be sorted; returns `(train, test)` in shuffled order.
/// `split_idx = ⌊n·(1 − test_ratio)⌋` in f64.
pub fn test_split<T: Clone>(items: &[T], test_ratio: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let mut v = items.to_vec();
    Mt19937::from_seed(seed).shuffle(&mut v);
    let n = v.len();
    let split_idx = ((n as f64) * (1.0 - test_ratio))
        .floor()
        .clamp(0.0, n as f64) as usize;
    let test = v.split_off(split_idx);
    (v, test)
}

/// One fold as indices into the sorted training list: `train` and `val` in the shuffled order of §3.5.2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoldIdx {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
}

/// §3.5.2: K folds over `0..n` with a fresh generator seeded with `seed`. The last fold takes the remainder.
pub fn kfold_indices(n: usize, k: usize, seed: u64) -> Vec<FoldIdx> {
    let mut idx: Vec<usize> = (0..n).collect();
    Mt19937::from_seed(seed).shuffle(&mut idx);
    let fs = n.checked_div(k).unwrap_or(0);
    (0..k)
        .map(|i| {
            let lo = i * fs;
            let hi = if i + 1 == k { n } else { (i + 1) * fs };
            let val = idx[lo..hi].to_vec();
            let mut train = idx[..lo].to_vec();
            train.extend_from_slice(&idx[hi..]);
            FoldIdx { train, val }
        })
        .collect()
}

/// A fold of `splits.json` (sample names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fold {
    pub train: Vec<String>,
    pub val: Vec<String>,
}

/// Excluded samples, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Excluded {
    #[serde(default)]
    pub blank: Vec<String>,
    #[serde(default)]
    pub normal: Vec<String>,
    #[serde(default)]
    pub missing_mask: Vec<String>,
    #[serde(default)]
    pub size_mismatch: Vec<String>,
    /// Files skipped under `--skip-bad` (corrupt, undecodable, …): `"<path>: <problem>"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bad: Vec<String>,
}

/// `processed/<DS>/splits.json` (SPEC §3.5.3). Authoritative for training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitsFile {
    pub format_version: u32,
    pub dataset: String,
    pub seed: u64,
    pub test_ratio: f64,
    pub n_splits: usize,
    pub train: Vec<String>,
    pub test: Vec<String>,
    pub folds: Vec<Fold>,
    #[serde(default)]
    pub excluded: Excluded,
    #[serde(default)]
    pub source_sha256: BTreeMap<String, String>,
    /// Digest of the raw input (file names + contents) and the split options; lets `prepare` skip an up-to-date
    /// dataset. Absent in user-written files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_digest: Option<String>,
}

impl SplitsFile {
    /// Builds the split of one dataset from its included sample names (any order).
    /// `test_only` (UDIAT) puts everything in `test` and writes no folds.
    pub fn build(
        dataset: &str,
        names: &[String],
        test_only: bool,
        test_ratio: f64,
        n_splits: usize,
        seed: u64,
    ) -> Self {
        let mut items = names.to_vec();
        sort_names(&mut items);
        let (mut train, mut test) = if test_only {
            (Vec::new(), items)
        } else {
            test_split(&items, test_ratio, seed)
        };
        sort_names(&mut train);
        sort_names(&mut test);
        let folds = if test_only || train.is_empty() {
            Vec::new()
        } else {
            kfold_indices(train.len(), n_splits, seed)
                .into_iter()
                .map(|f| Fold {
                    train: f.train.iter().map(|&i| train[i].clone()).collect(),
                    val: f.val.iter().map(|&i| train[i].clone()).collect(),
                })
                .collect()
        };
        SplitsFile {
            format_version: 1,
            dataset: dataset.to_string(),
            seed,
            test_ratio,
            n_splits,
            train,
            test,
            folds,
            excluded: Excluded::default(),
            source_sha256: BTreeMap::new(),
            raw_digest: None,
        }
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("invalid splits.json: {e}")))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::msg(e.to_string()))?;
        super::write_atomic(path, text.as_bytes())
    }

    /// The fold `i`, or an error naming the file's fold count.
    pub fn fold(&self, i: usize) -> Result<&Fold> {
        self.folds.get(i).ok_or_else(|| {
            Error::Arg(format!(
                "dataset {} has {} folds in splits.json; fold {i} does not exist",
                self.dataset,
                self.folds.len()
            ))
        })
    }
}
