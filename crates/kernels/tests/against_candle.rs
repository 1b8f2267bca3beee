//! Every kernel against candle's own operations (values and gradients, 1e-4 relative) over odd
//! shapes, strides, paddings, dilations and batch sizes.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use retinanet_kernels::{
    ConvParams, batch_norm_train, batch_norm_train_act, batch_norm_train_add_relu, channel_affine,
    conv2d, conv2d_relu,
};

thread_local! {
    /// Seeded per test (each test runs on its own thread), so every run draws the same inputs:
    /// a tolerance that holds once holds always (candle's CPU generator cannot be seeded).
    static RNG: std::cell::RefCell<StdRng> = std::cell::RefCell::new(StdRng::seed_from_u64(7));
}

/// `Tensor::randn` from the test's seeded generator (f32; convert for other dtypes).
fn randn<S: Into<Shape>>(mean: f32, std: f32, shape: S, dev: &Device) -> Result<Tensor> {
    let shape = shape.into();
    let normal = Normal::new(mean, std).expect("valid normal");
    let v: Vec<f32> = RNG.with(|r| {
        let mut r = r.borrow_mut();
        (0..shape.elem_count())
            .map(|_| normal.sample(&mut *r))
            .collect()
    });
    Tensor::from_vec(v, shape, dev)
}

/// `max |a - b| / max |b|` (with a floor so all-zero references compare absolutely).
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-3);
    Ok(diff / scale)
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
    let e = rel_err(a, b)?;
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
    Ok(())
}

/// (batch, cin, h, w, cout, k, stride, padding, dilation)
type Case = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

const CASES: &[Case] = &[
    (1, 3, 7, 7, 4, 3, 1, 1, 1),
    (2, 5, 9, 11, 6, 3, 2, 1, 1),
    (3, 4, 10, 7, 5, 3, 2, 0, 1),
    (2, 3, 17, 13, 8, 7, 2, 3, 1),
    (1, 6, 8, 8, 7, 1, 1, 0, 1),
    (3, 7, 9, 6, 5, 1, 2, 0, 1),
    (2, 4, 5, 5, 3, 5, 1, 2, 1),
    (1, 2, 11, 9, 3, 3, 1, 2, 2),
    (4, 3, 6, 9, 2, 3, 3, 1, 1),
    (2, 16, 12, 12, 24, 3, 1, 1, 1),
    (5, 9, 4, 3, 4, 3, 1, 1, 1),
    (1, 8, 3, 3, 4, 3, 2, 1, 1),
    (2, 32, 33, 33, 48, 3, 1, 1, 1),
    (2, 64, 17, 17, 32, 1, 1, 0, 1),
    // Winograd, stride 1, 256 channels; paddings 0, 1, 2: F(4x4, 3x3) in f32, F(2x2, 3x3) in f64.
    (2, 256, 24, 23, 256, 3, 1, 0, 1),
    (1, 256, 33, 29, 256, 3, 1, 1, 1),
    (2, 256, 19, 21, 256, 3, 1, 2, 1),
    // Winograd F(4x4, 3x3): 128+ channels (not whole vectors or panels), paddings 0 and 1, and
    // 64 channels where the tiles barely overhang (its input gradient takes another path).
    (2, 128, 31, 30, 136, 3, 1, 1, 1),
    (3, 131, 30, 27, 129, 3, 1, 0, 1),
    (1, 64, 64, 63, 48, 3, 1, 1, 1),
    // Small maps and larger batches: several images share one gemm (the grouped path), with a
    // shorter last group.
    (8, 16, 9, 9, 24, 3, 1, 1, 1),
    (7, 12, 5, 7, 10, 3, 2, 1, 1),
    // The direct kernel (AVX-512, >= 128 outputs): a 7x7/2 stem with 16 channels (one vector),
    // 100 channels at stride 2 (a block of 64 and one of 36), a 5x5 kernel with 70 channels
    // (64 + 6), and exactly one block of 64.
    (3, 3, 37, 35, 16, 7, 2, 3, 1),
    (2, 20, 19, 17, 100, 3, 2, 1, 1),
    (1, 40, 15, 13, 70, 5, 1, 2, 1),
    (4, 64, 9, 9, 64, 3, 1, 1, 1),
    (16, 8, 5, 5, 12, 3, 1, 1, 1),
    (5, 24, 3, 3, 20, 3, 1, 1, 1),
    // Patch matrices over 2M elements: several row blocks per image.
    (1, 64, 70, 70, 6, 3, 1, 1, 1),
    (2, 64, 141, 139, 4, 3, 2, 1, 1),
];

