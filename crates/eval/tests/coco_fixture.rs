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

/// The fixtures as the files pycocotools reads — an instances file and a results file, as the
/// fixture script built them (`xywh = [xmin, ymin, xmax - xmin, ymax - ymin]`, ids 1..N, the
/// crowd flags and areas) — scored by `coco_results`: the same twelve numbers.
#[test]
fn results_files_score_as_pycocotools_does() {
    use retinanet_eval::coco_results::{CocoGroundTruth, read_results, score_results};
    for name in ["coco_plain.json", "coco_crowd_areas.json"] {
        let fx = fixture(name);
        let k = fx["num_classes"].as_u64().unwrap() as usize;
        let xywh = |b: &[f32; 4]| {
            let (y0, x0, y1, x1) = (b[0] as f64, b[1] as f64, b[2] as f64, b[3] as f64);
            [x0, y0, x1 - x0, y1 - y0]
        };
        let (mut imgs, mut anns, mut dets) = (vec![], vec![], vec![]);
        for (i, im) in images(&fx).iter().enumerate() {
            let id = i as u64 + 1;
            imgs.push(serde_json::json!({"id": id, "file_name": format!("{id}.jpg")}));
            for (j, (b, &l)) in im.gt_boxes.iter().zip(&im.gt_labels).enumerate() {
                let bb = xywh(b);
                let area = im.gt_areas.as_ref().map_or(bb[2] * bb[3], |a| a[j]);
                let crowd = im.gt_crowd.as_ref().is_some_and(|c| c[j]) as u8;
                anns.push(serde_json::json!({"id": anns.len() + 1, "image_id": id,
                    "category_id": l, "bbox": bb, "area": area, "iscrowd": crowd}));
            }
            for ((b, &l), &s) in im.det_boxes.iter().zip(&im.det_labels).zip(&im.det_scores) {
                dets.push(serde_json::json!({"image_id": id, "category_id": l,
                    "bbox": xywh(b), "score": s as f64}));
            }
        }
        let cats: Vec<_> = (1..=k)
            .map(|c| serde_json::json!({"id": c, "name": format!("c{c}")}))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let (gtp, dtp) = (
            dir.path().join("instances.json"),
            dir.path().join("results.json"),
        );
        std::fs::write(
            &gtp,
            serde_json::json!({"images": imgs, "annotations": anns, "categories": cats})
                .to_string(),
        )
        .unwrap();
        std::fs::write(&dtp, serde_json::Value::Array(dets).to_string()).unwrap();
        let gt = CocoGroundTruth::read(&gtp).unwrap();
        let r = score_results(&gt, &read_results(&dtp).unwrap(), &dtp).unwrap();
        let got = r.coco.unwrap().to_array();
        let want: Vec<f64> = fx["stats"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-9,
                "{name}: stats[{i}] = {g}, pycocotools {w}"
            );
        }
    }
}

#[test]
fn results_files_that_do_not_fit_are_refused_by_entry() {
    use retinanet_eval::coco_results::{CocoGroundTruth, read_results, score_results};
    let dir = tempfile::tempdir().unwrap();
    let gtp = dir.path().join("instances.json");
    std::fs::write(
        &gtp,
        r#"{"images": [{"id": 7, "file_name": "a/x.jpg"}], "annotations": [],
            "categories": [{"id": 3, "name": "cat"}]}"#,
    )
    .unwrap();
    let gt = CocoGroundTruth::read(&gtp).unwrap();
    assert_eq!(gt.image_id("x.jpg"), Some(7));
    assert_eq!(gt.category_id("cat"), Some(3));
    let dtp = dir.path().join("results.json");
    for (text, want) in [
        (
            r#"[{"image_id": 8, "category_id": 3, "bbox": [0,0,1,1], "score": 0.5}]"#,
            "image id 8",
        ),
        (
            r#"[{"image_id": 7, "category_id": 1, "bbox": [0,0,1,1], "score": 0.5}]"#,
            "category id 1",
        ),
        (
            r#"[{"image_id": 7, "category_id": 3, "bbox": [0,0,-1,1], "score": 0.5}]"#,
            "entry #0",
        ),
        (r#"{"image_id": 7}"#, "not a COCO results array"),
    ] {
        std::fs::write(&dtp, text).unwrap();
        let e = read_results(&dtp)
            .and_then(|d| score_results(&gt, &d, &dtp))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("results.json") && e.contains(want),
            "{text}: {e}"
        );
    }
}
