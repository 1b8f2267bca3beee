//! The pipelines end to end on tiny configs (seconds each): pretrain, train a detector on the
//! pretrained extractor, evaluate it, inspect an image; and a run that is stopped and resumed
//! ends with exactly the weights of a run that was not.

use std::path::Path;

use candle_core::Device;
use retinanet_integration_tests::{quiet, tiny_detector_toml, tiny_pretrain_toml};
use retinanet_train::config::{DetectorRunConfig, PretrainRunConfig};
use retinanet_train::infer::{ImageScale, detect_file, draw, output_path, save};
use retinanet_train::{
    RunOptions, evaluate_model, load_checkpoint, load_detector, parse_config, pretrain,
    train_detector,
};

fn detector_config(cache: &Path, name: &str, pretrained: &str, epochs: usize) -> DetectorRunConfig {
    parse_config(&tiny_detector_toml(
        cache, name, "cpu", pretrained, epochs, "[0.25]",
    ))
    .unwrap()
}

fn pretrain_config(cache: &Path) -> PretrainRunConfig {
    parse_config(&tiny_pretrain_toml(cache, "pre", 6, 3, "[0.5]", false)).unwrap()
}

#[test]
fn pretrain_then_detect_then_evaluate_then_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));

    let p = pretrain(&pretrain_config(&cache), &quiet(&runs)).unwrap();
    assert_eq!(p.steps, 6);
    let acc = p.eval_accuracy.unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let pck = load_checkpoint(&p.run.checkpoint(), &Device::Cpu).unwrap();
    assert_eq!(pck.meta.kind, "extractor");
    assert!(pck.tensors.contains_key("extractor.fc.weight"));
    assert!(p.run.file("loss.png").exists() && p.run.file("accuracy.png").exists());

    let pre = p.run.checkpoint();
    let cfg = detector_config(&cache, "det", &pre.display().to_string(), 2);
    let s = train_detector(&cfg, &quiet(&runs)).unwrap();
    assert_eq!(s.steps, 12, "24 images in batches of 4, 2 epochs");
    assert!(!s.stopped_early);
    let report = s.report.clone().unwrap();
    assert_eq!(report.classes.len(), 4);
    assert_eq!(report.n_images, 6);
    for f in [
        "checkpoint.safetensors",
        "config.toml",
        "train.jsonl",
        "eval.jsonl",
        "loss.png",
        "map.png",
        "report.txt",
        "report.json",
    ] {
        assert!(s.run.file(f).exists(), "{f} missing");
    }
    // The detector started from the pretrained extractor: a stage-1 weight it did not train
    // away entirely still correlates... more simply, the first step's loss is logged and finite.
    let log = std::fs::read_to_string(s.run.train_log()).unwrap();
    assert_eq!(log.lines().count(), 12);

    // Evaluate the checkpoint again: the same report.
    let det = load_detector(&s.run.checkpoint(), &Device::Cpu).unwrap();
    let (_, eval_ds) = retinanet_train::data::open_detection(&cfg.data.source).unwrap();
    let again =
        evaluate_model(&det.model, &det.encoder, eval_ds, &cfg, &Device::Cpu, true).unwrap();
    assert_eq!(again.map, report.map);

    // Inspect: an image at its own size; the picture is written.
    let img_path = dir.path().join("scene.png");
    image::RgbImage::from_fn(90, 70, |x, y| {
        image::Rgb([
            (x * 2) as u8,
            (y * 3) as u8,
            if (20..50).contains(&x) && (10..40).contains(&y) {
                250
            } else {
                10
            },
        ])
    })
    .save(&img_path)
    .unwrap();
    let opts = retinanet_encoder::DecodeOptions {
        score_th: 0.0,
        max_detections: Some(5),
        ..Default::default()
    };
    let (mut img, d) = detect_file(&det, &img_path, ImageScale::Own, &opts).unwrap();
    assert_eq!(d.size, (70, 90));
    assert!(
        !d.detections.is_empty(),
        "score_th 0 keeps at least one box"
    );
    for b in &d.detections.boxes {
        assert!(
            b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= 69.0 && b[3] <= 89.0,
            "{b:?} clamped to the image"
        );
    }
    let before = img.clone();
    draw(&mut img, &d.detections, &det.class_names);
    assert_ne!(before, img, "boxes were drawn");
    let out = output_path(&img_path, None);
    save(&img, &out).unwrap();
    assert_eq!(image::open(&out).unwrap().to_rgb8(), img);
}

