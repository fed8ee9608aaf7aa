//! The `phase1` release binary (SPEC §11.2): one epoch of the `tiny` preset on a small phantom dataset; every run
//! directory artefact of §11.1.5 exists and parses. Build first: `cargo build --release -p phase1`.
use std::process::Command;
use ultrarefiner::data::phantom::{generate, PhantomOptions};
use ultrarefiner::data::prepare::{prepare_datasets, PrepareOptions};
use ultrarefiner::data::DatasetKind;
use ultrarefiner_tests::{release_bin, temp_dir};

#[test]
fn phase1_one_epoch_writes_every_artefact() {
    let bin = release_bin("phase1");
    assert!(
        bin.is_file(),
        "{} not built (cargo build --release -p phase1)",
        bin.display()
    );
    let tmp = temp_dir("cli_phase1");
    let raw = tmp.path().join("raw");
    generate(&PhantomOptions {
        out: raw.join("PHANTOM"),
        count: 20,
        seed: 7,
        height_range: (112, 144),
        width_range: (128, 176),
        annotations: true,
        num_workers: Some(2),
    })
    .unwrap();
    let data = tmp.path().join("processed");
    prepare_datasets(&PrepareOptions {
        raw_root: raw,
        output_root: data.clone(),
        datasets: vec![DatasetKind::Phantom],
        ..Default::default()
    })
    .unwrap();
    let out = tmp.path().join("ckpt");
    let o = Command::new(&bin)
        .args([
            "--config",
            "tiny",
            "--dataset",
            "PHANTOM",
            "--fold",
            "0",
            "--max-epochs",
            "1",
            "--batch-size",
            "4",
        ])
        .args([
            "--vit-pretrained",
            "none",
            "--device",
            "cpu",
            "--num-workers",
            "2",
            "--save-every",
            "1",
        ])
        .arg("--data-root")
        .arg(&data)
        .arg("--output-dir")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        o.status.code()
    );
    assert!(
        stdout.contains("ULTRAREFINER TRAINING") && stdout.contains("EPOCH 1/1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("TRAINING COMPLETE") && stdout.contains("[VALIDATION]"),
        "{stdout}"
    );
    assert!(
        !stdout.contains('\r'),
        "plain mode (not a TTY) must not use carriage returns"
    );

    let run = out.join("PHANTOM/fold_0");
    ultrarefiner::config::Config::load(run.join("config.resolved.toml").to_str().unwrap()).unwrap();
    for stem in ["latest", "best", "final", "epoch_1"] {
        let st = run.join(format!("{stem}.safetensors"));
        let t = ultrarefiner::models::transunet::read_checkpoint(&st, "").unwrap();
        assert!(
            t.contains_key("segmentation_head.0.weight")
                || t.keys().any(|k| k.starts_with("segmentation_head")),
            "{stem}"
        );
        let js: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join(format!("{stem}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(js["kind"], "phase1", "{stem}");
        assert_eq!(js["epoch"], 0, "{stem}");
    }
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    for col in [
        "epoch",
        "time_s",
        "lr_transunet",
        "train_loss",
        "train_dice",
        "val_dice",
        "val_dice_img",
        "is_best",
    ] {
        assert!(
            lines[0].split(',').any(|c| c == col),
            "metrics.csv lacks {col}: {}",
            lines[0]
        );
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "complete");
    assert_eq!(summary["epochs"], 1);
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("EPOCH 1/1") && !log.contains('\x1b'));
    let png = image::open(run.join("progress.png")).unwrap();
    assert_eq!((png.width(), png.height()), (1200, 900));

    // --resume auto on the finished run exits 0 without training.
    let o2 = Command::new(&bin)
        .args([
            "--config",
            "tiny",
            "--dataset",
            "PHANTOM",
            "--resume",
            "auto",
            "--device",
            "cpu",
        ])
        .arg("--data-root")
        .arg(&data)
        .arg("--output-dir")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o2.status.success());
    assert!(String::from_utf8_lossy(&o2.stdout).contains("already complete"));

    // A bad flag value is one sentence on stderr, exit code 1.
    let o3 = Command::new(&bin)
        .args(["--device", "tpu", "--dataset", "PHANTOM"])
        .output()
        .unwrap();
    assert_eq!(o3.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o3.stderr);
    assert!(
        e.starts_with("error: ") && e.contains("tpu") && e.lines().count() == 1,
        "{e}"
    );
}
