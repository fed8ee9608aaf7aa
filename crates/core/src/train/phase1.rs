//! Phase 1 trainer (SPEC §11.2): TransUNet on one processed dataset (or several combined), SGD with momentum,
//! poly(0.9) per optimiser step, loss `0.5·CE + 0.5·Dice₂` (§9.1), batch-pooled validation metrics (§10.1) plus the
//! per-image Dice `val_dice_img`, best checkpoint by strict improvement, exact resume (§11.1.6) and graceful stop on
//! SIGTERM/SIGUSR1 (exit code 75, nothing partial written).
//!
//! ```ignore
//! let mut o = Phase1Options::new("./dataset/processed");
//! o.dataset = Some("BUSI".into());
//! o.config = "tiny".into();
//! let outcome = ultrarefiner::train::phase1::run(&o)?;
//! std::process::exit(outcome.exit_code());
//! ```
//!
//! Randomness (§0, §11.1.6): the random initialisation is drawn host-side from the project RNG
//! `("init", fnv1a64(key))` (see [`SeededInit`]), shuffling is `("shuffle", epoch)`, augmentation
//! `("augment", epoch, index)` and dropout `("dropout", epoch, step)` further mixed per layer by the model.
use super::checkpoint::{
    load_checkpoint, save_checkpoint, sha256_file, Best, DataIdentity, Phase, RngState, Sidecar,
    WeightSource,
};
use super::console::{
    end_of_run, epoch_report, run_header, single_rows, Console, EpochReport, RunHeader, Style,
    TrainReport, ValidationTable,
};
use super::history::{HistoryRow, Named};
use super::losses::{phase1_loss, scalar_f64, softmax};
use super::metrics::{MeanTracker, PooledMetrics};
use super::optim::{check_groups_match, Grads, Optimizer, ParamGroup, Sgd};
use super::rundir::{
    epoch_stem, resolve_resume, Durations, ResumeDecision, RunDir, RunStatus, Summary, Versions,
    BEST, FINAL, LATEST,
};
use super::schedule::Schedule;
use super::signals::{StopFlag, EXIT_TEMPFAIL};
use crate::config::{Config, TransUnetConfig};
use crate::data::dataset::{SegDataset, Split};
use crate::data::loader::{Loader, LoaderOptions};
use crate::device::DeviceSpec;
use crate::eval::metrics::{Confusion, RatioMetrics};
use crate::models::transunet::{
    load_into_varmap, load_pretrained_encoder, state_dict, LoadMode, TransUnet,
};
use crate::{Error, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The five training datasets combined when neither `--dataset` nor `--datasets` is given (§11.2).
pub const DEFAULT_DATASETS: [&str; 5] = ["BUSI", "BUSBRA", "BUS", "BUS_UC", "BUS_UCLM"];
/// `--base-lr` when neither the flag nor the preset's `[phase1] base_lr` sets it (§11.2).
pub const DEFAULT_BASE_LR: f64 = 0.01;
/// Default pretrained encoder (§11.2), used when present.
pub const DEFAULT_VIT_PRETRAINED: &str = "weights/r50-vit-b16.safetensors";

/// Best-checkpoint selection metric (`--best-metric`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BestMetric {
    /// Batch-pooled validation Dice (§10.1), the default.
    Dice,
    /// Per-image mean validation Dice (§10.2).
    DiceImg,
}

impl BestMetric {
    pub fn name(self) -> &'static str {
        match self {
            BestMetric::Dice => "dice",
            BestMetric::DiceImg => "dice_img",
        }
    }
}

impl std::str::FromStr for BestMetric {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "dice" => Ok(BestMetric::Dice),
            "dice_img" | "dice-img" => Ok(BestMetric::DiceImg),
            o => Err(Error::Arg(format!(
                "--best-metric `{o}` is not one of dice, dice_img"
            ))),
        }
    }
}

