//! COCO-style box evaluation with the definitions of the official `pycocotools` COCOeval.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::input::{Detections, GroundTruth, validate};
use crate::{EvalError, group_by_label};

/// Number of IoU thresholds (0.50:0.05:0.95).
const T: usize = 10;
/// Number of recall thresholds (0:0.01:1).
const R: usize = 101;
/// Area ranges: all, small, medium, large.
const A: usize = 4;
/// Detections kept per image and class (the largest of the maxDets).
const MAX_DET: usize = 100;
/// Per-image detection limits of the summary: 1, 10, 100.
const MAX_DETS: [usize; 3] = [1, 10, MAX_DET];
/// Area ranges as COCOeval: `[0, 1e5^2], [0, 32^2], [32^2, 96^2], [96^2, 1e5^2]`, both ends inclusive.
const AREA_RNG: [[f64; 2]; A] = [[0.0, 1e10], [0.0, 1024.0], [1024.0, 9216.0], [9216.0, 1e10]];

const MATCHED: u8 = 1;
const IGNORED: u8 = 2;

/// numpy's `linspace(start, stop, num)`, operation for operation, so the thresholds are the very
/// same doubles as COCOeval's.
fn linspace<const N: usize>(start: f64, stop: f64) -> [f64; N] {
    let step = (stop - start) / (N - 1) as f64;
    let mut v = [0.0; N];
    for (i, x) in v.iter_mut().enumerate() {
        *x = i as f64 * step + start;
    }
    v[N - 1] = stop;
    v
}

/// IoU thresholds `0.50, 0.55, ..., 0.95`, bit-identical to COCOeval's.
pub fn iou_thresholds() -> [f64; 10] {
    linspace::<T>(0.5, 0.95)
}

/// Recall thresholds `0, 0.01, ..., 1`, bit-identical to COCOeval's.
pub fn recall_thresholds() -> [f64; 101] {
    linspace::<R>(0.0, 1.0)
}

/// What COCOeval keeps of one (image, class): the scores of its top detections and, per area
/// range and IoU threshold, whether each was matched or ignored.
#[derive(Clone, Debug)]
struct ImageClass {
    /// Descending, at most [`MAX_DET`].
    scores: Vec<f32>,
    /// `[a][t][d]` bit flags ([`MATCHED`], [`IGNORED`]).
    flags: Vec<u8>,
    /// Number of ground truths that are not ignored, per area range.
    npig: [u32; A],
}

/// Streaming COCO-style evaluator: AP averaged over IoU 0.50:0.05:0.95 with 101-point
/// interpolation, AP50, AP75, AP small/medium/large, AR at 1/10/100 detections per image.
///
/// The definitions are those of `pycocotools`' COCOeval for boxes: IoU on `x, y, w, h` without
/// `+1`; per image and class the 100 best-scoring detections are matched greedily in descending
/// score to the best still-free ground truth with IoU `>=` the threshold (preferring objects that
/// are not ignored); crowd regions and objects outside the area range are ignored, as are
/// unmatched detections outside it; precision is the monotone envelope sampled at the 101 recall
/// thresholds; -1 marks undefined entries, which the summary leaves out. Images are in the order
/// added (COCOeval sorts them by id, so give them in id order for identical tie-breaking).
///
/// Per image only the scores and match flags of the detections are kept, not the boxes.
#[derive(Clone, Debug)]
pub struct CocoEvaluator {
    num_classes: usize,
    n_images: usize,
    n_gt: Vec<usize>,
    n_det: Vec<usize>,
    records: Vec<Vec<ImageClass>>,
    iou_thrs: [f64; T],
}

/// The twelve numbers of COCOeval's `summarize()`, in its order. `-1` means undefined (no ground
/// truth in that range), as in COCOeval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CocoStats {
    /// AP @ IoU 0.50:0.95, all areas, 100 detections.
    pub ap: f64,
    /// AP @ IoU 0.50.
    pub ap50: f64,
    /// AP @ IoU 0.75.
    pub ap75: f64,
    /// AP for small objects (area < 32²).
    pub ap_small: f64,
    /// AP for medium objects (32² to 96²).
    pub ap_medium: f64,
    /// AP for large objects (area > 96²).
    pub ap_large: f64,
    /// AR with 1 detection per image.
    pub ar1: f64,
    /// AR with 10 detections per image.
    pub ar10: f64,
    /// AR with 100 detections per image.
    pub ar100: f64,
    /// AR for small objects (100 detections).
    pub ar_small: f64,
    /// AR for medium objects.
    pub ar_medium: f64,
    /// AR for large objects.
    pub ar_large: f64,
}

