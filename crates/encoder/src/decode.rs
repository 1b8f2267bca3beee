//! Network outputs to detections: best class per anchor, box from deltas, threshold, NMS, clamp.

use rayon::prelude::*;

use crate::boxes::{Bbox, EPS, NmsMode, nms_sorted_eps};
use crate::{EncodeError, Encoder, Postprocess};

/// torchvision's `bbox_xform_clip`: size deltas above `ln(1000 / 16)` are clamped.
pub const TORCHVISION_DELTA_CLIP: f32 = 4.135_166_556_742_356_f64 as f32;

/// How [`Encoder::decode`] turns outputs into detections.
///
/// `Default` is the tutorial's display setting: score `> 0.5`, class-agnostic union NMS at 0.5,
/// no top-k, no cap. [`DecodeOptions::evaluation`] is what an mAP run wants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeOptions {
    /// Keep anchors whose best class score is `> score_th`.
    pub score_th: f32,
    /// NMS drops a box whose overlap with a kept box is `> nms_th`.
    pub nms_th: f32,
    /// Overlap measure of the NMS.
    pub nms_mode: NmsMode,
    /// `true`: one NMS over all classes (the tutorial); `false`: NMS within each class.
    pub class_agnostic: bool,
    /// Keep at most this many candidates per pyramid level before NMS (highest scores).
    pub pre_nms_top_k: Option<usize>,
    /// Keep at most this many detections per image after NMS (highest scores).
    pub max_detections: Option<usize>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            score_th: 0.5,
            nms_th: 0.5,
            nms_mode: NmsMode::Union,
            class_agnostic: true,
            pre_nms_top_k: None,
            max_detections: None,
        }
    }
}

impl DecodeOptions {
    /// Settings for mAP evaluation: score `> 0.05`, per-class NMS at 0.5, 1000 candidates per
    /// level, 100 detections per image.
    pub fn evaluation() -> Self {
        Self {
            score_th: 0.05,
            nms_th: 0.5,
            nms_mode: NmsMode::Union,
            class_agnostic: false,
            pre_nms_top_k: Some(1000),
            max_detections: Some(100),
        }
    }
}

/// Detections of one image, in descending score order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Detections {
    /// `[ymin, xmin, ymax, xmax]`, clamped to the image.
    pub boxes: Vec<Bbox>,
    /// Class labels `1..=C`.
    pub labels: Vec<u32>,
    /// Sigmoid scores.
    pub scores: Vec<f32>,
}

impl Detections {
    /// Number of detections.
    pub fn len(&self) -> usize {
        self.boxes.len()
    }

    /// Whether nothing was detected.
    pub fn is_empty(&self) -> bool {
        self.boxes.is_empty()
    }
}

