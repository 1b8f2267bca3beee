//! Fast CPU kernels for the RetinaNet model on candle: convolution (im2col + gemm, forward and
//! backward) and batch normalisation, plugged into candle as custom ops with backward passes, so
//! model code keeps using ordinary tensors and autograd.
//!
//! * [`conv2d`] / [`conv2d_relu`]: PyTorch's `F.conv2d` (groups 1) with optional bias and fused
//!   ReLU. 1x1 stride-1 convolutions are a plain matrix product; others build the patch matrix
//!   of one image at a time, in cache-sized row blocks (im2col), and multiply with the `gemm`
//!   crate; wide stride-1 3x3 convolutions use Winograd F(2x2, 3x3), and f32 convolutions with
//!   kernels larger than 1x1 and up to 256 input channels a direct kernel without a patch
//!   matrix (AVX-512 or AVX2 + FMA, chosen at run time by [`cpu`]; `RETINANET_NO_DIRECT_CONV=1`
//!   turns it off, `RETINANET_ISA=avx2` caps it, for comparisons). Backward: the input gradient is `Wᵀ · dY`
//!   scattered back (col2im), or for stride 1 a forward convolution of `dY` with the rotated
//!   kernel (through the same kernels); the weight gradient `dY · colsᵀ`.
//! * [`batch_norm_train`]: training-mode batch norm in two passes forward and backward, returning
//!   the batch statistics for the running averages, with a fused ReLU
//!   ([`batch_norm_train_act`]) or residual add + ReLU ([`batch_norm_train_add_relu`]);
//!   [`channel_affine`]: evaluation-mode batch norm (`x * scale + shift`) in one pass.
//! * [`relu`], [`add_relu`]: parallel ReLU and residual add + ReLU with one-pass backward.
//! * [`sgd_step`]: SGD with momentum and weight decay updating parameters and momentum buffers
//!   in place, two parallel passes per tensor.
//!
//! Winograd's transformed kernels and the direct kernel's packed weights are kept for weights
//! seen again (the head's pyramid levels,
//! inference over many images), found by content: `RETINANET_TRANSFORM_CACHE_MB` (default a
//! sixteenth of the memory, 128 to 256; 0 off) bounds the memory they take.
//!
//! Every op falls back to candle's own operations off the CPU or for dtypes other than f32/f64.
//! Work is spread over rayon's global pool; see [`configure_runtime`] for the process settings
//! that matter on the CPU.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use retinanet_kernels::{ConvParams, conv2d};
//!
//! let x = Tensor::randn(0f32, 1., (2, 3, 9, 9), &Device::Cpu)?;
//! let w = Tensor::randn(0f32, 1., (4, 3, 3, 3), &Device::Cpu)?;
//! let y = conv2d(&x, &w, None, ConvParams::new(2, 1))?;
//! assert_eq!(y.dims(), &[2, 4, 5, 5]);
//! let reference = x.conv2d(&w, 1, 2, 1, 1)?;
//! let err = (y - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(err < 1e-4);
//! # Ok::<(), candle_core::Error>(())
//! ```

pub mod bf16;
mod bn;
mod conv;
pub mod cpu;
mod direct;
#[doc(hidden)]
pub mod dtype;
mod par;
mod reduce;
mod reuse;
mod sgd;
mod winograd;
mod winograd4;

pub use bn::{
    BatchNormOutput, SumReducer, add_relu, batch_norm_train, batch_norm_train_act,
    batch_norm_train_add_relu, batch_norm_train_synced, channel_affine, relu,
};
pub use conv::{
    Bf16Products, ConvParams, conv2d, conv2d_add_relu, conv2d_bf16_products, conv2d_macs,
    conv2d_out_dims, conv2d_relu,
};
pub use par::zeroed;
pub use sgd::{SgdStep, sgd_step, sgd_supported};

