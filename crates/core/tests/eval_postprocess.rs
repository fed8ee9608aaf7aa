//! SPEC §13.4 post-processing invariants: the fusion band against its brute-force definition, each rejection rule,
//! "rejected ⇒ exactly the coarse map", "fused ⇒ coarse outside the band, refined inside".
use ultrarefiner::eval::postprocess::{
    apply, boundary_band, count_components, dilate_square, erode_square, PostProcess, Rejection,
};

/// Small deterministic generator (test-local; the masks only need to be irregular).
fn lcg(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

fn blob_mask(h: usize, w: usize, seed: u64) -> Vec<bool> {
    let mut s = seed;
    let mut m = vec![false; h * w];
    for _ in 0..4 {
        let (cy, cx) = (
            (lcg(&mut s) % h as u64) as f64,
            (lcg(&mut s) % w as u64) as f64,
        );
        let r = 2.0 + (lcg(&mut s) % 9) as f64;
        for i in 0..h {
            for j in 0..w {
                if (i as f64 - cy).powi(2) + (j as f64 - cx).powi(2) < r * r {
                    m[i * w + j] = true;
                }
            }
        }
    }
    // a few isolated pixels
    for _ in 0..5 {
        let k = (lcg(&mut s) % (h * w) as u64) as usize;
        m[k] = true;
    }
    m
}

fn brute(mask: &[bool], h: usize, w: usize, r: usize, dilate: bool) -> Vec<bool> {
    let mut out = vec![false; h * w];
    let r = r as i64;
    for i in 0..h as i64 {
        for j in 0..w as i64 {
            let mut any = false;
            let mut all = true;
            for di in -r..=r {
                for dj in -r..=r {
                    let (a, b) = (i + di, j + dj);
                    let v = a >= 0
                        && b >= 0
                        && a < h as i64
                        && b < w as i64
                        && mask[(a * w as i64 + b) as usize];
                    any |= v;
                    all &= v;
                }
            }
            out[(i * w as i64 + j) as usize] = if dilate { any } else { all };
        }
    }
    out
}

#[test]
fn band_is_dilation_minus_erosion_by_repeated_3x3_square() {
    let (h, w) = (29, 41);
    for seed in 0..4u64 {
        let m = blob_mask(h, w, seed);
        for width in [0usize, 1, 2, 3, 5, 15] {
            let r = width / 2;
            // r applications of the 3×3 square = Chebyshev radius r; outside the image is background
            assert_eq!(
                dilate_square(&m, h, w, r),
                brute(&m, h, w, r, true),
                "dilate r={r}"
            );
            assert_eq!(
                erode_square(&m, h, w, r),
                brute(&m, h, w, r, false),
                "erode r={r}"
            );
            let band = boundary_band(&m, h, w, width);
            let d = brute(&m, h, w, r, true);
            let e = brute(&m, h, w, r, false);
            for k in 0..h * w {
                assert_eq!(band[k], d[k] && !e[k], "band width {width} at {k}");
            }
        }
    }
    // a full mask touching every border erodes from the border (outside = background)
    let full = vec![true; 10 * 12];
    let e = erode_square(&full, 10, 12, 2);
    assert!(!e[0] && !e[2 * 12 + 1] && e[2 * 12 + 2]);
}

fn disc(h: usize, w: usize, cy: f64, cx: f64, r: f64, p: f32) -> Vec<f32> {
    let mut m = vec![0.05f32; h * w];
    for i in 0..h {
        for j in 0..w {
            if (i as f64 - cy).powi(2) + (j as f64 - cx).powi(2) < r * r {
                m[i * w + j] = p;
            }
        }
    }
    m
}

#[test]
fn rejection_rules_fall_back_to_exactly_the_coarse_map() {
    let (h, w) = (48, 48);
    let coarse = disc(h, w, 24.0, 24.0, 10.0, 0.8);
    let pp = PostProcess {
        use_rejection_rules: true,
        ..Default::default()
    };
    // a close refinement is kept unchanged
    let refined = disc(h, w, 24.0, 25.0, 10.5, 0.9);
    let o = apply(&pp, &coarse, &refined, h, w);
    assert_eq!(o.rejected, None);
    assert!(!o.fused);
    assert_eq!(o.refined, refined);

    // IoU < 0.5: a disc moved away
    let far = disc(h, w, 10.0, 10.0, 8.0, 0.9);
    let o = apply(&pp, &coarse, &far, h, w);
    assert_eq!(o.rejected, Some(Rejection::LowIou));
    assert_eq!(
        o.refined, coarse,
        "a rejected refinement returns the coarse probabilities"
    );

    // area ratio (IoU rule disabled so that the ratio rule is the one that fires)
    let pp_area = PostProcess {
        reject_iou_threshold: 0.0,
        ..pp.clone()
    };
    let small = disc(h, w, 24.0, 24.0, 4.0, 0.9); // area ratio ≈ 0.16 < 0.3
    assert_eq!(
        apply(&pp_area, &coarse, &small, h, w).rejected,
        Some(Rejection::AreaRatio)
    );
    let big = disc(h, w, 24.0, 24.0, 19.0, 0.9); // ≈ 3.6 > 3.0
    assert_eq!(
        apply(&pp_area, &coarse, &big, h, w).rejected,
        Some(Rejection::AreaRatio)
    );
    // coarse empty: the ratio rule does not apply (only IoU, disabled here)
    let empty = vec![0.0f32; h * w];
    assert_eq!(apply(&pp_area, &empty, &small, h, w).rejected, None);
    // both empty: IoU = 1, kept
    assert_eq!(apply(&pp, &empty, &empty, h, w).rejected, None);

    // more than 5 four-connected components: the disc plus 6 isolated pixels (diagonal neighbours do not connect)
    let mut specks = refined.clone();
    for k in 0..6 {
        specks[(2 + 6 * k) * w + 2] = 0.9;
    }
    let mut diag = refined.clone();
    diag[2 * w + 2] = 0.9;
    diag[3 * w + 3] = 0.9; // diagonal pair = two 4-components
    let bin = |v: &[f32]| v.iter().map(|&x| x > 0.5).collect::<Vec<_>>();
    assert_eq!(count_components(&bin(&specks), h, w), 7);
    assert_eq!(count_components(&bin(&diag), h, w), 3);
    assert_eq!(
        apply(&pp, &coarse, &specks, h, w).rejected,
        Some(Rejection::Components)
    );
    assert_eq!(apply(&pp, &coarse, &diag, h, w).rejected, None);
}

#[test]
fn fusion_takes_refined_only_inside_the_band_and_runs_after_rejection() {
    let (h, w) = (48, 48);
    let coarse = disc(h, w, 24.0, 24.0, 12.0, 0.8);
    let refined: Vec<f32> = (0..h * w)
        .map(|k| 0.3 + 0.6 * ((k % 7) as f32 / 7.0))
        .collect();
    let pp = PostProcess {
        use_boundary_fusion: true,
        boundary_band_width: 7,
        ..Default::default()
    };
    let o = apply(&pp, &coarse, &refined, h, w);
    assert!(o.fused && o.rejected.is_none());
    let cbin: Vec<bool> = coarse.iter().map(|&v| v > 0.5).collect();
    let band = boundary_band(&cbin, h, w, 7);
    let mut n_band = 0;
    for k in 0..h * w {
        if band[k] {
            n_band += 1;
            assert_eq!(o.refined[k], refined[k]);
        } else {
            assert_eq!(o.refined[k], coarse[k]);
        }
    }
    // the band is a ring of width ≈ 2·3 + 1 around the boundary: neither empty nor everything
    assert!(n_band > 100 && n_band < h * w / 2, "{n_band}");
    // the disc centre (deep inside) and the corner (far outside) keep the coarse value
    assert_eq!(o.refined[24 * w + 24], coarse[24 * w + 24]);
    assert_eq!(o.refined[0], coarse[0]);

    // rejection before fusion: a rejected case is the coarse map and is not reported as fused
    let both = PostProcess {
        use_rejection_rules: true,
        ..pp.clone()
    };
    let far = disc(h, w, 8.0, 8.0, 6.0, 0.9);
    let o = apply(&both, &coarse, &far, h, w);
    assert_eq!(o.rejected, Some(Rejection::LowIou));
    assert!(!o.fused);
    assert_eq!(o.refined, coarse);

    // disabled: identity
    let o = apply(&PostProcess::default(), &coarse, &refined, h, w);
    assert_eq!(o.refined, refined);
    assert!(!o.fused && o.rejected.is_none());
}
