//! torchvision's RetinaNet as a model variant, against torchvision itself: committed fixtures
//! made with torchvision's own RetinaNet classes and random weights
//! (`scripts/make_torchvision_fixtures.py`: v1 with the COCO file's old head names and BatchNorm
//! eps 0, v2 with GroupNorm heads and P6 from C5) load by torchvision's names; its transform,
//! network outputs and final detections (anchors, box coder, per-level top-k, per-class NMS,
//! clipping, boxes back in the image's pixels) come out as torchvision's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use retinanet_dataset::DetectionTransform;
use retinanet_dataset::imageops::load_rgb;
use retinanet_extractor::weights::read_tensors;
use retinanet_train::LoadedDetector;
use retinanet_train::config::Variant;
use retinanet_train::detect::decode_options;
use retinanet_train::infer::{ImageScale, detect_file};
use retinanet_train::interop::{
    export_torchvision_retinanet, load_torchvision_retinanet, save_as_checkpoint,
};
use retinanet_train::model::varmap_tensors;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torchvision")
}

fn names() -> Vec<String> {
    (0..5).map(|i| format!("class{i}")).collect()
}

fn expected(tag: &str) -> HashMap<String, Tensor> {
    read_tensors(&fixtures().join(format!("tv_{tag}_expected.safetensors"))).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The fixture's model with the fixture's transform sizes and score threshold.
fn model(tag: &str) -> LoadedDetector {
    let mut det = load_torchvision_retinanet(
        &fixtures().join(format!("tv_{tag}.safetensors")),
        Some(names()),
        None,
        &Device::Cpu,
    )
    .unwrap();
    let e = expected(tag);
    let sizes = f32s(&e["sizes"]);
    det.config.data.eval_size = sizes[0] as u32;
    det.config.data.eval_max_size = sizes[1] as u32;
    det.config.eval.score_th = f32s(&e["score_th"])[0];
    det
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn both_variants_are_read_from_the_tensors() {
    let v1 = model("v1");
    let v2 = model("v2");
    assert_eq!(v1.config.model.variant, Variant::TorchvisionV1);
    assert_eq!(v2.config.model.variant, Variant::TorchvisionV2);
    for d in [&v1, &v2] {
        let m = &d.config.model;
        assert_eq!((m.depth, m.base_width, m.fpn_channels), (50, 4, 32));
        assert_eq!(d.class_names.len(), 5);
    }
    // v1's COCO weights use BatchNorm eps 0 (torchvision's overwrite_eps), v2 PyTorch's.
    assert_eq!(v1.config.model.bn_eps, Some(0.0));
    assert_eq!(v2.config.model.bn_eps, Some(1e-5));
}

#[test]
fn the_transform_makes_torchvisions_pixels() {
    let e = expected("v1");
    for i in 0..2 {
        let img = load_rgb(&fixtures().join(format!("tv_image{i}.png"))).unwrap();
        let t = DetectionTransform::torchvision(160, 240, 0.0);
        let (h, w) = t.output_size(img.width(), img.height());
        let valid = f32s(&e[&format!("image{i}.valid")]);
        assert_eq!((h, w), (valid[0] as usize, valid[1] as usize), "image {i}");
        let mut ours = vec![0f32; 3 * h * w];
        t.apply_into(
            &img,
            &[],
            &[],
            &mut retinanet_dataset::loader::item_rng(0, 0, 0),
            &mut ours,
        );
        let theirs = e[&format!("image{i}.input")]
            .narrow(2, 0, h)
            .unwrap()
            .narrow(3, 0, w)
            .unwrap();
        let d = max_diff(&ours, &f32s(&theirs));
        assert!(d < 1e-4, "image {i}: pixels differ by {d}");
    }
}

#[test]
fn the_network_gives_torchvisions_head_outputs() {
    for tag in ["v1", "v2"] {
        let det = model(tag);
        let e = expected(tag);
        for i in 0..2 {
            let x = &e[&format!("image{i}.input")];
            let (cls, reg) = det.model.infer(x).unwrap();
            // Ours is (dy, dx, dh, dw); torchvision's (dx, dy, dw, dh).
            let idx = Tensor::new(&[1u32, 0, 3, 2], &Device::Cpu).unwrap();
            let reg = reg.index_select(&idx, 2).unwrap();
            let (tc, tr) = (
                f32s(&e[&format!("image{i}.cls")]),
                f32s(&e[&format!("image{i}.reg")]),
            );
            let scale = tc.iter().fold(1f32, |m, v| m.max(v.abs()));
            let dc = max_diff(&f32s(&cls), &tc) / scale;
            let dr = max_diff(&f32s(&reg), &tr);
            assert!(
                dc < 1e-4 && dr < 1e-4,
                "{tag} image {i}: cls {dc}, reg {dr}"
            );
        }
    }
}

fn assert_detections_match(det: &LoadedDetector, tag: &str) {
    let e = expected(tag);
    let opts = decode_options(&det.config.eval);
    for i in 0..2 {
        let path = fixtures().join(format!("tv_image{i}.png"));
        let (_, d) = detect_file(det, &path, ImageScale::Evaluation, &opts).unwrap();
        let d = d.detections;
        let boxes = f32s(&e[&format!("image{i}.boxes")]);
        let scores = f32s(&e[&format!("image{i}.scores")]);
        let labels = f32s(&e[&format!("image{i}.labels")]);
        assert!(scores.len() > 50, "the fixture has detections to compare");
        assert_eq!(d.len(), scores.len(), "{tag} image {i}: detection count");
        // In torchvision's order; equal scores may come in either order.
        let mut used = vec![false; scores.len()];
        for k in 0..d.len() {
            let b = d.boxes[k];
            let ours = [b[1], b[0], b[3], b[2]];
            let found = (k.saturating_sub(8)..(k + 9).min(scores.len())).find(|&j| {
                !used[j]
                    && (d.scores[k] - scores[j]).abs() < 1e-5
                    && (k == j || (scores[k] - scores[j]).abs() < 1e-6)
                    && d.labels[k] == labels[j] as u32 + 1 // torchvision's labels from 0
                    && max_diff(&ours, &boxes[4 * j..4 * j + 4]) < 2e-3
            });
            let Some(j) = found else {
                panic!(
                    "{tag} image {i} detection {k} (score {}, label {}, box {ours:?}) is not torchvision's {k} (score {}, label {}, box {:?})",
                    d.scores[k],
                    d.labels[k],
                    scores[k],
                    labels[k] as u32 + 1,
                    &boxes[4 * k..4 * k + 4]
                )
            };
            used[j] = true;
        }
    }
}

#[test]
fn detections_are_torchvisions() {
    for tag in ["v1", "v2"] {
        assert_detections_match(&model(tag), tag);
    }
}

#[test]
fn an_imported_checkpoint_detects_the_same() {
    let dir = tempfile::tempdir().unwrap();
    for tag in ["v1", "v2"] {
        let det = model(tag);
        let ck = dir.path().join(format!("{tag}.safetensors"));
        save_as_checkpoint(&det, &ck).unwrap();
        let back = retinanet_train::load_detector(&ck, &Device::Cpu).unwrap();
        assert_eq!(back.config.model, det.config.model);
        assert_detections_match(&back, tag);
    }
}

#[test]
fn damaged_or_foreign_files_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let sd = read_tensors(&fixtures().join("tv_v2.safetensors")).unwrap();
    let write = |name: &str, sd: &HashMap<String, Tensor>| -> PathBuf {
        let p = dir.path().join(name);
        candle_core::safetensors::save(sd, &p).unwrap();
        p
    };
    let err = |p: &Path| -> String {
        format!(
            "{:#}",
            load_torchvision_retinanet(p, Some(names()), None, &Device::Cpu)
                .err()
                .expect("refused")
        )
    };
    // A missing layer.
    let mut missing = sd.clone();
    missing.remove("head.regression_head.bbox_reg.weight");
    let p = write("missing.safetensors", &missing);
    let m = err(&p);
    assert!(
        m.contains("missing.safetensors") && m.contains("bbox_reg"),
        "{m}"
    );
    // A tensor of another shape.
    let mut shaped = sd.clone();
    shaped.insert(
        "backbone.fpn.layer_blocks.1.0.weight".into(),
        Tensor::zeros((32, 32, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let m = err(&write("shaped.safetensors", &shaped));
    assert!(
        m.contains("shaped.safetensors") && m.contains("layer_blocks.1.0.weight"),
        "{m}"
    );
    // A stray key.
    let mut stray = sd.clone();
    stray.insert(
        "roi_heads.box_predictor.weight".into(),
        Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let m = err(&write("stray.safetensors", &stray));
    assert!(
        m.contains("stray.safetensors") && m.contains("roi_heads.box_predictor.weight"),
        "{m}"
    );
    // GroupNorm heads with P6 from P5 is neither variant.
    let mut mixed = sd.clone();
    mixed.insert(
        "backbone.fpn.extra_blocks.p6.weight".into(),
        Tensor::zeros((32, 32, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let m = err(&write("mixed.safetensors", &mixed));
    assert!(
        m.contains("mixed.safetensors") && m.contains("neither"),
        "{m}"
    );
    // Wrong class names.
    let m = format!(
        "{:#}",
        load_torchvision_retinanet(
            &fixtures().join("tv_v1.safetensors"),
            Some(vec!["a".into()]),
            None,
            &Device::Cpu
        )
        .err()
        .expect("refused")
    );
    assert!(m.contains("1 names") && m.contains("5 classes"), "{m}");
    // The tutorial's detector is not a torchvision RetinaNet.
    let tut = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop/net_d.pkl");
    let m = err(&tut);
    assert!(m.contains("net_d.pkl"), "{m}");
}

#[test]
fn exports_by_torchvisions_names_load_back() {
    let dir = tempfile::tempdir().unwrap();
    for (tag, v2) in [("v1", false), ("v2", true)] {
        let det = model(tag);
        let out = export_torchvision_retinanet(&varmap_tensors(&det.varmap), v2).unwrap();
        // The fixture's keys (v1's old head names in today's form): torchvision's own state dict.
        let fixture = read_tensors(&fixtures().join(format!("tv_{tag}.safetensors"))).unwrap();
        let mut want: Vec<String> = fixture
            .keys()
            .map(|k| {
                let parts: Vec<&str> = k.split('.').collect();
                match parts.as_slice() {
                    ["head", h, "conv", n, leaf] => {
                        format!("head.{h}.conv.{}.0.{leaf}", n.parse::<usize>().unwrap() / 2)
                    }
                    _ => k.clone(),
                }
            })
            .collect();
        want.sort();
        let got: Vec<String> = out.keys().cloned().collect();
        assert_eq!(got, want, "{tag}");
        for (k, t) in &out {
            if !k.ends_with("num_batches_tracked") {
                let f = fixture
                    .iter()
                    .find(|(fk, _)| {
                        **fk == *k
                            || (k.contains(".conv.") && k.starts_with("head.") && {
                                let p: Vec<&str> = fk.split('.').collect();
                                p.len() == 5
                                    && format!(
                                        "head.{}.conv.{}.0.{}",
                                        p[1],
                                        p[3].parse::<usize>().unwrap_or(1) / 2,
                                        p[4]
                                    ) == *k
                            })
                    })
                    .unwrap()
                    .1;
                assert_eq!(f32s(t), f32s(f), "{tag}: {k}");
            }
        }
        let p = dir.path().join(format!("{tag}.safetensors"));
        let map: HashMap<&String, Tensor> = out.iter().map(|(k, v)| (k, v.clone())).collect();
        candle_core::safetensors::save(&map, &p).unwrap();
        let mut back = load_torchvision_retinanet(&p, Some(names()), None, &Device::Cpu).unwrap();
        back.config.data = det.config.data.clone();
        back.config.eval = det.config.eval.clone();
        assert_detections_match(&back, tag);
    }
}

#[test]
fn coco_results_of_the_variant_have_torchvisions_boxes() {
    let det = model("v1");
    let path = fixtures().join("tv_image0.png");
    let opts = decode_options(&det.config.eval);
    let (_, d) = detect_file(&det, &path, ImageScale::Evaluation, &opts).unwrap();
    let ids = retinanet_train::infer::CocoIds::for_model(&det, None, &[path]).unwrap();
    let e = ids.results(0, &d.detections);
    assert_eq!(e.len(), d.detections.len());
    for (c, b) in e.iter().zip(&d.detections.boxes) {
        // Continuous boxes: [x0, y0, x1 - x0, y1 - y0], as torchvision's COCO evaluation.
        let want = [b[1], b[0], b[3] - b[1], b[2] - b[0]].map(|v| v as f64);
        for (x, y) in c.bbox.iter().zip(want) {
            assert!((x - y).abs() < 1e-4, "{:?} vs {want:?}", c.bbox);
        }
        assert_eq!(c.image_id, 1);
        assert!((1..=5).contains(&c.category_id));
    }
}
