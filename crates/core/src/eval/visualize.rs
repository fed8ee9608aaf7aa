//! Evaluation figures (SPEC §13.1): `summary.png` (Dice histograms, improvement histogram, coarse-vs-refined scatter)
//! and the four-panel per-case overlays; the inference overlay of §13.2. Text uses the embedded font
//! ([`crate::train::plot::register_embedded_font`]); no system fonts.
use crate::train::checkpoint::atomic_write;
use crate::train::plot::{register_embedded_font, FONT};
use crate::{Error, Result};
use plotters::prelude::*;
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};
use std::path::Path;

/// A drawing backend that delegates everything to `B` except text, which it draws glyph by glyph with each glyph's
/// ink centred in its cell. plotters 0.3.7 lays out ab_glyph text without the glyphs' left side bearings, so the
/// narrow glyphs of the embedded monospace font (`.`, `-`, `1`, `:`) sit at the left edge of their cells and numbers
/// read as "0. 5" or "- 8. 56"; centring the ink in the (monospace) cell restores the intended spacing.
pub struct MonoTextBackend<B>(pub B);

type DErr<B> = DrawingErrorKind<<B as DrawingBackend>::ErrorType>;

impl<B: DrawingBackend> DrawingBackend for MonoTextBackend<B> {
    type ErrorType = B::ErrorType;
    fn get_size(&self) -> (u32, u32) {
        self.0.get_size()
    }
    fn ensure_prepared(&mut self) -> std::result::Result<(), DErr<B>> {
        self.0.ensure_prepared()
    }
    fn present(&mut self) -> std::result::Result<(), DErr<B>> {
        self.0.present()
    }
    fn draw_pixel(&mut self, p: BackendCoord, c: BackendColor) -> std::result::Result<(), DErr<B>> {
        self.0.draw_pixel(p, c)
    }
    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> std::result::Result<(), DErr<B>> {
        self.0.draw_line(from, to, style)
    }
    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        ul: BackendCoord,
        br: BackendCoord,
        style: &S,
        fill: bool,
    ) -> std::result::Result<(), DErr<B>> {
        self.0.draw_rect(ul, br, style, fill)
    }
    fn draw_path<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> std::result::Result<(), DErr<B>> {
        self.0.draw_path(path, style)
    }
    fn draw_circle<S: plotters_backend::BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> std::result::Result<(), DErr<B>> {
        self.0.draw_circle(center, radius, style, fill)
    }
    fn fill_polygon<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> std::result::Result<(), DErr<B>> {
        self.0.fill_polygon(vert, style)
    }
    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        dims: (u32, u32),
        src: &[u8],
    ) -> std::result::Result<(), DErr<B>> {
        self.0.blit_bitmap(pos, dims, src)
    }
    fn draw_text<T: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &T,
        pos: BackendCoord,
    ) -> std::result::Result<(), DErr<B>> {
        if style.color().alpha == 0.0 || text.is_empty() {
            return Ok(());
        }
        let fe = |e: T::FontError| DrawingErrorKind::FontError(Box::new(e));
        let ((min_x, min_y), (max_x, max_y)) = style.layout_box(text).map_err(fe)?;
        let (width, height) = (max_x - min_x, max_y - min_y);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -width,
            HPos::Center => -width / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let trans = style.transform();
        let (w, h) = self.get_size();
        let n = text.chars().count().max(1);
        let cell = width as f64 / n as f64;
        let mut utf8 = [0u8; 4];
        for (i, ch) in text.chars().enumerate() {
            let s: &str = ch.encode_utf8(&mut utf8);
            let mut ink: Vec<(i32, i32, BackendColor)> = Vec::new();
            let _ = style
                .draw(s, (0, 0), |x, y, c| {
                    ink.push((x, y, c));
                    Ok::<(), std::convert::Infallible>(())
                })
                .map_err(fe)?;
            let (Some(lo), Some(hi)) =
                (ink.iter().map(|p| p.0).min(), ink.iter().map(|p| p.0).max())
            else {
                continue; // a space
            };
            let off = (i as f64 * cell + (cell - (hi - lo + 1) as f64) / 2.0).round() as i32 - lo;
            for (x, y, c) in ink {
                let (x, y) = trans.transform(x + off + dx - min_x, y + dy - min_y);
                let (x, y) = (pos.0 + x, pos.1 + y);
                if x >= 0 && x < w as i32 && y >= 0 && y < h as i32 {
                    self.0.draw_pixel((x, y), c)?;
                }
            }
        }
        Ok(())
    }
}