/// Direct six-loop convolution in f64: the independent reference for the backward pass.
#[allow(clippy::type_complexity)]
fn naive(
    x: &[f64],
    w: &[f64],
    (b, cin, h, wd): (usize, usize, usize, usize),
    (cout, k): (usize, usize),
    (s, p, d): (usize, usize, usize),
    dy: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let oh = (h + 2 * p - d * (k - 1) - 1) / s + 1;
    let ow = (wd + 2 * p - d * (k - 1) - 1) / s + 1;
    let mut y = vec![0.0; b * cout * oh * ow];
    let mut gx = vec![0.0; x.len()];
    let mut gw = vec![0.0; w.len()];
    for n in 0..b {
        for co in 0..cout {
            for oy in 0..oh {
                for ox in 0..ow {
                    let yi = ((n * cout + co) * oh + oy) * ow + ox;
                    for ci in 0..cin {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * s + ky * d) as isize - p as isize;
                                let ix = (ox * s + kx * d) as isize - p as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xi = ((n * cin + ci) * h + iy as usize) * wd + ix as usize;
                                let wi = ((co * cin + ci) * k + ky) * k + kx;
                                y[yi] += x[xi] * w[wi];
                                gx[xi] += dy[yi] * w[wi];
                                gw[wi] += dy[yi] * x[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    (y, gx, gw)
}

#[test]
fn conv2d_forward_matches_candle() -> Result<()> {
    let dev = Device::Cpu;
    for &(b, cin, h, w, cout, k, s, p, d) in CASES {
        let x = randn(0f32, 1., (b, cin, h, w), &dev)?;
        let wt = randn(0f32, 1., (cout, cin, k, k), &dev)?;
        let params = ConvParams {
            stride: s,
            padding: p,
            dilation: d,
        };
        let ours = conv2d(&x, &wt, None, params)?;
        let theirs = x.conv2d(&wt, p, s, d, 1)?;
        assert_close(
            &format!("fwd {:?}", (b, cin, h, w, cout, k, s, p, d)),
            &ours,
            &theirs,
            1e-4,
        )?;
    }
    Ok(())
}

#[test]
fn conv2d_gradients_match_reference() -> Result<()> {
    let dev = Device::Cpu;
    for &(b, cin, h, w, cout, k, s, p, d) in CASES {
        let case = format!("{:?}", (b, cin, h, w, cout, k, s, p, d));
        let x = Var::from_tensor(&randn(0f32, 1., (b, cin, h, w), &dev)?)?;
        let wt = Var::from_tensor(&randn(0f32, 1., (cout, cin, k, k), &dev)?)?;
        let params = ConvParams {
            stride: s,
            padding: p,
            dilation: d,
        };
        let y = conv2d(x.as_tensor(), wt.as_tensor(), None, params)?;
        let r = randn(0f32, 1., y.dims(), &dev)?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let (gx, gw) = (grads.get(&x).unwrap(), grads.get(&wt).unwrap());

        // Independent f64 reference (too slow unoptimised for the 256-channel Winograd cases, which
        // candle checks below).
        if cin >= 256 {
            assert_eq!(s, 1, "large cases must be ones candle's backward handles");
        } else {
            let xv: Vec<f64> = x.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
            let wv: Vec<f64> = wt.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
            let rv: Vec<f64> = r.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
            let (ny, ngx, ngw) = naive(&xv, &wv, (b, cin, h, w), (cout, k), (s, p, d), &rv);
            assert_close(
                &format!("naive y {case}"),
                &y,
                &Tensor::from_vec(ny, y.dims(), &dev)?,
                1e-4,
            )?;
            assert_close(
                &format!("naive gx {case}"),
                gx,
                &Tensor::from_vec(ngx, gx.dims(), &dev)?,
                1e-4,
            )?;
            assert_close(
                &format!("naive gw {case}"),
                gw,
                &Tensor::from_vec(ngw, gw.dims(), &dev)?,
                1e-4,
            )?;
        }

        // candle's own backward, where it is right (it derives the transposed convolution's
        // output padding from the height only, so skip strided cases whose remainders differ).
        let rem = |n: usize| (n + 2 * p - d * (k - 1) - 1) % s;
        if rem(h) == rem(w) {
            let yc = x.as_tensor().conv2d(wt.as_tensor(), p, s, d, 1)?;
            let gc = (&yc * &r)?.sum_all()?.backward()?;
            assert_close(&format!("candle gx {case}"), gx, gc.get(&x).unwrap(), 1e-4)?;
            assert_close(&format!("candle gw {case}"), gw, gc.get(&wt).unwrap(), 1e-4)?;
        }
    }
    Ok(())
}

#[test]
fn conv2d_bias_relu_and_f64_match_candle() -> Result<()> {
    let dev = Device::Cpu;
    for &(b, cin, h, w, cout, k, s, p, _) in CASES {
        for dtype in [DType::F32, DType::F64] {
            let case = format!("{:?} {dtype:?}", (b, cin, h, w, cout, k, s, p));
            let x = Var::from_tensor(&randn(0f32, 1., (b, cin, h, w), &dev)?.to_dtype(dtype)?)?;
            let wt = Var::from_tensor(&randn(0f32, 1., (cout, cin, k, k), &dev)?.to_dtype(dtype)?)?;
            let bias = Var::from_tensor(&randn(0f32, 1., cout, &dev)?.to_dtype(dtype)?)?;
            let params = ConvParams::new(s, p);
            let r = |y: &Tensor| randn(0f32, 1., y.dims(), &dev)?.to_dtype(dtype);
            let theirs = x
                .as_tensor()
                .conv2d(wt.as_tensor(), p, s, 1, 1)?
                .broadcast_add(&bias.reshape((1, cout, 1, 1))?)?;
            for relu in [false, true] {
                let ours = if relu {
                    conv2d_relu(&x, &wt, Some(&bias), params)?
                } else {
                    conv2d(&x, &wt, Some(&bias), params)?
                };
                let theirs_lin = theirs.clone();
                let theirs = if relu { theirs.relu()? } else { theirs.clone() };
                assert_close(
                    &format!("bias fwd {case} relu {relu}"),
                    &ours,
                    &theirs,
                    1e-4,
                )?;
                let rr = r(&ours)?;
                let g1 = (&ours * &rr)?.sum_all()?.backward()?;
                // The ReLU's kink: take the mask from our output for both, so a value rounding
                // to the other side of zero cannot flip one element's gradient.
                let (theirs, rr) = if relu {
                    let mask = ours.gt(0.0)?.to_dtype(dtype)?;
                    (theirs_lin.clone(), (rr * mask)?)
                } else {
                    (theirs, rr)
                };
                let rem = |n: usize| (n + 2 * p - k) % s;
                if rem(h) == rem(w) {
                    let g2 = (&theirs * &rr)?.sum_all()?.backward()?;
                    for (name, v) in [("x", &x), ("w", &wt), ("b", &bias)] {
                        let what = format!("bias grad {name} {case} relu {relu}");
                        assert_close(&what, g1.get(v).unwrap(), g2.get(v).unwrap(), 1e-4)?;
                    }
                } else {
                    // candle's backward is wrong here (see above): the bias gradient is the
                    // masked sum of the incoming gradient.
                    let mask = if relu {
                        theirs.gt(0.0)?.to_dtype(dtype)?
                    } else {
                        theirs.ones_like()?
                    };
                    let gb = (&rr * mask)?.sum((0, 2, 3))?;
                    assert_close(
                        &format!("bias gb {case} relu {relu}"),
                        g1.get(&bias).unwrap(),
                        &gb,
                        1e-4,
                    )?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn conv2d_rejects_bad_shapes() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev)?;
    let w = Tensor::zeros((2, 4, 3, 3), DType::F32, &dev)?;
    let e = conv2d(&x, &w, None, ConvParams::default()).unwrap_err();
    assert!(e.to_string().contains("channels"), "{e}");
    let w = Tensor::zeros((2, 3, 7, 7), DType::F32, &dev)?;
    let e = conv2d(&x, &w, None, ConvParams::default()).unwrap_err();
    assert!(e.to_string().contains("smaller than the kernel"), "{e}");
    let w = Tensor::zeros((2, 3, 3, 3), DType::F32, &dev)?;
    let b = Tensor::zeros(3, DType::F32, &dev)?;
    let e = conv2d(&x, &w, Some(&b), ConvParams::default()).unwrap_err();
    assert!(e.to_string().contains("bias"), "{e}");
    Ok(())
}

/// candle's broadcast formulation of batch norm with batch statistics.
fn candle_bn(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let c = w.dim(0)?;
    let mean = x.mean_keepdim((0, 2, 3))?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim((0, 2, 3))?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&w.reshape((1, c, 1, 1))?)?
        .broadcast_add(&b.reshape((1, c, 1, 1))?)
}

#[test]
fn batch_norm_matches_candle() -> Result<()> {
    let dev = Device::Cpu;
    for &(b, c, h, w) in &[
        (2, 3, 5, 7),
        (1, 4, 3, 1),
        (5, 2, 1, 2),
        (3, 16, 9, 9),
        (2, 1, 17, 13),
    ] {
        for dtype in [DType::F32, DType::F64] {
            let case = format!("{:?} {dtype:?}", (b, c, h, w));
            // An offset mean checks the two-pass variance.
            let x = Var::from_tensor(
                &randn(0f32, 1., (b, c, h, w), &dev)?
                    .affine(3.0, 5.0)?
                    .to_dtype(dtype)?,
            )?;
            let wt = Var::from_tensor(&randn(1f32, 0.5, c, &dev)?.to_dtype(dtype)?)?;
            let bias = Var::from_tensor(&randn(0f32, 1., c, &dev)?.to_dtype(dtype)?)?;
            let out = batch_norm_train(&x, &wt, &bias, 1e-5)?;
            let theirs = candle_bn(&x, &wt, &bias, 1e-5)?;
            assert_close(&format!("bn fwd {case}"), &out.y, &theirs, 1e-4)?;
            assert_close(
                &format!("bn mean {case}"),
                &out.mean,
                &x.mean((0, 2, 3))?,
                1e-5,
            )?;
            let var = x
                .broadcast_sub(&x.mean_keepdim((0, 2, 3))?)?
                .sqr()?
                .mean((0, 2, 3))?;
            assert_close(&format!("bn var {case}"), &out.var, &var, 1e-4)?;
            let r = randn(0f32, 1., x.dims(), &dev)?.to_dtype(dtype)?;
            // Gradients of `sum(ours * r)` and `sum(theirs * r)` for each of `vars`.
            let same_grads = |what: &str,
                              ours: &Tensor,
                              theirs: &Tensor,
                              vars: &[(&str, &Tensor)]|
             -> Result<()> {
                let g1 = (ours * &r)?.sum_all()?.backward()?;
                let g2 = (theirs * &r)?.sum_all()?.backward()?;
                for &(name, v) in vars {
                    assert_close(
                        &format!("{what} grad {name} {case}"),
                        g1.get(v).unwrap(),
                        g2.get(v).unwrap(),
                        1e-4,
                    )?;
                }
                Ok(())
            };
            let bn_vars = [("x", &*x), ("w", &*wt), ("b", &*bias)];
            same_grads("bn", &out.y, &theirs, &bn_vars)?;
            // With the fused ReLU: relu(bn(x)), same statistics, gradients through the mask.
            let fused = batch_norm_train_act(&x, &wt, &bias, 1e-5, None, true)?;
            let theirs_relu = theirs.relu()?;
            assert_close(&format!("bn+relu fwd {case}"), &fused.y, &theirs_relu, 1e-4)?;
            assert_close(&format!("bn+relu mean {case}"), &fused.mean, &out.mean, 0.0)?;
            same_grads("bn+relu", &fused.y, &theirs_relu, &bn_vars)?;
            // With a residual: relu(bn(x) + s), gradients to all four.
            let s = Var::from_tensor(&randn(0f32, 2., x.dims(), &dev)?.to_dtype(dtype)?)?;
            let fused = batch_norm_train_add_relu(&x, &wt, &bias, 1e-5, None, &s)?;
            let theirs_res = (&theirs + &*s)?.relu()?;
            assert_close(&format!("bn+res fwd {case}"), &fused.y, &theirs_res, 1e-4)?;
            assert_close(&format!("bn+res mean {case}"), &fused.mean, &out.mean, 0.0)?;
            assert_close(&format!("bn+res var {case}"), &fused.var, &out.var, 0.0)?;
            let res_vars = [("x", &*x), ("w", &*wt), ("b", &*bias), ("s", &*s)];
            same_grads("bn+res", &fused.y, &theirs_res, &res_vars)?;

            let scale = Var::from_tensor(&randn(0f32, 1., c, &dev)?.to_dtype(dtype)?)?;
            let shift = Var::from_tensor(&randn(0f32, 1., c, &dev)?.to_dtype(dtype)?)?;
            let ours = channel_affine(&x, &scale, &shift)?;
            let theirs = x
                .broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
                .broadcast_add(&shift.reshape((1, c, 1, 1))?)?;
            assert_close(&format!("affine fwd {case}"), &ours, &theirs, 1e-5)?;
            let affine_vars = [("x", &*x), ("scale", &*scale), ("shift", &*shift)];
            same_grads("affine", &ours, &theirs, &affine_vars)?;
        }
    }
    Ok(())
}

#[test]
fn batch_norm_rejects_bad_shapes() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &dev)?;
    let w = Tensor::ones(4, DType::F32, &dev)?;
    let e = batch_norm_train(&x, &w, &w, 1e-5).unwrap_err();
    assert!(e.to_string().contains("do not fit"), "{e}");
    let w3 = Tensor::ones(3, DType::F32, &dev)?;
    let e = batch_norm_train_add_relu(&x, &w, &w, 1e-5, None, &x).unwrap_err();
    assert!(e.to_string().contains("do not fit"), "{e}");
    let short = Tensor::zeros((2, 3, 4, 3), DType::F32, &dev)?;
    let e = batch_norm_train_add_relu(&x, &w3, &w3, 1e-5, None, &short).unwrap_err();
    assert!(e.to_string().contains("residual"), "{e}");
    let e = channel_affine(&x, &w, &w).unwrap_err();
    assert!(e.to_string().contains("do not match"), "{e}");
    Ok(())
}

#[test]
fn sgd_step_matches_tensor_arithmetic() -> Result<()> {
    use retinanet_kernels::{SgdStep, sgd_step};
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F64] {
        for (momentum, weight_decay, grad_scale) in
            [(0.9, 1e-2, 1.0), (0.0, 0.0, 0.5), (0.0, 1e-3, 1.0)]
        {
            let s = SgdStep {
                lr: 0.1,
                momentum,
                weight_decay,
                grad_scale,
            };
            let p0 = randn(0f32, 1., (3, 70_001), &dev)?.to_dtype(dtype)?;
            let param = Var::from_tensor(&p0)?;
            let buf = Tensor::zeros(p0.dims(), dtype, &dev)?;
            // Copies: the in-place updates must not reach the references.
            let (mut p_ref, mut b_ref) = (p0.copy()?, buf.copy()?);
            for _ in 0..3 {
                let g = randn(0f32, 1., p0.dims(), &dev)?.to_dtype(dtype)?;
                sgd_step(&param, &g, Some(&buf), s)?;
                // PyTorch's update in tensor arithmetic.
                let d = ((&g * grad_scale)? + (&p_ref * weight_decay)?)?;
                let d = if momentum != 0.0 {
                    b_ref = ((&b_ref * momentum)? + d)?;
                    b_ref.clone()
                } else {
                    d
                };
                p_ref = (&p_ref - (d * s.lr)?)?;
            }
            assert_close(&format!("sgd param {dtype:?} {s:?}"), &param, &p_ref, 1e-5)?;
            if momentum != 0.0 {
                assert_close(&format!("sgd buffer {dtype:?} {s:?}"), &buf, &b_ref, 1e-5)?;
            }
        }
    }
    let p = Var::zeros(4, DType::F32, &dev)?;
    let g = Tensor::zeros(4, DType::F32, &dev)?;
    let s = SgdStep {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.0,
        grad_scale: 1.0,
    };
    let e = sgd_step(&p, &g, None, s).unwrap_err();
    assert!(e.to_string().contains("needs a buffer"), "{e}");
    Ok(())
}

#[test]
fn relu_and_add_relu_match_candle() -> Result<()> {
    use retinanet_kernels::{add_relu, relu};
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F64] {
        for dims in [vec![2, 3, 5, 7], vec![1, 70_001], vec![4]] {
            let a = Var::from_tensor(&randn(0f32, 1., dims.clone(), &dev)?.to_dtype(dtype)?)?;
            let b = Var::from_tensor(&randn(0f32, 1., dims.clone(), &dev)?.to_dtype(dtype)?)?;
            let r = randn(0f32, 1., dims.clone(), &dev)?.to_dtype(dtype)?;
            let case = format!("{dims:?} {dtype:?}");

            let ours = relu(&a)?;
            let theirs = a.relu()?;
            assert_close(&format!("relu {case}"), &ours, &theirs, 0.0)?;
            let g1 = (&ours * &r)?.sum_all()?.backward()?;
            let g2 = (&theirs * &r)?.sum_all()?.backward()?;
            assert_close(
                &format!("relu grad {case}"),
                g1.get(&a).unwrap(),
                g2.get(&a).unwrap(),
                0.0,
            )?;

            let ours = add_relu(&a, &b)?;
            let theirs = (a.as_tensor() + b.as_tensor())?.relu()?;
            assert_close(&format!("add_relu {case}"), &ours, &theirs, 0.0)?;
            let g1 = (&ours * &r)?.sum_all()?.backward()?;
            let g2 = (&theirs * &r)?.sum_all()?.backward()?;
            for (n, v) in [("a", &a), ("b", &b)] {
                assert_close(
                    &format!("add_relu grad {n} {case}"),
                    g1.get(v).unwrap(),
                    g2.get(v).unwrap(),
                    0.0,
                )?;
            }
        }
    }
    let e = add_relu(
        &Tensor::zeros(3, DType::F32, &dev)?,
        &Tensor::zeros(4, DType::F32, &dev)?,
    )
    .unwrap_err();
    assert!(e.to_string().contains("differ"), "{e}");
    Ok(())
}

#[test]
fn conv2d_weight_gradient_without_input_gradient() -> Result<()> {
    // The first layer's input (the images) is no variable: only the weight gradient is made, and
    // it is the same as when the input gradient is made too.
    let dev = Device::Cpu;
    let x = randn(0f32, 1., (6, 3, 13, 11), &dev)?;
    let wt = Var::from_tensor(&randn(0f32, 1., (5, 3, 7, 7), &dev)?)?;
    let p = ConvParams {
        stride: 2,
        padding: 3,
        dilation: 1,
    };
    let y = conv2d(&x, wt.as_tensor(), None, p)?;
    let r = randn(0f32, 1., y.dims(), &dev)?;
    let grads = (&y * &r)?.sum_all()?.backward()?;
    assert!(grads.get(&x).is_none());
    let xv = Var::from_tensor(&x)?;
    let y2 = conv2d(xv.as_tensor(), wt.as_tensor(), None, p)?;
    let grads2 = (&y2 * &r)?.sum_all()?.backward()?;
    assert!(grads2.get(&xv).is_some());
    assert_close(
        "gw",
        grads.get(&wt).unwrap(),
        grads2.get(&wt).unwrap(),
        1e-6,
    )
}

/// The fused inference op `relu(conv + bias + residual)` against candle's convolution, bias,
/// add and ReLU, on every path of the forward pass: the direct kernel (3x3, 7x7/2), Winograd
/// F(2x2, 3x3) (256 channels, stride 1, few tiles) and F(4x4, 3x3), the pointwise gemm, the strided 1x1 (im2col), the grouped small-map
/// path, f64; with and without a bias. A tracked operand falls back to the differentiable ops.
#[test]
fn conv2d_add_relu_matches_candle() -> Result<()> {
    use retinanet_kernels::conv2d_add_relu;
    let dev = Device::Cpu;
    // (batch, cin, h, w, cout, k, stride, padding)
    let cases = [
        (2, 16, 17, 15, 32, 3, 1, 1),
        (1, 3, 41, 39, 24, 7, 2, 3),
        (2, 256, 21, 19, 256, 3, 1, 1),
        (2, 128, 33, 31, 136, 3, 1, 1),
        (1, 64, 20, 21, 96, 1, 1, 0),
        (2, 32, 19, 17, 48, 1, 2, 0),
        (16, 8, 5, 5, 20, 3, 1, 1),
        (3, 5, 9, 8, 7, 3, 2, 1),
    ];
    for (i, &(b, cin, h, wd, cout, k, s, p)) in cases.iter().enumerate() {
        for dtype in [DType::F32, DType::F64] {
            for with_bias in [true, false] {
                let x = randn(0., 1., (b, cin, h, wd), &dev)?.to_dtype(dtype)?;
                let w = randn(0., 0.2, (cout, cin, k, k), &dev)?.to_dtype(dtype)?;
                let bias = randn(0., 1., cout, &dev)?.to_dtype(dtype)?;
                let bias = with_bias.then_some(&bias);
                let mut want = x.conv2d(&w, p, s, 1, 1)?;
                if let Some(bb) = bias {
                    want = want.broadcast_add(&bb.reshape((1, cout, 1, 1))?)?;
                }
                let res = randn(0., 1., want.dims(), &dev)?.to_dtype(dtype)?;
                let want = (want + &res)?.relu()?;
                let got = conv2d_add_relu(&x, &w, bias, &res, ConvParams::new(s, p))?;
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                assert_close(
                    &format!("case {i} {dtype:?} bias {with_bias}"),
                    &got,
                    &want,
                    tol,
                )?;
            }
        }
    }
    // Tracked: the same values through the differentiable ops, with gradients.
    let x = Var::from_tensor(&randn(0., 1., (2, 4, 9, 9), &dev)?)?;
    let w = randn(0., 0.3, (6, 4, 3, 3), &dev)?;
    let res = randn(0., 1., (2, 6, 9, 9), &dev)?;
    let got = conv2d_add_relu(x.as_tensor(), &w, None, &res, ConvParams::new(1, 1))?;
    let want = (x.as_tensor().conv2d(&w, 1, 1, 1, 1)? + &res)?.relu()?;
    assert_close("tracked", &got, &want, 1e-5)?;
    assert!(got.sum_all()?.backward()?.get(&x).is_some());
    // A residual of the wrong shape is refused by name.
    let bad = Tensor::zeros((2, 6, 9, 8), DType::F32, &dev)?;
    let e = conv2d_add_relu(&x.detach(), &w, None, &bad, ConvParams::new(1, 1)).unwrap_err();
    assert!(e.to_string().contains("residual"), "{e}");
    Ok(())
}

/// `t` with every element rounded to bf16 (what bf16 products see of an operand).
fn round_bf16(t: &Tensor) -> Result<Tensor> {
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    let v: Vec<f32> = v.into_iter().map(retinanet_kernels::bf16::round).collect();
    Tensor::from_vec(v, t.dims(), t.device())
}

/// bf16 products (CPUs with AVX512-BF16): every product of every geometry that takes them
/// (forward, input gradient, weight gradient: `conv2d_bf16_products`) equals the convolution of
/// the bf16-rounded operands computed in f32 by candle (or in f64 where candle's backward is
/// wrong) to f32 rounding, 1e-5 relative, and the plain f32 convolution to bf16 rounding, 1e-2
/// relative. The upstream gradient is rounded too, as the backward products see it. The products
/// kept in f32 give the f32 results bit for bit.
#[test]
fn conv2d_bf16_products_match_rounded_operands() -> Result<()> {
    use retinanet_kernels::bf16;
    if !bf16::available() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        assert!(bf16::with_bf16_products(true, || ()).is_err());
        return Ok(());
    }
    let dev = Device::Cpu;
    // CASES and more shapes: 1x1 with odd channel counts, strides 1-3, several images, long
    // rows; the direct kernel's bf16 form with a 3-channel 7x7 stem, odd channel pairs, stride 2,
    // a 5x5 kernel (the offset-table loop), output blocks of 1-4 vectors and a partial one.
    let extra: &[Case] = &[
        (2, 33, 13, 11, 70, 1, 1, 0, 1),
        (3, 257, 9, 7, 65, 1, 2, 0, 1),
        (1, 600, 5, 5, 130, 1, 3, 0, 1),
        (2, 16, 40, 41, 200, 1, 1, 0, 1),
        (2, 3, 37, 35, 32, 7, 2, 3, 1),
        (2, 33, 17, 15, 70, 3, 1, 1, 1),
        (2, 64, 21, 19, 128, 3, 2, 1, 1),
        (1, 12, 20, 18, 20, 5, 1, 2, 1),
        (3, 48, 9, 11, 40, 3, 1, 1, 1),
        (1, 7, 16, 16, 250, 3, 1, 0, 1),
        // The weight gradient's position pairs: odd output rows (a last position without a
        // partner) at strides 1-3, rows of one position, a 5x5 kernel.
        (2, 20, 15, 13, 36, 3, 2, 1, 1),
        (1, 16, 31, 9, 20, 5, 1, 2, 1),
        (1, 8, 130, 1, 17, 3, 1, 1, 1),
        (2, 6, 25, 23, 10, 3, 3, 1, 1),
        // Weights beyond what the f32 direct kernel takes (2,304 taps a channel): the bf16
        // form's forward and weight gradient; the input gradient through its transposed
        // convolution at stride 1, kept in f32 at stride 2.
        (1, 300, 12, 11, 40, 3, 1, 1, 1),
        (2, 300, 17, 16, 24, 3, 2, 1, 1),
        (1, 70, 24, 23, 20, 7, 1, 3, 1),
        // Few positions (81, 50): the bf16 form from 32, the f32 direct kernel from 128.
        (1, 64, 9, 9, 32, 3, 1, 1, 1),
        (2, 40, 9, 10, 24, 3, 2, 1, 1),
        // Wide enough for Winograd to stay ahead in f32: the forward and input gradient in
        // f32, the weight gradient in bf16.
        (1, 256, 34, 33, 256, 3, 1, 1, 1),
    ];
    let mut took = [0usize; 3];
    let mut wide = [0usize; 3];
    for &(b, cin, h, w, cout, k, s, p, d) in CASES.iter().chain(extra) {
        let case = format!("{:?}", (b, cin, h, w, cout, k, s, p, d));
        let x = Var::from_tensor(&randn(0f32, 1., (b, cin, h, w), &dev)?)?;
        let wt = Var::from_tensor(&randn(0f32, 1., (cout, cin, k, k), &dev)?)?;
        let params = ConvParams {
            stride: s,
            padding: p,
            dilation: d,
        };
        let dims = retinanet_kernels::conv2d_out_dims(x.dims(), wt.dims(), params)?;
        let r = randn(0f32, 1., dims.as_slice(), &dev)?;
        let got = bf16::with_bf16_products(true, || -> Result<_> {
            let y = conv2d(x.as_tensor(), wt.as_tensor(), None, params)?;
            let g = (&y * &r)?.sum_all()?.backward()?;
            Ok([y, g.get(&x).unwrap().clone(), g.get(&wt).unwrap().clone()])
        })
        .expect("bf16 available")?;
        let f32_y = conv2d(x.as_tensor(), wt.as_tensor(), None, params)?;
        let g32 = (&f32_y * &r)?.sum_all()?.backward()?;
        let f32s = [
            f32_y.clone(),
            g32.get(&x).unwrap().clone(),
            g32.get(&wt).unwrap().clone(),
        ];
        let parts = retinanet_kernels::conv2d_bf16_products(x.dims(), wt.dims(), params)?;
        let on = [parts.forward, parts.input_grad, parts.weight_grad];
        let positions = b * dims[2] * dims[3];
        if (cin, cout, k, s) == (256, 256, 3, 1) && dims[2].min(dims[3]) >= 32 {
            assert_eq!(on, [false, false, true], "{case}: Winograd's layer");
        }
        if k > 1 && d == 1 && (cin * k * k > 2304 || positions < 128) && positions >= 32 {
            // Beyond the f32 direct kernel: strided input gradients keep to f32 (they take
            // bf16 products only for the layers it takes), and weight gradients from 128
            // positions.
            let strided_grad = false;
            assert_eq!(
                on,
                [true, s == 1 || strided_grad, positions >= 128],
                "{case}: the bf16 form's layers"
            );
        }
        if !on[0] {
            assert!(!on[1], "{case}: input gradient in bf16 without the forward");
        }
        let names = ["y", "gx", "gw"];
        for i in 0..3 {
            if !on[i] {
                // Kept in f32: the f32 results, bit for bit.
                assert_eq!(rel_err(&got[i], &f32s[i])?, 0.0, "{} {case}", names[i]);
                continue;
            }
            took[i] += 1;
            if k > 1 {
                wide[i] += 1;
            }
            assert!(
                rel_err(&got[i], &f32s[i])? > 0.0,
                "{case}: bf16 products gave the f32 {}",
                names[i]
            );
            assert_close(
                &format!("bf16 {} vs f32 {case}", names[i]),
                &got[i],
                &f32s[i],
                1e-2,
            )?;
        }
        if on == [false; 3] {
            continue;
        }

        let (xr, wr, rr) = (
            Var::from_tensor(&round_bf16(x.as_tensor())?)?,
            Var::from_tensor(&round_bf16(wt.as_tensor())?)?,
            round_bf16(&r)?,
        );
        let rem = |n: usize| (n + 2 * p - d * (k - 1) - 1) % s;
        let want = if rem(h) == rem(w) {
            let yc = xr.as_tensor().conv2d(wr.as_tensor(), p, s, d, 1)?;
            let gc = (&yc * &rr)?.sum_all()?.backward()?;
            [
                yc,
                gc.get(&xr).unwrap().clone(),
                gc.get(&wr).unwrap().clone(),
            ]
        } else {
            let f64s = |t: &Tensor| -> Result<Vec<f64>> {
                t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()
            };
            let (ny, ngx, ngw) = naive(
                &f64s(xr.as_tensor())?,
                &f64s(wr.as_tensor())?,
                (b, cin, h, w),
                (cout, k),
                (s, p, d),
                &f64s(&rr)?,
            );
            [
                Tensor::from_vec(ny, got[0].dims(), &dev)?.to_dtype(DType::F32)?,
                Tensor::from_vec(ngx, got[1].dims(), &dev)?.to_dtype(DType::F32)?,
                Tensor::from_vec(ngw, got[2].dims(), &dev)?.to_dtype(DType::F32)?,
            ]
        };
        for i in (0..3).filter(|&i| on[i]) {
            assert_close(
                &format!("bf16 {} {case}", names[i]),
                &got[i],
                &want[i],
                1e-5,
            )?;
        }
    }
    eprintln!("bf16 products taken (forward, input grad, weight grad): {took:?}, k > 1: {wide:?}");
    assert_eq!(
        took[2] - wide[2],
        7,
        "1x1 shapes whose weight gradient took bf16 products"
    );
    // The direct kernel's bf16 form: the stem, stride 1 and 2, 5x5; input gradients through it
    // (stride 1) and through im2col (stride 2); weight gradients of those with 128 positions
    // or more, of the layer Winograd keeps in f32 and of the position-pair cases (which
    // layers take which is asserted per case above).
    assert!(wide[0] >= 5 && wide[1] >= 3 && wide[2] >= 5, "{wide:?}");

    // The fused epilogues: bias, ReLU and residual are added in f32 to the bf16 products.
    use retinanet_kernels::conv2d_add_relu;
    for &(b, cin, h, wd, cout, k, s, p) in &[
        (2, 32, 17, 15, 48, 1, 1, 0),
        (1, 64, 20, 21, 96, 1, 1, 0),
        (2, 40, 9, 8, 24, 1, 2, 0),
        (1, 300, 6, 5, 20, 1, 2, 0),
        (3, 130, 7, 9, 70, 1, 1, 0),
        (2, 35, 17, 15, 72, 3, 1, 1),
        (2, 32, 18, 19, 64, 3, 2, 1),
    ] {
        let x = randn(0., 1., (b, cin, h, wd), &dev)?;
        let w = randn(0., 0.2, (cout, cin, k, k), &dev)?;
        let parts =
            retinanet_kernels::conv2d_bf16_products(x.dims(), w.dims(), ConvParams::new(s, p))?;
        assert!(parts.forward, "{:?}", (b, cin, h, wd, cout, k, s, p));
        let bias = randn(0., 1., cout, &dev)?;
        let lin = round_bf16(&x)?
            .conv2d(&round_bf16(&w)?, p, s, 1, 1)?
            .broadcast_add(&bias.reshape((1, cout, 1, 1))?)?;
        let res = randn(0., 1., lin.dims(), &dev)?;
        let (relu, add) = bf16::with_bf16_products(true, || -> Result<_> {
            Ok((
                conv2d_relu(&x, &w, Some(&bias), ConvParams::new(s, p))?,
                conv2d_add_relu(&x, &w, Some(&bias), &res, ConvParams::new(s, p))?,
            ))
        })
        .expect("bf16 available")?;
        let case = format!("{:?}", (b, cin, h, wd, cout, k, s, p));
        assert_close(&format!("bf16 relu {case}"), &relu, &lin.relu()?, 1e-5)?;
        assert_close(
            &format!("bf16 add_relu {case}"),
            &add,
            &(&lin + &res)?.relu()?,
            1e-5,
        )?;
    }
    Ok(())
}
