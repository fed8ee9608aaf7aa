//! Phase 3 trainer (SPEC §11.4, §11.1): a short tiny run whose loss falls, freezing + cosine groups, the gradient
//! reaching the TransUNet through the refiner, exact resume, loading every accepted SAM checkpoint form, and the
//! best checkpoint loading in evaluation (`eval::model`).
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use ultrarefiner::config::Config;
use ultrarefiner::device::DeviceSpec;
use ultrarefiner::eval::model::Member;
use ultrarefiner::eval::model::{EvalModel, ModelSource};
use ultrarefiner::models::sam::weights::{random_weights, SamFormat, SamWeights};
use ultrarefiner::models::sam::{LoraConfig, LoraTarget};
use ultrarefiner::refiner::{ForwardOptions, Gate, SamRefinerSettings};
use ultrarefiner::testing::{fixture_path, prepared_phantom, random_transunet_checkpoint};
use ultrarefiner::train::losses::{Phase3LossConfig, RefinedLossSize};
use ultrarefiner::train::optim::Grads;
use ultrarefiner::train::optim::{AdamW, Optimizer};
use ultrarefiner::train::phase3::step::all_keys;
use ultrarefiner::train::phase3::{
    forward_loss, load_sam_source, resolve_refiner, run, train_step, EpochTrainable, FreezePlan,
    MicroBatch, Phase3Model, Phase3Options, Phase3Outcome, StepConfig,
};
use ultrarefiner::train::schedule::cosine_lr;

const S: usize = 64;

struct Fixture {
    _dir: tempfile::TempDir,
    data: PathBuf,
    transunet: PathBuf,
}

/// 16 phantom images (5 folds) and a random tiny TransUNet at S = 64 saved as a Phase 1 checkpoint.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = prepared_phantom(dir.path(), 16, true).unwrap();
        let transunet = dir.path().join("phase1_best.safetensors");
        random_transunet_checkpoint(&transunet, S).unwrap();
        Fixture {
            _dir: dir,
            data,
            transunet,
        }
    })
}

fn opts(out: &Path, epochs: usize) -> Phase3Options {
    let f = fixture();
    let mut o = Phase3Options::new(&f.data);
    o.dataset = Some("PHANTOM".into());
    o.config = "tiny".into();
    o.img_size = Some(S);
    o.transunet_checkpoint = Some(f.transunet.clone());
    o.sam_checkpoint = "random".into();
    o.max_epochs = Some(epochs);
    o.batch_size = Some(4);
    o.transunet_lr = 1e-3;
    o.sam_lr = 1e-3;
    o.refined_loss_size = Some(S);
    o.output_dir = out.to_path_buf();
    o.device = Some(DeviceSpec::Cpu);
    o.num_workers = 2;
    o.quiet = true;
    o
}

fn load(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    let a: Vec<f32> = a
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = b
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    a == b
}

fn csv_without_time(p: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(p).unwrap();
    let rows: Vec<Vec<String>> = text
        .lines()
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    let col = rows[0].iter().position(|c| c == "time_s").unwrap();
    rows.into_iter()
        .map(|mut r| {
            r.remove(col);
            r
        })
        .collect()
}

