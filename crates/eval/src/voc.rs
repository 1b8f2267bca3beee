//! PASCAL VOC average precision, with the tutorial's conventions.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::input::{Detections, GroundTruth, validate};
use crate::{EvalError, group_by_label, score_bits};

/// The tutorial's IoU of two `[ymin, xmin, ymax, xmax]` boxes that already carry the `+1` on the
/// maxima: no epsilon on the sides, `1e-10` added to the union.
#[inline]
fn voc_iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let t0 = a[0].max(b[0]);
    let t1 = a[1].max(b[1]);
    let b0 = a[2].min(b[2]);
    let b1 = a[3].min(b[3]);
    let inter = if t0 < b0 && t1 < b1 {
        (b0 - t0) * (b1 - t1)
    } else {
        0.0
    };
    let aa = (a[2] - a[0]) * (a[3] - a[1]);
    let ab = (b[2] - b[0]) * (b[3] - b[1]);
    inter / (aa + ab - inter + 1e-10)
}

#[inline]
fn plus_one(b: &[f32; 4]) -> [f64; 4] {
    [
        b[0] as f64,
        b[1] as f64,
        b[2] as f64 + 1.0,
        b[3] as f64 + 1.0,
    ]
}

/// Streaming VOC evaluator: feed it image by image, read the result at any time.
///
/// Per image and class, detections are taken in descending score and each is matched to the
/// ground truth with which it has the highest IoU (computed with `+1` on `xmax`/`ymax`, as the
/// tutorial). It is a true positive if that IoU is `>= iou_threshold` and the ground truth is still
/// free; otherwise a false positive (there is no fallback to the second-best ground truth). A
/// detection whose best ground truth is `difficult` is ignored, and difficult objects are not
/// counted as positives. Only the score and the outcome of each detection are kept, so memory is
/// a few bytes per detection.
#[derive(Clone, Debug)]
pub struct VocEvaluator {
    num_classes: usize,
    iou_threshold: f64,
    n_images: usize,
    n_gt: Vec<usize>,
    n_difficult: Vec<usize>,
    n_det: Vec<usize>,
    /// Per class, in the order they were added: (score, true positive). Ignored detections
    /// (matched to a difficult object) are left out: they change neither precision nor recall.
    outcomes: Vec<Vec<(f32, bool)>>,
    scratch: VocScratch,
}

/// Buffers reused from image to image.
#[derive(Clone, Debug, Default)]
struct VocScratch {
    det_order: Vec<usize>,
    gt_order: Vec<usize>,
    gt_plus: Vec<[f64; 4]>,
    taken: Vec<bool>,
}

/// What [`VocEvaluator::finish`] returns. Vectors are indexed by `label - 1`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VocResult {
    /// All-point AP (area under the monotone precision envelope); `None` for a class without
    /// (non-difficult) ground truth.
    pub ap: Vec<Option<f64>>,
    /// Mean of `ap` over the classes that have ground truth; `None` if no class has any.
    pub map: Option<f64>,
    /// 11-point VOC2007 AP (mean of the best precision at recall `>= 0, 0.1, ..., 1`).
    pub ap_07: Vec<Option<f64>>,
    /// Mean of `ap_07` over the classes that have ground truth.
    pub map_07: Option<f64>,
    /// Number of non-difficult ground-truth objects per class.
    pub n_gt: Vec<usize>,
    /// Number of difficult ground-truth objects per class.
    pub n_difficult: Vec<usize>,
    /// Number of detections per class.
    pub n_det: Vec<usize>,
    /// Number of images evaluated.
    pub n_images: usize,
    /// IoU threshold used for matching.
    pub iou_threshold: f64,
}

impl VocEvaluator {
    /// An evaluator for labels `1..=num_classes` at the usual IoU threshold 0.5.
    pub fn new(num_classes: usize) -> Self {
        Self::with_iou_threshold(num_classes, 0.5)
    }

    /// An evaluator with another IoU threshold (a match needs IoU `>= iou_threshold`).
    pub fn with_iou_threshold(num_classes: usize, iou_threshold: f64) -> Self {
        Self {
            num_classes,
            iou_threshold,
            n_images: 0,
            n_gt: vec![0; num_classes],
            n_difficult: vec![0; num_classes],
            n_det: vec![0; num_classes],
            outcomes: vec![Vec::new(); num_classes],
            scratch: VocScratch::default(),
        }
    }

    /// Number of classes (labels `1..=num_classes`).
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Number of images added so far.
    pub fn num_images(&self) -> usize {
        self.n_images
    }

    /// Adds one image. Boxes are `[ymin, xmin, ymax, xmax]`, labels `1..=C`; `gt_difficult`
    /// marks VOC difficult objects (`None`: none). Either side may be empty. On error nothing is
    /// recorded.
    pub fn add_image(
        &mut self,
        gt_boxes: &[[f32; 4]],
        gt_labels: &[u32],
        gt_difficult: Option<&[bool]>,
        det_boxes: &[[f32; 4]],
        det_labels: &[u32],
        det_scores: &[f32],
    ) -> Result<(), EvalError> {
        let gt = GroundTruth {
            difficult: gt_difficult,
            ..GroundTruth::new(gt_boxes, gt_labels)
        };
        self.add(&gt, &Detections::new(det_boxes, det_labels, det_scores))
    }

