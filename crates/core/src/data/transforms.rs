//! Training augmentation (SPEC §3.8): rotation ±20° (p = 0.5; bilinear image, nearest mask, outside = 0) then
//! horizontal flip (p = 0.5), at the original resolution, drawn from the project RNG `("augment", epoch, index)`.
use rand::Rng;

/// The random draws of one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentParams {
    /// Rotation angle in degrees, or `None` when not rotated.
    pub rotation_deg: Option<f64>,
    pub hflip: bool,
}

impl AugmentParams {
    pub const NONE: AugmentParams = AugmentParams {
        rotation_deg: None,
        hflip: false,
    };

    /// Draws: `u_rot`, `θ`, `u_flip` (always three draws, in this order).
    pub fn draw(seed: u64, epoch: u64, index: u64) -> Self {
        let mut rng = crate::rng::stream_rng(seed, "augment", &[epoch, index]);
        let u_rot: f64 = rng.gen();
        let theta: f64 = rng.gen_range(-20.0..20.0);
        let u_flip: f64 = rng.gen();
        AugmentParams {
            rotation_deg: (u_rot < 0.5).then_some(theta),
            hflip: u_flip < 0.5,
        }
    }
}

/// The inverse mapping of a rotation by `deg` around `((W−1)/2, (H−1)/2)`: output pixel `p` samples
/// `q = c + R(θ)(p − c)`.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    sin: f64,
    cos: f64,
    cx: f64,
    cy: f64,
    h: usize,
    w: usize,
}

impl Rotation {
    pub fn new(deg: f64, h: usize, w: usize) -> Self {
        let (sin, cos) = deg.to_radians().sin_cos();
        Self {
            sin,
            cos,
            cx: (w as f64 - 1.0) / 2.0,
            cy: (h as f64 - 1.0) / 2.0,
            h,
            w,
        }
    }

    /// Source point `q = (x, y)` of output pixel `(px, py)`.
    #[inline]
    pub fn source(&self, px: usize, py: usize) -> (f64, f64) {
        let (dx, dy) = (px as f64 - self.cx, py as f64 - self.cy);
        (
            self.cx + self.cos * dx - self.sin * dy,
            self.cy + self.sin * dx + self.cos * dy,
        )
    }

    /// Bilinear value at output pixel `(px, py)`; `get(i)` reads the source at flat index `i`; outside → 0.
    #[inline]
    pub fn bilinear_at(&self, px: usize, py: usize, get: impl Fn(usize) -> f32) -> f32 {
        let (w, h) = (self.w, self.h);
        let (wi, hi) = (w as i64, h as i64);
        let (qx, qy) = self.source(px, py);
        let (x0f, y0f) = (qx.floor(), qy.floor());
        let (fx, fy) = ((qx - x0f) as f32, (qy - y0f) as f32);
        let (x0, y0) = (x0f as i64, y0f as i64);
        if x0 < -1 || y0 < -1 || x0 >= wi || y0 >= hi {
            return 0.0;
        }
        let (a, b, c, d) = if x0 >= 0 && y0 >= 0 && x0 + 1 < wi && y0 + 1 < hi {
            let i = y0 as usize * w + x0 as usize;
            (get(i), get(i + 1), get(i + w), get(i + w + 1))
        } else {
            let at = |x: i64, y: i64| -> f32 {
                if x < 0 || y < 0 || x >= wi || y >= hi {
                    0.0
                } else {
                    get(y as usize * w + x as usize)
                }
            };
            (
                at(x0, y0),
                at(x0 + 1, y0),
                at(x0, y0 + 1),
                at(x0 + 1, y0 + 1),
            )
        };
        (1.0 - fy) * ((1.0 - fx) * a + fx * b) + fy * ((1.0 - fx) * c + fx * d)
    }

    /// Nearest source index (`⌊q + 0.5⌋`) of output pixel `(px, py)`, or `None` outside the image.
    #[inline]
    pub fn nearest_at(&self, px: usize, py: usize) -> Option<usize> {
        let (qx, qy) = self.source(px, py);
        let (qx, qy) = ((qx + 0.5).floor(), (qy + 0.5).floor());
        (qx >= 0.0 && qy >= 0.0 && qx < self.w as f64 && qy < self.h as f64)
            .then(|| qy as usize * self.w + qx as usize)
    }
}

/// Rotates an `h×w` f32 image by `deg` around `((W−1)/2, (H−1)/2)`: output `p` samples `q = c + R(θ)(p − c)`
/// bilinearly; neighbours outside the image count as 0.
pub fn rotate_bilinear(src: &[f32], h: usize, w: usize, deg: f64) -> Vec<f32> {
    let r = Rotation::new(deg, h, w);
    let mut out = vec![0f32; h * w];
    for py in 0..h {
        for (px, o) in out[py * w..(py + 1) * w].iter_mut().enumerate() {
            *o = r.bilinear_at(px, py, |i| src[i]);
        }
    }
    out
}

/// Nearest-neighbour rotation (`⌊q + 0.5⌋`, outside → 0) of any copyable plane (masks).
pub fn rotate_nearest<T: Copy + Default>(src: &[T], h: usize, w: usize, deg: f64) -> Vec<T> {
    let r = Rotation::new(deg, h, w);
    let mut out = vec![T::default(); h * w];
    for py in 0..h {
        for (px, o) in out[py * w..(py + 1) * w].iter_mut().enumerate() {
            if let Some(i) = r.nearest_at(px, py) {
                *o = src[i];
            }
        }
    }
    out
}

/// Horizontal flip in place: `x → W−1−x`.
pub fn hflip<T>(plane: &mut [T], h: usize, w: usize) {
    for y in 0..h {
        plane[y * w..(y + 1) * w].reverse();
    }
}

/// Applies `p` to an image (f32) and its mask (u8) of size `h×w`.
pub fn apply(p: &AugmentParams, image: &mut Vec<f32>, mask: &mut Vec<u8>, h: usize, w: usize) {
    if let Some(deg) = p.rotation_deg {
        *image = rotate_bilinear(image, h, w, deg);
        *mask = rotate_nearest(mask, h, w, deg);
    }
    if p.hflip {
        hflip(image, h, w);
        hflip(mask, h, w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_rotation_is_identity_and_flip_reverses() {
        let img: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(rotate_bilinear(&img, 3, 4, 0.0), img);
        assert_eq!(rotate_nearest(&img, 3, 4, 0.0), img);
        let mut f = img.clone();
        hflip(&mut f, 3, 4);
        assert_eq!(&f[..4], &[3.0, 2.0, 1.0, 0.0]);
    }

    #[test]
    fn quarter_turn_on_square_maps_exactly() {
        // 90°: q = c + R(p − c); for p = (x=2, y=1) on 3x3, c = (1,1): q = (1 − 0, 1 + 1) = (1, 2).
        let img: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let r = rotate_nearest(&img, 3, 3, 90.0);
        assert_eq!(r[3 + 2], img[2 * 3 + 1]);
        let rb = rotate_bilinear(&img, 3, 3, 90.0);
        assert!((rb[3 + 2] - img[2 * 3 + 1]).abs() < 1e-5);
    }

    #[test]
    fn draws_are_deterministic() {
        let a = AugmentParams::draw(1, 2, 3);
        assert_eq!(a, AugmentParams::draw(1, 2, 3));
        let n_rot = (0..1000)
            .filter(|&k| AugmentParams::draw(1, 0, k).rotation_deg.is_some())
            .count();
        assert!((400..600).contains(&n_rot));
    }
}
