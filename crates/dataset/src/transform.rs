//! Training and evaluation transforms for detection and classification items.

use image::RgbImage;
use rand::Rng;

use crate::imageops::{
    SrcRect, normalisation_factors, normalize_chw, resample, resample_planar_into, round_half_even,
};

/// An item after geometric transformation, before normalisation.
#[derive(Debug, Clone)]
pub struct TransformedItem {
    /// Interleaved RGB values in `0..=255`, `height * width * 3`.
    pub hwc: Vec<f32>,
    /// Output width.
    pub width: usize,
    /// Output height.
    pub height: usize,
    /// Boxes `[ymin, xmin, ymax, xmax]` in output pixels (maxima inclusive), clamped, small ones
    /// dropped.
    pub boxes: Vec<[f32; 4]>,
    /// Labels of the kept boxes.
    pub labels: Vec<u32>,
}

impl TransformedItem {
    /// Normalised planar `[3, H, W]` data.
    pub fn to_chw(&self) -> Vec<f32> {
        normalize_chw(&self.hwc, self.width, self.height)
    }

    /// The item as an 8-bit image (for looking at augmentations).
    pub fn to_rgb_image(&self) -> RgbImage {
        let raw = self
            .hwc
            .iter()
            .map(|v| v.round().clamp(0.0, 255.0) as u8)
            .collect();
        RgbImage::from_raw(self.width as u32, self.height as u32, raw).expect("buffer size")
    }
}

/// Detection item transform: the tutorial's training augmentation or evaluation resize.
///
/// Training: random horizontal flip (p = 0.5); random crop of area fraction `U(0.85, 1)` and
/// aspect `U(3/4, 4/3)` with the sides swapped with p = 0.5, 10 tries for a crop that fits, else
/// the centred square; resize to `(size, size)`. Evaluation: scale so the shorter side is `size`
/// unless that makes the longer side exceed `max_size` (1000), then centre crop `(size, size)`
/// (black padding where the scaled image is smaller).
///
/// Boxes follow each step exactly: a box `[ymin, xmin, ymax, xmax]` covers the pixels
/// `ymin..=ymax`, i.e. the continuous extent `[ymin, ymax + 1)`; that extent is flipped, cropped,
/// clamped and scaled, so a box painted on the image still bounds the painted pixels afterwards.
/// Boxes whose pixel area `(ymax - ymin + 1) * (xmax - xmin + 1)` is `<= boxarea_th` after
/// resizing are dropped, together with their labels; so are boxes whose extent is at most one
/// pixel high or wide (a crop edge grazing a wide object): as inclusive boxes they would have
/// `ymax <= ymin`, which the encoder refuses or turns into `ln(0)` regression targets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectionTransform {
    /// Output side `S` (items are `S x S`).
    pub size: u32,
    /// Boxes with area `<=` this (output pixels) are dropped.
    pub boxarea_th: f32,
    /// Training augmentation (`true`) or evaluation resize (`false`).
    pub train: bool,
    /// Evaluation only: the longest side after scaling (the tutorial's 1000).
    pub max_size: u32,
}

impl DetectionTransform {
    /// The training augmentation at output size `size`.
    pub fn train(size: u32, boxarea_th: f32) -> Self {
        DetectionTransform {
            size,
            boxarea_th,
            train: true,
            max_size: 1000,
        }
    }

    /// The evaluation transform at output size `size`.
    pub fn eval(size: u32, boxarea_th: f32) -> Self {
        DetectionTransform {
            size,
            boxarea_th,
            train: false,
            max_size: 1000,
        }
    }

    /// Applies the transform; `rng` drives the random choices (unused for evaluation). Returns
    /// unnormalised interleaved pixels (for inspection and tests); the loader uses
    /// [`DetectionTransform::apply_into`], which makes the same choices from the same RNG.
    pub fn apply<R: Rng + ?Sized>(
        &self,
        img: &RgbImage,
        boxes: &[[f32; 4]],
        labels: &[u32],
        rng: &mut R,
    ) -> TransformedItem {
        let (rect, flip, boxes, labels) = self.plan(img, boxes, labels, rng);
        let size = self.size as usize;
        TransformedItem {
            hwc: resample(img, rect, size, size, flip, self.train),
            width: size,
            height: size,
            boxes,
            labels,
        }
    }

    /// Applies the transform, writing the normalised `[3, S, S]` image into `out` (length
    /// `3 * S * S`) in one resampling pass; returns the kept boxes and labels.
    pub fn apply_into<R: Rng + ?Sized>(
        &self,
        img: &RgbImage,
        boxes: &[[f32; 4]],
        labels: &[u32],
        rng: &mut R,
        out: &mut [f32],
    ) -> (Vec<[f32; 4]>, Vec<u32>) {
        let (rect, flip, boxes, labels) = self.plan(img, boxes, labels, rng);
        let size = self.size as usize;
        let (scale, offset) = normalisation_factors();
        resample_planar_into(img, rect, size, size, flip, self.train, scale, offset, out);
        (boxes, labels)
    }

