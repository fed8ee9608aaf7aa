//! Processed datasets at the TransUNet resolution `S` (SPEC §3.6–§3.8).
//!
//! Images are decoded once and cached as u8 at their original size; `get(index, epoch)` converts to f32 `[0,1]`,
//! applies the training augmentation (if enabled) at the original size and resizes to `S×S` (bilinear ac=false for
//! the image, nearest for the mask).
use super::pixels::{decode_png, to_gray, Gray};
use super::resize::{resize_bilinear, resize_nearest};
use super::splits::SplitsFile;
use super::transforms::{self, AugmentParams};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// One sample at `S×S`.
#[derive(Debug, Clone)]
pub struct Sample {
    /// `(1,S,S)` row-major image in `[0,1]`.
    pub image: Vec<f32>,
    /// `(S,S)` mask in {0,1} (all zero when the sample has no mask).
    pub mask: Vec<f32>,
    pub name: String,
    pub dataset: String,
    /// `(height, width)` of the processed image.
    pub original_size: (usize, usize),
    /// `S`.
    pub size: usize,
    /// Position of the sample in its dataset.
    pub index: usize,
}

/// A dataset of S×S samples (SPEC §3.9).
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `index` for epoch `epoch` (the epoch only matters for augmentation).
    fn get(&self, index: usize, epoch: u64) -> Result<Sample>;
}

/// Which part of a processed dataset to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The whole training split.
    Train,
    /// The test split.
    Test,
    /// Training part of fold `k`.
    FoldTrain(usize),
    /// Validation part of fold `k`.
    FoldVal(usize),
}

/// One file pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub dataset: String,
    pub name: String,
    pub image: PathBuf,
    pub mask: Option<PathBuf>,
}

/// Decoded sample at the original size: grey u8 image, binary {0,1} mask.
#[derive(Debug)]
pub struct Decoded {
    pub image: Gray,
    pub mask: Gray,
}

/// Reads one processed (or any) image/mask pair: image → 8-bit grey, mask → `value > 127` (any colour channel for
/// non-grey masks). A missing mask gives an all-zero mask. Size mismatch is an error naming the mask file.
pub fn decode_pair(image: &Path, mask: Option<&Path>) -> Result<Decoded> {
    let img = to_gray(&decode_png(image)?)?;
    let m = match mask {
        Some(mp) => {
            let mut g = to_gray(&decode_png(mp)?)?;
            if (g.width, g.height) != (img.width, img.height) {
                return Err(Error::file(
                    mp,
                    format!("mask size {}x{} differs from its image ({}x{}, WxH)", g.width, g.height, img.width, img.height),
                ));
            }
            for v in g.data.iter_mut() {
                *v = (*v > 127) as u8;
            }
            g
        }
        None => Gray::zeros(img.width, img.height),
    };
    Ok(Decoded { image: img, mask: m })
}

/// Converts a decoded pair to an S×S sample, optionally augmenting first (SPEC §3.6–§3.8).
pub fn to_sample(d: &Decoded, s: usize, aug: Option<&AugmentParams>) -> (Vec<f32>, Vec<f32>) {
    let (h, w) = (d.image.height, d.image.width);
    let mut img: Vec<f32> = d.image.data.iter().map(|&v| v as f32 / 255.0).collect();
    let mut mask = d.mask.data.clone();
    if let Some(p) = aug {
        transforms::apply(p, &mut img, &mut mask, h, w);
    }
    let img_s = resize_bilinear(&img, h, w, s, s, false);
    let mask_s: Vec<f32> = resize_nearest(&mask, h, w, s, s).into_iter().map(|v| v as f32).collect();
    (img_s, mask_s)
}

/// The S-resolution sample used by evaluation, inference and the SAM path (SPEC §7.1 takes the S image):
/// no augmentation; `mask` may be `None` (inference without ground truth → zero mask).
pub fn load_sample_s(image: &Path, mask: Option<&Path>, s: usize) -> Result<Sample> {
    let d = decode_pair(image, mask)?;
    let (img, m) = to_sample(&d, s, None);
    let name = image.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(Sample {
        image: img,
        mask: m,
        name,
        dataset: String::new(),
        original_size: (d.image.height, d.image.width),
        size: s,
        index: 0,
    })
}