/// A bitmap drawing area over an RGB buffer with [`MonoTextBackend`] text.
fn canvas(
    buf: &mut [u8],
    w: u32,
    h: u32,
) -> DrawingArea<MonoTextBackend<BitMapBackend<'_>>, plotters::coord::Shift> {
    MonoTextBackend(BitMapBackend::with_buffer(buf, (w, h))).into_drawing_area()
}

/// Overlay blend factor of the evaluation overlays.
pub const ALPHA: f32 = 0.35;
/// GT only.
pub const GT_COLOUR: [u8; 3] = [0, 204, 0];
/// Prediction only.
pub const PRED_COLOUR: [u8; 3] = [230, 38, 38];
/// Overlap.
pub const OVERLAP_COLOUR: [u8; 3] = [204, 179, 0];
/// Width and height of `summary.png`.
pub const SUMMARY_SIZE: (u32, u32) = (1800, 600);
/// |Δ Dice| below which a case counts as unchanged in the scatter.
pub const UNCHANGED_EPS: f64 = 1e-3;

fn perr<E: std::fmt::Display>(e: E) -> Error {
    Error::msg(format!("drawing failed: {e}"))
}

/// Encodes an RGB buffer as PNG and writes it atomically.
pub fn write_rgb_png(path: &Path, w: u32, h: u32, buf: Vec<u8>) -> Result<()> {
    let img = image::RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| Error::file(path, "RGB buffer size mismatch"))?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| Error::file(path, format!("PNG encoding: {e}")))?;
    atomic_write(path, bytes.get_ref())
}

fn blend(g: u8, c: [u8; 3], alpha: f32) -> [u8; 3] {
    let g = g as f32;
    let f = |x: u8| {
        ((1.0 - alpha) * g + alpha * x as f32)
            .round()
            .clamp(0.0, 255.0) as u8
    };
    [f(c[0]), f(c[1]), f(c[2])]
}

/// RGB pixels of a grey image with GT/prediction overlay (α = 0.35; green GT only, red prediction only, yellow
/// overlap). All slices are row-major `h·w`.
pub fn overlay_rgb(grey: &[u8], gt: &[bool], pred: &[bool]) -> Vec<u8> {
    let mut out = Vec::with_capacity(grey.len() * 3);
    for k in 0..grey.len() {
        let g = grey[k];
        let px = match (gt[k], pred[k]) {
            (true, true) => blend(g, OVERLAP_COLOUR, ALPHA),
            (true, false) => blend(g, GT_COLOUR, ALPHA),
            (false, true) => blend(g, PRED_COLOUR, ALPHA),
            (false, false) => [g, g, g],
        };
        out.extend_from_slice(&px);
    }
    out
}

/// One case for [`overlay_png`].
pub struct OverlayCase<'a> {
    pub title: String,
    /// Grey image at `S×S` (u8).
    pub grey: &'a [u8],
    pub gt: &'a [bool],
    pub coarse: &'a [bool],
    pub refined: Option<&'a [bool]>,
    pub size: usize,
    /// `(dice, iou, hd95)` coarse.
    pub coarse_m: (f64, f64, f64),
    pub refined_m: Option<(f64, f64, f64)>,
    /// Extra lines for the text panel (e.g. post-processing outcome).
    pub notes: Vec<String>,
}

/// Nearest upscale by an integer factor of an RGB raster into a larger RGB canvas at `(x0, y0)`.
fn blit(canvas: &mut [u8], cw: usize, src: &[u8], s: usize, f: usize, x0: usize, y0: usize) {
    for i in 0..s * f {
        for j in 0..s * f {
            let si = (i / f) * s + j / f;
            let d = ((y0 + i) * cw + x0 + j) * 3;
            canvas[d..d + 3].copy_from_slice(&src[si * 3..si * 3 + 3]);
        }
    }
}

