//! Every flag of the SPEC §13.1 (`evaluate`) and §13.2–§13.4 (`infer`) tables is accepted by the CLI (checked on
//! `--help`), and a bad combination fails with a one-sentence error.
use std::process::Command;
use ultrarefiner_tests::release_bin;

fn help(cmd: &str) -> String {
    let o = Command::new(release_bin("ultrarefiner"))
        .args([cmd, "--help"])
        .output()
        .expect("run ultrarefiner (build it with `cargo build --release -p ultrarefiner-cli`)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

const POST: [&str; 7] = [
    "--use-rejection-rules",
    "--reject-iou-threshold",
    "--reject-area-ratio-min",
    "--reject-area-ratio-max",
    "--reject-max-components",
    "--use-boundary-fusion",
    "--boundary-band-width",
];

#[test]
fn evaluate_has_every_spec_flag() {
    let h = help("evaluate");
    for f in [
        "--checkpoint",
        "--transunet-checkpoint",
        "--sam-checkpoint",
        "--transunet-only",
        "--ensemble",
        "--folds",
        "--ensemble-mode",
        "--data-root",
        "--datasets",
        "--include-unseen",
        "--split",
        "--fold",
        "--n-splits",
        "--batch-size",
        "--threshold",
        "--eval-size",
        "--spacing-csv",
        "--visualize",
        "--num-visualize",
        "--visualize-best-worst",
        "--output-dir",
        "--device",
        "--encoder-dtype",
        "--override-refiner",
        "--mask-prompt-style",
    ]
    .iter()
    .chain(POST.iter())
    {
        assert!(h.contains(f), "evaluate --help lacks {f}");
    }
}

#[test]
fn infer_has_every_spec_flag() {
    let h = help("infer");
    for f in [
        "--input",
        "--output",
        "--checkpoint",
        "--transunet-checkpoint",
        "--sam-checkpoint",
        "--ensemble",
        "--folds",
        "--ensemble-mode",
        "--mode",
        "--threshold",
        "--save-prob",
        "--batch-size",
        "--recursive",
        "--device",
        "--encoder-dtype",
    ]
    .iter()
    .chain(POST.iter())
    {
        assert!(h.contains(f), "infer --help lacks {f}");
    }
}

#[test]
fn missing_model_is_a_clear_error() {
    let o = Command::new(release_bin("ultrarefiner"))
        .args(["infer", "--input", "nowhere", "--output", "x"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.starts_with("error: no model given"), "{e}");
}