/// A 4-epoch tiny run: the training loss falls; the TransUNet frozen for epoch 1 is bit-identical to the Phase 1
/// weights after it (eval mode keeps the BatchNorm statistics) while SAM moved; every group follows the cosine
/// schedule from epoch 0 (the TransUNet group unfrozen at epoch 2 starts at lr_1); all artefacts exist; the best
/// checkpoint loads in evaluation with the recorded refiner settings.
#[test]
fn tiny_run_learns_freezes_and_follows_cosine() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(tmp.path(), 4);
    o.freeze_transunet_epochs = 1;
    o.save_every = 1;
    o.mask_prompt_style = Some("gaussian".into());
    let out = run(&o).unwrap();
    assert!(
        matches!(out, Phase3Outcome::Complete { epochs: 4, .. }),
        "{out:?}"
    );
    let rd = out.run_dir().to_path_buf();
    for f in [
        "best.safetensors",
        "best.json",
        "latest.safetensors",
        "latest.json",
        "final.safetensors",
        "final.json",
        "epoch_1.safetensors",
        "metrics.csv",
        "summary.json",
        "progress.png",
        "train.log",
        "config.resolved.toml",
    ] {
        assert!(rd.join(f).is_file(), "{f} missing in {}", rd.display());
    }
    let sc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rd.join("final.json")).unwrap()).unwrap();
    let hist = sc["history"].as_array().unwrap();
    let losses: Vec<f64> = hist
        .iter()
        .map(|h| h["train_loss"].as_f64().unwrap())
        .collect();
    assert!(
        losses[3] < losses[0],
        "training loss did not fall: {losses:?}"
    );
    // Cosine on every group from epoch 0.
    for (e, h) in hist.iter().enumerate() {
        for (g, base) in [("transunet", 1e-3), ("sam", 1e-3)] {
            let lr = h["lr"][g].as_f64().unwrap();
            let want = cosine_lr(base, 1e-6, e as u64, 4);
            assert!((lr - want).abs() < 1e-15, "epoch {e} {g}: {lr} vs {want}");
        }
    }
    assert!(sc["baseline"]["dice"].is_number());
    assert_eq!(sc["config"]["refiner"]["mask_prompt_style"], "gaussian");
    // Frozen TransUNet during epoch 1: identical to Phase 1 (parameters and BatchNorm buffers); SAM changed.
    let p1 = load(&fixture().transunet);
    let e1 = load(&rd.join("epoch_1.safetensors"));
    let e4 = load(&rd.join("final.safetensors"));
    let mut changed_later = false;
    for (k, t) in &p1 {
        let k3 = format!("transunet.{k}");
        assert!(same(t, &e1[&k3]), "{k} changed while frozen");
        changed_later |= !same(t, &e4[&k3]);
    }
    assert!(changed_later, "TransUNet never trained after unfreezing");
    let sam0 = random_weights(&Config::load("tiny").unwrap().model.sam, 42, &Device::Cpu).unwrap();
    let k = "mask_decoder.iou_token.weight";
    assert!(
        !same(&sam0[k], &e1[&format!("sam.{k}")]),
        "SAM did not train in epoch 1"
    );
    let k = "image_encoder.neck.0.weight";
    assert!(
        same(&sam0[k], &e4[&format!("sam.{k}")]),
        "SAM image encoder must stay frozen"
    );
    // metrics.csv carries coarse and refined metrics.
    let csv = std::fs::read_to_string(rd.join("metrics.csv")).unwrap();
    let head = csv.lines().next().unwrap();
    for c in [
        "val_dice",
        "val_coarse_dice",
        "val_coarse_iou",
        "baseline_dice",
        "lr_transunet",
        "lr_sam",
        "refined",
    ] {
        assert!(head.contains(c), "metrics.csv header lacks {c}: {head}");
    }
    assert_eq!(csv.lines().count(), 5);
    let log = std::fs::read_to_string(rd.join("train.log")).unwrap();
    assert!(
        log.contains("[PERFORMANCE COMPARISON]") && log.contains("Baseline"),
        "{log}"
    );
    // The best checkpoint loads in evaluation (transunet.* + sam.*, refiner settings from the sidecar).
    let mut cfg = Config::load("tiny").unwrap();
    cfg.model.transunet.img_size = 96; // the sidecar's model geometry must win
    let m = EvalModel::load(
        &ModelSource::Phase3 {
            checkpoint: rd.join("best.safetensors"),
        },
        &cfg,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(m.img_size, S);
    assert!(m.refines());
    assert_eq!(m.refiner.as_ref().unwrap().mask_prompt_style, "gaussian");
    let x = Tensor::rand(0f32, 1.0, (1, 1, S, S), &Device::Cpu).unwrap();
    let p = m.predict(&x, false).unwrap();
    assert_eq!(p.refined.unwrap().dims(), &[1, S, S]);

    // --resume auto on a complete run trains nothing.
    let mut o2 = o.clone();
    o2.resume = Some("auto".into());
    assert!(matches!(
        run(&o2).unwrap(),
        Phase3Outcome::AlreadyComplete { .. }
    ));
}

/// Stopped after epoch 1 and resumed: bit-identical final tensors (weights, BN buffers, optimiser state) and
/// metrics to the uninterrupted run.
#[test]
fn resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let mut oa = opts(&tmp.path().join("a"), 2);
    oa.grad_accum = 2;
    oa.batch_size = Some(2);
    let (a, b) = run_and_resume(&oa, &tmp.path().join("b"));
    let fa = load(&a.run_dir().join("final.safetensors"));
    assert!(fa
        .keys()
        .any(|k| k.starts_with("__optim__.transunet.exp_avg.")));
    assert_eq!(
        csv_without_time(&a.run_dir().join("metrics.csv")),
        csv_without_time(&b.run_dir().join("metrics.csv"))
    );
}