/// Every flag of SPEC §11.2 and the common flags of §11.1.7. `Option` fields left `None` take the preset's value
/// (precedence: preset < explicit flag).
#[derive(Debug, Clone)]
pub struct Phase1Options {
    pub data_root: PathBuf,
    /// Single-dataset mode (wins over `datasets`).
    pub dataset: Option<String>,
    /// Combined mode; empty with `dataset = None` combines [`DEFAULT_DATASETS`].
    pub datasets: Vec<String>,
    pub fold: u32,
    pub n_splits: u32,
    /// Only `R50-ViT-B_16` is supported.
    pub vit_name: String,
    /// Pretrained encoder (`.npz`, timm or canonical safetensors). `None`: [`DEFAULT_VIT_PRETRAINED`] if present
    /// (paper-sized encoders only), else random (warning). `Some("none")`: random encoder.
    pub vit_pretrained: Option<String>,
    pub img_size: Option<usize>,
    pub num_classes: Option<usize>,
    pub n_skip: Option<usize>,
    pub batch_size: Option<usize>,
    pub max_epochs: Option<usize>,
    /// SGD base rate; `None`: the preset's `[phase1] base_lr`, else 0.01 (§11.2).
    pub base_lr: Option<f64>,
    pub momentum: f64,
    pub weight_decay: f64,
    /// `paper`, `narrow`, `tiny` or a TOML path.
    pub config: String,
    pub output_dir: PathBuf,
    /// Default `{DATASET}/fold_{k}` (combined: `combined/fold_{k}`).
    pub exp_name: Option<String>,
    pub save_every: u64,
    pub best_metric: BestMetric,
    pub no_augment: bool,
    /// `None`: CUDA when built with it and a GPU exists, else CPU.
    pub device: Option<DeviceSpec>,
    pub seed: u64,
    pub num_workers: usize,
    /// `auto` or a checkpoint path.
    pub resume: Option<String>,
    pub force_retrain: bool,
    pub allow_config_change: bool,
    pub val_every: u64,
    pub plain: bool,
    pub ascii: bool,
    /// Stop request (SIGTERM/SIGUSR1 via [`StopFlag::install`]); `None` = never stopped from outside.
    pub stop: Option<StopFlag>,
    /// Behave as if a stop was requested right after this many completed epochs (in total, counting resumed ones):
    /// for tests of the resume guarantee and for time-boxed jobs. `None`: off.
    pub stop_after_epochs: Option<u64>,
}

