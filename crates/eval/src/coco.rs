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

/// What COCOeval keeps of a class's (image, class) evaluations, image after image: for each
/// detection kept (the 100 best of its image), its score, its rank in the image and, per area
/// range and IoU threshold, whether it was matched or ignored.
#[derive(Clone, Debug, Default)]
struct ClassStore {
    /// Scores, each image's in descending order.
    scores: Vec<f32>,
    /// Rank of the detection within its image and class (0 = best).
    rank: Vec<u8>,
    /// `[detection][a][t]` bit flags ([`MATCHED`], [`IGNORED`]).
    flags: Vec<u8>,
    /// Ground truths that are not ignored, per area range, over all images.
    npig: [u64; A],
}

/// Buffers reused from image to image.
#[derive(Clone, Debug, Default)]
struct Scratch {
    det_order: Vec<usize>,
    gt_order: Vec<usize>,
    g_box: Vec<[f64; 4]>,
    g_crowd: Vec<bool>,
    g_area: Vec<f64>,
    d_box: Vec<[f64; 4]>,
    ious: Vec<f64>,
    g_ig: Vec<bool>,
    g_sorted: Vec<usize>,
    g_taken: Vec<bool>,
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
    stores: Vec<ClassStore>,
    scratch: Scratch,
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

/// COCOeval's `evaluateImg` for one image and class, for every area range and threshold;
/// appends the outcome to the class's store. `dets` are in descending score, at most 100.
fn eval_image_class(
    iou_thrs: &[f64; T],
    sc: &mut Scratch,
    store: &mut ClassStore,
    gt: &GroundTruth<'_>,
    det: &Detections<'_>,
    gts: &[usize],
    dets: &[usize],
) {
    let (nd, ng) = (dets.len(), gts.len());
    sc.g_box.clear();
    sc.g_box
        .extend(gts.iter().map(|&g| yxyx_to_xywh(&gt.boxes[g])));
    sc.g_crowd.clear();
    sc.g_crowd
        .extend(gts.iter().map(|&g| gt.crowd.is_some_and(|c| c[g])));
    sc.g_area.clear();
    match gt.areas {
        Some(a) => sc.g_area.extend(gts.iter().map(|&g| a[g])),
        None => sc.g_area.extend(sc.g_box.iter().map(|b| b[2] * b[3])),
    }
    sc.d_box.clear();
    sc.d_box
        .extend(dets.iter().map(|&d| yxyx_to_xywh(&det.boxes[d])));
    // ious[d * ng + g]
    sc.ious.clear();
    for db in &sc.d_box {
        for (gb, &crowd) in sc.g_box.iter().zip(&sc.g_crowd) {
            sc.ious.push(coco_iou(db, gb, crowd));
        }
    }
    let base = store.flags.len();
    store.flags.resize(base + nd * A * T, 0);
    let flags = &mut store.flags[base..];
    let (g_ig, g_sorted, g_taken) = (&mut sc.g_ig, &mut sc.g_sorted, &mut sc.g_taken);
    for (a, rng) in AREA_RNG.iter().enumerate() {
        g_ig.clear();
        g_ig.extend(
            (0..ng).map(|g| sc.g_crowd[g] || sc.g_area[g] < rng[0] || sc.g_area[g] > rng[1]),
        );
        store.npig[a] += g_ig.iter().filter(|i| !**i).count() as u64;
        // Objects that count first, ignored ones last, otherwise in input order.
        g_sorted.clear();
        g_sorted.extend((0..ng).filter(|&g| !g_ig[g]));
        g_sorted.extend((0..ng).filter(|&g| g_ig[g]));
        for (t, &thr) in iou_thrs.iter().enumerate() {
            g_taken.clear();
            g_taken.resize(ng, false);
            for di in 0..nd {
                let mut best_iou = thr.min(1.0 - 1e-10);
                let mut m: Option<usize> = None;
                for &g in g_sorted.iter() {
                    if g_taken[g] && !sc.g_crowd[g] {
                        continue;
                    }
                    // Once a counted object is matched, ignored ones (sorted last) cannot win.
                    if m.is_some_and(|m| !g_ig[m]) && g_ig[g] {
                        break;
                    }
                    let iou = sc.ious[di * ng + g];
                    if iou < best_iou {
                        continue;
                    }
                    best_iou = iou;
                    m = Some(g);
                }
                let f = &mut flags[di * A * T + a * T + t];
                match m {
                    Some(g) => {
                        g_taken[g] = true;
                        *f = MATCHED | if g_ig[g] { IGNORED } else { 0 };
                    }
                    None => {
                        let area = sc.d_box[di][2] * sc.d_box[di][3];
                        if area < rng[0] || area > rng[1] {
                            *f = IGNORED;
                        }
                    }
                }
            }
        }
    }
    store.scores.extend(dets.iter().map(|&d| det.scores[d]));
    store.rank.extend(0..nd as u8);
}

impl CocoEvaluator {
    /// An evaluator for labels `1..=num_classes`.
    pub fn new(num_classes: usize) -> Self {
        Self {
            num_classes,
            n_images: 0,
            n_gt: vec![0; num_classes],
            n_det: vec![0; num_classes],
            stores: vec![ClassStore::default(); num_classes],
            scratch: Scratch::default(),
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
            crowd: gt_crowd,
            ..GroundTruth::new(gt_boxes, gt_labels)
        };
        self.add(&gt, &Detections::new(det_boxes, det_labels, det_scores))
    }

