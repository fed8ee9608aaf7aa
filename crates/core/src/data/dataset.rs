//! Processed datasets at the TransUNet resolution `S` (SPEC §3.6–§3.8).
//!
//! Images are decoded once and cached as u8 at their original size; `get(index, epoch)` converts to f32 `[0,1]`,
//! applies the training augmentation (if enabled) at the original size and resizes to `S×S` (bilinear ac=false for
//! the image, nearest for the mask).
use super::pixels::{decode_png, to_gray, Gray};
use super::resize::{bilinear_taps, nearest_index, resize_bilinear, resize_nearest};
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
                    format!(
                        "mask size {}x{} differs from its image ({}x{}, WxH)",
                        g.width, g.height, img.width, img.height
                    ),
                ));
            }
            for v in g.data.iter_mut() {
                *v = (*v > 127) as u8;
            }
            g
        }
        None => Gray::zeros(img.width, img.height),
    };
    Ok(Decoded {
        image: img,
        mask: m,
    })
}

/// Converts a decoded pair to an S×S sample, optionally augmenting first (SPEC §3.6–§3.8).
///
/// The result equals "u8/255 → rotate → flip → resize" at the original size (see [`to_sample_reference`]), but the
/// augmented image is only evaluated at the source pixels the S×S resampling reads (≤ 2S rows × 2S columns for the
/// image, S×S points for the mask), which makes the loader several times cheaper on large images.
pub fn to_sample(d: &Decoded, s: usize, aug: Option<&AugmentParams>) -> (Vec<f32>, Vec<f32>) {
    let (h, w) = (d.image.height, d.image.width);
    let img = &d.image.data;
    let msk = &d.mask.data;
    let rot = aug
        .and_then(|p| p.rotation_deg)
        .map(|deg| transforms::Rotation::new(deg, h, w));
    let flip = aug.is_some_and(|p| p.hflip);
    let fx = |x: usize| if flip { w - 1 - x } else { x };
    // Image: bilinear taps, needed rows/columns, compact grid of augmented values.
    let ty = bilinear_taps(h, s, false);
    let tx = bilinear_taps(w, s, false);
    let compact = |taps: &[(usize, usize, f32, f32)], n: usize| {
        let mut pos = vec![usize::MAX; n];
        let mut need = Vec::new();
        for &(a, b, _, _) in taps {
            for i in [a, b] {
                if pos[i] == usize::MAX {
                    pos[i] = need.len();
                    need.push(i);
                }
            }
        }
        (need, pos)
    };
    let (need_y, pos_y) = compact(&ty, h);
    let (need_x, pos_x) = compact(&tx, w);
    let nc = need_x.len();
    let mut grid = vec![0f32; need_y.len() * nc];
    for (r, &y) in need_y.iter().enumerate() {
        let row = &mut grid[r * nc..(r + 1) * nc];
        match &rot {
            Some(rt) => {
                for (o, &x) in row.iter_mut().zip(&need_x) {
                    *o = rt.bilinear_at(fx(x), y, |i| img[i] as f32 / 255.0);
                }
            }
            None => {
                for (o, &x) in row.iter_mut().zip(&need_x) {
                    *o = img[y * w + fx(x)] as f32 / 255.0;
                }
            }
        }
    }
    let mut img_s = vec![0f32; s * s];
    for (oy, &(y0, y1, wy0, wy1)) in ty.iter().enumerate() {
        let r0 = &grid[pos_y[y0] * nc..(pos_y[y0] + 1) * nc];
        let r1 = &grid[pos_y[y1] * nc..(pos_y[y1] + 1) * nc];
        for (o, &(x0, x1, wx0, wx1)) in img_s[oy * s..(oy + 1) * s].iter_mut().zip(&tx) {
            let (c0, c1) = (pos_x[x0], pos_x[x1]);
            *o = wy0 * (wx0 * r0[c0] + wx1 * r0[c1]) + wy1 * (wx0 * r1[c0] + wx1 * r1[c1]);
        }
    }
    // Mask: nearest indices, augmented on the fly.
    let ny = nearest_index(h, s);
    let nx = nearest_index(w, s);
    let mut mask_s = Vec::with_capacity(s * s);
    for &y in &ny {
        for &x in &nx {
            let v = match &rot {
                Some(rt) => rt.nearest_at(fx(x), y).map(|i| msk[i]).unwrap_or(0),
                None => msk[y * w + fx(x)],
            };
            mask_s.push(v as f32);
        }
    }
    (img_s, mask_s)
}

