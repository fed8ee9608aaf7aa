//! Checkpoint, run-directory and resume round trips (SPEC §11.1.4–§11.1.6).
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use ultrarefiner::train::checkpoint::{
    load_checkpoint, read_sidecar, save_checkpoint, Baseline, Best, DataIdentity, Phase, RngState, Sidecar,
    WeightSource,
};
use ultrarefiner::train::history::{HistoryRow, Named};
use ultrarefiner::train::optim::{AdamW, Grads, Optimizer, ParamGroup, Sgd};
use ultrarefiner::train::rundir::{
    resolve_resume, Durations, ResumeDecision, RunDir, RunStatus, Summary, Versions, LATEST,
};
use ultrarefiner::train::schedule::Schedule;
use ultrarefiner::train::signals::{StopFlag, EXIT_TEMPFAIL};

fn row(e: u64, dice: f64, best: bool) -> HistoryRow {
    HistoryRow {
        epoch: e,
        time_s: 2.0,
        lr: Named(vec![("transunet".into(), 1e-5), ("sam".into(), 2e-5)]),
        train_loss: Some(0.5 / e as f64),
        components: Named(vec![("coarse".into(), 0.4), ("refined".into(), 0.55)]),
        train_dice: Some(dice - 0.05),
        train_iou: Some(dice - 0.2),
        val_loss: Some(0.6 / e as f64),
        val_dice: Some(dice),
        val_iou: Some(dice - 0.15),
        val_precision: Some(0.8),
        val_recall: Some(0.7),
        val_accuracy: Some(0.95),
        val_specificity: Some(0.97),
        val_dice_img: Some(dice - 0.02),
        extra: Named(vec![("val_coarse_dice".into(), dice - 0.03), ("baseline_dice".into(), 0.6)]),
        is_best: best,
        note: None,
    }
}

fn model(dev: &Device) -> (Var, Var, Tensor) {
    let w = Var::from_tensor(&Tensor::arange(0f32, 6.0, dev).unwrap().reshape((2, 3)).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[0.5f32, -0.5], dev).unwrap()).unwrap();
    let nbt = Tensor::new(7i64, dev).unwrap();
    (w, b, nbt)
}

fn sidecar(opt: &dyn Optimizer, sched: Schedule, epoch: u64, history: Vec<HistoryRow>) -> Sidecar {
    let mut best = Best::new("dice");
    for r in &history {
        best.update(r.val_dice.unwrap(), r.epoch - 1);
    }
    let mut sc = Sidecar::new(
        Phase::Phase3,
        epoch,
        42,
        best,
        serde_json::json!({"model": {"img_size": 224}, "training": {"lr": 1e-5}, "cli": ["phase3"]}),
        DataIdentity {
            datasets: vec!["BUSI".into()],
            fold: Some(0),
            n_splits: Some(5),
            splits_sha256: Some("ab".repeat(32)),
            manifest_sha256: None,
        },
        opt.info(),
        sched,
        RngState { seed: 42, next_epoch: epoch + 1 },
        history,
    );
    sc.baseline = Some(Baseline { dice: 0.6, dice_img: 0.58, iou: None });
    sc.init_weights =
        vec![WeightSource { role: "sam".into(), path: "x/best_sam.safetensors".into(), sha256: None, provenance: "phase2".into() }];
    sc
}

