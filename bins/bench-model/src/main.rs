//! Times the RetinaNet model on random data: inference, a training step (forward, focal loss,
//! backward, SGD update with momentum 0.9 and weight decay 1e-4) and, with `--layers`, every convolution of the model on its own.
//!
//! ```text
//! bench-model --size 257 --batch 2 --mode both            # ResNet-50 + FPN, 20 classes
//! bench-model --size 641 --batch 1 --mode infer --json
//! bench-model --depth 18 --base-width 32 --fpn 64 --head 64 --size 129 --batch 16 --mode train
//! bench-model --size 257 --batch 2 --layers --candle       # per-convolution table
//! bench-model --conv 8,256,33,33,256,3,1,1 --candle        # one convolution
//! ```
//!
//! Figures are medians over `--iters` timed runs after `--warmup` untimed ones; peak RSS is the
//! process's high-water mark (run inference and training in separate processes to compare
//! memory).

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use clap::{Parser, ValueEnum};
use retinanet_detector::{RetinaNet, RetinaNetConfig};
use retinanet_extractor::{Depth, ResNetConfig};
use retinanet_kernels::{ConvParams, conv2d, conv2d_macs};
use retinanet_loss::{FocalLossConfig, focal_loss_detection};
use retinanet_train::device::{Precision, parse_device};
use retinanet_train::model::trainable_vars;
use retinanet_train::optim::Sgd;
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Infer,
    Train,
    Both,
}

#[derive(Debug, Parser)]
#[command(about = "Time RetinaNet inference, training steps and convolutions on random data")]
struct Args {
    /// ResNet depth: 18, 34, 50 or 101.
    #[arg(long, default_value_t = 50)]
    depth: usize,
    /// ResNet base width (64 standard, 32 half).
    #[arg(long, default_value_t = 64)]
    base_width: usize,
    /// FPN channels.
    #[arg(long, default_value_t = 256)]
    fpn: usize,
    /// Head channels.
    #[arg(long, default_value_t = 256)]
    head: usize,
    /// Object classes.
    #[arg(long, default_value_t = 20)]
    classes: usize,
    /// Input side (square images).
    #[arg(long, default_value_t = 257)]
    size: usize,
    /// Batch size.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// What to time.
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// SGD learning rate of the training step.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Time every convolution of the model on its own instead of the whole model.
    #[arg(long)]
    layers: bool,
    /// Time one convolution `B,Cin,H,W,Cout,k,stride,padding` instead of the model.
    #[arg(long)]
    conv: Option<String>,
    /// With --layers/--conv: also time candle's own conv2d (forward and backward).
    #[arg(long)]
    candle: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Device of the model benchmark: cpu, cuda or cuda:N (CUDA needs `--features cuda`).
    /// Per-layer and single-convolution timings are CPU-kernel benchmarks and ignore it.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Arithmetic of the convolutions, as the `precision` config key: f32, tf32 (CUDA) or bf16
    /// (CPUs with AVX512-BF16; also for --layers/--conv).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// Short for `--precision tf32`: on CUDA, cuBLAS runs f32 matrix products (and so candle's
    /// convolutions) in TF32, as PyTorch does by default for its cuDNN convolutions.
    #[arg(long)]
    tf32: bool,
}

impl Args {
    fn precision(&self) -> Precision {
        if self.tf32 {
            Precision::Tf32
        } else {
            self.precision
        }
    }
}

/// Median of the wall times (seconds) of `iters` runs of `f` after `warmup` runs.
fn time<F: FnMut() -> Result<()>>(warmup: usize, iters: usize, mut f: F) -> Result<Timing> {
    for _ in 0..warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(iters);
    let cpu0 = cpu_seconds();
    for _ in 0..iters.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    let cpu = (cpu_seconds() - cpu0) / t.len() as f64;
    t.sort_by(f64::total_cmp);
    Ok(Timing {
        median_s: t[t.len() / 2],
        min_s: t[0],
        max_s: t[t.len() - 1],
        cpu_s: cpu,
        runs: t.len(),
    })
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Timing {
    median_s: f64,
    min_s: f64,
    max_s: f64,
    /// Mean CPU time (user + system, all threads) per run: the work done, which a loaded
    /// machine does not inflate the way it inflates wall time.
    cpu_s: f64,
    runs: usize,
}

/// CPU time of this process so far (user + system, 10 ms ticks), in seconds.
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat: 11 and 12 after the command name.
    (tick(11) + tick(12)) / 100.0
}