impl CocoStats {
    /// The numbers in the order of COCOeval's `stats` array.
    pub fn to_array(&self) -> [f64; 12] {
        [
            self.ap,
            self.ap50,
            self.ap75,
            self.ap_small,
            self.ap_medium,
            self.ap_large,
            self.ar1,
            self.ar10,
            self.ar100,
            self.ar_small,
            self.ar_medium,
            self.ar_large,
        ]
    }

    /// The inverse of [`CocoStats::to_array`].
    pub fn from_array(s: [f64; 12]) -> Self {
        Self {
            ap: s[0],
            ap50: s[1],
            ap75: s[2],
            ap_small: s[3],
            ap_medium: s[4],
            ap_large: s[5],
            ar1: s[6],
            ar10: s[7],
            ar100: s[8],
            ar_small: s[9],
            ar_medium: s[10],
            ar_large: s[11],
        }
    }
}

/// What [`CocoEvaluator::finish`] returns. Per-class vectors are indexed by `label - 1`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CocoResult {
    /// The twelve summary numbers.
    pub stats: CocoStats,
    /// AP @ IoU 0.50:0.95 per class (all areas, 100 detections); `None` without ground truth.
    pub ap_per_class: Vec<Option<f64>>,
    /// AP @ IoU 0.50 per class.
    pub ap50_per_class: Vec<Option<f64>>,
    /// Ground-truth objects per class (crowd regions included).
    pub n_gt: Vec<usize>,
    /// Detections per class (all of them, before the 100-per-image cut).
    pub n_det: Vec<usize>,
    /// Number of images evaluated.
    pub n_images: usize,
}

/// pycocotools' `bbIou` on `[x, y, w, h]` doubles; for a crowd region the union is the detection.
#[inline]
fn coco_iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let w = (d[2] + d[0]).min(g[2] + g[0]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[3] + d[1]).min(g[3] + g[1]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let i = w * h;
    let da = d[2] * d[3];
    let u = if crowd { da } else { da + g[2] * g[3] - i };
    i / u
}

/// `[ymin, xmin, ymax, xmax]` f32 to COCO's `[x, y, w, h]` f64.
#[inline]
pub fn yxyx_to_xywh(b: &[f32; 4]) -> [f64; 4] {
    let (y0, x0, y1, x1) = (b[0] as f64, b[1] as f64, b[2] as f64, b[3] as f64);
    [x0, y0, x1 - x0, y1 - y0]
}