#[test]
fn save_load_round_trip_with_adamw_state() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let (w, b, nbt) = model(&dev);
    let mut opt = AdamW::new(vec![
        ParamGroup::new("transunet", 1e-3, 0.01, vec![("transunet.w".into(), w.clone())]),
        ParamGroup::new("sam", 1e-3, 0.01, vec![("sam.b".into(), b.clone())]),
    ])
    .unwrap();
    let mut g = Grads::new();
    g.insert("transunet.w", Tensor::ones((2, 3), DType::F32, &dev).unwrap());
    opt.step(&g).unwrap();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert("transunet.w".into(), w.as_tensor().clone());
    tensors.insert("sam.b".into(), b.as_tensor().clone());
    tensors.insert("transunet.bn.num_batches_tracked".into(), nbt.clone());
    let mut sched = Schedule::cosine(1e-6, 10);
    sched.start_epoch(0, &mut opt);
    let sc = sidecar(&opt, sched.clone(), 0, vec![row(1, 0.7, true)]);
    let (st, js) = save_checkpoint(dir.path(), "latest", &tensors, &opt.state_tensors().unwrap(), &sc).unwrap();
    assert!(st.ends_with("latest.safetensors") && js.ends_with("latest.json"));
    // no temporary files are left behind
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert_eq!(names.len(), 2, "{names:?}");

    let ck = load_checkpoint(&dir.path().join("latest"), &dev).unwrap();
    assert_eq!(ck.model.len(), 3);
    assert_eq!(ck.optim.len(), 3, "sam.b had no gradient: no state; transunet.w: exp_avg, exp_avg_sq, step");
    assert!(ck.optim.contains_key("__optim__.transunet.exp_avg.transunet.w"));
    assert!(ck.optim.contains_key("__optim__.transunet.exp_avg_sq.transunet.w"));
    let step = &ck.optim["__optim__.transunet.step.transunet.w"];
    assert_eq!(step.dtype(), DType::I64);
    assert_eq!(step.to_scalar::<i64>().unwrap(), 1);
    assert_eq!(ck.model["transunet.bn.num_batches_tracked"].to_scalar::<i64>().unwrap(), 7);
    let mut want = sc.clone();
    want.tensors_blake3 = ck.sidecar.tensors_blake3.clone();
    assert!(want.tensors_blake3.is_some());
    // floats are stored rounded to 15 significant digits (history::round15): compare the serialised forms, and
    // check that a second round trip is exact
    assert_eq!(serde_json::to_value(&ck.sidecar).unwrap(), serde_json::to_value(&want).unwrap());
    let again: Sidecar = serde_json::from_str(&serde_json::to_string(&ck.sidecar).unwrap()).unwrap();
    assert_eq!(again, ck.sidecar);
    assert_eq!(ck.sidecar.scheduler, sched);

    // restoring the optimiser into fresh Vars continues identically
    let w2 = Var::from_tensor(&ck.model["transunet.w"]).unwrap();
    let b2 = Var::from_tensor(&ck.model["sam.b"]).unwrap();
    let mut opt2 = AdamW::new(vec![
        ParamGroup::new("transunet", 1e-3, 0.01, vec![("transunet.w".into(), w2.clone())]),
        ParamGroup::new("sam", 1e-3, 0.01, vec![("sam.b".into(), b2.clone())]),
    ])
    .unwrap();
    opt2.load_state(&ck.optim).unwrap();
    ultrarefiner::train::optim::check_groups_match(&opt2, &ck.sidecar.optimizer).unwrap();
    let mut g2 = Grads::new();
    g2.insert("transunet.w", Tensor::full(0.5f32, (2, 3), &dev).unwrap());
    g2.insert("sam.b", Tensor::full(0.25f32, 2, &dev).unwrap());
    opt.step(&g2).unwrap();
    opt2.step(&g2).unwrap();
    let a: Vec<Vec<f32>> = w.as_tensor().to_vec2().unwrap();
    let c: Vec<Vec<f32>> = w2.as_tensor().to_vec2().unwrap();
    assert_eq!(a, c);
    assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), b2.as_tensor().to_vec1::<f32>().unwrap());
}

#[test]
fn torn_pair_is_detected() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let (w, _, _) = model(&dev);
    let opt = Sgd::new(vec![ParamGroup::new("transunet", 0.01, 1e-4, vec![("w".into(), w.clone())])], 0.9).unwrap();
    let t: HashMap<String, Tensor> = [("w".to_string(), w.as_tensor().clone())].into();
    let sc = sidecar(&opt, Schedule::poly(10, 5), 0, vec![row(1, 0.5, true)]);
    save_checkpoint(dir.path(), "latest", &t, &[], &sc).unwrap();
    let sc_json = std::fs::read(dir.path().join("latest.json")).unwrap();
    let t2: HashMap<String, Tensor> = [("w".to_string(), (w.as_tensor() + 1.0).unwrap())].into();
    save_checkpoint(dir.path(), "latest", &t2, &[], &sc).unwrap();
    std::fs::write(dir.path().join("latest.json"), sc_json).unwrap();
    let err = load_checkpoint(&dir.path().join("latest.safetensors"), &dev).unwrap_err().to_string();
    assert!(err.contains("torn"), "{err}");
    // reserved prefix in model keys is refused
    let bad: HashMap<String, Tensor> = [("__optim__.x".to_string(), w.as_tensor().clone())].into();
    assert!(save_checkpoint(dir.path(), "x", &bad, &[], &sc).is_err());
    assert_eq!(read_sidecar(&dir.path().join("latest.json")).unwrap().kind, Phase::Phase3);
}

