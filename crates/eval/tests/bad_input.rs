//! Bad input is a clear error and records nothing; empty images are fine.

use retinanet_eval::io::evaluate_files;
use retinanet_eval::{CocoEvaluator, EvalError, Evaluator, VocEvaluator};

const B: [f32; 4] = [0.0, 0.0, 10.0, 10.0];

#[test]
fn nan_score() {
    let mut e = VocEvaluator::new(2);
    let err = e
        .add_image(&[B], &[1], None, &[B, B], &[1, 1], &[0.5, f32::NAN])
        .unwrap_err();
    assert!(
        matches!(
            err,
            EvalError::BadScore {
                image: 0,
                index: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("detection 1 has score NaN"),
        "{err}"
    );
    assert_eq!(e.num_images(), 0);
    let mut c = CocoEvaluator::new(2);
    assert!(matches!(
        c.add_image(&[], &[], None, &[B], &[1], &[f32::INFINITY]),
        Err(EvalError::BadScore { .. })
    ));
}

#[test]
fn inverted_or_non_finite_box() {
    let mut e = VocEvaluator::new(2);
    e.add_image(&[B], &[1], None, &[], &[], &[]).unwrap();
    let err = e
        .add_image(&[[5.0, 0.0, 4.0, 10.0]], &[1], None, &[], &[], &[])
        .unwrap_err();
    assert!(
        matches!(
            err,
            EvalError::BadBox {
                image: 1,
                what: "ground truth",
                index: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("image #1"), "{err}");
    let err = e
        .add_image(
            &[],
            &[],
            None,
            &[B, [0.0, 9.0, 10.0, 8.0]],
            &[1, 1],
            &[0.1, 0.2],
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            EvalError::BadBox {
                what: "detection",
                index: 1,
                ..
            }
        ),
        "{err}"
    );
    let err = e
        .add_image(&[[0.0, f32::NAN, 1.0, 1.0]], &[1], None, &[], &[], &[])
        .unwrap_err();
    assert!(matches!(err, EvalError::BadBox { .. }), "{err}");
    // Zero-size boxes are allowed.
    e.add_image(
        &[[3.0, 3.0, 3.0, 9.0]],
        &[1],
        None,
        &[[3.0, 3.0, 3.0, 9.0]],
        &[1],
        &[0.4],
    )
    .unwrap();
    assert_eq!(e.num_images(), 2);
}

#[test]
fn label_out_of_range() {
    let mut e = CocoEvaluator::new(3);
    let err = e.add_image(&[B], &[4], None, &[], &[], &[]).unwrap_err();
    assert!(
        matches!(
            err,
            EvalError::LabelOutOfRange {
                label: 4,
                num_classes: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("label 4, outside 1..=3"), "{err}");
    let err = e.add_image(&[], &[], None, &[B], &[0], &[0.3]).unwrap_err();
    assert!(
        matches!(err, EvalError::LabelOutOfRange { label: 0, .. }),
        "{err}"
    );
    assert_eq!(e.num_images(), 0);
}

#[test]
fn length_mismatch() {
    let mut e = VocEvaluator::new(1);
    let err = e.add_image(&[B], &[1, 1], None, &[], &[], &[]).unwrap_err();
    assert!(
        matches!(
            err,
            EvalError::LengthMismatch {
                boxes: 1,
                got: 2,
                ..
            }
        ),
        "{err}"
    );
    let err = e
        .add_image(&[B], &[1], Some(&[]), &[], &[], &[])
        .unwrap_err();
    assert!(
        matches!(
            err,
            EvalError::LengthMismatch {
                field: "difficult flags",
                ..
            }
        ),
        "{err}"
    );
    let err = e.add_image(&[], &[], None, &[B], &[1], &[]).unwrap_err();
    assert!(
        matches!(
            err,
            EvalError::LengthMismatch {
                field: "scores",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn empty_images_are_fine() {
    let mut e = Evaluator::new(vec!["x".into(), "y".into()]);
    e.add_image(&[], &[], None, &[], &[], &[]).unwrap();
    // Only a false positive on an image without objects: class 1 has no ground truth.
    e.add_image(&[], &[], None, &[B], &[1], &[0.9]).unwrap();
    let r = e.finish();
    assert_eq!(r.n_images, 2);
    assert_eq!(r.map, None);
    assert_eq!(r.classes[0].ap, None);
    assert_eq!(r.classes[0].n_det, 1);
    assert_eq!(r.coco.unwrap().ap, -1.0);
    // Then an object without detection: AP 0 for class 2, mAP over class 2 only.
    e.add_image(&[B], &[2], None, &[], &[], &[]).unwrap();
    let r = e.finish();
    assert_eq!(r.classes[1].ap, Some(0.0));
    assert_eq!(r.map, Some(0.0));
    assert_eq!(r.coco.unwrap().ap, 0.0);
    assert_eq!(r.coco.unwrap().ar100, 0.0);
    assert!(r.to_table().contains("mean"));
}

#[test]
fn file_errors_name_file_and_line() {
    let dir = std::env::temp_dir().join(format!("retinanet-eval-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gt = dir.join("gt.txt");
    // The tutorial's list file.
    std::fs::write(&gt, "a.jpg 0 0 10 10 1 20 20 40 40 2\nb.jpg\n").unwrap();
    let det = dir.join("det.jsonl");
    let mk = || Evaluator::new(vec!["x".into(), "y".into()]);

    std::fs::write(&det, "{\"image\":\"a.jpg\",\"boxes\":[[0,0,10,10]],\"labels\":[1],\"scores\":[0.5]}\n\n{\"image\":\"zz.jpg\",\"boxes\":[],\"labels\":[],\"scores\":[]}\n").unwrap();
    let err = evaluate_files(&gt, &det, &mut mk())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("det.jsonl:3") && err.contains("zz.jpg"),
        "{err}"
    );

    std::fs::write(
        &det,
        "{\"image\":\"a.jpg\",\"boxes\":[[0,0,10,10]],\"labels\":[7],\"scores\":[0.5]}\n",
    )
    .unwrap();
    let err = evaluate_files(&gt, &det, &mut mk())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("det.jsonl:1") && err.contains("label 7"),
        "{err}"
    );

    std::fs::write(&det, "{\"image\":\"a.jpg\",\"boxes\":[[0,0,10]]}\n").unwrap();
    let err = evaluate_files(&gt, &det, &mut mk())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("det.jsonl:1") && err.contains("bad detection record"),
        "{err}"
    );

    std::fs::write(&gt, "a.jpg 0 0 10 10 1\nb.jpg 0 0 10\n").unwrap();
    let err = evaluate_files(&gt, &det, &mut mk())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gt.txt:2") && err.contains("multiple of 5"),
        "{err}"
    );

    std::fs::write(&gt, "a.jpg 0 0 10 10 1\nb.jpg 0 0 10 10 3\n").unwrap();
    let err = evaluate_files(&gt, &det, &mut mk())
        .unwrap_err()
        .to_string();
    assert!(err.contains("gt.txt:2") && err.contains("label 3"), "{err}");

    // A good run: one TP for class 1, class 2 missed on b.jpg (no detections line).
    std::fs::write(&gt, "a.jpg 0 0 10 10 1\nb.jpg 20 20 40 40 2\n").unwrap();
    std::fs::write(
        &det,
        "{\"image\":\"a.jpg\",\"boxes\":[[0,0,10,10]],\"labels\":[1],\"scores\":[0.5]}\n",
    )
    .unwrap();
    let mut ev = mk();
    evaluate_files(&gt, &det, &mut ev).unwrap();
    let r = ev.finish();
    assert_eq!(r.n_images, 2);
    assert_eq!(r.classes[0].ap, Some(1.0));
    assert_eq!(r.classes[1].ap, Some(0.0));
    std::fs::remove_dir_all(&dir).ok();
}
