//! Training and evaluation transforms for detection and classification items.

use image::RgbImage;
use rand::Rng;

use crate::imageops::{
    SrcRect, normalisation_factors, normalize_chw, resample_planar_into, resample_planar_into_with,
    round_half_even,
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

/// Training-time augmentation of detection items beyond the crop's geometry. `Default` is the
/// tutorial's: horizontal flip with p = 0.5, crop of area `U(0.85, 1)` and aspect `U(3/4, 4/3)`,
/// nothing else.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// Probability of a horizontal flip (tutorial: 0.5).
    pub hflip: f64,
    /// Probability of a vertical flip (natural for aerial and microscopy images; 0).
    pub vflip: f64,
    /// Turn the item by a random multiple of 90 degrees (after the resize, so the output stays
    /// `S x S`; false).
    pub rot90: bool,
    /// Range of the crop's area as a fraction of the image (tutorial: 0.85 to 1). Smaller
    /// crops zoom in: at output size `S`, objects grow by about `1 / sqrt(area)`.
    pub crop_area: (f64, f64),
    /// Range of the crop's aspect ratio (tutorial: 3/4 to 4/3), sides swapped with p = 0.5.
    pub crop_aspect: (f64, f64),
    /// Brightness jitter: factor `U(max(0, 1 - b), 1 + b)` (torchvision's `ColorJitter`; 0).
    pub brightness: f32,
    /// Contrast jitter: blend with the mean grey, factor `U(max(0, 1 - c), 1 + c)` (0).
    pub contrast: f32,
    /// Saturation jitter: blend with the pixel's grey, factor `U(max(0, 1 - s), 1 + s)` (0).
    pub saturation: f32,
    /// Hue jitter: shift `U(-h, h)` of a turn, `h <= 0.5` (0).
    pub hue: f32,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            hflip: 0.5,
            vflip: 0.0,
            rot90: false,
            crop_area: (0.85, 1.0),
            crop_aspect: (0.75, 4.0 / 3.0),
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
            hue: 0.0,
        }
    }
}

impl Augment {
    fn jitters(&self) -> bool {
        [self.brightness, self.contrast, self.saturation, self.hue]
            .iter()
            .any(|&v| v > 0.0)
    }
}

/// The boxes of one item without its pixels ([`DetectionTransform::map_boxes`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MappedBoxes {
    /// The kept boxes, in the item's pixels.
    pub boxes: Vec<[f32; 4]>,
    /// Their labels.
    pub labels: Vec<u32>,
    /// Per box: whether the crop cut part of the object away.
    pub cut: Vec<bool>,
    /// `(height, width)` of the item.
    pub size: (usize, usize),
}

/// How an evaluation item is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalResize {
    /// The tutorial's: shorter side to `size` (longer side capped), centre crop `size x size`.
    CenterCrop,
    /// The whole image, shorter side to `size` unless the longer side would exceed `max_size`:
    /// no crop, so no object is cut off (as VOC and COCO evaluate).
    Whole,
    /// torchvision's `GeneralizedRCNNTransform` resize: the whole image scaled by
    /// `min(size / shorter, max_size / longer)`, each side `floor(side * scale)`, bilinear
    /// interpolation without antialiasing.
    Torchvision,
}

