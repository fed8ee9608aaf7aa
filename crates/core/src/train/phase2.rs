//! Phase 2 trainer (SPEC §11.3): the SAM refiner (prompt encoder + mask decoder) trained on simulated TransUNet
//! failures produced by `augment synthetic` (§8.9 layout), with the frozen image encoder behind the embedding cache
//! (one encoder forward per distinct source image), the §9.2 loss, §10.5 validation on held-out *source images*, the
//! §12 console report and the §11.1 run directory (checkpoints, `best_sam.safetensors`, metrics, exact resume).
//!
//! Options: LoRA on the image encoder (§6.8; the cache is then off and the encoder runs in every step), the curriculum
//! and Option B real-data mixing (§11.3 step 4, [`compose`]), `--val-every`, the on-disk embedding cache and
//! `--embed-cache off` (encoder in every step).
//!
//! ROI-crop mode (§7.7, `use_roi_crop`): the encoder runs in every step on the ROI crop of each sample (the crop
//! depends on the coarse mask), so the embedding cache is off.
//!
//! Entry point: [`run`] with [`Phase2Options`].
pub mod compose;
pub mod data;

pub use data::{load_data, load_data_mixed, CoarseMasks, Phase2Data};

use crate::config::{Config, SamConfig};
use crate::models::sam::weights::{load_sam_weights, random_weights, SamFormat, SamWeights};
use crate::models::sam::{EmbeddingCache, LoraConfig, LoraTarget, Sam};
use crate::refiner::preprocess::{preprocess, preprocess_phase2_batch};
use crate::refiner::{MaskPromptStyle, SamRefiner, SamRefinerSettings};
use crate::train::checkpoint::{
    atomic_write_json, load_checkpoint, save_checkpoint, Best, DataIdentity, Phase, RngState,
    Sidecar,
};
use crate::train::console::{
    self, Console, EpochReport, RunHeader, Style, TrainReport, ValidationTable,
};
use crate::train::history::{HistoryRow, Named};
use crate::train::losses::{phase2_loss, Phase2LossConfig};
use crate::train::metrics::{MeanTracker, Phase2Validation, PooledMetrics};
use crate::train::optim::{AdamW, Grads, Optimizer, ParamGroup};
use crate::train::rundir::{
    resolve_resume, Durations, ResumeDecision, RunDir, RunStatus, Summary, Versions, BEST, FINAL,
    LATEST,
};
use crate::train::schedule::Schedule;
use crate::train::signals::StopFlag;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Prefix of the SAM tensors in the full Phase 2 checkpoint (§11.1.4).
pub const SAM_PREFIX: &str = "sam.";

/// All options of the `phase2` binary (SPEC §11.3). `None` = preset / SPEC default.
#[derive(Debug, Clone)]
pub struct Phase2Options {
    pub data_root: PathBuf,
    pub dataset: String,
    pub processed_root: PathBuf,
    /// A §6.6 checkpoint path, or `random` (deterministic random weights from `--seed`; tests and demos only).
    pub sam_checkpoint: String,
    /// Preset name (`paper`, `narrow`, `tiny`) or TOML path; gives the SAM architecture and the refiner defaults.
    pub config: String,
    pub epochs: Option<usize>,
    pub batch_size: Option<usize>,
    pub lr: f64,
    pub weight_decay: f64,
    pub min_lr: f64,
    pub mask_prompt_style: Option<String>,
    pub change_penalty_weight: f64,
    pub iou_loss_weight: f64,
    pub val_fraction: f64,
    pub transunet_img_size: usize,
    pub max_samples: Option<usize>,
    pub no_point_prompt: bool,
    pub no_box_prompt: bool,
    pub no_mask_prompt: bool,
    pub no_negative_point: bool,
    /// `auto|sam|unit` (§7.1).
    pub sam_normalization: String,
    pub grad_clip: f64,
    pub grad_accum: usize,
    pub output_dir: PathBuf,
    pub save_every: usize,
    pub device: Option<String>,
    pub seed: u64,
    pub resume: Option<String>,
    pub force_retrain: bool,
    pub plain: bool,
    pub ascii: bool,
    /// Do not print to stdout (train.log is still written). For tests.
    pub quiet: bool,
    /// Stop cleanly (as on SIGTERM) after this many epochs of this session. For tests of resume.
    pub stop_after_epochs: Option<usize>,
    /// `vit_b` (the only supported value).
    pub sam_model_type: String,
    /// LoRA on the image encoder (§6.8): rank, α, dropout, targets (`qkv`, `proj`, `mlp`, comma-separated).
    pub use_lora: bool,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_targets: String,
    /// Curriculum (§11.3 step 4).
    pub curriculum: bool,
    /// Validate every this many epochs (and always after the last epoch).
    pub val_every: usize,
    /// Option B: a real-prediction run directory (§8.9 layout, e.g. `<RUN>_oof`) mixed in with `real_ratio`.
    pub real_data: Option<PathBuf>,
    pub real_ratio: f64,
    /// Embedding cache on (default; encoder once per source) or off (encoder in every step).
    pub embed_cache: bool,
    /// On-disk cache folder (entries under `<dir>/<fingerprint>/`); `None` = memory only.
    pub embed_cache_dir: Option<PathBuf>,
    /// In-memory LRU bound in bytes.
    pub embed_cache_mem: usize,
    /// `bf16|f32` [default: bf16 on CUDA, f32 on CPU].
    pub encoder_dtype: Option<String>,
    /// ROI-crop mode (§7.7) and its expand ratio (default 0.2).
    pub use_roi_crop: bool,
    pub roi_expand_ratio: f64,
}

