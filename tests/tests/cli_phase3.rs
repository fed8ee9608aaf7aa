//! The `phase3` release binary (SPEC §11.4, §12): Phase 1 (1 epoch) → Phase 3 (2 epochs, random SAM) on a small
//! phantom dataset with the `tiny` preset at S = 64; the console shows the Performance Comparison, the run directory
//! holds every §11.1.5 artefact, `--resume auto` reports a complete run, and `ultrarefiner evaluate --checkpoint`
//! reads the best checkpoint without extra flags.
//! Build first: `cargo build --release -p phase1 -p phase3 -p ultrarefiner-cli`.
use std::path::Path;
use std::process::{Command, Output};
use ultrarefiner::testing::prepared_phantom;
use ultrarefiner_tests::{release_bin, temp_dir};

fn ok(o: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "{what}: exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        o.status.code()
    );
    stdout
}

fn common(c: &mut Command, data: &Path) {
    c.args(["--config", "tiny", "--dataset", "PHANTOM", "--fold", "0"])
        .args(["--img-size", "64", "--batch-size", "4", "--device", "cpu"])
        .args(["--num-workers", "2"])
        .arg("--data-root")
        .arg(data);
}

#[test]
fn phase3_two_epochs_after_phase1() {
    for b in ["phase1", "phase3", "ultrarefiner"] {
        let p = release_bin(b);
        assert!(p.is_file(), "{} not built", p.display());
    }
    let tmp = temp_dir("cli_phase3");
    let data = prepared_phantom(tmp.path(), 20, true).unwrap();
    let p1 = tmp.path().join("p1");
    let mut c = Command::new(release_bin("phase1"));
    common(&mut c, &data);
    c.args(["--max-epochs", "1", "--vit-pretrained", "none"])
        .arg("--output-dir")
        .arg(&p1);
    ok(&c.output().unwrap(), "phase1");
    let tu = p1.join("PHANTOM/fold_0/best.safetensors");
    assert!(tu.is_file());

    let p3 = tmp.path().join("p3");
    let phase3 = |extra: &[&str]| {
        let mut c = Command::new(release_bin("phase3"));
        common(&mut c, &data);
        c.args(["--sam-checkpoint", "random", "--max-epochs", "2"])
            .args([
                "--refined-loss-size",
                "64",
                "--transunet-lr",
                "1e-4",
                "--sam-lr",
                "1e-4",
            ])
            .args(["--save-every", "1"])
            .args(extra)
            .arg("--transunet-checkpoint")
            .arg(&tu)
            .arg("--output-dir")
            .arg(&p3);
        c.output().unwrap()
    };
    let stdout = ok(&phase3(&["--freeze-sam-epochs", "1"]), "phase3");
    for want in [
        "ULTRAREFINER TRAINING",
        "Baseline",
        "EPOCH 2/2",
        "Coarse:",
        "Refined:",
        "LR (transunet):",
        "LR (sam):",
        "[PERFORMANCE COMPARISON]",
        "vs baseline",
        "vs coarse",
        "TRAINING COMPLETE",
    ] {
        assert!(stdout.contains(want), "missing `{want}`:\n{stdout}");
    }
    let rd = p3.join("PHANTOM/fold_0");
    for f in [
        "best.safetensors",
        "best.json",
        "latest.safetensors",
        "latest.json",
        "final.safetensors",
        "final.json",
        "epoch_1.safetensors",
        "epoch_2.json",
        "metrics.csv",
        "summary.json",
        "progress.png",
        "train.log",
        "config.resolved.toml",
    ] {
        assert!(rd.join(f).is_file(), "{f} missing");
    }
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rd.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["status"], "complete");
    assert_eq!(s["kind"], "phase3");
    let csv = std::fs::read_to_string(rd.join("metrics.csv")).unwrap();
    assert!(csv.lines().next().unwrap().contains("val_coarse_dice"));
    assert_eq!(csv.lines().count(), 3);

    let again = ok(&phase3(&["--resume", "auto"]), "phase3 --resume auto");
    assert!(again.contains("already complete"), "{again}");

    let ev = tmp.path().join("eval");
    let mut c = Command::new(release_bin("ultrarefiner"));
    c.args([
        "evaluate",
        "--config",
        "tiny",
        "--datasets",
        "PHANTOM",
        "--split",
        "test",
    ])
    .args(["--device", "cpu", "--batch-size", "4"])
    .arg("--checkpoint")
    .arg(rd.join("best.safetensors"))
    .arg("--data-root")
    .arg(&data)
    .arg("--output-dir")
    .arg(&ev);
    let out = ok(&c.output().unwrap(), "evaluate --checkpoint");
    assert!(!out.is_empty());
}
