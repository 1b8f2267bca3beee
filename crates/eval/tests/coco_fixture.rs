//! `tests/fixtures/coco_*.json`: the twelve COCOeval numbers (and per-class AP) computed by
//! pycocotools on the same input (see `scripts/make_coco_fixture.py`), plus the VOC reference
//! implementation's AP on the plain set.

use retinanet_eval::io::{DetectionsWriter, GroundTruthRecord, evaluate_files};
use retinanet_eval::{CocoEvaluator, Detections, Evaluator, GroundTruth, VocEvaluator};
use serde_json::Value;
use std::path::PathBuf;

/// The acceptance bound is 1e-4; the implementation follows COCOeval operation for operation, so
/// the numbers agree to rounding.
const TOL: f64 = 1e-12;

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

struct Image {
    gt_boxes: Vec<[f32; 4]>,
    gt_labels: Vec<u32>,
    gt_crowd: Option<Vec<bool>>,
    gt_areas: Option<Vec<f64>>,
    gt_difficult: Option<Vec<bool>>,
    det_boxes: Vec<[f32; 4]>,
    det_labels: Vec<u32>,
    det_scores: Vec<f32>,
}

fn images(fx: &Value) -> Vec<Image> {
    let boxes = |v: &Value| -> Vec<[f32; 4]> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| [0, 1, 2, 3].map(|i| r[i].as_f64().unwrap() as f32))
            .collect()
    };
    let ints = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    fx["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|im| Image {
            gt_boxes: boxes(&im["gt_boxes"]),
            gt_labels: ints(&im["gt_labels"]),
            gt_crowd: im.get("gt_crowd").map(|v| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_bool().unwrap())
                    .collect()
            }),
            gt_areas: im.get("gt_areas").map(|v| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_f64().unwrap())
                    .collect()
            }),
            gt_difficult: im.get("gt_difficult").map(|v| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_bool().unwrap())
                    .collect()
            }),
            det_boxes: boxes(&im["det_boxes"]),
            det_labels: ints(&im["det_labels"]),
            det_scores: im["det_scores"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect(),
        })
        .collect()
}

impl Image {
    fn gt(&self) -> GroundTruth<'_> {
        GroundTruth {
            boxes: &self.gt_boxes,
            labels: &self.gt_labels,
            difficult: self.gt_difficult.as_deref(),
            crowd: self.gt_crowd.as_deref(),
            areas: self.gt_areas.as_deref(),
        }
    }
    fn det(&self) -> Detections<'_> {
        Detections::new(&self.det_boxes, &self.det_labels, &self.det_scores)
    }
}

fn opt_f64(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn check_coco(name: &str) {
    let fx = fixture(name);
    let k = fx["num_classes"].as_u64().unwrap() as usize;
    let mut e = CocoEvaluator::new(k);
    for im in images(&fx) {
        e.add(&im.gt(), &im.det()).unwrap();
    }
    let r = e.finish();
    let want: Vec<f64> = fx["stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (i, (g, w)) in r.stats.to_array().iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= TOL,
            "{name}: stats[{i}] = {g}, pycocotools {w}"
        );
    }
    for (key, got) in [
        ("ap_per_class", &r.ap_per_class),
        ("ap50_per_class", &r.ap50_per_class),
    ] {
        let want: Vec<Option<f64>> = fx[key].as_array().unwrap().iter().map(opt_f64).collect();
        assert_eq!(got.len(), want.len());
        for (c, (g, w)) in got.iter().zip(&want).enumerate() {
            match (g, w) {
                (Some(g), Some(w)) => assert!(
                    (g - w).abs() <= TOL,
                    "{name}: {key}[{c}] = {g}, pycocotools {w}"
                ),
                _ => assert_eq!(g, w, "{name}: {key}[{c}]"),
            }
        }
    }
}

#[test]
fn pycocotools_plain() {
    check_coco("coco_plain.json");
}

#[test]
fn pycocotools_crowd_and_areas() {
    check_coco("coco_crowd_areas.json");
}

#[test]
fn voc_reference_on_the_coco_set() {
    let fx = fixture("coco_plain.json");
    let mut e = VocEvaluator::new(3);
    for im in images(&fx) {
        e.add(&im.gt(), &im.det()).unwrap();
    }
    let r = e.finish();
    for (key, got) in [("ap", &r.ap), ("ap_07", &r.ap_07)] {
        for (label, w) in fx["voc"][key].as_object().unwrap() {
            let l: usize = label.parse().unwrap();
            let (g, w) = (got[l - 1].unwrap(), w.as_f64().unwrap());
            assert!(
                (g - w).abs() <= 1e-5 * w,
                "voc {key}[{label}] = {g}, reference {w}"
            );
        }
    }
    let w = fx["voc"]["map"].as_f64().unwrap();
    assert!((r.map.unwrap() - w).abs() <= 1e-5 * w);
    let w = fx["voc"]["map_07"].as_f64().unwrap();
    assert!((r.map_07.unwrap() - w).abs() <= 1e-5 * w);
}

