//! IoU and NMS over `[ymin, xmin, ymax, xmax]` boxes, with the tutorial's `eps = 1e-10`.

use crate::EncodeError;

/// A box `[ymin, xmin, ymax, xmax]` in pixels.
pub type Bbox = [f32; 4];

/// The tutorial's epsilon, added to every side length.
pub const EPS: f32 = 1e-10;

/// Overlap measure of [`box_nms`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NmsMode {
    /// Intersection over union.
    #[default]
    Union,
    /// Intersection over the smaller area.
    Min,
}

#[inline(always)]
fn inter(a: &Bbox, b: &Bbox) -> f32 {
    let h = (a[2].min(b[2]) - a[0].max(b[0]) + EPS).max(0.0);
    let w = (a[3].min(b[3]) - a[1].max(b[1]) + EPS).max(0.0);
    h * w
}

/// Area with the tutorial's `eps` on both sides.
#[inline(always)]
pub(crate) fn area(b: &Bbox) -> f32 {
    (b[2] - b[0] + EPS) * (b[3] - b[1] + EPS)
}

/// IoU of two boxes whose areas (see [`area`]) are known.
#[inline(always)]
pub(crate) fn iou_with_areas(a: &Bbox, area_a: f32, b: &Bbox, area_b: f32) -> f32 {
    let i = inter(a, b);
    i / (area_a + area_b - i)
}

/// IoU of two boxes, as the tutorial computes it (f32, `eps` on every side).
#[inline]
pub fn iou(a: &Bbox, b: &Bbox) -> f32 {
    iou_with_areas(a, area(a), b, area(b))
}

/// IoU matrix of `a` (n boxes) against `b` (m boxes), row-major `n x m`.
pub fn box_iou(a: &[Bbox], b: &[Bbox]) -> Vec<f32> {
    let area_b: Vec<f32> = b.iter().map(area).collect();
    let mut out = Vec::with_capacity(a.len() * b.len());
    for x in a {
        let ax = area(x);
        for (y, &ay) in b.iter().zip(&area_b) {
            out.push(iou_with_areas(x, ax, y, ay));
        }
    }
    out
}

/// Checks that every box is finite with `ymax >= ymin` and `xmax >= xmin`.
pub fn validate_boxes(boxes: &[Bbox]) -> Result<(), EncodeError> {
    for (index, b) in boxes.iter().enumerate() {
        if b.iter().any(|v| !v.is_finite()) {
            return Err(EncodeError::NonFiniteBox { index, bbox: *b });
        }
        if b[2] < b[0] || b[3] < b[1] {
            return Err(EncodeError::InvertedBox { index, bbox: *b });
        }
    }
    Ok(())
}

/// Greedy non-maximum suppression in descending score order.
///
/// A box is dropped when its overlap with an already kept box is `> threshold`. Returns the
/// kept indices in descending score order (ties keep the input order).
///
/// Boxes should be valid (see [`validate_boxes`]); NaN scores sort last.
pub fn box_nms(boxes: &[Bbox], scores: &[f32], threshold: f32, mode: NmsMode) -> Vec<usize> {
    assert_eq!(boxes.len(), scores.len(), "box_nms: one score per box");
    let mut order: Vec<u32> = (0..boxes.len() as u32).collect();
    order.sort_by(|&i, &j| {
        let (a, b) = (scores[i as usize], scores[j as usize]);
        b.partial_cmp(&a)
            .unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
    });
    let keep = nms_sorted(boxes, &order, threshold, mode);
    keep.into_iter().map(|k| order[k] as usize).collect()
}

/// NMS over `order` (already by descending score); returns positions into `order`.
///
/// Boxes are laid out as columns so the inner loop runs branch-free over contiguous memory and
/// the compiler vectorises it.
pub(crate) fn nms_sorted(
    boxes: &[Bbox],
    order: &[u32],
    threshold: f32,
    mode: NmsMode,
) -> Vec<usize> {
    nms_sorted_eps(boxes, order, threshold, mode, EPS)
}

/// [`nms_sorted`] with `eps` added to the sides: the tutorial's [`EPS`], or 0 as torchvision's
/// `nms` (where two empty boxes have IoU 0 / 0, NaN, and neither suppresses the other).
pub(crate) fn nms_sorted_eps(
    boxes: &[Bbox],
    order: &[u32],
    threshold: f32,
    mode: NmsMode,
    eps: f32,
) -> Vec<usize> {
    let n = order.len();
    let mut y0 = Vec::with_capacity(n);
    let mut x0 = Vec::with_capacity(n);
    let mut y1 = Vec::with_capacity(n);
    let mut x1 = Vec::with_capacity(n);
    let mut ar = Vec::with_capacity(n);
    for &i in order {
        let b = &boxes[i as usize];
        y0.push(b[0]);
        x0.push(b[1]);
        y1.push(b[2]);
        x1.push(b[3]);
        ar.push((b[2] - b[0] + eps) * (b[3] - b[1] + eps));
    }
    // 1 = suppressed. u8 rather than bool so the inner loop can OR without branches.
    let mut dead = vec![0u8; n];
    let mut keep = Vec::new();
    for i in 0..n {
        if dead[i] != 0 {
            continue;
        }
        keep.push(i);
        let (by0, bx0, by1, bx1, ba) = (y0[i], x0[i], y1[i], x1[i], ar[i]);
        let r = i + 1..n;
        let it = y0[r.clone()]
            .iter()
            .zip(&x0[r.clone()])
            .zip(&y1[r.clone()])
            .zip(&x1[r.clone()])
            .zip(&ar[r.clone()])
            .zip(&mut dead[r]);
        match mode {
            NmsMode::Union => {
                for (((((&ry0, &rx0), &ry1), &rx1), &ra), d) in it {
                    let h = (ry1.min(by1) - ry0.max(by0) + eps).max(0.0);
                    let w = (rx1.min(bx1) - rx0.max(bx0) + eps).max(0.0);
                    let inter = h * w;
                    let ovr = inter / (ba + ra - inter);
                    *d |= (ovr > threshold) as u8;
                }
            }
            NmsMode::Min => {
                for (((((&ry0, &rx0), &ry1), &rx1), &ra), d) in it {
                    let h = (ry1.min(by1) - ry0.max(by0) + eps).max(0.0);
                    let w = (rx1.min(bx1) - rx0.max(bx0) + eps).max(0.0);
                    let ovr = h * w / ra.min(ba);
                    *d |= (ovr > threshold) as u8;
                }
            }
        }
    }
    keep
}
