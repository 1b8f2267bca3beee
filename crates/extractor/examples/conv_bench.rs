//! Forward + backward time of one convolution: candle's own backward against
//! `retinanet_extractor::ops::conv2d` (`cargo run --release -p retinanet-extractor --example
//! conv_bench`).

use candle_core::{Device, Module, Tensor, Var};
use candle_nn::{Conv2d, Conv2dConfig};
use retinanet_extractor::ops::conv2d;
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // (name, batch, cin, cout, k, stride, padding, size): ResNet-50 / head layers at 257x257.
    let cases = [
        ("stem 7x7/2", 2, 3, 64, 7, 2, 3, 257),
        ("layer1 3x3", 2, 64, 64, 3, 1, 1, 65),
        ("layer1 1x1", 2, 64, 256, 1, 1, 0, 65),
        ("layer2 3x3/2", 2, 128, 128, 3, 2, 1, 65),
        ("layer3 3x3", 2, 256, 256, 3, 1, 1, 17),
        ("head 3x3 P3", 2, 256, 256, 3, 1, 1, 33),
    ];
    for (name, b, cin, cout, k, stride, padding, size) in cases {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (b, cin, size, size), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (cout, cin, k, k), &dev)?)?;
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let conv = Conv2d::new(w.as_tensor().clone(), None, cfg);
        let mut times = [0f64; 2];
        for (i, t) in times.iter_mut().enumerate() {
            let start = Instant::now();
            for _ in 0..3 {
                let y = if i == 0 {
                    conv.forward(x.as_tensor())?
                } else {
                    conv2d(x.as_tensor(), &conv)?
                };
                let g = y.sum_all()?.backward()?;
                assert!(g.get(w.as_tensor()).is_some());
            }
            *t = start.elapsed().as_secs_f64() / 3.0;
        }
        println!(
            "{name:14} candle {:.3}s  ops::conv2d {:.3}s",
            times[0], times[1]
        );
    }
    Ok(())
}