/// Peak resident set size of this process in bytes (`VmHWM`), if the OS reports it.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[derive(Debug, Serialize)]
struct ModelReport {
    model: String,
    size: usize,
    batch: usize,
    threads: usize,
    /// The `precision` setting the model ran in.
    precision: &'static str,
    /// What the kernels found on this CPU (instruction set, caches).
    cpu: String,
    /// Seconds to fold BatchNorm into the convolutions, once before inference.
    fold_s: Option<f64>,
    inference: Option<Timing>,
    train_step: Option<Timing>,
    peak_rss_bytes: Option<u64>,
}

fn model_config(a: &Args) -> Result<RetinaNetConfig> {
    let depth =
        Depth::from_layers(a.depth).with_context(|| format!("unknown depth {}", a.depth))?;
    let backbone = ResNetConfig {
        base_width: a.base_width,
        ..ResNetConfig::new(depth, None)
    };
    let mut cfg = RetinaNetConfig::new(backbone, a.classes);
    cfg.detector.fpn_channels = a.fpn;
    cfg.detector.head_channels = a.head;
    Ok(cfg)
}

fn bench_model(a: &Args, threads: usize) -> Result<ModelReport> {
    let dev = parse_device(&a.device)?;
    a.precision().apply(&dev)?;
    let cfg = model_config(a)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = RetinaNet::new(vb, &cfg)?;
    let x = Tensor::randn(0f32, 1., (a.batch, 3, a.size, a.size), &dev)?;
    let mut report = ModelReport {
        model: format!(
            "ResNet-{} (width {}) + FPN {} / heads {}, {} classes",
            a.depth, a.base_width, a.fpn, a.head, a.classes
        ),
        size: a.size,
        batch: a.batch,
        threads,
        precision: a.precision().name(),
        // Filled in after the runs (see below).
        cpu: String::new(),
        fold_s: None,
        inference: None,
        train_step: None,
        peak_rss_bytes: None,
    };
    if matches!(a.mode, Mode::Infer | Mode::Both) {
        // As `evaluate` and `inspect` run it: BatchNorm folded once, then every batch.
        let t = std::time::Instant::now();
        let inf = model.for_inference()?;
        report.fold_s = Some(t.elapsed().as_secs_f64());
        report.inference = Some(time(a.warmup, a.iters, || {
            let (cls, reg) = inf.infer(&x)?;
            let _ = (cls.dims(), reg.dims());
            // A GPU runs asynchronously: the time counts only once its queue is done.
            dev.synchronize()?;
            Ok(())
        })?);
    }
    if matches!(a.mode, Mode::Train | Mode::Both) {
        // The pipelines' optimizer: SGD with momentum 0.9 and weight decay 1e-4 (in place on
        // the CPU, tensor arithmetic elsewhere).
        let mut sgd = Sgd::new(trainable_vars(&varmap), 0.9, 1e-4)?;
        let (cls, _) = model.forward_t(&x, false)?;
        let anchors = cls.dim(1)?;
        // Random targets: about 1% positives, 1% ignored, the rest background.
        let u = Tensor::rand(0f32, 1., (a.batch, anchors), &dev)?;
        let lbl = Tensor::rand(0f32, a.classes as f32, (a.batch, anchors), &dev)?
            .floor()?
            .affine(1.0, 1.0)?;
        let pos = u.lt(0.01)?.to_dtype(DType::F32)?;
        let ign = u.ge(0.99)?.to_dtype(DType::F32)?;
        let cls_t = ((pos * lbl)? - ign)?.to_dtype(DType::I64)?;
        let reg_t = Tensor::randn(0f32, 1., (a.batch, anchors, 4), &dev)?;
        let loss_cfg = FocalLossConfig::default();
        report.train_step = Some(time(a.warmup, a.iters, || {
            let (cls, reg) = model.forward_t(&x, true)?;
            let loss = focal_loss_detection(&cls, &reg, &cls_t, &reg_t, &loss_cfg)?;
            let grads = loss.total.backward()?;
            sgd.step(&grads, a.lr, None)?;
            dev.synchronize()?;
            Ok(())
        })?);
    }
    report.peak_rss_bytes = peak_rss();
    // Now, after the runs: it also says which instruction set each layer shape was measured
    // faster with, where the CPU has several.
    report.cpu = retinanet_kernels::cpu::summary();
    Ok(report)
}