impl Default for Phase2Options {
    fn default() -> Self {
        Phase2Options {
            data_root: PathBuf::from("./dataset/augmented"),
            dataset: String::new(),
            processed_root: PathBuf::from("./dataset/processed"),
            sam_checkpoint: String::new(),
            config: "paper".into(),
            epochs: None,
            batch_size: None,
            lr: 1e-4,
            weight_decay: 0.01,
            min_lr: 1e-6,
            mask_prompt_style: None,
            change_penalty_weight: 0.1,
            iou_loss_weight: 1.0,
            val_fraction: 0.1,
            transunet_img_size: 224,
            max_samples: None,
            no_point_prompt: false,
            no_box_prompt: false,
            no_mask_prompt: false,
            no_negative_point: false,
            sam_normalization: "auto".into(),
            grad_clip: 0.0,
            grad_accum: 1,
            output_dir: PathBuf::from("./checkpoints/sam_finetuned"),
            save_every: 5,
            device: None,
            seed: 42,
            resume: None,
            force_retrain: false,
            plain: false,
            ascii: false,
            quiet: false,
            stop_after_epochs: None,
            sam_model_type: "vit_b".into(),
            use_lora: false,
            lora_rank: 4,
            lora_alpha: 4.0,
            lora_dropout: 0.0,
            lora_targets: "qkv".into(),
            curriculum: false,
            val_every: 1,
            real_data: None,
            real_ratio: 0.0,
            embed_cache: true,
            embed_cache_dir: None,
            embed_cache_mem: 8 << 30,
            encoder_dtype: None,
            use_roi_crop: false,
            roi_expand_ratio: crate::refiner::roi::DEFAULT_EXPAND_RATIO,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase2Status {
    Complete,
    /// `--resume auto` found a complete run.
    AlreadyComplete,
    /// Stopped by a signal (or `stop_after_epochs`); the binary exits 75.
    Interrupted,
}

/// Result of [`run`].
#[derive(Debug, Clone)]
pub struct Phase2Outcome {
    pub status: Phase2Status,
    pub run_dir: PathBuf,
    pub history: Vec<HistoryRow>,
    pub best: Best,
    /// Image-encoder forwards (images encoded) in this session.
    pub encoder_forwards: usize,
    /// Distinct source images used (train + validation).
    pub n_sources: usize,
    pub n_train: usize,
    pub n_val: usize,
    /// `dataset/name` of training and validation sources.
    pub train_sources: Vec<String>,
    pub val_sources: Vec<String>,
}

/// §11.3 step 2: per dataset, sorted source names shuffled with `("phase2-val", dataset index)`;
/// `max(1, ⌈f·n⌉)` validation sources (at most `n − 1`). Returns a flag per source (true = validation).
pub fn split_sources(
    sources: &[(String, String)],
    val_fraction: f64,
    seed: u64,
) -> Result<Vec<bool>> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(Error::Arg(format!(
            "--val-fraction must be in [0, 1), got {val_fraction}"
        )));
    }
    let mut per_ds: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, (d, _)) in sources.iter().enumerate() {
        per_ds.entry(d.as_str()).or_default().push(i);
    }
    let mut is_val = vec![false; sources.len()];
    for (k, (d, mut idx)) in per_ds.into_iter().enumerate() {
        idx.sort_by(|a, b| sources[*a].1.cmp(&sources[*b].1));
        let n = idx.len();
        if n < 2 {
            return Err(Error::Arg(format!(
                "dataset {d}: {n} source image(s); a validation split by source needs at least 2"
            )));
        }
        let mut rng = crate::rng::stream_rng(seed, "phase2-val", &[k as u64]);
        idx.shuffle(&mut rng);
        let nv = ((val_fraction * n as f64).ceil() as usize)
            .max(1)
            .min(n - 1);
        for &i in &idx[..nv] {
            is_val[i] = true;
        }
    }
    Ok(is_val)
}

fn sam_provenance(ckpt: &str) -> &'static str {
    if ckpt == "random" {
        "random"
    } else if ckpt.to_ascii_lowercase().contains("medsam") {
        "medsam"
    } else {
        "sam"
    }
}

fn load_initial_weights(
    opts: &Phase2Options,
    cfg: &SamConfig,
    dev: &Device,
) -> Result<(SamWeights, String)> {
    if opts.sam_checkpoint == "random" {
        let t = random_weights(cfg, opts.seed, dev)?;
        Ok((
            SamWeights {
                tensors: t,
                format: SamFormat::Original,
            },
            format!("random-seed{}", opts.seed),
        ))
    } else if opts.sam_checkpoint.is_empty() {
        Err(Error::Arg(
            "--sam-checkpoint is required (a SAM/MedSAM checkpoint path, or `random` for a demo)"
                .into(),
        ))
    } else {
        // A path, or a fetch alias (`sam-vit-b`, `medsam-vit-b`) resolved in the weights folder (SPEC §13.6).
        let p = crate::hub::resolve_weights_arg(
            &opts.sam_checkpoint,
            Path::new(crate::hub::DEFAULT_WEIGHTS_DIR),
        )?;
        let w = load_sam_weights(&p, Some(cfg), dev)?;
        Ok((w, crate::train::checkpoint::sha256_file(&p)?))
    }
}

/// One Phase 2 batch at the TransUNet size `S`: images `(B,1,S,S)`, stored coarse masks and GT `(B,S,S)`, and the
/// cached image embeddings of the sources `(B,C,g,g)`.
pub struct Batch {
    pub image_s: Tensor,
    pub coarse_s: Tensor,
    pub gt_s: Tensor,
    pub emb: Tensor,
}

/// Where the image embeddings of a batch come from.
pub enum Embeddings {
    /// One embedding per source (index = source), computed once through the embedding cache (frozen encoder).
    Cached(Vec<Tensor>),
    /// The encoder runs on every batch: LoRA (differentiable path), or `--embed-cache off` (frozen path), or ROI
    /// mode (§7.7: the encoder runs on the ROI crop of each sample).
    PerBatch,
}

/// Image embeddings of `image_s (B,1,S,S)` computed by the encoder: shared preprocessing (§7.1), then the frozen
/// path (detached), or with LoRA the differentiable path (`dropout_seed`: LoRA dropout in training, `None` = eval).
pub fn encode_batch(
    refiner: &SamRefiner,
    image_s: &Tensor,
    dropout_seed: Option<u64>,
) -> Result<Tensor> {
    let (b, _, s, _) = image_s.dims4()?;
    let zeros = Tensor::zeros((b, s, s), DType::F32, image_s.device())?;
    let inp = preprocess(
        image_s,
        &zeros,
        refiner.img_size(),
        refiner.settings.normalization,
    )?;
    refiner.embed(&inp.image, dropout_seed)
}

