//! `ultrarefiner bench` (SPEC §13.7): named workloads timed after warm-up, one JSON object per run.
//!
//! A workload is set up once (random inputs, random-init weights of the chosen preset), then its step closure runs
//! `warmup` untimed and `n` timed times. Performance claims in notes and the README come from these numbers.
use crate::config::Config;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::time::Instant;

/// Options shared by every workload.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub workload: String,
    pub config: String,
    pub batch: Option<usize>,
    pub n: usize,
    pub warmup: usize,
    pub device: Device,
    /// dtype of the frozen SAM image encoder (`--encoder-dtype`); `None`: bf16 on CUDA, f32 on CPU (SPEC §15).
    pub encoder_dtype: Option<DType>,
}

/// The JSON line printed per workload.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub workload: String,
    pub config: String,
    pub device: String,
    pub batch: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub peak_rss_mb: f64,
    pub threads: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items_per_s: Option<f64>,
    /// CUDA only: high-water mark of the memory candle allocated (set-up included), MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_peak_mb: Option<f64>,
    /// CUDA only: device memory in use at the end (all processes), and the device's total, MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_used_mb: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_total_mb: Option<f64>,
}

/// A prepared workload: `step` does one timed unit of work; `items` is how many items one step processes
/// (images, samples) or `None` where "items per second" has no meaning.
pub struct Prepared {
    pub batch: usize,
    pub items: Option<usize>,
    pub step: Box<dyn FnMut() -> Result<()>>,
}

type Setup = fn(&BenchOptions, &Config) -> Result<Prepared>;

/// The registry: name, one-line description, setup function.
pub fn workloads() -> Vec<(&'static str, &'static str, Setup)> {
    vec![
        ("sgemm-2048", "f32 2048×2048 matrix product (ceiling check of the matmul backend)", sgemm_2048),
        (
            "bilinear-224-1024-fwd-bwd",
            "differentiable bilinear resize (B,1,224,224)→1024 forward + backward (default batch 4)",
            bilinear_fwd_bwd,
        ),
        (
            "loader-224",
            "one epoch of augmented 224×224 training batches from a generated 120-image phantom (items = samples)",
            loader_224,
        ),
        (
            "prepare-busi-sample",
            "`prepare datasets` of ../shared/data/BUSI into a scratch folder (items = images kept)",
            prepare_busi_sample,
        ),
        (
            "transunet-train-step",
            "one Phase 1 optimiser step (train forward, loss, backward, SGD; random init; default batch 4)",
            transunet_train_step,
        ),
        (
            "transunet-sgd-step",
            "the SGD update alone (momentum 0.9, weight decay 1e-4) over the TransUNet's parameters with fixed gradients",
            |o, c| transunet_sgd_step(o, c, true),
        ),
        (
            "transunet-sgd-step-composed",
            "as transunet-sgd-step with the composed tensor ops instead of the in-place CPU kernels (the CUDA path)",
            |o, c| transunet_sgd_step(o, c, false),
        ),
        (
            "sam-encoder-forward",
            "frozen SAM image encoder forward at sam.img_size (plain tensors, fused kernels; default batch 1)",
            sam_encoder_forward,
        ),
        (
            "sam-decoder-train-step",
            "Phase 2 step from cached embeddings: prompts + prompt encoder + mask decoder, loss, backward, AdamW (batch 4)",
            sam_decoder_train_step,
        ),
        (
            "e2e-train-step",
            "Phase 3 step with cached SAM embeddings: TransUNet + prompts + SAM decoder, loss, backward, AdamW (batch 2)",
            e2e_train_step,
        ),
        (
            "e2e-train-step-uncached",
            "as e2e-train-step, with the frozen SAM image encoder run inside every step (batch 2)",
            e2e_train_step_uncached,
        ),
        (
            "phase3-step",
            "one Phase 3 optimiser step through train::phase3::train_step (cached embeddings, all trainable; batch 2)",
            phase3_step,
        ),
        (
            "augment-throughput",
            "SDF failure simulation at original resolution, 16 synthetic 480×560 sources built in the setup (items = samples; --batch = samples, default 200)",
            augment_throughput,
        ),
        (
            "phase2-epoch",
            "one Phase 2 epoch with cached embeddings: --batch samples (default 8) of 2 sources, batch 4 steps (items = samples)",
            phase2_epoch_cached,
        ),
        (
            "phase2-loader",
            "Phase 2 data access: open a written augmented run (shard headers, 8 sources) and read every stored \
             coarse mask once in shuffled batches of 8, as an epoch does (--batch = samples, default 2048; f32 at S)",
            phase2_loader,
        ),
        (
            "phase2-epoch-uncached",
            "as phase2-epoch, with the frozen SAM image encoder run in every step (--embed-cache off)",
            phase2_epoch_uncached,
        ),
        (
            "transunet-forward",
            "TransUNet eval-mode forward (random init; default batch 4)",
            transunet_forward,
        ),
        (
            "infer-per-image",
            "`infer` per-image path on a 500×400 grey image: resize to S, TransUNet + frozen SAM encoder + refiner, \
             probabilities back to the original size, threshold (batch 1; random init)",
            infer_per_image,
        ),
    ]
}

