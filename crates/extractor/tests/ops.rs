//! Forward values and gradients (against finite differences) of the custom operations.

use candle_core::{DType, Device, Result, Tensor, Var};
use retinanet_extractor::ops::{max_pool2d, max_pool2d_portable, upsample_bilinear_ac};

/// Max relative difference of two tensors: max |a - b| / max(max |b|, tiny).
fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let num = (a - b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let den = b
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok(num / den.max(1e-12))
}

/// Checks d(sum(f(x) * r))/dx from backprop against central differences, element by element.
fn grad_check(x0: &Tensor, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
    let x = Var::from_tensor(x0)?;
    let y = f(x.as_tensor())?;
    let r = Tensor::randn(0f64, 1., y.shape(), &Device::Cpu)?;
    let loss = (&y * &r)?.sum_all()?;
    let grads = loss.backward()?;
    let g = grads
        .get(x.as_tensor())
        .expect("gradient of x")
        .flatten_all()?
        .to_vec1::<f64>()?;
    let base = x0.flatten_all()?.to_vec1::<f64>()?;
    let h = 1e-6;
    let eval = |v: &[f64]| -> Result<f64> {
        let t = Tensor::from_slice(v, x0.shape(), &Device::Cpu)?;
        (f(&t)? * &r)?.sum_all()?.to_scalar::<f64>()
    };
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += h;
        let lp = eval(&p)?;
        p[i] -= 2.0 * h;
        let lm = eval(&p)?;
        let num = (lp - lm) / (2.0 * h);
        assert!(
            (num - g[i]).abs() < 1e-6 * (1.0 + num.abs()),
            "element {i}: numeric {num}, backprop {}",
            g[i]
        );
    }
    Ok(())
}

#[test]
fn max_pool_forward_matches_padded_candle_pool() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (2, 3, 9, 8), &dev)?;
    // Reference: pad with a very negative value, then candle's (forward-only) strided pool.
    let neg_rows = Tensor::full(-1e30f32, (2, 3, 1, 8), &dev)?;
    let xp = Tensor::cat(&[&neg_rows, &x, &neg_rows], 2)?;
    let neg_cols = Tensor::full(-1e30f32, (2, 3, 11, 1), &dev)?;
    let xp = Tensor::cat(&[&neg_cols, &xp, &neg_cols], 3)?;
    let want = xp.max_pool2d_with_stride((3, 3), (2, 2))?;
    let got = max_pool2d(&x, 3, 2, 1)?;
    assert_eq!(got.dims(), &[2, 3, 5, 4]);
    assert_eq!(
        got.flatten_all()?.to_vec1::<f32>()?,
        want.flatten_all()?.to_vec1::<f32>()?
    );
    // The ResNet stem on 257x257: 129 -> 65.
    let s = max_pool2d(&Tensor::zeros((1, 1, 129, 129), DType::F32, &dev)?, 3, 2, 1)?;
    assert_eq!(s.dims(), &[1, 1, 65, 65]);
    Ok(())
}

#[test]
fn max_pool_gradient_matches_finite_differences() -> Result<()> {
    let x = Tensor::randn(0f64, 1., (2, 2, 7, 6), &Device::Cpu)?;
    grad_check(&x, &|t| max_pool2d(t, 3, 2, 1))?;
    grad_check(&x, &|t| max_pool2d(t, 2, 2, 0))?;
    Ok(())
}

#[test]
fn max_pool_ties_go_to_the_first_maximum() -> Result<()> {
    // All equal: each output's gradient goes to the first element of its window only.
    let x = Var::from_tensor(&Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu)?)?;
    let y = max_pool2d(x.as_tensor(), 3, 2, 1)?; // 2x2 outputs, windows start at -1 and 1
    assert_eq!(sum_grad(&x, &y)?, vec![1., 1., 0., 1., 1., 0., 0., 0., 0.]);
    Ok(())
}

/// The gradient of `sum(y)` with respect to `x`, flattened.
fn sum_grad(x: &Var, y: &Tensor) -> Result<Vec<f32>> {
    let g = y.sum_all()?.backward()?;
    g.get(x.as_tensor())
        .unwrap()
        .flatten_all()?
        .to_vec1::<f32>()
}

#[test]
fn max_pool_lets_nan_through_and_routes_its_gradient_to_the_first_nan() -> Result<()> {
    // One 3x3 window (kernel 3, stride 3): NaNs at positions 4 and 7, the largest number at 8.
    let v = [0.5f32, 1.0, -2.0, 3.0, f32::NAN, 0.0, 1.5, f32::NAN, 9.0];
    let x = Var::from_tensor(&Tensor::from_slice(&v, (1, 1, 3, 3), &Device::Cpu)?)?;
    let y = max_pool2d(x.as_tensor(), 3, 3, 0)?;
    assert!(y.flatten_all()?.to_vec1::<f32>()?[0].is_nan());
    assert_eq!(sum_grad(&x, &y)?, vec![0., 0., 0., 0., 1., 0., 0., 0., 0.]);
    // Without NaNs the maximum wins, wherever it is.
    let v = [0.5f32, 1.0, -2.0, 3.0, 2.0, 0.0, 1.5, 3.0, 9.0];
    let x = Var::from_tensor(&Tensor::from_slice(&v, (1, 1, 3, 3), &Device::Cpu)?)?;
    let y = max_pool2d(x.as_tensor(), 3, 3, 0)?;
    assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![9.0]);
    assert_eq!(sum_grad(&x, &y)?, vec![0., 0., 0., 0., 0., 0., 0., 0., 1.]);
    Ok(())
}

