//! Training targets: anchors matched to ground-truth boxes.

use std::sync::Arc;

use rayon::prelude::*;
use retinanet_anchors::{AnchorCache, AnchorConfig, Anchors};

use crate::EncodeError;
use crate::boxes::{Bbox, area, iou_with_areas, validate_boxes};

/// How targets are assigned. `Default` is the tutorial's: its anchors, IoU thresholds
/// `(0.3, 0.5)` and a 257x257 training size.
#[derive(Clone, Debug, PartialEq)]
pub struct EncoderConfig {
    /// Anchor layout (shared with the decoder).
    pub anchors: AnchorConfig,
    /// `(lo, hi)`: IoU `> hi` is positive, all IoUs `< lo` is background, else ignored.
    pub iou_th: (f32, f32),
    /// The fixed `(H, W)` of training images.
    pub train_size: (usize, usize),
    /// Number of object classes `C`; when set, labels are checked to lie in `1..=C`.
    pub num_classes: Option<usize>,
    /// How network outputs become detections.
    pub postprocess: Postprocess,
}

/// How [`Encoder::decode`] turns network outputs into detections (the thresholds and counts are
/// in [`crate::DecodeOptions`]).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Postprocess {
    /// The tutorial's: one candidate per anchor (its best class), boxes from unclamped deltas,
    /// NMS, then corners clamped to `[0, H - 1] x [0, W - 1]`.
    #[default]
    Tutorial,
    /// torchvision's RetinaNet `postprocess_detections`: every (anchor, class) pair above the
    /// score threshold is a candidate, the size deltas are clamped at `ln(1000 / 16)`, boxes
    /// are clipped to `[0, H] x [0, W]` of the image's valid part before NMS.
    Torchvision,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            anchors: AnchorConfig::default(),
            iou_th: (0.3, 0.5),
            train_size: (257, 257),
            num_classes: None,
            postprocess: Postprocess::Tutorial,
        }
    }
}

/// Targets of a batch, flat: anchor `a` of image `b` is at `b * num_anchors + a`.
#[derive(Clone, Debug, PartialEq)]
pub struct Targets {
    /// Images in the batch.
    pub batch: usize,
    /// Anchors per image.
    pub num_anchors: usize,
    /// Class target per anchor: `-1` ignore, `0` background, `k` class `k`.
    pub cls: Vec<i32>,
    /// `(dy, dx, ln dh, ln dw)` per anchor; zero where the anchor is not matched.
    pub reg: Vec<[f32; 4]>,
}

impl Targets {
    /// Number of positive anchors in the batch.
    pub fn num_positive(&self) -> usize {
        self.cls.iter().filter(|&&c| c > 0).count()
    }

    /// Class targets of image `b`.
    pub fn cls_of(&self, b: usize) -> &[i32] {
        &self.cls[b * self.num_anchors..(b + 1) * self.num_anchors]
    }

    /// Regression targets of image `b`.
    pub fn reg_of(&self, b: usize) -> &[[f32; 4]] {
        &self.reg[b * self.num_anchors..(b + 1) * self.num_anchors]
    }
}

/// Encodes boxes into targets and decodes network outputs into detections.
///
/// Cheap to share across threads; anchors of every size the decoder meets are cached.
#[derive(Clone, Debug)]
pub struct Encoder {
    cfg: EncoderConfig,
    train_anchors: Arc<Anchors>,
    // Per-anchor area with the tutorial's eps, for the training size.
    train_areas: Arc<Vec<f32>>,
    cache: Arc<AnchorCache>,
}

/// Anchors handled per rayon task when encoding one image.
const ANCHOR_CHUNK: usize = 2048;

