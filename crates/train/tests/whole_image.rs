//! Whole-image evaluation: every ground-truth box of the split is scored, in the image's own
//! pixels, and so are the detections; an image's detections do not depend on the images batched
//! with it, equal `inspect`'s for the same file, and sharding the split over ranks changes
//! nothing. The centre crop stays available and drops what lies outside it.

use std::path::Path;

use candle_core::Device;
use image::{Rgb, RgbImage};
use retinanet_encoder::{Detections, Encoder};
use retinanet_train::config::{
    DEFAULT_DETECTOR_TOML, DetectionSourceConfig, DetectorRunConfig, EvalMode,
};
use retinanet_train::data::{OpenOptions, open_eval_detection};
use retinanet_train::detect::{LoadedDetector, decode_options, encoder_for};
use retinanet_train::infer::{ImageScale, detect_file, detect_loader, eval_loader, to_source};
use retinanet_train::parse_config;
use retinanet_train::progress::Progress;

/// Images of several sizes and shapes, with boxes near their borders; the last is the first again.
const IMAGES: [(u32, u32); 6] = [(90, 60), (60, 90), (120, 80), (70, 70), (100, 50), (90, 60)];

fn split(dir: &Path) -> DetectionSourceConfig {
    let mut list = String::new();
    for (i, &(w, h)) in IMAGES.iter().enumerate() {
        let img = RgbImage::from_fn(w, h, |x, y| {
            Rgb([
                (x * 5 + (i as u32 % 5) * 20) as u8,
                (y * 7) as u8,
                ((x + y) * 3) as u8,
            ])
        });
        img.save(dir.join(format!("{i}.png"))).unwrap();
        // One box at the left edge, one at the bottom right corner: a square centre crop of a
        // non-square image cuts at least one of them.
        list.push_str(&format!(
            "{i}.png 5 0 {} 12 1 {} {} {} {} 2\n",
            h - 10,
            h - 20,
            w - 25,
            h - 1,
            w - 1
        ));
    }
    std::fs::write(dir.join("list.txt"), list).unwrap();
    std::fs::write(dir.join("names.txt"), "a\nb\n").unwrap();
    DetectionSourceConfig::List {
        train_list: dir.join("list.txt"),
        eval_list: dir.join("list.txt"),
        names: dir.join("names.txt"),
        image_root: dir.to_path_buf(),
    }
}

fn tiny(mode: EvalMode) -> DetectorRunConfig {
    let mut cfg: DetectorRunConfig = parse_config(DEFAULT_DETECTOR_TOML).unwrap();
    cfg.model.base_width = 8;
    cfg.model.fpn_channels = 8;
    cfg.model.head_channels = 8;
    cfg.data.eval_size = 48;
    cfg.train.batch_size = 4;
    cfg.eval.mode = mode;
    cfg.eval.score_th = 0.0;
    cfg.eval.max_detections = 30;
    cfg
}

fn detector(cfg: &DetectorRunConfig) -> LoadedDetector {
    let rcfg = retinanet_train::model::retinanet_config(&cfg.model, 2, 0).unwrap();
    let (varmap, model) = retinanet_train::model::build_retinanet(&rcfg, 7, &Device::Cpu).unwrap();
    LoadedDetector {
        model,
        varmap,
        encoder: encoder_for(cfg, 2).unwrap(),
        class_names: vec!["a".into(), "b".into()],
        config: cfg.clone(),
        device: Device::Cpu,
    }
}

fn results(
    det: &LoadedDetector,
    enc: &Encoder,
    src: &DetectionSourceConfig,
    cfg: &DetectorRunConfig,
) -> Vec<retinanet_train::infer::ImageResult> {
    let ds = open_eval_detection(src, &OpenOptions::default()).unwrap();
    let n = ds.len();
    let loader = eval_loader(ds, cfg).unwrap();
    let mut p = Progress::new("eval", n as u64, true);
    detect_loader(&det.model, enc, &loader, cfg, &Device::Cpu, n, 0, &mut p).unwrap()
}