/// Runs the 2-epoch `oa` uninterrupted, and again in `b_dir` stopped after epoch 1 (exit code 75) and resumed; the
/// final checkpoints (weights, buffers, optimiser state) must be bit-identical. Returns both outcomes.
fn run_and_resume(oa: &Phase3Options, b_dir: &Path) -> (Phase3Outcome, Phase3Outcome) {
    let a = run(oa).unwrap();
    let mut ob = oa.clone();
    ob.output_dir = b_dir.to_path_buf();
    ob.stop_after_epochs = Some(1);
    let b1 = run(&ob).unwrap();
    assert!(
        matches!(b1, Phase3Outcome::Interrupted { epochs_done: 1, .. }),
        "{b1:?}"
    );
    assert_eq!(b1.exit_code(), 75);
    ob.stop_after_epochs = None;
    ob.resume = Some("auto".into());
    let b = run(&ob).unwrap();
    assert!(
        matches!(b, Phase3Outcome::Complete { epochs: 2, .. }),
        "{b:?}"
    );
    let fa = load(&a.run_dir().join("final.safetensors"));
    let fb = load(&b.run_dir().join("final.safetensors"));
    assert_eq!(fa.len(), fb.len());
    for (k, t) in &fa {
        assert!(same(t, &fb[k]), "{k} differs after resume");
    }
    (a, b)
}

/// Only `L_refined` (`λ_c = 0`, `λ_r = 1`), no clipping, no anchor.
fn refined_only() -> StepConfig {
    StepConfig {
        loss: Phase3LossConfig {
            coarse_weight: 0.0,
            refined_weight: 1.0,
        },
        loss_size: RefinedLossSize::Full,
        grad_clip: 0.0,
        anchor_beta: 0.0,
    }
}

/// The tiny Phase 3 model at S over the fixture's TransUNet and random SAM weights.
fn tiny_model(lora: Option<&LoraConfig>) -> Phase3Model {
    let sam = SamWeights {
        tensors: random_weights(&Config::load("tiny").unwrap().model.sam, 1, &Device::Cpu).unwrap(),
        format: SamFormat::Original,
    };
    tiny_model_from(&sam, lora).unwrap()
}

fn tiny_model_from(
    sam: &SamWeights,
    lora: Option<&LoraConfig>,
) -> ultrarefiner::Result<Phase3Model> {
    let mut cfg = Config::load("tiny").unwrap();
    cfg.model.transunet.img_size = S;
    Phase3Model::with_lora(
        &cfg.model,
        &load(&fixture().transunet),
        sam,
        SamRefinerSettings::default(),
        &Device::Cpu,
        DType::F32,
        lora,
        0,
    )
}

fn batch(n: usize) -> MicroBatch {
    let images = Tensor::rand(0f32, 1.0, (n, 1, S, S), &Device::Cpu).unwrap();
    let masks = images
        .ge(0.5)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .squeeze(1)
        .unwrap();
    MicroBatch {
        images,
        masks,
        embeddings: None,
        dropout_seed: Some(7),
    }
}

fn abs_sum(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// With SAM frozen and only the refined loss, the TransUNet still receives a gradient (through the differentiable
/// prompts and the mask prompt) and moves; with the TransUNet frozen as well nothing is trainable.
#[test]
fn gradient_reaches_transunet_through_the_refiner() {
    let model = tiny_model(None);
    let mut opt = AdamW::new(model.param_groups(1e-3, 1e-3, 0.0).unwrap()).unwrap();
    let keys: Vec<String> = all_keys(&opt).into_iter().collect();
    let mut plan = FreezePlan::all_trainable(4, 2);
    plan.freeze_sam_all = true;
    let trainable: EpochTrainable = plan.at(0, &keys);
    assert!(trainable.transunet_any && !trainable.sam_any);
    let before: HashMap<String, Tensor> = model
        .transunet_state()
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.copy().unwrap()))
        .collect();
    let cfg_step = refined_only();
    let mut mb = batch(2);
    mb.dropout_seed = None;
    let out = train_step(&model, &mut opt, &[mb], &trainable, &cfg_step, None, None).unwrap();
    assert!(out.grad_norm > 0.0 && out.grad_norm.is_finite(), "{out:?}");
    let after = model.transunet_state().unwrap();
    let moved = before
        .iter()
        .filter(|(k, t)| {
            !k.contains("running") && !k.contains("num_batches") && !same(t, &after[*k])
        })
        .count();
    assert!(moved > 10, "only {moved} TransUNet tensors moved");
    // SAM parameters got no update (frozen: no gradient collected, no AdamW state).
    assert!(opt
        .state_tensors()
        .unwrap()
        .iter()
        .all(|(k, _)| !k.starts_with("__optim__.sam.")));
    plan.freeze_transunet_epochs = 1;
    assert!(plan.at(0, &keys).is_empty());
}

