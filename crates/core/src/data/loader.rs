//! Batched data loader (SPEC §3.9): Fisher–Yates order from the project RNG `("shuffle", epoch)`, parallel decode and
//! transforms on a rayon pool, a prefetch thread keeping batches ready, batches assembled in index order (results do
//! not depend on the worker count). Batches are host (CPU) tensors; move them once with [`Batch::to_device`].
use super::dataset::{Dataset, Sample};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use rand::Rng;
use rayon::prelude::*;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderOptions {
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    /// Run seed (shuffle stream).
    pub seed: u64,
    /// Rayon pool size for decoding/transforms (`--num-workers`); None = rayon's global pool.
    pub num_workers: Option<usize>,
    /// Batches kept ready by the prefetch thread.
    pub prefetch: usize,
}

impl LoaderOptions {
    /// Training loader: shuffled, `drop_last = true`.
    pub fn train(batch_size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            shuffle: true,
            drop_last: true,
            seed,
            num_workers: None,
            prefetch: 2,
        }
    }
    /// Validation/test loader: dataset order, `drop_last = false`.
    pub fn eval(batch_size: usize) -> Self {
        Self {
            batch_size,
            shuffle: false,
            drop_last: false,
            seed: 0,
            num_workers: None,
            prefetch: 2,
        }
    }
    pub fn with_workers(mut self, n: usize) -> Self {
        self.num_workers = Some(n);
        self
    }
}

/// A batch of samples as host tensors.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `(B,1,S,S)` f32 in `[0,1]`.
    pub images: Tensor,
    /// `(B,S,S)` f32 in {0,1}.
    pub masks: Tensor,
    pub names: Vec<String>,
    pub datasets: Vec<String>,
    /// `(height, width)` per sample.
    pub original_sizes: Vec<(usize, usize)>,
    /// Dataset indices of the samples.
    pub indices: Vec<usize>,
}

impl Batch {
    /// Stacks samples (all of the same `S`) into host tensors.
    pub fn from_samples(samples: Vec<Sample>) -> Result<Self> {
        let b = samples.len();
        let s = samples
            .first()
            .map(|x| x.size)
            .ok_or_else(|| Error::msg("empty batch"))?;
        let mut img = Vec::with_capacity(b * s * s);
        let mut msk = Vec::with_capacity(b * s * s);
        let mut names = Vec::with_capacity(b);
        let mut datasets = Vec::with_capacity(b);
        let mut sizes = Vec::with_capacity(b);
        let mut indices = Vec::with_capacity(b);
        for x in samples {
            if x.size != s {
                return Err(Error::msg(format!(
                    "sample {} has size {} but the batch has {s}",
                    x.name, x.size
                )));
            }
            img.extend_from_slice(&x.image);
            msk.extend_from_slice(&x.mask);
            names.push(x.name);
            datasets.push(x.dataset);
            sizes.push(x.original_size);
            indices.push(x.index);
        }
        Ok(Batch {
            images: Tensor::from_vec(img, (b, 1, s, s), &Device::Cpu)?,
            masks: Tensor::from_vec(msk, (b, s, s), &Device::Cpu)?,
            names,
            datasets,
            original_sizes: sizes,
            indices,
        })
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Moves images and masks to `device` (one transfer per tensor).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Batch {
            images: self.images.to_device(device)?,
            masks: self.masks.to_device(device)?,
            ..self.clone()
        })
    }
}

/// Sample order of one epoch: Fisher–Yates over `0..len` with the project RNG `("shuffle", epoch)`, or identity.
pub fn epoch_order(len: usize, shuffle: bool, seed: u64, epoch: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..len).collect();
    if shuffle {
        let mut rng = crate::rng::stream_rng(seed, "shuffle", &[epoch]);
        for i in (1..len).rev() {
            let j = rng.gen_range(0..=i);
            idx.swap(i, j);
        }
    }
    idx
}

/// The loader: a dataset, options and a worker pool.
pub struct Loader {
    dataset: Arc<dyn Dataset>,
    opts: LoaderOptions,
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl Loader {
    pub fn new(dataset: Arc<dyn Dataset>, opts: LoaderOptions) -> Result<Self> {
        if opts.batch_size == 0 {
            return Err(Error::Arg("batch size must be positive".into()));
        }
        let pool = match opts.num_workers {
            Some(n) => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n.max(1))
                    .build()
                    .map_err(|e| Error::msg(format!("cannot build thread pool: {e}")))?,
            )),
            None => None,
        };
        Ok(Self {
            dataset,
            opts,
            pool,
        })
    }

    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    /// Number of batches per epoch.
    pub fn num_batches(&self) -> usize {
        let n = self.dataset.len();
        let b = self.opts.batch_size;
        if self.opts.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The batches of `epoch` as index lists.
    pub fn batch_indices(&self, epoch: u64) -> Vec<Vec<usize>> {
        let order = epoch_order(self.dataset.len(), self.opts.shuffle, self.opts.seed, epoch);
        let mut out: Vec<Vec<usize>> = order
            .chunks(self.opts.batch_size)
            .map(|c| c.to_vec())
            .collect();
        if self.opts.drop_last && out.last().is_some_and(|l| l.len() < self.opts.batch_size) {
            out.pop();
        }
        out
    }

    /// Builds one batch synchronously (parallel over its samples).
    pub fn load_batch(&self, indices: &[usize], epoch: u64) -> Result<Batch> {
        build_batch(&self.dataset, self.pool.as_deref(), indices, epoch)
    }

    /// Iterates the batches of `epoch`; a background thread prefetches `opts.prefetch` batches.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        let batches = self.batch_indices(epoch);
        let (tx, rx) = sync_channel::<Result<Batch>>(self.opts.prefetch.max(1));
        let ds = self.dataset.clone();
        let pool = self.pool.clone();
        let handle = std::thread::spawn(move || {
            for idx in batches {
                let b = build_batch(&ds, pool.as_deref(), &idx, epoch);
                let stop = b.is_err();
                if tx.send(b).is_err() || stop {
                    break;
                }
            }
        });
        EpochIter {
            rx: Some(rx),
            handle: Some(handle),
        }
    }
}

fn build_batch(
    ds: &Arc<dyn Dataset>,
    pool: Option<&rayon::ThreadPool>,
    idx: &[usize],
    epoch: u64,
) -> Result<Batch> {
    let work = || {
        idx.par_iter()
            .map(|&i| ds.get(i, epoch))
            .collect::<Result<Vec<Sample>>>()
    };
    let samples = match pool {
        Some(p) => p.install(work),
        None => work(),
    }?;
    Batch::from_samples(samples)
}

/// Iterator over one epoch's batches (prefetched in a background thread). Dropping it stops the thread.
pub struct EpochIter {
    rx: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        let r = self.rx.as_ref()?.recv().ok();
        if r.is_none() {
            self.rx = None;
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
        }
        r
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.rx = None; // unblocks the sender
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
