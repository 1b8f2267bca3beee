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
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            anchors: AnchorConfig::default(),
            iou_th: (0.3, 0.5),
            train_size: (257, 257),
            num_classes: None,
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
        let an = self.num_anchors();
        let mut cls = vec![0i32; labels.len() * an];
        let mut reg = vec![[0f32; 4]; labels.len() * an];
        cls.par_chunks_mut(an.max(1))
            .zip(reg.par_chunks_mut(an.max(1)))
            .zip(labels.par_iter().zip(boxes.par_iter()))
            .for_each(|((c, r), (l, b))| self.encode_into(l.as_ref(), b.as_ref(), c, r));
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
        self.encode_into(labels, boxes, &mut cls, &mut reg);
        Ok((cls, reg))
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

    /// The matching of one image into pre-sized `cls`/`reg` (validated input).
    fn encode_into(&self, labels: &[u32], boxes: &[Bbox], cls: &mut [i32], reg: &mut [[f32; 4]]) {
        if boxes.is_empty() {
            // No object: every anchor is background (not ignored).
            cls.fill(0);
            reg.fill([0.0; 4]);
            return;
        }
        let anchors = &self.train_anchors;
        let (lo, hi) = self.cfg.iou_th;
        let m = boxes.len();
        let box_areas: Vec<f32> = boxes.iter().map(area).collect();
        let box_yxhw: Vec<[f32; 4]> = boxes.iter().map(centre_size).collect();

        // Per chunk: assign anchors from their best box, and record each box's best anchor
        // (highest IoU, first index on ties, as argmax does).
        let best_per_box = cls
            .par_chunks_mut(ANCHOR_CHUNK)
            .zip(reg.par_chunks_mut(ANCHOR_CHUNK))
            .enumerate()
            .map(|(chunk, (c, r))| {
                let start = chunk * ANCHOR_CHUNK;
                let mut best = vec![(f32::NEG_INFINITY, usize::MAX); m];
                for (k, (ck, rk)) in c.iter_mut().zip(r.iter_mut()).enumerate() {
                    let ai = start + k;
                    let a = &anchors.yxyx[ai];
                    let aa = self.train_areas[ai];
                    let (mut top, mut arg) = (f32::NEG_INFINITY, 0usize);
                    for (j, (b, &ba)) in boxes.iter().zip(&box_areas).enumerate() {
                        let iou = iou_with_areas(a, aa, b, ba);
                        if iou > top {
                            top = iou;
                            arg = j;
                        }
                        if iou > best[j].0 {
                            best[j] = (iou, ai);
                        }
                    }
                    if top > hi {
                        *ck = labels[arg] as i32;
                        *rk = deltas(&box_yxhw[arg], &anchors.yxhw[ai]);
                    } else {
                        *ck = if top < lo { 0 } else { -1 };
                        *rk = [0.0; 4];
                    }
                }
                best
            })
            .reduce(
                || vec![(f32::NEG_INFINITY, usize::MAX); m],
                |mut x, y| {
                    for (a, b) in x.iter_mut().zip(y) {
                        // Higher IoU wins; on a tie the lower anchor index (first occurrence).
                        if b.0 > a.0 || (b.0 == a.0 && b.1 < a.1) {
                            *a = b;
                        }
                    }
                    x
                },
            );

        // Each box's best anchor is forced positive unless a positive assignment (IoU > hi)
        // already holds it: the tutorial writes forced labels first, then overwrites every
        // positive anchor with its own best box. Later boxes win a shared best anchor.
        for (j, &(_, ai)) in best_per_box.iter().enumerate() {
            if ai == usize::MAX {
                continue;
            }
            // A positive anchor was already written from its own best box; keep it.
            let (a, aa) = (&anchors.yxyx[ai], self.train_areas[ai]);
            let positive = boxes
                .iter()
                .zip(&box_areas)
                .any(|(b, &ba)| iou_with_areas(a, aa, b, ba) > hi);
            if !positive {
                cls[ai] = labels[j] as i32;
                reg[ai] = deltas(&box_yxhw[j], &anchors.yxhw[ai]);
            }
        }
    }
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