/// Sets the thread counts of the process when the environment does not: `RAYON_NUM_THREADS` (read
/// by rayon, hence by these kernels and by candle's matrix products) to the CPUs this process may
/// use, and `CANDLE_NUM_THREADS` (candle's own pool for element-wise operations) to 1. Returns
/// the rayon thread count in effect.
///
/// Why: candle 0.11 asks for its thread count on every matrix product and, without one of these
/// variables, counts physical cores by parsing `/proc/cpuinfo` each time. Its element-wise pool
/// waits for its workers by spinning, which on a small machine takes cores from the rayon
/// threads doing the convolutions: with it at 1 thread a ResNet-50 RetinaNet training step
/// (257 px, batch 2, 2 cores) took 1.31 s instead of 1.46 s, inference 0.36 s instead of 0.40 s.
///
/// Called on the process's main thread with 2 or more threads, it also makes that thread one
/// of rayon's workers ([`main_thread_joins_pool`]).
///
/// Call this first thing in `main`, before any thread is spawned: setting an environment
/// variable is only sound while the process is single-threaded.
pub fn configure_threads() -> usize {
    let get = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
    };
    if get("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: documented precondition — called before the process starts other threads.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    let n = match get("RAYON_NUM_THREADS") {
        Some(n) => n,
        None => {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            // SAFETY: as above.
            unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
            n
        }
    };
    main_thread_joins_pool(n);
    n
}

