//! The Phase 3 model (TransUNet + SAM refiner with trainable `Var`s), one optimiser step and the validation pass
//! (SPEC §9.3, §10.1, §11.4). The trainer and the `phase3-step` bench call [`train_step`].
use super::freeze::{EpochTrainable, SAM_PREFIX, TRANSUNET_PREFIX};
use crate::config::ModelConfig;
use crate::data::loader::Loader;
use crate::models::sam::weights::SamWeights;
use crate::models::sam::{EmbeddingCache, LoraConfig};
use crate::models::transunet::{build_trainable, load_into_varmap, state_dict, LoadMode};
use crate::refiner::{ForwardOptions, SamRefiner, SamRefinerSettings, UltraOutput, UltraRefiner};
use crate::train::console::Console;
use crate::train::losses::{
    nearest_target, phase3_loss, weight_anchor, LossOutput, Phase3LossConfig, RefinedLossSize,
};
use crate::train::metrics::{MeanTracker, PooledMetrics};
use crate::train::optim::{AdamW, Grads, Optimizer, ParamGroup};
use crate::train::phase1::per_image_dice;
use crate::train::phase2::{
    build_train_sam, checkpoint_tensors as phase2_checkpoint_tensors,
    param_groups as phase2_param_groups,
};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use std::collections::{BTreeSet, HashMap};

/// The end-to-end model with its trainable variables: TransUNet `Var`s under `transunet.` in `transunet_vars`, the
/// SAM prompt encoder and mask decoder `Var`s (canonical §6.5 keys) in `sam_vars`; the SAM image encoder is frozen
/// (plain tensors).
pub struct Phase3Model {
    pub ultra: UltraRefiner,
    pub transunet_vars: VarMap,
    pub sam_vars: VarMap,
}

fn sorted(varmap: &VarMap, prefix: &str) -> Result<Vec<(String, Var)>> {
    let mut v: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .map_err(|_| Error::msg("VarMap lock poisoned"))?
        .iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

impl Phase3Model {
    /// Builds the model from canonical TransUNet tensors (§5.3 keys, strict) and strictly loaded SAM weights.
    /// `encoder_dtype`: bf16 on CUDA, f32 on CPU (§6.9).
    pub fn new(
        cfg: &ModelConfig,
        transunet: &HashMap<String, Tensor>,
        sam: &SamWeights,
        settings: SamRefinerSettings,
        device: &Device,
        encoder_dtype: DType,
    ) -> Result<Self> {
        Self::with_lora(
            cfg,
            transunet,
            sam,
            settings,
            device,
            encoder_dtype,
            None,
            0,
        )
    }

    /// [`Self::new`] with optional LoRA adapters on the SAM image encoder (SPEC §6.8): adapter `Var`s join
    /// `sam_vars` (starting from the adapters `sam` holds, if any; new ones initialised from `seed`), and the encoder
    /// runs its differentiable path.
    #[allow(clippy::too_many_arguments)]
    pub fn with_lora(
        cfg: &ModelConfig,
        transunet: &HashMap<String, Tensor>,
        sam: &SamWeights,
        settings: SamRefinerSettings,
        device: &Device,
        encoder_dtype: DType,
        lora: Option<&LoraConfig>,
        seed: u64,
    ) -> Result<Self> {
        let transunet_vars = VarMap::new();
        let tu = build_trainable(
            &cfg.transunet,
            &transunet_vars,
            "transunet",
            DType::F32,
            device,
            0,
            None,
        )?;
        load_into_varmap(&tu, &transunet_vars, transunet, LoadMode::Strict)?;
        let sam_vars = VarMap::new();
        let s = build_train_sam(
            &cfg.sam,
            sam.clone(),
            &sam_vars,
            device,
            encoder_dtype,
            lora,
            seed,
        )?;
        Ok(Phase3Model {
            ultra: UltraRefiner::new(tu, SamRefiner::new(s, settings)),
            transunet_vars,
            sam_vars,
        })
    }

    /// The two AdamW groups of §11.4.1 step 5, holding every parameter that may become trainable, keys prefixed
    /// `transunet.` / `sam.` and sorted; with LoRA a third group `lora` (the SAM learning rate, as in Phase 2).
    pub fn param_groups(
        &self,
        transunet_lr: f64,
        sam_lr: f64,
        weight_decay: f64,
    ) -> Result<Vec<ParamGroup>> {
        let mut groups = vec![ParamGroup::new(
            "transunet",
            transunet_lr,
            weight_decay,
            sorted(&self.transunet_vars, "")?,
        )];
        groups.extend(phase2_param_groups(&self.sam_vars, sam_lr, weight_decay)?);
        Ok(groups)
    }

    /// TransUNet tensors under canonical keys (parameters + BatchNorm buffers, no prefix).
    pub fn transunet_state(&self) -> Result<HashMap<String, Tensor>> {
        Ok(state_dict(&self.ultra.transunet, &self.transunet_vars)?
            .into_iter()
            .collect())
    }

    /// Every model tensor of the checkpoint (§11.1.4): `transunet.` + §5.3 and `sam.` + §6.5 (with LoRA: encoder
    /// weights unmerged plus the adapters, as Phase 2 stores them).
    pub fn checkpoint_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = self
            .transunet_state()?
            .into_iter()
            .map(|(k, t)| (format!("{TRANSUNET_PREFIX}{k}"), t))
            .collect();
        for (k, t) in phase2_checkpoint_tensors(&self.ultra.refiner.sam)? {
            out.insert(format!("{SAM_PREFIX}{k}"), t);
        }
        Ok(out)
    }

    /// Current TransUNet parameters (keys with the `transunet.` prefix), for the weight-anchor snapshot.
    pub fn transunet_params(&self) -> Result<Vec<(String, Var)>> {
        sorted(&self.transunet_vars, "")
    }
}

