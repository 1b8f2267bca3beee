//! `../shared/reference/focal_loss.json`: the loss, its gradients and the no-positive case; and
//! the loss stays finite for extreme logits.

use candle_core::{DType, Device, Tensor, Var};
use retinanet_loss::{FocalLossConfig, focal_loss_detection};
use serde_json::Value;
use std::path::PathBuf;

fn reference(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
        x => out.push(x.as_f64().unwrap()),
    }
}

fn tensor(v: &Value, shape: &[usize], dtype: DType) -> Tensor {
    let mut out = Vec::new();
    flat(v, &mut out);
    Tensor::new(out, &Device::Cpu)
        .unwrap()
        .reshape(shape)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn assert_close(got: &Tensor, want: &Value, rel: f64, what: &str) {
    let mut w = Vec::new();
    flat(want, &mut w);
    let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(g.len(), w.len(), "{what}: length");
    let scale = w.iter().fold(0f64, |m, x| m.max(x.abs()));
    for (i, (g, w)) in g.iter().zip(&w).enumerate() {
        let err = (*g as f64 - w).abs();
        assert!(
            err <= rel * w.abs().max(1e-3 * scale),
            "{what}[{i}] = {g}, reference {w}"
        );
    }
}

#[test]
fn loss_and_gradients_match_reference() {
    let r = reference("focal_loss.json");
    let (b, a, c) = (2, 60, 4);
    let cls = Var::from_tensor(&tensor(&r["cls"], &[b, a, c], DType::F32)).unwrap();
    let reg = Var::from_tensor(&tensor(&r["reg"], &[b, a, 4], DType::F32)).unwrap();
    let cls_t = tensor(&r["cls_targets"], &[b, a], DType::I64);
    let reg_t = tensor(&r["reg_targets"], &[b, a, 4], DType::F32);
    let loss = focal_loss_detection(
        cls.as_tensor(),
        reg.as_tensor(),
        &cls_t,
        &reg_t,
        &FocalLossConfig::default(),
    )
    .unwrap();
    let want = r["loss"].as_f64().unwrap();
    let got = loss.total.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (got - want).abs() <= 1e-5 * want.abs(),
        "loss {got}, reference {want}"
    );
    let parts = loss.cls.to_scalar::<f32>().unwrap() + loss.reg.to_scalar::<f32>().unwrap();
    assert!((parts as f64 - got).abs() <= 1e-5 * got);
    assert!(loss.num_positive > 0.0);
    let grads = loss.total.backward().unwrap();
    assert_close(grads.get(&cls).unwrap(), &r["grad_cls"], 1e-4, "grad_cls");
    assert_close(grads.get(&reg).unwrap(), &r["grad_reg"], 1e-4, "grad_reg");

    // No positive anchor: finite, and equal to the reference.
    let case = &r["no_positive_case"];
    let zero_t = tensor(&case["cls_targets"], &[b, a], DType::I64);
    let l0 = focal_loss_detection(
        cls.as_tensor(),
        reg.as_tensor(),
        &zero_t,
        &reg_t,
        &FocalLossConfig::default(),
    )
    .unwrap();
    assert_eq!(l0.num_positive, 0.0);
    let got = l0.total.to_scalar::<f32>().unwrap() as f64;
    let want = case["loss"].as_f64().unwrap();
    assert!(
        (got - want).abs() <= 1e-5 * want.abs(),
        "no-positive loss {got}, reference {want}"
    );
    assert_eq!(l0.reg.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn targets_of_any_integer_or_float_dtype_agree() {
    let r = reference("focal_loss.json");
    let (b, a, c) = (2, 60, 4);
    let cls = tensor(&r["cls"], &[b, a, c], DType::F32);
    let reg = tensor(&r["reg"], &[b, a, 4], DType::F32);
    let reg_t = tensor(&r["reg_targets"], &[b, a, 4], DType::F32);
    let want = r["loss"].as_f64().unwrap();
    for dt in [DType::I64, DType::F32, DType::F64] {
        let t = tensor(&r["cls_targets"], &[b, a], dt);
        let l = focal_loss_detection(&cls, &reg, &t, &reg_t, &FocalLossConfig::default()).unwrap();
        let got = l.total.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() <= 1e-5 * want, "{dt:?}: {got} vs {want}");
    }
}

#[test]
fn extreme_logits_stay_finite() {
    let dev = Device::Cpu;
    // Logits of +-100 on targets of every kind: right and wrong, confident.
    let logits: Vec<f32> = (0..24)
        .map(|i| if i % 2 == 0 { 100.0 } else { -100.0 })
        .collect();
    let cls = Var::from_tensor(&Tensor::from_vec(logits, (1, 8, 3), &dev).unwrap()).unwrap();
    let reg =
        Var::from_tensor(&Tensor::from_vec(vec![50.0f32; 32], (1, 8, 4), &dev).unwrap()).unwrap();
    let t = Tensor::new(&[[1i64, 2, 3, 0, 0, -1, 1, 2]], &dev).unwrap();
    let rt = Tensor::zeros((1, 8, 4), DType::F32, &dev).unwrap();
    let l = focal_loss_detection(
        cls.as_tensor(),
        reg.as_tensor(),
        &t,
        &rt,
        &FocalLossConfig::default(),
    )
    .unwrap();
    let total = l.total.to_scalar::<f32>().unwrap();
    assert!(total.is_finite() && total > 0.0, "{total}");
    // A confidently wrong logit of 100 costs about 0.75 * 100 per class entry, not infinity.
    assert!(total > 50.0);
    let g = l.total.backward().unwrap();
    for v in [&cls, &reg] {
        let gv: Vec<f32> = g.get(v).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(gv.iter().all(|x| x.is_finite()), "{gv:?}");
    }
    // Smooth-L1 of |d| = 50 is 49.5 per coordinate, gradient 1 / positives.
    assert!((l.reg.to_scalar::<f32>().unwrap() - 5.0 * 4.0 * 49.5 / 5.0).abs() < 1e-3);
}

#[test]
fn wrong_shapes_are_named() {
    let dev = Device::Cpu;
    let cls = Tensor::zeros((2, 10, 3), DType::F32, &dev).unwrap();
    let reg = Tensor::zeros((2, 10, 4), DType::F32, &dev).unwrap();
    let t = Tensor::zeros((2, 10), DType::I64, &dev).unwrap();
    let cfg = FocalLossConfig::default();
    let e = focal_loss_detection(&cls, &reg, &t.narrow(1, 0, 9).unwrap(), &reg, &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("class targets") && e.contains("[2, 9]"), "{e}");
    let e = focal_loss_detection(&cls, &cls, &t, &reg, &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("box output"), "{e}");
    let e = focal_loss_detection(&t, &reg, &t, &reg, &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[B, A, C]"), "{e}");
}