/// VOC difficult objects: `tests/fixtures/voc_difficult.json`.
#[test]
fn voc_difficult() {
    let fx = fixture("voc_difficult.json");
    let imgs = images(&fx);
    assert!(
        imgs.iter()
            .any(|i| i.gt_difficult.as_ref().unwrap().iter().any(|d| *d))
    );
    let mut e = VocEvaluator::new(4);
    for im in &imgs {
        e.add(&im.gt(), &im.det()).unwrap();
    }
    let r = e.finish();
    let n_diff: usize = imgs
        .iter()
        .map(|i| {
            i.gt_difficult
                .as_ref()
                .unwrap()
                .iter()
                .filter(|d| **d)
                .count()
        })
        .sum();
    assert_eq!(r.n_difficult.iter().sum::<usize>(), n_diff);
    for (key, got) in [("ap", &r.ap), ("ap_07", &r.ap_07)] {
        let want = fx[key].as_object().unwrap();
        assert_eq!(got.iter().flatten().count(), want.len());
        for (label, w) in want {
            let l: usize = label.parse().unwrap();
            let (g, w) = (got[l - 1].unwrap(), w.as_f64().unwrap());
            assert!(
                (g - w).abs() <= 1e-12,
                "voc {key}[{label}] = {g}, reference {w}"
            );
        }
    }
    assert!((r.map.unwrap() - fx["map"].as_f64().unwrap()).abs() <= 1e-12);
    assert!((r.map_07.unwrap() - fx["map_07"].as_f64().unwrap()).abs() <= 1e-12);
    // Without the flags the numbers must differ (the fixture exercises the rule).
    let mut plain = VocEvaluator::new(4);
    for im in &imgs {
        let mut gt = im.gt();
        gt.difficult = None;
        plain.add(&gt, &im.det()).unwrap();
    }
    assert!((plain.finish().map.unwrap() - r.map.unwrap()).abs() > 1e-3);
}

/// The same set through the files: ground truth and detections as JSON lines, detections
/// streamed, several images without a detections line. Must give the same numbers.
#[test]
fn files_round_trip() {
    let fx = fixture("coco_crowd_areas.json");
    let imgs = images(&fx);
    let dir = std::env::temp_dir().join(format!("retinanet-eval-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (gt_path, det_path) = (dir.join("gt.jsonl"), dir.join("det.jsonl"));
    let mut gt_text = String::new();
    for (i, im) in imgs.iter().enumerate() {
        let rec = GroundTruthRecord {
            image: format!("img{i:03}.jpg"),
            boxes: im.gt_boxes.clone(),
            labels: im.gt_labels.clone(),
            difficult: None,
            crowd: im.gt_crowd.clone(),
            areas: im.gt_areas.clone(),
        };
        gt_text += &serde_json::to_string(&rec).unwrap();
        gt_text += "\n";
    }
    std::fs::write(&gt_path, gt_text).unwrap();
    let mut w = DetectionsWriter::create(&det_path).unwrap();
    for (i, im) in imgs.iter().enumerate() {
        // Images without detections get no line at all: they are added last, which changes
        // nothing since they contribute no ranked detection.
        if !im.det_boxes.is_empty() {
            w.write(
                &format!("img{i:03}.jpg"),
                &im.det_boxes,
                &im.det_labels,
                &im.det_scores,
            )
            .unwrap();
        }
    }
    w.finish().unwrap();
    let mut ev = Evaluator::new(vec!["a".into(), "b".into(), "c".into()]);
    evaluate_files(&gt_path, &det_path, &mut ev).unwrap();
    let report = ev.finish();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(report.n_images, imgs.len());
    let want: Vec<f64> = fx["stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (g, w) in report.coco.unwrap().to_array().iter().zip(&want) {
        assert!((g - w).abs() <= TOL, "{g} vs {w}");
    }
    let n_det: usize = imgs.iter().map(|i| i.det_boxes.len()).sum();
    assert_eq!(report.classes.iter().map(|c| c.n_det).sum::<usize>(), n_det);
    // JSON round trip of the report (serde_json's default float parsing may be 1 ulp off, so
    // compare the rendered table and the counts).
    let back = retinanet_eval::Report::from_json(&report.to_json()).unwrap();
    assert_eq!(back.to_table(), report.to_table());
    assert_eq!(back.classes.len(), 3);
    assert_eq!(back.classes[2].name, "c");
    assert!((back.coco.unwrap().ap - report.coco.unwrap().ap).abs() < 1e-15);
}
