//! Phase 3 trainer (SPEC §11.4): end-to-end fine-tuning of the Phase 1 TransUNet and the (Phase 2 or pretrained)
//! SAM refiner with the §9.3 loss `λ_c·L_coarse + λ_r·L_refined (+ anchor)`, two AdamW groups (`transunet`,
//! `sam`) under one per-epoch cosine schedule, the freezing semantics of §11.4.2 ([`freeze`]), the frozen SAM image
//! encoder behind the embedding cache ([`data`] documents the augmentation policy and its cost), baseline and
//! Performance Comparison (§12.2), the §11.1.5 run directory and exact resume (§11.1.6).
//!
//! ```ignore
//! let mut o = Phase3Options::new("./dataset/processed");
//! o.dataset = Some("BUSI".into());
//! o.sam_checkpoint = "checkpoints/sam_finetuned/RUN/best_sam.safetensors".into();
//! let outcome = ultrarefiner::train::phase3::run(&o)?;
//! std::process::exit(outcome.exit_code());
//! ```
//!
//! Extensions: LoRA on the SAM image encoder (§6.8, `use_lora`: the encoder runs with gradients in every step, the
//! embedding cache is off), gated residual refinement (§7.8, `use_gated_refinement`, recorded in the sidecar's
//! refiner configuration) and ROI-crop mode (§7.7, `use_roi_crop`): the SAM image encoder runs on the ROI crop in
//! every step (training and validation), so the embedding cache is bypassed and training uses the continuous §3.8
//! rotation. Not implemented (the CLI does not offer it): a disk embedding cache.
pub mod data;
pub mod freeze;
pub mod options;
pub mod source;
pub mod step;

pub use data::{Phase3TrainSet, RotationPolicy};
pub use freeze::{EpochTrainable, FreezePlan};
pub use options::Phase3Options;
pub use source::{load_sam_source, resolve_refiner, SamSource};
use source::{load_transunet, strip_prefix_map};
pub use step::{
    forward_loss, train_step, validate, AnchorSnapshot, MicroBatch, Phase3Model, Phase3Validation,
    StepConfig, StepOutput,
};

