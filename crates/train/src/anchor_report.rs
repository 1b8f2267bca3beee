//! The anchor check of a run (`train-detector --check-anchors`, and at the start of every run):
//! the training split's boxes where the training transform puts them in the first epoch (its
//! crops, flips, turns and per-batch sizes, from the run's seed), matched by the encoder with the
//! run's anchors and IoU thresholds; and layouts fitted to them with the same statistics. The
//! statistics are of whole objects: the parts of objects a crop cuts off take part in the
//! matching, but are neither counted nor fitted.

use anyhow::Result;
use rayon::prelude::*;
use retinanet_anchors::AnchorConfig;
use retinanet_dataset::loader::{epoch_order, item_rng};
use retinanet_dataset::{DetectionDataset, DetectionTransform, batch_scale};
use retinanet_encoder::anchor_check::{
    CheckImage, MatchStats, OCTAVE_EDGES, SizeSummary, Suggestion, match_stats, size_summary,
    suggest_anchors,
};

use crate::config::DetectorRunConfig;

/// Below this fraction of boxes matched by IoU the check warns.
pub const WARN_BELOW: f64 = 0.9;

/// Training images the check looks at (an even sample of larger splits).
pub const CHECK_IMAGES: usize = 4000;

/// The finest first stride the detector builds (P2).
const FINEST_STRIDE: usize = 4;

/// What the anchor check found.
#[derive(Clone, Debug)]
pub struct AnchorCheck {
    /// Images looked at, of the split's.
    pub images: usize,
    /// The split's images.
    pub split_images: usize,
    /// Images whose size could not be read (left out).
    pub unreadable: usize,
    /// The training sizes met.
    pub sizes: Vec<usize>,
    /// The box sizes.
    pub summary: SizeSummary,
    /// The run's layout.
    pub current: AnchorConfig,
    /// Its matching.
    pub stats: MatchStats,
    /// Fitted layouts, the best first.
    pub suggestions: Vec<Suggestion>,
    /// The positive IoU threshold.
    pub hi: f32,
}

/// The training boxes of `ds` at the training size, as epoch 0 of the run makes them: image
/// sizes from the files' headers, then the training transform's box mapping with each item's
/// RNG and its batch's size. At most `max_images` images, evenly spaced; returns those images
/// and how many could not be read.
pub fn training_boxes(
    ds: &DetectionDataset,
    cfg: &DetectorRunConfig,
    max_images: usize,
) -> (Vec<CheckImage>, usize) {
    let n = ds.len();
    let every = n.div_ceil(max_images.max(1)).max(1);
    let sizes = cfg.data.augment.sizes();
    let transform = DetectionTransform {
        augment: cfg.data.augment.augment(),
        ..DetectionTransform::train(cfg.data.size, cfg.data.boxarea_th)
    };
    // Each item's batch in epoch 0 fixes its size under multi-scale training.
    let order = epoch_order(n, true, cfg.seed, 0);
    let mut batch_of = vec![0usize; n];
    for (pos, &i) in order.iter().enumerate() {
        batch_of[i] = pos / cfg.train.batch_size.max(1);
    }
    let picked: Vec<usize> = (0..n).step_by(every).collect();
    let out: Vec<Option<CheckImage>> = picked
        .par_iter()
        .map(|&i| {
            let (w, h) = ds.image_size(i).ok()?;
            let s = batch_scale(&sizes, cfg.data.size, cfg.seed, 0, batch_of[i]);
            let r = ds.get(i);
            let m = transform.at_size(s).map_boxes(
                w,
                h,
                &r.boxes,
                &r.labels,
                &mut item_rng(cfg.seed, 0, i),
            );
            Some(CheckImage {
                size: m.size,
                boxes: m.boxes,
                cut: m.cut,
            })
        })
        .collect();
    let unreadable = out.iter().filter(|o| o.is_none()).count();
    (out.into_iter().flatten().collect(), unreadable)
}

/// Runs the check on the training split `ds` of `cfg`.
pub fn check_anchors(ds: &DetectionDataset, cfg: &DetectorRunConfig) -> Result<AnchorCheck> {
    let current = cfg.model.anchor_layout()?;
    let th = (cfg.train.iou_th[0], cfg.train.iou_th[1]);
    let (images, unreadable) = training_boxes(ds, cfg, CHECK_IMAGES);
    let stats = match_stats(&current, th, &images)?;
    let suggestions = suggest_anchors(&current, th, &images, FINEST_STRIDE)?;
    let mut sizes: Vec<usize> = images.iter().map(|i| i.size.0).collect();
    sizes.sort_unstable();
    sizes.dedup();
    Ok(AnchorCheck {
        images: images.len(),
        split_images: ds.len(),
        unreadable,
        sizes,
        summary: size_summary(&images),
        current,
        stats,
        suggestions,
        hi: th.1,
    })
}

/// `[model.anchors]` of a layout, as a config takes it.
pub fn layout_toml(a: &AnchorConfig) -> String {
    let shapes: Vec<String> = a
        .a_hw
        .iter()
        .map(|s| format!("[{}, {}]", fmt_px(s[0]), fmt_px(s[1])))
        .collect();
    let mut t = format!(
        "[model.anchors]\na_hw = [{}]\nscales_per_octave = 1\nfirst_stride = {}\nlevels = {}\n",
        shapes.join(", "),
        a.first_stride,
        a.scales
    );
    if let Some(f) = &a.level_scales {
        t.push_str(&format!(
            "# level factors {f:?}: write them as sizes + aspect_ratios\n"
        ));
    }
    t
}

