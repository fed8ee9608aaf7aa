//! `progress.png` (SPEC §11.1.5): 1200×900, three panels — (1) train/val loss and train loss components,
//! (2) train Dice, val Dice (pooled), val per-image Dice, EMA(0.9) of val Dice with the best epoch marked,
//! (3) learning rate per group on a log scale. Text uses the embedded DejaVu Sans Mono (no system fonts).
use super::history::HistoryRow;
use super::checkpoint::atomic_write;
use crate::{Error, Result};
use plotters::coord::combinators::IntoLogRange;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

/// Size of `progress.png`.
pub const WIDTH: u32 = 1200;
pub const HEIGHT: u32 = 900;

/// The embedded font (DejaVu Sans Mono, Bitstream Vera licence, see `assets/DejaVuSansMono.LICENSE`).
pub static FONT_TTF: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");

/// Font family name under which the embedded font is registered with plotters.
pub const FONT: &str = "sans-serif";

static REGISTER: Once = Once::new();

/// Registers the embedded font with plotters (idempotent). Every plot/overlay in the crate calls this first.
pub fn register_embedded_font() {
    REGISTER.call_once(|| {
        for st in [FontStyle::Normal, FontStyle::Bold, FontStyle::Italic, FontStyle::Oblique] {
            let _ = plotters::style::register_font(FONT, st, FONT_TTF);
        }
    });
}

/// Exponential moving average with smoothing 0.9 over the present (`Some`) values, keyed by epoch:
/// `ema₀ = v₀`, `emaₜ = 0.9·emaₜ₋₁ + 0.1·vₜ`.
pub fn ema(points: &[(f64, f64)], alpha: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len());
    let mut acc: Option<f64> = None;
    for &(x, v) in points {
        let e = match acc {
            None => v,
            Some(a) => alpha * a + (1.0 - alpha) * v,
        };
        acc = Some(e);
        out.push((x, e));
    }
    out
}

fn series<F: Fn(&HistoryRow) -> Option<f64>>(h: &[HistoryRow], f: F) -> Vec<(f64, f64)> {
    h.iter().filter_map(|r| f(r).filter(|v| v.is_finite()).map(|v| (r.epoch as f64, v))).collect()
}

fn y_range(all: &[&Vec<(f64, f64)>], floor0: bool) -> (f64, f64) {
    let vals: Vec<f64> = all.iter().flat_map(|s| s.iter().map(|p| p.1)).collect();
    if vals.is_empty() {
        return (0.0, 1.0);
    }
    let mut lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
    let mut hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if floor0 && lo > 0.0 {
        lo = 0.0;
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let pad = 0.05 * (hi - lo);
    (lo - if floor0 && lo == 0.0 { 0.0 } else { pad }, hi + pad)
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn perr<E: std::fmt::Display>(e: E) -> Error {
    Error::msg(format!("progress.png: drawing failed: {e}"))
}

type Panel<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn line_panel(
    area: &Panel<'_>,
    caption: &str,
    x_max: f64,
    lines: &[(String, Vec<(f64, f64)>, bool)],
    floor0: bool,
    best: Option<(f64, f64)>,
    legend: SeriesLabelPosition,
) -> Result<()> {
    let refs: Vec<&Vec<(f64, f64)>> = lines.iter().map(|l| &l.1).collect();
    let (y0, y1) = y_range(&refs, floor0);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5f64..x_max + 0.5, y0..y1)
        .map_err(perr)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.3}"))
        .draw()
        .map_err(perr)?;
    for (i, (name, pts, dashed)) in lines.iter().enumerate() {
        if pts.is_empty() {
            continue;
        }
        let color = PALETTE[i % PALETTE.len()];
        let style = ShapeStyle::from(&color).stroke_width(2);
        if *dashed {
            chart
                .draw_series(DashedLineSeries::new(pts.iter().cloned(), 6, 4, style))
                .map_err(perr)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        } else {
            chart
                .draw_series(LineSeries::new(pts.iter().cloned(), style))
                .map_err(perr)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        if pts.len() == 1 {
            chart.draw_series(std::iter::once(Circle::new(pts[0], 3, color.filled()))).map_err(perr)?;
        }
    }
    if let Some((bx, by)) = best {
        let gold = RGBColor(200, 150, 0);
        chart
            .draw_series(std::iter::once(PathElement::new(vec![(bx, y0), (bx, y1)], gold.stroke_width(1))))
            .map_err(perr)?;
        chart
            .draw_series(std::iter::once(TriangleMarker::new((bx, by), 8, gold.filled())))
            .map_err(perr)?
            .label(format!("best (epoch {bx:.0})"))
            .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, gold.filled()));
    }
    chart
        .configure_series_labels()
        .position(legend)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(perr)?;
    Ok(())
}