/// Loss and step settings (§9.3, §11.1.3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepConfig {
    pub loss: Phase3LossConfig,
    pub loss_size: RefinedLossSize,
    /// `--grad-clip` (0 disables).
    pub grad_clip: f64,
    /// `--transunet-weight-reg β` (0 disables the anchor).
    pub anchor_beta: f64,
}

/// One micro-batch: images `(B,1,S,S)`, masks `(B,S,S)` on the model's device, optional precomputed SAM embeddings
/// (`(B,C,g,g)`; otherwise the cache or the encoder provides them) and the TransUNet dropout seed.
pub struct MicroBatch {
    pub images: Tensor,
    pub masks: Tensor,
    pub embeddings: Option<Tensor>,
    pub dropout_seed: Option<u64>,
}

/// Phase 1 weights `θ₁` kept as plain tensors for the weight anchor (keys with the `transunet.` prefix).
#[derive(Debug, Clone, Default)]
pub struct AnchorSnapshot {
    pub tensors: HashMap<String, Tensor>,
}

impl AnchorSnapshot {
    /// Snapshot of the model's current TransUNet parameters.
    pub fn take(model: &Phase3Model) -> Result<Self> {
        Ok(AnchorSnapshot {
            tensors: model
                .transunet_params()?
                .into_iter()
                .map(|(k, v)| Ok((k, v.as_tensor().detach().copy()?)))
                .collect::<Result<_>>()?,
        })
    }
}

/// Loss and outputs of one forward.
pub struct Forward {
    pub loss: LossOutput,
    pub out: UltraOutput,
}