/// Names of all registered workloads, for `--help` and error messages.
pub fn workload_names() -> Vec<&'static str> {
    workloads().into_iter().map(|(n, _, _)| n).collect()
}

/// Runs one workload and returns its result.
pub fn run(opts: &BenchOptions) -> Result<BenchResult> {
    let cfg = Config::load(&opts.config)?;
    let setup = workloads()
        .into_iter()
        .find(|(n, _, _)| *n == opts.workload)
        .map(|(_, _, s)| s)
        .ok_or_else(|| {
            Error::Arg(format!(
                "unknown workload `{}`; known: {}",
                opts.workload,
                workload_names().join(", ")
            ))
        })?;
    if opts.n == 0 {
        return Err(Error::Arg("--n must be at least 1".into()));
    }
    reset_peak_rss();
    crate::device::reset_gpu_peak(&opts.device);
    let mut prepared = setup(opts, &cfg)?;
    for _ in 0..opts.warmup {
        (prepared.step)()?;
        opts.device.synchronize()?;
    }
    let mut times = Vec::with_capacity(opts.n);
    for _ in 0..opts.n {
        let t0 = Instant::now();
        (prepared.step)()?;
        opts.device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = if times.len() % 2 == 1 {
        times[times.len() / 2]
    } else {
        0.5 * (times[times.len() / 2 - 1] + times[times.len() / 2])
    };
    let gpu = crate::device::gpu_memory(&opts.device);
    Ok(BenchResult {
        workload: opts.workload.clone(),
        config: cfg.preset.clone(),
        device: crate::device::device_name(&opts.device),
        batch: prepared.batch,
        median_ms: median,
        min_ms: times[0],
        max_ms: times[times.len() - 1],
        peak_rss_mb: peak_rss_mb(),
        threads: candle_core::utils::get_num_threads(),
        items_per_s: prepared.items.map(|k| k as f64 / (median / 1e3)),
        gpu_peak_mb: gpu.and_then(|g| g.pool_peak_mb),
        gpu_used_mb: gpu.map(|g| g.used_mb),
        gpu_total_mb: gpu.map(|g| g.total_mb),
    })
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`; 0 where unavailable).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Resets the kernel's peak-RSS mark so each workload reports its own peak (Linux only; best effort).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn sgemm_2048(opts: &BenchOptions, _cfg: &Config) -> Result<Prepared> {
    let a = Tensor::randn(0f32, 1.0, (2048, 2048), &opts.device)?;
    let b = Tensor::randn(0f32, 1.0, (2048, 2048), &opts.device)?;
    Ok(Prepared {
        batch: 1,
        items: None,
        step: Box::new(move || {
            let c = a.matmul(&b)?;
            // Force the result to exist before the clock stops (CUDA is synchronised by the caller).
            let _ = c.to_dtype(DType::F32)?;
            Ok(())
        }),
    })
}

fn bilinear_fwd_bwd(opts: &BenchOptions, _cfg: &Config) -> Result<Prepared> {
    let batch = opts.batch.unwrap_or(4);
    let x = candle_core::Var::from_tensor(&Tensor::rand(
        0f32,
        1.0,
        (batch, 1, 224, 224),
        &opts.device,
    )?)?;
    Ok(Prepared {
        batch,
        items: Some(batch),
        step: Box::new(move || {
            let y = crate::nn::resize_bilinear(x.as_tensor(), 1024, 1024, false)?;
            let grads = y.sqr()?.sum_all()?.backward()?;
            grads
                .get(x.as_tensor())
                .ok_or_else(|| Error::msg("bilinear resize produced no gradient"))?;
            Ok(())
        }),
    })
}

/// Random images `(B,1,S,S)` and lesion-like masks `(B,S,S)` (a centred disc) on `device`.
fn transunet_inputs(b: usize, s: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let x = Tensor::rand(0f32, 1.0, (b, 1, s, s), device)?;
    let r = s as f32 / 4.0;
    let c = s as f32 / 2.0;
    let mut m = vec![0f32; b * s * s];
    for i in 0..b {
        for y in 0..s {
            for xx in 0..s {
                let (dy, dx) = (y as f32 - c, xx as f32 - c);
                if dy * dy + dx * dx < r * r {
                    m[i * s * s + y * s + xx] = 1.0;
                }
            }
        }
    }
    Ok((
        x,
        Tensor::from_vec(m, (b, s, s), &Device::Cpu)?.to_device(device)?,
    ))
}

fn transunet_train_step(opts: &BenchOptions, cfg: &Config) -> Result<Prepared> {
    use crate::train::phase1::{build_model, make_optimizer, train_step};
    let b = opts.batch.unwrap_or(4);
    let tcfg = cfg.model.transunet.clone();
    let varmap = candle_nn::VarMap::new();
    let model = build_model(&tcfg, &varmap, 42, &opts.device, None)?;
    let mut opt = make_optimizer(&varmap, 0.01, 0.9, 1e-4)?;
    let mut sched = crate::train::Schedule::poly(1_000_000, 1);
    let (x, y) = transunet_inputs(b, tcfg.img_size, &opts.device)?;
    let mut step = 0u64;
    Ok(Prepared {
        batch: b,
        items: Some(b),
        step: Box::new(move || {
            step += 1;
            let seed = crate::rng::mix(42, "dropout", &[0, step]);
            train_step(&model, &mut opt, &mut sched, &x, &y, Some(seed))?;
            Ok(())
        }),
    })
}

fn transunet_sgd_step(opts: &BenchOptions, cfg: &Config, in_place: bool) -> Result<Prepared> {
    use crate::train::optim::Optimizer;
    use crate::train::phase1::{build_model, make_optimizer};
    let tcfg = cfg.model.transunet.clone();
    let varmap = candle_nn::VarMap::new();
    let _model = build_model(&tcfg, &varmap, 42, &opts.device, None)?;
    let mut opt = make_optimizer(&varmap, 0.01, 0.9, 1e-4)?;
    let mut grads = crate::train::optim::Grads::new();
    let mut n = 0;
    for (key, var) in &opt.groups()[0].params {
        grads.insert(key.clone(), var.as_tensor().randn_like(0.0, 1e-3)?);
        n += var.elem_count();
    }
    Ok(Prepared {
        batch: 1,
        items: Some(n),
        step: Box::new(move || opt.step_with(&grads, in_place)),
    })
}

/// A scratch folder removed when the workload is dropped.
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new(tag: &str) -> Result<Self> {
        let p =
            std::env::temp_dir().join(format!("ultrarefiner-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        Ok(Self(p))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn loader_224(opts: &BenchOptions, cfg: &Config) -> Result<Prepared> {
    let batch = opts.batch.unwrap_or(cfg.phase1.batch_size);
    let scratch = ScratchDir::new("loader")?;
    let w = crate::data::bench::LoaderWorkload::phantom(&scratch.0, 120, 224, batch, None)?;
    // One untimed epoch fills the decode cache and tells how many samples an epoch yields.
    let n = w.run()?;
    Ok(Prepared {
        batch,
        items: Some(n),
        step: Box::new(move || {
            let _keep = &scratch;
            w.run().map(|_| ())
        }),
    })
}

fn prepare_busi_sample(_opts: &BenchOptions, _cfg: &Config) -> Result<Prepared> {
    let scratch = ScratchDir::new("prepare")?;
    let w = crate::data::bench::PrepareWorkload::busi_sample(&scratch.0.join("processed"), None)?;
    let n = w.run()?;
    Ok(Prepared {
        batch: 1,
        items: Some(n),
        step: Box::new(move || {
            let _keep = &scratch;
            w.run().map(|_| ())
        }),
    })
}

fn transunet_forward(opts: &BenchOptions, cfg: &Config) -> Result<Prepared> {
    let b = opts.batch.unwrap_or(4);
    let tcfg = cfg.model.transunet.clone();
    let varmap = candle_nn::VarMap::new();
    let model = crate::train::phase1::build_model(&tcfg, &varmap, 42, &opts.device, None)?;
    let (x, _) = transunet_inputs(b, tcfg.img_size, &opts.device)?;
    Ok(Prepared {
        batch: b,
        items: Some(b),
        step: Box::new(move || {
            let y = model.forward_t(&x, false, None)?;
            let _ = y.sum_all()?.to_dtype(DType::F32)?.to_vec0::<f32>()?;
            Ok(())
        }),
    })
}

/// `infer` per image: the library's [`crate::eval::infer::predict_images`] on one odd-sized grey image with a
/// randomly initialised end-to-end model (frozen encoder in bf16 on CUDA, f32 on CPU).
fn infer_per_image(opts: &BenchOptions, cfg: &Config) -> Result<Prepared> {
    use crate::eval::infer::predict_images;
    use crate::eval::model::{EnsembleMode, EvalModel, Member, ModelSource};
    use crate::eval::postprocess::PostProcess;
    let b = opts.batch.unwrap_or(1);
    let dev = &opts.device;
    let (ultra, _, _) = random_ultra(cfg, dev)?;
    let model = EvalModel {
        members: vec![Member::Full(Box::new(ultra))],
        img_size: cfg.model.transunet.img_size,
        model_config: cfg.model.clone(),
        refiner: Some(cfg.refiner.clone()),
        source: ModelSource::Phase3 {
            checkpoint: "random-init".into(),
        },
        ensemble_mode: EnsembleMode::Mean,
        device: dev.clone(),
    };
    let (h, w) = (400usize, 500usize);
    let images: Vec<crate::data::pixels::Gray> = (0..b)
        .map(|k| {
            let data = (0..h * w)
                .map(|i| ((i * 37 + k * 101 + (i / w) * 13) % 251) as u8)
                .collect();
            crate::data::pixels::Gray::new(w, h, data)
        })
        .collect();
    let post = PostProcess::default();
    Ok(Prepared {
        batch: b,
        items: Some(b),
        step: Box::new(move || {
            let refs: Vec<&crate::data::pixels::Gray> = images.iter().collect();
            let p = predict_images(&model, &refs, false, &post, 0.5)?;
            if p.len() != refs.len() {
                return Err(Error::msg("infer-per-image: wrong number of predictions"));
            }
            Ok(())
        }),
    })
}

/// A randomly initialised SAM of the preset (frozen encoder as plain tensors, prompt encoder and decoder as Vars).
fn random_sam(
    cfg: &Config,
    device: &Device,
) -> Result<(crate::models::sam::Sam, candle_nn::VarMap)> {
    random_sam_with(cfg, device, None)
}

/// As [`random_sam`] with an explicit encoder dtype (`None`: bf16 on CUDA, f32 on CPU).
fn random_sam_with(
    cfg: &Config,
    device: &Device,
    encoder_dtype: Option<DType>,
) -> Result<(crate::models::sam::Sam, candle_nn::VarMap)> {
    use crate::models::sam::weights::{random_weights, SamFormat, SamWeights};
    let scfg = &cfg.model.sam;
    let weights = SamWeights {
        tensors: random_weights(scfg, 42, device)?,
        format: SamFormat::Original,
    };
    let varmap = candle_nn::VarMap::new();
    // bf16 on CUDA (SPEC §15), f32 on CPU where candle has no bf16 convolution.
    let enc_dtype = match encoder_dtype {
        Some(d) => d,
        None => crate::device::encoder_dtype(None, device)?,
    };
    let sam =
        crate::models::sam::Sam::from_weights(scfg, &weights, &varmap, device, enc_dtype, None)?;
    Ok((sam, varmap))
}

/// Every Var of a VarMap in key order (the optimiser's parameter order).
fn sorted_vars(varmap: &candle_nn::VarMap) -> Result<Vec<(String, candle_core::Var)>> {
    let mut vars: Vec<(String, candle_core::Var)> = varmap
        .data()
        .lock()
        .map_err(|_| Error::msg("VarMap lock poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}

/// One end-to-end step as Phase 3 takes it (SPEC §9.3, §11.4): TransUNet in train mode → shared preprocessing →
/// prompts → SAM decoder on cached embeddings → `0.3·L_coarse + 0.7·L_refined` at N → backward → AdamW with the two
/// groups `transunet` and `sam`.
fn e2e_train_step(opts: &BenchOptions, cfg: &Config) -> Result<Prepared> {
    e2e_step(opts, cfg, true)
}

/// As `e2e-train-step`, but the frozen SAM image encoder runs inside every step (no embedding cache).
fn e2e_train_step_uncached(opts: &BenchOptions, cfg: &Config) -> Result<Prepared> {
    e2e_step(opts, cfg, false)
}

/// A randomly initialised end-to-end model of the preset and the VarMaps of its TransUNet and SAM parts.
fn random_ultra(
    cfg: &Config,
    dev: &Device,
) -> Result<(
    crate::refiner::ultra::UltraRefiner,
    candle_nn::VarMap,
    candle_nn::VarMap,
)> {
    use crate::refiner::sam_refiner::{SamRefiner, SamRefinerSettings};
    let tvm = candle_nn::VarMap::new();
    let transunet = crate::train::phase1::build_model(&cfg.model.transunet, &tvm, 42, dev, None)?;
    let (sam, svm) = random_sam(cfg, dev)?;
    let refiner = SamRefiner::new(sam, SamRefinerSettings::from_config(&cfg.refiner, None)?);
    Ok((
        crate::refiner::ultra::UltraRefiner::new(transunet, refiner),
        tvm,
        svm,
    ))
}

fn e2e_step(opts: &BenchOptions, cfg: &Config, cached: bool) -> Result<Prepared> {
    use crate::refiner::ultra::ForwardOptions;
    use crate::train::losses::{nearest_target, phase3_loss, Phase3LossConfig};
    use crate::train::optim::{AdamW, Grads, Optimizer, ParamGroup};
    let b = opts.batch.unwrap_or(2);
    let dev = &opts.device;
    let (model, tvm, svm) = random_ultra(cfg, dev)?;
    let mut opt = AdamW::new(vec![
        ParamGroup::new("transunet", 1e-5, 0.01, sorted_vars(&tvm)?),
        ParamGroup::new("sam", 1e-5, 0.01, sorted_vars(&svm)?),
    ])?;
    let s = cfg.model.transunet.img_size;
    let (g, c, n) = (
        cfg.model.sam.embed_grid(),
        cfg.model.sam.prompt_embed_dim,
        cfg.model.sam.img_size,
    );
    let (x, y) = transunet_inputs(b, s, dev)?;
    let y_n = nearest_target(&y, n)?;
    let emb = Tensor::randn(0f32, 1.0, (b, c, g, g), dev)?;
    let lcfg = Phase3LossConfig::default();
    let mut step = 0u64;
    Ok(Prepared {
        batch: b,
        items: Some(b),
        step: Box::new(move || {
            step += 1;
            let fo = ForwardOptions {
                train: true,
                dropout_seed: Some(crate::rng::mix(42, "dropout", &[0, step])),
                embeddings: cached.then_some(&emb),
                cache: None,
            };
            let out = model.forward_with(&x, &fo)?;
            let loss = phase3_loss(
                &out.coarse_logits,
                &y,
                &out.refined_logits_n,
                &y_n,
                &lcfg,
                None,
            )?;
            let store = loss.total.backward()?;
            let grads = Grads::from_store(&store, opt.groups())?;
            opt.step(&grads)?;
            Ok(())
        }),
    })
}

/// The Phase 3 trainer's own step (`train::phase3::train_step`): TransUNet in training mode, refiner on cached
/// embeddings, `0.3·L_coarse + 0.7·L_refined` at N, backward, clipping at 1.0, AdamW over both groups.
fn phase3_step(opts: &BenchOptions, cfg: &Config) -> Result<Prepared> {
    use crate::train::phase3::{train_step, FreezePlan, MicroBatch, Phase3Model, StepConfig};
    let b = opts.batch.unwrap_or(2);
    let dev = &opts.device;
    let tvm = candle_nn::VarMap::new();
    let tu = crate::train::phase1::build_model(&cfg.model.transunet, &tvm, 42, dev, None)?;
    let tu_tensors = crate::models::transunet::state_dict(&tu, &tvm)?
        .into_iter()
        .collect();
    drop(tu);
    let sam = crate::models::sam::weights::SamWeights {
        tensors: crate::models::sam::weights::random_weights(&cfg.model.sam, 42, dev)?,
        format: crate::models::sam::weights::SamFormat::Original,
    };
    let enc_dtype = if dev.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    let settings = crate::refiner::SamRefinerSettings::from_config(&cfg.refiner, None)?;
    let model = Phase3Model::new(&cfg.model, &tu_tensors, &sam, settings, dev, enc_dtype)?;
    drop(sam);
    let mut opt = crate::train::optim::AdamW::new(model.param_groups(1e-5, 1e-5, 0.01)?)?;
    let keys = crate::train::phase3::step::all_keys(&opt);
    let trainable = FreezePlan::all_trainable(
        cfg.model.transunet.decoder_channels.len(),
        cfg.model.sam.decoder_depth,
    )
    .at(0, &keys);
    let step_cfg = StepConfig {
        loss: crate::train::losses::Phase3LossConfig::default(),
        loss_size: crate::train::losses::RefinedLossSize::Full,
        grad_clip: 1.0,
        anchor_beta: 0.0,
    };
    let s = cfg.model.transunet.img_size;
    let (g, c) = (cfg.model.sam.embed_grid(), cfg.model.sam.prompt_embed_dim);
    let (x, y) = transunet_inputs(b, s, dev)?;
    let emb = Tensor::randn(0f32, 1.0, (b, c, g, g), dev)?;
    let mut step = 0u64;
    Ok(Prepared {
        batch: b,
        items: Some(b),
        step: Box::new(move || {
            step += 1;
            let mb = MicroBatch {
                images: x.clone(),
                masks: y.clone(),
                embeddings: Some(emb.clone()),
                dropout_seed: Some(crate::rng::mix(42, "dropout", &[0, step])),
            };
            train_step(&model, &mut opt, &[mb], &trainable, &step_cfg, None, None)?;
            Ok(())
        }),
    })
}

fn sam_encoder_forward(opts: &BenchOptions, cfg: &Config) -> Result<Prepared> {
    let b = opts.batch.unwrap_or(1);
    let n = cfg.model.sam.img_size;
    let (sam, _varmap) = random_sam_with(cfg, &opts.device, opts.encoder_dtype)?;
    let x = Tensor::randn(0f32, 1.0, (b, 3, n, n), &opts.device)?;
    Ok(Prepared {
        batch: b,
        items: Some(b),
        step: Box::new(move || {
            let e = sam.image_encoder.forward_frozen(&x)?;
            let _ = e.sum_all()?.to_dtype(DType::F32)?.to_vec0::<f32>()?;
            Ok(())
        }),
    })
}

fn sam_decoder_train_step(opts: &BenchOptions, cfg: &Config) -> Result<Prepared> {
    use crate::refiner::sam_refiner::{SamRefiner, SamRefinerSettings};
    use crate::train::optim::{AdamW, Grads, Optimizer, ParamGroup};
    let b = opts.batch.unwrap_or(4);
    let dev = &opts.device;
    let (sam, varmap) = random_sam(cfg, dev)?;
    let refiner = SamRefiner::new(sam, SamRefinerSettings::from_config(&cfg.refiner, None)?);
    let mut opt = AdamW::new(vec![ParamGroup::new(
        "sam",
        1e-4,
        0.01,
        sorted_vars(&varmap)?,
    )])?;
    let s = cfg.model.transunet.img_size;
    let g = cfg.model.sam.embed_grid();
    let c = cfg.model.sam.prompt_embed_dim;
    let (image_s, gt_s) = transunet_inputs(b, s, dev)?;
    // A plausible coarse mask: the GT disc blurred into a soft map.
    let coarse_s = (gt_s.affine(0.8, 0.1))?;
    let batch = crate::train::phase2::Batch {
        image_s,
        coarse_s,
        gt_s,
        emb: Tensor::randn(0f32, 1.0, (b, c, g, g), dev)?,
    };
    let lcfg = crate::train::losses::Phase2LossConfig::default();
    Ok(Prepared {
        batch: b,
        items: Some(b),
        step: Box::new(move || {
            let st = crate::train::phase2::forward(&refiner, &batch, &lcfg)?;
            let store = st.loss.total.backward()?;
            let grads = Grads::from_store(&store, opt.groups())?;
            opt.step(&grads)?;
            Ok(())
        }),
    })
}

fn augment_throughput(opts: &BenchOptions, _cfg: &Config) -> Result<Prepared> {
    let n = opts.batch.unwrap_or(200);
    let threads = rayon::current_num_threads();
    // Source synthesis is setup (real runs read their sources from disk); the step times generation only.
    let sources = crate::augment::bench_sources();
    Ok(Prepared {
        batch: n,
        items: Some(n),
        step: Box::new(move || {
            crate::augment::bench_throughput_on(&sources, n, threads).map(|_| ())
        }),
    })
}

/// Phase 2's augmented-data access without the model: `load_data` of a run written once in the setup (f32 shards of
/// 256 samples at S, so the page cache holds it as on a machine with spare memory), then every mask once through
/// [`crate::train::phase2::CoarseMasks::read_batch`] in a shuffled order, batch 8 (items = samples).
fn phase2_loader(opts: &BenchOptions, cfg: &Config) -> Result<Prepared> {
    use rand::seq::SliceRandom;
    let n = opts.batch.unwrap_or(2048).max(1);
    let s = cfg.model.transunet.img_size;
    let scratch = ScratchDir::new("phase2-loader")?;
    let (aug, processed) = crate::train::phase2::data::write_synthetic_run(
        &scratch.0,
        n,
        8,
        s,
        256,
        crate::augment::soft::StoreDtype::F32,
    )?;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut crate::rng::stream_rng(42, "bench-phase2-loader", &[]));
    Ok(Prepared {
        batch: 8,
        items: Some(n),
        step: Box::new(move || {
            let _keep = &scratch;
            let data = crate::train::phase2::load_data(&aug, "BENCH", &processed, s)?;
            let mut buf = Vec::with_capacity(8 * s * s);
            for ids in order.chunks(8) {
                buf.clear();
                data.coarse.read_batch(ids, &mut buf)?;
            }
            std::hint::black_box(&buf);
            Ok(())
        }),
    })
}

fn phase2_epoch_cached(opts: &BenchOptions, cfg: &Config) -> Result<Prepared> {
    phase2_epoch(opts, cfg, true)
}

fn phase2_epoch_uncached(opts: &BenchOptions, cfg: &Config) -> Result<Prepared> {
    phase2_epoch(opts, cfg, false)
}

/// One Phase 2 training epoch over `--batch` samples (default 8) drawn from 2 source images, in steps of 4 exactly
/// as the trainer takes them (`make_batch` → `forward` → backward → AdamW). Cached: the embeddings of the 2 sources
/// are computed once in the setup (the cache fill is one encoder forward per source, see `sam-encoder-forward`).
fn phase2_epoch(opts: &BenchOptions, cfg: &Config, cached: bool) -> Result<Prepared> {
    use crate::refiner::sam_refiner::{SamRefiner, SamRefinerSettings};
    use crate::train::optim::{AdamW, Grads, Optimizer};
    use crate::train::phase2::{
        embed_sources, forward, make_batch, param_groups, Embeddings, Phase2Data,
    };
    let n_samples = opts.batch.unwrap_or(8).max(1);
    let dev = &opts.device;
    let (sam, varmap) = random_sam(cfg, dev)?;
    let refiner = SamRefiner::new(sam, SamRefinerSettings::from_config(&cfg.refiner, None)?);
    let mut opt = AdamW::new(param_groups(&varmap, 1e-4, 0.01)?)?;
    let s = cfg.model.transunet.img_size;
    let n_src = 2;
    let (images, gts) = transunet_inputs(n_src, s, &Device::Cpu)?;
    let images: Vec<Vec<f32>> = (0..n_src)
        .map(|i| images.get(i)?.flatten_all()?.to_vec1::<f32>())
        .collect::<candle_core::Result<_>>()?;
    let gts: Vec<Vec<f32>> = (0..n_src)
        .map(|i| gts.get(i)?.flatten_all()?.to_vec1::<f32>())
        .collect::<candle_core::Result<_>>()?;
    // Coarse masks: the GT disc softened and shifted a little per sample.
    let coarse: Vec<Vec<f32>> = (0..n_samples)
        .map(|j| {
            let g = &gts[j % n_src];
            let sh = j % 5;
            (0..s * s)
                .map(|p| 0.1 + 0.8 * g[(p + sh) % (s * s)])
                .collect()
        })
        .collect();
    let data = Phase2Data {
        records: Vec::new(),
        coarse: crate::train::phase2::CoarseMasks::in_memory(coarse, s)?,
        source_of: (0..n_samples).map(|j| j % n_src).collect(),
        is_real: vec![false; n_samples],
        sources: (0..n_src)
            .map(|i| ("BENCH".to_string(), format!("s{i}")))
            .collect(),
        images,
        gts,
        store_size: s,
        manifest_sha256: String::new(),
        real_manifest_sha256: None,
        excluded_fold: None,
    };
    let emb = if cached {
        let cache = crate::models::sam::EmbeddingCache::new(None, "bench", 1 << 30)?;
        Embeddings::Cached(embed_sources(&refiner, &cache, &data, 4, dev)?)
    } else {
        Embeddings::PerBatch
    };
    let lcfg = crate::train::losses::Phase2LossConfig::default();
    let dev = dev.clone();
    Ok(Prepared {
        batch: 4,
        items: Some(n_samples),
        step: Box::new(move || {
            let ids: Vec<usize> = (0..n_samples).collect();
            for chunk in ids.chunks(4) {
                let b = make_batch(&data, &emb, &refiner, chunk, &dev, None)?;
                let st = forward(&refiner, &b, &lcfg)?;
                let store = st.loss.total.backward()?;
                let grads = Grads::from_store(&store, opt.groups())?;
                opt.step(&grads)?;
            }
            Ok(())
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_workload_lists_known_ones() {
        let opts = BenchOptions {
            workload: "nope".into(),
            config: "tiny".into(),
            batch: None,
            n: 1,
            warmup: 0,
            device: Device::Cpu,
            encoder_dtype: None,
        };
        let e = run(&opts).unwrap_err().to_string();
        assert!(e.contains("sgemm-2048"), "{e}");
    }

    /// The model workloads must keep working as the trainers evolve: one timed run each at `tiny`.
    #[test]
    fn model_workloads_run_at_tiny() {
        for w in [
            "transunet-forward",
            "transunet-train-step",
            "sam-encoder-forward",
            "sam-decoder-train-step",
            "e2e-train-step",
            "e2e-train-step-uncached",
            "phase3-step",
            "bilinear-224-1024-fwd-bwd",
            "infer-per-image",
            "phase2-epoch",
            "phase2-epoch-uncached",
            "phase2-loader",
            "augment-throughput",
        ] {
            let opts = BenchOptions {
                workload: w.into(),
                config: "tiny".into(),
                batch: Some(1),
                n: 1,
                warmup: 0,
                device: Device::Cpu,
                encoder_dtype: None,
            };
            let r = run(&opts).unwrap_or_else(|e| panic!("{w}: {e}"));
            assert!(r.median_ms > 0.0 && r.median_ms.is_finite(), "{w}: {r:?}");
            assert!(r.items_per_s.is_some(), "{w} processes items");
        }
    }

    #[test]
    fn peak_rss_is_positive_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_mb() > 0.0);
        }
    }
}
