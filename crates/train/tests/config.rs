//! Configs are strict: a typo, a missing key or a wrong type is refused with the key named;
//! the shipped configs all parse.

use retinanet_train::config::{
    DEFAULT_DETECTOR_TOML, DEFAULT_PRETRAIN_TOML, DetectorRunConfig, PretrainRunConfig,
};
use retinanet_train::{parse_config, read_config};
use std::path::Path;

#[test]
fn shipped_configs_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    for f in [
        "default.toml",
        "voc.toml",
        "small-objects.toml",
        "torchvision-v2.toml",
    ] {
        let c: DetectorRunConfig = read_config(&root.join(f)).unwrap();
        c.train.lr.validate().unwrap();
        retinanet_train::config::Validate::validate(&c).unwrap();
    }
    // The small-object config: its own anchors from stride 4, whole-image evaluation.
    let s: DetectorRunConfig = read_config(&root.join("small-objects.toml")).unwrap();
    let a = s.model.anchors.layout().unwrap();
    assert_eq!((a.first_stride, a.scales, a.anchors_per_cell()), (4, 3, 3));
    assert_eq!(s.eval.mode, retinanet_train::config::EvalMode::Whole);
    // torchvision's v2: its anchors (9 per cell on P3..P7), not the tutorial's.
    let tv: DetectorRunConfig = read_config(&root.join("torchvision-v2.toml")).unwrap();
    assert_eq!(
        tv.model.variant,
        retinanet_train::config::Variant::TorchvisionV2
    );
    let a = tv.model.anchor_layout().unwrap();
    assert_eq!((a.first_stride, a.scales, a.anchors_per_cell()), (8, 5, 9));
    for f in ["pretrain-default.toml", "pretrain-imagenet.toml"] {
        let c: PretrainRunConfig = read_config(&root.join(f)).unwrap();
        c.train.lr.validate().unwrap();
    }
    let d: DetectorRunConfig = parse_config(DEFAULT_DETECTOR_TOML).unwrap();
    assert_eq!(
        (
            d.model.depth,
            d.model.base_width,
            d.data.size,
            d.train.batch_size
        ),
        (18, 32, 129, 16)
    );
    let voc: DetectorRunConfig = read_config(&root.join("voc.toml")).unwrap();
    assert_eq!(
        (voc.model.depth, voc.data.size, voc.train.batch_size),
        (50, 257, 30)
    );
    assert_eq!(
        (voc.train.lr.lr, voc.train.momentum, voc.train.weight_decay),
        (0.01, 0.9, 1e-4)
    );
    let p: PretrainRunConfig = parse_config(DEFAULT_PRETRAIN_TOML).unwrap();
    assert_eq!(p.depth, 18);
}

#[test]
fn typos_missing_keys_and_wrong_types_are_named() {
    let typo = DEFAULT_DETECTOR_TOML.replace("momentum = 0.9", "momentun = 0.9");
    let e = parse_config::<DetectorRunConfig>(&typo)
        .unwrap_err()
        .to_string();
    assert!(e.contains("momentun"), "{e}");
    let missing = DEFAULT_DETECTOR_TOML.replace("weight_decay = 1e-4\n", "");
    let e = parse_config::<DetectorRunConfig>(&missing)
        .unwrap_err()
        .to_string();
    assert!(e.contains("weight_decay"), "{e}");
    let wrong = DEFAULT_DETECTOR_TOML.replace("batch_size = 16", "batch_size = \"sixteen\"");
    let e = parse_config::<DetectorRunConfig>(&wrong)
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch_size") || e.contains("sixteen"), "{e}");
    assert!(e.contains("line"), "the line is named: {e}");
    let kind = DEFAULT_DETECTOR_TOML.replace("kind = \"synthetic\"", "kind = \"pascal\"");
    let e = parse_config::<DetectorRunConfig>(&kind)
        .unwrap_err()
        .to_string();
    assert!(e.contains("pascal"), "{e}");
    let e = read_config::<DetectorRunConfig>(Path::new("/nonexistent/x.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/x.toml"), "{e}");
}

/// `precision` is optional (f32), spelled as in the docs, left out of written configs at f32,
/// and a run refuses what this machine cannot do before it opens data or writes anything.
#[test]
fn precision_key() {
    use retinanet_train::config::Precision;
    let d: DetectorRunConfig = parse_config(DEFAULT_DETECTOR_TOML).unwrap();
    assert_eq!(d.precision, Precision::F32);
    let text = toml::to_string(&d).unwrap();
    assert!(!text.contains("precision"), "{text}");
    let with =
        DEFAULT_DETECTOR_TOML.replace("device = \"cpu\"", "device = \"cpu\"\nprecision = \"bf16\"");
    let b: DetectorRunConfig = parse_config(&with).unwrap();
    assert_eq!(b.precision, Precision::Bf16);
    assert!(
        toml::to_string(&b)
            .unwrap()
            .contains("precision = \"bf16\"")
    );
    let bad =
        DEFAULT_DETECTOR_TOML.replace("device = \"cpu\"", "device = \"cpu\"\nprecision = \"fp8\"");
    let e = parse_config::<DetectorRunConfig>(&bad)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fp8") && e.contains("bf16") && e.contains("line"),
        "{e}"
    );

    // TF32 on the CPU: refused by the run itself, naming the key, before any data or run folder.
    let runs = std::env::temp_dir().join(format!("precision-key-{}", std::process::id()));
    let mut cfg = d.clone();
    cfg.precision = Precision::Tf32;
    if let retinanet_train::config::DetectionSourceConfig::Synthetic { cache_dir, .. } =
        &mut cfg.data.source
    {
        *cache_dir = runs.join("cache");
    }
    let opts = retinanet_train::run::RunOptions {
        runs_dir: runs.clone(),
        quiet: true,
        ..Default::default()
    };
    let e = format!(
        "{:#}",
        retinanet_train::train_detector(&cfg, &opts).unwrap_err()
    );
    assert!(e.contains("precision = \"tf32\""), "{e}");
    assert!(!runs.exists(), "nothing is written for a refused run");
    let p: PretrainRunConfig = parse_config(
        &DEFAULT_PRETRAIN_TOML.replace("device = \"cpu\"", "device = \"cpu\"\nprecision = \"f16\""),
    )
    .unwrap();
    assert_eq!(p.precision, Precision::F16);
}
