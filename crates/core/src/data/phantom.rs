//! Synthetic breast-ultrasound "phantom" dataset (SPEC §4), written in the BUSI raw layout.
//!
//! Image `k` uses only the project RNG `("phantom", k)`, so the output is byte-identical for a seed and count
//! whatever the thread count. See [`render`] for the image model.
use super::grf::{curve, gaussian_field, randn, randn_vec};
use super::pixels::{encode_png, encode_png_indexed, Gray};
use super::write_atomic;
use crate::{Error, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;
use std::f64::consts::{PI, TAU};
use std::path::PathBuf;

/// Options of `prepare phantom`.
#[derive(Debug, Clone)]
pub struct PhantomOptions {
    /// Output folder (the BUSI-layout dataset root, e.g. `./dataset/raw/PHANTOM`).
    pub out: PathBuf,
    pub count: usize,
    pub seed: u64,
    /// Inclusive image height range.
    pub height_range: (usize, usize),
    /// Inclusive image width range.
    pub width_range: (usize, usize),
    /// Burn in caliper marks (probability 0.2 per image).
    pub annotations: bool,
    pub num_workers: Option<usize>,
}

impl Default for PhantomOptions {
    fn default() -> Self {
        Self {
            out: PathBuf::from("./dataset/raw/PHANTOM"),
            count: 120,
            seed: 7,
            height_range: (280, 400),
            width_range: (360, 520),
            annotations: true,
            num_workers: None,
        }
    }
}

impl PhantomOptions {
    /// Options from the `[phantom]` section of a preset (count and size ranges); the rest default.
    pub fn from_config(cfg: &crate::config::PhantomConfig, out: PathBuf, seed: u64) -> Self {
        Self {
            out,
            count: cfg.count,
            seed,
            height_range: (cfg.height_range[0], cfg.height_range[1]),
            width_range: (cfg.width_range[0], cfg.width_range[1]),
            ..Default::default()
        }
    }
}

/// Image class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PhantomClass {
    Benign,
    Malignant,
    Normal,
}

impl PhantomClass {
    pub fn name(self) -> &'static str {
        match self {
            PhantomClass::Benign => "benign",
            PhantomClass::Malignant => "malignant",
            PhantomClass::Normal => "normal",
        }
    }
}

/// Posterior acoustic feature of a lesion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Posterior {
    Enhancement,
    Shadow,
    None,
}

/// Metadata of one lesion (`phantom.json`).
#[derive(Debug, Clone, Serialize)]
pub struct LesionMeta {
    pub cx: f64,
    pub cy: f64,
    pub equivalent_radius: f64,
    pub area_px: usize,
    pub orientation_deg: f64,
    pub spiculated: bool,
    pub posterior: Posterior,
    /// Drawn radius `r` (before shape modulation).
    pub r: f64,
    pub tiny: bool,
}

/// Metadata of one image (`phantom.json`).
#[derive(Debug, Clone, Serialize)]
pub struct ImageMeta {
    pub file: String,
    pub class: PhantomClass,
    pub height: usize,
    pub width: usize,
    pub lesions: Vec<LesionMeta>,
    /// How the first mask file is stored: `grey`, `rgba` or `palette1`.
    pub mask_format: String,
    pub annotated: bool,
}

/// One rendered image, in memory.
pub struct PhantomImage {
    /// 8-bit grey image.
    pub image: Gray,
    /// One binary {0,1} mask per lesion (normal images: one all-zero mask).
    pub masks: Vec<Gray>,
    pub meta: ImageMeta,
    /// The speckle field `n` (statistics tests).
    pub speckle: Vec<f32>,
    /// Echogenicity `T` before speckle (statistics tests).
    pub tissue: Vec<f32>,
}

/// What `generate` wrote.
#[derive(Debug, Clone)]
pub struct PhantomReport {
    pub out: PathBuf,
    pub benign: usize,
    pub malignant: usize,
    pub normal: usize,
    pub lesions: usize,
    pub tiny_lesions: usize,
    pub second_masks: usize,
}

impl std::fmt::Display for PhantomReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "phantom: {} images in {} (benign {}, malignant {}, normal {}; {} lesions, {} tiny, {} second masks)",
            self.benign + self.malignant + self.normal,
            self.out.display(),
            self.benign,
            self.malignant,
            self.normal,
            self.lesions,
            self.tiny_lesions,
            self.second_masks
        )
    }
}

