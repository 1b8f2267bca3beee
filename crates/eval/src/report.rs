//! Per-class report (text table and JSON) and an evaluator that runs VOC and COCO together.

use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};

use crate::{
    CocoEvaluator, CocoResult, CocoStats, Detections, EvalError, GroundTruth, VocEvaluator,
    VocResult,
};

/// One row of a [`Report`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassReport {
    /// The label, `1..=C`.
    pub label: u32,
    /// The class name.
    pub name: String,
    /// Ground-truth objects (VOC: not difficult).
    pub n_gt: usize,
    /// Difficult ground-truth objects (ignored by VOC).
    pub n_difficult: usize,
    /// Detections.
    pub n_det: usize,
    /// VOC all-point AP; `None` without ground truth.
    pub ap: Option<f64>,
    /// VOC2007 11-point AP.
    pub ap_07: Option<f64>,
    /// COCO AP@[.5:.95] (absent when COCO was not run or the class has no ground truth).
    pub coco_ap: Option<f64>,
    /// COCO AP@0.5.
    pub coco_ap50: Option<f64>,
}

/// The result of an evaluation run: per-class rows, VOC mAP and the COCO summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Number of images evaluated.
    pub n_images: usize,
    /// IoU threshold of the VOC evaluation.
    pub iou_threshold: f64,
    /// One row per class, in label order.
    pub classes: Vec<ClassReport>,
    /// VOC mAP (all-point) over classes with ground truth.
    pub map: Option<f64>,
    /// VOC2007 11-point mAP.
    pub map_07: Option<f64>,
    /// COCO summary, if COCO was run.
    pub coco: Option<CocoStats>,
}

impl Report {
    /// Builds a report from evaluator results; `names[i]` names label `i + 1`.
    pub fn new(
        names: &[String],
        voc: &VocResult,
        coco: Option<&CocoResult>,
    ) -> Result<Self, EvalError> {
        let c = voc.ap.len();
        if names.len() != c {
            return Err(EvalError::ClassNames {
                expected: c,
                got: names.len(),
            });
        }
        if let Some(r) = coco
            && r.ap_per_class.len() != c
        {
            return Err(EvalError::ClassNames {
                expected: c,
                got: r.ap_per_class.len(),
            });
        }
        let classes = (0..c)
            .map(|k| ClassReport {
                label: k as u32 + 1,
                name: names[k].clone(),
                n_gt: voc.n_gt[k],
                n_difficult: voc.n_difficult[k],
                n_det: voc.n_det[k],
                ap: voc.ap[k],
                ap_07: voc.ap_07[k],
                coco_ap: coco.and_then(|r| r.ap_per_class[k]),
                coco_ap50: coco.and_then(|r| r.ap50_per_class[k]),
            })
            .collect();
        Ok(Self {
            n_images: voc.n_images,
            iou_threshold: voc.iou_threshold,
            classes,
            map: voc.map,
            map_07: voc.map_07,
            coco: coco.map(|r| r.stats),
        })
    }

