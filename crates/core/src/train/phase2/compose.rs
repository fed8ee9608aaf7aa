//! Phase 2 epoch composition (SPEC §11.3 step 4): Option B real/synthetic mixing (`--real-data`, `--real-ratio`) and
//! the curriculum (`--curriculum`). Everything is a pure function of `(seed, epoch)`, so a resumed run draws exactly
//! the epochs an uninterrupted run would.
use rand::seq::SliceRandom;
use rand::Rng;

/// Curriculum rank of a bin label: high, medium, low, critical, real (then anything else).
pub fn bin_rank(bin: &str) -> usize {
    match bin {
        "high" => 0,
        "medium" => 1,
        "low" => 2,
        "critical" => 3,
        "real" => 4,
        _ => 5,
    }
}

/// Curriculum fraction `d_e = min(1, 0.2 + 0.8·e/⌊E/2⌋)` of 0-based epoch `e` of `E` (`d = 1` for `E < 2`).
pub fn curriculum_fraction(epoch: u64, epochs: u64) -> f64 {
    if epochs < 2 {
        return 1.0;
    }
    (0.2 + 0.8 * epoch as f64 / (epochs / 2) as f64).min(1.0)
}

/// Number of samples used in epoch `e` by the curriculum: `max(min(100, n), ⌈n·d_e⌉)` (never more than `n`).
pub fn curriculum_count(n: usize, epoch: u64, epochs: u64) -> usize {
    let d = curriculum_fraction(epoch, epochs);
    // The product is rounded to 1e-9 first so that exact multiples (n·d integral) are not pushed up by f64 error.
    let k = ((n as f64 * d * 1e9).round() / 1e9).ceil() as usize;
    n.min(100).max(k).min(n)
}

/// Sorts `ids` into curriculum order: by bin rank (high, medium, low, critical, real), then stored Dice descending,
/// then sample index (ties).
pub fn curriculum_order(
    ids: &mut [usize],
    bin_of: impl Fn(usize) -> usize,
    dice_of: impl Fn(usize) -> f64,
) {
    ids.sort_by(|&a, &b| {
        bin_of(a)
            .cmp(&bin_of(b))
            .then(dice_of(b).total_cmp(&dice_of(a)))
            .then(a.cmp(&b))
    });
}

/// `k` items of `pool` drawn with the RNG: without replacement when `k ≤ |pool|`; otherwise whole passes over the
/// pool (each item once per pass) followed by a draw without replacement for the remainder (SPEC: "with replacement
/// only if a source is smaller than its quota").
fn draw<R: Rng>(pool: &[usize], k: usize, rng: &mut R) -> Vec<usize> {
    if pool.is_empty() || k == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(k);
    while out.len() + pool.len() <= k {
        out.extend_from_slice(pool);
    }
    let rest = k - out.len();
    if rest > 0 {
        let mut p = pool.to_vec();
        p.shuffle(rng);
        out.extend_from_slice(&p[..rest]);
    }
    out
}

/// Number of real samples per epoch: `round(r·L)` with `L` synthetic training samples.
pub fn real_quota(l: usize, ratio: f64) -> usize {
    (ratio * l as f64).round() as usize
}

/// The training samples of epoch `epoch` before ordering: all of `synthetic` when `ratio = 0`; otherwise exactly
/// `round(r·L)` real and `L − round(r·L)` synthetic samples (`L = |synthetic|`), each drawn without replacement from
/// its pool (see [`draw`]) with the project RNG stream `("phase2-mix", epoch)`.
pub fn mix_epoch(
    synthetic: &[usize],
    real: &[usize],
    ratio: f64,
    seed: u64,
    epoch: u64,
) -> Vec<usize> {
    if ratio <= 0.0 || real.is_empty() {
        return synthetic.to_vec();
    }
    let l = synthetic.len();
    let k = real_quota(l, ratio).min(l);
    let mut rng = crate::rng::stream_rng(seed, "phase2-mix", &[epoch]);
    let mut out = draw(real, k, &mut rng);
    out.extend(draw(synthetic, l - k, &mut rng));
    out
}