/// Writes the four-panel overlay `[input | GT + coarse | GT + refined | metrics text]` (SPEC §13.1).
pub fn overlay_png(path: &Path, c: &OverlayCase) -> Result<()> {
    register_embedded_font();
    let s = c.size;
    let f = 320usize.div_ceil(s).max(1);
    let p = s * f;
    let (pad, head) = (8usize, 30usize);
    let cw = 4 * p + 5 * pad;
    let ch = p + head + pad;
    let mut buf = vec![255u8; cw * ch * 3];
    let input: Vec<u8> = c.grey.iter().flat_map(|&g| [g, g, g]).collect();
    let empty = vec![false; s * s];
    let coarse = overlay_rgb(c.grey, c.gt, c.coarse);
    let refined = overlay_rgb(c.grey, c.gt, c.refined.unwrap_or(&empty));
    blit(&mut buf, cw, &input, s, f, pad, head);
    blit(&mut buf, cw, &coarse, s, f, 2 * pad + p, head);
    blit(&mut buf, cw, &refined, s, f, 3 * pad + 2 * p, head);
    {
        let root = canvas(&mut buf, cw as u32, ch as u32);
        let title = (FONT, 18).into_font().color(&BLACK);
        let titles = [
            "input",
            "GT + coarse",
            if c.refined.is_some() {
                "GT + refined"
            } else {
                "GT + refined (n/a)"
            },
        ];
        for (i, t) in titles.iter().enumerate() {
            let x = (pad + i * (p + pad)) as i32;
            root.draw(&Text::new(t.to_string(), (x, 6), title.clone()))
                .map_err(perr)?;
        }
        let x0 = (pad + 3 * (p + pad)) as i32;
        let small = (FONT, 15).into_font().color(&BLACK);
        let mut y = 6i32;
        let line = |t: String, y: &mut i32| -> Result<()> {
            root.draw(&Text::new(t, (x0, *y), small.clone()))
                .map_err(perr)?;
            *y += 20;
            Ok(())
        };
        line(c.title.clone(), &mut y)?;
        y += 8;
        line(
            format!("{:<8}{:>8}{:>8}{:>8}", "", "Dice", "IoU", "HD95"),
            &mut y,
        )?;
        let (cd, ci, chd) = c.coarse_m;
        line(
            format!("{:<8}{:>8.4}{:>8.4}{:>8.2}", "coarse", cd, ci, chd),
            &mut y,
        )?;
        match c.refined_m {
            Some((rd, ri, rhd)) => {
                line(
                    format!("{:<8}{:>8.4}{:>8.4}{:>8.2}", "refined", rd, ri, rhd),
                    &mut y,
                )?;
                line(
                    format!(
                        "{:<8}{:>+8.4}{:>+8.4}{:>+8.2}",
                        "delta",
                        rd - cd,
                        ri - ci,
                        rhd - chd
                    ),
                    &mut y,
                )?;
            }
            None => line("refined   n/a".into(), &mut y)?,
        }
        for n in &c.notes {
            line(n.clone(), &mut y)?;
        }
        y += 16;
        line("legend".into(), &mut y)?;
        for (name, col) in [
            ("GT only", GT_COLOUR),
            ("prediction only", PRED_COLOUR),
            ("overlap", OVERLAP_COLOUR),
        ] {
            let sw = blend(128, col, 0.8);
            root.draw(&Rectangle::new(
                [(x0, y + 2), (x0 + 16, y + 16)],
                RGBColor(sw[0], sw[1], sw[2]).filled(),
            ))
            .map_err(perr)?;
            root.draw(&Text::new(name.to_string(), (x0 + 24, y), small.clone()))
                .map_err(perr)?;
            y += 22;
        }
        root.present().map_err(perr)?;
    }
    write_rgb_png(path, cw as u32, ch as u32, buf)
}