/// The Phase 3 forward of one batch: TransUNet (training mode only when it is trained as a whole; its output
/// detached when nothing of it is trainable), refiner, §9.3 loss at the refined-loss size, plus the anchor over the
/// trainable TransUNet parameters.
pub fn forward_loss(
    model: &Phase3Model,
    mb: &MicroBatch,
    trainable: &EpochTrainable,
    cfg: &StepConfig,
    cache: Option<&EmbeddingCache>,
    anchor: Option<&AnchorSnapshot>,
    train: bool,
) -> Result<Forward> {
    let u = &model.ultra;
    let tu_train = train && trainable.transunet_train_mode;
    let seed = if tu_train { mb.dropout_seed } else { None };
    let logits = u.transunet.forward_t(&mb.images, tu_train, seed)?;
    let logits = if train && trainable.transunet_any {
        logits
    } else {
        logits.detach()
    };
    // LoRA dropout (SPEC §6.8) while SAM trains; the frozen encoder path ignores the seed.
    let lora_seed = mb
        .dropout_seed
        .filter(|_| train && trainable.sam_any)
        .map(|s| crate::rng::mix(s, "lora-dropout", &[]));
    let fo = ForwardOptions {
        train: tu_train,
        dropout_seed: lora_seed,
        embeddings: mb.embeddings.as_ref(),
        cache,
    };
    let out = u.forward_from_logits(&mb.images, logits, &fo)?;
    let (z, y) = match cfg.loss_size {
        RefinedLossSize::Full => {
            let n = out.refined_logits_n.dim(1)?;
            (out.refined_logits_n.clone(), nearest_target(&mb.masks, n)?)
        }
        RefinedLossSize::Coarse => (out.refined_logits_s.clone(), mb.masks.clone()),
    };
    let anchor_t = match anchor {
        Some(a) if train && cfg.anchor_beta > 0.0 => {
            let params = model.transunet_params()?;
            let mut pairs = Vec::new();
            for (k, v) in &params {
                if trainable.keys.contains(k) {
                    let snap = a.tensors.get(k).ok_or_else(|| {
                        Error::msg(format!("weight anchor: no Phase 1 snapshot of `{k}`"))
                    })?;
                    pairs.push((v.as_tensor(), snap));
                }
            }
            Some(weight_anchor(
                &pairs,
                cfg.anchor_beta,
                DType::F32,
                mb.images.device(),
            )?)
        }
        _ => None,
    };
    let loss = phase3_loss(
        &out.coarse_logits,
        &mb.masks,
        &z,
        &y,
        &cfg.loss,
        anchor_t.as_ref(),
    )?;
    Ok(Forward { loss, out })
}

/// The optimiser groups restricted to the trainable keys (gradients of frozen parameters are never collected).
pub fn trainable_groups(groups: &[ParamGroup], trainable: &EpochTrainable) -> Vec<ParamGroup> {
    groups
        .iter()
        .map(|g| ParamGroup {
            params: g
                .params
                .iter()
                .filter(|(k, _)| trainable.keys.contains(k))
                .cloned()
                .collect(),
            ..g.clone()
        })
        .collect()
}

/// What one optimiser step reports (means over its micro-batches).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    pub loss: f64,
    /// Unweighted `coarse`, `refined` (and `anchor`) components.
    pub components: Vec<(String, f64)>,
    /// Pooled metrics of `σ(refined_S)` and of `P` against `y_S`, per micro-batch.
    pub refined: Vec<PooledMetrics>,
    pub coarse: Vec<PooledMetrics>,
    /// Total gradient norm before clipping.
    pub grad_norm: f64,
}

