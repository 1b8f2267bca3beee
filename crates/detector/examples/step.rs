//! One training step or one inference pass of RetinaNet on random data, for timing and peak
//! memory (`/usr/bin/time -v`).
//!
//! `cargo run --release -p retinanet-detector --example step -- train 257 2 [depth] [classes]`
//! `cargo run --release -p retinanet-detector --example step -- infer 641 1 [depth] [classes]`

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, SGD, VarBuilder, VarMap};
use retinanet_detector::{RetinaNet, RetinaNetConfig};
use retinanet_extractor::{Depth, ResNetConfig, is_buffer};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // candle asks `num_cpus` for the thread count on every parallel op unless RAYON_NUM_THREADS
    // is set; on some machines that reads /proc/cpuinfo each time (here: 2.5x slower steps).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: step <train|infer> <size> <batch> [depth=50] [classes=20]";
    let mode = args.first().ok_or(usage)?.clone();
    let size: usize = args.get(1).ok_or(usage)?.parse()?;
    let batch: usize = args.get(2).ok_or(usage)?.parse()?;
    let depth: usize = args.get(3).map_or(Ok(50), |s| s.parse())?;
    let classes: usize = args.get(4).map_or(Ok(20), |s| s.parse())?;
    let depth = Depth::from_layers(depth).ok_or("depth must be 18, 34, 50 or 101")?;

    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let cfg = RetinaNetConfig::new(ResNetConfig::new(depth, None), classes);
    let model = RetinaNet::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
    let x = Tensor::randn(0f32, 1., (batch, 3, size, size), &dev)?;
    match mode.as_str() {
        "train" => {
            let params: Vec<_> = varmap
                .data()
                .lock()
                .unwrap()
                .iter()
                .filter(|(k, _)| !is_buffer(k))
                .map(|(_, v)| v.clone())
                .collect();
            let mut opt = SGD::new(params, 0.01)?;
            let t = Instant::now();
            let (cls, reg) = model.forward_t(&x, true)?;
            let loss = (candle_nn::ops::sigmoid(&cls)?.mean_all()? + reg.sqr()?.mean_all()?)?;
            let t_fwd = t.elapsed().as_secs_f64();
            let grads = loss.backward()?;
            let t_bwd = t.elapsed().as_secs_f64() - t_fwd;
            opt.step(&grads)?;
            println!(
                "train {size}x{size} batch {batch}: forward {t_fwd:.2}s, backward {t_bwd:.2}s, \
                 step total {:.2}s, loss {:.5}",
                t.elapsed().as_secs_f64(),
                loss.to_scalar::<f32>()?
            );
        }
        "infer" => {
            let t = Instant::now();
            let (cls, _) = model.infer(&x)?;
            println!(
                "infer {size}x{size} batch {batch}: {:.2}s, {} anchors",
                t.elapsed().as_secs_f64(),
                cls.dim(1)?
            );
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}
