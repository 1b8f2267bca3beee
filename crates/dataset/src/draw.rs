//! Drawing detections (boxes, class names, scores) on an image, with an embedded 5x7 bitmap
//! font so no system font is needed.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{DatasetError, Result, io_err};

/// Rows of a 5x7 glyph, bit 4 = leftmost column. Lower-case letters use the capitals.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        ' ' => [0; 7],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '!' => [0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04],
        '"' => [0x0A, 0x0A, 0x00, 0x00, 0x00, 0x00, 0x00],
        '#' => [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '&' => [0x0C, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0D],
        '\'' => [0x04, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '*' => [0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        ';' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x04, 0x08],
        '<' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        '?' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04],
        '@' => [0x0E, 0x11, 0x01, 0x0D, 0x15, 0x15, 0x0E],
        '[' => [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E],
        ']' => [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        // Anything else: a hollow box, visibly "unknown".
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

/// Glyph cell: 5 columns + 1 spacing, 7 rows.
const CELL_W: u32 = 6;
const CELL_H: u32 = 7;

/// Width and height in pixels of `text` drawn at `scale`.
pub fn text_size(text: &str, scale: u32) -> (u32, u32) {
    let n = text.chars().count() as u32;
    ((n * CELL_W).saturating_sub(1) * scale, CELL_H * scale)
}

fn put(img: &mut RgbImage, x: i64, y: i64, color: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, color);
    }
}

fn fill_rect(img: &mut RgbImage, x0: i64, y0: i64, x1: i64, y1: i64, color: Rgb<u8>) {
    let x0 = x0.max(0);
    let y0 = y0.max(0);
    let x1 = x1.min(img.width() as i64 - 1);
    let y1 = y1.min(img.height() as i64 - 1);
    for y in y0..=y1 {
        for x in x0..=x1 {
            img.put_pixel(x as u32, y as u32, color);
        }
    }
}

/// Draws `text` with its top-left corner at `(x, y)`, each font pixel a `scale x scale` square.
/// Pixels outside the image are skipped.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: u32, color: Rgb<u8>) {
    let s = scale.max(1) as i64;
    for (k, c) in text.chars().enumerate() {
        let g = glyph(c);
        let gx = x + k as i64 * CELL_W as i64 * s;
        for (row, bits) in g.iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) != 0 {
                    for dy in 0..s {
                        for dx in 0..s {
                            put(img, gx + col * s + dx, y + row as i64 * s + dy, color);
                        }
                    }
                }
            }
        }
    }
}

/// A distinct, saturated colour for label `label`.
pub fn class_color(label: u32) -> Rgb<u8> {
    const PALETTE: [[u8; 3]; 10] = [
        [230, 25, 75],
        [60, 180, 75],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [255, 225, 25],
        [0, 128, 128],
    ];
    Rgb(PALETTE[label as usize % PALETTE.len()])
}

/// Draws each box `[ymin, xmin, ymax, xmax]` (pixels, maxima inclusive) with its class name
/// (`class_names[label - 1]`; `class <n>` when out of range) and, when given, its score.
/// The text sits on a filled tag in the box's colour above the box (inside when there is no
/// room), in black or white for contrast. Boxes partly outside the image are clipped.
pub fn draw_detections(
    img: &mut RgbImage,
    boxes: &[[f32; 4]],
    labels: &[u32],
    scores: Option<&[f32]>,
    class_names: &[String],
) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let scale = if w.min(h) >= 400 { 2 } else { 1 };
    let thick = scale as i64;
    for (i, (b, &l)) in boxes.iter().zip(labels).enumerate() {
        if b.iter().any(|v| !v.is_finite()) {
            continue;
        }
        let color = class_color(l);
        let (y0, x0, y1, x1) = (
            b[0].round() as i64,
            b[1].round() as i64,
            b[2].round() as i64,
            b[3].round() as i64,
        );
        for t in 0..thick {
            fill_rect(img, x0, y0 + t, x1, y0 + t, color);
            fill_rect(img, x0, y1 - t, x1, y1 - t, color);
            fill_rect(img, x0 + t, y0, x0 + t, y1, color);
            fill_rect(img, x1 - t, y0, x1 - t, y1, color);
        }
        let name = l
            .checked_sub(1)
            .and_then(|k| class_names.get(k as usize))
            .cloned()
            .unwrap_or_else(|| format!("class {l}"));
        let text = match scores.and_then(|s| s.get(i)) {
            Some(s) => format!("{name} {s:.2}"),
            None => name,
        };
        let (tw, th) = text_size(&text, scale);
        let pad = scale as i64;
        let tag_h = th as i64 + 2 * pad;
        let ty = if y0 - tag_h >= 0 {
            y0 - tag_h
        } else {
            y0.max(0)
        };
        let tx = x0.clamp(0, (w - tw as i64 - 2 * pad).max(0));
        fill_rect(
            img,
            tx,
            ty,
            tx + tw as i64 + 2 * pad - 1,
            ty + tag_h - 1,
            color,
        );
        let lum = 0.299 * color.0[0] as f32 + 0.587 * color.0[1] as f32 + 0.114 * color.0[2] as f32;
        let fg = if lum > 140.0 {
            Rgb([0, 0, 0])
        } else {
            Rgb([255, 255, 255])
        };
        draw_text(img, tx + pad, ty + pad, &text, scale, fg);
    }
    let _ = h;
}

/// Saves an image as PNG (folders created as needed).
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| DatasetError::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_drawn_in_its_cell() {
        let mut img = RgbImage::new(40, 10);
        draw_text(&mut img, 1, 1, "HI", 1, Rgb([255, 255, 255]));
        // 'H' has its left column fully set, rows 0..7.
        for y in 1..8 {
            assert_eq!(img.get_pixel(1, y).0, [255, 255, 255]);
        }
        // Nothing beyond the two cells.
        for x in 13..40 {
            for y in 0..10 {
                assert_eq!(img.get_pixel(x, y).0, [0, 0, 0]);
            }
        }
        assert_eq!(text_size("HI", 1), (11, 7));
    }

    #[test]
    fn box_outline_and_tag() {
        let mut img = RgbImage::new(100, 100);
        draw_detections(
            &mut img,
            &[[40.0, 20.0, 80.0, 70.0]],
            &[1],
            Some(&[0.9]),
            &["cat".into()],
        );
        let c = class_color(1);
        assert_eq!(*img.get_pixel(20, 60), c); // left edge
        assert_eq!(*img.get_pixel(70, 60), c); // right edge
        assert_eq!(*img.get_pixel(45, 80), c); // bottom edge
        assert_eq!(img.get_pixel(45, 60).0, [0, 0, 0]); // inside untouched
        assert_eq!(*img.get_pixel(20, 39), c); // the tag above the box
    }
}
