//! `progress.png` (SPEC §11.1.5): size, validity and that every panel is drawn.
//! Set `ULTRAREFINER_KEEP_PNG=/some/path.png` to keep a copy for visual inspection.
use ultrarefiner::train::history::{HistoryRow, Named};
use ultrarefiner::train::rundir::RunDir;

fn history(n: u64) -> Vec<HistoryRow> {
    (1..=n)
        .map(|e| {
            let x = e as f64;
            let vd = 0.8 - 0.5 * (-x / 6.0).exp() + 0.02 * (x * 1.7).sin();
            HistoryRow {
                epoch: e,
                time_s: 10.0,
                lr: Named(vec![
                    ("transunet".into(), 1e-6 + (1e-4 - 1e-6) * (1.0 + (std::f64::consts::PI * (x - 1.0) / n as f64).cos()) / 2.0),
                    ("sam".into(), 1e-6 + (1e-5 - 1e-6) * (1.0 + (std::f64::consts::PI * (x - 1.0) / n as f64).cos()) / 2.0),
                ]),
                train_loss: Some(0.9 * (-x / 8.0).exp() + 0.1),
                components: Named(vec![
                    ("coarse".into(), 0.8 * (-x / 9.0).exp() + 0.12),
                    ("refined".into(), 0.95 * (-x / 7.0).exp() + 0.09),
                ]),
                train_dice: Some(0.85 - 0.55 * (-x / 5.0).exp()),
                train_iou: Some(0.7 - 0.5 * (-x / 5.0).exp()),
                val_loss: if e % 5 == 0 { None } else { Some(0.95 * (-x / 9.0).exp() + 0.15) },
                val_dice: Some(vd),
                val_iou: Some(vd - 0.15),
                val_precision: Some(0.8),
                val_recall: Some(0.75),
                val_accuracy: Some(0.95),
                val_specificity: Some(0.97),
                val_dice_img: Some(vd - 0.04),
                extra: Named::new(),
                is_best: e == 17,
                note: None,
            }
        })
        .collect()
}

fn decode(path: &std::path::Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

#[test]
fn progress_png_has_size_and_content() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::at(dir.path());
    let h = history(30);
    run.write_progress_png(&h, "BUSI_fold0 - phase3").unwrap();
    let img = decode(&run.progress_png_path());
    assert_eq!(img.dimensions(), (1200, 900));
    // each third of the image has non-white (drawn) pixels, and colour (series) pixels
    for panel in 0..3u32 {
        let mut dark = 0usize;
        let mut colour = 0usize;
        for y in panel * 300..(panel + 1) * 300 {
            for x in 0..1200 {
                let p = img.get_pixel(x, y).0;
                if p.iter().all(|&c| c < 100) {
                    dark += 1;
                }
                let (mx, mn) = (*p.iter().max().unwrap() as i32, *p.iter().min().unwrap() as i32);
                if mx - mn > 80 {
                    colour += 1;
                }
            }
        }
        assert!(dark > 1000, "panel {panel}: only {dark} dark pixels (axes/text missing?)");
        assert!(colour > 300, "panel {panel}: only {colour} coloured pixels (series missing?)");
    }
    if let Ok(keep) = std::env::var("ULTRAREFINER_KEEP_PNG") {
        std::fs::copy(run.progress_png_path(), keep).unwrap();
    }
    // one epoch and an empty history also render
    run.write_progress_png(&h[..1], "").unwrap();
    assert_eq!(decode(&run.progress_png_path()).dimensions(), (1200, 900));
    run.write_progress_png(&[], "").unwrap();
}