/// Inference overlay (SPEC §13.2): mask in green at α = 0.5 plus a 2-pixel green contour, at the original size.
pub fn infer_overlay_rgb(grey: &[u8], mask: &[bool], h: usize, w: usize) -> Vec<u8> {
    let green = [0u8, 255, 0];
    // contour: mask pixels within 2 px (Chebyshev) of the background or the border
    let mut contour = vec![false; h * w];
    for i in 0..h {
        for j in 0..w {
            if !mask[i * w + j] {
                continue;
            }
            'n: for di in -2i64..=2 {
                for dj in -2i64..=2 {
                    let (a, b) = (i as i64 + di, j as i64 + dj);
                    if a < 0
                        || b < 0
                        || a >= h as i64
                        || b >= w as i64
                        || !mask[a as usize * w + b as usize]
                    {
                        contour[i * w + j] = true;
                        break 'n;
                    }
                }
            }
        }
    }
    let mut out = Vec::with_capacity(h * w * 3);
    for k in 0..h * w {
        let g = grey[k];
        let px = if contour[k] {
            green
        } else if mask[k] {
            blend(g, green, 0.5)
        } else {
            [g, g, g]
        };
        out.extend_from_slice(&px);
    }
    out
}

/// Data of `summary.png`: per-case coarse Dice and (optionally) refined Dice.
pub fn summary_png(
    path: &Path,
    title: &str,
    coarse: &[f64],
    refined: Option<&[f64]>,
) -> Result<()> {
    register_embedded_font();
    let (w, h) = SUMMARY_SIZE;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = canvas(&mut buf, w, h);
        root.fill(&WHITE).map_err(perr)?;
        let root = root.titled(title, (FONT, 22)).map_err(perr)?;
        let panels = root.split_evenly((1, 3));
        // (a) Dice histograms
        let mut series: Vec<(&str, &[f64], RGBColor)> =
            vec![("coarse", coarse, RGBColor(31, 119, 180))];
        if let Some(r) = refined {
            series.push(("refined", r, RGBColor(255, 127, 14)));
        }
        histogram(&panels[0], "(a) Dice per image", "Dice", 0.0, 1.0, &series)?;
        match refined {
            Some(r) => {
                let imp: Vec<f64> = r.iter().zip(coarse).map(|(a, b)| a - b).collect();
                let m = imp.iter().fold(0.0f64, |a, v| a.max(v.abs())).max(0.01) * 1.05;
                histogram(
                    &panels[1],
                    "(b) Dice improvement (refined - coarse)",
                    "Δ Dice",
                    -m,
                    m,
                    &[("improvement", &imp, RGBColor(44, 160, 44))],
                )?;
                scatter(&panels[2], coarse, r)?;
            }
            None => {
                for (i, t) in ["(b) no refined predictions", "(c) no refined predictions"]
                    .iter()
                    .enumerate()
                {
                    panels[i + 1]
                        .draw(&Text::new(t.to_string(), (40, 60), (FONT, 18).into_font()))
                        .map_err(perr)?;
                }
            }
        }
        root.present().map_err(perr)?;
    }
    write_rgb_png(path, w, h, buf)
}

type Panel<'a> = DrawingArea<MonoTextBackend<BitMapBackend<'a>>, plotters::coord::Shift>;

/// Light grid lines (the default minor grid is too dense to read at this size).
const LIGHT_GRID: RGBColor = RGBColor(238, 238, 238);

const BINS: usize = 20;

