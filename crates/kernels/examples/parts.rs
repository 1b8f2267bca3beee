//! Times the forward, input-gradient and weight-gradient kernels of one convolution:
//! `cargo run --release -p retinanet-kernels --example parts -- B,Cin,H,W,Cout,k,stride,padding
//! [bf16]` (`bf16`: with bf16 products, on CPUs with AVX512-BF16).
fn main() -> candle_core::Result<()> {
    let arg = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "8,256,33,33,256,3,1,1".into());
    let v: Vec<usize> = arg
        .split(',')
        .map(|s| s.parse().expect("integer"))
        .collect();
    let (xd, wd) = ([v[0], v[1], v[2], v[3]], [v[4], v[1], v[5], v[5]]);
    let p = retinanet_kernels::ConvParams::new(v[6], v[7]);
    let macs = retinanet_kernels::conv2d_macs(&xd, &wd, p)? as f64;
    let oh = (v[2] + 2 * v[7] - v[5]) / v[6] + 1;
    let ow = (v[3] + 2 * v[7] - v[5]) / v[6] + 1;
    let x = vec![0.5f32; xd.iter().product()];
    let w = vec![0.25f32; wd.iter().product()];
    let dy = vec![1f32; v[0] * v[4] * oh * ow];
    // Enough repetitions for ~0.3 s of work per kernel at 80 GFLOP/s (CPU time has 10 ms ticks).
    let reps = (0.3 * 80e9 / (2.0 * macs)).ceil() as usize;
    let bf16 = std::env::args().nth(2).is_some_and(|a| a == "bf16");
    for _ in 0..2 {
        let run = || retinanet_kernels::raw::conv_parts(&xd, &wd, p, &x, &w, &dy, reps, true);
        let t = if bf16 {
            retinanet_kernels::bf16::with_bf16_products(true, run)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))??
        } else {
            run()?
        };
        println!(
            "CPU time: fwd {:.1} ms ({:.0} GF/cpu-s)  dx {:.1} ms ({:.0})  dw {:.1} ms ({:.0})",
            t[0] * 1e3,
            2.0 * macs / t[0] / 1e9,
            t[1] * 1e3,
            2.0 * macs / t[1] / 1e9,
            t[2] * 1e3,
            2.0 * macs / t[2] / 1e9
        );
    }
    Ok(())
}
