//! The CUDA backend against the CPU (built only with `--features cuda`; needs a GPU): the same
//! seeded model gives the same outputs, loss, gradients and SGD update on both devices, and a
//! training run on the GPU follows the CPU run step for step.
//!
//! The CPU side runs this project's own kernels (im2col + gemm convolutions, fused BatchNorm,
//! in-place SGD); the GPU side runs candle's CUDA ops and the tensor-arithmetic optimizer, so
//! this checks the two implementations against each other, not one against itself.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use retinanet_detector::{RetinaNetConfig, is_buffer};
use retinanet_integration_tests::{logged_losses, tiny_detector_toml};
use retinanet_loss::{FocalLossConfig, focal_loss_detection};
use retinanet_train::model::{build_retinanet, retinanet_config, trainable_vars};
use retinanet_train::{RunOptions, Sgd, load_checkpoint, parse_config, train_detector};

fn gpu() -> Device {
    Device::new_cuda(0)
        .expect("these tests need a CUDA device (they are built only with --features cuda)")
}

/// Deterministic values in [-1, 1) (a 64-bit LCG), so both devices see the same data.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// ‖a − b‖ / ‖b‖ over all elements (f64), with the two tensors on any devices.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let host = |t: &Tensor| -> Vec<f32> {
        let t = t.to_device(&Device::Cpu).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    };
    let (a, b) = (host(a), host(b));
    assert_eq!(a.len(), b.len());
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        assert!(x.is_finite(), "non-finite value {x}");
        d += (*x as f64 - *y as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    (d / n.max(1e-30)).sqrt()
}

/// The tiny test run's model (4 classes, as its synthetic shapes), so both tests check the same
/// network.
fn small_config() -> RetinaNetConfig {
    let run = run_config(Path::new("data-cache"), "model", "cpu");
    retinanet_config(&run.model, 4, run.train.frozen_stages).unwrap()
}

/// Prints the largest difference found and fails above `tol`.
fn check_worst(what: &str, worst: &(f64, String), tol: f64) {
    eprintln!(
        "{what}: largest difference {:.2e} in `{}`",
        worst.0, worst.1
    );
    assert!(
        worst.0 < tol,
        "{what}: `{}` differs by {:.2e}",
        worst.1,
        worst.0
    );
}

