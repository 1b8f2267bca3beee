//! The anchor check: how well an anchor layout covers a data set's boxes, and a layout fitted to
//! them (in the spirit of YOLO's anchor check, for RetinaNet's layout of shapes repeated on every
//! pyramid level).
//!
//! The boxes are those the encoder sees — at the training size, where the training transform
//! puts them — and matching is the encoder's own ([`Encoder::match_boxes`]), so "matched" means
//! exactly that some anchor is positive for the box by IoU (`> hi`), not only through the one
//! anchor every box is forced onto.
//!
//! ```
//! use retinanet_encoder::anchor_check::{CheckImage, fit_anchors, match_stats};
//! use retinanet_encoder::AnchorConfig;
//!
//! // 10 px objects in 129 px images: the tutorial's 28 px anchors at stride 8 miss them.
//! let images: Vec<CheckImage> = (0..20)
//!     .map(|i| CheckImage::new((129, 129), vec![[3.0 * i as f32, 40.0, 3.0 * i as f32 + 10.0, 50.0]]))
//!     .collect();
//! let before = match_stats(&AnchorConfig::default(), (0.3, 0.5), &images)?;
//! assert_eq!(before.matched, 0);
//! let fitted = fit_anchors(3, 4, 4, (0.3, 0.5), &images)?.unwrap();
//! let after = match_stats(&fitted, (0.3, 0.5), &images)?;
//! assert!(after.matched_fraction() > 0.9);
//! # Ok::<(), retinanet_encoder::EncodeError>(())
//! ```

use rayon::prelude::*;
use retinanet_anchors::AnchorConfig;

use crate::boxes::Bbox;
use crate::{EncodeError, Encoder, EncoderConfig};

/// One image as the encoder sees it: its size `(H, W)` and its boxes in those pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckImage {
    /// `(H, W)` of the network input.
    pub size: (usize, usize),
    /// `[ymin, xmin, ymax, xmax]` boxes.
    pub boxes: Vec<Bbox>,
    /// Per box, whether a training crop cut part of its object away (empty: none). Such a box
    /// still takes part in the matching, but the statistics and the fit are of whole objects:
    /// the slivers a crop leaves say nothing about the sizes anchors need.
    pub cut: Vec<bool>,
}

impl CheckImage {
    /// An image of `size` whose boxes are all whole objects.
    pub fn new(size: (usize, usize), boxes: Vec<Bbox>) -> Self {
        Self {
            size,
            boxes,
            cut: Vec::new(),
        }
    }

    /// Whether box `i` was cut by a crop.
    pub fn is_cut(&self, i: usize) -> bool {
        self.cut.get(i).copied().unwrap_or(false)
    }

    /// The boxes of whole objects.
    pub fn whole_boxes(&self) -> impl Iterator<Item = &Bbox> {
        self.boxes
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.is_cut(*i))
            .map(|(_, b)| b)
    }
}