/// Makes the calling thread worker 0 of rayon's global pool of `threads` threads (`threads - 1`
/// more are started), if it is the process's main thread, `threads >= 2` and the pool does not
/// exist yet; returns whether it did.
///
/// Why: candle runs every operation on the thread that calls it, and the kernels hand their
/// parallel loops to rayon. From a thread outside the pool each hand-off injects a job, wakes a
/// worker, puts the caller to sleep and wakes it again at the end: ~3,000 context switches per
/// training step of the small model (2 cores, Zen 3 VM), with a core idle at every wake-up. As
/// a worker the main thread runs its share of each loop itself, and the switches fall to ~350
/// per step (0.75 instead of 0.86 CPU-seconds per 129 px batch-16 step; step time 0.945x).
///
/// Only the main thread (it lives as long as the process) and only with a second worker:
/// worker 0 runs pool jobs only while it is inside a rayon call itself, so when it waits on
/// something else (the data loader's channel, whose producer uses rayon too) the other
/// workers must be there to run them.
pub fn main_thread_joins_pool(threads: usize) -> bool {
    if threads < 2 || !on_main_thread() {
        return false;
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .use_current_thread()
        .build_global()
        .is_ok()
}

/// Whether this is the process's main thread (Linux: its thread id is the process id; elsewhere
/// unknown, so no).
fn on_main_thread() -> bool {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and getpid have no preconditions.
    unsafe {
        libc::gettid() == libc::getpid()
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// Keeps freed memory in the allocator for reuse (glibc on Linux; elsewhere a no-op).
///
/// Every tensor operation allocates its output afresh. glibc serves blocks above its mmap
/// threshold with new mappings, which the kernel zero-fills page by page on first touch and
/// unmaps again on free: ~10% of a training step's CPU time here. Raising the mmap threshold to
/// its maximum (32 MiB) and the trim threshold lets freed activations be reused in place; peak
/// RSS stays about the same (measured on the ResNet-50 training step: +1%).
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; it is thread-safe in glibc.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Checks the environment variables these kernels read, so that a mistyped value is an error
/// at start instead of a silently ignored setting: `RAYON_NUM_THREADS` (a positive integer),
/// `RETINANET_TRANSFORM_CACHE_MB` (a non-negative integer), `RETINANET_TUNE` (`0` or `1`),
/// `RETINANET_ISA` (`avx512`, `avx2` or `none`). The error names the variable and its value.
pub fn check_settings() -> Result<(), String> {
    settings_error(|k| std::env::var(k).ok())
}

/// [`check_settings`] over `get` (a variable's value, if set).
fn settings_error(get: impl Fn(&str) -> Option<String>) -> Result<(), String> {
    let var = |k: &'static str| get(k).map(|v| (k, v));
    let int = |k: &str, v: &str, min: u64, what: &str| match v.trim().parse::<u64>() {
        Ok(n) if n >= min => Ok(()),
        _ => Err(format!("{k} = `{v}` is not {what}")),
    };
    if let Some((k, v)) = var("RAYON_NUM_THREADS") {
        int(k, &v, 1, "a positive number of threads")?;
    }
    if let Some((k, v)) = var("RETINANET_TRANSFORM_CACHE_MB") {
        int(k, &v, 0, "a number of MiB (0 turns the cache off)")?;
    }
    if let Some((k, v)) = var("RETINANET_TUNE")
        && v != "0"
        && v != "1"
    {
        return Err(format!(
            "{k} = `{v}` is not 0 (first plan) or 1 (measured choice)"
        ));
    }
    if let Some((k, v)) = var("RETINANET_ISA")
        && !["avx512", "avx2", "none"].contains(&v.to_ascii_lowercase().as_str())
    {
        return Err(format!(
            "{k} = `{v}` names no instruction set (avx512, avx2, none)"
        ));
    }
    Ok(())
}

/// [`configure_threads`] and [`configure_allocator`]: what a binary running the model on the
/// CPU should call first thing in `main`. Returns the thread count.
pub fn configure_runtime() -> usize {
    configure_allocator();
    configure_threads()
}

/// Slice-level entry points of the convolution kernels, for benchmarks.
#[doc(hidden)]
pub mod raw {
    use crate::ConvParams;
    use crate::conv::{Geom, backward_input, backward_weight, forward};

    /// Seconds per call (CPU time of the process when `cpu`, else wall time) of the forward,
    /// input-gradient and weight-gradient kernels of one convolution, each repeated `reps` times.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_parts(
        x_dims: &[usize],
        w_dims: &[usize],
        p: ConvParams,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        reps: usize,
        cpu: bool,
    ) -> candle_core::Result<[f64; 3]> {
        let g = Geom::new(x_dims, w_dims, p)?;
        let reps = reps.max(1);
        let wall = std::time::Instant::now();
        let clock = || {
            if cpu {
                cpu_seconds()
            } else {
                wall.elapsed().as_secs_f64()
            }
        };
        let per = |f: &dyn Fn()| {
            let t = clock();
            for _ in 0..reps {
                f();
            }
            (clock() - t) / reps as f64
        };
        Ok([
            per(&|| drop(std::hint::black_box(forward(&g, x, w, None, false)))),
            per(&|| drop(std::hint::black_box(backward_input(&g, dy, w)))),
            per(&|| drop(std::hint::black_box(backward_weight(&g, x, dy)))),
        ])
    }

    /// CPU time (user + system) of this process so far, in seconds (10 ms ticks): a measure of
    /// work that holds up on a loaded machine where wall time does not.
    pub fn cpu_seconds() -> f64 {
        let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let rest = s.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // Fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the command name.
        (tick(11) + tick(12)) / 100.0
    }
}

#[cfg(test)]
mod settings_tests {
    #[test]
    fn mistyped_settings_are_errors_naming_them() {
        let check = |k: &str, v: &str| {
            let (k, v) = (k.to_string(), v.to_string());
            super::settings_error(move |q| (q == k).then(|| v.clone()))
        };
        assert_eq!(check("UNRELATED", "x"), Ok(()));
        for (k, v) in [
            ("RAYON_NUM_THREADS", "4"),
            ("RETINANET_TRANSFORM_CACHE_MB", "0"),
            ("RETINANET_TRANSFORM_CACHE_MB", " 512 "),
            ("RETINANET_ISA", "AVX2"),
            ("RETINANET_ISA", "none"),
            ("RETINANET_TUNE", "0"),
        ] {
            assert_eq!(check(k, v), Ok(()), "{k}={v}");
        }
        for (k, v) in [
            ("RAYON_NUM_THREADS", "0"),
            ("RAYON_NUM_THREADS", "two"),
            ("RETINANET_TRANSFORM_CACHE_MB", "-1"),
            ("RETINANET_TRANSFORM_CACHE_MB", "256MB"),
            ("RETINANET_TRANSFORM_CACHE_MB", ""),
            ("RETINANET_ISA", "avx512bf16"),
            ("RETINANET_TUNE", "off"),
        ] {
            let e = check(k, v).expect_err(&format!("{k}={v}"));
            assert!(e.contains(k) && e.contains(&format!("`{v}`")), "{e}");
        }
    }
}