    /// The report as pretty-printed JSON (`null` for undefined APs).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serialises")
    }

    /// Reads a report written by [`Report::to_json`].
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The report as a text table: one row per class, then mAP and the COCO summary.
    pub fn to_table(&self) -> String {
        fn cell(v: Option<f64>) -> String {
            v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"))
        }
        let name_w = self
            .classes
            .iter()
            .map(|c| c.name.chars().count())
            .max()
            .unwrap_or(0)
            .max(5);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<name_w$} {:>7} {:>6} {:>7} {:>8} {:>8} {:>8} {:>8}",
            "class", "n_gt", "diff", "n_det", "AP", "AP07", "cocoAP", "cocoAP50"
        );
        let rule = "-".repeat(name_w + 60);
        let _ = writeln!(s, "{rule}");
        for c in &self.classes {
            let _ = writeln!(
                s,
                "{:<name_w$} {:>7} {:>6} {:>7} {:>8} {:>8} {:>8} {:>8}",
                c.name,
                c.n_gt,
                c.n_difficult,
                c.n_det,
                cell(c.ap),
                cell(c.ap_07),
                cell(c.coco_ap),
                cell(c.coco_ap50)
            );
        }
        let _ = writeln!(s, "{rule}");
        let (gt, diff, det) = self.classes.iter().fold((0, 0, 0), |(g, d, n), c| {
            (g + c.n_gt, d + c.n_difficult, n + c.n_det)
        });
        let _ = writeln!(
            s,
            "{:<name_w$} {:>7} {:>6} {:>7} {:>8} {:>8}",
            "mean",
            gt,
            diff,
            det,
            cell(self.map),
            cell(self.map_07)
        );
        let _ = writeln!(
            s,
            "{} images, VOC IoU threshold {}",
            self.n_images, self.iou_threshold
        );
        if let Some(st) = &self.coco {
            let v = st.to_array();
            let lines = [
                ("Average Precision", "0.50:0.95", "all", 100),
                ("Average Precision", "0.50", "all", 100),
                ("Average Precision", "0.75", "all", 100),
                ("Average Precision", "0.50:0.95", "small", 100),
                ("Average Precision", "0.50:0.95", "medium", 100),
                ("Average Precision", "0.50:0.95", "large", 100),
                ("Average Recall", "0.50:0.95", "all", 1),
                ("Average Recall", "0.50:0.95", "all", 10),
                ("Average Recall", "0.50:0.95", "all", 100),
                ("Average Recall", "0.50:0.95", "small", 100),
                ("Average Recall", "0.50:0.95", "medium", 100),
                ("Average Recall", "0.50:0.95", "large", 100),
            ];
            for ((kind, iou, area, md), val) in lines.iter().zip(v) {
                let short = if kind.starts_with("Average P") {
                    "(AP)"
                } else {
                    "(AR)"
                };
                let _ = writeln!(
                    s,
                    " {kind:<18} {short} @[ IoU={iou:<9} | area={area:>6} | maxDets={md:>3} ] = {val:.3}"
                );
            }
        }
        s
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_table())
    }
}

/// VOC and (optionally) COCO evaluation fed together, image by image, with class names for the
/// [`Report`].
#[derive(Clone, Debug)]
pub struct Evaluator {
    names: Vec<String>,
    voc: VocEvaluator,
    coco: Option<CocoEvaluator>,
}

impl Evaluator {
    /// VOC (IoU 0.5) and COCO evaluation for `names.len()` classes; `names[i]` names label `i + 1`.
    pub fn new(names: Vec<String>) -> Self {
        let c = names.len();
        Self {
            names,
            voc: VocEvaluator::new(c),
            coco: Some(CocoEvaluator::new(c)),
        }
    }

    /// VOC evaluation at `voc_iou_threshold`, plus COCO evaluation if `coco` (VOC only is
    /// cheaper).
    pub fn with_options(names: Vec<String>, voc_iou_threshold: f64, coco: bool) -> Self {
        let c = names.len();
        Self {
            names,
            voc: VocEvaluator::with_iou_threshold(c, voc_iou_threshold),
            coco: coco.then(|| CocoEvaluator::new(c)),
        }
    }

    /// The class names.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The VOC side.
    pub fn voc(&self) -> &VocEvaluator {
        &self.voc
    }

    /// The COCO side, if enabled.
    pub fn coco(&self) -> Option<&CocoEvaluator> {
        self.coco.as_ref()
    }

    /// Adds one image (see [`VocEvaluator::add_image`]); the COCO side sees no crowd regions.
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

    /// Adds one image to both evaluations. On error nothing is recorded.
    pub fn add(&mut self, gt: &GroundTruth<'_>, det: &Detections<'_>) -> Result<(), EvalError> {
        // Both sides validate the same way, so a failure happens before anything is recorded.
        self.voc.add(gt, det)?;
        if let Some(c) = &mut self.coco {
            c.add(gt, det)?;
        }
        Ok(())
    }

    /// The report over what was added so far.
    pub fn finish(&self) -> Report {
        let (voc, coco) = rayon::join(
            || self.voc.finish(),
            || self.coco.as_ref().map(|c| c.finish()),
        );
        Report::new(&self.names, &voc, coco.as_ref())
            .expect("names and evaluators agree on the class count")
    }
}