    /// Adds one image given as [`GroundTruth`] and [`Detections`] (`crowd` and `areas` are not
    /// used by VOC).
    pub fn add(&mut self, gt: &GroundTruth<'_>, det: &Detections<'_>) -> Result<(), EvalError> {
        validate(self.n_images, self.num_classes, gt, det)?;
        self.n_images += 1;
        let difficult = |i: usize| gt.difficult.is_some_and(|d| d[i]);
        // Detections grouped by label, each group in descending score; among equal scores the
        // later one first, as the reference's reversed ascending argsort.
        let VocScratch {
            mut det_order,
            mut gt_order,
            mut gt_plus,
            mut taken,
        } = std::mem::take(&mut self.scratch);
        det_order.clear();
        det_order.extend(0..det.boxes.len());
        det_order.sort_unstable_by_key(|&i| {
            (
                det.labels[i],
                !score_bits(det.scores[i]),
                std::cmp::Reverse(i),
            )
        });
        gt_order.clear();
        gt_order.extend(0..gt.boxes.len());
        gt_order.sort_by_key(|&i| gt.labels[i]);

        for (label, gts, dets) in group_by_label(&gt_order, gt.labels, &det_order, det.labels) {
            let c = label as usize - 1;
            for &g in gts {
                if difficult(g) {
                    self.n_difficult[c] += 1;
                } else {
                    self.n_gt[c] += 1;
                }
            }
            self.n_det[c] += dets.len();
            let out = &mut self.outcomes[c];
            if gts.is_empty() {
                out.extend(dets.iter().map(|&d| (det.scores[d], false)));
                continue;
            }
            gt_plus.clear();
            gt_plus.extend(gts.iter().map(|&g| plus_one(&gt.boxes[g])));
            taken.clear();
            taken.resize(gts.len(), false);
            for &d in dets {
                let p = plus_one(&det.boxes[d]);
                // First maximum wins, as numpy's argmax.
                let (mut best, mut best_iou) = (0usize, f64::NEG_INFINITY);
                for (j, g) in gt_plus.iter().enumerate() {
                    let iou = voc_iou(&p, g);
                    if iou > best_iou {
                        best = j;
                        best_iou = iou;
                    }
                }
                let score = det.scores[d];
                if best_iou < self.iou_threshold {
                    out.push((score, false));
                } else if difficult(gts[best]) {
                    // Neither a hit nor a miss.
                } else if taken[best] {
                    out.push((score, false));
                } else {
                    taken[best] = true;
                    out.push((score, true));
                }
            }
        }
        self.scratch = VocScratch {
            det_order,
            gt_order,
            gt_plus,
            taken,
        };
        Ok(())
    }

    /// AP per class and mAP over what was added so far (the evaluator can go on afterwards).
    pub fn finish(&self) -> VocResult {
        let per_class: Vec<(Option<f64>, Option<f64>)> = (0..self.num_classes)
            .into_par_iter()
            .map(|c| {
                let n_pos = self.n_gt[c];
                if n_pos == 0 {
                    return (None, None);
                }
                // Descending score; ties in reverse order of arrival, as the reference's
                // `argsort(kind='stable')[::-1]`.
                let out = &self.outcomes[c];
                let mut keys: Vec<u64> = out
                    .iter()
                    .enumerate()
                    .map(|(pos, &(s, _))| {
                        (u64::from(!score_bits(s)) << 32) | (u32::MAX - pos as u32) as u64
                    })
                    .collect();
                keys.sort_unstable();
                let ranked: Vec<bool> = keys
                    .iter()
                    .map(|k| out[(u32::MAX - (*k as u32)) as usize].1)
                    .collect();
                let (prec, rec) = precision_recall(&ranked, n_pos);
                (
                    Some(ap_all_points(&prec, &rec)),
                    Some(ap_11_points(&prec, &rec)),
                )
            })
            .collect();
        let ap: Vec<Option<f64>> = per_class.iter().map(|p| p.0).collect();
        let ap_07: Vec<Option<f64>> = per_class.iter().map(|p| p.1).collect();
        VocResult {
            map: mean_some(&ap),
            map_07: mean_some(&ap_07),
            ap,
            ap_07,
            n_gt: self.n_gt.clone(),
            n_difficult: self.n_difficult.clone(),
            n_det: self.n_det.clone(),
            n_images: self.n_images,
            iou_threshold: self.iou_threshold,
        }
    }
}