/// Detection item transform: the tutorial's training augmentation or evaluation resize.
///
/// Training: random horizontal flip (p = 0.5); random crop of area fraction `U(0.85, 1)` and
/// aspect `U(3/4, 4/3)` with the sides swapped with p = 0.5, 10 tries for a crop that fits, else
/// the centred square; resize to `(size, size)`; then, as [`Augment`] asks (none by default), a
/// vertical flip, a turn by a multiple of 90 degrees and colour jitter. Evaluation
/// ([`EvalResize::CenterCrop`]): scale so the shorter side is `size` unless that makes the longer
/// side exceed `max_size` (1000), then centre crop `(size, size)` (black padding where the
/// scaled image is smaller); [`EvalResize::Whole`]: the same scale, no crop, the item as large
/// as the scaled image.
///
/// Boxes follow each step exactly: a box `[ymin, xmin, ymax, xmax]` covers the pixels
/// `ymin..=ymax`, i.e. the continuous extent `[ymin, ymax + 1)`; that extent is flipped, cropped,
/// clamped, scaled and turned, so a box painted on the image still bounds the painted pixels
/// afterwards. Boxes whose pixel area `(ymax - ymin + 1) * (xmax - xmin + 1)` is
/// `<= boxarea_th` after resizing are dropped, together with their labels; so are boxes whose
/// extent is at most one pixel high or wide (a crop edge grazing a wide object): as inclusive
/// boxes they would have `ymax <= ymin`, which the encoder refuses or turns into `ln(0)`
/// regression targets.
///
/// Every random choice comes from the item's RNG, in a fixed order (flip, crop, then the
/// [`Augment`] extras that are switched on), so the tutorial's choices are unchanged by extras
/// that are off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectionTransform {
    /// Output side `S` (items are `S x S`; for [`EvalResize::Whole`] the shorter side).
    pub size: u32,
    /// Boxes with area `<=` this (output pixels) are dropped.
    pub boxarea_th: f32,
    /// Training augmentation (`true`) or evaluation resize (`false`).
    pub train: bool,
    /// Evaluation only: the longest side after scaling (the tutorial's 1000).
    pub max_size: u32,
    /// Training only: the augmentation.
    pub augment: Augment,
    /// Evaluation only: crop or whole image.
    pub eval_resize: EvalResize,
}

/// Colour jitter drawn for one item: the order of the four operations and their factors (`None`:
/// off).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Jitter {
    order: [usize; 4],
    f: [Option<f32>; 4],
}

/// What a transform does to one item: where it reads, how it moves the pixels, the boxes.
struct Plan {
    rect: SrcRect,
    flip: bool,
    out_w: usize,
    out_h: usize,
    /// Vertical flip of the output.
    vflip: bool,
    /// Clockwise quarter turns of the output.
    turns: u8,
    jitter: Option<Jitter>,
    boxes: Vec<[f32; 4]>,
    labels: Vec<u32>,
    /// Per kept box: whether the crop cut part of it away.
    cut: Vec<bool>,
}

impl DetectionTransform {
    /// The training augmentation at output size `size`.
    pub fn train(size: u32, boxarea_th: f32) -> Self {
        DetectionTransform {
            size,
            boxarea_th,
            train: true,
            max_size: 1000,
            augment: Augment::default(),
            eval_resize: EvalResize::CenterCrop,
        }
    }

    /// The tutorial's evaluation transform (centre crop) at output size `size`.
    pub fn eval(size: u32, boxarea_th: f32) -> Self {
        DetectionTransform {
            train: false,
            ..Self::train(size, boxarea_th)
        }
    }

    /// torchvision's detection resize of the whole image ([`EvalResize::Torchvision`]).
    pub fn torchvision(size: u32, max_size: u32, boxarea_th: f32) -> Self {
        DetectionTransform {
            max_size,
            eval_resize: EvalResize::Torchvision,
            ..Self::eval(size, boxarea_th)
        }
    }

    /// Whole-image evaluation: shorter side to `size`, longer side at most `max_size`.
    pub fn whole(size: u32, max_size: u32, boxarea_th: f32) -> Self {
        DetectionTransform {
            max_size,
            eval_resize: EvalResize::Whole,
            ..Self::eval(size, boxarea_th)
        }
    }

    /// The same transform at another output size (multi-scale training sets it per batch).
    pub fn at_size(mut self, size: u32) -> Self {
        self.size = size;
        self
    }

    /// Whether items of images of different sizes differ in size (whole-image evaluation).
    pub fn item_size_varies(&self) -> bool {
        !self.train && self.eval_resize != EvalResize::CenterCrop
    }

    /// The eval scale of a `w x h` image: shorter side to `size`, longer at most `max_size`.
    fn eval_scale(&self, w: f64, h: f64) -> f64 {
        let s = self.size as f64 / w.min(h);
        if s * w.max(h) > self.max_size as f64 {
            self.max_size as f64 / w.max(h)
        } else {
            s
        }
    }