    /// The random choices and the box mapping: source rectangle, flip, kept boxes and labels.
    fn plan<R: Rng + ?Sized>(
        &self,
        img: &RgbImage,
        boxes: &[[f32; 4]],
        labels: &[u32],
        rng: &mut R,
    ) -> (SrcRect, bool, Vec<[f32; 4]>, Vec<u32>) {
        let (w, h) = (img.width() as f64, img.height() as f64);
        let size = self.size as usize;
        // Continuous extents [top, left, bottom, right), clamped to the image.
        let ext: Vec<[f64; 4]> = boxes
            .iter()
            .map(|b| {
                [
                    (b[0] as f64).clamp(0.0, h),
                    (b[1] as f64).clamp(0.0, w),
                    (b[2] as f64 + 1.0).clamp(0.0, h),
                    (b[3] as f64 + 1.0).clamp(0.0, w),
                ]
            })
            .collect();
        // Each case yields: the source rectangle, whether to flip, and the mapping of extents.
        let (rect, flip, mapped): (SrcRect, bool, Vec<[f64; 4]>) = if self.train {
            let flip = rng.random::<f64>() < 0.5;
            let (iw, ih) = (img.width() as i64, img.height() as i64);
            let mut crop = None;
            for _ in 0..10 {
                let area = (iw * ih) as f64;
                let target = rng.random_range(0.85..1.0) * area;
                let aspect = rng.random_range(0.75..4.0 / 3.0);
                let mut cw = round_half_even((target * aspect).sqrt()) as i64;
                let mut ch = round_half_even((target / aspect).sqrt()) as i64;
                if rng.random::<f64>() < 0.5 {
                    std::mem::swap(&mut cw, &mut ch);
                }
                if cw <= iw && ch <= ih && cw > 0 && ch > 0 {
                    let x = rng.random_range(0..=iw - cw);
                    let y = rng.random_range(0..=ih - ch);
                    crop = Some((x, y, cw, ch));
                    break;
                }
            }
            let (x, y, cw, ch) = crop.unwrap_or_else(|| {
                let s = iw.min(ih);
                ((iw - s) / 2, (ih - s) / 2, s, s)
            });
            // (x, y) is in the flipped image when flipping; find the rectangle in the original.
            let x0 = if flip { iw - x - cw } else { x } as f64;
            let rect = SrcRect {
                x0,
                y0: y as f64,
                x1: x0 + cw as f64,
                y1: (y + ch) as f64,
            };
            let (sx, sy) = (size as f64 / cw as f64, size as f64 / ch as f64);
            let (cw, ch) = (cw as f64, ch as f64);
            let mapped = ext
                .iter()
                .map(|e| {
                    let (l, r) = if flip {
                        (w - e[3], w - e[1])
                    } else {
                        (e[1], e[3])
                    };
                    [
                        (e[0] - y as f64).clamp(0.0, ch) * sy,
                        (l - x as f64).clamp(0.0, cw) * sx,
                        (e[2] - y as f64).clamp(0.0, ch) * sy,
                        (r - x as f64).clamp(0.0, cw) * sx,
                    ]
                })
                .collect();
            (rect, flip, mapped)
        } else {
            let smin = w.min(h);
            let smax = w.max(h);
            let mut s = size as f64 / smin;
            if s * smax > self.max_size as f64 {
                s = self.max_size as f64 / smax;
            }
            let ow = (w * s + 0.5).floor();
            let oh = (h * s + 0.5).floor();
            let (sx, sy) = (ow / w, oh / h);
            let j = round_half_even((ow - size as f64) / 2.0);
            let i = round_half_even((oh - size as f64) / 2.0);
            let rect = SrcRect {
                x0: j / sx,
                y0: i / sy,
                x1: (j + size as f64) / sx,
                y1: (i + size as f64) / sy,
            };
            let sz = size as f64;
            let mapped = ext
                .iter()
                .map(|e| {
                    [
                        (e[0] * sy - i).clamp(0.0, sz),
                        (e[1] * sx - j).clamp(0.0, sz),
                        (e[2] * sy - i).clamp(0.0, sz),
                        (e[3] * sx - j).clamp(0.0, sz),
                    ]
                })
                .collect();
            (rect, false, mapped)
        };
        let mut out_boxes = Vec::with_capacity(mapped.len());
        let mut out_labels = Vec::with_capacity(mapped.len());
        for (e, &l) in mapped.iter().zip(labels) {
            let (bh, bw) = (e[2] - e[0], e[3] - e[1]);
            if bh <= 1.0 || bw <= 1.0 || bh * bw <= self.boxarea_th as f64 {
                continue;
            }
            out_boxes.push([
                e[0] as f32,
                e[1] as f32,
                (e[2] - 1.0) as f32,
                (e[3] - 1.0) as f32,
            ]);
            out_labels.push(l);
        }
        (rect, flip, out_boxes, out_labels)
    }
}