/// A processed dataset (or a concatenation of several) at `S×S`.
pub struct SegDataset {
    entries: Vec<Entry>,
    cache: Vec<OnceLock<Arc<Decoded>>>,
    img_size: usize,
    augment_seed: Option<u64>,
    use_cache: bool,
}

impl SegDataset {
    /// Wraps explicit entries.
    pub fn from_entries(entries: Vec<Entry>, img_size: usize) -> Result<Self> {
        if img_size == 0 {
            return Err(Error::Arg("image size must be positive".into()));
        }
        let cache = (0..entries.len()).map(|_| OnceLock::new()).collect();
        Ok(Self { entries, cache, img_size, augment_seed: None, use_cache: true })
    }

    /// Opens `split` of each dataset under `root` (the processed root), concatenated in the given order
    /// (SPEC §3.5.2, §3.9). Folds are read from each dataset's `splits.json`, never recomputed.
    pub fn open<S: AsRef<str>>(root: &Path, datasets: &[S], split: Split, img_size: usize) -> Result<Self> {
        if datasets.is_empty() {
            return Err(Error::Arg("no dataset given".into()));
        }
        let mut entries = Vec::new();
        for ds in datasets {
            let ds = ds.as_ref();
            let dir = root.join(ds);
            let sp_path = dir.join("splits.json");
            if !sp_path.is_file() {
                return Err(Error::file(&sp_path, format!("dataset {ds} is not prepared (run `ultrarefiner prepare datasets`)")));
            }
            let sp = SplitsFile::read(&sp_path)?;
            let (part, names): (&str, &[String]) = match split {
                Split::Train => ("train", &sp.train),
                Split::Test => ("test", &sp.test),
                Split::FoldTrain(k) => ("train", &sp.fold(k)?.train),
                Split::FoldVal(k) => ("train", &sp.fold(k)?.val),
            };
            for n in names {
                entries.push(Entry {
                    dataset: ds.to_string(),
                    name: n.clone(),
                    image: dir.join(part).join("images").join(format!("{n}.png")),
                    mask: Some(dir.join(part).join("masks").join(format!("{n}.png"))),
                });
            }
        }
        Self::from_entries(entries, img_size)
    }

    /// Enables the training augmentation of SPEC §3.8 with the run seed.
    pub fn with_augmentation(mut self, seed: u64) -> Self {
        self.augment_seed = Some(seed);
        self
    }

    /// Disables the in-memory u8 cache (each `get` decodes again).
    pub fn without_cache(mut self) -> Self {
        self.use_cache = false;
        self
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
    pub fn img_size(&self) -> usize {
        self.img_size
    }

    /// The decoded original-size pair (cached).
    pub fn decoded(&self, index: usize) -> Result<Arc<Decoded>> {
        let e = self
            .entries
            .get(index)
            .ok_or_else(|| Error::Arg(format!("sample index {index} out of range (len {})", self.entries.len())))?;
        if let Some(d) = self.cache[index].get() {
            return Ok(d.clone());
        }
        let d = Arc::new(decode_pair(&e.image, e.mask.as_deref())?);
        if self.use_cache {
            let _ = self.cache[index].set(d.clone());
        }
        Ok(d)
    }

    /// Sample without augmentation, whatever the dataset's setting (validation/test/SAM path).
    pub fn get_eval(&self, index: usize) -> Result<Sample> {
        self.make(index, None)
    }

    fn make(&self, index: usize, aug: Option<AugmentParams>) -> Result<Sample> {
        let d = self.decoded(index)?;
        let (image, mask) = to_sample(&d, self.img_size, aug.as_ref());
        let e = &self.entries[index];
        Ok(Sample {
            image,
            mask,
            name: e.name.clone(),
            dataset: e.dataset.clone(),
            original_size: (d.image.height, d.image.width),
            size: self.img_size,
            index,
        })
    }
}

impl std::fmt::Debug for SegDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegDataset")
            .field("len", &self.entries.len())
            .field("img_size", &self.img_size)
            .field("augment_seed", &self.augment_seed)
            .finish()
    }
}

impl Dataset for SegDataset {
    fn len(&self) -> usize {
        self.entries.len()
    }
    fn get(&self, index: usize, epoch: u64) -> Result<Sample> {
        let aug = self.augment_seed.map(|seed| AugmentParams::draw(seed, epoch, index as u64));
        self.make(index, aug)
    }
}