fn mean_some(v: &[Option<f64>]) -> Option<f64> {
    let vals: Vec<f64> = v.iter().flatten().copied().collect();
    (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
}

/// Cumulative precision and recall down a ranked list of outcomes.
fn precision_recall(ranked: &[bool], n_pos: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut prec = Vec::with_capacity(ranked.len());
    let mut rec = Vec::with_capacity(ranked.len());
    for &hit in ranked {
        if hit {
            tp += 1;
        } else {
            fp += 1;
        }
        prec.push(tp as f64 / (tp + fp) as f64);
        rec.push(tp as f64 / n_pos as f64);
    }
    (prec, rec)
}

/// Area under the monotone precision envelope, summed where recall changes (VOC2010+).
fn ap_all_points(prec: &[f64], rec: &[f64]) -> f64 {
    let n = prec.len();
    let mut mpre = Vec::with_capacity(n + 2);
    mpre.push(0.0);
    mpre.extend_from_slice(prec);
    mpre.push(0.0);
    let mut mrec = Vec::with_capacity(n + 2);
    mrec.push(0.0);
    mrec.extend_from_slice(rec);
    mrec.push(1.0);
    for i in (0..mpre.len() - 1).rev() {
        mpre[i] = mpre[i].max(mpre[i + 1]);
    }
    (0..mrec.len() - 1)
        .filter(|&i| mrec[i + 1] != mrec[i])
        .map(|i| (mrec[i + 1] - mrec[i]) * mpre[i + 1])
        .sum()
}

/// VOC2007 11-point AP: mean over `t = 0, 0.1, ..., 1` of the best precision at recall `>= t`.
fn ap_11_points(prec: &[f64], rec: &[f64]) -> f64 {
    let mut ap = 0.0;
    for i in 0..11 {
        // Same values as numpy's `arange(0., 1.1, 0.1)`.
        let t = i as f64 * 0.1;
        let best = prec
            .iter()
            .zip(rec)
            .filter(|(_, r)| **r >= t)
            .map(|(p, _)| *p)
            .fold(None, |m: Option<f64>, p| Some(m.map_or(p, |m| m.max(p))));
        ap += best.unwrap_or(0.0) / 11.0;
    }
    ap
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_uses_plus_one() {
        // [0,0,9,9] and [0,5,9,14] with +1: 10x10 boxes overlapping 10x5.
        let a = plus_one(&[0.0, 0.0, 9.0, 9.0]);
        let b = plus_one(&[0.0, 5.0, 9.0, 14.0]);
        assert!((voc_iou(&a, &b) - 50.0 / 150.0).abs() < 1e-12);
    }

    #[test]
    fn all_point_and_11_point() {
        // Ranked: TP, FP, TP with 4 positives: precision 1, 1/2, 2/3; recall 1/4, 1/4, 1/2.
        let ranked = [true, false, true];
        let (p, r) = precision_recall(&ranked, 4);
        let ap = ap_all_points(&p, &r);
        assert!((ap - (0.25 * 1.0 + 0.25 * (2.0 / 3.0))).abs() < 1e-12);
        // t = 0, 0.1, 0.2 → 1; t = 0.3, 0.4, 0.5 → 2/3; the rest 0.
        let ap07 = ap_11_points(&p, &r);
        assert!((ap07 - (3.0 + 2.0) / 11.0).abs() < 1e-12);
    }

    #[test]
    fn duplicate_is_false_positive_and_difficult_is_ignored() {
        let mut e = VocEvaluator::new(2);
        let gt = [[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]];
        // Two detections on the first object (the second is a duplicate), one on the difficult one.
        let det = [
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 10.0],
            [50.0, 50.0, 60.0, 60.0],
        ];
        e.add_image(
            &gt,
            &[1, 1],
            Some(&[false, true]),
            &det,
            &[1, 1, 1],
            &[0.9, 0.8, 0.95],
        )
        .unwrap();
        let r = e.finish();
        assert_eq!(r.n_gt, vec![1, 0]);
        assert_eq!(r.n_difficult, vec![1, 0]);
        assert_eq!(r.n_det, vec![3, 0]);
        // Ranked (difficult match dropped): TP, FP → AP 1 with one positive.
        assert_eq!(r.ap, vec![Some(1.0), None]);
        assert_eq!(r.map, Some(1.0));
        // Without the difficult flag both objects count: TP@0.95, TP@0.9, FP@0.8 → AP 1.
        let mut e = VocEvaluator::new(2);
        e.add_image(&gt, &[1, 1], None, &det, &[1, 1, 1], &[0.9, 0.8, 0.95])
            .unwrap();
        assert_eq!(e.finish().ap[0], Some(1.0));
    }

    #[test]
    fn no_fallback_to_second_best() {
        // Detection 0 (higher score) takes gt 0; detection 1 overlaps gt 0 best and gt 1 enough,
        // but it must not fall back to gt 1.
        let gt = [[0.0, 0.0, 10.0, 10.0], [0.0, 4.0, 10.0, 14.0]];
        let det = [[0.0, 0.0, 10.0, 10.0], [0.0, 1.0, 10.0, 11.0]];
        let mut e = VocEvaluator::new(1);
        e.add_image(&gt, &[1, 1], None, &det, &[1, 1], &[0.9, 0.8])
            .unwrap();
        let r = e.finish();
        // TP, FP with 2 positives: AP = 0.5 * 1.
        assert!((r.ap[0].unwrap() - 0.5).abs() < 1e-12);
    }
}
