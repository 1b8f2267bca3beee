//! The per-image input both evaluators take, and its validation.

use crate::EvalError;

/// Ground truth of one image. Boxes are `[ymin, xmin, ymax, xmax]` pixels, labels `1..=C`.
#[derive(Clone, Copy, Debug, Default)]
pub struct GroundTruth<'a> {
    /// One box per object, `[ymin, xmin, ymax, xmax]`.
    pub boxes: &'a [[f32; 4]],
    /// One label in `1..=C` per box.
    pub labels: &'a [u32],
    /// VOC `difficult` flags (used by [`VocEvaluator`](crate::VocEvaluator) only): a difficult
    /// object is neither a hit nor a miss. `None` means no object is difficult.
    pub difficult: Option<&'a [bool]>,
    /// COCO `iscrowd` flags (used by [`CocoEvaluator`](crate::CocoEvaluator) only): a crowd region
    /// is ignored, may absorb any number of detections, and its IoU is `intersection / det area`.
    /// `None` means `iscrowd = 0` everywhere.
    pub crowd: Option<&'a [bool]>,
    /// COCO object areas (used by [`CocoEvaluator`](crate::CocoEvaluator) only) for the
    /// small/medium/large split, e.g. the segmentation areas of a COCO JSON file. `None` means the
    /// box area `w * h`.
    pub areas: Option<&'a [f64]>,
}

/// Detections of one image: boxes `[ymin, xmin, ymax, xmax]`, labels `1..=C`, finite scores.
#[derive(Clone, Copy, Debug, Default)]
pub struct Detections<'a> {
    /// One box per detection, `[ymin, xmin, ymax, xmax]`.
    pub boxes: &'a [[f32; 4]],
    /// One label in `1..=C` per detection.
    pub labels: &'a [u32],
    /// One finite score per detection (higher is more confident).
    pub scores: &'a [f32],
}

impl<'a> GroundTruth<'a> {
    /// Boxes and labels, with no difficult, crowd or area information (set those fields with
    /// struct update syntax: `GroundTruth { crowd: Some(c), ..GroundTruth::new(b, l) }`).
    pub fn new(boxes: &'a [[f32; 4]], labels: &'a [u32]) -> Self {
        Self {
            boxes,
            labels,
            ..Default::default()
        }
    }
}

impl<'a> Detections<'a> {
    /// Detections from their three parallel slices.
    pub fn new(boxes: &'a [[f32; 4]], labels: &'a [u32], scores: &'a [f32]) -> Self {
        Self {
            boxes,
            labels,
            scores,
        }
    }
}

fn check_len(
    image: usize,
    what: &'static str,
    field: &'static str,
    n: usize,
    got: usize,
) -> Result<(), EvalError> {
    if n != got {
        return Err(EvalError::LengthMismatch {
            image,
            what,
            field,
            boxes: n,
            got,
        });
    }
    Ok(())
}

fn check_boxes_labels(
    image: usize,
    what: &'static str,
    boxes: &[[f32; 4]],
    labels: &[u32],
    num_classes: usize,
) -> Result<(), EvalError> {
    check_len(image, what, "labels", boxes.len(), labels.len())?;
    for (index, (b, &label)) in boxes.iter().zip(labels).enumerate() {
        if b.iter().any(|v| !v.is_finite()) || b[2] < b[0] || b[3] < b[1] {
            return Err(EvalError::BadBox {
                image,
                what,
                index,
                bbox: *b,
            });
        }
        if label == 0 || label as usize > num_classes {
            return Err(EvalError::LabelOutOfRange {
                image,
                what,
                index,
                label,
                num_classes,
            });
        }
    }
    Ok(())
}

/// Checks one image's input against `num_classes`; `image` is its index, for the messages.
pub(crate) fn validate(
    image: usize,
    num_classes: usize,
    gt: &GroundTruth<'_>,
    det: &Detections<'_>,
) -> Result<(), EvalError> {
    check_boxes_labels(image, "ground truth", gt.boxes, gt.labels, num_classes)?;
    if let Some(d) = gt.difficult {
        check_len(
            image,
            "ground truth",
            "difficult flags",
            gt.boxes.len(),
            d.len(),
        )?;
    }
    if let Some(c) = gt.crowd {
        check_len(
            image,
            "ground truth",
            "crowd flags",
            gt.boxes.len(),
            c.len(),
        )?;
    }
    if let Some(a) = gt.areas {
        check_len(image, "ground truth", "areas", gt.boxes.len(), a.len())?;
        if let Some((index, &value)) = a
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            return Err(EvalError::BadArea {
                image,
                index,
                value,
            });
        }
    }
    check_boxes_labels(image, "detection", det.boxes, det.labels, num_classes)?;
    check_len(
        image,
        "detection",
        "scores",
        det.boxes.len(),
        det.scores.len(),
    )?;
    if let Some((index, &value)) = det.scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
        return Err(EvalError::BadScore {
            image,
            index,
            value,
        });
    }
    Ok(())
}
