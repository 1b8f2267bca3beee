//! Any anchor layout, not only the tutorial's: encoding at any size equals the dense matching,
//! decoding gives the encoded boxes back, the per-box match statistics agree with the targets;
//! and the anchor check's numbers on sets computed by hand.

use proptest::prelude::*;
use retinanet_encoder::anchor_check::{
    CheckImage, fit_anchors, kmeans_shapes, match_stats, size_summary, suggest_anchors,
};
use retinanet_encoder::{
    AnchorConfig, Bbox, DecodeOptions, Encoder, EncoderConfig, box_iou, gen_anchors,
};

/// A random anchor layout: 1-6 shapes of 3-60 px, stride 4, 8 or 16, 1-4 levels, doubling or
/// with level factors of its own.
fn a_layout() -> impl Strategy<Value = AnchorConfig> {
    (
        proptest::collection::vec((3.0f64..60.0, 3.0f64..60.0), 1..7),
        0usize..3,
        1usize..5,
        proptest::option::of(proptest::collection::vec(1.1f64..2.6, 4)),
    )
        .prop_map(|(shapes, s, levels, growth)| AnchorConfig {
            a_hw: shapes.into_iter().map(|(h, w)| [h, w]).collect(),
            scales: levels,
            first_stride: 4 << s,
            level_scales: growth.map(|g| {
                let mut f = vec![1.0];
                for k in 1..levels {
                    f.push(f[k - 1] * g[k - 1]);
                }
                f
            }),
            style: Default::default(),
        })
}

/// The tutorial's dense matching for `size`: the full IoU matrix, argmax both ways.
fn dense_encode(
    enc: &Encoder,
    size: (usize, usize),
    labels: &[u32],
    boxes: &[Bbox],
) -> (Vec<i32>, Vec<[f32; 4]>) {
    let a = enc.anchors_for(size);
    let (lo, hi) = enc.config().iou_th;
    let n = a.len();
    let mut cls = vec![-1i32; n];
    let mut reg = vec![[0f32; 4]; n];
    if boxes.is_empty() {
        return (vec![0; n], reg);
    }
    let m = box_iou(&a.yxyx, boxes);
    let argmax = |v: &mut dyn Iterator<Item = f32>| {
        let mut best = (f32::NEG_INFINITY, 0);
        for (i, x) in v.enumerate() {
            if x > best.0 {
                best = (x, i);
            }
        }
        best
    };
    let d = |g: &Bbox, ai: usize| {
        let [ay, ax, ah, aw] = a.yxhw[ai];
        let (cy, cx, h, w) = (
            (g[0] + g[2]) / 2.0,
            (g[1] + g[3]) / 2.0,
            g[2] - g[0],
            g[3] - g[1],
        );
        [(cy - ay) / ah, (cx - ax) / aw, (h / ah).ln(), (w / aw).ln()]
    };
    let k = boxes.len();
    for ai in 0..n {
        let (top, _) = argmax(&mut m[ai * k..(ai + 1) * k].iter().copied());
        if top < lo {
            cls[ai] = 0;
        }
    }
    for j in 0..k {
        let (_, ai) = argmax(&mut (0..n).map(|ai| m[ai * k + j]));
        cls[ai] = labels[j] as i32;
        reg[ai] = d(&boxes[j], ai);
    }
    for ai in 0..n {
        let (top, j) = argmax(&mut m[ai * k..(ai + 1) * k].iter().copied());
        if top > hi {
            cls[ai] = labels[j] as i32;
            reg[ai] = d(&boxes[j], ai);
        }
    }
    (cls, reg)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// For any layout and any size (not the training one), encoding equals the dense matching,
    /// the anchors line up with the layout's grid, and decoding perfect outputs gives every
    /// encoded box back.
    #[test]
    fn any_layout_encodes_and_decodes_consistently(
        cfg in a_layout(),
        size in (20usize..140, 20usize..140),
        raw in proptest::collection::vec((-10.0f32..130.0, -10.0f32..130.0, 2.0f32..60.0, 2.0f32..60.0), 0..8),
    ) {
        let enc = Encoder::new(EncoderConfig { anchors: cfg.clone(), train_size: (65, 65), ..Default::default() }).unwrap();
        let boxes: Vec<Bbox> = raw.iter().map(|&(y, x, h, w)| [y, x, y + h, x + w]).collect();
        // Distinct labels: each box's targets can be told apart.
        let labels: Vec<u32> = (1..=boxes.len() as u32).collect();
        let t = enc.encode_at(size, &[&labels[..]], &[&boxes[..]]).unwrap();
        let (c2, r2) = dense_encode(&enc, size, &labels, &boxes);
        prop_assert_eq!(&t.cls, &c2);
        prop_assert_eq!(&t.reg, &r2);
        let anchors = enc.anchors_for(size);
        prop_assert_eq!(t.num_anchors, cfg.num_anchors(size));
        prop_assert_eq!(&*anchors, &gen_anchors(&cfg, size));

        // Per-box statistics count exactly the targets.
        let m = enc.match_boxes(size, &boxes).unwrap();
        let iou = box_iou(&anchors.yxyx, &boxes);
        for (j, bm) in m.iter().enumerate() {
            let owned = t.cls.iter().filter(|&&c| c == j as i32 + 1).count();
            prop_assert_eq!(bm.positives, owned, "box {}", j);
            let best = (0..anchors.len()).map(|a| iou[a * boxes.len() + j]).fold(0f32, f32::max);
            prop_assert_eq!(bm.best_iou, best);
        }

        // Perfect outputs decode to the boxes of their anchors, at this size.
        let c = boxes.len().max(1);
        let mut logits = vec![-20.0f32; t.num_anchors * c];
        for (a, &k) in t.cls.iter().enumerate() {
            if k > 0 { logits[a * c + k as usize - 1] = 20.0; }
        }
        let flat: Vec<f32> = t.reg.iter().flatten().copied().collect();
        let opts = DecodeOptions { nms_th: 1.0, class_agnostic: false, ..Default::default() };
        let det = enc.decode(&logits, &flat, c, size, &opts).unwrap();
        let (hmax, wmax) = (size.0 as f32 - 1.0, size.1 as f32 - 1.0);
        for (b, &l) in det.boxes.iter().zip(&det.labels) {
            let g = boxes[l as usize - 1];
            let want = [g[0].max(0.0), g[1].max(0.0), g[2].min(hmax), g[3].min(wmax)];
            for k in 0..4 {
                prop_assert!((b[k] - want[k]).abs() <= 1e-3 * want[k].abs().max(1.0), "{:?} vs {:?}", b, want);
            }
        }
        let encoded: std::collections::BTreeSet<u32> = t.cls.iter().filter(|&&k| k > 0).map(|&k| k as u32).collect();
        let decoded: std::collections::BTreeSet<u32> = det.labels.iter().copied().collect();
        prop_assert_eq!(encoded, decoded);
    }
}

