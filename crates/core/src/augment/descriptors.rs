//! Lesion descriptors of a GT mask (SPEC §8.3): area, area fraction, equivalent radius, marching-squares perimeter,
//! circularity, solidity and complexity of the largest 8-connected component, and the tiny/small/irregular classes.

/// Descriptors of one GT mask at the working grid.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LesionDescriptors {
    /// Foreground pixel count `A`.
    pub area: usize,
    /// `a = A/(H·W)`.
    pub area_frac: f64,
    /// Equivalent radius `R = sqrt(A/π)`.
    pub radius: f64,
    /// Pixel count of the largest 8-connected component `L`.
    pub largest_area: usize,
    /// Marching-squares contour length of `L` (0.5 level, padded with background).
    pub perimeter: f64,
    /// `C = min(1, 4π|L|/Per²)`.
    pub circularity: f64,
    /// `Sol = |L| / area(convex hull of L's pixel corners)`.
    pub solidity: f64,
    /// `κ = 1 − (C + Sol)/2`.
    pub complexity: f64,
    /// `a < 0.003`.
    pub tiny: bool,
    /// `0.003 ≤ a < 0.012`.
    pub small: bool,
    /// `C < 0.5` or `Sol < 0.85`.
    pub irregular: bool,
}

/// Minimum GT area (pixels); smaller GTs are skipped (`skipped_too_small`).
pub const MIN_AREA: usize = 16;

/// Labels of the largest 8-connected component of `mask` (true = member). Ties go to the component met first in
/// raster order. Returns `(membership, size)`.
pub fn largest_component(mask: &[bool], h: usize, w: usize) -> (Vec<bool>, usize) {
    let mut label = vec![0u32; h * w];
    let mut best = (0u32, 0usize);
    let mut next = 0u32;
    let mut stack: Vec<usize> = Vec::new();
    for start in 0..h * w {
        if !mask[start] || label[start] != 0 {
            continue;
        }
        next += 1;
        label[start] = next;
        stack.push(start);
        let mut size = 0usize;
        while let Some(p) = stack.pop() {
            size += 1;
            let (i, j) = ((p / w) as isize, (p % w) as isize);
            for di in -1isize..=1 {
                for dj in -1isize..=1 {
                    let (ni, nj) = (i + di, j + dj);
                    if ni < 0 || nj < 0 || ni >= h as isize || nj >= w as isize {
                        continue;
                    }
                    let q = ni as usize * w + nj as usize;
                    if mask[q] && label[q] == 0 {
                        label[q] = next;
                        stack.push(q);
                    }
                }
            }
        }
        if size > best.1 {
            best = (next, size);
        }
    }
    if best.1 == 0 {
        return (vec![false; h * w], 0);
    }
    (label.iter().map(|&l| l == best.0).collect(), best.1)
}

/// Marching-squares length of the 0.5 level contour of a binary mask padded with background (SPEC §8.3).
pub fn marching_squares_perimeter(mask: &[bool], h: usize, w: usize) -> f64 {
    let at = |i: isize, j: isize| -> bool {
        i >= 0
            && j >= 0
            && (i as usize) < h
            && (j as usize) < w
            && mask[i as usize * w + j as usize]
    };
    let s2 = std::f64::consts::SQRT_2;
    let mut per = 0.0;
    for i in -1..h as isize {
        for j in -1..w as isize {
            let a = at(i, j);
            let b = at(i, j + 1);
            let c = at(i + 1, j);
            let d = at(i + 1, j + 1);
            let n = a as u8 + b as u8 + c as u8 + d as u8;
            per += match n {
                1 | 3 => s2 / 2.0,
                2 => {
                    if a == d {
                        // a&d or b&c: diagonal pair
                        s2
                    } else {
                        1.0
                    }
                }
                _ => 0.0,
            };
        }
    }
    per
}

/// Area of the convex hull of the corner points of the member pixels (pixel (i,j) spans `[j,j+1]×[i,i+1]`).
pub fn convex_hull_area(mask: &[bool], h: usize, w: usize) -> f64 {
    // For the hull it suffices to take, per row, the corners of the leftmost and rightmost member pixel.
    let mut pts: Vec<(i64, i64)> = Vec::new();
    for i in 0..h {
        let row = &mask[i * w..(i + 1) * w];
        let first = row.iter().position(|&m| m);
        let last = row.iter().rposition(|&m| m);
        if let (Some(a), Some(b)) = (first, last) {
            let (i, a, b) = (i as i64, a as i64, b as i64 + 1);
            pts.extend_from_slice(&[(a, i), (a, i + 1), (b, i), (b, i + 1)]);
        }
    }
    if pts.len() < 3 {
        return 0.0;
    }
    pts.sort_unstable();
    pts.dedup();
    let cross = |o: (i64, i64), a: (i64, i64), b: (i64, i64)| {
        (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0)
    };
    let mut hull: Vec<(i64, i64)> = Vec::with_capacity(2 * pts.len());
    for &p in &pts {
        while hull.len() >= 2 && cross(hull[hull.len() - 2], hull[hull.len() - 1], p) <= 0 {
            hull.pop();
        }
        hull.push(p);
    }
    let lower = hull.len() + 1;
    for &p in pts.iter().rev().skip(1) {
        while hull.len() >= lower && cross(hull[hull.len() - 2], hull[hull.len() - 1], p) <= 0 {
            hull.pop();
        }
        hull.push(p);
    }
    hull.pop();
    let mut a2: i64 = 0;
    for k in 0..hull.len() {
        let (p, q) = (hull[k], hull[(k + 1) % hull.len()]);
        a2 += p.0 * q.1 - q.0 * p.1;
    }
    a2.abs() as f64 / 2.0
}

/// All descriptors of SPEC §8.3 for a GT mask (`mask[i*w+j]`, true = lesion).
pub fn describe(mask: &[bool], h: usize, w: usize) -> LesionDescriptors {
    let area = mask.iter().filter(|&&m| m).count();
    let area_frac = area as f64 / (h * w).max(1) as f64;
    let radius = (area as f64 / std::f64::consts::PI).sqrt();
    let (l, largest_area) = largest_component(mask, h, w);
    let (perimeter, circularity, solidity) = if largest_area == 0 {
        (0.0, 0.0, 0.0)
    } else {
        let per = marching_squares_perimeter(&l, h, w);
        let c = if per > 0.0 {
            (4.0 * std::f64::consts::PI * largest_area as f64 / (per * per)).min(1.0)
        } else {
            0.0
        };
        let hull = convex_hull_area(&l, h, w);
        let sol = if hull > 0.0 {
            largest_area as f64 / hull
        } else {
            0.0
        };
        (per, c, sol)
    };
    let complexity = 1.0 - (circularity + solidity) / 2.0;
    LesionDescriptors {
        area,
        area_frac,
        radius,
        largest_area,
        perimeter,
        circularity,
        solidity,
        complexity,
        tiny: area_frac < 0.003,
        small: (0.003..0.012).contains(&area_frac),
        irregular: circularity < 0.5 || solidity < 0.85,
    }
}