#[test]
fn a_stopped_and_resumed_run_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    let full = train_detector(&detector_config(&cache, "full", "", 2), &quiet(&runs)).unwrap();
    assert_eq!(full.steps, 12);

    let cfg = detector_config(&cache, "split", "", 2);
    // Stop mid-epoch (step 5 of 6 in epoch 0... 4 + 1), as a kill after a checkpoint would.
    let first = train_detector(
        &cfg,
        &RunOptions {
            max_steps: Some(5),
            ..quiet(&runs)
        },
    )
    .unwrap();
    assert!(first.stopped_early);
    assert_eq!(first.steps, 5);
    // A new run over an existing checkpoint is refused; --resume continues it.
    let e = train_detector(&cfg, &quiet(&runs)).unwrap_err().to_string();
    assert!(e.contains("--resume"), "{e}");
    let second = train_detector(
        &cfg,
        &RunOptions {
            resume: true,
            ..quiet(&runs)
        },
    )
    .unwrap();
    assert_eq!(second.steps, 12);

    let a = load_checkpoint(&full.run.checkpoint(), &Device::Cpu).unwrap();
    let b = load_checkpoint(&second.run.checkpoint(), &Device::Cpu).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (k, ta) in &a.tensors {
        let va: Vec<f32> = ta.flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = b.tensors[k].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(va, vb, "tensor {k} differs after resume");
    }
    assert_eq!(a.meta.step, b.meta.step);
    // The progress decay fired at step 3 of 12 (before the stop) and was restored on resume:
    // without it the resumed steps would run at 10x the rate and the weights would differ.
    assert_eq!(a.meta.extra["progress_decays"].to_string(), "[3]");
    assert_eq!(b.meta.extra["progress_decays"].to_string(), "[3]");
    // The resumed log has one line per step, none duplicated.
    let log = std::fs::read_to_string(second.run.train_log()).unwrap();
    assert_eq!(log.lines().count(), 12);
    // The final reports agree.
    assert_eq!(full.report.unwrap().map, second.report.unwrap().map);
}

