//! `ultrarefiner convert` end to end on the fixture weights: SAM `.pth` (both containers) and the narrow npz.
use std::process::Command;
use ultrarefiner_tests::{release_bin, shared_dir, temp_dir};

fn convert(args: &[&str]) -> std::process::Output {
    Command::new(release_bin("ultrarefiner"))
        .arg("convert")
        .args(args)
        .output()
        .expect("run ultrarefiner")
}

#[test]
fn sam_pth_containers_convert_to_identical_safetensors() {
    let fx = shared_dir().join("fixtures");
    let tmp_dir = temp_dir("cli-convert");
    let tmp = tmp_dir.path();
    let a = tmp.join("plain.safetensors");
    let b = tmp.join("medsam.safetensors");
    for (input, out, prov) in [
        ("sam_narrow.pth", &a, "sam"),
        ("sam_narrow_medsam_style.pth", &b, "medsam"),
    ] {
        let o = convert(&[
            "--from",
            "sam-pth",
            "--input",
            fx.join(input).to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--provenance",
            prov,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let ta = candle_core::safetensors::load(&a, &candle_core::Device::Cpu).unwrap();
    let tb = candle_core::safetensors::load(&b, &candle_core::Device::Cpu).unwrap();
    assert_eq!(ta.len(), tb.len());
    assert!(
        ta.keys().any(|k| k.starts_with("mask_decoder.")),
        "original SAM names expected"
    );
    for (k, t) in &ta {
        let u = &tb[k];
        let d: f32 = (t - u)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(d, 0.0, "{k} differs between the two containers");
    }
    // The sidecar records the provenance that selects the default normalisation.
    let side = std::fs::read_to_string(b.with_extension("json")).unwrap();
    assert!(side.contains("medsam"), "{side}");
}

#[test]
fn wrong_format_is_one_clear_sentence() {
    let fx = shared_dir().join("fixtures");
    let tmp_dir = temp_dir("cli-convert-bad");
    let tmp = tmp_dir.path();
    // A TransUNet npz handed to the SAM converter must fail without writing anything.
    let out = tmp.join("x.safetensors");
    let o = convert(&[
        "--from",
        "sam-pth",
        "--input",
        fx.join("transunet_narrow_pretrained.npz").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!out.exists());
}