#[test]
fn encode_at_the_training_size_is_encode() {
    let enc = Encoder::new(EncoderConfig {
        train_size: (129, 129),
        ..Default::default()
    })
    .unwrap();
    let boxes = vec![vec![[10.0, 20.0, 60.0, 50.0], [70.0, 70.0, 100.0, 120.0]]];
    let labels = vec![vec![1u32, 2]];
    assert_eq!(
        enc.encode(&labels, &boxes).unwrap(),
        enc.encode_at((129, 129), &labels, &boxes).unwrap()
    );
    let other = enc.encode_at((161, 97), &labels, &boxes).unwrap();
    assert_eq!(
        other.num_anchors,
        AnchorConfig::default().num_anchors((161, 97))
    );
    assert!(enc.encode_at((0, 5), &labels, &boxes).is_err());
}

/// One 16x16 shape at stride 16 on one level, 64x64 images: anchor centres at 0, 16, 32, 48.
fn grid16() -> AnchorConfig {
    AnchorConfig {
        a_hw: vec![[16.0, 16.0]],
        scales: 1,
        first_stride: 16,
        level_scales: None,
        style: Default::default(),
    }
}

#[test]
fn match_statistics_of_a_known_set() {
    let images = vec![
        CheckImage {
            size: (64, 64),
            cut: vec![],
            // On the anchor at (48, 48): IoU 1. Half a cell off both ways: the four anchors
            // around it overlap it 8x8 each, IoU 64 / 448.
            boxes: vec![[40.0, 40.0, 56.0, 56.0], [16.0, 16.0, 32.0, 32.0]],
        },
        CheckImage {
            size: (64, 64),
            cut: vec![],
            // 32x16 centred at (40, 16): the anchors at (32, 16) and (48, 16) lie inside it,
            // IoU 256 / 512 = 0.5, not above 0.5. And a 32x32 box centred on (32, 32): IoU
            // 256 / 1024 with the anchor there.
            boxes: vec![[24.0, 8.0, 56.0, 24.0], [16.0, 16.0, 48.0, 48.0]],
        },
        CheckImage::new((64, 64), vec![]),
    ];
    let s = match_stats(&grid16(), (0.3, 0.5), &images).unwrap();
    assert_eq!(s.boxes, 4);
    assert_eq!(s.matched, 1);
    assert!((s.matched_fraction() - 0.25).abs() < 1e-12);
    let want = (1.0 + 64.0 / 448.0 + 0.5 + 0.25) / 4.0;
    assert!((s.mean_best_iou - want).abs() < 1e-6, "{}", s.mean_best_iou);
    // One positive each: the matched box its anchor, the others their forced best anchor.
    assert_eq!(s.positives, 4);
    assert_eq!(s.without_positive, 0);
    // Two equal boxes share their best anchor: the later one takes it, the first has none.
    let twins = vec![CheckImage::new(
        (64, 64),
        vec![[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 16.0, 16.0]],
    )];
    let s = match_stats(&grid16(), (0.3, 0.5), &twins).unwrap();
    assert_eq!((s.boxes, s.positives, s.without_positive), (2, 1, 1));

    let z = size_summary(&images);
    assert_eq!(z.count, 4);
    // Sides 16, 16, sqrt(32 * 16) = 22.6, 32.
    assert_eq!(z.side[0], 16.0);
    assert_eq!(z.side[6], 32.0);
    assert!((z.side[3] - 22.627417).abs() < 1e-4, "{z:?}");
    assert_eq!(z.octaves, [0, 0, 3, 1, 0, 0, 0]);
    assert_eq!(z.aspect[1], 1.0);
    assert_eq!(z.cut, 0);

    // A box a crop cut takes part in the matching but not in the statistics: the first twin
    // marked cut leaves the second's count alone, and only one box is counted.
    let cut = vec![CheckImage {
        cut: vec![true, false],
        ..twins[0].clone()
    }];
    let s = match_stats(&grid16(), (0.3, 0.5), &cut).unwrap();
    assert_eq!((s.boxes, s.positives, s.without_positive), (1, 1, 0));
    let z = size_summary(&cut);
    assert_eq!((z.count, z.cut), (1, 1));
}

