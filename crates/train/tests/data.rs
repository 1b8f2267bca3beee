//! Opening a run's data: one class list for both splits, the model's classes for `evaluate`,
//! bad ground truth and missing images refused when the data is opened; and inference keeps
//! the pre-NMS top-k.

use std::path::Path;
use std::time::Instant;

use retinanet_encoder::{Encoder, EncoderConfig};
use retinanet_train::config::{DEFAULT_DETECTOR_TOML, DetectionSourceConfig, DetectorRunConfig};
use retinanet_train::data::{
    OpenOptions, open_detection, open_detection_with, open_eval_detection,
};
use retinanet_train::infer::{DEFAULT_PRE_NMS_TOP_K, inference_options};
use retinanet_train::parse_config;

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A VOC root whose `train` and `val` splits hold the given `(id, classes)`.
fn voc(root: &Path, train: &[(&str, &[&str])], val: &[(&str, &[&str])]) {
    let sets = root.join("ImageSets/Main");
    std::fs::create_dir_all(&sets).unwrap();
    std::fs::create_dir_all(root.join("Annotations")).unwrap();
    std::fs::create_dir_all(root.join("JPEGImages")).unwrap();
    for (split, images) in [("train", train), ("val", val)] {
        let ids: Vec<&str> = images.iter().map(|(id, _)| *id).collect();
        std::fs::write(sets.join(format!("{split}.txt")), ids.join("\n")).unwrap();
        for (id, classes) in images {
            let objs: String = classes
                .iter()
                .map(|c| format!("<object><name>{c}</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object>"))
                .collect();
            std::fs::write(
                root.join("Annotations").join(format!("{id}.xml")),
                format!("<annotation><filename>stale.jpg</filename>{objs}</annotation>"),
            )
            .unwrap();
            std::fs::write(root.join("JPEGImages").join(format!("{id}.jpg")), b"").unwrap();
        }
    }
}

fn voc_source(root: &Path) -> DetectionSourceConfig {
    DetectionSourceConfig::Voc {
        root: root.to_path_buf(),
        train_split: "train".into(),
        eval_split: "val".into(),
    }
}

#[test]
fn train_and_eval_splits_share_one_class_list() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // The evaluation split lacks "cat" and has "zebra": read alone, its label 1 would be "dog".
    voc(
        root,
        &[("a", &["cat", "dog"]), ("b", &["dog"])],
        &[("c", &["zebra", "dog"])],
    );
    let (train, eval) = open_detection(&voc_source(root)).unwrap();
    assert_eq!(train.class_names(), names(&["cat", "dog", "zebra"]));
    assert_eq!(eval.class_names(), train.class_names());
    assert_eq!(eval.get(0).labels, vec![3, 2]);
    assert_eq!(train.get(1).labels, vec![2]);

    // COCO files with different categories: the union, by id, in both.
    let (tj, vj) = (root.join("train.json"), root.join("val.json"));
    let file = |cats: &str, cat: u64| {
        format!(
            r#"{{"images": [{{"id": 1, "file_name": "JPEGImages/a.jpg"}}],
                "annotations": [{{"id": 7, "image_id": 1, "category_id": {cat}, "bbox": [1, 1, 5, 5]}}],
                "categories": [{cats}]}}"#
        )
    };
    std::fs::write(
        &tj,
        file(r#"{"id": 2, "name": "cat"}, {"id": 9, "name": "dog"}"#, 9),
    )
    .unwrap();
    std::fs::write(
        &vj,
        file(r#"{"id": 4, "name": "bird"}, {"id": 9, "name": "dog"}"#, 9),
    )
    .unwrap();
    let coco = DetectionSourceConfig::Coco {
        train_json: tj,
        train_images: root.to_path_buf(),
        eval_json: vj,
        eval_images: root.to_path_buf(),
    };
    let (train, eval) = open_detection(&coco).unwrap();
    assert_eq!(train.class_names(), names(&["cat", "bird", "dog"]));
    assert_eq!(eval.class_names(), train.class_names());
    assert_eq!((train.get(0).labels[0], eval.get(0).labels[0]), (3, 3));
}

#[test]
fn evaluation_uses_the_models_classes_and_refuses_a_class_it_does_not_know() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    voc(
        root,
        &[("a", &["cat"])],
        &[("c", &["dog"]), ("d", &["cat"])],
    );
    let model = OpenOptions {
        classes: Some(names(&["dog", "cat"])),
        ..Default::default()
    };
    let eval = open_eval_detection(&voc_source(root), &model).unwrap();
    assert_eq!(eval.class_names(), names(&["dog", "cat"]));
    assert_eq!((eval.get(0).labels[0], eval.get(1).labels[0]), (1, 2));

    let cats_only = OpenOptions {
        classes: Some(names(&["cat"])),
        ..Default::default()
    };
    let e = open_eval_detection(&voc_source(root), &cats_only)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"dog\"") && e.contains("c.xml") && e.contains("id c"),
        "{e}"
    );

    // The same through a list file: the class's line is named.
    std::fs::write(root.join("names.txt"), "cat\ndog\n").unwrap();
    std::fs::write(root.join("train.txt"), "JPEGImages/a.jpg 1 1 9 9 1\n").unwrap();
    std::fs::write(
        root.join("val.txt"),
        "JPEGImages/c.jpg 1 1 9 9 1\nJPEGImages/d.jpg 1 1 9 9 2\n",
    )
    .unwrap();
    let list = DetectionSourceConfig::List {
        train_list: root.join("train.txt"),
        eval_list: root.join("val.txt"),
        names: root.join("names.txt"),
        image_root: root.to_path_buf(),
    };
    let e = open_eval_detection(&list, &cats_only)
        .unwrap_err()
        .to_string();
    assert!(e.contains("val.txt:2") && e.contains("\"dog\""), "{e}");
}

