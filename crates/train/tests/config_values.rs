//! Every config value is checked for its meaning, not only its type: a refusal names the file,
//! the key, the value and what is allowed — for the detector and the pretraining configs.

use clap::Parser;
use retinanet_train::cli::RunArgs;
use retinanet_train::config::{
    DEFAULT_DETECTOR_TOML, DEFAULT_PRETRAIN_TOML, DetectorRunConfig, PretrainRunConfig, Validate,
};
use retinanet_train::parse_config;

/// Replaces the first `key = ...` line under `[table]` with `key = value`.
fn set(toml: &str, table: &str, key: &str, value: &str) -> String {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut done = false;
    for line in toml.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            current = t.trim_matches(|c| c == '[' || c == ']').to_string();
        }
        if !done && current == table && t.split('=').next().map(str::trim) == Some(key) {
            out.push(format!("{key} = {value}"));
            done = true;
        } else {
            out.push(line.to_string());
        }
    }
    assert!(done, "{table}.{key} not in the config");
    out.join("\n")
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

#[test]
fn detector_values_out_of_range_are_refused_with_key_file_and_range() {
    let cases: &[(&str, &str, &str, &str)] = &[
        ("train", "epochs", "0", "train.epochs = 0"),
        ("train", "batch_size", "0", "train.batch_size = 0"),
        (
            "train",
            "checkpoint_every",
            "0",
            "train.checkpoint_every = 0",
        ),
        ("train", "momentum", "1.0", "train.momentum = 1"),
        ("train", "momentum", "-0.1", "train.momentum = -0.1"),
        ("train", "weight_decay", "-1e-4", "train.weight_decay"),
        ("train", "grad_clip", "-1.0", "train.grad_clip = -1"),
        ("train", "grad_clip", "nan", "train.grad_clip = NaN"),
        (
            "train",
            "time_limit_minutes",
            "-5.0",
            "train.time_limit_minutes = -5",
        ),
        ("train", "frozen_stages", "9", "train.frozen_stages = 9"),
        ("train", "iou_th", "[0.6, 0.4]", "train.iou_th = [0.6, 0.4]"),
        ("train", "iou_th", "[0.4, 1.5]", "train.iou_th"),
        ("train.lr", "lr", "0.0", "train.lr.lr = 0"),
        (
            "train.lr",
            "progress_boundaries",
            "[1.5]",
            "train.lr.progress_boundaries",
        ),
        ("eval", "score_th", "1.5", "eval.score_th = 1.5"),
        ("eval", "score_th", "-0.1", "eval.score_th = -0.1"),
        ("eval", "nms_th", "-0.5", "eval.nms_th = -0.5"),
        ("data", "size", "1", "data.size = 1"),
        ("data", "eval_size", "0", "data.eval_size = 0"),
        ("data", "boxarea_th", "-3.0", "data.boxarea_th = -3"),
        ("model", "depth", "19", "model.depth = 19"),
        ("model", "base_width", "0", "model.base_width = 0"),
        (
            "data.source",
            "object_size",
            "[50.0, 10.0]",
            "data.source.object_size",
        ),
        ("data.source", "num_train", "0", "data.source.num_train = 0"),
        // One batch of 16 images of 100,000 px squared cannot fit in any memory.
        ("data", "size", "100000", "data.size = 100000"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for &(table, key, value, want) in cases {
        let text = set(DEFAULT_DETECTOR_TOML, table, key, value);
        let cfg: DetectorRunConfig = parse_config(&text).unwrap_or_else(|e| panic!("{key}: {e}"));
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(want), "{table}.{key} = {value}: {e}");
        // Through the command line the file is named too, and nothing runs for minutes.
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, &text).unwrap();
        let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap()]);
        let t0 = std::time::Instant::now();
        let e = format!(
            "{:#}",
            cli.run
                .load_config::<DetectorRunConfig>(DEFAULT_DETECTOR_TOML)
                .unwrap_err()
        );
        assert!(e.contains("bad.toml") && e.contains(want), "{e}");
        assert!(t0.elapsed().as_secs() < 2);
    }
    let ok: DetectorRunConfig = parse_config(DEFAULT_DETECTOR_TOML).unwrap();
    ok.validate().unwrap();
}

#[test]
fn pretrain_values_out_of_range_are_refused_by_key() {
    let cases: &[(&str, &str, &str, &str)] = &[
        ("train", "steps", "0", "train.steps = 0"),
        ("train", "eval_every", "0", "train.eval_every = 0"),
        ("train", "eval_batch_size", "0", "train.eval_batch_size = 0"),
        ("train", "momentum", "2.0", "train.momentum = 2"),
        (
            "train",
            "time_limit_minutes",
            "-1.0",
            "train.time_limit_minutes = -1",
        ),
        ("", "depth", "7", "depth = 7"),
        ("data", "size", "8", "data.size = 8"),
    ];
    for &(table, key, value, want) in cases {
        let text = set(DEFAULT_PRETRAIN_TOML, table, key, value);
        let cfg: PretrainRunConfig = parse_config(&text).unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(want), "{key} = {value}: {e}");
    }
    let ok: PretrainRunConfig = parse_config(DEFAULT_PRETRAIN_TOML).unwrap();
    ok.validate().unwrap();
}
