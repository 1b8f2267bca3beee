//! Equal scores are ranked as the references do: VOC (numpy `argsort(kind='stable')[::-1]`) puts
//! the later detection first; COCO (stable mergesort on `-score`) keeps image order. `-0.0` and
//! `0.0` are equal scores.

use retinanet_eval::{CocoEvaluator, VocEvaluator};

const B: [f32; 4] = [10.0, 10.0, 60.0, 60.0];
const FAR: [f32; 4] = [200.0, 200.0, 250.0, 250.0];

/// Image 1: a hit with `s1`; image 2 (no object): a false positive with `s2`.
fn voc_ap(s1: f32, s2: f32) -> f64 {
    let mut e = VocEvaluator::new(1);
    e.add_image(&[B], &[1], None, &[B], &[1], &[s1]).unwrap();
    e.add_image(&[], &[], None, &[FAR], &[1], &[s2]).unwrap();
    e.finish().ap[0].unwrap()
}

fn coco_ap50(s1: f32, s2: f32) -> f64 {
    let mut e = CocoEvaluator::new(1);
    e.add_image(&[B], &[1], None, &[B], &[1], &[s1]).unwrap();
    e.add_image(&[], &[], None, &[FAR], &[1], &[s2]).unwrap();
    e.finish().stats.ap50
}

#[test]
fn voc_ties_put_the_later_detection_first() {
    assert_eq!(voc_ap(0.6, 0.5), 1.0);
    // Tie: the false positive (added later) ranks first: precision 1/2 at recall 1.
    assert_eq!(voc_ap(0.5, 0.5), 0.5);
    assert_eq!(voc_ap(0.0, -0.0), 0.5);
}

#[test]
fn coco_ties_keep_image_order() {
    assert!((coco_ap50(0.5, 0.5) - 1.0).abs() < 1e-12);
    assert!((coco_ap50(0.0, -0.0) - 1.0).abs() < 1e-12);
    // The false positive ahead: precision 1/2 at every recall threshold.
    assert!((coco_ap50(0.4, 0.5) - 0.5).abs() < 1e-12);
}
