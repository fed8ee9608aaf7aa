//! Support for tests (unit, parity and integration): locating `../shared` and reading fixtures.
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The `shared/` folder beside the checkout: `$ULTRAREFINER_SHARED`, else the first `shared/fixtures` found walking up
/// from this crate's manifest directory (a checkout at `X/main` finds `X/shared`).
pub fn shared_dir() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("ULTRAREFINER_SHARED") {
        return Ok(PathBuf::from(p));
    }
    let mut dir: Option<&Path> = Some(Path::new(env!("CARGO_MANIFEST_DIR")));
    while let Some(d) = dir {
        let cand = d.join("shared");
        if cand.join("fixtures").is_dir() {
            return Ok(cand);
        }
        dir = d.parent();
    }
    Err(Error::msg(
        "cannot find ../shared/fixtures beside the checkout; set ULTRAREFINER_SHARED to the shared folder",
    ))
}

/// Path of one file under `shared/fixtures/`.
pub fn fixture_path(name: &str) -> Result<PathBuf> {
    Ok(shared_dir()?.join("fixtures").join(name))
}

/// Loads every tensor of a fixture safetensors file onto the CPU (f16 and u8 inputs are kept as stored).
pub fn load_fixture(name: &str) -> Result<HashMap<String, Tensor>> {
    let p = fixture_path(name)?;
    candle_core::safetensors::load(&p, &Device::Cpu).map_err(|e| Error::file(&p, e.to_string()))
}

/// A fixture tensor cast to f32 (for inputs stored as `f16 (exact)` or `u8`).
pub fn get_f32(map: &HashMap<String, Tensor>, key: &str) -> Result<Tensor> {
    let t = map
        .get(key)
        .ok_or_else(|| Error::msg(format!("fixture has no tensor `{key}`")))?;
    Ok(t.to_dtype(DType::F32)?)
}

/// Compares `got` with `want`: `max|got − want| ≤ atol + rtol·max|want|`. On failure the message names the worst
/// element, its flat index and both values (SPEC §17.3).
pub fn assert_close(name: &str, got: &Tensor, want: &Tensor, atol: f64, rtol: f64) {
    let g: Vec<f64> = got
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("got");
    let w: Vec<f64> = want
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("want");
    assert_eq!(
        got.dims(),
        want.dims(),
        "{name}: shape {:?} vs expected {:?}",
        got.dims(),
        want.dims()
    );
    let scale = w.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let tol = atol + rtol * scale;
    let mut worst = (0usize, 0.0f64);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let d = (a - b).abs();
        if d.is_nan() || d > worst.1 {
            worst = (i, if d.is_nan() { f64::INFINITY } else { d });
        }
    }
    assert!(
        worst.1 <= tol,
        "{name}: max |diff| {:.3e} > tol {:.3e} at flat index {} (got {}, want {}; max|want| {:.3e})",
        worst.1,
        tol,
        worst.0,
        g[worst.0],
        w[worst.0],
        scale
    );
}

/// Gradient comparison of SPEC §17.3: relative L2 error ≤ `rel_l2` and cosine similarity ≥ `min_cos`.
pub fn assert_grad_close(name: &str, got: &Tensor, want: &Tensor, rel_l2: f64, min_cos: f64) {
    let g: Vec<f64> = got
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("got");
    let w: Vec<f64> = want
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("want");
    assert_eq!(got.dims(), want.dims(), "{name}: shape mismatch");
    let (mut dd, mut ww, mut gg, mut gw) = (0.0, 0.0, 0.0, 0.0);
    for (a, b) in g.iter().zip(&w) {
        dd += (a - b) * (a - b);
        ww += b * b;
        gg += a * a;
        gw += a * b;
    }
    let rel = dd.sqrt() / ww.sqrt().max(1e-30);
    let cos = gw / (gg.sqrt() * ww.sqrt()).max(1e-30);
    assert!(
        rel <= rel_l2 && cos >= min_cos,
        "{name}: gradient rel L2 {rel:.3e} (max {rel_l2:.0e}), cosine {cos:.6} (min {min_cos})"
    );
}

/// A prepared phantom dataset for trainer tests: `count` images (sizes 112–144 × 128–176, seed 7) generated under
/// `dir/raw/PHANTOM` and prepared (SPEC §3.4, with `splits.json`) into `dir/processed`, which is returned.
pub fn prepared_phantom(dir: &Path, count: usize, annotations: bool) -> Result<PathBuf> {
    use crate::data::phantom::{generate, PhantomOptions};
    use crate::data::prepare::{prepare_datasets, PrepareOptions};
    let raw = dir.join("raw");
    generate(&PhantomOptions {
        out: raw.join("PHANTOM"),
        count,
        seed: 7,
        height_range: (112, 144),
        width_range: (128, 176),
        annotations,
        num_workers: Some(2),
    })?;
    let processed = dir.join("processed");
    prepare_datasets(&PrepareOptions {
        raw_root: raw,
        output_root: processed.clone(),
        datasets: vec![crate::data::DatasetKind::Phantom],
        num_workers: Some(2),
        ..Default::default()
    })?;
    Ok(processed)
}

/// A synthetic failure run for trainer tests (SPEC §8): `samples` coarse masks of the PHANTOM dataset under
/// `processed` at store size `store_size`, with generator seed `seed`, in shards of 16, written to `out/PHANTOM`.
pub fn synthetic_phantom_run(
    processed: &Path,
    out: &Path,
    samples: usize,
    store_size: usize,
    seed: u64,
) -> Result<()> {
    use crate::augment::{run_synthetic, SimConfig, SyntheticOptions};
    run_synthetic(&SyntheticOptions {
        processed_root: processed.to_path_buf(),
        output_root: out.to_path_buf(),
        datasets: vec!["PHANTOM".into()],
        target_samples: samples,
        seed,
        sim: SimConfig {
            store_size,
            ..SimConfig::default()
        },
        shard_size: 16,
        num_workers: Some(2),
        ..Default::default()
    })?;
    Ok(())
}

/// A randomly initialised `tiny` TransUNet at `img_size`, saved to `path` as a Phase 1 checkpoint would be.
pub fn random_transunet_checkpoint(path: &Path, img_size: usize) -> Result<()> {
    use crate::models::transunet::{build_trainable, save_safetensors_atomic, state_dict};
    let mut cfg = crate::config::Config::load("tiny")?;
    cfg.model.transunet.img_size = img_size;
    let vm = candle_nn::VarMap::new();
    let tu = build_trainable(
        &cfg.model.transunet,
        &vm,
        "",
        DType::F32,
        &Device::Cpu,
        3,
        None,
    )?;
    save_safetensors_atomic(path, &state_dict(&tu, &vm)?)
}