/// Builds the batch of samples `ids`; embeddings from the cache, or from the encoder ([`encode_batch`]).
pub fn make_batch(
    data: &Phase2Data,
    emb: &Embeddings,
    refiner: &SamRefiner,
    ids: &[usize],
    dev: &Device,
    dropout_seed: Option<u64>,
) -> Result<Batch> {
    let s = data.store_size;
    let b = ids.len();
    let mut img = Vec::with_capacity(b * s * s);
    let mut c = Vec::with_capacity(b * s * s);
    let mut g = Vec::with_capacity(b * s * s);
    for &i in ids {
        let src = data.source_of[i];
        img.extend_from_slice(&data.images[src]);
        g.extend_from_slice(&data.gts[src]);
    }
    data.coarse.read_batch(ids, &mut c)?;
    let image_s = Tensor::from_vec(img, (b, 1, s, s), dev)?;
    let coarse_s = Tensor::from_vec(c, (b, s, s), dev)?;
    let emb = match emb {
        Embeddings::Cached(_) if refiner.roi_mode() => {
            return Err(Error::msg(
                "phase2: cached full-image embeddings cannot be used in ROI-crop mode (the encoder runs on the crop)",
            ))
        }
        Embeddings::Cached(e) => {
            let v: Vec<Tensor> = ids.iter().map(|&i| e[data.source_of[i]].clone()).collect();
            Tensor::stack(&v, 0)?.to_dtype(DType::F32)?
        }
        Embeddings::PerBatch if refiner.roi_mode() => {
            let inp = preprocess(
                &image_s,
                &coarse_s,
                refiner.img_size(),
                refiner.settings.normalization,
            )?;
            refiner.embed_for(None, &image_s, &inp.image, &inp.coarse, dropout_seed)?
        }
        Embeddings::PerBatch => encode_batch(refiner, &image_s, dropout_seed)?,
    };
    Ok(Batch {
        image_s,
        coarse_s,
        gt_s: Tensor::from_vec(g, (b, s, s), dev)?,
        emb,
    })
}

/// Loss and detached outputs of one Phase 2 forward.
pub struct Step {
    pub loss: crate::train::losses::LossOutput,
    pub refined_prob: Tensor,
    pub coarse_n: Tensor,
    pub gt: Tensor,
}

/// The Phase 2 forward of one batch: shared preprocessing (§7.1), prompts, SAM refinement with soft selection and the
/// §9.2 loss. The trainer and the `sam-decoder-train-step` bench both call this.
pub fn forward(refiner: &SamRefiner, b: &Batch, lcfg: &Phase2LossConfig) -> Result<Step> {
    let n = refiner.img_size();
    let p2 = preprocess_phase2_batch(
        &b.image_s,
        &b.coarse_s,
        &b.gt_s,
        n,
        refiner.settings.normalization,
    )?;
    let out = refiner.refine(&b.emb, &p2.sam.coarse)?;
    let cand = out.candidates_n()?;
    let loss = phase2_loss(
        &out.refined_n,
        &p2.gt,
        &p2.sam.coarse,
        Some((&cand, &out.iou_pred)),
        lcfg,
    )?;
    let refined_prob = crate::train::losses::sigmoid(&out.refined_n.detach())?;
    Ok(Step {
        loss,
        refined_prob,
        coarse_n: p2.sam.coarse.detach(),
        gt: p2.gt,
    })
}

/// One embedding per source of `data` (f16, as stored), computed through `cache` in chunks of `batch_size`.
pub fn embed_sources(
    refiner: &SamRefiner,
    cache: &EmbeddingCache,
    data: &Phase2Data,
    batch_size: usize,
    dev: &Device,
) -> Result<Vec<Tensor>> {
    let s = data.store_size;
    let n = refiner.img_size();
    let mut emb: Vec<Tensor> = Vec::with_capacity(data.sources.len());
    for chunk in (0..data.sources.len())
        .collect::<Vec<_>>()
        .chunks(batch_size.max(1))
    {
        let img: Vec<f32> = chunk
            .iter()
            .flat_map(|&i| data.images[i].iter().copied())
            .collect();
        let image_s = Tensor::from_vec(img, (chunk.len(), 1, s, s), dev)?;
        let zeros = Tensor::zeros((chunk.len(), s, s), DType::F32, dev)?;
        let inp = preprocess(&image_s, &zeros, n, refiner.settings.normalization)?;
        let e = refiner.embed_cached(Some(cache), &image_s, &inp.image, None)?;
        for j in 0..chunk.len() {
            emb.push(e.get(j)?.to_dtype(DType::F16)?);
        }
    }
    Ok(emb)
}

pub use crate::models::sam::lora::is_lora_key;

/// The LoRA configuration of the `--use-lora`, `--lora-rank`, `--lora-alpha`, `--lora-dropout`, `--lora-targets`
/// flags (Phases 2 and 3; SPEC §6.8), checked; `None` without `--use-lora`.
pub fn lora_from_flags(
    use_lora: bool,
    rank: usize,
    alpha: f64,
    dropout: f64,
    targets: &str,
) -> Result<Option<LoraConfig>> {
    if !use_lora {
        return Ok(None);
    }
    let l = LoraConfig {
        rank,
        alpha,
        dropout,
        targets: LoraTarget::parse_list(targets)?,
    };
    l.validate()?;
    if l.targets.is_empty() {
        return Err(Error::Arg("--lora-targets is empty".into()));
    }
    Ok(Some(l))
}

/// SAM image-encoder dtype of a training run: LoRA trains the encoder, so its default is f32 even on CUDA; otherwise
/// the frozen encoder's default (`--encoder-dtype`, SPEC §15).
pub fn train_encoder_dtype(requested: Option<&str>, lora: bool, dev: &Device) -> Result<DType> {
    match requested {
        None | Some("auto") if lora => Ok(DType::F32),
        requested => crate::device::encoder_dtype(requested, dev),
    }
}