/// Gated refinement (SPEC §7.8) end to end: the gated model's refined logits are the gate applied to the plain
/// model's; the coarse probability receives gradient through both terms of the blend (the direct coarse term and the
/// SAM-refined term via the prompts); the refined loss alone trains the TransUNet and the SAM decoder.
#[test]
fn gated_refinement_blends_and_passes_gradient_both_ways() {
    let plain = tiny_model(None);
    let mut gated = tiny_model(None);
    let g = Gate::new(1.5, 0.05, 0.8).unwrap();
    gated.ultra.gate = Some(g);
    let mb = batch(2);
    let o0 = plain.ultra.forward(&mb.images).unwrap();
    let o1 = gated.ultra.forward(&mb.images).unwrap();
    let want = g
        .apply(&o0.refined_logits_n, &o0.sam_inputs.coarse)
        .unwrap();
    assert!(same(&o1.refined_logits_n, &want));
    assert!(!same(&o1.refined_logits_n, &o0.refined_logits_n));
    assert_eq!(o1.refined_logits_s.dims(), &[2, S, S]);

    // ∂/∂P through the coarse term alone, the refined term alone, and both.
    let p = candle_core::Var::from_tensor(&o0.coarse_prob.detach()).unwrap();
    let fo = ForwardOptions::default();
    let (si, _, r0, _) = plain
        .ultra
        .refine_coarse(&mb.images, p.as_tensor(), &fo)
        .unwrap();
    let w = Tensor::randn(0f32, 1.0, r0.refined_n.shape(), &Device::Cpu).unwrap();
    let grad_p = |t: Tensor| {
        let gs = (t * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = gs.get(p.as_tensor()).expect("no gradient on P").clone();
        let a = abs_sum(&gp);
        assert!(a.is_finite() && a > 0.0, "|∂/∂P| = {a}");
        a
    };
    grad_p(g.apply(&r0.refined_n.detach(), &si.coarse).unwrap());
    grad_p(g.apply(&r0.refined_n, &si.coarse.detach()).unwrap());
    let (_, _, r1, _) = gated
        .ultra
        .refine_coarse(&mb.images, p.as_tensor(), &fo)
        .unwrap();
    grad_p(r1.refined_n);

    // The refined loss alone reaches the TransUNet and the SAM decoder through the gate.
    let opt = AdamW::new(gated.param_groups(1e-3, 1e-3, 0.0).unwrap()).unwrap();
    let keys: Vec<String> = all_keys(&opt).into_iter().collect();
    let trainable = FreezePlan::all_trainable(4, 2).at(0, &keys);
    let cfg_step = refined_only();
    let f = forward_loss(&gated, &mb, &trainable, &cfg_step, None, None, true).unwrap();
    let store = f.loss.total.backward().unwrap();
    let grads = Grads::from_store(&store, opt.groups()).unwrap();
    for prefix in ["transunet.", "sam.mask_decoder."] {
        let total: f64 = keys
            .iter()
            .filter(|k| k.starts_with(prefix))
            .filter_map(|k| grads.get(k))
            .map(abs_sum)
            .sum();
        assert!(total.is_finite() && total > 0.0, "{prefix}: {total}");
    }
}

/// A tiny run with `--use-gated-refinement` records the gate in best.json's refiner configuration, and evaluation
/// loads it from there; invalid gate bounds are refused.
#[test]
fn gated_run_records_the_gate_for_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(tmp.path(), 1);
    o.use_gated_refinement = true;
    o.gate_max = 0.6;
    o.gate_gamma = 2.0;
    let out = run(&o).unwrap();
    let rd = out.run_dir().to_path_buf();
    let sc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rd.join("best.json")).unwrap()).unwrap();
    let r = &sc["config"]["refiner"];
    assert_eq!(r["use_gated_refinement"], true);
    assert_eq!(r["gate_gamma"], 2.0);
    assert_eq!(r["gate_min"], 0.0);
    assert_eq!(r["gate_max"], 0.6);
    let m = EvalModel::load(
        &ModelSource::Phase3 {
            checkpoint: rd.join("best.safetensors"),
        },
        &Config::load("tiny").unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    match &m.members[0] {
        Member::Full(u) => assert_eq!(u.gate, Some(Gate::new(2.0, 0.0, 0.6).unwrap())),
        other => panic!("not a refiner: {other:?}"),
    }
    let x = Tensor::rand(0f32, 1.0, (1, 1, S, S), &Device::Cpu).unwrap();
    let p = m.predict(&x, false).unwrap().refined.unwrap();
    assert!(abs_sum(&p).is_finite());
    let mut bad = opts(&tmp.path().join("bad"), 1);
    bad.use_gated_refinement = true;
    bad.gate_min = 0.9;
    assert!(run(&bad).is_err());
}