/// The box of deltas `d` `(dy, dx, dh, dw)` on the anchor `(y, x, h, w)`: centre `d * size +
/// centre`, sides `exp(min(d, max_log)) * size` (`max_log` infinite: unclamped).
#[inline(always)]
fn delta_box(&[ay, ax, ah, aw]: &[f32; 4], d: &[f32], max_log: f32) -> Bbox {
    let (y, x) = (d[0] * ah + ay, d[1] * aw + ax);
    let (h, w) = (d[2].min(max_log).exp() * ah, d[3].min(max_log).exp() * aw);
    [y - h / 2.0, x - w / 2.0, y + h / 2.0, x + w / 2.0]
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl Encoder {
    /// Decodes one image's outputs: `cls` is `[A, C]` logits and `reg` `[A, 4]` deltas, row-major,
    /// for the anchors of `img_size` (`(H, W)` of the network input).
    pub fn decode(
        &self,
        cls: &[f32],
        reg: &[f32],
        num_classes: usize,
        img_size: (usize, usize),
        opts: &DecodeOptions,
    ) -> Result<Detections, EncodeError> {
        self.decode_valid(cls, reg, num_classes, img_size, img_size, opts)
    }

    /// [`Encoder::decode`] for an input of `img_size` whose image fills only its top-left
    /// `valid` `(h, w)` (the rest padding): boxes are clamped to the valid part.
    pub fn decode_valid(
        &self,
        cls: &[f32],
        reg: &[f32],
        num_classes: usize,
        img_size: (usize, usize),
        valid: (usize, usize),
        opts: &DecodeOptions,
    ) -> Result<Detections, EncodeError> {
        let anchors = self.anchors_for(img_size);
        let an = anchors.len();
        if num_classes == 0 {
            return Err(EncodeError::Config(
                "decode: num_classes must be at least 1".into(),
            ));
        }
        if cls.len() != an * num_classes {
            return Err(EncodeError::Shape(format!(
                "decode: class output has {} values, expected {an} anchors x {num_classes} classes for a {}x{} image",
                cls.len(),
                img_size.0,
                img_size.1
            )));
        }
        if reg.len() != an * 4 {
            return Err(EncodeError::Shape(format!(
                "decode: box output has {} values, expected {an} anchors x 4 for a {}x{} image",
                reg.len(),
                img_size.0,
                img_size.1
            )));
        }
        if let Some(i) = cls.iter().chain(reg).position(|v| !v.is_finite()) {
            let what = if i < cls.len() { "class" } else { "box" };
            return Err(EncodeError::NonFiniteOutput(format!(
                "decode: {what} output holds a non-finite value at flat index {}",
                if i < cls.len() { i } else { i - cls.len() }
            )));
        }

        if self.config().postprocess == Postprocess::Torchvision {
            return Ok(decode_torchvision(
                cls,
                reg,
                num_classes,
                &anchors,
                valid,
                opts,
            ));
        }
        // Candidates: anchors whose best sigmoid score passes the threshold. Sigmoid is monotone,
        // so the best logit finds them; the label is the first class reaching that score.
        let mut cand: Vec<u32> = Vec::new();
        let mut scores: Vec<f32> = Vec::new();
        let mut labels: Vec<u32> = Vec::new();
        for (a, row) in cls.chunks_exact(num_classes).enumerate() {
            let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let p = sigmoid(top);
            if p > opts.score_th {
                let c = row.iter().position(|&x| sigmoid(x) == p).unwrap_or(0);
                cand.push(a as u32);
                scores.push(p);
                labels.push(c as u32 + 1);
            }
        }
        if let Some(k) = opts.pre_nms_top_k {
            let mut kept = Vec::with_capacity(cand.len());
            for &(lo, hi) in &anchors.level_ranges {
                let mut lvl: Vec<usize> = (0..cand.len())
                    .filter(|&i| (lo..hi).contains(&(cand[i] as usize)))
                    .collect();
                if lvl.len() > k {
                    lvl.sort_by(|&i, &j| scores[j].total_cmp(&scores[i]));
                    lvl.truncate(k);
                    lvl.sort_unstable();
                }
                kept.extend(lvl);
            }
            cand = kept.iter().map(|&i| cand[i]).collect();
            scores = kept.iter().map(|&i| scores[i]).collect();
            labels = kept.iter().map(|&i| labels[i]).collect();
        }

        let boxes: Vec<Bbox> = cand
            .iter()
            .map(|&a| {
                let a = a as usize;
                delta_box(&anchors.yxhw[a], &reg[a * 4..a * 4 + 4], f32::INFINITY)
            })
            .collect();

        // Descending score; ties keep anchor order.
        let mut order: Vec<u32> = (0..cand.len() as u32).collect();
        order.sort_by(|&i, &j| scores[j as usize].total_cmp(&scores[i as usize]));
        let keep = nms_keep(&boxes, &scores, &labels, &order, num_classes, opts, EPS);
        let (hmax, wmax) = (valid.0 as f32 - 1.0, valid.1 as f32 - 1.0);
        let mut out = Detections {
            boxes: Vec::with_capacity(keep.len()),
            labels: Vec::with_capacity(keep.len()),
            scores: Vec::with_capacity(keep.len()),
        };
        for i in keep {
            let b = boxes[i];
            // As the tutorial: the top-left corner is clamped at 0, the bottom-right at H-1, W-1.
            out.boxes
                .push([b[0].max(0.0), b[1].max(0.0), b[2].min(hmax), b[3].min(wmax)]);
            out.labels.push(labels[i]);
            out.scores.push(scores[i]);
        }
        Ok(out)
    }

    /// Decodes a batch: `cls` is `[B, A, C]` and `reg` `[B, A, 4]`, row-major; images run in
    /// parallel.
    pub fn decode_batch(
        &self,
        cls: &[f32],
        reg: &[f32],
        batch: usize,
        num_classes: usize,
        img_size: (usize, usize),
        opts: &DecodeOptions,
    ) -> Result<Vec<Detections>, EncodeError> {
        self.decode_batch_valid(cls, reg, batch, num_classes, img_size, &[], opts)
    }

    /// [`Encoder::decode_batch`] with each image's valid `(h, w)` (see
    /// [`Encoder::decode_valid`]; empty: every image fills the input).
    #[allow(clippy::too_many_arguments)]
    pub fn decode_batch_valid(
        &self,
        cls: &[f32],
        reg: &[f32],
        batch: usize,
        num_classes: usize,
        img_size: (usize, usize),
        valid: &[(usize, usize)],
        opts: &DecodeOptions,
    ) -> Result<Vec<Detections>, EncodeError> {
        if !valid.is_empty() && valid.len() != batch {
            return Err(EncodeError::Shape(format!(
                "decode: {} valid sizes for {batch} images",
                valid.len()
            )));
        }
        if batch == 0 {
            return Ok(Vec::new());
        }
        if !cls.len().is_multiple_of(batch) || !reg.len().is_multiple_of(batch) {
            return Err(EncodeError::Shape(format!(
                "decode: {} class and {} box values do not split into {batch} images",
                cls.len(),
                reg.len()
            )));
        }
        cls.par_chunks(cls.len() / batch)
            .zip(reg.par_chunks(reg.len() / batch))
            .enumerate()
            .map(|(i, (c, r))| {
                let v = valid.get(i).copied().unwrap_or(img_size);
                self.decode_valid(c, r, num_classes, img_size, v, opts)
            })
            .collect()
    }
}

/// torchvision's `RetinaNet.postprocess_detections` for one image (outputs already checked):
/// per level the (anchor, class) pairs scoring above the threshold, the best `pre_nms_top_k`
/// of them, boxes decoded with clamped size deltas and clipped to the valid image, NMS (per
/// class unless class-agnostic), the best `max_detections`.
fn decode_torchvision(
    cls: &[f32],
    reg: &[f32],
    num_classes: usize,
    anchors: &crate::Anchors,
    valid: (usize, usize),
    opts: &DecodeOptions,
) -> Detections {
    let (vh, vw) = (valid.0 as f32, valid.1 as f32);
    let mut boxes: Vec<Bbox> = Vec::new();
    let mut scores: Vec<f32> = Vec::new();
    let mut labels: Vec<u32> = Vec::new();
    for &(lo, hi) in &anchors.level_ranges {
        let mut lvl: Vec<(u32, f32)> = cls[lo * num_classes..hi * num_classes]
            .iter()
            .enumerate()
            .filter_map(|(i, &x)| {
                let p = sigmoid(x);
                (p > opts.score_th).then_some((i as u32, p))
            })
            .collect();
        if let Some(k) = opts.pre_nms_top_k
            && lvl.len() > k
        {
            // Highest scores first; equal scores in index order.
            lvl.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            lvl.truncate(k);
        }
        for (i, p) in lvl {
            let a = lo + i as usize / num_classes;
            let b = delta_box(
                &anchors.yxhw[a],
                &reg[a * 4..a * 4 + 4],
                TORCHVISION_DELTA_CLIP,
            );
            boxes.push([
                b[0].clamp(0.0, vh),
                b[1].clamp(0.0, vw),
                b[2].clamp(0.0, vh),
                b[3].clamp(0.0, vw),
            ]);
            scores.push(p);
            labels.push((i as usize % num_classes) as u32 + 1);
        }
    }
    let mut order: Vec<u32> = (0..boxes.len() as u32).collect();
    order.sort_by(|&i, &j| {
        scores[j as usize]
            .total_cmp(&scores[i as usize])
            .then(i.cmp(&j))
    });
    let keep = nms_keep(&boxes, &scores, &labels, &order, num_classes, opts, 0.0);
    Detections {
        boxes: keep.iter().map(|&i| boxes[i]).collect(),
        labels: keep.iter().map(|&i| labels[i]).collect(),
        scores: keep.iter().map(|&i| scores[i]).collect(),
    }
}

/// The candidates NMS keeps (class-agnostic or per class, `eps` on the sides as
/// [`nms_sorted_eps`]), by descending score (ties in index order), at most
/// `max_detections`. `order` is every candidate by descending score.
fn nms_keep(
    boxes: &[Bbox],
    scores: &[f32],
    labels: &[u32],
    order: &[u32],
    num_classes: usize,
    opts: &DecodeOptions,
    eps: f32,
) -> Vec<usize> {
    let mut keep: Vec<usize> = if opts.class_agnostic {
        nms_sorted_eps(boxes, order, opts.nms_th, opts.nms_mode, eps)
            .into_iter()
            .map(|k| order[k] as usize)
            .collect()
    } else {
        let mut keep = Vec::new();
        for c in 1..=num_classes as u32 {
            let sub: Vec<u32> = order
                .iter()
                .copied()
                .filter(|&i| labels[i as usize] == c)
                .collect();
            if !sub.is_empty() {
                keep.extend(
                    nms_sorted_eps(boxes, &sub, opts.nms_th, opts.nms_mode, eps)
                        .into_iter()
                        .map(|k| sub[k] as usize),
                );
            }
        }
        keep.sort_by(|&i, &j| scores[j].total_cmp(&scores[i]).then(i.cmp(&j)));
        keep
    };
    if let Some(m) = opts.max_detections {
        keep.truncate(m);
    }
    keep
}