    /// `(height, width)` of the item made from a `width x height` image.
    pub fn output_size(&self, width: u32, height: u32) -> (usize, usize) {
        if self.item_size_varies() && self.eval_resize == EvalResize::Torchvision {
            // As torchvision: the scale in double precision, sides floored.
            let (w, h) = (width as f64, height as f64);
            let s = (self.size as f64 / w.min(h)).min(self.max_size as f64 / w.max(h));
            (
                ((h * s).floor() as usize).max(1),
                ((w * s).floor() as usize).max(1),
            )
        } else if self.item_size_varies() {
            let (w, h) = (width as f64, height as f64);
            let s = self.eval_scale(w, h);
            (
                ((h * s + 0.5).floor() as usize).max(1),
                ((w * s + 0.5).floor() as usize).max(1),
            )
        } else {
            (self.size as usize, self.size as usize)
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
        let p = self.plan(img.width(), img.height(), boxes, labels, rng);
        let n = p.out_w * p.out_h;
        let mut planar = vec![0f32; 3 * n];
        self.pixels_into(img, &p, [1.0; 3], [0.0; 3], &mut planar);
        let mut hwc = vec![0f32; 3 * n];
        for (i, px) in hwc.chunks_exact_mut(3).enumerate() {
            px[0] = planar[i];
            px[1] = planar[n + i];
            px[2] = planar[2 * n + i];
        }
        TransformedItem {
            hwc,
            width: p.out_w,
            height: p.out_h,
            boxes: p.boxes,
            labels: p.labels,
        }
    }

    /// Applies the transform, writing the normalised `[3, H, W]` image into `out` (length
    /// `3 * H * W`, `(H, W)` = [`DetectionTransform::output_size`]); returns the kept boxes
    /// and labels.
    pub fn apply_into<R: Rng + ?Sized>(
        &self,
        img: &RgbImage,
        boxes: &[[f32; 4]],
        labels: &[u32],
        rng: &mut R,
        out: &mut [f32],
    ) -> (Vec<[f32; 4]>, Vec<u32>) {
        let p = self.plan(img.width(), img.height(), boxes, labels, rng);
        let (scale, offset) = normalisation_factors();
        if p.jitter.is_none() {
            // Resampling and normalisation in one pass (turns and flips only move values).
            self.pixels_into(img, &p, scale, offset, out);
        } else {
            self.pixels_into(img, &p, [1.0; 3], [0.0; 3], out);
            let n = out.len() / 3;
            for (c, plane) in out.chunks_exact_mut(n).enumerate() {
                plane
                    .iter_mut()
                    .for_each(|v| *v = *v * scale[c] + offset[c]);
            }
        }
        (p.boxes, p.labels)
    }

    /// The boxes an item of a `width x height` image gets, with the same random choices as
    /// [`DetectionTransform::apply`] from the same RNG, without touching pixels (for the
    /// anchor check).
    pub fn map_boxes<R: Rng + ?Sized>(
        &self,
        width: u32,
        height: u32,
        boxes: &[[f32; 4]],
        labels: &[u32],
        rng: &mut R,
    ) -> MappedBoxes {
        let p = self.plan(width, height, boxes, labels, rng);
        MappedBoxes {
            boxes: p.boxes,
            labels: p.labels,
            cut: p.cut,
            size: (p.out_h, p.out_w),
        }
    }

    /// Resamples, then moves and jitters the values as planned, into planar `out`.
    fn pixels_into(
        &self,
        img: &RgbImage,
        p: &Plan,
        scale: [f32; 3],
        offset: [f32; 3],
        out: &mut [f32],
    ) {
        resample_planar_into_with(
            img,
            p.rect,
            p.out_w,
            p.out_h,
            p.flip,
            self.train,
            scale,
            offset,
            out,
            self.eval_resize != EvalResize::Torchvision || self.train,
        );
        if p.vflip || p.turns > 0 {
            // Training items are square: flips and turns keep the size.
            turn_planes(out, p.out_w, p.vflip, p.turns);
        }
        if let Some(j) = &p.jitter {
            apply_jitter(out, j);
        }
    }

    /// The random choices and the box mapping.
    fn plan<R: Rng + ?Sized>(
        &self,
        width: u32,
        height: u32,
        boxes: &[[f32; 4]],
        labels: &[u32],
        rng: &mut R,
    ) -> Plan {
        let (w, h) = (width as f64, height as f64);
        let size = self.size as usize;
        let aug = &self.augment;
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
        let (mut vflip, mut turns, mut jitter) = (false, 0u8, None);
        // Each case yields: the source rectangle, whether to flip, the output size and the
        // mapping of extents.
        // Each mapped extent comes with whether the crop cut it.
        type Mapped = Vec<([f64; 4], bool)>;
        let (rect, flip, out_w, out_h, mut mapped): (SrcRect, bool, usize, usize, Mapped) =
            if self.train {
                let flip = rng.random::<f64>() < aug.hflip;
                let (iw, ih) = (width as i64, height as i64);
                let range = |rng: &mut R, (lo, hi): (f64, f64)| {
                    if hi > lo {
                        rng.random_range(lo..hi)
                    } else {
                        lo
                    }
                };
                let mut crop = None;
                for _ in 0..10 {
                    let area = (iw * ih) as f64;
                    let target = range(rng, aug.crop_area) * area;
                    let aspect = range(rng, aug.crop_aspect);
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
                        let (t, b, l, r) =
                            (e[0] - y as f64, e[2] - y as f64, l - x as f64, r - x as f64);
                        let cut = t < 0.0 || l < 0.0 || b > ch || r > cw;
                        (
                            [
                                t.clamp(0.0, ch) * sy,
                                l.clamp(0.0, cw) * sx,
                                b.clamp(0.0, ch) * sy,
                                r.clamp(0.0, cw) * sx,
                            ],
                            cut,
                        )
                    })
                    .collect();
                // The extras draw after the tutorial's choices, and only when on.
                if aug.vflip > 0.0 {
                    vflip = rng.random::<f64>() < aug.vflip;
                }
                if aug.rot90 {
                    turns = rng.random_range(0..4u8);
                }
                if aug.jitters() {
                    jitter = Some(draw_jitter(
                        [aug.brightness, aug.contrast, aug.saturation, aug.hue],
                        rng,
                    ));
                }
                (rect, flip, size, size, mapped)
            } else if self.eval_resize != EvalResize::CenterCrop {
                let (oh, ow) = self.output_size(width, height);
                let (sx, sy) = (ow as f64 / w, oh as f64 / h);
                let rect = SrcRect {
                    x0: 0.0,
                    y0: 0.0,
                    x1: w,
                    y1: h,
                };
                let (fh, fw) = (oh as f64, ow as f64);
                let mapped = ext
                    .iter()
                    .map(|e| {
                        (
                            [
                                (e[0] * sy).clamp(0.0, fh),
                                (e[1] * sx).clamp(0.0, fw),
                                (e[2] * sy).clamp(0.0, fh),
                                (e[3] * sx).clamp(0.0, fw),
                            ],
                            false,
                        )
                    })
                    .collect();
                (rect, false, ow, oh, mapped)
            } else {
                let s = self.eval_scale(w, h);
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
                        let m = [e[0] * sy - i, e[1] * sx - j, e[2] * sy - i, e[3] * sx - j];
                        let cut = m[0] < 0.0 || m[1] < 0.0 || m[2] > sz || m[3] > sz;
                        (m.map(|v| v.clamp(0.0, sz)), cut)
                    })
                    .collect();
                (rect, false, size, size, mapped)
            };
        if vflip || turns > 0 {
            let s = size as f64;
            for (e, _) in &mut mapped {
                if vflip {
                    *e = [s - e[2], e[1], s - e[0], e[3]];
                }
                for _ in 0..turns {
                    // Clockwise: pixel (y, x) goes to (x, S - 1 - y).
                    *e = [e[1], s - e[2], e[3], s - e[0]];
                }
            }
        }
        let mut out_boxes = Vec::with_capacity(mapped.len());
        let mut out_labels = Vec::with_capacity(mapped.len());
        let mut out_cut = Vec::with_capacity(mapped.len());
        for ((e, cut), &l) in mapped.iter().zip(labels) {
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
            out_cut.push(*cut);
        }
        Plan {
            rect,
            flip,
            out_w,
            out_h,
            vflip,
            turns,
            jitter,
            boxes: out_boxes,
            labels: out_labels,
            cut: out_cut,
        }
    }
}