fn lr_panel(area: &Panel<'_>, x_max: f64, lines: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let vals: Vec<f64> = lines.iter().flat_map(|l| l.1.iter().map(|p| p.1)).filter(|v| *v > 0.0).collect();
    let (lo, hi) = if vals.is_empty() {
        (1e-6, 1e-2)
    } else {
        let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if hi / lo < 10.0 {
            let mid = (hi * lo).sqrt();
            (mid / 4.0, mid * 4.0)
        } else {
            (lo / 1.5, hi * 1.5)
        }
    };
    let mut chart = ChartBuilder::on(area)
        .caption("learning rate", (FONT, 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5f64..x_max + 0.5, (lo..hi).log_scale())
        .map_err(perr)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| super::console::fmt_sci(*y))
        .draw()
        .map_err(perr)?;
    for (i, (name, pts)) in lines.iter().enumerate() {
        let pts: Vec<(f64, f64)> = pts.iter().cloned().filter(|p| p.1 > 0.0).collect();
        if pts.is_empty() {
            continue;
        }
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().cloned(), ShapeStyle::from(&color).stroke_width(2)))
            .map_err(perr)?
            .label(format!("lr {name}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        if pts.len() == 1 {
            chart.draw_series(std::iter::once(Circle::new(pts[0], 3, color.filled()))).map_err(perr)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(perr)?;
    Ok(())
}

/// Renders the three panels into an RGB buffer (`WIDTH·HEIGHT·3` bytes).
pub fn render_progress(history: &[HistoryRow], title: &str) -> Result<Vec<u8>> {
    register_embedded_font();
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        let root = if title.is_empty() { root } else { root.titled(title, (FONT, 22)).map_err(perr)? };
        let panels = root.split_evenly((3, 1));
        let x_max = history.iter().map(|r| r.epoch).max().unwrap_or(1).max(1) as f64;

        // (1) losses
        let mut loss_lines: Vec<(String, Vec<(f64, f64)>, bool)> = vec![
            ("train loss".into(), series(history, |r| r.train_loss), false),
            ("val loss".into(), series(history, |r| r.val_loss), false),
        ];
        let mut comps: Vec<String> = Vec::new();
        for r in history {
            for n in r.components.names() {
                if !comps.iter().any(|c| c == n) {
                    comps.push(n.to_string());
                }
            }
        }
        for c in &comps {
            loss_lines.push((format!("train {c}"), series(history, |r| r.components.get(c)), true));
        }
        line_panel(&panels[0], "loss", x_max, &loss_lines, true, None, SeriesLabelPosition::UpperRight)?;

        // (2) Dice
        let val_dice = series(history, |r| r.val_dice);
        let best = history.iter().rev().find(|r| r.is_best).and_then(|r| r.val_dice.map(|v| (r.epoch as f64, v)));
        let dice_lines: Vec<(String, Vec<(f64, f64)>, bool)> = vec![
            ("train Dice".into(), series(history, |r| r.train_dice), false),
            ("val Dice (pooled)".into(), val_dice.clone(), false),
            ("val Dice (per-image)".into(), series(history, |r| r.val_dice_img), false),
            ("val Dice EMA(0.9)".into(), ema(&val_dice, 0.9), true),
        ];
        line_panel(&panels[1], "Dice", x_max, &dice_lines, false, best, SeriesLabelPosition::LowerRight)?;

        // (3) LR per group
        let mut groups: Vec<String> = Vec::new();
        for r in history {
            for n in r.lr.names() {
                if !groups.iter().any(|g| g == n) {
                    groups.push(n.to_string());
                }
            }
        }
        let lr_lines: Vec<(String, Vec<(f64, f64)>)> =
            groups.iter().map(|g| (g.clone(), series(history, |r| r.lr.get(g)))).collect();
        lr_panel(&panels[2], x_max, &lr_lines)?;
        root.present().map_err(perr)?;
    }
    Ok(buf)
}

/// Writes `progress.png` atomically.
pub fn progress_png(path: &Path, history: &[HistoryRow], title: &str) -> Result<()> {
    let buf = render_progress(history, title)?;
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf)
        .ok_or_else(|| Error::msg("progress.png: buffer size mismatch"))?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png).map_err(|e| Error::file(path, format!("PNG encoding: {e}")))?;
    atomic_write(path, bytes.get_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_values() {
        let e = ema(&[(1.0, 1.0), (2.0, 0.0), (3.0, 1.0)], 0.9);
        assert_eq!(e[0].1, 1.0);
        assert!((e[1].1 - 0.9).abs() < 1e-15);
        assert!((e[2].1 - 0.91).abs() < 1e-15);
    }

    #[test]
    fn empty_history_renders() {
        let buf = render_progress(&[], "").unwrap();
        assert_eq!(buf.len(), (WIDTH * HEIGHT * 3) as usize);
    }
}
