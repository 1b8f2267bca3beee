//! The smooth-L1 part's gradient equals the analytic derivative everywhere: `d` for |d| < 1,
//! `sign(d)` beyond, 0 where the output equals its target, and +-1 from both sides of |d| = 1.

use candle_core::{DType, Device, Tensor, Var};
use retinanet_loss::{FocalLossConfig, focal_loss_detection};

/// Differences with exact binary values: 0, +-1, just inside and outside +-1, and a spread.
fn differences() -> Vec<f32> {
    let eps = 1.0 / 1024.0;
    let mut d = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        1.0 - eps,
        -(1.0 - eps),
        1.0 + eps,
        -(1.0 + eps),
    ];
    d.extend((-40..=40).map(|k| k as f32 / 16.0)); // -2.5 ..= 2.5, 0 and +-1 again
    d.extend([1e-30, -1e-30, 7.75, -123.5, 1e6]);
    d
}

fn smooth_l1(d: f32) -> f32 {
    if d.abs() < 1.0 {
        0.5 * d * d
    } else {
        d.abs() - 0.5
    }
}

fn derivative(d: f32) -> f32 {
    if d.abs() < 1.0 { d } else { d.signum() }
}

/// `(reg part, d reg / d output)` for one positive anchor per difference, all four coordinates
/// carrying the same difference from targets of several magnitudes.
fn loss_and_grad(ds: &[f32], dtype: DType) -> (f32, Vec<f32>) {
    let dev = Device::Cpu;
    let n = ds.len();
    let targets: Vec<f32> = (0..n * 4).map(|i| [0.25, -3.0, 0.0, 12.5][i % 4]).collect();
    let outputs: Vec<f32> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| t + ds[i / 4])
        .collect();
    let reg_t = Tensor::from_vec(targets, (1, n, 4), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let reg = Var::from_tensor(
        &Tensor::from_vec(outputs, (1, n, 4), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
    .unwrap();
    let cls = Tensor::zeros((1, n, 2), dtype, &dev).unwrap();
    let cls_t = Tensor::ones((1, n), DType::I64, &dev).unwrap();
    let l = focal_loss_detection(
        &cls,
        reg.as_tensor(),
        &cls_t,
        &reg_t,
        &FocalLossConfig::default(),
    )
    .unwrap();
    assert_eq!(l.num_positive, n as f32);
    let g = l.total.backward().unwrap();
    let grad = g
        .get(&reg)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let reg_part = l
        .reg
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    (reg_part, grad)
}

#[test]
fn gradient_is_the_analytic_derivative_at_zero_at_one_and_elsewhere() {
    let ds = differences();
    let n = ds.len() as f32;
    let (reg_part, grad) = loss_and_grad(&ds, DType::F32);
    for (i, g) in grad.iter().enumerate() {
        let d = ds[i / 4];
        // The loss is divided by the number of positives.
        let want = derivative(d) / n;
        assert!(
            (g - want).abs() <= 1e-6 * want.abs().max(1e-3 / n),
            "d = {d}: gradient {g}, want {want}"
        );
    }
    // Exactly zero (not half) where the output equals its target.
    for (i, g) in grad.iter().enumerate() {
        if ds[i / 4] == 0.0 {
            assert_eq!(*g, 0.0, "coordinate {i}");
        }
    }
    let want: f32 = ds.iter().map(|&d| 4.0 * smooth_l1(d)).sum::<f32>() / n;
    assert!(
        (reg_part - want).abs() <= 1e-5 * want,
        "{reg_part} vs {want}"
    );
}

#[test]
fn gradient_at_zero_and_one_holds_in_f64_too() {
    let ds = [0.0f32, 1.0, -1.0, 0.5, -2.0];
    let (_, grad) = loss_and_grad(&ds, DType::F64);
    let n = ds.len() as f32;
    let want: Vec<f32> = ds.iter().flat_map(|&d| [derivative(d) / n; 4]).collect();
    assert_eq!(grad, want);
}