#[test]
fn bad_ground_truth_and_missing_images_are_refused_when_the_data_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("names.txt"), "\u{feff}cat\r\ndog\r\n").unwrap();
    for i in 0..4 {
        std::fs::write(root.join(format!("{i}.jpg")), b"").unwrap();
    }
    let list = DetectionSourceConfig::List {
        train_list: root.join("train.txt"),
        eval_list: root.join("val.txt"),
        names: root.join("names.txt"),
        image_root: root.to_path_buf(),
    };
    std::fs::write(
        root.join("train.txt"),
        "\u{feff}0.jpg 1 1 9 9 1\r\n1.jpg\r\n",
    )
    .unwrap();
    // The evaluation split is checked as strictly as the training split.
    for (val, want) in [
        ("2.jpg 1 1 9 9 2\n3.jpg 9 1 1 9 1\n", "val.txt:2"),
        ("2.jpg 1 1 9 9 2\n\n3.jpg 1 nan 9 9 1\n", "val.txt:3"),
        ("2.jpg 1 1 9 9 2\n7.jpg 1 1 9 9 1\n", "val.txt:2: image"),
    ] {
        std::fs::write(root.join("val.txt"), val).unwrap();
        let e = open_detection(&list).unwrap_err().to_string();
        assert!(e.contains(want), "{val:?}: {e}");
    }
    let (train, eval) = open_detection_with(
        &list,
        &OpenOptions {
            skip_missing: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(train.class_names(), names(&["cat", "dog"]));
    assert_eq!(eval.len(), 1);
    assert_eq!(eval.dropped().len(), 1);
    assert_eq!(eval.dropped()[0].path, root.join("7.jpg"));
}

#[test]
fn inference_keeps_a_pre_nms_top_k_even_when_the_run_has_none() {
    let mut cfg: DetectorRunConfig = parse_config(DEFAULT_DETECTOR_TOML).unwrap();
    cfg.eval.pre_nms_top_k = 0;
    let opts = inference_options(&cfg.eval, 0.01, 0.5, true, None);
    assert_eq!(opts.pre_nms_top_k, Some(DEFAULT_PRE_NMS_TOP_K));
    assert_eq!(
        (opts.score_th, opts.nms_th, opts.class_agnostic),
        (0.01, 0.5, true)
    );
    cfg.eval.pre_nms_top_k = 77;
    assert_eq!(
        inference_options(&cfg.eval, 0.3, 0.4, false, Some(9)).pre_nms_top_k,
        Some(77)
    );

    // A 4000x3000 photo at a threshold every anchor passes: decoding stays quick.
    let (h, w, c) = (3000, 4000, 4);
    let enc = Encoder::new(EncoderConfig::default()).unwrap();
    let n = enc.anchors_for((h, w)).len();
    assert!(n > 700_000, "{n} anchors");
    let cls: Vec<f32> = (0..n * c)
        .map(|i| ((i as u64 * 2_654_435_761) % 1000) as f32 / 100.0 - 2.0)
        .collect();
    let reg = vec![0f32; n * 4];
    let opts = inference_options(&cfg.eval, 0.01, 0.5, true, None);
    let t = Instant::now();
    let d = enc.decode(&cls, &reg, c, (h, w), &opts).unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(!d.is_empty() && d.len() <= 4 * 77, "{} detections", d.len());
    assert!(secs < 20.0, "decoding took {secs:.1} s");
}

/// A tiny model and run config for scoring `classes` classes at 65 px.
fn tiny(classes: usize) -> (retinanet_detector::RetinaNet, Encoder, DetectorRunConfig) {
    let mut cfg: DetectorRunConfig = parse_config(DEFAULT_DETECTOR_TOML).unwrap();
    cfg.model.depth = 18;
    cfg.model.base_width = 8;
    cfg.model.fpn_channels = 16;
    cfg.model.head_channels = 16;
    cfg.data.eval_size = 65;
    cfg.data.skip_bad_images = true;
    cfg.train.batch_size = 2;
    let rcfg = retinanet_train::model::retinanet_config(&cfg.model, classes, 0).unwrap();
    let (_vm, model) =
        retinanet_train::model::build_retinanet(&rcfg, 1, &candle_core::Device::Cpu).unwrap();
    let enc = Encoder::new(EncoderConfig {
        num_classes: Some(classes),
        train_size: (65, 65),
        ..EncoderConfig::default()
    })
    .unwrap();
    (model, enc, cfg)
}

#[test]
fn evaluation_names_each_skipped_image_once_and_the_total() {
    use retinanet_train::infer::{eval_loader, evaluate_loader};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = image::RgbImage::from_fn(70, 60, |x, y| image::Rgb([x as u8 * 3, y as u8 * 4, 90]));
    let mut jpeg = std::io::Cursor::new(Vec::new());
    img.write_to(&mut jpeg, image::ImageFormat::Jpeg).unwrap();
    let jpeg = jpeg.into_inner();
    for i in 0..5 {
        // 1 is cut short, 3 does not exist.
        match i {
            1 => std::fs::write(d.join("1.jpg"), &jpeg[..jpeg.len() * 2 / 3]).unwrap(),
            3 => {}
            _ => std::fs::write(d.join(format!("{i}.jpg")), &jpeg).unwrap(),
        }
    }
    std::fs::write(d.join("names.txt"), "thing\n").unwrap();
    let list: String = (0..5).map(|i| format!("{i}.jpg 5 5 40 40 1\n")).collect();
    std::fs::write(d.join("val.txt"), list).unwrap();
    let src = DetectionSourceConfig::List {
        train_list: d.join("val.txt"),
        eval_list: d.join("val.txt"),
        names: d.join("names.txt"),
        image_root: d.to_path_buf(),
    };
    let (model, enc, cfg) = tiny(1);
    let opts = OpenOptions {
        classes: Some(names(&["thing"])),
        skip_missing: true,
    };
    let ds = open_eval_detection(&src, &opts).unwrap();
    let loader = eval_loader(ds, &cfg).unwrap();
    let dev = candle_core::Device::Cpu;
    let report = evaluate_loader(&model, &enc, &loader, &cfg, &dev, true).unwrap();
    assert_eq!(report.n_images, 3);
    let summary = loader.skip_summary().unwrap();
    assert!(
        summary.starts_with("2 unreadable file(s) skipped (2 skips in all):"),
        "{summary}"
    );
    assert!(
        summary.contains("val.txt:4: image") && summary.contains("does not exist"),
        "{summary}"
    );
    assert!(
        summary.contains("1.jpg") && summary.contains("truncated JPEG"),
        "{summary}"
    );

    // Nothing readable: an error, not a report of nothing.
    for i in [0, 2, 4] {
        std::fs::write(d.join(format!("{i}.jpg")), b"garbage").unwrap();
    }
    let ds = open_eval_detection(&src, &opts).unwrap();
    let loader = eval_loader(ds, &cfg).unwrap();
    let e = evaluate_loader(&model, &enc, &loader, &cfg, &dev, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no item of epoch 0 could be read"), "{e}");
}