/// Flips (vertically) then turns (clockwise, `turns` quarter turns) each `s x s` plane of
/// planar `data`.
fn turn_planes(data: &mut [f32], s: usize, vflip: bool, turns: u8) {
    let n = s * s;
    let mut tmp = vec![0f32; n];
    for plane in data.chunks_exact_mut(n) {
        if vflip {
            for y in 0..s / 2 {
                let (a, b) = plane.split_at_mut((s - 1 - y) * s);
                a[y * s..(y + 1) * s].swap_with_slice(&mut b[..s]);
            }
        }
        if turns.is_multiple_of(4) {
            continue;
        }
        tmp.copy_from_slice(plane);
        for y in 0..s {
            for x in 0..s {
                // The source of output (y, x) after `turns` clockwise quarter turns.
                let (sy, sx) = match turns % 4 {
                    1 => (s - 1 - x, y),
                    2 => (s - 1 - y, s - 1 - x),
                    _ => (x, s - 1 - y),
                };
                plane[y * s + x] = tmp[sy * s + sx];
            }
        }
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
    let j = draw_jitter([s; 4], rng);
    apply_jitter(planar, &j);
}

/// Draws a jitter of strengths `[brightness, contrast, saturation, hue]` (torchvision's
/// `ColorJitter`): the order, then a factor for every operation that is on.
pub(crate) fn draw_jitter<R: Rng + ?Sized>(s: [f32; 4], rng: &mut R) -> Jitter {
    let mut order = [0usize, 1, 2, 3];
    // Fisher-Yates with our own RNG so the order is seeded too.
    for i in (1..4).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    let f: [Option<f32>; 4] = std::array::from_fn(|k| {
        (s[k] > 0.0).then(|| {
            if k == 3 {
                rng.random_range(-s[k]..s[k])
            } else {
                rng.random_range((1.0 - s[k]).max(0.0)..1.0 + s[k])
            }
        })
    });
    Jitter { order, f }
}

/// Applies a drawn jitter to planar `[3, H, W]` values in `0..=255` (clamped after each step).
pub(crate) fn apply_jitter(planar: &mut [f32], j: &Jitter) {
    let n = planar.len() / 3;
    let (r, rest) = planar.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for op in j.order {
        let Some(f) = j.f[op] else { continue };
        match op {
            0 => {
                for p in [&mut *r, &mut *g, &mut *b] {
                    p.iter_mut().for_each(|v| *v = (*v * f).clamp(0.0, 255.0));
                }
            }
            1 => {
                let mean = (0..n).map(|i| grey(r[i], g[i], b[i])).sum::<f32>() / n.max(1) as f32;
                for p in [&mut *r, &mut *g, &mut *b] {
                    p.iter_mut()
                        .for_each(|v| *v = (*v * f + mean * (1.0 - f)).clamp(0.0, 255.0));
                }
            }
            2 => {
                for i in 0..n {
                    let gr = grey(r[i], g[i], b[i]);
                    r[i] = (r[i] * f + gr * (1.0 - f)).clamp(0.0, 255.0);
                    g[i] = (g[i] * f + gr * (1.0 - f)).clamp(0.0, 255.0);
                    b[i] = (b[i] * f + gr * (1.0 - f)).clamp(0.0, 255.0);
                }
            }
            _ => {
                for i in 0..n {
                    let (hh, ss, vv) = rgb_to_hsv(r[i], g[i], b[i]);
                    let hh = (hh + f).rem_euclid(1.0);
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