    /// Adds one image given as [`GroundTruth`] (uses `crowd` and `areas`; `difficult` is a VOC
    /// notion and is not used, as COCOeval only honours `iscrowd`) and [`Detections`].
    pub fn add(&mut self, gt: &GroundTruth<'_>, det: &Detections<'_>) -> Result<(), EvalError> {
        validate(self.n_images, self.num_classes, gt, det)?;
        self.n_images += 1;
        let mut sc = std::mem::take(&mut self.scratch);
        // Grouped by label, descending score, ties in input order (COCOeval's mergesort).
        let mut det_order = std::mem::take(&mut sc.det_order);
        det_order.clear();
        det_order.extend(0..det.boxes.len());
        det_order.sort_by_key(|&i| (det.labels[i], !crate::score_bits(det.scores[i])));
        let mut gt_order = std::mem::take(&mut sc.gt_order);
        gt_order.clear();
        gt_order.extend(0..gt.boxes.len());
        gt_order.sort_by_key(|&i| gt.labels[i]);

        for (label, gts, dets) in group_by_label(&gt_order, gt.labels, &det_order, det.labels) {
            let c = label as usize - 1;
            self.n_gt[c] += gts.len();
            self.n_det[c] += dets.len();
            let dets = &dets[..dets.len().min(MAX_DET)];
            eval_image_class(
                &self.iou_thrs,
                &mut sc,
                &mut self.stores[c],
                gt,
                det,
                gts,
                dets,
            );
        }
        sc.det_order = det_order;
        sc.gt_order = gt_order;
        self.scratch = sc;
        Ok(())
    }

    /// COCOeval's `accumulate` for one class: precision `[t][r][a][m]` and recall `[t][a][m]`,
    /// -1 where the class has no counted ground truth.
    fn accumulate_class(&self, c: usize, rec_thrs: &[f64; R]) -> (Vec<f64>, Vec<f64>) {
        let m_n = MAX_DETS.len();
        let mut precision = vec![-1.0f64; T * R * A * m_n];
        let mut recall = vec![-1.0f64; T * A * m_n];
        let store = &self.stores[c];
        let npig = store.npig;
        // Every kept detection, ranked once by descending score; ties in image order (COCOeval's
        // stable mergesort over the images' concatenation, which is the store's order). The
        // ranking for a smaller maxDets is a subsequence of this one.
        let mut keys: Vec<u64> = store
            .scores
            .iter()
            .enumerate()
            .map(|(pos, &s)| (u64::from(!crate::score_bits(s)) << 32) | pos as u64)
            .collect();
        keys.sort_unstable();
        let nd_all = keys.len();
        // Flags in rank order, one contiguous column per (area, threshold).
        let mut cols = vec![0u8; A * T * nd_all];
        let mut det_rank = vec![0u8; nd_all];
        for (i, &k) in keys.iter().enumerate() {
            let pos = (k & 0xffff_ffff) as usize;
            let row = &store.flags[pos * A * T..(pos + 1) * A * T];
            for (at, &f) in row.iter().enumerate() {
                cols[at * nd_all + i] = f;
            }
            det_rank[i] = store.rank[pos];
        }
        // COCOeval computes recall and precision after every ranked detection, takes the
        // precision envelope (suffix maximum) and samples it at the first rank whose recall
        // reaches each threshold. Recall only grows at true positives, and precision only rises
        // there (a false positive lowers it, an ignored detection repeats it), so that rank is a
        // true positive and the suffix maximum is attained at one: evaluating precision at the
        // true positives alone gives the very same doubles with far fewer divisions.
        let mut fp_at_tp: Vec<u32> = Vec::new();
        let mut pr: Vec<f64> = Vec::new();
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
                    fp_at_tp.clear();
                    let mut fp = 0u32;
                    for &i in &sel {
                        let f = col[i as usize];
                        if f & IGNORED == 0 {
                            if f & MATCHED != 0 {
                                fp_at_tp.push(fp);
                            } else {
                                fp += 1;
                            }
                        }
                    }
                    let ntp = fp_at_tp.len();
                    recall[(t * A + a) * m_n + mi] = if nd > 0 { ntp as f64 / n_pos } else { 0.0 };
                    pr.clear();
                    pr.extend(fp_at_tp.iter().enumerate().map(|(k, &fp)| {
                        let (tpf, fpf) = ((k + 1) as f64, fp as f64);
                        tpf / (fpf + tpf + f64::EPSILON)
                    }));
                    for k in (1..ntp).rev() {
                        if pr[k] > pr[k - 1] {
                            pr[k - 1] = pr[k];
                        }
                    }
                    // searchsorted(rc, rec_thrs, side='left') over true positives only; past the
                    // last one precision is 0 (also when nothing was detected).
                    let mut k = 0usize;
                    for (ri, &thr) in rec_thrs.iter().enumerate() {
                        while k < ntp && ((k + 1) as f64 / n_pos) < thr {
                            k += 1;
                        }
                        precision[((t * R + ri) * A + a) * m_n + mi] =
                            if k < ntp { pr[k] } else { 0.0 };
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