impl CocoEvaluator {
    /// An evaluator for labels `1..=num_classes`.
    pub fn new(num_classes: usize) -> Self {
        Self {
            num_classes,
            n_images: 0,
            n_gt: vec![0; num_classes],
            n_det: vec![0; num_classes],
            records: vec![Vec::new(); num_classes],
            iou_thrs: iou_thresholds(),
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

    /// Adds one image: boxes `[ymin, xmin, ymax, xmax]`, labels `1..=C`, `gt_crowd` the COCO
    /// `iscrowd` flags (`None`: none). Object areas are the box areas; use [`CocoEvaluator::add`]
    /// to give other areas. On error nothing is recorded.
    pub fn add_image(
        &mut self,
        gt_boxes: &[[f32; 4]],
        gt_labels: &[u32],
        gt_crowd: Option<&[bool]>,
        det_boxes: &[[f32; 4]],
        det_labels: &[u32],
        det_scores: &[f32],
    ) -> Result<(), EvalError> {
        let gt = GroundTruth {
            boxes: gt_boxes,
            labels: gt_labels,
            crowd: gt_crowd,
            ..Default::default()
        };
        let det = Detections {
            boxes: det_boxes,
            labels: det_labels,
            scores: det_scores,
        };
        self.add(&gt, &det)
    }

    /// Adds one image given as [`GroundTruth`] (uses `crowd` and `areas`; `difficult` is a VOC
    /// notion and is not used, as COCOeval only honours `iscrowd`) and [`Detections`].
    pub fn add(&mut self, gt: &GroundTruth<'_>, det: &Detections<'_>) -> Result<(), EvalError> {
        validate(self.n_images, self.num_classes, gt, det)?;
        self.n_images += 1;
        // Grouped by label, descending score, ties in input order (COCOeval's mergesort).
        let mut det_order: Vec<usize> = (0..det.boxes.len()).collect();
        det_order.sort_by(|&a, &b| {
            det.labels[a]
                .cmp(&det.labels[b])
                .then(det.scores[b].total_cmp(&det.scores[a]))
        });
        let mut gt_order: Vec<usize> = (0..gt.boxes.len()).collect();
        gt_order.sort_by_key(|&i| gt.labels[i]);

        for (label, gts, dets) in group_by_label(&gt_order, gt.labels, &det_order, det.labels) {
            let c = label as usize - 1;
            self.n_gt[c] += gts.len();
            self.n_det[c] += dets.len();
            let dets = &dets[..dets.len().min(MAX_DET)];
            let rec = self.eval_image_class(gt, det, gts, dets);
            self.records[c].push(rec);
        }
        Ok(())
    }

    /// COCOeval's `evaluateImg` for one image and class, for every area range and threshold.
    fn eval_image_class(
        &self,
        gt: &GroundTruth<'_>,
        det: &Detections<'_>,
        gts: &[usize],
        dets: &[usize],
    ) -> ImageClass {
        let (nd, ng) = (dets.len(), gts.len());
        let g_box: Vec<[f64; 4]> = gts.iter().map(|&g| yxyx_to_xywh(&gt.boxes[g])).collect();
        let g_crowd: Vec<bool> = gts
            .iter()
            .map(|&g| gt.crowd.is_some_and(|c| c[g]))
            .collect();
        let g_area: Vec<f64> = match gt.areas {
            Some(a) => gts.iter().map(|&g| a[g]).collect(),
            None => g_box.iter().map(|b| b[2] * b[3]).collect(),
        };
        let d_box: Vec<[f64; 4]> = dets.iter().map(|&d| yxyx_to_xywh(&det.boxes[d])).collect();
        // ious[d * ng + g]
        let mut ious = vec![0.0f64; nd * ng];
        for (di, db) in d_box.iter().enumerate() {
            for (gi, gb) in g_box.iter().enumerate() {
                ious[di * ng + gi] = coco_iou(db, gb, g_crowd[gi]);
            }
        }
        let mut flags = vec![0u8; A * T * nd];
        let mut npig = [0u32; A];
        let mut g_ig = vec![false; ng];
        let mut g_sorted: Vec<usize> = Vec::with_capacity(ng);
        let mut g_taken = vec![false; ng];
        for (a, rng) in AREA_RNG.iter().enumerate() {
            for (gi, ig) in g_ig.iter_mut().enumerate() {
                *ig = g_crowd[gi] || g_area[gi] < rng[0] || g_area[gi] > rng[1];
            }
            npig[a] = g_ig.iter().filter(|i| !**i).count() as u32;
            // Objects that count first, ignored ones last, otherwise in input order.
            g_sorted.clear();
            g_sorted.extend((0..ng).filter(|&g| !g_ig[g]));
            g_sorted.extend((0..ng).filter(|&g| g_ig[g]));
            for (t, &thr) in self.iou_thrs.iter().enumerate() {
                g_taken.iter_mut().for_each(|x| *x = false);
                let fl = &mut flags[(a * T + t) * nd..(a * T + t + 1) * nd];
                for (di, f) in fl.iter_mut().enumerate() {
                    let mut best_iou = thr.min(1.0 - 1e-10);
                    let mut m: Option<usize> = None;
                    for &g in &g_sorted {
                        if g_taken[g] && !g_crowd[g] {
                            continue;
                        }
                        // Once a counted object is matched, ignored ones (sorted last) cannot win.
                        if m.is_some_and(|m| !g_ig[m]) && g_ig[g] {
                            break;
                        }
                        let iou = ious[di * ng + g];
                        if iou < best_iou {
                            continue;
                        }
                        best_iou = iou;
                        m = Some(g);
                    }
                    match m {
                        Some(g) => {
                            g_taken[g] = true;
                            *f = MATCHED | if g_ig[g] { IGNORED } else { 0 };
                        }
                        None => {
                            let area = d_box[di][2] * d_box[di][3];
                            if area < rng[0] || area > rng[1] {
                                *f = IGNORED;
                            }
                        }
                    }
                }
            }
        }
        ImageClass {
            scores: dets.iter().map(|&d| det.scores[d]).collect(),
            flags,
            npig,
        }
    }

    /// COCOeval's `accumulate` for one class: precision `[t][r][a][m]` and recall `[t][a][m]`,
    /// -1 where the class has no counted ground truth.
    fn accumulate_class(&self, c: usize, rec_thrs: &[f64; R]) -> (Vec<f64>, Vec<f64>) {
        let m_n = MAX_DETS.len();
        let mut precision = vec![-1.0f64; T * R * A * m_n];
        let mut recall = vec![-1.0f64; T * A * m_n];
        let recs = &self.records[c];
        let mut npig = [0u64; A];
        for r in recs {
            for (sum, &n) in npig.iter_mut().zip(&r.npig) {
                *sum += n as u64;
            }
        }
        // Every kept detection, ranked once by descending score; ties in image order (COCOeval's
        // stable mergesort). The ranking for a smaller maxDets is a subsequence of this one.
        let mut entries: Vec<(u32, u32)> = Vec::new();
        for (ri, r) in recs.iter().enumerate() {
            entries.extend((0..r.scores.len() as u32).map(|d| (ri as u32, d)));
        }
        let mut keys: Vec<u64> = entries
            .iter()
            .enumerate()
            .map(|(pos, &(ri, d))| {
                let s = recs[ri as usize].scores[d as usize];
                (u64::from(!crate::score_bits(s)) << 32) | pos as u64
            })
            .collect();
        keys.sort_unstable();
        let nd_all = keys.len();
        // Flags in rank order, one contiguous column per (area, threshold).
        let mut cols = vec![0u8; A * T * nd_all];
        let mut det_rank = vec![0u32; nd_all];
        for (i, &k) in keys.iter().enumerate() {
            let (ri, d) = entries[(k & 0xffff_ffff) as usize];
            let r = &recs[ri as usize];
            let n = r.scores.len();
            for at in 0..A * T {
                cols[at * nd_all + i] = r.flags[at * n + d as usize];
            }
            det_rank[i] = d;
        }
        let mut rc: Vec<f64> = Vec::with_capacity(nd_all);
        let mut pr: Vec<f64> = Vec::with_capacity(nd_all);
        let mut sel: Vec<u32> = Vec::with_capacity(nd_all);
        for (mi, &max_det) in MAX_DETS.iter().enumerate() {
            sel.clear();
            sel.extend((0..nd_all as u32).filter(|&i| (det_rank[i as usize] as usize) < max_det));
            let nd = sel.len();
            for a in 0..A {
                if npig[a] == 0 {
                    continue;
                }
                let n_pos = npig[a] as f64;
                for t in 0..T {
                    let col = &cols[(a * T + t) * nd_all..(a * T + t + 1) * nd_all];
                    rc.clear();
                    pr.clear();
                    let (mut tp, mut fp) = (0u64, 0u64);
                    for &i in &sel {
                        let f = col[i as usize];
                        if f & IGNORED == 0 {
                            if f & MATCHED != 0 {
                                tp += 1;
                            } else {
                                fp += 1;
                            }
                        }
                        let (tpf, fpf) = (tp as f64, fp as f64);
                        rc.push(tpf / n_pos);
                        pr.push(tpf / (fpf + tpf + f64::EPSILON));
                    }
                    recall[(t * A + a) * m_n + mi] = rc.last().copied().unwrap_or(0.0);
                    for i in (1..nd).rev() {
                        if pr[i] > pr[i - 1] {
                            pr[i - 1] = pr[i];
                        }
                    }
                    // searchsorted(rc, rec_thrs, side='left'); past the end precision is 0.
                    let mut pi = 0usize;
                    for (ri, &thr) in rec_thrs.iter().enumerate() {
                        while pi < nd && rc[pi] < thr {
                            pi += 1;
                        }
                        precision[((t * R + ri) * A + a) * m_n + mi] =
                            if pi < nd { pr[pi] } else { 0.0 };
                    }
                }
            }
        }
        (precision, recall)
    }

    /// Accumulates and summarises what was added so far (the evaluator can go on afterwards).
    pub fn finish(&self) -> CocoResult {
        let rec_thrs = recall_thresholds();
        let per_class: Vec<(Vec<f64>, Vec<f64>)> = (0..self.num_classes)
            .into_par_iter()
            .map(|c| self.accumulate_class(c, &rec_thrs))
            .collect();
        let pc = &per_class;
        let nk = self.num_classes;
        let ap = |ts: &[usize], a: usize, mi: usize, classes: &[usize]| {
            let mut vals = Vec::with_capacity(ts.len() * R * classes.len());
            for &t in ts {
                for r in 0..R {
                    vals.extend(
                        classes
                            .iter()
                            .map(|&k| pc[k].0[((t * R + r) * A + a) * MAX_DETS.len() + mi]),
                    );
                }
            }
            mean_valid(&vals)
        };
        let ar = |a: usize, mi: usize| {
            let mut vals = Vec::with_capacity(T * nk);
            for t in 0..T {
                vals.extend((0..nk).map(|k| pc[k].1[(t * A + a) * MAX_DETS.len() + mi]));
            }
            mean_valid(&vals)
        };
        let all_t: Vec<usize> = (0..T).collect();
        let all_k: Vec<usize> = (0..self.num_classes).collect();
        // Indices of 0.5 and 0.75 in the thresholds, found as COCOeval does (exact equality).
        let t50 = self
            .iou_thrs
            .iter()
            .position(|&t| t == 0.5)
            .expect("0.5 is a threshold");
        let t75 = self
            .iou_thrs
            .iter()
            .position(|&t| t == 0.75)
            .expect("0.75 is a threshold");
        let stats = CocoStats {
            ap: ap(&all_t, 0, 2, &all_k),
            ap50: ap(&[t50], 0, 2, &all_k),
            ap75: ap(&[t75], 0, 2, &all_k),
            ap_small: ap(&all_t, 1, 2, &all_k),
            ap_medium: ap(&all_t, 2, 2, &all_k),
            ap_large: ap(&all_t, 3, 2, &all_k),
            ar1: ar(0, 0),
            ar10: ar(0, 1),
            ar100: ar(0, 2),
            ar_small: ar(1, 2),
            ar_medium: ar(2, 2),
            ar_large: ar(3, 2),
        };
        let per = |ts: &[usize]| -> Vec<Option<f64>> {
            (0..self.num_classes)
                .map(|k| {
                    let v = ap(ts, 0, 2, &[k]);
                    (v > -1.0).then_some(v)
                })
                .collect()
        };
        CocoResult {
            stats,
            ap_per_class: per(&all_t),
            ap50_per_class: per(&[t50]),
            n_gt: self.n_gt.clone(),
            n_det: self.n_det.clone(),
            n_images: self.n_images,
        }
    }
}

/// Mean over the defined entries (`> -1`); -1 if there is none, as COCOeval's summarize.
fn mean_valid(vals: &[f64]) -> f64 {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for &v in vals.iter().filter(|v| **v > -1.0) {
        sum += v;
        n += 1;
    }
    if n == 0 { -1.0 } else { sum / n as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_match_numpy() {
        // Values printed by numpy.linspace(.5, .95, 10) and linspace(0, 1, 101).
        let t = iou_thresholds();
        assert_eq!(t[0], 0.5);
        assert_eq!(t[5], 0.75);
        assert_eq!(t[9], 0.95);
        assert_eq!(t[1], 0.55);
        let r = recall_thresholds();
        assert_eq!(r[100], 1.0);
        assert_eq!(r[7], 0.07);
    }

    #[test]
    fn iou_plain_and_crowd() {
        let d = [0.0, 0.0, 10.0, 10.0];
        let g = [5.0, 0.0, 10.0, 10.0];
        assert!((coco_iou(&d, &g, false) - 50.0 / 150.0).abs() < 1e-15);
        assert!((coco_iou(&d, &g, true) - 0.5).abs() < 1e-15);
        assert_eq!(coco_iou(&d, &[10.0, 0.0, 5.0, 5.0], false), 0.0);
    }

    #[test]
    fn perfect_detections_score_one() {
        let mut e = CocoEvaluator::new(2);
        let gt = [[0.0, 0.0, 20.0, 20.0], [10.0, 10.0, 150.0, 150.0]];
        e.add_image(&gt, &[1, 2], None, &gt, &[1, 2], &[0.9, 0.8])
            .unwrap();
        let s = e.finish().stats;
        // Precision is tp / (tp + fp + eps), a hair under 1, as COCOeval.
        assert!((s.ap - 1.0).abs() < 1e-12);
        // A 20x20 box is small, the 140x140 one large; no medium object.
        assert!((s.ap_small - 1.0).abs() < 1e-12);
        assert_eq!(s.ap_medium, -1.0);
        assert!((s.ap_large - 1.0).abs() < 1e-12);
        assert_eq!(s.ar1, 1.0);
    }
}