#[test]
fn a_diverging_run_stops_with_a_message_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    let cfg = detector_config(&cache, "nan", "", 2);
    train_detector(
        &cfg,
        &RunOptions {
            max_steps: Some(4),
            ..quiet(&runs)
        },
    )
    .unwrap();
    let ck = dir.path().join("runs/nan/checkpoint.safetensors");
    let before = std::fs::read(&ck).unwrap();

    // The same run resumed with an absurd learning rate: the weights overflow within a step or two.
    let mut wild = cfg.clone();
    wild.train.lr.lr = 1e30;
    wild.train.lr.warmup_steps = 0;
    let e = train_detector(
        &wild,
        &RunOptions {
            resume: true,
            ..quiet(&runs)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("the loss became") && e.contains("last good checkpoint"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(&ck).unwrap(),
        before,
        "the checkpoint of step 4 is untouched"
    );
    let back = load_checkpoint(&ck, &Device::Cpu).unwrap();
    assert_eq!(back.meta.step, 4);
}

#[test]
fn two_thread_ranks_train_the_weights_of_one_process() {
    use retinanet_train::dist::threads::ThreadComm;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    let with_sync = |name: &str| {
        let mut c = detector_config(&cache, name, "", 1);
        c.train.sync_bn = true;
        c
    };
    let one = train_detector(&with_sync("one"), &quiet(&runs)).unwrap();
    let cfg = with_sync("two");
    let reports: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadComm::world(2)
            .into_iter()
            .map(|comm| {
                let opts = RunOptions {
                    comm: Arc::new(comm),
                    ..quiet(&runs)
                };
                let cfg = &cfg;
                s.spawn(move || train_detector(cfg, &opts).unwrap())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(reports[0].steps, 6);
    assert!(reports[1].report.is_none(), "only rank 0 reports");
    let a = load_checkpoint(&one.run.checkpoint(), &Device::Cpu).unwrap();
    let b = load_checkpoint(&reports[0].run.checkpoint(), &Device::Cpu).unwrap();
    for (k, ta) in &a.tensors {
        let va: Vec<f32> = ta.flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = b.tensors[k].flatten_all().unwrap().to_vec1().unwrap();
        let scale = va.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
        let d = va
            .iter()
            .zip(&vb)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(d / scale < 1e-5, "{k}: {d} of {scale}");
    }
    let (ra, rb) = (one.report.unwrap(), reports[0].report.clone().unwrap());
    assert_eq!(ra.n_images, rb.n_images);
    assert!((ra.map.unwrap_or(0.0) - rb.map.unwrap_or(0.0)).abs() < 1e-6);
}

/// A run with its own anchors (sizes per level, six per cell, from stride 4: a P2 level) and
/// every augmentation on (multi-scale batches, flips, turns, jitter): the head, the encoder, the
/// checkpoint and inference agree, a stopped and resumed run equals an uninterrupted one, and
/// resuming with other anchors is refused naming the key.
#[test]
fn own_anchors_and_augmentation_train_resume_and_infer() {
    let dir = tempfile::tempdir().unwrap();
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    let text = |name: &str| {
        tiny_detector_toml(&cache, name, "cpu", "", 2, "[0.25]")
            .replace(
                "head_channels = 16\n",
                "head_channels = 16\n[model.anchors]\nsizes = [10.0, 20.0, 40.0]\naspect_ratios = [0.5, 1.0, 2.0]\nscales_per_octave = 2\nfirst_stride = 4\nlevels = 3\n",
            )
            .replace(
                "skip_bad_images = false\n",
                "skip_bad_images = false\n[data.augment]\nvflip = 0.5\nrot90 = true\nbrightness = 0.2\nsaturation = 0.2\ncrop_area = [0.5, 1.0]\nmulti_scale = [49, 65, 81]\n",
            )
    };
    let cfg: DetectorRunConfig = parse_config(&text("full")).unwrap();
    let full = train_detector(&cfg, &quiet(&runs)).unwrap();
    assert_eq!(full.steps, 12);
    assert!(full.report.is_some());
    assert!(full.run.file("anchor-check.txt").exists());
    let check = std::fs::read_to_string(full.run.file("anchor-check.txt")).unwrap();
    assert!(check.contains("stride 4: "), "{check}");

    // The checkpoint carries the anchors: inference builds the same head and decodes with them.
    let det = load_detector(&full.run.checkpoint(), &Device::Cpu).unwrap();
    assert_eq!(det.config.model.anchors, cfg.model.anchors);
    assert_eq!(det.model.detector.config().num_anchors, 6);
    assert_eq!(det.model.detector.config().first_level, 2);
    let x =
        candle_core::Tensor::zeros((1, 3, 50, 70), candle_core::DType::F32, &Device::Cpu).unwrap();
    let (cls, _) = det.model.infer(&x).unwrap();
    assert_eq!(cls.dims()[1], det.encoder.anchors_for((50, 70)).len());

    let split_cfg: DetectorRunConfig = parse_config(&text("split")).unwrap();
    train_detector(
        &split_cfg,
        &RunOptions {
            max_steps: Some(5),
            ..quiet(&runs)
        },
    )
    .unwrap();
    // Other anchors cannot continue this checkpoint.
    let mut other = split_cfg.clone();
    other.model.anchors.first_stride = 8;
    let e = train_detector(
        &other,
        &RunOptions {
            resume: true,
            ..quiet(&runs)
        },
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("model.anchors.first_stride = 4 vs 8"), "{e}");
    // Nor other augmentation.
    let mut other = split_cfg.clone();
    other.data.augment.vflip = 0.0;
    let e = format!(
        "{:#}",
        train_detector(
            &other,
            &RunOptions {
                resume: true,
                ..quiet(&runs)
            },
        )
        .unwrap_err()
    );
    assert!(e.contains("data.augment.vflip = 0.5 vs 0.0"), "{e}");
    let second = train_detector(
        &split_cfg,
        &RunOptions {
            resume: true,
            ..quiet(&runs)
        },
    )
    .unwrap();
    assert_eq!(second.steps, 12);
    let a = load_checkpoint(&full.run.checkpoint(), &Device::Cpu).unwrap();
    let b = load_checkpoint(&second.run.checkpoint(), &Device::Cpu).unwrap();
    for (k, ta) in &a.tensors {
        let va: Vec<f32> = ta.flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = b.tensors[k].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(va, vb, "tensor {k} differs after resume");
    }
    assert_eq!(full.report.unwrap().map, second.report.unwrap().map);
}

#[test]
fn torchvision_variants_train_and_infer() {
    let dir = tempfile::tempdir().unwrap();
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    for variant in ["torchvision_v1", "torchvision_v2"] {
        let text = tiny_detector_toml(&cache, variant, "cpu", "", 10, "[0.9]")
            .replace(
                "fpn_channels = 16\nhead_channels = 16\n",
                &format!(
                    "fpn_channels = 32\nhead_channels = 32\nvariant = \"{variant}\"\n[model.anchors]\nsizes = [8.0, 16.0, 32.0, 64.0, 128.0]\naspect_ratios = [0.5, 1.0, 2.0]\nscales_per_octave = 3\nfirst_stride = 8\nlevels = 5\n"
                ),
            )
            .replace("size = 65\neval_size = 65\n", "size = 64\neval_size = 72\n")
            .replace("lr = 0.01\n", "lr = 0.05\n");
        let cfg: DetectorRunConfig = parse_config(&text).unwrap();
        let s = train_detector(&cfg, &quiet(&runs)).unwrap();
        assert_eq!(s.steps, 60);
        // It learns: the loss of the last steps is below that of the first.
        let log = std::fs::read_to_string(s.run.file("train.jsonl")).unwrap();
        let losses: Vec<f64> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
            .collect();
        assert_eq!(losses.len(), 60, "{variant}");
        let first: f64 = losses[..6].iter().sum();
        let last: f64 = losses[54..].iter().sum();
        assert!(last < 0.8 * first, "{variant}: losses {losses:?}");
        // The checkpoint is the variant by torchvision's names, and infers as evaluation does.
        let det = load_detector(&s.run.checkpoint(), &Device::Cpu).unwrap();
        assert_eq!(det.config.model.variant.name(), variant);
        let ck = load_checkpoint(&s.run.checkpoint(), &Device::Cpu).unwrap();
        assert!(
            ck.tensors
                .contains_key("detector.head.classification_head.cls_logits.weight")
                && ck
                    .tensors
                    .contains_key("detector.fpn.extra_blocks.p7.weight"),
            "{variant}"
        );
        assert_eq!(
            ck.tensors
                .contains_key("detector.head.regression_head.conv.0.1.weight"),
            variant == "torchvision_v2"
        );
        let img = dir.path().join("scene.png");
        image::RgbImage::from_fn(90, 70, |x, y| {
            let inside = (20..50).contains(&x) && (10..40).contains(&y);
            image::Rgb([(x * 2) as u8, (y * 3) as u8, if inside { 250 } else { 10 }])
        })
        .save(&img)
        .unwrap();
        let opts = retinanet_train::detect::decode_options(&det.config.eval);
        let (_, d) = detect_file(&det, &img, ImageScale::Evaluation, &opts).unwrap();
        let (h, w) = (d.size.0 as f32, d.size.1 as f32);
        assert!(
            d.detections.boxes.iter().all(|b| {
                b.iter().all(|v| v.is_finite()) && b[0] >= 0.0 && b[2] <= h && b[3] <= w
            })
        );
        assert!(s.report.unwrap().map.is_some_and(f64::is_finite));
    }
    // Sizes torchvision would pad are refused by key.
    let text = tiny_detector_toml(&cache, "odd", "cpu", "", 1, "[0.9]").replace(
        "fpn_channels = 16\nhead_channels = 16\n",
        "fpn_channels = 32\nhead_channels = 32\nvariant = \"torchvision_v1\"\n[model.anchors]\nsizes = [8.0, 16.0, 32.0, 64.0, 128.0]\naspect_ratios = [1.0]\nscales_per_octave = 1\nfirst_stride = 8\nlevels = 5\n",
    );
    let cfg: DetectorRunConfig = parse_config(&text).unwrap();
    let e = format!("{:#}", train_detector(&cfg, &quiet(&runs)).unwrap_err());
    assert!(
        e.contains("data.size = 65") && e.contains("multiples of 32"),
        "{e}"
    );
}