/// Straightforward reference of [`to_sample`]: full-size u8/255, augmentation, then the §3.7 resizes.
pub fn to_sample_reference(
    d: &Decoded,
    s: usize,
    aug: Option<&AugmentParams>,
) -> (Vec<f32>, Vec<f32>) {
    let (h, w) = (d.image.height, d.image.width);
    let mut img: Vec<f32> = d.image.data.iter().map(|&v| v as f32 / 255.0).collect();
    let mut mask = d.mask.data.clone();
    if let Some(p) = aug {
        transforms::apply(p, &mut img, &mut mask, h, w);
    }
    let img_s = resize_bilinear(&img, h, w, s, s, false);
    let mask_s: Vec<f32> = resize_nearest(&mask, h, w, s, s)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    (img_s, mask_s)
}

/// The S-resolution sample used by evaluation, inference and the SAM path (SPEC §7.1 takes the S image):
/// no augmentation; `mask` may be `None` (inference without ground truth → zero mask).
pub fn load_sample_s(image: &Path, mask: Option<&Path>, s: usize) -> Result<Sample> {
    let d = decode_pair(image, mask)?;
    let (img, m) = to_sample(&d, s, None);
    let name = image
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
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
        Ok(Self {
            entries,
            cache,
            img_size,
            augment_seed: None,
            use_cache: true,
        })
    }

    /// Opens `split` of each dataset under `root` (the processed root), concatenated in the given order
    /// (SPEC §3.5.2, §3.9). Folds are read from each dataset's `splits.json`, never recomputed.
    pub fn open<S: AsRef<str>>(
        root: &Path,
        datasets: &[S],
        split: Split,
        img_size: usize,
    ) -> Result<Self> {
        if datasets.is_empty() {
            return Err(Error::Arg("no dataset given".into()));
        }
        let mut entries = Vec::new();
        for ds in datasets {
            let ds = ds.as_ref();
            let dir = root.join(ds);
            let sp_path = dir.join("splits.json");
            if !sp_path.is_file() {
                return Err(Error::file(
                    &sp_path,
                    format!("dataset {ds} is not prepared (run `ultrarefiner prepare datasets`)"),
                ));
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
        let e = self.entries.get(index).ok_or_else(|| {
            Error::Arg(format!(
                "sample index {index} out of range (len {})",
                self.entries.len()
            ))
        })?;
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

    /// Sample `index` with explicit augmentation parameters (`None`: none), whatever the dataset's setting.
    pub fn make(&self, index: usize, aug: Option<AugmentParams>) -> Result<Sample> {
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
        let aug = self
            .augment_seed
            .map(|seed| AugmentParams::draw(seed, epoch, index as u64));
        self.make(index, aug)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_sample_path_equals_reference() {
        let (h, w) = (37usize, 53usize);
        let image = Gray::new(
            w,
            h,
            (0..h * w).map(|i| ((i * 37 + i / 7) % 256) as u8).collect(),
        );
        let mask = Gray::new(
            w,
            h,
            (0..h * w)
                .map(|i| ((i % w) > 10 && (i / w) > 8 && (i / w) < 30) as u8)
                .collect(),
        );
        let d = Decoded { image, mask };
        let cases = [
            None,
            Some(AugmentParams {
                rotation_deg: None,
                hflip: true,
            }),
            Some(AugmentParams {
                rotation_deg: Some(13.7),
                hflip: false,
            }),
            Some(AugmentParams {
                rotation_deg: Some(-19.2),
                hflip: true,
            }),
        ];
        for s in [16usize, 24, 64, 96] {
            for a in &cases {
                let fast = to_sample(&d, s, a.as_ref());
                let slow = to_sample_reference(&d, s, a.as_ref());
                assert_eq!(fast.0, slow.0, "image, S = {s}, {a:?}");
                assert_eq!(fast.1, slow.1, "mask, S = {s}, {a:?}");
            }
        }
    }
}
