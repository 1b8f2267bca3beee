//! `precision = "bf16"` on the CPU, end to end, in a process of its own (the setting is
//! process-wide): where the CPU has AVX512-BF16 a tiny detector trains in bf16, close to the same
//! run in f32 but not equal to it, and a stopped and resumed bf16 run ends with exactly the
//! weights of an uninterrupted one; elsewhere the run is refused before anything is written.

use candle_core::Device;
use retinanet_integration_tests::{logged_losses, quiet, tiny_detector_toml};
use retinanet_train::config::{DetectorRunConfig, Precision};
use retinanet_train::{RunOptions, load_checkpoint, parse_config, train_detector};

fn config(cache: &std::path::Path, name: &str, precision: Precision) -> DetectorRunConfig {
    let mut cfg: DetectorRunConfig =
        parse_config(&tiny_detector_toml(cache, name, "cpu", "", 2, "[0.25]")).unwrap();
    cfg.precision = precision;
    cfg
}

fn weights(path: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let c = load_checkpoint(path, &Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = c
        .tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn bf16_trains_close_to_f32_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    if !retinanet_kernels::bf16::available() {
        let e = format!(
            "{:#}",
            train_detector(&config(&cache, "b", Precision::Bf16), &quiet(&runs)).unwrap_err()
        );
        assert!(
            e.contains("precision = \"bf16\"") && e.contains("AVX512-BF16"),
            "{e}"
        );
        assert!(!runs.exists(), "nothing is written for a refused run");
        return;
    }
    let f = train_detector(&config(&cache, "f", Precision::F32), &quiet(&runs)).unwrap();
    let b = train_detector(&config(&cache, "b", Precision::Bf16), &quiet(&runs)).unwrap();
    assert_eq!((f.steps, b.steps), (12, 12));
    // The run ended with bf16 turned on; an f32 run turns it off again.
    assert!(retinanet_kernels::bf16::bf16_products());

    let (lf, lb) = (
        logged_losses(&f.run.train_log()),
        logged_losses(&b.run.train_log()),
    );
    assert_eq!((lf.len(), lb.len()), (12, 12));
    // Same data, same initial weights: the losses differ by bf16 rounding only, and training
    // stays near the f32 run. (The first loss may agree to the last bit: at initialisation the
    // heads' small weights shrink the 1x1 layers' rounding below the loss's resolution.)
    assert!(
        lf.iter().zip(&lb).skip(1).any(|(a, c)| a != c),
        "bf16 products left every loss bit-identical"
    );
    for (i, (a, c)) in lf.iter().zip(&lb).enumerate() {
        assert!(c.is_finite(), "step {i}: bf16 loss {c}");
        assert!(
            (a - c).abs() <= 0.01 * a.abs(),
            "step {i}: f32 {a} vs bf16 {c}"
        );
    }
    let (wf, wb) = (weights(&f.run.checkpoint()), weights(&b.run.checkpoint()));
    assert_eq!(wf.len(), wb.len());
    assert!(wf != wb, "bf16 weights equal the f32 ones");
    // The stored config says what the run computed in.
    let stored = std::fs::read_to_string(b.run.config()).unwrap();
    assert!(stored.contains("precision = \"bf16\""), "{stored}");

    // Stopped after 5 steps and resumed: exactly the uninterrupted bf16 run.
    let cfg = config(&cache, "split", Precision::Bf16);
    let first = train_detector(
        &cfg,
        &RunOptions {
            max_steps: Some(5),
            ..quiet(&runs)
        },
    )
    .unwrap();
    assert!(first.stopped_early);
    let second = train_detector(
        &cfg,
        &RunOptions {
            resume: true,
            ..quiet(&runs)
        },
    )
    .unwrap();
    assert_eq!(second.steps, 12);
    assert_eq!(weights(&second.run.checkpoint()), wb);
    assert_eq!(logged_losses(&second.run.train_log()), lb);

    // And f32 again in the same process: bit-identical to the first f32 run.
    let f2 = train_detector(&config(&cache, "f2", Precision::F32), &quiet(&runs)).unwrap();
    assert!(!retinanet_kernels::bf16::bf16_products());
    assert_eq!(weights(&f2.run.checkpoint()), wf);
}