/// LoRA in Phase 3 (SPEC §6.8): every adapter `Var` (qkv, proj, mlp of every block) is in the `lora` group and
/// receives a non-zero gradient once `B` left its zero initialisation; the encoder weights are no `Var`s.
#[test]
fn lora_adapters_all_receive_gradient() {
    let l = LoraConfig {
        targets: vec![LoraTarget::Qkv, LoraTarget::Proj, LoraTarget::Mlp],
        ..LoraConfig::default()
    };
    let model = tiny_model(Some(&l));
    let mut opt = AdamW::new(model.param_groups(1e-3, 1e-2, 0.0).unwrap()).unwrap();
    let lora: Vec<String> = opt
        .groups()
        .iter()
        .find(|g| g.name == "lora")
        .expect("no lora group")
        .params
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(lora.len(), 4 * 4 * 2, "{lora:?}");
    let keys: Vec<String> = all_keys(&opt).into_iter().collect();
    assert!(keys
        .iter()
        .filter(|k| k.starts_with("sam.image_encoder."))
        .all(|k| k.ends_with(".lora_a") || k.ends_with(".lora_b")));
    let trainable = FreezePlan::all_trainable(4, 2).at(0, &keys);
    let cfg_step = StepConfig {
        loss: Phase3LossConfig::default(),
        loss_size: RefinedLossSize::Full,
        grad_clip: 1.0,
        anchor_beta: 0.0,
    };
    // One step moves B off zero; the next backward reaches A and B of every adapter.
    train_step(
        &model,
        &mut opt,
        &[batch(2)],
        &trainable,
        &cfg_step,
        None,
        None,
    )
    .unwrap();
    let f = forward_loss(&model, &batch(2), &trainable, &cfg_step, None, None, true).unwrap();
    let store = f.loss.total.backward().unwrap();
    let grads = Grads::from_store(&store, opt.groups()).unwrap();
    for k in &lora {
        let g = grads.get(k).unwrap_or_else(|| panic!("{k}: no gradient"));
        let a = abs_sum(g);
        assert!(a.is_finite() && a > 0.0, "{k}: |grad| = {a}");
    }
}