#[test]
fn whole_images_score_every_box_in_their_own_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let src = split(dir.path());
    let cfg = tiny(EvalMode::Whole);
    let det = detector(&cfg);
    let ds = open_eval_detection(&src, &OpenOptions::default()).unwrap();
    let r = results(&det, &det.encoder, &src, &cfg);
    assert_eq!(r.len(), IMAGES.len());
    for (i, res) in r.iter().enumerate() {
        let (w, h) = IMAGES[i];
        assert_eq!(res.index, i);
        // No ground truth dropped or moved: the split's boxes as written.
        assert_eq!(res.gt_boxes, ds.get(i).boxes, "image {i}");
        assert_eq!(res.gt_labels, vec![1, 2]);
        assert!(!res.boxes.is_empty());
        for b in &res.boxes {
            assert!(
                b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= h as f32 - 1.0 && b[3] <= w as f32 - 1.0,
                "image {i} ({w}x{h}): {b:?}"
            );
        }
        // Detections spread over the whole image, not over a 48 px square.
        let far = res.boxes.iter().map(|b| b[3]).fold(0.0f32, f32::max);
        assert!(far > 48.0, "image {i}: {far}");
        // The same as inspect finds in the file, to float rounding.
        let opts = decode_options(&cfg.eval);
        let (_, one) = detect_file(
            &det,
            &dir.path().join(format!("{i}.png")),
            ImageScale::Evaluation,
            &opts,
        )
        .unwrap();
        assert_eq!(one.size, (h, w));
        let d = &one.detections;
        assert_eq!(d.labels, res.labels, "image {i}");
        for (a, b) in d.boxes.iter().zip(&res.boxes) {
            for k in 0..4 {
                assert!((a[k] - b[k]).abs() < 1e-3, "image {i}: {a:?} vs {b:?}");
            }
        }
        for (a, b) in d.scores.iter().zip(&res.scores) {
            assert!((a - b).abs() < 1e-5);
        }
    }
    // Images 0 and 5 are the same size and content: batched with others or not, equal.
    assert_eq!(r[0].scores, r[5].scores);

    // Batches of one: the same detections.
    let mut one = cfg.clone();
    one.train.batch_size = 1;
    let r1 = results(&det, &det.encoder, &src, &one);
    for (a, b) in r.iter().zip(&r1) {
        assert_eq!(a.boxes, b.boxes);
        assert_eq!(a.scores, b.scores);
    }

    // The centre crop loses ground truth of non-square images.
    let crop = tiny(EvalMode::CenterCrop);
    let rc = results(&det, &det.encoder, &src, &crop);
    let kept: usize = rc.iter().map(|r| r.gt_boxes.len()).sum();
    assert!(kept < 2 * IMAGES.len(), "{kept} boxes kept by the crop");
    for res in &rc {
        for b in res.boxes.iter().chain(&res.gt_boxes) {
            assert!(b[2] <= 47.0 && b[3] <= 47.0, "{b:?}");
        }
    }
}