#[test]
fn kmeans_finds_the_shapes_and_folds_the_levels() {
    // Two shapes, each at two sizes an octave apart: one k-means centre per shape suffices
    // when the layout has two levels.
    let mut shapes = Vec::new();
    for f in [1.0, 2.0] {
        for _ in 0..10 {
            shapes.push([10.0 * f, 20.0 * f]);
            shapes.push([20.0 * f, 10.0 * f]);
        }
    }
    let c = kmeans_shapes(&shapes, 2, 2).unwrap();
    assert_eq!(c.len(), 2);
    for (got, want) in c.iter().zip([[10.0, 20.0], [20.0, 10.0]]) {
        assert!(
            (got[0] - want[0]).abs() < 1e-9 && (got[1] - want[1]).abs() < 1e-9,
            "{c:?}"
        );
    }
    // With one level the sizes cannot fold: the two sizes are averaged in log space.
    let c = kmeans_shapes(&shapes, 2, 1).unwrap();
    assert!((c[0][0] - 10.0 * 2f64.sqrt()).abs() < 1e-9, "{c:?}");
    assert!(kmeans_shapes(&[[0.0, 3.0]], 2, 1).is_none());
    // More centres than distinct boxes: every centre is still a box shape.
    let c = kmeans_shapes(&[[8.0, 8.0]], 3, 4).unwrap();
    assert!(
        c.iter()
            .all(|s| (s[0] - 8.0).abs() < 1e-9 && (s[1] - 8.0).abs() < 1e-9),
        "{c:?}"
    );
}

/// Scenes of small squares (6-14 px) on a 129 px image, spread over the grid.
fn small_objects() -> Vec<CheckImage> {
    (0..60)
        .map(|i| {
            let boxes = (0..6)
                .map(|k| {
                    let side = 6.0 + ((i * 7 + k * 3) % 9) as f32;
                    let y = ((i * 13 + k * 29) % 110) as f32 + 0.5 * (k % 2) as f32;
                    let x = ((i * 31 + k * 17) % 110) as f32;
                    [y, x, y + side, x + side]
                })
                .collect();
            CheckImage::new((129, 129), boxes)
        })
        .collect()
}

#[test]
fn fitted_anchors_match_small_objects_the_tutorial_misses() {
    let images = small_objects();
    let th = (0.3, 0.5);
    let tutorial = match_stats(&AnchorConfig::default(), th, &images).unwrap();
    assert_eq!(
        tutorial.matched, 0,
        "28 px anchors never overlap a 14 px box by more than a half"
    );
    let fitted = fit_anchors(3, 8, 4, th, &images).unwrap().unwrap();
    assert_eq!((fitted.first_stride, fitted.scales), (8, 4));
    assert_eq!(fitted.anchors_per_cell(), 3);
    let side = (fitted.a_hw[1][0] * fitted.a_hw[1][1]).sqrt();
    assert!((6.0..20.0).contains(&side), "{fitted:?}");
    let at8 = match_stats(&fitted, th, &images).unwrap();
    // 160 of 360 here: boxes between two anchor centres overlap neither by half.
    assert!(at8.matched_fraction() > 0.3, "{at8:?}");
    // The stride-8 grid cannot reach 90% for boxes this small: the suggestion halves it.
    let s = suggest_anchors(&AnchorConfig::default(), th, &images, 4).unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!((s[0].anchors.first_stride, s[0].anchors.scales), (4, 5));
    assert!(
        s[0].stats.matched_fraction() > at8.matched_fraction() + 0.2,
        "{:?} vs {at8:?}",
        s[0].stats
    );
    assert_eq!(s[1].stats, at8);
    // Never finer than allowed.
    let s = suggest_anchors(&AnchorConfig::default(), th, &images, 8).unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].anchors.first_stride, 8);
    // No box: nothing to fit.
    assert!(fit_anchors(3, 8, 4, th, &[]).unwrap().is_none());
}
