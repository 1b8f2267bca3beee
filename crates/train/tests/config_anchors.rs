//! The keys added for real datasets — `[model.anchors]`, `[data.augment]`, `data.eval_max_size`,
//! `eval.mode`, the synthetic `min_objects` and `background` — are optional with the old
//! behaviour as their default, round-trip through the TOML a checkpoint stores, drive the model's
//! head and pyramid, and are refused by key and value when they make no sense.

use retinanet_anchors::AnchorConfig;
use retinanet_train::config::{
    AugmentConfig, DEFAULT_DETECTOR_TOML, DetectorRunConfig, EvalMode, MultiScale, Validate,
    to_toml,
};
use retinanet_train::model::retinanet_config;
use retinanet_train::parse_config;

fn with(extra_model: &str, extra_data: &str, extra_eval: &str) -> String {
    DEFAULT_DETECTOR_TOML
        .replace(
            "head_channels = 64\n",
            &format!("head_channels = 64\n{extra_model}\n"),
        )
        .replace(
            "skip_bad_images = false\n",
            &format!("skip_bad_images = false\n{extra_data}\n"),
        )
        .replace(
            "max_images = 0\n",
            &format!("max_images = 0\n{extra_eval}\n"),
        )
}

fn refused(toml: &str) -> String {
    match parse_config::<DetectorRunConfig>(toml) {
        Err(e) => format!("{e:#}"),
        Ok(c) => format!("{:#}", c.validate().unwrap_err()),
    }
}