/// A tiny `--use-lora` run: the checkpoint holds the unmerged encoder plus the adapters and their optimiser state,
/// resumes bit-identically, loads in evaluation (adapters merged with the recorded α), and carries its adapters into
/// a new Phase 3 model when given as `--sam-checkpoint` (or merges them without `--use-lora`).
#[test]
fn lora_run_resumes_and_carries_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let mut oa = opts(&tmp.path().join("a"), 2);
    oa.use_lora = true;
    oa.lora_targets = "qkv,mlp".into();
    oa.lora_alpha = 8.0;
    let (a, _) = run_and_resume(&oa, &tmp.path().join("b"));
    let final_a = a.run_dir().join("final.safetensors");
    let fa = load(&final_a);
    let kb = "sam.image_encoder.blocks.0.mlp.lin2.lora_b";
    assert!(abs_sum(&fa[kb]) > 0.0, "{kb} never trained");
    assert!(fa.contains_key("sam.image_encoder.blocks.3.attn.qkv.lora_a"));
    assert!(!fa.contains_key("sam.image_encoder.blocks.0.attn.proj.lora_a"));
    assert!(fa.keys().any(|k| k.starts_with("__optim__.lora.")));
    let log = std::fs::read_to_string(a.run_dir().join("train.log")).unwrap();
    assert!(log.contains("embedding cache off"), "{log}");
    // The frozen encoder weights are untouched.
    let sam0 = random_weights(&Config::load("tiny").unwrap().model.sam, 42, &Device::Cpu).unwrap();
    let kw = "image_encoder.blocks.0.attn.qkv.weight";
    assert!(same(&sam0[kw], &fa[&format!("sam.{kw}")]));

    // Evaluation merges the adapters.
    let m = EvalModel::load(
        &ModelSource::Phase3 {
            checkpoint: final_a.clone(),
        },
        &Config::load("tiny").unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let x = Tensor::rand(0f32, 1.0, (1, 1, S, S), &Device::Cpu).unwrap();
    assert!(abs_sum(&m.predict(&x, false).unwrap().refined.unwrap()).is_finite());

    // Carried into a new Phase 3 model (same α), or merged without LoRA; a different α is refused.
    let mut cfg = Config::load("tiny").unwrap();
    cfg.model.transunet.img_size = S;
    let dev = Device::Cpu;
    let spec = final_a.to_str().unwrap();
    let l = LoraConfig {
        alpha: 8.0,
        targets: vec![LoraTarget::Qkv, LoraTarget::Mlp],
        ..LoraConfig::default()
    };
    let mut src = load_sam_source(spec, &cfg.model.sam, 0, &dev).unwrap();
    assert_eq!(src.lora_alpha, Some(8.0));
    let mut wrong = l.clone();
    wrong.alpha = 4.0;
    assert!(src.reconcile_adapters(Some(&wrong)).is_err());
    assert!(src.reconcile_adapters(Some(&l)).unwrap().is_some());
    let carried = tiny_model_from(&src.weights, Some(&l)).unwrap();
    let ck = carried.checkpoint_tensors().unwrap();
    assert!(same(&ck[kb], &fa[kb]));
    let mut only_qkv = l.clone();
    only_qkv.targets = vec![LoraTarget::Qkv];
    assert!(tiny_model_from(&src.weights, Some(&only_qkv)).is_err());
    // The Phase 2 form: `sam.*` + optimiser keys, α under `config.lora_alpha` of its best.json.
    let p2 = tmp.path().join("p2");
    std::fs::create_dir_all(&p2).unwrap();
    let p2_best = p2.join("best.safetensors");
    let p2_tensors: HashMap<String, Tensor> = fa
        .iter()
        .filter(|(k, _)| !k.starts_with("transunet."))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    candle_core::safetensors::save(&p2_tensors, &p2_best).unwrap();
    std::fs::write(
        p2.join("best.json"),
        r#"{"kind":"phase2","config":{"use_lora":true,"lora_rank":4,"lora_alpha":8.0,"lora_targets":"qkv,mlp"}}"#,
    )
    .unwrap();
    let src_p2 = load_sam_source(p2_best.to_str().unwrap(), &cfg.model.sam, 0, &dev).unwrap();
    assert_eq!(src_p2.lora_alpha, Some(8.0));
    assert!(same(&src_p2.weights.tensors[&kb[4..]], &fa[kb]));
    let merged_export = carried.ultra.refiner.sam.export_tensors(true).unwrap();
    let mut src2 = load_sam_source(spec, &cfg.model.sam, 0, &dev).unwrap();
    assert!(src2.reconcile_adapters(None).unwrap().is_some());
    assert!(!src2.has_adapters());
    for (k, t) in &merged_export {
        assert!(
            same(t, &src2.weights.tensors[k]),
            "{k}: merge differs from the export"
        );
    }
}

