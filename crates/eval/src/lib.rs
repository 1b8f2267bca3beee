//! Detection evaluation for the RetinaNet project: PASCAL VOC AP and COCO-style AP/AR.
//!
//! - [`VocEvaluator`]: AP per class as the tutorial computes it (`+1` on `xmax`/`ymax`, greedy
//!   matching in descending score to the best-IoU ground truth, all-point precision envelope),
//!   the 11-point VOC2007 variant, VOC `difficult` objects ignored; mAP over classes with ground
//!   truth.
//! - [`CocoEvaluator`]: the twelve numbers of `pycocotools`' COCOeval for boxes (AP@[.5:.95],
//!   AP50, AP75, AP small/medium/large, AR@1/10/100, AR small/medium/large), same definitions.
//! - [`Evaluator`] runs both; [`Report`] is the per-class table (text) and JSON.
//! - [`io`]: a JSON-lines detections format (reader and writer), ground truth as JSON lines or as
//!   the tutorial's list file, and [`io::evaluate_files`] for scoring a detections file.
//!
//! Agreement: `tests/fixtures/` holds sets scored by pycocotools and by the project's VOC
//! reference (`scripts/make_coco_fixture.py` makes them); the numbers agree to 1e-12.
//! Speed: `cargo run --release -p retinanet-eval --example bench` (2,000 images x 100
//! detections x 20 classes); `--example evaluate` scores a detections file.
//!
//! Boxes are `[ymin, xmin, ymax, xmax]` pixels (`f32`), labels `1..=C` (`0` is background and
//! rejected). Images are added one at a time and only the score and outcome of each detection
//! is kept, so evaluation can run alongside inference. Bad input (non-finite score or
//! coordinate, `max < min`, label out of range, mismatched lengths) is an [`EvalError`]; an
//! image without ground truth or without detections is fine.
//!
//! ```
//! use retinanet_eval::{Evaluator, VocEvaluator};
//!
//! let mut voc = VocEvaluator::new(2);
//! // One image: a cat (1) found, a dog (2) missed and a false cat.
//! voc.add_image(
//!     &[[10.0, 10.0, 50.0, 60.0], [0.0, 0.0, 30.0, 30.0]], &[1, 2], None,
//!     &[[11.0, 9.0, 50.0, 61.0], [70.0, 70.0, 90.0, 90.0]], &[1, 1], &[0.9, 0.3],
//! )?;
//! // An image with nothing in it and no detection is fine.
//! voc.add_image(&[], &[], None, &[], &[], &[])?;
//! let r = voc.finish();
//! assert_eq!(r.ap, vec![Some(1.0), Some(0.0)]);
//! assert_eq!(r.map, Some(0.5));
//!
//! // Both evaluations at once, with a report.
//! let mut ev = Evaluator::new(vec!["cat".into(), "dog".into()]);
//! ev.add_image(&[[10.0, 10.0, 50.0, 60.0]], &[1], None, &[[10.0, 10.0, 50.0, 60.0]], &[1], &[0.8])?;
//! let report = ev.finish();
//! assert!(report.to_table().contains("cat"));
//! assert!((report.coco.unwrap().ap - 1.0).abs() < 1e-9);
//! # Ok::<(), retinanet_eval::EvalError>(())
//! ```

mod coco;
pub mod coco_results;
mod input;
pub mod io;
mod report;
mod voc;

pub use coco::{
    CocoEvaluator, CocoResult, CocoStats, iou_thresholds, recall_thresholds, yxyx_to_xywh,
};
pub use input::{Detections, GroundTruth};
pub use report::{ClassReport, Evaluator, Report};
pub use voc::{VocEvaluator, VocResult};

use std::path::PathBuf;

/// Everything that can go wrong. `image` is the image's index in the order added.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Parallel arrays of one image disagree in length.
    #[error("image #{image}: {boxes} {what} boxes but {got} {field}")]
    LengthMismatch {
        image: usize,
        what: &'static str,
        field: &'static str,
        boxes: usize,
        got: usize,
    },
    /// A coordinate is not finite, or `ymax < ymin` / `xmax < xmin`.
    #[error(
        "image #{image}: {what} box {index} {bbox:?} is invalid (need finite [ymin, xmin, ymax, xmax] with max >= min)"
    )]
    BadBox {
        image: usize,
        what: &'static str,
        index: usize,
        bbox: [f32; 4],
    },
    /// A label outside `1..=num_classes`.
    #[error("image #{image}: {what} {index} has label {label}, outside 1..={num_classes}")]
    LabelOutOfRange {
        image: usize,
        what: &'static str,
        index: usize,
        label: u32,
        num_classes: usize,
    },
    /// A NaN or infinite detection score.
    #[error("image #{image}: detection {index} has score {value} (must be finite)")]
    BadScore {
        image: usize,
        index: usize,
        value: f32,
    },
    /// A negative or non-finite ground-truth area.
    #[error("image #{image}: ground truth {index} has area {value} (must be finite and >= 0)")]
    BadArea {
        image: usize,
        index: usize,
        value: f64,
    },
    /// The class names do not match the number of classes.
    #[error("{got} class names for {expected} classes")]
    ClassNames { expected: usize, got: usize },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An input file is unusable as a whole (e.g. a names file without any name).
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    /// A line of an input file is malformed.
    #[error("{}:{line}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A record of a file is rejected by the evaluator.
    #[error("{}:{line}: image {name:?}: {source}", path.display())]
    Record {
        path: PathBuf,
        line: usize,
        name: String,
        source: Box<EvalError>,
    },
}

/// An order-preserving `u32` image of a finite score (`-0.0` counted as `0.0`), for sort keys.
#[inline]
pub(crate) fn score_bits(s: f32) -> u32 {
    let s = if s == 0.0 { 0.0 } else { s };
    let b = s.to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

/// Walks two index lists, each sorted by label, and yields `(label, gt indices, det indices)` for
/// every label present on either side, in ascending label order.
pub(crate) fn group_by_label<'a>(
    gt_order: &'a [usize],
    gt_labels: &'a [u32],
    det_order: &'a [usize],
    det_labels: &'a [u32],
) -> impl Iterator<Item = (u32, &'a [usize], &'a [usize])> + 'a {
    let (mut gi, mut di) = (0usize, 0usize);
    std::iter::from_fn(move || {
        let gl = gt_order.get(gi).map(|&i| gt_labels[i]);
        let dl = det_order.get(di).map(|&i| det_labels[i]);
        let label = match (gl, dl) {
            (None, None) => return None,
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (Some(a), Some(b)) => a.min(b),
        };
        let g0 = gi;
        while gi < gt_order.len() && gt_labels[gt_order[gi]] == label {
            gi += 1;
        }
        let d0 = di;
        while di < det_order.len() && det_labels[det_order[di]] == label {
            di += 1;
        }
        Some((label, &gt_order[g0..gi], &det_order[d0..di]))
    })
}