use super::checkpoint::{
    load_checkpoint, save_checkpoint, sha256_file, Baseline, Best, DataIdentity, Phase, RngState,
    Sidecar, WeightSource,
};
use super::console::{
    end_of_run, epoch_report, run_header, Console, EpochReport, PerformanceComparison, RunHeader,
    Style, TrainReport, ValidationTable,
};
use super::history::{HistoryRow, Named};
use super::losses::{Phase3LossConfig, RefinedLossSize};
use super::metrics::MeanTracker;
use super::optim::{check_groups_match, AdamW, Optimizer};
use super::phase1::{check_n_splits, json_norm, resolve_datasets, splits_identity, Phase1Outcome};
use super::phase2::{lora_from_flags, train_encoder_dtype};
use super::rundir::{
    epoch_stem, resolve_resume, Durations, ResumeDecision, RunDir, RunStatus, Summary, Versions,
    BEST, FINAL, LATEST,
};
use super::schedule::Schedule;
use crate::config::{Config, RefinerConfig};
use crate::data::dataset::{SegDataset, Split};
use crate::data::loader::{Loader, LoaderOptions};
use crate::device::DeviceSpec;
use crate::models::sam::weights::{SamFormat, SamWeights};
use crate::models::sam::EmbeddingCache;
use crate::refiner::{Gate, SamRefinerSettings};
use crate::{Error, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// How a Phase 3 run ended (same shape as Phase 1's).
pub type Phase3Outcome = Phase1Outcome;

// ---------------------------------------------------------------------------------------------------------------
// The run

struct Resolved {
    cfg: Config,
    datasets: Vec<String>,
    combined: bool,
    exp_name: String,
    max_epochs: u64,
    batch_size: usize,
    transunet_checkpoint: PathBuf,
}

fn resolve(o: &Phase3Options) -> Result<Resolved> {
    let mut cfg = Config::load(&o.config)?;
    if let Some(v) = o.img_size {
        cfg.model.transunet.img_size = v;
    }
    if let Some(v) = o.num_classes {
        cfg.model.transunet.n_classes = v;
    }
    if let Some(v) = o.n_skip {
        cfg.model.transunet.n_skip = v;
    }
    if let Some(v) = o.max_epochs {
        cfg.phase3.max_epochs = v;
    }
    if let Some(v) = o.batch_size {
        cfg.phase3.batch_size = v;
    }
    cfg.data.n_splits = o.n_splits as usize;
    cfg.validate()
        .map_err(|e| Error::Config(format!("{}: {e}", o.config)))?;
    crate::models::transunet::validate_config(&cfg.model.transunet)?;
    if cfg.model.transunet.n_classes != 2 {
        return Err(Error::Arg(
            "--num-classes: the Phase 3 loss is binary (2 classes)".into(),
        ));
    }
    if cfg.phase3.batch_size == 0 || cfg.phase3.max_epochs == 0 {
        return Err(Error::Arg(
            "--batch-size and --max-epochs must be at least 1".into(),
        ));
    }
    if o.n_splits < 2 || o.fold >= o.n_splits {
        return Err(Error::Arg(format!(
            "--fold {} must be below --n-splits {} (≥ 2)",
            o.fold, o.n_splits
        )));
    }
    if o.val_every == 0 || o.grad_accum == 0 {
        return Err(Error::Arg(
            "--val-every and --grad-accum must be at least 1".into(),
        ));
    }
    if !(0.0..=1.0).contains(&o.transunet_grad_scale) {
        return Err(Error::Arg(format!(
            "--transunet-grad-scale {} must be in [0, 1]",
            o.transunet_grad_scale
        )));
    }
    let (datasets, combined, exp_name) = resolve_datasets(
        o.dataset.as_deref(),
        &o.datasets,
        o.fold,
        o.exp_name.as_deref(),
    )?;
    let transunet_checkpoint = o.transunet_checkpoint.clone().unwrap_or_else(|| {
        PathBuf::from("checkpoints/transunet")
            .join(if combined { "combined" } else { &datasets[0] })
            .join(format!("fold_{}", o.fold))
            .join("best.safetensors")
    });
    Ok(Resolved {
        max_epochs: cfg.phase3.max_epochs as u64,
        batch_size: cfg.phase3.batch_size,
        cfg,
        datasets,
        combined,
        exp_name,
        transunet_checkpoint,
    })
}

fn freeze_plan(o: &Phase3Options, cfg: &Config) -> Result<FreezePlan> {
    let p = FreezePlan {
        freeze_transunet_epochs: o.freeze_transunet_epochs,
        transunet_unfreeze_decoder_layers: o.transunet_unfreeze_decoder_layers,
        freeze_sam_prompt_encoder: o.freeze_sam_prompt_encoder,
        freeze_sam_mask_decoder: o.freeze_sam_mask_decoder,
        freeze_sam_all: o.freeze_sam_all,
        freeze_sam_epochs: o.freeze_sam_epochs,
        sam_unfreeze_decoder_layers: o.sam_unfreeze_decoder_layers,
        transunet_decoder_blocks: cfg.model.transunet.decoder_channels.len(),
        sam_decoder_depth: cfg.model.sam.decoder_depth,
    };
    p.validate()?;
    Ok(p)
}

/// Training hyper-parameters recorded in the sidecar (a change on resume needs `--allow-config-change`).
fn training_json(o: &Phase3Options, r: &Resolved) -> serde_json::Value {
    let mut t = serde_json::json!({
        "transunet_lr": o.transunet_lr, "sam_lr": o.sam_lr, "weight_decay": o.weight_decay, "min_lr": o.min_lr,
        "batch_size": r.batch_size, "max_epochs": r.max_epochs,
        "coarse_loss_weight": o.coarse_loss_weight, "refined_loss_weight": o.refined_loss_weight,
        "refined_loss_size": o.refined_loss_size, "grad_clip": o.grad_clip, "grad_accum": o.grad_accum,
        "transunet_weight_reg": o.transunet_weight_reg, "transunet_grad_scale": o.transunet_grad_scale,
        "freeze_transunet_epochs": o.freeze_transunet_epochs,
        "transunet_unfreeze_decoder_layers": o.transunet_unfreeze_decoder_layers,
        "freeze_sam_prompt_encoder": o.freeze_sam_prompt_encoder, "freeze_sam_mask_decoder": o.freeze_sam_mask_decoder,
        "freeze_sam_all": o.freeze_sam_all, "freeze_sam_epochs": o.freeze_sam_epochs,
        "sam_unfreeze_decoder_layers": o.sam_unfreeze_decoder_layers,
        "augment": !o.no_augment, "rotation_angles": o.rotation_angles, "embed_cache": o.embed_cache,
        "val_every": o.val_every, "seed": o.seed, "schedule": "cosine per epoch",
    });
    if o.use_lora {
        // Only with LoRA, so checkpoints written before LoRA existed still resume without a config change.
        for (k, v) in [
            ("use_lora", serde_json::json!(true)),
            ("lora_rank", serde_json::json!(o.lora_rank)),
            ("lora_alpha", serde_json::json!(o.lora_alpha)),
            ("lora_dropout", serde_json::json!(o.lora_dropout)),
            ("lora_targets", serde_json::json!(o.lora_targets)),
        ] {
            t[k] = v;
        }
    }
    t
}

/// Runs Phase 3 with `o`. Errors after the run directory exists also mark `summary.json` as `failed`.
pub fn run(o: &Phase3Options) -> Result<Phase3Outcome> {
    let r = resolve(o)?;
    let run = RunDir::new(&o.output_dir, &r.exp_name);
    let decision = resolve_resume(&run, o.resume.as_deref(), o.force_retrain)?;
    let style = if o.quiet {
        Style {
            color: false,
            ascii: o.ascii,
            plain: true,
        }
    } else {
        Style::detect(o.plain, o.ascii)
    };
    if decision == ResumeDecision::AlreadyComplete {
        if !o.quiet {
            Console::new(style).print(&format!(
                "{}: already complete (use --force-retrain to train again)",
                run.root().display()
            ));
        }
        return Ok(Phase3Outcome::AlreadyComplete {
            run_dir: run.root().to_path_buf(),
        });
    }
    run.create()?;
    let started = Instant::now();
    let device_spec = o.device.unwrap_or_else(DeviceSpec::default_for_build);
    let res = train(o, &r, &run, decision, style, started, device_spec);
    if let Err(e) = &res {
        let prev = run.read_summary().ok().flatten();
        let mut s = summary(
            RunStatus::Failed,
            &r,
            &prev
                .as_ref()
                .map(|p| p.best.clone())
                .unwrap_or_else(|| Best::new("val_dice")),
            &[],
            started,
            device_spec,
            Some(e.to_string()),
        );
        if let Some(p) = prev {
            s.final_metrics = p.final_metrics;
            s.epochs = p.epochs;
            s.durations = p.durations;
        }
        let _ = run.write_summary(&s);
    }
    res
}

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
        kind: Phase::Phase3,
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
#[allow(clippy::too_many_arguments)]
fn train(
    o: &Phase3Options,
    r: &Resolved,
    run: &RunDir,
    decision: ResumeDecision,
    style: Style,
    started: Instant,
    device_spec: DeviceSpec,
) -> Result<Phase3Outcome> {
    let device = device_spec.open()?;
    let console = Console::new(style);
    console.open_log(&run.log_path())?;
    let say = |t: &str| {
        if o.quiet {
            console.log_only(t)
        } else {
            console.print(t)
        }
    };
    let mcfg = &r.cfg.model;
    let s = mcfg.transunet.img_size;
    let plan = freeze_plan(o, &r.cfg)?;
    let lora = lora_from_flags(
        o.use_lora,
        o.lora_rank,
        o.lora_alpha,
        o.lora_dropout,
        &o.lora_targets,
    )?;
    // The embedding cache holds frozen-encoder outputs; LoRA changes the encoder every step (§6.8, §6.9).
    let embed_cache = o.embed_cache && lora.is_none();

    // Data (§11.4.1 step 1; the test split is never read).
    check_n_splits(&o.data_root, &r.datasets, o.n_splits)?;
    let train_inner = SegDataset::open(
        &o.data_root,
        &r.datasets,
        Split::FoldTrain(o.fold as usize),
        s,
    )?;
    let val_ds = SegDataset::open(
        &o.data_root,
        &r.datasets,
        Split::FoldVal(o.fold as usize),
        s,
    )?;
    // ROI mode bypasses the embedding cache (the crop depends on the coarse mask, §7.7.5).
    let rotation = if embed_cache && !o.use_roi_crop {
        RotationPolicy::Fixed(o.rotation_angles)
    } else {
        RotationPolicy::Continuous
    };
    let train_set = Phase3TrainSet {
        inner: train_inner,
        augment_seed: (!o.no_augment).then_some(o.seed),
        rotation,
    };
    let (n_train, n_val) = (train_set.inner.entries().len(), val_ds.entries().len());
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
        Arc::new(train_set),
        LoaderOptions::train(r.batch_size, o.seed).with_workers(workers),
    )?;
    let val_loader = Loader::new(
        Arc::new(val_ds),
        LoaderOptions::eval(r.batch_size).with_workers(workers),
    )?;
    let steps = super::optim::steps_per_epoch(train_loader.num_batches(), o.grad_accum);
    if steps == 0 {
        return Err(Error::Arg(format!(
            "{n_train} training samples give no optimiser step (batch size {}, grad-accum {})",
            r.batch_size, o.grad_accum
        )));
    }

    // Models: initial weights, or the checkpoint's on resume.
    let resume_ck = match &decision {
        ResumeDecision::Resume(p) => {
            let ck = load_checkpoint(p, &device)?;
            if ck.sidecar.kind != Phase::Phase3 {
                return Err(Error::file(
                    p,
                    format!("is a {} checkpoint, not phase3", ck.sidecar.kind.as_str()),
                ));
            }
            Some(ck)
        }
        _ => None,
    };
    let encoder_dtype = train_encoder_dtype(o.encoder_dtype.as_deref(), lora.is_some(), &device)?;
    let (tu_tensors, sam_weights, weights_id, provenance, refiner_cfg, init_weights) =
        match &resume_ck {
            Some(ck) => {
                let sc = &ck.sidecar;
                let rc: RefinerConfig = serde_json::from_value(sc.config["refiner"].clone())
                    .map_err(|e| {
                        Error::file(&ck.safetensors_path, format!("sidecar refiner: {e}"))
                    })?;
                let sam = SamWeights {
                    tensors: strip_prefix_map(&ck.model, freeze::SAM_PREFIX),
                    format: SamFormat::Original,
                };
                (
                    strip_prefix_map(&ck.model, freeze::TRANSUNET_PREFIX),
                    sam,
                    sc.extra["weights_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    sc.extra["provenance"].as_str().unwrap_or("sam").to_string(),
                    rc,
                    sc.init_weights.clone(),
                )
            }
            None => {
                let tu = load_transunet(&r.transunet_checkpoint, s)?;
                let mut src = load_sam_source(&o.sam_checkpoint, &mcfg.sam, o.seed, &device)?;
                if let Some(line) = src.reconcile_adapters(lora.as_ref())? {
                    say(&line);
                }
                if let Some(ts) = src
                    .phase2_sidecar
                    .as_ref()
                    .and_then(|v| v["transunet_img_size"].as_u64())
                {
                    if ts as usize != s {
                        return Err(Error::Arg(format!(
                            "the Phase 2 model {} was trained at TransUNet size {ts}, this run uses {s}",
                            o.sam_checkpoint
                        )));
                    }
                }
                let rc = resolve_refiner(o, &r.cfg.refiner, &src)?;
                let p2_roi = src
                    .phase2_sidecar
                    .as_ref()
                    .and_then(|v| v["refiner"]["use_roi_crop"].as_bool());
                if p2_roi == Some(true) && !o.use_roi_crop {
                    say("note: the Phase 2 model was trained with ROI crop (best_sam.json); add --use-roi-crop to refine crops here too");
                }
                let iw = vec![
                    WeightSource {
                        role: "transunet".into(),
                        path: r.transunet_checkpoint.display().to_string(),
                        sha256: sha256_file(&r.transunet_checkpoint).ok(),
                        provenance: "phase1 checkpoint".into(),
                    },
                    WeightSource {
                        role: "sam".into(),
                        path: o.sam_checkpoint.clone(),
                        sha256: (o.sam_checkpoint != "random").then(|| src.weights_id.clone()),
                        provenance: if src.phase2_sidecar.is_some() {
                            format!("phase2 best_sam ({})", src.provenance)
                        } else {
                            src.provenance.clone()
                        },
                    },
                ];
                (tu, src.weights, src.weights_id, src.provenance, rc, iw)
            }
        };
    if refiner_cfg.use_roi_crop != o.use_roi_crop {
        return Err(Error::Arg(format!(
            "the checkpoint being resumed was trained {} ROI crop; {} --use-roi-crop to resume it",
            if refiner_cfg.use_roi_crop {
                "with"
            } else {
                "without"
            },
            if refiner_cfg.use_roi_crop {
                "pass"
            } else {
                "drop"
            }
        )));
    }
    let settings = SamRefinerSettings::from_config(&refiner_cfg, Some(&provenance))?;
    let mut model = Phase3Model::with_lora(
        mcfg,
        &tu_tensors,
        &sam_weights,
        settings,
        &device,
        encoder_dtype,
        lora.as_ref(),
        o.seed,
    )?;
    drop(sam_weights);
    model.ultra.transunet_grad_scale = o.transunet_grad_scale;
    model.ultra.gate = Gate::from_config(&refiner_cfg)?;
    if let Some(l) = &lora {
        say(&format!(
            "LoRA on the SAM image encoder (r {}, α {}, dropout {}, {}): embedding cache off, the encoder runs with \
             gradients in every step",
            l.rank, l.alpha, l.dropout, o.lora_targets
        ));
    }
    if let Some(g) = &model.ultra.gate {
        say(&format!(
            "Gated residual refinement: γ {}, g_min {}, g_max {}",
            g.gamma, g.g_min, g.g_max
        ));
    }
    let n = model.ultra.refiner.img_size();
    let loss_size = RefinedLossSize::from_flag(o.refined_loss_size.unwrap_or(n), s, n)?;
    let step_cfg = StepConfig {
        loss: Phase3LossConfig {
            coarse_weight: o.coarse_loss_weight,
            refined_weight: o.refined_loss_weight,
        },
        loss_size,
        grad_clip: o.grad_clip,
        anchor_beta: o.transunet_weight_reg,
    };
    let mut opt = AdamW::new(model.param_groups(o.transunet_lr, o.sam_lr, o.weight_decay)?)?;
    let all_keys = step::all_keys(&opt);
    let mut schedule = Schedule::cosine(o.min_lr, r.max_epochs);
    let cache = EmbeddingCache::new(
        None,
        &format!("{weights_id}-{}", refiner_cfg.sam_normalization),
        o.embed_cache_mem,
    )?;
    let train_cache =
        ((embed_cache || o.no_augment) && lora.is_none() && !o.use_roi_crop).then_some(&cache);
    if o.use_roi_crop {
        say(&format!(
            "ROI crop (§7.7, expand ratio {}): the SAM image encoder runs on the crop in every step; the embedding cache is off",
            refiner_cfg.roi_expand_ratio
        ));
    }

    let training = training_json(o, r);
    let model_json = serde_json::to_value(mcfg).map_err(|e| Error::msg(e.to_string()))?;
    let refiner_json = serde_json::to_value(&refiner_cfg).map_err(|e| Error::msg(e.to_string()))?;
    let config_json = serde_json::json!({
        "preset": r.cfg.preset, "model": model_json, "refiner": refiner_json,
        "data": { "datasets": r.datasets, "fold": o.fold, "n_splits": o.n_splits, "data_root": o.data_root,
                  "img_size": s },
        "training": training,
        "cli": { "config": o.config, "output_dir": o.output_dir, "exp_name": r.exp_name,
                 "device": device_spec.to_string(), "num_workers": o.num_workers, "save_every": o.save_every,
                 "transunet_checkpoint": r.transunet_checkpoint, "sam_checkpoint": o.sam_checkpoint },
    });
    let data_id = DataIdentity {
        datasets: r.datasets.clone(),
        fold: Some(o.fold),
        n_splits: Some(o.n_splits),
        splits_sha256: Some(splits_identity(&o.data_root, &r.datasets)?),
        manifest_sha256: None,
    };

    let mut best = Best::new("val_dice");
    let mut history: Vec<HistoryRow> = Vec::new();
    let mut start_epoch = 0u64;
    let mut global_step = 0u64;
    let mut pending_note: Option<String> = None;
    let mut baseline: Option<Baseline> = None;
    if let Some(ck) = &resume_ck {
        let sc = &ck.sidecar;
        let path = &ck.safetensors_path;
        if json_norm(&sc.config["model"]) != json_norm(&config_json["model"]) {
            return Err(Error::file(
                path,
                "its model configuration differs from this run's (--config / --img-size …)",
            ));
        }
        if sc.data != data_id {
            return Err(Error::file(
                path,
                format!(
                    "was trained on other data ({:?} fold {:?}); this run uses {:?} fold {}",
                    sc.data.datasets, sc.data.fold, data_id.datasets, o.fold
                ),
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
        check_groups_match(&opt, &sc.optimizer)?;
        opt.load_state(&ck.optim)?;
        if let Schedule::Cosine { position, .. } = sc.scheduler {
            if let Schedule::Cosine { position: p, .. } = &mut schedule {
                *p = position;
            }
        }
        start_epoch = sc.epoch + 1;
        global_step = sc.global_step;
        best = sc.best.clone();
        history = sc.history.clone();
        baseline = sc.baseline;
        console.log_only(&format!(
            "resumed from {} after epoch {}",
            path.display(),
            sc.epoch + 1
        ));
    }

    // Weight anchor θ₁ (§9.3): the Phase 1 weights, re-read on resume and verified by SHA-256.
    let anchor = if o.transunet_weight_reg > 0.0 {
        Some(match &resume_ck {
            None => AnchorSnapshot::take(&model)?,
            Some(_) => {
                let src = init_weights
                    .iter()
                    .find(|w| w.role == "transunet")
                    .ok_or_else(|| {
                        Error::msg(
                            "resume: the sidecar records no TransUNet source for the weight anchor",
                        )
                    })?;
                let p = PathBuf::from(&src.path);
                let sha = sha256_file(&p)?;
                if src.sha256.as_deref() != Some(sha.as_str()) {
                    return Err(Error::file(
                        &p,
                        "SHA-256 differs from the Phase 1 weights recorded in the checkpoint (weight anchor θ₁)",
                    ));
                }
                let t = load_transunet(&p, s)?;
                AnchorSnapshot {
                    tensors: t
                        .into_iter()
                        .map(|(k, v)| (format!("{}{k}", freeze::TRANSUNET_PREFIX), v))
                        .collect(),
                }
            }
        })
    } else {
        None
    };

    if resume_ck.is_none() {
        run.write_config(&r.cfg.to_toml_string()?)?;
    }
    let exp_label = if r.combined {
        format!("combined_fold{}", o.fold)
    } else {
        format!("{}_fold{}", r.datasets[0], o.fold)
    };
    say(&run_header(
        &RunHeader {
            experiment: exp_label.clone(),
            dataset: if r.combined {
                crate::data::combined_name(&r.datasets)
            } else {
                r.datasets[0].clone()
            },
            fold: Some((o.fold, o.n_splits)),
            n_train,
            n_val,
            extra: vec![
                (
                    "Model".into(),
                    format!(
                        "TransUNet + SAM refiner ({}), end-to-end; {}",
                        o.config,
                        if o.no_augment {
                            "no augmentation".into()
                        } else {
                            rotation.describe()
                        }
                    ),
                ),
                (
                    "Weights".into(),
                    format!(
                        "{} + {}",
                        r.transunet_checkpoint.display(),
                        if o.sam_checkpoint == "random" {
                            "RANDOM SAM (demo/test only)".to_string()
                        } else {
                            o.sam_checkpoint.clone()
                        }
                    ),
                ),
                ("Device".into(), crate::device::device_name(&device)),
            ],
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

    // Baseline (§11.4.1 step 3): the loaded TransUNet on the validation fold.
    let baseline = match baseline {
        Some(b) => b,
        None => {
            let v = super::phase1::validate(&model.ultra.transunet, &val_loader, &device, None)?;
            Baseline {
                dice: v.metrics.dice,
                dice_img: v.dice_img,
                iou: Some(v.metrics.iou),
            }
        }
    };
    say(&format!(
        "Baseline (Phase 1 TransUNet on the validation fold): Dice {:.4} (per-image {:.4})",
        baseline.dice, baseline.dice_img
    ));

    let make_sidecar =
        |epoch: u64, gs: u64, best: &Best, opt: &AdamW, sched: &Schedule, hist: &[HistoryRow]| {
            let mut sc = Sidecar::new(
                Phase::Phase3,
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
            sc.baseline = Some(baseline);
            sc.init_weights = init_weights.clone();
            sc.extra = serde_json::json!({"weights_id": weights_id, "provenance": provenance});
            sc
        };
    let save = |stem: &str, sc: &Sidecar, opt: &AdamW| -> Result<()> {
        save_checkpoint(
            run.root(),
            stem,
            &model.checkpoint_tensors()?,
            &opt.state_tensors()?,
            sc,
        )?;
        Ok(())
    };
    let interrupted = |epochs_done: u64,
                       best: &Best,
                       history: &[HistoryRow],
                       why: &str|
     -> Result<Phase3Outcome> {
        say(&format!(
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
        Ok(Phase3Outcome::Interrupted {
            run_dir: run.root().to_path_buf(),
            epochs_done,
        })
    };
    let stop_requested = || o.stop.as_ref().is_some_and(|s| s.is_set());

    for epoch in start_epoch..r.max_epochs {
        if o.stop_after_epochs.is_some_and(|k| epoch >= k) {
            return interrupted(
                epoch,
                &best,
                &history,
                "stop requested after a completed epoch",
            );
        }
        let t0 = Instant::now();
        let e1 = epoch + 1;
        let trainable = plan.at(epoch, &all_keys);
        if trainable.is_empty() {
            return Err(Error::Arg(format!(
                "epoch {e1}: every parameter is frozen (check the --freeze-* flags)"
            )));
        }
        console.log_only(&format!("epoch {e1}: {}", trainable.describe(&all_keys)));
        schedule.start_epoch(epoch, &mut opt);
        let lrs = opt.lrs();
        let mut tr = MeanTracker::new();
        let mut bar = (!o.quiet).then(|| {
            console.progress(
                "train",
                Some((e1, r.max_epochs)),
                (steps * o.grad_accum) as u64,
            )
        });
        let mut pending: Vec<MicroBatch> = Vec::with_capacity(o.grad_accum);
        for (i, batch) in train_loader
            .epoch(epoch)
            .take(steps * o.grad_accum)
            .enumerate()
        {
            if stop_requested() {
                return interrupted(epoch, &best, &history, "signal");
            }
            let batch = batch?.to_device(&device)?;
            pending.push(MicroBatch {
                images: batch.images,
                masks: batch.masks,
                embeddings: None,
                dropout_seed: Some(crate::rng::mix(o.seed, "dropout", &[epoch, i as u64])),
            });
            if pending.len() < o.grad_accum {
                continue;
            }
            let out = train_step(
                &model,
                &mut opt,
                &pending,
                &trainable,
                &step_cfg,
                train_cache,
                anchor.as_ref(),
            )?;
            pending.clear();
            global_step += 1;
            if !out.loss.is_finite() {
                return Err(Error::msg(format!(
                    "training loss is {} at epoch {e1} step {}",
                    out.loss, global_step
                )));
            }
            tr.add("loss", out.loss);
            for (k, v) in &out.components {
                tr.add(k, *v);
            }
            for m in &out.refined {
                tr.add_pooled("", m);
            }
            for m in &out.coarse {
                tr.add_pooled("coarse_", m);
            }
            if let Some(b) = bar.as_mut() {
                for _ in 0..o.grad_accum {
                    b.step(Some(out.loss));
                }
            }
        }
        if let Some(b) = bar {
            b.finish();
        }
        if stop_requested() {
            return interrupted(epoch, &best, &history, "signal");
        }
        let do_val = e1 % o.val_every == 0 || e1 == r.max_epochs;
        let val = if do_val {
            Some(validate(
                &model,
                &val_loader,
                &device,
                &step_cfg,
                Some(&cache),
                (!o.quiet).then_some((&console, e1, r.max_epochs)),
            )?)
        } else {
            None
        };
        let is_best = val.is_some_and(|v| best.update(v.refined.dice, epoch));
        let m = |k: &str| tr.mean(k);
        let comp_names = [
            ("coarse", "Coarse"),
            ("refined", "Refined"),
            ("anchor", "Anchor"),
        ];
        let mut row = HistoryRow {
            epoch: e1,
            time_s: t0.elapsed().as_secs_f64(),
            lr: Named(lrs.clone()),
            train_loss: m("loss"),
            components: Named(
                comp_names
                    .iter()
                    .filter_map(|(k, _)| m(k).map(|v| (k.to_string(), v)))
                    .collect(),
            ),
            train_dice: m("dice"),
            train_iou: m("iou"),
            val_loss: val.map(|v| v.loss),
            val_dice: val.map(|v| v.refined.dice),
            val_iou: val.map(|v| v.refined.iou),
            val_precision: val.map(|v| v.refined.precision),
            val_recall: val.map(|v| v.refined.recall),
            val_accuracy: val.map(|v| v.refined.accuracy),
            val_specificity: val.map(|v| v.refined.specificity),
            val_dice_img: val.map(|v| v.refined_dice_img),
            extra: Named::new(),
            is_best,
            note: pending_note.take(),
        };
        if let Some(v) = &val {
            row.extra.set("val_coarse_dice", v.coarse.dice);
            row.extra.set("val_coarse_iou", v.coarse.iou);
        }
        row.extra.set("baseline_dice", baseline.dice);
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
        say(&epoch_report(
            &EpochReport {
                epoch: e1,
                epochs: r.max_epochs,
                train: TrainReport {
                    loss: m("loss").unwrap_or(f64::NAN),
                    components: comp_names
                        .iter()
                        .filter_map(|(k, l)| m(k).map(|v| (l.to_string(), v)))
                        .collect(),
                    dice: m("dice"),
                    iou: m("iou"),
                    lrs,
                },
                validation: val.map(|v| {
                    ValidationTable::Compare(vec![
                        ("Dice".into(), v.coarse.dice, v.refined.dice),
                        ("IoU".into(), v.coarse.iou, v.refined.iou),
                        ("Precision".into(), v.coarse.precision, v.refined.precision),
                        ("Recall".into(), v.coarse.recall, v.refined.recall),
                        ("Accuracy".into(), v.coarse.accuracy, v.refined.accuracy),
                        ("Dice (img)".into(), v.coarse_dice_img, v.refined_dice_img),
                    ])
                }),
                is_best,
                comparison: val.map(|v| PerformanceComparison {
                    baseline: baseline.dice,
                    coarse: v.coarse.dice,
                    refined: v.refined.dice,
                }),
            },
            &style,
        ));
    }

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
    say(&end_of_run(
        "Best refined Dice",
        best.value,
        best.epoch.map(|e| e + 1),
        &run.checkpoint(BEST).0,
        &style,
    ));
    Ok(Phase3Outcome::Complete {
        run_dir: run.root().to_path_buf(),
        best,
        epochs: history.len() as u64,
    })
}