/// One convolution of the model: where it is, its input/weight shapes, how often it occurs.
#[derive(Debug, Clone, Serialize)]
struct ConvSpec {
    name: String,
    count: usize,
    x: [usize; 4],
    w: [usize; 4],
    stride: usize,
    padding: usize,
}

fn out_side(n: usize, k: usize, s: usize, p: usize) -> usize {
    (n + 2 * p - k) / s + 1
}

/// The convolutions of the configured model at this input size, identical ones merged.
fn model_convs(a: &Args) -> Result<Vec<ConvSpec>> {
    let cfg = model_config(a)?;
    let b = a.batch;
    let mut v: Vec<ConvSpec> = Vec::new();
    let mut push = |name: String, x: [usize; 4], w: [usize; 4], stride: usize, padding: usize| {
        if let Some(e) = v
            .iter_mut()
            .find(|e| e.x == x && e.w == w && e.stride == stride && e.padding == padding)
        {
            e.count += 1;
        } else {
            v.push(ConvSpec {
                name,
                count: 1,
                x,
                w,
                stride,
                padding,
            });
        }
    };
    let bw = a.base_width;
    let mut s = out_side(a.size, 7, 2, 3);
    push(
        "stem 7x7/2".into(),
        [b, 3, a.size, a.size],
        [bw, 3, 7, 7],
        2,
        3,
    );
    s = out_side(s, 3, 2, 1);
    let mut cin = bw;
    let bottleneck = cfg.extractor.depth.bottleneck();
    let mut outs = Vec::new();
    for (stage, &n) in cfg.extractor.depth.blocks().iter().enumerate() {
        let planes = bw << stage;
        for i in 0..n {
            let stride = if stage > 0 && i == 0 { 2 } else { 1 };
            let so = out_side(s, 3, stride, 1);
            let name =
                |c: &str| format!("layer{}.{} {c}", stage + 1, if i == 0 { "0" } else { "i" });
            let cout = if bottleneck {
                push(name("conv1 1x1"), [b, cin, s, s], [planes, cin, 1, 1], 1, 0);
                push(
                    name("conv2 3x3"),
                    [b, planes, s, s],
                    [planes, planes, 3, 3],
                    stride,
                    1,
                );
                push(
                    name("conv3 1x1"),
                    [b, planes, so, so],
                    [planes * 4, planes, 1, 1],
                    1,
                    0,
                );
                planes * 4
            } else {
                push(
                    name("conv1 3x3"),
                    [b, cin, s, s],
                    [planes, cin, 3, 3],
                    stride,
                    1,
                );
                push(
                    name("conv2 3x3"),
                    [b, planes, so, so],
                    [planes, planes, 3, 3],
                    1,
                    1,
                );
                planes
            };
            if stride != 1 || cin != cout {
                push(
                    name("downsample 1x1"),
                    [b, cin, s, s],
                    [cout, cin, 1, 1],
                    stride,
                    0,
                );
            }
            cin = cout;
            s = so;
        }
        outs.push((cin, s));
    }
    let (f, h) = (a.fpn, a.head);
    let (c3, s3) = outs[1];
    let (c4, s4) = outs[2];
    let (c5, s5) = outs[3];
    let s6 = out_side(s5, 3, 2, 1);
    push(
        "conv_out6 3x3/2".into(),
        [b, c5, s5, s5],
        [f, c5, 3, 3],
        2,
        1,
    );
    push("prj_5".into(), [b, c5, s5, s5], [f, c5, 1, 1], 1, 0);
    push("prj_4".into(), [b, c4, s4, s4], [f, c4, 1, 1], 1, 0);
    push("prj_3".into(), [b, c3, s3, s3], [f, c3, 1, 1], 1, 0);
    push("conv_3".into(), [b, f, s3, s3], [f, f, 3, 3], 1, 1);
    push("conv_4".into(), [b, f, s4, s4], [f, f, 3, 3], 1, 1);
    let anchors = 3;
    for (lvl, side) in [("P3", s3), ("P4", s4), ("P5", s5), ("P6", s6)] {
        for (head, last) in [("cls", anchors * a.classes), ("reg", anchors * 4)] {
            push(
                format!("{head} {lvl} hidden"),
                [b, f, side, side],
                [h, f, 3, 3],
                1,
                1,
            );
            push(
                format!("{head} {lvl} hidden"),
                [b, h, side, side],
                [h, h, 3, 3],
                1,
                1,
            );
            push(
                format!("{head} {lvl} hidden"),
                [b, h, side, side],
                [h, h, 3, 3],
                1,
                1,
            );
            push(
                format!("{head} {lvl} out"),
                [b, h, side, side],
                [last, h, 3, 3],
                1,
                1,
            );
        }
    }
    Ok(v)
}