/// Class of each image index: exact allocation `round(0.5·count)` benign, `round(0.33·count)` malignant, rest normal,
/// shuffled with the stream `("phantom-classes")`.
pub fn class_list(count: usize, seed: u64) -> Vec<PhantomClass> {
    let nb = (0.5 * count as f64).round() as usize;
    let nm = ((0.33 * count as f64).round() as usize).min(count - nb.min(count));
    let mut v: Vec<PhantomClass> = (0..count)
        .map(|i| {
            if i < nb {
                PhantomClass::Benign
            } else if i < nb + nm {
                PhantomClass::Malignant
            } else {
                PhantomClass::Normal
            }
        })
        .collect();
    let mut rng = crate::rng::stream_rng(seed, "phantom-classes", &[]);
    for i in (1..v.len()).rev() {
        let j = rng.gen_range(0..=i);
        v.swap(i, j);
    }
    v
}

/// Generates the dataset into `opts.out` (BUSI layout + `phantom.json`). Files are written atomically.
pub fn generate(opts: &PhantomOptions) -> Result<PhantomReport> {
    if opts.count == 0 {
        return Err(Error::Arg("--count must be positive".into()));
    }
    let (h0, h1) = opts.height_range;
    let (w0, w1) = opts.width_range;
    if h0 > h1 || w0 > w1 || h0 < 32 || w0 < 32 {
        return Err(Error::Arg(format!(
            "phantom size ranges must be ordered and at least 32 px (got heights {h0}-{h1}, widths {w0}-{w1})"
        )));
    }
    let classes = class_list(opts.count, opts.seed);
    let mut numbers = vec![0usize; opts.count];
    let mut counters = [0usize; 3];
    for (k, c) in classes.iter().enumerate() {
        let ci = *c as usize;
        counters[ci] += 1;
        numbers[k] = counters[ci];
    }
    for c in ["benign", "malignant", "normal"] {
        let d = opts.out.join(c);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    let work = || -> Result<Vec<ImageMeta>> {
        (0..opts.count)
            .into_par_iter()
            .map(|k| {
                let img = render(opts, k, classes[k], numbers[k]);
                write_image(opts, &img)?;
                Ok(img.meta)
            })
            .collect()
    };
    let metas = match opts.num_workers {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build()
            .map_err(|e| Error::msg(format!("cannot build thread pool: {e}")))?
            .install(work)?,
        None => work()?,
    };
    let doc = serde_json::json!({
        "seed": opts.seed,
        "count": opts.count,
        "parameters": {
            "height_range": [h0, h1],
            "width_range": [w0, w1],
            "annotations": opts.annotations,
            "class_fractions": {"benign": 0.5, "malignant": 0.33},
            "tiny_probability": 0.15,
            "second_lesion_probability": 0.1,
            "alt_mask_format_probability": 0.1,
            "annotation_probability": 0.2,
            "spec": "SPEC §4.2",
        },
        "images": metas,
    });
    write_atomic(
        &opts.out.join("phantom.json"),
        serde_json::to_string_pretty(&doc)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let lesions: Vec<&LesionMeta> = metas.iter().flat_map(|m| m.lesions.iter()).collect();
    Ok(PhantomReport {
        out: opts.out.clone(),
        benign: classes
            .iter()
            .filter(|c| **c == PhantomClass::Benign)
            .count(),
        malignant: classes
            .iter()
            .filter(|c| **c == PhantomClass::Malignant)
            .count(),
        normal: classes
            .iter()
            .filter(|c| **c == PhantomClass::Normal)
            .count(),
        lesions: lesions.len(),
        tiny_lesions: lesions.iter().filter(|l| l.tiny).count(),
        second_masks: metas.iter().filter(|m| m.lesions.len() > 1).count(),
    })
}

fn write_image(opts: &PhantomOptions, img: &PhantomImage) -> Result<()> {
    let m = &img.meta;
    let dir = opts.out.join(m.class.name());
    let base = m.file.trim_end_matches(".png");
    let g = &img.image;
    let rgb: Vec<u8> = g.data.iter().flat_map(|&v| [v, v, v]).collect();
    let bytes = encode_png(&rgb, g.width, g.height, image::ExtendedColorType::Rgb8)?;
    write_atomic(&dir.join(&m.file), &bytes)?;
    for (i, mask) in img.masks.iter().enumerate() {
        let fname = if i == 0 {
            format!("{base}_mask.png")
        } else {
            format!("{base}_mask_{i}.png")
        };
        let fmt = if i == 0 {
            m.mask_format.as_str()
        } else {
            "grey"
        };
        let bytes = match fmt {
            "rgba" => {
                let px: Vec<u8> = mask
                    .data
                    .iter()
                    .flat_map(|&v| [v * 255, v * 255, v * 255, 255])
                    .collect();
                encode_png(
                    &px,
                    mask.width,
                    mask.height,
                    image::ExtendedColorType::Rgba8,
                )?
            }
            "palette1" => encode_png_indexed(
                mask.width,
                mask.height,
                1,
                Some(&[[0, 0, 0], [255, 255, 255]]),
                &mask.data,
            )?,
            _ => {
                let px: Vec<u8> = mask.data.iter().map(|&v| v * 255).collect();
                encode_png(&px, mask.width, mask.height, image::ExtendedColorType::L8)?
            }
        };
        write_atomic(&dir.join(fname), &bytes)?;
    }
    Ok(())
}

fn u(rng: &mut ChaCha8Rng, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.gen::<f64>()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn wrap_angle(a: f64) -> f64 {
    let mut a = a % TAU;
    if a > PI {
        a -= TAU;
    } else if a < -PI {
        a += TAU;
    }
    a
}

/// Separable Gaussian blur with clamped borders (kernel radius ⌈3σ⌉).
fn blur(v: &[f32], h: usize, w: usize, sy: f64, sx: f64) -> Vec<f32> {
    fn kernel(s: f64) -> Vec<f32> {
        let r = (3.0 * s).ceil() as i64;
        let k: Vec<f64> = (-r..=r)
            .map(|i| (-(i * i) as f64 / (2.0 * s * s)).exp())
            .collect();
        let sum: f64 = k.iter().sum();
        k.iter().map(|&x| (x / sum) as f32).collect()
    }
    let (ky, kx) = (kernel(sy), kernel(sx));
    let (ry, rx) = ((ky.len() / 2) as i64, (kx.len() / 2) as i64);
    let mut tmp = vec![0f32; h * w];
    for y in 0..h {
        let row = &v[y * w..(y + 1) * w];
        for x in 0..w {
            let mut s = 0f32;
            for (i, &kv) in kx.iter().enumerate() {
                let xx = (x as i64 + i as i64 - rx).clamp(0, w as i64 - 1) as usize;
                s += kv * row[xx];
            }
            tmp[y * w + x] = s;
        }
    }
    let mut out = vec![0f32; h * w];
    for y in 0..h {
        for (i, &kv) in ky.iter().enumerate() {
            let yy = (y as i64 + i as i64 - ry).clamp(0, h as i64 - 1) as usize;
            let src = &tmp[yy * w..(yy + 1) * w];
            let dst = &mut out[y * w..(y + 1) * w];
            for (d, s) in dst.iter_mut().zip(src) {
                *d += kv * s;
            }
        }
    }
    out
}

/// Exact 1-D squared distance transform (Felzenszwalb–Huttenlocher) of `f` (0 or ∞).
fn edt_1d(f: &[f64], out: &mut [f64]) {
    let n = f.len();
    let mut v = vec![0usize; n];
    let mut z = vec![0f64; n + 1];
    let mut k = 0usize;
    let mut first = None;
    for q in 0..n {
        if f[q].is_finite() {
            first = Some(q);
            break;
        }
    }
    let Some(q0) = first else {
        out.iter_mut().for_each(|o| *o = f64::INFINITY);
        return;
    };
    v[0] = q0;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    for q in q0 + 1..n {
        if !f[q].is_finite() {
            continue;
        }
        loop {
            let p = v[k];
            let s =
                ((f[q] + (q * q) as f64) - (f[p] + (p * p) as f64)) / (2.0 * (q as f64 - p as f64));
            if s <= z[k] && k > 0 {
                k -= 1;
            } else {
                k += 1;
                v[k] = q;
                z[k] = s;
                z[k + 1] = f64::INFINITY;
                break;
            }
        }
    }
    let mut k = 0;
    for q in 0..n {
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let p = v[k];
        out[q] = (q as f64 - p as f64).powi(2) + f[p];
    }
}

/// Euclidean distance from every pixel to the nearest pixel where `target(pixel)` is true.
fn edt(h: usize, w: usize, target: impl Fn(usize) -> bool) -> Vec<f64> {
    let mut g = vec![0f64; h * w];
    let mut col = vec![0f64; h];
    let mut colo = vec![0f64; h];
    for x in 0..w {
        for y in 0..h {
            col[y] = if target(y * w + x) {
                0.0
            } else {
                f64::INFINITY
            };
        }
        edt_1d(&col, &mut colo);
        for y in 0..h {
            g[y * w + x] = colo[y];
        }
    }
    let mut out = vec![0f64; h * w];
    for y in 0..h {
        edt_1d(&g[y * w..(y + 1) * w], &mut out[y * w..(y + 1) * w]);
    }
    out.iter_mut().for_each(|v| *v = v.sqrt());
    out
}

/// One lesion's shape.
struct Shape {
    cx: f64,
    cy: f64,
    psi: f64,
    a: f64,
    b: f64,
    harmonics: Vec<(f64, f64, f64)>, // (k, a_k, β_k)
    spicules: Vec<(f64, f64, f64)>,  // (θ_j, L_j, w_j)
}

impl Shape {
    fn rho(&self, theta: f64) -> f64 {
        let (s, c) = theta.sin_cos();
        let re = self.a * self.b / ((self.b * c).powi(2) + (self.a * s).powi(2)).sqrt();
        let modul: f64 = 1.0
            + self
                .harmonics
                .iter()
                .map(|&(k, ak, bk)| ak * (k * theta + bk).cos())
                .sum::<f64>();
        let spic: f64 = self
            .spicules
            .iter()
            .map(|&(tj, lj, wj)| lj * (1.0 - wrap_angle(theta - tj).abs() / wj).max(0.0))
            .sum();
        re * modul + spic
    }
    fn inside(&self, x: f64, y: f64) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let (s, c) = self.psi.sin_cos();
        // Coordinates in the frame rotated by ψ.
        let (u, v) = (c * dx + s * dy, -s * dx + c * dy);
        let d = (u * u + v * v).sqrt();
        d < self.rho(v.atan2(u))
    }
    fn max_extent(&self) -> f64 {
        self.a.max(self.b) * 1.6 + self.spicules.iter().map(|s| s.1).fold(0.0, f64::max) + 2.0
    }
}

fn draw_shape(rng: &mut ChaCha8Rng, malignant: bool, cx: f64, cy: f64, r: f64) -> Shape {
    if !malignant {
        let psi = u(rng, -20.0, 20.0).to_radians();
        let s = u(rng, 1.1, 1.6);
        let harmonics = (2..=4)
            .map(|k| (k as f64, u(rng, 0.0, 0.06), u(rng, 0.0, TAU)))
            .collect();
        Shape {
            cx,
            cy,
            psi,
            a: r * s,
            b: r / s,
            harmonics,
            spicules: Vec::new(),
        }
    } else {
        let psi = u(rng, 70.0, 110.0).to_radians();
        let s = u(rng, 1.0, 1.3);
        let harmonics = (2..=8)
            .map(|k| {
                (
                    k as f64,
                    u(rng, 0.0, 0.12) / ((k - 1) as f64).sqrt(),
                    u(rng, 0.0, TAU),
                )
            })
            .collect();
        let n = rng.gen_range(6..=14);
        let spicules = (0..n)
            .map(|_| (u(rng, 0.0, TAU), u(rng, 0.3, 0.9) * r, u(rng, 0.03, 0.08)))
            .collect();
        Shape {
            cx,
            cy,
            psi,
            a: r * s,
            b: r / s,
            harmonics,
            spicules,
        }
    }
}

fn rasterise(shape: &Shape, h: usize, w: usize) -> (Vec<u8>, usize) {
    let e = shape.max_extent();
    let (x0, x1) = (
        ((shape.cx - e).floor().max(0.0)) as usize,
        ((shape.cx + e).ceil().min(w as f64 - 1.0)) as usize,
    );
    let (y0, y1) = (
        ((shape.cy - e).floor().max(0.0)) as usize,
        ((shape.cy + e).ceil().min(h as f64 - 1.0)) as usize,
    );
    let mut m = vec![0u8; h * w];
    let mut n = 0;
    for y in y0..=y1 {
        for x in x0..=x1 {
            if shape.inside(x as f64, y as f64) {
                m[y * w + x] = 1;
                n += 1;
            }
        }
    }
    (m, n)
}

/// Renders image `k` of class `class` (numbered `number` within its class). Pure function of
/// `(opts.seed, k, class, number, sizes, annotations)`.
pub fn render(opts: &PhantomOptions, k: usize, class: PhantomClass, number: usize) -> PhantomImage {
    let mut rng = crate::rng::stream_rng(opts.seed, "phantom", &[k as u64]);
    let rng = &mut rng;
    // 1. Size.
    let h = rng.gen_range(opts.height_range.0..=opts.height_range.1);
    let w = rng.gen_range(opts.width_range.0..=opts.width_range.1);
    let (hf, wf) = (h as f64, w as f64);
    let mn = hf.min(wf);

    // 2. Tissue layers.
    let u_s = u(rng, 0.02, 0.04);
    let u_f = u(rng, 0.15, 0.30);
    let u_m = u(rng, 0.70, 0.85);
    let c_s = curve(rng, w, 0.3 * wf);
    let c_f = curve(rng, w, 0.3 * wf);
    let c_m = curve(rng, w, 0.3 * wf);
    // The skin line keeps a positive thickness: its interface moves by a quarter of the 0.03H amplitude.
    let ys: Vec<f64> = c_s
        .iter()
        .map(|&c| (u_s * hf + 0.25 * 0.03 * hf * c as f64).max(0.01 * hf))
        .collect();
    let yf: Vec<f64> = c_f
        .iter()
        .zip(&ys)
        .map(|(&c, &s)| (u_f * hf + 0.03 * hf * c as f64).max(s + 2.0))
        .collect();
    let ym: Vec<f64> = c_m
        .iter()
        .zip(&yf)
        .map(|(&c, &f)| (u_m * hf + 0.03 * hf * c as f64).max(f + 4.0))
        .collect();
    let ell = 0.04 * mn;
    let g_tex = gaussian_field(rng, h, w, ell);
    let g_mus = gaussian_field(rng, h, w, ell);
    let lambda = u(rng, 6.0, 12.0);
    let n_lob = rng.gen_range(3..=8);
    let lobules: Vec<(f64, f64, f64, f64, f64)> = (0..n_lob)
        .map(|_| {
            let x = u(rng, 0.0, wf);
            let yc = u(rng, u_s + 0.02, u_f) * hf;
            let ax = u(rng, 0.04, 0.12) * wf;
            let ay = u(rng, 0.02, 0.05) * hf;
            let rot = u(rng, -0.3, 0.3);
            (x, yc, ax, ay, rot)
        })
        .collect();
    let mut t = vec![0f32; h * w];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let yy = y as f64;
            let v = if yy < ys[x] {
                0.85
            } else if yy < yf[x] {
                let mut v = 0.30 + 0.12 * g_tex[i] as f64;
                for &(lx, ly, ax, ay, rot) in &lobules {
                    let (dx, dy) = (x as f64 - lx, yy - ly);
                    let (s, c) = f64::sin_cos(rot);
                    let (p, q) = (c * dx + s * dy, -s * dx + c * dy);
                    if (p / ax).powi(2) + (q / ay).powi(2) < 1.0 {
                        v -= 0.12;
                    }
                }
                v
            } else if yy < ym[x] {
                0.60 + 0.12 * g_tex[i] as f64
            } else {
                0.45 + 0.1 * (TAU * yy / lambda + 0.5 * g_mus[i] as f64).sin()
            };
            t[i] = v.max(0.02) as f32;
        }
    }
    let mut t = blur(&t, h, w, 2.0, 2.0);

    // 3. Lesions.
    let mut lesions: Vec<(Shape, Vec<u8>, usize, f64, bool)> = Vec::new(); // shape, mask, area, r, tiny
    let n_lesions = match class {
        PhantomClass::Normal => 0,
        PhantomClass::Malignant => 1,
        PhantomClass::Benign => {
            if rng.gen::<f64>() < 0.1 {
                2
            } else {
                1
            }
        }
    };
    let malignant = class == PhantomClass::Malignant;
    let mut union = vec![0u8; h * w];
    for li in 0..n_lesions {
        let mut placed = None;
        for _attempt in 0..50 {
            let cx = u(rng, 0.2 * wf, 0.8 * wf);
            let cy = u(rng, u_f + 0.1, u_m - 0.1) * hf;
            let tiny = rng.gen::<f64>() < 0.15;
            let r = if tiny {
                u(rng, 3.0, 8.0)
            } else {
                u(rng, 10f64.ln(), (0.2 * mn).ln()).exp()
            };
            let shape = draw_shape(rng, malignant, cx, cy, r);
            let (m, area) = rasterise(&shape, h, w);
            if area < 10 {
                continue;
            }
            if li > 0 {
                // A second lesion must be separate: at least 6 px from the first.
                let d = edt(h, w, |i| union[i] != 0);
                if m.iter().zip(&d).any(|(&v, &dd)| v != 0 && dd < 6.0) {
                    continue;
                }
            }
            placed = Some((shape, m, area, r, tiny));
            break;
        }
        if let Some(p) = placed {
            for (o, &v) in union.iter_mut().zip(&p.1) {
                *o |= v;
            }
            lesions.push(p);
        }
    }

    // 4–5. Lesion echo, margin blend, halo, posterior features.
    let mut metas = Vec::new();
    for (shape, m, area, r, tiny) in &lesions {
        let d_out = edt(h, w, |i| m[i] != 0); // distance to the lesion (outside)
        let d_in = edt(h, w, |i| m[i] == 0); // distance to the background (inside)
        let sd = |i: usize| {
            if m[i] != 0 {
                -(d_in[i] - 0.5)
            } else {
                d_out[i] - 0.5
            }
        };
        let hyp = u(rng, 0.08, 0.30);
        let g2 = gaussian_field(rng, h, w, 2.0);
        let wblend = if malignant { 2.0 } else { 0.7 };
        let halo = malignant && rng.gen::<f64>() < 0.5;
        for i in 0..h * w {
            let d = sd(i);
            if d > 12.0 {
                continue;
            }
            let t_out = t[i] as f64;
            let t_in = (t_out * hyp + 0.05 * g2[i] as f64).max(0.0);
            let mut v = t_out + (t_in - t_out) * sigmoid(-d / wblend);
            if halo && d > 0.0 && d < 8.0 {
                v += 0.15 * (-d / 3.0).exp();
            }
            t[i] = v as f32;
        }
        // Posterior features.
        let (mut xmin, mut xmax) = (w, 0);
        let mut yb = vec![None; w];
        for y in 0..h {
            for x in 0..w {
                if m[y * w + x] != 0 {
                    xmin = xmin.min(x);
                    xmax = xmax.max(x);
                    yb[x] = Some(y);
                }
            }
        }
        let posterior = if malignant {
            if rng.gen::<f64>() < 0.8 {
                Posterior::Shadow
            } else {
                Posterior::None
            }
        } else if rng.gen::<f64>() < 0.7 {
            Posterior::Enhancement
        } else {
            Posterior::None
        };
        let (e, l_enh) = (u(rng, 0.2, 0.6), u(rng, 0.2, 0.5) * hf);
        let s_sh = u(rng, 0.3, 0.7);
        if posterior != Posterior::None && xmax >= xmin {
            let width = (xmax - xmin + 1) as f64;
            let taper = (0.15 * width).max(1.0);
            for x in xmin..=xmax {
                let Some(yb) = yb[x] else { continue };
                let edge = ((x - xmin) as f64 + 0.5).min((xmax - x) as f64 + 0.5);
                let omega = (edge / taper).min(1.0);
                for y in yb + 1..h {
                    let dy = (y - yb) as f64;
                    let i = y * w + x;
                    let f = match posterior {
                        Posterior::Enhancement => 1.0 + e * omega * (-dy / l_enh).exp(),
                        Posterior::Shadow => 1.0 - s_sh * omega * (1.0 - (-dy / (0.05 * hf)).exp()),
                        Posterior::None => 1.0,
                    };
                    t[i] = (t[i] as f64 * f) as f32;
                }
            }
        }
        metas.push(LesionMeta {
            cx: shape.cx,
            cy: shape.cy,
            equivalent_radius: (*area as f64 / PI).sqrt(),
            area_px: *area,
            orientation_deg: shape.psi.to_degrees(),
            spiculated: !shape.spicules.is_empty(),
            posterior,
            r: *r,
            tiny: *tiny,
        });
    }

    // 6. Depth attenuation and gain.
    let alpha = u(rng, 0.3, 1.2);
    let gain = curve(rng, w, 0.3 * wf);
    for y in 0..h {
        let att = (-alpha * y as f64 / hf).exp();
        for x in 0..w {
            let i = y * w + x;
            t[i] = (t[i] as f64 * att * (1.0 + 0.1 * gain[x] as f64)).max(0.0) as f32;
        }
    }

    // 7. Speckle.
    let smooth_unit = |v: Vec<f32>| {
        let mut b = blur(&v, h, w, 0.7, 1.5);
        let n = b.len() as f64;
        let mean = b.iter().map(|&x| x as f64).sum::<f64>() / n;
        let sd = (b.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n)
            .sqrt()
            .max(1e-12);
        b.iter_mut()
            .for_each(|x| *x = ((*x as f64 - mean) / sd) as f32);
        b
    };
    let g1 = smooth_unit(randn_vec(rng, h * w));
    let g2 = smooth_unit(randn_vec(rng, h * w));
    let speckle: Vec<f32> = g1
        .iter()
        .zip(&g2)
        .map(|(a, b)| ((a * a + b * b) / 2.0).sqrt())
        .collect();

    // 8. Log compression and quantisation.
    let ln21 = 21f64.ln();
    let mut pix: Vec<u8> = (0..h * w)
        .map(|i| {
            let e = t[i] as f64 * speckle[i] as f64;
            let v = ((1.0 + 20.0 * e).ln() / ln21 + 0.01 * randn(rng)).clamp(0.0, 1.0);
            (255.0 * v).round() as u8
        })
        .collect();

    // 9. Caliper marks near (never on) the lesion.
    let mut annotated = false;
    if opts.annotations && rng.gen::<f64>() < 0.2 {
        let n_marks = rng.gen_range(1..=2);
        let dist = edt(h, w, |i| union[i] != 0);
        for _ in 0..n_marks {
            for _try in 0..40 {
                let (mx, my) = if let Some(l) = metas.first() {
                    let ang = u(rng, 0.0, TAU);
                    let rr = l.equivalent_radius + u(rng, 6.0, 25.0);
                    (l.cx + rr * ang.cos(), l.cy + rr * ang.sin())
                } else {
                    (u(rng, 0.2 * wf, 0.8 * wf), u(rng, 0.3 * hf, 0.7 * hf))
                };
                let (mx, my) = (mx.round() as i64, my.round() as i64);
                if mx < 3 || my < 3 || mx >= w as i64 - 3 || my >= h as i64 - 3 {
                    continue;
                }
                let pts: Vec<usize> = (-2..=2)
                    .flat_map(|o| [(mx + o, my), (mx, my + o)])
                    .map(|(x, y)| y as usize * w + x as usize)
                    .collect();
                if pts.iter().any(|&i| dist[i] < 3.0) {
                    continue;
                }
                for i in pts {
                    pix[i] = 255;
                }
                annotated = true;
                break;
            }
        }
    }

    let mask_format = {
        let r: f64 = rng.gen();
        if r < 0.05 {
            "rgba"
        } else if r < 0.1 {
            "palette1"
        } else {
            "grey"
        }
    };
    let masks: Vec<Gray> = if lesions.is_empty() {
        vec![Gray::zeros(w, h)]
    } else {
        lesions
            .iter()
            .map(|l| Gray::new(w, h, l.1.clone()))
            .collect()
    };
    PhantomImage {
        image: Gray::new(w, h, std::mem::take(&mut pix)),
        masks,
        meta: ImageMeta {
            file: format!("{} ({number}).png", class.name()),
            class,
            height: h,
            width: w,
            lesions: metas,
            mask_format: mask_format.to_string(),
            annotated,
        },
        speckle,
        tissue: t,
    }
}
