//! Phantom generator (SPEC §4): class allocation, determinism, and the §4.3 statistics.
use ultrarefiner::data::phantom::{class_list, render, PhantomClass, PhantomOptions};

fn tiny_opts() -> PhantomOptions {
    PhantomOptions {
        height_range: (112, 144),
        width_range: (128, 176),
        ..Default::default()
    }
}

#[test]
fn class_allocation_is_exact() {
    for count in [1usize, 7, 48, 120, 200] {
        let c = class_list(count, 7);
        let nb = c.iter().filter(|&&x| x == PhantomClass::Benign).count();
        let nm = c.iter().filter(|&&x| x == PhantomClass::Malignant).count();
        assert_eq!(nb, (0.5 * count as f64).round() as usize);
        assert_eq!(nm, ((0.33 * count as f64).round() as usize).min(count - nb));
    }
    assert_eq!(class_list(48, 7), class_list(48, 7));
    assert_ne!(class_list(48, 7), class_list(48, 8));
}

/// SPEC §4.3 over 200 images: tiny-lesion share 8–22 %, mean lesion/background intensity ratio < 0.5,
/// speckle SNR (mean/std of n) 1.91 ± 0.15. "Intensity" is read as the linear echo intensity `E = T·n` (before the
/// log compression of §4.2 step 8, which maps a ratio of ~0.2 to ~0.55 in 8-bit pixels).
#[test]
fn statistics_over_200_images() {
    let o = tiny_opts();
    let classes = class_list(200, o.seed);
    let (mut lesions, mut tiny) = (0usize, 0usize);
    let (mut ratio_sum, mut ratio_n, mut pix_ratio_sum) = (0.0f64, 0usize, 0.0f64);
    let (mut snr_sum, mut snr_n) = (0.0f64, 0usize);
    for (k, &c) in classes.iter().enumerate() {
        let img = render(&o, k, c, 1);
        lesions += img.meta.lesions.len();
        tiny += img.meta.lesions.iter().filter(|l| l.tiny).count();
        let n = img.speckle.len() as f64;
        let mean = img.speckle.iter().map(|&v| v as f64).sum::<f64>() / n;
        let sd = (img
            .speckle
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        snr_sum += mean / sd;
        snr_n += 1;
        if !img.meta.lesions.is_empty() {
            // Linear echo intensity E = T·n (before log compression) and 8-bit pixels.
            let (mut fi, mut ni, mut fo, mut no) = (0.0, 0usize, 0.0, 0usize);
            let (mut pi, mut po) = (0.0, 0.0);
            for (i, &p) in img.image.data.iter().enumerate() {
                let e = img.tissue[i] as f64 * img.speckle[i] as f64;
                if img.masks.iter().any(|m| m.data[i] != 0) {
                    fi += e;
                    pi += p as f64;
                    ni += 1;
                } else {
                    fo += e;
                    po += p as f64;
                    no += 1;
                }
            }
            ratio_sum += (fi / ni as f64) / (fo / no as f64);
            pix_ratio_sum += (pi / ni as f64) / (po / no as f64);
            ratio_n += 1;
        }
    }
    let share = tiny as f64 / lesions as f64;
    let ratio = ratio_sum / ratio_n as f64;
    let snr = snr_sum / snr_n as f64;
    let pix_ratio = pix_ratio_sum / ratio_n as f64;
    println!(
        "phantom stats: {lesions} lesions, tiny share {share:.3}, lesion/background echo intensity {ratio:.3} \
         (8-bit pixels {pix_ratio:.3}), speckle SNR {snr:.3}"
    );
    assert!((0.08..=0.22).contains(&share), "tiny share {share}");
    assert!(ratio < 0.5, "lesion/background ratio {ratio}");
    assert!((snr - 1.91).abs() <= 0.15, "speckle SNR {snr}");
}

#[test]
fn render_is_deterministic_and_masks_match_metadata() {
    let o = tiny_opts();
    for (k, c) in [
        (0, PhantomClass::Benign),
        (1, PhantomClass::Malignant),
        (2, PhantomClass::Normal),
    ] {
        let a = render(&o, k, c, 1);
        let b = render(&o, k, c, 1);
        assert_eq!(a.image, b.image);
        assert_eq!(a.masks.len(), a.meta.lesions.len().max(1));
        for (m, l) in a.masks.iter().zip(&a.meta.lesions) {
            assert_eq!(m.data.iter().filter(|&&v| v != 0).count(), l.area_px);
            assert!(l.area_px >= 10);
        }
        if c == PhantomClass::Normal {
            assert!(a.masks[0].data.iter().all(|&v| v == 0));
        }
    }
}

/// Writes a few rendered images, their tissue maps and masks to $PHANTOM_DUMP (manual inspection).
#[test]
#[ignore = "manual inspection helper; set PHANTOM_DUMP=/some/dir"]
fn dump_for_inspection() {
    let Ok(dir) = std::env::var("PHANTOM_DUMP") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let o = PhantomOptions::default();
    let classes = class_list(12, o.seed);
    for (k, &c) in classes.iter().enumerate() {
        let img = render(&o, k, c, k + 1);
        let (w, h) = (img.image.width, img.image.height);
        let png = ultrarefiner::data::pixels::encode_png(
            &img.image.data,
            w,
            h,
            image::ExtendedColorType::L8,
        )
        .unwrap();
        std::fs::write(dir.join(format!("{k:02}_{}.png", c.name())), png).unwrap();
        let t: Vec<u8> = img
            .tissue
            .iter()
            .map(|&v| (v.clamp(0.0, 1.0) * 255.0) as u8)
            .collect();
        let png =
            ultrarefiner::data::pixels::encode_png(&t, w, h, image::ExtendedColorType::L8).unwrap();
        std::fs::write(dir.join(format!("{k:02}_{}_tissue.png", c.name())), png).unwrap();
    }
}