#[derive(Debug, Serialize)]
struct ConvTiming {
    spec: ConvSpec,
    gflop: f64,
    fwd_s: f64,
    bwd_s: f64,
    candle_fwd_s: Option<f64>,
    candle_bwd_s: Option<f64>,
}

/// Times one convolution's kernels (wall time, median of `--iters` rounds): forward, input
/// gradient, weight gradient; with `--candle`, candle's conv2d forward and its autograd backward
/// (the time of forward + `backward()` of `sum(y * r)` minus the forward, so it includes a few
/// element-wise passes over the output).
fn bench_conv(spec: &ConvSpec, a: &Args) -> Result<ConvTiming> {
    let dev = Device::Cpu;
    let p = ConvParams::new(spec.stride, spec.padding);
    let macs = conv2d_macs(&spec.x, &spec.w, p)?;
    let x = Tensor::randn(0f32, 1., spec.x.to_vec(), &dev)?;
    let w = Tensor::randn(0f32, 0.1, spec.w.to_vec(), &dev)?;
    let y = conv2d(&x, &w, None, p)?;
    let r = Tensor::randn(0f32, 1., y.dims(), &dev)?;
    let (xv, wv, rv) = (
        x.flatten_all()?.to_vec1::<f32>()?,
        w.flatten_all()?.to_vec1::<f32>()?,
        r.flatten_all()?.to_vec1::<f32>()?,
    );
    // Repetitions for ~50 ms per measurement at 100 GFLOP/s.
    let reps = ((0.05 * 100e9) / (2.0 * macs as f64)).ceil().max(1.0) as usize;
    let mut rounds = Vec::new();
    for _ in 0..a.iters.max(3) {
        rounds.push(retinanet_kernels::raw::conv_parts(
            &spec.x, &spec.w, p, &xv, &wv, &rv, reps, false,
        )?);
    }
    let median = |i: usize| {
        let mut v: Vec<f64> = rounds.iter().map(|t| t[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mut cf, mut cb) = (None, None);
    if a.candle {
        let xv = Var::from_tensor(&x)?;
        let wv = Var::from_tensor(&w)?;
        let f = time(1, a.iters.max(3), || {
            xv.as_tensor()
                .conv2d(&wv, spec.padding, spec.stride, 1, 1)?;
            Ok(())
        })?;
        cf = Some(f.median_s);
        // candle's backward fails on some strided shapes (width remainder differs): leave blank.
        if let Ok(t) = time(1, a.iters.max(3), || {
            let y = xv
                .as_tensor()
                .conv2d(&wv, spec.padding, spec.stride, 1, 1)?;
            (y * &r)?.sum_all()?.backward()?;
            Ok(())
        }) {
            cb = Some((t.median_s - f.median_s).max(0.0));
        }
    }
    Ok(ConvTiming {
        spec: spec.clone(),
        gflop: 2.0 * macs as f64 / 1e9,
        fwd_s: median(0),
        bwd_s: median(1) + median(2),
        candle_fwd_s: cf,
        candle_bwd_s: cb,
    })
}

fn parse_conv(s: &str) -> Result<ConvSpec> {
    let v: Vec<usize> = s
        .split(',')
        .map(|t| t.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--conv {s:?}: expected 8 comma-separated integers"))?;
    let &[b, cin, h, w, cout, k, stride, padding] = v.as_slice() else {
        bail!("--conv {s:?}: expected B,Cin,H,W,Cout,k,stride,padding (8 numbers)")
    };
    Ok(ConvSpec {
        name: "conv".into(),
        count: 1,
        x: [b, cin, h, w],
        w: [cout, cin, k, k],
        stride,
        padding,
    })
}

fn print_layers(rows: &[ConvTiming]) {
    let gf = |g: f64, t: f64| if t > 0.0 { g / t } else { f64::NAN };
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |t| format!("{:.2}", t * 1e3));
    println!(
        "{:<24} {:>3} {:>22} {:>18} {:>7} {:>8} {:>6} {:>8} {:>6} {:>9} {:>9}",
        "layer",
        "n",
        "input",
        "weight",
        "GFLOP",
        "fwd ms",
        "GF/s",
        "bwd ms",
        "GF/s",
        "cndl fwd",
        "cndl bwd"
    );
    let (mut tf, mut tb, mut tcf, mut tcb) = (0.0, 0.0, 0.0, 0.0);
    for r in rows {
        let n = r.spec.count as f64;
        tf += n * r.fwd_s;
        tb += n * r.bwd_s;
        tcf += n * r.candle_fwd_s.unwrap_or(0.0);
        tcb += n * r.candle_bwd_s.unwrap_or(0.0);
        println!(
            "{:<24} {:>3} {:>22} {:>18} {:>7.3} {:>8.2} {:>6.0} {:>8.2} {:>6.0} {:>9} {:>9}",
            r.spec.name,
            r.spec.count,
            format!("{:?}", r.spec.x),
            format!("{:?}/{}", r.spec.w, r.spec.stride),
            r.gflop,
            r.fwd_s * 1e3,
            gf(r.gflop, r.fwd_s),
            r.bwd_s * 1e3,
            gf(2.0 * r.gflop, r.bwd_s),
            opt(r.candle_fwd_s),
            opt(r.candle_bwd_s),
        );
    }
    println!(
        "total (x count): forward {:.1} ms, backward {:.1} ms; candle forward {:.1} ms, backward {:.1} ms",
        tf * 1e3,
        tb * 1e3,
        tcf * 1e3,
        tcb * 1e3
    );
}

fn main() -> Result<()> {
    // Before any thread exists: a fixed thread count for candle, allocator reuse (see
    // retinanet_kernels::configure_runtime).
    let threads = retinanet_kernels::configure_runtime();
    retinanet_kernels::check_settings().map_err(anyhow::Error::msg)?;
    let a = Args::parse();
    if a.batch == 0 || a.size == 0 {
        bail!("--batch and --size must be positive")
    }
    if a.layers || a.conv.is_some() {
        // The kernel benchmarks run on the CPU, in the precision asked for.
        a.precision().apply(&Device::Cpu)?;
        let specs = match &a.conv {
            Some(s) => vec![parse_conv(s)?],
            None => model_convs(&a)?,
        };
        let rows = specs
            .iter()
            .map(|s| bench_conv(s, &a))
            .collect::<Result<Vec<_>>>()?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print_layers(&rows);
        }
        return Ok(());
    }
    let r = bench_model(&a, threads)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}, {}x{}, batch {}, {} threads, {}",
            r.model, r.size, r.size, r.batch, r.threads, r.precision
        );
        println!("{}", r.cpu);
        if let Some(f) = r.fold_s {
            println!("BatchNorm folded in {:.1} ms (once)", f * 1e3);
        }
        if let Some(t) = r.inference {
            println!(
                "inference : median {:.3} s  (min {:.3}, max {:.3}, {} runs; CPU {:.3} s/run)",
                t.median_s, t.min_s, t.max_s, t.runs, t.cpu_s
            );
        }
        if let Some(t) = r.train_step {
            println!(
                "train step: median {:.3} s  (min {:.3}, max {:.3}, {} runs; CPU {:.3} s/run)",
                t.median_s, t.min_s, t.max_s, t.runs, t.cpu_s
            );
        }
        if let Some(b) = r.peak_rss_bytes {
            println!("peak RSS  : {:.2} GB", b as f64 / 1e9);
        }
    }
    Ok(())
}