/// Classification transform (torchvision-style, as the tutorial's pretraining).
///
/// Training: shorter side to `resize_shorter` (480), random horizontal flip, random-resized crop
/// to `(size, size)` with area scale `U(0.53, 1)` and log-uniform aspect in `[3/4, 4/3]` (10
/// tries, then the centre crop clamped to that aspect range), colour jitter (brightness,
/// contrast, saturation, hue; each 0.03, in random order). Evaluation: shorter side to `size`,
/// centre crop `(size, size)`. The resize and crop are one resampling from the decoded image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassificationTransform {
    /// Output side.
    pub size: u32,
    /// Training augmentation (`true`) or evaluation (`false`).
    pub train: bool,
    /// Training: the shorter side of the intermediate resize (tutorial: 480).
    pub resize_shorter: u32,
    /// Training: random-resized-crop area scale range.
    pub scale: (f64, f64),
    /// Training: colour jitter strength for brightness, contrast, saturation and hue.
    pub jitter: f32,
}

impl ClassificationTransform {
    /// The tutorial's training transform at output size `size`.
    pub fn train(size: u32) -> Self {
        ClassificationTransform {
            size,
            train: true,
            resize_shorter: 480,
            scale: (0.53, 1.0),
            jitter: 0.03,
        }
    }

    /// The tutorial's evaluation transform at output size `size`.
    pub fn eval(size: u32) -> Self {
        ClassificationTransform {
            size,
            train: false,
            resize_shorter: size,
            scale: (1.0, 1.0),
            jitter: 0.0,
        }
    }

    /// Applies the transform and returns interleaved RGB values in `0..=255` (`size*size*3`),
    /// for inspection; the loader uses [`ClassificationTransform::apply_into`].
    pub fn apply<R: Rng + ?Sized>(&self, img: &RgbImage, rng: &mut R) -> Vec<f32> {
        let n = (self.size * self.size) as usize;
        let mut planar = vec![0f32; 3 * n];
        self.raw_planar(img, rng, &mut planar);
        let mut out = vec![0f32; 3 * n];
        for (i, px) in out.chunks_exact_mut(3).enumerate() {
            px[0] = planar[i];
            px[1] = planar[n + i];
            px[2] = planar[2 * n + i];
        }
        out
    }

    /// Applies the transform, writing the normalised `[3, S, S]` image into `out`.
    pub fn apply_into<R: Rng + ?Sized>(&self, img: &RgbImage, rng: &mut R, out: &mut [f32]) {
        self.raw_planar(img, rng, out);
        let (scale, offset) = normalisation_factors();
        let n = out.len() / 3;
        for (c, plane) in out.chunks_exact_mut(n).enumerate() {
            plane
                .iter_mut()
                .for_each(|v| *v = *v * scale[c] + offset[c]);
        }
    }

    /// Planar `[3, S, S]` values in `0..=255`, jittered when training.
    fn raw_planar<R: Rng + ?Sized>(&self, img: &RgbImage, rng: &mut R, out: &mut [f32]) {
        let (w, h) = (img.width() as f64, img.height() as f64);
        let size = self.size as usize;
        let shorter = if self.train {
            self.resize_shorter
        } else {
            self.size
        } as f64;
        // torchvision's Resize(int): the longer side is truncated.
        let (rw, rh) = if w <= h {
            (shorter, (shorter * h / w).floor())
        } else {
            ((shorter * w / h).floor(), shorter)
        };
        let (sx, sy) = (w / rw, h / rh);
        let (flip, (x, y, cw, ch)) = if self.train {
            let flip = rng.random::<f64>() < 0.5;
            (flip, random_resized_crop(rw, rh, self.scale, rng))
        } else {
            let s = size as f64;
            let top = round_half_even((rh - s) / 2.0);
            let left = round_half_even((rw - s) / 2.0);
            (false, (left, top, s, s))
        };
        // A crop chosen on the flipped image is the mirrored rectangle of the original.
        let x = if flip { rw - x - cw } else { x };
        let rect = SrcRect {
            x0: x * sx,
            y0: y * sy,
            x1: (x + cw) * sx,
            y1: (y + ch) * sy,
        };
        resample_planar_into(
            img, rect, size, size, flip, self.train, [1.0; 3], [0.0; 3], out,
        );
        if self.train && self.jitter > 0.0 {
            color_jitter(out, self.jitter, rng);
        }
    }
}