impl Phase1Options {
    /// The SPEC defaults with `data_root` set.
    pub fn new(data_root: impl Into<PathBuf>) -> Self {
        Phase1Options {
            data_root: data_root.into(),
            dataset: None,
            datasets: Vec::new(),
            fold: 0,
            n_splits: 5,
            vit_name: "R50-ViT-B_16".into(),
            vit_pretrained: None,
            img_size: None,
            num_classes: None,
            n_skip: None,
            batch_size: None,
            max_epochs: None,
            base_lr: None,
            momentum: 0.9,
            weight_decay: 1e-4,
            config: "paper".into(),
            output_dir: PathBuf::from("./checkpoints/transunet"),
            exp_name: None,
            save_every: 50,
            best_metric: BestMetric::Dice,
            no_augment: false,
            device: None,
            seed: 42,
            num_workers: 8,
            resume: None,
            force_retrain: false,
            allow_config_change: false,
            val_every: 1,
            plain: false,
            ascii: false,
            stop: None,
            stop_after_epochs: None,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase1Outcome {
    /// Trained to `max_epochs`.
    Complete {
        run_dir: PathBuf,
        best: Best,
        epochs: u64,
    },
    /// `--resume auto` found a complete run; nothing was trained.
    AlreadyComplete { run_dir: PathBuf },
    /// Stopped at a step boundary (signal or `stop_after_epochs`); `latest` holds `epochs_done` epochs.
    Interrupted { run_dir: PathBuf, epochs_done: u64 },
}

impl Phase1Outcome {
    /// Process exit code: 0, or 75 (`EX_TEMPFAIL`) when interrupted.
    pub fn exit_code(&self) -> i32 {
        match self {
            Phase1Outcome::Interrupted { .. } => EXIT_TEMPFAIL,
            _ => 0,
        }
    }
    pub fn run_dir(&self) -> &Path {
        match self {
            Phase1Outcome::Complete { run_dir, .. }
            | Phase1Outcome::AlreadyComplete { run_dir }
            | Phase1Outcome::Interrupted { run_dir, .. } => run_dir,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Seeded initialisation

/// A `VarBuilder` backend that creates missing variables in a [`VarMap`] from the project RNG instead of candle's
/// unseedable CPU generator: variable `key` draws from `stream_rng(seed, "init", [fnv1a64(key)])` with the
/// distribution of its `Init` hint (uniform, normal via Box–Muller, Kaiming as candle computes it; constants as is).
/// The initialisation therefore depends on the seed and the key only, never on the build order or thread count.
pub struct SeededInit {
    pub varmap: VarMap,
    pub seed: u64,
}

fn normal_pair<R: Rng>(rng: &mut R) -> (f64, f64) {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
    let u2: f64 = rng.gen::<f64>();
    let r = (-2.0 * u1.ln()).sqrt();
    let t = 2.0 * std::f64::consts::PI * u2;
    (r * t.cos(), r * t.sin())
}

fn draw_init(seed: u64, key: &str, shape: &Shape, h: Init) -> Option<Vec<f64>> {
    let n = shape.elem_count();
    let mut rng = crate::rng::stream_rng(seed, "init", &[crate::rng::fnv1a64(key)]);
    let uniform = |rng: &mut rand_chacha::ChaCha8Rng, lo: f64, up: f64| -> Vec<f64> {
        (0..n).map(|_| lo + (up - lo) * rng.gen::<f64>()).collect()
    };
    let normal = |rng: &mut rand_chacha::ChaCha8Rng, mean: f64, std: f64| -> Vec<f64> {
        let mut v = Vec::with_capacity(n + 1);
        while v.len() < n {
            let (a, b) = normal_pair(rng);
            v.push(mean + std * a);
            v.push(mean + std * b);
        }
        v.truncate(n);
        v
    };
    match h {
        Init::Const(_) => None,
        Init::Uniform { lo, up } => Some(uniform(&mut rng, lo, up)),
        Init::Randn { mean, stdev } => Some(normal(&mut rng, mean, stdev)),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            Some(match dist {
                candle_nn::init::NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    uniform(&mut rng, -b, b)
                }
                candle_nn::init::NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
            })
        }
    }
}

impl SimpleBackend for SeededInit {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", v.shape())
            }
            return Ok(v.as_tensor().clone());
        }
        let var = match draw_init(self.seed, name, &s, h) {
            None => h.var(s, dtype, dev)?,
            Some(vals) => {
                let t = Tensor::from_vec(vals, s, &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(dev)?;
                Var::from_tensor(&t)?
            }
        };
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }
    fn get_unchecked(
        &self,
        _name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("`get_unchecked` is not supported by the seeded initialiser")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

/// A trainable TransUNet (canonical §5.3 keys, no prefix) over `varmap`, randomly initialised from the project RNG
/// (`seed`), then — with `pretrained` — the encoder overwritten from an `.npz`, timm or canonical file.
pub fn build_model(
    cfg: &TransUnetConfig,
    varmap: &VarMap,
    seed: u64,
    device: &Device,
    pretrained: Option<&Path>,
) -> Result<TransUnet> {
    let backend = SeededInit {
        varmap: varmap.clone(),
        seed: crate::rng::mix(seed, "init-transunet", &[]),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
    let model = TransUnet::new(cfg, vb)?;
    if let Some(p) = pretrained {
        let enc: HashMap<String, Tensor> = load_pretrained_encoder(p, cfg)?.into_iter().collect();
        load_into_varmap(&model, varmap, &enc, LoadMode::Encoder)
            .map_err(|e| Error::file(p, e.to_string()))?;
    }
    Ok(model)
}

/// The single SGD parameter group `transunet` over every variable of `varmap`, sorted by key.
pub fn make_optimizer(
    varmap: &VarMap,
    base_lr: f64,
    momentum: f64,
    weight_decay: f64,
) -> Result<Sgd> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::msg("VarMap lock poisoned"))?;
    let mut params: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    drop(data);
    params.sort_by(|a, b| a.0.cmp(&b.0));
    Sgd::new(
        vec![ParamGroup::new("transunet", base_lr, weight_decay, params)],
        momentum,
    )
}

// ---------------------------------------------------------------------------------------------------------------
// Steps

/// What one training step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutput {
    pub loss: f64,
    pub ce: f64,
    pub dice_loss: f64,
    pub metrics: PooledMetrics,
}

/// Foreground probability `softmax(logits)[:, 1]` as `(B,S,S)` (detached).
pub fn foreground_prob(logits: &Tensor) -> Result<Tensor> {
    Ok(softmax(&logits.detach(), 1)?.narrow(1, 1, 1)?.squeeze(1)?)
}

/// One Phase 1 optimiser step — exactly what the trainer does per batch (and what the `transunet-train-step` bench
/// times): train-mode forward with dropout seed `dropout_seed`, §9.1 loss, backward, the poly rate for this step
/// (`schedule.before_step`), SGD update; plus the §10.1 pooled metrics of the batch. `images (B,1,S,S)`,
/// `masks (B,S,S)` on the model's device.
pub fn train_step(
    model: &TransUnet,
    opt: &mut Sgd,
    schedule: &mut Schedule,
    images: &Tensor,
    masks: &Tensor,
    dropout_seed: Option<u64>,
) -> Result<StepOutput> {
    let logits = model.forward_t(images, true, dropout_seed)?;
    let loss = phase1_loss(&logits, masks)?;
    let store = loss.total.backward()?;
    let grads = Grads::from_store(&store, opt.groups())?;
    drop(store);
    schedule.before_step(opt);
    opt.step(&grads)?;
    let metrics = PooledMetrics::from_batch(&foreground_prob(&logits)?, masks)?;
    let comps = loss.component_values()?;
    let get = |n: &str| {
        comps
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| *v)
            .unwrap_or(f64::NAN)
    };
    Ok(StepOutput {
        loss: loss.total_f64()?,
        ce: get("ce"),
        dice_loss: get("dice"),
        metrics,
    })
}

/// Per-image Dice (§10.2, threshold 0.5, empty-mask policy) of every sample of a batch.
pub fn per_image_dice(prob: &Tensor, masks: &Tensor) -> Result<Vec<f64>> {
    let b = prob.dim(0)?;
    let p: Vec<f32> = prob.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let t: Vec<f32> = masks.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let n = p.len() / b.max(1);
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let pm: Vec<bool> = p[i * n..(i + 1) * n].iter().map(|&v| v > 0.5).collect();
        let tm: Vec<bool> = t[i * n..(i + 1) * n].iter().map(|&v| v > 0.5).collect();
        out.push(RatioMetrics::from_confusion(&Confusion::from_masks(&pm, &tm)?).dice);
    }
    Ok(out)
}

