//! Workloads for the bench harness (SPEC §13.7): `loader-224` and `prepare-busi-sample`.
//!
//! Each workload is set up once (`new`) and then timed by calling `run` repeatedly.
use super::dataset::{Dataset, SegDataset, Split};
use super::loader::{Loader, LoaderOptions};
use super::phantom::{generate, PhantomOptions};
use super::prepare::{prepare_datasets, PrepareOptions};
use super::DatasetKind;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `loader-224`: one epoch of augmented S×S training batches (decode cache warm after the first run).
pub struct LoaderWorkload {
    loader: Loader,
    epoch: std::cell::Cell<u64>,
}

impl LoaderWorkload {
    /// Uses an existing processed root (`datasets`' whole train split, augmentation on).
    pub fn new<S: AsRef<str>>(
        processed_root: &Path,
        datasets: &[S],
        img_size: usize,
        batch_size: usize,
        num_workers: Option<usize>,
    ) -> Result<Self> {
        let ds = SegDataset::open(processed_root, datasets, Split::Train, img_size)?
            .with_augmentation(42);
        if ds.len() < batch_size {
            return Err(Error::Arg(format!(
                "loader bench needs at least {batch_size} samples, found {}",
                ds.len()
            )));
        }
        let mut opts = LoaderOptions::train(batch_size, 42);
        opts.num_workers = num_workers;
        Ok(Self {
            loader: Loader::new(Arc::new(ds), opts)?,
            epoch: std::cell::Cell::new(0),
        })
    }

    /// Self-contained set-up: generates a `count`-image phantom (paper sizes) under `work_dir` and prepares it.
    pub fn phantom(
        work_dir: &Path,
        count: usize,
        img_size: usize,
        batch_size: usize,
        num_workers: Option<usize>,
    ) -> Result<Self> {
        let raw = work_dir.join("raw");
        let processed = work_dir.join("processed");
        generate(&PhantomOptions {
            out: raw.join("PHANTOM"),
            count,
            seed: 7,
            num_workers,
            ..Default::default()
        })?;
        prepare_datasets(&PrepareOptions {
            raw_root: raw,
            output_root: processed.clone(),
            datasets: vec![DatasetKind::Phantom],
            verify: false,
            num_workers,
            ..Default::default()
        })?;
        Self::new(&processed, &["PHANTOM"], img_size, batch_size, num_workers)
    }

    /// Runs one epoch; returns the number of samples produced (items for `items_per_s`).
    pub fn run(&self) -> Result<usize> {
        let e = self.epoch.get();
        self.epoch.set(e + 1);
        let mut n = 0;
        for b in self.loader.epoch(e) {
            n += b?.len();
        }
        Ok(n)
    }
}

/// `prepare-busi-sample`: `prepare datasets` of the BUSI sample into a scratch output root (re-processed each run).
pub struct PrepareWorkload {
    pub opts: PrepareOptions,
}

impl PrepareWorkload {
    /// `raw_root` must contain `BUSI/` (e.g. `shared/data`); outputs go to `out_root`.
    pub fn new(raw_root: &Path, out_root: &Path, num_workers: Option<usize>) -> Self {
        Self {
            opts: PrepareOptions {
                raw_root: raw_root.to_path_buf(),
                output_root: out_root.to_path_buf(),
                datasets: vec![DatasetKind::Busi],
                overwrite: true,
                num_workers,
                ..Default::default()
            },
        }
    }

    /// The shared BUSI sample (`shared/data/BUSI`) into `out_root`.
    pub fn busi_sample(out_root: &Path, num_workers: Option<usize>) -> Result<Self> {
        let shared: PathBuf = crate::testing::shared_dir()?;
        Ok(Self::new(&shared.join("data"), out_root, num_workers))
    }

    /// Runs once; returns the number of images kept.
    pub fn run(&self) -> Result<usize> {
        let r = prepare_datasets(&self.opts)?;
        if !r.verify_ok() {
            return Err(Error::msg(format!("verification failed:\n{r}")));
        }
        Ok(r.datasets.iter().map(|d| d.kept).sum())
    }
}
