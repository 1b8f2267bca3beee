//! The ONNX export run by a pure-Rust ONNX runtime (tract): small random-weight detectors —
//! the tutorial's layout, P2..P5 with 9 anchors per cell, a bottleneck ResNet-50 to P7 — give
//! the project's own outputs and anchors at several non-square sizes, BatchNorm folded; bad
//! paths and opsets are errors naming the file.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Normal};
use retinanet_anchors::gen_anchors;
use retinanet_train::LoadedDetector;
use retinanet_train::config::{AnchorsConfig, DEFAULT_DETECTOR_TOML, ModelConfig};
use retinanet_train::detect::encoder_for;
use retinanet_train::model::build_model;
use retinanet_train::onnx::{DEFAULT_OPSET, export_onnx, sigmoid, write_check_data};
use retinanet_train::{DetectorRunConfig, parse_config};
use tract_onnx::prelude::*;

/// A detector of `model` for `classes` classes with random weights far from the identity:
/// convolutions N(0, g / fan_in) (outputs of order 1, so 1e-4 is a real bound), biases and
/// every BatchNorm parameter and statistic random, so folding them wrongly shows.
fn detector(model: ModelConfig, classes: usize, seed: u64) -> LoadedDetector {
    let mut config: DetectorRunConfig = parse_config(DEFAULT_DETECTOR_TOML).unwrap();
    config.model = model;
    let (varmap, net) = build_model(&config.model, classes, 0, seed, &Device::Cpu).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    {
        let data = varmap.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            let dims = var.dims().to_vec();
            let n: usize = dims.iter().product();
            let leaf = name.rsplit('.').next().unwrap();
            let is_bn = name.contains(".bn") || name.contains("downsample.1.");
            let mut uniform = |lo: f32, hi: f32| -> Vec<f32> {
                (0..n).map(|_| rng.random_range(lo..hi)).collect()
            };
            let v = match leaf {
                "running_mean" => uniform(-0.3, 0.3),
                "running_var" => uniform(0.3, 2.0),
                "weight" if is_bn => uniform(0.5, 1.5),
                "bias" if is_bn => uniform(-0.3, 0.3),
                "bias" => uniform(-0.2, 0.2),
                _ => {
                    let fan_in: usize = dims[1..].iter().product();
                    // Gains that keep the activations of order 1 through ReLUs and sums.
                    let gain = if name.starts_with("extractor.") {
                        1.0
                    } else {
                        0.6
                    };
                    let d = Normal::new(0.0, (gain / fan_in as f64).sqrt()).unwrap();
                    (0..n).map(|_| d.sample(&mut rng) as f32).collect()
                }
            };
            var.set(&Tensor::from_vec(v, dims.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let encoder = encoder_for(&config, classes).unwrap();
    LoadedDetector {
        model: net,
        varmap,
        encoder,
        class_names: (1..=classes).map(|i| format!("class{i}")).collect(),
        config,
        device: Device::Cpu,
    }
}

fn model(depth: usize, width: usize, anchors: AnchorsConfig) -> ModelConfig {
    ModelConfig {
        depth,
        base_width: width,
        fpn_channels: 16,
        head_channels: 16,
        anchors,
        variant: Default::default(),
        bn_eps: None,
    }
}

fn sizes_layout(sizes: &[f64], ratios: &[f64], spo: usize, first_stride: usize) -> AnchorsConfig {
    AnchorsConfig {
        a_hw: None,
        sizes: Some(sizes.to_vec()),
        aspect_ratios: Some(ratios.to_vec()),
        scales_per_octave: spo,
        first_stride,
        levels: sizes.len(),
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn std_dev(v: &[f32]) -> f32 {
    let m = v.iter().sum::<f32>() / v.len() as f32;
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f32>() / v.len() as f32).sqrt()
}

/// tract's four outputs (`cls`, `reg`, `anchors`, `cls_logits`) with their shapes.
type Outputs = Vec<(Vec<usize>, Vec<f32>)>;

/// The file as one tract plan, its image size left symbolic (`H`, `W`) as the file declares.
fn tract_plan(path: &Path) -> Arc<TypedRunnableModel> {
    tract_onnx::onnx()
        .model_for_path(path)
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap()
}

fn run_tract(plan: &Arc<TypedRunnableModel>, x: &Tensor) -> Outputs {
    let input = tract_onnx::prelude::Tensor::from_shape(x.dims(), &values(x)).unwrap();
    plan.run(tvec!(input.into()))
        .unwrap()
        .iter()
        .map(|t| {
            let v = t.to_plain_array_view::<f32>().unwrap();
            (t.shape().to_vec(), v.iter().copied().collect())
        })
        .collect()
}

/// Exports `det` and checks tract's outputs — one plan for every size — against the project's
/// forward pass and anchors at each size: `cls_logits`, `reg` and the sigmoid `cls` to 1e-4, the anchors exactly. Returns
/// the largest difference seen.
///
/// With `RETINANET_ONNX_CHECK_DIR` set, the file and check data for onnxruntime
/// (`scripts/check_onnx.py`) are also written there as `{case}.onnx` and
/// `{case}.check.safetensors`.
fn check(case: &str, det: &LoadedDetector, sizes: &[(usize, usize)], opset: i64, seed: u64) -> f32 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    let summary = export_onnx(det, &path, opset).unwrap();
    if let Some(out) = std::env::var_os("RETINANET_ONNX_CHECK_DIR") {
        let out = Path::new(&out);
        std::fs::create_dir_all(out).unwrap();
        std::fs::copy(&path, out.join(format!("{case}.onnx"))).unwrap();
        write_check_data(det, sizes, &out.join(format!("{case}.check.safetensors"))).unwrap();
    }
    assert!(summary.parameters > 0 && summary.bytes > 4 * summary.parameters);
    let plan = tract_plan(&path);
    let layout = det.config.model.anchor_layout().unwrap();
    let c = det.class_names.len();
    let mut worst = 0f32;
    for (i, &(h, w)) in sizes.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(seed * 100 + i as u64);
        let d = Normal::new(0f32, 1.0).unwrap();
        let v: Vec<f32> = (0..3 * h * w).map(|_| d.sample(&mut rng)).collect();
        let x = Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu).unwrap();
        let (cls, reg) = det.model.infer(&x).unwrap();
        let anchors = gen_anchors(&layout, (h, w));
        let a = anchors.len();
        assert_eq!(cls.dims(), &[1, a, c]);
        let out = run_tract(&plan, &x);
        assert_eq!(out.len(), 4, "cls, reg, anchors, cls_logits");
        assert_eq!(out[0].0, [1, a, c], "cls shape at {h}x{w}");
        assert_eq!(out[1].0, [1, a, 4], "reg shape at {h}x{w}");
        assert_eq!(out[2].0, [a, 4], "anchors shape at {h}x{w}");
        assert_eq!(out[3].0, [1, a, c], "cls_logits shape at {h}x{w}");
        let (logits, reg) = (values(&cls), values(&reg));
        // Outputs of order 1: a difference of 1e-4 is a real one.
        assert!(
            std_dev(&logits) > 0.05 && std_dev(&reg) > 0.05,
            "outputs too flat"
        );
        let scores = values(&sigmoid(&cls).unwrap());
        let d_logits = max_abs(&out[3].1, &logits);
        let d_reg = max_abs(&out[1].1, &reg);
        let d_cls = max_abs(&out[0].1, &scores);
        let want: Vec<f32> = anchors.yxhw.iter().flatten().copied().collect();
        let d_anchors = max_abs(&out[2].1, &want);
        eprintln!(
            "{h}x{w} opset {opset}: {a} anchors; max |diff| logits {d_logits:.2e} reg {d_reg:.2e} scores {d_cls:.2e} anchors {d_anchors}; std logits {:.2} reg {:.2}, max |logit| {:.2}",
            std_dev(&logits),
            std_dev(&reg),
            logits.iter().fold(0f32, |m, x| m.max(x.abs()))
        );
        assert!(
            d_logits <= 1e-4,
            "cls_logits at {h}x{w} differ by {d_logits}"
        );
        assert!(d_reg <= 1e-4, "reg at {h}x{w} differs by {d_reg}");
        assert!(d_cls <= 1e-4, "cls at {h}x{w} differs by {d_cls}");
        assert_eq!(d_anchors, 0.0, "anchors at {h}x{w}");
        worst = worst.max(d_logits).max(d_reg).max(d_cls);
    }
    worst
}

#[test]
fn the_tutorial_layout_runs_in_tract_as_in_the_project() {
    let det = detector(model(18, 8, AnchorsConfig::default()), 4, 1);
    assert_eq!(det.model.detector.config().first_level, 3);
    check(
        "tutorial",
        &det,
        &[(70, 97), (129, 64), (16, 41)],
        DEFAULT_OPSET,
        1,
    );
    // The oldest opset offered gives the same graph.
    check("tutorial-opset13", &det, &[(45, 80)], 13, 2);
}

#[test]
fn p2_to_p5_with_nine_anchors_per_cell_runs_in_tract_as_in_the_project() {
    let layout = sizes_layout(&[16.0, 32.0, 64.0, 128.0], &[0.5, 1.0, 2.0], 3, 4);
    let det = detector(model(18, 8, layout), 3, 2);
    let d = det.model.detector.config();
    assert_eq!((d.first_level, d.num_levels, d.num_anchors), (2, 4, 9));
    check("p2-p5-9", &det, &[(61, 90), (100, 47)], DEFAULT_OPSET, 3);
}

#[test]
fn a_bottleneck_resnet50_to_p7_runs_in_tract_as_in_the_project() {
    // Sizes that do not double: the levels' own scales.
    let layout = sizes_layout(&[20.0, 44.0, 90.0, 170.0, 350.0], &[1.0, 2.0], 1, 8);
    let det = detector(model(50, 4, layout), 2, 3);
    let d = det.model.detector.config();
    assert_eq!((d.first_level, d.num_levels, d.num_anchors), (3, 5, 2));
    check("r50-p3-p7", &det, &[(96, 161), (140, 75)], DEFAULT_OPSET, 4);
}

#[test]
fn the_graph_folds_batch_norm_and_declares_a_symbolic_image_size() {
    let det = detector(model(18, 8, AnchorsConfig::default()), 4, 4);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    export_onnx(&det, &path, DEFAULT_OPSET).unwrap();
    let proto = tract_onnx::onnx().proto_model_for_path(&path).unwrap();
    assert_eq!(proto.opset_import[0].version, DEFAULT_OPSET);
    let g = proto.graph.as_ref().unwrap();
    let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
    assert!(!ops.contains(&"BatchNormalization"), "BatchNorm is folded");
    // 20 ResNet-18 convolutions (3 shortcuts), 6 of the FPN (prj_5..3, conv_4, conv_3,
    // conv_out6), 8 head convolutions on each of 4 levels.
    assert_eq!(ops.iter().filter(|&&o| o == "Conv").count(), 20 + 6 + 8 * 4);
    let dims = |v: &tract_onnx::pb::ValueInfoProto| -> Vec<String> {
        use tract_onnx::pb::tensor_shape_proto::dimension::Value;
        let Some(tract_onnx::pb::type_proto::Value::TensorType(t)) =
            v.r#type.as_ref().unwrap().value.as_ref()
        else {
            panic!("not a tensor")
        };
        t.shape
            .as_ref()
            .unwrap()
            .dim
            .iter()
            .map(|d| match d.value.as_ref().unwrap() {
                Value::DimValue(n) => n.to_string(),
                Value::DimParam(s) => s.clone(),
            })
            .collect()
    };
    assert_eq!(g.input.len(), 1);
    assert_eq!(g.input[0].name, "image");
    assert_eq!(dims(&g.input[0]), ["1", "3", "H", "W"]);
    let outs: Vec<(&str, Vec<String>)> = g
        .output
        .iter()
        .map(|o| (o.name.as_str(), dims(o)))
        .collect();
    assert_eq!(
        outs,
        [
            ("cls", vec!["1".into(), "A".into(), "4".into()]),
            ("reg", vec!["1".into(), "A".into(), "4".into()]),
            ("anchors", vec!["A".into(), "4".into()]),
            ("cls_logits", vec!["1".into(), "A".into(), "4".into()]),
        ]
    );
    let names = proto
        .metadata_props
        .iter()
        .find(|p| p.key == "class_names")
        .unwrap();
    assert_eq!(names.value, r#"["class1","class2","class3","class4"]"#);
}

#[test]
fn a_bad_output_path_is_an_error_naming_it() {
    let det = detector(model(18, 8, AnchorsConfig::default()), 2, 5);
    let dir = tempfile::tempdir().unwrap();
    // A folder where the file should go, and a file where a folder should be.
    let taken = dir.path().join("taken.onnx");
    std::fs::create_dir(&taken).unwrap();
    let blocker = dir.path().join("plain-file");
    std::fs::write(&blocker, b"x").unwrap();
    for path in [taken.clone(), blocker.join("model.onnx")] {
        let err = format!("{:#}", export_onnx(&det, &path, DEFAULT_OPSET).unwrap_err());
        assert!(
            err.contains(&path.display().to_string()),
            "{err} names {}",
            path.display()
        );
    }
    // Nothing half-written is left behind.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn an_unsupported_opset_is_refused_naming_the_file() {
    let det = detector(model(18, 8, AnchorsConfig::default()), 2, 6);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    for opset in [11, 19] {
        let err = format!("{:#}", export_onnx(&det, &path, opset).unwrap_err());
        assert!(
            err.contains(&path.display().to_string()) && err.contains(&format!("opset {opset}")),
            "{err}"
        );
        assert!(!path.exists());
    }
}

#[test]
fn the_batch_norm_statistics_are_in_the_graph() {
    let det = detector(model(18, 8, AnchorsConfig::default()), 3, 7);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    export_onnx(&det, &path, DEFAULT_OPSET).unwrap();
    let x = Tensor::randn(0f32, 1., (1, 3, 50, 77), &Device::Cpu).unwrap();
    let before = run_tract(&tract_plan(&path), &x);
    let d = |out: &Outputs| max_abs(&out[3].1, &values(&det.model.infer(&x).unwrap().0));
    assert!(d(&before) <= 1e-4);
    // One running variance changed after the export: the file no longer matches the model ...
    {
        let data = det.varmap.data().lock().unwrap();
        let v = &data["extractor.layer1.0.bn2.running_var"];
        v.set(&(v.as_tensor() * 4.0).unwrap()).unwrap();
    }
    let stale = d(&before);
    assert!(stale > 1e-3, "the change shows by {stale}");
    // ... until it is exported again.
    export_onnx(&det, &path, DEFAULT_OPSET).unwrap();
    let after = run_tract(&tract_plan(&path), &x);
    assert!(d(&after) <= 1e-4, "{}", d(&after));
}

#[test]
fn the_tutorials_pytorch_pair_exports_to_a_graph_giving_pytorchs_outputs() {
    // The committed pair and PyTorch's outputs on a non-square batch (tests/interop.rs).
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop");
    let names = ["rectangle", "ellipse", "triangle", "cross"].map(String::from);
    let det = retinanet_train::interop::load_state_dict_pair(
        &f.join("net_e.pkl"),
        &f.join("net_d.pkl"),
        Some(names.to_vec()),
        &Device::Cpu,
    )
    .unwrap();
    let io = retinanet_extractor::weights::read_tensors(&f.join("io.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tutorial.onnx");
    export_onnx(&det, &path, DEFAULT_OPSET).unwrap();
    let plan = tract_plan(&path);
    for i in 0..io["x"].dim(0).unwrap() {
        let x = io["x"].narrow(0, i, 1).unwrap().contiguous().unwrap();
        let out = run_tract(&plan, &x);
        let cls = values(&io["cls"].narrow(0, i, 1).unwrap());
        let reg = values(&io["reg"].narrow(0, i, 1).unwrap());
        let (dc, dr) = (max_abs(&out[3].1, &cls), max_abs(&out[1].1, &reg));
        eprintln!("image {i}: max |tract - PyTorch| logits {dc:.2e} reg {dr:.2e}");
        assert!(dc <= 1e-4 && dr <= 1e-4, "image {i}: {dc} {dr}");
    }
}

#[test]
fn torchvisions_variants_run_in_tract_as_in_the_project() {
    for (v2, eps) in [(false, 0.0), (true, 1e-5)] {
        let mut m = ModelConfig::torchvision(50, v2, Some(eps));
        m.base_width = 4;
        m.fpn_channels = 32;
        m.head_channels = 32;
        let det = detector(m, 3, 11 + v2 as u64);
        // Padded sizes as torchvision feeds them, and one it would pad (strides image // grid).
        let worst = check(
            if v2 { "tv_v2" } else { "tv_v1" },
            &det,
            &[(96, 160), (64, 64), (70, 97)],
            DEFAULT_OPSET,
            5,
        );
        assert!(worst <= 1e-4);
    }
}