/// The ordered sample list of one training epoch: [`mix_epoch`], then (with the curriculum) the first
/// [`curriculum_count`] samples in [`curriculum_order`], then a shuffle with the stream `("shuffle", epoch)`.
#[allow(clippy::too_many_arguments)]
pub fn epoch_order(
    synthetic: &[usize],
    real: &[usize],
    ratio: f64,
    curriculum: bool,
    bin_of: impl Fn(usize) -> usize,
    dice_of: impl Fn(usize) -> f64,
    seed: u64,
    epoch: u64,
    epochs: u64,
) -> Vec<usize> {
    let mut ids = mix_epoch(synthetic, real, ratio, seed, epoch);
    if curriculum {
        curriculum_order(&mut ids, bin_of, dice_of);
        let k = curriculum_count(ids.len(), epoch, epochs);
        ids.truncate(k);
    }
    let mut rng = crate::rng::stream_rng(seed, "shuffle", &[epoch]);
    ids.shuffle(&mut rng);
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curriculum_schedule_by_hand() {
        // E = 10: ⌊E/2⌋ = 5; d_e = 0.2 + 0.16·e → 0.2, 0.36, 0.52, 0.68, 0.84, 1, 1, ...
        let want = [0.2, 0.36, 0.52, 0.68, 0.84, 1.0, 1.0, 1.0, 1.0, 1.0];
        for (e, w) in want.iter().enumerate() {
            assert!(
                (curriculum_fraction(e as u64, 10) - w).abs() < 1e-12,
                "e={e}"
            );
        }
        // n = 1000: ⌈1000·d⌉ = 200, 360, 520, 680, 840, 1000.
        let counts: Vec<usize> = (0..7).map(|e| curriculum_count(1000, e, 10)).collect();
        assert_eq!(counts, vec![200, 360, 520, 680, 840, 1000, 1000]);
        // n = 300: ⌈60⌉ < 100 → 100 (the floor min(100, n)), then ⌈108⌉ = 108, ⌈156⌉ = 156.
        assert_eq!(curriculum_count(300, 0, 10), 100);
        assert_eq!(curriculum_count(300, 1, 10), 108);
        assert_eq!(curriculum_count(300, 2, 10), 156);
        // n = 50 < 100: min(100, n) = n → every epoch uses all 50.
        assert_eq!(curriculum_count(50, 0, 10), 50);
        // E = 3: ⌊E/2⌋ = 1 → d = 0.2, 1, 1. n = 1001: ⌈200.2⌉ = 201.
        assert_eq!(curriculum_count(1001, 0, 3), 201);
        assert_eq!(curriculum_count(1001, 1, 3), 1001);
        // E < 2: d = 1.
        assert_eq!(curriculum_count(1000, 0, 1), 1000);
        // Odd E = 7: ⌊7/2⌋ = 3 → d_1 = 0.2 + 0.8/3 = 0.4667, ⌈466.67⌉ = 467.
        assert_eq!(curriculum_count(1000, 1, 7), 467);
    }

    #[test]
    fn curriculum_orders_by_bin_then_dice_descending() {
        let bins = ["low", "high", "real", "medium", "high", "critical"];
        let dice = [0.7, 0.91, 0.5, 0.85, 0.95, 0.3];
        let mut ids: Vec<usize> = (0..6).collect();
        curriculum_order(&mut ids, |i| bin_rank(bins[i]), |i| dice[i]);
        assert_eq!(ids, vec![4, 1, 3, 0, 5, 2]);
        // Epoch 0 of 10 with n = 6 keeps all 6 (min(100, n) = 6) but in shuffled order.
        let o = epoch_order(
            &ids,
            &[],
            0.0,
            true,
            |i| bin_rank(bins[i]),
            |i| dice[i],
            1,
            0,
            10,
        );
        let mut s = o.clone();
        s.sort();
        assert_eq!(s, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn curriculum_prefix_is_the_easiest_samples() {
        // 500 samples, dice = i/500, all in one bin: epoch 0 of 10 uses ⌈100⌉ = 100 → the 100 highest-Dice ones.
        let ids: Vec<usize> = (0..500).collect();
        let o = epoch_order(&ids, &[], 0.0, true, |_| 0, |i| i as f64 / 500.0, 3, 0, 10);
        assert_eq!(o.len(), 100);
        assert!(o.iter().all(|&i| i >= 400), "{o:?}");
    }

    #[test]
    fn real_ratio_counts_are_exact() {
        let synth: Vec<usize> = (0..97).collect();
        let real: Vec<usize> = (1000..1030).collect(); // 30 real samples
        for (r, want_real) in [(0.25, 24usize), (0.1, 10), (0.5, 49), (0.3, 29)] {
            // round(0.25·97) = 24, round(9.7) = 10, round(48.5) = 49, round(29.1) = 29.
            assert_eq!(real_quota(97, r), want_real);
            for epoch in 0..3 {
                let ids = mix_epoch(&synth, &real, r, 42, epoch);
                assert_eq!(ids.len(), 97, "epoch size = L");
                let nr = ids.iter().filter(|&&i| i >= 1000).count();
                assert_eq!(nr, want_real, "r = {r}");
                // Without replacement where the pool suffices (30 real samples).
                if want_real <= real.len() {
                    let mut s = ids.clone();
                    s.sort();
                    s.dedup();
                    assert_eq!(s.len(), 97, "r = {r}: duplicates");
                }
            }
        }
        // A real pool smaller than its quota (49 > 30): one full pass + 19 more, no item more than twice.
        let ids = mix_epoch(&synth, &real, 0.5, 42, 0);
        let nr: Vec<usize> = ids.iter().copied().filter(|&i| i >= 1000).collect();
        assert_eq!(nr.len(), 49);
        for r in &real {
            let c = nr.iter().filter(|&&x| x == *r).count();
            assert!((1..=2).contains(&c), "{r} drawn {c} times");
        }
        // Different epochs draw different subsets; the same epoch is reproducible.
        assert_eq!(
            mix_epoch(&synth, &real, 0.25, 42, 1),
            mix_epoch(&synth, &real, 0.25, 42, 1)
        );
        assert_ne!(
            mix_epoch(&synth, &real, 0.25, 42, 1),
            mix_epoch(&synth, &real, 0.25, 42, 2)
        );
        // ratio 0: the synthetic list unchanged.
        assert_eq!(mix_epoch(&synth, &real, 0.0, 42, 0), synth);
    }
}