#[test]
fn sharded_whole_image_evaluation_equals_one_process() {
    use retinanet_train::dist::threads::ThreadComm;
    use retinanet_train::{Communicator, evaluate_sharded};
    let dir = tempfile::tempdir().unwrap();
    let src = split(dir.path());
    let cfg = tiny(EvalMode::Whole);
    let det = detector(&cfg);
    let ds = open_eval_detection(&src, &OpenOptions::default()).unwrap();
    let one = evaluate_sharded(
        &det.model,
        &det.encoder,
        &ds,
        &cfg,
        &Device::Cpu,
        true,
        &retinanet_train::dist::Local,
    )
    .unwrap()
    .unwrap();
    let reports: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadComm::world(3)
            .into_iter()
            .map(|comm| {
                let (det, ds, cfg) = (&det, &ds, &cfg);
                s.spawn(move || {
                    let c: &dyn Communicator = &comm;
                    evaluate_sharded(&det.model, &det.encoder, ds, cfg, &Device::Cpu, true, c)
                        .unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let r0 = reports[0].clone().unwrap();
    assert!(reports[1].is_none() && reports[2].is_none());
    assert_eq!(r0.n_images, IMAGES.len());
    assert_eq!(r0.map, one.map);
    assert_eq!(r0.to_json(), one.to_json());
}

#[test]
fn detections_map_back_by_the_transforms_pixel_convention() {
    // An input of 24x48 made from a 48x96 image: pixels 0..=23 are the image's 0..=47.
    let d = Detections {
        boxes: vec![
            [0.0, 0.0, 23.0, 47.0],
            [5.0, 10.0, 9.5, 20.0],
            [30.0, -2.0, 40.0, 60.0],
        ],
        labels: vec![1, 2, 1],
        scores: vec![0.9, 0.5, 0.1],
    };
    let back = to_source(d.clone(), (24, 48), (48, 96));
    assert_eq!(back.boxes[0], [0.0, 0.0, 47.0, 95.0]);
    assert_eq!(back.boxes[1], [10.0, 20.0, 20.0, 41.0]);
    // Clamped to the image.
    assert_eq!(back.boxes[2], [47.0, 0.0, 47.0, 95.0]);
    assert_eq!(
        (back.labels, back.scores),
        (d.labels.clone(), d.scores.clone())
    );
    assert_eq!(to_source(d.clone(), (24, 48), (24, 48)), d);
}

#[test]
fn an_evaluation_writes_coco_results_with_the_instances_ids() {
    use retinanet_eval::coco_results::{
        CocoGroundTruth, read_results, score_results, write_results,
    };
    use retinanet_train::infer::{CocoIds, evaluate_loader_results};
    let dir = tempfile::tempdir().unwrap();
    let src = split(dir.path());
    let cfg = tiny(EvalMode::Whole);
    let det = detector(&cfg);
    // An instances file with ids of its own, images listed in another order.
    let images: Vec<String> = (0..IMAGES.len())
        .rev()
        .map(|i| {
            let (w, h) = IMAGES[i];
            format!(
                r#"{{"id": {}, "file_name": "{i}.png", "width": {w}, "height": {h}}}"#,
                100 + 7 * i
            )
        })
        .collect();
    let gt_path = dir.path().join("instances.json");
    std::fs::write(
        &gt_path,
        format!(
            r#"{{"images": [{}], "annotations": [{{"id": 1, "image_id": 100, "category_id": 9, "bbox": [0, 5, 13, 41], "area": 533, "iscrowd": 0}}], "categories": [{{"id": 9, "name": "b"}}, {{"id": 3, "name": "a"}}]}}"#,
            images.join(", ")
        ),
    )
    .unwrap();
    let ds = open_eval_detection(&src, &OpenOptions::default()).unwrap();
    let loader = eval_loader(ds, &cfg).unwrap();
    let (_, results) =
        evaluate_loader_results(&det.model, &det.encoder, &loader, &cfg, &Device::Cpu, true)
            .unwrap();
    let paths: Vec<std::path::PathBuf> = results
        .iter()
        .map(|r| loader.dataset().image_path(r.index))
        .collect();
    let ids = CocoIds::for_model(&det, Some(&gt_path), &paths).unwrap();
    let mut entries = Vec::new();
    for (k, r) in results.iter().enumerate() {
        let e = ids.results(k, &r.detections());
        assert_eq!(e.len(), r.boxes.len());
        for (j, c) in e.iter().enumerate() {
            assert_eq!(c.image_id, 100 + 7 * r.index as u64, "by file name");
            assert_eq!(
                c.category_id,
                if r.labels[j] == 1 { 3 } else { 9 },
                "by name"
            );
            let b = r.boxes[j];
            let want = [b[1], b[0], b[3] - b[1] + 1.0, b[2] - b[0] + 1.0].map(|v| v as f64);
            for (x, y) in c.bbox.iter().zip(want) {
                assert!((x - y).abs() < 1e-4, "{:?} vs {want:?}", c.bbox);
            }
        }
        entries.extend(e);
    }
    assert!(!entries.is_empty());
    let out = dir.path().join("results.json");
    write_results(&out, &entries).unwrap();
    let back = read_results(&out).unwrap();
    assert_eq!(back.len(), entries.len());
    let gt = CocoGroundTruth::read(&gt_path).unwrap();
    let report = score_results(&gt, &back, &out).unwrap();
    assert_eq!(report.n_images, IMAGES.len());
    // A class the instances file lacks is named.
    let mut other = det;
    other.class_names = vec!["a".into(), "zebra".into()];
    let e = format!(
        "{:#}",
        CocoIds::for_model(&other, Some(&gt_path), &paths)
            .err()
            .unwrap()
    );
    assert!(e.contains("zebra") && e.contains("instances.json"), "{e}");
}