#[test]
fn the_portable_max_pool_matches_the_cpu_op_with_its_gradients() -> Result<()> {
    // Random values (no ties) and a tensor of many ties (rounded to 0.5 steps, half of them 0
    // as after a ReLU): the same outputs and the same gradients, first maximum included.
    let r = Tensor::randn(0f32, 1., (2, 3, 11, 10), &Device::Cpu)?;
    let ties = ((r.relu()? * 2.0)?.round()? * 0.5)?;
    for x0 in [r, ties] {
        for (k, s, p) in [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 3, 0)] {
            let x = Var::from_tensor(&x0)?;
            let a = max_pool2d(x.as_tensor(), k, s, p)?;
            let b = max_pool2d_portable(x.as_tensor(), k, s, p)?;
            assert_eq!(a.dims(), b.dims());
            assert_eq!(rel_diff(&b, &a)?, 0.0, "values, {k}/{s}/{p}");
            let w = Tensor::randn(0f32, 1., a.dims(), &Device::Cpu)?;
            let ga = (&a * &w)?.sum_all()?.backward()?;
            let gb = (&b * &w)?.sum_all()?.backward()?;
            let (ga, gb) = (
                ga.get(x.as_tensor()).unwrap(),
                gb.get(x.as_tensor()).unwrap(),
            );
            assert!(rel_diff(gb, ga)? < 1e-6, "gradients, {k}/{s}/{p}");
        }
    }
    Ok(())
}

#[test]
fn bilinear_matches_candle_forward_and_tutorial_up() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (2, 3, 4, 5), &dev)?;
    for (oh, ow) in [(7, 9), (8, 10), (4, 5), (5, 3), (1, 1)] {
        let want = x.upsample_bilinear2d(oh, ow, true)?;
        let got = upsample_bilinear_ac(&x, oh, ow)?;
        assert_eq!(got.dims(), &[2, 3, oh, ow]);
        assert!(rel_diff(&got, &want)? < 1e-6, "{oh}x{ow}");
    }
    // 2n-1: the tutorial's up keeps the input on even positions and averages in between.
    let a = Tensor::new(&[[[[1f32, 3.], [5., 7.]]]], &dev)?;
    let up = upsample_bilinear_ac(&a, 3, 3)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(up, vec![1., 2., 3., 3., 4., 5., 5., 6., 7.]);
    Ok(())
}

#[test]
fn bilinear_gradient_matches_finite_differences() -> Result<()> {
    let x = Tensor::randn(0f64, 1., (2, 2, 3, 4), &Device::Cpu)?;
    grad_check(&x, &|t| upsample_bilinear_ac(t, 5, 7))?;
    grad_check(&x, &|t| upsample_bilinear_ac(t, 6, 8))?;
    Ok(())
}

#[test]
fn conv_gradients_match_finite_differences() -> Result<()> {
    use candle_nn::{Conv2d, Conv2dConfig};
    use retinanet_extractor::ops::conv2d;
    let dev = Device::Cpu;
    // (kernel, stride, padding, dilation, input h, w): 3x3/2 on mixed parities (where candle's
    // own backward gets the width wrong), 1x1, 1x1/2, 7x7/2 (the stem), dilated 3x3.
    let cases = [
        (3, 2, 1, 1, 5, 6),
        (3, 2, 1, 1, 6, 5),
        (3, 1, 1, 1, 4, 4),
        (1, 1, 0, 1, 3, 5),
        (1, 2, 0, 1, 5, 4),
        (7, 2, 3, 1, 9, 8),
        (3, 1, 2, 2, 6, 7),
    ];
    for (k, stride, padding, dilation, h, w) in cases {
        let cfg = Conv2dConfig {
            padding,
            stride,
            dilation,
            ..Default::default()
        };
        let wt = Tensor::randn(0f64, 1., (3, 2, k, k), &dev)?;
        let bias = Tensor::randn(0f64, 1., 3, &dev)?;
        let x = Tensor::randn(0f64, 1., (2, 2, h, w), &dev)?;
        let conv = Conv2d::new(wt.clone(), Some(bias.clone()), cfg);
        // The tracked result equals candle's own convolution.
        let xv = Var::from_tensor(&x)?;
        let want = candle_core::Module::forward(&conv, &x)?;
        assert!(rel_diff(&conv2d(xv.as_tensor(), &conv)?, &want)? < 1e-12);
        grad_check(&x, &|t| conv2d(t, &conv))?;
        grad_check(&wt, &|t| {
            conv2d(&x, &Conv2d::new(t.clone(), Some(bias.clone()), cfg))
        })?;
        grad_check(&bias, &|t| {
            conv2d(&x, &Conv2d::new(wt.clone(), Some(t.clone()), cfg))
        })?;
    }
    Ok(())
}