#[test]
fn older_configs_mean_the_tutorial() {
    let c: DetectorRunConfig = parse_config(DEFAULT_DETECTOR_TOML).unwrap();
    assert_eq!(c.model.anchors.layout().unwrap(), AnchorConfig::default());
    assert_eq!(c.data.augment, AugmentConfig::default());
    assert_eq!(
        c.data.augment.augment(),
        retinanet_dataset::Augment::default()
    );
    assert_eq!(c.data.eval_max_size, 1000);
    assert_eq!(c.eval.mode, EvalMode::Whole);
    let r = retinanet_config(&c.model, 4, 0).unwrap();
    assert_eq!(
        (
            r.detector.num_anchors,
            r.detector.first_level,
            r.detector.num_levels
        ),
        (3, 3, 4)
    );
    // What a checkpoint stores parses back to the same config.
    let back: DetectorRunConfig = parse_config(&to_toml(&c).unwrap()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn every_new_key_round_trips_and_drives_the_model() {
    let text = with(
        "[model.anchors]\nsizes = [12.0, 24.0, 48.0]\naspect_ratios = [0.5, 1.0, 2.0]\nscales_per_octave = 2\nfirst_stride = 4\nlevels = 3",
        "eval_max_size = 640\n[data.augment]\nvflip = 0.5\nrot90 = true\ncrop_area = [0.3, 0.6]\nhue = 0.05\nmulti_scale = { min = 97, max = 161, step = 32 }",
        "mode = \"center_crop\"",
    );
    let c: DetectorRunConfig = parse_config(&text).unwrap();
    c.validate().unwrap();
    let a = c.model.anchors.layout().unwrap();
    assert_eq!((a.anchors_per_cell(), a.first_stride, a.scales), (6, 4, 3));
    assert!((a.a_hw[0][0] / a.a_hw[0][1] - 0.5).abs() < 1e-12);
    assert_eq!(c.data.augment.sizes(), vec![97, 129, 161]);
    assert_eq!(c.eval.mode, EvalMode::CenterCrop);
    let r = retinanet_config(&c.model, 2, 0).unwrap();
    assert_eq!(
        (
            r.detector.num_anchors,
            r.detector.first_level,
            r.detector.num_levels
        ),
        (6, 2, 3)
    );
    let back: DetectorRunConfig = parse_config(&to_toml(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    // A list of sizes works too; a_hw with octave steps.
    let c: DetectorRunConfig = parse_config(&with(
        "[model.anchors]\na_hw = [[10.0, 20.0]]\nscales_per_octave = 3\nfirst_stride = 16\nlevels = 2",
        "[data.augment]\nmulti_scale = [65, 97]",
        "",
    ))
    .unwrap();
    c.validate().unwrap();
    assert_eq!(
        c.data.augment.multi_scale,
        Some(MultiScale::Sizes(vec![65, 97]))
    );
    let a = c.model.anchors.layout().unwrap();
    assert_eq!(a.a_hw[0], [10.0, 20.0]);
    assert!((a.a_hw[2][0] - 10.0 * 2f64.powf(2.0 / 3.0)).abs() < 1e-9);
}

#[test]
fn meaningless_values_are_refused_by_key_and_value() {
    let anchors = |body: &str| with(&format!("[model.anchors]\n{body}"), "", "");
    let cases: &[(String, &str)] = &[
        (
            anchors(
                "a_hw = [[8.0, 8.0]]\nsizes = [8.0]\nscales_per_octave = 1\nfirst_stride = 8\nlevels = 1",
            ),
            "both a_hw and sizes",
        ),
        (
            anchors("scales_per_octave = 1\nfirst_stride = 8\nlevels = 4"),
            "needs a_hw",
        ),
        (
            anchors(
                "sizes = [8.0, 16.0]\naspect_ratios = [1.0]\nscales_per_octave = 1\nfirst_stride = 8\nlevels = 4",
            ),
            "model.anchors.sizes = [8.0, 16.0] has 2 values for model.anchors.levels = 4",
        ),
        (
            anchors("sizes = [8.0]\nscales_per_octave = 1\nfirst_stride = 8\nlevels = 1"),
            "needs aspect_ratios",
        ),
        (
            anchors(
                "a_hw = [[8.0, 8.0]]\naspect_ratios = [1.0]\nscales_per_octave = 1\nfirst_stride = 8\nlevels = 4",
            ),
            "aspect_ratios goes with sizes",
        ),
        (
            anchors("a_hw = [[8.0, -1.0]]\nscales_per_octave = 1\nfirst_stride = 8\nlevels = 4"),
            "model.anchors.a_hw[0] = [8.0, -1.0]",
        ),
        (
            anchors("a_hw = [[8.0, 8.0]]\nscales_per_octave = 1\nfirst_stride = 12\nlevels = 4"),
            "model.anchors.first_stride = 12",
        ),
        (
            anchors("a_hw = [[8.0, 8.0]]\nscales_per_octave = 1\nfirst_stride = 8\nlevels = 6"),
            "model.anchors.levels = 6",
        ),
        (
            anchors("a_hw = [[8.0, 8.0]]\nscales_per_octave = 0\nfirst_stride = 8\nlevels = 4"),
            "model.anchors.scales_per_octave = 0",
        ),
        (
            anchors(
                "sizes = [16.0, 8.0]\naspect_ratios = [1.0]\nscales_per_octave = 1\nfirst_stride = 8\nlevels = 2",
            ),
            "must not shrink",
        ),
        (
            anchors(
                "a_hw = [[8.0, 8.0]]\nscales_per_octave = 1\nfirst_stride = 8\nlevels = 4\nratios = [1.0]",
            ),
            "ratios",
        ),
        (
            with("", "[data.augment]\nhflip = 1.5", ""),
            "data.augment.hflip = 1.5",
        ),
        (
            with("", "[data.augment]\ncrop_area = [0.6, 0.2]", ""),
            "data.augment.crop_area = [0.6, 0.2]",
        ),
        (
            with("", "[data.augment]\nhue = 0.7", ""),
            "data.augment.hue = 0.7",
        ),
        (
            with(
                "",
                "[data.augment]\nmulti_scale = { min = 300, max = 200, step = 32 }",
                "",
            ),
            "min = 300, max = 200",
        ),
        (
            with("", "[data.augment]\nmulti_scale = [65, 20]", ""),
            "holds size 20",
        ),
        (with("", "[data.augment]\nflip = 0.5", ""), "flip"),
        (
            with("", "eval_max_size = 100", ""),
            "data.eval_max_size = 100",
        ),
        (with("", "", "mode = \"crop\""), "crop"),
    ];
    for (toml, want) in cases {
        let e = refused(toml);
        assert!(e.contains(want), "want {want:?} in: {e}");
    }
    let e = refused(&DEFAULT_DETECTOR_TOML.replace(
        "seed = 0\n\n[train]",
        "seed = 0\nmin_objects = 9\n\n[train]",
    ));
    assert!(e.contains("data.source.min_objects = 9"), "{e}");
}
