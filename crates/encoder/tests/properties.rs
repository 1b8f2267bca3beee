//! Properties of the box math, and its refusals of bad input.

use proptest::prelude::*;
use retinanet_encoder::{
    Bbox, DecodeOptions, EncodeError, Encoder, EncoderConfig, NmsMode, box_iou, box_nms, iou,
};

fn a_box(max: f32) -> impl Strategy<Value = Bbox> {
    (0.0..max, 0.0..max, 1.0..max / 2.0, 1.0..max / 2.0)
        .prop_map(|(y, x, h, w)| [y, x, y + h, x + w])
}

proptest! {
    #[test]
    fn iou_is_symmetric_and_bounded(a in a_box(200.0), b in a_box(200.0)) {
        let (ab, ba) = (iou(&a, &b), iou(&b, &a));
        prop_assert_eq!(ab, ba);
        prop_assert!((0.0..=1.0).contains(&ab), "iou {}", ab);
        prop_assert!((iou(&a, &a) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn nms_keeps_no_overlapping_pair_and_the_top_box(
        boxes in proptest::collection::vec(a_box(120.0), 1..80),
        seed in any::<u64>(),
        th in 0.1f32..0.9,
        min_mode in any::<bool>(),
    ) {
        // Distinct scores from the seed.
        let scores: Vec<f32> = (0..boxes.len()).map(|i| ((i as u64 * 2654435761 + seed) % 100_003) as f32 / 100_003.0 + i as f32 * 1e-7).collect();
        let mode = if min_mode { NmsMode::Min } else { NmsMode::Union };
        let keep = box_nms(&boxes, &scores, th, mode);
        let top = (0..boxes.len()).max_by(|&i, &j| scores[i].total_cmp(&scores[j])).unwrap();
        prop_assert_eq!(keep[0], top);
        for w in keep.windows(2) {
            prop_assert!(scores[w[0]] >= scores[w[1]]);
        }
        for (k, &i) in keep.iter().enumerate() {
            for &j in &keep[k + 1..] {
                let o = if min_mode {
                    let (a, b) = (&boxes[i], &boxes[j]);
                    let ih = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
                    let iw = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
                    ih * iw / ((a[2]-a[0])*(a[3]-a[1])).min((b[2]-b[0])*(b[3]-b[1]))
                } else { iou(&boxes[i], &boxes[j]) };
                prop_assert!(o <= th + 1e-4, "kept {} and {} overlap {}", i, j, o);
            }
        }
        // Every dropped box overlaps a kept box with a higher score.
        for d in (0..boxes.len()).filter(|d| !keep.contains(d)) {
            prop_assert!(keep.iter().any(|&k| scores[k] >= scores[d] && box_iou(&[boxes[k]], &[boxes[d]])[0] > 0.0));
        }
    }

    #[test]
    fn decode_inverts_encode(boxes in proptest::collection::vec(a_box(120.0), 1..6)) {
        let enc = Encoder::new(EncoderConfig { train_size: (129, 129), ..Default::default() }).unwrap();
        let labels: Vec<u32> = (0..boxes.len() as u32).map(|i| i % 3 + 1).collect();
        let (cls, reg) = enc.encode_image(&labels, &boxes).unwrap();
        let anchors = enc.train_anchors();
        // Decode each positive anchor's targets back: the box it was matched to comes back.
        let mut positives = 0;
        for (a, &c) in cls.iter().enumerate() {
            if c <= 0 { continue; }
            positives += 1;
            let [ay, ax, ah, aw] = anchors.yxhw[a];
            let d = reg[a];
            let (y, x, h, w) = (d[0] * ah + ay, d[1] * aw + ax, d[2].exp() * ah, d[3].exp() * aw);
            let back = [y - h / 2.0, x - w / 2.0, y + h / 2.0, x + w / 2.0];
            let hit = boxes.iter().zip(&labels).any(|(b, &l)| l as i32 == c && (0..4).all(|k| (b[k] - back[k]).abs() <= 1e-4 * b[k].abs().max(1.0)));
            prop_assert!(hit, "anchor {} decodes to {:?}, no box of class {} there", a, back, c);
        }
        // Each box forces at least one positive anchor (shared best anchors aside).
        prop_assert!(positives >= 1);
        // And through the decoder proper: perfect logits on a single box give it back.
        let (cls1, reg1) = enc.encode_image(&labels[..1], &boxes[..1]).unwrap();
        let mut logits = vec![-20.0f32; cls1.len() * 3];
        for (a, &c) in cls1.iter().enumerate() {
            if c > 0 { logits[a * 3 + c as usize - 1] = 20.0; }
        }
        let flat: Vec<f32> = reg1.iter().flatten().copied().collect();
        let det = enc.decode(&logits, &flat, 3, (129, 129), &DecodeOptions::default()).unwrap();
        prop_assert_eq!(det.len(), 1);
        let b = boxes[0];
        let clamped = [b[0].max(0.0), b[1].max(0.0), b[2].min(128.0), b[3].min(128.0)];
        for k in 0..4 {
            prop_assert!((det.boxes[0][k] - clamped[k]).abs() <= 1e-4 * clamped[k].abs().max(1.0), "{:?} vs {:?}", det.boxes[0], clamped);
        }
    }
}

#[test]
fn bad_input_is_refused_with_the_value() {
    let enc = Encoder::new(EncoderConfig {
        train_size: (129, 129),
        num_classes: Some(3),
        ..Default::default()
    })
    .unwrap();
    let ok = [10.0, 10.0, 50.0, 50.0];
    let e = enc
        .encode(&[vec![1u32]], &[vec![[50.0, 10.0, 10.0, 50.0]]])
        .unwrap_err();
    assert!(
        matches!(&e, EncodeError::InImage { image: 0, source } if matches!(**source, EncodeError::InvertedBox { index: 0, .. })),
        "{e}"
    );
    assert!(e.to_string().contains("inverted"), "{e}");
    let e = enc
        .encode(
            &[vec![1u32, 1], vec![2]],
            &[vec![ok, ok], vec![[10.0, f32::NAN, 20.0, 20.0]]],
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("image 1") && e.to_string().contains("non-finite"),
        "{e}"
    );
    let e = enc.encode(&[vec![4u32]], &[vec![ok]]).unwrap_err();
    assert!(
        e.to_string().contains("label 4") && e.to_string().contains("1..=3"),
        "{e}"
    );
    let e = enc.encode(&[vec![0u32]], &[vec![ok]]).unwrap_err();
    assert!(e.to_string().contains("label 0"), "{e}");
    let e = enc.encode(&[vec![1u32, 2]], &[vec![ok]]).unwrap_err();
    assert!(e.to_string().contains("1 boxes but 2 labels"), "{e}");
    let e = enc
        .encode(&[vec![1u32]], &[vec![ok], vec![ok]])
        .unwrap_err();
    assert!(matches!(
        e,
        EncodeError::BatchMismatch {
            labels: 1,
            boxes: 2
        }
    ));
    let e = enc
        .encode_image(&[1], &[[0.0, 0.0, f32::INFINITY, 3.0]])
        .unwrap_err();
    assert!(matches!(e, EncodeError::NonFiniteBox { index: 0, .. }));
    // Decode: wrong lengths and NaN outputs.
    let an = enc.num_anchors();
    let e = enc
        .decode(
            &vec![0.0; an * 3 - 1],
            &vec![0.0; an * 4],
            3,
            (129, 129),
            &DecodeOptions::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("expected"), "{e}");
    let mut cls = vec![0.0; an * 3];
    cls[7] = f32::NAN;
    let e = enc
        .decode(
            &cls,
            &vec![0.0; an * 4],
            3,
            (129, 129),
            &DecodeOptions::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("index 7"), "{e}");
    // Bad configs.
    assert!(
        Encoder::new(EncoderConfig {
            iou_th: (0.6, 0.5),
            ..Default::default()
        })
        .is_err()
    );
    assert!(
        Encoder::new(EncoderConfig {
            train_size: (0, 10),
            ..Default::default()
        })
        .is_err()
    );
}

#[test]
fn decode_options_shape_the_output() {
    let enc = Encoder::new(EncoderConfig {
        train_size: (129, 129),
        ..Default::default()
    })
    .unwrap();
    let an = enc.num_anchors();
    let c = 2;
    // Two identical boxes of different classes on neighbouring anchors, all else silent.
    let mut cls = vec![-10.0f32; an * c];
    let reg = vec![0.0f32; an * 4];
    let (a1, a2) = (300, 303); // the same anchor shape, one cell apart
    cls[a1 * c] = 3.0; // class 1
    cls[a2 * c + 1] = 2.0; // class 2
    let agnostic = enc
        .decode(&cls, &reg, c, (129, 129), &DecodeOptions::default())
        .unwrap();
    let per_class = enc
        .decode(
            &cls,
            &reg,
            c,
            (129, 129),
            &DecodeOptions {
                class_agnostic: false,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(agnostic.labels, vec![1]);
    assert_eq!(per_class.labels, vec![1, 2]);
    let capped = enc
        .decode(
            &cls,
            &reg,
            c,
            (129, 129),
            &DecodeOptions {
                class_agnostic: false,
                max_detections: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(capped.labels, vec![1]);
    let top1 = enc
        .decode(
            &cls,
            &reg,
            c,
            (129, 129),
            &DecodeOptions {
                class_agnostic: false,
                pre_nms_top_k: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        top1.labels,
        vec![1],
        "both anchors are on level 0: top-1 keeps the higher"
    );
    let strict = enc
        .decode(
            &cls,
            &reg,
            c,
            (129, 129),
            &DecodeOptions {
                score_th: 0.9,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(strict.scores.len(), 1);
    assert!((strict.scores[0] - 1.0 / (1.0 + (-3.0f32).exp())).abs() < 1e-6);
}

/// The tutorial's dense matching, written plainly: the full IoU matrix, argmax both ways.
fn dense_encode(enc: &Encoder, labels: &[u32], boxes: &[Bbox]) -> (Vec<i32>, Vec<[f32; 4]>) {
    let a = enc.train_anchors();
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
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// The grid-culled matching equals the dense one, boxes outside the image, tiny boxes and
    /// duplicates included.
    #[test]
    fn culled_encode_equals_dense(
        raw in proptest::collection::vec((-40.0f32..160.0, -40.0f32..160.0, 0.5f32..90.0, 0.5f32..90.0), 0..12),
        dup in any::<bool>(),
    ) {
        let enc = Encoder::new(EncoderConfig { train_size: (129, 100), ..Default::default() }).unwrap();
        let mut boxes: Vec<Bbox> = raw.iter().map(|&(y, x, h, w)| [y, x, y + h, x + w]).collect();
        if dup && !boxes.is_empty() {
            boxes.push(boxes[0]);
        }
        let labels: Vec<u32> = (0..boxes.len() as u32).map(|i| i % 4 + 1).collect();
        let (c1, r1) = enc.encode_image(&labels, &boxes).unwrap();
        let (c2, r2) = dense_encode(&enc, &labels, &boxes);
        prop_assert_eq!(c1, c2);
        prop_assert_eq!(r1, r2);
    }
}