/// SAM for training: prompt encoder and mask decoder as `Var`s in `varmap`, the image encoder frozen (plain tensors
/// in `encoder_dtype`), with LoRA adapters (`Var`s in `varmap`) when `lora` is set. Adapters present in `weights`
/// (`…lora_a`/`…lora_b`: a resumed run, or a LoRA checkpoint carried into Phase 3) are the starting values; the other
/// targets start from the §6.8 initialisation, drawn from the project RNG with `seed` (SPEC §0; per adapter name).
/// Adapters without `lora` are an error (merge them first).
pub fn build_train_sam(
    cfg: &SamConfig,
    mut weights: SamWeights,
    varmap: &VarMap,
    dev: &Device,
    encoder_dtype: DType,
    lora: Option<&LoraConfig>,
    seed: u64,
) -> Result<Sam> {
    let adapters: Vec<(String, Tensor)> = weights
        .tensors
        .iter()
        .filter(|(k, _)| is_lora_key(k))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    match lora {
        Some(l) => crate::models::sam::lora::check_adapter_tensors(
            adapters.iter().map(|(k, t)| (k, t)),
            l,
            cfg.encoder_depth,
        )?,
        None if !adapters.is_empty() => {
            return Err(Error::Weights(format!(
                "the SAM weights hold LoRA adapters (e.g. `{}`) but LoRA is off",
                adapters[0].0
            )))
        }
        None => {}
    }
    if !adapters.is_empty() {
        let mut d = varmap
            .data()
            .lock()
            .map_err(|_| Error::msg("VarMap lock poisoned"))?;
        for (k, t) in &adapters {
            d.insert(
                k.clone(),
                Var::from_tensor(&t.to_dtype(DType::F32)?.copy()?)?,
            );
        }
    }
    weights.tensors.retain(|k, _| !is_lora_key(k));
    // As `Sam::from_weights`, but new adapters come from a seeded builder (candle's `Init` uses a thread RNG).
    weights.seed_varmap(varmap)?;
    let vb_tr = crate::models::transunet::layers::seeded_varbuilder(
        varmap,
        crate::rng::mix(seed, "lora-init", &[]),
        DType::F32,
        dev,
    );
    Sam::new_parts(
        cfg,
        weights.var_builder(encoder_dtype, dev),
        weights.var_builder(DType::F32, dev),
        vb_tr,
        lora,
    )
}

