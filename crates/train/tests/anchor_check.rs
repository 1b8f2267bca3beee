//! The run's anchor check looks at the boxes the training loader makes in epoch 0 (crops, turns,
//! per-batch sizes), reports the encoder's matching of a known set exactly, and warns when the
//! anchors miss most boxes.

use image::{Rgb, RgbImage};
use retinanet_dataset::{DetectionDataset, DetectionLoader, DetectionTransform, LoaderConfig};
use retinanet_train::anchor_report::{check_anchors, training_boxes};
use retinanet_train::config::{DEFAULT_DETECTOR_TOML, DetectorRunConfig, MultiScale};
use retinanet_train::parse_config;

fn dataset(dir: &std::path::Path, lines: &[String], sizes: &[(u32, u32)]) -> DetectionDataset {
    for (i, &(w, h)) in sizes.iter().enumerate() {
        RgbImage::from_pixel(w, h, Rgb([90, 90, 90]))
            .save(dir.join(format!("{i}.png")))
            .unwrap();
    }
    std::fs::write(dir.join("list.txt"), lines.concat()).unwrap();
    std::fs::write(dir.join("names.txt"), "a\n").unwrap();
    DetectionDataset::from_list(&dir.join("list.txt"), &dir.join("names.txt"), dir).unwrap()
}

#[test]
fn the_check_sees_the_boxes_of_the_first_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let sizes: Vec<(u32, u32)> = (0..12).map(|i| (80 + 7 * i, 70 + 5 * (i % 4))).collect();
    let lines: Vec<String> = (0..12)
        .map(|i| format!("{i}.png {} {} 50 60 1 10 30 40 75 1\n", i % 5, i % 7))
        .collect();
    let ds = dataset(dir.path(), &lines, &sizes);
    let mut cfg: DetectorRunConfig = parse_config(DEFAULT_DETECTOR_TOML).unwrap();
    cfg.seed = 9;
    cfg.train.batch_size = 3;
    cfg.data.size = 65;
    cfg.data.augment.vflip = 0.5;
    cfg.data.augment.rot90 = true;
    cfg.data.augment.crop_area = [0.4, 0.9];
    cfg.data.augment.multi_scale = Some(MultiScale::Sizes(vec![49, 65, 81]));
    let (images, unreadable) = training_boxes(&ds, &cfg, 100);
    assert_eq!((images.len(), unreadable), (12, 0));
    let loader = DetectionLoader::multi_scale(
        ds,
        DetectionTransform {
            augment: cfg.data.augment.augment(),
            ..DetectionTransform::train(65, cfg.data.boxarea_th)
        },
        cfg.data.augment.sizes(),
        LoaderConfig {
            drop_last: true,
            ..LoaderConfig::new(3, 9)
        },
    )
    .unwrap();
    let mut sizes_seen = std::collections::BTreeSet::new();
    for b in loader.epoch(0) {
        let b = b.unwrap();
        for (k, &i) in b.indices.iter().enumerate() {
            assert_eq!(images[i].boxes, b.boxes[k], "image {i}");
            assert_eq!(images[i].size, b.sizes[k]);
            sizes_seen.insert(b.sizes[k].0);
        }
    }
    assert!(sizes_seen.len() > 1, "{sizes_seen:?}");
    // A sample of the split, evenly spaced.
    let dir2 = tempfile::tempdir().unwrap();
    let ds2 = dataset(
        dir2.path(),
        &lines,
        &(0..12).map(|_| (64, 64)).collect::<Vec<_>>(),
    );
    let (few, _) = training_boxes(&ds2, &cfg, 4);
    assert_eq!(few.len(), 4);
}

#[test]
fn a_known_set_gives_known_numbers_and_a_loud_warning() {
    let dir = tempfile::tempdir().unwrap();
    // 64 px images trained at 64 px without crop or flip: boxes stay where they are. One 16 px
    // shape at stride 16 (P4), one level: anchor centres at 0, 16, 32, 48.
    let lines = vec![
        "0.png 40 40 56 56 1 16 16 32 32 1\n".to_string(),
        "1.png 24 8 56 24 1 16 16 48 48 1\n".to_string(),
    ];
    let ds = dataset(dir.path(), &lines, &[(64, 64), (64, 64)]);
    let text = DEFAULT_DETECTOR_TOML
        .replace("size = 129          # 2^n + 1: anchors land on the image centre", "size = 64")
        .replace(
            "head_channels = 64\n",
            "head_channels = 64\n[model.anchors]\na_hw = [[16.0, 16.0]]\nscales_per_octave = 1\nfirst_stride = 16\nlevels = 1\n",
        )
        .replace(
            "skip_bad_images = false\n",
            "skip_bad_images = false\n[data.augment]\nhflip = 0.0\ncrop_area = [1.0, 1.0]\ncrop_aspect = [1.0, 1.0]\n",
        );
    let cfg: DetectorRunConfig = parse_config(&text).unwrap();
    let c = check_anchors(&ds, &cfg).unwrap();
    assert_eq!(c.summary.count, 4);
    assert_eq!(c.stats.boxes, 4);
    // On an anchor (IoU 1); between four (64 / 448); inside two (0.5, not above); four times an
    // anchor (0.25).
    assert_eq!(c.stats.matched, 1);
    let want = (1.0 + 64.0 / 448.0 + 0.5 + 0.25) / 4.0;
    assert!((c.stats.mean_best_iou - want).abs() < 1e-6);
    assert_eq!(c.stats.positives, 4);
    assert!(c.weak());
    let t = c.to_text();
    assert!(t.contains("25.0% of 4 boxes matched"), "{t}");
    assert!(t.contains("1.00 positive anchors per box"), "{t}");
    assert!(t.contains("WARNING: only 25.0%"), "{t}");
    assert!(t.contains("[model.anchors]"), "a layout to paste: {t}");
    // The suggestion matches more of them.
    assert!(c.suggestions[0].stats.matched > 1, "{t}");
}