/// torchvision's `RandomResizedCrop.get_params` on a `w x h` image: `(x, y, cw, ch)`.
fn random_resized_crop<R: Rng + ?Sized>(
    w: f64,
    h: f64,
    scale: (f64, f64),
    rng: &mut R,
) -> (f64, f64, f64, f64) {
    let area = w * h;
    let (lr0, lr1) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area
            * if scale.1 > scale.0 {
                rng.random_range(scale.0..scale.1)
            } else {
                scale.0
            };
        let aspect = rng.random_range(lr0..lr1).exp();
        let cw = round_half_even((target * aspect).sqrt());
        let ch = round_half_even((target / aspect).sqrt());
        if cw > 0.0 && ch > 0.0 && cw <= w && ch <= h {
            let y = rng.random_range(0..=(h - ch) as i64) as f64;
            let x = rng.random_range(0..=(w - cw) as i64) as f64;
            return (x, y, cw, ch);
        }
    }
    let ratio = w / h;
    let (cw, ch) = if ratio < 0.75 {
        (w, round_half_even(w / 0.75))
    } else if ratio > 4.0 / 3.0 {
        (round_half_even(h * 4.0 / 3.0), h)
    } else {
        (w, h)
    };
    ((w - cw) / 2.0, (h - ch) / 2.0, cw, ch)
}

fn grey(r: f32, g: f32, b: f32) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
}

/// Brightness, contrast, saturation and hue jitter of strength `s` in random order on planar
/// `[3, H, W]` values in `0..=255` (clamped after each step).
pub(crate) fn color_jitter<R: Rng + ?Sized>(planar: &mut [f32], s: f32, rng: &mut R) {
    let mut order = [0usize, 1, 2, 3];
    // Fisher-Yates with our own RNG so the order is seeded too.
    for i in (1..4).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    let f: [f32; 4] = std::array::from_fn(|k| {
        if k == 3 {
            rng.random_range(-s..s)
        } else {
            rng.random_range(1.0 - s..1.0 + s)
        }
    });
    let n = planar.len() / 3;
    let (r, rest) = planar.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for op in order {
        match op {
            0 => {
                for p in [&mut *r, &mut *g, &mut *b] {
                    p.iter_mut()
                        .for_each(|v| *v = (*v * f[0]).clamp(0.0, 255.0));
                }
            }
            1 => {
                let mean = (0..n).map(|i| grey(r[i], g[i], b[i])).sum::<f32>() / n.max(1) as f32;
                for p in [&mut *r, &mut *g, &mut *b] {
                    p.iter_mut()
                        .for_each(|v| *v = (*v * f[1] + mean * (1.0 - f[1])).clamp(0.0, 255.0));
                }
            }
            2 => {
                for i in 0..n {
                    let gr = grey(r[i], g[i], b[i]);
                    r[i] = (r[i] * f[2] + gr * (1.0 - f[2])).clamp(0.0, 255.0);
                    g[i] = (g[i] * f[2] + gr * (1.0 - f[2])).clamp(0.0, 255.0);
                    b[i] = (b[i] * f[2] + gr * (1.0 - f[2])).clamp(0.0, 255.0);
                }
            }
            _ => {
                for i in 0..n {
                    let (hh, ss, vv) = rgb_to_hsv(r[i], g[i], b[i]);
                    let hh = (hh + f[3]).rem_euclid(1.0);
                    (r[i], g[i], b[i]) = hsv_to_rgb(hh, ss, vv);
                }
            }
        }
    }
}

fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let s = if max > 0.0 { d / max } else { 0.0 };
    let h = if d <= 0.0 {
        0.0
    } else if max == r {
        ((g - b) / d).rem_euclid(6.0) / 6.0
    } else if max == g {
        ((b - r) / d + 2.0) / 6.0
    } else {
        ((r - g) / d + 4.0) / 6.0
    };
    (h, s, max)
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let p = v * (1.0 - s);
    let q = v * (1.0 - s * f);
    let t = v * (1.0 - s * (1.0 - f));
    match (i as i32).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsv_round_trip() {
        for &(r, g, b) in &[
            (10.0, 200.0, 30.0),
            (255.0, 0.0, 0.0),
            (40.0, 40.0, 40.0),
            (12.0, 50.0, 240.0),
        ] {
            let (h, s, v) = rgb_to_hsv(r, g, b);
            let (r2, g2, b2) = hsv_to_rgb(h, s, v);
            assert!((r - r2).abs() < 1e-3 && (g - g2).abs() < 1e-3 && (b - b2).abs() < 1e-3);
        }
    }
}
