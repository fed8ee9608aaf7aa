//! SPEC §13.1 overlay colours on a constructed case (GT disc, coarse shifted, refined close to GT) and
//! `summary.png` on spread-out Dice values; `EVAL_TEST_KEEP=dir` keeps the PNGs for a human look.
use std::path::PathBuf;
use ultrarefiner::data::pixels::decode_png;
use ultrarefiner::eval::visualize::{
    overlay_png, overlay_rgb, summary_png, OverlayCase, GT_COLOUR, OVERLAP_COLOUR, PRED_COLOUR,
};

fn disc(s: usize, cy: f64, cx: f64, r: f64) -> Vec<bool> {
    (0..s * s)
        .map(|k| {
            let (i, j) = ((k / s) as f64, (k % s) as f64);
            (i - cy).powi(2) + (j - cx).powi(2) < r * r
        })
        .collect()
}

fn blend(g: u8, c: [u8; 3]) -> [u8; 3] {
    let f = |x: u8| (0.65 * g as f32 + 0.35 * x as f32).round() as u8;
    [f(c[0]), f(c[1]), f(c[2])]
}

#[test]
fn overlay_colours_and_panels() {
    let s = 96;
    let grey: Vec<u8> = (0..s * s)
        .map(|k| (60 + (k % s) / 2 + (k / s) / 3) as u8)
        .collect();
    let gt = disc(s, 48.0, 48.0, 20.0);
    let coarse = disc(s, 40.0, 56.0, 18.0);
    let refined = disc(s, 47.0, 49.0, 20.0);
    let rgb = overlay_rgb(&grey, &gt, &coarse);
    let px = |k: usize| [rgb[3 * k], rgb[3 * k + 1], rgb[3 * k + 2]];
    // every pixel: GT only green, prediction only red, overlap yellow (α = 0.35 over grey), background untouched
    let mut seen = [0usize; 4];
    for k in 0..s * s {
        let (want, cat) = match (gt[k], coarse[k]) {
            (true, false) => (blend(grey[k], GT_COLOUR), 0),
            (false, true) => (blend(grey[k], PRED_COLOUR), 1),
            (true, true) => (blend(grey[k], OVERLAP_COLOUR), 2),
            (false, false) => ([grey[k]; 3], 3),
        };
        seen[cat] += 1;
        assert_eq!(px(k), want, "pixel {k}");
    }
    assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sample_0000_imp+0.1000.png");
    overlay_png(
        &path,
        &OverlayCase {
            title: "PHANTOM case_007".into(),
            grey: &grey,
            gt: &gt,
            coarse: &coarse,
            refined: Some(&refined),
            size: s,
            coarse_m: (0.61, 0.44, 14.2),
            refined_m: Some((0.95, 0.9, 2.0)),
            notes: vec!["boundary fusion applied".into()],
        },
    )
    .unwrap();
    let img = decode_png(&path).unwrap().to_rgb8();
    assert!(
        img.width() > 4 * img.height() / 2,
        "four panels side by side"
    );
    let mut cd = Vec::new();
    let mut rd = Vec::new();
    for i in 0..60 {
        let c = (i as f64 / 60.0).powf(0.7);
        cd.push(c);
        rd.push((c + 0.15 * ((i % 7) as f64 / 7.0 - 0.3)).clamp(0.0, 1.0));
    }
    let spath = dir.path().join("summary.png");
    summary_png(
        &spath,
        "test evaluation: PHANTOM (60 images)",
        &cd,
        Some(&rd),
    )
    .unwrap();
    let sum = decode_png(&spath).unwrap();
    assert_eq!((sum.width(), sum.height()), (1800, 600));
    if let Ok(d) = std::env::var("EVAL_TEST_KEEP") {
        let d = PathBuf::from(d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(&path, d.join("overlay_constructed.png")).unwrap();
        std::fs::copy(&spath, d.join("summary_constructed.png")).unwrap();
    }
}
