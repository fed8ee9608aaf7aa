//! Raw dataset layouts (SPEC §3.2): listing images and their mask files, and output naming.
use super::DatasetKind;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One raw sample: an image and its mask file(s) (several for BUSI multi-lesion images, merged by OR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSample {
    /// Output name without extension (unique within the dataset).
    pub name: String,
    pub image: PathBuf,
    pub masks: Vec<PathBuf>,
    /// Class folder where the layout has one (`benign`, `malignant`).
    pub category: Option<String>,
}

/// The result of listing one raw dataset folder.
#[derive(Debug, Clone, Default)]
pub struct RawListing {
    /// Images found (including `normal/`).
    pub found: usize,
    /// Samples with at least one mask, sorted by name.
    pub samples: Vec<RawSample>,
    /// BUSI/PHANTOM `normal/` images (output names).
    pub excluded_normal: Vec<String>,
    /// Images without a mask: `(output name, image path)`.
    pub missing_mask: Vec<(String, PathBuf)>,
    /// Non-fatal remarks (`.PNG` extensions, orphan masks, ignored files).
    pub warnings: Vec<String>,
}

/// BUSI output-name part: spaces → `_`, parentheses removed (`benign (1)` → `benign_1`).
pub fn busi_base(stem: &str) -> String {
    stem.replace(' ', "_").replace(['(', ')'], "")
}

struct PngFile {
    stem: String,
    path: PathBuf,
}

/// `*.png` files of a folder (sorted by file name); `.PNG` is accepted with a warning, other files are ignored.
fn list_pngs(dir: &Path, warnings: &mut Vec<String>) -> Result<Vec<PngFile>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let fname = entry.file_name().to_string_lossy().into_owned();
        if fname.starts_with('.') {
            continue;
        }
        if let Some(stem) = fname.strip_suffix(".png") {
            out.push(PngFile {
                stem: stem.to_string(),
                path,
            });
        } else if let Some(stem) = fname.strip_suffix(".PNG") {
            warnings.push(format!(
                "{}: upper-case .PNG extension accepted",
                path.display()
            ));
            out.push(PngFile {
                stem: stem.to_string(),
                path,
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Lists the raw layout of `kind` under `dir` (= `<raw-root>/<DS>`).
/// A folder without any image is an error (the message names the expected layout).
pub fn list_raw(kind: DatasetKind, dir: &Path) -> Result<RawListing> {
    if !dir.is_dir() {
        return Err(Error::file(
            dir,
            format!("dataset folder of {kind} does not exist"),
        ));
    }
    let mut l = RawListing::default();
    match kind {
        DatasetKind::Busi | DatasetKind::Phantom => list_busi(dir, &mut l)?,
        DatasetKind::Busbra => list_busbra(dir, &mut l)?,
        DatasetKind::Bus => list_pair(dir, "original", "GT", "bus_", None, &mut l)?,
        DatasetKind::Udiat => list_pair(dir, "original", "GT", "udiat_", None, &mut l)?,
        DatasetKind::BusUclm => list_pair(dir, "images", "masks", "bus_uclm_", None, &mut l)?,
        DatasetKind::BusUc => {
            if dir.join("All").join("images").is_dir() {
                list_pair(&dir.join("All"), "images", "masks", "bus_uc_", None, &mut l)?;
            } else {
                for class in ["Benign", "Malignant"] {
                    let d = dir.join(class);
                    if d.join("images").is_dir() {
                        let lower = class.to_ascii_lowercase();
                        list_pair(
                            &d,
                            "images",
                            "masks",
                            &format!("bus_uc_{lower}_"),
                            Some(&lower),
                            &mut l,
                        )?;
                    }
                }
            }
        }
    }
    if l.found == 0 {
        return Err(Error::file(
            dir,
            format!("no images found for {kind}: {}", expected_layout(kind)),
        ));
    }
    // Unique output names within a dataset.
    let mut seen: BTreeMap<&str, &Path> = BTreeMap::new();
    for s in &l.samples {
        if let Some(prev) = seen.insert(&s.name, &s.image) {
            return Err(Error::file(
                &s.image,
                format!(
                    "output name `{}` collides with {} (names must be unique within {kind})",
                    s.name,
                    prev.display()
                ),
            ));
        }
    }
    l.samples.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(l)
}

/// Human description of the expected raw layout (used in error messages and `--help`).
pub fn expected_layout(kind: DatasetKind) -> &'static str {
    match kind {
        DatasetKind::Busi | DatasetKind::Phantom => {
            "expected {benign,malignant,normal}/<base>.png with <base>_mask.png (and optional <base>_mask_1..9.png)"
        }
        DatasetKind::Busbra => "expected Images/bus_<id>.png with Masks/mask_<id>.png",
        DatasetKind::Bus | DatasetKind::Udiat => "expected original/<f>.png with GT/<f>.png",
        DatasetKind::BusUc => "expected All/images/<f>.png with All/masks/<f>.png, or {Benign,Malignant}/{images,masks}/<f>.png",
        DatasetKind::BusUclm => "expected images/<f>.png with masks/<f>.png",
    }
}

fn find_mask(dir: &Path, stem: &str) -> Option<PathBuf> {
    let p = dir.join(format!("{stem}.png"));
    if p.is_file() {
        return Some(p);
    }
    let p = dir.join(format!("{stem}.PNG"));
    p.is_file().then_some(p)
}

/// Returns `(base, k)` for a BUSI mask stem `<base>_mask` (k = 0) or `<base>_mask_<k>` (k = 1..9).
fn busi_mask_stem(stem: &str) -> Option<(&str, u32)> {
    if let Some(base) = stem.strip_suffix("_mask") {
        return Some((base, 0));
    }
    let (head, tail) = stem.rsplit_once("_mask_")?;
    let k: u32 = tail.parse().ok()?;
    (1..=9).contains(&k).then_some((head, k))
}

fn list_busi(dir: &Path, l: &mut RawListing) -> Result<()> {
    for class in ["benign", "malignant", "normal"] {
        let d = dir.join(class);
        if !d.is_dir() {
            continue;
        }
        let files = list_pngs(&d, &mut l.warnings)?;
        let mut masks: BTreeMap<String, Vec<(u32, PathBuf)>> = BTreeMap::new();
        let mut images = Vec::new();
        for f in files {
            if let Some((base, k)) = busi_mask_stem(&f.stem) {
                masks.entry(base.to_string()).or_default().push((k, f.path));
            } else if f.stem.contains("_mask") {
                l.warnings.push(format!("{}: not a recognised mask name (<base>_mask.png or <base>_mask_1..9.png); ignored", f.path.display()));
            } else {
                images.push(f);
            }
        }
        for img in &images {
            l.found += 1;
            let name = format!("{class}_{}", busi_base(&img.stem));
            if class == "normal" {
                l.excluded_normal.push(name);
                continue;
            }
            match masks.remove(&img.stem) {
                Some(mut m) => {
                    m.sort();
                    l.samples.push(RawSample {
                        name,
                        image: img.path.clone(),
                        masks: m.into_iter().map(|(_, p)| p).collect(),
                        category: Some(class.to_string()),
                    });
                }
                None => l.missing_mask.push((name, img.path.clone())),
            }
        }
        if class != "normal" {
            for (_, m) in masks {
                for (_, p) in m {
                    l.warnings
                        .push(format!("{}: mask without an image; ignored", p.display()));
                }
            }
        }
    }
    Ok(())
}

fn list_busbra(dir: &Path, l: &mut RawListing) -> Result<()> {
    let (idir, mdir) = (dir.join("Images"), dir.join("Masks"));
    if !idir.is_dir() {
        return Ok(());
    }
    for f in list_pngs(&idir, &mut l.warnings)? {
        let Some(id) = f.stem.strip_prefix("bus_") else {
            l.warnings.push(format!(
                "{}: BUSBRA image names must start with `bus_`; ignored",
                f.path.display()
            ));
            continue;
        };
        l.found += 1;
        let name = format!("busbra_{id}");
        match find_mask(&mdir, &format!("mask_{id}")) {
            Some(m) => l.samples.push(RawSample {
                name,
                image: f.path,
                masks: vec![m],
                category: None,
            }),
            None => l.missing_mask.push((name, f.path)),
        }
    }
    Ok(())
}

fn list_pair(
    dir: &Path,
    images: &str,
    masks: &str,
    prefix: &str,
    category: Option<&str>,
    l: &mut RawListing,
) -> Result<()> {
    let (idir, mdir) = (dir.join(images), dir.join(masks));
    if !idir.is_dir() {
        return Ok(());
    }
    for f in list_pngs(&idir, &mut l.warnings)? {
        l.found += 1;
        let name = format!("{prefix}{}", f.stem);
        match find_mask(&mdir, &f.stem) {
            Some(m) => l.samples.push(RawSample {
                name,
                image: f.path,
                masks: vec![m],
                category: category.map(str::to_string),
            }),
            None => l.missing_mask.push((name, f.path)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn busi_names() {
        assert_eq!(
            format!("benign_{}", busi_base("benign (1)")),
            "benign_benign_1"
        );
        assert_eq!(busi_mask_stem("benign (1)_mask"), Some(("benign (1)", 0)));
        assert_eq!(busi_mask_stem("benign (1)_mask_1"), Some(("benign (1)", 1)));
        assert_eq!(busi_mask_stem("benign (1)"), None);
    }
}