fn histogram(
    area: &Panel<'_>,
    caption: &str,
    xdesc: &str,
    lo: f64,
    hi: f64,
    series: &[(&str, &[f64], RGBColor)],
) -> Result<()> {
    let width = (hi - lo) / BINS as f64;
    let counts: Vec<Vec<usize>> = series
        .iter()
        .map(|(_, v, _)| {
            let mut c = vec![0usize; BINS];
            for &x in v.iter().filter(|x| x.is_finite()) {
                let b = (((x - lo) / width).floor().max(0.0) as usize).min(BINS - 1);
                c[b] += 1;
            }
            c
        })
        .collect();
    let ymax = counts
        .iter()
        .flat_map(|c| c.iter())
        .copied()
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(lo..hi, 0.0..ymax)
        .map_err(perr)?;
    chart
        .configure_mesh()
        .x_desc(xdesc)
        .y_desc("images")
        .light_line_style(LIGHT_GRID)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .x_label_formatter(&|x| format!("{x:.2}"))
        .y_label_formatter(&|y| {
            if (y - y.round()).abs() < 1e-9 {
                format!("{y:.0}")
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(perr)?;
    if lo < 0.0 && hi > 0.0 {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(0.0, 0.0), (0.0, ymax)],
                BLACK.mix(0.6).stroke_width(1),
            )))
            .map_err(perr)?;
    }
    for ((name, v, col), c) in series.iter().zip(&counts) {
        let col = *col;
        // Translucent fill plus a solid outline, so overlapping histograms stay distinguishable.
        let fill = col.mix(0.35).filled();
        let outline = ShapeStyle::from(&col).stroke_width(2);
        chart
            .draw_series(c.iter().enumerate().filter(|(_, &n)| n > 0).map(|(i, &n)| {
                let x0 = lo + i as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, n as f64)], fill)
            }))
            .map_err(perr)?;
        chart
            .draw_series(c.iter().enumerate().filter(|(_, &n)| n > 0).map(|(i, &n)| {
                let x0 = lo + i as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, n as f64)], outline)
            }))
            .map_err(perr)?;
        let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        let mean = if finite.is_empty() {
            f64::NAN
        } else {
            finite.iter().sum::<f64>() / finite.len() as f64
        };
        let label = format!("{name} (mean {mean:.4})");
        if mean.is_finite() {
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(mean, 0.0), (mean, ymax)],
                    6,
                    4,
                    col.stroke_width(2),
                ))
                .map_err(perr)?
                .label(label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 16, y + 5)], col.mix(0.6).filled())
                });
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(perr)?;
    Ok(())
}

/// Counts (improved, degraded, unchanged) with |Δ| < [`UNCHANGED_EPS`] unchanged.
pub fn change_counts(coarse: &[f64], refined: &[f64]) -> (usize, usize, usize) {
    let mut c = (0, 0, 0);
    for (a, b) in coarse.iter().zip(refined) {
        let d = b - a;
        if d.abs() < UNCHANGED_EPS {
            c.2 += 1;
        } else if d > 0.0 {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
    }
    c
}

fn scatter(area: &Panel<'_>, coarse: &[f64], refined: &[f64]) -> Result<()> {
    let (imp, deg, unc) = change_counts(coarse, refined);
    let mut chart = ChartBuilder::on(area)
        .caption("(c) coarse vs refined Dice", (FONT, 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.02f64..1.02, -0.02f64..1.02)
        .map_err(perr)?;
    chart
        .configure_mesh()
        .x_desc("coarse Dice")
        .y_desc("refined Dice")
        .light_line_style(LIGHT_GRID)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .x_label_formatter(&|x| format!("{x:.1}"))
        .y_label_formatter(&|y| format!("{y:.1}"))
        .draw()
        .map_err(perr)?;
    chart
        .draw_series(DashedLineSeries::new(
            vec![(0.0, 0.0), (1.0, 1.0)],
            6,
            4,
            BLACK.stroke_width(1),
        ))
        .map_err(perr)?
        .label("y = x")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
    let green = RGBColor(44, 160, 44);
    let red = RGBColor(214, 39, 40);
    let grey = RGBColor(127, 127, 127);
    for (name, col, n, sel) in [
        ("improved", green, imp, 0u8),
        ("degraded", red, deg, 1),
        ("unchanged", grey, unc, 2),
    ] {
        let pts: Vec<(f64, f64)> = coarse
            .iter()
            .zip(refined)
            .filter(|(a, b)| {
                let d = *b - *a;
                let k = if d.abs() < UNCHANGED_EPS {
                    2
                } else if d > 0.0 {
                    0
                } else {
                    1
                };
                k == sel
            })
            .map(|(a, b)| (*a, *b))
            .collect();
        chart
            .draw_series(
                pts.into_iter()
                    .map(move |p| Circle::new(p, 4, col.mix(0.7).filled())),
            )
            .map_err(perr)?
            .label(format!("{name}: {n}"))
            .legend(move |(x, y)| Circle::new((x + 8, y), 4, col.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(perr)?;
    Ok(())
}