/// Validation results of one epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Validation {
    pub loss: f64,
    pub metrics: PooledMetrics,
    pub dice_img: f64,
}

/// Eval-mode pass over `loader` (epoch 0 order, no augmentation): mean batch loss, mean of the per-batch pooled
/// metrics (§10.1) and mean per-image Dice.
pub fn validate(
    model: &TransUnet,
    loader: &Loader,
    device: &Device,
    progress: Option<(&Console, u64, u64)>,
) -> Result<Validation> {
    let mut tr = MeanTracker::new();
    let mut dices = Vec::new();
    let n = loader.num_batches() as u64;
    let mut bar = progress.map(|(c, e, ne)| c.progress("val", Some((e, ne)), n));
    for batch in loader.epoch(0) {
        let batch = batch?.to_device(device)?;
        let logits = model.forward_t(&batch.images, false, None)?;
        let loss = scalar_f64(&phase1_loss(&logits, &batch.masks)?.total)?;
        let prob = foreground_prob(&logits)?;
        tr.add("loss", loss);
        tr.add_pooled("", &PooledMetrics::from_batch(&prob, &batch.masks)?);
        dices.extend(per_image_dice(&prob, &batch.masks)?);
        if let Some(b) = bar.as_mut() {
            b.step(Some(loss));
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    let m = |k: &str| tr.mean(k).unwrap_or(f64::NAN);
    Ok(Validation {
        loss: m("loss"),
        metrics: tr.pooled_mean(""),
        dice_img: if dices.is_empty() {
            f64::NAN
        } else {
            dices.iter().sum::<f64>() / dices.len() as f64
        },
    })
}

// ---------------------------------------------------------------------------------------------------------------
// The run

struct Resolved {
    cfg: Config,
    datasets: Vec<String>,
    combined: bool,
    exp_name: String,
    max_epochs: u64,
    batch_size: usize,
    base_lr: f64,
}

fn resolve(o: &Phase1Options) -> Result<Resolved> {
    if o.vit_name != "R50-ViT-B_16" {
        return Err(Error::Arg(format!(
            "--vit-name `{}` is not supported (only R50-ViT-B_16)",
            o.vit_name
        )));
    }
    let mut cfg = Config::load(&o.config)?;
    {
        let t = &mut cfg.model.transunet;
        if let Some(v) = o.img_size {
            t.img_size = v;
        }
        if let Some(v) = o.num_classes {
            t.n_classes = v;
        }
        if let Some(v) = o.n_skip {
            t.n_skip = v;
        }
    }
    if let Some(v) = o.max_epochs {
        cfg.phase1.max_epochs = v;
    }
    if let Some(v) = o.batch_size {
        cfg.phase1.batch_size = v;
    }
    if let Some(v) = o.base_lr {
        cfg.phase1.base_lr = Some(v);
    }
    cfg.data.n_splits = o.n_splits as usize;
    cfg.validate()
        .map_err(|e| Error::Config(format!("{}: {e}", o.config)))?;
    crate::models::transunet::validate_config(&cfg.model.transunet)?;
    if cfg.model.transunet.n_classes != 2 {
        return Err(Error::Arg(format!(
            "--num-classes {}: the Phase 1 loss and metrics are binary (2 classes)",
            cfg.model.transunet.n_classes
        )));
    }
    if cfg.phase1.batch_size == 0 {
        return Err(Error::Arg("--batch-size must be at least 1".into()));
    }
    if o.n_splits < 2 || o.fold >= o.n_splits {
        return Err(Error::Arg(format!(
            "--fold {} must be below --n-splits {} (≥ 2)",
            o.fold, o.n_splits
        )));
    }
    if o.val_every == 0 {
        return Err(Error::Arg("--val-every must be at least 1".into()));
    }
    let (datasets, combined, exp_name) = resolve_datasets(
        o.dataset.as_deref(),
        &o.datasets,
        o.fold,
        o.exp_name.as_deref(),
    )?;
    Ok(Resolved {
        max_epochs: cfg.phase1.max_epochs as u64,
        batch_size: cfg.phase1.batch_size,
        base_lr: cfg.phase1.base_lr.unwrap_or(DEFAULT_BASE_LR),
        cfg,
        datasets,
        combined,
        exp_name,
    })
}

/// `--dataset` / `--datasets` of Phases 1 and 3 (§11.2): the canonical dataset names, whether they are combined, and
/// the experiment name (`exp_name`, else `{DATASET}/fold_{k}` or `combined/fold_{k}`).
pub(crate) fn resolve_datasets(
    dataset: Option<&str>,
    datasets: &[String],
    fold: u32,
    exp_name: Option<&str>,
) -> Result<(Vec<String>, bool, String)> {
    let (datasets, combined): (Vec<String>, bool) = match (dataset, datasets.is_empty()) {
        (Some(d), _) => (
            vec![crate::data::DatasetKind::parse(d)?.name().to_string()],
            false,
        ),
        (None, false) => {
            let v: Vec<String> = crate::data::parse_dataset_list(datasets)?
                .into_iter()
                .map(|k| k.name().to_string())
                .collect();
            let c = v.len() > 1;
            (v, c)
        }
        (None, true) => (
            DEFAULT_DATASETS.iter().map(|s| s.to_string()).collect(),
            true,
        ),
    };
    let exp_name = match exp_name {
        Some(e) => e.to_string(),
        None if combined => format!("combined/fold_{fold}"),
        None => format!("{}/fold_{fold}", datasets[0]),
    };
    Ok((datasets, combined, exp_name))
}

fn pretrained_path(o: &Phase1Options, cfg: &TransUnetConfig) -> Option<PathBuf> {
    match o.vit_pretrained.as_deref() {
        Some("none") | Some("") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => {
            let p = PathBuf::from(DEFAULT_VIT_PRETRAINED);
            if !p.is_file() {
                tracing::warn!("no pretrained encoder ({DEFAULT_VIT_PRETRAINED} not found): the encoder starts random");
                None
            } else if cfg.hidden_size != 768 || cfg.num_layers != 12 {
                tracing::warn!(
                    "{DEFAULT_VIT_PRETRAINED} is paper-sized; this preset's encoder starts random"
                );
                None
            } else {
                Some(p)
            }
        }
    }
}

fn training_json(o: &Phase1Options, r: &Resolved) -> serde_json::Value {
    serde_json::json!({
        "base_lr": r.base_lr,
        "momentum": o.momentum,
        "weight_decay": o.weight_decay,
        "batch_size": r.batch_size,
        "max_epochs": r.max_epochs,
        "best_metric": o.best_metric.name(),
        "augment": !o.no_augment,
        "val_every": o.val_every,
        "seed": o.seed,
        "schedule": "poly(0.9) per step",
    })
}

/// Errors unless every dataset's `splits.json` was prepared with `n_splits` folds.
pub(crate) fn check_n_splits(root: &Path, datasets: &[String], n_splits: u32) -> Result<()> {
    for d in datasets {
        let sp = crate::data::splits::SplitsFile::read(&root.join(d).join("splits.json"))?;
        if sp.n_splits != n_splits as usize {
            return Err(Error::Arg(format!(
                "--n-splits {n_splits}: {d}/splits.json was prepared with {} folds",
                sp.n_splits
            )));
        }
    }
    Ok(())
}

pub(crate) fn splits_identity(root: &Path, datasets: &[String]) -> Result<String> {
    let mut parts = Vec::new();
    for d in datasets {
        parts.push(sha256_file(&root.join(d).join("splits.json"))?);
    }
    Ok(if parts.len() == 1 {
        parts.remove(0)
    } else {
        crate::data::sha256_hex(parts.join(",").as_bytes())
    })
}

fn resolved_toml(r: &Resolved, o: &Phase1Options, training: &serde_json::Value) -> Result<String> {
    let mut s =
        String::from("# Resolved configuration of this phase1 run (preset < explicit flags).\n");
    s += "# Training hyper-parameters (CLI):\n";
    if let serde_json::Value::Object(m) = training {
        for (k, v) in m {
            s += &format!("#   {k} = {v}\n");
        }
    }
    s += &format!(
        "#   datasets = {:?}\n#   fold = {}\n#   n_splits = {}\n\n",
        r.datasets, o.fold, o.n_splits
    );
    s += &r.cfg.to_toml_string()?;
    Ok(s)
}

/// Runs Phase 1 with `o`. Errors after the run directory exists also mark `summary.json` as `failed`.
pub fn run(o: &Phase1Options) -> Result<Phase1Outcome> {
    let r = resolve(o)?;
    let run = RunDir::new(&o.output_dir, &r.exp_name);
    let decision = resolve_resume(&run, o.resume.as_deref(), o.force_retrain)?;
    let style = Style::detect(o.plain, o.ascii);
    if decision == ResumeDecision::AlreadyComplete {
        let c = Console::new(style);
        c.print(&format!(
            "{}: already complete (use --force-retrain to train again)",
            run.root().display()
        ));
        return Ok(Phase1Outcome::AlreadyComplete {
            run_dir: run.root().to_path_buf(),
        });
    }
    run.create()?;
    let started = Instant::now();
    let device_spec = o.device.unwrap_or_else(DeviceSpec::default_for_build);
    let res = train(o, &r, &run, decision, style, started, device_spec);
    if let Err(e) = &res {
        let prev = run.read_summary().ok().flatten();
        let s = Summary {
            status: RunStatus::Failed,
            kind: Phase::Phase1,
            experiment: r.exp_name.clone(),
            best: prev
                .as_ref()
                .map(|p| p.best.clone())
                .unwrap_or_else(|| Best::new(o.best_metric.name())),
            final_metrics: prev.as_ref().and_then(|p| p.final_metrics.clone()),
            epochs: prev.as_ref().map(|p| p.epochs).unwrap_or(0),
            max_epochs: r.max_epochs,
            durations: prev.as_ref().map(|p| p.durations).unwrap_or_default(),
            device: device_spec.to_string(),
            versions: Versions::default(),
            updated: super::checkpoint::now_rfc3339(),
            message: Some(e.to_string()),
        };
        let _ = run.write_summary(&s);
    }
    res
}

#[allow(clippy::too_many_arguments)]
fn summary(
    status: RunStatus,
    r: &Resolved,
    best: &Best,
    history: &[HistoryRow],
    started: Instant,
    device: DeviceSpec,
    message: Option<String>,
) -> Summary {
    Summary {
        status,
        kind: Phase::Phase1,
        experiment: r.exp_name.clone(),
        best: best.clone(),
        final_metrics: history.last().cloned(),
        epochs: history.len() as u64,
        max_epochs: r.max_epochs,
        durations: Durations::from_history(history, started.elapsed().as_secs_f64()),
        device: device.to_string(),
        versions: Versions::default(),
        updated: super::checkpoint::now_rfc3339(),
        message,
    }
}

/// A JSON value as it reads back from a file (floats normalised by one text round trip), for comparisons with
/// values loaded from sidecars.
pub(crate) fn json_norm(v: &serde_json::Value) -> serde_json::Value {
    serde_json::from_str(&v.to_string()).unwrap_or_else(|_| v.clone())
}

fn train(
    o: &Phase1Options,
    r: &Resolved,
    run: &RunDir,
    decision: ResumeDecision,
    style: Style,
    started: Instant,
    device_spec: DeviceSpec,
) -> Result<Phase1Outcome> {
    let device = device_spec.open()?;
    let console = Console::new(style);
    console.open_log(&run.log_path())?;
    let tcfg = &r.cfg.model.transunet;
    let s = tcfg.img_size;

    // Data (the test split is never read).
    let mut train_ds = SegDataset::open(
        &o.data_root,
        &r.datasets,
        Split::FoldTrain(o.fold as usize),
        s,
    )?;
    if !o.no_augment {
        train_ds = train_ds.with_augmentation(o.seed);
    }
    let val_ds = SegDataset::open(
        &o.data_root,
        &r.datasets,
        Split::FoldVal(o.fold as usize),
        s,
    )?;
    check_n_splits(&o.data_root, &r.datasets, o.n_splits)?;
    let (n_train, n_val) = (train_ds.entries().len(), val_ds.entries().len());
    if n_train < r.batch_size {
        return Err(Error::Arg(format!(
            "fold {} has {n_train} training samples, fewer than --batch-size {} (the last partial batch is dropped)",
            o.fold, r.batch_size
        )));
    }
    if n_val == 0 {
        return Err(Error::Arg(format!(
            "fold {} has no validation samples",
            o.fold
        )));
    }
    let workers = o.num_workers.max(1);
    let train_loader = Loader::new(
        Arc::new(train_ds),
        LoaderOptions::train(r.batch_size, o.seed).with_workers(workers),
    )?;
    let val_loader = Loader::new(
        Arc::new(val_ds),
        LoaderOptions::eval(r.batch_size).with_workers(workers),
    )?;
    let steps = train_loader.num_batches() as u64;

    // Model, optimiser, schedule.
    let varmap = VarMap::new();
    let pretrained = match &decision {
        ResumeDecision::Resume(_) => None,
        _ => pretrained_path(o, tcfg),
    };
    let model = build_model(tcfg, &varmap, o.seed, &device, pretrained.as_deref())?;
    let mut opt = make_optimizer(&varmap, r.base_lr, o.momentum, o.weight_decay)?;
    let mut schedule = Schedule::poly(r.max_epochs, steps);
    let training = training_json(o, r);
    let model_json = serde_json::to_value(&r.cfg.model).map_err(|e| Error::msg(e.to_string()))?;
    let config_json = serde_json::json!({
        "preset": r.cfg.preset,
        "model": model_json,
        "data": { "datasets": r.datasets, "fold": o.fold, "n_splits": o.n_splits, "data_root": o.data_root,
                  "img_size": s },
        "training": training,
        "cli": { "config": o.config, "output_dir": o.output_dir, "exp_name": r.exp_name, "device": device_spec.to_string(),
                 "num_workers": o.num_workers, "save_every": o.save_every },
    });
    let data_id = DataIdentity {
        datasets: r.datasets.clone(),
        fold: Some(o.fold),
        n_splits: Some(o.n_splits),
        splits_sha256: Some(splits_identity(&o.data_root, &r.datasets)?),
        manifest_sha256: None,
    };
    let mut init_weights = Vec::new();
    if let Some(p) = &pretrained {
        init_weights.push(WeightSource {
            role: "vit_pretrained".into(),
            path: p.display().to_string(),
            sha256: sha256_file(p).ok(),
            provenance: "encoder (.npz / timm / canonical)".into(),
        });
    }

    let mut best = Best::new(o.best_metric.name());
    let mut history: Vec<HistoryRow> = Vec::new();
    let mut start_epoch = 0u64;
    let mut global_step = 0u64;
    let mut pending_note: Option<String> = None;
    if let ResumeDecision::Resume(path) = &decision {
        let ck = load_checkpoint(path, &device)?;
        let sc = &ck.sidecar;
        if sc.kind != Phase::Phase1 {
            return Err(Error::file(
                path,
                format!("is a {} checkpoint, not phase1", sc.kind.as_str()),
            ));
        }
        if json_norm(&sc.config["model"]) != json_norm(&model_json) {
            return Err(Error::file(
                path,
                "its model configuration differs from this run's (--config / --img-size …)",
            ));
        }
        if sc.data != data_id {
            return Err(Error::file(
                path,
                format!("was trained on other data ({:?} fold {:?}, splits {:?}); this run uses {:?} fold {}", sc.data.datasets, sc.data.fold, sc.data.splits_sha256, data_id.datasets, o.fold),
            ));
        }
        if json_norm(&sc.config["training"]) != json_norm(&training) {
            if !o.allow_config_change {
                return Err(Error::file(
                    path,
                    format!(
                        "training hyper-parameters differ from the checkpoint's ({} vs {}); pass --allow-config-change to resume anyway",
                        sc.config["training"], training
                    ),
                ));
            }
            pending_note = Some(format!(
                "config changed on resume: {} -> {}",
                sc.config["training"], training
            ));
        }
        load_into_varmap(&model, &varmap, &ck.model, LoadMode::Strict)
            .map_err(|e| Error::file(path, e.to_string()))?;
        check_groups_match(&opt, &sc.optimizer)?;
        opt.load_state(&ck.optim)?;
        match (&sc.scheduler, &mut schedule) {
            (
                Schedule::Poly {
                    position,
                    total_steps,
                    ..
                },
                Schedule::Poly {
                    position: p,
                    total_steps: t,
                    ..
                },
            ) => {
                if total_steps != t && !o.allow_config_change {
                    return Err(Error::file(
                        path,
                        format!("its schedule spans {total_steps} steps, this run's {t} (epochs or steps per epoch changed); pass --allow-config-change to resume anyway"),
                    ));
                }
                *p = *position;
            }
            _ => {
                return Err(Error::file(
                    path,
                    "its scheduler is not the Phase 1 poly schedule",
                ))
            }
        }
        start_epoch = sc.epoch + 1;
        global_step = sc.global_step;
        best = sc.best.clone();
        history = sc.history.clone();
        init_weights = sc.init_weights.clone();
        console.log_only(&format!(
            "resumed from {} after epoch {}",
            path.display(),
            sc.epoch + 1
        ));
    }
    run.write_config(&resolved_toml(r, o, &training)?)?;

    let ds_label = if r.combined {
        crate::data::combined_name(&r.datasets)
    } else {
        r.datasets[0].clone()
    };
    let exp_label = if r.combined {
        format!("combined_fold{}", o.fold)
    } else {
        format!("{}_fold{}", r.datasets[0], o.fold)
    };
    console.print(&run_header(
        &RunHeader {
            experiment: exp_label.clone(),
            dataset: ds_label,
            fold: Some((o.fold, o.n_splits)),
            n_train,
            n_val,
            extra: vec![],
        },
        &style,
    ));
    run.write_summary(&summary(
        RunStatus::Running,
        r,
        &best,
        &history,
        started,
        device_spec,
        None,
    ))?;

    let make_sidecar =
        |epoch: u64, gs: u64, best: &Best, opt: &Sgd, sched: &Schedule, hist: &[HistoryRow]| {
            let mut sc = Sidecar::new(
                Phase::Phase1,
                epoch,
                gs,
                best.clone(),
                config_json.clone(),
                data_id.clone(),
                opt.info(),
                sched.clone(),
                RngState {
                    seed: o.seed,
                    next_epoch: epoch + 1,
                },
                hist.to_vec(),
            );
            sc.init_weights = init_weights.clone();
            sc
        };
    let save = |stem: &str, sc: &Sidecar, opt: &Sgd| -> Result<()> {
        let model_t: HashMap<String, Tensor> = state_dict(&model, &varmap)?.into_iter().collect();
        save_checkpoint(run.root(), stem, &model_t, &opt.state_tensors()?, sc)?;
        Ok(())
    };
    let interrupted = |epochs_done: u64,
                       best: &Best,
                       history: &[HistoryRow],
                       why: &str|
     -> Result<Phase1Outcome> {
        console.print(&format!(
            "stopped ({why}); latest holds epoch {epochs_done}: resume with --resume auto"
        ));
        run.write_summary(&summary(
            RunStatus::Interrupted,
            r,
            best,
            history,
            started,
            device_spec,
            Some(why.into()),
        ))?;
        Ok(Phase1Outcome::Interrupted {
            run_dir: run.root().to_path_buf(),
            epochs_done,
        })
    };
    let stop_requested = || o.stop.as_ref().is_some_and(|s| s.is_set());

    for epoch in start_epoch..r.max_epochs {
        if o.stop_after_epochs.is_some_and(|n| epoch >= n) {
            return interrupted(
                epoch,
                &best,
                &history,
                "stop requested after a completed epoch",
            );
        }
        let t0 = Instant::now();
        let e1 = epoch + 1;
        let mut tr = MeanTracker::new();
        let mut bar = console.progress("train", Some((e1, r.max_epochs)), steps);
        let mut last_lr = opt.lrs()[0].1;
        for (step, batch) in train_loader.epoch(epoch).enumerate() {
            if stop_requested() {
                drop(bar);
                return interrupted(epoch, &best, &history, "signal");
            }
            let batch = batch?.to_device(&device)?;
            let seed = crate::rng::mix(o.seed, "dropout", &[epoch, step as u64]);
            let out = train_step(
                &model,
                &mut opt,
                &mut schedule,
                &batch.images,
                &batch.masks,
                Some(seed),
            )?;
            global_step += 1;
            last_lr = opt.lrs()[0].1;
            if !out.loss.is_finite() {
                return Err(Error::msg(format!(
                    "training loss is {} at epoch {e1} step {}",
                    out.loss,
                    step + 1
                )));
            }
            tr.add("loss", out.loss);
            tr.add("ce", out.ce);
            tr.add("dice_loss", out.dice_loss);
            tr.add_pooled("", &out.metrics);
            bar.step(Some(out.loss));
        }
        bar.finish();
        if stop_requested() {
            return interrupted(epoch, &best, &history, "signal");
        }
        let do_val = e1 % o.val_every == 0 || e1 == r.max_epochs;
        let val = if do_val {
            Some(validate(
                &model,
                &val_loader,
                &device,
                Some((&console, e1, r.max_epochs)),
            )?)
        } else {
            None
        };
        let is_best = match &val {
            Some(v) => best.update(
                match o.best_metric {
                    BestMetric::Dice => v.metrics.dice,
                    BestMetric::DiceImg => v.dice_img,
                },
                epoch,
            ),
            None => false,
        };
        let m = |k: &str| tr.mean(k);
        let row = HistoryRow {
            epoch: e1,
            time_s: t0.elapsed().as_secs_f64(),
            lr: Named(vec![("transunet".into(), last_lr)]),
            train_loss: m("loss"),
            components: Named(vec![
                ("ce".into(), m("ce").unwrap_or(f64::NAN)),
                ("dice_loss".into(), m("dice_loss").unwrap_or(f64::NAN)),
            ]),
            train_dice: m("dice"),
            train_iou: m("iou"),
            val_loss: val.map(|v| v.loss),
            val_dice: val.map(|v| v.metrics.dice),
            val_iou: val.map(|v| v.metrics.iou),
            val_precision: val.map(|v| v.metrics.precision),
            val_recall: val.map(|v| v.metrics.recall),
            val_accuracy: val.map(|v| v.metrics.accuracy),
            val_specificity: val.map(|v| v.metrics.specificity),
            val_dice_img: val.map(|v| v.dice_img),
            extra: Named::new(),
            is_best,
            note: pending_note.take(),
        };
        history.push(row);
        let sc = make_sidecar(epoch, global_step, &best, &opt, &schedule, &history);
        if is_best {
            save(BEST, &sc, &opt)?;
        }
        if o.save_every > 0 && e1 % o.save_every == 0 {
            save(&epoch_stem(e1), &sc, &opt)?;
        }
        save(LATEST, &sc, &opt)?;
        run.write_metrics_csv(&history)?;
        if let Err(e) = run.write_progress_png(&history, &exp_label) {
            tracing::warn!("progress.png not written: {e}");
        }
        run.write_summary(&summary(
            RunStatus::Running,
            r,
            &best,
            &history,
            started,
            device_spec,
            None,
        ))?;
        console.print(&epoch_report(
            &EpochReport {
                epoch: e1,
                epochs: r.max_epochs,
                train: TrainReport {
                    loss: m("loss").unwrap_or(f64::NAN),
                    components: vec![],
                    dice: m("dice"),
                    iou: m("iou"),
                    lrs: vec![("transunet".into(), last_lr)],
                },
                validation: val.map(|v| {
                    ValidationTable::Single(single_rows(&v.metrics, Some(v.dice_img), v.loss))
                }),
                is_best,
                comparison: None,
            },
            &style,
        ));
    }

    // Final state (also reached when resuming a run whose last epoch is done).
    let last = r.max_epochs.saturating_sub(1);
    let sc = make_sidecar(last, global_step, &best, &opt, &schedule, &history);
    save(FINAL, &sc, &opt)?;
    run.write_metrics_csv(&history)?;
    run.write_summary(&summary(
        RunStatus::Complete,
        r,
        &best,
        &history,
        started,
        device_spec,
        None,
    ))?;
    let label = match o.best_metric {
        BestMetric::Dice => "Best Dice Score",
        BestMetric::DiceImg => "Best Dice (per-img)",
    };
    console.print(&end_of_run(
        label,
        best.value,
        best.epoch.map(|e| e + 1),
        &run.checkpoint(BEST).0,
        &style,
    ));
    Ok(Phase1Outcome::Complete {
        run_dir: run.root().to_path_buf(),
        best,
        epochs: history.len() as u64,
    })
}