/// AdamW groups of Phase 2 (§11.3 step 5): `sam` (prompt encoder + mask decoder) and, with LoRA, `lora` (same LR and
/// weight decay). Keys carry the checkpoint prefix `sam.`; each group is in key order.
pub fn param_groups(varmap: &VarMap, lr: f64, weight_decay: f64) -> Result<Vec<ParamGroup>> {
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .map_err(|_| Error::msg("VarMap lock poisoned"))?
        .iter()
        .map(|(k, v)| (format!("{SAM_PREFIX}{k}"), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let (lora, sam): (Vec<_>, Vec<_>) = vars.into_iter().partition(|(k, _)| is_lora_key(k));
    let mut groups = vec![ParamGroup::new("sam", lr, weight_decay, sam)];
    if !lora.is_empty() {
        groups.push(ParamGroup::new("lora", lr, weight_decay, lora));
    }
    Ok(groups)
}

/// The SAM tensors of the full Phase 2 checkpoint (§11.3 step 6), without the `sam.` prefix: every §6.5 tensor
/// (encoder weights unmerged) plus the LoRA adapters `…lora_a`/`…lora_b`.
pub fn checkpoint_tensors(sam: &Sam) -> Result<Vec<(String, Tensor)>> {
    if !sam.image_encoder.has_lora() {
        return sam.export_tensors(false);
    }
    let mut out: Vec<(String, Tensor)> = sam
        .image_encoder
        .named_tensors()
        .into_iter()
        .map(|(k, t)| (format!("image_encoder.{k}"), t))
        .collect();
    out.extend(crate::models::sam::weights::prompt_encoder_tensors(
        &sam.prompt_encoder,
    ));
    out.extend(crate::models::sam::weights::mask_decoder_tensors(
        &sam.mask_decoder,
    ));
    for (i, b) in sam.image_encoder.blocks.iter().enumerate() {
        for (name, l) in [
            ("attn.qkv", &b.attn.qkv),
            ("attn.proj", &b.attn.proj),
            ("mlp.lin1", &b.lin1),
            ("mlp.lin2", &b.lin2),
        ] {
            if let Some(a) = &l.lora {
                let p = format!("image_encoder.blocks.{i}.{name}");
                out.push((format!("{p}.lora_a"), a.a.clone()));
                out.push((format!("{p}.lora_b"), a.b.clone()));
            }
        }
    }
    out.into_iter()
        .map(|(k, t)| Ok((k, t.detach().to_dtype(DType::F32)?)))
        .collect()
}

/// Run-directory name (§11.3 step 6): `<dataset>`, or `<dataset>_fold<k>` when the data were generated with
/// `--exclude-fold k` (read from the manifest).
pub fn run_name(opts: &Phase2Options) -> Result<String> {
    let mpath = opts.data_root.join(&opts.dataset).join("manifest.json");
    let bytes = std::fs::read(&mpath).map_err(|e| Error::io(&mpath, e))?;
    let m: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::file(&mpath, format!("invalid manifest.json: {e}")))?;
    Ok(match m["excluded_fold"].as_u64() {
        Some(k) => format!("{}_fold{k}", opts.dataset),
        None => opts.dataset.clone(),
    })
}

/// Runs Phase 2 end to end (SPEC §11.3). `stop`: graceful stop flag (SIGTERM/SIGUSR1 in the binary).
pub fn run(opts: &Phase2Options, stop: &StopFlag) -> Result<Phase2Outcome> {
    let t_session = std::time::Instant::now();
    if opts.dataset.is_empty() {
        return Err(Error::Arg(
            "--dataset is required (the augmentation run name, e.g. PHANTOM)".into(),
        ));
    }
    let config = Config::load(&opts.config)?;
    let sam_cfg = config.model.sam.clone();
    let epochs = opts.epochs.unwrap_or(config.phase2.max_epochs) as u64;
    let batch_size = opts.batch_size.unwrap_or(config.phase2.batch_size);
    let grad_accum = opts.grad_accum.max(1);
    if epochs == 0 || batch_size == 0 {
        return Err(Error::Arg("--epochs and --batch-size must be > 0".into()));
    }
    let provenance = sam_provenance(&opts.sam_checkpoint);
    let mut rcfg = config.refiner.clone();
    if let Some(st) = &opts.mask_prompt_style {
        let _: MaskPromptStyle = st.parse()?;
        rcfg.mask_prompt_style = st.clone();
    }
    rcfg.use_point_prompt &= !opts.no_point_prompt;
    rcfg.use_box_prompt &= !opts.no_box_prompt;
    rcfg.use_mask_prompt &= !opts.no_mask_prompt;
    rcfg.add_negative_point &= !opts.no_negative_point;
    rcfg.sam_normalization = opts.sam_normalization.clone();
    rcfg.use_roi_crop = opts.use_roi_crop;
    rcfg.roi_expand_ratio = opts.roi_expand_ratio;
    let settings = SamRefinerSettings::from_config(&rcfg, Some(provenance))?;
    let lcfg = Phase2LossConfig {
        iou_loss_weight: opts.iou_loss_weight,
        change_penalty_weight: opts.change_penalty_weight,
    };
    if opts.sam_model_type != "vit_b" {
        return Err(Error::Arg(format!(
            "--sam-model-type {}: only vit_b is supported",
            opts.sam_model_type
        )));
    }
    let lora = lora_from_flags(
        opts.use_lora,
        opts.lora_rank,
        opts.lora_alpha,
        opts.lora_dropout,
        &opts.lora_targets,
    )?;
    if !(0.0..=1.0).contains(&opts.real_ratio) {
        return Err(Error::Arg(format!(
            "--real-ratio must be in [0, 1], got {}",
            opts.real_ratio
        )));
    }
    if opts.real_ratio > 0.0 && opts.real_data.is_none() {
        return Err(Error::Arg(
            "--real-ratio > 0 needs --real-data DIR (an `augment oof` run directory)".into(),
        ));
    }
    if opts.real_data.is_some() && opts.real_ratio <= 0.0 {
        return Err(Error::Arg(
            "--real-data needs --real-ratio r > 0 (the share of real samples per epoch)".into(),
        ));
    }
    let val_every = opts.val_every.max(1) as u64;
    let dev = match &opts.device {
        Some(d) => d.parse::<crate::device::DeviceSpec>()?.open()?,
        None => crate::device::DeviceSpec::default_for_build().open()?,
    };
    let encoder_dtype = train_encoder_dtype(opts.encoder_dtype.as_deref(), lora.is_some(), &dev)?;

    let run_dir = RunDir::new(&opts.output_dir, &run_name(opts)?);
    let style = if opts.quiet {
        Style {
            color: false,
            ascii: opts.ascii,
            plain: true,
        }
    } else {
        Style::detect(opts.plain, opts.ascii)
    };
    let console = Console::new(style);
    let say = |t: &str| {
        if opts.quiet {
            console.log_only(t)
        } else {
            console.print(t)
        }
    };
    let decision = resolve_resume(&run_dir, opts.resume.as_deref(), opts.force_retrain)?;
    if decision == ResumeDecision::AlreadyComplete {
        let s = run_dir.read_summary()?;
        if !opts.quiet {
            println!(
                "{}: already complete (use --force-retrain to train again)",
                run_dir.root().display()
            );
        }
        return Ok(Phase2Outcome {
            status: Phase2Status::AlreadyComplete,
            run_dir: run_dir.root().to_path_buf(),
            history: s
                .as_ref()
                .and_then(|s| s.final_metrics.clone())
                .into_iter()
                .collect(),
            best: s.map(|s| s.best).unwrap_or_else(|| Best::new("val_dice")),
            encoder_forwards: 0,
            n_sources: 0,
            n_train: 0,
            n_val: 0,
            train_sources: vec![],
            val_sources: vec![],
        });
    }
    run_dir.create()?;
    console.open_log(&run_dir.log_path())?;

    // Data.
    let data = load_data_mixed(
        &opts.data_root.join(&opts.dataset),
        opts.real_data.as_deref(),
        &opts.processed_root,
        opts.transunet_img_size,
    )?;
    let is_val = split_sources(&data.sources, opts.val_fraction, opts.seed)?;
    let mut train_ids: Vec<usize> = (0..data.records.len())
        .filter(|&i| !is_val[data.source_of[i]] && !data.is_real[i])
        .collect();
    let real_ids: Vec<usize> = (0..data.records.len())
        .filter(|&i| !is_val[data.source_of[i]] && data.is_real[i])
        .collect();
    if opts.real_data.is_some() && real_ids.is_empty() {
        return Err(Error::Arg(
            "--real-data has no sample of a training source".into(),
        ));
    }
    let val_ids: Vec<usize> = (0..data.records.len())
        .filter(|&i| is_val[data.source_of[i]])
        .collect();
    if let Some(m) = opts.max_samples {
        let mut rng = crate::rng::stream_rng(opts.seed, "phase2-max-samples", &[]);
        train_ids.shuffle(&mut rng);
        train_ids.truncate(m.max(1));
        train_ids.sort_unstable();
    }
    let fmt_src = |i: usize| format!("{}/{}", data.sources[i].0, data.sources[i].1);
    let train_sources: Vec<String> = (0..data.sources.len())
        .filter(|&i| !is_val[i])
        .map(fmt_src)
        .collect();
    let val_sources: Vec<String> = (0..data.sources.len())
        .filter(|&i| is_val[i])
        .map(fmt_src)
        .collect();

    // Model: initial weights, or the checkpoint's SAM tensors on resume.
    let resume_ckpt = match &decision {
        ResumeDecision::Resume(p) => {
            let ck = load_checkpoint(p, &dev)?;
            if ck.sidecar.kind != Phase::Phase2 {
                return Err(Error::file(
                    p,
                    format!("is a {} checkpoint, not phase2", ck.sidecar.kind.as_str()),
                ));
            }
            if ck.sidecar.data.manifest_sha256.as_deref() != Some(data.manifest_sha256.as_str()) {
                return Err(Error::file(
                    p,
                    "was trained on different augmented data (manifest SHA-256 differs)",
                ));
            }
            Some(ck)
        }
        _ => None,
    };
    let (weights, weights_id) = match &resume_ckpt {
        Some(ck) => {
            let t: HashMap<String, Tensor> = ck
                .model
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix(SAM_PREFIX)
                        .map(|s| (s.to_string(), v.clone()))
                })
                .collect();
            let sha = ck.sidecar.extra["weights_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (
                SamWeights {
                    tensors: t,
                    format: SamFormat::Original,
                },
                sha,
            )
        }
        None => load_initial_weights(opts, &sam_cfg, &dev)?,
    };
    let varmap = VarMap::new();
    let sam = build_train_sam(
        &sam_cfg,
        weights,
        &varmap,
        &dev,
        encoder_dtype,
        lora.as_ref(),
        opts.seed,
    )?;
    let refiner = SamRefiner::new(sam, settings);
    let n = refiner.img_size();
    let mut opt = AdamW::new(param_groups(&varmap, opts.lr, opts.weight_decay)?)?;
    let mut schedule = Schedule::cosine(opts.min_lr, epochs);
    let mut history: Vec<HistoryRow> = Vec::new();
    let mut best = Best::new("val_dice");
    let mut start_epoch = 0u64;
    let mut global_step = 0u64;
    if let Some(ck) = &resume_ckpt {
        crate::train::optim::check_groups_match(&opt, &ck.sidecar.optimizer)?;
        opt.load_state(&ck.optim)?;
        history = ck.sidecar.history.clone();
        best = ck.sidecar.best.clone();
        start_epoch = ck.sidecar.epoch + 1;
        global_step = ck.sidecar.global_step;
        schedule = ck.sidecar.scheduler.clone();
    }

    // Embeddings: one frozen-encoder forward per distinct source image, through the embedding cache (§6.9); with
    // LoRA or `--embed-cache off` the encoder runs in every step instead.
    let fwd0 = refiner.sam.image_encoder.forward_count();
    if refiner.roi_mode() && lora.is_none() && opts.embed_cache {
        say("ROI crop (§7.7): the image encoder runs on the crop in every step; the embedding cache is off");
    }
    let emb = if lora.is_none() && opts.embed_cache && !refiner.roi_mode() {
        let cache = EmbeddingCache::new(
            opts.embed_cache_dir.as_deref(),
            &refiner.sam.image_encoder.fingerprint()?,
            opts.embed_cache_mem,
        )?;
        Embeddings::Cached(embed_sources(&refiner, &cache, &data, batch_size, &dev)?)
    } else {
        Embeddings::PerBatch
    };
    let encoder_forwards = refiner.sam.image_encoder.forward_count() - fwd0;

    // The refiner configuration as evaluation reads it from `best_sam.json` (normalisation resolved).
    let sam_refiner_json = {
        let mut r = rcfg.clone();
        r.sam_normalization = refiner.settings.normalization.as_str().to_string();
        serde_json::to_value(&r).map_err(|e| Error::msg(e.to_string()))?
    };
    let config_json = serde_json::json!({
        "config": opts.config, "sam": sam_cfg, "refiner": rcfg, "epochs": epochs, "batch_size": batch_size,
        "lr": opts.lr, "weight_decay": opts.weight_decay, "min_lr": opts.min_lr,
        "change_penalty_weight": opts.change_penalty_weight, "iou_loss_weight": opts.iou_loss_weight,
        "val_fraction": opts.val_fraction, "transunet_img_size": opts.transunet_img_size, "max_samples": opts.max_samples,
        "grad_clip": opts.grad_clip, "grad_accum": grad_accum, "seed": opts.seed, "sam_checkpoint": opts.sam_checkpoint,
        "provenance": provenance, "sam_normalization": refiner.settings.normalization.as_str(),
        "mask_prompt_style": refiner.settings.prompts.mask_style.as_str(),
        "use_lora": opts.use_lora, "lora_rank": opts.lora_rank, "lora_alpha": opts.lora_alpha,
        "lora_dropout": opts.lora_dropout, "lora_targets": opts.lora_targets, "curriculum": opts.curriculum,
        "val_every": val_every, "real_data": opts.real_data, "real_ratio": opts.real_ratio,
        "real_manifest_sha256": data.real_manifest_sha256, "embed_cache": matches!(emb, Embeddings::Cached(_)),
        "encoder_dtype": encoder_dtype.as_str(),
    });
    if resume_ckpt.is_none() {
        if let Ok(t) = config.to_toml_string() {
            run_dir.write_config(&t)?;
        }
    }
    let header = RunHeader {
        experiment: opts.dataset.clone(),
        dataset: opts.dataset.clone(),
        fold: None,
        n_train: train_ids.len(),
        n_val: val_ids.len(),
        extra: vec![
            (
                "Model".into(),
                format!(
                    "SAM ({}), prompt encoder + mask decoder{} trainable{}",
                    opts.config,
                    match &lora {
                        Some(l) => format!(
                            " + LoRA (r {}, α {}, {})",
                            l.rank, l.alpha, opts.lora_targets
                        ),
                        None => String::new(),
                    },
                    match refiner.settings.roi_expand_ratio {
                        Some(r) => format!(", ROI crop (expand ratio {r})"),
                        None => String::new(),
                    }
                ),
            ),
            (
                "Weights".into(),
                if opts.sam_checkpoint == "random" {
                    "RANDOM INIT (demo/test only)".into()
                } else {
                    opts.sam_checkpoint.clone()
                },
            ),
            ("Device".into(), crate::device::device_name(&dev)),
            (
                "Sources".into(),
                format!(
                    "{} train / {} val images, {} encoder forwards{}",
                    train_sources.len(),
                    val_sources.len(),
                    encoder_forwards,
                    if matches!(emb, Embeddings::Cached(_)) {
                        " (embedding cache)"
                    } else {
                        " so far (encoder runs in every step)"
                    }
                ),
            ),
            (
                "Epoch".into(),
                format!(
                    "{} synthetic{}{}",
                    train_ids.len(),
                    if real_ids.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " (of which {} replaced by real; real pool {})",
                            compose::real_quota(train_ids.len(), opts.real_ratio),
                            real_ids.len()
                        )
                    },
                    if opts.curriculum { ", curriculum" } else { "" }
                ),
            ),
        ],
    };
    say(&console::run_header(&header, &style));
    if let Some(ck) = &resume_ckpt {
        say(&format!(
            "Resuming from {} (epoch {} done)",
            ck.safetensors_path.display(),
            ck.sidecar.epoch + 1
        ));
    }

    let data_id = DataIdentity {
        datasets: vec![opts.dataset.clone()],
        manifest_sha256: Some(data.manifest_sha256.clone()),
        ..Default::default()
    };
    let mut status = Phase2Status::Complete;
    let mut session_epochs = 0usize;
    let write_summary =
        |st: RunStatus, history: &[HistoryRow], best: &Best, msg: Option<String>| -> Result<()> {
            run_dir.write_summary(&Summary {
                status: st,
                kind: Phase::Phase2,
                experiment: opts.dataset.clone(),
                best: best.clone(),
                final_metrics: history.last().cloned(),
                epochs: history.len() as u64,
                max_epochs: epochs,
                durations: Durations::from_history(history, t_session.elapsed().as_secs_f64()),
                device: crate::device::device_name(&dev),
                versions: Versions::default(),
                updated: crate::train::checkpoint::now_rfc3339(),
                message: msg,
            })
        };
    write_summary(RunStatus::Running, &history, &best, None)?;

    for epoch in start_epoch..epochs {
        if stop.is_set() || opts.stop_after_epochs.is_some_and(|m| session_epochs >= m) {
            status = Phase2Status::Interrupted;
            break;
        }
        let t_epoch = std::time::Instant::now();
        schedule.start_epoch(epoch, &mut opt);
        let order = compose::epoch_order(
            &train_ids,
            &real_ids,
            opts.real_ratio,
            opts.curriculum,
            |i| compose::bin_rank(&data.records[i].bin),
            |i| data.records[i].dice,
            opts.seed,
            epoch,
            epochs,
        );
        let steps =
            crate::train::optim::steps_per_epoch(order.len().div_ceil(batch_size), grad_accum);
        if steps == 0 {
            return Err(Error::Arg(format!("epoch {}: {} training samples give no optimiser step (batch size {batch_size}, grad-accum {grad_accum})", epoch + 1, order.len())));
        }
        let batches: Vec<&[usize]> = order.chunks(batch_size).collect();
        let mut tracker = MeanTracker::new();
        let mut grads = Grads::new();
        let mut micro = 0usize;
        let mut interrupted = false;
        let mut prog = if opts.quiet {
            None
        } else {
            Some(console.progress(
                "TRAIN",
                Some((epoch + 1, epochs)),
                (steps * grad_accum) as u64,
            ))
        };
        for (bi, ids) in batches.iter().take(steps * grad_accum).enumerate() {
            if stop.is_set() {
                interrupted = true;
                break;
            }
            let seed = crate::rng::mix(opts.seed, "lora-dropout", &[epoch, bi as u64]);
            let b = make_batch(&data, &emb, &refiner, ids, &dev, Some(seed))?;
            let st = forward(&refiner, &b, &lcfg)?;
            let total = st.loss.total.affine(1.0 / grad_accum as f64, 0.0)?;
            let gs = total.backward()?;
            grads.accumulate(&gs, opt.groups())?;
            let lv = st.loss.total_f64()?;
            tracker.add("loss", lv);
            for (k, v) in st.loss.component_values()? {
                tracker.add(&k, v);
            }
            let m = PooledMetrics::from_batch(&st.refined_prob, &st.gt)?;
            tracker.add("metric_dice", m.dice);
            tracker.add("metric_iou", m.iou);
            micro += 1;
            if micro == grad_accum {
                if opts.grad_clip > 0.0 {
                    grads.clip_norm(opts.grad_clip)?;
                }
                opt.step(&grads)?;
                grads = Grads::new();
                micro = 0;
                global_step += 1;
            }
            if let Some(p) = prog.as_mut() {
                p.step(Some(lv));
            }
        }
        if let Some(p) = prog {
            p.finish();
        }
        if interrupted {
            status = Phase2Status::Interrupted;
            break;
        }
        // Validation (§10.5).
        let vs = if (epoch + 1) % val_every == 0 || epoch + 1 == epochs {
            let mut val = Phase2Validation::new();
            for ids in val_ids.chunks(batch_size) {
                let b = make_batch(&data, &emb, &refiner, ids, &dev, None)?;
                let st = forward(&refiner, &b, &lcfg)?;
                val.add_batch(&st.refined_prob, &st.coarse_n, &st.gt, st.loss.total_f64()?)?;
            }
            Some(val.finish())
        } else {
            None
        };
        let is_best = vs
            .as_ref()
            .is_some_and(|v| best.update(v.refined.dice, epoch));
        let lr = opt.lrs();
        let mut row = HistoryRow {
            epoch: epoch + 1,
            time_s: t_epoch.elapsed().as_secs_f64(),
            lr: Named(lr.clone()),
            train_loss: tracker.mean("loss"),
            components: Named(
                // CSV names distinct from the `train_dice`/`train_iou` metric columns.
                [
                    ("bce", "bce"),
                    ("dice", "dice_loss"),
                    ("iou", "iou_loss"),
                    ("change", "change"),
                ]
                .iter()
                .filter_map(|(k, col)| tracker.mean(k).map(|v| (col.to_string(), v)))
                .collect(),
            ),
            train_dice: tracker.mean("metric_dice"),
            train_iou: tracker.mean("metric_iou"),
            val_loss: vs.as_ref().map(|v| v.loss),
            val_dice: vs.as_ref().map(|v| v.refined.dice),
            val_iou: vs.as_ref().map(|v| v.refined.iou),
            val_precision: vs.as_ref().map(|v| v.refined.precision),
            val_recall: vs.as_ref().map(|v| v.refined.recall),
            val_accuracy: vs.as_ref().map(|v| v.refined.accuracy),
            val_specificity: None,
            val_dice_img: vs.as_ref().map(|v| v.refined.dice),
            extra: Named::new(),
            is_best,
            note: None,
        };
        if let Some(vs) = &vs {
            row.extra.set("val_coarse_dice", vs.coarse.dice);
            row.extra.set("val_improvement", vs.improvement);
        }
        row.extra.set("train_samples", order.len() as f64);
        history.push(row);
        let report = EpochReport {
            epoch: epoch + 1,
            epochs,
            train: TrainReport {
                loss: tracker.mean("loss").unwrap_or(f64::NAN),
                components: [
                    ("BCE", "bce"),
                    ("Dice loss", "dice"),
                    ("IoU loss", "iou"),
                    ("Change", "change"),
                ]
                .iter()
                .filter_map(|(l, k)| tracker.mean(k).map(|v| (l.to_string(), v)))
                .collect(),
                dice: tracker.mean("metric_dice"),
                iou: tracker.mean("metric_iou"),
                lrs: lr,
            },
            validation: vs.as_ref().map(|vs| {
                ValidationTable::Compare(vec![
                    ("Dice".into(), vs.coarse.dice, vs.refined.dice),
                    ("IoU".into(), vs.coarse.iou, vs.refined.iou),
                    (
                        "Precision".into(),
                        vs.coarse.precision,
                        vs.refined.precision,
                    ),
                    ("Recall".into(), vs.coarse.recall, vs.refined.recall),
                ])
            }),
            is_best,
            comparison: None,
        };
        say(&console::epoch_report(&report, &style));

        // Checkpoints.
        let model: HashMap<String, Tensor> = checkpoint_tensors(&refiner.sam)?
            .into_iter()
            .map(|(k, t)| (format!("{SAM_PREFIX}{k}"), t))
            .collect();
        let optim = opt.state_tensors()?;
        let mut sc = Sidecar::new(
            Phase::Phase2,
            epoch,
            global_step,
            best.clone(),
            config_json.clone(),
            data_id.clone(),
            opt.info(),
            schedule.clone(),
            RngState {
                seed: opts.seed,
                next_epoch: epoch + 1,
            },
            history.clone(),
        );
        sc.extra = serde_json::json!({"weights_id": weights_id});
        save_checkpoint(run_dir.root(), LATEST, &model, &optim, &sc)?;
        if let (true, Some(vs)) = (is_best, &vs) {
            save_checkpoint(run_dir.root(), BEST, &model, &optim, &sc)?;
            let native: Vec<(String, Tensor)> = refiner.sam.export_tensors(true)?;
            crate::models::sam::weights::save_safetensors_atomic(
                &native,
                &run_dir.path("best_sam.safetensors"),
            )?;
            atomic_write_json(
                &run_dir.path("best_sam.json"),
                &serde_json::json!({
                    "format": "sam-native", "model_type": "vit_b", "source_checkpoint": opts.sam_checkpoint,
                    "provenance": provenance, "weights_id": weights_id,
                    "normalization": refiner.settings.normalization.as_str(),
                    "mask_prompt_style": refiner.settings.prompts.mask_style.as_str(),
                    "prompts": {"point": refiner.settings.prompts.use_point, "box": refiner.settings.prompts.use_box,
                                "mask": refiner.settings.prompts.use_mask, "negative_point": refiner.settings.prompts.add_negative_point},
                    "refiner": sam_refiner_json,
                    "transunet_img_size": data.store_size, "sam_img_size": n, "config": opts.config,
                    "lora": lora.as_ref().map(|l| serde_json::json!({"rank": l.rank, "alpha": l.alpha, "merged": true,
                        "targets": opts.lora_targets})),
                    "epoch": epoch + 1, "dataset": opts.dataset,
                    "metrics": {"val_dice": vs.refined.dice, "val_iou": vs.refined.iou, "val_coarse_dice": vs.coarse.dice,
                                "val_improvement": vs.improvement, "val_loss": vs.loss},
                    "created": crate::train::checkpoint::now_rfc3339(),
                }),
            )?;
        }
        if opts.save_every > 0 && (epoch + 1) % opts.save_every as u64 == 0 {
            save_checkpoint(
                run_dir.root(),
                &crate::train::rundir::epoch_stem(epoch + 1),
                &model,
                &optim,
                &sc,
            )?;
        }
        if epoch + 1 == epochs {
            save_checkpoint(run_dir.root(), FINAL, &model, &optim, &sc)?;
        }
        run_dir.write_metrics_csv(&history)?;
        let _ = run_dir.write_progress_png(&history, &format!("phase2 {}", opts.dataset));
        write_summary(RunStatus::Running, &history, &best, None)?;
        session_epochs += 1;
    }
    match status {
        Phase2Status::Interrupted => {
            write_summary(
                RunStatus::Interrupted,
                &history,
                &best,
                Some("stopped by signal".into()),
            )?;
            say("Stopped at an epoch boundary; `latest` holds the last completed epoch (exit 75).");
        }
        _ => {
            write_summary(RunStatus::Complete, &history, &best, None)?;
            say(&console::end_of_run(
                "Best refined Dice",
                best.value,
                best.epoch.map(|e| e + 1),
                &run_dir.path("best_sam.safetensors"),
                &style,
            ));
        }
    }
    Ok(Phase2Outcome {
        status,
        run_dir: run_dir.root().to_path_buf(),
        history,
        best,
        encoder_forwards,
        n_sources: data.sources.len(),
        n_train: train_ids.len(),
        n_val: val_ids.len(),
        train_sources,
        val_sources,
    })
}
