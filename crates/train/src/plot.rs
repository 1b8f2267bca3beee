//! Line charts as PNG (loss and mAP curves), drawn with the dataset crate's built-in bitmap font:
//! no system font, no plotting dependency.

use std::path::Path;

use anyhow::Result;
use image::{Rgb, RgbImage};
use retinanet_dataset::draw::{class_color, draw_text, save_png, text_size};

/// One curve: a name for the legend and its `(x, y)` points.
pub struct Series<'a> {
    /// Legend entry.
    pub name: &'a str,
    /// Points in x order.
    pub points: &'a [(f64, f64)],
}

const W: u32 = 720;
const H: u32 = 420;
const L: i64 = 70; // left margin (y tick labels)
const R: i64 = 20;
const T: i64 = 40;
const B: i64 = 50;

fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    // Bresenham; two pixels thick for legibility.
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        for (ox, oy) in [(0, 0), (0, 1)] {
            let (px, py) = (x + ox, y + oy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, c);
            }
        }
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 {
        format!("{:.0}", v)
    } else if v.abs() >= 10.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.3}", v)
    }
}

/// Draws `series` into a `720x420` PNG at `path`. `y_max` fixes the top of the axis (e.g. 1
/// for mAP); otherwise it follows the data, ignoring the top 2% of values so a first-step
/// spike does not flatten the curve.
pub fn plot_lines(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[Series],
    y_max: Option<f64>,
) -> Result<()> {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let black = Rgb([30, 30, 30]);
    let grey = Rgb([225, 225, 225]);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let (x0, x1) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let (x0, x1) = if pts.is_empty() {
        (0.0, 1.0)
    } else if x1 > x0 {
        (x0, x1)
    } else {
        (x0 - 0.5, x0 + 0.5)
    };
    let y1 = y_max.unwrap_or_else(|| {
        let mut ys: Vec<f64> = pts.iter().map(|p| p.1).collect();
        ys.sort_by(f64::total_cmp);
        ys.get(((ys.len() as f64 * 0.98) as usize).min(ys.len().saturating_sub(1)))
            .copied()
            .unwrap_or(1.0)
            .max(1e-9)
            * 1.05
    });
    let y0 = pts.iter().map(|p| p.1).fold(0.0f64, f64::min);
    let (pw, ph) = ((W as i64 - L - R) as f64, (H as i64 - T - B) as f64);
    let to_px = |x: f64, y: f64| -> (i64, i64) {
        let px = L as f64 + (x - x0) / (x1 - x0) * pw;
        let py = T as f64 + (1.0 - (y.clamp(y0, y1) - y0) / (y1 - y0)) * ph;
        (px.round() as i64, py.round() as i64)
    };
    // Grid and tick labels.
    for k in 0..=5 {
        let yv = y0 + (y1 - y0) * k as f64 / 5.0;
        let (_, py) = to_px(x0, yv);
        line(&mut img, (L, py), (W as i64 - R, py), grey);
        let s = fmt_tick(yv);
        let (tw, th) = text_size(&s, 1);
        draw_text(
            &mut img,
            L - 6 - tw as i64,
            py - th as i64 / 2,
            &s,
            1,
            black,
        );
        let xv = x0 + (x1 - x0) * k as f64 / 5.0;
        let (px, _) = to_px(xv, y0);
        let s = fmt_tick(xv);
        let (tw, _) = text_size(&s, 1);
        draw_text(&mut img, px - tw as i64 / 2, H as i64 - B + 8, &s, 1, black);
    }
    line(&mut img, (L, T), (L, H as i64 - B), black);
    line(
        &mut img,
        (L, H as i64 - B),
        (W as i64 - R, H as i64 - B),
        black,
    );
    let (tw, _) = text_size(title, 2);
    draw_text(&mut img, (W as i64 - tw as i64) / 2, 10, title, 2, black);
    let (tw, _) = text_size(x_label, 1);
    draw_text(
        &mut img,
        L + (pw as i64 - tw as i64) / 2,
        H as i64 - 20,
        x_label,
        1,
        black,
    );
    // Curves and legend.
    for (i, s) in series.iter().enumerate() {
        let c = class_color(i as u32 + 1);
        let mut prev: Option<(i64, i64)> = None;
        for &(x, y) in s
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
        {
            let p = to_px(x, y);
            if let Some(q) = prev {
                line(&mut img, q, p, c);
            } else if s.points.len() == 1 {
                line(&mut img, (p.0 - 2, p.1), (p.0 + 2, p.1), c);
            }
            prev = Some(p);
        }
        let ly = T + 6 + 14 * i as i64;
        line(
            &mut img,
            (W as i64 - R - 150, ly + 3),
            (W as i64 - R - 130, ly + 3),
            c,
        );
        draw_text(&mut img, W as i64 - R - 124, ly, s.name, 1, black);
    }
    save_png(&img, path)?;
    Ok(())
}

/// Exponential moving average of `points` (for a readable loss curve next to the raw one).
pub fn smooth(points: &[(f64, f64)], alpha: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len());
    let mut acc: Option<f64> = None;
    for &(x, y) in points {
        let v = match acc {
            Some(a) => a + alpha * (y - a),
            None => y,
        };
        acc = Some(v);
        out.push((x, v));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_curves_into_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.png");
        let pts: Vec<(f64, f64)> = (0..100)
            .map(|i| (i as f64, 2.0 / (1.0 + i as f64 * 0.1)))
            .collect();
        let sm = smooth(&pts, 0.1);
        plot_lines(
            &p,
            "loss",
            "step",
            &[
                Series {
                    name: "loss",
                    points: &pts,
                },
                Series {
                    name: "ema",
                    points: &sm,
                },
            ],
            None,
        )
        .unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (W, H));
        // The first curve's colour is on the canvas.
        let c = class_color(1);
        assert!(img.pixels().filter(|&&px| px == c).count() > 100);
        assert!((smooth(&[(0.0, 1.0), (1.0, 3.0)], 0.5)[1].1 - 2.0).abs() < 1e-12);
    }
}