/// One Phase 3 optimiser step exactly as the trainer takes it: for each micro-batch (`--grad-accum k` = `micro.len()`)
/// forward, loss `/k`, backward, gradients of the trainable parameters summed; then clipping (§11.1.3) and AdamW.
/// The learning rates are whatever the schedule set for the epoch.
pub fn train_step(
    model: &Phase3Model,
    opt: &mut AdamW,
    micro: &[MicroBatch],
    trainable: &EpochTrainable,
    cfg: &StepConfig,
    cache: Option<&EmbeddingCache>,
    anchor: Option<&AnchorSnapshot>,
) -> Result<StepOutput> {
    if micro.is_empty() {
        return Err(Error::msg("train_step: no micro-batch"));
    }
    let k = micro.len() as f64;
    let groups = trainable_groups(opt.groups(), trainable);
    let mut grads = Grads::new();
    let mut out = StepOutput::default();
    let mut tr = MeanTracker::new();
    for mb in micro {
        let f = forward_loss(model, mb, trainable, cfg, cache, anchor, true)?;
        let total = f.loss.total.affine(1.0 / k, 0.0)?;
        let store = total.backward()?;
        grads.accumulate(&store, &groups)?;
        drop(store);
        tr.add("loss", f.loss.total_f64()?);
        for (n, v) in f.loss.component_values()? {
            tr.add(&n, v);
        }
        let refined = crate::nn::sigmoid(&f.out.refined_logits_s.detach())?;
        out.refined
            .push(PooledMetrics::from_batch(&refined, &mb.masks)?);
        out.coarse.push(PooledMetrics::from_batch(
            &f.out.coarse_prob_raw.detach(),
            &mb.masks,
        )?);
    }
    out.grad_norm = grads.clip_norm(cfg.grad_clip)?;
    opt.step(&grads)?;
    out.loss = tr.mean("loss").unwrap_or(f64::NAN);
    out.components = tr
        .means()
        .into_iter()
        .filter(|(n, _)| n != "loss")
        .collect();
    Ok(out)
}

/// Validation of one epoch (§11.4.1 step 6): coarse metrics on `P`, refined metrics on `σ(refined_S)` at `S`
/// (means of the per-batch pooled values, §10.1), per-image Dice means, and the mean batch loss (no anchor).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase3Validation {
    pub loss: f64,
    pub coarse: PooledMetrics,
    pub refined: PooledMetrics,
    pub coarse_dice_img: f64,
    pub refined_dice_img: f64,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Eval-mode pass over `loader` (dataset order, no augmentation), embeddings through `cache`.
pub fn validate(
    model: &Phase3Model,
    loader: &Loader,
    device: &Device,
    cfg: &StepConfig,
    cache: Option<&EmbeddingCache>,
    progress: Option<(&Console, u64, u64)>,
) -> Result<Phase3Validation> {
    let none = EpochTrainable::default();
    let mut tr = MeanTracker::new();
    let (mut dc, mut dr) = (Vec::new(), Vec::new());
    let n = loader.num_batches() as u64;
    let mut bar = progress.map(|(c, e, ne)| c.progress("val", Some((e, ne)), n));
    for batch in loader.epoch(0) {
        let batch = batch?.to_device(device)?;
        let mb = MicroBatch {
            images: batch.images,
            masks: batch.masks,
            embeddings: None,
            dropout_seed: None,
        };
        let f = forward_loss(model, &mb, &none, cfg, cache, None, false)?;
        let loss = f.loss.total_f64()?;
        let refined = crate::nn::sigmoid(&f.out.refined_logits_s.detach())?;
        let coarse = f.out.coarse_prob_raw.detach();
        tr.add("loss", loss);
        tr.add_pooled("c_", &PooledMetrics::from_batch(&coarse, &mb.masks)?);
        tr.add_pooled("r_", &PooledMetrics::from_batch(&refined, &mb.masks)?);
        dc.extend(per_image_dice(&coarse, &mb.masks)?);
        dr.extend(per_image_dice(&refined, &mb.masks)?);
        if let Some(b) = bar.as_mut() {
            b.step(Some(loss));
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    Ok(Phase3Validation {
        loss: tr.mean("loss").unwrap_or(f64::NAN),
        coarse: tr.pooled_mean("c_"),
        refined: tr.pooled_mean("r_"),
        coarse_dice_img: mean(&dc),
        refined_dice_img: mean(&dr),
    })
}

/// Keys of every parameter of the optimiser.
pub fn all_keys(opt: &AdamW) -> BTreeSet<String> {
    opt.groups()
        .iter()
        .flat_map(|g| g.params.iter().map(|(k, _)| k.clone()))
        .collect()
}