fn fmt_px(v: f64) -> String {
    format!("{v:.1}")
}

fn stats_line(s: &MatchStats, hi: f32) -> String {
    format!(
        "{:.1}% of {} boxes matched (best anchor IoU > {hi}), mean best IoU {:.3}, {:.2} positive anchors per box{}",
        100.0 * s.matched_fraction(),
        s.boxes,
        s.mean_best_iou,
        s.positives_per_box(),
        if s.without_positive > 0 {
            format!(", {} boxes without any", s.without_positive)
        } else {
            String::new()
        }
    )
}

/// The anchor sizes of a layout, level by level: `8: 20-40` (stride: smallest-largest side).
fn layout_line(a: &AnchorConfig) -> String {
    (0..a.scales)
        .map(|s| {
            let sides: Vec<f64> = a
                .level_shapes(s)
                .iter()
                .map(|hw| (hw[0] * hw[1]).sqrt())
                .collect();
            let lo = sides.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = sides.iter().copied().fold(0.0, f64::max);
            format!("stride {}: {lo:.0}-{hi:.0} px", a.stride(s))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl AnchorCheck {
    /// Whether fewer than [`WARN_BELOW`] of the boxes are matched by IoU.
    pub fn weak(&self) -> bool {
        self.stats.boxes > 0 && self.stats.matched_fraction() < WARN_BELOW
    }

    /// The report, as printed.
    pub fn to_text(&self) -> String {
        let z = &self.summary;
        let mut t = format!(
            "anchor check: {} boxes in {} of {} training images, at training size {} (epoch 0's crops and sizes)\n",
            z.count,
            self.images,
            self.split_images,
            self.sizes
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join("/")
        );
        if z.cut > 0 {
            t.push_str(&format!(
                "  {} more boxes are objects the training crop cut: they are matched like the others but not counted below\n",
                z.cut
            ));
        }
        if self.unreadable > 0 {
            t.push_str(&format!(
                "  {} images left out: their size could not be read\n",
                self.unreadable
            ));
        }
        if z.count == 0 {
            t.push_str("  no box to match\n");
            return t;
        }
        t.push_str(&format!(
            "  box side sqrt(h*w): min {:.1}, p10 {:.1}, p25 {:.1}, median {:.1}, p75 {:.1}, p90 {:.1}, max {:.1} px; aspect h/w p10 {:.2}, median {:.2}, p90 {:.2}\n",
            z.side[0], z.side[1], z.side[2], z.side[3], z.side[4], z.side[5], z.side[6],
            z.aspect[0], z.aspect[1], z.aspect[2]
        ));
        let mut bins = Vec::new();
        let mut lo = 0.0;
        for (k, &n) in z.octaves.iter().enumerate() {
            let label = match OCTAVE_EDGES.get(k) {
                Some(&e) => format!("{lo}-{e}"),
                None => format!(">={lo}"),
            };
            if n > 0 {
                bins.push(format!(
                    "{label}: {:.1}%",
                    100.0 * n as f64 / z.count as f64
                ));
            }
            lo = OCTAVE_EDGES.get(k).copied().unwrap_or(lo);
        }
        t.push_str(&format!("  box sides by octave: {}\n", bins.join(", ")));
        t.push_str(&format!(
            "  the run's anchors ({}): {}\n",
            layout_line(&self.current),
            stats_line(&self.stats, self.hi)
        ));
        // A fitted layout no better than the run's is no reason to change it.
        let keep = self
            .suggestions
            .first()
            .is_some_and(|s| s.stats.matched_fraction() <= self.stats.matched_fraction() + 0.005);
        for (k, s) in self.suggestions.iter().enumerate() {
            let finer = s.anchors.first_stride < self.current.first_stride;
            t.push_str(&format!(
                "  {} ({}{}): {}\n",
                match (k, keep) {
                    (0, true) => "fitted, no better: keep the run's anchors",
                    (0, false) => "suggested",
                    _ => "also fitted",
                },
                layout_line(&s.anchors),
                if finer {
                    "; a P2 level: about twice the heads' compute"
                } else {
                    ""
                },
                stats_line(&s.stats, self.hi)
            ));
            if k == 0 && !keep {
                for line in layout_toml(&s.anchors).lines() {
                    t.push_str(&format!("      {line}\n"));
                }
            }
        }
        if self.weak() {
            let best = self
                .suggestions
                .first()
                .map(|s| {
                    format!(
                        " (the suggested anchors above match {:.1}%)",
                        100.0 * s.stats.matched_fraction()
                    )
                })
                .unwrap_or_default();
            t.push_str(&format!(
                "WARNING: only {:.1}% of the training boxes can be matched by IoU to the run's anchors{best}: the others train on one forced anchor each and the detector will miss many of them. Set [model.anchors] as suggested, or train at a size where the objects are larger (data.size, data.augment.crop_area); see docs/own-data.md.\n",
                100.0 * self.stats.matched_fraction()
            ));
        }
        t
    }
}