#[test]
fn rundir_files_and_resume_auto() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::new(dir.path(), "BUSI/fold_0");
    // nothing there: --resume auto starts fresh; no --resume: fresh
    assert_eq!(resolve_resume(&run, Some("auto"), false).unwrap(), ResumeDecision::Fresh);
    assert_eq!(resolve_resume(&run, None, false).unwrap(), ResumeDecision::Fresh);
    assert!(resolve_resume(&run, Some("/nonexistent/best.safetensors"), false).is_err());
    run.create().unwrap();
    run.write_config("[phase1]\nbase_lr = 0.01\n").unwrap();

    let dev = Device::Cpu;
    let (w, _, _) = model(&dev);
    let opt = Sgd::new(vec![ParamGroup::new("transunet", 0.01, 1e-4, vec![("w".into(), w.clone())])], 0.9).unwrap();
    let t: HashMap<String, Tensor> = [("w".to_string(), w.as_tensor().clone())].into();
    let hist = vec![row(1, 0.5, true), row(2, 0.45, false)];
    let sc = sidecar(&opt, Schedule::poly(10, 5), 1, hist.clone());
    save_checkpoint(run.root(), LATEST, &t, &[], &sc).unwrap();
    run.write_metrics_csv(&hist).unwrap();
    let mut summary = Summary {
        status: RunStatus::Running,
        kind: Phase::Phase1,
        experiment: "BUSI_fold0".into(),
        best: sc.best.clone(),
        final_metrics: hist.last().cloned(),
        epochs: 2,
        max_epochs: 10,
        durations: Durations::from_history(&hist, 4.5),
        device: "cpu".into(),
        versions: Versions::default(),
        updated: ultrarefiner::train::checkpoint::now_rfc3339(),
        message: None,
    };
    run.write_summary(&summary).unwrap();
    // NOTE: serde_json without its `float_roundtrip` feature may read a 17-digit float back 1 ulp off
    // (0.42000000000000004 → 0.42), so the read-back summary is compared through its JSON text.
    let back = run.read_summary().unwrap().unwrap();
    assert_eq!(back.status, summary.status);
    assert_eq!(back.final_metrics.as_ref().unwrap().epoch, 2);
    let vd = back.final_metrics.as_ref().unwrap().extra.get("val_coarse_dice").unwrap();
    assert!((vd - 0.42).abs() < 1e-12);
    assert_eq!(summary.durations.total_s, 4.0);

    let (latest, _) = run.checkpoint(LATEST);
    assert_eq!(resolve_resume(&run, Some("auto"), false).unwrap(), ResumeDecision::Resume(latest.clone()));
    let explicit = latest.to_string_lossy().replace(".safetensors", ".json");
    assert_eq!(resolve_resume(&run, Some(&explicit), false).unwrap(), ResumeDecision::Resume(latest.clone()));

    summary.status = RunStatus::Complete;
    run.write_summary(&summary).unwrap();
    assert_eq!(resolve_resume(&run, Some("auto"), false).unwrap(), ResumeDecision::AlreadyComplete);
    assert_eq!(resolve_resume(&run, Some("auto"), true).unwrap(), ResumeDecision::Fresh);

    // metrics.csv regenerated from the history restored from the sidecar is identical
    let csv1 = std::fs::read_to_string(run.metrics_csv_path()).unwrap();
    let back = read_sidecar(&run.checkpoint(LATEST).1).unwrap();
    run.write_metrics_csv(&back.history).unwrap();
    assert_eq!(std::fs::read_to_string(run.metrics_csv_path()).unwrap(), csv1);
    assert!(csv1.starts_with(
        "epoch,time_s,lr_transunet,lr_sam,train_loss,train_coarse,train_refined,train_dice,train_iou,val_loss,"
    ));
    assert!(csv1.lines().next().unwrap().ends_with(",val_dice_img,val_coarse_dice,baseline_dice,is_best"));
    assert_eq!(csv1.lines().count(), 3);
    let toml_text = std::fs::read_to_string(run.config_path()).unwrap();
    assert!(toml_text.contains("base_lr"));
}

#[test]
fn stop_flag_and_signal() {
    assert_eq!(EXIT_TEMPFAIL, 75);
    let f = StopFlag::new();
    assert!(!f.is_set());
    f.trigger();
    assert!(f.is_set());
    let s = StopFlag::install().unwrap();
    assert!(!s.is_set());
    signal_hook::low_level::raise(signal_hook::consts::SIGUSR1).unwrap();
    assert!(s.is_set());
}