/// `--sam-checkpoint` accepts the original `.pth`, a converted canonical safetensors, a Phase 2
/// `best_sam.safetensors` (+ `best_sam.json`, whose settings are used) and a file with `sam.*` keys (Phase 2/3
/// checkpoint); all give the same tensors.
#[test]
fn loads_every_sam_checkpoint_form() {
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Config::load("narrow").unwrap();
    let scfg = &cfg.model.sam;
    let pth = fixture_path("sam_narrow.pth").unwrap();
    let a = load_sam_source(pth.to_str().unwrap(), scfg, 0, &dev).unwrap();
    assert!(a.phase2_sidecar.is_none());
    assert_eq!(a.provenance, "sam");
    // Converted (`ultrarefiner convert`).
    let conv = tmp.path().join("sam_narrow.safetensors");
    ultrarefiner::convert::pth::sam_pth_to_safetensors(&pth, &conv).unwrap();
    // Phase 2 SAM-native export + sidecar.
    let native = tmp.path().join("best_sam.safetensors");
    ultrarefiner::models::sam::weights::save_safetensors_atomic(&a.weights.ordered(scfg), &native)
        .unwrap();
    std::fs::write(
        tmp.path().join("best_sam.json"),
        r#"{"format":"sam-native","provenance":"medsam","normalization":"unit","mask_prompt_style":"gaussian",
            "prompts":{"point":true,"box":false,"mask":true,"negative_point":true},"transunet_img_size":224}"#,
    )
    .unwrap();
    // A `sam.`-prefixed checkpoint with optimiser state (Phase 2 best.safetensors / Phase 3 file).
    let prefixed = tmp.path().join("phase2_best.safetensors");
    let mut m: HashMap<String, Tensor> = a
        .weights
        .tensors
        .iter()
        .map(|(k, t)| (format!("sam.{k}"), t.clone()))
        .collect();
    m.insert(
        "__optim__.sam.exp_avg.sam.mask_decoder.iou_token.weight".into(),
        Tensor::zeros(4, DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&m, &prefixed).unwrap();
    for p in [&conv, &native, &prefixed] {
        let b = load_sam_source(p.to_str().unwrap(), scfg, 0, &dev)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(
            b.weights.tensors.len(),
            a.weights.tensors.len(),
            "{}",
            p.display()
        );
        for (k, t) in &a.weights.tensors {
            assert!(same(t, &b.weights.tensors[k]), "{}: {k}", p.display());
        }
    }
    let b = load_sam_source(native.to_str().unwrap(), scfg, 0, &dev).unwrap();
    assert_eq!(b.provenance, "medsam");
    // Refiner settings come from best_sam.json; a conflicting style is refused unless allowed.
    let mut o = Phase3Options::new(".");
    o.sam_checkpoint = native.display().to_string();
    let r = resolve_refiner(&o, &cfg.refiner, &b).unwrap();
    assert_eq!(r.mask_prompt_style, "gaussian");
    assert_eq!(r.sam_normalization, "unit");
    assert!(!r.use_box_prompt);
    o.mask_prompt_style = Some("direct".into());
    assert!(resolve_refiner(&o, &cfg.refiner, &b).is_err());
    o.allow_style_mismatch = true;
    assert_eq!(
        resolve_refiner(&o, &cfg.refiner, &b)
            .unwrap()
            .mask_prompt_style,
        "direct"
    );
    // Without a Phase 2 sidecar, `auto` normalisation resolves from the provenance.
    let o = Phase3Options::new(".");
    assert_eq!(
        resolve_refiner(&o, &cfg.refiner, &a)
            .unwrap()
            .sam_normalization,
        "sam"
    );
    assert!(load_sam_source("/nonexistent/sam.pth", scfg, 0, &dev).is_err());
}

/// The cosine rate of a group frozen for the first epochs follows the schedule from epoch 0 (SPEC §11.1.2).
#[test]
fn frozen_group_follows_cosine_from_epoch_zero() {
    use ultrarefiner::train::optim::ParamGroup;
    use ultrarefiner::train::schedule::Schedule;
    let v = candle_core::Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
    let w = candle_core::Var::new(&[3f32], &Device::Cpu).unwrap();
    let mut opt = AdamW::new(vec![
        ParamGroup::new("transunet", 1e-4, 0.01, vec![("transunet.a".into(), v)]),
        ParamGroup::new("sam", 2e-5, 0.01, vec![("sam.b".into(), w)]),
    ])
    .unwrap();
    let mut plan = FreezePlan::all_trainable(4, 2);
    plan.freeze_transunet_epochs = 3;
    let keys: Vec<String> = vec!["transunet.a".into(), "sam.b".into()];
    let mut sched = Schedule::cosine(1e-6, 10);
    for e in 0..10u64 {
        sched.start_epoch(e, &mut opt);
        let t = plan.at(e, &keys);
        assert_eq!(t.transunet_any, e >= 3);
        let lrs = opt.lrs();
        assert_eq!(lrs[0].1, cosine_lr(1e-4, 1e-6, e, 10));
        assert_eq!(lrs[1].1, cosine_lr(2e-5, 1e-6, e, 10));
    }
}