#[test]
fn forward_loss_gradients_and_sgd_match_the_cpu() {
    let cfg = small_config();
    let (cpu, cuda) = (Device::Cpu, gpu());
    let (vm_c, model_c) = build_retinanet(&cfg, 7, &cpu).unwrap();
    let (vm_g, model_g) = build_retinanet(&cfg, 7, &cuda).unwrap();

    let (b, s) = (2, 65);
    let x = Tensor::from_vec(values(b * 3 * s * s, 1), (b, 3, s, s), &cpu).unwrap();
    let xg = x.to_device(&cuda).unwrap();

    // Inference (BatchNorm from running statistics).
    let (ic, rc) = model_c.infer(&x).unwrap();
    let (ig, rg) = model_g.infer(&xg).unwrap();
    let (e1, e2) = (rel_err(&ig, &ic), rel_err(&rg, &rc));
    eprintln!("inference: classes {e1:.2e}, boxes {e2:.2e}");
    assert!(
        e1 < 1e-4 && e2 < 1e-4,
        "inference differs: classes {e1:.2e}, boxes {e2:.2e}"
    );

    // Training forward (batch statistics), focal loss, backward.
    let (cc, bc) = model_c.forward_t(&x, true).unwrap();
    let (cg, bg) = model_g.forward_t(&xg, true).unwrap();
    let (e1, e2) = (rel_err(&cg, &cc), rel_err(&bg, &bc));
    eprintln!("training forward: classes {e1:.2e}, boxes {e2:.2e}");
    assert!(
        e1 < 1e-4 && e2 < 1e-4,
        "training forward differs: classes {e1:.2e}, boxes {e2:.2e}"
    );
    let anchors = cc.dim(1).unwrap();
    // Targets: every 37th anchor positive (class 0-3), every 41st ignored, the rest background.
    let cls_t: Vec<i64> = (0..b * anchors)
        .map(|i| match (i % 37, i % 41) {
            (0, _) => 1 + (i / 37 % 4) as i64,
            (_, 0) => -1,
            _ => 0,
        })
        .collect();
    let cls_t = Tensor::from_vec(cls_t, (b, anchors), &cpu).unwrap();
    let reg_t = Tensor::from_vec(values(b * anchors * 4, 2), (b, anchors, 4), &cpu).unwrap();
    let fl = FocalLossConfig::default();
    let lc = focal_loss_detection(&cc, &bc, &cls_t, &reg_t, &fl).unwrap();
    let lg = focal_loss_detection(
        &cg,
        &bg,
        &cls_t.to_device(&cuda).unwrap(),
        &reg_t.to_device(&cuda).unwrap(),
        &fl,
    )
    .unwrap();
    let (tc, tg) = (
        lc.total.to_scalar::<f32>().unwrap(),
        lg.total.to_scalar::<f32>().unwrap(),
    );
    eprintln!("loss: {tc} (cpu) vs {tg} (cuda)");
    assert!(
        ((tc - tg) / tc).abs() < 1e-4,
        "loss {tc} (cpu) vs {tg} (cuda)"
    );
    assert_eq!(lc.num_positive, lg.num_positive);

    let (gc, gg) = (lc.total.backward().unwrap(), lg.total.backward().unwrap());
    let (vc, vg) = (trainable_vars(&vm_c), trainable_vars(&vm_g));
    assert_eq!(vc.len(), vg.len());
    let mut worst = (0f64, String::new());
    for ((name, a), (_, g)) in vc.iter().zip(&vg) {
        let e = rel_err(gg.get(g).unwrap(), gc.get(a).unwrap());
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    check_worst("gradients (relative)", &worst, 1e-3);

    // One SGD step (in place on the CPU, tensor arithmetic on the GPU), clipped.
    let mut oc = Sgd::new(vc.clone(), 0.9, 1e-4).unwrap();
    let mut og = Sgd::new(vg.clone(), 0.9, 1e-4).unwrap();
    let nc = oc.step(&gc, 0.05, Some(1.0)).unwrap().unwrap();
    let ng = og.step(&gg, 0.05, Some(1.0)).unwrap().unwrap();
    eprintln!("gradient norm {nc} (cpu) vs {ng} (cuda)");
    assert!(((nc - ng) / nc).abs() < 1e-4, "gradient norm {nc} vs {ng}");
    for ((name, a), (_, g)) in vc.iter().zip(&vg) {
        let e = rel_err(g.as_tensor(), a.as_tensor());
        assert!(e < 1e-5, "`{name}` after the SGD step differs by {e:.2e}");
    }
    // The running statistics moved the same way.
    let (bc, bg) = (vm_c.data().lock().unwrap(), vm_g.data().lock().unwrap());
    let mut buffers = 0;
    for (k, v) in bc.iter().filter(|(k, _)| is_buffer(k)) {
        if v.dtype() == DType::F32 {
            let e = rel_err(bg[k].as_tensor(), v.as_tensor());
            assert!(e < 1e-5, "buffer `{k}` differs by {e:.2e}");
            buffers += 1;
        }
    }
    assert!(buffers > 0);
}

fn run_config(cache: &Path, name: &str, device: &str) -> retinanet_train::DetectorRunConfig {
    parse_config(&tiny_detector_toml(cache, name, device, "", 2, "[]")).unwrap()
}

#[test]
fn a_training_run_on_cuda_follows_the_cpu_run() {
    let dir = tempfile::tempdir().unwrap();
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    retinanet_train::init_runtime();
    let opts = RunOptions {
        runs_dir: runs.clone(),
        quiet: true,
        ..Default::default()
    };
    let c = train_detector(&run_config(&cache, "cpu", "cpu"), &opts).unwrap();
    let g = train_detector(&run_config(&cache, "gpu", "cuda"), &opts).unwrap();
    assert_eq!((c.steps, g.steps), (12, 12));
    let (lc, lg) = (
        logged_losses(&c.run.train_log()),
        logged_losses(&g.run.train_log()),
    );
    assert_eq!(lc.len(), 12);
    eprintln!("losses cpu {lc:?}\n       cuda {lg:?}");
    for (i, (a, b)) in lc.iter().zip(&lg).enumerate() {
        // Rounding differences grow over the steps; 12 steps keep them far under this.
        assert!(
            ((a - b) / a).abs() < 1e-3,
            "step {}: loss {a} (cpu) vs {b} (cuda)",
            i + 1
        );
    }
    // The checkpoints (written from each device) hold the same weights.
    let a = load_checkpoint(&c.run.checkpoint(), &Device::Cpu).unwrap();
    let b = load_checkpoint(&g.run.checkpoint(), &Device::Cpu).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    // Absolute: BatchNorm biases start at zero and are still ~1e-3 after 12 steps, so a
    // relative measure of them is all rounding.
    let mut worst = (0f64, String::new());
    for (k, ta) in &a.tensors {
        if ta.dtype() == DType::F32 {
            let d = (&b.tensors[k] - ta)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap();
            let m = d.max(0).unwrap().to_scalar::<f32>().unwrap() as f64;
            if m > worst.0 {
                worst = (m, k.clone());
            }
        }
    }
    check_worst("checkpoints (absolute)", &worst, 1e-4);
    // Evaluation on the GPU: the same detections, so the same mAP to rounding.
    let (mc, mg) = (c.report.unwrap().map, g.report.unwrap().map);
    match (mc, mg) {
        (Some(a), Some(b)) => assert!((a - b).abs() < 1e-3, "mAP {a} (cpu) vs {b} (cuda)"),
        other => panic!("no mAP from the evaluations: {other:?}"),
    }
}