/// Upper edges of [`SizeSummary::octaves`]' bins (the last bin is open).
pub const OCTAVE_EDGES: [f32; 6] = [8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The distribution of box sizes, as the encoder measures them (`h = ymax - ymin`), of whole
/// objects.
#[derive(Clone, Debug, PartialEq)]
pub struct SizeSummary {
    /// Boxes counted.
    pub count: usize,
    /// Boxes left out: cut by a crop.
    pub cut: usize,
    /// Side `sqrt(h * w)`: minimum, 10th, 25th, 50th, 75th, 90th percentile, maximum.
    pub side: [f32; 7],
    /// Aspect ratio `h / w`: 10th, 50th, 90th percentile.
    pub aspect: [f32; 3],
    /// Boxes whose side lies below 8, in [8, 16), [16, 32), ..., [128, 256), and from 256 up.
    pub octaves: [usize; 7],
}

/// Percentile `q` in `[0, 1]` of sorted values (nearest rank).
fn percentile(sorted: &[f32], q: f64) -> f32 {
    if sorted.is_empty() {
        return f32::NAN;
    }
    let i = (q * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn side_of(b: &Bbox) -> f32 {
    ((b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0)).sqrt()
}

/// The size distribution of the whole-object boxes of `images`.
pub fn size_summary(images: &[CheckImage]) -> SizeSummary {
    let mut sides: Vec<f32> = Vec::new();
    let mut aspects: Vec<f32> = Vec::new();
    let mut octaves = [0usize; 7];
    let cut = images
        .iter()
        .map(|i| i.boxes.len() - i.whole_boxes().count())
        .sum();
    for b in images.iter().flat_map(|i| i.whole_boxes()) {
        let s = side_of(b);
        sides.push(s);
        let (h, w) = (b[2] - b[0], b[3] - b[1]);
        if h > 0.0 && w > 0.0 {
            aspects.push(h / w);
        }
        octaves[OCTAVE_EDGES.iter().take_while(|&&e| s >= e).count()] += 1;
    }
    sides.sort_by(f32::total_cmp);
    aspects.sort_by(f32::total_cmp);
    let q = |v: &[f32], qs: &[f64]| qs.iter().map(|&q| percentile(v, q)).collect::<Vec<_>>();
    SizeSummary {
        count: sides.len(),
        cut,
        side: q(&sides, &[0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
            .try_into()
            .expect("seven"),
        aspect: q(&aspects, &[0.1, 0.5, 0.9]).try_into().expect("three"),
        octaves,
    }
}

/// How the encoder matches a data set's boxes with one anchor layout (whole objects only).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MatchStats {
    /// Boxes counted.
    pub boxes: usize,
    /// Boxes whose best anchor IoU is above the positive threshold (`> hi`).
    pub matched: usize,
    /// Mean of every box's best anchor IoU.
    pub mean_best_iou: f64,
    /// Positive anchors over all boxes (forced ones included).
    pub positives: usize,
    /// Boxes with no positive anchor at all: a neighbour took their best anchor.
    pub without_positive: usize,
}

impl MatchStats {
    /// Fraction of boxes matched by IoU (0 for no box).
    pub fn matched_fraction(&self) -> f64 {
        self.matched as f64 / self.boxes.max(1) as f64
    }

    /// Mean positive anchors per box.
    pub fn positives_per_box(&self) -> f64 {
        self.positives as f64 / self.boxes.max(1) as f64
    }
}

/// Matches every box of `images` with the anchors of `anchors` as the encoder does with IoU
/// thresholds `iou_th = (lo, hi)`.
pub fn match_stats(
    anchors: &AnchorConfig,
    iou_th: (f32, f32),
    images: &[CheckImage],
) -> Result<MatchStats, EncodeError> {
    let Some(first) = images.first() else {
        return Ok(MatchStats::default());
    };
    let enc = Encoder::new(EncoderConfig {
        anchors: anchors.clone(),
        iou_th,
        train_size: first.size,
        num_classes: None,
        postprocess: Default::default(),
    })?;
    let per_image: Vec<MatchStats> = images
        .par_iter()
        .enumerate()
        .map(|(i, img)| {
            let m = enc
                .match_boxes(img.size, &img.boxes)
                .map_err(|e| EncodeError::InImage {
                    image: i,
                    source: Box::new(e),
                })?;
            let mut s = MatchStats::default();
            for (_, b) in m.iter().enumerate().filter(|(i, _)| !img.is_cut(*i)) {
                s.boxes += 1;
                s.matched += (b.best_iou > iou_th.1) as usize;
                s.mean_best_iou += b.best_iou as f64;
                s.positives += b.positives;
                s.without_positive += (b.positives == 0) as usize;
            }
            Ok(s)
        })
        .collect::<Result<_, EncodeError>>()?;
    let mut total = MatchStats::default();
    for s in per_image {
        total.boxes += s.boxes;
        total.matched += s.matched;
        total.mean_best_iou += s.mean_best_iou;
        total.positives += s.positives;
        total.without_positive += s.without_positive;
    }
    total.mean_best_iou /= total.boxes.max(1) as f64;
    Ok(total)
}

/// IoU of two shapes `(h, w)` sharing a centre.
fn shape_iou(a: [f64; 2], b: [f64; 2]) -> f64 {
    let inter = a[0].min(b[0]) * a[1].min(b[1]);
    inter / (a[0] * a[1] + b[0] * b[1] - inter)
}

/// `k` anchor shapes `(h, w)` for a layout that repeats them at `levels` levels, each twice the
/// size of the one before: k-means in IoU distance (`1 - IoU` of centred shapes), where each box
/// joins the shape and level that overlap it most and a shape moves to the geometric mean of its
/// boxes brought down to the first level. Deterministic. Shapes with a non-positive side are
/// left out, and so are the 2% most elongated each way (slivers that crops cut off objects at
/// the image border, which would otherwise claim a shape of their own); `None` when nothing is
/// left.
pub fn kmeans_shapes(shapes: &[[f64; 2]], k: usize, levels: usize) -> Option<Vec<[f64; 2]>> {
    let mut pts: Vec<[f64; 2]> = shapes
        .iter()
        .copied()
        .filter(|s| s[0] > 0.0 && s[1] > 0.0 && s[0].is_finite() && s[1].is_finite())
        .collect();
    if pts.len() >= 50 {
        let mut aspects: Vec<f64> = pts.iter().map(|p| p[0] / p[1]).collect();
        aspects.sort_by(f64::total_cmp);
        let q = |f: f64| aspects[((aspects.len() - 1) as f64 * f).round() as usize];
        let (lo, hi) = (q(0.02), q(0.98));
        pts.retain(|p| (lo..=hi).contains(&(p[0] / p[1])));
    }
    if pts.is_empty() || k == 0 || levels == 0 {
        return None;
    }
    let scale = |s: usize| (1u64 << s) as f64;
    // The first level is set by the smallest boxes (5th percentile, so that a few specks do not
    // drag it); every box is folded into that octave to seed the shapes by aspect ratio.
    let mut sides: Vec<f64> = pts.iter().map(|p| (p[0] * p[1]).sqrt()).collect();
    sides.sort_by(f64::total_cmp);
    let lo = sides[((sides.len() - 1) as f64 * 0.05).round() as usize];
    let fold = |p: [f64; 2]| {
        let side = (p[0] * p[1]).sqrt();
        let s = ((side / lo).log2().floor().max(0.0) as usize).min(levels - 1);
        [p[0] / scale(s), p[1] / scale(s)]
    };
    let mut folded: Vec<[f64; 2]> = pts.iter().map(|&p| fold(p)).collect();
    folded.sort_by(|a, b| (a[0] / a[1]).total_cmp(&(b[0] / b[1])));
    let geo_mean = |v: &[[f64; 2]]| {
        let n = v.len() as f64;
        let (lh, lw) = v
            .iter()
            .fold((0.0, 0.0), |(h, w), p| (h + p[0].ln(), w + p[1].ln()));
        [(lh / n).exp(), (lw / n).exp()]
    };
    let n = folded.len();
    let mut centres: Vec<[f64; 2]> = (0..k)
        .map(|c| {
            let a = (c * n / k).min(n - 1);
            let b = ((c + 1) * n / k).clamp(a + 1, n);
            geo_mean(&folded[a..b])
        })
        .collect();
    let mut assign: Vec<(usize, usize)> = vec![(usize::MAX, 0); pts.len()];
    for _ in 0..50 {
        let mut changed = false;
        let mut worst = (f64::INFINITY, 0usize);
        for (i, &p) in pts.iter().enumerate() {
            let mut best = (f64::NEG_INFINITY, (0, 0));
            for (c, &m) in centres.iter().enumerate() {
                for s in 0..levels {
                    let iou = shape_iou(p, [m[0] * scale(s), m[1] * scale(s)]);
                    if iou > best.0 {
                        best = (iou, (c, s));
                    }
                }
            }
            if best.0 < worst.0 {
                worst = (best.0, i);
            }
            if assign[i] != best.1 {
                assign[i] = best.1;
                changed = true;
            }
        }
        let mut members: Vec<Vec<[f64; 2]>> = vec![Vec::new(); k];
        for (&p, &(c, s)) in pts.iter().zip(&assign) {
            members[c].push([p[0] / scale(s), p[1] / scale(s)]);
        }
        for (c, m) in members.iter().enumerate() {
            centres[c] = if m.is_empty() {
                // An empty shape restarts at the worst-served box.
                changed = true;
                fold(pts[worst.1])
            } else {
                geo_mean(m)
            };
        }
        if !changed {
            break;
        }
    }
    // Tall to wide, then small to large: a stable order to read.
    centres.sort_by(|a, b| {
        (a[0] / a[1])
            .total_cmp(&(b[0] / b[1]))
            .then((a[0] * a[1]).total_cmp(&(b[0] * b[1])))
    });
    Some(centres)
}

/// At most about this many boxes are matched for each trial layout of [`fit_anchors`].
const FIT_SAMPLE_BOXES: usize = 20_000;

/// A layout of `anchors_per_cell` shapes at `levels` levels from `first_stride` fitted to the
/// boxes of `images`: [`kmeans_shapes`], then the common scale of the shapes (within a factor
/// of `sqrt(2)`) that matches the most boxes with the encoder's real grid, where a small box
/// between anchor centres needs a different anchor size than a centred one. `None` without a
/// box.
pub fn fit_anchors(
    anchors_per_cell: usize,
    first_stride: usize,
    levels: usize,
    iou_th: (f32, f32),
    images: &[CheckImage],
) -> Result<Option<AnchorConfig>, EncodeError> {
    let shapes: Vec<[f64; 2]> = images
        .iter()
        .flat_map(|i| i.whole_boxes())
        .map(|b| [(b[2] - b[0]) as f64, (b[3] - b[1]) as f64])
        .collect();
    let Some(base) = kmeans_shapes(&shapes, anchors_per_cell, levels) else {
        return Ok(None);
    };
    // An even sample of whole images (the matching of a box depends on its neighbours).
    let total: usize = images.iter().map(|i| i.boxes.len()).sum();
    let every = total.div_ceil(FIT_SAMPLE_BOXES).max(1);
    let sample: Vec<CheckImage> = images.iter().step_by(every).cloned().collect();
    let layout = |f: f64| AnchorConfig {
        a_hw: base
            .iter()
            .map(|s| [round_tenth(s[0] * f), round_tenth(s[1] * f)])
            .collect(),
        scales: levels,
        first_stride,
        level_scales: None,
        style: Default::default(),
    };
    let mut best: Option<(f64, f64, f64)> = None;
    for i in -6..=6 {
        let f = (i as f64 / 12.0).exp2();
        let cfg = layout(f);
        if cfg.validate().is_err() {
            continue;
        }
        let s = match_stats(&cfg, iou_th, &sample)?;
        let key = (s.matched_fraction(), s.mean_best_iou);
        if best.is_none_or(|(m, iou, _)| key > (m, iou)) {
            best = Some((key.0, key.1, f));
        }
    }
    Ok(best.map(|(_, _, f)| layout(f)))
}

/// Rounded to 0.1 px (at least 0.1), so a suggested layout reads well in a config.
fn round_tenth(v: f64) -> f64 {
    ((v * 10.0).round() / 10.0).max(0.1)
}

/// A suggested layout and how it matches.
#[derive(Clone, Debug, PartialEq)]
pub struct Suggestion {
    /// The layout.
    pub anchors: AnchorConfig,
    /// Its matching of the boxes.
    pub stats: MatchStats,
}

/// Layouts fitted to `images` for the check to suggest: one with `current`'s stride, levels and
/// shapes per cell, and — when that one matches fewer than 90% of the boxes and the stride can
/// halve without going below `finest_stride` — one with half the first stride and a level more
/// (the same top stride), for boxes too small for the first level's grid. The first is the
/// better of them (more boxes matched, by at least 3 points for the finer grid, which costs
/// more compute).
pub fn suggest_anchors(
    current: &AnchorConfig,
    iou_th: (f32, f32),
    images: &[CheckImage],
    finest_stride: usize,
) -> Result<Vec<Suggestion>, EncodeError> {
    let k = current.anchors_per_cell();
    let mut out = Vec::new();
    if let Some(a) = fit_anchors(k, current.first_stride, current.scales, iou_th, images)? {
        let stats = match_stats(&a, iou_th, images)?;
        out.push(Suggestion { anchors: a, stats });
    }
    let finer = current.first_stride / 2;
    let weak = out.first().is_none_or(|s| s.stats.matched_fraction() < 0.9);
    if weak
        && finer >= finest_stride.max(1)
        && current.first_stride.is_multiple_of(2)
        && let Some(a) = fit_anchors(k, finer, current.scales + 1, iou_th, images)?
    {
        let stats = match_stats(&a, iou_th, images)?;
        let gain = out.first().map_or(1.0, |s| {
            stats.matched_fraction() - s.stats.matched_fraction()
        });
        let s = Suggestion { anchors: a, stats };
        if gain >= 0.03 {
            out.insert(0, s);
        } else {
            out.push(s);
        }
    }
    Ok(out)
}