impl Encoder {
    /// Builds an encoder; fails on an invalid anchor config or thresholds.
    pub fn new(cfg: EncoderConfig) -> Result<Self, EncodeError> {
        cfg.anchors
            .validate()
            .map_err(|e| EncodeError::Config(e.to_string()))?;
        let (lo, hi) = cfg.iou_th;
        if !(0.0..=1.0).contains(&lo) || !(0.0..=1.0).contains(&hi) || lo > hi {
            return Err(EncodeError::Config(format!(
                "iou_th = ({lo}, {hi}) must satisfy 0 <= lo <= hi <= 1"
            )));
        }
        if cfg.train_size.0 == 0 || cfg.train_size.1 == 0 {
            return Err(EncodeError::Config(format!(
                "train_size = {:?} must be non-empty",
                cfg.train_size
            )));
        }
        if cfg.num_classes == Some(0) {
            return Err(EncodeError::Config("num_classes must be at least 1".into()));
        }
        let cache = Arc::new(AnchorCache::new(cfg.anchors.clone()));
        let train_anchors = cache.get(cfg.train_size);
        let train_areas = Arc::new(train_anchors.yxyx.iter().map(area).collect());
        Ok(Self {
            cfg,
            train_anchors,
            train_areas,
            cache,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }

    /// Anchors of the training size.
    pub fn train_anchors(&self) -> &Anchors {
        &self.train_anchors
    }

    /// Anchors of any image size (cached).
    pub fn anchors_for(&self, img_size: (usize, usize)) -> Arc<Anchors> {
        self.cache.get(img_size)
    }

    /// Anchors per training image.
    pub fn num_anchors(&self) -> usize {
        self.train_anchors.len()
    }

    /// Encodes a batch: `labels[b]` and `boxes[b]` are image `b`'s objects, at the training size.
    ///
    /// Images run in parallel, and so do chunks of anchors inside an image.
    pub fn encode<L, B>(&self, labels: &[L], boxes: &[B]) -> Result<Targets, EncodeError>
    where
        L: AsRef<[u32]> + Sync,
        B: AsRef<[Bbox]> + Sync,
    {
        self.encode_at(self.cfg.train_size, labels, boxes)
    }

    /// Encodes a batch of images of size `img_size` (`(H, W)` of the network input), against
    /// that size's anchors: what multi-scale training needs, one size per batch. At the
    /// training size this is [`Encoder::encode`].
    pub fn encode_at<L, B>(
        &self,
        img_size: (usize, usize),
        labels: &[L],
        boxes: &[B],
    ) -> Result<Targets, EncodeError>
    where
        L: AsRef<[u32]> + Sync,
        B: AsRef<[Bbox]> + Sync,
    {
        if labels.len() != boxes.len() {
            return Err(EncodeError::BatchMismatch {
                labels: labels.len(),
                boxes: boxes.len(),
            });
        }
        for (image, (l, b)) in labels.iter().zip(boxes).enumerate() {
            self.check_image(l.as_ref(), b.as_ref())
                .map_err(|e| EncodeError::InImage {
                    image,
                    source: Box::new(e),
                })?;
        }
        let (anchors, areas) = self.anchors_and_areas(img_size)?;
        let an = anchors.len();
        let mut cls = vec![0i32; labels.len() * an];
        let mut reg = vec![[0f32; 4]; labels.len() * an];
        cls.par_chunks_mut(an.max(1))
            .zip(reg.par_chunks_mut(an.max(1)))
            .zip(labels.par_iter().zip(boxes.par_iter()))
            .for_each(|((c, r), (l, b))| {
                self.encode_into(&anchors, &areas, l.as_ref(), b.as_ref(), c, r)
            });
        Ok(Targets {
            batch: labels.len(),
            num_anchors: an,
            cls,
            reg,
        })
    }

    /// Encodes one image; see [`Encoder::encode`].
    pub fn encode_image(
        &self,
        labels: &[u32],
        boxes: &[Bbox],
    ) -> Result<(Vec<i32>, Vec<[f32; 4]>), EncodeError> {
        self.check_image(labels, boxes)?;
        let an = self.num_anchors();
        let mut cls = vec![0i32; an];
        let mut reg = vec![[0f32; 4]; an];
        self.encode_into(
            &self.train_anchors,
            &self.train_areas,
            labels,
            boxes,
            &mut cls,
            &mut reg,
        );
        Ok((cls, reg))
    }

    /// How each box of an image of size `img_size` is matched, exactly as [`Encoder::encode_at`]
    /// assigns its targets: the box's best IoU with any anchor and the anchors that end up
    /// positive for it (those whose best box it is with IoU `> hi`, plus its forced best anchor
    /// unless another box takes that anchor). For the anchor check: a box whose best IoU is not
    /// above `hi` trains on its one forced anchor only.
    pub fn match_boxes(
        &self,
        img_size: (usize, usize),
        boxes: &[Bbox],
    ) -> Result<Vec<BoxMatch>, EncodeError> {
        validate_boxes(boxes)?;
        let (anchors, areas) = self.anchors_and_areas(img_size)?;
        if boxes.is_empty() {
            return Ok(Vec::new());
        }
        let a = self.assign(&anchors, &areas, boxes);
        let hi = self.cfg.iou_th.1;
        // The box each anchor is positive for: its best box above `hi`, then the forced ones
        // in box order (a later box wins a shared best anchor), as `encode_into` writes them.
        let mut owner: Vec<Option<u32>> = a
            .top
            .iter()
            .zip(&a.arg)
            .map(|(&t, &j)| (t > hi).then_some(j))
            .collect();
        for (j, &ai) in a.best_anchor.iter().enumerate() {
            if a.top[ai] <= hi {
                owner[ai] = Some(j as u32);
            }
        }
        let mut out: Vec<BoxMatch> = a
            .best_iou
            .iter()
            .map(|&best_iou| BoxMatch {
                best_iou,
                positives: 0,
            })
            .collect();
        for j in owner.into_iter().flatten() {
            out[j as usize].positives += 1;
        }
        Ok(out)
    }

    /// The anchors of `img_size` and their areas (with the tutorial's eps).
    fn anchors_and_areas(
        &self,
        img_size: (usize, usize),
    ) -> Result<(Arc<Anchors>, Arc<Vec<f32>>), EncodeError> {
        if img_size.0 == 0 || img_size.1 == 0 {
            return Err(EncodeError::Config(format!(
                "encode: image size {img_size:?} must be non-empty"
            )));
        }
        if img_size == self.cfg.train_size {
            return Ok((self.train_anchors.clone(), self.train_areas.clone()));
        }
        let anchors = self.cache.get(img_size);
        // Cheap next to the matching itself (one product per anchor).
        let areas = Arc::new(anchors.yxyx.iter().map(area).collect());
        Ok((anchors, areas))
    }

    fn check_image(&self, labels: &[u32], boxes: &[Bbox]) -> Result<(), EncodeError> {
        if labels.len() != boxes.len() {
            return Err(EncodeError::LengthMismatch {
                labels: labels.len(),
                boxes: boxes.len(),
            });
        }
        validate_boxes(boxes)?;
        let max = self.cfg.num_classes.unwrap_or(i32::MAX as usize);
        for (index, &label) in labels.iter().enumerate() {
            if label == 0 || label as usize > max {
                return Err(EncodeError::LabelOutOfRange {
                    index,
                    label: label as i64,
                    num_classes: self.cfg.num_classes,
                });
            }
        }
        Ok(())
    }

    /// Best IoU per anchor (and the first box reaching it), and each box's best anchor.
    ///
    /// Equivalent to the tutorial's dense anchors x boxes IoU matrix, but each box only visits
    /// the anchors whose extent can touch it (found from the grid, with a one-pixel margin):
    /// every other pair has IoU exactly 0 and cannot change a maximum. Ties resolve as
    /// `argmax` does: the first box for an anchor, the first anchor for a box.
    fn assign(&self, anchors: &Anchors, areas: &[f32], boxes: &[Bbox]) -> Assignment {
        let acfg = &self.cfg.anchors;
        let na = acfg.anchors_per_cell();
        // Best IoU of each anchor and the first box reaching it; an all-zero row picks box 0.
        let mut top = vec![0f32; anchors.len()];
        let mut arg = vec![0u32; anchors.len()];
        let mut best_anchor = vec![0usize; boxes.len()];
        let mut best_iou = vec![0f32; boxes.len()];
        let grids = acfg.grid_sizes(anchors.img_size);
        for (j, b) in boxes.iter().enumerate() {
            let ba = area(b);
            let (mut best, mut best_i) = (0f32, 0usize);
            for (s, &(start, _)) in anchors.level_ranges.iter().enumerate() {
                let t = acfg.stride(s) as f32;
                let scale = acfg.level_scale(s) as f32;
                let (fh, fw) = grids[s];
                for (k, hw) in acfg.a_hw.iter().enumerate() {
                    let (h2, w2) = (
                        scale * hw[0] as f32 / 2.0 + 1.0,
                        scale * hw[1] as f32 / 2.0 + 1.0,
                    );
                    let Some((r0, r1)) = grid_span(b[0] - h2, b[2] + h2, t, fh) else {
                        continue;
                    };
                    let Some((c0, c1)) = grid_span(b[1] - w2, b[3] + w2, t, fw) else {
                        continue;
                    };
                    for r in r0..=r1 {
                        for c in c0..=c1 {
                            let ai = start + (r * fw + c) * na + k;
                            let iou = iou_with_areas(&anchors.yxyx[ai], areas[ai], b, ba);
                            if iou > top[ai] {
                                top[ai] = iou;
                                arg[ai] = j as u32;
                            }
                            if iou > best || (iou == best && ai < best_i) {
                                best = iou;
                                best_i = ai;
                            }
                        }
                    }
                }
            }
            // A box touching no anchor has an all-zero column: argmax picks anchor 0.
            best_anchor[j] = if best > 0.0 { best_i } else { 0 };
            best_iou[j] = best;
        }
        Assignment {
            top,
            arg,
            best_anchor,
            best_iou,
        }
    }

    /// The matching of one image into pre-sized `cls`/`reg` (validated input).
    fn encode_into(
        &self,
        anchors: &Anchors,
        areas: &[f32],
        labels: &[u32],
        boxes: &[Bbox],
        cls: &mut [i32],
        reg: &mut [[f32; 4]],
    ) {
        if boxes.is_empty() {
            // No object: every anchor is background (not ignored).
            cls.fill(0);
            reg.fill([0.0; 4]);
            return;
        }
        let (lo, hi) = self.cfg.iou_th;
        let Assignment {
            top,
            arg,
            best_anchor,
            ..
        } = self.assign(anchors, areas, boxes);

        let box_yxhw: Vec<[f32; 4]> = boxes.iter().map(centre_size).collect();
        let assign = |(ai, (c, r)): (usize, (&mut i32, &mut [f32; 4]))| {
            if top[ai] > hi {
                let j = arg[ai] as usize;
                *c = labels[j] as i32;
                *r = deltas(&box_yxhw[j], &anchors.yxhw[ai]);
            } else {
                *c = if top[ai] < lo { 0 } else { -1 };
                *r = [0.0; 4];
            }
        };
        if cls.len() >= 4 * ANCHOR_CHUNK {
            cls.par_iter_mut()
                .zip(reg.par_iter_mut())
                .enumerate()
                .for_each(assign);
        } else {
            cls.iter_mut()
                .zip(reg.iter_mut())
                .enumerate()
                .for_each(assign);
        }

        // Each box's best anchor is forced to it unless that anchor is positive (IoU > hi): the
        // tutorial writes the forced labels first and then overwrites every positive anchor
        // with its own best box. A later box wins a shared best anchor.
        for (j, &ai) in best_anchor.iter().enumerate() {
            if top[ai] <= hi {
                cls[ai] = labels[j] as i32;
                reg[ai] = deltas(&box_yxhw[j], &anchors.yxhw[ai]);
            }
        }
    }
}

/// How one box is matched by the encoder (see [`Encoder::match_boxes`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BoxMatch {
    /// The box's best IoU with any anchor.
    pub best_iou: f32,
    /// Anchors positive for this box in the encoded targets.
    pub positives: usize,
}

/// The matching of one image's boxes against its anchors.
struct Assignment {
    /// Best IoU of each anchor with any box.
    top: Vec<f32>,
    /// The first box reaching `top`.
    arg: Vec<u32>,
    /// Each box's best anchor.
    best_anchor: Vec<usize>,
    /// Each box's best IoU.
    best_iou: Vec<f32>,
}

/// Grid indices `i` in `0..n` whose centre `i * t` lies in `[lo, hi]`; `None` if there is none.
#[inline]
fn grid_span(lo: f32, hi: f32, t: f32, n: usize) -> Option<(usize, usize)> {
    if n == 0 || hi < 0.0 {
        return None;
    }
    let first = (lo / t).ceil().max(0.0) as usize;
    let last = ((hi / t).floor() as usize).min(n - 1);
    (first <= last).then_some((first, last))
}

/// `[cy, cx, h, w]` of a yxyx box, computed as the tutorial does.
#[inline]
pub(crate) fn centre_size(b: &Bbox) -> [f32; 4] {
    [
        (b[0] + b[2]) / 2.0,
        (b[1] + b[3]) / 2.0,
        b[2] - b[0],
        b[3] - b[1],
    ]
}

#[inline]
fn deltas(g: &[f32; 4], a: &[f32; 4]) -> [f32; 4] {
    [
        (g[0] - a[0]) / a[2],
        (g[1] - a[1]) / a[3],
        (g[2] / a[2]).ln(),
        (g[3] / a[3]).ln(),
    ]
}
